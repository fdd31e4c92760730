"""The `[bypass]` table and the `[[mark]]` rules: TOML → validated, typed rules."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shapekit.config.addresses import Network, PortProto, ValueProblem, parse_host, parse_port_proto, parse_ports
from shapekit.config.units import PercentError, UnitError, format_rate, parse_rate
from shapekit.errors import ConfigError

if TYPE_CHECKING:
    from shapekit.config.model import Device

DEFAULT_BYPASS_MARK = 1001
BYPASS_MINOR = 0x2  # the unshaped class 5c:2, beside the top class
CAP_MINORS = range(0x8000, 0xFFFF)  # arriving traffic: one class 5c:MINOR per capped host (ffff: is ingress's)
# Sent traffic: caps live in groups of GROUP_SIZE (shapekit.plan.limits), and a packet's mark carries
# its group in the top byte; the marks a config sets stay below it.
GROUP_SIZE = 512
GROUP_COUNT = 255  # groups 1..255: the top byte of the mark, 0 meaning none
CAP_SLOTS = range(GROUP_COUNT * GROUP_SIZE)  # a cap's place among the groups: 130,560 per device
MAX_MARK = 0xFFFFFF
MARK_BITS_WHY = " (the top byte of the mark is per-IP caps' group)"

_BYPASS_KEYS = {"mark", "ports", "hosts"}
_MARK_KEYS = {
    "class", "proto", "sport", "dport", "src", "dst", "src_mac", "tcp_flags", "dscp", "length", "l7proto", "device",
    "direction",
}  # fmt: skip
_CAP_KEYS = {"rate", "direction"}
DIRECTIONS = ("out", "in")
# proto key → (iptables -p value, the only family it exists in)
_PROTOS: dict[str, tuple[str | None, int | None]] = {
    "tcp": ("tcp", None),
    "udp": ("udp", None),
    "icmp": ("icmp", 4),
    "icmpv6": ("ipv6-icmp", 6),
    "all": (None, None),
}
_L7PROTO = re.compile(r"^[a-z0-9_-]{1,32}$")
# The standard DSCP names (RFC 2474, 2597, 3246, 5865): class selectors, assured forwarding, expedited.
DSCP_NAMES = {
    **{f"CS{n}": 8 * n for n in range(8)},
    **{f"AF{c}{d}": 8 * c + 2 * d for c in range(1, 5) for d in range(1, 4)},
    "EF": 46,
    "VA": 44,
}
TCP_FLAGS = ("fin", "syn", "rst", "ack")  # the flags a tcp_flags list speaks of, in iptables-save's order
IPV6_HEADER = 40  # bytes: the least an IPv6 packet's length can be
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


@dataclass(frozen=True)
class Bypass:
    """Traffic that skips shaping: marked `mark` and sent to the unshaped class."""

    mark: int = DEFAULT_BYPASS_MARK
    ports: tuple[PortProto, ...] = ()
    hosts: tuple[Network, ...] = ()

    def with_entries(self, ports: tuple[PortProto, ...], hosts: tuple[Network, ...]) -> Bypass:
        """These rules plus run-time entries, without repeats, config first."""
        return Bypass(
            mark=self.mark,
            ports=tuple(dict.fromkeys(self.ports + ports)),
            hosts=tuple(dict.fromkeys(self.hosts + hosts)),
        )


@dataclass(frozen=True)
class MarkRule:
    """One `[[mark]]` rule; `number` is its place in the file, from 1."""

    number: int
    class_name: str
    mark: int
    proto: str | None = None  # iptables' -p value; None matches every protocol
    sport: tuple[str, ...] = ()
    dport: tuple[str, ...] = ()
    src: Network | None = None
    dst: Network | None = None
    tcp_syn: bool = False  # tcp_flags = "syn": a per-packet match, not saved to the connection
    tcp_flags: tuple[str, ...] = ()  # a tcp_flags list: exactly these set among TCP_FLAGS, in that order
    dscp: int | None = None
    length: tuple[int, int] | None = None  # the IP packet's length, LOW..HIGH inclusive
    src_mac: str | None = None  # lower case; the Ethernet source of a forwarded packet as it arrived
    l7proto: str | None = None
    device: str | None = None
    families: tuple[int, ...] = (4, 6)
    direction: str = "out"  # "in": a tc u32 filter on the device's ingress tree (mark unused)

    @property
    def per_packet(self) -> bool:
        """Matches that can differ between packets of one connection: tried on every packet."""
        return bool(self.tcp_flags) or self.dscp is not None or self.length is not None


def parse_bypass(path: Path, raw: Any) -> Bypass:
    if raw is None:
        return Bypass()
    if not isinstance(raw, dict):
        raise ConfigError(path, "bypass", f"must be a table, not {raw!r}")
    for key in raw:
        if key not in _BYPASS_KEYS:
            raise ConfigError(path, f"bypass.{key}", f"unknown key (known: {', '.join(sorted(_BYPASS_KEYS))})")
    mark = raw.get("mark", DEFAULT_BYPASS_MARK)
    if isinstance(mark, bool) or not isinstance(mark, int) or not 1 <= mark <= MAX_MARK:
        raise ConfigError(path, "bypass.mark", f"{mark!r} is not a mark: use an integer 1..{MAX_MARK}{MARK_BITS_WHY}")
    return Bypass(
        mark=mark,
        ports=tuple(_each(path, "bypass.ports", raw.get("ports", []), parse_port_proto)),
        hosts=tuple(_each(path, "bypass.hosts", raw.get("hosts", []), parse_bypass_host)),
    )


def parse_bypass_host(text: object) -> Network:
    host = parse_host(text)
    if host.prefixlen == 0:
        raise ValueProblem(f"{host} would bypass every host, so nothing would be shaped: name the hosts")
    return host


def _each(path: Path, key: str, values: Any, parse: Any) -> list[Any]:
    if not isinstance(values, list):
        raise ConfigError(path, key, f"must be a list, not {values!r}")
    parsed = []
    for value in values:
        try:
            parsed.append(parse(value))
        except ValueProblem as exc:
            raise ConfigError(path, key, str(exc)) from None
    return parsed


def parse_marks(path: Path, raw: Any, devices: dict[str, Device]) -> tuple[MarkRule, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list) or not all(isinstance(r, dict) for r in raw):
        raise ConfigError(path, "mark", "must be an array of tables: write each rule as [[mark]]")
    return tuple(_parse_mark(path, number, table, devices) for number, table in enumerate(raw, 1))


def _parse_mark(path: Path, number: int, table: dict[str, Any], devices: dict[str, Device]) -> MarkRule:
    key = f"mark[{number}]"
    for name in table:
        if name not in _MARK_KEYS:
            raise ConfigError(path, f"{key}.{name}", f"unknown key (known: {', '.join(sorted(_MARK_KEYS))})")
    for name in ("class", "device", "proto", "src", "dst", "src_mac"):
        if name in table and not isinstance(table[name], str):
            raise ConfigError(path, f"{key}.{name}", f"must be a string, not {table[name]!r}")
    device = table.get("device")
    if device is not None and device not in devices:
        raise ConfigError(path, f"{key}.device", f"{device!r} is not a configured device ({', '.join(devices)})")
    if "class" not in table:
        raise ConfigError(path, f"{key}.class", "missing: the class this rule's traffic goes to")
    direction = table.get("direction", "out")
    if direction not in DIRECTIONS:
        raise ConfigError(
            path, f"{key}.direction", f'{direction!r} is not "out" (sent, the default) or "in" (arriving)'
        )
    targets = [devices[device]] if device else list(devices.values())
    if direction == "in":
        _check_ingress_rule(path, key, table, targets)
        mark = 0
    else:
        mark = _class_mark(path, key, table["class"], targets)

    proto_key = table.get("proto", "all")
    if proto_key not in _PROTOS:
        raise ConfigError(path, f"{key}.proto", f"{proto_key!r} is not one of {', '.join(_PROTOS)}")
    proto, proto_family = _PROTOS[proto_key]
    ports = {}
    for name in ("sport", "dport"):
        if name in table:
            if proto not in ("tcp", "udp"):
                raise ConfigError(path, f"{key}.{name}", f'ports need proto = "tcp" or "udp", not {proto_key!r}')
            try:
                ports[name] = parse_ports(table[name])
            except ValueProblem as exc:
                raise ConfigError(path, f"{key}.{name}", str(exc)) from None
    tcp_syn, tcp_flags = False, ()
    if "tcp_flags" in table:
        tcp_syn, tcp_flags = _tcp_flags(path, f"{key}.tcp_flags", table["tcp_flags"])
        if proto != "tcp":
            raise ConfigError(path, f"{key}.tcp_flags", f'needs proto = "tcp", not {proto_key!r}')
    dscp = _dscp(path, f"{key}.dscp", table["dscp"]) if "dscp" in table else None
    length = _length(path, f"{key}.length", table["length"]) if "length" in table else None
    src_mac = _src_mac(path, f"{key}.src_mac", table["src_mac"]) if "src_mac" in table else None
    l7proto = table.get("l7proto")
    if l7proto is not None and (not isinstance(l7proto, str) or not _L7PROTO.match(l7proto)):
        raise ConfigError(path, f"{key}.l7proto", f"{l7proto!r} is not a layer7 protocol name (e.g. 'bittorrent')")

    hosts = {name: _host(path, f"{key}.{name}", table.get(name)) for name in ("src", "dst")}
    families = {h.version for h in hosts.values() if h is not None}
    if len(families) > 1:
        raise ConfigError(path, key, "src and dst are of different IP versions: split the rule")
    if proto_family is not None:
        if families and proto_family not in families:
            other = "IPv6" if proto_family == 4 else "IPv4"
            fix = "icmpv6" if proto_family == 4 else "icmp"
            raise ConfigError(
                path, f"{key}.proto", f'{proto_key!r} with an {other} host never matches: use proto = "{fix}"'
            )
        families = {proto_family}
    families = _length_families(path, f"{key}.length", length, families or {4, 6})
    return MarkRule(
        number=number,
        class_name=table["class"],
        mark=mark,
        proto=proto,
        sport=ports.get("sport", ()),
        dport=ports.get("dport", ()),
        src=hosts["src"],
        dst=hosts["dst"],
        tcp_syn=tcp_syn,
        tcp_flags=tcp_flags,
        dscp=dscp,
        length=length,
        src_mac=src_mac,
        l7proto=l7proto,
        device=device,
        families=tuple(sorted(families)),
        direction=direction,
    )


def _tcp_flags(path: Path, key: str, value: Any) -> tuple[bool, tuple[str, ...]]:
    """(the old "syn" form, the flags of a list): a list names exactly the flags set among FIN, SYN, RST, ACK."""
    if value == "syn":
        return True, ()
    names = ", ".join(f'"{f}"' for f in TCP_FLAGS)
    if not isinstance(value, list) or not value or not all(isinstance(f, str) for f in value):
        raise ConfigError(
            path, key, f'{value!r} is not "syn" or a non-empty list of flag names ({names}), e.g. ["ack"]'
        )
    flags = [f.lower() for f in value]
    unknown = [f for f in value if f.lower() not in TCP_FLAGS]
    if unknown:
        raise ConfigError(path, key, f"{unknown[0]!r} is not a flag this match knows: use {names}")
    if len(set(flags)) < len(flags):
        raise ConfigError(path, key, f"{value!r} names a flag twice: name each once")
    return False, tuple(f for f in TCP_FLAGS if f in flags)


def _dscp(path: Path, key: str, value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 63:
        return value
    if isinstance(value, str) and value.upper() in DSCP_NAMES:
        return DSCP_NAMES[value.upper()]
    raise ConfigError(path, key, f"{value!r} is not a DSCP: use 0..63 or a name (EF, AF11..AF43, CS0..CS7, VA)")


def _length(path: Path, key: str, value: Any) -> tuple[int, int]:
    """`64` or `"0:128"`: the IP packet's length in bytes, a range inclusive."""
    fix = 'use a number or "LOW:HIGH" in 0..65535, e.g. "0:128"'
    if isinstance(value, int) and not isinstance(value, bool):
        low = high = value
    elif isinstance(value, str) and re.fullmatch(r"\d{1,5}:\d{1,5}", value):
        low, high = (int(n) for n in value.split(":"))
    else:
        raise ConfigError(path, key, f"{value!r} is not a length: {fix}")
    if not 0 <= low <= 65535 or not 0 <= high <= 65535:
        raise ConfigError(path, key, f"{value!r} is out of range: {fix}")
    if low > high:
        raise ConfigError(path, key, f"{value!r} runs backwards: write the lower bound first ({high}:{low})")
    return low, high


