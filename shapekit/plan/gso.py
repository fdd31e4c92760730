"""How big a GSO super-packet a shaped device's own TCP may build: pure, no I/O.

HTB charges a super-packet whole and lets it out at once, and TCP builds
them up to 64 KB: 26 ms of a 20 Mbit/s line in one burst, which lands in the
modem's queue ahead of the ssh and DNS packets HTB meant to send first
(measured in README, "Latency under load"). Holding the device's
`gso_max_segs` to about what the line sends in a millisecond (whole
segments, at least one) keeps the bursts small; a fast line sends 64 KB in
under a millisecond and is left alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from shapekit.config.model import Device
from shapekit.plan.tree import Argv

GSO_BUDGET_S = 0.001  # about the longest a super-packet may take on the line (rounded up to whole segments)
SEGMENT_BYTES = 1500
GSO_SEGMENTS = 44  # 64 KB, the most a super-packet holds: a line that needs as many needs no hold


@dataclass(frozen=True)
class Gso:
    """A device's gso_max_segs now, and the most its driver takes (tso_max_segs)."""

    segs: int
    tso_max: int


@dataclass(frozen=True)
class Held:
    """A device whose gso_max_segs shapekit holds: what it set, and what to put back."""

    held: int
    was: int


def wanted_segs(device: Device) -> int | None:
    """The gso_max_segs the config asks for on `device`, or None: leave it as it is."""
    if device.gso_max_segs == "keep":
        return None
    if device.gso_max_segs != "auto":
        return device.gso_max_segs
    segs = math.ceil(device.rate / 8 * GSO_BUDGET_S / SEGMENT_BYTES)
    return segs if segs < GSO_SEGMENTS else None


def set_segs(dev: str, segs: int) -> list[Argv]:
    return [("ip", "link", "set", "dev", dev, "gso_max_segs", str(segs))]


def next_hold(want: int | None, now: int, held: Held | None) -> Held | None:
    """What shapekit holds after shape-init: `now` is the device's value, `held` what was held before.

    A device already within `want` needs nothing (its driver's own limit may be lower). The value to put
    back is the one before shapekit's hold: kept from `held` while the device still has shapekit's
    value, else (a reboot, or someone set it since) the value it has now.
    """
    if want is None:
        return None
    was = held.was if held is not None and held.held == now else now
    return Held(want, was) if was > want else None


def release(dev: str, now: Gso, held: Held) -> list[Argv]:
    """Put back the value from before shapekit's hold, unless someone has set another since; no more than
    the driver takes now (the kernel refuses more: a bond whose members changed may take less)."""
    was = min(held.was, now.tso_max)
    return set_segs(dev, was) if now.segs == held.held and now.segs != was else []


def plan_hold(dev: str, want: int | None, now: Gso, held: Held | None) -> tuple[list[Argv], Held | None]:
    """shape-init's commands for the device's gso_max_segs, and what it holds after them."""
    after = next_hold(want, now.segs, held)
    if after is not None:
        return (set_segs(dev, after.held) if now.segs != after.held else []), after
    return (release(dev, now, held) if held is not None else []), None


def gso_drift(dev: str, want: int | None, now: int, held: Held | None) -> list[str]:
    """How the device's gso_max_segs differs from what shape-init leaves."""
    if want is not None and now > want:
        return [f"{dev}: gso_max_segs is {now}; the config holds it to {want} (run shape-init)"]
    if want is None and held is not None and now == held.held:
        return [f"{dev}: gso_max_segs is held to {now}, which the config no longer asks for (run shape-init)"]
    return []


def unconfigured_drift(dev: str, now: int, held: Held) -> list[str]:
    """A device shapekit still holds that the config no longer shapes."""
    if now != held.held:
        return []
    return [f"{dev}: gso_max_segs is held to {now}, but the config does not shape {dev} (shape-flush --dev {dev})"]
