"""Pure functions from config to shapekit's mangle chains, as `iptables-restore --noflush` text.

Seed 000's iptables-save lives here again, in shapekit's own chains instead
of the built-in ones:

    -A POSTROUTING -s IP -p tcp -m multiport --sports 22,80 -j MARK --set-mark 1001   [bypass] ports
    -A POSTROUTING -m mark --mark 1001 -j RETURN                                       SHAPEKIT-DECIDE
    -A POSTROUTING -m connmark --mark 0x0 -j MARK --set-mark 11030                     default = "normal"
    -A POSTROUTING -p tcp --tcp-flags SYN,RST,ACK SYN -j MARK --set-mark 11010          [[mark]] tcp_flags
    -A POSTROUTING -p tcp --sport 61000:63000 -j MARK --set-mark 11090                 [[mark]] sport

The path of a packet leaving any device (mangle POSTROUTING, one jump):

    SHAPEKIT           -j SHAPEKIT-DECIDE, then (classify devices) -j SHAPEKIT-CLASSIFY,
                       then -j SHAPEKIT-LIMIT
    SHAPEKIT-DECIDE    bypass first, every packet, so `shape-bypass add` frees a live flow;
                       then the connection's saved mark; then the [[mark]] rules
    SHAPEKIT-BYPASS    [bypass] ports and hosts, plus run-time entries
    SHAPEKIT-MARK      one rule per [[mark]], in order; each jumps (-g) to a setter, so
                       the first match wins (shape-mark owns it)
    SHAPEKIT-CONN-M    set mark M and save it to the connection (not from an ICMP error or
                       other RELATED packet, which would stamp the connection it reports on)
    SHAPEKIT-PKT-M     set mark M on this packet only (tcp_flags, dscp, length: a SYN is not
                       a connection, nor is a small ACK of a bulk one)

Per-packet rules (dscp, length, a tcp_flags list) must see every packet, also
those of a connection a later rule has marked. When a family has any, the
connection's saved mark moves from DECIDE into MARK, after the last of them:

    SHAPEKIT-MARK      rules 1..P (P: the last per-packet rule), on every packet;
                       then the connection's saved mark → RETURN;
                       then rules P+1..n, on packets of connections with no mark yet

A connection rule among 1..P matches every packet of its connection alike, so
trying it again gives the answer it gave the first time: the first match in
file order wins either way. Without per-packet rules the chains are as above.
src_mac is a connection rule, matched with the bpf match (see src_mac_bytecode).
    SHAPEKIT-CLASSIFY  mark → class per out device, for classifier = "classify"
    SHAPEKIT-LIMIT     per-IP caps: the class from an ipset lookup (shape-limit-ip owns it;
                       last, so a cap holds whatever the rules above chose)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from shapekit.config.model import Config
from shapekit.config.rules import BYPASS_MINOR, TCP_FLAGS, Bypass, MarkRule
from shapekit.plan.limits import LIMIT, limit_chain

HOOK = "POSTROUTING"
MAIN = "SHAPEKIT"
DECIDE = "SHAPEKIT-DECIDE"
BYPASS = "SHAPEKIT-BYPASS"
MARK = "SHAPEKIT-MARK"
CLASSIFY = "SHAPEKIT-CLASSIFY"
CONN_SETTER = "SHAPEKIT-CONN-"
PACKET_SETTER = "SHAPEKIT-PKT-"
# Every command writes the skeleton, so what depends on the bypass mark is always consistent.
SKELETON = (MAIN, DECIDE, BYPASS, CLASSIFY)
OWNED = (MARK, LIMIT)  # shape-mark's and shape-limit-ip's own chains
EVERY = "*"  # as `own`: every chain of shapekit's, as shape-init --all installs them at once
FAMILIES = (4, 6)
TOOLS = {4: ("iptables-save", "iptables-restore"), 6: ("ip6tables-save", "ip6tables-restore")}
MULTIPORT_MAX = 15  # ports in one multiport match; a range counts twice

Chains = dict[str, list[str]]  # chain → its rules, without "-A CHAIN"


@dataclass(frozen=True)
class MangleState:
    """shapekit's part of one family's mangle table, as iptables-save shows it."""

    chains: dict[str, tuple[str, ...]]  # SHAPEKIT* chain → its "-A CHAIN ..." lines
    jumps: tuple[str, ...] = ()  # "-A POSTROUTING -j SHAPEKIT" lines in built-in chains

    @property
    def empty(self) -> bool:
        return not self.chains and not self.jumps


EMPTY = MangleState(chains={})


def is_shapekit_chain(name: str) -> bool:
    return name == MAIN or name.startswith(MAIN + "-")


def parse_mangle_save(text: str) -> MangleState:
    """shapekit's chains and the jumps to them, from `iptables-save -t mangle`."""
    chains: dict[str, list[str]] = {}
    jumps = []
    for line in text.splitlines():
        if line.startswith(":") and is_shapekit_chain(line[1:].split()[0]):
            chains[line[1:].split()[0]] = []
        elif line.startswith("-A "):
            chain = line.split()[1]
            if chain in chains:
                chains[chain].append(line)
            elif _jump_target(line) == MAIN:
                jumps.append(line)
    return MangleState(chains={name: tuple(rules) for name, rules in chains.items()}, jumps=tuple(jumps))


