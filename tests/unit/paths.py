"""The bundled configs the unit tests plan from."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SEED_CONFIG = REPO / "conf" / "shapekit.toml"  # seed 000's tree
INCIDENT_CONFIG = REPO / "conf" / "examples" / "incident.toml"  # seed 002's tree
DOWNLOAD_CONFIG = REPO / "conf" / "examples" / "download.toml"  # seed 000 both ways: an ingress tree
