"""Changes to the kernel, each with its undo: a tree that fails is taken away, a journal step is put
back from what was read before it.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from collections.abc import Callable
from functools import partial

from shapekit.config.model import Device
from shapekit.errors import CommandFailed
from shapekit.kernel import read, run
from shapekit.plan import hosts as plan_hosts
from shapekit.plan import ingress as plan_ingress
from shapekit.plan import limits as plan_limits
from shapekit.plan import mangle as plan_mangle
from shapekit.plan.ingress import U32Filter
from shapekit.plan.mangle import FAMILIES, TOOLS, Chains, MangleState
from shapekit.plan.tree import (
    Argv,
    configured_rate,
    plan_flush,
)

_NOISE = re.compile(r"^(Command failed -:\d+|Warning: .*)\s*$")


def apply_mangle(
    runner: run.Runner, plans: dict[int, Chains], own: str | None, journal: run.Journal
) -> dict[int, bool]:
    """Make shapekit's chains `plans` in each family, one transaction each, each put back if a later step fails.

    Returns, for each family where no chain of shapekit's was there yet (a first install, or a
    fresh kernel after a reboot), whether this run created its mangle table (iptables-nft only).
    """
    before = {family: read.read_mangle(runner, family) for family in plans}
    fresh = {
        family: not read.mangle_table_exists(runner, family)
        for family, state in before.items()
        if state.empty and state.nf_tables and not runner.dry_run
    }
    for family, chains in plans.items():
        header = f"IPv{family}: shapekit's mangle chains (one {TOOLS[family][1]} --noflush)"
        text = plan_mangle.plan_restore(before[family], chains, own)
        journal.change(
            f"the IPv{family} rules",
            partial(runner.restore, family, header, text),
            partial(_undo_mangle, runner, family, before[family], text, fresh.get(family, False)),
            atomic=True,  # iptables-restore changes all of it or nothing
        )
    return fresh


def _undo_mangle(runner: run.Runner, family: int, before: MangleState, applied: str, created: bool) -> None:
    """shapekit's chains as they were; a table this run created goes whole if nothing else came into it."""
    if created and plan_mangle.deletes_table(read.read_mangle(runner, family), created):
        runner.restore(family, "undo", plan_mangle.DELETE_TABLE, noflush=False)
    else:
        runner.restore(family, "undo", plan_mangle.plan_undo(before, applied))


def flush_mangle(runner: run.Runner, created: set[int]) -> None:
    """Remove shapekit's chains and the jump to them; a table shapekit created (`created`) goes whole
    when nothing but its chains is in it."""
    for family in FAMILIES:
        state = read.read_mangle(runner, family)
        counting = plan_hosts.plan_rules_removal(state.foreign, plan_hosts.every_run)
        if counting:  # shape-status --hosts': a run still counting, or one killed outright
            runner.restore(family, f"IPv{family}: stop counting hosts", counting)
            state = dataclasses.replace(state, foreign=tuple(f for f in state.foreign if not plan_hosts.is_counting(f)))
        if plan_mangle.deletes_table(state, family in created):
            header = f"IPv{family}: remove shapekit's chains and the mangle table it created (nothing else is in it)"
            runner.restore(family, header, plan_mangle.DELETE_TABLE, noflush=False)
            continue
        if family in created and not state.empty and state.foreign:
            runner.remark(f"IPv{family}: the mangle table shapekit created stays: {state.foreign[0]} is not shapekit's")
        text = plan_mangle.plan_flush_mangle(state)
        if text:
            runner.restore(family, f"IPv{family}: remove shapekit's chains and the jump to them", text)


def ipset_restore(runner: run.Runner, header: str, text: str) -> None:
    runner.feed(("ipset", "restore"), header, text)


