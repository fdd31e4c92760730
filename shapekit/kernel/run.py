"""The only module that runs processes.

It runs plans (one `tc -batch` per device), prints them instead under
`--dry-run`, echoes them under `-v`, checks what must hold before anything
changes (root, binaries, devices, kernel features), and undoes a tree that
failed half-way so a device is never left half-shaped.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import re
import shlex
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TextIO

from shapekit.config.load import IFB_ALIAS, Device, device_name_problem
from shapekit.errors import CommandFailed, Interrupted, ShapekitError, UsageError
from shapekit.kernel import netlink as tc_netlink
from shapekit.plan import drift
from shapekit.plan import ingress as plan_ingress
from shapekit.plan import limits as plan_limits
from shapekit.plan import mangle as plan_mangle
from shapekit.plan.ingress import U32Filter
from shapekit.plan.mangle import FAMILIES, TOOLS, Chains, MangleState
from shapekit.plan.tree import (
    KERNEL_DEFAULT,
    Argv,
    KernelFeature,
    RootQdisc,
    batch_text,
    classid,
    plan_flush,
    root_handle,
    shell_script,
)

# The Debian package that ships each binary shapekit runs.
PACKAGES = {"tc": "iproute2", "ip": "iproute2", "unshare": "util-linux", "ipset": "ipset"} | {
    tool: "iptables" for tools in TOOLS.values() for tool in tools
}
MANGLE_TOOLS = [tool for family in FAMILIES for tool in TOOLS[family]]

_BATCH_FAILED_LINE = re.compile(r"^Command failed -:(\d+)\s*$", re.MULTILINE)
_NOISE = re.compile(r"^(Command failed -:\d+|Warning: .*)\s*$")


def run_command(argv: Sequence[str], stdin: str | None = None) -> str:
    """Run one process; its stdout, or CommandFailed with its stderr."""
    import sh  # slow to import (~60 ms): only commands that run something pay for it

    try:
        command = sh.Command(argv[0])
    except sh.CommandNotFound:
        raise UsageError(missing_binary(argv[0])) from None
    try:
        return str(command(*argv[1:], _in=stdin, _tty_out=False, _env=_c_locale()))
    except sh.ErrorReturnCode as exc:
        raise CommandFailed(shlex.join(argv), exc.stderr.decode(errors="replace")) from None


def _c_locale() -> dict[str, str]:
    # Error text we parse (tc's "Command failed -:N") must not be translated.
    return {**os.environ, "LC_ALL": "C"}


def missing_binary(name: str) -> str:
    package = PACKAGES.get(name, name)
    return f"`{name}` is not installed or not in PATH: install it (apt-get install {package})"


@dataclass
class Journal:
    """What one run changed, in order, each with how to put it back.

    A put-back makes its part as it was before the run, from what was read
    before and what is there now, so it also serves a step that failed
    half-way: tc and ipset run a batch up to the failing line. Under
    --dry-run nothing changes, so nothing is recorded.
    """

    dry_run: bool = False
    steps: list[tuple[str, Callable[[], None]]] = field(default_factory=list)
    signals: list[int] = field(default_factory=list)  # caught while the run changes things

    def change(self, what: str, do: Callable[[], None], put_back: Callable[[], None], atomic: bool = False) -> None:
        """Run one step. An atomic one (iptables-restore) is put back only once it has happened."""
        if self.signals:
            raise Interrupted(self.signals[0], "")
        if not atomic and not self.dry_run:
            self.steps.append((what, put_back))
        try:
            do()
        except UsageError:  # the step itself found bad input, before changing anything
            if not atomic and not self.dry_run:
                self.steps.pop()
            raise
        if atomic and not self.dry_run:
            self.steps.append((what, put_back))
        if self.signals:
            raise Interrupted(self.signals[0], "")

    def roll_back(self) -> str:
        """Put back every step, newest first; how that went, as words for the error's one line."""
        if not self.steps:
            return "nothing was changed"
        for n, (what, put_back) in enumerate(reversed(self.steps)):
            try:
                put_back()
            except (ShapekitError, OSError) as exc:
                left = ", ".join(w for w, _ in reversed(self.steps[: len(self.steps) - n]))
                return f"putting back {what} failed too: {exc}; left changed: {left}"
        return "put back as before: " + ", ".join(w for w, _ in self.steps)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextmanager
