"""shape-import: the shaping a hand-written script left in the kernel → the shapekit config that rebuilds it.

Pure: `adopt(reading)` takes what the kernel printed (`KernelReading`) and
returns the TOML text and how many things it had to leave in comments.

- The tc side (`adopt_tc`): each device's HTB tree, flattened, with its
  leaf qdiscs and the filters that pick classes (fw marks, u32 matches).
- The mangle side (`adopt_mangle`): the MARK, CONNMARK and CLASSIFY rules,
  in first-match order.
- Here: each rule's mark followed through the tree to the class it ends in.
  A mark that ends unshaped at the line rate (seed 000's 1001) is the bypass.
  A class that exactly one host's rule fills, at rate = ceil (seed 002's),
  is a cap. The rule that marks every packet names the default class.

Every remark is found first; writing the TOML only formats what was found.
"""

from __future__ import annotations

import collections
import ipaddress
import json
import re
from dataclasses import dataclass, field, replace

from shapekit.config.model import CLASS_NAME, FIRST_MINOR, MAX_MINOR, MAX_OVERHEAD, MIN_OVERHEAD
from shapekit.config.units import format_rate
from shapekit.plan.adopt_mangle import Decisions, Marker, Remark, decide, parse_mangle
from shapekit.plan.adopt_tc import (
    DEFAULT_BURST,
    Direct,
    FlatClass,
    FlatTree,
    Qdisc,
    Selector,
    default_quantum,
    flatten,
    parse_classes,
    parse_filters,
    parse_qdiscs,
)

SFQ = {"limit": 127, "quantum": 1514, "depth": 127, "divisor": 1024, "perturb": 10}  # `sfq perturb 10`, 1500 MTU
CAKE = {"bandwidth": "unlimited", "diffserv": "besteffort", "flowmode": "triple-isolate", "split_gso": True}


@dataclass(frozen=True)
class TreeReading:
    """What tc printed about one device (or its IFB)."""

    dev: str
    qdiscs: str  # tc -j -d qdisc show dev D
    classes: str  # tc -d class show dev D
    filters: dict[str, str]  # HTB qdisc handle ("1:") → tc filter show dev D parent 1:
    ingress: str = "[]"  # tc -j filter show dev D ingress
    ifb: TreeReading | None = None


@dataclass(frozen=True)
class KernelReading:
    devices: tuple[TreeReading, ...]
    mangle: dict[int, str]  # family → iptables-save -t mangle
    addresses: str = "[]"  # ip -j addr show
    unread: dict[str, str] = field(default_factory=dict)  # device → why its shaping is not read


# Root qdiscs a script sets to shape (the kernel's own defaults, noqueue, pfifo_fast, fq_codel, mq, are not).
SHAPING_ROOTS = (
    "hfsc",
    "cbq",
    "drr",
    "qfq",
    "ets",
    "prio",
    "tbf",
    "cake",
    "netem",
    "sfq",
    "red",
    "sfb",
    "choke",
    "multiq",
)


@dataclass(frozen=True)
class Imported:
    text: str
    left_out: int


@dataclass
class Rule:
    """A [[mark]] rule to write, from a marker or a u32 filter."""

    classid: str  # the script's class it sends to
    selector: Selector
    original: str
    direction: str = "out"
    families: set[int] = field(default_factory=set)
    comment: str = ""  # the script rule's -m comment


def adopt(reading: KernelReading) -> Imported:
    local, txqlen = _addresses(reading.addresses)
    decisions = [decide(parse_mangle(text, family)) for family, text in sorted(reading.mangle.items())]
    header: list[Remark] = [r for d in decisions for r in d.remarks]
    classify = {m: c for d in decisions for m, c in d.classify.items()}
    devices = [_Device(t, classify, local, txqlen.get(t.dev, 1000), decisions) for t in reading.devices]
    header += [Remark(f"{dev}: {why}", left_out=True) for dev, why in reading.unread.items()]
    header += _unread_devices(decisions, {d.dev for d in devices})
    header += _one_family_rules(devices, reading.mangle)
    bypass = _Bypass.of(devices)
    body = _write(header, devices, bypass, several=len(devices) > 1)
    left_out = body.count("\n# LEFT OUT:") + body.startswith("# LEFT OUT:")
    return Imported(text=_intro(left_out) + body, left_out=left_out)


