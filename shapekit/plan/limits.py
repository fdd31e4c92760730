"""Pure functions for per-IP caps (seed 002): HTB classes, ipset entries, one rule per device.

Seed 002 runs, for every host, three processes and leaves one more linear
iptables rule that every packet walks:

    tc class add dev $NETCARD parent 1:0 classid 1:$mark htb rate ${bw}kbit ceil ${bw}kbit burst 5k prio $mark
    iptables -t mangle -A INPUT -i $NETCARD -s $ip -j CONNMARK --set-mark $mark
    tc filter add dev $NETCARD parent 1:0 protocol ip prio $mark handle $mark fw flowid 1:$mark

shapekit gives each host capped on sent traffic a class (rate = ceil = the
cap) in a group: group G (1..255) is the class `5c:80GG` under the top class,
holding an HTB qdisc `80GG:` of its own with up to 512 cap classes `80GG:J`.
The host's entry in an ipset hash of the device carries both halves of the
way there, `HOST skbprio 80GG:J skbmark G<<24/0xff000000`, and one rule per
device and IP family,

    -A SHAPEKIT-LIMIT -o DEV -j SET --map-set SHAPEKIT-DEV-4 dst --map-prio --map-mark

sets them from one hash lookup, however many hosts are capped. At the root,
HTB finds no class named by the priority and runs its one filter, a classic
BPF program that turns the mark's top byte into the group class `5c:80GG`;
the group's own HTB then takes the priority, `80GG:J`, before any filter.
A packet with no group bits gets 0 (no match) and HTB's usual classes.
Groups exist because every class added to one HTB qdisc walks all of its
classes (Linux 5.5 on): 100,000 in one qdisc would cost O(N^2) to build.

A cap on arriving traffic is a class `5c:MINOR` of the ingress tree and a u32
hash filter (shapekit.plan.ingress). `--for` is the entry's ipset timeout:
the kernel drops it when it lapses, with no daemon.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from shapekit.config.addresses import Network
from shapekit.config.model import ROOT_MAJOR, TOP_MINOR, Device
from shapekit.config.rules import CAP_MINORS, CAP_SLOTS, GROUP_SIZE, Cap
from shapekit.errors import UsageError
from shapekit.plan.tc_text import parse_tc_classes
from shapekit.plan.tree import LEAF_QDISC, Argv, classid, leaf_qdisc, rate_options, root_handle

LIMIT = "SHAPEKIT-LIMIT"
SET_PREFIX = "SHAPEKIT-"
U32_NODES = 0xFFF  # node ids in one u32 hash bucket
GROUP_BASE = 0x8000  # group G: class 5c:(8000+G), its qdisc (8000+G):
GROUP_MARK_SHIFT = 24
GROUP_MARK_MASK = 0xFF000000
# A cap's own leaf qdisc (a `leaf` other than "none") needs a handle: majors 8100-fffe, one per cap.
LEAF_BASE = 0x8100
LEAF_SLOTS = range(0xFFFF - LEAF_BASE)
MAX_SET_SIZE = 131072  # ipset maxelem: every cap a device takes (130,560), rounded up to a power of two
# The root's filter: A = mark >> 24; no group bits: 0 (no match); else the class 5c:(8000+A).
GROUP_FILTER_PRIO = 1


def group_bytecode() -> str:
    base = ROOT_MAJOR << 16 | GROUP_BASE
    ops = ["32 0 0 4294963220", f"116 0 0 {GROUP_MARK_SHIFT}", "21 2 0 0", f"4 0 0 {base}", "22 0 0 0", "6 0 0 0"]
    return f"{len(ops)}," + ",".join(ops)  # ld mark; rsh 24; jeq 0 → ret 0; add base; ret a


@dataclass(frozen=True, slots=True)
class PlacedCap:
    """A cap with its place: sent traffic, a CAP_SLOTS index (group and class in it); arriving, a class minor."""

    cap: Cap
    slot: int


def set_name(dev: str, family: int) -> str:
    return f"{SET_PREFIX}{dev}-{family}"


def place_caps(
    device: Device, runtime: Sequence[Cap], now: float, held: Collection[int] = (), lapsed_held: Collection[int] = ()
) -> list[PlacedCap]:
    """The caps in force on one tree: the config's, with run-time caps added or overriding.

    Config caps take places from the first in file order; a run-time cap
    keeps the place saved with it, or takes the config cap's it overrides,
    or the lowest free one. Lapsed run-time caps are gone, but the places of
    their classes (which stay until the next full install) are not given
    out. On an ingress tree a host's minor also names its u32 filter's node,
    which must be free in its hash bucket.

    `held` and `lapsed_held`: places of run-time caps in force and lapsed
    that are not in `runtime` (`add` reads only the places of the others).
    """
    pool = _SlotPool(device, lapsed_slots(device, runtime, now) | set(lapsed_held))
    placed: dict[Network, PlacedCap] = {}
    for cap in device.limits:
        placed[cap.host] = PlacedCap(cap, pool.take(cap))
    pool.taken |= set(held)  # as their caps would take them: after the config's
    live = [c for c in runtime if device.holds(c) and not lapsed(c, now)]
    for cap in live:
        if cap.host in placed:  # overrides the config's cap, in its class
            placed[cap.host] = PlacedCap(cap, placed[cap.host].slot)
    for cap in live:
        if cap.host not in placed:
            placed[cap.host] = PlacedCap(cap, pool.take(cap, cap.slot))
    return list(placed.values())


def cap_slots(tree: Device) -> range:
    """The places a tree's caps take: groups' classes (fewer when each has a leaf qdisc of its own), or ingress minors."""
    if tree.direction == "in":
        return CAP_MINORS
    return CAP_SLOTS if tree.leaf == "none" else range(min(len(CAP_SLOTS), len(LEAF_SLOTS)))


class _SlotPool:
    """Hands out cap places in order, each once, and (ingress) each host's hash node once per bucket."""

    def __init__(self, device: Device, taken: set[int]) -> None:
        self.device = device
        self.taken = taken
        self.nodes: set[tuple[int, int, int]] = set()
        self.places = cap_slots(device)
        self.unused = iter(self.places)
        self.passed: list[int] = []  # free places whose node was taken in some bucket: for other hosts

    def take(self, cap: Cap, wish: int | None = None) -> int:
        if wish is not None and self._fits(cap, wish):
            return self._give(cap, wish)
        for n, place in enumerate(self.passed):
            if self._fits(cap, place):
                del self.passed[n]
                return self._give(cap, place)
        for place in self.unused:
            if place in self.taken:
                continue
            if self._fits(cap, place):
                return self._give(cap, place)
            self.passed.append(place)
        raise UsageError(f"{cap.host}: no class left for another cap on [{self.device.key}]: {self._most()}")

    def _most(self) -> str:
        if self.device.direction == "in":
            return f"{len(CAP_MINORS)} caps in all, and {U32_NODES} hosts whose address ends in the same byte"
        if self.device.leaf != "none":
            return (
                f'{len(self.places)} caps with leaf = "{self.device.leaf}" (a qdisc each); set leaf = "none" there '
                f"(and leaf on the classes that want one) for {len(CAP_SLOTS)}"
            )
        return f"{len(CAP_SLOTS)} caps in all"

    def _fits(self, cap: Cap, place: int) -> bool:
        return place in self.places and place not in self.taken and u32_slot(cap, place) not in self.nodes

    def _give(self, cap: Cap, place: int) -> int:
        self.taken.add(place)
        node = u32_slot(cap, place)
        if node is not None:
            self.nodes.add(node)
        return place


