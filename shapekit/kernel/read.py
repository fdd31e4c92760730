"""What the kernel holds now: qdiscs, classes, filters, links, chains, sets; read, never changed.

Read-only commands run under --dry-run too; classes come from rtnetlink itself (no process).
"""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import re
import socket
from collections.abc import Callable

from shapekit.config.model import IFB_ALIAS, MAX_GSO_SEGS, Device
from shapekit.errors import CommandFailed, UsageError
from shapekit.kernel import netlink as tc_netlink
from shapekit.kernel import run
from shapekit.plan import drift
from shapekit.plan import gso as plan_gso
from shapekit.plan import hosts as plan_hosts
from shapekit.plan import ingress as plan_ingress
from shapekit.plan import limits as plan_limits
from shapekit.plan import mangle as plan_mangle
from shapekit.plan.mangle import FAMILIES, TOOLS, MangleState
from shapekit.plan.tree import (
    KERNEL_DEFAULT,
    RootQdisc,
    configured_rate,
    root_handle,
)


def device_exists(name: str) -> bool:
    try:
        socket.if_nametoindex(name)
    except OSError:
        return False
    return True


def read_mangle(runner: run.Runner, family: int) -> MangleState:
    if not runner.privileged:
        runner.note(f"not root: IPv{family} chains unread; planned as a first install")
        return plan_mangle.EMPTY
    return plan_mangle.parse_mangle_save(runner.query((TOOLS[family][0], "-t", "mangle")))


def mangle_table_exists(runner: run.Runner, family: int) -> bool:
    """Whether the mangle table is there (a whole save: `-t mangle` shows one even when it is not)."""
    return plan_mangle.table_listed(runner.query((TOOLS[family][0],)))


def read_sets(runner: run.Runner, dev: str) -> dict[int, list[str] | None]:
    """A device's cap set entries now, per family, as `plan_limits.fill_sets` takes them; None: no such set."""
    present = set(list_sets(runner))
    sets: dict[int, list[str] | None] = {}
    for family in FAMILIES:
        name = plan_limits.set_name(dev, family)
        sets[family] = (
            plan_limits.parse_set_save(runner.query(("ipset", "save", name)), name) if name in present else None
        )
    return sets


def list_sets(runner: run.Runner) -> list[str]:
    if not runner.privileged:
        runner.note("not root: ipsets unread; planned as a first install")
        return []
    return runner.query(("ipset", "list", "-n")).split()


def local_addresses(runner: run.Runner) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """Every address of this machine (this network namespace)."""
    links = json.loads(runner.query(("ip", "-j", "addr", "show")) or "[]")
    return [ipaddress.ip_address(a["local"]) for link in links for a in link.get("addr_info", []) if "local" in a]


def read_cap_classes(runner: run.Runner, tree: Device) -> dict[str, int]:
    """Cap classes and groups (class id → the configured rate, bits/s) of a tree: a ptm tree's rates are written scaled."""
    qdiscs = runner.query(("tc", "-j", "qdisc", "show", "dev", tree.name))
    classes = plan_limits.parse_cap_classes(show_classes(runner, tree.name, qdiscs), tree)
    return {cid: configured_rate(ceil, tree) for cid, ceil in classes.items()}


def read_tree(runner: run.Runner, dev: str, root_handle: str) -> drift.Tree:
    qdiscs = runner.query(("tc", "-j", "-d", "qdisc", "show", "dev", dev))  # -d: the root's size table
    return drift.kernel_tree(qdiscs, show_classes(runner, dev, qdiscs), root_handle)


