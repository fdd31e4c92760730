"""shape-status --hosts on a real kernel: hosts at known rates come out in order, at those rates, in their
classes; the counting leaves nothing behind; and seed 002's incident, end to end."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time

from netns import script
from test_kernel_status import _metrics_command, _read_metrics

CONFIG = """
[device.DEV]
rate = "100mbit"
default = "bulk"
leaf = "pfifo"
classifier = "classify"

[device.DEV.classes.bulk]
rate = "20mbit"
ceil = "100mbit"

[device.DEV.classes.interactive]
rate = "20mbit"
ceil = "100mbit"

[device.DEV.ingress]
rate = "100mbit"
default = "bulk"
leaf = "pfifo"

[device.DEV.ingress.classes.bulk]
rate = "10mbit"
ceil = "100mbit"

[[mark]]
class = "interactive"
proto = "tcp"
dport = "5301:5399"
"""

HOSTS = ("198.18.0.11", "198.18.0.12", "198.18.0.13", "198.18.0.14")


def _boot(netpair) -> str:
    config = str(netpair.write_config(CONFIG))
    netpair.shapekit("shape-init", "--all", "--config", config)
    netpair.add_addresses(*HOSTS)
    return config


def _hosts(netpair, config: str, *args: str) -> subprocess.CompletedProcess:
    argv = ["ip", "netns", "exec", netpair.left.name, script("shape-status"), "--config", config, "--hosts", *args]
    return subprocess.run(argv, capture_output=True, text=True, env=netpair.env, timeout=60)


def _flows(netpair, flows: dict[str, dict]) -> tuple[dict[str, float], list[threading.Thread]]:
    """One iperf3 flow per host, in threads: their goodputs (bits/s) land in the dict as each ends."""
    goodputs: dict[str, float] = {}

    def flow(host: str, options: dict) -> None:
        goodputs[host] = netpair.goodput(to=host, **options)

    threads = [threading.Thread(target=flow, args=(host, options)) for host, options in flows.items()]
    for thread in threads:
        thread.start()
    return goodputs, threads


def _counting_left(netpair) -> list[str]:
    """Whatever of --hosts' counting is still in the kernel."""
    saved = netpair.left.run("iptables-save", "-t", "mangle").stdout + netpair.left.run("ip6tables-save").stdout
    sets = netpair.left.run("ipset", "list", "-n").stdout
    return [line for line in (saved + sets).splitlines() if "SKHOSTS" in line]


def test_three_hosts_at_known_rates_come_out_in_order_at_those_rates_in_their_classes(netpair):
    config = _boot(netpair)
    netpair.shapekit("shape-limit-ip", "add", HOSTS[2], "3mbit", "--config", config)
    flows = {
        HOSTS[0]: {"seconds": 9, "bitrate": "12M", "port": 5201},  # bulk, the default class
        HOSTS[1]: {"seconds": 9, "bitrate": "6M", "port": 5301},  # interactive, by its port
        HOSTS[2]: {"seconds": 9, "port": 5202},  # as fast as it can: held at its 3mbit cap
        HOSTS[3]: {"seconds": 9, "bitrate": "4M", "port": 5203, "download": True},  # sent to us, on the ingress tree
    }
    goodputs, threads = _flows(netpair, flows)
    time.sleep(3)  # past slow start
    result = _hosts(netpair, config, "--interval", "4", "--json")
    for thread in threads:
        thread.join()

    assert result.returncode == 0, result.stderr
    rows = {(r["host"], r["direction"]): r for r in json.loads(result.stdout)["hosts"]}
    for (host, direction), row in sorted(rows.items()):
        print(
            f"{host} {direction}: --hosts {row['throughput'] / 1e6:.3f} Mbit/s, iperf3 {goodputs.get(host, 0) / 1e6:.3f}"
        )
    sent = [r["host"] for r in json.loads(result.stdout)["hosts"] if r["direction"] == "out"]
    assert sent[:3] == [HOSTS[0], HOSTS[1], HOSTS[2]]  # then the download's sender, its ACKs
    for host, direction in [(HOSTS[0], "out"), (HOSTS[1], "out"), (HOSTS[2], "out"), (HOSTS[3], "in")]:
        assert abs(rows[(host, direction)]["throughput"] - goodputs[host]) <= 0.1 * goodputs[host], host
    assert rows[(HOSTS[0], "out")]["klass"] == "bulk (default)"
    assert rows[(HOSTS[1], "out")]["klass"] == "interactive"
    assert rows[(HOSTS[2], "out")]["klass"] == f"cap {HOSTS[2]}" and rows[(HOSTS[2], "out")]["cap"]["rate"] == 3_000_000
    assert rows[(HOSTS[3], "in")]["cap"] is None
    assert _counting_left(netpair) == []


