"""Download shaping through an IFB device: the exact commands, with every process mocked."""

from __future__ import annotations

import json
import re

import pytest
from paths import DOWNLOAD_CONFIG, HOLD_GSO, READ_GSO

from shapekit.commands.bypass import bypass_app
from shapekit.commands.flush import flush_app
from shapekit.commands.init import init_app
from shapekit.commands.limit_ip import limit_ip_app
from shapekit.commands.mark import mark_app
from shapekit.config.model import ifb_name
from shapekit.kernel import probe
from shapekit.plan import drift
from shapekit.plan import ingress as plan_ingress

NOW = 1_800_000_000.0
BATCH = ("tc", "-batch", "-")
SHAPEKIT_ROOT = {"kind": "htb", "handle": "5c:", "root": True}
IFB_PROBE = ("unshare", "--net", "--", "sh", "-c", probe._INGRESS_PROBE)
CAP_PROBE = ("unshare", "--net", "--", "sh", "-c", probe._CAP_PROBE)
IFB_FILTERS = ("tc", "filter", "show", "dev", "ifb-eth0", "parent", "5c:")


def filter_lines(*nodes: tuple[str, int, str, str, str]) -> str:
    """`tc filter show` text: (protocol, pref, handle, flowid, "value/mask at offset") each."""
    return "".join(
        f"filter parent 5c: protocol {proto} pref {pref} u32 chain 0 fh {fh} order 1 key ht 100 bkt 7 *flowid {flowid} not_in_hw\n"
        f"  match {match}\n"
        for proto, pref, fh, flowid, match in nodes
    )


CONFIG = """
[device.eth0]
rate = "100mbit"
leaf = "pfifo"
classifier = "classify"

[device.eth0.ingress]
rate = "50mbit"
default = "bulk"
leaf = "pfifo"

[device.eth0.ingress.classes.ssh]
rate = "10mbit"
prio = 0

[device.eth0.ingress.classes.bulk]
rate = "40mbit"

[device.eth0.limits]
"198.51.100.7" = { rate = "2mbit", direction = "in" }
"2001:db8::/64" = { rate = "4mbit", direction = "both" }

[bypass]
ports = ["80/tcp"]

[[mark]]
class = "ssh"
direction = "in"
proto = "tcp"
sport = 22
"""

# IPv4 layer 4 sits at byte 20 only with a 20-byte header (IHL 5) in a first fragment.
TCP4 = "match u32 0x00060000 0x00ff0000 at 8 match u32 0x05000000 0x0f000000 at 0 match u32 0x00000000 0x00001fff at 4"
TCP6 = "match u32 0x00000600 0x0000ff00 at 4"
IFB_BATCH = f"""\
qdisc add dev ifb-eth0 root handle 5c: htb default 11
class add dev ifb-eth0 parent 5c: classid 5c:1 htb rate 50mbit ceil 50mbit quantum 195312
class add dev ifb-eth0 parent 5c:1 classid 5c:2 htb rate 50mbit ceil 50mbit quantum 195312
qdisc add dev ifb-eth0 parent 5c:2 handle 2: pfifo
class add dev ifb-eth0 parent 5c:1 classid 5c:10 htb rate 10mbit ceil 50mbit quantum 39062 prio 0
qdisc add dev ifb-eth0 parent 5c:10 handle 10: pfifo
class add dev ifb-eth0 parent 5c:1 classid 5c:11 htb rate 40mbit ceil 50mbit quantum 156250
qdisc add dev ifb-eth0 parent 5c:11 handle 11: pfifo
class add dev ifb-eth0 parent 5c:1 classid 5c:8000 htb rate 2mbit ceil 2mbit quantum 7812
qdisc add dev ifb-eth0 parent 5c:8000 handle 8000: pfifo
class add dev ifb-eth0 parent 5c:1 classid 5c:8001 htb rate 4mbit ceil 4mbit quantum 15625
qdisc add dev ifb-eth0 parent 5c:8001 handle 8001: pfifo
filter add dev ifb-eth0 parent 5c: protocol ip pref 1000 handle 100: u32 divisor 256
filter add dev ifb-eth0 parent 5c: protocol ip pref 1000 u32 match u32 0 0 hashkey mask 0x000000ff at 12 link 100:
filter add dev ifb-eth0 parent 5c: protocol ipv6 pref 2000 handle 101: u32 divisor 256
filter add dev ifb-eth0 parent 5c: protocol ipv6 pref 2000 u32 match u32 0 0 hashkey mask 0x000000ff at 20 link 101:
filter add dev ifb-eth0 parent 5c: protocol ip pref 1000 handle 100:7:1 u32 ht 100:7: match u32 0xc6336407 0xffffffff at 12 flowid 5c:8000
filter add dev ifb-eth0 parent 5c: protocol ipv6 pref 2064 u32 match u32 0x20010db8 0xffffffff at 8 match u32 0x00000000 0xffffffff at 12 flowid 5c:8001
filter add dev ifb-eth0 parent 5c: protocol ip pref 3000 u32 {TCP4} match u32 0x00500000 0xffff0000 at 20 flowid 5c:2
filter add dev ifb-eth0 parent 5c: protocol ip pref 3000 u32 {TCP4} match u32 0x00000050 0x0000ffff at 20 flowid 5c:2
filter add dev ifb-eth0 parent 5c: protocol ipv6 pref 3001 u32 {TCP6} match u32 0x00500000 0xffff0000 at 40 flowid 5c:2
filter add dev ifb-eth0 parent 5c: protocol ipv6 pref 3001 u32 {TCP6} match u32 0x00000050 0x0000ffff at 40 flowid 5c:2
filter add dev ifb-eth0 parent 5c: protocol ip pref 4000 u32 {TCP4} match u32 0x00160000 0xffff0000 at 20 flowid 5c:10
filter add dev ifb-eth0 parent 5c: protocol ipv6 pref 4001 u32 {TCP6} match u32 0x00160000 0xffff0000 at 40 flowid 5c:10
"""
REDIRECT = (
    "filter add dev eth0 ingress protocol all pref 92 u32 match u32 0 0 action mirred egress redirect dev ifb-eth0\n"
)


