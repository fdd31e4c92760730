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
CAP_MINORS = range(0x8000, 0xFFFF)  # one class per capped host (leaf handle ffff: is ingress's)

_BYPASS_KEYS = {"mark", "ports", "hosts"}
_MARK_KEYS = {"class", "proto", "sport", "dport", "src", "dst", "tcp_flags", "l7proto", "device", "direction"}
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
    tcp_syn: bool = False  # a per-packet match: not saved to the connection
    l7proto: str | None = None
    device: str | None = None
    families: tuple[int, ...] = (4, 6)
    direction: str = "out"  # "in": a tc u32 filter on the device's ingress tree (mark unused)


def parse_bypass(path: Path, raw: Any) -> Bypass:
    if raw is None:
        return Bypass()
    if not isinstance(raw, dict):
        raise ConfigError(path, "bypass", f"must be a table, not {raw!r}")
    for key in raw:
        if key not in _BYPASS_KEYS:
            raise ConfigError(path, f"bypass.{key}", f"unknown key (known: {', '.join(sorted(_BYPASS_KEYS))})")
    mark = raw.get("mark", DEFAULT_BYPASS_MARK)
    if isinstance(mark, bool) or not isinstance(mark, int) or not 1 <= mark <= 0xFFFFFFFF:
        raise ConfigError(path, "bypass.mark", f"{mark!r} is not a mark: use an integer 1..4294967295")
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
    for name in ("class", "device", "proto", "src", "dst"):
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
    tcp_syn = False
    if "tcp_flags" in table:
        if table["tcp_flags"] != "syn":
            raise ConfigError(path, f"{key}.tcp_flags", f'{table["tcp_flags"]!r} is not supported: use "syn"')
        if proto != "tcp":
            raise ConfigError(path, f"{key}.tcp_flags", f'needs proto = "tcp", not {proto_key!r}')
        tcp_syn = True
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
        l7proto=l7proto,
        device=device,
        families=tuple(sorted(families)) or (4, 6),
        direction=direction,
    )


def _check_ingress_rule(path: Path, key: str, table: dict[str, Any], devices: list[Device]) -> None:
    """A direction = "in" rule names a leaf class of an ingress tree and only what tc u32 can match."""
    if "l7proto" in table:
        raise ConfigError(
            path,
            f"{key}.l7proto",
            'the layer7 match is netfilter\'s, which arriving packets meet only after shaping: use ports and hosts, or direction = "out"',
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


@dataclass(frozen=True)
class Cap:
    """A per-IP cap: traffic sent to `host` through `dev` (or, "in", arriving from it) at most `rate`."""

    host: Network
    rate: int  # bits/s
    dev: str
    source: str = "config"  # or "run-time"
    expires: float | None = None  # epoch seconds; run-time caps added with --for
    comment: str = ""
    minor: int | None = None  # run-time caps keep the class minor they were given
    direction: str = "out"  # "in": traffic from `host`, shaped on the device's ingress tree

    @property
    def key(self) -> tuple[str, str, Network]:
        return (self.dev, self.direction, self.host)


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
        if sum(d == direction for d, _ in caps) > len(CAP_MINORS):
            raise ConfigError(path, key, f"{len(caps)} caps: a device takes at most {len(CAP_MINORS)} each way")
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