def _jump_target(line: str) -> str | None:
    words = line.split()
    return words[words.index("-j") + 1] if "-j" in words[:-1] else None


# --- what each command installs -------------------------------------------


# A connection's saved mark, restored, ends the decision: in DECIDE, or in MARK after its last per-packet rule.
RESTORE = ["-m connmark ! --mark 0 -j CONNMARK --restore-mark", "-m connmark ! --mark 0 -j RETURN"]


def skeleton_chains(config: Config, bypass: Bypass, family: int) -> Chains:
    """The chains every command writes: the path every packet takes, and the bypass."""
    bypass_mark = bypass.mark
    classify = _classify_rules(config)
    restore = [] if _last_per_packet(_out_rules(config, family)) is not None else RESTORE
    chains: Chains = {
        MAIN: [f"-j {DECIDE}"] + ([f"-j {CLASSIFY}"] if classify else []) + [f"-j {LIMIT}"],
        DECIDE: [f"-j {BYPASS}", f"-m mark --mark {bypass_mark} -j RETURN", *restore, f"-j {MARK}"],
    }
    chains.update(bypass_chains(bypass, family))
    if classify:
        chains[CLASSIFY] = classify
    return chains


def _classify_rules(config: Config) -> list[str]:
    rules = []
    for device in config.devices.values():
        if device.classifier != "classify":
            continue
        targets = [(config.bypass.mark, BYPASS_MINOR)] + [(c.mark, c.minor) for c in device.classes if c.mark]
        for mark, minor in targets:
            rules.append(f"-o {device.name} -m mark --mark {mark} -j CLASSIFY --set-class 5c:{minor:x}")
    return rules


def mark_chains(config: Config, family: int) -> Chains:
    """shape-mark's chains: the [[mark]] rules of this IP family and their setters."""
    rules = _out_rules(config, family)
    marks = [_mark_rule(r, family) for r in rules]
    last = _last_per_packet(rules)
    if last is not None:  # rules up to the last per-packet one see every packet; the rest, unmarked connections'
        marks[last + 1 : last + 1] = RESTORE
    chains: Chains = {MARK: marks}
    for rule in rules:
        name = _setter(rule)
        chains[name] = [f"-j MARK --set-mark {rule.mark}"]
        if not _per_packet_setter(rule):
            chains[name].append("-m conntrack ! --ctstate RELATED -j CONNMARK --save-mark")
    return chains


def _out_rules(config: Config, family: int) -> list[MarkRule]:
    return [r for r in config.marks if family in r.families and r.direction == "out"]


def _last_per_packet(rules: list[MarkRule]) -> int | None:
    """The place of the last rule with a per-packet match (dscp, length, a tcp_flags list), if any."""
    return max((n for n, rule in enumerate(rules) if rule.per_packet), default=None)


def _per_packet_setter(rule: MarkRule) -> bool:
    return rule.tcp_syn or rule.per_packet