@pytest.fixture
def config(write_config):
    return str(write_config(CONFIG))


def with_ifb(mocker, system, hook: dict | None = None) -> None:
    """ifb-eth0 exists, is shapekit's, and holds its tree; eth0's ingress hook is `hook`."""
    mocker.patch("socket.if_nametoindex", side_effect=lambda name: 2 if name in ("eth0", "ifb-eth0", "lo") else _gone())
    system.roots["ifb-eth0"] = SHAPEKIT_ROOT
    system.answers[("ip", "-j", "link", "show", "dev", "ifb-eth0")] = json.dumps(
        [{"ifalias": "shapekit ingress of eth0"}]
    )
    system.answers[("ip", "-j", "link", "show", "type", "ifb")] = json.dumps(
        [{"ifname": "ifb-eth0", "ifalias": "shapekit ingress of eth0"}]
    )
    if hook is not None:  # `tc -j qdisc show dev eth0` lists its root qdisc too
        root = [system.roots["eth0"]] if "eth0" in system.roots else []
        system.answers[("tc", "-j", "qdisc", "show", "dev", "eth0")] = json.dumps(root + hook["qdiscs"])
        system.answers[("tc", "-j", "filter", "show", "dev", "eth0", "ingress")] = json.dumps(hook["filters"])


def _gone() -> int:
    raise OSError(19, "No such device")


OUR_HOOK = {
    "qdiscs": [{"kind": "ingress", "handle": "ffff:", "parent": "ffff:fff1"}],
    "filters": [{"protocol": "all", "pref": 92, "kind": "u32", "options": {"actions": [{"to_dev": "ifb-eth0"}]}}],
}


def test_init_makes_the_ifb_its_tree_and_filters_then_the_redirect(system, cli, config):
    result = cli(init_app, "--config", config)

    assert result.exit_code == 0, result.stderr
    calls = [c for c in system.calls if c[0][:3] != ("unshare", "--net", "--") or c[0] == IFB_PROBE]
    assert calls == [
        (IFB_PROBE, ""),  # ifb, ingress, u32 and mirred, tried in a throwaway namespace
        (("tc", "-j", "qdisc", "show", "dev", "eth0"), None),  # no ingress filter at pref 92 that is not ours
        (("tc", "-j", "qdisc", "show", "dev", "eth0"), None),  # no tree of shapekit's built flat
        (("ipset", "list", "-t"), None),  # nor cap sets made before cap groups
        (("ip", "-j", "link", "show", "type", "ifb"), None),
        (("tc", "-j", "qdisc", "show", "dev", "eth0"), None),
        (READ_GSO, None),
        (BATCH, system.batches()[0]),  # eth0's egress tree, as without ingress
        (("tc", "-j", "qdisc", "show", "dev", "eth0"), None),  # its ingress hook before: what a failure puts back
        (("ip", "link", "add", "ifb-eth0", "type", "ifb"), None),
        (
            ("ip", "link", "set", "dev", "ifb-eth0", "alias", "shapekit ingress of eth0", "txqueuelen", "1000", "up"),
            None,
        ),
        (BATCH, IFB_BATCH),
        (BATCH, "qdisc add dev eth0 handle ffff: ingress\n" + REDIRECT),
        (HOLD_GSO, None),  # eth0's GSO held last: the IFB's super-packets come from GRO, not from TCP here
    ]


