"""shape-limit-ip: the exact commands, with every process mocked."""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import replace

import pytest
from paths import HOLD_GSO, INCIDENT_CONFIG, READ_GSO

from shapekit.commands.init import init_app
from shapekit.commands.limit_ip import limit_ip_app
from shapekit.config.rules import Cap
from shapekit.errors import CommandFailed, UsageError
from shapekit.kernel import probe, read, run
from shapekit.plan.limits import PlacedCap, with_slot
from shapekit.state import SavedCaps, load_caps, save_caps

NOW = 1_800_000_000.0
READ_ROOT = ("tc", "-j", "qdisc", "show", "dev", "eth0")
GROUP_FILTER = ("tc", "filter", "show", "dev", "eth0", "parent", "5c:", "prio", "1")  # built with cap groups?
CLASSES = ("tc", "class", "show", "dev", "eth0")
BATCH = ("tc", "-batch", "-")
IPSET = ("ipset", "restore")
V4, V6 = ("iptables-restore", "--noflush"), ("ip6tables-restore", "--noflush")
CAP_PROBE = ("unshare", "--net", "--", "sh", "-c", probe._CAP_PROBE)
SHAPEKIT_ROOT = {"kind": "htb", "handle": "5c:", "root": True}
ADDRESSES = [
    {"ifname": "lo", "addr_info": [{"family": "inet", "local": "127.0.0.1"}, {"family": "inet6", "local": "::1"}]},
    {"ifname": "eth0", "addr_info": [{"family": "inet", "local": "203.0.113.1"}]},
]

# Seed 002's three hosts: a class each (seed: 1:1, 1:2, 1:3 with fw marks 1-3), now in the first cap group:
# the class 5c:8001 at the line rate under the top class, holding an HTB qdisc 8001: with a class per cap.
GROUP_1 = """\
class add dev eth0 parent 5c:1 classid 5c:8001 htb rate 100mbit ceil 100mbit quantum 198412
qdisc add dev eth0 parent 5c:8001 handle 8001: htb
"""
SEED_002_CLASSES = (
    GROUP_1
    + """\
class add dev eth0 parent 8001: classid 8001:1 htb rate 128kbit ceil 128kbit quantum 1514
qdisc add dev eth0 parent 8001:1 handle 8100: sfq perturb 10
class add dev eth0 parent 8001: classid 8001:2 htb rate 512kbit ceil 512kbit quantum 1514
qdisc add dev eth0 parent 8001:2 handle 8101: sfq perturb 10
class add dev eth0 parent 8001: classid 8001:3 htb rate 32kbit ceil 32kbit quantum 1514
qdisc add dev eth0 parent 8001:3 handle 8102: sfq perturb 10
"""
)
# `tc class show` of that tree: the group and its caps (a class of the group's qdisc shows as root).
SEED_002_SHOWN = (
    "class htb 5c:1 root rate 100Mbit ceil 100Mbit burst 1600b cburst 1600b \n"
    "class htb 5c:8001 parent 5c:1 leaf 8001: prio 0 rate 100Mbit ceil 100Mbit burst 1600b cburst 1600b \n"
    "class htb 8001:1 root leaf 8100: prio 0 rate 128Kbit ceil 128Kbit burst 1600b cburst 1600b \n"
    "class htb 8001:2 root leaf 8101: prio 0 rate 512Kbit ceil 512Kbit burst 1600b cburst 1600b \n"
    "class htb 8001:3 root leaf 8102: prio 0 rate 32Kbit ceil 32Kbit burst 1600b cburst 1600b \n"
)
MARK_1 = "skbmark 0x1000000/0xff000000"  # group 1 in the mark's top byte, for the root's bpf filter
# ...and instead of one CONNMARK rule per host, an ipset entry each (its class, its group's mark): both
# families filled aside, then swapped in; the sets are there (booted), so only the scratch sets are created.
CREATE_4 = "create SHAPEKIT-eth0-4 hash:net family inet skbinfo timeout 0 maxelem 131072 -exist\n"
CREATE_6 = "create SHAPEKIT-eth0-6 hash:net family inet6 skbinfo timeout 0 maxelem 131072 -exist\n"
SEED_002_SETS = f"""\
create SHAPEKIT-eth0-4~ hash:net family inet skbinfo timeout 0 maxelem 131072 -exist
flush SHAPEKIT-eth0-4~
add SHAPEKIT-eth0-4~ 198.18.0.101/32 skbprio 8001:1 {MARK_1}
add SHAPEKIT-eth0-4~ 198.18.0.102/32 skbprio 8001:2 {MARK_1}
add SHAPEKIT-eth0-4~ 198.18.0.103/32 skbprio 8001:3 {MARK_1}
create SHAPEKIT-eth0-6~ hash:net family inet6 skbinfo timeout 0 maxelem 131072 -exist
flush SHAPEKIT-eth0-6~
swap SHAPEKIT-eth0-4~ SHAPEKIT-eth0-4
swap SHAPEKIT-eth0-6~ SHAPEKIT-eth0-6
destroy SHAPEKIT-eth0-4~
destroy SHAPEKIT-eth0-6~
"""
# ...and one rule per device and family that reads the class and the group's mark from the set.
LIMIT_V4 = """\
*mangle
:SHAPEKIT - [0:0]
:SHAPEKIT-DECIDE - [0:0]
:SHAPEKIT-BYPASS - [0:0]
:SHAPEKIT-LIMIT - [0:0]
:SHAPEKIT-MARK - [0:0]
-A SHAPEKIT -j SHAPEKIT-DECIDE
-A SHAPEKIT -j SHAPEKIT-LIMIT
-A SHAPEKIT-DECIDE -j SHAPEKIT-BYPASS
-A SHAPEKIT-DECIDE -m mark --mark 1001 -j RETURN
-A SHAPEKIT-DECIDE -m connmark ! --mark 0 -j CONNMARK --restore-mark
-A SHAPEKIT-DECIDE -m connmark ! --mark 0 -j RETURN
-A SHAPEKIT-DECIDE -j SHAPEKIT-MARK
-A SHAPEKIT-LIMIT -o eth0 -j SET --map-set SHAPEKIT-eth0-4 dst --map-prio --map-mark
-A POSTROUTING -j SHAPEKIT
COMMIT
"""


@pytest.fixture
def booted(system, mocker):
    """eth0 has shapekit's tree and its cap sets; the clock stands at NOW."""
    mocker.patch("time.time", return_value=NOW)
    system.roots["eth0"] = SHAPEKIT_ROOT
    system.answers[("ipset", "list", "-n")] = "SHAPEKIT-eth0-4\nSHAPEKIT-eth0-6\n"
    system.answers[("ip", "-j", "addr", "show")] = json.dumps(ADDRESSES)
    return system


def state(tmp_path) -> list[dict]:
    return json.loads((tmp_path / "state" / "limits.json").read_text())["caps"]


def test_seed_002_caps_install_as_classes_sets_and_one_rule(booted, cli):
    result = cli(limit_ip_app, "--config", str(INCIDENT_CONFIG))

    assert result.exit_code == 0, result.stderr
    assert booted.calls == [
        (CAP_PROBE, ""),  # a set with skbinfo and the SET target, tried in a throwaway namespace
        (READ_ROOT, None),
        (GROUP_FILTER, None),  # the tree has the root filter that finds cap groups
        (("ipset", "list", "-t"), None),  # and no cap set made before them
        (READ_ROOT, None),  # the tree's HTB qdiscs, whose classes are read a qdisc at a time
        (BATCH, "class show dev eth0 parent 5c:\n"),
        (("ipset", "list", "-n"), None),  # the sets as they were, to put back if a later step fails
        (("ipset", "save", "SHAPEKIT-eth0-4"), None),
        (("ipset", "save", "SHAPEKIT-eth0-6"), None),
        (BATCH, SEED_002_CLASSES),
        (IPSET, SEED_002_SETS),
        (("iptables-save", "-t", "mangle"), None),
        (("ip6tables-save", "-t", "mangle"), None),
        (V4, LIMIT_V4),
        (V6, LIMIT_V4.replace("SHAPEKIT-eth0-4", "SHAPEKIT-eth0-6")),
    ]


def test_installing_again_touches_only_classes_that_differ(booted, cli):
    booted.answers[CLASSES] = SEED_002_SHOWN.replace("rate 512Kbit ceil 512Kbit", "rate 1Mbit ceil 1Mbit") + (
        "class htb 8001:8 root leaf 8107: prio 0 rate 5Mbit ceil 5Mbit burst 1600b cburst 1600b \n"
    )

    cli(limit_ip_app, "--config", str(INCIDENT_CONFIG))

    assert (
        booted.batches()
        == [
            "class change dev eth0 parent 8001: classid 8001:2 htb rate 512kbit ceil 512kbit quantum 1514\n",  # 1mbit → 512kbit
            "class del dev eth0 classid 8001:8\n",  # a cap that is gone: once the sets no longer point to it; its group stays
        ]
    )


