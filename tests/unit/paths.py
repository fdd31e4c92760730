"""The bundled configs the unit tests plan from."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SEED_CONFIG = REPO / "conf" / "shapekit.toml"  # seed 000's tree
INCIDENT_CONFIG = REPO / "conf" / "examples" / "incident.toml"  # seed 002's tree
DOWNLOAD_CONFIG = REPO / "conf" / "examples" / "download.toml"  # seed 000 both ways: an ingress tree

# Their line, 100mbit, sends 12,500 bytes in a millisecond: shape-init holds eth0's GSO to 9 segments.
READ_GSO = ("ip", "-d", "-j", "link", "show", "dev", "eth0")
HOLD_GSO = ("ip", "link", "set", "dev", "eth0", "gso_max_segs", "9")
HOLD_GSO_SCRIPT = (
    "# eth0: the size of its GSO super-packets, which HTB sends whole\nip link set dev eth0 gso_max_segs 9\n"
)