def u32_slot(cap: Cap, minor: int) -> tuple[int, int, int] | None:
    """(IP version, hash bucket, node) of an ingress cap's u32 filter on one host; None for others.

    The bucket is the address's last byte, as the hash table's key; the node
    comes from the class minor, so the filter's handle needs no state of its own.
    """
    host = cap.host
    if cap.direction != "in" or host.prefixlen != host.max_prefixlen:
        return None
    return host.version, int(host.network_address) & 0xFF, (minor - CAP_MINORS.start) % U32_NODES + 1


def lapsed_slots(device: Device, runtime: Sequence[Cap], now: float) -> set[int]:
    """Places of lapsed run-time caps: their classes stay until `shape-limit-ip` or `shape-init`."""
    return {c.slot for c in runtime if device.holds(c) and lapsed(c, now) and c.slot is not None}


def lapsed(cap: Cap, now: float) -> bool:
    return cap.expires is not None and cap.expires <= now


def with_slot(placed: PlacedCap) -> Cap:
    """The cap as it is saved: with its place, so later commands find its class."""
    cap = placed.cap
    if cap.slot == placed.slot:
        return cap
    # `replace` takes 3 µs a cap: a third of a second for 100,000
    return Cap(cap.host, cap.rate, cap.dev, cap.source, cap.expires, cap.comment, placed.slot, cap.direction)


# --- tc -------------------------------------------------------------------------


def group_of(slot: int) -> int:
    return slot // GROUP_SIZE + 1


