"""shape-import: read the shaping a hand-written script left in the kernel and write the config that rebuilds it.

It only reads (tc, iptables-save, ip addr): it never changes the kernel.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import stat
import tempfile
from pathlib import Path
from typing import Annotated, Optional

import typer

from shapekit.commands import common
from shapekit.config.load import parse_config_text
from shapekit.errors import ConfigError, ShapekitError, UsageError
from shapekit.kernel import hand_made, probe, read, run
from shapekit.plan import adopt
from shapekit.plan.mangle import FAMILIES, TOOLS

LEFT_OUT = 3  # the exit status when something is only a comment (0: everything expressed)


class _EchoingRunner(run.Runner):
    """shape-import's -v: each read, as it runs."""

    def query(self, argv: run.Argv) -> str:
        if self.verbose:
            self.err.write(f"+ {shlex.join(argv)}\n")
        return super().query(argv)


def import_config(runner: run.Runner, devs: list[str]) -> adopt.Imported:
    """Read the kernel and translate it; the config is checked as shape-init would check it."""
    probe.require_binaries(["tc", "ip", *(TOOLS[f][0] for f in FAMILIES)])
    if os.geteuid() != 0:
        raise UsageError("reading the mangle tables (iptables-save) needs root: run shape-import as root")
    roots = _roots(runner)
    redirects = {ifb: dev for dev in roots if (ifb := hand_made.redirect_target(runner, dev)) is not None}
    unread: dict[str, str] = {}
    if devs:
        trees = [_device(runner, dev, redirects) for dev in dict.fromkeys(devs)]
    else:
        trees = _every_device(runner, roots, redirects, unread)
    reading = adopt.KernelReading(
        devices=tuple(trees),
        unread=unread,
        mangle={f: runner.query((TOOLS[f][0], "-t", "mangle")) for f in FAMILIES},
        addresses=runner.query(("ip", "-j", "addr", "show")),
    )
    imported = adopt.adopt(reading)
    try:
        parse_config_text(imported.text, Path("<shape-import>"))
    except ConfigError as exc:
        raise ShapekitError(f"the config it wrote is one shapekit refuses, a bug in shape-import: {exc}") from None
    return imported


def _roots(runner: run.Runner) -> dict[str, str]:
    """Each device's root qdisc kind."""
    qdiscs = json.loads(runner.query(("tc", "-j", "qdisc", "show")) or "[]")
    return {q["dev"]: q["kind"] for q in qdiscs if q.get("root") and "dev" in q}


def _every_device(
    runner: run.Runner, roots: dict[str, str], redirects: dict[str, str], unread: dict[str, str]
) -> list[adopt.TreeReading]:
    """Every device with an HTB root but the IFBs others redirect to (read with their device); in `unread`, the
    devices shaped some way shape-import does not read, and why."""
    trees = []
    for dev, kind in roots.items():
        if kind in adopt.SHAPING_ROOTS:
            unread[dev] = f"its root qdisc is {kind}: shape-import reads HTB trees"
        if kind != "htb" or dev in redirects:
            continue
        try:
            trees.append(_device(runner, dev, redirects))
        except UsageError as exc:
            unread[dev] = str(exc)
    for ifb, dev in redirects.items():
        if roots.get(ifb) == "htb" and roots.get(dev) != "htb":
            unread[dev] = (
                f"only what arrives is shaped (on {ifb}); shapekit shapes what a device sends too: give {dev} an HTB root, then import again"
            )
    if not trees:
        others = "; ".join(f"{d}: {why}" for d, why in unread.items())
        raise UsageError(f"no device here has an HTB tree to import ({others or 'name one with --dev'})")
    return trees


def _device(runner: run.Runner, dev: str, redirects: dict[str, str]) -> adopt.TreeReading:
    probe.require_devices([dev])
    if dev in redirects:
        raise UsageError(
            f"{dev} shapes what arrives on {redirects[dev]}: import {redirects[dev]} (--dev {redirects[dev]})"
        )
    root = read.read_root(runner, dev)
    if root.kind != "htb":
        raise UsageError(f"{dev} has no HTB root qdisc (its root is {root.kind}): shape-import reads HTB trees")
    tree = hand_made.read_hand_made_tree(runner, dev)
    if not adopt.has_classes(tree):
        raise UsageError(f"{dev}'s HTB root qdisc has no classes: there is no shaping to import")
    target = next((ifb for ifb, by in redirects.items() if by == dev), None)
    if target and read.device_exists(target) and read.read_root(runner, target).kind == "htb":
        return dataclasses.replace(tree, ifb=hand_made.read_hand_made_tree(runner, target))
    return tree


