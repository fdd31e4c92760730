"""shape-limit-ip on a real kernel: capped hosts run at their cap, the others stay free."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path

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
    assert "8001:2" not in hosts.classes()  # the config's cap is 8001:1
    assert hosts.shapekit("shape-init", "--check", "--config", config, check=False).returncode == 0


def test_flush_then_the_boot_sequence_restores_run_time_caps(hosts):
    config = boot(hosts)
    hosts.shapekit("shape-limit-ip", "add", CAPPED_AT_RUN_TIME, "2mbit", "--config", config)

    hosts.shapekit("shape-flush")
    assert hosts.left.run("ipset", "list", "-n").stdout == ""
    assert hosts.goodput(to=CAPPED_AT_RUN_TIME, seconds=2) >= 10 * 2_000_000  # flushed: free
    boot(hosts)

    assert 0.90 <= ratio(hosts, CAPPED_AT_RUN_TIME, 2_000_000) <= 1.0
    entry = f"{CAPPED_AT_RUN_TIME} timeout 0 skbmark 0x1000000/0xff000000 skbprio 8001:2"
    assert entry in hosts.left.run("ipset", "list").stdout


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
    assert len([c for c in classes if c.startswith("8001:")]) == 21  # 20 + the config's, in group 1


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


# What shapekit before cap groups left on a device: every cap a class under the top class, entries that
# name it with no mark bits, a rule without --map-mark, and limits.json with class minors (`flat_layout`).
FLAT_TREE = """\
qdisc add dev DEV root handle 5c: htb default 10
class add dev DEV parent 5c: classid 5c:1 htb rate 1gbit ceil 1gbit quantum 200000
class add dev DEV parent 5c:1 classid 5c:2 htb rate 1gbit ceil 1gbit quantum 200000
qdisc add dev DEV parent 5c:2 handle 2: pfifo
class add dev DEV parent 5c:1 classid 5c:10 htb rate 1gbit ceil 1gbit quantum 200000
qdisc add dev DEV parent 5c:10 handle 10: pfifo
class add dev DEV parent 5c:1 classid 5c:8000 htb rate 2mbit ceil 2mbit quantum 1514
qdisc add dev DEV parent 5c:8000 handle 8000: pfifo
class add dev DEV parent 5c:1 classid 5c:8001 htb rate 3mbit ceil 3mbit quantum 1514
qdisc add dev DEV parent 5c:8001 handle 8001: pfifo
"""
FLAT_SETS = """\
create SHAPEKIT-DEV-4 hash:net family inet skbinfo timeout 0
add SHAPEKIT-DEV-4 198.18.0.2/32 skbprio 5c:8000
add SHAPEKIT-DEV-4 198.18.0.3/32 skbprio 5c:8001
create SHAPEKIT-DEV-6 hash:net family inet6 skbinfo timeout 0
"""
FLAT_RULE = "*mangle\n:SHAPEKIT-LIMIT - [0:0]\n-A SHAPEKIT-LIMIT -o DEV -j SET --map-set SHAPEKIT-DEV-{f} dst --map-prio\nCOMMIT\n"
FLAT_STATE = {
    "caps": [
        {"host": CAPPED_AT_RUN_TIME, "rate": "3mbit", "dev": "DEV", "expires": None, "comment": "billing",
         "minor": 0x8001, "direction": "out"},
    ]
}  # fmt: skip


def flat_layout(netpair) -> str:
    """The kernel and state files as shapekit before cap groups left them, after its boot sequence."""
    config = str(netpair.write_config(CONFIG))
    netpair.shapekit("shape-mark", "--config", config)  # the chains, which are as they were, LIMIT aside
    dev = netpair.dev
    netpair.left.run("tc", "-batch", "-", stdin=FLAT_TREE.replace("DEV", dev))
    netpair.left.run("ipset", "restore", stdin=FLAT_SETS.replace("DEV", dev))
    for family, restore in ((4, "iptables-restore"), (6, "ip6tables-restore")):
        netpair.left.run(restore, "--noflush", stdin=FLAT_RULE.replace("DEV", dev).format(f=family))
    state = Path(netpair.env["SHAPEKIT_STATE_DIR"])
    state.mkdir(parents=True, exist_ok=True)
    (state / "limits.json").write_text(json.dumps(FLAT_STATE).replace('"DEV"', json.dumps(dev)))
    return config


def test_flat_caps_move_into_groups_on_the_next_shape_init_with_run_time_caps_intact(hosts):
    config = flat_layout(hosts)
    assert 0.90 <= ratio(hosts, CAPPED_AT_RUN_TIME, 3_000_000, seconds=3) <= 1.0  # the old layout holds

    refused = hosts.shapekit("shape-limit-ip", "add", FREE, "1mbit", "--config", config, check=False)
    assert refused.returncode == 2
    assert refused.stderr == (
        f"shape-limit-ip: {hosts.dev}'s caps were installed by a shapekit without cap groups: run shape-init "
        f"--dev {hosts.dev} to move them into groups (run-time caps kept), then change caps\n"
    )
    hosts.shapekit("shape-init", "--config", config)

    classes = hosts.classes()
    assert {cid: classes[cid]["ceil"] for cid in classes if cid.startswith(("5c:80", "8001:"))} == {
        "5c:8001": "1Gbit",  # the group
        "8001:1": "2Mbit",  # the config's cap
        "8001:2": "3Mbit",  # the run-time cap, kept
    }
    entries = hosts.left.run("ipset", "list", f"SHAPEKIT-{hosts.dev}-4").stdout
    assert "maxelem 131072" in entries
    assert f"{CAPPED_AT_RUN_TIME} timeout 0 skbmark 0x1000000/0xff000000 skbprio 8001:2" in entries
    assert (
        f"-A SHAPEKIT-LIMIT -o {hosts.dev} -j SET --map-set SHAPEKIT-{hosts.dev}-4 dst --map-mark --map-prio"
        in hosts.save()
    )
    saved = json.loads((Path(hosts.env["SHAPEKIT_STATE_DIR"]) / "limits.json").read_text())["caps"]
    assert [(c["host"], c["rate"], c["comment"], c["slot"]) for c in saved] == [
        (f"{CAPPED_AT_RUN_TIME}/32", "3mbit", "billing", 1)
    ]
    assert 0.90 <= ratio(hosts, CAPPED_IN_CONFIG, 2_000_000, seconds=3) <= 1.0
    assert 0.90 <= ratio(hosts, CAPPED_AT_RUN_TIME, 3_000_000, seconds=3) <= 1.0
    assert hosts.goodput(to=FREE, seconds=2) >= 10 * 3_000_000
    check = hosts.shapekit("shape-init", "--check", "--config", config, check=False)
    assert (check.returncode, check.stdout) == (0, "the kernel matches the config and saved state\n")
    hosts.shapekit("shape-limit-ip", "add", FREE, "1mbit", "--config", config)
    assert 0.90 <= ratio(hosts, FREE, 1_000_000, seconds=3) <= 1.0


def test_caps_in_the_first_and_the_last_group_hold_their_rate(netpair, tmp_path):
    """The config's cap and 1,100 from a sync file: groups 8001 and 8002 full (512 each), 8003 holding 77."""
    # The first and the last in this pair's subnet, to send to; the rest need no route.
    hosts = ["198.18.0.10", *(f"198.19.{n // 256}.{n % 256}" for n in range(1, 1099)), "198.18.0.11"]
    first, last = hosts[0], hosts[-1]
    netpair.add_addresses(first, last)
    config = str(netpair.write_config(CONFIG))
    for command in ("shape-init", "shape-mark", "shape-limit-ip"):
        netpair.shapekit(command, "--config", config)
    rows = tmp_path / "caps.csv"
    rows.write_text("host,rate\n" + "".join(f"{h},10mbit\n" for h in hosts))
    netpair.shapekit("shape-limit-ip", "sync", str(rows), "--config", config)

    classes = netpair.classes()
    assert sorted(cid for cid in classes if cid.startswith("5c:80")) == ["5c:8001", "5c:8002", "5c:8003"]
    assert "8003:4d" in classes and "8003:4e" not in classes  # 77 = 0x4d
    for host, cid in ((first, "8001:2"), (last, "8003:4d")):
        before = netpair.class_bytes(cid)
        goodput = ratio(netpair, host, 10_000_000)
        print(f"{host} in {cid}: goodput/cap {goodput:.3f}")
        assert 0.93 <= goodput <= 0.99
        assert netpair.class_bytes(cid) - before >= 5 * 10_000_000 / 8 * 0.9  # the traffic went through its class