def test_installing_drops_a_group_once_its_last_cap_is_gone(booted, cli):
    booted.answers[CLASSES] = SEED_002_SHOWN + (  # a cap in group 2 (slot 512) and one in group 1 (slot 7), both stale
        "class htb 5c:8002 parent 5c:1 leaf 8002: prio 0 rate 100Mbit ceil 100Mbit burst 1600b cburst 1600b \n"
        "class htb 8002:1 root leaf 8300: prio 0 rate 5Mbit ceil 5Mbit burst 1600b cburst 1600b \n"
        "class htb 8001:8 root leaf 8107: prio 0 rate 5Mbit ceil 5Mbit burst 1600b cburst 1600b \n"
    )

    cli(limit_ip_app, "--config", str(INCIDENT_CONFIG))

    assert booted.batches() == [  # caps newest first, then the group that held the one gone
        "class del dev eth0 classid 8002:1\nclass del dev eth0 classid 8001:8\nclass del dev eth0 classid 5c:8002\n"
    ]


def test_add_touches_only_that_hosts_class_and_entry(booted, cli, tmp_path):
    booted.answers[CLASSES] = SEED_002_SHOWN
    result = cli(limit_ip_app, "add", "198.51.100.7", "128kbit", "--config", str(INCIDENT_CONFIG), "--comment", "imap")

    assert result.exit_code == 0, result.stderr
    assert booted.calls == [
        (("ip", "-j", "addr", "show"), None),
        (GROUP_FILTER, None),
        (("ipset", "list", "-t"), None),
        (("ipset", "list", "-n"), None),
        (  # the fourth cap: slot 3, in group 1 (there already, with the config's caps)
            BATCH,
            "class add dev eth0 parent 8001: classid 8001:4 htb rate 128kbit ceil 128kbit quantum 1514\n"
            "qdisc add dev eth0 parent 8001:4 handle 8103: sfq perturb 10\n",
        ),
        (
            IPSET,
            CREATE_4
            + f"add SHAPEKIT-eth0-4 198.51.100.7/32 skbprio 8001:4 {MARK_1} -exist\n",  # one atomic step, new or changed
        ),
    ]
    assert state(tmp_path) == [
        {
            "host": "198.51.100.7/32",
            "rate": "128kbit",
            "dev": "eth0",
            "expires": None,
            "comment": "imap",
            "slot": 3,
            "direction": "out",
        }
    ]


def test_a_run_time_cap_on_a_line_with_overhead_charges_it_too(booted, cli, write_config):
    text = INCIDENT_CONFIG.read_text().replace(
        "[device.eth0.limits]", 'overhead = 40\nlinklayer = "atm"\n[device.eth0.limits]'
    )

    result = cli(limit_ip_app, "add", "198.51.100.7", "128kbit", "--config", str(write_config(text)))

    assert result.exit_code == 0, result.stderr
    assert booted.batches() == [  # no group there yet: made in the same batch, charged the same
        "class add dev eth0 parent 5c:1 classid 5c:8001 htb rate 100mbit ceil 100mbit quantum 198412"
        " overhead 40 linklayer atm\n"
        "qdisc add dev eth0 parent 5c:8001 handle 8001: htb\n"
        "class add dev eth0 parent 8001: classid 8001:4 htb rate 128kbit ceil 128kbit quantum 1514"
        " overhead 40 linklayer atm\n"
        "qdisc add dev eth0 parent 8001:4 handle 8103: sfq perturb 10\n"
    ]


def test_a_run_time_cap_given_a_new_rate_keeps_its_class(booted, cli, tmp_path):
    config = str(INCIDENT_CONFIG)
    cli(limit_ip_app, "add", "198.51.100.1", "1mbit", "--config", config)  # 8001:4
    cli(limit_ip_app, "add", "198.51.100.2", "2mbit", "--config", config)  # 8001:5
    cli(limit_ip_app, "remove", "198.51.100.1", "--config", config)  # 8001:4 is free again
    booted.answers[CLASSES] = SEED_002_SHOWN + "class htb 8001:5 root leaf 8104: prio 0 rate 2Mbit ceil 2Mbit\n"
    booted.run.reset_mock()

    cli(limit_ip_app, "add", "198.51.100.2", "3mbit", "--config", config)

    assert booted.batches() == [
        "class change dev eth0 parent 8001: classid 8001:5 htb rate 3mbit ceil 3mbit quantum 5952\n"
    ]


def test_a_lapsed_caps_class_keeps_its_place_until_a_full_install(booted, cli, mocker, tmp_path):
    config = str(INCIDENT_CONFIG)
    cli(limit_ip_app, "add", "198.51.100.8", "1mbit", "--for", "10s", "--config", config)  # slot 3: 8001:4
    mocker.patch("time.time", return_value=NOW + 60)
    booted.run.reset_mock()

    cli(limit_ip_app, "add", "198.51.100.9", "1mbit", "--config", config)

    assert "classid 8001:5 " in booted.batches()[0]  # not 8001:4: its class is still there
    assert [(c["host"], c["slot"]) for c in state(tmp_path)] == [
        ("198.51.100.8/32", 3),
        ("198.51.100.9/32", 4),
    ]


def test_add_again_changes_the_rate_in_place(booted, cli, tmp_path):
    cli(limit_ip_app, "add", "198.51.100.7", "128kbit", "--config", str(INCIDENT_CONFIG))
    cli(limit_ip_app, "add", "198.51.100.9", "1mbit", "--config", str(INCIDENT_CONFIG))
    booted.answers[CLASSES] = SEED_002_SHOWN + (
        "class htb 8001:4 root leaf 8103: prio 0 rate 128Kbit ceil 128Kbit\n"
        "class htb 8001:5 root leaf 8104: prio 0 rate 1Mbit ceil 1Mbit\n"
    )
    booted.run.reset_mock()

    cli(limit_ip_app, "--config", str(INCIDENT_CONFIG), "add", "198.51.100.7", "64kbit")

    assert booted.batches() == [
        "class change dev eth0 parent 8001: classid 8001:4 htb rate 64kbit ceil 64kbit quantum 1514\n"
    ]
    assert [(c["host"], c["rate"], c["slot"]) for c in state(tmp_path)] == [  # in its place in the file
        ("198.51.100.7/32", "64kbit", 3),
        ("198.51.100.9/32", "1mbit", 4),
    ]


def test_add_for_a_while_is_an_ipset_timeout(booted, cli, tmp_path):
    result = cli(limit_ip_app, "add", "2001:db8::7", "1mbit", "--for", "1h30m", "--config", str(INCIDENT_CONFIG))

    assert result.exit_code == 0, result.stderr
    ipset = [text for argv, text in booted.calls if argv == IPSET][0]
    assert ipset.endswith(f"add SHAPEKIT-eth0-6 2001:db8::7/128 skbprio 8001:4 {MARK_1} timeout 5400 -exist\n")
    assert state(tmp_path)[0]["expires"] == NOW + 5400


def test_a_run_time_cap_on_a_config_host_takes_its_class(booted, cli):
    booted.answers[CLASSES] = SEED_002_SHOWN

    cli(limit_ip_app, "add", "198.18.0.102", "64kbit", "--config", str(INCIDENT_CONFIG))

    assert booted.batches() == [
        "class change dev eth0 parent 8001: classid 8001:2 htb rate 64kbit ceil 64kbit quantum 1514\n"
    ]


def test_remove_lifts_the_cap(booted, cli, tmp_path):
    cli(limit_ip_app, "add", "198.51.100.7", "128kbit", "--config", str(INCIDENT_CONFIG))
    booted.run.reset_mock()

    booted.answers[CLASSES] = SEED_002_SHOWN + "class htb 8001:4 root leaf 8103: prio 0 rate 128Kbit ceil 128Kbit\n"

    result = cli(limit_ip_app, "remove", "198.51.100.7", "--config", str(INCIDENT_CONFIG))

    assert result.exit_code == 0, result.stderr
    assert [(argv, text) for argv, text in booted.calls if argv in (BATCH, IPSET)] == [
        (  # traffic first (the set made if a flush took it), then the class; its group holds the config's caps
            IPSET,
            CREATE_4 + "del SHAPEKIT-eth0-4 198.51.100.7/32 -exist\n",
        ),
        (BATCH, "class del dev eth0 classid 8001:4\n"),
    ]
    assert state(tmp_path) == []


def test_removing_the_last_cap_of_a_group_deletes_the_group_after_it(booted, cli, write_config):
    config = str(write_config('[device.eth0]\nrate = "100mbit"\n'))  # no config caps: group 1 is the run-time caps'
    cli(limit_ip_app, "add", "198.51.100.7", "128kbit", "--config", config)  # slot 0: 8001:1
    cli(limit_ip_app, "add", "198.51.100.8", "128kbit", "--config", config)  # slot 1: 8001:2
    group = "class htb 5c:8001 parent 5c:1 leaf 8001: prio 0 rate 100Mbit ceil 100Mbit\n"
    booted.answers[CLASSES] = group + (
        "class htb 8001:1 root leaf 8100: prio 0 rate 128Kbit ceil 128Kbit\n"
        "class htb 8001:2 root leaf 8101: prio 0 rate 128Kbit ceil 128Kbit\n"
    )
    booted.run.reset_mock()

    assert cli(limit_ip_app, "remove", "198.51.100.7", "--config", config).exit_code == 0
    assert booted.batches() == ["class del dev eth0 classid 8001:1\n"]  # 8001:2 is still in the group

    booted.answers[CLASSES] = group + "class htb 8001:2 root leaf 8101: prio 0 rate 128Kbit ceil 128Kbit\n"
    booted.run.reset_mock()

    assert cli(limit_ip_app, "remove", "198.51.100.8", "--config", config).exit_code == 0
    assert [(argv, text) for argv, text in booted.calls if argv in (BATCH, IPSET)] == [
        (IPSET, CREATE_4 + "del SHAPEKIT-eth0-4 198.51.100.8/32 -exist\n"),
        (BATCH, "class del dev eth0 classid 8001:2\nclass del dev eth0 classid 5c:8001\n"),  # the cap, then its group
    ]


