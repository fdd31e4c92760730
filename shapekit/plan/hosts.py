"""Pure parts of `shape-status --hosts`: who received (and sent) the most, counted by the kernel.

Seed 002's operator found the host with iftop, which knows nothing of the
shaping. shapekit counts each remote host where the packet's class is already
decided, for the interval only, with rules and sets it removes after:

    -A POSTROUTING -j SKHOSTS-P                              P: the counting run's process id
    -A SKHOSTS-P -o DEV -m mark --mark M -g SKHOSTS-P-N      one per class mark on DEV: its bin N
    -A SKHOSTS-P -o DEV -g SKHOSTS-P-N                       the rest: DEV's default class (or a cap)
    -A SKHOSTS-P-N -m set --match-set SKHOSTS-P-N-4 dst -j RETURN   a host seen: its counters move
    -A SKHOSTS-P-N -j SET --add-set SKHOSTS-P-N-4 dst               a new host: added, this packet counted

and, for a device with an ingress tree, the senders as they arrive:

    -A PREROUTING -j SKHOSTS-P-in
    -A SKHOSTS-P-in -i DEV -g SKHOSTS-P-N

Each SKHOSTS-P-N-F is an ipset `hash:ip` with counters, so a packet costs one
hash lookup however many hosts there are, and the kernel keeps each host's
bytes and packets. The jump comes after shapekit's own, so the mark is the
one HTB classifies by; a capped host's class is its cap. Arriving traffic is
classified by tc's u32 filters on ports, which a host count does not see: its
class is named only when the host is capped.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

from shapekit.config.addresses import Network
from shapekit.config.model import Device
from shapekit.config.rules import BYPASS_MINOR
from shapekit.plan.limits import PlacedCap
from shapekit.plan.mangle import MAIN
from shapekit.plan.status import human, table
from shapekit.plan.tree import classid

PREFIX = "SKHOSTS-"  # not "SHAPEKIT-": shape-init would take these chains for stale ones of its own
HOOKS = {"out": "POSTROUTING", "in": "PREROUTING"}
MAX_HOSTS = 65536  # a set's maxelem: hosts counted per bin
# Entries the SET target adds never grow a hash (ipset(8)): sized for MAX_HOSTS from the start (about 3 MB
# when full), where the default 1024 buckets of 12 would silently refuse hosts past about 12,000.
HASH_SIZE = 16384
FAMILY_NAMES = {4: "inet", 6: "inet6"}


@dataclass(frozen=True)
class Bin:
    """Where one tree's packets of one class are counted: set SKHOSTS-P-N-F, N = `number`."""

    number: int
    device: str  # as configured (an ingress tree's real device, not its IFB)
    direction: str  # "out": hosts that received; "in": hosts that sent
    mark: int | None  # the class mark matched; None: the rest of the device's packets
    klass: str | None  # the class those packets land in; None: not known per host (an ingress tree)


@dataclass(frozen=True)
class Counting:
    """A run's counting rules and sets: its process id and its bins."""

    pid: int
    bins: tuple[Bin, ...]

    def chain(self, direction: str = "out") -> str:
        return f"{PREFIX}{self.pid}" + ("-in" if direction == "in" else "")

    def set_name(self, number: int, family: int) -> str:
        return f"{PREFIX}{self.pid}-{number}-{family}"

    def set_names(self, families: Iterable[int]) -> list[str]:
        return [self.set_name(b.number, f) for f in families for b in self.bins]


def plan_bins(trees: list[tuple[Device, dict[str, str]]], bypass_mark: int) -> tuple[Bin, ...]:
    """The bins of these trees (each with its class names by class id, as shape-status names them)."""
    bins: list[Bin] = []
    for tree, names in trees:
        if tree.direction == "in":
            bins.append(Bin(len(bins), tree.configured, "in", None, None))
            continue
        marked = [(bypass_mark, names[classid(BYPASS_MINOR)])]
        marked += [(c.mark, names[classid(c.minor)]) for c in tree.classes if c.mark and c.name != tree.default]
        for mark, name in marked:
            bins.append(Bin(len(bins), tree.configured, "out", mark, name))
        # the default class's own mark and no mark alike: the rest
        bins.append(Bin(len(bins), tree.configured, "out", None, names[classid(tree.default_class.minor)]))
    return tuple(bins)


