"""What each command does: config → plan → apply, wired together once."""

from __future__ import annotations

import datetime
import os
import shutil
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from shapekit import apply, drift, plan, plan_limits, plan_mangle, status
from shapekit.addresses import Network, PortProto, ValueProblem, parse_host, parse_port_proto
from shapekit.config import Config, Device, config_path, load_config
from shapekit.config_rules import Bypass, Cap, check_cap, parse_bypass_host
from shapekit.errors import CommandFailed, UsageError
from shapekit.plan_limits import IPSET_MAX_TIMEOUT, LIMIT, PlacedCap, lapsed, place_caps, with_minor
from shapekit.plan_mangle import FAMILIES, MARK, Chains
from shapekit.state import BYPASS_FILE, LIMITS_FILE, RuntimeBypass, change_lock, load_caps, save_caps, state_dir
from shapekit.units import UnitError, format_rate, parse_duration, parse_rate


@dataclass(frozen=True)
class Options:
    """The options every command takes."""

    config: Path | None = None
    dry_run: bool = False
    verbose: bool = False

    def runner(self) -> apply.Runner:
        return apply.Runner(dry_run=self.dry_run, verbose=self.verbose)

    def load(self) -> Config:
        # A config run as root drives root commands: refuse one others can write.
        return load_config(config_path(self.config), check_owner=os.geteuid() == 0)

    def lock(self) -> AbstractContextManager[None]:
        return nullcontext() if self.dry_run else change_lock(state_dir())


def select_devices(config: Config, names: list[str]) -> list[Device]:
    """The configured devices named by --dev (all of them when none is named)."""
    unknown = [n for n in names if n not in config.devices]
    if unknown:
        configured = ", ".join(config.devices)
        raise UsageError(f"--dev {unknown[0]}: not a device in {config.path} (configured: {configured})")
    return [config.devices[n] for n in dict.fromkeys(names)] if names else list(config.devices.values())


def init(options: Options, devs: list[str], skip_unknown: bool = False, skip_absent: bool = False) -> None:
    """shape-init: replace shapekit's tree on each selected device."""
    config = options.load()
    if skip_unknown and devs:
        devs = [d for d in devs if d in config.devices]
        if not devs:
            return
    devices = select_devices(config, devs)
    if skip_absent:  # at boot: a USB, PPP or VPN device that is not there yet gets its tree when it comes
        devices = [d for d in devices if apply.device_exists(d.name)]
    apply.require_root(options.dry_run, "shape-init")
    apply.require_binaries(["tc"])
    apply.require_devices([d.name for d in devices])
    runner = options.runner()
    apply.probe_kernel(plan.kernel_features(devices))
    with options.lock():
        runtime, now = load_caps(state_dir()), time.time()
        for device in devices:
            current = apply.read_root(runner, device.name)
            caps = plan_limits.cap_tree(device, place_caps(device, runtime, now))
            apply.apply_tree(runner, device.name, plan.plan_init(device, config.bypass, current) + caps)


def check(options: Options, devs: list[str]) -> list[str]:
    """shape-init --check: every way the kernel differs from the config and saved state; changes nothing."""
    config = options.load()
    devices = select_devices(config, devs)
    if os.geteuid() != 0:
        raise UsageError("--check reads the kernel's netfilter and ipset state: run it as root")
    apply.require_binaries(["tc", "ipset", "unshare", *apply.MANGLE_TOOLS])
    apply.require_devices([d.name for d in devices])
    runner = options.runner()
    now = time.time()
    saved = load_caps(state_dir())
    bypass = _merged_bypass(config, RuntimeBypass.load(state_dir()))
    placed = {d.name: place_caps(d, saved, now) for d in config.devices.values()}
    differences = []
    for device in devices:
        cmds = plan.plan_tree(device, config.bypass) + plan_limits.cap_tree(device, placed[device.name])
        have = apply.read_tree(runner, device.name, plan.root_handle())
        # A lapsed cap's class stays until the next full install: neither wanted nor drift.
        have = drift.without(have, {plan.classid(m) for m in plan_limits.lapsed_minors(device, saved, now)})
        differences += drift.diff_tree(device.name, drift.planned_tree(cmds), have)
    if devs:
        return differences  # a device's own check: its tree
    sets = "".join(plan_limits.plan_sets(name, caps, now) for name, caps in placed.items())
    for family in FAMILIES:
        chains = {**plan_mangle.mark_plan(config, bypass, family), **plan_mangle.limit_plan(config, bypass, family)}
        want = apply.canonical_mangle(family, sets, plan_mangle.plan_restore(plan_mangle.EMPTY, chains, None))
        differences += drift.diff_chains(family, want, apply.read_mangle(runner, family))
    want_entries = {
        (plan_limits.set_name(name, p.cap.host.version), str(p.cap.host), plan.classid(p.minor))
        for name, caps in placed.items()
        for p in caps
    }
    return differences + drift.diff_sets(want_entries, apply.read_set_entries(runner))


