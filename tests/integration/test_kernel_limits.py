"""shape-limit-ip on a real kernel: capped hosts run at their cap, the others stay free."""

from __future__ import annotations

import json
import subprocess
import threading
import time

import pytest
from netns import script

CONFIG = """
[device.DEV]
rate = "1gbit"
leaf = "pfifo"
classifier = "classify"

[device.DEV.limits]
"198.18.0.2" = "2mbit"
"""
CAPPED_IN_CONFIG, CAPPED_AT_RUN_TIME, FREE = "198.18.0.2", "198.18.0.3", "198.18.0.4"
CAPPED_V6 = "fd00:5c::3"


def boot(netpair) -> str:
    config = str(netpair.write_config(CONFIG))
    for command in ("shape-init", "shape-mark", "shape-limit-ip"):
        netpair.shapekit(command, "--config", config)
    return config


@pytest.fixture
def hosts(netpair):
    netpair.add_addresses(CAPPED_AT_RUN_TIME, FREE, CAPPED_V6)
    return netpair


def ratio(netpair, host: str, rate: int, seconds: int = 5) -> float:
    return netpair.goodput(to=host, seconds=seconds) / rate


def test_config_and_run_time_caps_hold_while_another_host_runs_free(hosts):
    config = boot(hosts)
    hosts.shapekit("shape-limit-ip", "add", CAPPED_AT_RUN_TIME, "3mbit", "--config", config)

    in_config = ratio(hosts, CAPPED_IN_CONFIG, 2_000_000)
    at_run_time = ratio(hosts, CAPPED_AT_RUN_TIME, 3_000_000)
    free = hosts.goodput(to=FREE, seconds=3)

    print(f"cap goodput/rate: config {in_config:.3f}, run-time {at_run_time:.3f}; free host {free / 3e6:.0f}x the cap")
    assert 0.90 <= in_config <= 1.0
    assert 0.90 <= at_run_time <= 1.0
    assert free >= 10 * 3_000_000


def test_an_ipv6_host_is_capped_and_remove_frees_it(hosts):
    config = boot(hosts)
    hosts.shapekit("shape-limit-ip", "add", CAPPED_V6, "2mbit", "--config", config)

    capped = ratio(hosts, CAPPED_V6, 2_000_000)
    hosts.shapekit("shape-limit-ip", "remove", CAPPED_V6, "--config", config)
    freed = hosts.goodput(to=CAPPED_V6, seconds=3)

    print(f"ipv6 cap goodput/rate: {capped:.3f}")
    assert 0.90 <= capped <= 1.0
    assert freed >= 10 * 2_000_000
    assert "fd00:5c::3" not in hosts.left.run("ipset", "list", f"SHAPEKIT-{hosts.dev}-6").stdout


def test_a_cap_for_3s_lapses_by_itself(hosts):
    config = boot(hosts)
    hosts.shapekit("shape-limit-ip", "add", CAPPED_AT_RUN_TIME, "2mbit", "--for", "3s", "--config", config)
    capped = hosts.goodput(to=CAPPED_AT_RUN_TIME, seconds=2)

    time.sleep(3.5)
    lapsed = hosts.goodput(to=CAPPED_AT_RUN_TIME, seconds=2)

    assert capped <= 2_000_000
    assert lapsed >= 10 * 2_000_000
    listed = json.loads(hosts.shapekit("shape-limit-ip", "list", "--json", "--config", config).stdout)
    assert [row["host"] for row in listed] == [CAPPED_IN_CONFIG]
    # Its class stays until the next full install, and is no drift meanwhile.
    assert hosts.shapekit("shape-init", "--check", "--config", config, check=False).returncode == 0
    hosts.shapekit("shape-limit-ip", "--config", config)
    assert "5c:8001" not in hosts.classes()
    assert hosts.shapekit("shape-init", "--check", "--config", config, check=False).returncode == 0


def test_flush_then_the_boot_sequence_restores_run_time_caps(hosts):
    config = boot(hosts)
    hosts.shapekit("shape-limit-ip", "add", CAPPED_AT_RUN_TIME, "2mbit", "--config", config)

    hosts.shapekit("shape-flush")
    assert hosts.left.run("ipset", "list", "-n").stdout == ""
    assert hosts.goodput(to=CAPPED_AT_RUN_TIME, seconds=2) >= 10 * 2_000_000  # flushed: free
    boot(hosts)

    assert 0.90 <= ratio(hosts, CAPPED_AT_RUN_TIME, 2_000_000) <= 1.0
    assert f"{CAPPED_AT_RUN_TIME} timeout 0 skbprio 5c:8001" in hosts.left.run("ipset", "list").stdout