def test_a_lapsed_cap_keeps_its_group_when_the_other_cap_goes(booted, cli, mocker, write_config):
    config = str(write_config('[device.eth0]\nrate = "100mbit"\n'))
    cli(limit_ip_app, "add", "198.51.100.7", "128kbit", "--for", "10s", "--config", config)  # 8001:1
    cli(limit_ip_app, "add", "198.51.100.8", "128kbit", "--config", config)  # 8001:2
    booted.answers[CLASSES] = (
        "class htb 5c:8001 parent 5c:1 leaf 8001: prio 0 rate 100Mbit ceil 100Mbit\n"
        "class htb 8001:1 root leaf 8100: prio 0 rate 128Kbit ceil 128Kbit\n"
        "class htb 8001:2 root leaf 8101: prio 0 rate 128Kbit ceil 128Kbit\n"
    )
    mocker.patch("time.time", return_value=NOW + 60)  # .7's cap lapsed: its class stays until a full install
    booted.run.reset_mock()

    assert cli(limit_ip_app, "remove", "198.51.100.8", "--config", config).exit_code == 0
    assert booted.batches() == ["class del dev eth0 classid 8001:2\n"]


def test_remove_after_a_flush_touches_no_class(booted, cli):
    cli(limit_ip_app, "add", "198.51.100.7", "128kbit", "--config", str(INCIDENT_CONFIG))
    booted.run.reset_mock()  # the tree was rebuilt since: no class 5c:8003

    result = cli(limit_ip_app, "remove", "198.51.100.7", "--config", str(INCIDENT_CONFIG))

    assert result.exit_code == 0, result.stderr
    assert booted.batches() == []


def test_remove_of_an_override_goes_back_to_the_config_cap(booted, cli):
    cli(limit_ip_app, "add", "198.18.0.102", "64kbit", "--config", str(INCIDENT_CONFIG))
    booted.answers[CLASSES] = SEED_002_SHOWN.replace("rate 512Kbit ceil 512Kbit", "rate 64Kbit ceil 64Kbit")
    booted.run.reset_mock()

    cli(limit_ip_app, "remove", "198.18.0.102", "--config", str(INCIDENT_CONFIG))

    assert booted.batches() == [
        "class change dev eth0 parent 8001: classid 8001:2 htb rate 512kbit ceil 512kbit quantum 1514\n"
    ]


def test_list(booted, cli, mocker):
    cli(
        limit_ip_app,
        "add",
        "198.51.100.7",
        "128kbit",
        "--for",
        "2h",
        "--comment",
        "outlook loop",
        "--config",
        str(INCIDENT_CONFIG),
    )
    cli(limit_ip_app, "add", "198.51.100.8", "1mbit", "--for", "10s", "--config", str(INCIDENT_CONFIG))
    mocker.patch("time.time", return_value=NOW + 60)  # the 10s cap has lapsed

    table = cli(limit_ip_app, "list", "--config", str(INCIDENT_CONFIG)).stdout
    rows = json.loads(cli(limit_ip_app, "--config", str(INCIDENT_CONFIG), "list", "--json").stdout)

    assert table.splitlines() == [
        "HOST          RATE     DEV   DIR  SOURCE    EXPIRES                    CLASS   COMMENT",
        "198.18.0.101  128kbit  eth0  out  config    -                          8001:1",
        "198.18.0.102  512kbit  eth0  out  config    -                          8001:2",
        "198.18.0.103  32kbit   eth0  out  config    -                          8001:3",
        "198.51.100.7  128kbit  eth0  out  run-time  2027-01-15T10:00:00+00:00  8001:4  outlook loop",
    ]
    assert rows[3] == {
        "host": "198.51.100.7",
        "rate": "128kbit",
        "dev": "eth0",
        "direction": "out",
        "source": "run-time",
        "expires": "2027-01-15T10:00:00+00:00",
        "comment": "outlook loop",
        "classid": "8001:4",
    }


def test_lapsed_caps_leave_the_state_at_the_next_install(booted, cli, mocker, tmp_path):
    cli(limit_ip_app, "add", "198.51.100.8", "1mbit", "--for", "10s", "--config", str(INCIDENT_CONFIG))
    mocker.patch("time.time", return_value=NOW + 60)

    cli(limit_ip_app, "--config", str(INCIDENT_CONFIG))

    assert state(tmp_path) == []
    assert "198.51.100.8" not in [text for argv, text in booted.calls if argv == IPSET][-1]


def test_init_builds_run_time_caps_into_the_tree(booted, cli):
    cli(limit_ip_app, "add", "198.51.100.7", "128kbit", "--config", str(INCIDENT_CONFIG))
    booted.run.reset_mock()

    cli(init_app, "--config", str(INCIDENT_CONFIG))

    assert booted.batches()[0].endswith(
        'filter add dev eth0 parent 5c: protocol all prio 1 bpf bytecode "6,32 0 0 4294963220,116 0 0 24,21 2 0 0,'
        '4 0 0 6062080,22 0 0 0,6 0 0 0"\n'  # the root's filter that finds a capped host's group, then the caps
        + SEED_002_CLASSES
        + "class add dev eth0 parent 8001: classid 8001:4 htb rate 128kbit ceil 128kbit quantum 1514\n"
        + "qdisc add dev eth0 parent 8001:4 handle 8103: sfq perturb 10\n"
    )


def test_add_before_any_install_installs_everything(booted, cli, tmp_path):
    booted.answers[("ipset", "list", "-n")] = ""

    result = cli(limit_ip_app, "add", "198.51.100.7", "128kbit", "--config", str(INCIDENT_CONFIG))

    assert result.exit_code == 0, result.stderr
    sets = [text for argv, text in booted.calls if argv == IPSET][0]
    assert f"add SHAPEKIT-eth0-4~ 198.51.100.7/32 skbprio 8001:4 {MARK_1}\n" in sets
    assert any(argv == V4 for argv, _ in booted.calls)
    assert state(tmp_path)[0]["slot"] == 3


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["add", "0.0.0.0/0", "1mbit"], "0.0.0.0/0 would cap every host"),
        (["add", "::/0", "1mbit"], "::/0 would cap every host"),
        (["add", "198.51.100.7", "1mbit", "--dev", "eth9"], "--dev eth9: not a device in"),
        (["add", "203.0.113.1", "1mbit"], "holds this machine's own address 203.0.113.1"),
        (["add", "203.0.113.0/24", "1mbit"], "holds this machine's own address"),
        (["add", "::1", "1mbit"], "own address ::1"),
        (["add", "198.51.100.7", "0kbit"], "a rate must be above 0"),
        (["add", "198.51.100.7", "200mbit"], "200mbit is above the device's line rate 100mbit"),
        (["add", "198.51.100.7", "128kb"], "'128kb' is ambiguous"),
        (["add", "198.51.100.300", "1mbit"], "'198.51.100.300' is not an IPv4/IPv6 address"),
        (["add", "mail.example.com", "1mbit"], "is not an IPv4/IPv6 address"),
        (["add", "198.51.100.7", "1mbit", "--for", "soon"], "'soon' is not a duration"),
        (["add", "198.51.100.7", "1mbit", "--for", "0s"], "a duration must be above 0"),
        (["add", "198.51.100.7", "1mbit", "--for", "30d"], "longer than ipset's longest timeout"),
        (["add", "198.18.0.101", "1mbit", "--for", "1h"], "is capped by"),
        (["add", "198.51.100.7", "1mbit", "--dev", "eth1"], "--dev eth1: not a device in"),
        (["remove", "198.18.0.101"], "is capped by"),
        (["remove", "198.51.100.99"], "198.51.100.99/32 is not capped"),
    ],
)
def test_bad_input_changes_nothing(booted, cli, tmp_path, args, message):
    result = cli(limit_ip_app, *args, "--config", str(INCIDENT_CONFIG))

    assert result.exit_code == 2, result.stderr
    assert message in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert [argv for argv, _ in booted.calls if argv in (BATCH, IPSET, V4, V6)] == []
    assert not (tmp_path / "state" / "limits.json").exists()


def test_force_allows_own_addresses_but_never_every_host(booted, cli):
    assert cli(limit_ip_app, "add", "203.0.113.1", "1mbit", "--force", "--config", str(INCIDENT_CONFIG)).exit_code == 0
    every = cli(limit_ip_app, "add", "0.0.0.0/0", "1mbit", "--force", "--config", str(INCIDENT_CONFIG))
    assert every.exit_code == 2 and "lower the device's rate instead" in every.stderr


