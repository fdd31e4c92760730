"""Where shapekit keeps what it must remember, and the lock that serialises changes."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii as _quoted  # what json.dumps quotes a str with
from pathlib import Path
from typing import Any, TypeVar

from shapekit.config.addresses import Network, PortProto, ValueProblem, parse_host, parse_port_proto
from shapekit.config.files import InputProblem, read_bounded
from shapekit.config.model import MAX_GSO_SEGS, device_name_problem, is_gso_segs
from shapekit.config.rules import CAP_MINORS, CAP_SLOTS, DIRECTIONS, Cap, check_cap
from shapekit.config.units import UnitError, format_rate, parse_rate
from shapekit.errors import CommandFailed, UsageError
from shapekit.plan.gso import Held

DEFAULT_STATE_DIR = Path("/var/lib/shapekit")
BYPASS_FILE = "bypass.json"
LIMITS_FILE = "limits.json"
TABLES_FILE = "tables.json"  # the IP families whose mangle table shapekit created
GSO_FILE = "gso.json"  # the devices whose gso_max_segs shape-init holds, and their value before
INIT_FILE = "init.json"  # when shape-init last finished without an error (shape-status --format prometheus)
# 100,000 caps are about 20 MB: a bigger file is not one shapekit wrote.
MAX_STATE_BYTES = 256 << 20
_LONGEST_VALUE = 100  # a host, port, rate or device name is far shorter
_LOST = {
    LIMITS_FILE: "the run-time caps in it are lost",
    BYPASS_FILE: "the run-time bypass entries in it are lost",
    TABLES_FILE: "shape-flush then leaves the mangle tables in place",
    INIT_FILE: "shape-status then reports no last shape-init until the next one",
    GSO_FILE: "shape-flush then leaves gso_max_segs as shape-init held it",
}
T = TypeVar("T")


def state_dir() -> Path:
    """$SHAPEKIT_STATE_DIR, else /var/lib/shapekit."""
    env = os.environ.get("SHAPEKIT_STATE_DIR")
    return Path(env) if env else DEFAULT_STATE_DIR


@contextmanager
def change_lock(directory: Path) -> Iterator[None]:
    """Hold shapekit's one lock: two commands that change things never interleave."""
    try:
        directory.mkdir(mode=0o755, parents=True, exist_ok=True)
        handle = open(directory / "lock", "a")  # noqa: SIM115 - held for the block
    except OSError as exc:
        raise UsageError(f"cannot use the state dir {directory}: {exc.strerror} (set SHAPEKIT_STATE_DIR)") from None
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def read_state(path: Path) -> dict[str, Any]:
    """A state file's JSON object; {} when there is none yet."""
    raw = _read_raw(path)
    return {} if raw is None else _json_object(path, raw)


def _json_object(path: Path, raw: bytes) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except RecursionError:  # json.loads recurses once per nesting level
        raise state_problem(path, "", "not valid JSON (nested too deep)") from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise state_problem(path, "", f"not valid JSON ({_one_line(exc)})") from None
    if not isinstance(data, dict):
        raise state_problem(path, "", f"not a JSON object but {_show(data)}")
    return data


def state_problem(path: Path, where: str, reason: str) -> UsageError:
    """The one line for a state file that cannot be used: which file, where in it, why, and the way out."""
    lost = _LOST.get(path.name, "the entries in it are lost")
    at = f"{where}: " if where else ""
    return UsageError(f"state file {path}: {at}{reason}: fix it or remove it to start afresh ({lost})")


