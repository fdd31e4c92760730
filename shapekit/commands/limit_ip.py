"""What each command does: config → plan → apply, wired together once."""

from __future__ import annotations

import datetime
import os
import shutil
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar

from shapekit.config.addresses import Network, PortProto, ValueProblem, parse_host, parse_port_proto
from shapekit.config.load import Config, Device, config_path, load_config
from shapekit.config.rules import Bypass, Cap, check_cap, parse_bypass_host
from shapekit.config.units import UnitError, format_rate, parse_duration, parse_rate
from shapekit.errors import CommandFailed, UsageError
from shapekit.kernel import change, probe, read, run
from shapekit.plan import drift, status
from shapekit.plan import ingress as plan_ingress
from shapekit.plan import limits as plan_limits
from shapekit.plan import mangle as plan_mangle
from shapekit.plan import tree as plan
from shapekit.plan.ingress import CapFilters, U32Filter
from shapekit.plan.limits import IPSET_MAX_TIMEOUT, LIMIT, PlacedCap, lapsed, place_caps, with_minor
from shapekit.plan.mangle import FAMILIES, MARK, Chains
from shapekit.state import BYPASS_FILE, LIMITS_FILE, RuntimeBypass, change_lock, load_caps, save_caps, state_dir


@dataclass(frozen=True)
class Options:
    """The options every command takes."""

    config: Path | None = None
    dry_run: bool = False
    verbose: bool = False

    def runner(self) -> run.Runner:
        return run.Runner(dry_run=self.dry_run, verbose=self.verbose)

    def load(self) -> Config:
        # A config run as root drives root commands: refuse one others can write.
        return load_config(config_path(self.config), check_owner=os.geteuid() == 0)

    def lock(self) -> AbstractContextManager[None]:
        return nullcontext() if self.dry_run else change_lock(state_dir())


def _saved_caps(config: Config) -> list[Cap]:
    """The run-time caps in limits.json (lapsed ones too), each checked against its tree's line rate."""
    return load_caps(
        state_dir(), {(t.configured, t.direction): t.rate for d in config.devices.values() for t in d.trees}
    )


def select_devices(config: Config, names: list[str]) -> list[Device]:
    """The configured devices named by --dev (all of them when none is named)."""
    unknown = [n for n in names if n not in config.devices]
    if unknown:
        configured = ", ".join(config.devices)
        raise UsageError(f"--dev {unknown[0]}: not a device in {config.path} (configured: {configured})")
    return [config.devices[n] for n in dict.fromkeys(names)] if names else list(config.devices.values())


def init(options: Options, devs: list[str], skip_unknown: bool = False, skip_absent: bool = False) -> None:
    """shape-init: replace shapekit's trees (egress, and ingress on an IFB) on each selected device."""
    config = options.load()
    if skip_unknown and devs:
        devs = [d for d in devs if d in config.devices]
        if not devs:
            return
    devices = select_devices(config, devs)
    if skip_absent:  # at boot: a USB, PPP or VPN device that is not there yet gets its tree when it comes
        devices = [d for d in devices if read.device_exists(d.name)]
    ingress = [d.ingress for d in devices if d.ingress is not None]
    probe.require_root(options.dry_run, "shape-init")
    probe.require_binaries(["tc", "ip"])
    probe.require_devices([d.name for d in devices])
    runner = options.runner()
    probe.probe_kernel(plan.kernel_features([tree for d in devices for tree in d.trees]))
    probe.probe_ingress([tree.key for tree in ingress])
    probe.require_own_ifbs(runner, ingress)
    with options.lock():
        runtime, now = _saved_caps(config), time.time()
        bypass = _merged_bypass(config, RuntimeBypass.load(state_dir()))
        ifbs = {owner: ifb for ifb, owner in read.shapekit_ifbs(runner).items()}
        # Every plan first: a cap that cannot be placed is refused before anything changes.
        plans = []
        for device in devices:
            current = read.read_root(runner, device.name)
            caps = plan_limits.cap_tree(device, place_caps(device, runtime, now))
            inbound = _ingress_tree(runner, config, device.ingress, bypass, runtime, now) if device.ingress else []
            plans.append((device, plan.plan_init(device, config.bypass, current) + caps, inbound))
        for device, egress, inbound in plans:
            change.apply_tree(runner, device.name, egress)
            if device.ingress is None and device.name in ifbs:  # ingress shaping taken out of the config
                change.remove_ingress(runner, device.name, ifbs[device.name])
            if device.ingress is not None:
                change.apply_ingress(runner, device.ingress, inbound)


