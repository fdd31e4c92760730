"""shape-import's reading of a hand-made tc tree: qdiscs, HTB classes and filters → one flat tree.

Pure: it parses what `tc -j qdisc show`, `tc -d class show` and `tc -j filter
show` printed (iproute2 6.1 prints no JSON for HTB classes, so classes are
read from the detailed text). A script's nested HTB qdiscs (seed 000's `1:`
under class `100:1`) are flattened into the one tree shapekit builds: the
classes of a qdisc hanging under a class become that class's children.
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass
from typing import Any

from shapekit.config.units import parse_rate

DEFAULT_BURST = 1600  # tc's burst when none is given: rate / HZ + mtu, with high-resolution timers just the mtu
QUANTUM_RANGE = (1000, 200_000)  # HTB keeps a quantum it computes from rate / r2q within these bytes


@dataclass(frozen=True)
class Qdisc:
    kind: str
    handle: str  # "1:"
    parent: str | None  # a class id ("100:1"), or None for the root
    options: dict[str, Any]
    stab: tuple[int, str] | None = None  # the size table's (overhead, linklayer), as `tc -j -d` shows it

    def describe(self) -> str:
        where = "root" if self.parent is None else f"parent {self.parent}"
        options = " ".join(f"{k} {v}" for k, v in self.options.items())
        return f"qdisc {self.kind} {self.handle} {where} {options}".rstrip()


@dataclass(frozen=True)
class KernelClass:
    """An HTB class as `tc -d class show` prints it."""

    classid: str  # "1:1010"
    parent: str | None  # class id; None: a root class of its qdisc
    rate: int  # bits/s
    ceil: int
    prio: int = 0
    quantum: int | None = None
    burst: int | None = None  # bytes
    cburst: int | None = None
    leaf: str | None = None  # handle of the qdisc under it
    linklayer: str = "ethernet"
    overhead: int = 0

    @property
    def qdisc(self) -> str:
        return self.classid.split(":")[0] + ":"

    @property
    def minor(self) -> int:
        return int(self.classid.split(":")[1], 16)


_SIZE = re.compile(r"^(\d+)(b|Kb|Mb|Gb)?(?:/\d+)?$")


def parse_tc_size(text: str) -> int:
    """tc's printed size ("1600b/1", "5Kb") in bytes."""
    found = _SIZE.match(text)
    if not found:
        raise ValueError(f"not a tc size: {text!r}")
    return int(found.group(1)) * {"b": 1, "Kb": 1024, "Mb": 1024**2, "Gb": 1024**3, None: 1}[found.group(2)]


def parse_tc_rate(text: str) -> int:
    return parse_rate(text.lower())


def parse_classes(text: str) -> list[KernelClass]:
    """Every HTB class in `tc -d class show` output (sfq and the like list classes of their own: not these)."""
    classes = []
    for line in text.splitlines():
        words = line.split()
        if len(words) < 3 or words[:2] != ["class", "htb"]:
            continue
        fields: dict[str, str] = {}
        i = 3
        while i < len(words):
            if words[i] == "root":
                i += 1
                continue
            fields.setdefault(words[i], words[i + 1] if i + 1 < len(words) else "")
            i += 2
        classes.append(
            KernelClass(
                classid=words[2],
                parent=fields.get("parent"),
                rate=parse_tc_rate(fields["rate"]),
                ceil=parse_tc_rate(fields["ceil"]),
                prio=int(fields.get("prio", "0")),
                quantum=int(fields["quantum"]) if "quantum" in fields else None,
                burst=parse_tc_size(fields["burst"]) if "burst" in fields else None,
                cburst=parse_tc_size(fields["cburst"]) if "cburst" in fields else None,
                leaf=fields.get("leaf"),
                linklayer=fields.get("linklayer", "ethernet"),
                overhead=int(fields.get("overhead", "0")),
            )
        )
    return classes


def parse_qdiscs(text: str) -> list[Qdisc]:
    return [
        Qdisc(
            kind=q["kind"],
            handle=q["handle"],
            parent=None if q.get("root") else q.get("parent"),
            options=q.get("options", {}),
            stab=(int(q["stab"].get("overhead", 0)), q["stab"].get("linklayer", "ethernet")) if "stab" in q else None,
        )
        for q in json.loads(text or "[]")
        if q.get("kind") not in ("ingress", "clsact") and (q.get("root") or q.get("parent"))
    ]