def test_init_again_reuses_the_ifb_and_keeps_its_own_redirect(system, cli, config, mocker):
    with_ifb(mocker, system, OUR_HOOK)

    result = cli(init_app, "--config", config)

    assert result.exit_code == 0, result.stderr
    assert ("ip", "link", "add", "ifb-eth0", "type", "ifb") not in [argv for argv, _ in system.calls]
    assert system.batches()[1] == "qdisc del dev ifb-eth0 root\n" + IFB_BATCH
    assert len(system.batches()) == 2  # its redirect to ifb-eth0 stays: a failing re-init cannot lose it


def test_a_class_leaf_in_the_ingress_table_overrides_its_leaf_for_that_class(system, cli, write_config):
    text = CONFIG.replace('rate = "10mbit"\nprio = 0', 'rate = "10mbit"\nprio = 0\nleaf = "fq_codel"')

    result = cli(init_app, "--config", str(write_config(text)))

    assert result.exit_code == 0, result.stderr
    assert system.batches()[1] == IFB_BATCH.replace(
        "qdisc add dev ifb-eth0 parent 5c:10 handle 10: pfifo\n",
        "qdisc add dev ifb-eth0 parent 5c:10 handle 10: fq_codel\n",
    )
    assert "fq_codel" not in system.batches()[0]  # eth0's egress tree keeps its pfifo leaves
    probe = ("unshare", "--net", "--", "tc", "-batch", "-")
    assert [stdin.splitlines()[-1] for argv, stdin in system.calls if argv == probe] == [
        "class add dev lo parent 1: classid 1:1 htb rate 1mbit",
        'filter add dev lo parent 1: protocol all prio 1 bpf bytecode "1,6 0 0 0"',
        "qdisc add dev lo parent 1:1 handle 2: fq_codel",
        "qdisc add dev lo parent 1:1 handle 2: pfifo",
    ]


def test_the_ingress_tree_takes_its_own_overhead_and_percentages(system, cli, write_config):
    text = CONFIG.replace(
        '[device.eth0.ingress]\nrate = "50mbit"',
        '[device.eth0.ingress]\nrate = "50mbit"\noverhead = 18\nlinklayer = "atm"',
    ).replace('rate = "10mbit"\nprio = 0', 'rate = "20%"\nprio = 0')  # of the ingress line: 10mbit

    result = cli(init_app, "--config", str(write_config(text)))

    assert result.exit_code == 0, result.stderr
    egress, ifb = system.batches()[0], system.batches()[1]
    assert "overhead" not in egress and "linklayer" not in egress  # eth0's egress line is another line
    assert ifb == re.sub(r"(htb rate .*? quantum \d+)", r"\1 overhead 18 linklayer atm", IFB_BATCH)
    assert ifb.count(" overhead 18 linklayer atm") == 6  # top, bypass, two classes, two caps


def test_an_ingress_class_leaf_that_is_no_leaf_qdisc_is_refused(system, cli, write_config):
    text = CONFIG.replace('rate = "10mbit"\nprio = 0', 'rate = "10mbit"\nprio = 0\nleaf = "red"')

    result = cli(init_app, "--config", str(write_config(text)))

    assert result.exit_code == 2
    assert result.stderr.endswith(
        "device.eth0.ingress.classes.ssh.leaf: 'red' is not one of 'sfq', 'fq_codel', 'cake', 'pfifo', 'none'\n"
    )
    assert result.stderr.count("\n") == 1
    assert system.calls == []


