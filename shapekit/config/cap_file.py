"""`shape-limit-ip sync FILE`: a billing system's list of run-time caps, as CSV or JSON lines → typed caps.

CSV has a header naming its columns; JSON lines are one object per line.
Either way a row is a host and a rate, and optionally a direction ("out",
"in" or "both"), a comment and an expiry (ISO 8601 with a zone, or epoch
seconds). Every row is checked before anything changes: a bad one is one
line naming the file and the row.
"""

from __future__ import annotations

import csv
import datetime
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from shapekit.config.addresses import ValueProblem, parse_host
from shapekit.config.files import MAX_CONFIG_BYTES, InputProblem, read_bounded
from shapekit.config.model import Device
from shapekit.config.rules import CAP_NOT_A_SHARE, DIRECTIONS, IPSET_MAX_TIMEOUT, Cap, check_cap
from shapekit.config.units import PercentError, UnitError, parse_rate
from shapekit.errors import UsageError

COLUMNS = ("host", "rate", "direction", "comment", "expires")
REQUIRED = ("host", "rate")


class RowProblem(ValueError):
    """What is wrong with one row; the caller names the file and the row."""


def read_cap_file(path: Path) -> str:
    """The file's text: a regular file of at most 16 MiB (a FIFO or a device is refused unread)."""
    try:
        raw = read_bounded(path, MAX_CONFIG_BYTES)
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    except InputProblem as exc:
        raise UsageError(f"{path}: {exc}: give the CSV or JSON lines file of caps") from None
    except OSError as exc:
        raise UsageError(f"{path}: cannot read it: {exc.strerror}") from None
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not UTF-8 text: give the CSV or JSON lines file of caps") from None


def parse_cap_rows(path: Path, text: str, device: Device, now: float) -> list[Cap]:
    """Every row as run-time caps on `device` (two for direction "both"), checked against its trees."""
    caps: dict[tuple[str, str], tuple[int, Cap]] = {}
    for number, row in _rows(path, text):
        try:
            for cap in _caps(row, device, now):
                seen = caps.get((cap.direction, str(cap.host)))
                if seen is not None:
                    raise RowProblem(f"{cap.host} is capped ({cap.direction}) on row {seen[0]} already")
                caps[(cap.direction, str(cap.host))] = (number, cap)
        except RowProblem as exc:
            raise UsageError(f"{path}: row {number}: {exc}") from None
    return [cap for _, cap in caps.values()]


def _rows(path: Path, text: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, row) of each row: JSON lines when the first line starts with "{", else CSV."""
    lines = text.splitlines()
    first = next((line.strip() for line in lines if line.strip()), "")
    if first.startswith("{"):
        for number, line in enumerate(lines, 1):
            if line.strip():
                yield number, _json_row(path, number, line)
        return
    reader = csv.DictReader(io.StringIO(text), skipinitialspace=True)
    columns = [c.strip() for c in reader.fieldnames or []]
    missing = [c for c in REQUIRED if c not in columns]
    unknown = [c for c in columns if c not in COLUMNS]
    if first and (missing or unknown):
        what = f"no {missing[0]!r} column" if missing else f"unknown column {unknown[0]!r}"
        raise UsageError(
            f"{path}: line 1: {what}: the header names the columns ({', '.join(COLUMNS)}; host and rate needed)"
        )
    reader.fieldnames = columns
    for row in reader:
        number = reader.line_num
        if None in row or any(value is None for value in row.values()):
            raise UsageError(f"{path}: row {number}: {len(columns)} columns in the header, not as many here")
        if any(str(value).strip() for value in row.values()):
            yield number, {k: v.strip() for k, v in row.items() if v.strip()}


def _json_row(path: Path, number: int, line: str) -> dict[str, Any]:
    try:
        row = json.loads(line)
    except ValueError as exc:
        raise UsageError(f"{path}: row {number}: not JSON ({exc.args[0].split(':')[0]})") from None
    if not isinstance(row, dict):
        raise UsageError(f"{path}: row {number}: a JSON object per line, not {type(row).__name__}")
    unknown = [key for key in row if key not in COLUMNS]
    if unknown:
        raise UsageError(f"{path}: row {number}: unknown key {unknown[0]!r} (known: {', '.join(COLUMNS)})")
    return row


def _caps(row: dict[str, Any], device: Device, now: float) -> list[Cap]:
    for key in REQUIRED:
        if key not in row:
            raise RowProblem(f"no {key}")
    for key in ("host", "rate", "direction", "comment"):
        if key in row and not isinstance(row[key], str):
            raise RowProblem(f"{key} must be text, not {row[key]!r}")
    try:
        host = parse_host(row["host"])
        rate = parse_rate(row["rate"])
    except PercentError as exc:
        raise RowProblem(f"{exc}: {CAP_NOT_A_SHARE}") from None
    except (ValueProblem, UnitError) as exc:
        raise RowProblem(str(exc)) from None
    comment = row.get("comment", "")
    if not comment.isprintable():
        raise RowProblem("the comment must be one line of printable text")
    expires = _expires(row.get("expires"), now)
    direction = row.get("direction", "out")
    if direction not in (*DIRECTIONS, "both"):
        raise RowProblem(f'direction {direction!r} is not "out" (to the host), "in" (from it) or "both"')
    caps = []
    for way in DIRECTIONS if direction == "both" else (direction,):
        tree = device if way == "out" else device.ingress
        if tree is None:
            raise RowProblem(f'direction "in" needs a [device.{device.name}.ingress] table')
        if way == "in" and expires is not None:
            raise RowProblem("a cap on arriving traffic has no expiry (its u32 filter has no timeout)")
        if expires is not None and any(c.host == host for c in tree.limits):
            raise RowProblem(f"{host} is capped by the config: an expiring cap would drop that cap when it lapses")
        problem = check_cap(host, rate, tree.rate)
        if problem:
            raise RowProblem(problem)
        caps.append(Cap(host, rate, device.name, "run-time", expires, comment, None, way))
    return caps


def _expires(value: Any, now: float) -> float | None:
    """An expiry as epoch seconds: ISO 8601 with a zone ("2026-12-01T00:00:00Z"), or a number."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise RowProblem(f"expires {value!r} is not a time")
    if isinstance(value, (int, float)):
        when = float(value)
    else:
        try:
            when = float(value)
        except ValueError:
            when = _iso(str(value))
    if when <= now:
        raise RowProblem(f"expires {value!r} is past: drop the row, or give a later time")
    if when - now > IPSET_MAX_TIMEOUT:
        raise RowProblem(
            f"expires {value!r} is further than ipset's longest timeout ({IPSET_MAX_TIMEOUT}s, about 24 days)"
        )
    return when


def _iso(text: str) -> float:
    try:
        parsed = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise RowProblem(
            f"expires {text!r} is not a time: write ISO 8601 with a zone (2026-12-01T00:00:00Z) or epoch seconds"
        ) from None
    if parsed.tzinfo is None:
        raise RowProblem(f"expires {text!r} has no zone: add Z or +01:00, so that it means one moment")
    return parsed.timestamp()