def _show(value: object) -> str:
    """`value` for a message: one line, not too long."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())


def write_state(path: Path, data: dict[str, Any]) -> None:
    """Replace a state file atomically: readers see the old file or the new one, never half.

    A write that fails (a full disk, a read-only /var) fails like a command:
    exit 1, and the run's changes to the kernel are put back.
    """
    write_state_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_state_text(path: Path, text: str, durable: bool = True) -> None:
    """`write_state` of text already made; `durable`: on disk before it replaces the old file."""
    try:
        _replace(path, text, durable)
    except OSError as exc:
        raise CommandFailed(f"writing {path}", exc.strerror or str(exc)) from None


def _replace(path: Path, text: str, durable: bool) -> None:
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
            if durable:
                out.flush()
                os.fsync(out.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _list(path: Path, data: dict[str, Any], key: str) -> list[Any]:
    value = data.get(key, [])
    if not isinstance(value, list):
        raise state_problem(path, key, f"{_show(value)} is not a list")
    return value


def _known_keys(path: Path, where: str, table: dict[str, Any], known: tuple[str, ...]) -> None:
    # A key shapekit does not know would be dropped at the next save: refuse, never rewrite it away.
    for key in table:
        if key not in known:
            raise state_problem(path, where, f"unknown key {_show(key)} (known: {', '.join(known)})")


def _text(path: Path, where: str, value: Any, longest: int) -> str:
    if not isinstance(value, str):
        raise state_problem(path, where, f"{_show(value)} is not a string")
    if len(value) > longest:
        raise state_problem(path, where, f"{_show(value)} is longer than {longest} characters")
    return value


def _parsed(path: Path, where: str, value: Any, parse: Callable[[str], T]) -> T:
    """`value` read as shapekit reads it from the command line."""
    try:
        return parse(_text(path, where, value, _LONGEST_VALUE))
    except (ValueProblem, UnitError) as exc:
        raise state_problem(path, where, _one_line(exc)) from None


@dataclass(frozen=True)
class RuntimeBypass:
    """Bypass entries added with `shape-bypass add`, kept in bypass.json."""

    ports: tuple[PortProto, ...] = ()
    hosts: tuple[Network, ...] = ()

    @classmethod
    def load(cls, directory: Path) -> RuntimeBypass:
        path = directory / BYPASS_FILE
        data = read_state(path)
        _known_keys(path, "", data, ("ports", "hosts"))
        return cls(
            ports=tuple(
                _parsed(path, f"ports[{n}]", p, parse_port_proto) for n, p in enumerate(_list(path, data, "ports"))
            ),
            hosts=tuple(_parsed(path, f"hosts[{n}]", h, parse_host) for n, h in enumerate(_list(path, data, "hosts"))),
        )

    def save(self, directory: Path) -> None:
        write_state(
            directory / BYPASS_FILE, {"ports": [str(p) for p in self.ports], "hosts": [str(h) for h in self.hosts]}
        )


_CAP_KEYS = ("host", "rate", "dev", "expires", "comment", "slot", "minor", "direction")


def load_caps(directory: Path, line_rates: Mapping[tuple[str, str], int] | None = None) -> list[Cap]:
    """Caps added with `shape-limit-ip add`, kept in limits.json (lapsed ones included).

    Each is held to what `add` would take: a cap on a configured tree
    ((device, direction) in `line_rates`) no faster than its line rate.
    """
    path = directory / LIMITS_FILE
    data = read_state(path)
    _known_keys(path, "", data, ("caps",))
    caps = [_checked_cap(path, n, item, line_rates) for n, item in enumerate(_list(path, data, "caps"))]
    seen: set[tuple[str, str, Network]] = set()
    for n, cap in enumerate(caps):
        if cap.key in seen:
            raise state_problem(path, f"caps[{n}]", f"{cap.host} is capped twice on {cap.dev} ({cap.direction})")
        seen.add(cap.key)
    return caps


def _checked_cap(path: Path, n: int, item: Any, line_rates: Mapping[tuple[str, str], int] | None) -> Cap:
    """The n-th saved cap, every field checked; on a configured tree no faster than its line rate."""
    cap = _cap(path, f"caps[{n}]", item)
    problem = check_cap(cap.host, cap.rate, (line_rates or {}).get((cap.dev, cap.direction), cap.rate))
    if cap.expires is not None and cap.direction == "in":
        problem = "a cap on arriving traffic has no expiry (its u32 filter has no timeout)"
    if problem:
        raise state_problem(path, f"caps[{n}]", problem)
    return cap


# limits.json as shapekit writes it: a cap per line, each line a JSON object with its keys sorted.
_HEAD, _TAIL, _NO_CAPS = '{"caps": [\n', "\n]}\n", '{"caps": []}\n'
_LINE_START = '\n{"comment": '
_TWO_ON_A_LINE = re.compile(r'\}[ \t]*,[ \t]*\{"')
_NUMBER = r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][-+]?\d+)?"
_PLAIN = r'"[^"\\\n]*"'  # a JSON string without escapes: a host, rate or device as shapekit writes it
# Each line shapekit writes has its device right before its direction. Inside a JSON string every
# quote is escaped, so neither this nor `_places_of` ever matches there.
_TREE_OF = re.compile(rf'"dev": {_PLAIN}, "direction": "(?:in|out)", "expires": ')


def _places_of(tree: str) -> re.Pattern[str]:
    """The expiry and place of each line on one tree (`tree`: the text of its device and direction)."""
    tail = rf'"expires": (null|{_NUMBER}), "host": {_PLAIN}, "rate": {_PLAIN}, "slot": (null|0|[1-9]\d*)\}},?$'
    return re.compile(re.escape(tree) + tail, re.MULTILINE)


@dataclass(frozen=True)
class SavedCap:
    """One cap's line in limits.json: its index, its JSON object, and where its text is in the file."""

    n: int
    item: Any
    start: int
    end: int


