"""shape-status: reading the kernel's class dump, naming, rates and rendering, on recorded data."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families  # a test dependency: Prometheus's parser

from shapekit.commands import common
from shapekit.commands.init import init_app
from shapekit.commands.status import status_app
from shapekit.config.load import parse_config
from shapekit.errors import Interrupted, UsageError
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
    before = [c if c.classid != "5c:10" else c._replace(bytes=c.bytes - 500_000) for c in after]
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

    def sample(options, devs, interval, caught):
        try:
            return next(documents)
        except StopIteration:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: caught, then the wait ends at once
            time.sleep(0.5)
            assert caught == [signal.SIGINT]
            raise Interrupted(signal.SIGINT, "nothing was changed") from None

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


# --- Prometheus's text format ------------------------------------------------------------------------


def _cap_rows() -> list[status.ClassRow]:
    device = parse_config(CONFIG, Path("shapekit.toml")).devices["skqa"]
    placed = place_caps(device, [], 0)
    cap = tc_netlink.ClassStats("8001:1", "root", "htb", 128_000, 128_000, 2048, 2, 1, 3, 1514, 1)
    after = [*tc_netlink.parse_messages(DUMP)[0], cap]
    return status.class_rows(status.class_names(device, placed), [], after, 1, device)


def test_prometheus_text_names_each_class_and_the_caps_host():
    text = status.prometheus_text(
        [status.TreeSample("skqa", "out", _cap_rows())],
        status.rule_rows(4, SAVE_WITH_COUNTERS),
        {("skqa", "out", "config"): 1, ("skqa", "out", "run-time"): 0},
        1_800_000_000.5,
    )
    lines = text.splitlines()

    assert lines[:3] == [
        "# HELP shapekit_up 1: shape-status read the kernel; 0: it failed (its error is in the log).",
        "# TYPE shapekit_up gauge",
        "shapekit_up 1",
    ]
    assert [line for line in lines if line.startswith("shapekit_class_sent_bytes_total")] == [
        'shapekit_class_sent_bytes_total{device="skqa",direction="out",class="5c:1",name="line"} 1055618',
        'shapekit_class_sent_bytes_total{device="skqa",direction="out",class="5c:2",name="bypass"} 0',
        'shapekit_class_sent_bytes_total{device="skqa",direction="out",class="5c:10",name="b"} 1055618',
        'shapekit_class_sent_bytes_total{device="skqa",direction="out",class="8001:1",name="cap 198.51.100.7",'
        'host="198.51.100.7"} 2048',
    ]
    cap = '{device="skqa",direction="out",class="8001:1",name="cap 198.51.100.7",host="198.51.100.7"}'
    assert f"shapekit_class_ceil_bytes_per_second{cap} 16000" in lines  # 128kbit: Prometheus counts bytes
    assert f"shapekit_class_backlog_bytes{cap} 1514" in lines and f"shapekit_class_queue_packets{cap} 1" in lines
    assert f"shapekit_class_dropped_packets_total{cap} 1" in lines
    assert (
        'shapekit_rule_matched_packets_total{family="ipv4",chain="SHAPEKIT-MARK",position="1",rule="mark[1] b"} 12'
        in lines
    )
    assert 'shapekit_caps{device="skqa",direction="out",source="config"} 1' in lines
    assert lines[-3:] == [
        "# HELP shapekit_last_init_timestamp_seconds When shape-init last finished without an error (Unix time).",
        "# TYPE shapekit_last_init_timestamp_seconds gauge",
        "shapekit_last_init_timestamp_seconds 1800000000.5",
    ]


def test_prometheus_text_is_what_prometheus_parses_counters_and_gauges_as_typed():
    rules = [status.RuleRow(6, "SHAPEKIT-MARK", 'a "quoted" \\ rule\nof two lines', 5, 300)]
    text = status.prometheus_text([status.TreeSample("skqa", "in", _cap_rows())], rules, {}, None)

    families = {f.name: f for f in text_string_to_metric_families(text)}

    assert {name: f.type for name, f in families.items()} == {
        "shapekit_up": "gauge",
        "shapekit_class_sent_bytes": "counter",  # the parser names a counter without its _total
        "shapekit_class_sent_packets": "counter",
        "shapekit_class_dropped_packets": "counter",
        "shapekit_class_overlimits": "counter",
        "shapekit_class_backlog_bytes": "gauge",
        "shapekit_class_queue_packets": "gauge",
        "shapekit_class_rate_bytes_per_second": "gauge",
        "shapekit_class_ceil_bytes_per_second": "gauge",
        "shapekit_rule_matched_packets": "counter",
        "shapekit_rule_matched_bytes": "counter",
    }
    rule = families["shapekit_rule_matched_bytes"].samples[0]
    assert rule.labels == {
        "family": "ipv6",
        "chain": "SHAPEKIT-MARK",
        "position": "1",
        "rule": 'a "quoted" \\ rule\nof two lines',
    }
    assert rule.value == 300
    cap = families["shapekit_class_rate_bytes_per_second"].samples[-1]
    assert (cap.labels["direction"], cap.labels["host"], cap.value) == ("in", "198.51.100.7", 16000)


@pytest.fixture
def metrics(mocker):
    return mocker.patch("shapekit.commands.status.prometheus_sample", return_value="shapekit_up 1\n")


def test_format_prometheus_prints_one_read(metrics, cli):
    result = cli(status_app, "--format", "prometheus", "--dev", "eth0")

    assert result.exit_code == 0, result.stderr
    assert result.stdout == "shapekit_up 1\n"
    assert metrics.call_args.args[1] == ["eth0"]


def test_output_replaces_the_file_whole_and_a_failed_sample_leaves_up_0(metrics, cli, tmp_path, mocker):
    path = tmp_path / "textfile" / "shapekit.prom"
    fsync = mocker.spy(os, "fsync")

    assert cli(status_app, "--format", "prometheus", "--output", str(path)).exit_code == 0
    assert fsync.call_count == 0  # node_exporter's textfile collector asks for a rename, not a sync
    assert path.read_text() == "shapekit_up 1\n"
    assert [p.name for p in path.parent.iterdir()] == ["shapekit.prom"]  # no temporary file left

    metrics.side_effect = UsageError("device 'eth0' is gone: check it with `ip link`")
    result = cli(status_app, "--format", "prometheus", "--output", str(path))

    assert result.exit_code == 2
    assert result.stderr == "shape-status: device 'eth0' is gone: check it with `ip link`\n"
    assert (
        path.read_text()
        == "# HELP shapekit_up 1: shape-status read the kernel; 0: it failed (its error is in the log).\n# TYPE shapekit_up gauge\nshapekit_up 0\n"
    )


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (["--json", "--format", "prometheus"], "--json and --format prometheus do not go together: pick one"),
        (["--watch", "--output", "x.prom"], "--watch and --output do not go together: a file holds one sample"),
        (["--watch", "--format", "prometheus"], "--watch and --format prometheus do not go together"),
    ],
)
def test_options_that_do_not_go_together_are_one_line(metrics, cli, args, problem):
    result = cli(status_app, *args)

    assert result.exit_code == 2
    assert result.stderr.startswith(f"shape-status: {problem}") and result.stderr.count("\n") == 1
    assert metrics.call_count == 0


def test_json_to_a_file_writes_one_sample(sampled, cli, tmp_path):
    result = cli(status_app, "--json", "--output", str(tmp_path / "status.json"))

    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""
    assert json.loads((tmp_path / "status.json").read_text()) == {"n": 1}


def test_drift_metrics_say_whether_and_how_much_the_kernel_differs():
    families = {f.name: f for f in text_string_to_metric_families(status.drift_text(["eth0: 5c:10 is gone", "x"]))}

    assert {name: (f.type, f.samples[0].value) for name, f in families.items()} == {
        "shapekit_drift_check_up": ("gauge", 1),
        "shapekit_drift": ("gauge", 1),
        "shapekit_drift_differences": ("gauge", 2),
    }
    assert "shapekit_drift 0\n" in status.drift_text([])
    assert status.drift_down().endswith("shapekit_drift_check_up 0\n")


@pytest.fixture
def drift(mocker):
    return mocker.patch("shapekit.commands.init.check_drift", return_value=["eth0: 5c:10 is gone"])


def test_check_as_metrics_writes_the_file_and_leaves_drift_to_the_metric(drift, cli, tmp_path):
    path = tmp_path / "shapekit-drift.prom"

    result = cli(init_app, "--check", "--format", "prometheus", "--output", str(path))

    assert result.exit_code == 0 and result.stdout == "" and result.stderr == ""  # 1, 2: the check or file failed
    assert "shapekit_drift 1\n" in path.read_text() and "shapekit_drift_differences 1\n" in path.read_text()

    drift.return_value = []
    assert cli(init_app, "--check", "--format", "prometheus", "--output", str(path)).exit_code == 0
    assert "shapekit_drift 0\n" in path.read_text()

    drift.side_effect = UsageError("--check reads the kernel's netfilter and ipset state: run it as root")
    result = cli(init_app, "--check", "--format", "prometheus", "--output", str(path))
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert path.read_text().endswith("shapekit_drift_check_up 0\n")


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (["--format", "prometheus"], "--format goes with --check: shape-init --check --format prometheus"),
        (["--check", "--output", "x.prom"], "--output goes with --check --format prometheus"),
    ],
)
def test_drift_metrics_options_alone_are_refused_in_one_line(drift, cli, args, problem):
    result = cli(init_app, *args)

    assert result.exit_code == 2
    assert result.stderr == f"shape-init: {problem}\n"
    assert drift.call_count == 0


def test_two_rules_that_read_alike_are_two_series():
    restore = status.RuleRow(4, "SHAPEKIT-MARK", "-m connmark ! --mark 0x0", 5, 300)  # per-packet [[mark]] rules
    text = status.prometheus_text([], [restore, restore], {}, None)

    samples = next(f for f in text_string_to_metric_families(text) if f.name == "shapekit_rule_matched_bytes").samples
    assert [s.labels["position"] for s in samples] == ["1", "2"]
    assert len({tuple(sorted(s.labels.items())) for s in samples}) == 2


def test_in_background_gives_what_the_work_returned_or_raises_what_it_raised():
    assert common.in_background(lambda: 42)() == 42
    failing = common.in_background(lambda: (_ for _ in ()).throw(UsageError("iptables-save is not installed")))
    with pytest.raises(UsageError, match="iptables-save is not installed"):
        failing()