def _src_mac(path: Path, key: str, value: str) -> str:
    mac = value.lower()
    if not _MAC.match(mac):
        raise ConfigError(path, key, f"{value!r} is not a MAC address: write six hex pairs, e.g. 02:00:00:00:00:01")
    if int(mac[:2], 16) & 1:
        raise ConfigError(path, key, f"{value!r} is a multicast address, which no frame is sent from: name a host's")
    return mac


def _length_families(path: Path, key: str, length: tuple[int, int] | None, families: set[int]) -> set[int]:
    """An IPv6 packet is at least its 40-byte header: a length wholly below that leaves the rule IPv4 only."""
    if length is None or length[1] >= IPV6_HEADER:
        return families
    if families == {6}:
        raise ConfigError(path, key, f"an IPv6 packet is at least {IPV6_HEADER} bytes, so this never matches: raise it")
    return families - {6}


def _check_ingress_rule(path: Path, key: str, table: dict[str, Any], devices: list[Device]) -> None:
    """A direction = "in" rule names a leaf class of an ingress tree and only what tc u32 can match."""
    if "l7proto" in table:
        raise ConfigError(
            path,
            f"{key}.l7proto",
            'the layer7 match is netfilter\'s, which arriving packets meet only after shaping: use ports and hosts, or direction = "out"',
        )
    if "src_mac" in table:
        raise ConfigError(
            path,
            f"{key}.src_mac",
            "arriving packets are classed on the IFB from their network header, where no MAC is (and theirs is the "
            'previous hop\'s): match src, or put the rule on the device that forwards them, direction = "out"',
        )
    trees = [d.ingress for d in devices if d.ingress is not None]
    if not trees:
        where = " or ".join(f"[device.{d.name}]" for d in devices)
        raise ConfigError(path, f"{key}.direction", f"no ingress to shape: add a [device.X.ingress] table to {where}")
    having = [c for tree in trees for c in tree.classes if c.name == table["class"]]
    if not having:
        where = " or ".join(f"[{t.key}]" for t in trees)
        raise ConfigError(path, f"{key}.class", f"{table['class']!r} is not a class of {where}")
    if not all(c.is_leaf for c in having):
        raise ConfigError(path, f"{key}.class", f"{table['class']!r} has child classes: name a leaf class")