@dataclass(frozen=True)
class SavedCaps:
    """limits.json as read, kept as its text: a command that changes one cap reads that one (`find`,
    `cap`) and the places of the rest (`places`), and writes the others back as they were. Reading
    every one of 100,000 caps takes seconds; a quick `add` or `remove` cannot.

    A file in shapekit's own layout (a cap per line) is never decoded whole for that; any other
    valid file is read as JSON and kept in that layout, to be written so.
    """

    path: Path
    text: str
    count: int  # caps in the file

    @classmethod
    def read(cls, directory: Path) -> SavedCaps:
        path = directory / LIMITS_FILE
        raw = _read_raw(path)
        text = _in_lines(raw)
        if text is not None:
            return cls(path, text, text.count(_LINE_START))
        data = {} if raw is None else _json_object(path, raw)
        _known_keys(path, "", data, ("caps",))
        items = _list(path, data, "caps")
        return cls(path, _caps_text([json.dumps(item, sort_keys=True) for item in items]), len(items))

    @classmethod
    def canonical(cls, directory: Path, line_rates: Mapping[tuple[str, str], int] | None = None) -> SavedCaps:
        """limits.json read whole, every cap checked, and kept as shapekit writes it (each host as `str` prints
        it): for a host that `find` does not find as a hand wrote it ("10.0.0.1", "2001:DB8::1")."""
        caps = load_caps(directory, line_rates)
        return cls(directory / LIMITS_FILE, _caps_text([_cap_line(c) for c in caps]), len(caps))

    @functools.cached_property
    def items(self) -> list[Any]:
        """Every cap's JSON object: the file decoded whole."""
        data = _json_object(self.path, self.text.encode())
        return _list(self.path, data, "caps")

    def cap(self, found: SavedCap, line_rates: Mapping[tuple[str, str], int] | None = None) -> Cap:
        """A cap `find` found, every field checked; on a configured tree no faster than its line rate."""
        return _checked_cap(self.path, found.n, found.item, line_rates)

    def find(self, host: Network, dev: str | None = None, direction: str | None = None) -> list[SavedCap]:
        """The host's saved caps (on `dev` and `direction`, when given), as shapekit writes the host (`str`)."""
        text, needle, found = self.text, f'"host": {json.dumps(str(host))}', []
        at = text.find(needle)
        while at != -1:
            start, end = text.rfind("\n", 0, at) + 1, text.find("\n", at)
            end -= text[end - 1] == ","
            item = self._line(start, end)
            if isinstance(item, dict) and item.get("host") == str(host) and _on(item, dev, direction):
                found.append(SavedCap(text.count("\n", 0, start) - 1, item, start, end))
            at = text.find(needle, end)
        seen: set[tuple[Any, Any]] = set()
        for cap in found:  # as load_caps refuses it
            tree = (cap.item.get("dev"), cap.item.get("direction", "out"))
            if tree in seen:
                raise state_problem(self.path, f"caps[{cap.n}]", f"{host} is capped twice on {tree[0]} ({tree[1]})")
            seen.add(tree)
        return found

    def _line(self, start: int, end: int) -> Any:
        """One line's JSON object; a line that is none: the whole file's error."""
        try:
            return json.loads(self.text[start:end])
        except ValueError:
            _json_object(self.path, self.text.encode())  # the whole file's error, if it has one
            raise state_problem(self.path, "", "a line is not one JSON object (shapekit writes a cap a line)") from None

    def places(self, dev: str, direction: str, now: float, skip: SavedCap | None = None) -> tuple[set[int], set[int]]:
        """The places held on one tree by the caps in force and by lapsed ones (whose classes stay until
        the next full install), but `skip`'s: from the lines' text, or from the file decoded when a
        line is not as shapekit writes it or holds what `cap` would refuse there."""
        tree = f'"dev": {json.dumps(dev)}, "direction": "{direction}", '
        pattern = _places_of(tree)
        listed = pattern.findall(self.text)
        if len(listed) != self.text.count(tree) or len(_TREE_OF.findall(self.text)) != self.count:
            return self._places_decoded(dev, direction, now, skip)
        if skip is not None:
            for mine in pattern.findall(self.text, skip.start, skip.end):
                listed.remove(mine)
        live = {int(slot) for expires, slot in listed if expires == "null" and slot != "null"}
        timed = [(float(expires), slot) for expires, slot in listed if expires != "null"]
        lapsed = {int(slot) for until, slot in timed if until <= now and slot != "null"}
        live |= {int(slot) for until, slot in timed if until > now and slot != "null"}
        places = CAP_SLOTS if direction == "out" else CAP_MINORS
        slots = live | lapsed
        out_of_range = slots and (min(slots) < places.start or max(slots) >= places.stop)
        if out_of_range or any(not 0 <= until < 2**40 for until, _ in timed):
            return self._places_decoded(dev, direction, now, skip)  # it says what is wrong
        return live, lapsed

    def _places_decoded(self, dev: str, direction: str, now: float, skip: SavedCap | None) -> tuple[set[int], set[int]]:
        live: set[int] = set()
        lapsed: set[int] = set()
        for n, item in enumerate(self.items):
            if skip is not None and n == skip.n or not (isinstance(item, dict) and _on(item, dev, direction)):
                continue
            slot = _slot(self.path, f"caps[{n}]", item, direction)
            expires = _expires(self.path, f"caps[{n}].expires", item.get("expires"))
            if slot is not None:
                (lapsed if expires is not None and expires <= now else live).add(slot)
        return live, lapsed

    def save_with(self, directory: Path, found: SavedCap | None, cap: Cap) -> None:
        """limits.json with `found`'s line (None: a new one, last) made `cap`, the others as they were."""
        line = _cap_line(cap)
        if found is not None:
            text = self.text[: found.start] + line + self.text[found.end :]
        elif self.count:
            text = self.text[: -len(_TAIL)] + ",\n" + line + _TAIL
        else:
            text = _caps_text([line])
        write_state_text(directory / LIMITS_FILE, text)

    def save_without(self, directory: Path, gone: list[SavedCap]) -> None:
        """limits.json without these caps' lines, the others as they were."""
        lines = self.text[len(_HEAD) : -len(_TAIL)].split(",\n") if self.count else []
        cut = {g.n for g in gone}
        write_state_text(directory / LIMITS_FILE, _caps_text([line for n, line in enumerate(lines) if n not in cut]))


