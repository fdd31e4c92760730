"""TOML → validated, typed configuration.

Every error is found here, before anything runs, and names the file, the key
and the reason. Class ids and marks are allocated here, deterministically:
the same file always gives the same ids.
"""

from __future__ import annotations

import errno
import os
import re
import shlex
import stat
import sys
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from shapekit.config.rules import Bypass, Cap, MarkRule, check_bypass_mark, parse_bypass, parse_limits, parse_marks
from shapekit.config.units import UnitError, format_rate, parse_rate, parse_size
from shapekit.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

DEFAULT_CONFIG = Path("/etc/shapekit/shapekit.toml")

# What shapekit owns on a device: the root HTB qdisc `5c:` and the top class
# `5c:1` at the line rate. Every class gets minor N and a leaf qdisc `N:`, so
# minors 0, 1 and 0x5c are taken.
ROOT_MAJOR = 0x5C
TOP_MINOR = 0x1
FIRST_MINOR = 0x10
MAX_MINOR = 0x7FFF  # minors 0x8000-0xffff are the per-IP caps' (shapekit.config_rules.CAP_MINORS)
# Marks shapekit allocates: the class minor in shapekit's own mark range.
MARK_BASE = 0x5C0000
MAX_PRIO = 7
MAX_BURST = 2**30  # bytes; tc refuses 4g
MAX_QUANTUM = 2**24
MAX_DEPTH = 7  # HTB allows 8 levels; the top class takes one
MAX_CONFIG_BYTES = 16 << 20  # a config is a few KiB: more is a wrong path, not a config
TOO_BIG = "larger than the {} MiB shapekit reads"

Leaf = Literal["sfq", "fq_codel", "cake", "pfifo", "none"]
# "u32" is the ingress trees' own: packets arriving have no netfilter mark yet.
Classifier = Literal["fw", "classify", "u32"]
Direction = Literal["out", "in"]
LEAVES: tuple[Leaf, ...] = ("sfq", "fq_codel", "cake", "pfifo", "none")
CLASSIFIERS: tuple[Classifier, ...] = ("fw", "classify")
IMPLICIT_DEFAULT = "default"

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_IFNAME = re.compile(r"^[^\s/:]{1,15}$")

_DEVICE_KEYS = {"rate", "default", "leaf", "classifier", "classes", "limits", "ingress"}
_INGRESS_KEYS = {"rate", "default", "leaf", "classes"}
# The IFB device that carries a device's ingress tree: "ifb-" and the name, or a digest of a long one.
IFB_PREFIX = "ifb-"
IFB_ALIAS = "shapekit ingress of "  # the IFB's ifalias: how shapekit knows its own
_CLASS_KEYS = {"parent", "rate", "ceil", "prio", "mark", "burst", "cburst", "quantum", "classid", "leaf"}
_TOP_KEYS = {"device", "bypass", "mark"}


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


def config_path(option: Path | None) -> Path:
    """--config, else $SHAPEKIT_CONFIG, else /etc/shapekit/shapekit.toml."""
    if option is not None:
        return option
    env = os.environ.get("SHAPEKIT_CONFIG")
    return Path(env) if env else DEFAULT_CONFIG


def load_config(path: Path, *, check_owner: bool) -> Config:
    """Read, parse and validate `path`; `check_owner` refuses files others can write."""
    raw = _read_config(path, check_owner)
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(path, "", f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, "", f"TOML syntax error: {exc}") from None
    except RecursionError:  # tomllib recurses once per nesting level
        raise ConfigError(path, "", "TOML nested too deep: a config nests a few levels") from None
    return parse_config(data, path)


