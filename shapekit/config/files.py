"""Reading a file that drives root commands: never a device or a FIFO, never more than a bound, and
(as root) never one that another user can write or swap, checked before a byte is read.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from shapekit.errors import ConfigError

MAX_CONFIG_BYTES = 16 << 20  # a config is a few KiB: more is a wrong path, not a config


TOO_BIG = "larger than the {} MiB shapekit reads"


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


def read_bounded(path: Path, most: int, check_owner: bool = False) -> bytes:
    """The bytes of `path`, a regular file of at most `most` bytes (and, with `check_owner`, one only
    root can change), checked before a byte is read.

    Raises FileNotFoundError; InputProblem, saying what the path is instead (not a regular file,
    too big); ConfigError from the owner check; OSError when it cannot be read.
    """
    fd = open_input(path)
    try:
        opened = os.fstat(fd)
        problem = input_problem(opened, most)
        if problem:
            raise InputProblem(problem)
        if check_owner:
            check_not_writable_by_others(path, opened)
        raw = read_at_most(fd, most + 1)
    finally:
        os.close(fd)
    if len(raw) > most:  # its size said otherwise (/proc and the like report 0)
        raise InputProblem(TOO_BIG.format(most >> 20))
    return raw


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


def check_not_writable_by_others(path: Path, opened: os.stat_result) -> None:
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