def plan_sets(counting: Counting, families: Iterable[int]) -> str:
    """`ipset restore` text that creates the run's sets."""
    return "".join(
        f"create {counting.set_name(b.number, f)} hash:ip family {FAMILY_NAMES[f]} counters "
        f"hashsize {HASH_SIZE} maxelem {MAX_HOSTS}\n"
        for f in families
        for b in counting.bins
    )


def shapekit_jump(save: str) -> int | None:
    """The position of shapekit's jump among POSTROUTING's rules (1 is the first), from `iptables-save -t
    mangle`; None: shapekit's rules are not installed."""
    rules = [line for line in save.splitlines() if line.startswith(f"-A {HOOKS['out']} ")]
    return next((n for n, line in enumerate(rules, 1) if line == f"-A {HOOKS['out']} -j {MAIN}"), None)


def plan_rules(counting: Counting, family: int, after: int) -> str:
    """`iptables-restore --noflush` text for the run's chains and the jumps to them, in one transaction.

    The sent traffic's jump goes right `after` shapekit's (its position), where the mark is HTB's and before
    any rule of the admin's could end the chain; the arriving traffic's goes first.
    """
    directions = [d for d in HOOKS if any(b.direction == d for b in counting.bins)]
    lines = ["*mangle"]
    lines += [f":{counting.chain(d)} - [0:0]" for d in directions]
    lines += [f":{counting.chain()}-{b.number} - [0:0]" for b in counting.bins]
    for b in counting.bins:
        which = "-o" if b.direction == "out" else "-i"
        mark = "" if b.mark is None else f" -m mark --mark {b.mark}"
        lines.append(f"-A {counting.chain(b.direction)} {which} {b.device}{mark} -g {counting.chain()}-{b.number}")
    for b in counting.bins:
        name, end = counting.set_name(b.number, family), "dst" if b.direction == "out" else "src"
        lines.append(f"-A {counting.chain()}-{b.number} -m set --match-set {name} {end} -j RETURN")
        lines.append(f"-A {counting.chain()}-{b.number} -j SET --add-set {name} {end}")
        lines.append(f"-A {counting.chain()}-{b.number} {_MISSED.format(name=name, end=end)}")  # no room for it
    position = {"out": after + 1, "in": 1}
    lines += [f"-I {HOOKS[d]} {position[d]} -j {counting.chain(d)}" for d in directions]  # last: all at once
    return "\n".join([*lines, "COMMIT", ""])


# Counts the packets of a host its set had no room for (the SET target fails silently): none, normally.
_MISSED = "-m set ! --match-set {name} {end} ! --update-counters"
_RUN = re.compile(rf"^{PREFIX}(\d+)(?:-|$)")


def run_of(name: str) -> int | None:
    """The process id of the counting run a chain or set is named after; None: not a counting one."""
    match = _RUN.match(name)
    return int(match.group(1)) if match else None


def plan_rules_removal(foreign: Iterable[str], runs: Callable[[int], bool]) -> str | None:
    """`iptables-restore --noflush` text that removes the chains and jumps of the `runs` chosen, from a
    save's lines that are not shapekit's (MangleState.foreign). None: there are none."""
    chains, jumps = [], []
    for line in foreign:
        if line.startswith(":") and _chosen(line[1:].split()[0], runs):
            chains.append(line[1:].split()[0])
        elif _jump(line, runs):
            jumps.append("-D" + line[2:])
    if not chains and not jumps:
        return None
    lines = ["*mangle", *jumps, *[f":{c} - [0:0]" for c in chains], *[f"-X {c}" for c in chains], "COMMIT", ""]
    return "\n".join(lines)


