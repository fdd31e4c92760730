"""Pure functions for per-IP caps (seed 002): HTB classes, ipset entries, one rule per device.

Seed 002 runs, for every host, three processes and leaves one more linear
iptables rule that every packet walks:

    tc class add dev $NETCARD parent 1:0 classid 1:$mark htb rate ${bw}kbit ceil ${bw}kbit burst 5k prio $mark
    iptables -t mangle -A INPUT -i $NETCARD -s $ip -j CONNMARK --set-mark $mark
    tc filter add dev $NETCARD parent 1:0 protocol ip prio $mark handle $mark fw flowid 1:$mark

shapekit gives each capped host a class `5c:MINOR` (MINOR from 0x8000) under
the top class, with rate = ceil = the cap, and an entry `HOST skbprio
5c:MINOR` in an ipset hash of the device; one rule per device and IP family,

    -A SHAPEKIT-LIMIT -o DEV -j SET --map-set SHAPEKIT-DEV-4 dst --map-prio

sets the packet's class from one hash lookup, however many hosts are capped.
HTB takes a priority that names one of its classes before any filter, so a
cap holds whatever class a [[mark]] rule or the bypass chose. `--for` is the
entry's ipset timeout: the kernel drops it when it lapses, with no daemon.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from shapekit.config.addresses import Network
from shapekit.config.model import TOP_MINOR, Device
from shapekit.config.rules import CAP_MINORS, Cap
from shapekit.errors import UsageError
from shapekit.plan.tc_text import parse_tc_classes
from shapekit.plan.tree import Argv, classid, leaf_qdisc, rate_options

LIMIT = "SHAPEKIT-LIMIT"
SET_PREFIX = "SHAPEKIT-"
U32_NODES = 0xFFF  # node ids in one u32 hash bucket


@dataclass(frozen=True)
class PlacedCap:
    """A cap with the class minor it lives in."""

    cap: Cap
    minor: int


def set_name(dev: str, family: int) -> str:
    return f"{SET_PREFIX}{dev}-{family}"


def place_caps(device: Device, runtime: Sequence[Cap], now: float) -> list[PlacedCap]:
    """The caps in force on one tree: the config's, with run-time caps added or overriding.

    Config caps take minors from 0x8000 in file order; a run-time cap keeps
    the minor saved with it, or takes the config cap's it overrides, or the
    lowest free one. Lapsed run-time caps are gone, but the minors of their
    classes (which stay until the next full install) are not given out. On
    an ingress tree a host's minor also names its u32 filter's node, which
    must be free in its hash bucket.
    """
    pool = _MinorPool(device, lapsed_minors(device, runtime, now))
    placed: dict[Network, PlacedCap] = {}
    for cap in device.limits:
        placed[cap.host] = PlacedCap(cap, pool.take(cap))
    live = [c for c in runtime if device.holds(c) and not lapsed(c, now)]
    for cap in live:
        if cap.host in placed:  # overrides the config's cap, in its class
            placed[cap.host] = PlacedCap(cap, placed[cap.host].minor)
    for cap in live:
        if cap.host not in placed:
            placed[cap.host] = PlacedCap(cap, pool.take(cap, cap.minor))
    return list(placed.values())


class _MinorPool:
    """Hands out cap minors in order, each once, and (ingress) each host's hash node once per bucket."""

    def __init__(self, device: Device, taken: set[int]) -> None:
        self.device = device
        self.taken = taken
        self.slots: set[tuple[int, int, int]] = set()
        self.unused = iter(CAP_MINORS)
        self.passed: list[int] = []  # free minors whose node was taken in some bucket: for other hosts

    def take(self, cap: Cap, wish: int | None = None) -> int:
        if wish is not None and self._fits(cap, wish):
            return self._give(cap, wish)
        for n, minor in enumerate(self.passed):
            if self._fits(cap, minor):
                del self.passed[n]
                return self._give(cap, minor)
        for minor in self.unused:
            if minor in self.taken:
                continue
            if self._fits(cap, minor):
                return self._give(cap, minor)
            self.passed.append(minor)
        raise UsageError(
            f"{cap.host}: no class left for another cap on [{self.device.key}]: {len(CAP_MINORS)} caps in all, "
            f"and on arriving traffic {U32_NODES} hosts whose address ends in the same byte"
        )

    def _fits(self, cap: Cap, minor: int) -> bool:
        return minor in CAP_MINORS and minor not in self.taken and u32_slot(cap, minor) not in self.slots

    def _give(self, cap: Cap, minor: int) -> int:
        self.taken.add(minor)
        slot = u32_slot(cap, minor)
        if slot is not None:
            self.slots.add(slot)
        return minor


