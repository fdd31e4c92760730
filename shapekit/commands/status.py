"""shape-status: a live view of each device's classes and shapekit's rule counters."""

from __future__ import annotations

import datetime
import gc
import json
import math
import operator
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from functools import partial
from pathlib import Path
from typing import Annotated, Optional

import typer

from shapekit.commands import common
from shapekit.config.model import Config, Device
from shapekit.config.rules import Cap
from shapekit.errors import Interrupted, UsageError
from shapekit.kernel import change, probe, read, run
from shapekit.kernel.netlink import ClassStats
from shapekit.plan import hosts, status
from shapekit.plan.limits import PlacedCap, cap_classid, lapsed, place_caps
from shapekit.plan.mangle import FAMILIES
from shapekit.state import load_last_init, state_dir, write_state_text


def _lapsed(device: Device, caps: list[Cap], now: float) -> list[PlacedCap]:
    return [PlacedCap(c, c.slot) for c in caps if device.holds(c) and lapsed(c, now) and c.slot is not None]


@dataclass(frozen=True)
class NamedTree:
    """A tree whose classes are read, with its caps in force and what each of its classes is."""

    tree: Device
    placed: list[PlacedCap]
    names: dict[str, str]


def named_trees(config: Config, devs: list[str]) -> list[NamedTree]:
    """The selected devices' trees (an ingress one when its IFB is there), with their caps and class names."""
    devices = common.select_devices(config, devs)
    probe.require_devices([d.name for d in devices])
    trees = [t for d in devices for t in d.trees if t.direction == "out" or read.device_exists(t.name)]
    now = time.time()
    saved = common.saved_caps(config)
    named = []
    for tree in trees:
        placed = place_caps(tree, saved, now)
        named.append(NamedTree(tree, placed, status.class_names(tree, placed, _lapsed(tree, saved, now))))
    return named


def rule_counters(options: common.Options) -> list[status.RuleRow] | None:
    counters = read.read_rule_counters(options.runner())
    return None if counters is None else [r for f, text in counters.items() for r in status.rule_rows(f, text)]


def status_sample(options: common.Options, devs: list[str], interval: float, caught: list[int]) -> dict:
    """One sample: each device's classes with their rate over `interval` seconds, and the rule counters.
    A signal `caught` ends the wait."""
    trees = named_trees(options.load(), devs)  # an ingress tree is listed under its IFB device
    start = time.monotonic()
    before = {t.tree.name: read.read_classes(t.tree.name) for t in trees}
    _wait(interval, caught, "nothing was changed")
    after = {t.tree.name: read.read_classes(t.tree.name) for t in trees}
    seconds = time.monotonic() - start
    rows = {
        t.tree.name: status.class_rows(t.names, before[t.tree.name], after[t.tree.name], seconds, t.tree) for t in trees
    }
    when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return status.sample_document(when, round(seconds, 3), rows, rule_counters(options))


def prometheus_sample(options: common.Options, devs: list[str]) -> str:
    """One read of each tree's classes and the rule counters, in Prometheus's text format (no interval:
    Prometheus takes rates of the counters itself)."""
    counters = common.in_background(lambda: rule_counters(options))  # two iptables-save while this parses
    samples, caps = [], {}
    for named in named_trees(options.load(), devs):
        tree, classes = named.tree, read.read_classes(named.tree.name)
        rows = status.class_rows(named.names, [], classes, 1, tree)
        samples.append(status.TreeSample(tree.configured, tree.direction, rows))
        for source in ("config", "run-time"):
            caps[(tree.configured, tree.direction, source)] = sum(p.cap.source == source for p in named.placed)
    return status.prometheus_text(samples, counters(), caps, load_last_init(state_dir()))


