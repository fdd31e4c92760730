"""TOML → validated, typed configuration.

Every error is found here, before anything runs, and names the file, the key
and the reason. Class ids and marks are allocated here, deterministically:
the same file always gives the same ids.
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from shapekit.config.files import MAX_CONFIG_BYTES, InputProblem, read_bounded
from shapekit.config.model import (
    CLASS_NAME,
    CLASSIFIERS,
    FIRST_MINOR,
    IMPLICIT_DEFAULT,
    LEAVES,
    LINK_LAYERS,
    MARK_BASE,
    MAX_BURST,
    MAX_DEPTH,
    MAX_GSO_SEGS,
    MAX_MINOR,
    MAX_OVERHEAD,
    MAX_PRIO,
    MAX_QUANTUM,
    MIN_OVERHEAD,
    ROOT_MAJOR,
    TOP_MINOR,
    Config,
    Device,
    GsoMaxSegs,
    HtbClass,
    Leaf,
    LinkLayer,
    device_name_problem,
    ifb_name,
    is_gso_segs,
)
from shapekit.config.rules import MARK_BITS_WHY, MAX_MARK, check_bypass_mark, parse_bypass, parse_limits, parse_marks
from shapekit.config.units import (
    PercentError,
    UnitError,
    format_rate,
    is_percent,
    parse_percent,
    parse_rate,
    parse_size,
)
from shapekit.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib


DEFAULT_CONFIG = Path("/etc/shapekit/shapekit.toml")


_DEVICE_KEYS = {
    "rate",
    "default",
    "leaf",
    "classifier",
    "classes",
    "limits",
    "ingress",
    "overhead",
    "linklayer",
    "gso_max_segs",
}


_INGRESS_KEYS = {"rate", "default", "leaf", "classes", "overhead", "linklayer"}


_CLASS_KEYS = {"parent", "rate", "ceil", "prio", "mark", "burst", "cburst", "quantum", "classid", "leaf"}


_TOP_KEYS = {"device", "bypass", "mark"}


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
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(path, "", f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    return parse_config_text(text, path)


def parse_config_text(text: str, path: Path) -> Config:
    """A config's TOML text, parsed and validated; `path` names it in messages."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, "", f"TOML syntax error: {exc}") from None
    except RecursionError:  # tomllib recurses once per nesting level
        raise ConfigError(path, "", "TOML nested too deep: a config nests a few levels") from None
    return parse_config(data, path)


def _read_config(path: Path, check_owner: bool) -> bytes:
    """The file's bytes, read only once it is known to be a sane file (and, as root, one only root can change)."""
    try:
        return read_bounded(path, MAX_CONFIG_BYTES, check_owner)
    except FileNotFoundError:
        raise ConfigError(path, "", "no such file (pass --config PATH or set SHAPEKIT_CONFIG)") from None
    except InputProblem as exc:
        raise ConfigError(path, "", f"{exc}: point --config at the TOML file") from None
    except OSError as exc:
        raise ConfigError(path, "", f"cannot read it: {exc.strerror}") from None


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


def _class_rate(path: Path, key: str, value: Any, parent_ceil: int) -> int:
    """A class's rate or ceil: a rate, or a percentage of its parent's ceil resolved to bits/s."""
    if not is_percent(value):
        return _rate(path, key, value)
    try:
        return parse_percent(value, parent_ceil)
    except UnitError as exc:
        raise ConfigError(path, key, str(exc)) from None


def _line_rate(path: Path, key: str, value: Any) -> int:
    try:
        return parse_rate(value)
    except PercentError as exc:
        raise ConfigError(
            path, key, f"{exc}: the line rate is what they are shares of, so write the line's own, e.g. '100mbit'"
        ) from None
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
    return replace(
        device,
        limits=tuple(c for c in limits if c.direction == "out"),
        ingress=ingress,
        gso_max_segs=_gso_max_segs(path, f"{key}.gso_max_segs", table.get("gso_max_segs", "auto")),
    )


def _gso_max_segs(path: Path, key: str, value: Any) -> GsoMaxSegs:
    if value in ("auto", "keep"):
        return value
    if not is_gso_segs(value):
        raise ConfigError(
            path,
            key,
            f'{value!r} is not "auto", "keep" or a number of segments a GSO super-packet may hold (1..{MAX_GSO_SEGS})',
        )
    return value


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
    rate = _line_rate(path, f"{key}.rate", table["rate"])
    overhead = _overhead(path, f"{key}.overhead", table.get("overhead", 0))
    linklayer = _linklayer(path, f"{key}.linklayer", table.get("linklayer", "ethernet"))
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
    return replace(
        shell, rate=rate, default=default, leaf=leaf, classes=classes, overhead=overhead, linklayer=linklayer
    )


def _overhead(path: Path, key: str, value: Any) -> int:
    overhead = _int(
        path, key, value, MIN_OVERHEAD, MAX_OVERHEAD, " bytes each packet costs on the line beyond its length"
    )
    return overhead or 0


def _linklayer(path: Path, key: str, value: Any) -> LinkLayer:
    return _choice(path, key, value, LINK_LAYERS)


def _parse_classes(
    path: Path, dev_key: str, line_rate: int, raw: dict[str, Any], with_marks: bool
) -> tuple[HtbClass, ...]:
    tables = {}
    for name, value in raw.items():
        key = f"{dev_key}.classes.{name}"
        tables[name] = _table(path, key, value)
        if not CLASS_NAME.match(name):
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
        # A percentage is of the parent's ceil (the line rate above the top classes).
        rate = _class_rate(path, f"{key}.rate", table["rate"], ceils[parent])
        ceil = _class_rate(path, f"{key}.ceil", table["ceil"], ceils[parent]) if "ceil" in table else ceils[parent]
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
        if mark is not None and mark > MAX_MARK:
            raise ConfigError(path, key, f"{mark} is above {MAX_MARK}{MARK_BITS_WHY}: pick a smaller mark")
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
