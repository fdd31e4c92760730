"""shape-init --all: the boot sequence (trees, bypass, marks, caps) in one process."""

from __future__ import annotations

import json

import pytest
from paths import HOLD_GSO, READ_GSO

from shapekit.commands.init import init_app
from shapekit.errors import CommandFailed

SMALL = """
[device.eth0]
rate = "100mbit"
default = "bulk"
leaf = "pfifo"
classifier = "classify"

[device.eth0.classes.bulk]
rate = "2mbit"

[device.eth0.limits]
"198.18.0.2" = "1mbit"

[bypass]
ports = ["22/tcp"]

[[mark]]
class = "bulk"
proto = "udp"
dport = 53
"""
TREE = """\
qdisc add dev eth0 root handle 5c: htb default 10
class add dev eth0 parent 5c: classid 5c:1 htb rate 100mbit ceil 100mbit quantum 198412
class add dev eth0 parent 5c:1 classid 5c:2 htb rate 100mbit ceil 100mbit quantum 198412
qdisc add dev eth0 parent 5c:2 handle 2: pfifo
class add dev eth0 parent 5c:1 classid 5c:10 htb rate 2mbit ceil 100mbit quantum 3968
qdisc add dev eth0 parent 5c:10 handle 10: pfifo
filter add dev eth0 parent 5c: protocol all prio 1 bpf bytecode "6,32 0 0 4294963220,116 0 0 24,21 2 0 0,4 0 0 6062080,22 0 0 0,6 0 0 0"
class add dev eth0 parent 5c:1 classid 5c:8001 htb rate 100mbit ceil 100mbit quantum 198412
qdisc add dev eth0 parent 5c:8001 handle 8001: htb
class add dev eth0 parent 8001: classid 8001:1 htb rate 1mbit ceil 1mbit quantum 1984
qdisc add dev eth0 parent 8001:1 handle 8100: pfifo
"""
# No sets yet: both made, filled aside and swapped in; the entry names the cap's class and its group's mark bits.
SETS = """\
create SHAPEKIT-eth0-4 hash:net family inet skbinfo timeout 0 maxelem 131072 -exist
create SHAPEKIT-eth0-4~ hash:net family inet skbinfo timeout 0 maxelem 131072 -exist
flush SHAPEKIT-eth0-4~
add SHAPEKIT-eth0-4~ 198.18.0.2/32 skbprio 8001:1 skbmark 0x1000000/0xff000000
create SHAPEKIT-eth0-6 hash:net family inet6 skbinfo timeout 0 maxelem 131072 -exist
create SHAPEKIT-eth0-6~ hash:net family inet6 skbinfo timeout 0 maxelem 131072 -exist
flush SHAPEKIT-eth0-6~
swap SHAPEKIT-eth0-4~ SHAPEKIT-eth0-4
swap SHAPEKIT-eth0-6~ SHAPEKIT-eth0-6
destroy SHAPEKIT-eth0-4~
destroy SHAPEKIT-eth0-6~
"""
# What shape-bypass, shape-mark and shape-limit-ip leave, in one restore.
CHAINS_V4 = """\
*mangle
:SHAPEKIT - [0:0]
:SHAPEKIT-DECIDE - [0:0]
:SHAPEKIT-BYPASS - [0:0]
:SHAPEKIT-CLASSIFY - [0:0]
:SHAPEKIT-MARK - [0:0]
:SHAPEKIT-CONN-6029328 - [0:0]
:SHAPEKIT-LIMIT - [0:0]
-A SHAPEKIT -j SHAPEKIT-DECIDE
-A SHAPEKIT -j SHAPEKIT-CLASSIFY
-A SHAPEKIT -j SHAPEKIT-LIMIT
-A SHAPEKIT-DECIDE -j SHAPEKIT-BYPASS
-A SHAPEKIT-DECIDE -m mark --mark 1001 -j RETURN
-A SHAPEKIT-DECIDE -m connmark ! --mark 0 -j CONNMARK --restore-mark
-A SHAPEKIT-DECIDE -m connmark ! --mark 0 -j RETURN
-A SHAPEKIT-DECIDE -j SHAPEKIT-MARK
-A SHAPEKIT-BYPASS -p tcp -m multiport --ports 22 -j MARK --set-mark 1001
-A SHAPEKIT-CLASSIFY -o eth0 -m mark --mark 1001 -j CLASSIFY --set-class 5c:2
-A SHAPEKIT-CLASSIFY -o eth0 -m mark --mark 6029328 -j CLASSIFY --set-class 5c:10
-A SHAPEKIT-MARK -p udp -m udp --dport 53 -m comment --comment "mark[1] bulk" -g SHAPEKIT-CONN-6029328
-A SHAPEKIT-CONN-6029328 -j MARK --set-mark 6029328
-A SHAPEKIT-CONN-6029328 -m conntrack ! --ctstate RELATED -j CONNMARK --save-mark
-A SHAPEKIT-LIMIT -o eth0 -j SET --map-set SHAPEKIT-eth0-4 dst --map-prio --map-mark
-A POSTROUTING -j SHAPEKIT
COMMIT
"""
CHAINS_V6 = CHAINS_V4.replace("SHAPEKIT-eth0-4", "SHAPEKIT-eth0-6")
# The rules shape-mark would probe: the same chains without SHAPEKIT-LIMIT's rule (its set is not there).
PROBED_V4 = CHAINS_V4.replace(
    "-A SHAPEKIT-LIMIT -o eth0 -j SET --map-set SHAPEKIT-eth0-4 dst --map-prio --map-mark\n", ""
)
CAP_PROBE = (
    "unshare", "--net", "--", "sh", "-c",
    "ipset create probe hash:net family inet skbinfo timeout 0 && "
    "printf '*mangle\\n-A POSTROUTING -o lo -j SET --map-set probe dst --map-prio\\nCOMMIT\\n' | iptables-restore --noflush",
)  # fmt: skip
TC_PROBE = ("unshare", "--net", "--", "tc", "-batch", "-")
V4, V6 = ("iptables-restore", "--noflush"), ("ip6tables-restore", "--noflush")