def _on(item: dict[str, Any], dev: str | None, direction: str | None) -> bool:
    """Whether a saved cap's object is on `dev` and `direction` (None: any)."""
    return dev in (None, item.get("dev")) and direction in (None, item.get("direction", "out"))


def _read_raw(path: Path) -> bytes | None:
    """A state file's bytes; None when there is none yet."""
    try:
        return read_bounded(path, MAX_STATE_BYTES)
    except FileNotFoundError:
        return None
    except InputProblem as exc:
        raise state_problem(path, "", str(exc)) from None
    except OSError as exc:
        raise state_problem(path, "", f"cannot read it: {exc.strerror}") from None


def _in_lines(raw: bytes | None) -> str | None:
    """limits.json's text when it is in shapekit's layout, a cap per line; else None."""
    if raw is None:
        return _NO_CAPS
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        return None
    if text == _NO_CAPS:
        return text
    if not (text.startswith(_HEAD + _LINE_START[1:]) and text.endswith("}" + _TAIL)):
        return None
    caps = text.count(_LINE_START)
    # Each line starts a cap, ends one (with a comma but the last), and holds one: one host key, and no
    # `}, {"` (never inside a JSON string, whose quotes are escaped).
    one_each = text.count("\n") == caps + 2 and text.count("},\n{") == caps - 1 and text.count('"host": ') == caps
    return text if one_each and not _TWO_ON_A_LINE.search(text) else None


