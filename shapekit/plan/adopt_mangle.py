"""shape-import's reading of a script's mangle rules: `iptables-save -t mangle` → marking decisions.

Pure. A script's MARK rules do not stop at a match, so the last rule that
matches a packet sets its mark; shapekit's rules stop at the first. The rules
are read in the order the kernel runs them (OUTPUT, then POSTROUTING) and
turned around, and the script's `-m mark --mark B -j RETURN` (seed 000's
bypass) makes the rules before it that set B decide before all others.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field, replace

from shapekit.plan.adopt_tc import Selector

FULL_MASK = 0xFFFFFFFF
BUILTIN_CHAINS = ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING")
_PROTOS = {"tcp": "tcp", "6": "tcp", "udp": "udp", "17": "udp", "icmp": "icmp", "1": "icmp"}
_PROTOS6 = {"ipv6-icmp": "icmpv6", "icmpv6": "icmpv6", "58": "icmpv6"}
_SYN = ("SYN,RST,ACK", "SYN")


@dataclass(frozen=True)
class MangleRule:
    """One `-A CHAIN ...` line of iptables-save, in shapekit's terms where it can be."""

    family: int
    chain: str
    text: str
    selector: Selector = Selector()
    either_port: tuple[str, ...] = ()  # multiport --ports: source or destination
    in_dev: str | None = None
    mark_test: int | None = None  # -m mark --mark V
    connmark_zero: bool = False  # -m connmark --mark 0x0
    comment: str = ""
    target: str = ""  # MARK, CONNMARK, CLASSIFY, RETURN, or another target or chain
    value: int | str | None = None  # the mark set, the class, or "save" / "restore" / "set"
    problem: str = ""  # why shapekit cannot express it, when it cannot

    @property
    def matches_only_mark(self) -> bool:
        return (
            self.mark_test is not None
            and self.selector == Selector(device=self.selector.device)
            and not self.either_port
        )


@dataclass(frozen=True)
class Marker:
    """A rule that decides a packet's class: by the mark it sets, or the class it names (CLASSIFY)."""

    rule: MangleRule
    selector: Selector
    mark: int | None = None
    classid: str | None = None
    final: bool = False  # decides before every other (set before a RETURN on its mark)
    unclassified: bool = False  # set after the last CLASSIFY rule for its mark: that rule never sees it


@dataclass(frozen=True)
class Remark:
    """A line for the file: `text` explains; `original` is the script's own line; `left_out`: not expressed."""

    text: str
    original: str = ""
    left_out: bool = False


@dataclass
class Decisions:
    """A family's marking, first match first."""

    family: int
    markers: list[Marker] = field(default_factory=list)
    classify: dict[int, str] = field(default_factory=dict)  # mark → class id (CLASSIFY on a mark alone)
    classified_at: dict[int, int] = field(default_factory=dict)  # mark → how many markers came before its CLASSIFY
    remarks: list[Remark] = field(default_factory=list)
    connmarks_set: bool = False


def parse_mangle(text: str, family: int) -> list[MangleRule]:
    """The rules of the mangle table in iptables-save output (a comment holding a newline spans two lines)."""
    lines: list[str] = []
    table = ""
    for line in text.splitlines():
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith("-A ") and table == "mangle":
            lines.append(line)
        elif lines and table == "mangle" and not line.startswith((":", "#", "COMMIT")):
            lines[-1] += "\n" + line
    return [parse_rule(line, family) for line in lines]


