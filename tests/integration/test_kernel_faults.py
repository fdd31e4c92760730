"""Nothing half-applied: every step of every command that changes state, made to fail on a real kernel.

Each scenario boots shapekit in fresh namespaces, runs one command once to
count its steps (a line of `tc -batch` or `ipset restore`, one whole
`iptables-restore`, one `ip link`), then for each step n boots again, makes
step n fail the way the real tool fails (tests/faults/fake-tool), and
asserts: exit 1, one line naming the command, and the kernel and the state
files exactly as before — foreign rules and sets included.
"""

from __future__ import annotations

import re
import signal
from dataclasses import dataclass
from pathlib import Path

import pytest
from faults import Faults, kernel_state, make_faults, state_diff
from netns import NetPair

from shapekit.kernel.run import TC_BATCH_LINES

CONFIG = """
[device.DEV]
rate = "1gbit"
default = "bulk"
leaf = "pfifo"
classifier = "classify"
gso_max_segs = 4

[device.DEV.classes.bulk]
rate = "10mbit"

[device.DEV.classes.interactive]
rate = "20mbit"
prio = 1

[device.DEV.ingress]
rate = "40mbit"
default = "down"
leaf = "pfifo"

[device.DEV.ingress.classes.down]
rate = "8mbit"

[device.DEV.ingress.classes.vnc]
rate = "8mbit"

[bypass]
ports = ["22/tcp"]

[[mark]]
class = "interactive"
proto = "tcp"
dport = 5900

[[mark]]
class = "vnc"
direction = "in"
proto = "tcp"
sport = "5900:5999"

[device.DEV.limits]
"198.18.0.101" = "3mbit"
"fd00:5c::101" = "1mbit"
"198.18.0.3" = { rate = "2mbit", direction = "in" }
"198.18.1.0/24" = { rate = "4mbit", direction = "in" }
"""
# The config changed under a running box: a cap inserted before the others (every minor after it moves),
# another bypass port, another [[mark]] rule for arriving traffic, GSO held to another size.
CHANGED = (
    CONFIG.replace("gso_max_segs = 4", "gso_max_segs = 8")
    .replace('"198.18.0.101" = "3mbit"', '"198.18.0.100" = "1mbit"\n"198.18.0.101" = "3mbit"')
    .replace('ports = ["22/tcp"]', 'ports = ["22/tcp", "443/tcp"]')
    .replace(
        'sport = "5900:5999"',
        'sport = "5900:5999"\n\n[[mark]]\nclass = "vnc"\ndirection = "in"\nproto = "udp"\nsport = 53',
    )
)
# Things shapekit did not make: they must come through every failure byte for byte.
FOREIGN = (
    ("iptables", "-t", "mangle", "-A", "POSTROUTING", "-p", "udp", "--dport", "9", "-j", "MARK", "--set-mark", "7"),
    ("ip6tables", "-t", "mangle", "-A", "PREROUTING", "-p", "udp", "--dport", "9", "-j", "MARK", "--set-mark", "7"),
    ("ipset", "create", "foreign", "hash:ip"),
    ("ipset", "add", "foreign", "198.18.0.77"),
)


@dataclass
class Scenario:
    name: str
    command: tuple[str, ...]  # run with --config CONFIG (or the changed config)
    prepare: tuple[tuple[str, ...], ...] = ()  # shapekit commands run after the boot, unfaulted
    changed_config: bool = False
    files: tuple[tuple[str, str], ...] = ()  # (name, text) written beside the config; the command names them