def _host(path: Path, key: str, value: Any) -> Network | None:
    if value is None:
        return None
    try:
        return parse_host(value)
    except ValueProblem as exc:
        raise ConfigError(path, key, str(exc)) from None


def _class_mark(path: Path, key: str, name: Any, devices: list[Device]) -> int:
    """The one mark that sends traffic to class `name` on these devices."""
    having = [(d, c) for d in devices for c in d.classes if c.name == name]
    where = " or ".join(f"[device.{d.name}]" for d in devices)
    if not having:
        raise ConfigError(path, f"{key}.class", f"{name!r} is not a class of {where}")
    inner = [d.name for d, c in having if not c.is_leaf]
    if inner:
        raise ConfigError(path, f"{key}.class", f"{name!r} has child classes on {inner[0]}: name a leaf class")
    marks = {c.mark for _, c in having}
    if len(marks) > 1:
        raise ConfigError(
            path,
            f"{key}.class",
            f"{name!r} has a different mark on each device: give it the same mark = N everywhere, or add device = to the rule",
        )
    mark = marks.pop()
    assert mark is not None, "leaf classes always have a mark"
    return mark


def check_bypass_mark(path: Path, bypass: Bypass, devices: dict[str, Device]) -> None:
    """The bypass mark must not be any class's mark: it would shape what should skip shaping."""
    for device in devices.values():
        for cls in device.classes:
            if cls.mark == bypass.mark:
                raise ConfigError(
                    path,
                    f"device.{device.name}.classes.{cls.name}.mark",
                    f"mark {bypass.mark} is the bypass mark: pick another (or set [bypass] mark = ...)",
                )


