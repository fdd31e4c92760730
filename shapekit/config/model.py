"""What a config is, typed: devices with their HTB classes, the bypass and the rules; shapekit's
handles and limits; and which device names it can carry into tc and iptables.
"""

from __future__ import annotations

import re
import shlex
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from shapekit.config.rules import Bypass, Cap, MarkRule

# What shapekit owns on a device: the root HTB qdisc `5c:` and the top class
# `5c:1` at the line rate. Every class gets minor N and a leaf qdisc `N:`, so
# minors 0, 1 and 0x5c are taken.
ROOT_MAJOR = 0x5C


TOP_MINOR = 0x1


FIRST_MINOR = 0x10


MAX_MINOR = 0x7FFF  # minors 0x8000-0xffff are the per-IP caps' (shapekit.config.rules.CAP_MINORS)


# Marks shapekit allocates: the class minor in shapekit's own mark range.
MARK_BASE = 0x5C0000


MAX_PRIO = 7


MAX_BURST = 2**30  # bytes; tc refuses 4g


MAX_QUANTUM = 2**24


MAX_DEPTH = 7  # HTB allows 8 levels; the top class takes one


Leaf = Literal["sfq", "fq_codel", "cake", "pfifo", "none"]


# "u32" is the ingress trees' own: packets arriving have no netfilter mark yet.
Classifier = Literal["fw", "classify", "u32"]


Direction = Literal["out", "in"]


# How the line charges a packet: its length (ethernet), the 53-byte ATM cells it fills (atm, ADSL), or
# its length in 65-byte PTM units per 64 (ptm, VDSL2: the kernel has no ptm, so rates are scaled by 64/65).
LinkLayer = Literal["ethernet", "atm", "ptm"]


LINK_LAYERS: tuple[LinkLayer, ...] = ("ethernet", "atm", "ptm")


# A negative overhead (a line cheaper per packet than the Ethernet header skb->len counts) goes in a
# size table on the root, whose overhead is a signed int; -64..256 is tc-cake(8)'s range.
MIN_OVERHEAD = -64
MAX_OVERHEAD = 256  # bytes a packet costs on the line beyond its length; HTB takes 0..65535, real lines < 100


# A shaped device's gso_max_segs: "auto" holds it to what the line sends in a millisecond
# (shapekit.plan.gso), "keep" leaves it, a number holds it to that.
GsoMaxSegs = int | Literal["auto", "keep"]


MAX_GSO_SEGS = 65535  # the kernel's GSO_MAX_SEGS


def is_gso_segs(value: object) -> bool:
    """Whether `value` is a gso_max_segs the kernel takes."""
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_GSO_SEGS


LEAVES: tuple[Leaf, ...] = ("sfq", "fq_codel", "cake", "pfifo", "none")


CLASSIFIERS: tuple[Classifier, ...] = ("fw", "classify")


IMPLICIT_DEFAULT = "default"


_IFNAME = re.compile(r"^[^\s/:]{1,15}$")


CLASS_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


# The IFB device that carries a device's ingress tree: "ifb-" and the name, or a digest of a long one.
IFB_PREFIX = "ifb-"


IFB_ALIAS = "shapekit ingress of "  # the IFB's ifalias: how shapekit knows its own


@dataclass(frozen=True)
class HtbClass:
    """One HTB class below the top class; `parent` None means the top class."""

    name: str
    minor: int
    parent: str | None
    rate: int  # bits/s
    ceil: int  # bits/s
    is_leaf: bool
    mark: int | None = None  # leaf classes only
    prio: int | None = None
    burst: int | None = None  # bytes
    cburst: int | None = None
    quantum: int | None = None
    leaf: Leaf | None = None  # this class's leaf qdisc, when not the device's


@dataclass(frozen=True)
class Device:
    """One HTB tree: a device's egress, or (direction "in") its ingress on its IFB device."""

    name: str  # the link the tree is on: the device, or its IFB
    rate: int  # the line rate, bits/s
    default: str  # name of the leaf class unclassified traffic goes to
    leaf: Leaf
    classifier: Classifier
    classes: tuple[HtbClass, ...]  # parents before children, siblings in file order
    limits: tuple[Cap, ...] = ()  # [device.X.limits]: the per-IP caps of this direction
    direction: Direction = "out"
    owner: str = ""  # the configured device an ingress tree belongs to
    ingress: Device | None = None  # [device.X.ingress]
    overhead: int = 0  # bytes each packet costs on the line beyond its length
    linklayer: LinkLayer = "ethernet"
    gso_max_segs: GsoMaxSegs = "auto"  # egress trees only

    @property
    def configured(self) -> str:
        """The device's name in the config ("eth0" for its ingress tree too)."""
        return self.owner or self.name

    @property
    def key(self) -> str:
        """Where the tree is in the config, for messages."""
        return f"device.{self.configured}" + (".ingress" if self.direction == "in" else "")

    def holds(self, cap: Cap) -> bool:
        """Whether `cap` is one of this tree's."""
        return cap.dev == self.configured and cap.direction == self.direction

    @property
    def trees(self) -> tuple[Device, ...]:
        """The device's trees: egress, then ingress when configured."""
        return (self,) if self.ingress is None else (self, self.ingress)

    def by_name(self, name: str) -> HtbClass:
        return next(c for c in self.classes if c.name == name)

    @property
    def default_class(self) -> HtbClass:
        return self.by_name(self.default)


@dataclass(frozen=True)
class Config:
    path: Path
    devices: dict[str, Device]
    bypass: Bypass = Bypass()
    marks: tuple[MarkRule, ...] = ()


def ifb_name(dev: str) -> str:
    """The IFB device for `dev`'s ingress: within the kernel's 15 characters, distinct per device."""
    name = IFB_PREFIX + dev
    if len(name) <= 15:
        return name
    digest = f"{zlib.crc32(dev.encode()) & 0xFFFF:04x}"
    return f"{IFB_PREFIX}{dev[:6]}-{digest}"


def device_name_problem(name: str) -> str | None:
    """Why `name` cannot be a device shapekit shapes, or None."""
    if not _IFNAME.match(name):
        return f"{name!r} is not a network interface name (1-15 characters, no spaces, '/' or ':')"
    if name.endswith("+"):  # iptables -o eth+ matches every device whose name starts eth
        return (
            f"device name {name!r} ends in '+', which iptables reads as every device whose name starts "
            f"{name[:-1]!r}: rename the device (ip link set {shlex.quote(name)} name NEWNAME)"
        )
    return batch_safe_name_problem(name)


# What iproute2's `tc -batch` reader (lib/utils.c getcmdline, makeargs) does with
# these characters, which Linux allows in a device name.
_BATCH_SPECIAL = {
    "#": "the start of a comment",
    "\\": "a line continuation",
    "'": "a quote",
    '"': "a quote",
}


def batch_safe_name_problem(name: str) -> str | None:
    """Why `name` cannot be written into a `tc -batch` line, or None.

    The reader cuts a line at '#', joins a line ending in a backslash to the
    next, and takes a word starting with a quote up to the next quote.
    """
    char = next((c for c in name if c in _BATCH_SPECIAL), None)
    if char is None:
        return None
    return (
        f"device name {name!r} has {char!r}, which tc -batch reads as {_BATCH_SPECIAL[char]}:"
        f" rename the device (ip link set {shlex.quote(name)} name NEWNAME)"
    )