def _caps_text(lines: list[str]) -> str:
    """limits.json from its caps' lines (JSON objects, keys sorted)."""
    return _HEAD + ",\n".join(lines) + _TAIL if lines else _NO_CAPS


def _cap(path: Path, where: str, item: Any) -> Cap:
    """One saved cap, every field checked: a wrong one would fail later, half-way through a change."""
    if not isinstance(item, dict):
        raise state_problem(path, where, f"{_show(item)} is not a JSON object")
    _known_keys(path, where, item, _CAP_KEYS)
    for key in ("host", "rate", "dev"):
        if key not in item:
            raise state_problem(path, f"{where}.{key}", "missing")
    direction = _direction(path, f"{where}.direction", item.get("direction", "out"))
    return Cap(
        host=_parsed(path, f"{where}.host", item["host"], parse_host),
        rate=_parsed(path, f"{where}.rate", item["rate"], parse_rate),
        dev=_dev(path, f"{where}.dev", item["dev"]),
        source="run-time",
        expires=_expires(path, f"{where}.expires", item.get("expires")),
        comment=_comment(path, f"{where}.comment", item.get("comment", "")),
        slot=_slot(path, where, item, direction),
        direction=direction,
    )


def _dev(path: Path, where: str, value: Any) -> str:
    # The name goes into tc -batch lines: one that breaks them must never get there.
    dev = _text(path, where, value, _LONGEST_VALUE)
    problem = device_name_problem(dev)
    if problem:
        raise state_problem(path, where, problem)
    return sys.intern(dev)  # one string object for 100,000 caps, not one each