def _setter(rule: MarkRule) -> str:
    return f"{PACKET_SETTER if _per_packet_setter(rule) else CONN_SETTER}{rule.mark}"


# Classic BPF, as xt_bpf's --bytecode takes it ("COUNT,code jt jf k,..."): loads at SKF_LL_OFF + n read the
# frame's link-layer header from skb_mac_header, which a forwarded packet keeps from the device it arrived
# on until it leaves. A packet made on this host has none: the load fails and the program matches nothing.
_SKF_LL_OFF = 0x100000000 - 0x200000  # -0x200000 as the unsigned k a BPF load takes
_LD_W, _LD_H, _JEQ, _RET = 0x20, 0x28, 0x15, 0x06
ETHERTYPE = {4: 0x0800, 6: 0x86DD}


def src_mac_bytecode(mac: str, family: int) -> str:
    """An Ethernet header of this family's type whose source address is `mac`: 1 (match), else 0."""
    octets = bytes.fromhex(mac.replace(":", ""))
    program = [
        (_LD_H, 0, 0, _SKF_LL_OFF + 12),  # the EtherType: an Ethernet frame, not some other link header
        (_JEQ, 0, 5, ETHERTYPE[family]),
        (_LD_W, 0, 0, _SKF_LL_OFF + 6),  # the source address's first four bytes
        (_JEQ, 0, 3, int.from_bytes(octets[:4], "big")),
        (_LD_H, 0, 0, _SKF_LL_OFF + 10),  # and its last two
        (_JEQ, 0, 1, int.from_bytes(octets[4:], "big")),
        (_RET, 0, 0, 1),
        (_RET, 0, 0, 0),
    ]
    return ",".join([str(len(program)), *(f"{code} {jt} {jf} {k}" for code, jt, jf, k in program)])


def _mark_rule(rule: MarkRule, family: int) -> str:
    words: list[str] = []
    if rule.device:
        words += ["-o", rule.device]
    if rule.src:
        words += ["-s", str(rule.src)]
    if rule.dst:
        words += ["-d", str(rule.dst)]
    if rule.proto:
        words += ["-p", rule.proto]
    single = [(f"--{k}", v[0]) for k, v in (("sport", rule.sport), ("dport", rule.dport)) if len(v) == 1]
    if single or rule.tcp_syn or rule.tcp_flags:
        words += ["-m", rule.proto or "tcp"]
        for option, port in single:
            words += [option, port]
        if rule.tcp_syn:
            words += ["--tcp-flags", "SYN,RST,ACK", "SYN"]
        if rule.tcp_flags:  # the mask and flags in iptables-save's order, so it reads back the same
            words += ["--tcp-flags", ",".join(TCP_FLAGS).upper(), ",".join(rule.tcp_flags).upper()]
    for key, ports in (("sports", rule.sport), ("dports", rule.dport)):
        if len(ports) > 1:
            words += ["-m", "multiport", f"--{key}", ",".join(ports)]
    if rule.dscp is not None:
        words += ["-m", "dscp", "--dscp", str(rule.dscp)]
    if rule.length is not None:
        low, high = rule.length
        words += ["-m", "length", "--length", str(low) if low == high else f"{low}:{high}"]
    if rule.src_mac:
        words += ["-m", "bpf", "--bytecode", f'"{src_mac_bytecode(rule.src_mac, family)}"']
    if rule.l7proto:
        words += ["-m", "layer7", "--l7proto", rule.l7proto]
    words += ["-m", "comment", "--comment", f'"mark[{rule.number}] {rule.class_name}"']
    return " ".join(words + ["-g", _setter(rule)])


def bypass_chains(bypass: Bypass, family: int) -> Chains:
    """Bypassed ports (either direction) and hosts (to or from) get the bypass mark."""
    set_mark = f"-j MARK --set-mark {bypass.mark}"
    rules = []
    for proto in ("tcp", "udp"):
        ports = [p.port for p in bypass.ports if p.proto == proto]
        rules += [f"-p {proto} -m multiport --ports {','.join(chunk)} {set_mark}" for chunk in _multiport_chunks(ports)]
    for host in bypass.hosts:
        if host.version == family:
            rules += [f"-d {host} {set_mark}", f"-s {host} {set_mark}"]
    return {BYPASS: rules}


