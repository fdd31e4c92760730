"""shape-mark and shape-bypass on a real kernel: marks pick classes, bypass skips shaping."""

from __future__ import annotations

import json
import os
import stat

import pytest
from netns import sh

# Seed 000's shape on a veth: a 20mbit shaped partition on a fast line.
CONFIG = """
[device.DEV]
rate = "10gbit"
default = "normal"
leaf = "pfifo"
classifier = "classify"

[device.DEV.classes.shaped]
rate = "20mbit"
ceil = "20mbit"
classid = 0x10

[device.DEV.classes.high]
parent = "shaped"
rate = "5mbit"
prio = 0
classid = 0x1010

[device.DEV.classes.normal]
parent = "shaped"
rate = "1mbit"
ceil = "4mbit"
classid = 0x1030

[device.DEV.classes.torrent]
parent = "shaped"
rate = "512kbit"
ceil = "2mbit"
prio = 7
classid = 0x1090

[bypass]
ports = ["5999/tcp"]

[[mark]]
class = "high"
proto = "icmp"

[[mark]]
class = "torrent"
proto = "tcp"
sport = "61000:63000"
"""
SHAPED_CEILING = 20_000_000  # no shaped class may exceed it
BOOT = ("shape-init", "shape-bypass", "shape-mark")


def boot(netpair, text: str = CONFIG) -> str:
    config = str(netpair.write_config(text))
    for command in BOOT:
        netpair.shapekit(command, "--config", config)
    return config


@pytest.mark.parametrize("ipv6", [False, True], ids=["ipv4", "ipv6"])
def test_a_flow_from_the_torrent_port_range_is_capped_at_the_torrent_ceil(netpair, ipv6):
    boot(netpair)

    # 10 s: iperf3's total counts what was still queued when the sender stopped (TSQ lets a
    # socket keep a GSO packet or two there), a few percent of 5 s at 2mbit.
    ratio = netpair.goodput(ipv6=ipv6, cport=61001 + ipv6, seconds=10) / 2_000_000

    print(f"torrent goodput/ceil {'ipv6' if ipv6 else 'ipv4'}: {ratio:.3f}")
    assert 0.90 <= ratio <= 1.0, f"goodput/ceil = {ratio:.3f}"
    assert netpair.class_bytes("5c:1090") > 1_000_000
    assert netpair.class_bytes("5c:1030") < 100_000  # only iperf3's control connection


def test_an_unmarked_flow_lands_in_the_default_class(netpair):
    boot(netpair)

    ratio = netpair.goodput() / 4_000_000

    assert 0.90 <= ratio <= 1.0, f"goodput/normal ceil = {ratio:.3f}"
    assert netpair.class_bytes("5c:1030") > 1_000_000
    assert netpair.class_bytes("5c:1090") == 0


def test_a_bypassed_port_runs_far_above_every_shaped_ceiling(netpair):
    boot(netpair)

    rate = netpair.goodput(port=5999, seconds=3)

    print(f"bypass goodput / shaped ceiling: {rate / SHAPED_CEILING:.1f}")
    assert rate >= 10 * SHAPED_CEILING
    assert netpair.class_bytes("5c:2") > 10_000_000


def test_shape_bypass_add_frees_a_port_at_once_and_remove_shapes_it_again(netpair):
    config = boot(netpair)
    assert netpair.goodput(port=7000, seconds=3) <= 4_000_000

    netpair.shapekit("shape-bypass", "add", "7000/tcp", "--config", config)
    listed = json.loads(netpair.shapekit("shape-bypass", "--config", config, "list", "--json").stdout)
    freed = netpair.goodput(port=7000, seconds=3)
    netpair.shapekit("shape-bypass", "--config", config, "remove", "7000/tcp")
    shaped_again = netpair.goodput(port=7000, seconds=3)

    assert {"entry": "7000/tcp", "kind": "port", "source": "run-time"} in listed
    assert freed >= 10 * SHAPED_CEILING
    assert shaped_again <= 4_000_000


def test_the_icmp_rule_marks_pings_into_the_high_class(netpair):
    boot(netpair)

    netpair.left.run("ping", "-c", "5", "-i", "0.2", "-q", netpair.right.addr4)

    assert netpair.class_bytes("5c:1010") >= 5 * 98  # all five echo requests
    rules = netpair.left.run("iptables", "-t", "mangle", "-nvxL", "SHAPEKIT-MARK").stdout
    icmp_rule = next(line for line in rules.splitlines() if "mark[1] high" in line)
    # The first packet matched the rule; the rest followed the mark saved to the connection.
    assert int(icmp_rule.split()[0]) == 1


FOREIGN = {
    "iptables": [
        "-t mangle -A POSTROUTING -p udp --dport 9 -j MARK --set-mark 7",
        "-t mangle -N USER-CHAIN",
        "-t mangle -A USER-CHAIN -j RETURN",
        "-t mangle -A PREROUTING -j USER-CHAIN",
        "-t filter -A INPUT -p tcp --dport 9 -j DROP",
    ],
    "ip6tables": [
        "-t mangle -A POSTROUTING -p udp --dport 9 -j MARK --set-mark 7",
        "-t filter -A OUTPUT -p tcp --dport 9 -j REJECT",
    ],
}


def _ours(line: str) -> bool:
    return "SHAPEKIT" in line