@pytest.mark.parametrize(
    ("host", "message"),
    [("fe80::1%eth0", "has a scope"), ("::ffff:198.18.3.3", "IPv4 address written as IPv6: write 198.18.3.3")],
)
def test_ipv6_forms_that_cannot_be_capped(booted, cli, host, message):
    result = cli(limit_ip_app, "add", host, "1mbit", "--config", str(INCIDENT_CONFIG))

    assert result.exit_code == 2 and message in result.stderr
    assert booted.batches() == []


def test_a_comment_is_one_line(booted, cli):
    result = cli(limit_ip_app, "add", "198.51.100.7", "1mbit", "--comment", "a\nb", "--config", str(INCIDENT_CONFIG))

    assert result.exit_code == 2 and "--comment must be one line" in result.stderr


@pytest.mark.parametrize("expires", ['"soon"', "1e400", "true"])
def test_a_broken_expiry_in_the_state_file_is_one_line(booted, cli, tmp_path, expires):
    (tmp_path / "state").mkdir()
    cap = '{"host": "198.51.100.7/32", "rate": "1mbit", "dev": "eth0", "expires": ' + expires + ', "slot": 3}'
    (tmp_path / "state" / "limits.json").write_text('{"caps": [' + cap + "]}")
    result = cli(limit_ip_app, "list", "--config", str(INCIDENT_CONFIG))

    assert result.exit_code == 2 and "remove it to start afresh" in result.stderr, result.stderr


def test_a_tree_built_without_cap_groups_is_refused_before_any_change(booted, cli, tmp_path):
    booted.flat.add("eth0")  # shapekit's root, but no group filter: built flat by an older shapekit

    result = cli(limit_ip_app, "add", "198.51.100.7", "1mbit", "--config", str(INCIDENT_CONFIG))

    assert result.exit_code == 2
    assert result.stderr == (
        "shape-limit-ip: eth0's caps were installed by a shapekit without cap groups: run shape-init --dev eth0 "
        "to move them into groups (run-time caps kept), then change caps\n"
    )
    assert booted.calls == [  # queries only
        (("ip", "-j", "addr", "show"), None),
        (GROUP_FILTER, None),
        (READ_ROOT, None),
    ]
    assert not (tmp_path / "state" / "limits.json").exists()


def test_cap_sets_made_before_groups_are_refused_even_under_a_grouped_tree(booted, cli, tmp_path):
    # The tree was gone when shape-init rebuilt it with groups (a flush of that device): the old sets stayed.
    booted.answers[("ipset", "list", "-t")] = (
        "Name: SHAPEKIT-eth0-4\nType: hash:net\nRevision: 7\n"
        "Header: family inet hashsize 1024 maxelem 65536 timeout 0 skbinfo\nSize in memory: 1\n"
    )

    result = cli(limit_ip_app, "add", "198.51.100.7", "1mbit", "--config", str(INCIDENT_CONFIG))

    assert result.exit_code == 2
    assert "eth0's caps were installed by a shapekit without cap groups: run shape-init --dev eth0" in result.stderr
    assert booted.calls == [(("ip", "-j", "addr", "show"), None), (GROUP_FILTER, None), (("ipset", "list", "-t"), None)]
    assert not (tmp_path / "state" / "limits.json").exists()


@pytest.mark.parametrize("args", [[], ["remove", "198.51.100.7"]])
def test_installing_or_removing_on_a_tree_without_cap_groups_is_refused_too(booted, cli, tmp_path, args):
    booted.flat.add("eth0")
    (tmp_path / "state").mkdir()  # a run-time cap saved by the shapekit that built the tree: a class minor
    cap = {"host": "198.51.100.7/32", "rate": "1mbit", "dev": "eth0", "minor": 0x8003}
    (tmp_path / "state" / "limits.json").write_text(json.dumps({"caps": [cap]}))

    result = cli(limit_ip_app, *args, "--config", str(INCIDENT_CONFIG))

    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "eth0's caps were installed by a shapekit without cap groups: run shape-init --dev eth0" in result.stderr
    assert [argv for argv, _ in booted.calls if argv in (BATCH, IPSET, V4, V6)] == []


def test_the_512th_cap_fills_group_1_and_the_513th_makes_group_2(booted, cli, write_config, tmp_path):
    hosts = "".join(f'"10.0.{i // 256}.{i % 256}" = "1mbit"\n' for i in range(511))  # slots 0-510
    config = str(write_config(f'[device.eth0]\nrate = "100mbit"\n[device.eth0.limits]\n{hosts}'))
    booted.answers[CLASSES] = "class htb 5c:8001 parent 5c:1 leaf 8001: prio 0 rate 100Mbit ceil 100Mbit\n"

    assert cli(limit_ip_app, "add", "198.51.100.1", "2mbit", "--config", config).exit_code == 0
    assert cli(limit_ip_app, "add", "198.51.100.2", "2mbit", "--config", config).exit_code == 0

    assert booted.batches() == [
        # the 512th: slot 511, the last class of group 1 (8001:200), its leaf 8100+511
        "class add dev eth0 parent 8001: classid 8001:200 htb rate 2mbit ceil 2mbit quantum 3968\n"
        "qdisc add dev eth0 parent 8001:200 handle 82ff: sfq perturb 10\n",
        # the 513th: slot 512, group 2 made in the same batch, then its first class
        "class add dev eth0 parent 5c:1 classid 5c:8002 htb rate 100mbit ceil 100mbit quantum 198412\n"
        "qdisc add dev eth0 parent 5c:8002 handle 8002: htb\n"
        "class add dev eth0 parent 8002: classid 8002:1 htb rate 2mbit ceil 2mbit quantum 3968\n"
        "qdisc add dev eth0 parent 8002:1 handle 8300: sfq perturb 10\n",
    ]
    assert [text for argv, text in booted.calls if argv == IPSET] == [
        CREATE_4 + f"add SHAPEKIT-eth0-4 198.51.100.1/32 skbprio 8001:200 {MARK_1} -exist\n",
        CREATE_4 + "add SHAPEKIT-eth0-4 198.51.100.2/32 skbprio 8002:1 skbmark 0x2000000/0xff000000 -exist\n",
    ]
    assert [(c["host"], c["slot"]) for c in state(tmp_path)] == [("198.51.100.1/32", 511), ("198.51.100.2/32", 512)]


def test_several_devices_need_dev(booted, cli, write_config):
    config = write_config('[device.eth0]\nrate = "1gbit"\n[device.eth1]\nrate = "1gbit"\n')

    result = cli(limit_ip_app, "add", "198.51.100.7", "1mbit", "--config", str(config))

    assert result.exit_code == 2 and "shapes several devices (eth0, eth1): pass --dev" in result.stderr


def test_a_device_without_shapekits_tree_is_refused(booted, cli):
    booted.roots["eth0"] = {"kind": "fq_codel", "handle": "0:", "root": True}

    def no_parent_class(argv, stdin):
        if argv == BATCH and stdin.startswith("class add"):
            raise CommandFailed("tc -batch -", "Error: Failed to find specified qdisc.\nCommand failed -:1\n")

    booted.hooks.append(no_parent_class)

    result = cli(limit_ip_app, "add", "198.51.100.7", "1mbit", "--config", str(INCIDENT_CONFIG))

    assert result.exit_code == 2 and "eth0 has no shapekit tree to cap hosts in: run shape-init first" in result.stderr


def test_a_machine_without_skbinfo_sets_is_refused_before_any_change(booted, cli, tmp_path):
    def no_skbinfo(argv, stdin):
        if argv == CAP_PROBE:
            raise CommandFailed("unshare", "ipset v7.17: Syntax error: 'skbinfo' is invalid\n")

    booted.hooks.append(no_skbinfo)

    result = cli(limit_ip_app, "--config", str(INCIDENT_CONFIG))

    assert result.exit_code == 2
    assert result.stderr == (
        "shape-limit-ip: per-IP caps need ipset hash:net sets with skbinfo and iptables' SET target (--map-prio), "
        "which this machine lacks: ipset v7.17: Syntax error: 'skbinfo' is invalid\n"
    )
    assert booted.calls == [(CAP_PROBE, "")]
    assert not (tmp_path / "state" / "limits.json").exists()


# --- undo: what a failed step puts back, exactly --------------------------------------


def fail_on(system, argv: tuple[str, ...], stderr: str, after=None):
    """The first run of `argv` fails (after `after(stdin)` made its partial effect); later runs pass."""
    failed = []

    def hook(called, stdin):
        if called == argv and not failed:
            failed.append(stdin)
            if after:
                after(stdin)
            raise CommandFailed(" ".join(argv), stderr)

    system.hooks.append(hook)


def test_add_whose_set_entry_fails_takes_its_new_class_away(booted, cli, tmp_path):
    booted.answers[CLASSES] = SEED_002_SHOWN

    def class_added(_):
        booted.answers[CLASSES] = SEED_002_SHOWN + "class htb 8001:4 root leaf 8103: prio 0 rate 128Kbit ceil 128Kbit\n"

    booted.hooks.append(lambda argv, stdin: class_added(stdin) if argv == BATCH else None)
    fail_on(booted, IPSET, "ipset v7.17: Error in line 2: Injected fault\n")

    result = cli(limit_ip_app, "add", "198.51.100.7", "128kbit", "--config", str(INCIDENT_CONFIG))

    assert result.exit_code == 1
    assert result.stderr == (
        "shape-limit-ip: `ipset restore` failed: ipset v7.17: Error in line 2: Injected fault; "
        "put back as before: the class of 198.51.100.7/32\n"
    )
    assert booted.batches()[1:] == ["class del dev eth0 classid 8001:4\n"]  # its group holds the config's caps
    assert not (tmp_path / "state" / "limits.json").exists()