def _addresses(text: str) -> tuple[set[str], dict[str, int]]:
    links = json.loads(text or "[]")
    local = {a["local"] for link in links for a in link.get("addr_info", []) if "local" in a}
    return local, {link["ifname"]: link.get("txqlen", 1000) for link in links if "ifname" in link}


def _unread_devices(decisions: list[Decisions], read: set[str]) -> list[Remark]:
    """A rule for an out device (-o) with no tree read decides nothing here."""
    return [
        Remark(f"marks packets out of {m.selector.device}, whose shaping was not read", m.rule.text, left_out=True)
        for d in decisions
        for m in d.markers
        if m.selector.device is not None and m.selector.device not in read
    ]


def _one_family_rules(devices: list[_Device], mangle: dict[int, str]) -> list[Remark]:
    """A script's IPv4-only rule without an address (iptables, or a `protocol ip` filter) marks IPv6 too here."""
    single = [
        r
        for d in devices
        for r in d.rules
        if len(r.families) == 1
        and r.selector.src is None
        and r.selector.dst is None
        and r.selector.proto not in ("icmp", "icmpv6")
    ]
    if not single:
        return []
    empty = [f"ip{'6' if f == 6 else ''}tables" for f in (4, 6) if not mangle.get(f, "").count("\n-A ")]
    why = f" ({empty[0]}' mangle table is empty)" if len(empty) == 1 else ""
    return [
        Remark(
            f"the script marks one IP family only{why}: the rules below that name no address mark both here, as shapekit's rules do"
        )
    ]