def parse_rule(line: str, family: int) -> MangleRule:
    try:
        words = shlex.split(line)
    except ValueError as exc:  # an unbalanced quote iptables-save let through
        return MangleRule(
            family=family, chain=line.split()[1], text=line, problem=f"a rule shape-import cannot read ({exc})"
        )
    rule = MangleRule(family=family, chain=words[1], text=line)
    fields: dict[str, object] = {}
    selector: dict[str, object] = {}
    problem = ""
    i = 2
    while i < len(words):
        word = words[i]
        nxt = words[i + 1] if i + 1 < len(words) else ""
        if word == "!":
            problem = problem or f"a negated match (`! {nxt}`)"
            i += 1
            continue
        if word in ("-s", "--source", "-d", "--destination"):
            selector["src" if word in ("-s", "--source") else "dst"] = _host(nxt)
        elif word in ("-p", "--protocol"):
            proto = (_PROTOS if family == 4 else {**_PROTOS, **_PROTOS6}).get(nxt)
            if proto is None and nxt != "all":
                problem = problem or f"-p {nxt}: shapekit's rules take tcp, udp, icmp and icmpv6"
            elif proto:
                selector["proto"] = proto
        elif word in ("-o", "--out-interface"):
            selector["device"] = nxt
        elif word in ("-i", "--in-interface"):
            fields["in_dev"] = nxt
        elif word == "-m":
            if nxt not in ("tcp", "udp", "multiport", "mark", "connmark", "comment", "layer7", "icmp", "icmp6"):
                problem = problem or f"-m {nxt}: shapekit has no such match"
        elif word in ("--sport", "--source-port", "--dport", "--destination-port"):
            selector["sport" if word in ("--sport", "--source-port") else "dport"] = (nxt,)
        elif word in ("--sports", "--source-ports", "--dports", "--destination-ports"):
            selector["sport" if word[2] == "s" else "dport"] = tuple(nxt.split(","))
        elif word == "--ports":
            fields["either_port"] = tuple(nxt.split(","))
        elif word == "--tcp-flags":
            if (nxt, words[i + 2] if i + 2 < len(words) else "") == _SYN:
                selector["tcp_syn"] = True
            else:
                problem = problem or f"--tcp-flags {nxt} {words[i + 2]}: shapekit matches SYN only"
            i += 1
        elif word == "--syn":
            selector["tcp_syn"] = True
            i -= 1
        elif word == "--l7proto":
            selector["l7proto"] = nxt
        elif word == "--comment":
            fields["comment"] = nxt
        elif word == "--mark" and words[i - 2 : i] in (["-m", "mark"],):
            value, mask = _value_mask(nxt)
            if mask == FULL_MASK:
                fields["mark_test"] = value
            else:
                problem = problem or f"-m mark --mark {nxt}: a masked mark test"
        elif word == "--mark" and words[i - 2 : i] == ["-m", "connmark"]:
            if _value_mask(nxt) == (0, FULL_MASK):
                fields["connmark_zero"] = True
            else:
                problem = problem or f"-m connmark --mark {nxt}: a test of the connection's mark"
        elif word in ("-j", "-g"):
            target_fields, target_problem = _target(word, words[i + 1 :])
            fields.update(target_fields)
            problem = problem or target_problem
            break
        else:
            problem = problem or f"{word}: an option shapekit cannot express"
            i -= 1
        i += 2
    return replace(rule, selector=Selector(**selector), problem=problem, **fields)  # type: ignore[arg-type]


def _host(text: str) -> str:
    for full in ("/32", "/128"):
        if text.endswith(full):
            return text[: -len(full)]
    return text


def _value_mask(text: str) -> tuple[int, int]:
    value, _, mask = text.partition("/")
    return int(value, 0), int(mask, 0) if mask else FULL_MASK


def _target(jump: str, words: list[str]) -> tuple[dict[str, object], str]:
    target = words[0] if words else ""
    options = dict(zip(words[1::2], words[2::2], strict=False))
    flags = set(words[1:])
    if jump == "-g" or target not in ("MARK", "CONNMARK", "CLASSIFY", "RETURN"):
        return {"target": target}, ""
    if target == "RETURN":
        return {"target": target}, ""
    if target == "CLASSIFY":
        major, _, minor = options.get("--set-class", "").partition(":")
        return {"target": target, "value": f"{int(major, 16):x}:{int(minor, 16):x}"}, ""
    if target == "MARK":
        for option in ("--set-mark", "--set-xmark"):
            if option in options:
                value, mask = _value_mask(options[option])
                if mask == FULL_MASK:
                    return {"target": target, "value": value}, ""
        return {"target": target}, f"MARK {' '.join(words[1:])}: shapekit sets the whole mark"
    masks = [options[o] for o in ("--nfmask", "--ctmask", "--mask") if o in options]
    if any(int(m, 0) != FULL_MASK for m in masks):
        return {"target": target}, f"CONNMARK {' '.join(words[1:])}: a masked connection mark"
    if "--save-mark" in flags:
        return {"target": target, "value": "save"}, ""
    if "--restore-mark" in flags:
        return {"target": target, "value": "restore"}, ""
    for option in ("--set-mark", "--set-xmark"):
        if option in options and _value_mask(options[option])[1] == FULL_MASK:
            return {"target": target, "value": _value_mask(options[option])[0]}, ""
    return {"target": target}, f"CONNMARK {' '.join(words[1:])}: shapekit sets the whole mark"


