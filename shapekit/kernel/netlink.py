"""Pure encoding and decoding of the rtnetlink messages that list a device's tc classes, or get one.

iproute2 6.1 prints no JSON for HTB classes (`tc -s -j class show` falls back
to text), so shapekit asks the kernel itself: one RTM_GETTCLASS dump, whose
replies carry each class's HTB parameters and counters as the kernel keeps
them. `apply` does the socket I/O; this module only builds and reads bytes.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

RTM_NEWTCLASS = 40
RTM_GETTCLASS = 42
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
NLM_F_ECHO = 0x8
NLM_F_ACK = 0x4
AF_UNSPEC = 0

TCA_KIND = 1
TCA_OPTIONS = 2
TCA_STATS2 = 7
TCA_STATS_BASIC = 1
TCA_STATS_QUEUE = 3
TCA_HTB_PARMS = 1
TCA_HTB_RATE64 = 6
TCA_HTB_CEIL64 = 7

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_TCMSG = struct.Struct("=BxxxiIII")  # family, ifindex, handle, parent, info
_RTATTR = struct.Struct("=HH")  # len, type
_RATESPEC = struct.Struct("=BBHhHI")  # cell_log, linklayer, overhead, cell_align, mpu, rate (bytes/s)
_BASIC = struct.Struct("=QI")  # bytes, packets
_QUEUE = struct.Struct("=IIIII")  # qlen, backlog, drops, requeues, overlimits


class ClassStats(NamedTuple):  # a tuple: 100,000 of them are made in one dump
    """One class as the kernel keeps it: ids, HTB rate and ceil, counters."""

    classid: str  # "5c:1030"
    parent: str  # "5c:10", or "root"
    kind: str  # "htb"
    rate: int  # bits/s
    ceil: int  # bits/s
    bytes: int
    packets: int
    drops: int
    overlimits: int
    backlog: int  # bytes queued
    qlen: int  # packets queued


def handle_text(handle: int) -> str:
    return f"{handle >> 16:x}:{handle & 0xFFFF:x}"


def dump_request(ifindex: int, seq: int = 1) -> bytes:
    body = _TCMSG.pack(AF_UNSPEC, ifindex, 0, 0, 0)
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), RTM_GETTCLASS, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body


def get_request(ifindex: int, handle: int, seq: int = 1) -> bytes:
    """One class by handle. NLM_F_ECHO: the kernel answers a class get only as a notification; NLM_F_ACK: and
    then says it is done."""
    body = _TCMSG.pack(AF_UNSPEC, ifindex, handle, 0, 0)
    flags = NLM_F_REQUEST | NLM_F_ECHO | NLM_F_ACK
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), RTM_GETTCLASS, flags, seq, 0) + body


def _attributes(data: bytes, offset: int = 0) -> dict[int, bytes]:
    """The attributes from `offset` on, by type (a later one of a type wins)."""
    found, end = {}, len(data)
    unpack = _RTATTR.unpack_from
    while offset + 4 <= end:
        length, kind = unpack(data, offset)
        if length < 4:
            break
        found[kind & 0x3FFF] = data[offset + 4 : offset + length]
        offset += (length + 3) & ~3
    return found


def parse_messages(data: bytes) -> tuple[list[ClassStats], bool]:
    """The classes in one recv()'s worth of replies, and whether the dump is done."""
    classes, done, offset = [], False, 0
    while offset + _NLMSGHDR.size <= len(data):
        length, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size:
            break
        body = data[offset + _NLMSGHDR.size : offset + length]
        if kind == NLMSG_DONE:
            done = True
        elif kind == NLMSG_ERROR:
            (error,) = struct.unpack_from("=i", body)
            if error:
                raise OSError(-error, "the kernel refused to list the classes")
            done = True  # the acknowledgement that ends a get
        elif kind == RTM_NEWTCLASS:
            classes.append(_parse_class(body))
        offset += (length + 3) & ~3
    return classes, done


def _parse_class(body: bytes) -> ClassStats:
    _family, _ifindex, handle, parent, _info = _TCMSG.unpack_from(body)
    attrs = _attributes(body, _TCMSG.size)
    kind = attrs.get(TCA_KIND, b"").rstrip(b"\0").decode()
    rate = ceil = 0
    if kind == "htb" and TCA_OPTIONS in attrs:
        options = _attributes(attrs[TCA_OPTIONS])
        if TCA_HTB_PARMS in options:
            rate = _RATESPEC.unpack_from(options[TCA_HTB_PARMS], 0)[-1] * 8
            ceil = _RATESPEC.unpack_from(options[TCA_HTB_PARMS], _RATESPEC.size)[-1] * 8
        if TCA_HTB_RATE64 in options:  # rates above 2^32 bytes/s
            rate = struct.unpack("=Q", options[TCA_HTB_RATE64])[0] * 8
        if TCA_HTB_CEIL64 in options:
            ceil = struct.unpack("=Q", options[TCA_HTB_CEIL64])[0] * 8
    stats = _attributes(attrs.get(TCA_STATS2, b""))
    sent, packets = _BASIC.unpack_from(stats[TCA_STATS_BASIC]) if TCA_STATS_BASIC in stats else (0, 0)
    qlen, backlog, drops, _requeues, overlimits = (
        _QUEUE.unpack_from(stats[TCA_STATS_QUEUE]) if TCA_STATS_QUEUE in stats else (0, 0, 0, 0, 0)
    )
    return ClassStats(
        classid=handle_text(handle),
        parent="root" if parent == 0xFFFFFFFF else handle_text(parent),
        kind=kind,
        rate=rate,
        ceil=ceil,
        bytes=sent,
        packets=packets,
        drops=drops,
        overlimits=overlimits,
        backlog=backlog,
        qlen=qlen,
    )
