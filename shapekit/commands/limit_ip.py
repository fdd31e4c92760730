"""shape-limit-ip: per-IP caps (seed 002): install them all, or add, remove and list one.

Longer than the other commands, and kept whole: its four verbs share how a
cap is placed in a class and how each of its steps is put back on a failure
(README, "Never half-applied"), and each verb's order of steps reads best
beside the others'.
"""

from __future__ import annotations

import dataclasses
import datetime
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Annotated, Optional

import typer

from shapekit.commands import common
from shapekit.config.addresses import Network, ValueProblem, host_text, parse_host
from shapekit.config.cap_file import parse_cap_rows, read_cap_file
from shapekit.config.model import Config, Device
from shapekit.config.rules import CAP_NOT_A_SHARE, IPSET_MAX_TIMEOUT, Cap, check_cap
from shapekit.config.units import PercentError, UnitError, format_rate, parse_duration, parse_rate
from shapekit.errors import CommandFailed, UsageError
from shapekit.kernel import change, probe, read, run
from shapekit.plan import ingress as plan_ingress
from shapekit.plan import limits as plan_limits
from shapekit.plan import mangle as plan_mangle
from shapekit.plan import tree as plan
from shapekit.plan.ingress import CapFilters, U32Filter
from shapekit.plan.limits import LIMIT, PlacedCap, lapsed, place_caps, with_slot
from shapekit.plan.mangle import FAMILIES
from shapekit.state import RuntimeBypass, SavedCap, SavedCaps, save_caps, state_dir


def _check_limits(options: common.Options) -> None:
    probe.require_root(options.dry_run, "shape-limit-ip")
    probe.require_binaries(["tc", "ip", "ipset", *probe.MANGLE_TOOLS])


def limit_ip(options: common.Options) -> None:
    """shape-limit-ip: every device's caps (config plus run-time) into classes, sets and one rule each."""
    config = options.load()
    _check_limits(options)
    with options.lock():
        probe.probe_caps()
        require_cap_trees(options.runner(), config)
        now = time.time()
        install_limits(options, config, common.live_caps(common.saved_caps(config), now), now)


def require_cap_trees(runner: run.Runner, config: Config) -> None:
    """Caps go into shapekit's trees: each device there now must have them (a hotplug device may be away)."""
    for tree in (t for d in config.devices.values() if read.device_exists(d.name) for t in d.trees):
        probe.require_shapekit_tree(runner, tree.name)
        if tree.direction == "out":
            require_groups(runner, tree)


def require_groups(runner: run.Runner, tree: Device, tree_needed: bool = True) -> None:
    """Caps a shapekit before cap groups installed stay as they are until shape-init moves them: changes are
    refused until then. So is a device with no shapekit tree, when the change needs one."""
    dev = tree.name
    grouped = read.has_group_filter(runner, dev)  # on parent 5c:, so shapekit's tree is there
    if grouped:
        flat = read.sets_before_groups(runner, dev)
    else:
        flat = (read.device_exists(dev) and read.read_root(runner, dev).is_shapekit) or read.sets_before_groups(
            runner, dev
        )
    if flat:
        raise UsageError(
            f"{dev}'s caps were installed by a shapekit without cap groups: run shape-init --dev {dev} "
            "to move them into groups (run-time caps kept), then change caps"
        )
    if tree_needed and not grouped:
        probe.require_shapekit_tree(runner, dev)


def install_limits(
    options: common.Options, config: Config, runtime: list[Cap], now: float, until_now: list[Cap] | None = None
) -> None:
    """Make the kernel's caps exactly `runtime` plus the config's; save the run-time ones. Hold the lock,
    with the machine's caps probed and the trees built (`probe.probe_caps`, `require_cap_trees`).

    `until_now` (sync): the run-time caps in force so far, when the sets hold them: then only the
    entries that differ are written, instead of every entry filled aside and swapped in.
    """
    runner = options.runner()
    devices = list(config.devices.values())
    present = [d for d in devices if read.device_exists(d.name)]  # a hotplug device may be away
    # Every plan first: a cap that cannot be placed is refused before anything changes.
    placed = {t.name: place_caps(t, runtime, now) for d in devices for t in d.trees}
    for tree in (d.ingress for d in present if d.ingress is not None):
        plan_ingress.listable(list(CapFilters.of(placed[tree.name]).listed))
    bypass = common.merged_bypass(config, RuntimeBypass.load(state_dir()))
    rules = {f: plan_mangle.limit_plan(config, bypass, f) for f in FAMILIES}
    with run.transaction(runner) as journal:
        for device in devices:
            if device not in present:  # its sets (the rules name them); its classes come with its tree
                put_sets(runner, journal, device, placed[device.name], now, read.read_sets(runner, device.name))
                continue
            was = None if until_now is None else place_caps(device, until_now, now)
            _sync_caps_out(runner, journal, device, placed[device.name], now, was)
            if device.ingress is not None:
                _sync_caps_in(runner, journal, device.ingress, placed[device.ingress.name])
        if until_now is None:  # else the sets are there, and so the rules that read them
            common.install_mangle(runner, rules, LIMIT, journal)
        if not options.dry_run:  # last: a failure before it leaves the file as the kernel is again
            save_caps(state_dir(), caps_to_save(runtime, config, placed))


