"""Pure functions for download shaping: a device's ingress tree on an IFB device, and its u32 filters.

Packets arriving on a device meet tc's ingress hook before netfilter, so
there are no marks to classify by. shapekit redirects everything arriving
on the device to its own IFB device, where an HTB tree built exactly like
the egress one (`plan.plan_tree`) shapes it on the way in:

    ip link add ifb-eth0 type ifb; ip link set dev ifb-eth0 alias "shapekit ingress of eth0" ... up
    tc qdisc add dev eth0 handle ffff: ingress
    tc filter add dev eth0 ingress protocol all pref 92 u32 match u32 0 0 action mirred egress redirect dev ifb-eth0

Classes on the IFB are picked by u32 filters, which see only the packet's
bytes: addresses, protocol, ports, TCP flags, DSCP, length. Each filter compares 32-bit
words at fixed offsets from the network header, so port matches need an
IPv4 header without options (IHL 5) and not a later fragment, and an IPv6
header followed directly by TCP or UDP; other packets go to the default
class. Filters run in this order (prefs), the first match wins:

    1000, 2000     per-IP caps on one host (IPv4, IPv6): a hash table on the address's
                   last byte, so thousands of caps cost a packet a few comparisons
    1001.., 2001.. per-IP caps on a network, longest prefix first (one pref per length)
    3000, 3001     [bypass] ports and hosts → the unshaped class
    4000, 4001     [[mark]] rules with direction = "in", in file order

Longer than the other plans, and kept whole: every filter here is written
in one encoding (u32 keys, port blocks, hash nodes), and what puts a filter
back after a failure is the same code that wrote it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from shapekit.config.addresses import Network
from shapekit.config.model import IFB_ALIAS, Config, Device
from shapekit.config.rules import BYPASS_MINOR, IPV6_HEADER, Bypass, MarkRule
from shapekit.errors import UsageError
from shapekit.plan.limits import PlacedCap, class_rates, exactly, sync_classes, u32_slot
from shapekit.plan.tree import Argv, classid, root_handle

REDIRECT_PREF = 92  # shapekit's one filter on the device's own ingress hook
IFB_TXQUEUELEN = "1000"  # an IFB starts at 32 packets: too short a default queue for a line
CAP_PREF = {4: 1000, 6: 2000}  # + (address bits - prefix length)
BYPASS_PREF = {4: 3000, 6: 3001}
RULE_PREF = {4: 4000, 6: 4001}
HASH_TABLE = {4: "100:", 6: "101:"}  # the caps' hash tables, one per family
HASH_DIVISOR = 256
U32_LIST_MAX = 2047  # filters u32 numbers in order in one pref (node ids 0x800..0xffe)
PROTOCOL = {4: "ip", 6: "ipv6"}
IP_PROTO = {"tcp": 6, "udp": 17, "icmp": 1, "ipv6-icmp": 58}

# Where things are, as (offset of the 32-bit word, shift within it), from the network header.
_SRC = {4: 12, 6: 8}
_DST = {4: 16, 6: 24}
_PORTS = {4: 20, 6: 40}  # source port in the high half, destination port in the low half
_TCP_FLAGS = {4: 32, 6: 52}  # the word holding the TCP flags byte (its second byte)
SYN_RST_ACK = 0x16
SYN = 0x02
FLAG_BITS = {"fin": 0x01, "syn": 0x02, "rst": 0x04, "ack": 0x10}  # a tcp_flags list's mask is all four: 0x17
# The DSCP: IPv4's TOS byte (the second), IPv6's traffic class (4 bits into the first word); both at word 0.
_DSCP_SHIFT = {4: 18, 6: 22}
# The packet's length as iptables' length match counts it: IPv4's total length (low half of word 0),
# IPv6's payload length (high half of word 4) plus its 40-byte header.
_LENGTH = {4: (0, 0, 0), 6: (4, 16, IPV6_HEADER)}  # offset, shift, bytes not counted in the field


@dataclass(frozen=True)
class U32Key:
    """One `match u32 VALUE MASK at OFFSET`: the word at OFFSET, masked, equals VALUE."""

    value: int
    mask: int
    offset: int

    def words(self) -> tuple[str, ...]:
        return ("match", "u32", f"0x{self.value:08x}", f"0x{self.mask:08x}", "at", str(self.offset))


@dataclass(frozen=True, order=True)
class U32Entry:
    """A classifying u32 filter as the kernel shows it: what it matches and where it sends."""

    protocol: str  # "ip", "ipv6"
    pref: int
    flowid: str  # a class, or "link 100:" for a hash table's link
    keys: tuple[tuple[int, int, int], ...]  # (value, mask, offset), sorted
    handle: str = field(default="", compare=False)  # "100:7:1"; not what the filter does
    shown: tuple[tuple[int, int, int], ...] = field(default=(), compare=False)  # the keys in the kernel's order

    def describe(self) -> str:
        keys = " ".join(f"{v:08x}/{m:08x}@{o}" for v, m, o in self.keys)
        return f"the {self.protocol} u32 filter to {self.flowid} (pref {self.pref}: {keys})"


@dataclass(frozen=True)
class U32Filter:
    """One u32 filter on an ingress tree: all its keys match → its class."""

    family: int
    pref: int
    keys: tuple[U32Key, ...]
    flowid: str
    handle: str | None = None  # "100:2a:1": a node in a hash bucket, for filters changed one by one

    @classmethod
    def from_entry(cls, entry: U32Entry) -> U32Filter:
        """A filter the kernel shows, as one to add again: how a filter is put back after a failure."""
        family = next(f for f, name in PROTOCOL.items() if name == entry.protocol)
        keys = tuple(U32Key(v, m, o) for v, m, o in entry.shown or entry.keys if m)
        return cls(family, entry.pref, keys, entry.flowid, entry.handle if is_hash_node(entry.handle) else None)

    def entry(self) -> U32Entry:
        """What the kernel will show of this filter (values masked, a filter without keys matching all)."""
        keys = tuple(sorted((k.value & k.mask, k.mask, k.offset) for k in self.keys)) or ((0, 0, 0),)
        return U32Entry(PROTOCOL[self.family], self.pref, self.flowid, keys, self.handle or "")

    def argv(self, dev: str, verb: str = "add") -> Argv:
        where = ("handle", self.handle, "u32", "ht", self.handle.rsplit(":", 1)[0] + ":") if self.handle else ("u32",)
        keys = [word for key in self.keys for word in key.words()] or ["match", "u32", "0", "0"]
        return _filter(dev, verb, self.family, self.pref, *where, *keys, "flowid", self.flowid)


def _filter(dev: str, verb: str, family: int, pref: int, *args: str) -> Argv:
    return ("tc", "filter", verb, "dev", dev, "parent", root_handle(), "protocol", PROTOCOL[family],
            "pref", str(pref), *args)  # fmt: skip


# --- keys -----------------------------------------------------------------------


def host_keys(host: Network, offset: int) -> list[U32Key]:
    """The address words of `host` (a network) at `offset`: one key per word its prefix covers."""
    keys = []
    address, netmask = int(host.network_address), int(host.netmask)
    words = host.max_prefixlen // 32
    for n in range(words):
        shift = 32 * (words - 1 - n)
        mask = (netmask >> shift) & 0xFFFFFFFF
        if mask:
            keys.append(U32Key((address >> shift) & mask, mask, offset + 4 * n))
    return keys


def proto_key(family: int, number: int) -> list[U32Key]:
    if family == 4:  # and a whole header: IHL 5 and the first fragment, so layer 4 sits at byte 20
        return [U32Key(number << 16, 0x00FF0000, 8), U32Key(0x05000000, 0x0F000000, 0), U32Key(0, 0x1FFF, 4)]
    return [U32Key(number << 8, 0x0000FF00, 4)]  # next header: an extension header moves layer 4


def port_blocks(ports: str) -> list[tuple[int, int]]:
    """`"61000:63000"` or `"22"` as (value, mask) blocks that together cover exactly the range."""
    low, _, high = ports.partition(":")
    return range_blocks(int(low), int(high or low))


def range_blocks(first: int, last: int) -> list[tuple[int, int]]:
    """FIRST..LAST (16-bit, inclusive) as (value, mask) blocks that together cover exactly the range."""
    blocks = []
    while first <= last:
        size = first & -first if first else 1 << 16
        while size > last - first + 1:
            size //= 2
        blocks.append((first, 0xFFFF & ~(size - 1)))
        first += size
    return blocks


def port_key(family: int, side: str, block: tuple[int, int]) -> U32Key:
    value, mask = block
    shift = 16 if side == "sport" else 0
    return U32Key(value << shift, mask << shift, _PORTS[family])


def syn_key(family: int) -> U32Key:
    return U32Key(SYN << 16, SYN_RST_ACK << 16, _TCP_FLAGS[family])


def flags_key(family: int, flags: Sequence[str]) -> U32Key:
    """Exactly `flags` set among FIN, SYN, RST and ACK."""
    value = sum(FLAG_BITS[f] for f in flags)
    return U32Key(value << 16, sum(FLAG_BITS.values()) << 16, _TCP_FLAGS[family])


def dscp_key(family: int, dscp: int) -> U32Key:
    shift = _DSCP_SHIFT[family]
    return U32Key(dscp << shift, 0x3F << shift, 0)


def length_keys(family: int, length: tuple[int, int]) -> list[U32Key]:
    """One key per block of the length range: the packet matches if any one does."""
    offset, shift, uncounted = _LENGTH[family]
    first, last = max(length[0] - uncounted, 0), length[1] - uncounted
    return [U32Key(value << shift, mask << shift, offset) for value, mask in range_blocks(first, last)]


# --- what goes where ---------------------------------------------------------------


def cap_pref(host: Network) -> int:
    return CAP_PREF[host.version] + host.max_prefixlen - host.prefixlen


def cap_filter(placed: PlacedCap) -> U32Filter:
    """A cap's filter: in its hash bucket (one host), else at the pref of its prefix length."""
    host = placed.cap.host
    keys = tuple(host_keys(host, _SRC[host.version]))
    slot = u32_slot(placed.cap, placed.slot)
    handle = None
    if slot is not None:
        _, bucket, node = slot
        handle = f"{HASH_TABLE[host.version]}{bucket:x}:{node:x}"
    return U32Filter(host.version, cap_pref(host), keys, classid(placed.slot), handle)


