"""Reading `tc class show` text: iproute2 6.1 prints no JSON for HTB classes (`tc -j class show`)."""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class TcClass:
    parent: str  # "5c:1", or "root"
    rate: int  # bits/s
    ceil: int
    overhead: int = 0  # bytes HTB adds to each packet's length
    linklayer: str = "ethernet"

    @property
    def charged(self) -> str:
        """How the class charges a packet, as a person reads it: 'overhead 10 linklayer atm'."""
        return f"overhead {self.overhead} linklayer {self.linklayer}"


# `overhead` only when not 0, `linklayer` only when not ethernet (without -d).
_CLASS_LINE = re.compile(
    r"^class htb (\S+) (?:parent (\S+)|root)\b.*?\brate (\S+) (?:overhead (\d+) )?ceil (\S+)(?: linklayer (\S+))?",
    re.MULTILINE,
)
_TC_RATE = re.compile(r"^([0-9.]+)([KMGT]?)bit$")
_TC_SCALE = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def tc_rate(text: str) -> int:
    """A rate as `tc class show` prints it ('2048Kbit') in bits/s."""
    match = _TC_RATE.match(text)
    if not match:
        raise ValueError(f"not a tc rate: {text!r}")
    return round(float(match.group(1)) * _TC_SCALE[match.group(2)])


def parse_tc_classes(text: str) -> dict[str, TcClass]:
    """HTB classes from `tc class show` text (iproute2 6.1 prints no JSON for HTB classes)."""
    return {
        cid: TcClass(parent or "root", tc_rate(rate), tc_rate(ceil), int(overhead or 0), linklayer or "ethernet")
        for cid, parent, rate, overhead, ceil, linklayer in _CLASS_LINE.findall(text)
    }
