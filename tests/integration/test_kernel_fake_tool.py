"""The fault-injecting fake tool (tests/faults/fake-tool) itself, on the real kernel inside a netpair."""

from __future__ import annotations

import re
import subprocess

import pytest
from faults import Faults, kernel_state, make_faults, state_diff
from netns import NetPair

HTB_BATCH = (
    "qdisc add dev DEV root handle 1: htb\n"
    "class add dev DEV parent 1: classid 1:1 htb rate 1mbit\n"
    "class add dev DEV parent 1: classid 1:2 htb rate 2mbit\n"
)
SET_LINES = "create sk-fake hash:net family inet\nadd sk-fake 198.18.5.0/24\nadd sk-fake 198.18.6.0/24\n"
MANGLE = "*mangle\n:SK-FAKE - [0:0]\n-A SK-FAKE -j MARK --set-mark 0x5\n-A POSTROUTING -j SK-FAKE\nCOMMIT\n"

# The real tools' failures on this machine, which the fake must look like.
TC_BATCH_FAILED = re.compile(r"\nCommand failed -:(\d+)\n?$")
IPSET_RESTORE_FAILED = re.compile(r"^ipset v\d+(\.\d+)*: Error in line (\d+): .+$")
RESTORE_FAILED = re.compile(r"^ip6?tables-restore: line (\d+) failed: .+\.$")


@pytest.fixture
def faults(tmp_path) -> Faults:
    return make_faults(tmp_path)


def run(pair: NetPair, env: dict, *argv: str, stdin: str | None = None, ns: str | None = None):
    """argv inside the left namespace (or `ns`), with env's PATH: the fake tools first."""
    prefix = ("ip", "netns", "exec", ns or pair.left.name)
    return subprocess.run((*prefix, *argv), input=stdin, capture_output=True, text=True, env=env, timeout=60)


def counted(pair: NetPair, faults: Faults, env: dict, *argv: str, stdin: str | None = None) -> int:
    faults.arm(None)
    run(pair, env, *argv, stdin=stdin)
    return faults.steps


def test_count_only_counts_lines_of_batches_and_restores(netpair, faults):
    env = faults.env(netpair.env, netpair.left.name)
    batch = HTB_BATCH.replace("DEV", netpair.dev)

    faults.arm(None)
    result = run(netpair, env, "tc", "-batch", "-", stdin=batch)
    assert result.returncode == 0, result.stderr
    assert faults.steps == 3 and not faults.fired
    assert set(netpair.classes()) == {"1:1", "1:2"}  # the real tc ran all of it
    assert [line.split("\t")[2] for line in faults.log] == batch.splitlines()

    # A batch's show lines are reads: no steps, and they pass through.
    shows = f"class show dev {netpair.dev} parent 1:\nqdisc show dev {netpair.dev}\n"
    faults.arm(1)
    result = run(netpair, env, "tc", "-batch", "-", stdin=shows + f"class del dev {netpair.dev} classid 1:2\n")
    assert result.returncode == 1 and result.stderr.endswith("Command failed -:3\n"), result.stderr
    assert "class htb 1:2 " in result.stdout and faults.steps == 1
    # Blank lines and comments are no steps.
    assert counted(netpair, faults, env, "ipset", "restore", stdin="# sets\n\n" + SET_LINES) == 3
    assert "198.18.6.0/24" in netpair.left.run("ipset", "list", "sk-fake").stdout
    # A whole iptables-restore is one step: it is one transaction.
    assert counted(netpair, faults, env, "iptables-restore", "--noflush", stdin=MANGLE) == 1
    assert "-A POSTROUTING -j SK-FAKE" in netpair.save()
    assert counted(netpair, faults, env, "ip6tables-restore", "--noflush", stdin=MANGLE) == 1
    assert "-A POSTROUTING -j SK-FAKE" in netpair.save("ip6tables-save")