def test_rules_shapekit_did_not_make_stay_byte_for_byte(netpair):
    for tool, rules in FOREIGN.items():
        for rule in rules:
            netpair.left.run(tool, *rule.split())
    saves = [(t + "-save", table) for t in FOREIGN for table in ("mangle", "filter")]
    before = {s: netpair.save(*s) for s in saves}

    boot(netpair)
    after_boot = {s: netpair.save(*s) for s in saves}
    netpair.shapekit("shape-flush")
    after_flush = {s: netpair.save(*s) for s in saves}

    for s in saves:
        theirs = [line for line in after_boot[s].splitlines() if not _ours(line)]
        assert theirs == before[s].splitlines(), s
        assert after_flush[s] == before[s], s
    assert "-A POSTROUTING -j SHAPEKIT" in after_boot[("iptables-save", "mangle")]


def test_running_the_boot_sequence_twice_changes_nothing(netpair):
    boot(netpair)
    first = (netpair.save("iptables-save"), netpair.save("ip6tables-save"), netpair.snapshot())

    boot(netpair)

    assert (netpair.save("iptables-save"), netpair.save("ip6tables-save"), netpair.snapshot()) == first


def test_a_dropped_mark_rule_takes_its_setter_chain_with_it(netpair):
    boot(netpair)
    without_torrent_rule = CONFIG[: CONFIG.rindex("[[mark]]")]

    netpair.shapekit("shape-mark", "--config", str(netpair.write_config(without_torrent_rule, "less.toml")))

    saved = netpair.save()
    assert f":SHAPEKIT-CONN-{0x5C1090}" not in saved  # torrent's allocated mark
    assert f":SHAPEKIT-CONN-{0x5C1010}" in saved  # the icmp rule's setter stays


BAD = {  # case: (command, its arguments, config text, what the one line must say)
    "unknown class": ("shape-mark", [], CONFIG + '[[mark]]\nclass = "nope"\n', "'nope' is not a class"),
    "port 70000": ("shape-mark", [], CONFIG.replace('"61000:63000"', "70000"), "port 70000 is out of range"),
    "v6 host with icmp": (
        "shape-mark",
        [],
        CONFIG.replace('proto = "icmp"', 'proto = "icmp"\ndst = "fd00::1"'),
        "icmpv6",
    ),
    "class mark is the bypass mark": (
        "shape-mark",
        [],
        CONFIG.replace("prio = 7", "prio = 7\nmark = 1001"),
        "bypass mark",
    ),
    "22/xyz at run time": ("shape-bypass", ["add", "22/xyz"], CONFIG, "unknown protocol 'xyz'"),
    "layer7 missing": ("shape-mark", [], CONFIG + '[[mark]]\nclass = "torrent"\nl7proto = "bittorrent"\n', "layer7"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_changes_nothing_in_the_kernel(netpair, case):
    if case == "layer7 missing" and _iptables_has_layer7():
        pytest.skip("this machine has the layer7 match: nothing is missing to refuse")
    boot(netpair)
    before = (netpair.save("iptables-save"), netpair.save("ip6tables-save"), netpair.snapshot())
    command, args, text, expected = BAD[case]

    result = netpair.shapekit(command, *args, "--config", str(netpair.write_config(text, "bad.toml")), check=False)

    assert result.returncode == 2, result.stderr
    assert expected in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert (netpair.save("iptables-save"), netpair.save("ip6tables-save"), netpair.snapshot()) == before


def _iptables_has_layer7() -> bool:
    text = "*mangle\n-A POSTROUTING -m layer7 --l7proto ssh -j RETURN\nCOMMIT\n"
    return sh("unshare", "--net", "iptables-restore", stdin=text, check=False).returncode == 0


def _failing_second_ip6tables_restore(netpair) -> None:
    """An ip6tables-restore that works once (shapekit's probe) and then fails."""
    fake_bin = netpair.workdir / "bin"
    fake_bin.mkdir()
    real = sh("sh", "-c", "command -v ip6tables-restore").stdout.strip()
    counter = netpair.workdir / "calls"
    fake = fake_bin / "ip6tables-restore"
    fake.write_text(
        "#!/bin/sh\n"
        f"n=$(cat {counter} 2>/dev/null || echo 0); echo $((n + 1)) > {counter}\n"
        f'[ "$n" -ge 1 ] && {{ cat >/dev/null; echo "ip6tables-restore: injected failure" >&2; exit 1; }}\n'
        f'exec {real} "$@"\n'
    )
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    netpair.env["PATH"] = f"{fake_bin}:{os.environ['PATH']}"


@pytest.mark.parametrize("first_install", [True, False], ids=["first-install", "over-an-install"])
def test_a_failing_ipv6_restore_leaves_ipv4_as_it_was(netpair, first_install):
    if not first_install:
        boot(netpair)
    before = (netpair.save("iptables-save"), netpair.save("ip6tables-save"))
    _failing_second_ip6tables_restore(netpair)
    changed = CONFIG.replace('sport = "61000:63000"', 'sport = "60000:60100"')

    result = netpair.shapekit("shape-mark", "--config", str(netpair.write_config(changed, "changed.toml")), check=False)

    assert result.returncode == 1, result.stderr
    assert "injected failure" in result.stderr and "put back as before: the IPv4 rules" in result.stderr, result.stderr
    assert (netpair.save("iptables-save"), netpair.save("ip6tables-save")) == before
