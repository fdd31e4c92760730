"""What each command does: config → plan → apply, wired together once."""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from shapekit import apply, plan, plan_mangle
from shapekit.addresses import Network, PortProto, ValueProblem, parse_host, parse_port_proto
from shapekit.config import Config, Device, config_path, load_config
from shapekit.errors import UsageError
from shapekit.plan_mangle import BYPASS, FAMILIES, MARK, Chains
from shapekit.state import BYPASS_FILE, RuntimeBypass, change_lock, state_dir


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


def init(options: Options, devs: list[str]) -> None:
    """shape-init: replace shapekit's tree on each selected device."""
    config = options.load()
    devices = select_devices(config, devs)
    apply.require_root(options.dry_run, "shape-init")
    apply.require_binaries(["tc"])
    apply.require_devices([d.name for d in devices])
    runner = options.runner()
    apply.probe_kernel(plan.kernel_features(devices))
    with options.lock():
        for device in devices:
            current = apply.read_root(runner, device.name)
            apply.apply_tree(runner, device.name, plan.plan_init(device, config.bypass, current))


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
        if forget and not options.dry_run:
            (state_dir() / BYPASS_FILE).unlink(missing_ok=True)


def _check_mangle(options: Options, command: str) -> None:
    apply.require_root(options.dry_run, command)
    apply.require_binaries(apply.MANGLE_TOOLS)


def _install_mangle(options: Options, plans: dict[int, Chains], own: str) -> None:
    """Probe, then apply one command's chains in both IP families."""
    apply.probe_rules({f: plan_mangle.plan_restore(plan_mangle.EMPTY, plans[f], own) for f in plans})
    apply.apply_mangle(options.runner(), plans, own)


def mark(options: Options) -> None:
    """shape-mark: the [[mark]] rules into shapekit's mangle chains."""
    config = options.load()
    _check_mangle(options, "shape-mark")
    with options.lock():
        _install_mangle(options, {f: plan_mangle.mark_plan(config, f) for f in FAMILIES}, MARK)


def _install_bypass(options: Options, config: Config, runtime: RuntimeBypass) -> None:
    merged = config.bypass.with_entries(runtime.ports, runtime.hosts)
    _install_mangle(options, {f: plan_mangle.bypass_plan(config, merged, f) for f in FAMILIES}, BYPASS)


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
        return parse_host(text)
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