def caps_to_save(runtime: list[Cap], config: Config, placed: dict[str, list[PlacedCap]]) -> list[Cap]:
    """The run-time caps placed, with their places (later commands find their classes by them), and those
    on devices the config no longer shapes, kept for when it does again."""
    kept = [c for c in runtime if c.dev not in config.devices]
    return kept + [with_slot(p) for caps in placed.values() for p in caps if p.cap.source == "run-time"]


def _sync_caps_out(
    runner: run.Runner,
    journal: run.Journal,
    device: Device,
    placed: list[PlacedCap],
    now: float,
    was: list[PlacedCap] | None = None,
) -> None:
    """A device's new and re-rated cap classes, then its sets (swapped in whole, or with `was`, the caps
    they hold now, only the entries that differ), then the classes no entry points to go."""
    classes, sets = read.read_cap_classes(runner, device), read.read_sets(runner, device.name)
    put_back_classes = partial(change.put_back_all_classes, runner, device, classes)
    wanted = plan_limits.class_rates(device, placed)
    new_rates = plan_limits.sync_classes(device, wanted, classes)
    journal.change(
        f"{device.name}'s cap classes",
        partial(runner.tc_batch, f"{device.name}: per-IP cap classes", new_rates),
        put_back_classes,
    )
    put_sets(runner, journal, device, placed, now, sets, was)
    stale = plan_limits.sync_classes(device, plan_limits.stale(classes, wanted), classes)
    journal.change(
        f"{device.name}'s cap classes",
        partial(runner.tc_batch, f"{device.name}: classes of caps no more", stale),
        put_back_classes,
    )


def put_sets(
    runner: run.Runner,
    journal: run.Journal,
    device: Device,
    placed: list[PlacedCap],
    now: float,
    before: dict[int, list[str] | None],
    was: list[PlacedCap] | None = None,
) -> None:
    """A device's cap sets made to hold exactly `placed`, put back to `before` if a later step fails:
    filled aside and swapped in, or, given `was` (the caps they hold now), only the entries that differ."""
    if was is None:
        present = [family for family, entries in before.items() if entries is not None]
        header, text = f"{device.name}: per-IP cap sets", plan_limits.plan_sets(device.name, placed, now, present)
    else:
        header, text = (
            f"{device.name}: the cap entries that differ",
            plan_limits.plan_set_changes(device.name, was, placed, now),
        )
    journal.change(
        f"{device.name}'s cap sets",
        partial(change.ipset_restore, runner, header, text),
        partial(change.put_back_sets, runner, device.name, before),
    )


def _sync_caps_in(runner: run.Runner, journal: run.Journal, tree: Device, placed: list[PlacedCap]) -> None:
    """An ingress tree's cap classes and u32 filters, in one batch (filters go before the classes they point to)."""
    present, entries = read.read_u32_filters(runner, tree.name)
    classes = read.read_cap_classes(runner, tree)
    cmds = plan_ingress.sync_caps(tree, placed, present, plan_ingress.hash_nodes(entries), classes)
    journal.change(
        f"{tree.configured}'s caps on arriving traffic",
        partial(runner.tc_batch, f"{tree.configured}: per-IP caps on arriving traffic ({tree.name})", cmds),
        partial(change.put_back_ingress_caps, runner, tree, CapFilters.in_kernel(present, entries), classes),
    )


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