def test_a_stopped_run_removes_its_counting_and_a_killed_ones_goes_with_the_next_run_or_shape_flush(netpair):
    config = _boot(netpair)
    argv = ["ip", "netns", "exec", netpair.left.name, script("shape-status"), "--config", config, "--hosts"]

    def start() -> subprocess.Popen:
        run = subprocess.Popen(
            [*argv, "-i", "60"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=netpair.env
        )
        for _ in range(100):
            if _counting_left(netpair):
                return run
            time.sleep(0.1)
        raise AssertionError("--hosts did not start counting")

    stopped = start()
    stopped.send_signal(signal.SIGINT)
    _, stderr = stopped.communicate(timeout=10)
    assert stopped.returncode == 130
    assert stderr == "shape-status: interrupted by SIGINT; put back as before: the host counters\n"
    assert _counting_left(netpair) == []

    for then in (["--interval", "1"], None):  # the next run, then shape-flush
        killed = start()
        killed.kill()
        killed.wait()
        assert _counting_left(netpair) != []
        if then:
            result = _hosts(netpair, config, *then)
            assert result.returncode == 0, result.stderr
        else:
            netpair.shapekit("shape-flush")
        assert _counting_left(netpair) == []


def _received(result: subprocess.CompletedProcess) -> dict[str, dict]:
    """--hosts' rows of what the hosts received, by host, most first (a download's ACKs come "in")."""
    assert result.returncode == 0, result.stderr
    return {r["host"]: r for r in json.loads(result.stdout)["hosts"] if r["direction"] == "out"}


def test_the_incident_alert_find_cap(netpair, tmp_path):
    """Seed 002's incident: a bulk download swamps the line; the metrics show it, --hosts names the host,
    one command caps it, the metrics show the cap holding, and the others go on as before."""
    config = _boot(netpair)
    bulk, others = HOSTS[0], {HOSTS[1]: "2M", HOSTS[2]: "1M"}  # all flows long enough to outlast every step
    flows = {bulk: {"seconds": 34, "port": 5201}}
    flows |= {host: {"seconds": 34, "bitrate": rate, "port": 5301 + n} for n, (host, rate) in enumerate(others.items())}
    path = tmp_path / "textfile" / "shapekit.prom"
    metrics_argv = ["ip", "netns", "exec", netpair.left.name, *_metrics_command(path.parent), "--config", config]

    def metrics() -> tuple[float, dict]:
        out = subprocess.run(metrics_argv, capture_output=True, text=True, env=netpair.env, timeout=30)
        assert out.returncode == 0, out.stderr
        return time.monotonic(), _read_metrics(path)

    def rate(first: tuple[float, dict], second: tuple[float, dict], name: str) -> float:
        def sent(sample: dict) -> float:
            series = sample["shapekit_class_sent_bytes_total"].items()
            found = [v for k, v in series if ("name", name) in k and ("direction", "out") in k]
            return found[0] if found else 0.0

        return (sent(second[1]) - sent(first[1])) * 8 / (second[0] - first[0])

    quiet = metrics()
    goodputs, threads = _flows(netpair, flows)
    try:
        time.sleep(3)
        loud = metrics()
        swamped = rate(quiet, loud, "bulk")  # 1. the alert: the class's rate rises
        found = _hosts(netpair, config, "--interval", "2", "--json")  # 2. who is it
        before = _received(found)
        classes = netpair.classes()
        capped = netpair.shapekit(  # 3. cap it
            "shape-limit-ip", "add", bulk, "1mbit", "--for", "1h", "--comment", "incident 4711", "--config", config
        )
        time.sleep(4)  # the bulk flow's queue drains to the cap
        held_from = metrics()
        time.sleep(8)  # long enough to even out TCP's stalls behind the deep queue (below)
        held_to = metrics()
        after = _received(_hosts(netpair, config, "--interval", "3", "--json"))
        classes_after = netpair.classes()
    finally:
        for thread in threads:
            thread.join()

    print(
        f"bulk class while swamped: {swamped / 1e6:.1f} Mbit/s; before the cap, --hosts: "
        + ", ".join(f"{h} {r['throughput'] / 1e6:.2f}" for h, r in before.items())
    )
    cap_rate = rate(held_from, held_to, f"cap {bulk}")
    print(
        f"cap class: {cap_rate / 1e6:.3f} Mbit/s; after, --hosts: "
        + ", ".join(f"{h} {r['throughput'] / 1e6:.2f}" for h, r in after.items())
    )
    assert swamped > 30e6
    assert next(iter(before)) == bulk and before[bulk]["cap"] is None
    assert capped.returncode == 0
    # HTB holds the class to its cap. Below it, TCP's own doing: cut from 93 to 1 Mbit/s behind a
    # 1000-packet queue (12 s deep at 1 Mbit/s), its timeouts can leave the class idle now and then
    # (CI once saw 0.85 over a 3 s window; a 4 s window read 0.90 once, 1.00-1.04 four times)
    assert 0.8e6 <= cap_rate <= 1.1e6
    assert after[bulk]["cap"]["comment"] == "incident 4711" and after[bulk]["klass"] == f"cap {bulk}"
    assert 0.5e6 <= after[bulk]["throughput"] <= 1.1e6
    assert {cid: classes_after[cid] for cid in classes} == classes  # the cap only added its own classes
    for host, paced in others.items():  # untouched: their class, no cap, and their pace kept throughout
        expected = float(paced.rstrip("M")) * 1e6
        for row in (before[host], after[host]):
            # a 2-3 s window of a paced 1-2 Mbit/s TCP flow on a busy 2-core machine: iperf3 -b catches up
            # in bursts (CI once saw 1.75 of 2); the whole flow's goodput below holds it to 10%
            assert abs(row["throughput"] - expected) <= 0.25 * expected, (host, row)
            assert row["klass"] == "interactive" and row["cap"] is None
        assert abs(goodputs[host] - expected) <= 0.1 * expected