@dataclass(frozen=True)
class Selector:
    """What a tc filter (u32) or a mangle rule matches, in shapekit's terms."""

    proto: str | None = None  # "tcp", "udp", "icmp", "icmpv6"
    sport: tuple[str, ...] = ()
    dport: tuple[str, ...] = ()
    src: str | None = None  # a host or CIDR
    dst: str | None = None
    tcp_syn: bool = False
    l7proto: str | None = None
    device: str | None = None  # out interface

    @property
    def is_everything(self) -> bool:
        return self == Selector(device=self.device)

    @property
    def only_host(self) -> str | None:
        """The host, when this matches one host (or block) by its address and nothing else."""
        if self.src is None and self.dst is not None and self == Selector(dst=self.dst, device=self.device):
            return self.dst
        if self.dst is None and self.src is not None and self == Selector(src=self.src, device=self.device):
            return self.src
        return None


@dataclass(frozen=True)
class Filter:
    """A tc filter that picks a class: fw (a mark) or u32 (what the packet holds)."""

    qdisc: str  # the qdisc it is on: "1:"
    pref: int
    kind: str  # "fw" | "u32"
    flowid: str
    family: int  # 4 or 6 (the filter's protocol)
    mark: int | None = None  # fw
    selector: Selector | None = None  # u32, when every match is one shapekit has
    problem: str = ""  # why it cannot be expressed, when it cannot
    text: str = ""  # the filter as tc shows it, for the comment


_PROTOCOLS = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmpv6"}


_FILTER_LINE = re.compile(r"^filter (?:parent (\S+) )?protocol (\S+) pref (\d+) (\S+) (.*)$")
_KEY_LINE = re.compile(r"^\s+match ([0-9a-f]{8})/([0-9a-f]{8}) at (\d+)\s*$")


def parse_filters(text: str, qdisc: str) -> list[Filter]:
    """The classifying filters in `tc filter show dev D parent H:` text.

    Text, not `tc -j`: iproute2 6.1 prints an fw filter's JSON options as bare
    words (`"options":{handle 0x3e9 classid 100:1 }`), which no JSON parser reads.
    """
    filters: list[Filter] = []
    current: dict[str, Any] | None = None
    for line in [*text.splitlines(), "filter end"]:
        found = _FILTER_LINE.match(line)
        if found or line == "filter end":
            if current is not None:
                filters.append(_filter(current, qdisc))
            current = None
            if found:
                protocol, pref, kind, rest = found.group(2), int(found.group(3)), found.group(4), found.group(5)
                words = rest.split()
                if "flowid" in " ".join(words) or "classid" in words or "divisor" in words or "link" in words:
                    current = {
                        "protocol": protocol,
                        "pref": pref,
                        "kind": kind,
                        "words": words,
                        "keys": [],
                        "extra": [],
                        "line": line.strip(),
                    }
        elif current is not None and line.strip():
            key = _KEY_LINE.match(line)
            if key:
                current["keys"].append((int(key.group(1), 16), int(key.group(2), 16), int(key.group(3))))
            else:
                current["extra"].append(line.strip())
    return [f for f in filters if f.kind != "table"]


def _filter(raw: dict[str, Any], qdisc: str) -> Filter:
    words: list[str] = raw["words"]
    family = {"ip": 4, "ipv6": 6}.get(raw["protocol"], 0)
    shown = [w.lstrip("*") for w in words if w not in _NOISE]
    text = " ".join(
        [f"filter parent {qdisc} protocol {raw['protocol']} pref {raw['pref']} {raw['kind']}", *_without_ids(shown)]
        + [*raw["extra"], *(f"match {v:08x}/{m:08x} at {o}" for v, m, o in raw["keys"])]
    )
    flowid = next((words[i + 1] for i, w in enumerate(words[:-1]) if w.lstrip("*") in ("flowid", "classid")), "")
    base = Filter(qdisc=qdisc, pref=raw["pref"], kind=raw["kind"], flowid=flowid, family=family, text=text)
    if raw["kind"] == "u32" and "divisor" in words:
        divisor = int(words[words.index("divisor") + 1])
        return _with(base, kind="table") if divisor == 1 else _with(base, problem="a u32 hash table")
    if raw["extra"]:
        return _with(base, problem=f"`{raw['extra'][0]}`: shapekit has no such match or action")
    if family == 0:
        return _with(base, problem=f"protocol {raw['protocol']}: shapekit's rules are IPv4 and IPv6")
    if raw["kind"] == "fw":
        return _fw(base, words)
    if raw["kind"] == "u32":
        if "link" in words or not flowid:
            return _with(base, problem="a u32 filter that links to a hash table")
        table = words[words.index("key") + 2] if "key" in words and len(words) > words.index("key") + 2 else "800"
        if int(table, 16) < 0x800:  # the kernel numbers the tables it makes for each pref from 800
            return _with(base, problem=f"a filter in a u32 hash table of the script's own (ht {table})")
        words_by_offset: dict[int, tuple[int, int]] = {}
        for value, mask, off in raw["keys"]:
            old_value, old_mask = words_by_offset.get(off, (0, 0))
            words_by_offset[off] = (old_value | value, old_mask | mask)
        selector, problem = selector_of_words(words_by_offset, family)
        return _with(base, selector=selector, problem=problem)
    return _with(base, problem=f"a {raw['kind']} filter: shapekit reads fw and u32")