@pytest.fixture
def small(write_config):
    return str(write_config(SMALL))


def test_all_checks_everything_then_builds_the_tree_the_sets_and_every_chain_once(system, cli, small, tmp_path):
    result = cli(init_app, "--all", "--config", small)

    assert result.exit_code == 0, result.stderr
    calls = system.calls
    assert [argv for argv, _ in calls] == [
        TC_PROBE,  # the kernel has HTB, the bpf classifier, then pfifo (shape-init's checks)
        TC_PROBE,
        TC_PROBE,
        CAP_PROBE,  # sets with skbinfo and the SET target (shape-limit-ip's)
        ("unshare", "--net", "--", *V4),  # the rules load here (shape-mark's)
        ("unshare", "--net", "--", *V6),
        ("ip", "-j", "link", "show", "type", "ifb"),
        ("tc", "-j", "qdisc", "show", "dev", "eth0"),
        READ_GSO,
        ("tc", "-batch", "-"),  # the tree with the cap's group and class
        HOLD_GSO,
        ("ipset", "list", "-n"),
        ("ipset", "restore"),
        ("iptables-save", "-t", "mangle"),
        ("ip6tables-save", "-t", "mangle"),
        V4,  # bypass, marks and caps: one restore per family instead of three
        V6,
    ]
    assert calls[4][1] == PROBED_V4
    assert [stdin for _, stdin in calls[9:10] + calls[12:13] + calls[15:]] == [TREE, SETS, CHAINS_V4, CHAINS_V6]
    assert json.loads((tmp_path / "state" / "limits.json").read_text()) == {"caps": []}


def test_all_keeps_run_time_caps_and_bypass_entries(system, cli, small, tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    (state / "bypass.json").write_text(json.dumps({"ports": ["8080/tcp"], "hosts": []}))
    (state / "limits.json").write_text(
        json.dumps({"caps": [{"host": "198.18.0.9/32", "rate": "3mbit", "dev": "eth0", "comment": "incident"}]})
    )

    result = cli(init_app, "--all", "--config", small)

    assert result.exit_code == 0, result.stderr
    batch, sets, v4 = (
        stdin for argv, stdin in system.calls if argv in (("tc", "-batch", "-"), ("ipset", "restore"), V4)
    )
    assert "class add dev eth0 parent 8001: classid 8001:2 htb rate 3mbit ceil 3mbit quantum 5952\n" in batch
    assert "add SHAPEKIT-eth0-4~ 198.18.0.9/32 skbprio 8001:2 skbmark 0x1000000/0xff000000\n" in sets
    assert "-A SHAPEKIT-BYPASS -p tcp -m multiport --ports 22,8080 -j MARK --set-mark 1001\n" in v4
    saved = json.loads((state / "limits.json").read_text())["caps"]
    assert [(c["host"], c["slot"], c["comment"]) for c in saved] == [("198.18.0.9/32", 1, "incident")]


@pytest.mark.parametrize(
    ("option", "why"),
    [
        (("--dev", "eth0"), "--all and --dev do not go together: it builds every device (for one device: shape-init --dev DEV)"),
        (("--check",), "--all and --check do not go together: --check alone compares all that --all installs"),
        (("--skip-unknown",), "--all and --skip-unknown do not go together: it goes with --dev"),
    ],
)  # fmt: skip
def test_all_refuses_options_that_narrow_it_in_one_line(system, cli, small, option, why):
    result = cli(init_app, "--all", *option, "--config", small)

    assert result.exit_code == 2
    assert result.stderr == f"shape-init: {why}\n"
    assert system.calls == []


def test_a_rule_this_machine_cannot_load_is_refused_before_any_tree_is_built(system, cli, small):
    def no_multiport(argv, stdin):
        if argv[:3] == ("unshare", "--net", "--") and argv[3:] == V4:
            raise CommandFailed(
                " ".join(argv),
                "iptables-restore v1.8.9 (nf_tables): Couldn't load match `multiport'\nError occurred at line: 17\n",
            )

    system.hooks.append(no_multiport)

    result = cli(init_app, "--all", "--config", small)

    assert result.exit_code == 2
    assert "iptables-restore cannot load shapekit's rules here" in result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert ("tc", "-batch", "-") not in [argv for argv, _ in system.calls]


def test_a_failed_ip6tables_restore_puts_back_the_v4_rules_and_the_sets_and_keeps_the_tree(system, cli, small):
    def fail_v6(argv, stdin):
        if argv == V6:
            raise CommandFailed("ip6tables-restore --noflush", "ip6tables-restore: line 3 failed\n")

    system.hooks.append(fail_v6)

    result = cli(init_app, "--all", "--config", small)

    assert result.exit_code == 1
    assert result.stderr.startswith(
        "shape-init: `ip6tables-restore --noflush` failed: ip6tables-restore: line 3 failed"
    )
    assert "put back as before: eth0's cap sets, the IPv4 rules" in result.stderr
    assert len(result.stderr.splitlines()) == 1
    after = [(argv, stdin) for argv, stdin in system.calls][17:]
    assert after[0][0] == V4 and "-D POSTROUTING -j SHAPEKIT" in after[0][1]  # the v4 chains undone first
    assert after[1][0] == ("ipset", "list", "-n")  # then the sets as they were (none): those there now go
    assert [argv for argv, _ in system.calls].count(("tc", "-batch", "-")) == 1  # the tree stays, as after shape-init