def test_add_whose_set_entry_fails_takes_its_new_group_away_too(booted, cli, write_config, tmp_path):
    config = write_config('[device.eth0]\nrate = "100mbit"\n')  # no cap yet: no group

    def made(stdin):
        if stdin.startswith("class add"):
            booted.answers[CLASSES] = (
                "class htb 5c:8001 parent 5c:1 leaf 8001: prio 0 rate 100Mbit ceil 100Mbit\n"
                "class htb 8001:1 root leaf 8100: prio 0 rate 128Kbit ceil 128Kbit\n"
            )

    booted.hooks.append(lambda argv, stdin: made(stdin) if argv == BATCH else None)
    fail_on(booted, IPSET, "ipset v7.17: Error in line 2: Injected fault\n")

    result = cli(limit_ip_app, "add", "198.51.100.7", "128kbit", "--config", str(config))

    assert result.exit_code == 1
    assert result.stderr.endswith("put back as before: the class of 198.51.100.7/32\n")
    assert booted.batches() == [
        GROUP_1
        + "class add dev eth0 parent 8001: classid 8001:1 htb rate 128kbit ceil 128kbit quantum 1514\n"
        + "qdisc add dev eth0 parent 8001:1 handle 8100: sfq perturb 10\n",
        "class del dev eth0 classid 8001:1\nclass del dev eth0 classid 5c:8001\n",  # the cap, then its group
    ]
    assert not (tmp_path / "state" / "limits.json").exists()


def test_remove_whose_class_delete_fails_puts_the_set_entry_back(booted, cli, tmp_path):
    cli(limit_ip_app, "add", "198.51.100.7", "128kbit", "--config", str(INCIDENT_CONFIG))
    saved = (tmp_path / "state" / "limits.json").read_text()
    booted.answers[CLASSES] = SEED_002_SHOWN + "class htb 8001:4 root leaf 8103: prio 0 rate 128Kbit ceil 128Kbit\n"
    booted.run.reset_mock()
    fail_on(booted, BATCH, "Error: Device or resource busy\nCommand failed -:1\n")

    result = cli(limit_ip_app, "remove", "198.51.100.7", "--config", str(INCIDENT_CONFIG))

    assert result.exit_code == 1 and result.stderr.count("\n") == 1
    assert result.stderr.endswith(
        "put back as before: the set entry of 198.51.100.7/32, the class of 198.51.100.7/32\n"
    )
    assert [(argv, text) for argv, text in booted.calls if argv in (BATCH, IPSET)] == [
        (IPSET, CREATE_4 + "del SHAPEKIT-eth0-4 198.51.100.7/32 -exist\n"),
        (BATCH, "class del dev eth0 classid 8001:4\n"),  # fails: the class is still there, nothing to put back
        (IPSET, CREATE_4 + f"add SHAPEKIT-eth0-4 198.51.100.7/32 skbprio 8001:4 {MARK_1} -exist\n"),
    ]
    assert (tmp_path / "state" / "limits.json").read_text() == saved


def test_install_whose_sets_fail_puts_classes_and_sets_back(booted, cli):
    group = "class htb 5c:8001 parent 5c:1 leaf 8001: prio 0 rate 100Mbit ceil 100Mbit\n"
    booted.answers[CLASSES] = group + "class htb 8001:1 root leaf 8100: prio 0 rate 3Mbit ceil 3Mbit\n"
    booted.answers[("ipset", "save", "SHAPEKIT-eth0-4")] = (
        "create SHAPEKIT-eth0-4 hash:net family inet hashsize 1024 maxelem 131072 timeout 0 skbinfo\n"
        f"add SHAPEKIT-eth0-4 198.18.0.101 timeout 0 {MARK_1} skbprio 8001:1\n"
    )

    def re_rated(_):  # the class batch ran: 8001:1 now holds 128kbit, 8001:2 and 8001:3 are new
        booted.answers[CLASSES] = group + "".join(
            f"class htb 8001:{j} root leaf {leaf}: prio 0 rate {r} ceil {r}\n"
            for j, leaf, r in (("1", "8100", "128Kbit"), ("2", "8101", "512Kbit"), ("3", "8102", "32Kbit"))
        )

    booted.hooks.append(lambda argv, stdin: re_rated(stdin) if argv == BATCH and "class add" in stdin else None)
    fail_on(booted, IPSET, "ipset v7.17: Error in line 12: Injected fault\n")

    result = cli(limit_ip_app, "--config", str(INCIDENT_CONFIG))

    assert result.exit_code == 1
    assert result.stderr.endswith("put back as before: eth0's cap classes, eth0's cap sets\n")
    ipsets = [text for argv, text in booted.calls if argv == IPSET]
    assert ipsets[1] == (  # both sets (there) refilled as they were aside and swapped back in
        "create SHAPEKIT-eth0-4~ hash:net family inet skbinfo timeout 0 maxelem 131072 -exist\n"
        "flush SHAPEKIT-eth0-4~\n"
        f"add SHAPEKIT-eth0-4~ 198.18.0.101 timeout 0 {MARK_1} skbprio 8001:1\n"
        "create SHAPEKIT-eth0-6~ hash:net family inet6 skbinfo timeout 0 maxelem 131072 -exist\n"
        "flush SHAPEKIT-eth0-6~\n"
        "swap SHAPEKIT-eth0-4~ SHAPEKIT-eth0-4\n"
        "swap SHAPEKIT-eth0-6~ SHAPEKIT-eth0-6\n"
        "destroy SHAPEKIT-eth0-4~\n"
        "destroy SHAPEKIT-eth0-6~\n"
    )
    assert booted.batches()[-1] == (  # the re-rated class gets its rate back, the new ones go newest first
        "class change dev eth0 parent 8001: classid 8001:1 htb rate 3mbit ceil 3mbit quantum 5952\n"
        "class del dev eth0 classid 8001:3\n"
        "class del dev eth0 classid 8001:2\n"
    )
    assert not any(argv in (V4, V6) for argv, _ in booted.calls)  # the rules were never reached


def test_a_device_away_gets_its_sets_made_for_the_rules_that_name_them(booted, cli, write_config, tmp_path):
    config = write_config(
        '[device.eth0]\nrate = "100mbit"\n[device.eth0.limits]\n"198.18.0.101" = "128kbit"\n'
        '[device.usb0]\nrate = "10mbit"\n[device.usb0.limits]\n"198.18.0.102" = "1mbit"\n'
    )

    result = cli(limit_ip_app, "--config", str(config))

    assert result.exit_code == 0, result.stderr
    restores = [stdin for argv, stdin in booted.calls if argv == IPSET]
    assert restores[1] == (
        "create SHAPEKIT-usb0-4 hash:net family inet skbinfo timeout 0 maxelem 131072 -exist\n"
        "create SHAPEKIT-usb0-4~ hash:net family inet skbinfo timeout 0 maxelem 131072 -exist\n"
        "flush SHAPEKIT-usb0-4~\n"
        f"add SHAPEKIT-usb0-4~ 198.18.0.102/32 skbprio 8001:1 {MARK_1}\n"
        "create SHAPEKIT-usb0-6 hash:net family inet6 skbinfo timeout 0 maxelem 131072 -exist\n"
        "create SHAPEKIT-usb0-6~ hash:net family inet6 skbinfo timeout 0 maxelem 131072 -exist\n"
        "flush SHAPEKIT-usb0-6~\n"
        "swap SHAPEKIT-usb0-4~ SHAPEKIT-usb0-4\n"
        "swap SHAPEKIT-usb0-6~ SHAPEKIT-usb0-6\n"
        "destroy SHAPEKIT-usb0-4~\n"
        "destroy SHAPEKIT-usb0-6~\n"
    )
    v4 = next(stdin for argv, stdin in booted.calls if argv == V4)
    assert "-A SHAPEKIT-LIMIT -o usb0 -j SET --map-set SHAPEKIT-usb0-4 dst --map-prio --map-mark\n" in v4
    assert not any(argv[:4] == ("tc", "class", "show", "dev") and argv[4] == "usb0" for argv, _ in booted.calls)


PTM = 'overhead = 22\nlinklayer = "ptm"\n[device.eth0.limits]'


