"""Pure comparison of what the kernel holds with what the plan says it should (`shape-init --check`).

The kernel's side is read by `apply` (tc, iptables-save, ipset save); this
module parses those outputs and the plan's own commands into the same
shapes, and names every difference in a line a person can act on.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from shapekit.config.units import format_rate, parse_rate
from shapekit.plan.ingress import U32Entry
from shapekit.plan.mangle import MangleState
from shapekit.plan.tc_text import TcClass, parse_tc_classes
from shapekit.plan.tree import Argv


@dataclass(frozen=True)
class Tree:
    """A device's shapekit tree: its root, classes and leaf qdiscs."""

    default: str | None  # the root's default class minor, hex ("1030"); None: no shapekit root
    classes: dict[str, TcClass]  # "5c:1030" → class
    leaves: dict[str, str]  # parent class id → leaf qdisc kind
    stab: str = "none"  # the root's size table, as a person reads it: "overhead -4 linklayer atm"


def _stab(overhead: int, linklayer: str) -> str:
    return f"overhead {overhead} linklayer {linklayer}"


def kernel_tree(qdisc_json: str, class_text: str, root_handle: str) -> Tree:
    qdiscs = json.loads(qdisc_json or "[]")
    root = next((q for q in qdiscs if q.get("root")), None)
    if root is None or root.get("kind") != "htb" or root.get("handle") != root_handle:
        return Tree(default=None, classes={}, leaves={})
    default = format(int(str(root.get("options", {}).get("default", "0")), 16), "x")
    classes = parse_tc_classes(class_text)  # the caps' too, in their groups' qdiscs
    leaves = {q["parent"]: q["kind"] for q in qdiscs if not q.get("root") and q.get("parent") in classes}
    # `tc -j -d` shows the size table; tc's mtu and tsize are its own defaults, not the config's
    stab = root.get("stab")
    shown = _stab(int(stab.get("overhead", 0)), stab.get("linklayer", "ethernet")) if stab else "none"
    return Tree(default=default, classes=classes, leaves=leaves, stab=shown)


def without(tree: Tree, classids: set[str]) -> Tree:
    """The tree less these classes and their leaves."""
    classes = {cid: c for cid, c in tree.classes.items() if cid not in classids}
    leaves = {parent: kind for parent, kind in tree.leaves.items() if parent not in classids}
    return Tree(default=tree.default, classes=classes, leaves=leaves, stab=tree.stab)


def planned_tree(cmds: Sequence[Argv]) -> Tree:
    """The tree a plan's `tc ... add` commands build."""
    default, classes, leaves, stab = None, {}, {}, "none"
    for cmd in cmds:
        words = dict(zip(cmd[5::2], cmd[6::2], strict=False)) if len(cmd) > 5 else {}
        if cmd[1:3] == ("qdisc", "add") and "root" in cmd:
            default = cmd[cmd.index("default") + 1]
            if "stab" in cmd:
                words = cmd[cmd.index("stab") + 1 : cmd.index("htb")]
                table = dict(zip(words[::2], words[1::2], strict=True))
                stab = _stab(int(table["overhead"]), table.get("linklayer", "ethernet"))
        elif cmd[1:3] == ("class", "add"):
            opts = dict(zip(cmd[cmd.index("htb") + 1 :: 2], cmd[cmd.index("htb") + 2 :: 2], strict=False))
            parent = words["parent"] if not words["parent"].endswith(":") else "root"
            classes[words["classid"]] = TcClass(
                parent,
                parse_rate(opts["rate"]),
                parse_rate(opts["ceil"]),
                int(opts.get("overhead", 0)),
                opts.get("linklayer", "ethernet"),
            )
        elif cmd[1:3] == ("qdisc", "add"):
            leaves[words["parent"]] = cmd[cmd.index("handle") + 2]
    return Tree(default=default, classes=classes, leaves=leaves, stab=stab)