SCENARIOS = [
    Scenario("limit add, a new host", ("shape-limit-ip", "add", "198.18.0.102", "1mbit", "--for", "1h")),
    Scenario("limit add, a config host re-rated", ("shape-limit-ip", "add", "198.18.0.101", "5mbit")),
    Scenario("limit add, an IPv6 host", ("shape-limit-ip", "add", "fd00:5c::102", "1mbit")),
    Scenario(
        "limit add, a cap --for a while re-rated",
        ("shape-limit-ip", "add", "198.18.0.102", "2mbit", "--for", "2h"),
        prepare=(("shape-limit-ip", "add", "198.18.0.102", "1mbit", "--for", "1h"),),
    ),
    Scenario(
        "limit add, the first since a flush, with the IPv6 set missing",
        ("shape-limit-ip", "add", "198.18.0.103", "1mbit"),
        # remove after a flush makes the IPv4 set alone; the boot sequence without shape-limit-ip then
        prepare=(
            ("shape-limit-ip", "add", "198.18.0.102", "1mbit"),
            ("shape-flush",),
            ("shape-limit-ip", "remove", "198.18.0.102"),
            ("shape-init",),
            ("shape-bypass",),
            ("shape-mark",),
        ),
    ),
    Scenario("limit add --in, a host", ("shape-limit-ip", "add", "198.18.0.104", "1mbit", "--in")),
    Scenario("limit add --in, a network", ("shape-limit-ip", "add", "198.18.2.0/24", "1mbit", "--in")),
    Scenario(
        "limit remove, back to uncapped",
        ("shape-limit-ip", "remove", "198.18.0.102"),
        prepare=(("shape-limit-ip", "add", "198.18.0.102", "1mbit"),),
    ),
    Scenario(
        "limit remove, back to the config's cap",
        ("shape-limit-ip", "remove", "198.18.0.101"),
        prepare=(("shape-limit-ip", "add", "198.18.0.101", "5mbit"),),
    ),
    Scenario(
        "limit remove --in, a host and a network",
        ("shape-limit-ip", "remove", "198.18.0.104", "--in"),
        prepare=(
            ("shape-limit-ip", "add", "198.18.0.104", "1mbit", "--in"),
            ("shape-limit-ip", "add", "198.18.2.0/24", "1mbit", "--in"),
        ),
    ),
    Scenario(
        "limit remove --in, a network",
        ("shape-limit-ip", "remove", "198.18.2.0/24", "--in"),
        prepare=(("shape-limit-ip", "add", "198.18.2.0/24", "1mbit", "--in"),),
    ),
    Scenario(
        "shape-limit-ip, a cap inserted before the others",
        ("shape-limit-ip",),
        prepare=(("shape-limit-ip", "add", "198.18.0.102", "1mbit"),),
        changed_config=True,
    ),
    Scenario(
        "limit sync, a cap re-rated, one new, one gone",
        ("shape-limit-ip", "sync", "caps.csv"),
        prepare=(
            ("shape-limit-ip", "add", "198.18.0.102", "1mbit"),
            ("shape-limit-ip", "add", "198.18.0.103", "1mbit"),
        ),
        files=(("caps.csv", "host,rate\n198.18.0.102,2mbit\n198.18.0.104,1mbit\n"),),
    ),
    Scenario("bypass add", ("shape-bypass", "add", "9091/tcp", "198.18.0.50")),
    Scenario(
        "bypass remove",
        ("shape-bypass", "remove", "9091/tcp"),
        prepare=(("shape-bypass", "add", "9091/tcp"),),
    ),
    Scenario("shape-bypass, a port added to the config", ("shape-bypass",), changed_config=True),
    Scenario("shape-mark, a rule added to the config", ("shape-mark",), changed_config=True),
]


def boot(
    pair: NetPair, prepare: tuple[tuple[str, ...], ...], files: tuple[tuple[str, str], ...] = ()
) -> tuple[str, str]:
    """shapekit's boot sequence and the scenario's own preparation, with foreign rules and sets around it."""
    for name, text in files:
        pair.write_config(text, name)
    for argv in FOREIGN:
        pair.left.run(*argv)
    config = str(pair.write_config(CONFIG))
    changed = str(pair.write_config(CHANGED, "changed.toml"))
    pair.shapekit("shape-init", "--all", "--config", config)  # the four boot commands in one process: quicker
    for argv in prepare:
        pair.shapekit(*argv, "--config", config)
    return config, changed


def reset(pair: NetPair) -> None:
    """Back to a bare namespace: shapekit's things, the foreign ones and the saved state gone."""
    pair.shapekit("shape-flush", "--forget", check=False)
    for table in ("iptables", "ip6tables"):
        pair.left.run(table, "-t", "mangle", "-F", check=False)
    pair.left.run("ipset", "destroy", check=False)


# u32 numbers the hash table of each pref itself (800:, 801:, ...): a pref put back gets the next number.
_AUTO_TABLE = re.compile(r"\b(fh|ht|link) ([89a-f][0-9a-f]{2}):")
_AUTO_KEY = re.compile(r"\bkey ht [89a-f][0-9a-f]{2} ")