@dataclass(frozen=True, slots=True)  # slots: 100,000 caps are 11 MB smaller
class Cap:
    """A per-IP cap: traffic sent to `host` through `dev` (or, "in", arriving from it) at most `rate`."""

    host: Network
    rate: int  # bits/s
    dev: str
    source: str = "config"  # or "run-time"
    expires: float | None = None  # epoch seconds; run-time caps added with --for
    comment: str = ""
    slot: int | None = None  # run-time caps keep their place: a CAP_SLOTS index, or (direction "in") a class minor
    direction: str = "out"  # "in": traffic from `host`, shaped on the device's ingress tree

    @property
    def key(self) -> tuple[str, str, Network]:
        return (self.dev, self.direction, self.host)


IPSET_MAX_TIMEOUT = 2147483  # seconds: the most an ipset entry's timeout takes (about 24.8 days)
CAP_NOT_A_SHARE = "a cap holds a host to a rate of its own, not a share of a class, so write one, e.g. '2mbit'"


def check_cap(host: Network, rate: int, line_rate: int) -> str | None:
    """Why this cap is refused, or None. (Own addresses are checked where they can be read.)"""
    if host.prefixlen == 0:
        return f"{host} would cap every host, which a per-IP cap cannot (ipset takes /1 and longer): lower the device's rate instead"
    if rate > line_rate:
        return f"{format_rate(rate)} is above the device's line rate {format_rate(line_rate)}"
    return None


