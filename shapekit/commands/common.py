"""What every command shares: its options, the one line an error is, the lock, and the
config's parts more than one command installs (the bypass, the ingress filters).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Optional, TypeVar

import typer
from typer.completion import completion_init

from shapekit import __version__
from shapekit.config.addresses import host_text
from shapekit.config.load import config_path, load_config
from shapekit.config.model import Config, Device
from shapekit.config.rules import Bypass, Cap
from shapekit.errors import ShapekitError, UsageError
from shapekit.kernel import change, probe, read, run
from shapekit.plan import ingress as plan_ingress
from shapekit.plan import mangle as plan_mangle
from shapekit.plan.ingress import U32Filter
from shapekit.plan.limits import lapsed
from shapekit.plan.mangle import Chains
from shapekit.plan.status import table
from shapekit.state import (
    RuntimeBypass,
    change_lock,
    load_caps,
    load_created_tables,
    save_created_tables,
    state_dir,
    write_state_text,
)

T = TypeVar("T")


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


def saved_caps(config: Config) -> list[Cap]:
    """The run-time caps in limits.json (lapsed ones too), each checked against its tree's line rate."""
    return load_caps(state_dir(), line_rates(config))


def line_rates(config: Config) -> dict[tuple[str, str], int]:
    """Each tree's line rate by (device, direction): no cap goes faster."""
    return {(t.configured, t.direction): t.rate for d in config.devices.values() for t in d.trees}


def select_devices(config: Config, names: list[str]) -> list[Device]:
    """The configured devices named by --dev (all of them when none is named)."""
    unknown = [n for n in names if n not in config.devices]
    if unknown:
        configured = ", ".join(config.devices)
        raise UsageError(f"--dev {unknown[0]}: not a device in {config.path} (configured: {configured})")
    return [config.devices[n] for n in dict.fromkeys(names)] if names else list(config.devices.values())


def check_mangle(options: Options, command: str, config: Config) -> None:
    probe.require_root(options.dry_run, command)
    ingress = any(d.ingress for d in config.devices.values())
    probe.require_binaries([*probe.MANGLE_TOOLS, "tc"] if ingress else probe.MANGLE_TOOLS)


def ingress_filters(
    config: Config, filters: Callable[[Device], list[U32Filter]]
) -> list[tuple[Device, list[U32Filter]]]:
    """One kind of filter for each ingress tree, refused before anything changes if u32 cannot keep it."""
    trees = [d.ingress for d in config.devices.values() if d.ingress is not None]
    return [(tree, plan_ingress.listable(filters(tree))) for tree in trees]