def test_reads_pass_through_uncounted_and_writes_count_one_each(netpair, faults):
    env = faults.env(netpair.env, netpair.left.name)
    dev = netpair.dev
    calls = [  # (argv, steps), in an order the real tools accept
        (("tc", "qdisc", "show", "dev", dev), 0),
        (("tc", "-s", "-d", "class", "show", "dev", dev), 0),
        (("tc", "-j", "filter", "show", "dev", dev), 0),
        (("tc", "q", "a", "dev", dev, "root", "handle", "1:", "htb"), 1),  # iproute2 takes prefixes
        (("tc", "class", "add", "dev", dev, "parent", "1:", "classid", "1:5", "htb", "rate", "1mbit"), 1),
        (("tc", "class", "ls", "dev", dev), 0),
        (("tc", "class", "del", "dev", dev, "classid", "1:5"), 1),
        (("tc", "qdisc", "del", "dev", dev, "root"), 1),
        (("ip", "-j", "link", "show"), 0),
        (("ip", "l"), 0),
        (("ip", "addr", "show", "dev", dev), 0),
        (("ip", "netns", "identify"), 0),
        (("ip", "link", "add", "sk-fake", "type", "ifb"), 1),
        (("ip", "l", "set", "sk-fake", "up"), 1),
        (("ip", "link", "del", "sk-fake"), 1),
        (("ip", "addr", "add", "198.18.9.9/32", "dev", dev), 1),
        (("ip", "a", "del", "198.18.9.9/32", "dev", dev), 1),
        (("ipset", "create", "sk-fake", "hash:net"), 1),
        (("ipset", "-exist", "add", "sk-fake", "198.18.7.0/24"), 1),
        (("ipset", "test", "sk-fake", "198.18.7.1"), 0),
        (("ipset", "list", "-n"), 0),
        (("ipset", "-n", "list"), 0),
        (("ipset", "save"), 0),
        (("ipset", "del", "sk-fake", "198.18.7.0/24"), 1),
        (("ipset", "destroy", "sk-fake"), 1),
    ]
    for argv, steps in calls:
        faults.arm(None)
        result = run(netpair, env, *argv)
        assert result.returncode == 0, f"{argv}: {result.stderr}"
        assert faults.steps == steps, argv
    assert counted(netpair, faults, env, "iptables-restore", "--test", stdin=MANGLE) == 0
    assert "SK-FAKE" not in netpair.save()


@pytest.mark.parametrize(("batch", "line"), [(HTB_BATCH, 2), (HTB_BATCH.replace("\n", "\n\n# the classes\n", 1), 4)])
def test_a_fault_in_a_tc_batch_runs_the_lines_before_it(netpair, faults, batch, line):
    env = faults.env(netpair.env, netpair.left.name)
    faults.arm(2)
    result = run(netpair, env, "tc", "-batch", "-", stdin=batch.replace("DEV", netpair.dev))
    assert result.returncode == 1
    assert result.stderr.endswith(f"Command failed -:{line}\n"), result.stderr  # numbered as tc numbers lines
    assert "RTNETLINK answers: Operation not permitted" in result.stderr
    assert faults.fired and faults.steps == 2
    assert [q["kind"] for q in netpair.qdiscs() if q.get("root")] == ["htb"]  # line 1 ran
    assert netpair.classes() == {}  # line 2 failed, line 3 never ran


def test_the_real_tc_batch_fails_the_same_way(netpair):
    """What the fake mimics: the real `tc -batch` stops at the failed line, names it and exits 1."""
    batch = "qdisc add dev DEV root handle 1: htb\nclass add dev DEV parent 7: classid 7:1 htb rate 1mbit\n"
    result = netpair.left.run("tc", "-batch", "-", stdin=batch.replace("DEV", netpair.dev), check=False)
    assert result.returncode == 1
    assert TC_BATCH_FAILED.search(result.stderr).group(1) == "2"


def test_a_fault_in_ipset_restore_runs_the_lines_before_it(netpair, faults):
    env = faults.env(netpair.env, netpair.left.name)
    faults.arm(2)
    result = run(netpair, env, "ipset", "restore", stdin=SET_LINES)
    assert result.returncode == 1
    assert IPSET_RESTORE_FAILED.match(result.stderr.strip()).group(2) == "2", result.stderr
    assert result.stderr.strip().endswith(": Error in line 2: Injected fault")
    assert faults.fired and faults.steps == 2
    listed = netpair.left.run("ipset", "list", "sk-fake").stdout  # line 1 ran: the set is there, empty
    assert "Members:\n" in listed and "198.18." not in listed

    # The real ipset's own failure has the same shape and status.
    real = netpair.left.run(
        "ipset", "restore", stdin="add sk-fake 198.18.5.0/24\nadd sk-fake 198.18.5.0/24\n", check=False
    )
    assert real.returncode == 1
    assert IPSET_RESTORE_FAILED.match(real.stderr.strip()).group(2) == "2", real.stderr