def test_a_ptm_lines_caps_are_written_scaled_and_read_back_as_configured(booted, cli, write_config):
    config = str(write_config(INCIDENT_CONFIG.read_text().replace("[device.eth0.limits]", PTM)))
    # the kernel keeps bytes/s: 64/65 of 128kbit is 126030bit, kept as 126024bit
    booted.answers[CLASSES] = (
        "class htb 5c:8001 parent 5c:1 leaf 8001: prio 0 rate 98461Kbit overhead 22 ceil 98461Kbit burst 1600b cburst 1600b \n"
        "class htb 8001:1 root leaf 8100: prio 0 rate 126024bit overhead 22 ceil 126024bit burst 1600b cburst 1600b \n"
        "class htb 8001:2 root leaf 8101: prio 0 rate 504120bit overhead 22 ceil 504120bit burst 1600b cburst 1600b \n"
        "class htb 8001:3 root leaf 8102: prio 0 rate 31504bit overhead 22 ceil 31504bit burst 1600b cburst 1600b \n"
    )

    assert cli(limit_ip_app, "--config", config).exit_code == 0
    assert booted.batches() == []  # every cap's class is as configured: nothing to change

    result = cli(limit_ip_app, "add", "198.51.100.7", "128kbit", "--config", config)

    assert result.exit_code == 0, result.stderr
    assert booted.batches()[-1] == (
        "class add dev eth0 parent 8001: classid 8001:4 htb rate 126030bit ceil 126030bit quantum 1514 overhead 22\n"
        "qdisc add dev eth0 parent 8001:4 handle 8103: sfq perturb 10\n"
    )


# --- sync ----------------------------------------------------------------------------

SYNCED = [  # the run-time caps the last sync left: two hosts, in classes of their own
    {"host": "198.51.100.7/32", "rate": "1mbit", "dev": "eth0", "comment": "plan A", "slot": 3},
    {"host": "198.51.100.8/32", "rate": "2mbit", "dev": "eth0", "comment": "plan B", "slot": 4},
]
SYNCED_CLASSES = SEED_002_SHOWN + (
    "class htb 8001:4 root leaf 8103: prio 0 rate 1Mbit ceil 1Mbit burst 1600b cburst 1600b \n"
    "class htb 8001:5 root leaf 8104: prio 0 rate 2Mbit ceil 2Mbit burst 1600b cburst 1600b \n"
)


@pytest.fixture
def synced(booted, tmp_path):
    (tmp_path / "state").mkdir(exist_ok=True)
    (tmp_path / "state" / "limits.json").write_text(json.dumps({"caps": SYNCED}))
    booted.answers[CLASSES] = SYNCED_CLASSES
    return booted


def test_sync_changes_only_what_differs(synced, cli, write_config, tmp_path):
    file = write_config("host,rate,comment\n198.51.100.7,3mbit,plan C\n198.51.100.9,1mbit,new\n", "caps.csv")

    result = cli(limit_ip_app, "sync", str(file), "--config", str(INCIDENT_CONFIG))

    assert result.exit_code == 0, result.stderr
    assert synced.batches() == [
        # .7 re-rated in its own class (no queue dropped); .9 new, not in the class .8 leaves
        "class change dev eth0 parent 8001: classid 8001:4 htb rate 3mbit ceil 3mbit quantum 5952\n"
        "class add dev eth0 parent 8001: classid 8001:6 htb rate 1mbit ceil 1mbit quantum 1984\n"
        "qdisc add dev eth0 parent 8001:6 handle 8105: sfq perturb 10\n",
        "class del dev eth0 classid 8001:5\n",  # .8's class, once no entry points to it
    ]
    assert [stdin for argv, stdin in synced.calls if argv == IPSET] == [
        CREATE_4
        + CREATE_6
        + f"add SHAPEKIT-eth0-4 198.51.100.9/32 skbprio 8001:6 {MARK_1} -exist\n"
        + "del SHAPEKIT-eth0-4 198.51.100.8/32 -exist\n"
    ]
    assert not any(argv in (V4, V6) for argv, _ in synced.calls)  # the rules that read the sets stay
    assert [(c["host"], c["rate"], c["slot"], c["comment"]) for c in state(tmp_path)] == [
        ("198.51.100.7/32", "3mbit", 3, "plan C"),
        ("198.51.100.9/32", "1mbit", 5, "new"),
    ]


def test_sync_of_the_same_file_changes_nothing(synced, cli, write_config):
    file = write_config(
        '{"host": "198.51.100.7", "rate": "1mbit", "comment": "plan A"}\n'
        '{"host": "198.51.100.8", "rate": "2mbit", "comment": "plan B"}\n',
        "caps.jsonl",
    )

    result = cli(limit_ip_app, "sync", str(file), "--config", str(INCIDENT_CONFIG))

    assert result.exit_code == 0, result.stderr
    assert synced.batches() == []
    assert not any(argv == IPSET for argv, _ in synced.calls)


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("host,rate\n198.51.100.7,1mbit\nbogus,1mbit\n", "row 3: 'bogus' is not an IPv4/IPv6 address or CIDR block"),
        ("host,rate\n198.51.100.7,1mbit\n198.51.100.7,2mbit\n", "row 3: 198.51.100.7/32 is capped (out) on row 2 already"),
        ("host,rate\n198.51.100.7,fast\n", "row 2: 'fast' is not a rate"),
        ("host,rate\n198.51.100.7,50%\n", "row 2: '50%'"),
        ("host,speed\n198.51.100.7,1mbit\n", "line 1: no 'rate' column"),
        ("host,rate\n198.51.100.7,1mbit,extra\n", "row 2: 2 columns in the header, not as many here"),
        ('{"host": "198.51.100.7"}\n', "row 1: no rate"),
        ('{"host": "198.51.100.7", "rate": "1mbit", "expires": "2001-01-01T00:00:00Z"}\n', "row 1: expires"),
        ('{"host": "198.51.100.7", "rate": "1mbit", "expires": "2030-01-01T00:00"}\n', "row 1: expires"),
        ('{"host": "198.51.100.7", "rate": "1mbit", "direction": "in"}\n', 'row 1: direction "in" needs a [device.eth0.ingress] table'),
        ('{"host": "198.51.100.7", "rate": "1mbit", "speed": 1}\n', "row 1: unknown key 'speed'"),
        ('{"host": "198.51.100.7", "rate": }\n', "row 1: not JSON"),
        ('{"host": "198.51.100.7", "rate": "1mbit"}\n[1, 2]\n', "row 2: a JSON object per line, not list"),
    ],
)  # fmt: skip
def test_a_bad_row_is_one_line_naming_file_and_row_and_nothing_changes(synced, cli, write_config, text, line):
    file = write_config(text, "caps.txt")

    result = cli(limit_ip_app, "sync", str(file), "--config", str(INCIDENT_CONFIG))

    assert result.exit_code == 2
    assert result.stderr.startswith(f"shape-limit-ip: {file}: {line}")
    assert len(result.stderr.splitlines()) == 1
    assert synced.calls == []


def test_sync_of_a_missing_file_is_one_line(synced, cli, tmp_path):
    result = cli(limit_ip_app, "sync", str(tmp_path / "nope.csv"), "--config", str(INCIDENT_CONFIG))

    assert result.exit_code == 2
    assert result.stderr == f"shape-limit-ip: {tmp_path / 'nope.csv'}: no such file\n"