def every_run(_run: int) -> bool:
    return True


def is_counting(line: str) -> bool:
    """Whether a save's line is a counting run's: its chain, a rule in it, or a jump to it."""
    words = line.split()
    if line.startswith(":"):
        return run_of(words[0][1:]) is not None
    return words[:1] == ["-A"] and (run_of(words[1]) is not None or _jump(line, every_run))


def _jump(line: str, runs: Callable[[int], bool]) -> bool:
    """Whether a line is a built-in chain's jump to a chosen run's chain ("-A POSTROUTING -j SKHOSTS-P")."""
    words = line.split()
    return words[:1] == ["-A"] and len(words) == 4 and words[2] == "-j" and _chosen(words[3], runs)


def plan_sets_removal(names: Iterable[str], runs: Callable[[int], bool]) -> str:
    """`ipset restore` text that destroys the sets of the `runs` chosen (after their rules are gone)."""
    return "".join(f"destroy {name}\n" for name in names if _chosen(name, runs))


def _chosen(name: str, runs: Callable[[int], bool]) -> bool:
    run = run_of(name)
    return run is not None and runs(run)


_MEMBER = re.compile(r"^add (\S+) (\S+) packets (\d+) bytes (\d+)$", re.MULTILINE)
_HEADER = re.compile(r"^create (\S+) .*$", re.MULTILINE)


@dataclass(frozen=True)
class Counted:
    """One host's counters in one bin."""

    host: str
    packets: int
    bytes: int


def parse_counters(save: str) -> dict[str, list[Counted]]:
    """Each set's members and counters, from `ipset list -o save` of the sets."""
    counted: dict[str, list[Counted]] = {name: [] for name in _HEADER.findall(save)}
    for name, host, packets, sent in _MEMBER.findall(save):
        counted.setdefault(name, []).append(Counted(host, int(packets), int(sent)))
    return counted


@dataclass
class HostRow:
    """One remote host on one tree: what it received ("out") or sent ("in") over the interval."""

    host: str
    device: str
    direction: str
    throughput: float  # bits/s over the interval
    bytes: int
    packets: int
    klass: str | None  # the class most of its bytes landed in (its cap's, when capped); None: not known
    classes: dict[str, int] = field(default_factory=dict)  # bytes by class (bins whose class is known)
    cap: dict | None = None  # {"rate", "source", "expires", "comment"} when capped on this tree


@dataclass(frozen=True)
class HeldBy:
    """A cap on one tree, as --hosts shows it: the cap, its class's name and id."""

    placed: PlacedCap
    name: str
    classid: str

    @property
    def own(self) -> bool:
        """Whether it caps one host: then its class's counters are that host's."""
        return self.placed.cap.host.prefixlen == self.placed.cap.host.max_prefixlen


class CapIndex:
    """The caps of one tree, to find the one holding a host: its own, else the narrowest network's."""

    def __init__(self, caps: Iterable[HeldBy]) -> None:
        self.own: dict[ipaddress.IPv4Address | ipaddress.IPv6Address, HeldBy] = {}
        self.networks: list[HeldBy] = []
        for held in caps:
            if held.own:
                self.own[held.placed.cap.host.network_address] = held
            else:
                self.networks.append(held)
        self.networks.sort(key=lambda held: -held.placed.cap.host.prefixlen)

    def holding(self, host: str) -> HeldBy | None:
        address = ipaddress.ip_address(host)
        if address in self.own:
            return self.own[address]
        return next((held for held in self.networks if _within(address, held.placed.cap.host)), None)


def _within(address: ipaddress.IPv4Address | ipaddress.IPv6Address, network: Network) -> bool:
    return address.version == network.version and address in network


Sent = dict[str, tuple[int, int]]  # class id → (bytes, packets) it sent over the interval