class _Device:
    """One device: its flattened tree and what ends in it (classes, rules, caps, bypass), with remarks."""

    def __init__(
        self,
        reading: TreeReading,
        classify: dict[int, str],
        local: set[str],
        txqlen: int,
        decisions: list[Decisions],
        direction: str = "out",
    ) -> None:
        self.reading, self.dev, self.classify, self.local, self.txqlen = reading, reading.dev, classify, local, txqlen
        self.direction = direction
        self.tree = _tree(reading)
        self.remarks: list[Remark] = []  # about the device and its classes
        self.ordered: list[Rule | Remark] = []  # rules, and rules left out or never deciding, in first-match order
        self.bypass_sides: dict[str, set[str]] = {}  # bypass port → which of its sides the script bypassed
        self.bypass_hosts: list[str] = []
        self.bypass_remarks: list[Remark] = []
        self.bypass_mark: int | None = None
        self.defaults: dict[int, str] = {}  # family → the class its catch-all rule names
        self.default: str | None = None
        self.default_rule = ""  # the script's rule that marks every packet, which names the default
        self.caps: list[tuple[str, FlatClass]] = []
        self.ingress: _Device | None = None
        for family_decisions in decisions:
            for marker in family_decisions.markers:
                self._marker(marker, family_decisions.family)
        self._filters()
        self._bypass_sides()
        self._settle_default()
        self._find_caps()
        self.names = _class_names(self.tree, self.rules)
        self.leaf, self.leaves = self._leaves()
        self._class_remarks()
        if direction == "out":
            self.classifier = "fw" if self.tree.fw_marks() else "classify"
            if self.classifier == "classify" and not classify:
                self.remarks.append(
                    Remark(
                        f'{self.dev}: classifier = "classify" (iptables CLASSIFY sets the class): the script used no fw filter'
                    )
                )
            self._ingress()

    @property
    def rules(self) -> list[Rule]:
        return [r for r in self.ordered if isinstance(r, Rule)]

    # --- where a marker's packets end ---------------------------------------------------

    def _end(self, marker: Marker) -> tuple[str, str]:
        """(kind, class id or why): kind "class", "unshaped", or "left out" where the marker's packets go here."""
        if marker.classid is not None:
            return self._kind(self.tree.enter(priority=marker.classid))
        assert marker.mark is not None
        if marker.mark in self.classify and not marker.unclassified:
            return self._kind(self.tree.enter(mark=marker.mark, priority=self.classify[marker.mark]))
        if marker.mark in self.tree.fw_marks():
            return self._kind(self.tree.enter(mark=marker.mark))
        mark = f"{marker.mark} ({marker.mark:#x})"
        if marker.unclassified:
            return "left out", f"sets mark {mark} after the CLASSIFY rule for it, so it decides no class"
        return "left out", f"sets mark {mark}, which no fw filter or CLASSIFY rule sends to a class of {self.dev}"

    def _kind(self, end: str | Direct) -> tuple[str, str]:
        if self.tree.is_unshaped(end):
            return "unshaped", ""
        if isinstance(end, Direct):
            under = self.tree.nested.get(end.qdisc, "the root")
            return (
                "left out",
                f"ends in the direct queue of qdisc {end.qdisc} (under {under}): shapekit has no such place",
            )
        return "class", end

    def _marker(self, marker: Marker, family: int) -> None:
        if marker.selector.device not in (None, self.dev):
            return
        if family in self.defaults:
            self.ordered.append(
                Remark("never decides: a later rule of the script marks every packet", marker.rule.text)
            )
            return
        kind, where = self._end(marker)
        if kind == "left out":
            self.ordered.append(Remark(where, marker.rule.text, left_out=True))
        elif kind == "unshaped":
            self._bypass(marker)
        elif marker.selector.is_everything:
            self.defaults[family] = where
            self.default_rule = self.default_rule or marker.rule.text.split(" ", 2)[2]
        else:
            self._rule(Rule(where, marker.selector, marker.rule.text, families={family}, comment=marker.rule.comment))

    def _rule(self, rule: Rule) -> None:
        key = (rule.classid, rule.selector, rule.direction)
        same = next((r for r in self.rules if (r.classid, r.selector, r.direction) == key), None)
        if same is not None:  # the same rule in both families: one shapekit rule
            same.families |= rule.families
        else:
            self.ordered.append(rule)

    def _bypass(self, marker: Marker) -> None:
        """A rule whose packets end unshaped at the line rate: shapekit's [bypass], when it names ports or hosts."""
        selector, original = marker.selector, marker.rule.text
        if marker.mark is not None:
            self.bypass_mark = self.bypass_mark or marker.mark
        foreign = [h for h in (selector.src, selector.dst) if h is not None and h not in self.local]
        if (
            selector.proto in ("tcp", "udp")
            and (selector.sport or selector.dport)
            and not foreign
            and not (selector.tcp_syn or selector.l7proto)
        ):
            # What the rule bypasses of what this machine sends: a destination port only towards anyone
            # (a rule to its own address matches nothing it sends on the device).
            sides = [("source", selector.sport), ("destination", selector.dport if selector.dst is None else ())]
            for side, ports in sides:
                for port in ports:
                    self.bypass_sides.setdefault(f"{port}/{selector.proto}", set()).add(side)
            for port in (*selector.sport, *selector.dport):
                self.bypass_sides.setdefault(f"{port}/{selector.proto}", set())
            why = "a bypass port of shapekit's matches as source or destination port, from and to any address"
            if selector.src in self.local:
                why += f"; the rule's source {selector.src} is this machine's own address"
            elif selector.dst in self.local:
                why += f"; the rule's destination {selector.dst} is this machine's own, where nothing it sends on {self.dev} goes"
            self.bypass_remarks.append(Remark(why, original))
        elif selector.only_host:
            if selector.only_host not in self.bypass_hosts:
                self.bypass_hosts.append(selector.only_host)
            self.bypass_remarks.append(Remark("shapekit's bypass hosts match as destination or source", original))
        else:
            why = "sends packets past the shaper, but shapekit's bypass takes ports and hosts only"
            self.bypass_remarks.append(Remark(why, original, left_out=True))

    @property
    def bypass_ports(self) -> list[str]:
        return list(self.bypass_sides)

    def _bypass_sides(self) -> None:
        """A port the script bypassed one way only is bypassed both ways by shapekit: said, and counted."""
        for port, sides in self.bypass_sides.items():
            if len(sides) < 2:
                said = (
                    "only as a source port (what this machine serves)"
                    if sides == {"source"}
                    else (
                        "only as a destination port (what this machine asks of others)"
                        if sides
                        else "nowhere this machine sends to"
                    )
                )
                why = f"bypass port {port}: the script bypassed it {said}; shapekit's bypass takes it both ways, so more is unshaped"
                self.bypass_remarks.append(Remark(why, left_out=True))

    def _filters(self) -> None:
        """u32 filters become rules; fw filters were read as marks (or, arriving, cannot be)."""
        for f in self.tree.filters:
            if f.kind == "fw" and self.direction == "in":
                self.remarks.append(
                    Remark("an fw filter on arriving traffic: packets have no mark there yet", f.text, left_out=True)
                )
            elif f.kind == "fw" and not f.problem:
                continue
            elif f.problem or f.selector is None:
                self.remarks.append(Remark(f.problem, f.text, left_out=True))
            elif not self.tree.everywhere(f.qdisc):
                why = f"a filter of qdisc {f.qdisc}, which only packets in class {self.tree.nested[f.qdisc]} meet"
                self.remarks.append(Remark(why, f.text, left_out=True))
            else:
                kind, where = self._kind(self.tree.destination(f))
                if kind == "class":
                    self._rule(Rule(where, f.selector, f.text, direction=self.direction, families={f.family}))
                else:
                    why = where or "a u32 filter to the unshaped line: shapekit's bypass is [bypass], ports and hosts"
                    self.remarks.append(Remark(why, f.text, left_out=True))
        for qdisc in self.tree.qdiscs:
            fw = [f.pref for f in self.tree.filters if f.qdisc == qdisc and f.kind == "fw"]
            u32 = [f.pref for f in self.tree.filters if f.qdisc == qdisc and f.kind == "u32"]
            if fw and u32 and min(u32) < max(fw):
                why = f"{self.dev}: u32 filters of {qdisc} come before some of its fw filters; here the marking rules decide first"
                self.remarks.append(Remark(why, left_out=True))

    def _settle_default(self) -> None:
        """The class the catch-all rule names, else where HTB's defaults lead, else the widest leaf (and a remark)."""
        named = set(self.defaults.values())
        if len(named) > 1:
            self.remarks.append(
                Remark(
                    f"{self.dev}: the IPv4 and IPv6 rules mark every packet for different classes; the IPv4 one is the default",
                    left_out=True,
                )
            )
        self.default = self.defaults.get(4) or self.defaults.get(6)
        if self.default is None:
            end = self.tree.enter()
            self.default = end if isinstance(end, str) and self.tree.by_id(end) else None
        leaves = [c for c in self.tree.classes if c.is_leaf]
        if self.default is None and leaves:
            self.default = max(leaves, key=lambda c: c.kernel.ceil).kernel.classid
            why = f"{self.dev}: traffic no rule marks is not shaped by the script (HTB's direct queue); here it goes to the widest class, {self.default}"
            self.remarks.append(Remark(why, left_out=True))

    def _find_caps(self) -> None:
        """A leaf class at rate = ceil that exactly one host's rule fills, and nothing else: a cap (seed 002's)."""
        side = "dst" if self.direction == "out" else "src"
        for flat in list(self.tree.classes):
            feeding = [r for r in self.rules if r.classid == flat.kernel.classid]
            if len(feeding) != 1 or not flat.is_leaf or flat.kernel.classid == self.default:
                continue
            host = feeding[0].selector.only_host
            if flat.kernel.rate != flat.kernel.ceil or host is None or getattr(feeding[0].selector, side) != host:
                continue
            if flat.parent is not None or self._before(feeding[0], host, side):
                continue  # shapekit's caps hang under the line and decide last: here that would change what it does
            self.caps.append((host, flat))
            self.ordered.remove(feeding[0])
            self.tree.classes.remove(flat)
            lost = [
                f"{name} {_size(size or 0)}"
                for name, size in (("burst", flat.kernel.burst), ("cburst", flat.kernel.cburst))
                if _burst(size)
            ]
            lost += [f"prio {flat.kernel.prio}"] if flat.kernel.prio else []
            if lost:
                why = f"the cap on {host} (class {flat.kernel.classid}) keeps its rate, not its {', '.join(lost)}: shapekit's caps take tc's defaults"
                self.remarks.append(Remark(why, left_out=True))

    def _before(self, rule: Rule, host: str, side: str) -> bool:
        """Whether a rule before `rule`, or the bypass, may take packets to (or from) `host` first."""
        earlier = self.ordered[: self.ordered.index(rule)]
        rules = [r for r in earlier if isinstance(r, Rule) and r.direction == rule.direction]
        if any(getattr(r.selector, side) is None or _overlap(getattr(r.selector, side), host) for r in rules):
            return True
        return self.direction == "out" and bool(self.bypass_ports or any(_overlap(h, host) for h in self.bypass_hosts))

    def _leaves(self) -> tuple[str, dict[str, str]]:
        """The device's `leaf` (the most common) and each leaf class's own."""
        held = {c.kernel.classid: c.leaf for c in self.tree.classes if c.is_leaf}
        if self.tree.line is not None and not self.tree.classes:
            held[self.tree.line.classid] = self.tree.qdiscs.get(self.tree.line.leaf or "")
        leaves = {}
        for classid, qdisc in held.items():
            leaves[classid], why = _leaf_of(qdisc, self.txqlen)
            if why:
                self.remarks.append(Remark(f"class {classid}: {why}", qdisc.describe() if qdisc else "", left_out=True))
        kinds = collections.Counter(leaves.values())
        return (kinds.most_common(1)[0][0] if kinds else "none"), leaves

    def _class_remarks(self) -> None:
        if self.tree.nested:
            nested = ", ".join(f"{h} under {c}" for h, c in self.tree.nested.items())
            self.remarks.insert(
                0,
                Remark(
                    f"{self.dev}: the script's nested HTB qdiscs ({nested}) are flattened into one tree: their classes hang under the class that held them"
                ),
            )
        if self.tree.side_by_side:
            self.remarks.insert(
                0,
                Remark(
                    f"{self.dev}: the script's classes sit side by side on the root; here they share one top class at the line rate, the widest ceil ({format_rate(self.tree.line_rate)}), which they could pass together ({format_rate(self.tree.sum_of_ceils)})"
                ),
            )
        if any(c.kernel.quantum == default_quantum(c.kernel.rate, c.r2q) for c in self.tree.classes):
            self.remarks.append(
                Remark(
                    f"{self.dev}: quantum: the script left HTB's own (rate / r2q); shapekit gives each class its own (README, Quantum)"
                )
            )
        self.charge = self._charge()

    def _charge(self) -> tuple[int, str]:
        """The (overhead, linklayer) every class charges, or the root's size table does when no class charges
        anything of its own, which the tree's keys carry; plain when classes differ."""
        line = [self.tree.line] if self.tree.line else []
        kernels = [*(c.kernel for c in self.tree.classes), *(flat.kernel for _, flat in self.caps), *line]
        charges = {(k.overhead, k.linklayer) for k in kernels}
        stabs = {q.handle: q.stab for q in self.tree.qdiscs.values() if q.stab is not None}
        root = next((q.handle for q in self.tree.qdiscs.values() if q.parent is None), None)
        plain = charges <= {(0, "ethernet")}
        if plain and set(stabs) == {root} and _expressible(*stabs[root], size_table=True):
            return stabs[root]
        for handle, (overhead, linklayer) in stabs.items():
            why = (
                f"qdisc {handle} size table overhead {overhead} linklayer {linklayer}: shapekit writes one only on"
                f" the root, for classes that charge nothing of their own, overhead {MIN_OVERHEAD}..{MAX_OVERHEAD}"
                " with linklayer ethernet or atm"
            )
            self.remarks.append(Remark(why, left_out=True))
        if len(charges) == 1 and _expressible(*next(iter(charges))):
            return next(iter(charges))
        for k in kernels:
            if k.linklayer != "ethernet" or k.overhead:
                why = (
                    f"class {k.classid}: linklayer {k.linklayer}, overhead {k.overhead}: shapekit charges every class"
                    f" of a tree alike, overhead 0..{MAX_OVERHEAD} with linklayer ethernet or atm"
                )
                self.remarks.append(Remark(why, left_out=True))
        return 0, "ethernet"

    def _ingress(self) -> None:
        """An ingress redirect to an IFB with an HTB tree: [device.X.ingress], its u32 filters `direction = "in"` rules."""
        target, partly = _redirect(self.reading.ingress)
        if target is not None and partly:
            why = f"{self.dev}: its ingress filter redirects {partly} of what arrives to {target}; shapekit's redirects all"
            self.remarks.append(Remark(why, left_out=True))
        if target is None:
            if self.reading.ingress.strip() not in ("", "[]"):
                self.remarks.append(
                    Remark(
                        f"{self.dev}: ingress filters that redirect to no IFB",
                        self.reading.ingress.strip(),
                        left_out=True,
                    )
                )
            return
        if self.reading.ifb is None or self.reading.ifb.dev != target:
            self.remarks.append(
                Remark(f"{self.dev}: arriving traffic goes to {target}, which has no HTB tree", left_out=True)
            )
            return
        self.ingress = _Device(self.reading.ifb, {}, self.local, self.txqlen, [], direction="in")