def test_seed_000_both_ways_classes_its_torrent_ports_in_aligned_blocks(system, cli):
    result = cli(init_app, "--config", str(DOWNLOAD_CONFIG))

    assert result.exit_code == 0, result.stderr
    torrent = [line.split(" at 20 ")[0].rsplit("match u32 ", 1)[1] for line in system.batches()[1].splitlines()
               if "pref 4000" in line and "flowid 5c:12" in line]  # fmt: skip
    # dport 61000:63000 as value/mask blocks that cover exactly that range
    assert torrent == [
        "0x0000ee48 0x0000fff8", "0x0000ee50 0x0000fff0", "0x0000ee60 0x0000ffe0", "0x0000ee80 0x0000ff80",
        "0x0000ef00 0x0000ff00", "0x0000f000 0x0000fc00", "0x0000f400 0x0000fe00", "0x0000f600 0x0000fff0",
        "0x0000f610 0x0000fff8", "0x0000f618 0x0000ffff",
    ]  # fmt: skip


def test_port_blocks_cover_a_range_exactly():
    for ports in ("61000:63000", "0:65535", "1:1", "1023:1025", "5900:5999"):
        covered = [v + n for v, mask in plan_ingress.port_blocks(ports) for n in range((~mask & 0xFFFF) + 1)]
        low, _, high = ports.partition(":")
        assert covered == list(range(int(low), int(high) + 1))


def test_the_ifb_name_fits_the_kernels_15_characters():
    assert ifb_name("eth0") == "ifb-eth0"
    assert ifb_name("enp0s31f6") == "ifb-enp0s31f6"
    long_names = ("enx00e04c680001", "enx00e04c680002")
    assert [len(ifb_name(n)) for n in long_names] == [15, 15]
    assert ifb_name(long_names[0]) != ifb_name(long_names[1])


@pytest.fixture
def booted(system, mocker):
    mocker.patch("time.time", return_value=NOW)
    system.roots["eth0"] = SHAPEKIT_ROOT
    system.answers[("ipset", "list", "-n")] = "SHAPEKIT-eth0-4\nSHAPEKIT-eth0-6\n"
    system.answers[("ip", "-j", "addr", "show")] = "[]"
    with_ifb(mocker, system, OUR_HOOK)
    return system


def test_add_in_touches_only_that_hosts_class_and_hash_node(booted, cli, config, tmp_path):
    result = cli(limit_ip_app, "add", "198.51.100.9", "1mbit", "--in", "--config", config)

    assert result.exit_code == 0, result.stderr
    assert booted.batches() == [
        "class add dev ifb-eth0 parent 5c:1 classid 5c:8002 htb rate 1mbit ceil 1mbit quantum 3906\n"
        "qdisc add dev ifb-eth0 parent 5c:8002 handle 8002: pfifo\n"
        "filter add dev ifb-eth0 parent 5c: protocol ip pref 1000 handle 100:9:3 u32 ht 100:9: "
        "match u32 0xc6336409 0xffffffff at 12 flowid 5c:8002\n"
    ]
    assert not [argv for argv, _ in booted.calls if argv[0] in ("ipset", "iptables-restore", "ip6tables-restore")]
    saved = json.loads((tmp_path / "state" / "limits.json").read_text())["caps"]
    assert [(c["host"], c["direction"], c["slot"]) for c in saved] == [("198.51.100.9/32", "in", 0x8002)]


def test_remove_in_deletes_the_node_before_its_class(booted, cli, config):
    cli(limit_ip_app, "add", "198.51.100.9", "1mbit", "--in", "--config", config)
    booted.answers[("tc", "class", "show", "dev", "ifb-eth0")] = (
        "class htb 5c:8002 parent 5c:1 leaf 8002: prio 0 rate 1Mbit ceil 1Mbit burst 1600b cburst 1600b\n"
    )
    get = ("tc", "filter", "get", "dev", "ifb-eth0", "parent", "5c:", "protocol", "ip", "pref", "1000")
    booted.answers[(*get, "handle", "100:9:3", "u32")] = filter_lines(
        ("ip", 1000, "100:9:3", "5c:8002", "c6336409/ffffffff at 12")
    )  # one node asked for, not the whole table
    booted.run.reset_mock()

    result = cli(limit_ip_app, "remove", "198.51.100.9", "--config", config)

    assert result.exit_code == 0, result.stderr
    assert booted.batches() == [
        "filter del dev ifb-eth0 parent 5c: protocol ip pref 1000 handle 100:9:3 u32\n"
        "class del dev ifb-eth0 classid 5c:8002\n"  # HTB refuses to delete a class a filter points to
    ]


