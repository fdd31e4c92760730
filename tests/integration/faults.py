"""Fault injection for real-kernel tests, and a snapshot of the kernel state shapekit can change.

`make_faults(tmp_path)` makes a directory of symlinks (tc, ip, ipset,
iptables-restore, ip6tables-restore) to tests/faults/fake-tool; `faults.env()`
puts it first in PATH and names the counter directory and the namespace
whose calls are counted. Each state-changing step (a changing line of `tc -batch`, a line of
`ipset restore`, one whole `ip(6)tables-restore`, one `tc`/`ip`/`ipset`
command that changes something) adds one to the count; with `arm(n)` step n
fails the way the real tool fails, once. See tests/faults/fake-tool.

    faults = make_faults(tmp_path)
    env = faults.env(pair.env, pair.left.name)
    faults.arm(None)                 # count only: how many steps does a good run take?
    ...run...; total = faults.steps
    for n in range(1, total + 1):
        faults.arm(n)                # step n fails, once
        ...run, expect the failure, compare kernel_state() with before...
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from netns import NetPair, sh

FAKE_TOOL = Path(__file__).resolve().parent.parent / "faults" / "fake-tool"
FAKED = ("tc", "ip", "ipset", "iptables-restore", "ip6tables-restore")


@dataclass
class Faults:
    dir: Path  # the counter: count, fail_at, fired, log
    bin: Path  # the symlinks to the fake tool

    def env(self, base_env: dict[str, str], netns_name: str) -> dict[str, str]:
        """base_env with the fake tools first in PATH, counting calls made inside namespace `netns_name`."""
        netns = sh("ip", "netns", "exec", netns_name, "readlink", "/proc/self/ns/net").stdout.strip()
        path = base_env.get("PATH") or "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        return {
            **base_env,
            "PATH": f"{self.bin}:{path}",
            "SHAPEKIT_FAULT_DIR": str(self.dir),
            "SHAPEKIT_FAULT_NETNS": netns,
        }

    def arm(self, n: int | None, signum: int = 0) -> None:
        """Start counting from zero; step n (1-based) will fail once, or none (n None: count only).

        With `signum`, step n does not fail: the caller gets that signal as it starts, and it runs whole.
        """
        (self.dir / "signal").write_text(f"{signum}\n")
        (self.dir / "count").write_text("0")
        for name in ("fired", "log"):
            (self.dir / name).unlink(missing_ok=True)
        fail_at = self.dir / "fail_at"
        if n is None:
            fail_at.unlink(missing_ok=True)
        else:
            fail_at.write_text(f"{n}\n")

    @property
    def steps(self) -> int:
        """Steps counted since arm() (the failed step included; what its call had after it not)."""
        text = (self.dir / "count").read_text().strip() if (self.dir / "count").exists() else ""
        return int(text or 0)

    @property
    def fired(self) -> bool:
        return (self.dir / "fired").exists()

    @property
    def log(self) -> list[str]:
        """One line per counted step: "N<TAB>tool<TAB>what" ("N<TAB>FAULT tool..." for the one that failed)."""
        path = self.dir / "log"
        return path.read_text().splitlines() if path.exists() else []

    def step(self, n: int) -> str:
        """What step n was (from the log of the last run), for messages."""
        return next((line for line in self.log if line.split("\t", 1)[0] == str(n)), f"step {n}")


def make_faults(tmp_path: Path) -> Faults:
    if not Path("/usr/bin/python3").exists():  # the fake tool's interpreter
        raise RuntimeError("tests/faults/fake-tool needs /usr/bin/python3")
    root = tmp_path / "faults"
    faults = Faults(dir=root / "counter", bin=root / "bin")
    faults.dir.mkdir(parents=True, exist_ok=True)
    faults.bin.mkdir(parents=True, exist_ok=True)
    for name in FAKED:
        link = faults.bin / name
        if not link.is_symlink():
            link.symlink_to(FAKE_TOOL)
    faults.arm(None)
    return faults


# -- what the kernel holds ---------------------------------------------------------------------------------

_MARK = "@@ kernel_state @@ "
CLASSFUL = {"htb", "prio", "hfsc", "drr", "qfq", "ets", "multiq", "cbq"}


def _run_all(pair: NetPair, commands: dict[str, list[str]]) -> dict[str, str]:
    """Run read-only commands inside the left namespace in one shell: each one's stdout and stderr, by key."""
    import shlex

    script = "".join(
        f"printf '%s\\n' {shlex.quote(_MARK + key)}; {shlex.join(argv)} 2>&1\n" for key, argv in commands.items()
    )
    out = pair.left.run("sh", "-c", script, check=False).stdout
    found: dict[str, list[str]] = {}
    key = None
    for line in out.split("\n"):
        if line.startswith(_MARK):
            key = line[len(_MARK) :]
            found[key] = []
        elif key is not None:
            found[key].append(line)
    return {k: "\n".join(v) for k, v in found.items()}