def hosts_sample(options: common.Options, devs: list[str], interval: float, top: int) -> dict:
    """The hosts that received (and sent) the most over `interval`, counted by rules and sets that are there
    for the interval only (shapekit.plan.hosts), and removed after, also when the run fails or is stopped."""
    config = options.load()
    if os.geteuid() != 0:
        raise UsageError("--hosts counts hosts with iptables rules and ipsets for the interval: run it as root")
    if interval < MIN_HOSTS_INTERVAL:
        raise UsageError(
            f"--hosts counts over at least {MIN_HOSTS_INTERVAL:g} s (its rules go in a family at a time): "
            f"give --interval {MIN_HOSTS_INTERVAL:g} or more"
        )
    probe.require_binaries(["ipset", *probe.MANGLE_TOOLS])
    trees = named_trees(config, devs)
    runner = options.runner()
    jumps = {family: read.shapekit_jump(runner, family) for family in FAMILIES}
    missing = [f"IPv{family}" for family, position in jumps.items() if position is None]
    if missing:
        raise UsageError(f"shapekit's rules are not installed ({', '.join(missing)}): run shape-init first")
    counting = hosts.Counting(os.getpid(), hosts.plan_bins([(t.tree, t.names) for t in trees], config.bypass.mark))
    caps = {
        (t.tree.configured, t.tree.direction): hosts.CapIndex(
            hosts.HeldBy(p, t.names[cid], cid) for p in t.placed for cid in [cap_classid(t.tree, p.slot)]
        )
        for t in trees
    }
    held = [t for t in trees if caps[(t.tree.configured, t.tree.direction)].own]  # their classes are read too
    mine = partial(operator.eq, counting.pid)
    with run.transaction(runner) as journal:
        with options.lock():  # not across the interval: shape-limit-ip must be free to cap meanwhile
            # what runs killed outright left, and a leftover under this run's pid (reused)
            change.stop_counting_hosts(runner, lambda pid: pid == counting.pid or _gone(pid))
            journal.change(
                "the host counters",
                partial(change.count_hosts, runner, counting, jumps),
                partial(change.stop_counting_hosts, runner, mine),
            )
        start = time.monotonic()
        before = {(t.tree.configured, t.tree.direction): read.read_classes(t.tree.name) for t in held}
        _wait(interval, journal.signals, "")
        counters = read.read_host_counters(runner, counting.set_names(FAMILIES))
        after = {(t.tree.configured, t.tree.direction): read.read_classes(t.tree.name) for t in held}
        seconds = time.monotonic() - start
        missed = hosts.missed_packets(counting, (read.read_rule_counters(runner) or {}).values())
        with options.lock():
            change.stop_counting_hosts(runner, mine)
        journal.steps.clear()
    if journal.signals:  # one came while the counting was read or removed
        raise Interrupted(journal.signals[0], "put back as before: the host counters")
    sent = {tree: _sent(before[tree], after[tree]) for tree in before}
    rows = hosts.host_rows(counting, counters, caps, sent, seconds, FAMILIES)
    when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return hosts.hosts_document(when, round(seconds, 3), rows, top, missed)


MIN_HOSTS_INTERVAL = 1.0


def _sent(before: list[ClassStats], after: list[ClassStats]) -> hosts.Sent:
    """What each class sent between two reads; a class made anew meanwhile (its counters went back, or it
    was not there) is left out: its host is given what its set counted."""
    earlier = {c.classid: c for c in before}
    sent = {}
    for c in after:
        was = earlier.get(c.classid)
        if was is not None and c.bytes >= was.bytes and c.packets >= was.packets:
            sent[c.classid] = (c.bytes - was.bytes, c.packets - was.packets)
    return sent


def _wait(seconds: float, caught: list[int], outcome: str) -> None:
    """Sleep, but stop at once on a signal `caught` (Interrupted, saying `outcome`)."""
    end = time.monotonic() + seconds
    while not caught and (left := end - time.monotonic()) > 0:
        time.sleep(min(left, 0.1))
    if caught:
        raise Interrupted(caught[0], outcome)