def _tree(reading: TreeReading) -> FlatTree:
    qdiscs = parse_qdiscs(reading.qdiscs)
    filters = [f for handle, text in reading.filters.items() for f in parse_filters(text, handle)]
    return flatten(reading.dev, qdiscs, parse_classes(reading.classes), filters)


def redirect_target(ingress_json: str) -> str | None:
    """The device a `tc -j filter show dev D ingress` listing redirects arriving packets to."""
    return _redirect(ingress_json)[0]


def _redirect(ingress_json: str) -> tuple[str | None, str]:
    """The redirect's target, and why it is not all arriving traffic when it is not."""
    try:
        filters = json.loads(ingress_json or "[]")
    except ValueError:
        return None, ""
    for f in filters:
        options = f.get("options", {})
        target = next(
            (a.get("to_dev") for a in options.get("actions", []) if a.get("mirred_action") == "redirect"), None
        )
        if target:
            matches = options.get("match", [])
            matches = matches if isinstance(matches, list) else [matches]
            everything = f.get("protocol") == "all" and all(int(str(m.get("mask", "0")), 16) == 0 for m in matches)
            return target, "" if everything and f.get("kind") in ("u32", "matchall") else "only some of it"
    return None, ""


def has_classes(tree: TreeReading) -> bool:
    return bool(parse_classes(tree.classes))