def _ingress_tree(
    runner: run.Runner, config: Config, tree: Device, bypass: Bypass, runtime: list[Cap], now: float
) -> list[plan.Argv]:
    """An ingress tree's whole build on its IFB: the HTB tree, the caps' classes, the u32 filters."""
    current = read.read_root(runner, tree.name) if read.device_exists(tree.name) else plan.KERNEL_DEFAULT
    placed = place_caps(tree, runtime, now)
    return (
        plan.plan_init(tree, config.bypass, current)
        + plan_limits.cap_tree(tree, placed)
        + plan_ingress.plan_filters(tree, config, bypass, placed)
    )


def check(options: Options, devs: list[str]) -> list[str]:
    """shape-init --check: every way the kernel differs from the config and saved state; changes nothing."""
    config = options.load()
    devices = select_devices(config, devs)
    if os.geteuid() != 0:
        raise UsageError("--check reads the kernel's netfilter and ipset state: run it as root")
    probe.require_binaries(["tc", "ip", "ipset", "unshare", *probe.MANGLE_TOOLS])
    probe.require_devices([d.name for d in devices])
    runner = options.runner()
    now = time.time()
    saved = _saved_caps(config)
    bypass = _merged_bypass(config, RuntimeBypass.load(state_dir()))
    placed = {t.name: place_caps(t, saved, now) for d in config.devices.values() for t in d.trees}
    differences = []
    ifbs = {owner: ifb for ifb, owner in read.shapekit_ifbs(runner).items()}
    for device in devices:
        differences += _tree_drift(runner, device, placed[device.name], saved, now)
        if device.ingress is None and device.name in ifbs:
            differences.append(
                f"{device.name}: arriving traffic is shaped through {ifbs[device.name]}, which the config does not ask for"
            )
        if device.ingress is not None:
            differences += _ingress_drift(runner, config, device.ingress, bypass, placed[device.ingress.name])
    if devs:
        return differences  # a device's own check: its trees
    egress = {d.name: placed[d.name] for d in config.devices.values()}
    sets = "".join(plan_limits.plan_sets(name, caps, now) for name, caps in egress.items())
    for family in FAMILIES:
        chains = {**plan_mangle.mark_plan(config, bypass, family), **plan_mangle.limit_plan(config, bypass, family)}
        want = probe.canonical_mangle(family, sets, plan_mangle.plan_restore(plan_mangle.EMPTY, chains, None))
        differences += drift.diff_chains(family, want, read.read_mangle(runner, family))
    want_entries = {
        (plan_limits.set_name(name, p.cap.host.version), str(p.cap.host), plan.classid(p.minor))
        for name, caps in egress.items()
        for p in caps
    }
    return differences + drift.diff_sets(want_entries, read.read_set_entries(runner))


def _tree_drift(runner: run.Runner, tree: Device, placed: list[PlacedCap], saved: list[Cap], now: float) -> list[str]:
    cmds = plan.plan_tree(tree, Bypass()) + plan_limits.cap_tree(tree, placed)
    have = read.read_tree(runner, tree.name, plan.root_handle())
    # A lapsed cap's class stays until the next full install: neither wanted nor drift.
    have = drift.without(have, {plan.classid(m) for m in plan_limits.lapsed_minors(tree, saved, now)})
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


def flush(options: Options, devs: list[str], forget: bool) -> None:
    """shape-flush: remove shapekit's trees, IFBs, chains and jumps (only the named devices' trees with --dev)."""
    probe.require_root(options.dry_run, "shape-flush")
    probe.require_binaries(["tc", "ip"] if devs else ["tc", "ip", *probe.MANGLE_TOOLS])
    probe.require_devices(devs)
    runner = options.runner()
    with options.lock():
        ifbs = read.shapekit_ifbs(runner)
        names = devs or read.devices_with_root(runner, plan.root_handle(), "htb")
        for dev in names:
            if dev not in ifbs:  # an IFB goes whole, below
                runner.tc_batch(f"{dev}: remove shapekit's tree", plan.plan_flush(dev, read.read_root(runner, dev)))
        for ifb, owner in ifbs.items():
            if not devs or owner in devs:
                change.remove_ingress(runner, owner, ifb)
        if not devs:
            change.flush_mangle(runner)
            if shutil.which("ipset"):  # sets go after the rules that use them
                change.ipset_restore(
                    runner, "remove shapekit's sets", plan_limits.plan_destroy_sets(read.list_sets(runner))
                )
        if forget and not options.dry_run:
            for name in (BYPASS_FILE, LIMITS_FILE):
                _forget(state_dir() / name)


