"""shape-init: each device's HTB tree (egress, and ingress on an IFB); --check compares instead."""

from __future__ import annotations

import contextlib
import os
import time
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from shapekit.commands import common, limit_ip
from shapekit.config.model import Config, Device
from shapekit.config.rules import Bypass, Cap
from shapekit.errors import CommandFailed, UsageError
from shapekit.kernel import change, probe, read, run
from shapekit.plan import drift, status
from shapekit.plan import gso as plan_gso
from shapekit.plan import ingress as plan_ingress
from shapekit.plan import limits as plan_limits
from shapekit.plan import mangle as plan_mangle
from shapekit.plan import tree as plan
from shapekit.plan.gso import Held
from shapekit.plan.limits import PlacedCap, place_caps
from shapekit.plan.mangle import EVERY, FAMILIES, MARK
from shapekit.state import RuntimeBypass, load_held_gso, save_caps, save_held_gso, save_last_init, state_dir


def init(options: common.Options, devs: list[str], skip_unknown: bool = False, skip_absent: bool = False) -> None:
    """shape-init: replace shapekit's trees (egress, and ingress on an IFB) on each selected device."""
    config = options.load()
    if skip_unknown and devs:
        devs = [d for d in devs if d in config.devices]
        if not devs:
            return
    devices = tree_devices(config, devs, skip_absent)
    runner = check_trees(options, devices)
    with options.lock():
        bypass = common.merged_bypass(config, RuntimeBypass.load(state_dir()))
        saved, now = common.saved_caps(config), time.time()
        flat = [d for d in devices if probe.built_flat(runner, d.name)]
        placed = {t.name: place_caps(t, saved, now) for d in config.devices.values() for t in d.trees}
        build_trees(runner, config, devices, bypass, placed)
        if flat:
            _move_caps_into_groups(options, runner, config, flat, bypass, placed, now)
        if not options.dry_run:
            _record_finished()


def _move_caps_into_groups(
    options: common.Options,
    runner: run.Runner,
    config: Config,
    devices: list[Device],
    bypass: Bypass,
    placed: dict[str, list[PlacedCap]],
    now: float,
) -> None:
    """After rebuilding trees whose caps were flat: their cap sets' entries and the cap rule made the groups'
    (each entry carries its group's mark bits, which the old rule did not set), in one transaction; the
    run-time caps saved with their new places."""
    before = {d.name: read.read_sets(runner, d.name) for d in devices}
    installed = [d for d in devices if any(entries is not None for entries in before[d.name].values())]
    with run.transaction(runner) as journal:
        for device in installed:  # else shape-limit-ip has not run since boot: it makes them
            limit_ip.put_sets(runner, journal, device, placed[device.name], now, before[device.name])
        if installed:
            rules = {f: plan_mangle.limit_plan(config, bypass, f) for f in FAMILIES}
            common.install_mangle(runner, rules, plan_limits.LIMIT, journal)
        if not options.dry_run:
            save_caps(
                state_dir(), limit_ip.caps_to_save(common.live_caps(common.saved_caps(config), now), config, placed)
            )