def parse_limits(path: Path, key: str, raw: Any, dev: str, line_rate: int, ingress_rate: int | None) -> tuple[Cap, ...]:
    """`"HOST" = "RATE"` (traffic to HOST), or `"HOST" = { rate = "RATE", direction = "in" | "out" | "both" }`."""
    if not isinstance(raw, dict):
        raise ConfigError(path, key, 'must be a table of "HOST" = "RATE"')
    caps: dict[tuple[str, Network], Cap] = {}
    for text, value in raw.items():
        where = f'{key}."{text}"'
        rate_text, directions = _cap_value(path, where, value)
        try:
            host = parse_host(text)
            rate = parse_rate(rate_text)
        except PercentError as exc:
            raise ConfigError(path, where, f"{exc}: {CAP_NOT_A_SHARE}") from None
        except (ValueProblem, UnitError) as exc:
            raise ConfigError(path, where, str(exc)) from None
        for direction in directions:
            if direction == "in" and ingress_rate is None:
                raise ConfigError(path, where, f"direction {direction!r} needs a [device.{dev}.ingress] table")
            problem = check_cap(host, rate, line_rate if direction == "out" else ingress_rate or 0)
            if problem:
                raise ConfigError(path, where, problem)
            cap = Cap(host=host, rate=rate, dev=dev, direction=direction)
            if caps.setdefault((direction, host), cap) is not cap:  # one hash of the host, not two
                raise ConfigError(path, where, f"{host} is capped twice on {dev}")
    for direction in DIRECTIONS:
        most = len(CAP_SLOTS if direction == "out" else CAP_MINORS)
        if sum(d == direction for d, _ in caps) > most:
            where = "sent to hosts" if direction == "out" else "arriving from hosts"
            raise ConfigError(path, key, f"{len(caps)} caps: a device takes at most {most} on traffic {where}")
    return tuple(caps.values())


def _cap_value(path: Path, where: str, value: Any) -> tuple[Any, tuple[str, ...]]:
    if not isinstance(value, dict):
        return value, ("out",)
    for name in value:
        if name not in _CAP_KEYS:
            raise ConfigError(path, f"{where}.{name}", f"unknown key (known: {', '.join(sorted(_CAP_KEYS))})")
    if "rate" not in value:
        raise ConfigError(path, f"{where}.rate", 'missing: the cap, e.g. rate = "1mbit"')
    direction = value.get("direction", "out")
    if direction not in (*DIRECTIONS, "both"):
        raise ConfigError(
            path, f"{where}.direction", f'{direction!r} is not "out" (to the host), "in" (from it) or "both"'
        )
    return value["rate"], DIRECTIONS if direction == "both" else (direction,)