def test_init_over_a_flat_tree_moves_its_caps_into_groups(booted, cli, tmp_path):
    booted.flat.add("eth0")  # built by a shapekit before cap groups: its entries name flat classes, no mark
    booted.answers[("ipset", "save", "SHAPEKIT-eth0-4")] = (
        "create SHAPEKIT-eth0-4 hash:net family inet hashsize 1024 maxelem 65536 timeout 0 skbinfo\n"
        "add SHAPEKIT-eth0-4 198.18.0.101 timeout 0 skbprio 5c:8000\n"
        "add SHAPEKIT-eth0-4 198.51.100.7 timeout 0 skbprio 5c:8003\n"
    )
    (tmp_path / "state").mkdir()
    cap = {"host": "198.51.100.7/32", "rate": "1mbit", "dev": "eth0", "minor": 0x8003}  # as that shapekit saved it
    (tmp_path / "state" / "limits.json").write_text(json.dumps({"caps": [cap]}))

    result = cli(init_app, "--config", str(INCIDENT_CONFIG))

    assert result.exit_code == 0, result.stderr
    calls = [(argv, stdin) for argv, stdin in booted.calls if argv[0] != "unshare"]  # after the kernel probes
    assert (
        calls
        == [
            (READ_ROOT, None),
            (GROUP_FILTER, None),  # shapekit's tree without the group filter: built flat
            (("ip", "-j", "link", "show", "type", "ifb"), None),
            (READ_ROOT, None),
            (READ_GSO, None),
            (
                BATCH,
                "qdisc del dev eth0 root\n"
                "qdisc add dev eth0 root handle 5c: htb default 10\n"
                "class add dev eth0 parent 5c: classid 5c:1 htb rate 100mbit ceil 100mbit quantum 198412\n"
                "class add dev eth0 parent 5c:1 classid 5c:2 htb rate 100mbit ceil 100mbit quantum 198412\n"
                "qdisc add dev eth0 parent 5c:2 handle 2: sfq perturb 10\n"
                "class add dev eth0 parent 5c:1 classid 5c:10 htb rate 100mbit ceil 100mbit quantum 198412\n"
                "qdisc add dev eth0 parent 5c:10 handle 10: sfq perturb 10\n"
                "filter add dev eth0 parent 5c: protocol all prio 10 handle 1001 fw flowid 5c:2\n"
                "filter add dev eth0 parent 5c: protocol all prio 10 handle 6029328 fw flowid 5c:10\n"
                'filter add dev eth0 parent 5c: protocol all prio 1 bpf bytecode "6,32 0 0 4294963220,116 0 0 24,'
                '21 2 0 0,4 0 0 6062080,22 0 0 0,6 0 0 0"\n'
                + SEED_002_CLASSES
                + "class add dev eth0 parent 8001: classid 8001:4 htb rate 1mbit ceil 1mbit quantum 1984\n"
                "qdisc add dev eth0 parent 8001:4 handle 8103: sfq perturb 10\n",  # the run-time cap, in group 1 too
            ),
            (HOLD_GSO, None),
            (("ipset", "list", "-n"), None),  # the sets there: refilled with the groups' entries and swapped in
            (("ipset", "save", "SHAPEKIT-eth0-4"), None),
            (("ipset", "save", "SHAPEKIT-eth0-6"), None),
            (
                IPSET,
                # no `create` of the sets there: theirs (maxelem 65536) would refuse -exist; the swap replaces them
                "create SHAPEKIT-eth0-4~ hash:net family inet skbinfo timeout 0 maxelem 131072 -exist\n"
                "flush SHAPEKIT-eth0-4~\n"
                f"add SHAPEKIT-eth0-4~ 198.18.0.101/32 skbprio 8001:1 {MARK_1}\n"
                f"add SHAPEKIT-eth0-4~ 198.18.0.102/32 skbprio 8001:2 {MARK_1}\n"
                f"add SHAPEKIT-eth0-4~ 198.18.0.103/32 skbprio 8001:3 {MARK_1}\n"
                f"add SHAPEKIT-eth0-4~ 198.51.100.7/32 skbprio 8001:4 {MARK_1}\n"
                "create SHAPEKIT-eth0-6~ hash:net family inet6 skbinfo timeout 0 maxelem 131072 -exist\n"
                "flush SHAPEKIT-eth0-6~\n"
                "swap SHAPEKIT-eth0-4~ SHAPEKIT-eth0-4\n"
                "swap SHAPEKIT-eth0-6~ SHAPEKIT-eth0-6\n"
                "destroy SHAPEKIT-eth0-4~\n"
                "destroy SHAPEKIT-eth0-6~\n",
            ),
            (("iptables-save", "-t", "mangle"), None),  # the rule that sets the group's mark too
            (("ip6tables-save", "-t", "mangle"), None),
            (V4, LIMIT_V4),
            (V6, LIMIT_V4.replace("SHAPEKIT-eth0-4", "SHAPEKIT-eth0-6")),
        ]
    )
    assert [(c["host"], c["slot"]) for c in state(tmp_path)] == [("198.51.100.7/32", 3)]  # its place, saved


def test_init_builds_each_group_with_its_caps_before_the_next_group(system, cli, write_config):
    hosts = "".join(f'"10.0.{i // 256}.{i % 256}" = "1mbit"\n' for i in range(513))  # slots 0-512: two groups
    config = write_config(f'[device.eth0]\nrate = "100mbit"\nleaf = "none"\n[device.eth0.limits]\n{hosts}')

    assert cli(init_app, "--config", str(config)).exit_code == 0
    lines = system.batches()[0].splitlines()
    caps = [n for n, line in enumerate(lines) if " 800" in line or ":800" in line]
    assert [lines[n].split(" classid ")[-1].split()[0] if "classid" in lines[n] else "qdisc" for n in caps] == [
        "5c:8001", "qdisc", *(f"8001:{j:x}" for j in range(1, 513)), "5c:8002", "qdisc", "8002:1"
    ]  # fmt: skip
    assert caps == list(range(caps[0], caps[0] + len(caps)))  # together, after the tree


def test_classes_are_read_a_qdisc_at_a_time_in_one_batch(system):
    """One dump of a whole device costs the kernel more per class it holds: each HTB qdisc is dumped alone."""
    qdiscs = [
        {"kind": "htb", "handle": "5c:", "root": True},
        {"kind": "htb", "handle": "8001:", "parent": "5c:8001"},
        {"kind": "pfifo", "handle": "8101:", "parent": "8001:1"},  # a leaf: no classes of shapekit's
        {"kind": "htb", "handle": "8002:", "parent": "5c:8002"},
    ]
    read.show_classes(run.Runner(), "eth0", json.dumps(qdiscs))

    assert system.calls == [
        (
            ("tc", "-batch", "-"),
            "class show dev eth0 parent 5c:\nclass show dev eth0 parent 8001:\nclass show dev eth0 parent 8002:\n",
        )
    ]


def test_add_writes_the_other_saved_caps_back_as_they_were(booted, cli, tmp_path):
    """With 100,000 caps saved, `add` reads whole only the host's own: of the others, their places."""
    others = [
        {"host": "198.51.100.20/32", "rate": "1mbit", "dev": "eth0", "slot": 3},  # keys as a hand wrote them
        {"host": "198.51.100.21/32", "rate": "1mbit", "dev": "eth0", "expires": NOW - 5, "slot": 4},  # lapsed
        {"host": "198.51.100.22/32", "rate": "1mbit", "dev": "usb9", "slot": 5},  # a device no more configured
    ]
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "limits.json").write_text(json.dumps({"caps": others}))

    result = cli(limit_ip_app, "add", "198.51.100.7", "128kbit", "--config", str(INCIDENT_CONFIG))

    assert result.exit_code == 0, result.stderr
    # 3 and 4 held (4 by a lapsed cap's class); usb9's 5 is on another tree
    assert "classid 8001:6 " in booted.batches()[0]
    assert state(tmp_path)[:3] == others
    assert state(tmp_path)[3]["slot"] == 5


def test_add_refuses_a_saved_cap_whose_place_is_wrong(booted, cli, tmp_path):
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "limits.json").write_text(
        json.dumps({"caps": [{"host": "198.51.100.20/32", "rate": "1mbit", "dev": "eth0", "slot": "three"}]})
    )

    result = cli(limit_ip_app, "add", "198.51.100.7", "128kbit", "--config", str(INCIDENT_CONFIG))

    assert result.exit_code == 2
    assert "limits.json: caps[0].slot: 'three' is not a cap's place (0-130559) or null" in result.stderr
    assert booted.batches() == []


def test_saved_caps_are_one_per_line_whatever_their_comments_say(tmp_path):
    caps = [
        Cap(ipaddress.ip_network("198.51.100.1"), 1000, "eth0", "run-time", None, 'a}, {"comment": b', 3),
        Cap(ipaddress.ip_network("fd00::1"), 2000, "eth0", "run-time", NOW, "", 4),
    ]
    save_caps(tmp_path, caps)

    lines = (tmp_path / "limits.json").read_text().splitlines()
    assert lines[0] == '{"caps": ['
    assert lines[1].startswith('{"comment": "a}, {\\"comment\\": b", "dev": "eth0"')
    assert lines[2].startswith('{"comment": "", ') and lines[3] == "]}"
    assert load_caps(tmp_path) == caps


SAVED = [  # on eth0's sent traffic: 3 in force, 4 lapsed; 5 on another device; minor 0x8000 on arriving traffic
    Cap(ipaddress.ip_network("198.51.100.1"), 1000, "eth0", "run-time", None, 'a "quoted" "host": "198.51.100.2"', 3),
    Cap(ipaddress.ip_network("198.51.100.2"), 1000, "eth0", "run-time", NOW - 5, "", 4),
    Cap(ipaddress.ip_network("198.51.100.2"), 1000, "usb9", "run-time", None, "", 5),
    Cap(ipaddress.ip_network("198.51.100.2"), 1000, "eth0", "run-time", None, "", 0x8000, "in"),
]


def test_saved_caps_read_a_cap_and_the_places_of_the_others_from_the_text(tmp_path):
    save_caps(tmp_path, SAVED)
    lines = (tmp_path / "limits.json").read_text().splitlines()
    saved = SavedCaps.read(tmp_path)

    found = saved.find(SAVED[1].host)  # a comment that quotes the host is not it
    assert [(f.n, saved.cap(f)) for f in found] == [(1, SAVED[1]), (2, SAVED[2]), (3, SAVED[3])]
    assert [f.n for f in saved.find(SAVED[1].host, "eth0", "out")] == [1]
    assert saved.places("eth0", "out", NOW) == ({3}, {4})
    assert saved.places("eth0", "out", NOW, skip=found[0]) == ({3}, set())
    assert saved.places("eth0", "in", NOW) == ({0x8000}, set())

    saved.save_with(tmp_path, found[0], replace(SAVED[1], rate=2000, expires=None))
    after = (tmp_path / "limits.json").read_text().splitlines()
    assert after[:2] + after[3:] == lines[:2] + lines[3:]  # the others as they were, byte for byte
    assert load_caps(tmp_path)[1] == replace(SAVED[1], rate=2000, expires=None)

    SavedCaps.read(tmp_path).save_without(tmp_path, found[1:])
    assert (tmp_path / "limits.json").read_text().splitlines() == [*after[:2], after[2].rstrip(","), *after[5:]]
    SavedCaps.read(tmp_path).save_with(tmp_path, None, SAVED[3])
    assert load_caps(tmp_path) == [SAVED[0], replace(SAVED[1], rate=2000, expires=None), SAVED[3]]