def boot(options: common.Options, devs: list[str], skip_absent: bool) -> None:
    """shape-init --all: the whole boot sequence in one process, under one lock.

    It leaves the kernel as shape-init, shape-bypass, shape-mark and
    shape-limit-ip in that order do, with their checks and undo: every check
    of the four first; the trees as shape-init builds them (the caps' classes
    and the ingress trees' filters included; a device whose tree fails is
    left unshaped); then one transaction, as shape-limit-ip's: the cap sets
    (of devices away too, as shape-limit-ip makes them),
    and every shapekit chain in one iptables-restore per family instead of
    three, put back as they were if a step fails.
    """
    config = options.load()
    devices = tree_devices(config, devs, skip_absent)
    runner = check_trees(options, devices)
    common.check_mangle(options, "shape-init", config)
    probe.require_binaries(["ipset"])
    probe.probe_caps()
    with options.lock():
        now = time.time()
        saved = common.saved_caps(config)
        bypass = common.merged_bypass(config, RuntimeBypass.load(state_dir()))
        common.probe_mangle({f: plan_mangle.mark_plan(config, bypass, f) for f in FAMILIES}, MARK)
        # Every device's caps, also those away (their sets are named by the rules; their classes come with their trees).
        placed = {t.name: place_caps(t, saved, now) for d in config.devices.values() for t in d.trees}
        build_trees(runner, config, devices, bypass, placed)
        before = {name: read.read_sets(runner, name) for name in config.devices}
        with run.transaction(runner) as journal:
            for device in config.devices.values():
                limit_ip.put_sets(runner, journal, device, placed[device.name], now, before[device.name])
            rules = {f: plan_mangle.boot_plan(config, bypass, f) for f in FAMILIES}
            common.install_mangle(runner, rules, EVERY, journal)
            if not options.dry_run:
                save_caps(state_dir(), limit_ip.caps_to_save(common.live_caps(saved, now), config, placed))
        if not options.dry_run:
            _record_finished()


def _record_finished() -> None:
    """When this shape-init finished, for shape-status's metric: the trees are built whether or not it is
    written (a read-only state directory), so a failure is a warning."""
    try:
        save_last_init(state_dir(), time.time())
    except CommandFailed as exc:
        typer.echo(f"shape-init: warning: {exc} (the trees are built; shape-status keeps the last time)", err=True)


def tree_devices(config: Config, devs: list[str], skip_absent: bool) -> list[Device]:
    devices = common.select_devices(config, devs)
    if skip_absent:  # at boot: a USB, PPP or VPN device that is not there yet gets its tree when it comes
        devices = [d for d in devices if read.device_exists(d.name)]
    return devices


def check_trees(options: common.Options, devices: list[Device]) -> run.Runner:
    """Refuse, before any change, what would stop these devices' trees: not root, a missing tool, device or
    kernel feature, an IFB name or ingress filter that is not shapekit's."""
    ingress = [d.ingress for d in devices if d.ingress is not None]
    probe.require_root(options.dry_run, "shape-init")
    probe.require_binaries(["tc", "ip"])
    probe.require_devices([d.name for d in devices])
    runner = options.runner()
    probe.probe_kernel(plan.kernel_features([tree for d in devices for tree in d.trees]))
    probe.probe_ingress([tree.key for tree in ingress])
    probe.require_own_ifbs(runner, ingress)
    return runner


def build_trees(
    runner: run.Runner, config: Config, devices: list[Device], bypass: Bypass, placed: dict[str, list[PlacedCap]]
) -> None:
    """Each device's trees, with the caps `placed` (by tree) as classes and ingress filters. Hold the lock."""
    ifbs = {owner: ifb for ifb, owner in read.shapekit_ifbs(runner).items()}
    held = load_held_gso(state_dir())
    # Every plan first: a cap that cannot be placed is refused before anything changes.
    plans = []
    for device in devices:
        current = read.read_root(runner, device.name)
        caps = plan_limits.cap_tree(device, placed[device.name])
        inbound = (
            _ingress_tree(runner, config, device.ingress, bypass, placed[device.ingress.name]) if device.ingress else []
        )
        gso = _plan_gso(runner, device, held)
        plans.append((device, plan.plan_init(device, config.bypass, current) + caps, inbound, gso))
    for device, egress, inbound, (gso_cmds, after) in plans:
        change.apply_tree(runner, device.name, egress)
        if device.ingress is None and device.name in ifbs:  # ingress shaping taken out of the config
            change.remove_ingress(runner, device.name, ifbs[device.name])
        if device.ingress is not None:
            change.apply_ingress(runner, device.ingress, inbound)
        held = _hold_gso(runner, device.name, gso_cmds, after, held)  # last: a failed ingress tree leaves it as it was