def comparable(state: dict[str, str]) -> dict[str, str]:
    """Kernel state with the ids u32 picks for itself blanked, and classes in one order: what is there, not
    how the kernel happens to number or list it."""
    out = {}
    for key, text in state.items():
        if key.startswith("filter "):
            text = _AUTO_KEY.sub("key ht * ", _AUTO_TABLE.sub(r"\1 *:", text))
        if key.startswith(("class ", "qdisc ")):  # listed in hash order, which a class added and deleted can change
            text = "\n".join(sorted(text.splitlines()))
        out[key] = text
    return out


def saved_files(pair: NetPair) -> dict[str, str]:
    directory = Path(pair.env["SHAPEKIT_STATE_DIR"])
    return {p.name: p.read_text() for p in sorted(directory.glob("*.json"))}


@pytest.fixture
def faults(tmp_path) -> Faults:
    return make_faults(tmp_path)


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_every_step_failing_leaves_the_kernel_and_state_as_before(netpair, faults, scenario):
    steps = _count_steps(netpair, faults, scenario)
    for n in range(1, steps + 1):
        result, before, after = _run_once(netpair, faults, scenario, n)
        what = faults.step(n)
        assert faults.fired, f"step {n} never came: {faults.log}"
        assert result.returncode == 1, f"{what}: exit {result.returncode}: {result.stderr}"
        assert result.stderr.count("\n") == 1 and "failed" in result.stderr, f"{what}: {result.stderr}"
        assert "put back as before" in result.stderr or "nothing was changed" in result.stderr, result.stderr
        assert after[0] == before[0], f"{what}: {result.stderr}\n{state_diff(before[0], after[0])}"
        assert after[1] == before[1], f"{what}: the state files changed: {result.stderr}"


SIGNALLED = [s for s in SCENARIOS if s.name in ("shape-limit-ip, a cap inserted before the others", "bypass add")]


@pytest.mark.parametrize("scenario", SIGNALLED, ids=[s.name for s in SIGNALLED])
def test_sigterm_at_any_step_stops_the_run_and_puts_it_back(netpair, faults, scenario):
    """systemd stopping a unit, or `timeout`, sends SIGTERM: the run stops after the step under way."""
    steps = _count_steps(netpair, faults, scenario)
    for n in range(1, steps + 1):
        result, before, after = _run_once(netpair, faults, scenario, n, signal.SIGTERM)
        what = f"SIGTERM at {faults.step(n)}"
        assert result.returncode == 128 + signal.SIGTERM, f"{what}: exit {result.returncode}: {result.stderr}"
        assert result.stderr.count("\n") == 1, f"{what}: {result.stderr}"
        assert "interrupted by SIGTERM; put back as before: " in result.stderr, f"{what}: {result.stderr}"
        assert after[0] == before[0], f"{what}: {result.stderr}\n{state_diff(before[0], after[0])}"
        assert after[1] == before[1], f"{what}: the state files changed: {result.stderr}"


def _count_steps(netpair: NetPair, faults: Faults, scenario: Scenario) -> int:
    """How many steps a good run of the scenario takes."""
    result, _, _ = _run_once(netpair, faults, scenario, None)
    assert result.returncode == 0, result.stderr
    assert faults.steps >= 2, faults.log
    print(f"{scenario.name}: {faults.steps} steps")
    return faults.steps


def _run_once(netpair: NetPair, faults: Faults, scenario: Scenario, fail_at: int | None, signum: int = 0):
    """Boot afresh, run the scenario's command with step `fail_at` failing (or signalled); the result, and
    the kernel state and state files before and after."""
    reset(netpair)
    config, changed = boot(netpair, scenario.prepare, scenario.files)
    before = (comparable(kernel_state(netpair, [netpair.dev])), saved_files(netpair))
    config_used = changed if scenario.changed_config else config
    named = {name: str(netpair.workdir / name) for name, _ in scenario.files}
    argv = [named.get(word, word) for word in scenario.command]
    result = _faulted(netpair, faults, fail_at, *argv, "--config", config_used, signum=signum)
    after = (comparable(kernel_state(netpair, [netpair.dev])), saved_files(netpair))
    return result, before, after


def _faulted(netpair: NetPair, faults: Faults, fail_at: int | None, *argv: str, signum: int = 0):
    plain = netpair.env
    faults.arm(fail_at, signum)
    netpair.env = faults.env(plain, netpair.left.name)
    try:
        return netpair.shapekit(*argv, check=False)
    finally:
        netpair.env = plain