def test_a_network_cap_rewrites_its_prefix_lengths_pref(booted, cli, config):
    booted.answers[IFB_FILTERS] = filter_lines(("ipv6", 2064, "800::800", "5c:8001", "20010db8/ffffffff at 8"))

    result = cli(limit_ip_app, "add", "2001:db8:1::/64", "1mbit", "--in", "--config", config)

    assert result.exit_code == 0, result.stderr
    assert booted.batches()[0].splitlines()[2:] == [
        "filter del dev ifb-eth0 parent 5c: protocol ipv6 pref 2064 u32",
        "filter add dev ifb-eth0 parent 5c: protocol ipv6 pref 2064 u32 match u32 0x20010db8 0xffffffff at 8 "
        "match u32 0x00000000 0xffffffff at 12 flowid 5c:8001",
        "filter add dev ifb-eth0 parent 5c: protocol ipv6 pref 2064 u32 match u32 0x20010db8 0xffffffff at 8 "
        "match u32 0x00010000 0xffffffff at 12 flowid 5c:8002",
    ]


def test_install_keeps_the_hash_tables_and_changes_nodes_one_by_one(booted, cli, config):
    booted.answers[IFB_FILTERS] = filter_lines(
        ("ip", 1000, "100:7:1", "5c:8000", "c6336407/ffffffff at 12"),  # as planned: left alone
        ("ip", 1000, "100:8:2", "5c:8002", "c6336408/ffffffff at 12"),  # lifted since
        ("ip", 1000, "100:9:1", "5c:8003", "c6336409/ffffffff at 12"),  # node of another host than planned
        ("ipv6", 2064, "800::800", "5c:8001", "20010db8/ffffffff at 8"),
    )
    booted.answers[("tc", "class", "show", "dev", "ifb-eth0")] = "".join(
        f"class htb 5c:{m} parent 5c:1 leaf {m}: prio 0 rate {r} ceil {r} burst 1600b cburst 1600b\n"
        for m, r in (("8000", "2Mbit"), ("8001", "4Mbit"), ("8002", "1Mbit"))
    )

    result = cli(limit_ip_app, "--config", config)

    assert result.exit_code == 0, result.stderr
    assert booted.batches()[-1] == (
        "filter del dev ifb-eth0 parent 5c: protocol ip pref 1000 handle 100:8:2 u32\n"
        "filter del dev ifb-eth0 parent 5c: protocol ip pref 1000 handle 100:9:1 u32\n"
        "filter del dev ifb-eth0 parent 5c: protocol ipv6 pref 2064 u32\n"
        "class del dev ifb-eth0 classid 5c:8002\n"
        "filter add dev ifb-eth0 parent 5c: protocol ipv6 pref 2064 u32 match u32 0x20010db8 0xffffffff at 8 "
        "match u32 0x00000000 0xffffffff at 12 flowid 5c:8001\n"
    )


def test_a_node_that_holds_another_host_is_deleted_and_added_since_replace_keeps_its_keys(booted, cli, config):
    booted.answers[IFB_FILTERS] = filter_lines(("ip", 1000, "100:7:1", "5c:8000", "c6336507/ffffffff at 12"))

    result = cli(limit_ip_app, "--config", config)

    assert result.exit_code == 0, result.stderr
    lines = booted.batches()[-1].splitlines()
    at = lines.index("filter del dev ifb-eth0 parent 5c: protocol ip pref 1000 handle 100:7:1 u32")
    assert lines[at + 1] == (
        "filter add dev ifb-eth0 parent 5c: protocol ip pref 1000 handle 100:7:1 u32 ht 100:7: "
        "match u32 0xc6336407 0xffffffff at 12 flowid 5c:8000"
    )


def test_a_pref_92_ingress_filter_of_someone_else_is_refused_before_any_change(system, cli, config):
    hook = {"qdiscs": OUR_HOOK["qdiscs"], "filters": [{"pref": 92, "options": {"actions": [{"to_dev": "ifb0"}]}}]}
    system.answers[("tc", "-j", "qdisc", "show", "dev", "eth0")] = json.dumps(hook["qdiscs"])
    system.answers[("tc", "-j", "filter", "show", "dev", "eth0", "ingress")] = json.dumps(hook["filters"])

    result = cli(init_app, "--config", config)

    assert result.exit_code == 2
    assert "eth0's ingress filter at pref 92 is not shapekit's (it does not redirect to ifb-eth0)" in result.stderr
    assert system.batches() == []


def test_more_rule_filters_than_u32_keeps_in_order_are_refused(system, cli, write_config):
    rule = '\n[[mark]]\nclass = "bulk"\ndirection = "in"\nproto = "udp"\ndport = [{}]\n'
    odd = [", ".join(f'"{2 * (15 * r + n) + 1}"' for n in range(15)) for r in range(140)]  # a filter each
    text = CONFIG + "".join(rule.format(ports) for ports in odd)

    result = cli(init_app, "--config", str(write_config(text)))

    assert result.exit_code == 2
    assert "u32 filters at pref 4000, more than the 2047 u32 keeps in order" in result.stderr
    assert system.batches() == []