def _read_gso(runner: run.Runner, device: Device, held: dict[str, Held]) -> plan_gso.Gso | None:
    """The device's gso_max_segs when shapekit may hold it or holds it (None: neither, so not read)."""
    if plan_gso.wanted_segs(device) is None and device.name not in held:
        return None
    return read.read_gso(runner, device.name)


def _plan_gso(runner: run.Runner, device: Device, held: dict[str, Held]) -> tuple[list[plan.Argv], Held | None]:
    """The device's gso_max_segs commands and what shapekit holds after them."""
    now = _read_gso(runner, device, held)
    if now is None:
        return [], None
    return plan_gso.plan_hold(device.name, plan_gso.wanted_segs(device), now, held.get(device.name))


def _hold_gso(
    runner: run.Runner, dev: str, cmds: list[plan.Argv], after: Held | None, held: dict[str, Held]
) -> dict[str, Held]:
    """Hold the device's GSO super-packets as its config asks (after its tree): recorded first, so that
    shape-flush can put the value back whatever stops this run; the record put back if the change fails."""
    others = {name: h for name, h in held.items() if name != dev}
    now = others if after is None else {**others, dev: after}
    recorded = not runner.dry_run and now != held
    try:
        change.hold_gso(runner, dev, cmds, record=lambda: save_held_gso(state_dir(), now) if recorded else None)
    except CommandFailed:
        if recorded:
            with contextlib.suppress(CommandFailed):  # the record as it was; the hold's own error is the one to tell
                save_held_gso(state_dir(), held)
        raise
    return now


def _ingress_tree(
    runner: run.Runner, config: Config, tree: Device, bypass: Bypass, placed: list[PlacedCap]
) -> list[plan.Argv]:
    """An ingress tree's whole build on its IFB: the HTB tree, the caps' classes, the u32 filters."""
    current = read.read_root(runner, tree.name) if read.device_exists(tree.name) else plan.KERNEL_DEFAULT
    return (
        plan.plan_init(tree, config.bypass, current)
        + plan_limits.cap_tree(tree, placed)
        + plan_ingress.plan_filters(tree, config, bypass, placed)
    )


def check_drift(options: common.Options, devs: list[str]) -> list[str]:
    """shape-init --check: every way the kernel differs from the config and saved state; changes nothing."""
    config = options.load()
    devices = common.select_devices(config, devs)
    if os.geteuid() != 0:
        raise UsageError("--check reads the kernel's netfilter and ipset state: run it as root")
    probe.require_binaries(["tc", "ip", "ipset", "unshare", *probe.MANGLE_TOOLS])
    probe.require_devices([d.name for d in devices])
    runner = options.runner()
    now = time.time()
    saved = common.saved_caps(config)
    bypass = common.merged_bypass(config, RuntimeBypass.load(state_dir()))
    placed = {t.name: place_caps(t, saved, now) for d in config.devices.values() for t in d.trees}
    differences = []
    ifbs = {owner: ifb for ifb, owner in read.shapekit_ifbs(runner).items()}
    held = load_held_gso(state_dir())
    for device in devices:
        differences += _tree_drift(runner, device, placed[device.name], saved, now)
        gso = _read_gso(runner, device, held)
        if gso is not None:
            want = plan_gso.wanted_segs(device)
            differences += plan_gso.gso_drift(device.name, want, gso.segs, held.get(device.name))
        if device.ingress is None and device.name in ifbs:
            differences.append(
                f"{device.name}: arriving traffic is shaped through {ifbs[device.name]}, which the config does not ask for"
            )
        if device.ingress is not None:
            differences += _ingress_drift(runner, config, device.ingress, bypass, placed[device.ingress.name])
    if devs:
        return differences  # a device's own check: its trees
    for dev in sorted(held.keys() - config.devices.keys()):
        if read.device_exists(dev):
            differences += plan_gso.unconfigured_drift(dev, read.read_gso(runner, dev).segs, held[dev])
    egress = {d.name: placed[d.name] for d in config.devices.values()}
    sets = "".join(plan_limits.plan_sets(name, caps, now) for name, caps in egress.items())
    for family in FAMILIES:
        chains = plan_mangle.boot_plan(config, bypass, family)
        want = probe.canonical_mangle(family, sets, plan_mangle.plan_restore(plan_mangle.EMPTY, chains, None))
        have = read.read_mangle(runner, family)
        if not any(egress.values()):
            want = drift.before_caps(want, have, plan_limits.LIMIT)
        differences += drift.diff_chains(family, want, have)
    want_entries = {
        (plan_limits.set_name(name, p.cap.host.version), str(p.cap.host), plan_limits.in_group(p.slot))
        for name, caps in egress.items()
        for p in caps
    }
    return differences + drift.diff_sets(want_entries, read.read_set_entries(runner))