def _read_config(path: Path, check_owner: bool) -> bytes:
    """The file's bytes, read only once it is known to be a sane file (and, as root, one only root can change)."""
    try:
        fd = open_input(path)
    except FileNotFoundError:
        raise ConfigError(path, "", "no such file (pass --config PATH or set SHAPEKIT_CONFIG)") from None
    except InputProblem as exc:
        raise ConfigError(path, "", f"{exc}: point --config at the TOML file") from None
    except OSError as exc:
        raise ConfigError(path, "", f"cannot read it: {exc.strerror}") from None
    try:
        opened = os.fstat(fd)
        problem = input_problem(opened, MAX_CONFIG_BYTES)
        if problem:
            raise ConfigError(path, "", f"{problem}: point --config at the TOML file")
        if check_owner:
            _check_not_writable_by_others(path, opened)
        raw = read_at_most(fd, MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(path, "", f"cannot read it: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(raw) > MAX_CONFIG_BYTES:  # /proc and the like report size 0
        raise ConfigError(path, "", f"{TOO_BIG.format(MAX_CONFIG_BYTES >> 20)}: point --config at the TOML file")
    return raw


class InputProblem(OSError):
    """A path that is no file shapekit reads (a FIFO, a device...): the message says what it is."""


def open_input(path: Path) -> int:
    """A read-only fd on `path`, refused before opening when it is no regular file.

    Opening a device can do things (a tape rewinds, a watchdog starts), and a
    FIFO blocks. So the path is first taken hold of without opening what it
    names (O_PATH), that very file is checked, and only then opened, through
    /proc/self/fd: a symlink swapped in between cannot lead the open elsewhere.
    """
    held = os.open(path, os.O_PATH | os.O_CLOEXEC)
    try:
        kind = _kind(os.fstat(held).st_mode)
        if kind:
            raise InputProblem(f"not a regular file ({kind})")
        flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
        try:
            return os.open(f"/proc/self/fd/{held}", flags)
        except FileNotFoundError:  # no /proc: the path again, non-blocking, checked again after
            return os.open(path, flags)
    finally:
        os.close(held)


def input_problem(opened: os.stat_result, most: int) -> str | None:
    """Why the file behind an fd (its fstat) is not one to read: not regular, or above `most` bytes."""
    kind = _kind(opened.st_mode)
    if kind:
        return f"not a regular file ({kind})"
    if opened.st_size > most:
        return TOO_BIG.format(most >> 20)
    return None


def read_at_most(fd: int, most: int) -> bytes:
    """Up to `most` bytes of `fd`: a file's size can lie (/proc reports 0), so the reading stops itself."""
    chunks: list[bytes] = []
    left = most
    while left > 0:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _kind(mode: int) -> str:
    """What a non-regular file is, for messages; "" for a regular file."""
    if stat.S_ISREG(mode):
        return ""
    kinds = {
        stat.S_ISDIR: "a directory",
        stat.S_ISCHR: "a character device",
        stat.S_ISBLK: "a block device",
        stat.S_ISFIFO: "a FIFO",
        stat.S_ISSOCK: "a socket",
    }
    return next((name for test, name in kinds.items() if test(mode)), "not a file")


def _check_not_writable_by_others(path: Path, opened: os.stat_result) -> None:
    # The file drives root commands: whoever can write it, or swap it or a directory on
    # the way to it, is root. As sshd's StrictModes, but every directory a name is
    # looked up in counts: those of the path as given, of its realpath, and of each
    # symlink between.
    try:
        real, dirs, links = _lookup(path)
        if _identity(os.stat(real)) != _identity(opened):
            raise ConfigError(path, "", "it changed while it was being opened: run the command again")
        # The file as read (the fd) and as named, then each directory on the way.
        checks = [(real, opened), (real, os.stat(real))] + [(d, os.stat(d)) for d in dirs]
        links_checked = [(link, os.lstat(link)) for link in links]
    except OSError as exc:
        raise ConfigError(path, "", f"cannot check who can write it: {exc.strerror}") from None
    for target, info in checks:
        reason = _writable_by_others(target, info)
        if reason:
            raise ConfigError(path, "", reason)
    for link, info in links_checked:
        if info.st_uid != 0:  # its owner can replace it, even in a sticky directory
            raise ConfigError(
                path,
                "",
                f"{link} is a symlink owned by uid {info.st_uid}, not root; it drives root commands: chown -h root {link}",
            )


def _writable_by_others(target: str, info: os.stat_result) -> str | None:
    """Why someone other than root can change `target`, or None."""
    # A sticky directory (/tmp) lets others add names, not replace root's.
    sticky_dir = stat.S_ISDIR(info.st_mode) and info.st_mode & stat.S_ISVTX
    if info.st_uid != 0:
        return f"{target} is owned by uid {info.st_uid}, not root; it drives root commands: chown root {target}"
    if info.st_mode & stat.S_IWOTH and not sticky_dir:
        return f"{target} is writable by any user; it drives root commands: chmod o-w {target}"
    if info.st_mode & stat.S_IWGRP and info.st_gid != 0 and not sticky_dir:
        return f"{target} is writable by group {info.st_gid}; it drives root commands: chmod g-w {target}"
    return None


def _identity(info: os.stat_result) -> tuple[int, int]:
    return info.st_dev, info.st_ino


_MAX_LINKS = 40  # the kernel's limit on symlinks followed in one lookup


def _lookup(path: Path) -> tuple[str, list[str], list[str]]:
    """Where `path` leads, as the kernel walks it: the real path, every directory a
    name is looked up in (each once, in walking order), and every symlink followed."""
    todo = list(reversed(path.absolute().parts))  # Path.parts drops "." and empty names
    current = "/"
    dirs: list[str] = []
    links: list[str] = []
    while todo:
        name = todo.pop()
        if name == "/":  # the start of an absolute path or symlink
            current = "/"
        elif name == "..":  # `current` holds no symlink, so its parent is its dirname
            current = os.path.dirname(current)
        else:
            dirs.append(current)
            candidate = os.path.join(current, name)
            if not stat.S_ISLNK(os.lstat(candidate).st_mode):
                current = candidate
                continue
            links.append(candidate)
            if len(links) > _MAX_LINKS:
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP))
            todo.extend(reversed(Path(os.readlink(candidate)).parts))
    return current, list(dict.fromkeys(dirs)), list(dict.fromkeys(links))


