"""Download shaping on a real kernel: arriving traffic through shapekit's IFB device, and --check."""

from __future__ import annotations

import json

import pytest

CONFIG = """
[device.DEV]
rate = "1gbit"
leaf = "pfifo"
classifier = "classify"

[device.DEV.ingress]
rate = "40mbit"
default = "bulk"
leaf = "pfifo"

[device.DEV.ingress.classes.bulk]
rate = "2mbit"
ceil = "16mbit"

[device.DEV.ingress.classes.interactive]
rate = "8mbit"
ceil = "8mbit"

[[mark]]
class = "interactive"
direction = "in"
proto = "tcp"
sport = "5900:5999"

[device.DEV.limits]
"198.18.0.3" = { rate = "2mbit", direction = "in" }
"""
RULE_PORT = 5950
FREE_PORT = 6100
CAPPED_IN_CONFIG, CAPPED_AT_RUN_TIME = "198.18.0.3", "198.18.0.4"


def ifb(netpair) -> str:
    return f"ifb-{netpair.dev}"


@pytest.fixture
def booted(netpair):
    netpair.add_addresses(CAPPED_IN_CONFIG, CAPPED_AT_RUN_TIME)
    config = str(netpair.write_config(CONFIG))
    for command in ("shape-init", "shape-mark", "shape-limit-ip"):
        netpair.shapekit(command, "--config", config)
    return netpair, config


def test_a_download_runs_at_its_ingress_class_rate(booted):
    netpair, _ = booted
    default = netpair.goodput(download=True, port=FREE_PORT) / 16_000_000
    by_rule = netpair.goodput(download=True, port=RULE_PORT) / 8_000_000
    print(f"download goodput/ceil: default class {default:.3f}, [[mark]] direction=in class {by_rule:.3f}")
    assert 0.90 <= default <= 1.0
    assert 0.90 <= by_rule <= 1.0


def test_a_download_over_ipv6_runs_at_its_ingress_class_rate(booted):
    netpair, _ = booted
    default = netpair.goodput(download=True, ipv6=True, port=FREE_PORT) / 16_000_000
    print(f"IPv6 download goodput/ceil: default class {default:.3f}")
    assert 0.90 <= default <= 1.0


def test_in_caps_hold_downloads_from_their_hosts_and_remove_lifts_them(booted):
    netpair, config = booted
    netpair.shapekit("shape-limit-ip", "add", CAPPED_AT_RUN_TIME, "3mbit", "--in", "--config", config)
    listed = json.loads(netpair.shapekit("shape-limit-ip", "list", "--json", "--config", config).stdout)
    assert {(r["host"], r["rate"], r["direction"]) for r in listed} == {
        (CAPPED_IN_CONFIG, "2mbit", "in"),
        (CAPPED_AT_RUN_TIME, "3mbit", "in"),
    }

    # Slow classes: a receiver reads in bursts, so average over more seconds.
    in_config = netpair.goodput(download=True, to=CAPPED_IN_CONFIG, port=FREE_PORT, seconds=8) / 2_000_000
    at_run_time = netpair.goodput(download=True, to=CAPPED_AT_RUN_TIME, port=FREE_PORT, seconds=8) / 3_000_000
    netpair.shapekit("shape-limit-ip", "remove", CAPPED_AT_RUN_TIME, "--in", "--config", config)
    lifted = netpair.goodput(download=True, to=CAPPED_AT_RUN_TIME, port=FREE_PORT, seconds=3)

    print(f"--in cap goodput/rate: config {in_config:.3f}, run-time {at_run_time:.3f}; lifted {lifted / 3e6:.1f}x")
    assert 0.90 <= in_config <= 1.0
    assert 0.90 <= at_run_time <= 1.0
    assert lifted >= 3 * 3_000_000  # back in the default class, ceil 16mbit
    status = json.loads(netpair.shapekit("shape-status", "--json", "-i", "0.2", "--config", config).stdout)
    caps = {r["name"]: r["bytes"] for r in status["devices"][ifb(netpair)] if r["name"].startswith("cap ")}
    assert caps[f"cap {CAPPED_IN_CONFIG}"] > 1_000_000  # the 8 s download went through its class
    assert netpair.shapekit("shape-init", "--check", "--config", config, check=False).returncode == 0