def limit_add(options: common.Options, request: CapRequest) -> None:
    """shape-limit-ip add: cap one host now, touching only its own class and set entry (or filter)."""
    config = options.load()
    device = common.pick_device(config, request.dev)
    tree = cap_tree(device, request.inbound)
    host = _host(request.host)
    try:
        rate = parse_rate(request.rate)
    except PercentError as exc:
        raise UsageError(f"{exc}: {CAP_NOT_A_SHARE}") from None
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
        if tree.direction == "out":
            require_groups(runner, tree)
        now = time.time()
        # Only this host's saved cap is read whole; of the others, their places (lapsed ones too: their
        # classes still hold them), and they are written back as they were.
        saved = SavedCaps.read(state_dir())
        found = next(iter(saved.find(host, device.name, tree.direction)), None)
        mine = None if found is None else saved.cap(found, common.line_rates(config))
        expires = now + seconds if seconds else None
        # Capped already: the new rate goes into the same class.
        cap = Cap(
            host, rate, device.name, "run-time", expires, request.comment, mine.slot if mine else None, tree.direction
        )
        if tree.direction == "out" and not {plan_limits.set_name(device.name, f) for f in FAMILIES} <= set(
            read.list_sets(runner)
        ):
            # Never installed since boot: install everything, this cap included.
            probe.probe_caps()
            require_cap_trees(runner, config)
            others = [c for c in common.saved_caps(config) if c.key != cap.key]
            install_limits(options, config, common.live_caps([*others, cap], now), now)
            return
        others, held, lapsed_held = _placed_among(tree, saved, found, config, now)
        every = place_caps(tree, [*others, cap], now, held, lapsed_held)
        placed = next(p for p in every if p.cap.host == host)
        before = _cap_until_now(tree, host, mine, placed.slot, now)
        with run.transaction(runner) as journal:
            _put_cap(runner, journal, tree, placed, every, before, now)
            if not options.dry_run:
                saved.save_with(state_dir(), found, with_slot(placed))  # last: see install_limits


def _placed_among(
    tree: Device, saved: SavedCaps, found: SavedCap | None, config: Config, now: float
) -> tuple[list[Cap], set[int], set[int]]:
    """What a cap is placed among, `found`'s saved cap left out: on sent traffic the places of the other
    run-time caps (in force, and lapsed); on arriving traffic the other caps whole, as each host picks
    its u32 node. For `place_caps(tree, [*others, ...], now, held, lapsed_held)`."""
    if tree.direction == "out":
        return [], *saved.places(tree.name, tree.direction, now, skip=found)
    mine = saved.cap(found).key if found is not None else None
    return [c for c in common.saved_caps(config) if c.key != mine], set(), set()


def limit_sync(options: common.Options, path: Path, dev: str | None) -> None:
    """shape-limit-ip sync: make the device's run-time caps exactly the file's, touching only what differs."""
    config = options.load()
    device = common.pick_device(config, dev)
    wanted = parse_cap_rows(path, read_cap_file(path), device, time.time())
    _check_limits(options)
    probe.require_devices([device.name])
    runner = options.runner()
    with options.lock():
        probe.probe_caps()
        require_cap_trees(runner, config)
        now = time.time()
        saved = common.live_caps(common.saved_caps(config), now)
        mine = {c.key: c for c in saved if c.dev == device.name}
        synced = [_as_saved(c, mine.pop(c.key, None)) for c in wanted]  # what stays in `mine` is gone
        del wanted  # copied into synced, whose hosts are the saved caps' objects: 100,000 caps are 60 MB
        # A cap gone keeps its class's place from new caps until that class goes, after its entry: as lapsed.
        gone = [dataclasses.replace(c, expires=now - 1) for c in mine.values()]
        others = [c for c in saved if c.dev != device.name]
        sets = {plan_limits.set_name(device.name, f) for f in FAMILIES}
        until_now = saved if sets <= set(read.list_sets(runner)) else None  # else: never installed since boot
        install_limits(options, config, [*others, *synced, *gone], now, until_now)


def _as_saved(cap: Cap, saved: Cap | None) -> Cap:
    """A file's cap in its saved cap's place, with the saved cap's host object (the same address: one
    `ipaddress` object of 400 bytes a host, not two)."""
    if saved is None:
        return cap
    return Cap(saved.host, cap.rate, cap.dev, cap.source, cap.expires, cap.comment, saved.slot, cap.direction)