def apply_ingress(runner: run.Runner, tree: Device, cmds: list[Argv]) -> None:
    """Build an ingress tree: its IFB, the tree with its filters, then the redirect; undo it all on failure."""
    dev, ifb = tree.configured, tree.name
    created = read.ifb_alias(runner, ifb) is None
    hook = read.read_ingress_hook(runner, dev)
    try:
        runner.run_each(f"{dev}: its IFB device for arriving traffic", plan_ingress.plan_ifb(tree, not created))
        apply_tree(runner, ifb, cmds)
        runner.tc_batch(f"{dev}: arriving traffic to {ifb}", plan_ingress.plan_redirect(dev, ifb, hook))
    except CommandFailed as exc:
        raise CommandFailed(exc.command, exc.stderr, _undo_ingress(runner, dev, ifb, hook)) from None


def _undo_ingress(runner: run.Runner, dev: str, ifb: str, before: plan_ingress.IngressHook) -> str:
    try:
        remove_ingress(runner, dev, ifb)
        now = read.read_ingress_hook(runner, dev)
        if before.qdisc is None and now.qdisc == "ingress" and now.redirect_to is None and not now.other_filters:
            runner.tc_batch(f"{dev}: the ingress qdisc this run made", [("tc", "qdisc", "del", "dev", dev, "ingress")])
    except CommandFailed as undo:
        return f"removing {dev}'s ingress shaping failed too: {undo}"
    return f"{dev}'s arriving traffic was left unshaped ({ifb} removed)"


def remove_ingress(runner: run.Runner, dev: str, ifb: str) -> None:
    """Take shapekit's redirect off `dev` and delete its IFB (with its tree)."""
    if read.device_exists(dev):
        runner.tc_batch(
            f"{dev}: stop redirecting arriving traffic",
            plan_ingress.plan_unredirect(dev, ifb, read.read_ingress_hook(runner, dev)),
        )
    if read.device_exists(ifb):
        runner.run_each(f"{dev}: remove its IFB device", [("ip", "link", "del", "dev", ifb)])


def apply_tree(runner: run.Runner, dev: str, cmds: list[Argv]) -> None:
    """Run a device's tree as one batch; on failure leave the device without it."""
    try:
        runner.tc_batch(f"{dev}: shapekit's HTB tree (run as one tc -batch)", cmds)
    except CommandFailed as exc:
        raise _undo_tree(runner, dev, cmds, exc) from None


def hold_gso(runner: run.Runner, dev: str, cmds: list[Argv], record: Callable[[], None] = lambda: None) -> None:
    """Set the device's gso_max_segs, after its tree, `record` first (what shape-flush puts back); if either
    fails, take the tree away: the device's sent traffic unshaped, its gso_max_segs as it was."""
    try:
        record()
        runner.run_each(f"{dev}: the size of its GSO super-packets, which HTB sends whole", cmds)
    except CommandFailed as exc:
        outcome = f"{dev}'s sent traffic was left unshaped (its tree removed, gso_max_segs as it was)"
        raise _without_tree(runner, dev, exc, f"{dev}'s tree", outcome) from None


def _undo_tree(runner: run.Runner, dev: str, cmds: list[Argv], exc: CommandFailed) -> CommandFailed:
    match = run.BATCH_FAILED_LINE.search(exc.stderr)
    failed = shlex.join(cmds[int(match.group(1)) - 1]) if match and int(match.group(1)) <= len(cmds) else exc.command
    # Keep the error; drop the line number and HTB's quantum warnings about other lines.
    stderr = "\n".join(line for line in exc.stderr.splitlines() if not _NOISE.match(line))
    outcome = f"{dev} was left unshaped (shapekit's partial tree removed)"
    return _without_tree(runner, dev, CommandFailed(failed, stderr), f"the partial tree from {dev}", outcome)


def _without_tree(runner: run.Runner, dev: str, failure: CommandFailed, tree: str, removed: str) -> CommandFailed:
    """Take `dev`'s tree away after `failure`: the failure, then `removed`, or why removing `tree` failed too."""
    try:
        runner.tc_batch(f"{dev}: undo", plan_flush(dev, read.read_root(runner, dev)))
    except CommandFailed as undo:
        return failure.then(f"removing {tree} failed too: {undo}")
    return failure.then(removed)