def test_a_run_time_bypass_frees_downloads_on_its_port(booted):
    netpair, config = booted
    netpair.shapekit("shape-bypass", "add", f"{FREE_PORT}/tcp", "--config", config)
    bypassed = netpair.goodput(download=True, port=FREE_PORT) / 40_000_000
    print(f"bypassed download goodput/ingress line rate: {bypassed:.3f}")
    assert 0.90 <= bypassed <= 1.0
    assert netpair.shapekit("shape-init", "--check", "--config", config, check=False).returncode == 0


def test_check_sees_a_class_deleted_by_hand_and_a_lost_redirect(booted):
    netpair, config = booted
    check = ("shape-init", "--check", "--config", config)
    assert netpair.shapekit(*check, check=False).returncode == 0

    netpair.left.run("tc", "class", "del", "dev", ifb(netpair), "classid", "5c:10")  # bulk, the default class
    netpair.left.run("tc", "filter", "del", "dev", netpair.dev, "ingress", "pref", "92")
    drifted = netpair.shapekit(*check, check=False)
    assert drifted.returncode == 1
    assert f"{ifb(netpair)}: class 5c:10 is missing" in drifted.stdout
    assert f"{netpair.dev}: arriving traffic is not redirected to {ifb(netpair)}" in drifted.stdout

    netpair.shapekit("shape-init", "--config", config)
    assert netpair.shapekit(*check, check=False).returncode == 0

    # Ingress taken out of the config: drift until shape-init takes it away.
    egress_only = str(netpair.write_config(CONFIG.split("[device.DEV.ingress]")[0], "egress.toml"))
    stale = netpair.shapekit("shape-init", "--check", "--dev", netpair.dev, "--config", egress_only, check=False)
    assert stale.returncode == 1
    assert f"arriving traffic is shaped through {ifb(netpair)}, which the config does not ask for" in stale.stdout
    netpair.shapekit("shape-init", "--config", egress_only)
    assert netpair.left.run("ip", "link", "show", ifb(netpair), check=False).returncode != 0


def test_flush_removes_the_ifb_and_redirect_and_keeps_others_ingress_filters(netpair):
    config = str(netpair.write_config(CONFIG))
    netpair.left.run("tc", "qdisc", "add", "dev", netpair.dev, "handle", "ffff:", "ingress")
    foreign = ("u32", "match", "ip", "src", "198.18.0.99/32", "flowid", "ffff:1")
    netpair.left.run("tc", "filter", "add", "dev", netpair.dev, "ingress", "protocol", "ip", "pref", "300", *foreign)
    netpair.shapekit("shape-init", "--config", config)
    assert netpair.left.run("ip", "link", "show", ifb(netpair), check=False).returncode == 0

    netpair.shapekit("shape-flush", "--config", config)

    assert netpair.left.run("ip", "link", "show", ifb(netpair), check=False).returncode != 0
    filters = json.loads(netpair.left.run("tc", "-j", "filter", "show", "dev", netpair.dev, "ingress").stdout)
    assert {f["pref"] for f in filters} == {300}  # shapekit's pref 92 gone, the other one kept
    netpair.left.run("tc", "filter", "del", "dev", netpair.dev, "ingress", "pref", "300")
    netpair.shapekit("shape-init", "--config", config)
    netpair.shapekit("shape-flush", "--dev", netpair.dev, "--config", config)
    qdiscs = json.loads(netpair.left.run("tc", "-j", "qdisc", "show", "dev", netpair.dev).stdout)
    assert [q["kind"] for q in qdiscs if q["kind"] in ("ingress", "clsact")] == []  # ours, empty: removed
    assert netpair.left.run("ip", "link", "show", ifb(netpair), check=False).returncode != 0