def flush(options: Options, devs: list[str], forget: bool) -> None:
    """shape-flush: remove shapekit's trees, chains and jumps (only the named devices' trees with --dev)."""
    apply.require_root(options.dry_run, "shape-flush")
    apply.require_binaries(["tc"] if devs else ["tc", *apply.MANGLE_TOOLS])
    apply.require_devices(devs)
    runner = options.runner()
    with options.lock():
        names = devs or apply.devices_with_root(runner, plan.root_handle(), "htb")
        for dev in names:
            cmds = plan.plan_flush(dev, apply.read_root(runner, dev))
            runner.tc_batch(f"{dev}: remove shapekit's tree", cmds)
        if not devs:
            apply.flush_mangle(runner)
            if shutil.which("ipset"):  # sets go after the rules that use them
                apply.ipset_restore(
                    runner, "remove shapekit's sets", plan_limits.plan_destroy_sets(apply.list_sets(runner))
                )
        if forget and not options.dry_run:
            for name in (BYPASS_FILE, LIMITS_FILE):
                (state_dir() / name).unlink(missing_ok=True)


def _check_mangle(options: Options, command: str) -> None:
    apply.require_root(options.dry_run, command)
    apply.require_binaries(apply.MANGLE_TOOLS)


def _install_mangle(options: Options, plans: dict[int, Chains], own: str | None) -> None:
    """Probe, then apply one command's chains in both IP families."""
    apply.probe_rules({f: plan_mangle.plan_restore(plan_mangle.EMPTY, plans[f], own) for f in plans})
    apply.apply_mangle(options.runner(), plans, own)


def mark(options: Options) -> None:
    """shape-mark: the [[mark]] rules into shapekit's mangle chains."""
    config = options.load()
    _check_mangle(options, "shape-mark")
    with options.lock():
        bypass = _merged_bypass(config, RuntimeBypass.load(state_dir()))
        _install_mangle(options, {f: plan_mangle.mark_plan(config, bypass, f) for f in FAMILIES}, MARK)


def _merged_bypass(config: Config, runtime: RuntimeBypass) -> Bypass:
    """The config's bypass and the run-time entries: every command writes the bypass chain."""
    return config.bypass.with_entries(runtime.ports, runtime.hosts)


def _install_bypass(options: Options, config: Config, runtime: RuntimeBypass) -> None:
    merged = _merged_bypass(config, runtime)
    _install_mangle(options, {f: plan_mangle.bypass_plan(config, merged, f) for f in FAMILIES}, None)


def bypass(options: Options) -> None:
    """shape-bypass: the config's bypass plus the run-time entries."""
    config = options.load()
    _check_mangle(options, "shape-bypass")
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
    _check_mangle(options, "shape-bypass")
    ports = [e for e in parsed if isinstance(e, PortProto)]
    hosts = [e for e in parsed if not isinstance(e, PortProto)]
    with options.lock():
        runtime = RuntimeBypass.load(state_dir())
        updated = RuntimeBypass(
            ports=_edited(runtime.ports, config.bypass.ports, ports, add, config.path),
            hosts=_edited(runtime.hosts, config.bypass.hosts, hosts, add, config.path),
        )
        _install_bypass(options, config, updated)
        if not options.dry_run:
            updated.save(state_dir())


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
    apply.require_root(options.dry_run, "shape-limit-ip")
    apply.require_binaries(["tc", "ip", "ipset", *apply.MANGLE_TOOLS])


def _live(caps: list[Cap], now: float) -> list[Cap]:
    return [c for c in caps if not lapsed(c, now)]


def _lapsed(device: Device, caps: list[Cap], now: float) -> list[PlacedCap]:
    return [PlacedCap(c, c.minor) for c in caps if c.dev == device.name and lapsed(c, now) and c.minor is not None]


