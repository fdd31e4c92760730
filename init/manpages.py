"""Write shapekit's man pages into DIR: one in section 8 per command and verb (shape-init.8,
shape-limit-ip-add.8, ...), generated from the commands' typer/click definitions by click-man, so a
page says what --help says; and shapekit.toml.5, the config keys (man/shapekit.toml.5, built from
man/shapekit.toml.5.scd by scdoc).

    python init/manpages.py DIR      # DIR/man8/*.8, DIR/man5/shapekit.toml.5 (init/install runs it)

click-man is written for click; typer (below 0.29) carries its own copy of click with the same
Context and command classes, and an option class of its own, which it is given here.
"""

from __future__ import annotations

import importlib
import re
import shutil
import sys
from importlib.metadata import distribution
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import click_man.core
import typer.main
from typer._click import core as typer_click
from typer._click import utils as typer_click_utils
from typer.core import TyperOption

from shapekit import __version__

REPO = Path(__file__).resolve().parent.parent
CONFIG_PAGE = REPO / "man" / "shapekit.toml.5"
SECTION = "8"  # system administration commands: they change the kernel's traffic control, as root


def commands() -> dict[str, Any]:
    """Each console script of shapekit and its click command ("shape-init": shapekit.commands.init's app)."""
    found = {}
    for entry in distribution("shapekit").entry_points:
        if entry.group == "console_scripts":
            module, main = entry.value.split(":")
            app = getattr(importlib.import_module(module), main.removesuffix("_main") + "_app")
            found[entry.name] = typer.main.get_command(app)
    return dict(sorted(found.items()))


# click-man reads click's Context, Option and utils from its module global `click`: typer's own.
click_man.core.click = SimpleNamespace(Context=typer_click.Context, Option=TyperOption, utils=typer_click_utils)


def pages(name: str, command: Any, parent: Any = None) -> dict[str, str]:
    """The page of `command` and of each of its verbs, by file name."""
    ctx = typer_click.Context(command, info_name=name, parent=parent)
    text = click_man.core.generate_man_page(ctx, version=f"shapekit {__version__}")
    # click-man writes section 1 and names the verbs' pages in it.
    text = re.sub(r'^(\.TH "[^"]*") "1"', rf'\1 "{SECTION}"', text, count=1, flags=re.M)
    text = text.replace(r"(1)\fP", rf"({SECTION})\fP")
    found = {f"{ctx.command_path.replace(' ', '-')}.{SECTION}": text}
    for verb_name, verb in getattr(command, "commands", {}).items():
        if not verb.hidden:
            found |= pages(verb_name, verb, ctx)
    return found


def main(target: Path) -> None:
    section = target / f"man{SECTION}"
    section.mkdir(parents=True, exist_ok=True)
    for name, command in commands().items():
        for file_name, text in pages(name, command).items():
            (section / file_name).write_text(text)
    (target / "man5").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(CONFIG_PAGE, target / "man5" / CONFIG_PAGE.name)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python init/manpages.py DIR   (writes DIR/man8/*.8 and DIR/man5/shapekit.toml.5)")
    main(Path(sys.argv[1]))