def transaction(runner: Runner) -> Iterator[Journal]:
    """A run that completes, or whose every change is put back: never half-applied.

    Every bad input is found before the first change; should one still come
    late, what was changed is put back first and the line says so. A signal
    (Ctrl-C, systemd's or `timeout`'s SIGTERM) stops the run between two
    steps, never inside one, and what it changed is put back, a second
    signal not stopping that.
    """
    journal = Journal(dry_run=runner.dry_run)
    previous = {s: signal.signal(s, lambda signum, _: journal.signals.append(signum)) for s in STOP_SIGNALS}
    try:
        yield journal
    except CommandFailed as exc:
        outcome = journal.roll_back()
        if journal.signals:  # the signal reached the running tool too
            raise Interrupted(journal.signals[0], outcome) from None
        raise exc.then(outcome) from None
    except Interrupted as exc:
        raise Interrupted(exc.exit_code - 128, journal.roll_back()) from None
    except ShapekitError as exc:
        if journal.steps:
            exc.args = (f"{exc}; {journal.roll_back()}",)
        raise
    except BaseException:  # a bug: nothing may stay half-done either
        journal.roll_back()
        raise
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def in_order(*steps: Callable[[], None]) -> Callable[[], None]:
    """One put-back made of several, run in this order."""

    def run() -> None:
        for step in steps:
            step()

    return run


@dataclass
class Runner:
    """Runs plans, or prints them (`dry_run`), echoing each command when `verbose`."""

    dry_run: bool = False
    verbose: bool = False
    out: TextIO = field(default_factory=lambda: sys.stdout)
    err: TextIO = field(default_factory=lambda: sys.stderr)

    @property
    def privileged(self) -> bool:
        """Whether root-only state (netfilter, ipset) can be read: a dry-run may run as anyone."""
        return not self.dry_run or os.geteuid() == 0

    def note(self, text: str) -> None:
        """A remark in the printed script (dry-run only)."""
        if self.dry_run:
            self.out.write(f"# {text}\n")

    def query(self, argv: Argv) -> str:
        """A read-only command: it runs under --dry-run too."""
        return run_command(argv)

    def tc_batch(self, header: str, cmds: list[Argv]) -> None:
        if cmds and not self._shown(header, cmds):
            run_command(("tc", "-batch", "-"), batch_text(cmds))

    def run_each(self, header: str, cmds: list[Argv]) -> None:
        """Commands that have no batch mode (`ip link`), one process each."""
        if cmds and not self._shown(header, cmds):
            for cmd in cmds:
                run_command(cmd)

    def _shown(self, header: str, cmds: list[Argv]) -> bool:
        """Print the commands under --dry-run (True: do not run them); echo them under -v."""
        if self.dry_run:
            self.out.write(shell_script(header, cmds))
            return True
        if self.verbose:
            self.err.write("".join(f"+ {shlex.join(cmd)}\n" for cmd in cmds))
        return False

    def restore(self, family: int, header: str, text: str) -> None:
        """One `iptables-restore --noflush` (or ip6tables-): one transaction."""
        self.feed((TOOLS[family][1], "--noflush"), header, text)

    def feed(self, argv: Argv, header: str, text: str) -> None:
        """Run a tool that reads its commands on stdin (iptables-restore, ipset restore)."""
        if not text:
            return
        if self.dry_run:
            self.out.write(f"# {header}\n{shlex.join(argv)} <<'EOF'\n{text}EOF\n")
            return
        if self.verbose:
            self.err.write(f"+ {shlex.join(argv)} <<'EOF'\n{text}EOF\n")
        run_command(argv, text)


def require_root(dry_run: bool, command: str) -> None:
    if not dry_run and os.geteuid() != 0:
        raise UsageError(f"{command} changes the kernel's shaping and must run as root (or review it with --dry-run)")


def require_binaries(names: Sequence[str]) -> None:
    for name in names:
        if shutil.which(name) is None:
            raise UsageError(missing_binary(name))


def device_exists(name: str) -> bool:
    try:
        socket.if_nametoindex(name)
    except OSError:
        return False
    return True


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
        if not _BATCH_FAILED_LINE.search(failed.stderr):
            return  # the namespace itself could not be made: cannot probe
        missing.append(f"the kernel lacks {feature.name}: {feature.fix}")
    if missing:
        raise UsageError("; ".join(missing))


