"""The only place a process starts.

It runs plans (`tc -batch`, `iptables-restore --noflush`, `ipset restore`), prints them
instead under `--dry-run`, echoes them under `-v`, and keeps the journal that puts a
failed run's changes back (`transaction`): never half-applied.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TextIO

from shapekit.errors import CommandFailed, Interrupted, ShapekitError, UsageError
from shapekit.plan.mangle import TOOLS
from shapekit.plan.tree import (
    Argv,
    batch_text,
    shell_script,
)

# The Debian package that ships each binary shapekit runs.
PACKAGES = {"tc": "iproute2", "ip": "iproute2", "unshare": "util-linux", "ipset": "ipset"} | {
    tool: "iptables" for tools in TOOLS.values() for tool in tools
}


BATCH_FAILED_LINE = re.compile(r"^Command failed -:(\d+)\s*$", re.MULTILINE)
TC_BATCH_LINES = 10_000  # lines of one `tc -batch`: tc's memory grows with them (see Runner.tc_batch)


def run_command(argv: Sequence[str], stdin: str | None = None) -> str:
    """Run one process; its stdout, or CommandFailed with its stderr."""
    import sh  # slow to import (~60 ms): only commands that run something pay for it

    try:
        command = sh.Command(argv[0])
    except sh.CommandNotFound:
        raise UsageError(missing_binary(argv[0])) from None
    try:
        return str(command(*argv[1:], _in=stdin, _tty_out=False, _env=_c_locale()))
    except sh.ErrorReturnCode as exc:
        raise CommandFailed(shlex.join(argv), exc.stderr.decode(errors="replace")) from None


def _lines_on(stderr: str, lines: int) -> str:
    """tc's "Command failed -:N" of a batch that came after `lines` others, numbered among all of them."""
    match = BATCH_FAILED_LINE.search(stderr)
    if match is None:
        return stderr
    return f"{stderr[: match.start(1)]}{lines + int(match.group(1))}{stderr[match.end(1) :]}"


def _c_locale() -> dict[str, str]:
    # Error text we parse (tc's "Command failed -:N") must not be translated.
    return {**os.environ, "LC_ALL": "C"}


def missing_binary(name: str) -> str:
    package = PACKAGES.get(name, name)
    return f"`{name}` is not installed or not in PATH: install it (apt-get install {package})"


@dataclass
class Journal:
    """What one run changed, in order, each with how to put it back.

    A put-back makes its part as it was before the run, from what was read
    before and what is there now, so it also serves a step that failed
    half-way: tc and ipset run a batch up to the failing line. Under
    --dry-run nothing changes, so nothing is recorded.
    """

    dry_run: bool = False
    steps: list[tuple[str, Callable[[], None]]] = field(default_factory=list)
    signals: list[int] = field(default_factory=list)  # caught while the run changes things

    def change(self, what: str, do: Callable[[], None], put_back: Callable[[], None], atomic: bool = False) -> None:
        """Run one step. An atomic one (iptables-restore) is put back only once it has happened."""
        if self.signals:
            raise Interrupted(self.signals[0], "")
        if not atomic and not self.dry_run:
            self.steps.append((what, put_back))
        try:
            do()
        except UsageError:  # the step itself found bad input, before changing anything
            if not atomic and not self.dry_run:
                self.steps.pop()
            raise
        if atomic and not self.dry_run:
            self.steps.append((what, put_back))
        if self.signals:
            raise Interrupted(self.signals[0], "")

    def roll_back(self) -> str:
        """Put back every step, newest first; how that went, as words for the error's one line."""
        if not self.steps:
            return "nothing was changed"
        for n, (what, put_back) in enumerate(reversed(self.steps)):
            try:
                put_back()
            except (ShapekitError, OSError) as exc:
                left = ", ".join(w for w, _ in reversed(self.steps[: len(self.steps) - n]))
                return f"putting back {what} failed too: {exc}; left changed: {left}"
        return "put back as before: " + ", ".join(w for w, _ in self.steps)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextmanager
def transaction(runner: Runner) -> Iterator[Journal]:
    """A run that completes, or whose every change is put back: never half-applied.

    Every bad input is found before the first change; should one still come
    late, what was changed is put back first and the line says so. A signal
    (Ctrl-C, systemd's or `timeout`'s SIGTERM) stops the run between two
    steps, never inside one, and what it changed is put back, a second
    signal not stopping that.
    """
    journal = Journal(dry_run=runner.dry_run)
    with caught_signals(journal.signals), _put_back_on_failure(journal):
        yield journal