def hash_tables(dev: str) -> list[Argv]:
    """The caps' hash tables: 256 buckets on the source address's last byte, one table per family."""
    cmds = []
    for family, table in HASH_TABLE.items():
        last_word = _SRC[family] + (4 if family == 4 else 16) - 4
        pref = CAP_PREF[family]
        cmds.append(_filter(dev, "add", family, pref, "handle", table, "u32", "divisor", str(HASH_DIVISOR)))
        cmds.append(_filter(dev, "add", family, pref, "u32", "match", "u32", "0", "0",
                            "hashkey", "mask", "0x000000ff", "at", str(last_word), "link", table))  # fmt: skip
    return cmds


def bypass_filters(bypass: Bypass) -> list[U32Filter]:
    """Bypassed ports (source or destination) and hosts (from or to) → the unshaped class."""
    out = []
    bypass_class = classid(BYPASS_MINOR)
    for family in (4, 6):
        pref = BYPASS_PREF[family]
        for entry in bypass.ports:
            proto = proto_key(family, IP_PROTO[entry.proto])
            for block in port_blocks(entry.port):
                for side in ("sport", "dport"):
                    out.append(U32Filter(family, pref, (*proto, port_key(family, side, block)), bypass_class))
        for host in bypass.hosts:
            if host.version == family:
                for offset in (_SRC[family], _DST[family]):
                    out.append(U32Filter(family, pref, tuple(host_keys(host, offset)), bypass_class))
    return out