def _class_names(tree: FlatTree, rules: list[Rule]) -> dict[str, str]:
    """Each class's name: the `-m comment` of the rules that send to it, when they agree on one; else `c` and
    its minor as tc shows it ("c1010"), with the major too where two qdiscs share a minor."""
    minors = collections.Counter(c.kernel.classid.split(":")[1] for c in tree.classes)
    names = {}
    for c in tree.classes:
        major, minor = c.kernel.classid.split(":")
        names[c.kernel.classid] = f"c{minor}" if minors[minor] == 1 else f"c{major}_{minor}"
    for classid in names:
        comments = {r.comment for r in rules if r.classid == classid and r.comment}
        said = re.sub(r"[^A-Za-z0-9_.-]+", "-", comments.pop()).strip("-.") if len(comments) == 1 else ""
        if CLASS_NAME.match(said) and said not in names.values() and said not in ("default", "bypass", "line"):
            names[classid] = said
    return names


def _expressible(overhead: int, linklayer: str, size_table: bool = False) -> bool:
    """Whether shapekit writes this charge back: a size table also takes a negative overhead (never ptm: no kernel
    charge is ptm)."""
    return (MIN_OVERHEAD if size_table else 0) <= overhead <= MAX_OVERHEAD and linklayer in ("ethernet", "atm")


