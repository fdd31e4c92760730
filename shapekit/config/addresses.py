"""Hosts and ports as shapekit accepts them, with errors that say what to write instead."""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

PORT_PROTOS = ("tcp", "udp")
_PORT_RANGE = re.compile(r"^(\d+)(?::(\d+))?$")
_PORT_PROTO = re.compile(r"^([^/]+)/([^/]*)$")
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"  # ASCII digits; no leading zeros (nor in ipaddress)
_DOTTED_QUAD = re.compile(rf"(?:{_OCTET}\.){{3}}{_OCTET}", re.ASCII)


def host_text(host: Network) -> str:
    """A host as people write it: an address alone, a block with its prefix."""
    return str(host.network_address) if host.prefixlen == host.max_prefixlen else str(host)


class ValueProblem(ValueError):
    """A host or port that is not valid; the message says why."""


def parse_host(text: object) -> Network:
    """An IPv4/IPv6 address or CIDR block; host bits set in a block are refused."""
    if not isinstance(text, str):
        raise ValueProblem(f"{text!r} is not a host: write an address or CIDR block as a string")
    if "%" in text:
        raise ValueProblem(f"{text!r} has a scope (%zone): write the address without it")
    if _DOTTED_QUAD.fullmatch(text.strip()):  # most caps: one IPv4 host, read 2.4x faster than by ip_network
        return ipaddress.IPv4Network(int.from_bytes(socket.inet_aton(text.strip()), "big"))
    try:
        network = ipaddress.ip_network(text.strip(), strict=True)
    except ValueError as exc:
        if "has host bits set" in str(exc):
            loose = ipaddress.ip_network(text.strip(), strict=False)
            raise ValueProblem(f"{text!r} has host bits set: write {loose} (the block) or a single address") from None
        raise ValueProblem(f"{text!r} is not an IPv4/IPv6 address or CIDR block") from None
    mapped = getattr(network.network_address, "ipv4_mapped", None)
    if mapped is not None:
        raise ValueProblem(f"{text!r} is an IPv4 address written as IPv6: write {mapped}")
    return network


def family(network: Network) -> int:
    return network.version


def _port_number(text: str, original: object) -> int:
    number = int(text)
    if not 1 <= number <= 65535:
        where = "" if str(original).strip() == text else f" in {original!r}"
        raise ValueProblem(f"port {number}{where} is out of range: use 1..65535")
    return number


def parse_port_range(text: object) -> str:
    """A port (22) or a range ('61000:63000') in iptables syntax."""
    if isinstance(text, bool) or not isinstance(text, (int, str)):
        raise ValueProblem(f"{text!r} is not a port: write 22, '61000:63000' or a list of them")
    match = _PORT_RANGE.match(str(text).strip())
    if not match:
        raise ValueProblem(f"{text!r} is not a port: write 22, '61000:63000' or a list of them")
    low = _port_number(match.group(1), text)
    if match.group(2) is None:
        return str(low)
    high = _port_number(match.group(2), text)
    if high <= low:
        raise ValueProblem(f"{text!r} is not a range: the first port must be below the second")
    return f"{low}:{high}"


def parse_ports(value: object) -> tuple[str, ...]:
    """`sport`/`dport`: one port, one range, or a list of them."""
    items = value if isinstance(value, list) else [value]
    if not items:
        raise ValueProblem("an empty list of ports matches nothing: remove the key instead")
    ports = tuple(parse_port_range(item) for item in items)
    if len(ports) > 1 and sum(2 if ":" in p else 1 for p in ports) > 15:
        raise ValueProblem(
            "too many ports in one rule: iptables' multiport takes 15 (a range counts 2); split the rule"
        )
    return ports


@dataclass(frozen=True, order=True)
class PortProto:
    """A bypass port: '22/tcp', '60000:61000/udp'."""

    proto: str
    port: str

    def __str__(self) -> str:
        return f"{self.port}/{self.proto}"


def parse_port_proto(text: object) -> PortProto:
    match = _PORT_PROTO.match(text.strip()) if isinstance(text, str) else None
    if not match:
        raise ValueProblem(f"{text!r} is not a port: write PORT/PROTO, e.g. '22/tcp' or '6000:6100/udp'")
    proto = match.group(2).lower()
    if proto not in PORT_PROTOS:
        raise ValueProblem(f"{text!r} has an unknown protocol {match.group(2)!r}: use '/tcp' or '/udp'")
    try:
        return PortProto(proto=proto, port=parse_port_range(match.group(1)))
    except ValueProblem as exc:
        raise ValueProblem(f"{text!r}: {exc}") from None
