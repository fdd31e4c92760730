"""Where shapekit keeps what it must remember, and the lock that serialises changes."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shapekit.addresses import Network, PortProto, ValueProblem, parse_host, parse_port_proto
from shapekit.config_rules import Cap
from shapekit.errors import UsageError
from shapekit.units import UnitError, format_rate, parse_rate

DEFAULT_STATE_DIR = Path("/var/lib/shapekit")
BYPASS_FILE = "bypass.json"
LIMITS_FILE = "limits.json"


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
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise UsageError(f"state file {path} is unreadable ({exc}): fix it or remove it to start afresh") from None
    if not isinstance(data, dict):
        raise UsageError(f"state file {path} is not a JSON object: fix it or remove it to start afresh")
    return data


def write_state(path: Path, data: dict[str, Any]) -> None:
    """Replace a state file atomically: readers see the old file or the new one, never half."""
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as out:
            json.dump(data, out, indent=2, sort_keys=True)
            out.write("\n")
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _list(data: dict[str, Any], key: str) -> list[Any]:
    value = data.get(key, [])
    if not isinstance(value, list):
        raise TypeError(f"{key!r} is not a list")
    return value


@dataclass(frozen=True)
class RuntimeBypass:
    """Bypass entries added with `shape-bypass add`, kept in bypass.json."""

    ports: tuple[PortProto, ...] = ()
    hosts: tuple[Network, ...] = ()

    @classmethod
    def load(cls, directory: Path) -> RuntimeBypass:
        path = directory / BYPASS_FILE
        data = read_state(path)
        try:
            return cls(
                ports=tuple(parse_port_proto(p) for p in _list(data, "ports")),
                hosts=tuple(parse_host(h) for h in _list(data, "hosts")),
            )
        except (ValueProblem, TypeError) as exc:
            raise UsageError(f"state file {path}: {exc}: fix it or remove it to start afresh") from None

    def save(self, directory: Path) -> None:
        write_state(
            directory / BYPASS_FILE, {"ports": [str(p) for p in self.ports], "hosts": [str(h) for h in self.hosts]}
        )


def load_caps(directory: Path) -> list[Cap]:
    """Caps added with `shape-limit-ip add`, kept in limits.json (lapsed ones included)."""
    path = directory / LIMITS_FILE
    try:
        return [
            Cap(
                host=parse_host(item["host"]),
                rate=parse_rate(item["rate"]),
                dev=str(item["dev"]),
                source="run-time",
                expires=_expires(item.get("expires")),
                comment=str(item.get("comment", "")),
                minor=item.get("minor"),
                direction=_direction(item.get("direction", "out")),
            )
            for item in _list(read_state(path), "caps")
        ]
    except (KeyError, TypeError, ValueProblem, UnitError) as exc:
        raise UsageError(f"state file {path}: bad entry ({exc}): fix it or remove it to start afresh") from None


def _direction(value: Any) -> str:
    if value not in ("out", "in"):
        raise TypeError(f"direction {value!r} is not 'out' or 'in'")
    return str(value)


def _expires(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 2**40:
        raise TypeError(f"expires {value!r} is not a time")
    return float(value)


def save_caps(directory: Path, caps: list[Cap]) -> None:
    items = [
        {
            "host": str(c.host),
            "rate": format_rate(c.rate),
            "dev": c.dev,
            "expires": c.expires,
            "comment": c.comment,
            "minor": c.minor,
            "direction": c.direction,
        }
        for c in caps
    ]
    write_state(directory / LIMITS_FILE, {"caps": items})