def put_back_prefs(runner: run.Runner, dev: str, prefs: list[tuple[int, int]], before: list[U32Filter]) -> None:
    """Whole u32 prefs (bypass, direction = "in" rules, a network's caps) as they were; left alone if they are."""
    present, entries = read.read_u32_filters(runner, dev)
    wanted = {(plan_ingress.PROTOCOL[family], pref) for family, pref in prefs}
    if [e for e in entries if (e.protocol, e.pref) in wanted] == [f.entry() for f in before]:
        return
    runner.tc_batch(f"{dev}: put its filters back", plan_ingress.replace_prefs(dev, prefs, present, before))


def put_back_classes(runner: run.Runner, tree: Device, before: dict[str, int | None]) -> None:
    """The cap classes named in `before` as they were (None: not there); each read by one rtnetlink get."""
    now = {cid: configured_rate(c.ceil, tree) for cid in before if (c := read.read_class(tree.name, cid)) is not None}
    runner.tc_batch(f"{tree.name}: put its cap classes back", plan_limits.sync_classes(tree, before, now))


def put_back_all_classes(runner: run.Runner, tree: Device, before: dict[str, int]) -> None:
    """Every cap class of a tree as it was."""
    now = read.read_cap_classes(runner, tree)
    runner.tc_batch(
        f"{tree.name}: put its cap classes back", plan_limits.sync_classes(tree, plan_limits.exactly(before, now), now)
    )


def put_back_sets(runner: run.Runner, dev: str, before: dict[int, list[str] | None]) -> None:
    """A device's cap sets as they were: refilled and swapped in, and gone where there was none."""
    kept = {family: entries for family, entries in before.items() if entries is not None}
    gone = {plan_limits.set_name(dev, f) + scratch for f in before if f not in kept for scratch in ("", "~")}
    there = read.list_sets(runner)
    present = [f for f in kept if plan_limits.set_name(dev, f) in there]
    text = plan_limits.fill_sets(dev, kept, present) if kept else ""
    text += plan_limits.plan_destroy_sets([name for name in there if name in gone])
    ipset_restore(runner, f"{dev}: put its cap sets back", text)


def put_back_ingress_caps(
    runner: run.Runner, tree: Device, filters: plan_ingress.CapFilters, classes: dict[str, int]
) -> None:
    """An ingress tree's cap filters and classes as they were."""
    present, entries = read.read_u32_filters(runner, tree.name)
    now = read.read_cap_classes(runner, tree)
    wanted = plan_limits.exactly(classes, now)
    cmds = plan_ingress.sync_cap_filters(tree, filters, wanted, present, plan_ingress.hash_nodes(entries), now)
    runner.tc_batch(f"{tree.name}: put its caps back", cmds)


def count_hosts(runner: run.Runner, counting: plan_hosts.Counting, after: dict[int, int]) -> None:
    """Start counting: the run's sets, then its chains and jumps (`after` shapekit's jump, by family)."""
    ipset_restore(runner, "count hosts: the sets", plan_hosts.plan_sets(counting, FAMILIES))
    for family in FAMILIES:
        runner.restore(family, f"IPv{family}: count hosts", plan_hosts.plan_rules(counting, family, after[family]))


def stop_counting_hosts(runner: run.Runner, runs: Callable[[int], bool]) -> None:
    """Remove the counting rules and sets of the `runs` chosen (by process id), whatever of them is there."""
    for family in FAMILIES:
        text = plan_hosts.plan_rules_removal(read.read_mangle(runner, family).foreign, runs)
        if text:
            runner.restore(family, f"IPv{family}: stop counting hosts", text)
    ipset_restore(runner, "count hosts no more", plan_hosts.plan_sets_removal(read.list_sets(runner), runs))