def u32_slot(cap: Cap, minor: int) -> tuple[int, int, int] | None:
    """(IP version, hash bucket, node) of an ingress cap's u32 filter on one host; None for others.

    The bucket is the address's last byte, as the hash table's key; the node
    comes from the class minor, so the filter's handle needs no state of its own.
    """
    host = cap.host
    if cap.direction != "in" or host.prefixlen != host.max_prefixlen:
        return None
    return host.version, int(host.network_address) & 0xFF, (minor - CAP_MINORS.start) % U32_NODES + 1


def lapsed_minors(device: Device, runtime: Sequence[Cap], now: float) -> set[int]:
    """Class minors of lapsed run-time caps: their classes stay until `shape-limit-ip` or `shape-init`."""
    return {c.minor for c in runtime if device.holds(c) and lapsed(c, now) and c.minor is not None}


def lapsed(cap: Cap, now: float) -> bool:
    return cap.expires is not None and cap.expires <= now


def with_minor(placed: PlacedCap) -> Cap:
    """The cap as it is saved: with its minor, so later commands find its class."""
    return replace(placed.cap, minor=placed.minor)


# --- tc -------------------------------------------------------------------------


def cap_class(tree: Device, minor: int, rate: int, verb: str = "add") -> list[Argv]:
    """A cap's class (rate = ceil) under the top class, and its leaf qdisc."""
    options = rate_options(rate, rate, tree)
    cmds: list[Argv] = [
        (
            "tc",
            "class",
            verb,
            "dev",
            tree.name,
            "parent",
            classid(TOP_MINOR),
            "classid",
            classid(minor),
            "htb",
            *options,
        )
    ]
    return cmds + leaf_qdisc(tree.name, minor, tree.leaf, verb)


def cap_tree(device: Device, placed: Sequence[PlacedCap]) -> list[Argv]:
    """Every cap's class, as part of shape-init's tree."""
    return [cmd for p in placed for cmd in cap_class(device, p.minor, p.cap.rate)]


def parse_cap_classes(text: str) -> dict[int, int]:
    """Cap classes (minor → ceil in bits/s) in `tc class show` text."""
    classes = parse_tc_classes(text)
    caps = {int(cid.split(":")[1], 16): c.ceil for cid, c in classes.items() if cid.startswith("5c:")}
    return {minor: ceil for minor, ceil in caps.items() if minor in CAP_MINORS}


def class_rates(placed: Sequence[PlacedCap]) -> dict[int, int]:
    return {p.minor: p.cap.rate for p in placed}


def stale(current: dict[int, int], placed: Sequence[PlacedCap]) -> dict[int, int | None]:
    """The cap classes there now that no cap in `placed` lives in, to go (None)."""
    return {minor: None for minor in sorted(set(current) - {p.minor for p in placed})}


def exactly(wanted: dict[int, int], current: dict[int, int]) -> dict[int, int | None]:
    """`wanted`, and every other class there now marked to go: for sync_classes to make exactly these."""
    gone: dict[int, int | None] = {minor: None for minor in sorted(set(current) - set(wanted))}
    return gone | dict(wanted)


def sync_classes(tree: Device, wanted: Mapping[int, int | None], current: dict[int, int]) -> list[Argv]:
    """The changes that give each cap class named in `wanted` its rate (None: no class); others stay.

    The same changes put classes back as they were after a failure.
    """
    cmds: list[Argv] = []
    for minor, rate in wanted.items():
        if rate is None:
            cmds += remove_cap_class(tree.name, minor) if minor in current else []
        elif minor not in current:
            cmds += cap_class(tree, minor, rate)
        elif abs(current[minor] - rate) > 8:  # HTB keeps bytes/s: allow its rounding
            cmds += cap_class(tree, minor, rate, "change")[:1]
    return cmds