def _close(a: int, b: int) -> bool:
    return abs(a - b) <= max(8, b // 1000)  # HTB keeps bytes/s; tc prints rounded


def diff_tree(dev: str, want: Tree, have: Tree) -> list[str]:
    if have.default is None:
        return [f"{dev}: shapekit's tree is missing (run shape-init)"]
    out = []
    if want.default != have.default:
        out.append(f"{dev}: unmarked traffic goes to 5c:{have.default}, the config says 5c:{want.default}")
    if want.stab != have.stab:
        out.append(f"{dev}: the root's size table is {have.stab}, the config says {want.stab}")
    for cid in sorted(set(want.classes) - set(have.classes)):
        out.append(f"{dev}: class {cid} is missing")
    for cid in sorted(set(have.classes) - set(want.classes)):
        out.append(f"{dev}: class {cid} is not in the config")
    for cid in sorted(set(want.classes) & set(have.classes)):
        w, h = want.classes[cid], have.classes[cid]
        if w.parent != h.parent:
            out.append(f"{dev}: class {cid} hangs under {h.parent}, the config says {w.parent}")
        for name in ("rate", "ceil"):
            if not _close(getattr(h, name), getattr(w, name)):
                got, said = format_rate(getattr(h, name)), format_rate(getattr(w, name))
                out.append(f"{dev}: class {cid} {name} is {got}, the config says {said}")
        if w.charged != h.charged:
            out.append(f"{dev}: class {cid} charges {h.charged}, the config says {w.charged}")
    for parent in sorted((set(want.leaves) | set(have.leaves)) & set(have.classes)):
        if want.leaves.get(parent) != have.leaves.get(parent):
            got, said = have.leaves.get(parent, "none"), want.leaves.get(parent, "none")
            out.append(f"{dev}: leaf qdisc under {parent} is {got}, the config says {said}")
    return out


def before_caps(want: MangleState, have: MangleState, limit: str) -> MangleState:
    """What to expect of the `limit` chain where no cap is configured or saved: as the boot's first three commands
    leave it (empty) or as shape-limit-ip does (a lookup per device in empty sets) both send every packet on."""
    if have.chains.get(limit) == ():
        return MangleState(chains={**want.chains, limit: ()}, jumps=want.jumps)
    return want


def diff_chains(family: int, want: MangleState, have: MangleState) -> list[str]:
    out = []
    if not have.jumps and want.jumps:
        out.append(f"IPv{family}: the jump from POSTROUTING to SHAPEKIT is missing")
    for name in sorted(set(want.chains) | set(have.chains)):
        if name not in have.chains:
            out.append(f"IPv{family}: chain {name} is missing")
        elif name not in want.chains:
            out.append(f"IPv{family}: chain {name} is not in the config")
        elif want.chains[name] != have.chains[name]:
            out.append(f"IPv{family}: chain {name} differs from the config")
    return out


_IPSET_ADD = re.compile(r"^add (\S+) (\S+) .*?\bskbprio (\S+)", re.MULTILINE)


def parse_set_entries(ipset_save: str, prefix: str) -> set[tuple[str, str, str]]:
    """(set, host, class) of every entry in shapekit's sets; a single address is written as /32 or /128."""
    entries = set()
    for name, host, prio in _IPSET_ADD.findall(ipset_save):
        if name.startswith(prefix):
            if "/" not in host:
                host += "/128" if ":" in host else "/32"
            entries.add((name, host, prio))
    return entries


def diff_sets(want: set[tuple[str, str, str]], have: set[tuple[str, str, str]]) -> list[str]:
    out = [f"cap {host} ({cls}) is missing from {name}" for name, host, cls in sorted(want - have)]
    out += [
        f"{name} caps {host} ({cls}), which the config and saved state do not"
        for name, host, cls in sorted(have - want)
    ]
    return out


_FILTER = re.compile(r"^filter .*?protocol (\S+) pref (\d+) .*?\b(flowid \S+|link \S+)")
_HANDLE = re.compile(r"\bfh (\S+)")
_MATCH = re.compile(r"^\s+match ([0-9a-f]{8})/([0-9a-f]{8}) at (-?\d+)")


def parse_u32_filters(text: str) -> list[U32Entry]:
    """The filters with a class (`flowid`) or a link to a hash table in `tc filter show` text."""
    entries: list[U32Entry] = []
    current: tuple[str, int, str, str] | None = None
    keys: list[tuple[int, int, int]] = []
    for line in [*text.splitlines(), "filter"]:
        if line.startswith("filter"):
            if current is not None:
                entries.append(U32Entry(*current[:3], tuple(sorted(keys)), current[3], tuple(keys)))
            found = _FILTER.match(line)
            handle = _HANDLE.search(line)
            current = None
            if found:
                target = found.group(3).removeprefix("flowid ")
                current = (found.group(1), int(found.group(2)), target, handle.group(1) if handle else "")
            keys = []
        elif (key := _MATCH.match(line)) is not None:
            keys.append((int(key.group(1), 16), int(key.group(2), 16), int(key.group(3))))
    return entries


def parse_prefs(text: str) -> set[int]:
    """Every filter pref in `tc filter show` text."""
    return {int(pref) for pref in re.findall(r" pref (\d+) ", text)}


def diff_filters(dev: str, want: Sequence[U32Entry], have: Sequence[U32Entry]) -> list[str]:
    wanted, held = Counter(want), Counter(have)
    out = [f"{dev}: {e.describe()} is missing" for e in sorted(wanted - held)]
    return out + [f"{dev}: {e.describe()} is not in the config" for e in sorted(held - wanted)]