def limit_ip(options: Options) -> None:
    """shape-limit-ip: every device's caps (config plus run-time) into classes, sets and one rule each."""
    config = options.load()
    _check_limits(options)
    with options.lock():
        now = time.time()
        _install_limits(options, config, _live(load_caps(state_dir()), now), now)


def _install_limits(options: Options, config: Config, runtime: list[Cap], now: float) -> None:
    """Make the kernel's caps exactly `runtime` plus the config's; save the run-time ones. Hold the lock."""
    apply.probe_caps()
    runner = options.runner()
    present = [d for d in config.devices.values() if apply.device_exists(d.name)]  # a hotplug device may be away
    for device in present:
        apply.require_shapekit_tree(runner, device.name)
    saved = [c for c in runtime if c.dev not in {d.name for d in present}]  # kept until their device is back
    for device in present:
        placed = place_caps(device, runtime, now)
        sync = plan_limits.sync_cap_classes(device, placed, apply.read_cap_classes(runner, device.name))
        runner.tc_batch(f"{device.name}: per-IP cap classes", sync)
        apply.ipset_restore(runner, f"{device.name}: per-IP cap sets", plan_limits.plan_sets(device.name, placed, now))
        saved += [with_minor(p) for p in placed if p.cap.source == "run-time"]
    bypass = _merged_bypass(config, RuntimeBypass.load(state_dir()))
    apply.apply_mangle(runner, {f: plan_mangle.limit_plan(config, bypass, f) for f in FAMILIES}, LIMIT)
    if not options.dry_run:
        save_caps(state_dir(), saved)


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


def limit_add(options: Options, request: CapRequest) -> None:
    """shape-limit-ip add: cap one host now, touching only its own class and set entry."""
    config = options.load()
    device = pick_device(config, request.dev)
    host = _host(request.host)
    try:
        rate = parse_rate(request.rate)
        seconds = parse_duration(request.duration) if request.duration else None
    except UnitError as exc:
        raise UsageError(str(exc)) from None
    if not request.comment.isprintable():
        raise UsageError("--comment must be one line of printable text")
    if seconds is not None and seconds > IPSET_MAX_TIMEOUT:
        raise UsageError(
            f"--for {request.duration} is longer than ipset's longest timeout ({IPSET_MAX_TIMEOUT}s, about 24 days)"
        )
    problem = check_cap(host, rate, device.rate)
    if problem:
        raise UsageError(problem)
    if seconds is not None and any(c.host == host for c in device.limits):
        raise UsageError(
            f"{host} is capped by {config.path}: a cap --for a while would drop that cap when it lapses; "
            "add it without --for, or change the config"
        )
    _check_limits(options)
    apply.require_devices([device.name])
    runner = options.runner()
    if not request.force:
        _refuse_own_addresses(runner, host)
    with options.lock():
        if options.dry_run:
            apply.require_shapekit_tree(runner, device.name)
        now = time.time()
        saved = load_caps(state_dir())  # lapsed ones too: their classes still hold their minors
        mine = next((c for c in saved if c.key == (device.name, host)), None)
        others = [c for c in saved if c is not mine]
        expires = now + seconds if seconds else None
        # Capped already: the new rate goes into the same class.
        cap = Cap(host, rate, device.name, "run-time", expires, request.comment, mine.minor if mine else None)
        if not {plan_limits.set_name(device.name, f) for f in FAMILIES} <= set(apply.list_sets(runner)):
            # Never installed since boot: install everything, this cap included.
            _install_limits(options, config, _live([*others, cap], now), now)
            return
        placed = next(p for p in place_caps(device, [*others, cap], now) if p.cap.host == host)
        try:
            runner.tc_batch(
                f"{device.name}: the class of {host}",
                plan_limits.cap_class(device.name, device.leaf, placed, "replace"),
            )
        except CommandFailed:
            # Asked only now: reading the root dumps every qdisc, 20 ms with 10,000 caps.
            apply.require_shapekit_tree(runner, device.name)
            raise
        apply.ipset_restore(
            runner, f"{device.name}: {host} to its class", plan_limits.plan_set_entry(device.name, placed, now)
        )
        if not options.dry_run:
            save_caps(state_dir(), [*others, with_minor(placed)])


def _refuse_own_addresses(runner: apply.Runner, host: Network) -> None:
    own = [a for a in apply.local_addresses(runner) if a.version == host.version and a in host]
    if own:
        raise UsageError(
            f"{host} holds this machine's own address {own[0]}: capping it would throttle the machine itself (use --force if you mean it)"
        )


