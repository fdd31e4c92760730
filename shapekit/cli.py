"""Thin typer apps, one per command: parse options, call `commands`, map errors to exit codes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from shapekit import __version__
from shapekit.errors import ShapekitError

if TYPE_CHECKING:
    from shapekit.commands import Options

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
        typer.echo(f"{prog}: interrupted", err=True)
        raise typer.Exit(130) from None


def _options(config: Path | None, dry_run: bool, verbose: bool) -> Options:
    from shapekit.commands import Options

    return Options(config=config, dry_run=dry_run, verbose=verbose)


init_app = typer.Typer(context_settings=CONTEXT, add_completion=False, rich_markup_mode=None)


@init_app.command()
def shape_init(
    dev: DevOption = None,
    config: ConfigOption = None,
    dry_run: DryRunOption = False,
    verbose: VerboseOption = False,
    version: VersionOption = False,
) -> None:
    """Build each configured device's HTB tree: root qdisc, top class at the line rate,
    the classes, their leaf qdiscs and filters.

    Replaces whatever root qdisc the device had (shapekit's earlier tree
    included) in one `tc -batch`; running it twice gives the same kernel state.
    If a command fails, the device is left unshaped, never half-shaped.

    Exit status: 0 done; 2 bad input (config, options, missing device or
    kernel feature, not root), nothing changed; 1 a system command failed.
    """
    from shapekit import commands

    _run("shape-init", lambda: commands.init(_options(config, dry_run, verbose), dev or []))


flush_app = typer.Typer(context_settings=CONTEXT, add_completion=False, rich_markup_mode=None)


@flush_app.command()
def shape_flush(
    dev: DevOption = None,
    config: ConfigOption = None,
    dry_run: DryRunOption = False,
    verbose: VerboseOption = False,
    version: VersionOption = False,
) -> None:
    """Remove shapekit's tree from each named device, or from every device that has one,
    back to the kernel's default qdisc.

    Only shapekit's own root qdisc (handle 5c:) is removed; a device without
    it is left alone. Needs no config.

    Exit status: 0 done; 2 bad input, nothing changed; 1 a system command failed.
    """
    from shapekit import commands

    _run("shape-flush", lambda: commands.flush(_options(config, dry_run, verbose), dev or []))


def _not_built(name: str, issue: str) -> typer.Typer:
    app = typer.Typer(context_settings=CONTEXT, add_completion=False, rich_markup_mode=None)

    @app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def not_built(version: VersionOption = False) -> None:
        typer.echo(f"{name}: not built yet ({issue}); nothing was changed", err=True)
        raise typer.Exit(2)

    not_built.__doc__ = f"{name} is not built yet ({issue})."
    return app


mark_app = _not_built("shape-mark", "marking rules land with the shape-mark issue")
bypass_app = _not_built("shape-bypass", "bypass rules land with the shape-bypass issue")
limit_ip_app = _not_built("shape-limit-ip", "per-IP caps land with the shape-limit-ip issue")


def init_main() -> None:
    init_app(prog_name="shape-init")


def flush_main() -> None:
    flush_app(prog_name="shape-flush")


def mark_main() -> None:
    mark_app(prog_name="shape-mark")


def bypass_main() -> None:
    bypass_app(prog_name="shape-bypass")


def limit_ip_main() -> None:
    limit_ip_app(prog_name="shape-limit-ip")