def refresh_ingress(
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


def probe_mangle(plans: dict[int, Chains], own: str | None) -> None:
    """Load the chains into a throwaway namespace: refuse what this machine cannot load, before any change."""
    probe.probe_rules({f: plan_mangle.plan_restore(plan_mangle.EMPTY, plans[f], own) for f in plans})


def install_mangle(runner: run.Runner, plans: dict[int, Chains], own: str | None, journal: run.Journal) -> None:
    """shapekit's chains (change.apply_mangle), then tables.json says which mangle tables shapekit created.

    Decided afresh in each family where none of shapekit's chains was there (a first install, or
    a fresh kernel after a reboot); kept as it is where they were.
    """
    before = load_created_tables(state_dir())  # a broken file is refused before anything changes
    fresh = change.apply_mangle(runner, plans, own, journal)
    created = (before - fresh.keys()) | {family for family, made in fresh.items() if made}
    if created != before:
        save_created_tables(state_dir(), created)


def merged_bypass(config: Config, runtime: RuntimeBypass) -> Bypass:
    """The config's bypass and the run-time entries: every command writes the bypass chain."""
    return config.bypass.with_entries(runtime.ports, runtime.hosts)


def live_caps(caps: list[Cap], now: float) -> list[Cap]:
    return [c for c in caps if not lapsed(c, now)]


def pick_device(config: Config, dev: str | None) -> Device:
    if dev is not None:
        if dev not in config.devices:
            raise UsageError(f"--dev {dev}: not a device in {config.path} (configured: {', '.join(config.devices)})")
        return config.devices[dev]
    if len(config.devices) > 1:
        raise UsageError(f"{config.path} shapes several devices ({', '.join(config.devices)}): pass --dev")
    return next(iter(config.devices.values()))


def new_app() -> typer.Typer:
    """A command's typer app: -h as --help, no completion install, plain help text."""
    return typer.Typer(
        context_settings={"help_option_names": ["-h", "--help"]}, add_completion=False, rich_markup_mode=None
    )


def print_rows(rows: list[Any], as_json: bool, header: list[str], cells: Callable[[Any], list[str]]) -> None:
    """What a list verb prints: JSON, or a table of one row per entry."""
    if as_json:
        typer.echo(json.dumps([dataclasses.asdict(r) for r in rows], indent=2))
    else:
        typer.echo(table(header, [cells(r) for r in rows]))


def _version(value: bool) -> None:
    if value:
        typer.echo(f"shapekit {__version__}")
        raise typer.Exit()


ConfigOption = Annotated[
    Optional[Path],
    typer.Option(
        "--config",
        "-c",
        metavar="PATH",
        help="Config file. Default: $SHAPEKIT_CONFIG, else /etc/shapekit/shapekit.toml.",
        show_default=False,
    ),
]


DryRunOption = Annotated[
    bool,
    typer.Option("--dry-run", "-n", help="Print what would run, as a shell script, and change nothing. Needs no root."),
]


VerboseOption = Annotated[bool, typer.Option("--verbose", "-v", help="Echo each command as it runs.")]


VersionOption = Annotated[
    bool,
    typer.Option("--version", callback=_version, is_eager=True, help="Print shapekit's version and exit."),
]


def complete_devices(ctx: typer.Context, incomplete: str) -> list[str]:
    """--dev <TAB>: the devices the config (--config, given before, or the default) shapes."""
    chosen = ctx.params.get("config") or (ctx.parent.params.get("config") if ctx.parent else None)
    try:
        devices = load_config(config_path(chosen), check_owner=False).devices
    except (ShapekitError, OSError):  # no config (yet), or a bad one: nothing to offer
        return []
    return [dev for dev in devices if dev.startswith(incomplete)]


def complete_capped_hosts(ctx: typer.Context, incomplete: str) -> list[str]:
    """shape-limit-ip remove <TAB>: the hosts with a run-time cap in force (the ones remove lifts)."""
    try:
        caps = live_caps(load_caps(state_dir()), time.time())
    except (ShapekitError, OSError):
        return []
    return sorted({host_text(cap.host) for cap in caps if host_text(cap.host).startswith(incomplete)})


def dev_option(help_text: str) -> Any:
    """A command's --dev/-d: a device the config shapes (completed from it)."""
    return typer.Option(
        "--dev", "-d", metavar="DEV", help=help_text, show_default=False, autocompletion=complete_devices
    )


DevOption = Annotated[Optional[list[str]], dev_option("Only this device (repeatable). Default: every one.")]


def reported(prog: str, action: Callable[[], T]) -> T:
    """Run one command (or its first part); a failure is one line on stderr and its exit status."""
    try:
        return action()
    except ShapekitError as exc:
        typer.echo(f"{prog}: {exc}", err=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        if prog == "shape-status":  # the way to end --watch
            raise typer.Exit(0) from None
        typer.echo(f"{prog}: interrupted", err=True)
        raise typer.Exit(130) from None


def make_options(config: Path | None, dry_run: bool, verbose: bool) -> Options:

    return Options(config=config, dry_run=dry_run, verbose=verbose)


def inherit_options(ctx: typer.Context, config: Path | None, dry_run: bool, verbose: bool) -> Options:
    """A verb's options, with those given before the verb filling in what it lacks."""
    parent = ctx.parent.obj if ctx.parent and ctx.parent.obj else make_options(None, False, False)
    return make_options(config or parent.config, dry_run or parent.dry_run, verbose or parent.verbose)


JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def write_metrics(path: Path, sample: Callable[[], str], down: str) -> None:
    """A Prometheus sample into `path`, replaced whole (node_exporter never reads half a file); a failed
    sample leaves `down` there (its `..._up 0`), and its error still ends the command. Not synced to disk,
    as node_exporter's textfile collector asks: the next sample replaces it within seconds."""
    try:
        text = sample()
    except ShapekitError:
        write_state_text(path, down, durable=False)
        raise
    write_state_text(path, text, durable=False)


def in_background(work: Callable[[], T]) -> Callable[[], T]:
    """Start `work` in a thread of its own now; the returned call waits for it and gives what it returned,
    or raises what it raised (for a read that waits on a process while this one parses)."""
    outcome: list[Any] = []

    def target() -> None:
        try:
            outcome.append((True, work()))
        except BaseException as exc:  # noqa: BLE001 -- handed to the waiting thread
            outcome.append((False, exc))

    thread = threading.Thread(target=target, daemon=True)
    thread.start()

    def wait() -> T:
        thread.join()
        ok, value = outcome[0]
        if not ok:
            raise value
        return value

    return wait


def output_option(help_text: str) -> Any:
    """`--output FILE` / `-o FILE`, with what a command writes there."""
    return typer.Option("--output", "-o", metavar="FILE", help=help_text, show_default=False)


def format_option(help_text: str) -> Any:
    """`--format F` / `-f F`: how a command prints (its choices: an Enum's values)."""
    return typer.Option("--format", "-f", help=help_text)


# click's usage errors (unknown option, missing argument, bad value): BadParameter is one of them.
_ClickUsageError: type[Exception] = typer.BadParameter.__mro__[1]


def console(app: typer.Typer, prog: str) -> None:
    """Run a console script: a usage error is one line and exit 2, like every other bad input.

    Without the cyclic garbage collector: a command lives for a moment, and the collector's passes over
    10,000 caps' objects cost more than the few cycles it would free (a Prometheus sample: 45 ms of 0.55 s).
    shape-status --watch, which lives on, collects after each sample.
    """
    gc.disable()
    if f"_{prog.replace('-', '_').upper()}_COMPLETE" in os.environ:  # bash asks for completions (init/install)
        completion_init()
    try:
        code = app(prog_name=prog, standalone_mode=False)
    except _ClickUsageError as exc:
        sys.stderr.write(f"{prog}: {_usage_line(exc)}\n")
        sys.exit(2)
    except typer.Abort:
        sys.stderr.write(f"{prog}: interrupted\n")
        sys.exit(130)
    except OSError as exc:  # the output cannot be written: a full disk, a closed pipe
        sys.stderr.write(f"{prog}: cannot write the output: {exc.strerror or exc}\n")
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


def _usage_line(exc: Exception) -> str:
    """click's "Error: No such option: --bogus." as "no such option: --bogus (see shape-init --help)"."""
    message = " ".join(exc.format_message().split()).rstrip(".")  # type: ignore[attr-defined]
    context = getattr(exc, "ctx", None)
    where = context.command_path if context is not None else ""
    hint = f" (see {where} --help)" if where else ""
    return message[:1].lower() + message[1:] + hint