_NOISE = {"not_in_hw", "in_hw"}
_IDS = {"chain": 1, "fh": 1, "order": 1, "key": 2, "bkt": 1}  # the filter's own ids, not what it does


def _without_ids(words: list[str]) -> list[str]:
    kept, i = [], 0
    while i < len(words):
        if words[i] in _IDS:
            i += 1 + _IDS[words[i]]
        else:
            kept.append(words[i])
            i += 1
    return kept


def _with(base: Filter, **changes: Any) -> Filter:
    return Filter(**{**base.__dict__, **changes})


def _fw(base: Filter, words: list[str]) -> Filter:
    handle = words[words.index("handle") + 1] if "handle" in words else ""
    mark_text, _, mask = handle.partition("/")
    if not mark_text or (mask and int(mask, 0) != 0xFFFFFFFF):
        return _with(base, problem="an fw filter with a mask or without a handle")
    if "indev" in words:
        return _with(base, problem="an fw filter with an input device")
    return _with(base, mark=int(mark_text, 0))


def selector_of_words(words: dict[int, tuple[int, int]], family: int) -> tuple[Selector | None, str]:
    """A u32 filter's (offset → value, mask) words as a Selector; or why it has none."""
    layout = _IPV4 if family == 4 else _IPV6
    fields: dict[str, Any] = {}
    for name, offsets in layout["addresses"].items():
        value = mask = 0
        for off in offsets:
            word_value, word_mask = words.pop(off, (0, 0))
            value, mask = value << 32 | word_value, mask << 32 | word_mask
        if mask:
            bits = 32 * len(offsets)
            prefix = bin(mask).count("1")
            if mask != ((1 << prefix) - 1) << (bits - prefix):
                return None, f"a u32 {name} mask that is not a prefix"
            network = (
                ipaddress.ip_network((value, prefix), strict=False)
                if family == 4
                else ipaddress.IPv6Network((value, prefix), strict=False)
            )  # u32 ignores bits outside the mask
            fields[name] = str(network.network_address) if network.prefixlen == bits else str(network)
    proto_off, proto_shift = layout["proto"]
    if proto_off in words:
        value, mask = words.pop(proto_off)
        if mask != 0xFF << proto_shift or value & ~mask:
            return None, "a u32 match on more than the protocol byte"
        number = value >> proto_shift
        if number not in _PROTOCOLS:
            return None, f"IP protocol {number}"
        fields["proto"] = _PROTOCOLS[number]
    if layout["ports"] in words:
        value, mask = words.pop(layout["ports"])
        for name, shift in (("sport", 16), ("dport", 0)):
            part_value, part_mask = value >> shift & 0xFFFF, mask >> shift & 0xFFFF
            if part_mask:
                ports = _port_block(part_value, part_mask)
                if ports is None:
                    return None, "a u32 port mask that is not a block of ports"
                fields[name] = (ports,)
    words = {off: vm for off, vm in words.items() if vm[1]}  # `match u32 0 0`: every packet
    if words:
        return None, "a u32 match on a field shapekit has no key for (offsets " + ", ".join(
            map(str, sorted(words))
        ) + ")"
    if ("sport" in fields or "dport" in fields) and fields.get("proto") not in ("tcp", "udp"):
        return None, "u32 ports without the protocol: they would match any protocol's bytes there"
    return Selector(**fields), ""


