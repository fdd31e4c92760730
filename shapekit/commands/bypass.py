"""shape-bypass: traffic that skips shaping (config plus run-time entries); add, remove, list."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Annotated, TypeVar

import typer

from shapekit.commands import common
from shapekit.config.addresses import Network, PortProto, ValueProblem, parse_port_proto
from shapekit.config.model import Config
from shapekit.config.rules import parse_bypass_host
from shapekit.errors import UsageError
from shapekit.kernel import run
from shapekit.plan import ingress as plan_ingress
from shapekit.plan import mangle as plan_mangle
from shapekit.plan.mangle import FAMILIES
from shapekit.state import RuntimeBypass, state_dir


def _install_bypass(
    options: common.Options, config: Config, runtime: RuntimeBypass, then: Callable[[], None] | None = None
) -> None:
    """The bypass chain and the ingress bypass filters, as one transaction; `then` (saving the file) last in it."""
    runner = options.runner()
    merged = common.merged_bypass(config, runtime)
    plans = {f: plan_mangle.bypass_plan(config, merged, f) for f in FAMILIES}
    bypassed = plan_ingress.bypass_filters(merged)
    inbound = common.ingress_filters(config, lambda _: bypassed)
    common.probe_mangle(plans, None)
    with run.transaction(runner) as journal:
        common.install_mangle(runner, plans, None, journal)
        common.refresh_ingress(runner, journal, "bypass", plan_ingress.BYPASS_PREF, inbound)
        if then is not None and not options.dry_run:
            then()  # last: a failure before it leaves the file as the kernel is again


def bypass(options: common.Options) -> None:
    """shape-bypass: the config's bypass plus the run-time entries."""
    config = options.load()
    common.check_mangle(options, "shape-bypass", config)
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


def bypass_edit(options: common.Options, entries: list[str], *, add: bool) -> None:
    """shape-bypass add|remove: change the run-time entries and apply them at once."""
    config = options.load()
    parsed = list(dict.fromkeys(parse_bypass_entry(e) for e in entries))
    if not parsed:
        raise UsageError(f"name what to {'add' if add else 'remove'}: PORT/PROTO (22/tcp) or a host (198.51.100.7)")
    common.check_mangle(options, "shape-bypass", config)
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


def bypass_list(options: common.Options) -> list[BypassEntry]:
    config = options.load()
    runtime = RuntimeBypass.load(state_dir())
    rows = []
    for source, entries in (("config", config.bypass), ("run-time", runtime)):
        rows += [BypassEntry(str(p), "port", source) for p in entries.ports]
        rows += [BypassEntry(str(h), "host", source) for h in entries.hosts]
    return rows


bypass_app = common.new_app()


@bypass_app.callback(invoke_without_command=True)
def shape_bypass(
    ctx: typer.Context,
    config: common.ConfigOption = None,
    dry_run: common.DryRunOption = False,
    verbose: common.VerboseOption = False,
    version: common.VersionOption = False,
) -> None:
    """Traffic that skips shaping: [bypass] ports (source or destination) and hosts
    (to or from) get the bypass mark (default 1001) and go to the unshaped class
    5c:2 at the line rate, before any [[mark]] rule is asked.

    Without a verb: install the config's bypass plus the run-time entries.
    Run-time entries (add/remove) are saved in $SHAPEKIT_STATE_DIR
    (default /var/lib/shapekit) and take effect at once, on live flows too.

    Exit status: 0 done; 2 bad input, nothing changed; 1 a system command failed.
    """
    ctx.obj = common.make_options(config, dry_run, verbose)
    if ctx.invoked_subcommand is None:
        common.reported("shape-bypass", lambda: bypass(ctx.obj))


EntriesArgument = Annotated[list[str], typer.Argument(metavar="PORT/PROTO|HOST...", show_default=False)]


@bypass_app.command("add")
def add_entries(
    ctx: typer.Context,
    entries: EntriesArgument,
    config: common.ConfigOption = None,
    dry_run: common.DryRunOption = False,
    verbose: common.VerboseOption = False,
) -> None:
    """Bypass ports (22/tcp, 6000:6100/udp) or hosts (198.51.100.7, 2001:db8::/64) now, and at every boot."""

    _edit(ctx, entries, config, dry_run, verbose, add=True)


@bypass_app.command("remove")
def remove_entries(
    ctx: typer.Context,
    entries: EntriesArgument,
    config: common.ConfigOption = None,
    dry_run: common.DryRunOption = False,
    verbose: common.VerboseOption = False,
) -> None:
    """Shape run-time bypass entries again (entries from the config are removed there)."""

    _edit(ctx, entries, config, dry_run, verbose, add=False)


def _edit(
    ctx: typer.Context, entries: list[str], config: Path | None, dry_run: bool, verbose: bool, *, add: bool
) -> None:
    common.reported(
        "shape-bypass", lambda: bypass_edit(common.inherit_options(ctx, config, dry_run, verbose), entries, add=add)
    )


@bypass_app.command("list")
def list_entries(ctx: typer.Context, config: common.ConfigOption = None, as_json: common.JsonOption = False) -> None:
    """List the bypass entries: port or host, and whether from the config or added at run time."""

    def show() -> None:
        rows = bypass_list(common.inherit_options(ctx, config, False, False))
        common.print_rows(rows, as_json, ["ENTRY", "KIND", "SOURCE"], lambda r: [r.entry, r.kind, r.source])

    common.reported("shape-bypass", show)


def bypass_main() -> None:
    common.console(bypass_app, "shape-bypass")
