"""shape-status on a real kernel: under a known load, the loaded class shows the rate the test measured."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from pathlib import Path

from netns import script
from prometheus_client.parser import text_string_to_metric_families

CONFIG = """
[device.DEV]
rate = "100mbit"
default = "bulk"
leaf = "pfifo"
classifier = "classify"

[device.DEV.classes.bulk]
rate = "1mbit"
ceil = "2mbit"

[device.DEV.classes.idle]
rate = "1mbit"

[device.DEV.limits]
"198.18.0.77" = "1mbit"

[[mark]]
class = "idle"
proto = "udp"
dport = 5353
"""


def test_the_loaded_class_shows_the_measured_rate_and_idle_classes_show_none(netpair):
    config = str(netpair.write_config(CONFIG))
    for command in ("shape-init", "shape-bypass", "shape-mark", "shape-limit-ip"):
        netpair.shapekit(command, "--config", config)
    argv = ["ip", "netns", "exec", netpair.left.name, script("shape-status"), "--config", config, "--json"]

    samples = []

    def sample() -> None:
        out = subprocess.run([*argv, "--interval", "3"], capture_output=True, text=True, env=netpair.env, timeout=30)
        assert out.returncode == 0, out.stderr
        samples.append(json.loads(out.stdout))

    sampler = threading.Timer(2.0, sample)  # sample 3 s in the middle of a 7 s flow through the default class
    sampler.start()
    goodput = netpair.goodput(seconds=7)
    sampler.join()

    rows = {row["name"]: row for row in samples[0]["devices"][netpair.dev]}
    loaded = rows["bulk (default)"]["throughput"]
    print(f"shape-status {loaded / 1e6:.3f} Mbit/s on the wire, iperf3 goodput {goodput / 1e6:.3f} Mbit/s")
    assert abs(loaded - goodput) <= 0.15 * goodput
    assert rows["idle"]["throughput"] == 0 and rows["bypass"]["throughput"] == 0
    assert rows["cap 198.18.0.77"]["throughput"] == 0 and rows["cap 198.18.0.77"]["ceil"] == 1_000_000
    assert rows["(line)"]["throughput"] >= loaded  # the top class carries its children
    assert {r["rule"] for r in samples[0]["rules"]} >= {"mark[1] idle", f"caps on {netpair.dev}"}


def test_watch_redraws_until_ctrl_c_and_exits_cleanly(netpair):
    config = str(netpair.write_config(CONFIG))
    netpair.shapekit("shape-init", "--config", config)
    argv = [
        "ip",
        "netns",
        "exec",
        netpair.left.name,
        script("shape-status"),
        "--config",
        config,
        "--watch",
        "-i",
        "0.2",
    ]
    watch = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=netpair.env)

    time.sleep(2)
    watch.send_signal(signal.SIGINT)
    stdout, stderr = watch.communicate(timeout=10)

    assert watch.returncode == 0, stderr
    assert "Traceback" not in stderr and stderr == ""
    assert stdout.count("shapekit status at") >= 2  # sampled again and again (the redraw codes go to terminals only)
    assert "bulk (default)" in stdout


def _metrics_command(textfile_dir, unit_name: str = "shapekit-metrics.service") -> list[str]:
    """A unit's ExecStart, with this checkout's commands and `textfile_dir` for the setting."""
    unit = (Path(__file__).parents[2] / "init" / "systemd" / unit_name).read_text()
    line = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    words = line.removeprefix("ExecStart=").replace("${SHAPEKIT_TEXTFILE_DIR}", str(textfile_dir)).split()
    return [script(words[0].removeprefix("/usr/local/sbin/")), *words[1:]]


def _read_metrics(path) -> dict[str, dict[tuple, float]]:
    found: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(path.read_text()):
        for sample in family.samples:
            found.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return found


def test_the_metrics_unit_writes_what_prometheus_reads_and_the_loaded_class_counts_its_bytes(netpair, tmp_path):
    config = str(netpair.write_config(CONFIG))
    for command in ("shape-init", "shape-bypass", "shape-mark", "shape-limit-ip"):
        netpair.shapekit(command, "--config", config)
    path = tmp_path / "textfile" / "shapekit.prom"
    argv = ["ip", "netns", "exec", netpair.left.name, *_metrics_command(path.parent), "--config", config]
    samples = []

    def sample() -> None:
        out = subprocess.run(argv, capture_output=True, text=True, env=netpair.env, timeout=30)
        assert out.returncode == 0, out.stderr
        samples.append((time.monotonic(), _read_metrics(path)))

    timers = [threading.Timer(delay, sample) for delay in (2.0, 5.0)]  # 3 s apart, inside a 7 s flow
    for timer in timers:
        timer.start()
    goodput = netpair.goodput(seconds=7)
    for timer in timers:
        timer.join()

    bulk = (("class", "5c:10"), ("device", netpair.dev), ("direction", "out"), ("name", "bulk"))
    (t0, first), (t1, second) = samples
    sent = second["shapekit_class_sent_bytes_total"][bulk] - first["shapekit_class_sent_bytes_total"][bulk]
    rate = sent * 8 / (t1 - t0)
    print(f"metrics {rate / 1e6:.3f} Mbit/s on the wire, iperf3 goodput {goodput / 1e6:.3f} Mbit/s")
    assert abs(rate - goodput) <= 0.15 * goodput
    cap = (("class", "8001:1"), ("device", netpair.dev), ("direction", "out"))
    cap += (("host", "198.18.0.77"), ("name", "cap 198.18.0.77"))
    assert second["shapekit_class_ceil_bytes_per_second"][cap] == 125_000  # 1mbit
    assert second["shapekit_up"][()] == 1
    assert second["shapekit_caps"][(("device", netpair.dev), ("direction", "out"), ("source", "config"))] == 1
    assert time.time() - 120 < second["shapekit_last_init_timestamp_seconds"][()] <= time.time()
    rule = (("chain", "SHAPEKIT-MARK"), ("family", "ipv4"), ("position", "1"), ("rule", "mark[1] idle"))
    assert rule in second["shapekit_rule_matched_packets_total"]
    assert path.stat().st_mode & 0o777 == 0o644 and [p.name for p in path.parent.iterdir()] == ["shapekit.prom"]


def test_the_drift_unit_writes_0_while_the_kernel_matches_and_1_once_it_differs(netpair, tmp_path):
    config = str(netpair.write_config(CONFIG))
    netpair.shapekit("shape-init", "--all", "--config", config)
    path = tmp_path / "textfile" / "shapekit-drift.prom"
    argv = ["ip", "netns", "exec", netpair.left.name, *_metrics_command(path.parent, "shapekit-drift.service")]
    argv += ["--config", config]

    matches = subprocess.run(argv, capture_output=True, text=True, env=netpair.env, timeout=60)
    assert matches.returncode == 0, matches.stderr
    assert _read_metrics(path)["shapekit_drift"][()] == 0

    netpair.left.run("ipset", "flush", f"SHAPEKIT-{netpair.dev}-4")  # the cap's entry gone behind shapekit's back
    differs = subprocess.run(argv, capture_output=True, text=True, env=netpair.env, timeout=60)
    assert differs.returncode == 0, differs.stderr  # drift is the metric's to say: the unit fails only on errors
    metrics = _read_metrics(path)
    assert metrics["shapekit_drift"][()] == 1 and metrics["shapekit_drift_differences"][()] >= 1
    assert metrics["shapekit_drift_check_up"][()] == 1
