"""tc's units, with tc's meaning: rates in bits per second, sizes in bytes.

Rates are parsed to whole bits per second and written back in the largest
decimal unit that divides them exactly, so `512kbps` becomes `4096kbit`.
"""

from __future__ import annotations

import functools
import re
from decimal import Decimal, InvalidOperation

_RATE_UNITS: dict[str, int] = {
    "bit": 1,
    "kbit": 10**3,
    "mbit": 10**6,
    "gbit": 10**9,
    "tbit": 10**12,
    "kibit": 2**10,
    "mibit": 2**20,
    "gibit": 2**30,
    "tibit": 2**40,
    "bps": 8,
    "kbps": 8 * 10**3,
    "mbps": 8 * 10**6,
    "gbps": 8 * 10**9,
    "tbps": 8 * 10**12,
    "kibps": 8 * 2**10,
    "mibps": 8 * 2**20,
    "gibps": 8 * 2**30,
    "tibps": 8 * 2**40,
}

# Units people write that tc does not read the way they mean: name both readings.
_AMBIGUOUS_RATE = {"": "", "b": "", "k": "k", "kb": "k", "m": "m", "mb": "m", "g": "g", "gb": "g"}

# tc's own size units (tc_util.c get_size): k/kb are kilobytes there.
_SIZE_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kb": 1024,
    "m": 1024**2,
    "mb": 1024**2,
    "g": 1024**3,
    "gb": 1024**3,
    "kbit": 1024 // 8,
    "mbit": 1024**2 // 8,
    "gbit": 1024**3 // 8,
}

MIN_RATE = 8  # HTB keeps bytes/s
MAX_RATE = 10**12

_FORMAT_RATE = (("gbit", 10**9), ("mbit", 10**6), ("kbit", 10**3), ("bit", 1))

_NUMBER_UNIT = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")


_PERCENT = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*%\s*$")


class UnitError(ValueError):
    """A value that is not a valid rate or size; the message says why."""


class PercentError(UnitError):
    """A percentage where only a rate of its own makes sense; the caller says why."""


def _split(text: str | int, what: str) -> tuple[Decimal, str]:
    if isinstance(text, bool) or not isinstance(text, (str, int)):
        raise UnitError(f"{what} must be a string like '10mbit', not {text!r}")
    match = _NUMBER_UNIT.match(str(text))
    if not match:
        raise UnitError(f"{text!r} is not a {what} (expected a number and a unit, e.g. '10mbit')")
    try:
        number = Decimal(match.group(1))
    except InvalidOperation as exc:  # pragma: no cover - the regex admits only decimals
        raise UnitError(f"{text!r} is not a number") from exc
    return number, match.group(2).lower()


def _whole(number: Decimal, scale: int, text: str | int, what: str) -> int:
    value = number * scale
    if value != value.to_integral_value():
        raise UnitError(f"{text!r} is not a whole number of {what}")
    return int(value)


def parse_rate(text: str | int) -> int:
    """A tc rate ('100mbit', '512kbps') as bits per second; ambiguous units refused."""
    if isinstance(text, bool) or not isinstance(text, (str, int)):
        raise UnitError(f"rate must be a string like '10mbit', not {text!r}")
    if is_percent(text):
        raise PercentError(f"{text!r} is a percentage, which only a class's rate and ceil take")
    return _parse_rate(text)


def is_percent(text: object) -> bool:
    """Whether `text` is written as a percentage ('40%', '12.5 %', and also '%' or '0%' to be refused)."""
    return isinstance(text, str) and text.rstrip().endswith("%")


def parse_percent(text: str, whole: int) -> int:
    """'40%' of `whole` bits/s, rounded down to whole bits/s (tc takes integers; down never exceeds `whole`)."""
    match = _PERCENT.match(text)
    if not match:
        raise UnitError(f"{text!r} is not a percentage (expected a number above 0 and up to 100, e.g. '40%')")
    share = Decimal(match.group(1))
    if not 0 < share <= 100:
        raise UnitError(f"{text!r} is out of range: a share of the parent's ceil is above 0% and up to 100%")
    bits = int(share * whole / 100)  # int() of a positive Decimal rounds down
    if bits < MIN_RATE:
        raise UnitError(f"{text!r} of {format_rate(whole)} is below 8bit (one byte/s), the least HTB takes")
    return bits


@functools.lru_cache(maxsize=1024)  # configs repeat the same few rates thousands of times
def _parse_rate(text: str | int) -> int:
    number, unit = _split(text, "rate")
    if unit in _AMBIGUOUS_RATE:
        prefix = _AMBIGUOUS_RATE[unit]
        raise UnitError(
            f"{text!r} is ambiguous: write '{number}{prefix}bit' ({prefix}bits/s) "
            f"or '{number}{prefix}bps' ({prefix}bytes/s)"
        )
    if unit not in _RATE_UNITS:
        raise UnitError(
            f"{text!r} has an unknown rate unit {unit!r} (use bit, kbit, mbit, gbit, "
            "or bps, kbps, mbps, gbps for bytes/s)"
        )
    bits = _whole(number, _RATE_UNITS[unit], text, "bits/s")
    if bits <= 0:
        raise UnitError(f"{text!r} is zero: a rate must be above 0")
    if bits < MIN_RATE:
        raise UnitError(f"{text!r} is below 8bit (one byte/s), the least HTB takes")
    if bits > MAX_RATE:
        raise UnitError(f"{text!r} is above 1tbit, more than any line shapekit shapes")
    return bits


def format_rate(bits: int) -> str:
    """Bits per second in the largest decimal tc unit that divides them exactly."""
    for unit, scale in _FORMAT_RATE:
        if bits % scale == 0:
            return f"{bits // scale}{unit}"
    raise AssertionError("unreachable: every integer is a whole number of bits")


def parse_size(text: str | int) -> int:
    """A tc size ('5k', '1600b', 1514) as bytes, with tc's meaning (k = 1024 bytes)."""
    number, unit = _split(text, "size")
    if unit not in _SIZE_UNITS:
        raise UnitError(f"{text!r} has an unknown size unit {unit!r} (use b, k, m, g or kbit, mbit)")
    size = _whole(number, _SIZE_UNITS[unit], text, "bytes")
    if size <= 0:
        raise UnitError(f"{text!r} is zero: a size must be above 0")
    return size


_DURATION = re.compile(r"^(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$", re.ASCII)  # 0-9 only, as tc


def parse_duration(text: str) -> int:
    """'90s', '2h', '1d', '1h30m' as seconds."""
    match = _DURATION.match(text.strip().lower())
    if not text.strip() or not match:
        raise UnitError(f"{text!r} is not a duration: write e.g. 90s, 30m, 2h, 1d or 1h30m")
    days, hours, minutes, seconds = (int(g or 0) for g in match.groups())
    total = ((days * 24 + hours) * 60 + minutes) * 60 + seconds
    if total <= 0:
        raise UnitError(f"{text!r} is zero: a duration must be above 0")
    return total