def _overlap(a: str, b: str) -> bool:
    first, second = ipaddress.ip_network(a, strict=False), ipaddress.ip_network(b, strict=False)
    return first.version == second.version and first.overlaps(second)  # type: ignore[arg-type]


def _burst(size: int | None) -> bool:
    """Whether a burst was given (tc's own is about 1600 bytes: the MTU)."""
    return size is not None and abs(size - DEFAULT_BURST) > 16


def _size(size: int) -> str:
    kib = round(size / 1024)
    return f"{kib}k" if kib and abs(kib * 1024 - size) <= size // 100 else f"{size}b"


def _leaf_of(qdisc: Qdisc | None, txqlen: int) -> tuple[str, str]:
    """shapekit's `leaf` for a class's qdisc, and why it is not exactly that, when not."""
    if qdisc is None:
        return "none", ""
    options = qdisc.options
    if qdisc.kind == "pfifo" and options.get("limit") in (txqlen, None):
        return "pfifo", ""
    if qdisc.kind == "sfq":
        differs = {k: v for k, v in options.items() if k in SFQ and SFQ[k] != v}
        return "sfq", f"its sfq options {differs} become shapekit's `sfq perturb 10`" if differs else ""
    if qdisc.kind == "fq_codel":
        return "fq_codel", ""
    if qdisc.kind == "cake":
        differs = {k: options.get(k) for k in CAKE if options.get(k) != CAKE[k]}
        return "cake", f"its cake options {differs} become shapekit's" if differs else ""
    return "none", f"a {qdisc.kind} leaf: shapekit's leaves are sfq, fq_codel, cake and pfifo"