def rule_filters(tree: Device, rules: Sequence[MarkRule]) -> list[U32Filter]:
    """The direction = "in" [[mark]] rules for this ingress tree, each as one filter per port block."""
    minors = {c.name: c.minor for c in tree.classes if c.is_leaf}
    out = []
    for rule in rules:
        if rule.direction != "in" or rule.class_name not in minors or rule.device not in (None, tree.configured):
            continue
        for family in rule.families:
            out += [U32Filter(family, RULE_PREF[family], keys, classid(minors[rule.class_name]))
                    for keys in _rule_keys(rule, family)]  # fmt: skip
    return out


def _rule_keys(rule: MarkRule, family: int) -> list[tuple[U32Key, ...]]:
    common: list[U32Key] = []
    for host, offset in ((rule.src, _SRC[family]), (rule.dst, _DST[family])):
        if host is not None:
            common += host_keys(host, offset)
    if rule.proto is not None:
        common += proto_key(family, IP_PROTO[rule.proto])
    if rule.tcp_syn:
        common.append(syn_key(family))
    if rule.tcp_flags:
        common.append(flags_key(family, rule.tcp_flags))
    if rule.dscp is not None:
        common.append(dscp_key(family, rule.dscp))
    sports = [port_key(family, "sport", b) for p in rule.sport for b in port_blocks(p)] or [None]
    dports = [port_key(family, "dport", b) for p in rule.dport for b in port_blocks(p)] or [None]
    lengths = length_keys(family, rule.length) if rule.length is not None else [None]
    return [(*common, *(k for k in (s, d, n) if k is not None)) for s in sports for d in dports for n in lengths]