def _multiport_chunks(ports: list[str]) -> list[list[str]]:
    chunks: list[list[str]] = []
    weight = MULTIPORT_MAX
    for port in ports:
        cost = 2 if ":" in port else 1
        if weight + cost > MULTIPORT_MAX:
            chunks.append([])
            weight = 0
        chunks[-1].append(port)
        weight += cost
    return chunks


# --- restore text -----------------------------------------------------------


def _mine(own: str | None) -> Callable[[str], bool]:
    """Which existing chains a command manages (and so may delete when unplanned)."""
    if own == EVERY:
        return is_shapekit_chain
    if own == MARK:
        return lambda name: name in SKELETON or name == MARK or name.startswith((CONN_SETTER, PACKET_SETTER))
    return lambda name: name in SKELETON or name == own


def plan_restore(state: MangleState, planned: Chains, own: str | None) -> str:
    """Text for `iptables-restore --noflush` that makes shapekit's chains `planned`.

    `own` (MARK, LIMIT, EVERY, or None for shape-bypass) says whose chains these
    are: the chains of that kind no longer planned are deleted; the other
    command's chain is created empty when missing and otherwise left as it
    is. Declaring a chain flushes it, so each chain's whole content changes
    in one transaction.
    """
    needed = dict(planned)
    for other in OWNED:
        if other not in needed and other not in state.chains:
            needed[other] = []
    stale = [name for name in state.chains if _mine(own)(name) and name not in planned]
    lines = ["*mangle"]
    lines += [f":{name} - [0:0]" for name in [*needed, *stale]]
    for name, rules in needed.items():
        lines += _append(name, rules)
    lines += [f"-X {name}" for name in stale]
    if not state.jumps:
        lines.append(f"-A {HOOK} -j {MAIN}")
    return "\n".join([*lines, "COMMIT", ""])


def _append(chain: str, rules: list[str]) -> list[str]:
    return [f"-A {chain} {rule}" for rule in rules]


def declared_chains(text: str) -> list[str]:
    return [line[1:].split()[0] for line in text.splitlines() if line.startswith(":")]


def plan_undo(before: MangleState, applied: str) -> str:
    """Text that puts shapekit's chains back as they were `before` the restore `applied`."""
    lines = ["*mangle"]
    if not before.jumps:  # first, so that no chain is still jumped to when it goes
        lines.append(f"-D {HOOK} -j {MAIN}")
    names = list(dict.fromkeys([*before.chains, *declared_chains(applied)]))
    lines += [f":{name} - [0:0]" for name in names]
    for name in before.chains:
        lines += before.chains[name]
    lines += [f"-X {name}" for name in names if name not in before.chains]
    return "\n".join([*lines, "COMMIT", ""])


def plan_flush_mangle(state: MangleState) -> str | None:
    """Text that removes shapekit's jumps and chains, and nothing else. None: nothing to remove."""
    if state.empty:
        return None
    lines = ["*mangle"]
    lines += ["-D" + jump[2:] for jump in state.jumps]
    lines += [f":{name} - [0:0]" for name in state.chains]
    lines += [f"-X {name}" for name in state.chains]
    return "\n".join([*lines, "COMMIT", ""])


def mark_plan(config: Config, bypass: Bypass, family: int) -> Chains:
    return {**skeleton_chains(config, bypass, family), **mark_chains(config, family)}


def bypass_plan(config: Config, bypass: Bypass, family: int) -> Chains:
    return skeleton_chains(config, bypass, family)


def limit_plan(config: Config, bypass: Bypass, family: int) -> Chains:
    return {**skeleton_chains(config, bypass, family), **limit_chain(list(config.devices.values()), family)}


def boot_plan(config: Config, bypass: Bypass, family: int) -> Chains:
    """Every chain, as the boot sequence leaves them: shape-init --all restores them at once (own = EVERY)."""
    return {**mark_plan(config, bypass, family), **limit_chain(list(config.devices.values()), family)}