def _expires(path: Path, where: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 2**40:
        raise state_problem(path, where, f"{_show(value)} is not a time (seconds since 1970) or null")
    return float(value)


def _comment(path: Path, where: str, value: Any) -> str:
    if not isinstance(value, str) or not value.isprintable():  # as `add --comment` takes it
        raise state_problem(path, where, f"{_show(value)} is not one line of printable text")
    return value


def _slot(path: Path, where: str, item: dict[str, Any], direction: str) -> int | None:
    """A cap's saved place. A file from before cap groups has `minor`: kept on arriving traffic (the same
    class), dropped on sent traffic, whose caps shape-init moves into groups."""
    if "minor" in item and "slot" not in item:
        return _place(path, f"{where}.minor", item["minor"], CAP_MINORS) if direction == "in" else None
    return _place(path, f"{where}.slot", item.get("slot"), CAP_SLOTS if direction == "out" else CAP_MINORS)


def _place(path: Path, where: str, value: Any, places: range) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value not in places:
        first, last = places[0], places[-1]
        raise state_problem(path, where, f"{_show(value)} is not a cap's place ({first}-{last}) or null")
    return value


def _direction(path: Path, where: str, value: Any) -> str:
    if value not in DIRECTIONS:
        raise state_problem(path, where, f"{_show(value)} is not 'out' or 'in'")
    return DIRECTIONS[DIRECTIONS.index(value)]  # one string object for 100,000 caps, not one each


def save_caps(directory: Path, caps: list[Cap]) -> None:
    write_state_text(directory / LIMITS_FILE, _caps_text([_cap_line(c) for c in caps]))


def _cap_line(cap: Cap) -> str:
    """A cap as limits.json keeps it: what `json.dumps` makes of its object, keys sorted, made here
    without the object (100,000 dicts cost 40 MB and `dumps` of them as much again)."""
    expires = "null" if cap.expires is None else repr(float(cap.expires))
    slot = "null" if cap.slot is None else int(cap.slot)
    return (
        f'{{"comment": {_quoted(cap.comment)}, "dev": {_quoted(cap.dev)}, "direction": {_quoted(cap.direction)}, '
        f'"expires": {expires}, "host": {_quoted(str(cap.host))}, "rate": {_quoted(format_rate(cap.rate))}, '
        f'"slot": {slot}}}'
    )


def load_created_tables(directory: Path) -> set[int]:
    """The IP families (4, 6) whose mangle table a shapekit command created, kept in tables.json."""
    path = directory / TABLES_FILE
    data = read_state(path)
    _known_keys(path, "", data, ("mangle_created",))
    families = _list(path, data, "mangle_created")
    for n, family in enumerate(families):
        if not isinstance(family, int) or isinstance(family, bool) or family not in (4, 6):
            raise state_problem(path, f"mangle_created[{n}]", f"{_show(family)} is not 4 or 6")
    return set(families)


def save_created_tables(directory: Path, families: set[int]) -> None:
    """Write tables.json; with no family left, remove it (shape-flush leaves nothing behind)."""
    _write_or_remove(directory / TABLES_FILE, {"mangle_created": sorted(families)} if families else None)


def _write_or_remove(path: Path, data: dict[str, Any] | None) -> None:
    """Write a state file, or (None) remove it: shape-flush leaves nothing behind."""
    if data is not None:
        write_state(path, data)
        return
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        raise CommandFailed(f"removing {path}", exc.strerror or str(exc)) from None


def load_last_init(directory: Path) -> float | None:
    """When shape-init last finished without an error (Unix time), kept in init.json; None: not since the state began."""
    path = directory / INIT_FILE
    data = read_state(path)
    _known_keys(path, "", data, ("finished",))
    return _expires(path, "finished", data.get("finished"))


def save_last_init(directory: Path, when: float) -> None:
    write_state(directory / INIT_FILE, {"finished": when})


def load_held_gso(directory: Path) -> dict[str, Held]:
    """The devices whose gso_max_segs shape-init holds (gso.json): what it set and what to put back."""
    path = directory / GSO_FILE
    data = read_state(path)
    held = {}
    for dev, item in data.items():
        where = _dev(path, dev, dev)
        if not isinstance(item, dict):
            raise state_problem(path, where, f"{_show(item)} is not a table of held and was")
        _known_keys(path, where, item, ("held", "was"))
        held[where] = Held(*(_segs(path, f"{where}.{key}", item.get(key)) for key in ("held", "was")))
    return held


def _segs(path: Path, where: str, value: Any) -> int:
    if not is_gso_segs(value):
        raise state_problem(path, where, f"{_show(value)} is not a number of segments (1..{MAX_GSO_SEGS})")
    return value


def save_held_gso(directory: Path, held: dict[str, Held]) -> None:
    """Write gso.json; with nothing held, remove it."""
    data = {dev: {"held": h.held, "was": h.was} for dev, h in sorted(held.items())}
    _write_or_remove(directory / GSO_FILE, data or None)