def _cap_until_now(tree: Device, host: Network, mine: Cap | None, slot: int, now: float) -> PlacedCap | None:
    """The host's cap before this add (its run-time one, else the config's), in the class the add keeps."""
    if mine is not None and not lapsed(mine, now):
        return PlacedCap(mine, slot)
    configured = next((c for c in tree.limits if c.host == host), None)
    return PlacedCap(configured, slot) if configured else None


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
    classes = _class_now(tree, placed.slot)
    present = {cid: rate for cid, rate in classes.items() if rate is not None}
    cmds = plan_limits.sync_classes(tree, plan_limits.class_rates(tree, [placed]), present)
    put_back_class = partial(change.put_back_classes, runner, tree, classes)
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


def _class_now(tree: Device, slot: int) -> dict[str, int | None]:
    """One cap's class's rate now, and its group's (None: not there), as change.put_back_classes takes them."""
    cids = [plan_limits.cap_classid(tree, slot)]
    if tree.direction == "out":
        cids.insert(0, plan_limits.group_classid(plan_limits.group_of(slot)))
    found = {cid: read.read_class(tree.name, cid) for cid in cids}
    return {cid: plan.configured_rate(c.ceil, tree) if c else None for cid, c in found.items()}


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


def limit_remove(options: common.Options, host_text: str, dev: str | None, direction: str | None = None) -> None:
    """shape-limit-ip remove: lift a host's run-time caps (a config cap takes over again if there is one)."""
    config = options.load()
    host = _host(host_text)
    _check_limits(options)
    runner = options.runner()
    with options.lock():
        now = time.time()
        if dev is not None:
            common.pick_device(config, dev)  # a --dev the config does not shape: say so, not "not capped"
        # Only this host's saved caps are read whole; of the others, their places (see limit_add).
        saved = SavedCaps.read(state_dir())
        line_rates = common.line_rates(config)
        if not saved.find(host, dev, direction):
            # Written another way by a hand ("10.0.0.1")? Read whole, each host as shapekit writes it.
            saved = SavedCaps.canonical(state_dir(), line_rates)
        mine = [(found, saved.cap(found, line_rates)) for found in saved.find(host, dev, direction)]
        matches = [(found, cap) for found, cap in mine if not lapsed(cap, now)]
        if not matches:
            raise UsageError(f"{host} is {_not_capped(config, host, direction)}")
        devices = sorted({cap.dev for _, cap in matches})
        if len(devices) > 1:
            raise UsageError(f"{host} is capped on {', '.join(devices)}: pass --dev")
        device = config.devices.get(devices[0])
        if device is not None:
            probe.require_devices([device.name])
            if any(cap.direction == "out" for _, cap in matches):  # after a flush, no tree: nothing to lift there
                require_groups(runner, device, tree_needed=False)
        with run.transaction(runner) as journal:
            for found, removed in matches if device is not None else []:
                tree = device if removed.direction == "out" else device.ingress
                if tree is not None:
                    _lift(runner, journal, tree, saved, found, config, now)
            if not options.dry_run:
                saved.save_without(state_dir(), [found for found, _ in matches])  # last: see install_limits


def _not_capped(config: Config, host: Network, direction: str | None) -> str:
    trees = [t for d in config.devices.values() for t in d.trees if direction in (None, t.direction)]
    in_config = [t for t in trees if any(c.host == host for c in t.limits)]
    if in_config:
        return f"capped by {config.path} on {in_config[0].configured}: remove it there"
    return "not capped" + (f" on {direction}-bound traffic" if direction else "") + " (see shape-limit-ip list)"


def _lift(
    runner: run.Runner,
    journal: run.Journal,
    tree: Device,
    saved: SavedCaps,
    found: SavedCap,
    config: Config,
    now: float,
) -> None:
    """Take one saved cap off: back to the config's cap in the same class, or its entry (or filter) and then
    its class go."""
    if tree.direction == "in" and not read.device_exists(tree.name):
        return  # its IFB is gone (a flush): so is the cap; shape-init builds the tree from the state
    removed = saved.cap(found)
    others, held, lapsed_held = _placed_among(tree, saved, found, config, now)
    before = next(p for p in place_caps(tree, [*others, removed], now, held, lapsed_held) if p.cap.host == removed.host)
    rest = place_caps(tree, others, now, held, lapsed_held)
    after = next((p for p in rest if p.cap.host == removed.host), None)
    if after is not None:
        _put_cap(runner, journal, tree, after, rest, before, now)
        return
    if tree.direction == "out":
        kept = held | lapsed_held | {p.slot for p in rest}
        keep_group = plan_limits.group_of(before.slot) in {plan_limits.group_of(slot) for slot in kept}
        _lift_out(runner, journal, tree, before, keep_group, now)
    else:
        _lift_in(runner, journal, tree, before, rest)