def test_saved_caps_not_written_by_shapekit_are_read_as_json_and_written_a_cap_per_line(tmp_path):
    save_caps(tmp_path, SAVED)
    ours = (tmp_path / "limits.json").read_text()
    items = json.loads(ours)["caps"]
    items[0]["expires"] = None
    del items[0]["comment"], items[0]["direction"]  # optional keys, as a hand may leave them out
    (tmp_path / "limits.json").write_text(json.dumps({"caps": items}, indent=4))
    saved = SavedCaps.read(tmp_path)

    assert saved.places("eth0", "out", NOW) == ({3}, {4})
    assert [f.n for f in saved.find(SAVED[0].host)] == [0]
    saved.save_with(tmp_path, saved.find(SAVED[3].host, "eth0", "in")[0], SAVED[3])
    assert (tmp_path / "limits.json").read_text().splitlines()[2:] == ours.splitlines()[2:]
    assert load_caps(tmp_path) == [replace(SAVED[0], comment=""), *SAVED[1:]]


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("{not json},", "not valid JSON"),
        ('{"comment": "", "dev": "eth0", "direction": "out", "expires": null, "host": "198.51.100.9/32", '
         '"rate": "1mbit", "slot": 130560},', "caps[1].slot: 130560 is not a cap's place (0-130559) or null"),
        ('{"comment": "", "dev": "eth0", "direction": "out", "expires": -1.5, "host": "198.51.100.9/32", '
         '"rate": "1mbit", "slot": 7},', "caps[1].expires: -1.5 is not a time"),
    ],
)  # fmt: skip
def test_a_saved_line_places_cannot_use_is_refused_as_a_whole_read_refuses_it(tmp_path, line, problem):
    save_caps(tmp_path, SAVED)
    lines = (tmp_path / "limits.json").read_text().split("\n")
    (tmp_path / "limits.json").write_text("\n".join([*lines[:2], line, *lines[2:]]))

    with pytest.raises(UsageError, match=re.escape(problem)):
        SavedCaps.read(tmp_path).places("eth0", "out", NOW)


def test_remove_writes_the_other_saved_caps_back_as_they_were(booted, cli, tmp_path):
    (tmp_path / "state").mkdir()
    save_caps(tmp_path / "state", SAVED)
    others = (tmp_path / "state" / "limits.json").read_text()
    cli(limit_ip_app, "add", "198.51.100.7", "128kbit", "--config", str(INCIDENT_CONFIG))
    assert state(tmp_path)[-1]["slot"] == 5  # 3 and 4 held on eth0
    booted.answers[CLASSES] = SEED_002_SHOWN + "class htb 8001:6 root leaf 8105: prio 0 rate 128Kbit ceil 128Kbit\n"
    booted.run.reset_mock()

    result = cli(limit_ip_app, "remove", "198.51.100.7", "--config", str(INCIDENT_CONFIG))

    assert result.exit_code == 0, result.stderr
    assert booted.batches() == ["class del dev eth0 classid 8001:6\n"]  # its group holds others
    assert (tmp_path / "state" / "limits.json").read_text() == others


@pytest.mark.parametrize("verb", [("add", "198.51.100.7", "1mbit"), ("remove", "198.51.100.7")])
def test_a_host_saved_twice_on_one_tree_is_refused(booted, cli, tmp_path, verb):
    twice = Cap(ipaddress.ip_network("198.51.100.7"), 1000, "eth0", "run-time", None, "", 3)
    (tmp_path / "state").mkdir()
    save_caps(tmp_path / "state", [twice, replace(twice, slot=4)])

    result = cli(limit_ip_app, *verb, "--config", str(INCIDENT_CONFIG))

    assert result.exit_code == 2
    assert "limits.json: caps[1]: 198.51.100.7/32 is capped twice on eth0 (out)" in result.stderr
    assert booted.batches() == []


@pytest.mark.parametrize(
    "line",
    [
        '{"comment": "", "direction": "out", "dev": "eth0", "expires": null, "host": "198.51.100.9/32", "rate": "1mbit", "slot": 7},',
        '{"comment": "", "dev": "eth\\u0030", "direction": "out", "expires": null, "host": "198.51.100.9/32", "rate": "1mbit", "slot": 7},',
        '{"comment": "", "dev": "eth0", "expires": null, "host": "198.51.100.9/32", "rate": "1mbit", "slot": 7},',
        '{"comment": "", "dev": "eth0", "direction": "out", "expires": null, "host": "198.51.100.9/32", "rate": "1mbit", "slot": 7, "x": 1},',
    ],
    ids=["keys in another order", "an escaped device", "no direction", "a key more"],
)  # fmt: skip
def test_a_hand_edited_line_among_shapekits_still_holds_its_place(tmp_path, line):
    save_caps(tmp_path, SAVED)
    lines = (tmp_path / "limits.json").read_text().split("\n")
    (tmp_path / "limits.json").write_text("\n".join([*lines[:2], line, *lines[2:]]))

    assert SavedCaps.read(tmp_path).places("eth0", "out", NOW) == ({3, 7}, {4})


@pytest.mark.parametrize("comment", ["", 'a "quoted" \\ back', "ünïcödé ✓ 😀", "</script>&"])
@pytest.mark.parametrize("expires", [None, NOW, 1_800_000_000.25, 1.0])
def test_a_saved_cap_line_is_what_json_makes_of_it(tmp_path, comment, expires):
    cap = Cap(ipaddress.ip_network("fd00::/64"), 1234567, "eth0.7", "run-time", expires, comment, 130559, "out")
    save_caps(tmp_path, [cap, replace(cap, slot=None, expires=None, direction="in")])

    lines = (tmp_path / "limits.json").read_text().splitlines()
    assert lines[1] == json.dumps(
        {"host": "fd00::/64", "rate": "1234567bit", "dev": "eth0.7", "direction": "out", "expires": expires,
         "comment": comment, "slot": 130559}, sort_keys=True
    ) + ","  # fmt: skip
    assert load_caps(tmp_path) == [cap, replace(cap, slot=None, expires=None, direction="in")]


def test_a_cap_placed_anew_is_saved_with_its_place_and_all_else_as_it_was():
    cap = Cap(ipaddress.ip_network("198.51.100.1"), 1000, "eth0", "run-time", NOW, "note", None, "in")

    assert with_slot(PlacedCap(cap, 9)) == replace(cap, slot=9)
    placed = replace(cap, slot=9)
    assert with_slot(PlacedCap(placed, 9)) is placed  # no copy: 100,000 of them cost a third of a second


@pytest.mark.parametrize(
    "layout",
    [
        "two caps on a line",  # the release before wrote a hand's cap without "comment" on the line before it
        "no comma between lines",
    ],
)
def test_a_file_not_one_cap_a_line_is_read_whole(tmp_path, layout):
    save_caps(tmp_path, SAVED)
    lines = (tmp_path / "limits.json").read_text().split("\n")
    if layout == "two caps on a line":
        hand = '{"host": "198.51.100.9/32", "rate": "1mbit", "dev": "eth0", "slot": 7}'
        (tmp_path / "limits.json").write_text("\n".join([lines[0], lines[1][:-1] + ", " + hand + ",", *lines[2:]]))
        saved = SavedCaps.read(tmp_path)
        assert saved.count == 5
        assert [f.n for f in saved.find(ipaddress.ip_network("198.51.100.9"))] == [1]
        assert saved.places("eth0", "out", NOW, skip=saved.find(SAVED[1].host, "eth0", "out")[0]) == ({3, 7}, set())
    else:
        (tmp_path / "limits.json").write_text("\n".join([lines[0], lines[1][:-1], *lines[2:]]))
        with pytest.raises(UsageError, match="not valid JSON"):
            SavedCaps.read(tmp_path)


def test_a_lapsed_time_that_is_no_time_is_refused_on_a_cap_without_a_place(tmp_path):
    save_caps(tmp_path, [replace(SAVED[1], slot=None)])
    text = (tmp_path / "limits.json").read_text().replace(f'"expires": {NOW - 5!r}', '"expires": -1.5')
    (tmp_path / "limits.json").write_text(text)

    with pytest.raises(UsageError, match=re.escape("caps[0].expires: -1.5 is not a time")):
        SavedCaps.read(tmp_path).places("eth0", "out", NOW)


def test_remove_finds_a_host_a_hand_wrote_another_way_and_writes_it_as_shapekit_does(booted, cli, tmp_path):
    (tmp_path / "state").mkdir()
    hand = {"host": "198.51.100.7", "rate": "128kbit", "dev": "eth0", "slot": 5}  # no /32
    (tmp_path / "state" / "limits.json").write_text(
        json.dumps({"caps": [hand, {**hand, "host": "2001:DB8::7", "slot": 6}]})
    )
    booted.answers[CLASSES] = SEED_002_SHOWN + "class htb 8001:6 root leaf 8105: prio 0 rate 128Kbit ceil 128Kbit\n"

    result = cli(limit_ip_app, "remove", "198.51.100.7", "--config", str(INCIDENT_CONFIG))

    assert result.exit_code == 0, result.stderr
    assert booted.batches() == ["class del dev eth0 classid 8001:6\n"]
    assert [c["host"] for c in state(tmp_path)] == ["2001:db8::7/128"]  # the other kept, as shapekit writes it