def _gone(pid: int) -> bool:
    """Whether no process `pid` runs: its counting is a leftover."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # someone else's, and running
        pass
    return False


class OutputFormat(str, Enum):
    table = "table"
    json = "json"
    prometheus = "prometheus"


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
    show_hosts: Annotated[
        bool,
        typer.Option(
            "--hosts",
            help="Top talkers instead: the remote hosts that received (and, with an ingress tree, sent) the most "
            "over --interval, with their class and cap. Needs root: counts with iptables rules and ipsets that "
            "are there for the interval only.",
        ),
    ] = False,
    top: Annotated[
        Optional[int],
        typer.Option(
            "--top",
            "-n",
            metavar="N",
            min=1,
            help="With --hosts: how many hosts to list (default 10).",
            show_default=False,
        ),
    ] = None,
    as_json: common.JsonOption = False,
    output_format: Annotated[
        OutputFormat,
        common.format_option(
            "table; json (as --json); prometheus: one read in Prometheus's text format, for node_exporter's "
            "textfile collector (no --interval: Prometheus takes the rates)."
        ),
    ] = OutputFormat.table,
    output: Annotated[
        Optional[Path],
        common.output_option(
            "Write the sample to FILE, replaced whole (a failed prometheus sample writes shapekit_up 0 there)."
        ),
    ] = None,
    config: common.ConfigOption = None,
    version: common.VersionOption = False,
) -> None:
    """A live view of each device's classes: what each is (config class, capped host,
    bypass, default), its rate and ceil, its current rate over --interval, bytes
    and packets sent, drops, overlimits and backlog — read from the kernel — and
    the packet counters of shapekit's marking, bypass and cap rules.

    --json prints one JSON document per sample (one per line with --watch).
    --format prometheus prints the counters and gauges as Prometheus's text
    format: every class (device, direction, class id, name, a cap's host),
    the rule counters, the caps in force and the time of the last
    shape-init; init/systemd/shapekit-metrics.timer writes it for
    node_exporter every 15 s.
    Needs no root, except for the rule counters.

    --hosts lists the top talkers instead: the remote hosts that received the
    most over --interval (and, with an ingress tree, sent), each with its
    current rate, bytes, packets, the class its traffic landed in and its cap
    (shape-limit-ip add HOST RATE caps one). The kernel counts them: for the
    interval only, one iptables rule per class mark jumps to a counters ipset
    per class, removed after, also on Ctrl-C or a failure (a run killed
    outright leaves them to the next --hosts or shape-flush). Needs root.

    Exit status: 0 done (Ctrl-C ends --watch cleanly); 2 bad input; 1 --output
    could not be written, or a system command failed (its counting removed);
    130, 143 stopped by Ctrl-C or SIGTERM (its counting removed).
    """

    options = common.make_options(config, False, False)
    output_format = common.reported("shape-status", lambda: _format(output_format, as_json, watch, output))
    if show_hosts and output_format == OutputFormat.prometheus:
        common.reported("shape-status", _refuse("--hosts and --format prometheus do not go together: pick one"))
    if top is not None and not show_hosts:
        common.reported("shape-status", _refuse("--top goes with --hosts: add --hosts"))

    # Ctrl-C ends shape-status between two reads, never inside one: a KeyboardInterrupt inside the sh
    # library's wait for a child can leave its threads holding the exit up (seen once in CI)
    with run.caught_signals([]) as caught:
        if output_format == OutputFormat.prometheus:
            common.reported("shape-status", lambda: _metrics(options, dev or [], output, caught))
            return

        def sample() -> dict:
            if show_hosts:
                document = hosts_sample(options, dev or [], interval, top or 10)
            else:
                document = status_sample(options, dev or [], interval, caught)
            if caught:  # it came while reading: the sample is whole, but asked not to be shown
                raise Interrupted(caught[0], "nothing was changed")
            return document

        render = hosts.render_hosts if show_hosts else status.render

        def text() -> str:
            document = sample()
            return json.dumps(document) + "\n" if output_format == OutputFormat.json else render(document) + "\n"

        if output is not None:
            common.reported("shape-status", lambda: write_state_text(output, text()))
            return

        def show() -> None:
            while True:
                try:
                    document = sample()
                except Interrupted as exc:
                    if watch and exc.exit_code == 128 + signal.SIGINT and exc.put_back:  # Ctrl-C ends --watch
                        return
                    raise
                if output_format == OutputFormat.json:
                    typer.echo(json.dumps(document))
                else:
                    typer.echo(("\x1b[H\x1b[2J" if watch else "") + render(document))
                if not watch:
                    return
                gc.collect()  # the console runs without the collector (common.console); a watch lives on

        common.reported("shape-status", show)


def _metrics(options: common.Options, devs: list[str], output: Path | None, caught: list[int]) -> None:
    """One Prometheus sample, printed or written to `output`."""

    def sample() -> str:
        text = prometheus_sample(options, devs)
        if caught:
            raise Interrupted(caught[0], "nothing was changed")
        return text

    if output is None:
        typer.echo(sample(), nl=False)
    else:
        common.write_metrics(output, sample, status.prometheus_down())


def _refuse(message: str) -> Callable[[], None]:
    def refuse() -> None:
        raise UsageError(message)

    return refuse


def _format(output_format: OutputFormat, as_json: bool, watch: bool, output: Path | None) -> OutputFormat:
    """The output format asked for; options that do not go together refused."""
    if as_json and output_format not in (OutputFormat.table, OutputFormat.json):
        raise UsageError(f"--json and --format {output_format.value} do not go together: pick one")
    if watch and output is not None:
        raise UsageError("--watch and --output do not go together: a file holds one sample")
    if watch and output_format == OutputFormat.prometheus:
        raise UsageError("--watch and --format prometheus do not go together: Prometheus samples on its own")
    return OutputFormat.json if as_json else output_format


def status_main() -> None:
    common.console(status_app, "shape-status")