def _lift_out(
    runner: run.Runner, journal: run.Journal, tree: Device, before: PlacedCap, keep_group: bool, now: float
) -> None:
    """The host's set entry first (no packet is sent to a class that is going), then its class, and its
    group when no other cap is left in it."""
    host = before.cap.host
    journal.change(
        f"the set entry of {host}",
        partial(change.ipset_restore, runner, f"{tree.name}: {host} uncapped", plan_limits.plan_set_removal(tree.name, host)),
        partial(change.ipset_restore, runner, f"{tree.name}: {host}'s entry back", plan_limits.plan_set_entry(tree.name, before, now)),
        atomic=True,
    )  # fmt: skip
    old_class = _class_now(tree, before.slot)
    mine = plan_limits.cap_classid(tree, before.slot)
    gone = {cid: None for cid in old_class if cid == mine or not keep_group}
    present = {cid: rate for cid, rate in old_class.items() if rate is not None}  # none after a re-init
    cmds = plan_limits.sync_classes(tree, gone, present)
    journal.change(
        f"the class of {host}",
        partial(runner.tc_batch, f"{tree.name}: {host} uncapped", cmds),
        partial(change.put_back_classes, runner, tree, old_class),
    )


def _lift_in(runner: run.Runner, journal: run.Journal, tree: Device, before: PlacedCap, rest: list[PlacedCap]) -> None:
    """The host's u32 filter and then its class, in one batch (HTB keeps a class that a filter points to)."""
    filters = _cap_filter_before(runner, tree, before)
    cmds = plan_ingress.cap_removal(tree, before, rest, filters.present, filters.nodes)
    old_class = _class_now(tree, before.slot)
    present = {cid: rate for cid, rate in old_class.items() if rate is not None}  # none after a re-init
    cmds += plan_limits.sync_classes(tree, dict.fromkeys(old_class), present)
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


def limit_list(options: common.Options) -> list[CapRow]:
    config = options.load()
    now = time.time()
    runtime = common.live_caps(common.saved_caps(config), now)
    rows = []
    for tree in (t for d in config.devices.values() for t in d.trees):
        rows += [_row(tree, p) for p in place_caps(tree, runtime, now)]
    return rows


def _row(tree: Device, placed: PlacedCap) -> CapRow:
    cap = placed.cap
    host = host_text(cap.host)
    expires = None
    if cap.expires is not None:
        expires = datetime.datetime.fromtimestamp(cap.expires, datetime.timezone.utc).isoformat(timespec="seconds")
    rate, cid = format_rate(cap.rate), plan_limits.cap_classid(tree, placed.slot)
    return CapRow(host, rate, cap.dev, cap.direction, cap.source, expires, cap.comment, cid)


limit_ip_app = common.new_app()


@limit_ip_app.callback(invoke_without_command=True)
def shape_limit_ip(
    ctx: typer.Context,
    config: common.ConfigOption = None,
    dry_run: common.DryRunOption = False,
    verbose: common.VerboseOption = False,
    version: common.VersionOption = False,
) -> None:
    """Per-IP caps: traffic sent to a host (address or CIDR) through a device is held to a rate.

    Without a verb: install the caps of [device.X.limits] plus the run-time
    ones — a class per host (rate = ceil) under the top class, the host's
    entry in the device's ipset, and one iptables rule per device that picks
    the class from that set. Classification is one hash lookup per packet,
    however many hosts are capped. Run after shape-init (the boot sequence is
    shape-init, shape-bypass, shape-mark, shape-limit-ip).

    Run-time caps (add/remove) are saved in $SHAPEKIT_STATE_DIR (default
    /var/lib/shapekit) and come back at boot until removed or lapsed.

    Exit status: 0 done; 2 bad input, nothing changed; 1 a system command failed.
    """
    ctx.obj = common.make_options(config, dry_run, verbose)
    if ctx.invoked_subcommand is None:
        common.reported("shape-limit-ip", lambda: limit_ip(ctx.obj))