def remove_cap_class(dev: str, minor: int) -> list[Argv]:
    return [("tc", "class", "del", "dev", dev, "classid", classid(minor))]


# --- ipset ----------------------------------------------------------------------


def _entry(placed: PlacedCap, now: float) -> str:
    """A cap's set entry, after `add SET `: the host, its class, its timeout."""
    line = f"{placed.cap.host} skbprio {classid(placed.minor)}"
    if placed.cap.expires is not None:
        line += f" timeout {max(1, math.ceil(placed.cap.expires - now))}"
    return line


def _create(name: str, family: int) -> str:
    inet = "inet" if family == 4 else "inet6"
    return f"create {name} hash:net family {inet} skbinfo timeout 0 -exist"


def plan_sets(dev: str, placed: Sequence[PlacedCap], now: float) -> str:
    """`ipset restore` text that makes the device's sets hold exactly these caps, swapped in at once."""
    entries = {family: [_entry(p, now) for p in placed if p.cap.host.version == family] for family in (4, 6)}
    return fill_sets(dev, entries)


def fill_sets(dev: str, entries: Mapping[int, list[str]]) -> str:
    """A device's sets (of the families in `entries`) made to hold exactly `entries`: filled aside, then swapped in.

    The swaps come after every fill, so a failure before them leaves the sets
    as they were; the same text puts sets back after a failure.
    """
    lines = []
    for family, listed in entries.items():
        name, scratch = set_name(dev, family), set_name(dev, family) + "~"
        lines += [_create(name, family), _create(scratch, family), f"flush {scratch}"]
        lines += [f"add {scratch} {entry}" for entry in listed]
    lines += [f"swap {set_name(dev, f)}~ {set_name(dev, f)}" for f in entries]
    lines += [f"destroy {set_name(dev, f)}~" for f in entries]
    return "\n".join(lines) + "\n"


def parse_set_save(text: str, name: str) -> list[str]:
    """A set's entries in `ipset save` text, as `fill_sets` takes them (what follows `add SET `)."""
    prefix = f"add {name} "
    return [line[len(prefix) :] for line in text.splitlines() if line.startswith(prefix)]


def plan_set_entry(dev: str, placed: PlacedCap, now: float) -> str:
    """`ipset restore` text for one cap: its entry added, or changed in place (`-exist`: one atomic step)."""
    name = set_name(dev, placed.cap.host.version)
    return f"{_create(name, placed.cap.host.version)}\nadd {name} {_entry(placed, now)} -exist\n"


def plan_set_changes(dev: str, before: Sequence[PlacedCap], after: Sequence[PlacedCap], now: float) -> str:
    """`ipset restore` text for only the entries that differ: added or changed in place (`-exist`), or gone."""
    was = {p.cap.host: p for p in before}
    lines = [f"{_create(set_name(dev, f), f)}" for f in (4, 6)]
    for placed in after:
        old = was.get(placed.cap.host)
        if old is None or (old.minor, old.cap.expires) != (placed.minor, placed.cap.expires):
            lines.append(f"add {set_name(dev, placed.cap.host.version)} {_entry(placed, now)} -exist")
    kept = {p.cap.host for p in after}
    lines += [f"del {set_name(dev, h.version)} {h} -exist" for h in was if h not in kept]
    return "\n".join(lines) + "\n" if len(lines) > 2 else ""


def plan_set_removal(dev: str, host: Network) -> str:
    name = set_name(dev, host.version)
    return f"{_create(name, host.version)}\ndel {name} {host} -exist\n"


def plan_destroy_sets(names: Sequence[str]) -> str:
    return "".join(f"destroy {name}\n" for name in names if name.startswith(SET_PREFIX))


# --- iptables -------------------------------------------------------------------


def limit_chain(devices: Sequence[Device], family: int) -> dict[str, list[str]]:
    """shape-limit-ip's chain: per device, the class from the destination's set entry."""
    return {LIMIT: [f"-o {d.name} -j SET --map-set {set_name(d.name, family)} dst --map-prio" for d in devices]}