def group_classid(group: int) -> str:
    return classid(GROUP_BASE + group)


def cap_classid(tree: Device, slot: int) -> str:
    """The class a cap lives in: `80GG:J` in its group's qdisc, or `5c:MINOR` on an ingress tree."""
    return classid(slot) if tree.direction == "in" else in_group(slot)


def in_group(slot: int) -> str:
    """The class of the cap at `slot` on sent traffic: `80GG:J`."""
    return f"{GROUP_BASE + group_of(slot):x}:{slot % GROUP_SIZE + 1:x}"


def is_group(tree: Device, cid: str) -> bool:
    return tree.direction == "out" and cid.startswith(root_handle())


def _slot(cid: str) -> int:
    """A sent-traffic cap's place, from its class id `80GG:J`."""
    major, minor = (int(part, 16) for part in cid.split(":"))
    return (major - GROUP_BASE - 1) * GROUP_SIZE + minor - 1


def group_filter(dev: str) -> Argv:
    """The root's one filter that sends a packet with group bits in its mark to that group's class."""
    return ("tc", "filter", "add", "dev", dev, "parent", root_handle(), "protocol", "all",
            "prio", str(GROUP_FILTER_PRIO), "bpf", "bytecode", group_bytecode())  # fmt: skip


def group_class(tree: Device, group: int) -> list[Argv]:
    """A group: a class under the top class at the line rate (its caps hold their own), holding an HTB qdisc."""
    cid = group_classid(group)
    return [
        ("tc", "class", "add", "dev", tree.name, "parent", classid(TOP_MINOR), "classid", cid, "htb",
         *rate_options(tree.rate, tree.rate, tree)),
        ("tc", "qdisc", "add", "dev", tree.name, "parent", cid, "handle", f"{GROUP_BASE + group:x}:", "htb"),
    ]  # fmt: skip


def cap_class(tree: Device, slot: int, rate: int, verb: str = "add") -> list[Argv]:
    """A cap's class (rate = ceil) in its group, or under an ingress tree's top class, and its leaf qdisc."""
    cid = cap_classid(tree, slot)
    parent = classid(TOP_MINOR) if tree.direction == "in" else cid.split(":")[0] + ":"
    options = rate_options(rate, rate, tree)
    cmds: list[Argv] = [("tc", "class", verb, "dev", tree.name, "parent", parent, "classid", cid, "htb", *options)]
    if tree.direction == "in":
        return cmds + leaf_qdisc(tree.name, slot, tree.leaf, verb)
    qdisc = LEAF_QDISC[tree.leaf]
    if qdisc:
        cmds.append(("tc", "qdisc", verb, "dev", tree.name, "parent", cid, "handle", f"{LEAF_BASE + slot:x}:", *qdisc))
    return cmds


def cap_tree(device: Device, placed: Sequence[PlacedCap]) -> list[Argv]:
    """The root's group filter (sent traffic: there for `add` even with no cap yet) and every cap's class,
    as part of shape-init's tree."""
    classes = sync_classes(device, class_rates(device, placed), {})
    return classes if device.direction == "in" else [group_filter(device.name), *classes]