def _tree(state: dict[str, str], dev: str, ifb: str) -> tuple[dict[str, str], ...]:
    """The keys of `dev`'s egress tree, of its ingress tree (the IFB and the redirect on dev's ingress hook),
    and dev's gso_max_segs (held after the tree, so it may be the old value with the tree gone)."""
    egress = {k: v for k, v in state.items() if k in (f"class {dev}", f"filter {dev} parent 5c:")}
    ingress = {k: v for k, v in state.items() if ifb in k or k == f"filter {dev} ingress"}
    qdiscs = state[f"qdisc {dev}"].splitlines()
    egress["qdiscs"] = "\n".join(q for q in qdiscs if not q.startswith("qdisc ingress "))
    ingress["qdiscs"] = "\n".join(q for q in qdiscs if q.startswith("qdisc ingress "))
    ingress["ifb"] = str(f"{ifb} " in state["links"])
    gso = next(line.rsplit(" ", 1)[1] for line in state["links"].splitlines() if line.startswith(f"{dev} "))
    return egress, ingress, {"gso": gso}


def test_shape_init_failing_at_any_step_leaves_each_tree_whole_or_gone(netpair, faults):
    """shape-init replaces whatever root qdisc a device had, so it cannot put an old tree back: a tree that
    fails is taken away (unshaped), never left half-built; netfilter, sets and state files are untouched."""
    dev, ifb = netpair.dev, f"ifb-{netpair.dev}"
    config, changed = boot(netpair, ())
    assert _faulted(netpair, faults, None, "shape-init", "--config", changed).returncode == 0
    steps, built = faults.steps, _tree(comparable(kernel_state(netpair, [dev])), dev, ifb)
    reset(netpair)
    unshaped = _tree(comparable(kernel_state(netpair, [dev])), dev, ifb)
    print(f"shape-init: {steps} steps")
    for n in range(1, steps + 1):
        reset(netpair)
        boot(netpair, ())
        before = comparable(kernel_state(netpair, [dev]))
        files = saved_files(netpair)
        result = _faulted(netpair, faults, n, "shape-init", "--config", changed)
        after = comparable(kernel_state(netpair, [dev]))
        what = f"{faults.step(n)}: {result.stderr}"
        assert result.returncode == 1 and result.stderr.count("\n") == 1 and "unshaped" in result.stderr, what
        for was, whole, gone, now in zip(_tree(before, dev, ifb), built, unshaped, _tree(after, dev, ifb), strict=True):
            assert now in (was, whole, gone), f"{what}\n{state_diff(gone, now)}"
        for key in ("mangle4", "mangle6", "ipset"):
            assert after[key] == before[key], f"{what}\n{state_diff(before, after)}"
        assert saved_files(netpair) == files, what


def test_shape_init_all_failing_leaves_each_tree_whole_or_gone_and_the_rules_sets_and_state_as_before(netpair, faults):
    """shape-init --all: a tree step failing leaves that tree gone, as shape-init does; any later step (the
    sets, the chains) fails inside one transaction, put back as before with the trees (and their GSO hold,
    and its record) left built."""
    dev, ifb = netpair.dev, f"ifb-{netpair.dev}"
    config, changed = boot(netpair, ())
    assert _faulted(netpair, faults, None, "shape-init", "--config", changed).returncode == 0
    tree_steps = faults.steps
    reset(netpair)
    boot(netpair, ())
    assert _faulted(netpair, faults, None, "shape-init", "--all", "--config", changed).returncode == 0
    steps, built = faults.steps, _tree(comparable(kernel_state(netpair, [dev])), dev, ifb)
    held = saved_files(netpair)["gso.json"]  # the trees' GSO hold, recorded with them
    reset(netpair)
    unshaped = _tree(comparable(kernel_state(netpair, [dev])), dev, ifb)
    print(f"shape-init --all: {steps} steps, the trees' {tree_steps} first")
    for n in (
        1,
        *range(tree_steps + 1, steps + 1),
    ):  # one tree step (shape-init's own test takes each), every later one
        reset(netpair)
        boot(netpair, ())
        before, files = comparable(kernel_state(netpair, [dev])), saved_files(netpair)
        result = _faulted(netpair, faults, n, "shape-init", "--all", "--config", changed)
        after = comparable(kernel_state(netpair, [dev]))
        what = f"{faults.step(n)}: {result.stderr}"
        assert result.returncode == 1 and result.stderr.count("\n") == 1, what
        assert ("unshaped" if n <= tree_steps else "put back as before") in result.stderr, what
        for was, whole, gone, now in zip(_tree(before, dev, ifb), built, unshaped, _tree(after, dev, ifb), strict=True):
            assert now in ((was, whole, gone) if n <= tree_steps else (whole,)), f"{what}\n{state_diff(whole, now)}"
        for key in ("mangle4", "mangle6", "ipset"):
            assert after[key] == before[key], f"{what}\n{state_diff(before, after)}"
        assert saved_files(netpair) == (files if n <= tree_steps else {**files, "gso.json": held}), what


