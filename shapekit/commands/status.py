"""shape-status: a live view of each device's classes and shapekit's rule counters."""

from __future__ import annotations

import datetime
import json
import math
import time
from typing import Annotated

import typer

from shapekit.commands import common
from shapekit.config.model import Device
from shapekit.config.rules import Cap
from shapekit.kernel import probe, read
from shapekit.plan import status
from shapekit.plan.limits import PlacedCap, lapsed, place_caps


def _lapsed(device: Device, caps: list[Cap], now: float) -> list[PlacedCap]:
    return [PlacedCap(c, c.slot) for c in caps if device.holds(c) and lapsed(c, now) and c.slot is not None]


def status_sample(options: common.Options, devs: list[str], interval: float) -> dict:
    """One sample: each device's classes with their rate over `interval` seconds, and the rule counters."""
    config = options.load()
    devices = common.select_devices(config, devs)
    probe.require_devices([d.name for d in devices])
    # Ingress trees are listed under their IFB device, when it is there.
    trees = [t for d in devices for t in d.trees if t.direction == "out" or read.device_exists(t.name)]
    now = time.time()
    saved = common.saved_caps(config)
    names = {t.name: status.class_names(t, place_caps(t, saved, now), _lapsed(t, saved, now)) for t in trees}
    start = time.monotonic()
    before = {t.name: read.read_classes(t.name) for t in trees}
    time.sleep(interval)
    after = {t.name: read.read_classes(t.name) for t in trees}
    seconds = time.monotonic() - start
    rows = {t.name: status.class_rows(names[t.name], before[t.name], after[t.name], seconds, t) for t in trees}
    counters = read.read_rule_counters(options.runner())
    rules = None if counters is None else [r for f, text in counters.items() for r in status.rule_rows(f, text)]
    when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return status.sample_document(when, round(seconds, 3), rows, rules)


MAX_INTERVAL = 86400  # a day: longer than anyone watches, and within what time.sleep takes


def _interval(value: float) -> float:
    # click's float takes "nan" and "inf", which no sleep can use.
    if not math.isfinite(value) or not 0.1 <= value <= MAX_INTERVAL:
        raise typer.BadParameter(f"{value} is not a number of seconds from 0.1 to {MAX_INTERVAL}")
    return value


status_app = common.new_app()


@status_app.command()
def shape_status(
    dev: common.DevOption = None,
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
    as_json: common.JsonOption = False,
    config: common.ConfigOption = None,
    version: common.VersionOption = False,
) -> None:
    """A live view of each device's classes: what each is (config class, capped host,
    bypass, default), its rate and ceil, its current rate over --interval, bytes
    and packets sent, drops, overlimits and backlog — read from the kernel — and
    the packet counters of shapekit's marking, bypass and cap rules.

    --json prints one JSON document per sample (one per line with --watch).
    Needs no root, except for the rule counters.

    Exit status: 0 done (Ctrl-C ends --watch cleanly); 2 bad input.
    """

    options = common.make_options(config, False, False)

    def show() -> None:
        while True:
            document = status_sample(options, dev or [], interval)
            if as_json:
                typer.echo(json.dumps(document))
            else:
                typer.echo(("\x1b[H\x1b[2J" if watch else "") + status.render(document))
            if not watch:
                return

    common.reported("shape-status", show)


def status_main() -> None:
    common.console(status_app, "shape-status")
