"""Thin typer apps, one per command: parse options, call `commands`, map errors to exit codes."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from shapekit import __version__
from shapekit.errors import ShapekitError
from shapekit.plan.status import table

if TYPE_CHECKING:
    from shapekit.commands.limit_ip import Options

CONTEXT = {"help_option_names": ["-h", "--help"]}


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
DevOption = Annotated[
    Optional[list[str]],
    typer.Option(
        "--dev", "-d", metavar="DEV", help="Only this device (repeatable). Default: every one.", show_default=False
    ),
]


def _run(prog: str, action: Callable[[], None]) -> None:
    """Run one command; a failure is one line on stderr and its exit status."""
    try:
        action()
    except ShapekitError as exc:
        typer.echo(f"{prog}: {exc}", err=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        if prog == "shape-status":  # the way to end --watch
            raise typer.Exit(0) from None
        typer.echo(f"{prog}: interrupted", err=True)
        raise typer.Exit(130) from None


def _options(config: Path | None, dry_run: bool, verbose: bool) -> Options:
    from shapekit.commands.limit_ip import Options

    return Options(config=config, dry_run=dry_run, verbose=verbose)


init_app = typer.Typer(context_settings=CONTEXT, add_completion=False, rich_markup_mode=None)


@init_app.command()
def shape_init(
    dev: DevOption = None,
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
    config: ConfigOption = None,
    dry_run: DryRunOption = False,
    verbose: VerboseOption = False,
    version: VersionOption = False,
) -> None:
    """Build each configured device's HTB tree: root qdisc, top class at the line rate,
    the unshaped bypass class, the classes, their leaf qdiscs and filters, and a
    class for each per-IP cap.

    Replaces whatever root qdisc the device had (shapekit's earlier tree
    included) in one `tc -batch`; running it twice gives the same kernel state.
    If a command fails, the device is left unshaped, never half-shaped.

    With [device.X.ingress], arriving traffic is shaped too: shapekit makes an
    IFB device (ifb-X), builds the ingress tree there with u32 filters for the
    caps, the bypass and the direction = "in" rules, and redirects what
    arrives on X to it.

    --check compares instead: the trees (ingress ones and their redirect and
    filters too), shapekit's iptables/ip6tables chains and its cap sets (with
    --dev: only those devices' trees), for monitoring.

    Exit status: 0 done (--check: the kernel matches); 2 bad input (config,
    options, missing device or kernel feature, not root), nothing changed; 1 a
    system command failed (--check: the kernel differs, as printed).
    """
    from shapekit.commands import limit_ip as commands

    options = _options(config, dry_run, verbose)
    if check:

        def report() -> None:
            differences = commands.check(options, dev or [])
            for line in differences:
                typer.echo(line)
            if differences:
                raise typer.Exit(1)
            typer.echo("the kernel matches the config and saved state")

        _run("shape-init", report)
        return
    _run("shape-init", lambda: commands.init(options, dev or [], skip_unknown, skip_absent))


flush_app = typer.Typer(context_settings=CONTEXT, add_completion=False, rich_markup_mode=None)


@flush_app.command()
def shape_flush(
    dev: DevOption = None,
    forget: Annotated[bool, typer.Option("--forget", help="Also delete the saved run-time entries (bypass).")] = False,
    config: ConfigOption = None,
    dry_run: DryRunOption = False,
    verbose: VerboseOption = False,
    version: VersionOption = False,
) -> None:
    """Remove everything shapekit installed, and nothing else: its root qdisc (handle 5c:)
    on every device that has one, its IFB devices (alias "shapekit ingress of X")
    with their redirect from X (and X's ingress qdisc when no other filter is on
    it), its mangle chains (SHAPEKIT*) and the jump to them, in iptables and
    ip6tables, and its ipsets.

    With --dev, only those devices' trees (and IFBs) go; the chains stay for the
    other devices. Run-time entries stay saved (the boot sequence re-applies them)
    unless --forget. Needs no config.

    Exit status: 0 done; 2 bad input, nothing changed; 1 a system command failed.
    """
    from shapekit.commands import limit_ip as commands

    _run("shape-flush", lambda: commands.flush(_options(config, dry_run, verbose), dev or [], forget))


mark_app = typer.Typer(context_settings=CONTEXT, add_completion=False, rich_markup_mode=None)


@mark_app.command()
def shape_mark(
    config: ConfigOption = None,
    dry_run: DryRunOption = False,
    verbose: VerboseOption = False,
    version: VersionOption = False,
) -> None:
    """Install the [[mark]] rules in shapekit's own mangle chains, in iptables and ip6tables.

    Rules run in file order and the first match wins; a rule's mark is saved to
    its connection (except tcp_flags rules), so every packet of a connection
    lands in the same class. A rule with IPv4 addresses goes only to iptables,
    one with IPv6 addresses only to ip6tables. The chains are reached by one
    jump from mangle POSTROUTING; each family's change is one transaction.

    Exit status: 0 done; 2 bad input (config, a match this machine lacks,
    not root), nothing changed; 1 a system command failed (nothing left half-applied).
    """
    from shapekit.commands import limit_ip as commands

    _run("shape-mark", lambda: commands.mark(_options(config, dry_run, verbose)))


bypass_app = typer.Typer(context_settings=CONTEXT, add_completion=False, rich_markup_mode=None)


def _inherit(ctx: typer.Context, config: Path | None, dry_run: bool, verbose: bool) -> Options:
    """A verb's options, with those given before the verb filling in what it lacks."""
    parent = ctx.parent.obj if ctx.parent and ctx.parent.obj else _options(None, False, False)
    return _options(config or parent.config, dry_run or parent.dry_run, verbose or parent.verbose)


