"""What each command does: config → plan → apply, wired together once."""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

from shapekit import apply, plan
from shapekit.config import Config, Device, config_path, load_config
from shapekit.errors import UsageError
from shapekit.state import change_lock, state_dir


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
    apply.probe_kernel(runner, plan.kernel_features(devices))
    with options.lock():
        for device in devices:
            current = apply.read_root(runner, device.name)
            apply.apply_tree(runner, device.name, plan.plan_init(device, current))


def flush(options: Options, devs: list[str]) -> None:
    """shape-flush: remove shapekit's tree from the named devices, or from every device that has one."""
    apply.require_root(options.dry_run, "shape-flush")
    apply.require_binaries(["tc"])
    apply.require_devices(devs)
    runner = options.runner()
    with options.lock():
        names = devs or apply.devices_with_root(runner, plan.root_handle(), "htb")
        for dev in names:
            cmds = plan.plan_flush(dev, apply.read_root(runner, dev))
            runner.tc_batch(f"{dev}: remove shapekit's tree", cmds)