def ingress_filters(tree: Device, config: Config, bypass: Bypass, caps: Sequence[PlacedCap]) -> list[U32Filter]:
    """Every classifying filter of an ingress tree, in the order a packet meets them."""
    by_pref = sorted(caps, key=lambda p: (cap_pref(p.cap.host), p.slot))
    return listable([cap_filter(p) for p in by_pref] + bypass_filters(bypass) + rule_filters(tree, config.marks))


def listable(filters: list[U32Filter]) -> list[U32Filter]:
    """Refuse a list u32 cannot keep in order: past 2047 filters in one pref its node ids wrap around."""
    counts = Counter(f.pref for f in filters if f.handle is None)
    crowded = [pref for pref, n in counts.items() if n > U32_LIST_MAX]
    if crowded:
        raise UsageError(
            f"{counts[crowded[0]]} u32 filters at pref {crowded[0]}, more than the {U32_LIST_MAX} u32 keeps in order: "
            "use fewer or wider port ranges, hosts or networks there (see README, Download shaping)"
        )
    return filters


def plan_filters(tree: Device, config: Config, bypass: Bypass, caps: Sequence[PlacedCap]) -> list[Argv]:
    """The caps' hash tables, then every filter of the tree."""
    return hash_tables(tree.name) + [f.argv(tree.name) for f in ingress_filters(tree, config, bypass, caps)]


def prefix_prefs(present: set[int]) -> list[tuple[int, int]]:
    """(family, pref) of the prefs among `present` that hold caps on networks (linear, one per length)."""
    spans = {4: range(CAP_PREF[4] + 1, CAP_PREF[4] + 33), 6: range(CAP_PREF[6] + 1, CAP_PREF[6] + 129)}
    return [(family, pref) for pref in sorted(present) for family, span in spans.items() if pref in span]


@dataclass(frozen=True)
class CapFilters:
    """An ingress tree's cap filters: one host each in the hash tables, networks listed at their prefs."""

    nodes: tuple[U32Filter, ...]
    listed: tuple[U32Filter, ...]  # in the order a packet meets them

    @classmethod
    def of(cls, placed: Sequence[PlacedCap]) -> CapFilters:
        filters = [cap_filter(p) for p in sorted(placed, key=lambda p: (cap_pref(p.cap.host), p.slot))]
        return cls(tuple(f for f in filters if f.handle), tuple(f for f in filters if not f.handle))

    @classmethod
    def in_kernel(cls, present: set[int], entries: Sequence[U32Entry]) -> CapFilters:
        """The cap filters a tree holds now, read back: what a failed change puts back."""
        prefs = {pref for _, pref in prefix_prefs(present)}
        nodes = tuple(U32Filter.from_entry(e) for e in hash_nodes(entries).values())
        return cls(nodes, tuple(U32Filter.from_entry(e) for e in entries if e.pref in prefs))