def _strip_counters(save: str) -> str:
    """iptables-save text without comments and chain counters."""
    lines = (re.sub(r" \[\d+:\d+\]$", "", line) for line in save.splitlines() if not line.startswith("#"))
    return "\n".join(lines)


def _ipset_state(save: str) -> str:
    """`ipset save`, sorted; entry timeouts (they count down) and hash seeds (random per set) blanked."""
    lines = []
    for line in save.splitlines():
        if line.startswith("add "):
            line = re.sub(r" timeout [1-9]\d*", " timeout *", line)  # counting down; 0 (for good) stays
        elif line.startswith("create "):
            line = re.sub(r" initval 0x[0-9a-f]+", "", line)
        lines.append(line)
    return "\n".join(sorted(lines))


def kernel_state(pair: NetPair, devs: list[str]) -> dict[str, str]:
    """Everything shapekit can change inside the left namespace, comparable before and after a run.

    Keys: "links" (every link: name, kind, up or not, alias, gso_max_segs), per device in
    `devs` and per IFB device present "qdisc DEV", "class DEV", "filter DEV",
    "filter DEV ingress" (when it has an ingress or clsact qdisc), "filter DEV
    parent H" (per classful qdisc H); "mangle4", "mangle6" (iptables-save and
    ip6tables-save -t mangle, without comments and counters); "ipset" (`ipset
    save`, lines sorted, `timeout N` of entries shown as `timeout *` since it
    counts down, `initval` of sets left out since it is random per creation).
    No counters anywhere (tc shows none without -s). Ids the kernel picks
    itself stay in: u32 hash tables without a handle (800:, 801:, ...) and
    action indexes count up, so a tree flushed and built again can differ
    there from the first one; compare a failed run with the state before it.
    """
    links = json.loads(pair.left.run("ip", "-d", "-j", "link", "show").stdout or "[]")
    ifbs = [link["ifname"] for link in links if link.get("linkinfo", {}).get("info_kind") == "ifb"]
    shown = [
        f"{link['ifname']} kind={link.get('linkinfo', {}).get('info_kind', '-')} "
        f"{'up' if 'UP' in link.get('flags', []) else 'down'} alias={link.get('ifalias', '')!r} "
        f"gso_max_segs={link.get('gso_max_segs')}"
        for link in links
    ]
    state = {"links": "\n".join(sorted(shown))}
    devices = list(dict.fromkeys([*devs, *ifbs]))
    qdiscs = _run_all(pair, {dev: ["tc", "-j", "qdisc", "show", "dev", dev] for dev in devices})
    commands: dict[str, list[str]] = {}
    for dev in devices:
        commands[f"qdisc {dev}"] = ["tc", "-d", "qdisc", "show", "dev", dev]
        commands[f"class {dev}"] = ["tc", "-d", "class", "show", "dev", dev]
        commands[f"filter {dev}"] = ["tc", "-d", "filter", "show", "dev", dev]
        try:
            listed = json.loads(qdiscs.get(dev) or "[]")
        except json.JSONDecodeError:
            listed = []  # no such device: its error is in "qdisc DEV"
        for qdisc in listed:
            if qdisc.get("kind") in ("ingress", "clsact"):
                commands[f"filter {dev} ingress"] = ["tc", "-d", "filter", "show", "dev", dev, "ingress"]
            elif qdisc.get("kind") in CLASSFUL:
                handle = qdisc["handle"]
                commands[f"filter {dev} parent {handle}"] = ["tc", "-d", "filter", "show", "dev", dev, "parent", handle]
    commands["mangle4"] = ["iptables-save", "-t", "mangle"]
    commands["mangle6"] = ["ip6tables-save", "-t", "mangle"]
    if shutil.which("ipset"):
        commands["ipset"] = ["ipset", "save"]
    shown_state = _run_all(pair, commands)
    for key in ("mangle4", "mangle6"):
        shown_state[key] = _strip_counters(shown_state[key])
    if "ipset" in shown_state:
        shown_state["ipset"] = _ipset_state(shown_state["ipset"])
    state.update(shown_state)
    return state


def state_diff(before: dict[str, str], after: dict[str, str]) -> str:
    """The keys that differ, each with a unified diff: for assertion messages."""
    import difflib

    parts = []
    for key in sorted(before.keys() | after.keys()):
        a, b = before.get(key), after.get(key)
        if a != b:
            diff = difflib.unified_diff((a or "").splitlines(), (b or "").splitlines(), "before", "after", lineterm="")
            parts.append(f"== {key}\n" + "\n".join(diff))
    return "\n".join(parts)