def decide(rules: list[MangleRule]) -> Decisions:
    """The rules of one family as first-match markers, with remarks on what was read and what could not be."""
    family = rules[0].family if rules else 4
    decisions = Decisions(family=family)
    decisions.connmarks_set = any(r.target == "CONNMARK" and r.value != "restore" for r in rules)
    chains = {r.chain for r in rules}
    user_chains = sorted(c for c in chains if c not in BUILTIN_CHAINS)
    for chain in user_chains:
        own = chain.startswith("SHAPEKIT")
        decisions.remarks.append(
            Remark(
                f"IPv{family}: chain {chain}"
                + (" is shapekit's own: not imported" if own else ": rules in chains of your own are not read"),
                original="" if own else "\n".join(r.text for r in rules if r.chain == chain),
                left_out=not own,
            )
        )
    connection = _connection_markers(rules, decisions)
    egress = [r for r in rules if r.chain in ("OUTPUT", "POSTROUTING")]
    restored = any(r.target == "CONNMARK" and r.value == "restore" and r.selector.is_everything for r in egress)
    if connection and restored:
        decisions.remarks.append(
            Remark(
                "INPUT's CONNMARK rules mark the connections a host's packets arrive on, and POSTROUTING restores that mark on "
                "what is sent back: read as what is sent to that host, on any connection"
            )
        )
    elif connection:
        decisions.remarks += [
            Remark("sets a connection mark nothing restores", m.rule.text, left_out=True) for m in connection
        ]
    markers: list[Marker] = []
    returns: list[tuple[int, int]] = []
    for rule in egress:
        if not _egress_rule(rule, markers, returns, connection, decisions) and rule.target not in user_chains:
            why = f"-j {rule.target or '(none)'}: not a mark or a class; shapekit leaves it to your firewall script"
            decisions.remarks.append(Remark(why, rule.text, left_out=True))
    _arriving(rules, egress, decisions)
    markers = [
        replace(m, unclassified=True)
        if m.mark in decisions.classified_at and i >= decisions.classified_at[m.mark]
        else m
        for i, m in enumerate(markers)
    ]
    decisions.markers = _first_match(markers, returns, decisions)
    return decisions


def _connection_markers(rules: list[MangleRule], decisions: Decisions) -> list[Marker]:
    """INPUT's `-s HOST -j CONNMARK --set-mark M` (seed 002): the connection's later packets to HOST carry M once restored."""
    markers = []
    for rule in rules:
        if rule.chain != "INPUT" or rule.target in ("", "RETURN"):
            continue
        host = rule.selector.only_host if rule.selector.src else None
        if rule.target == "CONNMARK" and isinstance(rule.value, int) and host and not rule.problem:
            selector = Selector(dst=host, device=rule.in_dev)
            markers.append(Marker(rule=rule, selector=selector, mark=rule.value))
        else:
            decisions.remarks.append(
                Remark("marks what this machine receives; shaping is on what it sends", rule.text, left_out=True)
            )
    return markers