@bypass_app.callback(invoke_without_command=True)
def shape_bypass(
    ctx: typer.Context,
    config: ConfigOption = None,
    dry_run: DryRunOption = False,
    verbose: VerboseOption = False,
    version: VersionOption = False,
) -> None:
    """Traffic that skips shaping: [bypass] ports (source or destination) and hosts
    (to or from) get the bypass mark (default 1001) and go to the unshaped class
    5c:2 at the line rate, before any [[mark]] rule is asked.

    Without a verb: install the config's bypass plus the run-time entries.
    Run-time entries (add/remove) are saved in $SHAPEKIT_STATE_DIR
    (default /var/lib/shapekit) and take effect at once, on live flows too.

    Exit status: 0 done; 2 bad input, nothing changed; 1 a system command failed.
    """
    ctx.obj = _options(config, dry_run, verbose)
    if ctx.invoked_subcommand is None:
        from shapekit.commands import limit_ip as commands

        _run("shape-bypass", lambda: commands.bypass(ctx.obj))


EntriesArgument = Annotated[list[str], typer.Argument(metavar="PORT/PROTO|HOST...", show_default=False)]


@bypass_app.command("add")
def bypass_add(
    ctx: typer.Context,
    entries: EntriesArgument,
    config: ConfigOption = None,
    dry_run: DryRunOption = False,
    verbose: VerboseOption = False,
) -> None:
    """Bypass ports (22/tcp, 6000:6100/udp) or hosts (198.51.100.7, 2001:db8::/64) now, and at every boot."""
    from shapekit.commands import limit_ip as commands

    _run("shape-bypass", lambda: commands.bypass_edit(_inherit(ctx, config, dry_run, verbose), entries, add=True))


@bypass_app.command("remove")
def bypass_remove(
    ctx: typer.Context,
    entries: EntriesArgument,
    config: ConfigOption = None,
    dry_run: DryRunOption = False,
    verbose: VerboseOption = False,
) -> None:
    """Shape run-time bypass entries again (entries from the config are removed there)."""
    from shapekit.commands import limit_ip as commands

    _run("shape-bypass", lambda: commands.bypass_edit(_inherit(ctx, config, dry_run, verbose), entries, add=False))


JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