def sync_caps(
    tree: Device, placed: Sequence[PlacedCap], present: set[int], nodes: dict[str, U32Entry], classes: dict[str, int]
) -> list[Argv]:
    """Make an ingress tree's caps `placed`, given its prefs, its hash nodes (by handle) and cap classes now."""
    wanted = exactly(class_rates(tree, placed), classes)
    return sync_cap_filters(tree, CapFilters.of(placed), wanted, present, nodes, classes)


def sync_cap_filters(
    tree: Device,
    filters: CapFilters,
    wanted: dict[str, int | None],
    present: set[int],
    nodes: dict[str, U32Entry],
    classes: dict[str, int],
) -> list[Argv]:
    """Make an ingress tree's cap filters exactly `filters` and its cap classes `wanted`.

    The hash tables stay (u32 keeps a table until the qdisc's last u32 filter
    goes, so one cannot be made again): their nodes are deleted or added one
    by one. Filters go before classes: HTB refuses to delete a class a
    filter points to.
    """
    cmds = [_node_del(tree.name, h) for h in sorted(set(nodes) - {f.handle for f in filters.nodes})]
    cmds += replace_prefs(tree.name, prefix_prefs(present), present, [])
    cmds += sync_classes(tree, wanted, classes)
    cmds += [cmd for f in filters.nodes for cmd in _node_put(tree.name, f, nodes)]
    return cmds + [f.argv(tree.name) for f in filters.listed]


def _node_put(dev: str, mine: U32Filter, nodes: dict[str, U32Entry]) -> list[Argv]:
    """A hash node made to be `mine`: `replace` would keep the old node's keys, so a changed one goes first."""
    assert mine.handle is not None
    there = nodes.get(mine.handle)
    if there == mine.entry():
        return []
    return ([_node_del(dev, mine.handle)] if there is not None else []) + [mine.argv(dev)]


def put_node(dev: str, handle: str, node: U32Filter | None, nodes: dict[str, U32Entry]) -> list[Argv]:
    """A hash node made `node`, or gone (None), given the nodes there now."""
    if node is not None:
        return _node_put(dev, node, nodes)
    return [_node_del(dev, handle)] if handle in nodes else []


def _node_del(dev: str, handle: str) -> Argv:
    family = node_family(handle)
    return _filter(dev, "del", family, CAP_PREF[family], "handle", handle, "u32")


def hash_nodes(entries: Sequence[U32Entry]) -> dict[str, U32Entry]:
    """The caps' hash nodes among a tree's filters, by handle ("100:7:1")."""
    return {e.handle: e for e in entries if is_hash_node(e.handle)}


def is_hash_node(handle: str) -> bool:
    """A cap's node in shapekit's hash tables ("100:7:1"), not a filter in a pref's own list ("800::800")."""
    return handle.startswith(tuple(HASH_TABLE.values())) and handle.count(":") == 2


def node_family(handle: str) -> int:
    """The IP family of a cap's hash node, from its table."""
    return next(f for f, table in HASH_TABLE.items() if handle.startswith(table))


def hash_links() -> list[U32Filter]:
    """The filters that send each family into its hash table, as --check compares them."""
    return [U32Filter(f, CAP_PREF[f], (), f"link {table}") for f, table in HASH_TABLE.items()]


def cap_entry(
    tree: Device, placed: PlacedCap, every: Sequence[PlacedCap], present: set[int], nodes: dict[str, U32Entry]
) -> list[Argv]:
    """One cap's filter, put in: its hash node on one host, else its prefix length's pref anew."""
    mine = cap_filter(placed)
    if mine.handle is not None:
        return _node_put(tree.name, mine, nodes)
    return _pref_anew(tree, mine, every, present)