def _try_in_scratch_namespace(argv: Argv, text: str) -> CommandFailed | None:
    """Run argv in a throwaway network namespace; its failure, if the namespace could be made."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return None
    try:
        run_command(("unshare", "--net", "--", *argv), text)
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
    if "layer7" in line:
        return f" (l7proto in {rule.group(1) if rule else '[[mark]]'} needs the out-of-tree layer7 match in kernel and iptables: remove l7proto from that rule)"
    return f" (in {rule.group(1)})" if rule else ""


def read_mangle(runner: Runner, family: int) -> MangleState:
    if not runner.privileged:
        runner.note(f"not root: IPv{family} chains unread; planned as a first install")
        return plan_mangle.EMPTY
    return plan_mangle.parse_mangle_save(runner.query((TOOLS[family][0], "-t", "mangle")))


def apply_mangle(runner: Runner, plans: dict[int, Chains], own: str | None, journal: Journal) -> None:
    """Make shapekit's chains `plans` in each family, one transaction each, each put back if a later step fails."""
    before = {family: read_mangle(runner, family) for family in plans}
    for family, chains in plans.items():
        header = f"IPv{family}: shapekit's mangle chains (one {TOOLS[family][1]} --noflush)"
        text = plan_mangle.plan_restore(before[family], chains, own)
        undo = plan_mangle.plan_undo(before[family], text)
        journal.change(
            f"the IPv{family} rules",
            partial(runner.restore, family, header, text),
            partial(runner.restore, family, "undo", undo),
            atomic=True,  # iptables-restore changes all of it or nothing
        )


def flush_mangle(runner: Runner) -> None:
    for family in FAMILIES:
        text = plan_mangle.plan_flush_mangle(read_mangle(runner, family))
        if text:
            runner.restore(family, f"IPv{family}: remove shapekit's chains and the jump to them", text)


def ipset_restore(runner: Runner, header: str, text: str) -> None:
    runner.feed(("ipset", "restore"), header, text)


def read_sets(runner: Runner, dev: str) -> dict[int, list[str] | None]:
    """A device's cap set entries now, per family, as `plan_limits.fill_sets` takes them; None: no such set."""
    present = set(list_sets(runner))
    sets: dict[int, list[str] | None] = {}
    for family in FAMILIES:
        name = plan_limits.set_name(dev, family)
        sets[family] = (
            plan_limits.parse_set_save(runner.query(("ipset", "save", name)), name) if name in present else None
        )
    return sets


def list_sets(runner: Runner) -> list[str]:
    if not runner.privileged:
        runner.note("not root: ipsets unread; planned as a first install")
        return []
    return runner.query(("ipset", "list", "-n")).split()


def local_addresses(runner: Runner) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """Every address of this machine (this network namespace)."""
    links = json.loads(runner.query(("ip", "-j", "addr", "show")) or "[]")
    return [ipaddress.ip_address(a["local"]) for link in links for a in link.get("addr_info", []) if "local" in a]


def read_cap_classes(runner: Runner, dev: str) -> dict[int, int]:
    return plan_limits.parse_cap_classes(runner.query(("tc", "class", "show", "dev", dev)))


def require_shapekit_tree(runner: Runner, dev: str) -> None:
    if not device_exists(dev) or not read_root(runner, dev).is_shapekit:
        raise UsageError(f"{dev} has no shapekit tree to cap hosts in: run shape-init first")


def read_tree(runner: Runner, dev: str, root_handle: str) -> drift.Tree:
    qdiscs = runner.query(("tc", "-j", "qdisc", "show", "dev", dev))
    return drift.kernel_tree(qdiscs, runner.query(("tc", "class", "show", "dev", dev)), root_handle)


def read_set_entries(runner: Runner) -> set[tuple[str, str, str]]:
    return drift.parse_set_entries(runner.query(("ipset", "save")), plan_limits.SET_PREFIX)


