"""shapekit: Linux traffic shaping (tc HTB, iptables marks, per-IP caps) from one TOML file."""

__version__ = "0.1.0"