@bypass_app.command("list")
def bypass_list(ctx: typer.Context, config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """List the bypass entries: port or host, and whether from the config or added at run time."""
    from shapekit.commands import limit_ip as commands

    def show() -> None:
        rows = commands.bypass_list(_inherit(ctx, config, False, False))
        if as_json:
            typer.echo(json.dumps([dataclasses.asdict(r) for r in rows], indent=2))
        else:
            typer.echo(table(["ENTRY", "KIND", "SOURCE"], [[r.entry, r.kind, r.source] for r in rows]))

    _run("shape-bypass", show)


limit_ip_app = typer.Typer(context_settings=CONTEXT, add_completion=False, rich_markup_mode=None)


@limit_ip_app.callback(invoke_without_command=True)
def shape_limit_ip(
    ctx: typer.Context,
    config: ConfigOption = None,
    dry_run: DryRunOption = False,
    verbose: VerboseOption = False,
    version: VersionOption = False,
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
    ctx.obj = _options(config, dry_run, verbose)
    if ctx.invoked_subcommand is None:
        from shapekit.commands import limit_ip as commands

        _run("shape-limit-ip", lambda: commands.limit_ip(ctx.obj))


@limit_ip_app.command("add")
def limit_add(
    ctx: typer.Context,
    host: Annotated[str, typer.Argument(help="IPv4/IPv6 address or CIDR block.", show_default=False)],
    rate: Annotated[str, typer.Argument(help="tc rate: 128kbit, 2mbit, 64kbps (bytes/s).", show_default=False)],
    dev: Annotated[
        Optional[str],
        typer.Option("--dev", "-d", metavar="DEV", help="Device (needed when the config shapes several)."),
    ] = None,
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
    config: ConfigOption = None,
    dry_run: DryRunOption = False,
    verbose: VerboseOption = False,
) -> None:
    """Cap traffic to HOST (with --in: from HOST) at RATE now, touching only that
    host's class and its set entry (or, --in, its u32 filter). A host capped
    already gets the new rate in place."""
    from shapekit.commands import limit_ip as commands

    request = commands.CapRequest(host, rate, dev, duration, comment, force, inbound)
    _run("shape-limit-ip", lambda: commands.limit_add(_inherit(ctx, config, dry_run, verbose), request))


@limit_ip_app.command("remove")
def limit_remove(
    ctx: typer.Context,
    host: Annotated[str, typer.Argument(help="The capped address or CIDR block.", show_default=False)],
    dev: Annotated[
        Optional[str], typer.Option("--dev", "-d", metavar="DEV", help="Device, when the host is capped on several.")
    ] = None,
    inbound: Annotated[bool, typer.Option("--in", help="Only the cap on traffic arriving from HOST.")] = False,
    outbound: Annotated[bool, typer.Option("--out", help="Only the cap on traffic sent to HOST.")] = False,
    config: ConfigOption = None,
    dry_run: DryRunOption = False,
    verbose: VerboseOption = False,
) -> None:
    """Lift a host's run-time caps, both ways unless --in or --out (a cap from the
    config takes over again; config caps are removed there)."""
    from shapekit.commands import limit_ip as commands

    direction = None if inbound == outbound else ("in" if inbound else "out")
    _run(
        "shape-limit-ip",
        lambda: commands.limit_remove(_inherit(ctx, config, dry_run, verbose), host, dev, direction),
    )


@limit_ip_app.command("list")
def limit_list(ctx: typer.Context, config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """List the caps in force: host, rate, device, direction (out: to the host, in: from it),
    source (config or run-time), expiry, comment, class."""
    from shapekit.commands import limit_ip as commands

    def show() -> None:
        rows = commands.limit_list(_inherit(ctx, config, False, False))
        if as_json:
            typer.echo(json.dumps([dataclasses.asdict(r) for r in rows], indent=2))
            return
        header = ["HOST", "RATE", "DEV", "DIR", "SOURCE", "EXPIRES", "CLASS", "COMMENT"]
        cells = [[r.host, r.rate, r.dev, r.direction, r.source, r.expires or "-", r.classid, r.comment] for r in rows]
        typer.echo(table(header, cells))

    _run("shape-limit-ip", show)


MAX_INTERVAL = 86400  # a day: longer than anyone watches, and within what time.sleep takes


def _interval(value: float) -> float:
    # click's float takes "nan" and "inf", which no sleep can use.
    if not math.isfinite(value) or not 0.1 <= value <= MAX_INTERVAL:
        raise typer.BadParameter(f"{value} is not a number of seconds from 0.1 to {MAX_INTERVAL}")
    return value


status_app = typer.Typer(context_settings=CONTEXT, add_completion=False, rich_markup_mode=None)


@status_app.command()
def shape_status(
    dev: DevOption = None,
    interval: Annotated[
        float,
        typer.Option(
            "--interval",
            "-i",
            metavar="S",
            callback=_interval,
            help="Seconds the current rate is measured over (0.1 to 86400).",
        ),
    ] = 1.0,
    watch: Annotated[
        bool, typer.Option("--watch", "-w", help="Sample again and again, in place, until Ctrl-C.")
    ] = False,
    as_json: JsonOption = False,
    config: ConfigOption = None,
    version: VersionOption = False,
) -> None:
    """A live view of each device's classes: what each is (config class, capped host,
    bypass, default), its rate and ceil, its current rate over --interval, bytes
    and packets sent, drops, overlimits and backlog — read from the kernel — and
    the packet counters of shapekit's marking, bypass and cap rules.

    --json prints one JSON document per sample (one per line with --watch).
    Needs no root, except for the rule counters.

    Exit status: 0 done (Ctrl-C ends --watch cleanly); 2 bad input.
    """
    from shapekit.commands import limit_ip as commands
    from shapekit.plan import status

    options = _options(config, False, False)

    def show() -> None:
        while True:
            document = commands.status_sample(options, dev or [], interval)
            if as_json:
                typer.echo(json.dumps(document))
            else:
                typer.echo(("\x1b[H\x1b[2J" if watch else "") + status.render(document))
            if not watch:
                return

    _run("shape-status", show)


# click's usage errors (unknown option, missing argument, bad value): BadParameter is one of them.
_ClickUsageError: type[Exception] = typer.BadParameter.__mro__[1]


def _main(app: typer.Typer, prog: str) -> None:
    """Run a console script: a usage error is one line and exit 2, like every other bad input."""
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


def init_main() -> None:
    _main(init_app, "shape-init")


def flush_main() -> None:
    _main(flush_app, "shape-flush")


def mark_main() -> None:
    _main(mark_app, "shape-mark")


def bypass_main() -> None:
    _main(bypass_app, "shape-bypass")


def limit_ip_main() -> None:
    _main(limit_ip_app, "shape-limit-ip")


def status_main() -> None:
    _main(status_app, "shape-status")