def canonical_mangle(family: int, sets: str, rules: str) -> MangleState:
    """The chains `rules` make, as iptables-save prints them: loaded into a throwaway namespace."""
    save, restore = TOOLS[family]
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "sets").write_text(sets)
        Path(tmp, "rules").write_text(rules)
        script = f"ipset restore < {tmp}/sets && {restore} --noflush < {tmp}/rules && {save} -t mangle"
        return plan_mangle.parse_mangle_save(run_command(("unshare", "--net", "--", "sh", "-c", script)))


def read_classes(dev: str) -> list[tc_netlink.ClassStats]:
    """Every tc class of `dev` with its counters, from one rtnetlink dump (no process, no root)."""
    try:
        classes = _rtnetlink(lambda index: tc_netlink.dump_request(index), dev)
    except OSError as exc:
        if not device_exists(dev):
            raise UsageError(f"device {dev!r} is gone: check it with `ip link`, or leave it out with --dev") from None
        raise CommandFailed(f"rtnetlink dump of {dev}'s classes", exc.strerror or str(exc)) from None
    return [c for c in classes if c.kind == "htb"]  # sfq and fq_codel list a class per flow: not shapekit's


def read_class(dev: str, minor: int) -> tc_netlink.ClassStats | None:
    """One class of shapekit's tree, by minor (None: not there): one rtnetlink get, however many classes.

    The kernel answers a class get as a notification: a `tc monitor` running
    meanwhile sees the class go by, unchanged.
    """
    handle = int(root_handle().rstrip(":"), 16) << 16 | minor
    try:
        classes = _rtnetlink(lambda index: tc_netlink.get_request(index, handle), dev)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise CommandFailed(f"rtnetlink get of {dev}'s class {classid(minor)}", exc.strerror or str(exc)) from None
    return classes[0] if classes else None


def _rtnetlink(request: Callable[[int], bytes], dev: str) -> list[tc_netlink.ClassStats]:
    """Send one request about `dev`'s classes; the classes in the replies, until the kernel says it is done."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
        sock.settimeout(5)  # the kernel answers at once: never wait for ever
        sock.bind((0, 0))
        sock.send(request(socket.if_nametoindex(dev)))
        classes: list[tc_netlink.ClassStats] = []
        done = False
        while not done:
            batch, done = tc_netlink.parse_messages(sock.recv(1 << 20))
            classes += batch
    return classes


def read_rule_counters(runner: Runner) -> dict[int, str] | None:
    """Both families' mangle tables with packet counters; None when only root may read them."""
    if os.geteuid() != 0:
        return None
    return {family: runner.query((TOOLS[family][0], "-c", "-t", "mangle")) for family in FAMILIES}


def shapekit_ifbs(runner: Runner) -> dict[str, str]:
    """shapekit's IFB devices here (IFB name → the device whose ingress it shapes), known by their alias."""
    links = json.loads(runner.query(("ip", "-j", "link", "show", "type", "ifb")) or "[]")
    return {
        link["ifname"]: link["ifalias"][len(IFB_ALIAS) :]
        for link in links
        if plan_ingress.is_shapekit_ifb(link.get("ifalias"))
    }


def ifb_alias(runner: Runner, name: str) -> str | None:
    """The alias of link `name`; "" when it has none; None when there is no such link."""
    if not device_exists(name):
        return None
    links = json.loads(runner.query(("ip", "-j", "link", "show", "dev", name)) or "[]")
    return links[0].get("ifalias", "") if links else None


def require_own_ifbs(runner: Runner, trees: Sequence[Device]) -> None:
    """The IFB name and the ingress filter pref shapekit would use must be free or its own: never take over."""
    for tree in trees:
        hook = read_ingress_hook(runner, tree.configured)
        if hook.redirect_to not in (None, tree.name):
            raise UsageError(
                f"{tree.configured}'s ingress filter at pref {plan_ingress.REDIRECT_PREF} is not shapekit's "
                f"(it does not redirect to {tree.name}): move it to another pref to shape [{tree.key}]"
            )
        alias = ifb_alias(runner, tree.name)
        if alias is not None and not plan_ingress.is_shapekit_ifb(alias, tree.configured):
            raise UsageError(
                f"device {tree.name!r} exists and is not shapekit's IFB for {tree.configured} "
                f"(its alias is {alias!r}): delete or rename it to shape [{tree.key}]"
            )