def test_bypass_add_rewrites_the_ingress_bypass_filters_too(booted, cli, config):
    booted.answers[IFB_FILTERS] = (
        "filter parent 5c: protocol ip pref 3000 u32 chain 0\nfilter parent 5c: protocol ipv6 pref 3001 u32 chain 0\n"
    )

    result = cli(bypass_app, "add", "443/tcp", "--config", config)

    assert result.exit_code == 0, result.stderr
    lines = booted.batches()[0].splitlines()
    assert lines[:2] == [
        "filter del dev ifb-eth0 parent 5c: protocol ip pref 3000 u32",
        "filter del dev ifb-eth0 parent 5c: protocol ipv6 pref 3001 u32",
    ]
    assert [line for line in lines if "1bb" in line] == [
        f"filter add dev ifb-eth0 parent 5c: protocol ip pref 3000 u32 {TCP4} match u32 0x01bb0000 0xffff0000 at 20 flowid 5c:2",
        f"filter add dev ifb-eth0 parent 5c: protocol ip pref 3000 u32 {TCP4} match u32 0x000001bb 0x0000ffff at 20 flowid 5c:2",
        f"filter add dev ifb-eth0 parent 5c: protocol ipv6 pref 3001 u32 {TCP6} match u32 0x01bb0000 0xffff0000 at 40 flowid 5c:2",
        f"filter add dev ifb-eth0 parent 5c: protocol ipv6 pref 3001 u32 {TCP6} match u32 0x000001bb 0x0000ffff at 40 flowid 5c:2",
    ]


def test_mark_rewrites_the_direction_in_rules(booted, cli, config):
    result = cli(mark_app, "--config", config)

    assert result.exit_code == 0, result.stderr
    assert booted.batches() == [
        f"filter add dev ifb-eth0 parent 5c: protocol ip pref 4000 u32 {TCP4} match u32 0x00160000 0xffff0000 at 20 flowid 5c:10\n"
        f"filter add dev ifb-eth0 parent 5c: protocol ipv6 pref 4001 u32 {TCP6} match u32 0x00160000 0xffff0000 at 40 flowid 5c:10\n"
    ]
    restored = "".join(stdin for argv, stdin in booted.calls if argv[0] == "iptables-restore")
    assert "--sport 22" not in restored  # a direction = "in" rule is no netfilter rule


IN_RULE = '\n[[mark]]\nclass = "ssh"\ndirection = "in"\n'


def _rule_filters(booted, cli, write_config, keys: str) -> list[str]:
    """The filter lines shape-mark writes for one more direction = "in" rule (after the config's sport 22)."""
    result = cli(mark_app, "--config", str(write_config(CONFIG + IN_RULE + keys)))

    assert result.exit_code == 0, result.stderr
    return booted.batches()[0].splitlines()[2:]


def test_an_in_rule_on_dscp_matches_the_tos_byte_and_the_traffic_class(booted, cli, write_config):
    assert _rule_filters(booted, cli, write_config, 'dscp = "EF"\n') == [
        "filter add dev ifb-eth0 parent 5c: protocol ip pref 4000 u32 match u32 0x00b80000 0x00fc0000 at 0 flowid 5c:10",
        "filter add dev ifb-eth0 parent 5c: protocol ipv6 pref 4001 u32 match u32 0x0b800000 0x0fc00000 at 0 flowid 5c:10",
    ]


def test_an_in_rule_on_length_matches_ipv4_total_length_and_ipv6_payload_length_in_blocks(booted, cli, write_config):
    # 0..128 bytes: IPv4 total length 0..127 and 128; IPv6 payload length 0..88 (its 40-byte header not counted there).
    assert _rule_filters(booted, cli, write_config, 'length = "0:128"\n') == [
        "filter add dev ifb-eth0 parent 5c: protocol ip pref 4000 u32 match u32 0x00000000 0x0000ff80 at 0 flowid 5c:10",
        "filter add dev ifb-eth0 parent 5c: protocol ip pref 4000 u32 match u32 0x00000080 0x0000ffff at 0 flowid 5c:10",
        "filter add dev ifb-eth0 parent 5c: protocol ipv6 pref 4001 u32 match u32 0x00000000 0xffc00000 at 4 flowid 5c:10",
        "filter add dev ifb-eth0 parent 5c: protocol ipv6 pref 4001 u32 match u32 0x00400000 0xfff00000 at 4 flowid 5c:10",
        "filter add dev ifb-eth0 parent 5c: protocol ipv6 pref 4001 u32 match u32 0x00500000 0xfff80000 at 4 flowid 5c:10",
        "filter add dev ifb-eth0 parent 5c: protocol ipv6 pref 4001 u32 match u32 0x00580000 0xffff0000 at 4 flowid 5c:10",
    ]