def write_output(text: str, output: Path | None, force: bool) -> None:
    """The config on stdout, or in `output`, whole or not at all: a new regular file (a file there stays unless
    --force; a device, directory or link is never replaced)."""
    if output is None:
        typer.echo(text, nl=False)
        return
    try:
        there = output.lstat()
    except FileNotFoundError:
        there = None
    except OSError as exc:
        raise UsageError(f"cannot write {output}: {exc.strerror or exc}") from None
    if there is not None and not stat.S_ISREG(there.st_mode):
        raise UsageError(
            f"{output} is not a regular file (a device, a directory or a link): choose a new path for --output"
        )
    if there is not None and not force:
        raise UsageError(f"{output} exists: choose another --output, or pass --force to replace it")
    temporary = None
    try:
        fd, temporary = tempfile.mkstemp(prefix=f".{output.name}.", dir=output.parent)
        with os.fdopen(fd, "w") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, 0o644)
        os.replace(temporary, output)
    except OSError as exc:
        if temporary is not None and os.path.lexists(temporary):
            os.unlink(temporary)
        raise UsageError(f"cannot write {output}: {exc.strerror or exc}") from None


def _dry_run(devs: list[str]) -> None:
    """What shape-import reads, as a script: it changes nothing whatever it is given."""
    lines = ["# shape-import reads these and changes nothing:"]
    for dev in devs or ["DEV"]:
        lines += [f"tc -j -d qdisc show dev {shlex.quote(dev)}", f"tc -d class show dev {shlex.quote(dev)}"]
        lines += [
            f"tc filter show dev {shlex.quote(dev)} parent HANDLE:   # each HTB qdisc",
            f"tc -j filter show dev {shlex.quote(dev)} ingress",
        ]
    lines += [f"{TOOLS[f][0]} -t mangle" for f in FAMILIES] + ["ip -j addr show"]
    typer.echo("\n".join(lines))


import_app = common.new_app()


@import_app.command()
def shape_import(
    dev: common.DevOption = None,
    output: Annotated[
        Optional[Path], common.output_option("Write the config here (new file) instead of stdout.")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace FILE if it exists.")] = False,
    dry_run: common.DryRunOption = False,
    verbose: common.VerboseOption = False,
    version: common.VersionOption = False,
) -> None:
    """Read the shaping a hand-written script (tc, iptables) left in the kernel
    and print the shapekit config that rebuilds it. It changes nothing.

    Reads each device's HTB tree (all devices with an HTB root, or --dev):
    classes with rate, ceil, prio, burst, cburst and quantum, nested HTB qdiscs
    (flattened into one tree), leaf qdiscs, fw and u32 filters, an ingress
    redirect to an IFB and its tree; and the MARK, CONNMARK and CLASSIFY rules
    of the mangle tables. A mark that ends unshaped at the line rate becomes
    [bypass]; a class one host's rule fills at rate = ceil, a cap in
    [device.X.limits]; the rules, [[mark]] in first-match order. Whatever
    shapekit cannot express is kept as a comment starting LEFT OUT, with the
    script's line and why.

    Then: shape-init --dry-run --config FILE, and the boot sequence.

    Exit status: 0 everything expressed; 3 something left in comments;
    2 bad input (no such device, no HTB root, not root); 1 a read failed.
    """
    devs = dev or []
    if dry_run:
        _dry_run(devs)
        return
    runner = _EchoingRunner(verbose=verbose)

    def run_import() -> None:
        imported = import_config(runner, devs)
        write_output(imported.text, output, force)
        if imported.left_out:
            typer.echo(f"shape-import: {imported.left_out} thing(s) left in comments (LEFT OUT): review them", err=True)
            raise typer.Exit(LEFT_OUT)

    common.reported("shape-import", run_import)


def import_main() -> None:
    common.console(import_app, "shape-import")