def read_ingress_hook(runner: Runner, dev: str) -> plan_ingress.IngressHook:
    qdiscs = json.loads(runner.query(("tc", "-j", "qdisc", "show", "dev", dev)) or "[]")
    qdisc = next((q["kind"] for q in qdiscs if q.get("kind") in ("ingress", "clsact")), None)
    if qdisc is None:
        return plan_ingress.IngressHook(qdisc=None, redirect_to=None)
    filters = json.loads(runner.query(("tc", "-j", "filter", "show", "dev", dev, "ingress")) or "[]")
    ours = [f for f in filters if f.get("pref") == plan_ingress.REDIRECT_PREF]
    targets = [a.get("to_dev") for f in ours for a in f.get("options", {}).get("actions", [])]
    return plan_ingress.IngressHook(
        qdisc=qdisc,
        redirect_to=next((t for t in targets if t), "") if ours else None,
        other_filters=any(f.get("pref") != plan_ingress.REDIRECT_PREF for f in filters),
    )


def read_node(runner: Runner, dev: str, handle: str) -> dict[str, plan_ingress.U32Entry]:
    """One cap's hash node, by handle ({} when it is not there): one small query however many caps there are."""
    family = plan_ingress.node_family(handle)
    argv = ("tc", "filter", "get", "dev", dev, "parent", "5c:", "protocol", plan_ingress.PROTOCOL[family],
            "pref", str(plan_ingress.CAP_PREF[family]), "handle", handle, "u32")  # fmt: skip
    try:
        text = runner.query(argv)
    except CommandFailed:
        return {}
    return plan_ingress.hash_nodes(drift.parse_u32_filters(text))


def read_u32_filters(runner: Runner, dev: str) -> tuple[set[int], list[plan_ingress.U32Entry]]:
    """The prefs in use on shapekit's root qdisc of `dev`, and its classifying u32 filters."""
    text = runner.query(("tc", "filter", "show", "dev", dev, "parent", "5c:"))
    return drift.parse_prefs(text), drift.parse_u32_filters(text)


def apply_ingress(runner: Runner, tree: Device, cmds: list[Argv]) -> None:
    """Build an ingress tree: its IFB, the tree with its filters, then the redirect; undo it all on failure."""
    dev, ifb = tree.configured, tree.name
    created = ifb_alias(runner, ifb) is None
    hook = read_ingress_hook(runner, dev)
    try:
        runner.run_each(f"{dev}: its IFB device for arriving traffic", plan_ingress.plan_ifb(tree, not created))
        apply_tree(runner, ifb, cmds)
        runner.tc_batch(f"{dev}: arriving traffic to {ifb}", plan_ingress.plan_redirect(dev, ifb, hook))
    except CommandFailed as exc:
        raise CommandFailed(exc.command, exc.stderr, _undo_ingress(runner, dev, ifb, hook)) from None


def _undo_ingress(runner: Runner, dev: str, ifb: str, before: plan_ingress.IngressHook) -> str:
    try:
        remove_ingress(runner, dev, ifb)
        now = read_ingress_hook(runner, dev)
        if before.qdisc is None and now.qdisc == "ingress" and now.redirect_to is None and not now.other_filters:
            runner.tc_batch(f"{dev}: the ingress qdisc this run made", [("tc", "qdisc", "del", "dev", dev, "ingress")])
    except CommandFailed as undo:
        return f"removing {dev}'s ingress shaping failed too: {undo}"
    return f"{dev}'s arriving traffic was left unshaped ({ifb} removed)"


def remove_ingress(runner: Runner, dev: str, ifb: str) -> None:
    """Take shapekit's redirect off `dev` and delete its IFB (with its tree)."""
    if device_exists(dev):
        runner.tc_batch(
            f"{dev}: stop redirecting arriving traffic",
            plan_ingress.plan_unredirect(dev, ifb, read_ingress_hook(runner, dev)),
        )
    if device_exists(ifb):
        runner.run_each(f"{dev}: remove its IFB device", [("ip", "link", "del", "dev", ifb)])


def read_root(runner: Runner, dev: str) -> RootQdisc:
    """The root qdisc of `dev` now."""
    qdiscs = json.loads(runner.query(("tc", "-j", "qdisc", "show", "dev", dev, "root")) or "[]")
    root = next((q for q in qdiscs if q.get("root")), None)
    if root is None:
        return KERNEL_DEFAULT
    return RootQdisc(kind=root["kind"], handle=root["handle"])