def limit_remove(options: Options, host_text: str, dev: str | None) -> None:
    """shape-limit-ip remove: lift a run-time cap (a config cap takes over again if there is one)."""
    config = options.load()
    host = _host(host_text)
    _check_limits(options)
    runner = options.runner()
    with options.lock():
        now = time.time()
        saved = load_caps(state_dir())
        runtime = _live(saved, now)
        matches = [c for c in runtime if c.host == host and (dev is None or c.dev == dev)]
        if not matches:
            in_config = [d.name for d in config.devices.values() if any(c.host == host for c in d.limits)]
            where = (
                f"capped by {config.path} on {in_config[0]}: remove it there"
                if in_config
                else "not capped (see shape-limit-ip list)"
            )
            raise UsageError(f"{host} is {where}")
        if len(matches) > 1:
            raise UsageError(f"{host} is capped on {', '.join(c.dev for c in matches)}: pass --dev")
        removed = matches[0]
        device = config.devices.get(removed.dev)
        kept = [c for c in saved if c is not removed]
        if device is not None:
            apply.require_devices([device.name])
            _lift(runner, device, removed, kept, now)
        if not options.dry_run:
            save_caps(state_dir(), kept)


def _lift(runner: apply.Runner, device: Device, removed: Cap, kept: list[Cap], now: float) -> None:
    before = next(p for p in place_caps(device, [*kept, removed], now) if p.cap.host == removed.host)
    after = next((p for p in place_caps(device, kept, now) if p.cap.host == removed.host), None)
    if after is None:
        apply.ipset_restore(
            runner, f"{device.name}: {removed.host} uncapped", plan_limits.plan_set_removal(device.name, removed.host)
        )
        if before.minor in apply.read_cap_classes(runner, device.name):  # gone already after a flush or re-init
            runner.tc_batch(
                f"{device.name}: the class of {removed.host}", plan_limits.remove_cap_class(device.name, before.minor)
            )
    else:  # back to the config's cap, in the same class
        runner.tc_batch(
            f"{device.name}: {removed.host} back to its config cap",
            plan_limits.cap_class(device.name, device.leaf, after, "replace"),
        )
        apply.ipset_restore(
            runner, f"{device.name}: {removed.host}", plan_limits.plan_set_entry(device.name, after, now)
        )


@dataclass(frozen=True)
class CapRow:
    host: str
    rate: str
    dev: str
    source: str
    expires: str | None  # ISO 8601, UTC
    comment: str
    classid: str


def limit_list(options: Options) -> list[CapRow]:
    config = options.load()
    now = time.time()
    runtime = _live(load_caps(state_dir()), now)
    rows = []
    for device in config.devices.values():
        for p in place_caps(device, runtime, now):
            rows.append(_row(p))
    return rows


def _row(placed: PlacedCap) -> CapRow:
    cap = placed.cap
    host = str(cap.host.network_address) if cap.host.prefixlen == cap.host.max_prefixlen else str(cap.host)
    expires = None
    if cap.expires is not None:
        expires = datetime.datetime.fromtimestamp(cap.expires, datetime.timezone.utc).isoformat(timespec="seconds")
    return CapRow(host, format_rate(cap.rate), cap.dev, cap.source, expires, cap.comment, plan.classid(placed.minor))


# --- shape-status ---------------------------------------------------------------


def status_sample(options: Options, devs: list[str], interval: float) -> dict:
    """One sample: each device's classes with their rate over `interval` seconds, and the rule counters."""
    config = options.load()
    devices = select_devices(config, devs)
    apply.require_devices([d.name for d in devices])
    now = time.time()
    saved = load_caps(state_dir())
    names = {d.name: status.class_names(d, place_caps(d, saved, now), _lapsed(d, saved, now)) for d in devices}
    start = time.monotonic()
    before = {d.name: apply.read_classes(d.name) for d in devices}
    time.sleep(interval)
    after = {d.name: apply.read_classes(d.name) for d in devices}
    seconds = time.monotonic() - start
    rows = {d.name: status.class_rows(names[d.name], before[d.name], after[d.name], seconds) for d in devices}
    counters = apply.read_rule_counters(options.runner())
    rules = None if counters is None else [r for f, text in counters.items() for r in status.rule_rows(f, text)]
    when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return status.sample_document(when, round(seconds, 3), rows, rules)