@contextmanager
def caught_signals(caught: list[int]) -> Iterator[list[int]]:
    """Ctrl-C, SIGTERM and SIGHUP recorded in `caught` instead of raised: a run stops between two steps."""
    previous = {s: signal.signal(s, lambda signum, _: caught.append(signum)) for s in STOP_SIGNALS}
    try:
        yield caught
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextmanager
def _put_back_on_failure(journal: Journal) -> Iterator[None]:
    """Every step of `journal` put back when the run fails or is stopped; the one line says how that went."""
    try:
        yield
    except CommandFailed as exc:
        outcome = journal.roll_back()
        if journal.signals:  # the signal reached the running tool too
            raise Interrupted(journal.signals[0], outcome) from None
        raise exc.then(outcome) from None
    except Interrupted as exc:
        raise Interrupted(exc.exit_code - 128, journal.roll_back()) from None
    except ShapekitError as exc:
        if journal.steps:
            exc.args = (f"{exc}; {journal.roll_back()}",)
        raise
    except BaseException:  # a bug: nothing may stay half-done either
        journal.roll_back()
        raise


def in_order(*steps: Callable[[], None]) -> Callable[[], None]:
    """One put-back made of several, run in this order."""

    def run() -> None:
        for step in steps:
            step()

    return run


@dataclass
class Runner:
    """Runs plans, or prints them (`dry_run`), echoing each command when `verbose`."""

    dry_run: bool = False
    verbose: bool = False
    out: TextIO = field(default_factory=lambda: sys.stdout)
    err: TextIO = field(default_factory=lambda: sys.stderr)

    @property
    def privileged(self) -> bool:
        """Whether root-only state (netfilter, ipset) can be read: a dry-run may run as anyone."""
        return not self.dry_run or os.geteuid() == 0

    def note(self, text: str) -> None:
        """A remark in the printed script (dry-run only)."""
        if self.dry_run:
            self.out.write(f"# {text}\n")

    def remark(self, text: str) -> None:
        """Something left alone on purpose: in the printed script (dry-run), or on stderr under -v."""
        if self.dry_run:
            self.out.write(f"# {text}\n")
        elif self.verbose:
            self.err.write(f"# {text}\n")

    def query(self, argv: Argv, stdin: str | None = None) -> str:
        """A read-only command: it runs under --dry-run too."""
        return run_command(argv, stdin)

    def tc_batch(self, header: str, cmds: list[Argv]) -> None:
        """One `tc -batch` of `cmds`, or several of TC_BATCH_LINES each: tc keeps about 4 KB a line until it
        exits (100,000 class adds: 400 MB in one tc). A failure names its line among all of `cmds`."""
        if not cmds or self._shown(header, cmds):
            return
        for start in range(0, len(cmds), TC_BATCH_LINES):
            try:
                run_command(("tc", "-batch", "-"), batch_text(cmds[start : start + TC_BATCH_LINES]))
            except CommandFailed as exc:
                raise CommandFailed(exc.command, _lines_on(exc.stderr, start), exc.outcome) from None

    def run_each(self, header: str, cmds: list[Argv]) -> None:
        """Commands that have no batch mode (`ip link`), one process each."""
        if cmds and not self._shown(header, cmds):
            for cmd in cmds:
                run_command(cmd)

    def _shown(self, header: str, cmds: list[Argv]) -> bool:
        """Print the commands under --dry-run (True: do not run them); echo them under -v."""
        if self.dry_run:
            self.out.write(shell_script(header, cmds))
            return True
        if self.verbose:
            self.err.write("".join(f"+ {shlex.join(cmd)}\n" for cmd in cmds))
        return False

    def restore(self, family: int, header: str, text: str, noflush: bool = True) -> None:
        """One `iptables-restore --noflush` (or ip6tables-): one transaction. Without --noflush
        it replaces each table it names (iptables-nft deletes a table named with nothing in it)."""
        self.feed((TOOLS[family][1], "--noflush") if noflush else (TOOLS[family][1],), header, text)

    def feed(self, argv: Argv, header: str, text: str) -> None:
        """Run a tool that reads its commands on stdin (iptables-restore, ipset restore)."""
        if not text:
            return
        if self.dry_run:
            self.out.write(f"# {header}\n{shlex.join(argv)} <<'EOF'\n{text}EOF\n")
            return
        if self.verbose:
            self.err.write(f"+ {shlex.join(argv)} <<'EOF'\n{text}EOF\n")
        run_command(argv, text)