def cap_removal(
    tree: Device, placed: PlacedCap, rest: Sequence[PlacedCap], present: set[int], nodes: dict[str, U32Entry]
) -> list[Argv]:
    """One cap's filter out: its hash node (if there), else its prefix length's pref anew without it."""
    mine = cap_filter(placed)
    if mine.handle is not None:
        return [_node_del(tree.name, mine.handle)] if mine.handle in nodes else []
    return _pref_anew(tree, mine, rest, present)


def _pref_anew(tree: Device, mine: U32Filter, every: Sequence[PlacedCap], present: set[int]) -> list[Argv]:
    same = [cap_filter(p) for p in sorted(every, key=lambda p: p.slot) if cap_pref(p.cap.host) == mine.pref]
    return replace_prefs(tree.name, [(mine.family, mine.pref)], present, same)


def replace_prefs(
    dev: str, prefs: Iterable[tuple[int, int]], present: set[int], filters: list[U32Filter]
) -> list[Argv]:
    """Delete whole prefs (those there now) and add `filters` back: how bypass and rule filters change."""
    cmds = [_filter(dev, "del", family, pref, "u32") for family, pref in prefs if pref in present]
    return cmds + [f.argv(dev) for f in listable(filters)]


# --- the device and its IFB -----------------------------------------------------------


def plan_ifb(tree: Device, exists: bool) -> list[Argv]:
    """Make the IFB device (when it is not there) and bring it up, marked as shapekit's."""
    ifb = tree.name
    cmds: list[Argv] = [] if exists else [("ip", "link", "add", ifb, "type", "ifb")]
    return cmds + [("ip", "link", "set", "dev", ifb, "alias", IFB_ALIAS + tree.configured,
                    "txqueuelen", IFB_TXQUEUELEN, "up")]  # fmt: skip


def redirect(dev: str, ifb: str) -> Argv:
    return ("tc", "filter", "add", "dev", dev, "ingress", "protocol", "all", "pref", str(REDIRECT_PREF),
            "u32", "match", "u32", "0", "0", "action", "mirred", "egress", "redirect", "dev", ifb)  # fmt: skip


def remove_redirect(dev: str) -> Argv:
    return ("tc", "filter", "del", "dev", dev, "ingress", "protocol", "all", "pref", str(REDIRECT_PREF), "u32")


@dataclass(frozen=True)
class IngressHook:
    """What a device's ingress hook holds now."""

    qdisc: str | None  # "ingress", "clsact", or None
    redirect_to: str | None  # where shapekit's pref-92 filter sends packets; None: no such filter
    other_filters: bool = False  # filters that are not shapekit's


def plan_redirect(dev: str, ifb: str, hook: IngressHook) -> list[Argv]:
    """Send everything arriving on `dev` to its IFB: an ingress qdisc if none, and shapekit's one filter.

    A redirect there already stays: a re-init that fails cannot lose it.
    """
    if hook.redirect_to == ifb:
        return []
    cmds: list[Argv] = [] if hook.qdisc else [("tc", "qdisc", "add", "dev", dev, "handle", "ffff:", "ingress")]
    if hook.redirect_to is not None:  # one to an IFB deleted and made again
        cmds.append(remove_redirect(dev))
    return [*cmds, redirect(dev, ifb)]


def plan_unredirect(dev: str, ifb: str, hook: IngressHook) -> list[Argv]:
    """Take shapekit's filter (the one to `ifb`) off `dev`'s ingress hook; with the ingress qdisc, if it holds
    nothing else: one step, so that no empty qdisc is left behind that a second run could not tell as shapekit's."""
    if hook.redirect_to != ifb:
        return []
    if hook.qdisc == "ingress" and not hook.other_filters:
        return [("tc", "qdisc", "del", "dev", dev, "ingress")]
    return [remove_redirect(dev)]


def is_shapekit_ifb(alias: str | None, dev: str | None = None) -> bool:
    if not alias or not alias.startswith(IFB_ALIAS):
        return False
    return dev is None or alias == IFB_ALIAS + dev