def test_an_in_rule_on_a_length_below_40_bytes_is_ipv4_only(booted, cli, write_config):
    assert _rule_filters(booted, cli, write_config, "length = 28\n") == [
        "filter add dev ifb-eth0 parent 5c: protocol ip pref 4000 u32 match u32 0x0000001c 0x0000ffff at 0 flowid 5c:10",
    ]


def test_an_in_rule_on_a_tcp_flags_list_masks_fin_syn_rst_ack(booted, cli, write_config):
    lines = _rule_filters(booted, cli, write_config, 'proto = "tcp"\ntcp_flags = ["ack", "fin"]\n')

    assert lines == [
        f"filter add dev ifb-eth0 parent 5c: protocol ip pref 4000 u32 {TCP4} match u32 0x00110000 0x00170000 at 32 flowid 5c:10",
        f"filter add dev ifb-eth0 parent 5c: protocol ipv6 pref 4001 u32 {TCP6} match u32 0x00110000 0x00170000 at 52 flowid 5c:10",
    ]


def test_an_in_rule_with_every_new_key_keys_each_length_block(booted, cli, write_config):
    keys = 'proto = "tcp"\ntcp_flags = ["ack"]\ndscp = "cs1"\nlength = "40:64"\ndst = "198.51.100.0/24"\n'

    assert _rule_filters(booted, cli, write_config, keys) == [
        f"filter add dev ifb-eth0 parent 5c: protocol ip pref 4000 u32 match u32 0xc6336400 0xffffff00 at 16 {TCP4} "
        f"match u32 0x00100000 0x00170000 at 32 match u32 0x00200000 0x00fc0000 at 0 match u32 0x{v:08x} 0x{m:08x} at 0 flowid 5c:10"
        for v, m in ((40, 0xFFF8), (48, 0xFFF0), (64, 0xFFFF))
    ]


def test_length_blocks_cover_the_range_exactly():
    for first, last in ((0, 128), (40, 1500), (1, 65535), (7, 7)):
        covered = {
            n for value, mask in plan_ingress.range_blocks(first, last) for n in range(65536) if n & mask == value
        }
        assert covered == set(range(first, last + 1))


def test_init_takes_away_ingress_shaping_the_config_no_longer_has(system, cli, write_config, mocker):
    with_ifb(mocker, system, OUR_HOOK)

    result = cli(init_app, "--config", str(write_config('[device.eth0]\nrate = "10mbit"\nleaf = "pfifo"\n')))

    assert result.exit_code == 0, result.stderr
    assert system.batches()[1:] == [
        "qdisc del dev eth0 ingress\n"  # its filter with it: one step
    ]
    assert (("ip", "link", "del", "dev", "ifb-eth0"), None) in system.calls


def test_flush_removes_the_redirect_the_empty_ingress_qdisc_and_the_ifb(system, cli, config, mocker):
    with_ifb(mocker, system, OUR_HOOK)

    result = cli(flush_app, "--config", config)

    assert result.exit_code == 0, result.stderr
    assert system.batches() == [
        "qdisc del dev eth0 ingress\n"  # its filter with it: one step,
    ]
    assert (("ip", "link", "del", "dev", "ifb-eth0"), None) in system.calls


def test_flush_keeps_an_ingress_qdisc_that_holds_others_filters(system, cli, config, mocker):
    foreign = {"protocol": "ip", "pref": 300, "kind": "u32"}
    with_ifb(mocker, system, {"qdiscs": OUR_HOOK["qdiscs"], "filters": [*OUR_HOOK["filters"], foreign]})

    result = cli(flush_app, "--dev", "eth0", "--config", config)

    assert result.exit_code == 0, result.stderr
    assert system.batches() == ["filter del dev eth0 ingress protocol all pref 92 u32\n"]