def _tree_drift(runner: run.Runner, tree: Device, placed: list[PlacedCap], saved: list[Cap], now: float) -> list[str]:
    cmds = plan.plan_tree(tree, Bypass()) + plan_limits.cap_tree(tree, placed)
    have = read.read_tree(runner, tree.name, plan.root_handle())
    # A lapsed cap's class stays until the next full install: neither wanted nor drift.
    lapsed = {plan_limits.cap_classid(tree, slot) for slot in plan_limits.lapsed_slots(tree, saved, now)}
    have = drift.without(have, lapsed)
    return drift.diff_tree(tree.name, drift.planned_tree(cmds), have)


def _ingress_drift(
    runner: run.Runner, config: Config, tree: Device, bypass: Bypass, placed: list[PlacedCap]
) -> list[str]:
    dev, ifb = tree.configured, tree.name
    if not plan_ingress.is_shapekit_ifb(read.ifb_alias(runner, ifb), dev):
        return [f"{dev}: its IFB device {ifb} for arriving traffic is missing (run shape-init)"]
    out = _tree_drift(runner, tree, placed, [], 0)
    if read.read_ingress_hook(runner, dev).redirect_to != ifb:
        out.append(f"{dev}: arriving traffic is not redirected to {ifb} (run shape-init)")
    want = [f.entry() for f in plan_ingress.hash_links() + plan_ingress.ingress_filters(tree, config, bypass, placed)]
    return out + drift.diff_filters(ifb, want, read.read_u32_filters(runner, ifb)[1])


class CheckFormat(str, Enum):
    text = "text"
    prometheus = "prometheus"


init_app = common.new_app()