_IPV4: dict[str, Any] = {"addresses": {"src": (12,), "dst": (16,)}, "proto": (8, 16), "ports": 20}
_IPV6: dict[str, Any] = {"addresses": {"src": (8, 12, 16, 20), "dst": (24, 28, 32, 36)}, "proto": (4, 8), "ports": 40}


def _port_block(value: int, mask: int) -> str | None:
    """A port value/mask as a port or an "a:b" range, when the mask is a prefix."""
    free = ~mask & 0xFFFF
    if free & (free + 1):
        return None
    return str(value) if not free else f"{value}:{value | free}"


@dataclass(frozen=True)
class FlatClass:
    """A class of the flattened tree: the script's class, its parent in the flat tree and its leaf qdisc."""

    kernel: KernelClass
    parent: str | None  # flat parent class id; None: under the line
    leaf: Qdisc | None
    r2q: int  # of the qdisc it is in: the kernel's quantum is rate / r2q unless given
    is_leaf: bool


@dataclass
class FlatTree:
    """A device's tree as shapekit would hold it: the line, its classes, where marks and defaults go."""

    dev: str
    root: Qdisc
    line: KernelClass | None  # the script's one class that every other hangs under, if it has one
    line_rate: int
    classes: list[FlatClass]  # parents before children
    filters: list[Filter]
    nested: dict[str, str]  # nested HTB qdisc handle → the class it hangs under
    qdiscs: dict[str, Qdisc]
    kernel_ids: frozenset[str] = frozenset()  # every HTB class id, as the kernel holds it
    htb_leaves: frozenset[str] = frozenset()  # the classes with no class below them in their own qdisc
    side_by_side: bool = False  # several classes on the root qdisc, none above them
    sum_of_ceils: int = 0  # of the root qdisc's classes

    def by_id(self, classid: str) -> FlatClass | None:
        return next((c for c in self.classes if c.kernel.classid == classid), None)

    def fw_marks(self) -> dict[int, list[Filter]]:
        marks: dict[int, list[Filter]] = {}
        for f in self.filters:
            if f.kind == "fw" and f.mark is not None:
                marks.setdefault(f.mark, []).append(f)
        return marks

    def _qdisc_of(self, classid: str) -> str:
        return classid.split(":")[0] + ":"

    def _default(self, qdisc: str) -> str | Direct:
        """HTB's default class of `qdisc`, when it is there and a leaf of that qdisc; else its direct queue."""
        minor = int(str(self.qdiscs[qdisc].options.get("default", "0")), 16)
        classid = f"{qdisc.rstrip(':')}:{minor:x}"
        return classid if minor and classid in self.htb_leaves else Direct(qdisc)

    def _chosen(self, qdisc: str, classid: str) -> str | Direct:
        """What a filter's `flowid` gives: X:0 is the direct queue; an inner or missing class, the default."""
        if classid.endswith(":0"):
            return Direct(qdisc)
        return classid if classid in self.htb_leaves else self._default(qdisc)

    def _pick(self, qdisc: str, mark: int | None, priority: str | None) -> str | Direct:
        """As htb_classify: the packet's priority when it names a class of `qdisc`, else its fw filters, else the default."""
        if priority is not None and self._qdisc_of(priority) == qdisc:
            if priority.endswith(":0"):
                return Direct(qdisc)
            if priority in self.htb_leaves:
                return priority
            if priority in self.kernel_ids:  # an inner class: its own filters (none read), then the default
                return self._default(qdisc)
        fw = sorted(
            (f for f in self.filters if f.qdisc == qdisc and f.kind == "fw" and f.mark == mark), key=lambda f: f.pref
        )
        return self._chosen(qdisc, fw[0].flowid) if fw and mark is not None else self._default(qdisc)

    def _descend(self, qdisc: str, picked: str | Direct, mark: int | None, priority: str | None) -> str | Direct:
        """Through nested qdiscs: a class holding one hands the packet to it."""
        for _ in range(len(self.qdiscs) + 1):
            nested = next((h for h, under in self.nested.items() if under == picked), None)
            if nested is None:
                return picked
            qdisc, picked = nested, self._pick(nested, mark, priority)
        return Direct(qdisc)

    def enter(self, mark: int | None = None, priority: str | None = None) -> str | Direct:
        """Where a packet with this mark and priority ends: a leaf class id, or a qdisc's direct queue."""
        return self._descend(self.root.handle, self._pick(self.root.handle, mark, priority), mark, priority)

    def destination(self, f: Filter) -> str | Direct:
        """Where a u32 filter's packets end (unmarked, past a nested qdisc: its default)."""
        return self._descend(f.qdisc, self._chosen(f.qdisc, f.flowid), None, None)

    def is_unshaped(self, end: str | Direct) -> bool:
        """Whether packets that end here are shaped by nothing but the line: a direct queue on the root or under the
        line class, or the line class itself (a tree of one class)."""
        if isinstance(end, Direct):
            return end.qdisc == self.root.handle or (
                self.line is not None and self.nested.get(end.qdisc) == self.line.classid
            )
        return self.line is not None and end == self.line.classid

    def everywhere(self, qdisc: str) -> bool:
        """Whether every packet meets `qdisc`'s filters: the root, or a qdisc under the line class."""
        return qdisc == self.root.handle or (self.line is not None and self.nested.get(qdisc) == self.line.classid)