def test_check_names_a_missing_cap_filter_and_a_stray_one():
    want = [plan_ingress.U32Filter(4, 1000, (plan_ingress.U32Key(0xC6336407, 0xFFFFFFFF, 12),), "5c:8000").entry()]
    have = drift.parse_u32_filters(
        "filter parent 5c: protocol ip pref 1000 u32 chain 0 fh 100:7:1 order 1 key ht 100 bkt 7 *flowid 5c:8001 not_in_hw\n"
        "  match c6336407/ffffffff at 12\n"
    )
    assert drift.diff_filters("ifb-eth0", want, have) == [
        "ifb-eth0: the ip u32 filter to 5c:8000 (pref 1000: c6336407/ffffffff@12) is missing",
        "ifb-eth0: the ip u32 filter to 5c:8001 (pref 1000: c6336407/ffffffff@12) is not in the config",
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (CONFIG.replace('leaf = "pfifo"\n\n[device.eth0.ingress.classes.ssh]', 'classifier = "fw"\n\n[device.eth0.ingress.classes.ssh]'),
         "device.eth0.ingress.classifier: arriving packets have no netfilter mark yet"),
        (CONFIG.replace('rate = "10mbit"\nprio = 0', 'rate = "10mbit"\nmark = 7'),
         'device.eth0.ingress.classes.ssh.mark: arriving packets have no netfilter mark yet: pick this class with a [[mark]] rule with direction = "in"'),
        (CONFIG + '\n[[mark]]\nclass = "ssh"\ndirection = "in"\nl7proto = "ssh"\n',
         "mark[2].l7proto: the layer7 match is netfilter's"),
        (CONFIG + '\n[[mark]]\nclass = "ssh"\ndirection = "in"\nsrc_mac = "02:00:00:00:00:01"\n',
         "mark[2].src_mac: arriving packets are classed on the IFB from their network header, where no MAC is"),
        (CONFIG + '\n[[mark]]\nclass = "nosuch"\ndirection = "in"\n',
         "mark[2].class: 'nosuch' is not a class of [device.eth0.ingress]"),
        (CONFIG + '\n[[mark]]\nclass = "ssh"\ndirection = "up"\n',
         """mark[2].direction: 'up' is not "out" (sent, the default) or "in" (arriving)"""),
        (CONFIG.replace('direction = "both"', 'direction = "sideways"'),
         """'sideways' is not "out" (to the host), "in" (from it) or "both\""""),
        (CONFIG.replace('rate = "2mbit", direction = "in"', 'rate = "60mbit", direction = "in"'),
         "60mbit is above the device's line rate 50mbit"),
    ],
)  # fmt: skip
def test_configs_that_cannot_work_on_ingress_are_refused(system, cli, write_config, text, message):
    result = cli(init_app, "--config", str(write_config(text)))

    assert result.exit_code == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert system.calls == []


def test_direction_in_needs_an_ingress_table(system, cli, write_config):
    text = (
        '[device.eth0]\nrate = "10mbit"\n[device.eth0.limits]\n"198.51.100.7" = { rate = "1mbit", direction = "in" }\n'
    )

    result = cli(init_app, "--config", str(write_config(text)))

    assert result.exit_code == 2
    assert """direction 'in' needs a [device.eth0.ingress] table""" in result.stderr


def test_add_in_for_a_while_is_refused_before_any_change(booted, cli, config):
    result = cli(limit_ip_app, "add", "198.51.100.9", "1mbit", "--in", "--for", "2h", "--config", config)

    assert result.exit_code == 2
    assert "--for cannot time a cap on arriving traffic: its u32 filter has no timeout" in result.stderr
    assert booted.calls == []


def test_add_in_on_a_device_without_ingress_says_how(booted, cli, write_config):
    config = write_config('[device.eth0]\nrate = "10mbit"\n')

    result = cli(limit_ip_app, "add", "198.51.100.9", "1mbit", "--in", "--config", str(config))

    assert result.exit_code == 2
    assert "eth0 shapes no arriving traffic: add a [device.eth0.ingress] table" in result.stderr
    assert booted.calls == []


def test_a_foreign_device_with_the_ifb_name_is_refused_before_any_change(system, cli, config, mocker):
    mocker.patch("socket.if_nametoindex", side_effect=lambda name: 2 if name in ("eth0", "ifb-eth0", "lo") else _gone())
    system.answers[("ip", "-j", "link", "show", "dev", "ifb-eth0")] = json.dumps([{"ifalias": ""}])

    result = cli(init_app, "--config", config)

    assert result.exit_code == 2
    assert "device 'ifb-eth0' exists and is not shapekit's IFB for eth0" in result.stderr
    assert system.batches() == []