def show_classes(runner: run.Runner, dev: str, qdisc_json: str) -> str:
    """`tc class show` text of every HTB qdisc of `dev` (`qdisc_json`: `tc -j qdisc show` of it), dumped a
    qdisc at a time in one `tc -batch`: one dump of a whole device costs the kernel more for each class
    it holds (100,000 caps: 10 s), a dump per cap group 0.5 s."""
    handles = [q["handle"] for q in json.loads(qdisc_json or "[]") if q.get("kind") == "htb" and "handle" in q]
    lines = "".join(f"class show dev {dev} parent {handle}\n" for handle in handles)
    return runner.query(("tc", "-batch", "-"), lines) if lines else ""


def read_set_entries(runner: run.Runner) -> set[tuple[str, str, str]]:
    return drift.parse_set_entries(runner.query(("ipset", "save")), plan_limits.SET_PREFIX)


def read_classes(dev: str) -> list[tc_netlink.ClassStats]:
    """Every tc class of `dev` with its counters, from one rtnetlink dump (no process, no root)."""
    try:
        classes = _rtnetlink(lambda index: tc_netlink.dump_request(index), dev)
    except OSError as exc:
        if not device_exists(dev):
            raise UsageError(f"device {dev!r} is gone: check it with `ip link`, or leave it out with --dev") from None
        raise CommandFailed(f"rtnetlink dump of {dev}'s classes", exc.strerror or str(exc)) from None
    return [c for c in classes if c.kind == "htb"]  # sfq and fq_codel list a class per flow: not shapekit's


def read_class(dev: str, cid: str) -> tc_netlink.ClassStats | None:
    """One class of shapekit's tree (None: not there): one rtnetlink get, however many classes.

    The kernel answers a class get as a notification: a `tc monitor` running
    meanwhile sees the class go by, unchanged.
    """
    major, minor = (int(part, 16) for part in cid.split(":"))
    handle = major << 16 | minor
    try:
        classes = _rtnetlink(lambda index: tc_netlink.get_request(index, handle), dev)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise CommandFailed(f"rtnetlink get of {dev}'s class {cid}", exc.strerror or str(exc)) from None
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


def read_rule_counters(runner: run.Runner) -> dict[int, str] | None:
    """Both families' mangle tables with packet counters; None when only root may read them."""
    if os.geteuid() != 0:
        return None
    return {family: runner.query((TOOLS[family][0], "-c", "-t", "mangle")) for family in FAMILIES}


def shapekit_ifbs(runner: run.Runner) -> dict[str, str]:
    """shapekit's IFB devices here (IFB name → the device whose ingress it shapes), known by their alias."""
    links = json.loads(runner.query(("ip", "-j", "link", "show", "type", "ifb")) or "[]")
    return {
        link["ifname"]: link["ifalias"][len(IFB_ALIAS) :]
        for link in links
        if plan_ingress.is_shapekit_ifb(link.get("ifalias"))
    }


def ifb_alias(runner: run.Runner, name: str) -> str | None:
    """The alias of link `name`; "" when it has none; None when there is no such link."""
    if not device_exists(name):
        return None
    links = json.loads(runner.query(("ip", "-j", "link", "show", "dev", name)) or "[]")
    return links[0].get("ifalias", "") if links else None


def read_gso(runner: run.Runner, dev: str) -> plan_gso.Gso:
    """The device's gso_max_segs now, and its driver's limit (`ip -d -j link show`; Linux 5.19+ shows it)."""
    links = json.loads(runner.query(("ip", "-d", "-j", "link", "show", "dev", dev)) or "[]")
    if not links or "gso_max_segs" not in links[0]:
        raise UsageError(
            f"`ip -d -j link show dev {dev}` shows no gso_max_segs (an old iproute2): upgrade iproute2, "
            f'or set gso_max_segs = "keep" in [device.{dev}]'
        )
    return plan_gso.Gso(int(links[0]["gso_max_segs"]), int(links[0].get("tso_max_segs", MAX_GSO_SEGS)))


def read_ingress_hook(runner: run.Runner, dev: str) -> plan_ingress.IngressHook:
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