def test_twenty_parallel_adds_all_land(hosts):
    config = boot(hosts)
    argv = ["ip", "netns", "exec", hosts.left.name, script("shape-limit-ip"), "--config", config, "add"]

    adds = [
        subprocess.Popen([*argv, f"198.18.1.{n}", f"{n}mbit"], env=hosts.env, stderr=subprocess.PIPE, text=True)
        for n in range(1, 21)
    ]
    failures = [p.stderr.read() for p in adds if p.wait(timeout=60) != 0]

    assert failures == []
    listed = json.loads(hosts.shapekit("shape-limit-ip", "list", "--json", "--config", config).stdout)
    assert sorted(row["host"] for row in listed if row["source"] == "run-time") == sorted(
        f"198.18.1.{n}" for n in range(1, 21)
    )
    entries = hosts.left.run("ipset", "list", f"SHAPEKIT-{hosts.dev}-4").stdout
    assert all(f"198.18.1.{n} " in entries for n in range(1, 21))
    classes = hosts.classes()
    assert len([c for c in classes if int(c.split(":")[1], 16) >= 0x8000]) == 21  # 20 + the config's


@pytest.mark.parametrize(
    "args",
    [
        ["add", "0.0.0.0/0", "1mbit"],
        ["add", "198.18.0.1", "1mbit"],  # this namespace's own address
        ["add", "198.18.0.300", "1mbit"],
        ["add", CAPPED_AT_RUN_TIME, "0mbit"],
        ["add", CAPPED_AT_RUN_TIME, "2gbit"],  # above the line rate
        ["add", CAPPED_AT_RUN_TIME, "128kb"],
        ["remove", CAPPED_IN_CONFIG],
    ],
    ids=["every-host", "own-address", "bad-ip", "zero-rate", "above-line-rate", "ambiguous-unit", "config-cap"],
)
def test_bad_hosts_and_rates_change_neither_kernel_nor_state(hosts, args):
    config = boot(hosts)
    hosts.shapekit("shape-limit-ip", "add", FREE, "5mbit", "--config", config)
    state = hosts.workdir / "state" / "limits.json"
    before = (hosts.snapshot(), hosts.left.run("ipset", "save").stdout, hosts.save(), state.read_text())

    result = hosts.shapekit("shape-limit-ip", *args, "--config", config, check=False)

    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert (hosts.snapshot(), hosts.left.run("ipset", "save").stdout, hosts.save(), state.read_text()) == before


def test_sync_makes_the_caps_the_files_and_a_flow_of_an_unchanged_host_sees_nothing(hosts):
    config = boot(hosts)
    first = hosts.write_config(f"host,rate,comment\n{CAPPED_AT_RUN_TIME},1mbit,plan A\n{FREE},2mbit,plan B\n", "a.csv")
    hosts.shapekit("shape-limit-ip", "sync", str(first), "--config", config)
    before = {
        row["host"]: row
        for row in json.loads(hosts.shapekit("shape-limit-ip", "list", "--json", "--config", config).stdout)
    }
    # .3 stays at 1mbit, .4 goes to 4mbit in its own class, .2's config cap is overridden by one at 3mbit
    second = hosts.write_config(
        f'{{"host": "{CAPPED_AT_RUN_TIME}", "rate": "1mbit", "comment": "plan A"}}\n'
        f'{{"host": "{FREE}", "rate": "4mbit", "comment": "plan C"}}\n'
        f'{{"host": "{CAPPED_IN_CONFIG}", "rate": "3mbit"}}\n',
        "b.jsonl",
    )

    sync = threading.Timer(2.0, hosts.shapekit, ("shape-limit-ip", "sync", str(second), "--config", config))
    sync.start()
    unchanged = ratio(hosts, CAPPED_AT_RUN_TIME, 1_000_000)  # 5 s, the sync 2 s in
    sync.join()

    after = {
        row["host"]: row
        for row in json.loads(hosts.shapekit("shape-limit-ip", "list", "--json", "--config", config).stdout)
    }
    rerated = ratio(hosts, FREE, 4_000_000, seconds=4)
    print(f"unchanged host through the sync {unchanged:.3f} of its cap; re-rated host {rerated:.3f} of its new cap")
    assert after[CAPPED_AT_RUN_TIME] == before[CAPPED_AT_RUN_TIME]
    assert (after[FREE]["rate"], after[FREE]["classid"]) == ("4mbit", before[FREE]["classid"])  # the same class
    assert (after[CAPPED_IN_CONFIG]["rate"], after[CAPPED_IN_CONFIG]["source"]) == ("3mbit", "run-time")
    assert 0.90 <= unchanged <= 1.0
    assert 0.90 <= rerated <= 1.0
    assert hosts.shapekit("shape-init", "--check", "--config", config, check=False).returncode == 0
