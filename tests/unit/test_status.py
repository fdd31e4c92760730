"""shape-status: reading the kernel's class dump, naming, rates and rendering, on recorded data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shapekit.commands.status import status_app
from shapekit.config.load import parse_config
from shapekit.kernel import netlink as tc_netlink
from shapekit.plan import status
from shapekit.plan.limits import place_caps

# One RTM_GETTCLASS dump, recorded from a veth with shapekit's tree after 2 s of iperf3
# through the default class b (rate 1mbit, ceil 2mbit); `tc -s class show` said the same.
DUMP = bytes.fromhex((Path(__file__).parent / "data" / "htb_class_dump.hex").read_text().strip())

CONFIG = {
    "device": {
        "skqa": {
            "rate": "10mbit",
            "default": "b",
            "leaf": "pfifo",
            "classifier": "classify",
            "classes": {"b": {"rate": "1mbit", "ceil": "2mbit"}},
            "limits": {"198.51.100.7": "128kbit"},
        }
    }
}

SAVE_WITH_COUNTERS = """\
*mangle
:POSTROUTING ACCEPT [100:20000]
[5:300] -A POSTROUTING -p udp -j ACCEPT
[100:20000] -A POSTROUTING -j SHAPEKIT
[7:420] -A SHAPEKIT-BYPASS -p tcp -m multiport --ports 22,80 -j MARK --set-xmark 0x3e9/0xffffffff
[3:180] -A SHAPEKIT-LIMIT -o skqa -j SET --map-set SHAPEKIT-skqa-4 dst --map-prio --map-mark
[12:1440] -A SHAPEKIT-MARK -p udp -m udp --dport 53 -m comment --comment "mark[1] b" -g SHAPEKIT-CONN-6029328
COMMIT
"""


def test_the_recorded_dump_reads_as_tc_showed_it():
    classes, done = tc_netlink.parse_messages(DUMP)

    assert done
    assert classes == [
        tc_netlink.ClassStats("5c:10", "5c:1", "htb", 1_000_000, 2_000_000, 1_055_618, 726, 0, 49, 0, 0),
        tc_netlink.ClassStats("5c:1", "root", "htb", 10_000_000, 10_000_000, 1_055_618, 726, 0, 31, 0, 0),
        tc_netlink.ClassStats("5c:2", "5c:1", "htb", 10_000_000, 10_000_000, 0, 0, 0, 0, 0, 0),
    ]


def test_dump_request_asks_for_one_device():
    request = tc_netlink.dump_request(7, seq=3)

    assert len(request) == 16 + 20
    assert request[4:6] == (42).to_bytes(2, "little")  # RTM_GETTCLASS
    assert request[16 + 4 : 16 + 8] == (7).to_bytes(4, "little")  # ifindex


def _rows() -> list[status.ClassRow]:
    device = parse_config(CONFIG, Path("shapekit.toml")).devices["skqa"]
    names = status.class_names(device, place_caps(device, [], 0))
    after, _ = tc_netlink.parse_messages(DUMP)
    before = [
        c if c.classid != "5c:10" else tc_netlink.ClassStats(**{**c.__dict__, "bytes": c.bytes - 500_000})
        for c in after
    ]
    return status.class_rows(names, before, after, seconds=2.0)


def test_rows_name_every_class_and_rate_it_over_the_interval():
    rows = _rows()

    assert [(r.name, r.classid, r.throughput) for r in rows] == [
        ("(line)", "5c:1", 0.0),
        ("bypass", "5c:2", 0.0),
        ("b (default)", "5c:10", 2_000_000.0),  # 500,000 bytes in 2 s
    ]


def test_a_class_shapekit_did_not_make_is_shown_as_such():
    device = parse_config(CONFIG, Path("shapekit.toml")).devices["skqa"]
    foreign = tc_netlink.ClassStats("5c:77", "5c:1", "htb", 8, 8, 0, 0, 0, 0, 0, 0)

    rows = status.class_rows(status.class_names(device, []), [], [foreign], 1.0)

    assert rows[0].name == "(not shapekit's)"


def test_rule_counters_from_iptables_save():
    assert status.rule_rows(4, SAVE_WITH_COUNTERS) == [
        status.RuleRow(4, "SHAPEKIT-BYPASS", "-p tcp -m multiport --ports 22,80", 7, 420),
        status.RuleRow(4, "SHAPEKIT-LIMIT", "caps on skqa", 3, 180),
        status.RuleRow(4, "SHAPEKIT-MARK", "mark[1] b", 12, 1440),
    ]


def test_render():
    document = status.sample_document(
        "2026-11-23T12:00:00+00:00", 2.0, {"skqa": _rows()}, status.rule_rows(4, SAVE_WITH_COUNTERS)
    )

    assert status.render(document).splitlines() == [
        "shapekit status at 2026-11-23T12:00:00+00:00 (over 2s)",
        "",
        "skqa",
        "NAME         CLASS  RATE    CEIL    NOW    SENT    PACKETS  DROPS  OVERLIMITS  BACKLOG",
        "(line)       5c:1   10mbit  10mbit  0bit   1.06MB  726      0      31          0B/0p",
        "bypass       5c:2   10mbit  10mbit  0bit   0B      0        0      0           0B/0p",
        "b (default)  5c:10  1mbit   2mbit   2mbit  1.06MB  726      0      49          0B/0p",
        "",
        "FAMILY  CHAIN            RULE                               PACKETS  BYTES",
        "IPv4    SHAPEKIT-BYPASS  -p tcp -m multiport --ports 22,80  7        420B",
        "IPv4    SHAPEKIT-LIMIT   caps on skqa                       3        180B",
        "IPv4    SHAPEKIT-MARK    mark[1] b                          12       1.44KB",
    ]
    assert json.loads(json.dumps(document))["devices"]["skqa"][2]["throughput"] == 2_000_000.0


def test_without_root_the_rule_counters_are_named_missing():
    document = status.sample_document("t", 1.0, {}, None)

    assert status.render(document).splitlines()[-1] == "rule counters: run as root to read them"


@pytest.fixture
def sampled(mocker):
    documents = iter([{"n": 1}, {"n": 2}])

    def sample(options, devs, interval):
        try:
            return next(documents)
        except StopIteration:
            raise KeyboardInterrupt from None

    return mocker.patch("shapekit.commands.status.status_sample", side_effect=sample)


def test_json_prints_one_document_per_sample_and_ctrl_c_ends_watch_cleanly(sampled, cli):
    result = cli(status_app, "--json", "--watch", "--interval", "0.5")

    assert result.exit_code == 0, result.stderr
    assert [json.loads(line) for line in result.stdout.splitlines()] == [{"n": 1}, {"n": 2}]
    assert sampled.call_args.args[2] == 0.5
    assert result.stderr == ""


def test_interval_must_be_positive(cli):
    assert cli(status_app, "--interval", "0").exit_code == 2


def test_a_cap_and_its_group_are_named():
    device = parse_config(CONFIG, Path("shapekit.toml")).devices["skqa"]

    names = status.class_names(device, place_caps(device, [], 0))

    assert names == {
        "5c:1": "(line)",
        "5c:2": "bypass",
        "5c:10": "b (default)",
        "5c:8001": "cap group 1",  # the group class under the top class, at the line rate
        "8001:1": "cap 198.51.100.7",  # the cap's class, in the group's own HTB qdisc
    }
