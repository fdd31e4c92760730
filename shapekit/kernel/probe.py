"""What must hold before anything changes: root, binaries, devices, kernel features, and ownership.

Kernel features are tried in a throwaway network namespace, so nothing outside it changes.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
from collections.abc import Sequence
from pathlib import Path

from shapekit.config.model import Device, device_name_problem
from shapekit.errors import CommandFailed, UsageError
from shapekit.kernel import read, run
from shapekit.plan import ingress as plan_ingress
from shapekit.plan import mangle as plan_mangle
from shapekit.plan.mangle import FAMILIES, TOOLS, MangleState
from shapekit.plan.tree import (
    Argv,
    KernelFeature,
)

MANGLE_TOOLS = [tool for family in FAMILIES for tool in TOOLS[family]]


def require_root(dry_run: bool, command: str) -> None:
    if not dry_run and os.geteuid() != 0:
        raise UsageError(f"{command} changes the kernel's shaping and must run as root (or review it with --dry-run)")


def require_binaries(names: Sequence[str]) -> None:
    for name in names:
        if shutil.which(name) is None:
            raise UsageError(run.missing_binary(name))


def require_devices(names: Sequence[str]) -> None:
    for name in names:
        problem = device_name_problem(name)
        if problem:  # a --dev not from the config (shape-flush): unchecked so far
            raise UsageError(problem)
        try:
            socket.if_nametoindex(name)
        except OSError:
            raise UsageError(
                f"device {name!r} does not exist: check the name against `ip link`, or pass --dev with the devices to shape"
            ) from None


def probe_kernel(features: list[KernelFeature]) -> None:
    """Try each feature on `lo` of a throwaway network namespace; refuse what the kernel lacks.

    Nothing outside that namespace changes. Where namespaces cannot be made
    (no privilege), the probe is skipped and a missing piece shows up when
    the plan runs.
    """
    missing = []
    for feature in features:
        failed = _try_in_scratch_namespace(("tc", "-batch", "-"), "".join(line + "\n" for line in feature.lines))
        if failed is None:
            continue
        if not run.BATCH_FAILED_LINE.search(failed.stderr):
            return  # the namespace itself could not be made: cannot probe
        missing.append(f"the kernel lacks {feature.name}: {feature.fix}")
    if missing:
        raise UsageError("; ".join(missing))


def _try_in_scratch_namespace(argv: Argv, text: str) -> CommandFailed | None:
    """Run argv in a throwaway network namespace; its failure, if the namespace could be made."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return None
    try:
        run.run_command(("unshare", "--net", "--", *argv), text)
    except CommandFailed as exc:
        return exc
    return None


# What ingress shaping needs: an IFB device, an ingress qdisc, u32, and mirred's redirect to the IFB.
_INGRESS_PROBE = (
    "ip link add sk-probe type ifb && ip link set sk-probe up && tc qdisc add dev lo handle ffff: ingress && "
    "tc filter add dev lo ingress protocol all pref 1 u32 match u32 0 0 action mirred egress redirect dev sk-probe"
)


def probe_ingress(keys: Sequence[str]) -> None:
    """Refuse, before anything changes, a kernel that cannot shape what arrives."""
    if not keys:
        return
    failed = _try_in_scratch_namespace(("sh", "-c", _INGRESS_PROBE), "")
    if failed is None or failed.stderr.startswith("unshare:"):
        return
    raise UsageError(
        f"the kernel cannot redirect arriving traffic to an IFB device (needs ifb, sch_ingress, cls_u32 and act_mirred): "
        f"{_first_error(failed.stderr)}; remove {', '.join(f'[{k}]' for k in keys)} or load those modules"
    )


_RESTORE_FAILED_LINE = re.compile(r"Error occurred at line: (\d+)")


# What per-IP caps need: a hash:net set with skbinfo, and iptables' SET target with --map-prio.
_CAP_PROBE = (
    "ipset create probe hash:net family inet skbinfo timeout 0 && "
    "printf '*mangle\\n-A POSTROUTING -o lo -j SET --map-set probe dst --map-prio\\nCOMMIT\\n' | iptables-restore --noflush"
)


