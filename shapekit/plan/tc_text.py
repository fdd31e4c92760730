"""Reading `tc class show` text: iproute2 6.1 prints no JSON for HTB classes (`tc -j class show`)."""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class TcClass:
    parent: str  # "5c:1", or "root"
    rate: int  # bits/s
    ceil: int


_CLASS_LINE = re.compile(r"^class htb (\S+) (?:parent (\S+)|root)\b.*?\brate (\S+) ceil (\S+)", re.MULTILINE)
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
        cid: TcClass(parent or "root", tc_rate(rate), tc_rate(ceil))
        for cid, parent, rate, ceil in _CLASS_LINE.findall(text)
    }
