"""shape-flush: remove everything shapekit installed, and nothing else."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated

import typer

from shapekit.commands import common
from shapekit.errors import CommandFailed
from shapekit.kernel import change, probe, read, run
from shapekit.plan import gso as plan_gso
from shapekit.plan import hosts as plan_hosts
from shapekit.plan import limits as plan_limits
from shapekit.plan import tree as plan
from shapekit.plan.gso import Held
from shapekit.state import (
    BYPASS_FILE,
    LIMITS_FILE,
    load_created_tables,
    load_held_gso,
    save_created_tables,
    save_held_gso,
    state_dir,
)


def flush(options: common.Options, devs: list[str], forget: bool) -> None:
    """shape-flush: remove shapekit's trees, IFBs, chains and jumps (only the named devices' trees with --dev)."""
    probe.require_root(options.dry_run, "shape-flush")
    probe.require_binaries(["tc", "ip"] if devs else ["tc", "ip", *probe.MANGLE_TOOLS])
    probe.require_devices(devs)
    runner = options.runner()
    with options.lock():
        created = set() if devs else load_created_tables(state_dir())  # a broken file: refused before any change
        held = load_held_gso(state_dir())
        ifbs = read.shapekit_ifbs(runner)
        names = devs or read.devices_with_root(runner, plan.root_handle(), "htb")
        for dev in names:
            if dev not in ifbs:  # an IFB goes whole, below
                runner.tc_batch(f"{dev}: remove shapekit's tree", plan.plan_flush(dev, read.read_root(runner, dev)))
        for ifb, owner in ifbs.items():
            if not devs or owner in devs:
                change.remove_ingress(runner, owner, ifb)
        if not devs:
            change.flush_mangle(runner, created)
            if created and not options.dry_run:
                save_created_tables(state_dir(), set())  # shapekit's chains are gone: nothing left to decide
            if shutil.which("ipset"):  # sets go after the rules that use them
                names = read.list_sets(runner)
                text = plan_limits.plan_destroy_sets(names) + plan_hosts.plan_sets_removal(names, plan_hosts.every_run)
                change.ipset_restore(runner, "remove shapekit's sets", text)
        _release_gso(runner, devs, held)  # last: the rest of shapekit is gone even if the kernel refuses it
        if forget:
            for path in (state_dir() / name for name in (BYPASS_FILE, LIMITS_FILE)):
                if path.exists():
                    runner.note(f"--forget: delete {path}")  # what --dry-run prints
                if not options.dry_run:
                    _forget(path)


def _release_gso(runner: run.Runner, devs: list[str], held: dict[str, Held]) -> None:
    """Put back the gso_max_segs shape-init held (where nobody set another since); forget the devices done."""
    released = [dev for dev in held if not devs or dev in devs]
    for dev in released:
        if read.device_exists(dev):  # a device gone took its setting with it
            cmds = plan_gso.release(dev, read.read_gso(runner, dev), held[dev])
            runner.run_each(f"{dev}: put back its gso_max_segs", cmds)
    if released and not runner.dry_run:
        save_held_gso(state_dir(), {dev: h for dev, h in held.items() if dev not in released})


def _forget(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        raise CommandFailed(f"removing {path}", exc.strerror or str(exc), "the kernel's shaping is removed") from None


flush_app = common.new_app()


@flush_app.command()
def shape_flush(
    dev: common.DevOption = None,
    forget: Annotated[bool, typer.Option("--forget", help="Also delete the saved run-time entries (bypass).")] = False,
    config: common.ConfigOption = None,
    dry_run: common.DryRunOption = False,
    verbose: common.VerboseOption = False,
    version: common.VersionOption = False,
) -> None:
    """Remove everything shapekit installed, and nothing else: its root qdisc (handle 5c:)
    on every device that has one, its IFB devices (alias "shapekit ingress of X")
    with their redirect from X (and X's ingress qdisc when no other filter is on
    it), its mangle chains (SHAPEKIT*, and the SKHOSTS* of shape-status --hosts) and the jumps to them, in iptables and
    ip6tables, and its ipsets. A mangle table goes too when a shapekit command
    created it (iptables-nft) and nothing but shapekit's chains is in it.
    Last, each device's gso_max_segs that shape-init held goes back to its
    value before (gso.json), unless someone has set another since.

    With --dev, only those devices' trees (and IFBs) go; the chains stay for the
    other devices. Run-time entries stay saved (the boot sequence re-applies them)
    unless --forget. Needs no config.

    Exit status: 0 done; 2 bad input, nothing changed; 1 a system command failed.
    """

    common.reported("shape-flush", lambda: flush(common.make_options(config, dry_run, verbose), dev or [], forget))


def flush_main() -> None:
    common.console(flush_app, "shape-flush")