def host_rows(
    counting: Counting,
    counters: dict[str, list[Counted]],
    caps: dict[tuple[str, str], CapIndex],
    sent: dict[tuple[str, str], Sent],
    seconds: float,
    families: Iterable[int],
) -> list[HostRow]:
    """Every host counted, most bytes first. `caps`: each tree's, by (device, direction); `sent`: what
    each tree's classes sent over the interval.

    A host with a cap of its own gets its class's counters: what left, after the queue. The others'
    are counted as they are classified, before it: a host queued in a full class can send less than
    it was counted over a short interval (or more, as its queue drains).
    """
    rows: dict[tuple[str, str, str], HostRow] = {}
    for b in counting.bins:
        for family in families:
            for c in counters.get(counting.set_name(b.number, family), []):
                key = (b.device, b.direction, c.host)
                row = rows.get(key)
                if row is None:
                    row = rows[key] = HostRow(c.host, b.device, b.direction, 0.0, 0, 0, None)
                row.bytes += c.bytes
                row.packets += c.packets
                if b.klass is not None:
                    row.classes[b.klass] = row.classes.get(b.klass, 0) + c.bytes
    for row in rows.values():
        index = caps.get((row.device, row.direction))
        held = index.holding(row.host) if index else None
        if held is not None:
            tree_sent = sent.get((row.device, row.direction), {})
            if held.own and held.classid in tree_sent:
                row.bytes, row.packets = tree_sent[held.classid]
            row.klass, row.classes = held.name, {held.name: row.bytes}
            cap = held.placed.cap
            host = str(cap.host.network_address) if held.own else str(cap.host)
            row.cap = {"host": host, "rate": cap.rate, "source": cap.source}
            row.cap |= {"expires": cap.expires, "comment": cap.comment}
        elif row.classes:
            row.klass = max(row.classes, key=lambda name: row.classes[name])
        row.throughput = row.bytes * 8 / seconds
    return sorted(rows.values(), key=lambda r: (-r.bytes, r.device, r.direction, r.host))


def missed_packets(counting: Counting, saves_with_counters: Iterable[str]) -> int:
    """Packets of hosts a set had no room for, from `iptables-save -c -t mangle` of each family."""
    chain = re.escape(counting.chain())
    missed = re.compile(rf"^\[(\d+):\d+\] -A {chain}-\d+ -m set ! --match-set \S+ \S+ ! --update-counters$", re.M)
    return sum(int(packets) for save in saves_with_counters for packets in missed.findall(save))


def hosts_document(when: str, seconds: float, rows: list[HostRow], top: int, missed: int) -> dict:
    """A sample of the hosts as --json prints it: the `top` most, how many were counted, and the packets of
    hosts that went uncounted (a set full)."""
    return {
        "time": when,
        "interval_s": seconds,
        "hosts_counted": len(rows),
        "hosts": [asdict(r) for r in rows[:top]],
        "missed_packets": missed,
    }


HEADER = ["HOST", "DEVICE", "DIR", "NOW", "BYTES", "PACKETS", "CLASS", "CAP"]


def render_hosts(document: dict) -> str:
    """A sample of the hosts as a table, most bytes first."""
    shown, counted = len(document["hosts"]), document["hosts_counted"]
    out = [
        f"shapekit top talkers at {document['time']} (over {document['interval_s']:g}s): "
        + (f"{shown} of {counted} hosts" if shown < counted else f"{counted} hosts")
    ]
    cells = [
        [
            r["host"],
            r["device"],
            r["direction"],
            human(r["throughput"], "bit"),
            human(r["bytes"], "B"),
            str(r["packets"]),
            r["klass"] or "-",
            human(r["cap"]["rate"], "bit") if r["cap"] else "-",
        ]
        for r in document["hosts"]
    ]
    out += ["", table(HEADER, cells)]
    if document["missed_packets"]:
        out.append(
            f"{document['missed_packets']} packets went uncounted: their hosts found a set full "
            f"({MAX_HOSTS} hosts a class and family)"
        )
    return "\n".join(out)