def _egress_rule(
    rule: MangleRule,
    markers: list[Marker],
    returns: list[tuple[int, int]],
    connection: list[Marker],
    decisions: Decisions,
) -> bool:
    """Take one OUTPUT/POSTROUTING rule into the markers (or a remark); False when it is not a marking rule."""
    if rule.problem:
        decisions.remarks.append(Remark(rule.problem, rule.text, left_out=True))
        return True
    if rule.target == "CLASSIFY" and rule.matches_only_mark:
        assert rule.mark_test is not None and isinstance(rule.value, str)
        decisions.classify[rule.mark_test] = rule.value
        decisions.classified_at[rule.mark_test] = len(markers)
        return True
    if rule.target == "RETURN" and rule.matches_only_mark:
        assert rule.mark_test is not None
        returns.append((len(markers), rule.mark_test))
        return True
    if rule.mark_test is not None:
        decisions.remarks.append(Remark("a rule that tests the mark an earlier rule set", rule.text, left_out=True))
        return True
    if rule.target == "MARK" and isinstance(rule.value, int):
        markers.extend(_split_ports(Marker(rule=rule, selector=rule.selector, mark=rule.value)))
        return True
    if rule.target == "CLASSIFY" and isinstance(rule.value, str):
        markers.extend(_split_ports(Marker(rule=rule, selector=rule.selector, classid=rule.value)))
        return True
    if rule.target == "CONNMARK" and rule.value == "restore" and rule.selector.is_everything:
        markers.extend(connection)
        if not connection:
            decisions.remarks.append(
                Remark("restores the connection's mark: shapekit saves and restores it too", rule.text)
            )
        return True
    if rule.target == "CONNMARK" and rule.value == "save" and rule.selector.is_everything:
        decisions.remarks.append(Remark("saves the mark to the connection: shapekit does too", rule.text))
        return True
    if rule.target in ("MARK", "CONNMARK", "CLASSIFY", "RETURN"):
        decisions.remarks.append(Remark(f"a {rule.target} rule shapekit has no key for", rule.text, left_out=True))
        return True
    return False


def _split_ports(marker: Marker) -> list[Marker]:
    """multiport --ports (source or destination) as two rules, one for each."""
    ports = marker.rule.either_port
    if not ports:
        return [marker]
    return [
        replace(marker, selector=replace(marker.selector, sport=ports)),
        replace(marker, selector=replace(marker.selector, dport=ports)),
    ]


def _arriving(rules: list[MangleRule], egress: list[MangleRule], decisions: Decisions) -> None:
    """PREROUTING and FORWARD: a rule the egress chains repeat is covered; any other is left out."""
    sent = {r.text.split(" ", 2)[2] for r in egress}
    for rule in rules:
        if rule.chain not in ("PREROUTING", "FORWARD") or not rule.target:
            continue
        if rule.text.split(" ", 2)[2] in sent:
            decisions.remarks.append(
                Remark(f"{rule.chain} repeats a POSTROUTING rule, which decides what is sent", rule.text)
            )
        else:
            decisions.remarks.append(
                Remark(
                    f"{rule.chain} marks packets as they arrive; shapekit marks what is sent, in POSTROUTING",
                    rule.text,
                    left_out=True,
                )
            )


def _first_match(markers: list[Marker], returns: list[tuple[int, int]], decisions: Decisions) -> list[Marker]:
    """The script's last-match-wins markers in first-match order, the ones a RETURN makes final first."""
    final: list[Marker] = []
    finals: set[int] = set()
    for position, mark in returns:
        for index, marker in enumerate(markers[:position]):
            if marker.mark == mark and index not in finals:
                finals.add(index)
                final.append(replace(marker, final=True))
                overriding = [m for m in markers[index + 1 : position] if m.mark != mark]
                if overriding:
                    decisions.remarks.append(
                        Remark(
                            f"marks a packet after a rule that set {mark} and before the RETURN on it: shapekit's bypass decides first",
                            overriding[0].rule.text,
                            left_out=True,
                        )
                    )
    rest = [m for i, m in enumerate(markers) if i not in finals]
    if any(r.connmark_zero for r in (m.rule for m in rest)):
        note = "the test `-m connmark --mark 0x0` is read as true"
        note += "" if decisions.connmarks_set else ": nothing in the script sets a connection mark"
        note += "; shapekit's rules decide a connection's first packets, and its saved mark the rest"
        decisions.remarks.append(Remark(note))
    return final + rest[::-1]