@init_app.command()
def shape_init(
    dev: common.DevOption = None,
    every: Annotated[
        bool,
        typer.Option(
            "--all",
            help="The whole boot sequence in one process: as shape-init, shape-bypass, shape-mark and shape-limit-ip.",
        ),
    ] = False,
    check: Annotated[
        bool,
        typer.Option(
            "--check",
            help="Change nothing: exit 0 if the kernel matches the config and saved state, 1 and the differences if not.",
        ),
    ] = False,
    skip_unknown: Annotated[
        bool,
        typer.Option(
            "--skip-unknown", help="With --dev: skip devices the config does not shape, silently (for hotplug hooks)."
        ),
    ] = False,
    skip_absent: Annotated[
        bool,
        typer.Option(
            "--skip-absent",
            help="Skip configured devices that do not exist now (for boot: hotplug devices come later).",
        ),
    ] = False,
    output_format: Annotated[
        CheckFormat,
        common.format_option(
            "With --check: text, or prometheus (shapekit_drift 0 or 1, and how many differences) for "
            "node_exporter's textfile collector."
        ),
    ] = CheckFormat.text,
    output: Annotated[
        Optional[Path],
        common.output_option(
            "With --check --format prometheus: write the metrics to FILE, replaced whole (a check that cannot "
            "run writes shapekit_drift_check_up 0 there)."
        ),
    ] = None,
    config: common.ConfigOption = None,
    dry_run: common.DryRunOption = False,
    verbose: common.VerboseOption = False,
    version: common.VersionOption = False,
) -> None:
    """Build each configured device's HTB tree: root qdisc, top class at the line rate,
    the unshaped bypass class, the classes, their leaf qdiscs and filters, and a
    class for each per-IP cap.

    Replaces whatever root qdisc the device had (shapekit's earlier tree
    included) in one `tc -batch`; running it twice gives the same kernel state.
    If a command fails, the device is left unshaped, never half-shaped.

    On a line slower than about 520mbit it then holds the device's
    gso_max_segs to about what the line sends in a millisecond (2 at 20mbit),
    so that HTB does not send 64 KB TCP super-packets in one burst; the value
    before goes to gso.json in the state directory, and shape-flush puts it
    back. gso_max_segs = "keep" in [device.X] leaves it alone.

    With [device.X.ingress], arriving traffic is shaped too: shapekit makes an
    IFB device (ifb-X), builds the ingress tree there with u32 filters for the
    caps, the bypass and the direction = "in" rules, and redirects what
    arrives on X to it.

    --all runs the whole boot sequence in one process, under one lock: the
    trees, then the bypass, the [[mark]] rules and the per-IP caps, leaving
    the kernel as the four commands in that order do, with their checks and
    undo, in about half the time. The init scripts use it.

    --check compares instead: the trees (ingress ones and their redirect and
    filters too), shapekit's iptables/ip6tables chains and its cap sets (with
    --dev: only those devices' trees), for monitoring; with --format
    prometheus as metrics, exit 0 whether or not the kernel differs
    (init/systemd/shapekit-drift.timer writes them for node_exporter every 5
    minutes).

    Exit status: 0 done (--check: the kernel matches); 2 bad input (config,
    options, missing device or kernel feature, not root), nothing changed; 1 a
    system command failed (--check: the kernel differs, as printed).
    """

    options = common.make_options(config, dry_run, verbose)
    common.reported("shape-init", lambda: _check_output(check, output_format, output))
    if every:
        common.reported("shape-init", lambda: boot(options, _every_device(dev, check, skip_unknown), skip_absent))
        return
    if check and output_format == CheckFormat.prometheus:
        common.reported("shape-init", lambda: _drift_metrics(options, dev or [], output))
        return
    if check:

        def report() -> None:
            differences = check_drift(options, dev or [])
            for line in differences:
                typer.echo(line)
            if differences:
                raise typer.Exit(1)
            typer.echo("the kernel matches the config and saved state")

        common.reported("shape-init", report)
        return
    common.reported("shape-init", lambda: init(options, dev or [], skip_unknown, skip_absent))


def _drift_metrics(options: common.Options, devs: list[str], output: Path | None) -> None:
    """shape-init --check --format prometheus: exit 0 whether or not the kernel differs (shapekit_drift says
    it), so that 1 and 2 mean the check or the file failed."""
    differences: list[str] = []

    def sample() -> str:
        differences.extend(check_drift(options, devs))
        return status.drift_text(differences)

    if output is None:
        typer.echo(sample(), nl=False)
    else:
        common.write_metrics(output, sample, status.drift_down())


def _check_output(check: bool, output_format: CheckFormat, output: Path | None) -> None:
    """--format and --output are --check's."""
    if output_format != CheckFormat.text and not check:
        raise UsageError("--format goes with --check: shape-init --check --format prometheus")
    if output is not None and output_format != CheckFormat.prometheus:
        raise UsageError("--output goes with --check --format prometheus")


def _every_device(dev: list[str] | None, check: bool, skip_unknown: bool) -> list[str]:
    """--all takes no device list: refuse the options that would narrow or replace it."""
    for given, option, why in (
        (dev, "--dev", "it builds every device (for one device: shape-init --dev DEV)"),
        (skip_unknown, "--skip-unknown", "it goes with --dev"),
        (check, "--check", "--check alone compares all that --all installs"),
    ):
        if given:
            raise UsageError(f"--all and {option} do not go together: {why}")
    return []


def init_main() -> None:
    common.console(init_app, "shape-init")