def _forget(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        raise CommandFailed(f"removing {path}", exc.strerror or str(exc), "the kernel's shaping is removed") from None


def _check_mangle(options: Options, command: str, config: Config) -> None:
    probe.require_root(options.dry_run, command)
    ingress = any(d.ingress for d in config.devices.values())
    probe.require_binaries([*probe.MANGLE_TOOLS, "tc"] if ingress else probe.MANGLE_TOOLS)


def _ingress_filters(
    config: Config, filters: Callable[[Device], list[U32Filter]]
) -> list[tuple[Device, list[U32Filter]]]:
    """One kind of filter for each ingress tree, refused before anything changes if u32 cannot keep it."""
    trees = [d.ingress for d in config.devices.values() if d.ingress is not None]
    return [(tree, plan_ingress.listable(filters(tree))) for tree in trees]


def _refresh_ingress(
    runner: run.Runner,
    journal: run.Journal,
    what: str,
    prefs: dict[int, int],
    planned: list[tuple[Device, list[U32Filter]]],
) -> None:
    """Rewrite one kind of filter (bypass, or direction = "in" rules) on every ingress tree that is built.

    A tree not built yet gets them from shape-init.
    """
    for tree, filters in planned:
        if read.device_exists(tree.name) and read.read_root(runner, tree.name).is_shapekit:
            present, entries = read.read_u32_filters(runner, tree.name)
            cmds = plan_ingress.replace_prefs(tree.name, list(prefs.items()), present, filters)
            before = [U32Filter.from_entry(e) for e in entries if e.pref in prefs.values()]
            journal.change(
                f"{tree.configured}'s {what} filters",
                partial(runner.tc_batch, f"{tree.configured}: {what} on arriving traffic ({tree.name})", cmds),
                partial(change.put_back_prefs, runner, tree.name, list(prefs.items()), before),
            )


def _probe_mangle(plans: dict[int, Chains], own: str | None) -> None:
    """Load the chains into a throwaway namespace: refuse what this machine cannot load, before any change."""
    probe.probe_rules({f: plan_mangle.plan_restore(plan_mangle.EMPTY, plans[f], own) for f in plans})


def mark(options: Options) -> None:
    """shape-mark: the [[mark]] rules into shapekit's mangle chains."""
    config = options.load()
    _check_mangle(options, "shape-mark", config)
    runner = options.runner()
    with options.lock():
        bypass = _merged_bypass(config, RuntimeBypass.load(state_dir()))
        plans = {f: plan_mangle.mark_plan(config, bypass, f) for f in FAMILIES}
        inbound = _ingress_filters(config, partial(plan_ingress.rule_filters, rules=config.marks))
        _probe_mangle(plans, MARK)
        with run.transaction(runner) as journal:
            change.apply_mangle(runner, plans, MARK, journal)
            _refresh_ingress(runner, journal, 'direction = "in" rule', plan_ingress.RULE_PREF, inbound)


def _merged_bypass(config: Config, runtime: RuntimeBypass) -> Bypass:
    """The config's bypass and the run-time entries: every command writes the bypass chain."""
    return config.bypass.with_entries(runtime.ports, runtime.hosts)


def _install_bypass(
    options: Options, config: Config, runtime: RuntimeBypass, then: Callable[[], None] | None = None
) -> None:
    """The bypass chain and the ingress bypass filters, as one transaction; `then` (saving the file) last in it."""
    runner = options.runner()
    merged = _merged_bypass(config, runtime)
    plans = {f: plan_mangle.bypass_plan(config, merged, f) for f in FAMILIES}
    bypassed = plan_ingress.bypass_filters(merged)
    inbound = _ingress_filters(config, lambda _: bypassed)
    _probe_mangle(plans, None)
    with run.transaction(runner) as journal:
        change.apply_mangle(runner, plans, None, journal)
        _refresh_ingress(runner, journal, "bypass", plan_ingress.BYPASS_PREF, inbound)
        if then is not None and not options.dry_run:
            then()  # last: a failure before it leaves the file as the kernel is again


def bypass(options: Options) -> None:
    """shape-bypass: the config's bypass plus the run-time entries."""
    config = options.load()
    _check_mangle(options, "shape-bypass", config)
    with options.lock():
        _install_bypass(options, config, RuntimeBypass.load(state_dir()))


def parse_bypass_entry(text: str) -> PortProto | Network:
    """`22/tcp`, `6000:6100/udp`, or a host/CIDR."""
    try:
        if "/" in text and text.rsplit("/", 1)[1][:1].isalpha():
            return parse_port_proto(text)
        return parse_bypass_host(text)
    except ValueProblem as exc:
        raise UsageError(str(exc)) from None


Entry = TypeVar("Entry", PortProto, Network)


def _edited(
    saved: tuple[Entry, ...], configured: tuple[Entry, ...], entries: list[Entry], add: bool, path: Path
) -> tuple[Entry, ...]:
    kept = list(saved)
    for entry in entries:
        if add and entry not in kept and entry not in configured:
            kept.append(entry)
        elif not add:
            if entry in configured:
                raise UsageError(f"{entry} is bypassed by {path} ([bypass]): remove it there")
            if entry not in kept:
                raise UsageError(f"{entry} is not a run-time bypass entry (see shape-bypass list)")
            kept.remove(entry)
    return tuple(kept)


def bypass_edit(options: Options, entries: list[str], *, add: bool) -> None:
    """shape-bypass add|remove: change the run-time entries and apply them at once."""
    config = options.load()
    parsed = list(dict.fromkeys(parse_bypass_entry(e) for e in entries))
    if not parsed:
        raise UsageError(f"name what to {'add' if add else 'remove'}: PORT/PROTO (22/tcp) or a host (198.51.100.7)")
    _check_mangle(options, "shape-bypass", config)
    ports = [e for e in parsed if isinstance(e, PortProto)]
    hosts = [e for e in parsed if not isinstance(e, PortProto)]
    with options.lock():
        runtime = RuntimeBypass.load(state_dir())
        updated = RuntimeBypass(
            ports=_edited(runtime.ports, config.bypass.ports, ports, add, config.path),
            hosts=_edited(runtime.hosts, config.bypass.hosts, hosts, add, config.path),
        )
        _install_bypass(options, config, updated, partial(updated.save, state_dir()))


@dataclass(frozen=True)
class BypassEntry:
    entry: str
    kind: str  # "port" | "host"
    source: str  # "config" | "run-time"


def bypass_list(options: Options) -> list[BypassEntry]:
    config = options.load()
    runtime = RuntimeBypass.load(state_dir())
    rows = []
    for source, entries in (("config", config.bypass), ("run-time", runtime)):
        rows += [BypassEntry(str(p), "port", source) for p in entries.ports]
        rows += [BypassEntry(str(h), "host", source) for h in entries.hosts]
    return rows


# --- shape-limit-ip --------------------------------------------------------------


def _check_limits(options: Options) -> None:
    probe.require_root(options.dry_run, "shape-limit-ip")
    probe.require_binaries(["tc", "ip", "ipset", *probe.MANGLE_TOOLS])


def _live(caps: list[Cap], now: float) -> list[Cap]:
    return [c for c in caps if not lapsed(c, now)]


def _lapsed(device: Device, caps: list[Cap], now: float) -> list[PlacedCap]:
    return [PlacedCap(c, c.minor) for c in caps if device.holds(c) and lapsed(c, now) and c.minor is not None]


def limit_ip(options: Options) -> None:
    """shape-limit-ip: every device's caps (config plus run-time) into classes, sets and one rule each."""
    config = options.load()
    _check_limits(options)
    with options.lock():
        now = time.time()
        _install_limits(options, config, _live(_saved_caps(config), now), now)


def _install_limits(options: Options, config: Config, runtime: list[Cap], now: float) -> None:
    """Make the kernel's caps exactly `runtime` plus the config's; save the run-time ones. Hold the lock."""
    probe.probe_caps()
    runner = options.runner()
    present = [d for d in config.devices.values() if read.device_exists(d.name)]  # a hotplug device may be away
    for tree in (t for d in present for t in d.trees):
        probe.require_shapekit_tree(runner, tree.name)
    # Every plan first: a cap that cannot be placed is refused before anything changes.
    placed = {t.name: place_caps(t, runtime, now) for d in present for t in d.trees}
    for tree in (d.ingress for d in present if d.ingress is not None):
        plan_ingress.listable(list(CapFilters.of(placed[tree.name]).listed))
    bypass = _merged_bypass(config, RuntimeBypass.load(state_dir()))
    rules = {f: plan_mangle.limit_plan(config, bypass, f) for f in FAMILIES}
    saved = [c for c in runtime if c.dev not in {d.name for d in present}]  # kept until their device is back
    saved += [with_minor(p) for caps in placed.values() for p in caps if p.cap.source == "run-time"]
    with run.transaction(runner) as journal:
        for device in present:
            _sync_caps_out(runner, journal, device, placed[device.name], now)
            if device.ingress is not None:
                _sync_caps_in(runner, journal, device.ingress, placed[device.ingress.name])
        change.apply_mangle(runner, rules, LIMIT, journal)
        if not options.dry_run:
            save_caps(state_dir(), saved)  # last: a failure before it leaves the file as the kernel is again


def _sync_caps_out(
    runner: run.Runner, journal: run.Journal, device: Device, placed: list[PlacedCap], now: float
) -> None:
    """A device's new and re-rated cap classes, then its sets swapped in, then the classes no entry points to go."""
    classes, sets = read.read_cap_classes(runner, device.name), read.read_sets(runner, device.name)
    put_back_classes = partial(change.put_back_all_classes, runner, device, classes)
    new_rates = plan_limits.sync_classes(device, plan_limits.class_rates(placed), classes)
    journal.change(
        f"{device.name}'s cap classes",
        partial(runner.tc_batch, f"{device.name}: per-IP cap classes", new_rates),
        put_back_classes,
    )
    text = plan_limits.plan_sets(device.name, placed, now)
    journal.change(
        f"{device.name}'s cap sets",
        partial(change.ipset_restore, runner, f"{device.name}: per-IP cap sets", text),
        partial(change.put_back_sets, runner, device.name, sets),
    )
    stale = plan_limits.sync_classes(device, plan_limits.stale(classes, placed), classes)
    journal.change(
        f"{device.name}'s cap classes",
        partial(runner.tc_batch, f"{device.name}: classes of caps no more", stale),
        put_back_classes,
    )


def _sync_caps_in(runner: run.Runner, journal: run.Journal, tree: Device, placed: list[PlacedCap]) -> None:
    """An ingress tree's cap classes and u32 filters, in one batch (filters go before the classes they point to)."""
    present, entries = read.read_u32_filters(runner, tree.name)
    classes = read.read_cap_classes(runner, tree.name)
    cmds = plan_ingress.sync_caps(tree, placed, present, plan_ingress.hash_nodes(entries), classes)
    journal.change(
        f"{tree.configured}'s caps on arriving traffic",
        partial(runner.tc_batch, f"{tree.configured}: per-IP caps on arriving traffic ({tree.name})", cmds),
        partial(change.put_back_ingress_caps, runner, tree, CapFilters.in_kernel(present, entries), classes),
    )


def pick_device(config: Config, dev: str | None) -> Device:
    if dev is not None:
        if dev not in config.devices:
            raise UsageError(f"--dev {dev}: not a device in {config.path} (configured: {', '.join(config.devices)})")
        return config.devices[dev]
    if len(config.devices) > 1:
        raise UsageError(f"{config.path} shapes several devices ({', '.join(config.devices)}): pass --dev")
    return next(iter(config.devices.values()))


def _host(text: str) -> Network:
    try:
        return parse_host(text)
    except ValueProblem as exc:
        raise UsageError(str(exc)) from None


@dataclass(frozen=True)
class CapRequest:
    """What `shape-limit-ip add` was asked, as typed values."""

    host: str
    rate: str
    dev: str | None = None
    duration: str | None = None
    comment: str = ""
    force: bool = False
    inbound: bool = False  # --in: traffic from the host, on the device's ingress tree


def cap_tree(device: Device, inbound: bool) -> Device:
    """The tree a cap of this direction lives in: the device's own, or its ingress tree."""
    if not inbound:
        return device
    if device.ingress is None:
        raise UsageError(
            f"{device.name} shapes no arriving traffic: add a [device.{device.name}.ingress] table, run shape-init, then cap with --in"
        )
    return device.ingress


def limit_add(options: Options, request: CapRequest) -> None:
    """shape-limit-ip add: cap one host now, touching only its own class and set entry (or filter)."""
    config = options.load()
    device = pick_device(config, request.dev)
    tree = cap_tree(device, request.inbound)
    host = _host(request.host)
    try:
        rate = parse_rate(request.rate)
    except UnitError as exc:
        raise UsageError(str(exc)) from None
    try:
        seconds = parse_duration(request.duration) if request.duration is not None else None
    except UnitError as exc:  # an unset $DURATION in a script is "": refused, never a cap for good
        raise UsageError(f"--for: {exc}") from None
    _check_request(config, tree, request, host, rate, seconds)
    _check_limits(options)
    probe.require_devices([device.name])
    runner = options.runner()
    if not request.force:
        _refuse_own_addresses(runner, host)
    with options.lock():
        if options.dry_run or tree.direction == "in":
            probe.require_shapekit_tree(runner, tree.name)
        now = time.time()
        saved = _saved_caps(config)  # lapsed ones too: their classes still hold their minors
        mine = next((c for c in saved if c.key == (device.name, tree.direction, host)), None)
        others = [c for c in saved if c is not mine]
        expires = now + seconds if seconds else None
        # Capped already: the new rate goes into the same class.
        cap = Cap(
            host, rate, device.name, "run-time", expires, request.comment, mine.minor if mine else None, tree.direction
        )
        if tree.direction == "out" and not {plan_limits.set_name(device.name, f) for f in FAMILIES} <= set(
            read.list_sets(runner)
        ):
            # Never installed since boot: install everything, this cap included.
            _install_limits(options, config, _live([*others, cap], now), now)
            return
        every = place_caps(tree, [*others, cap], now)
        placed = next(p for p in every if p.cap.host == host)
        before = _cap_until_now(tree, host, mine, placed.minor, now)
        with run.transaction(runner) as journal:
            _put_cap(runner, journal, tree, placed, every, before, now)
            if not options.dry_run:
                save_caps(state_dir(), [*others, with_minor(placed)])  # last: see _install_limits


def _cap_until_now(tree: Device, host: Network, mine: Cap | None, minor: int, now: float) -> PlacedCap | None:
    """The host's cap before this add (its run-time one, else the config's), in the class the add keeps."""
    if mine is not None and not lapsed(mine, now):
        return PlacedCap(mine, minor)
    configured = next((c for c in tree.limits if c.host == host), None)
    return PlacedCap(configured, minor) if configured else None


def _check_request(
    config: Config, tree: Device, request: CapRequest, host: Network, rate: int, seconds: int | None
) -> None:
    if not request.comment.isprintable():
        raise UsageError("--comment must be one line of printable text")
    if seconds is not None and tree.direction == "in":
        raise UsageError(
            f"--for cannot time a cap on arriving traffic: its u32 filter has no timeout, unlike the ipset entry of a cap "
            f"on sent traffic; add it without --for and lift it with `shape-limit-ip remove {host} --in` "
            f"(e.g. from systemd-run --on-active={request.duration})"
        )
    if seconds is not None and seconds > IPSET_MAX_TIMEOUT:
        raise UsageError(
            f"--for {request.duration} is longer than ipset's longest timeout ({IPSET_MAX_TIMEOUT}s, about 24 days)"
        )
    problem = check_cap(host, rate, tree.rate)
    if problem:
        raise UsageError(problem)
    if seconds is not None and any(c.host == host for c in tree.limits):
        raise UsageError(
            f"{host} is capped by {config.path}: a cap --for a while would drop that cap when it lapses; "
            "add it without --for, or change the config"
        )


def _put_cap(
    runner: run.Runner,
    journal: run.Journal,
    tree: Device,
    placed: PlacedCap,
    every: list[PlacedCap],
    before: PlacedCap | None,
    now: float,
) -> None:
    """One cap's class (new, or its rate changed in place), then its set entry or u32 filter.

    `before` is the host's cap until now, if it had one: what a failure puts back.
    """
    host = placed.cap.host
    cmds = plan_limits.cap_class(tree, placed.minor, placed.cap.rate, "replace")
    put_back_class = partial(change.put_back_classes, runner, tree, _class_now(tree, placed.minor))
    if tree.direction == "out":
        journal.change(f"the class of {host}", partial(_cap_batch, runner, tree, host, cmds), put_back_class)
        _put_set_entry(runner, journal, tree, placed, before, now)
        return
    filters = _cap_filter_before(runner, tree, placed)
    cmds += plan_ingress.cap_entry(tree, placed, every, filters.present, filters.nodes)
    journal.change(
        f"the class and filter of {host}",
        partial(_cap_batch, runner, tree, host, cmds),
        # The filter first: HTB keeps a class that a filter points to.
        run.in_order(partial(_put_back_cap_filter, runner, tree, placed, filters), put_back_class),
    )


def _class_now(tree: Device, minor: int) -> dict[int, int | None]:
    """One cap class's rate now (None: not there), as change.put_back_classes takes it."""
    found = read.read_class(tree.name, minor)
    return {minor: found.ceil if found else None}


def _cap_batch(runner: run.Runner, tree: Device, host: Network, cmds: list[plan.Argv]) -> None:
    try:
        runner.tc_batch(f"{tree.name}: the class of {host}", cmds)
    except CommandFailed:
        # Asked only now: reading the root dumps every qdisc, 20 ms with 10,000 caps.
        probe.require_shapekit_tree(runner, tree.name)
        raise


def _put_set_entry(
    runner: run.Runner, journal: run.Journal, tree: Device, placed: PlacedCap, before: PlacedCap | None, now: float
) -> None:
    """A host's set entry made `placed`'s, in one atomic `add -exist`; put back as `before` had it."""
    host = placed.cap.host
    undo = (
        plan_limits.plan_set_entry(tree.name, before, now) if before else plan_limits.plan_set_removal(tree.name, host)
    )
    journal.change(
        f"the set entry of {host}",
        partial(
            change.ipset_restore,
            runner,
            f"{tree.name}: {host} to its class",
            plan_limits.plan_set_entry(tree.name, placed, now),
        ),
        partial(change.ipset_restore, runner, f"{tree.name}: {host}'s set entry put back", undo),
        atomic=True,
    )


def _put_back_cap_filter(runner: run.Runner, tree: Device, placed: PlacedCap, before: CapFilterBefore) -> None:
    """One cap's u32 filter as it was: its hash node, or its prefix length's whole pref."""
    mine = plan_ingress.cap_filter(placed)
    if mine.handle is None:
        change.put_back_prefs(runner, tree.name, [(mine.family, mine.pref)], before.listed)
        return
    old = before.nodes.get(mine.handle)
    now = read.read_node(runner, tree.name, mine.handle)
    cmds = plan_ingress.put_node(tree.name, mine.handle, U32Filter.from_entry(old) if old else None, now)
    runner.tc_batch(f"{tree.name}: put the filter of {placed.cap.host} back", cmds)


def _refuse_own_addresses(runner: run.Runner, host: Network) -> None:
    own = [a for a in read.local_addresses(runner) if a.version == host.version and a in host]
    if own:
        raise UsageError(
            f"{host} holds this machine's own address {own[0]}: capping it would throttle the machine itself (use --force if you mean it)"
        )


def limit_remove(options: Options, host_text: str, dev: str | None, direction: str | None = None) -> None:
    """shape-limit-ip remove: lift a host's run-time caps (a config cap takes over again if there is one)."""
    config = options.load()
    host = _host(host_text)
    _check_limits(options)
    runner = options.runner()
    with options.lock():
        now = time.time()
        if dev is not None:
            pick_device(config, dev)  # a --dev the config does not shape: say so, not "not capped"
        saved = _saved_caps(config)
        matches = [
            c
            for c in _live(saved, now)
            if c.host == host and (dev is None or c.dev == dev) and direction in (None, c.direction)
        ]
        if not matches:
            raise UsageError(f"{host} is {_not_capped(config, host, direction)}")
        if len({c.dev for c in matches}) > 1:
            raise UsageError(f"{host} is capped on {', '.join(sorted({c.dev for c in matches}))}: pass --dev")
        kept = [c for c in saved if c not in matches]
        device = config.devices.get(matches[0].dev)
        if device is not None:
            probe.require_devices([device.name])
        with run.transaction(runner) as journal:
            for removed in matches if device is not None else []:
                tree = device if removed.direction == "out" else device.ingress
                if tree is not None:
                    _lift(runner, journal, tree, removed, kept, now)
            if not options.dry_run:
                save_caps(state_dir(), kept)  # last: see _install_limits


def _not_capped(config: Config, host: Network, direction: str | None) -> str:
    trees = [t for d in config.devices.values() for t in d.trees if direction in (None, t.direction)]
    in_config = [t for t in trees if any(c.host == host for c in t.limits)]
    if in_config:
        return f"capped by {config.path} on {in_config[0].configured}: remove it there"
    return "not capped" + (f" on {direction}-bound traffic" if direction else "") + " (see shape-limit-ip list)"


def _lift(runner: run.Runner, journal: run.Journal, tree: Device, removed: Cap, kept: list[Cap], now: float) -> None:
    """Take one cap off: back to the config's cap in the same class, or its entry (or filter) and then its class go."""
    if tree.direction == "in" and not read.device_exists(tree.name):
        return  # its IFB is gone (a flush): so is the cap; shape-init builds the tree from the state
    before = next(p for p in place_caps(tree, [*kept, removed], now) if p.cap.host == removed.host)
    rest = place_caps(tree, kept, now)
    after = next((p for p in rest if p.cap.host == removed.host), None)
    if after is not None:
        _put_cap(runner, journal, tree, after, rest, before, now)
        return
    if tree.direction == "out":
        _lift_out(runner, journal, tree, before, now)
    else:
        _lift_in(runner, journal, tree, before, rest)


def _lift_out(runner: run.Runner, journal: run.Journal, tree: Device, before: PlacedCap, now: float) -> None:
    """The host's set entry first (no packet is sent to a class that is going), then its class."""
    host = before.cap.host
    journal.change(
        f"the set entry of {host}",
        partial(change.ipset_restore, runner, f"{tree.name}: {host} uncapped", plan_limits.plan_set_removal(tree.name, host)),
        partial(change.ipset_restore, runner, f"{tree.name}: {host}'s entry back", plan_limits.plan_set_entry(tree.name, before, now)),
        atomic=True,
    )  # fmt: skip
    old_class = _class_now(tree, before.minor)
    cmds = (
        plan_limits.remove_cap_class(tree.name, before.minor) if old_class[before.minor] else []
    )  # gone after a re-init
    journal.change(
        f"the class of {host}",
        partial(runner.tc_batch, f"{tree.name}: {host} uncapped", cmds),
        partial(change.put_back_classes, runner, tree, old_class),
    )


def _lift_in(runner: run.Runner, journal: run.Journal, tree: Device, before: PlacedCap, rest: list[PlacedCap]) -> None:
    """The host's u32 filter and then its class, in one batch (HTB keeps a class that a filter points to)."""
    filters = _cap_filter_before(runner, tree, before)
    cmds = plan_ingress.cap_removal(tree, before, rest, filters.present, filters.nodes)
    old_class = _class_now(tree, before.minor)
    if old_class[before.minor] is not None:  # gone already after a re-init
        cmds += plan_limits.remove_cap_class(tree.name, before.minor)
    journal.change(
        f"the class and filter of {before.cap.host}",
        partial(runner.tc_batch, f"{tree.name}: {before.cap.host} uncapped", cmds),
        # The class first: the filter put back points to it.
        run.in_order(
            partial(change.put_back_classes, runner, tree, old_class),
            partial(_put_back_cap_filter, runner, tree, before, filters),
        ),
    )


@dataclass(frozen=True)
class CapFilterBefore:
    """What changing one cap's filter needs of the kernel, read before the change."""

    present: set[int]  # the prefs in use (read for a network's cap only)
    nodes: dict[str, plan_ingress.U32Entry]  # the cap's hash node, by handle, when it is there
    listed: list[U32Filter]  # a network cap's pref: its filters now


def _cap_filter_before(runner: run.Runner, tree: Device, placed: PlacedCap) -> CapFilterBefore:
    """One cap's hash node (one small query), or for a network its prefs and its pref's filters."""
    mine = plan_ingress.cap_filter(placed)
    if mine.handle is not None:
        return CapFilterBefore(set(), read.read_node(runner, tree.name, mine.handle), [])
    present, entries = read.read_u32_filters(runner, tree.name)
    listed = [
        U32Filter.from_entry(e)
        for e in entries
        if e.pref == mine.pref and e.protocol == plan_ingress.PROTOCOL[mine.family]
    ]
    return CapFilterBefore(present, plan_ingress.hash_nodes(entries), listed)


@dataclass(frozen=True)
class CapRow:
    host: str
    rate: str
    dev: str
    direction: str  # "out": traffic to the host; "in": arriving from it
    source: str
    expires: str | None  # ISO 8601, UTC
    comment: str
    classid: str


def limit_list(options: Options) -> list[CapRow]:
    config = options.load()
    now = time.time()
    runtime = _live(_saved_caps(config), now)
    rows = []
    for tree in (t for d in config.devices.values() for t in d.trees):
        rows += [_row(p) for p in place_caps(tree, runtime, now)]
    return rows


def _row(placed: PlacedCap) -> CapRow:
    cap = placed.cap
    host = str(cap.host.network_address) if cap.host.prefixlen == cap.host.max_prefixlen else str(cap.host)
    expires = None
    if cap.expires is not None:
        expires = datetime.datetime.fromtimestamp(cap.expires, datetime.timezone.utc).isoformat(timespec="seconds")
    rate, cid = format_rate(cap.rate), plan.classid(placed.minor)
    return CapRow(host, rate, cap.dev, cap.direction, cap.source, expires, cap.comment, cid)


# --- shape-status ---------------------------------------------------------------


def status_sample(options: Options, devs: list[str], interval: float) -> dict:
    """One sample: each device's classes with their rate over `interval` seconds, and the rule counters."""
    config = options.load()
    devices = select_devices(config, devs)
    probe.require_devices([d.name for d in devices])
    # Ingress trees are listed under their IFB device, when it is there.
    trees = [t for d in devices for t in d.trees if t.direction == "out" or read.device_exists(t.name)]
    now = time.time()
    saved = _saved_caps(config)
    names = {t.name: status.class_names(t, place_caps(t, saved, now), _lapsed(t, saved, now)) for t in trees}
    start = time.monotonic()
    before = {t.name: read.read_classes(t.name) for t in trees}
    time.sleep(interval)
    after = {t.name: read.read_classes(t.name) for t in trees}
    seconds = time.monotonic() - start
    rows = {t.name: status.class_rows(names[t.name], before[t.name], after[t.name], seconds) for t in trees}
    counters = read.read_rule_counters(options.runner())
    rules = None if counters is None else [r for f, text in counters.items() for r in status.rule_rows(f, text)]
    when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return status.sample_document(when, round(seconds, 3), rows, rules)