def probe_caps() -> None:
    """Refuse, before anything changes, a machine whose ipset or kernel cannot do per-IP caps."""
    failed = _try_in_scratch_namespace(("sh", "-c", _CAP_PROBE), "")
    if failed is None or failed.stderr.startswith("unshare:"):
        return  # works, or no namespace could be made to ask in
    raise UsageError(
        f"per-IP caps need ipset hash:net sets with skbinfo and iptables' SET target (--map-prio), "
        f"which this machine lacks: {_first_error(failed.stderr)}"
    )


def probe_rules(plans: dict[int, str]) -> None:
    """Load each family's rules into a throwaway namespace first: refuse what this machine cannot load."""
    for family, text in plans.items():
        tool = TOOLS[family][1]
        failed = _try_in_scratch_namespace((tool, "--noflush"), text)
        if failed is None:
            continue
        if "unshare" in failed.stderr.split(":")[0]:
            return  # no namespace could be made: cannot probe
        raise UsageError(
            f"{tool} cannot load shapekit's rules here: {_first_error(failed.stderr)}{_rule_hint(failed, text)}"
        )


def _first_error(stderr: str) -> str:
    return next((line.strip() for line in stderr.splitlines() if line.strip()), "no error output")


def _rule_hint(failed: CommandFailed, text: str) -> str:
    match = _RESTORE_FAILED_LINE.search(failed.stderr)
    lines = text.splitlines()
    line = lines[int(match.group(1)) - 1] if match and int(match.group(1)) <= len(lines) else ""
    rule = re.search(r'"(mark\[\d+\])', line)
    if "-m bpf" in line:
        return f" (src_mac in {rule.group(1) if rule else '[[mark]]'} needs the kernel's bpf match, xt_bpf: load it, or remove src_mac)"
    if "layer7" in line:
        return f" (l7proto in {rule.group(1) if rule else '[[mark]]'} needs the out-of-tree layer7 match in kernel and iptables: remove l7proto from that rule)"
    return f" (in {rule.group(1)})" if rule else ""


def built_flat(runner: run.Runner, dev: str) -> bool:
    """Whether `dev` has a tree from a shapekit before cap groups (its caps flat under the top class), or cap
    sets from one (when its tree was gone at the upgrade: a flush of that device, a device away)."""
    tree = read.device_exists(dev) and read.read_root(runner, dev).is_shapekit
    return (tree and not read.has_group_filter(runner, dev)) or read.sets_before_groups(runner, dev)


def require_shapekit_tree(runner: run.Runner, dev: str) -> None:
    if not read.device_exists(dev) or not read.read_root(runner, dev).is_shapekit:
        raise UsageError(f"{dev} has no shapekit tree to cap hosts in: run shape-init first")


def canonical_mangle(family: int, sets: str, rules: str) -> MangleState:
    """The chains `rules` make, as iptables-save prints them: loaded into a throwaway namespace."""
    save, restore = TOOLS[family]
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "sets").write_text(sets)
        Path(tmp, "rules").write_text(rules)
        script = f"ipset restore < {tmp}/sets && {restore} --noflush < {tmp}/rules && {save} -t mangle"
        return plan_mangle.parse_mangle_save(run.run_command(("unshare", "--net", "--", "sh", "-c", script)))


def require_own_ifbs(runner: run.Runner, trees: Sequence[Device]) -> None:
    """The IFB name and the ingress filter pref shapekit would use must be free or its own: never take over."""
    for tree in trees:
        hook = read.read_ingress_hook(runner, tree.configured)
        if hook.redirect_to not in (None, tree.name):
            raise UsageError(
                f"{tree.configured}'s ingress filter at pref {plan_ingress.REDIRECT_PREF} is not shapekit's "
                f"(it does not redirect to {tree.name}): move it to another pref to shape [{tree.key}]"
            )
        alias = read.ifb_alias(runner, tree.name)
        if alias is not None and not plan_ingress.is_shapekit_ifb(alias, tree.configured):
            raise UsageError(
                f"device {tree.name!r} exists and is not shapekit's IFB for {tree.configured} "
                f"(its alias is {alias!r}): delete or rename it to shape [{tree.key}]"
            )