def test_a_fault_in_iptables_restore_runs_nothing(netpair, faults):
    env = faults.env(netpair.env, netpair.left.name)
    before = kernel_state(netpair, [netpair.dev])
    faults.arm(1)
    result = run(netpair, env, "iptables-restore", "--noflush", stdin=MANGLE)
    assert result.returncode == 1
    assert RESTORE_FAILED.match(result.stderr.strip()).group(1) == "3", result.stderr
    assert faults.fired and faults.steps == 1
    assert kernel_state(netpair, [netpair.dev]) == before, state_diff(before, kernel_state(netpair, [netpair.dev]))

    # The real (nft) iptables-restore's failure in the kernel: same shape, exit 1, nothing applied.
    bad = MANGLE.replace("-A POSTROUTING -j SK-FAKE", "-A NO-SUCH-CHAIN -j RETURN")
    real = netpair.left.run("ip6tables-restore", "--noflush", stdin=bad, check=False)
    assert real.returncode == 1
    assert RESTORE_FAILED.match(real.stderr.strip()), real.stderr
    assert kernel_state(netpair, [netpair.dev]) == before


@pytest.mark.parametrize(
    ("argv", "status", "error"),
    [
        (("tc", "qdisc", "add", "dev", "DEV", "root", "handle", "1:", "htb"), 2, "RTNETLINK answers: "),
        (("ip", "link", "add", "sk-fake", "type", "ifb"), 2, "RTNETLINK answers: "),
        (("ipset", "create", "sk-fake", "hash:net"), 1, "ipset v"),
    ],
)
def test_a_faulty_single_command_runs_nothing(netpair, faults, argv, status, error):
    env = faults.env(netpair.env, netpair.left.name)
    before = kernel_state(netpair, [netpair.dev])
    faults.arm(1)
    result = run(netpair, env, *(arg.replace("DEV", netpair.dev) for arg in argv))
    assert (result.returncode, result.stderr.startswith(error)) == (status, True), result.stderr
    assert faults.fired and faults.steps == 1
    assert kernel_state(netpair, [netpair.dev]) == before


def test_calls_in_other_namespaces_are_neither_counted_nor_failed(netpair, faults):
    env = faults.env(netpair.env, netpair.left.name)
    batch = HTB_BATCH.replace("DEV", "lo")
    faults.arm(1)
    # shapekit's probes: a throwaway namespace made from the counted one.
    result = run(netpair, env, "unshare", "--net", "tc", "-batch", "-", stdin=batch)
    assert result.returncode == 0, result.stderr
    result = run(netpair, env, "unshare", "--net", "sh", "-c", "ipset restore && ipset list -n", stdin=SET_LINES)
    assert result.returncode == 0 and result.stdout.strip() == "sk-fake", result.stderr
    # The other end of the pair.
    right = HTB_BATCH.replace("DEV", netpair.right.dev)
    assert run(netpair, env, "tc", "-batch", "-", stdin=right, ns=netpair.right.name).returncode == 0
    assert faults.steps == 0 and not faults.fired
    assert netpair.left.run("ipset", "list", "-n").stdout == ""

    # iproute2's -netns NAME acts in NAME: counted when NAME is the counted namespace, from anywhere.
    argv = ("tc", "-n", netpair.left.name, "qdisc", "add", "dev", netpair.dev, "root", "handle", "1:", "htb")
    result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
    assert (result.returncode, faults.steps, faults.fired) == (2, 1, True), result.stderr
    assert netpair.qdiscs()[0]["kind"] != "htb"


def test_after_the_fault_fired_later_calls_pass_through(netpair, faults):
    env = faults.env(netpair.env, netpair.left.name)
    add_root = ("tc", "qdisc", "add", "dev", netpair.dev, "root", "handle", "1:", "htb")
    faults.arm(1)
    assert run(netpair, env, *add_root).returncode == 2
    assert run(netpair, env, *add_root).returncode == 0  # the same step again: it fired once already
    result = run(
        netpair, env, "tc", "-batch", "-", stdin="\n".join(HTB_BATCH.replace("DEV", netpair.dev).splitlines()[1:])
    )
    assert result.returncode == 0, result.stderr
    assert set(netpair.classes()) == {"1:1", "1:2"}
    assert faults.steps == 4 and faults.fired
    assert [line.split("\t")[0] for line in faults.log] == ["1", "2", "3", "4"]
    assert faults.log[0].split("\t")[1] == "FAULT tc"

    faults.arm(None)  # re-armed without a fault: nothing fails, counting restarts
    assert run(netpair, env, "tc", "class", "del", "dev", netpair.dev, "classid", "1:2").returncode == 0
    assert (faults.steps, faults.fired) == (1, False)