@dataclass(frozen=True)
class _Bypass:
    mark: int | None
    ports: tuple[str, ...]
    hosts: tuple[str, ...]
    remarks: tuple[Remark, ...]

    @classmethod
    def of(cls, devices: list[_Device]) -> _Bypass:
        return cls(
            mark=next((d.bypass_mark for d in devices if d.bypass_mark is not None), None),
            ports=tuple(dict.fromkeys(p for d in devices for p in d.bypass_ports)),
            hosts=tuple(dict.fromkeys(h for d in devices for h in d.bypass_hosts)),
            remarks=tuple(r for d in devices for r in d.bypass_remarks),
        )


# --- writing the TOML ------------------------------------------------------------------


def _string(text: str) -> str:
    return json.dumps(text)


def _key(name: str) -> str:
    """A TOML key: bare when it can be (eth0), quoted when not (a VLAN's "eth0.100")."""
    return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else _string(name)


def _comment(remark: Remark) -> list[str]:
    lines = [("# LEFT OUT: " if remark.left_out else "# ") + remark.text]
    return lines + [f"#   {line}" for line in remark.original.splitlines() if line.strip()]


def _intro(left_out: int) -> str:
    lines = [
        "# shapekit config written by shape-import from the shaping the kernel held.",
        "# Review it, then: shape-init --dry-run --config THIS_FILE",
        "# Classes are named after the script's class ids (c1010 is 1:1010) or its rules' comments;",
        "# each rule has the script's own line above it.",
        f"# {left_out} thing(s) the script did could not be expressed: each is a comment starting LEFT OUT."
        if left_out
        else "# Everything the script left in the kernel is expressed here.",
    ]
    return "\n".join(lines) + "\n\n"


def _write(header: list[Remark], devices: list[_Device], bypass: _Bypass, several: bool) -> str:
    out = [line for remark in header for line in _comment(remark)]
    for device in devices:
        out += ["", *(line for remark in device.remarks for line in _comment(remark))]
        out += _tree_lines(device, f"device.{_key(device.dev)}")
        caps = [(host, flat, "out") for host, flat in device.caps]
        caps += [(host, flat, "in") for host, flat in (device.ingress.caps if device.ingress else [])]
        if caps:
            out += ["", f"[device.{_key(device.dev)}.limits]"]
            for host, flat, direction in caps:
                rate = _string(format_rate(flat.kernel.rate))
                value = rate if direction == "out" else f'{{ rate = {rate}, direction = "in" }}'
                out.append(f"{_string(host)} = {value}  # class {flat.kernel.classid}")
        if device.ingress is not None:
            out += ["", f"# arriving traffic, redirected to {device.ingress.dev}"]
            out += [line for remark in device.ingress.remarks for line in _comment(remark)]
            out += _tree_lines(device.ingress, f"device.{_key(device.dev)}.ingress")
    if bypass.mark is not None or bypass.ports or bypass.hosts:
        out += ["", "# what the script sends past the shaper (marked, then unshaped at the line rate)"]
        out += [line for remark in bypass.remarks for line in _comment(remark)]
        out += ["[bypass]", f"mark = {bypass.mark or 1001}"]
        out.append(f"ports = [{', '.join(map(_string, bypass.ports))}]")
        out.append(f"hosts = [{', '.join(map(_string, bypass.hosts))}]")
    for device in devices:
        for item in [*device.ordered, *(device.ingress.ordered if device.ingress else [])]:
            if isinstance(item, Remark):
                out += ["", *_comment(item)]
            else:
                names = device.names if item.direction == "out" or not device.ingress else device.ingress.names
                out += [
                    "",
                    f"#   {item.original.splitlines()[0]}",
                    *_rule_lines(item, names, device.dev if several else None),
                ]
    return "\n".join(out).lstrip("\n") + "\n"