def read_node(runner: run.Runner, dev: str, handle: str) -> dict[str, plan_ingress.U32Entry]:
    """One cap's hash node, by handle ({} when it is not there): one small query however many caps there are."""
    family = plan_ingress.node_family(handle)
    argv = ("tc", "filter", "get", "dev", dev, "parent", "5c:", "protocol", plan_ingress.PROTOCOL[family],
            "pref", str(plan_ingress.CAP_PREF[family]), "handle", handle, "u32")  # fmt: skip
    try:
        text = runner.query(argv)
    except CommandFailed:
        return {}
    return plan_ingress.hash_nodes(drift.parse_u32_filters(text))


def read_u32_filters(runner: run.Runner, dev: str) -> tuple[set[int], list[plan_ingress.U32Entry]]:
    """The prefs in use on shapekit's root qdisc of `dev`, and its classifying u32 filters."""
    text = runner.query(("tc", "filter", "show", "dev", dev, "parent", "5c:"))
    return drift.parse_prefs(text), drift.parse_u32_filters(text)


def read_root(runner: run.Runner, dev: str) -> RootQdisc:
    """The root qdisc of `dev` now."""
    qdiscs = json.loads(runner.query(("tc", "-j", "qdisc", "show", "dev", dev)) or "[]")
    root = next((q for q in qdiscs if q.get("root")), None)
    if root is None:
        return KERNEL_DEFAULT
    current = RootQdisc(kind=root["kind"], handle=root["handle"])
    if not current.is_shapekit:  # another tree's nested qdiscs are not cap groups
        return current
    groups = [q["parent"] for q in qdiscs if q.get("kind") == "htb" and q.get("parent", "").startswith(root["handle"])]
    groups.sort(key=lambda cid: int(cid.split(":")[1], 16))  # the order shapekit makes them in
    return RootQdisc(kind=root["kind"], handle=root["handle"], groups=tuple(groups))


def sets_before_groups(runner: run.Runner, dev: str) -> bool:
    """Whether `dev`'s cap sets were made by a shapekit before cap groups (a smaller maxelem; their entries
    carry no group bits, and the rule that reads them sets none): from every set's header, one query."""
    if not runner.privileged:
        return False
    names = {plan_limits.set_name(dev, family) for family in FAMILIES}
    headers = dict(
        re.findall(r"^Name: (\S+)\n(?:.*\n)*?Header: (.*)$", runner.query(("ipset", "list", "-t")), re.MULTILINE)
    )
    return any(
        f"maxelem {plan_limits.MAX_SET_SIZE} " not in header + " " for name, header in headers.items() if name in names
    )


def has_group_filter(runner: run.Runner, dev: str) -> bool:
    """Whether `dev`'s tree has the root filter that finds cap groups: a tree shape-init built before them has not."""
    shown = runner.query(
        ("tc", "filter", "show", "dev", dev, "parent", root_handle(), "prio", str(plan_limits.GROUP_FILTER_PRIO))
    )
    return " bpf " in shown


def devices_with_root(runner: run.Runner, handle: str, kind: str) -> list[str]:
    """Every device here whose root qdisc is `kind` with `handle`."""
    qdiscs = json.loads(runner.query(("tc", "-j", "qdisc", "show")) or "[]")
    return [q["dev"] for q in qdiscs if q.get("root") and q.get("handle") == handle and q.get("kind") == kind]


def shapekit_jump(runner: run.Runner, family: int) -> int | None:
    """The position of shapekit's jump in mangle POSTROUTING; None: shapekit's rules are not installed."""
    return plan_hosts.shapekit_jump(runner.query((TOOLS[family][0], "-t", "mangle")))


def read_host_counters(runner: run.Runner, names: list[str]) -> dict[str, list[plan_hosts.Counted]]:
    """The members and counters of these sets, from one `ipset restore` of list commands."""
    return plan_hosts.parse_counters(runner.query(("ipset", "restore"), "".join(f"list {n} -o save\n" for n in names)))