def parse_config(data: dict[str, Any], path: Path) -> Config:
    for key in data:
        if key not in _TOP_KEYS:
            raise ConfigError(path, key, f"unknown section (known: {', '.join(sorted(_TOP_KEYS))})")
    devices_raw = data.get("device")
    if not isinstance(devices_raw, dict) or not devices_raw:
        raise ConfigError(path, "device", "no devices: add a [device.NAME] table with a rate")
    devices = {name: _parse_device(path, name, raw) for name, raw in devices_raw.items()}
    bypass = parse_bypass(path, data.get("bypass"))
    check_bypass_mark(path, bypass, devices)
    marks = parse_marks(path, data.get("mark"), devices)
    return Config(path=path, devices=devices, bypass=bypass, marks=marks)


def _table(path: Path, key: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(path, key, f"must be a table, not {value!r}")
    return value


def _unknown_keys(path: Path, key: str, table: dict[str, Any], known: set[str]) -> None:
    for name in table:
        if name not in known:
            raise ConfigError(path, f"{key}.{name}", f"unknown key (known: {', '.join(sorted(known))})")


def _rate(path: Path, key: str, value: Any) -> int:
    try:
        return parse_rate(value)
    except UnitError as exc:
        raise ConfigError(path, key, str(exc)) from None


def _size(path: Path, key: str, value: Any, most: int) -> int | None:
    if value is None:
        return None
    try:
        size = parse_size(value)
    except UnitError as exc:
        raise ConfigError(path, key, str(exc)) from None
    if size > most:
        raise ConfigError(path, key, f"{value!r} is more than tc takes here ({most} bytes)")
    return size


def _int(path: Path, key: str, value: Any, low: int, high: int, hint: str = "") -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(path, key, f"must be an integer, not {value!r}")
    if not low <= value <= high:
        raise ConfigError(path, key, f"{value} is out of range: use {low}..{high}{hint}")
    return value


def _choice(path: Path, key: str, value: Any, choices: tuple[str, ...]) -> Any:
    if value not in choices:
        raise ConfigError(path, key, f"{value!r} is not one of {', '.join(repr(c) for c in choices)}")
    return value


def _parse_device(path: Path, name: str, raw: Any) -> Device:
    key = f"device.{name}"
    table = _table(path, key, raw)
    problem = device_name_problem(name)
    if problem:
        raise ConfigError(path, key, problem)
    _unknown_keys(path, key, table, _DEVICE_KEYS)
    classifier = _choice(path, f"{key}.classifier", table.get("classifier", "fw"), CLASSIFIERS)
    device = _parse_tree(path, key, table, Device(name, 0, "", "sfq", classifier, ()))
    ingress = None
    if "ingress" in table:
        ingress = _parse_ingress(path, name, _table(path, f"{key}.ingress", table["ingress"]))
    limits = parse_limits(
        path, f"{key}.limits", table.get("limits", {}), name, device.rate, ingress.rate if ingress else None
    )
    if ingress is not None:
        ingress = replace(ingress, limits=tuple(c for c in limits if c.direction == "in"))
    return replace(device, limits=tuple(c for c in limits if c.direction == "out"), ingress=ingress)


def _parse_ingress(path: Path, dev: str, table: dict[str, Any]) -> Device:
    key = f"device.{dev}.ingress"
    if "classifier" in table:
        raise ConfigError(
            path,
            f"{key}.classifier",
            'arriving packets have no netfilter mark yet, so ingress classes are picked by tc u32 filters from [[mark]] rules with direction = "in": remove it',
        )
    _unknown_keys(path, key, table, _INGRESS_KEYS)
    return _parse_tree(path, key, table, Device(ifb_name(dev), 0, "", "sfq", "u32", (), direction="in", owner=dev))


def _parse_tree(path: Path, key: str, table: dict[str, Any], shell: Device) -> Device:
    """`shell` (name, classifier, direction) with the tree's line rate, default class, leaf qdisc and classes."""
    if "rate" not in table:
        raise ConfigError(path, f"{key}.rate", 'missing: the line rate, e.g. rate = "100mbit"')
    rate = _rate(path, f"{key}.rate", table["rate"])
    leaf = _choice(path, f"{key}.leaf", table.get("leaf", "sfq"), LEAVES)
    classes_raw = _table(path, f"{key}.classes", table.get("classes", {}))
    default = table.get("default")
    if default is None:
        if classes_raw:
            raise ConfigError(path, f"{key}.default", "missing: name the class that unmarked traffic goes to")
        # A device with no classes (seed 002's tree) sends everything to one class at the line rate.
        default = IMPLICIT_DEFAULT
        classes_raw = {IMPLICIT_DEFAULT: {"rate": format_rate(rate)}}
    if not isinstance(default, str) or default not in classes_raw:
        raise ConfigError(path, f"{key}.default", f"{default!r} is not a class of {key}")
    classes = _parse_classes(path, key, rate, classes_raw, with_marks=shell.direction == "out")
    default_class = next(c for c in classes if c.name == default)
    if not default_class.is_leaf:
        raise ConfigError(path, f"{key}.default", f"{default!r} has child classes; name a leaf class")
    return replace(shell, rate=rate, default=default, leaf=leaf, classes=classes)


def _parse_classes(
    path: Path, dev_key: str, line_rate: int, raw: dict[str, Any], with_marks: bool
) -> tuple[HtbClass, ...]:
    tables = {}
    for name, value in raw.items():
        key = f"{dev_key}.classes.{name}"
        tables[name] = _table(path, key, value)
        if not _NAME.match(name):
            raise ConfigError(path, key, "a class name uses letters, digits, '_', '-' and '.'")
        if not with_marks and "mark" in tables[name]:
            raise ConfigError(
                path,
                f"{key}.mark",
                'arriving packets have no netfilter mark yet: pick this class with a [[mark]] rule with direction = "in"',
            )
        _unknown_keys(path, key, tables[name], _CLASS_KEYS)
        parent = tables[name].get("parent")
        if parent is not None and not isinstance(parent, str):
            raise ConfigError(path, f"{key}.parent", f"must be a class name, not {parent!r}")
        if parent is not None and parent not in raw:
            raise ConfigError(path, f"{key}.parent", f"{parent!r} is not a class of {dev_key}")
        if parent == name:
            raise ConfigError(path, f"{key}.parent", "a class cannot be its own parent")
    order = _tree_order(path, dev_key, tables)
    parents = {tables[n].get("parent") for n in tables}
    minors = _allocate_minors(path, dev_key, tables, order)
    marks = _allocate_marks(path, dev_key, tables, order, parents, minors) if with_marks else {}
    ceils: dict[str | None, int] = {None: line_rate}
    classes = []
    for name in order:
        key = f"{dev_key}.classes.{name}"
        table = tables[name]
        parent = table.get("parent")
        if "rate" not in table:
            raise ConfigError(path, f"{key}.rate", "missing: the rate this class is guaranteed")
        rate = _rate(path, f"{key}.rate", table["rate"])
        ceil = _rate(path, f"{key}.ceil", table["ceil"]) if "ceil" in table else ceils[parent]
        if rate > ceil:
            raise ConfigError(path, f"{key}.rate", f"{format_rate(rate)} is above the ceil {format_rate(ceil)}")
        if ceil > ceils[parent]:
            above = "the device rate" if parent is None else f"the ceil of {parent!r}"
            raise ConfigError(
                path, f"{key}.ceil", f"{format_rate(ceil)} is above {above} ({format_rate(ceils[parent])})"
            )
        ceils[name] = ceil
        classes.append(
            HtbClass(
                name=name,
                minor=minors[name],
                parent=parent,
                rate=rate,
                ceil=ceil,
                is_leaf=name not in parents,
                mark=marks.get(name),
                prio=_int(
                    path, f"{key}.prio", table.get("prio"), 0, MAX_PRIO, " (the kernel clamps higher values to 7)"
                ),
                burst=_size(path, f"{key}.burst", table.get("burst"), MAX_BURST),
                cburst=_size(path, f"{key}.cburst", table.get("cburst"), MAX_BURST),
                quantum=_size(path, f"{key}.quantum", table.get("quantum"), MAX_QUANTUM),
                leaf=_class_leaf(path, key, table, is_leaf=name not in parents),
            )
        )
    return tuple(classes)


def _class_leaf(path: Path, key: str, table: dict[str, Any], is_leaf: bool) -> Leaf | None:
    if "leaf" not in table:
        return None
    if not is_leaf:
        raise ConfigError(path, f"{key}.leaf", "only a leaf class has a leaf qdisc; this class has child classes")
    return _choice(path, f"{key}.leaf", table["leaf"], LEAVES)


def _tree_order(path: Path, dev_key: str, tables: dict[str, dict[str, Any]]) -> list[str]:
    """Class names with every parent before its children, siblings in file order."""
    order: list[str] = []

    def visit(parent: str | None, depth: int) -> None:
        for name, table in tables.items():
            if table.get("parent") == parent:
                if depth > MAX_DEPTH:
                    raise ConfigError(path, f"{dev_key}.classes.{name}", f"nested deeper than HTB's {MAX_DEPTH} levels")
                order.append(name)
                visit(name, depth + 1)

    visit(None, 1)
    for name in tables:
        if name not in order:
            raise ConfigError(path, f"{dev_key}.classes.{name}.parent", "the parents form a loop")
    return order


def _allocate_minors(path: Path, dev_key: str, tables: dict[str, dict[str, Any]], order: list[str]) -> dict[str, int]:
    taken = {0, TOP_MINOR, ROOT_MAJOR}
    minors: dict[str, int] = {}
    for name in order:
        key = f"{dev_key}.classes.{name}.classid"
        minor = _int(
            path, key, tables[name].get("classid"), FIRST_MINOR, MAX_MINOR, " (the class minor, in hex: 0x1010)"
        )
        if minor is None:
            continue
        if minor in taken:
            owner = next((n for n, m in minors.items() if m == minor), "shapekit")
            raise ConfigError(path, key, f"{minor:#x} is already used by {owner}")
        taken.add(minor)
        minors[name] = minor
    free = (m for m in range(FIRST_MINOR, MAX_MINOR + 1) if m not in taken)
    for name in order:
        if name not in minors:
            minors[name] = next(free)
    return minors


def _allocate_marks(
    path: Path,
    dev_key: str,
    tables: dict[str, dict[str, Any]],
    order: list[str],
    parents: set[str | None],
    minors: dict[str, int],
) -> dict[str, int]:
    marks: dict[str, int] = {}
    for name in order:
        key = f"{dev_key}.classes.{name}.mark"
        mark = _int(path, key, tables[name].get("mark"), 1, 0xFFFFFFFF)
        if mark is None:
            continue
        if name in parents:
            raise ConfigError(path, key, "only a leaf class takes marked traffic; this class has child classes")
        if mark in marks.values():
            other = next(n for n, m in marks.items() if m == mark)
            raise ConfigError(path, key, f"mark {mark} is already the mark of class {other!r}")
        marks[name] = mark
    for name in order:
        if name not in parents and name not in marks:
            mark = MARK_BASE | minors[name]
            if mark in marks.values():
                other = next(n for n, m in marks.items() if m == mark)
                raise ConfigError(
                    path, f"{dev_key}.classes.{other}.mark", f"{mark} is the mark shapekit gives {name!r}; pick another"
                )
            marks[name] = mark
    return marks