def test_shape_flush_failing_at_any_step_is_finished_by_running_it_again(netpair, faults):
    """shape-flush only removes, and what it removes is the safe state: after a failure the kernel holds
    less of shapekit than before and nothing else changed; running it again finishes the job."""
    dev = netpair.dev
    boot(netpair, ())
    assert _faulted(netpair, faults, None, "shape-flush").returncode == 0
    steps, flushed = faults.steps, comparable(kernel_state(netpair, [dev]))
    print(f"shape-flush: {steps} steps")
    assert "SHAPEKIT" not in flushed["mangle4"] + flushed["mangle6"] + flushed["ipset"]
    for n in range(1, steps + 1):
        reset(netpair)
        boot(netpair, ())
        result = _faulted(netpair, faults, n, "shape-flush")
        what = f"{faults.step(n)}: {result.stderr}"
        assert result.returncode == 1 and result.stderr.count("\n") == 1, what
        again = netpair.shapekit("shape-flush", check=False)
        assert again.returncode == 0, f"{what}; again: {again.stderr}"
        after = comparable(kernel_state(netpair, [dev]))
        assert after == flushed, f"{what}\n{state_diff(flushed, after)}"


def test_a_batch_run_in_parts_failing_in_its_second_part_is_put_back_whole(netpair, faults):
    """`tc -batch` runs in parts of TC_BATCH_LINES (tc keeps 4 KB a line): a failure in the second part, after
    the first ran whole, still leaves the kernel and the saved caps as they were."""
    rows = "".join(f"198.19.{n // 256}.{n % 256},1mbit\n" for n in range(TC_BATCH_LINES + 10))
    scenario = Scenario("limit sync, more classes than one tc batch", ("shape-limit-ip", "sync", "caps.csv"),
                        files=(("caps.csv", "host,rate\n" + rows),))  # fmt: skip
    counted, _, _ = _run_once(netpair, faults, scenario, None)
    assert counted.returncode == 0, counted.stderr
    adds = [int(line.split("\t")[0]) for line in faults.log if "\tclass add " in line]
    fail_at = adds[0] + TC_BATCH_LINES + 5  # the 10,006th class, in the second tc -batch

    result, before, after = _run_once(netpair, faults, scenario, fail_at)

    assert result.returncode == 1, result.stderr
    assert "put back as before" in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert after[0] == before[0], state_diff(before[0], after[0])
    assert after[1] == before[1], "the state files changed"


def test_hosts_failing_at_any_step_leaves_no_counting_and_the_rest_as_before(netpair, faults):
    """shape-status --hosts puts its counting in for the interval only: whichever of its steps fails (a set,
    a family's rules, its removal), it exits 1 and the kernel holds exactly what it held before."""
    config, _ = boot(netpair, ())
    argv = ("shape-status", "--hosts", "--interval", "1", "--config", config)
    assert _faulted(netpair, faults, None, *argv).returncode == 0
    steps = faults.steps
    print(f"shape-status --hosts: {steps} steps")
    assert steps >= 4, faults.log  # its sets, both families' rules, their removal
    before = comparable(kernel_state(netpair, [netpair.dev]))
    for n in range(1, steps + 1):
        result = _faulted(netpair, faults, n, *argv)
        what = f"{faults.step(n)}: {result.stderr}"
        assert faults.fired, f"step {n} never came: {faults.log}"
        assert result.returncode == 1 and result.stderr.count("\n") == 1, what
        assert "put back as before: the host counters" in result.stderr, what
        after = comparable(kernel_state(netpair, [netpair.dev]))
        assert after == before, f"{what}\n{state_diff(before, after)}"