@limit_ip_app.command("add")
def add_cap(
    ctx: typer.Context,
    host: Annotated[str, typer.Argument(help="IPv4/IPv6 address or CIDR block.", show_default=False)],
    rate: Annotated[str, typer.Argument(help="tc rate: 128kbit, 2mbit, 64kbps (bytes/s).", show_default=False)],
    dev: Annotated[Optional[str], common.dev_option("Device (needed when the config shapes several).")] = None,
    duration: Annotated[
        Optional[str], typer.Option("--for", metavar="DURATION", help="Lapse by itself after 90s, 30m, 2h, 1d...")
    ] = None,
    comment: Annotated[str, typer.Option("--comment", metavar="TEXT", help="Why: shown by list.")] = "",
    force: Annotated[
        bool, typer.Option("--force", help="Allow a block that holds this machine's own addresses.")
    ] = False,
    inbound: Annotated[
        bool,
        typer.Option(
            "--in",
            help="Cap traffic arriving from HOST (downloads), on the device's [device.X.ingress] tree. No --for.",
        ),
    ] = False,
    config: common.ConfigOption = None,
    dry_run: common.DryRunOption = False,
    verbose: common.VerboseOption = False,
) -> None:
    """Cap traffic to HOST (with --in: from HOST) at RATE now, touching only that
    host's class and its set entry (or, --in, its u32 filter). A host capped
    already gets the new rate in place."""

    request = CapRequest(host, rate, dev, duration, comment, force, inbound)
    common.reported("shape-limit-ip", lambda: limit_add(common.inherit_options(ctx, config, dry_run, verbose), request))


@limit_ip_app.command("remove")
def remove_cap(
    ctx: typer.Context,
    host: Annotated[
        str,
        typer.Argument(
            help="The capped address or CIDR block.", show_default=False, autocompletion=common.complete_capped_hosts
        ),
    ],
    dev: Annotated[Optional[str], common.dev_option("Device, when the host is capped on several.")] = None,
    inbound: Annotated[bool, typer.Option("--in", help="Only the cap on traffic arriving from HOST.")] = False,
    outbound: Annotated[bool, typer.Option("--out", help="Only the cap on traffic sent to HOST.")] = False,
    config: common.ConfigOption = None,
    dry_run: common.DryRunOption = False,
    verbose: common.VerboseOption = False,
) -> None:
    """Lift a host's run-time caps, both ways unless --in or --out (a cap from the
    config takes over again; config caps are removed there)."""

    direction = None if inbound == outbound else ("in" if inbound else "out")
    common.reported(
        "shape-limit-ip",
        lambda: limit_remove(common.inherit_options(ctx, config, dry_run, verbose), host, dev, direction),
    )


@limit_ip_app.command("sync")
def sync_caps(
    ctx: typer.Context,
    file: Annotated[
        Path,
        typer.Argument(
            metavar="FILE",
            help="CSV with a header (host,rate[,direction,comment,expires]) or JSON lines with those keys.",
            show_default=False,
        ),
    ],
    dev: Annotated[Optional[str], common.dev_option("Device (needed when the config shapes several).")] = None,
    config: common.ConfigOption = None,
    dry_run: common.DryRunOption = False,
    verbose: common.VerboseOption = False,
) -> None:
    """Make the device's run-time caps exactly FILE's, for a billing system: a cap
    kept keeps its class (a new rate is a class change, no queue dropped), a new
    one gets a class and an entry, one gone loses both; hosts whose cap is the
    same see nothing. direction is out (default), in or both; expires is ISO
    8601 with a zone or epoch seconds. Every row is checked first: a bad one is
    one line naming the file and row, exit 2, and nothing changes. --dry-run
    prints only what would change."""

    common.reported(
        "shape-limit-ip", lambda: limit_sync(common.inherit_options(ctx, config, dry_run, verbose), file, dev)
    )


@limit_ip_app.command("list")
def list_caps(ctx: typer.Context, config: common.ConfigOption = None, as_json: common.JsonOption = False) -> None:
    """List the caps in force: host, rate, device, direction (out: to the host, in: from it),
    source (config or run-time), expiry, comment, class."""

    def show() -> None:
        rows = limit_list(common.inherit_options(ctx, config, False, False))
        header = ["HOST", "RATE", "DEV", "DIR", "SOURCE", "EXPIRES", "CLASS", "COMMENT"]
        common.print_rows(
            rows,
            as_json,
            header,
            lambda r: [r.host, r.rate, r.dev, r.direction, r.source, r.expires or "-", r.classid, r.comment],
        )

    common.reported("shape-limit-ip", show)


def limit_ip_main() -> None:
    common.console(limit_ip_app, "shape-limit-ip")