def devices_with_root(runner: Runner, handle: str, kind: str) -> list[str]:
    """Every device here whose root qdisc is `kind` with `handle`."""
    qdiscs = json.loads(runner.query(("tc", "-j", "qdisc", "show")) or "[]")
    return [q["dev"] for q in qdiscs if q.get("root") and q.get("handle") == handle and q.get("kind") == kind]


def apply_tree(runner: Runner, dev: str, cmds: list[Argv]) -> None:
    """Run a device's tree as one batch; on failure leave the device without it."""
    try:
        runner.tc_batch(f"{dev}: shapekit's HTB tree (run as one tc -batch)", cmds)
    except CommandFailed as exc:
        raise _undo_tree(runner, dev, cmds, exc) from None


def _undo_tree(runner: Runner, dev: str, cmds: list[Argv], exc: CommandFailed) -> CommandFailed:
    match = _BATCH_FAILED_LINE.search(exc.stderr)
    failed = shlex.join(cmds[int(match.group(1)) - 1]) if match and int(match.group(1)) <= len(cmds) else exc.command
    # Keep the error; drop the line number and HTB's quantum warnings about other lines.
    stderr = "\n".join(line for line in exc.stderr.splitlines() if not _NOISE.match(line))
    try:
        runner.tc_batch(f"{dev}: undo", plan_flush(dev, read_root(runner, dev)))
    except CommandFailed as undo:
        return CommandFailed(failed, stderr, f"removing the partial tree from {dev} failed too: {undo}")
    return CommandFailed(failed, stderr, f"{dev} was left unshaped (shapekit's partial tree removed)")


# --- putting back what a failed run changed: each from what was read before, and what is there now ---


def put_back_prefs(runner: Runner, dev: str, prefs: list[tuple[int, int]], before: list[U32Filter]) -> None:
    """Whole u32 prefs (bypass, direction = "in" rules, a network's caps) as they were; left alone if they are."""
    present, entries = read_u32_filters(runner, dev)
    wanted = {(plan_ingress.PROTOCOL[family], pref) for family, pref in prefs}
    if [e for e in entries if (e.protocol, e.pref) in wanted] == [f.entry() for f in before]:
        return
    runner.tc_batch(f"{dev}: put its filters back", plan_ingress.replace_prefs(dev, prefs, present, before))


def put_back_classes(runner: Runner, tree: Device, before: dict[int, int | None]) -> None:
    """The cap classes named in `before` as they were (None: not there); each read by one rtnetlink get."""
    now = {m: c.ceil for m in before if (c := read_class(tree.name, m)) is not None}
    runner.tc_batch(f"{tree.name}: put its cap classes back", plan_limits.sync_classes(tree, before, now))


def put_back_all_classes(runner: Runner, tree: Device, before: dict[int, int]) -> None:
    """Every cap class of a tree as it was."""
    now = read_cap_classes(runner, tree.name)
    runner.tc_batch(
        f"{tree.name}: put its cap classes back", plan_limits.sync_classes(tree, plan_limits.exactly(before, now), now)
    )


def put_back_sets(runner: Runner, dev: str, before: dict[int, list[str] | None]) -> None:
    """A device's cap sets as they were: refilled and swapped in, and gone where there was none."""
    kept = {family: entries for family, entries in before.items() if entries is not None}
    gone = {plan_limits.set_name(dev, f) + scratch for f in before if f not in kept for scratch in ("", "~")}
    text = plan_limits.fill_sets(dev, kept) if kept else ""
    text += plan_limits.plan_destroy_sets([name for name in list_sets(runner) if name in gone])
    ipset_restore(runner, f"{dev}: put its cap sets back", text)


def put_back_ingress_caps(
    runner: Runner, tree: Device, filters: plan_ingress.CapFilters, classes: dict[int, int]
) -> None:
    """An ingress tree's cap filters and classes as they were."""
    present, entries = read_u32_filters(runner, tree.name)
    now = read_cap_classes(runner, tree.name)
    wanted = plan_limits.exactly(classes, now)
    cmds = plan_ingress.sync_cap_filters(tree, filters, wanted, present, plan_ingress.hash_nodes(entries), now)
    runner.tc_batch(f"{tree.name}: put its caps back", cmds)