def _tree_lines(device: _Device, key: str) -> list[str]:
    tree = device.tree
    line = f"  # {tree.line.classid}, the line" if tree.line else "  # the widest ceil on the root"
    lines = [f"[{key}]", f"rate = {_string(format_rate(tree.line_rate))}{line}"]
    if tree.classes and device.default:
        said = f"  # the script's {device.default_rule}" if device.default_rule else "  # the script's HTB default"
        lines.append(f"default = {_string(device.names[device.default])}{said}")
    lines.append(f"leaf = {_string(device.leaf)}")
    if device.direction == "out":
        lines.append(f"classifier = {_string(device.classifier)}")
    overhead, linklayer = device.charge
    lines += [f"overhead = {overhead}"] if overhead else []
    lines += [f"linklayer = {_string(linklayer)}"] if linklayer != "ethernet" else []
    taken = collections.Counter(c.kernel.minor for c in tree.classes)
    marks = _class_marks(device) if device.direction == "out" else {}
    ceils: dict[str | None, int] = {None: tree.line_rate}
    for flat in tree.classes:
        k = flat.kernel
        ceil = ceils[k.classid] = min(k.ceil, ceils[flat.parent])
        nested = f" (qdisc {k.qdisc} under {tree.nested[k.qdisc]})" if k.qdisc in tree.nested else ""
        lines += ["", f"# class {k.classid}{nested}", f"[{key}.classes.{_key(device.names[k.classid])}]"]
        if flat.parent is not None:
            lines.append(f"parent = {_string(device.names[flat.parent])}")
        cut = f"  # the script's {format_rate(k.rate)} is above the ceil" if k.rate > ceil else ""
        lines.append(f"rate = {_string(format_rate(min(k.rate, ceil)))}{cut}")
        above = f"  # the script's {format_rate(k.ceil)} is above its parent's" if ceil < k.ceil else ""
        lines.append(f"ceil = {_string(format_rate(ceil))}{above}")
        if k.prio:
            lines.append(f"prio = {k.prio}")
        if FIRST_MINOR <= k.minor <= MAX_MINOR and taken[k.minor] == 1:
            lines.append(f"classid = {k.minor:#x}")
        if k.classid in marks:
            lines.append(f"mark = {marks[k.classid]}")
        lines += [
            f"{name} = {_string(_size(size or 0))}"
            for name, size in (("burst", k.burst), ("cburst", k.cburst))
            if _burst(size)
        ]
        if k.quantum is not None and k.quantum != default_quantum(k.rate, flat.r2q):
            lines.append(f"quantum = {k.quantum}")
        if flat.is_leaf and device.leaves.get(k.classid, device.leaf) != device.leaf:
            lines.append(f"leaf = {_string(device.leaves[k.classid])}")
    return lines


def _class_marks(device: _Device) -> dict[str, int]:
    """The script's mark for each class a mark ends in, kept on the class so `tc filter show` reads the same."""
    marks: dict[str, int] = {}
    for mark in sorted({*device.tree.fw_marks(), *device.classify}):
        end = device.tree.enter(mark=mark, priority=device.classify.get(mark))
        if isinstance(end, str) and device.tree.by_id(end) and end not in marks and mark != device.bypass_mark:
            marks[end] = mark
    return marks


def _rule_lines(rule: Rule, names: dict[str, str], device: str | None) -> list[str]:
    selector = replace(rule.selector, device=rule.selector.device or device)
    lines = ["[[mark]]", f"class = {_string(names[rule.classid])}"]
    if rule.direction == "in":
        lines.append('direction = "in"')
    if selector.proto:
        lines.append(f"proto = {_string(selector.proto)}")
    for key in ("sport", "dport"):
        ports = getattr(selector, key)
        if ports:
            lines.append(f"{key} = {_ports(ports)}")
    lines += [
        f"{key} = {_string(getattr(selector, key))}"
        for key in ("src", "dst", "l7proto", "device")
        if getattr(selector, key)
    ]
    if selector.tcp_syn:
        lines.append('tcp_flags = "syn"')
    return lines


def _ports(ports: tuple[str, ...]) -> str:
    words = [p if p.isdigit() else _string(p) for p in ports]
    return words[0] if len(words) == 1 else f"[{', '.join(words)}]"