@dataclass(frozen=True)
class Direct:
    """A qdisc's direct queue: HTB sends a packet it cannot classify there, shaped by nothing in that qdisc."""

    qdisc: str


def flatten(dev: str, qdiscs: list[Qdisc], classes: list[KernelClass], filters: list[Filter]) -> FlatTree:
    """The script's tree on `dev` as one tree under one line (its root qdisc must be HTB)."""
    by_handle = {q.handle: q for q in qdiscs}
    root = next(q for q in qdiscs if q.parent is None)
    nested = {
        q.handle: q.parent
        for q in qdiscs
        if q.kind == "htb" and q.parent is not None and q.parent.split(":")[0] + ":" in by_handle
    }
    roots = [c for c in classes if c.parent is None and c.qdisc == root.handle]
    line = roots[0] if len(roots) == 1 else None
    flat_parent: dict[str, str | None] = {}
    for c in classes:
        if c.parent is not None:
            flat_parent[c.classid] = c.parent
        elif c.qdisc in nested:
            flat_parent[c.classid] = nested[c.qdisc]
        else:
            flat_parent[c.classid] = None
    reachable = {c.classid for c in classes if _reaches_root(c.classid, flat_parent, root.handle, classes)}
    has_children = {p for cid, p in flat_parent.items() if p is not None and cid in reachable}
    ordered: list[FlatClass] = []

    def visit(parent: str | None) -> None:
        for c in sorted(classes, key=lambda c: (c.qdisc != root.handle, c.minor)):
            if (
                c.classid in reachable
                and flat_parent[c.classid] == parent
                and (line is None or c.classid != line.classid)
            ):
                under = None if parent is None or (line is not None and parent == line.classid) else parent
                leaf = by_handle.get(c.leaf) if c.leaf and c.leaf not in nested else None
                r2q = int(by_handle[c.qdisc].options.get("r2q", 10)) if c.qdisc in by_handle else 10
                ordered.append(FlatClass(c, under, leaf, r2q, is_leaf=c.classid not in has_children))
                visit(c.classid)

    if line is not None:
        visit(line.classid)
    else:
        visit(None)
    line_rate = line.ceil if line is not None else max((c.ceil for c in roots), default=0)
    used = {c.kernel.qdisc for c in ordered} | {root.handle} | set(nested)
    return FlatTree(
        dev=dev,
        root=root,
        line=line,
        line_rate=line_rate,
        classes=ordered,
        filters=[f for f in filters if f.qdisc in used],
        nested=nested,
        qdiscs=by_handle,
        kernel_ids=frozenset(c.classid for c in classes),
        htb_leaves=frozenset(c.classid for c in classes) - {c.parent for c in classes if c.parent},
        side_by_side=line is None and len(roots) > 1,
        sum_of_ceils=sum(c.ceil for c in roots),
    )


def _reaches_root(classid: str, parents: dict[str, str | None], root: str, classes: list[KernelClass]) -> bool:
    by_id = {c.classid: c for c in classes}
    seen = set()
    while classid in by_id and classid not in seen:
        seen.add(classid)
        up = parents[classid]
        if up is None:
            return by_id[classid].qdisc == root
        classid = up
    return False


def default_quantum(rate: int, r2q: int) -> int:
    low, high = QUANTUM_RANGE
    return min(max(rate // 8 // r2q, low), high)
