"""Where shapekit keeps what it must remember, and the lock that serialises changes."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from shapekit.errors import UsageError

DEFAULT_STATE_DIR = Path("/var/lib/shapekit")


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
