"""shape-status on a real kernel: under a known load, the loaded class shows the rate the test measured."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time

from netns import script

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