def parse_cap_classes(text: str, tree: Device) -> dict[str, int]:
    """Cap classes (class id → ceil in bits/s) in `tc class show` text; on sent traffic, the groups too."""
    classes = parse_tc_classes(text)
    if tree.direction == "in":
        return {
            cid: c.ceil for cid, c in classes.items() if cid.startswith(root_handle()) and _minor(cid) in CAP_MINORS
        }
    groups = range(GROUP_BASE + 1, GROUP_BASE + 1 + len(CAP_SLOTS) // GROUP_SIZE)
    return {cid: c.ceil for cid, c in classes.items() if int(cid.split(":")[0], 16) in groups or (
        cid.startswith(root_handle()) and _minor(cid) in groups)}  # fmt: skip


def _minor(cid: str) -> int:
    return int(cid.split(":")[1], 16)


def class_rates(tree: Device, placed: Sequence[PlacedCap]) -> dict[str, int]:
    """Each cap's class and its rate; on sent traffic, each group holding any, at the line rate."""
    rates = {cap_classid(tree, p.slot): p.cap.rate for p in placed}
    if tree.direction == "in":
        return rates
    groups = {group_classid(g): tree.rate for g in sorted({group_of(p.slot) for p in placed})}
    return groups | rates


def stale(current: dict[str, int], wanted: dict[str, int]) -> dict[str, int | None]:
    """The cap classes (and groups) there now that `wanted` has no place for, to go (None)."""
    return {cid: None for cid in current if cid not in wanted}


def exactly(wanted: dict[str, int], current: dict[str, int]) -> dict[str, int | None]:
    """`wanted`, and every other class there now marked to go: for sync_classes to make exactly these."""
    return stale(current, wanted) | dict(wanted)


def sync_classes(tree: Device, wanted: Mapping[str, int | None], current: dict[str, int]) -> list[Argv]:
    """The changes that give each class named in `wanted` its rate (None: no class); others stay.

    New groups come before the caps in them, and caps go before the groups
    that held them (newest first: the kernel's list of classes to unbind on
    a device without tc offload is walked from the newest). The same changes
    put classes back as they were after a failure.
    """
    made: list[tuple[int, bool, list[Argv]]] = []  # (group, a cap's, commands): a group before its caps
    gone: list[str] = []
    for cid, rate in wanted.items():
        group = _group(tree, cid)
        if rate is None:
            gone += [cid] if cid in current else []
        elif is_group(tree, cid):
            made += [] if cid in current else [(group, False, group_class(tree, group))]
        elif cid not in current:
            made.append((group, True, cap_class(tree, _place(tree, cid), rate)))
        elif abs(current[cid] - rate) > 8:  # HTB keeps bytes/s: allow its rounding
            made.append((group, True, cap_class(tree, _place(tree, cid), rate, "change")[:1]))
    # Each group with its caps, not every group first: measured 20% quicker at 30,000 caps.
    made.sort(key=lambda entry: entry[:2])
    newest_first = sorted(gone, key=lambda cid: (not is_group(tree, cid), _place(tree, cid)), reverse=True)
    return [cmd for _, _, cmds in made for cmd in cmds] + [remove_class(tree.name, cid) for cid in newest_first]


def _group(tree: Device, cid: str) -> int:
    """The group a class is or is in; 0 on an ingress tree."""
    if tree.direction == "in":
        return 0
    return _minor(cid) - GROUP_BASE if is_group(tree, cid) else group_of(_slot(cid))


def _place(tree: Device, cid: str) -> int:
    """A cap's place from its class id; a group's number."""
    if is_group(tree, cid):
        return _minor(cid) - GROUP_BASE
    return _minor(cid) if tree.direction == "in" else _slot(cid)


def remove_class(dev: str, cid: str) -> Argv:
    return ("tc", "class", "del", "dev", dev, "classid", cid)


# --- ipset ----------------------------------------------------------------------


def _entry(placed: PlacedCap, now: float) -> str:
    """A cap's set entry, after `add SET `: the host, its class and its group's mark bits, its timeout."""
    group = group_of(placed.slot)
    line = (
        f"{placed.cap.host} skbprio {in_group(placed.slot)} skbmark {group << GROUP_MARK_SHIFT:#x}/{GROUP_MARK_MASK:#x}"
    )
    if placed.cap.expires is not None:
        line += f" timeout {max(1, math.ceil(placed.cap.expires - now))}"
    return line


def _create(name: str, family: int) -> str:
    inet = "inet" if family == 4 else "inet6"
    return f"create {name} hash:net family {inet} skbinfo timeout 0 maxelem {MAX_SET_SIZE} -exist"


def plan_sets(dev: str, placed: Sequence[PlacedCap], now: float, present: Collection[int] = ()) -> str:
    """`ipset restore` text that makes the device's sets hold exactly these caps, swapped in at once.

    `present`: the families whose set is there now (see `fill_sets`).
    """
    entries = {family: [_entry(p, now) for p in placed if p.cap.host.version == family] for family in (4, 6)}
    return fill_sets(dev, entries, present)


def fill_sets(dev: str, entries: Mapping[int, list[str]], present: Collection[int] = ()) -> str:
    """A device's sets (of the families in `entries`) made to hold exactly `entries`: filled aside, then swapped in.

    The swaps come after every fill, so a failure before them leaves the sets
    as they were; the same text puts sets back after a failure. A set in
    `present` is not created again: one made before cap groups has a smaller
    maxelem, and `create -exist` refuses other settings; the swap takes it.
    """
    lines = []
    for family, listed in entries.items():
        name, scratch = set_name(dev, family), set_name(dev, family) + "~"
        lines += [] if family in present else [_create(name, family)]
        lines += [_create(scratch, family), f"flush {scratch}"]
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
        if old is None or (old.slot, old.cap.expires) != (placed.slot, placed.cap.expires):
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
    return {
        LIMIT: [f"-o {d.name} -j SET --map-set {set_name(d.name, family)} dst --map-prio --map-mark" for d in devices]
    }
