"""HTB's quantum: the exact numbers shapekit passes, and where they show up in the commands."""

from __future__ import annotations

import pytest
from paths import INCIDENT_CONFIG, SEED_CONFIG

from shapekit.commands.init import init_app
from shapekit.commands.limit_ip import limit_ip_app
from shapekit.config.units import parse_rate
from shapekit.plan import tree as plan

NOW = 1_800_000_000.0
BATCH = ("tc", "-batch", "-")

# r2q per line rate: 10 at least (HTB's own), else the line's bytes/s over 200,000, rounded up.
R2Q = {"64kbit": 10, "1mbit": 10, "100mbit": 63, "1gbit": 625, "10gbit": 6250}

# line rate → {class rate: quantum}, every class rate from 64kbit up to the line rate.
QUANTA = {
    "64kbit": {"64kbit": 1514},  # 8000 B/s / 10 = 800: a full-size frame at least
    "1mbit": {"64kbit": 1514, "128kbit": 1600, "512kbit": 6400, "1mbit": 12500},
    "100mbit": {
        "64kbit": 1514, "128kbit": 1514, "512kbit": 1514, "1mbit": 1984, "2mbit": 3968, "10mbit": 19841,
        "50mbit": 99206, "100mbit": 198412,
    },
    "1gbit": {
        "64kbit": 1514, "1mbit": 1514, "2mbit": 1514, "10mbit": 2000, "100mbit": 20000, "500mbit": 100000,
        "1gbit": 200000,
    },
    "10gbit": {
        "64kbit": 1514, "1mbit": 1514, "10mbit": 1514, "100mbit": 2000, "1gbit": 20000, "2500mbit": 50000,
        "10gbit": 200000,
    },
}  # fmt: skip


def test_r2q_keeps_the_lines_own_quantum_within_200000_bytes():
    assert {line: plan.r2q(parse_rate(line)) for line in R2Q} == R2Q


@pytest.mark.parametrize("line", list(QUANTA))
def test_quantum_is_the_rate_over_the_trees_r2q_and_a_full_frame_at_least(line):
    assert {rate: plan.quantum(parse_rate(rate), parse_rate(line)) for rate in QUANTA[line]} == QUANTA[line]


def sweep(line_rate: int) -> list[int]:
    """Class rates (bits/s) from 8bit and 64kbit up to the line rate, about 30% apart, and odd ones between."""
    rates, rate = [8, 64_000], 64_000
    while rate < line_rate:
        rates += [rate, rate + 8 * 997]
        rate = rate * 13 // 10
    return sorted({r for r in rates if r <= line_rate} | {line_rate - 8, line_rate})


@pytest.mark.parametrize("line", list(QUANTA))
def test_every_quantum_lies_between_a_full_frame_and_200000_bytes(line):
    line_rate = parse_rate(line)
    quanta = [plan.quantum(rate, line_rate) for rate in sweep(line_rate)]
    assert min(quanta) == 1514
    assert max(quanta) <= 200_000


@pytest.mark.parametrize("line", ["1mbit", "100mbit", "1gbit", "10gbit"])
def test_siblings_share_in_proportion_to_their_rates_above_the_frame_floor(line):
    """HTB lends spare bandwidth to siblings of one prio in proportion to their quanta.

    Above the 1514-byte floor a quantum is the class's bytes/s over the tree's one r2q,
    rounded down, so for any two classes a, b: |q_a * R_b - q_b * R_a| < max(R_a, R_b)
    (R in bytes/s): their quanta stand in the ratio of their rates, within rounding.
    (Below the floor, a full-size frame a turn, small classes get more than their share.)
    """
    line_rate = parse_rate(line)
    above = {}
    for rate in sweep(line_rate):
        q = plan.quantum(rate, line_rate)
        if q > 1514:
            assert q == rate // 8 // plan.r2q(line_rate)
            above[rate // 8] = q
    assert len(above) >= 5
    for rate_a, q_a in above.items():
        for rate_b, q_b in above.items():
            assert abs(q_a * rate_b - q_b * rate_a) < max(rate_a, rate_b)


def test_an_explicit_quantum_wins(system, cli, write_config):
    text = SEED_CONFIG.read_text().replace("classid = 0x1010\n", "classid = 0x1010\nquantum = 3000\n")

    result = cli(init_app, "--config", str(write_config(text)))

    assert result.exit_code == 0, result.stderr
    classes = [line for line in system.batches()[0].splitlines() if line.startswith("class add")]
    assert classes == [
        "class add dev eth0 parent 5c: classid 5c:1 htb rate 100mbit ceil 100mbit quantum 198412",
        "class add dev eth0 parent 5c:1 classid 5c:2 htb rate 100mbit ceil 100mbit quantum 198412",
        "class add dev eth0 parent 5c:1 classid 5c:10 htb rate 50mbit ceil 50mbit quantum 99206 prio 5",
        "class add dev eth0 parent 5c:10 classid 5c:1010 htb rate 10mbit ceil 50mbit quantum 3000 prio 0",
        "class add dev eth0 parent 5c:10 classid 5c:1030 htb rate 512kbit ceil 50mbit quantum 1514 prio 5",
        "class add dev eth0 parent 5c:10 classid 5c:1090 htb rate 512kbit ceil 2048kbit quantum 1514 prio 7",
    ]


def test_a_10gbit_line_uses_r2q_6250(system, cli, write_config):
    config = write_config(
        '[device.eth0]\nrate = "10gbit"\ndefault = "bulk"\n'
        '[device.eth0.classes.bulk]\nrate = "2500mbit"\n[device.eth0.classes.slow]\nrate = "10mbit"\n'
    )

    cli(init_app, "--config", str(config))

    assert [line for line in system.batches()[0].splitlines() if line.startswith("class add")] == [
        "class add dev eth0 parent 5c: classid 5c:1 htb rate 10gbit ceil 10gbit quantum 200000",
        "class add dev eth0 parent 5c:1 classid 5c:2 htb rate 10gbit ceil 10gbit quantum 200000",
        "class add dev eth0 parent 5c:1 classid 5c:10 htb rate 2500mbit ceil 10gbit quantum 50000",
        "class add dev eth0 parent 5c:1 classid 5c:11 htb rate 10mbit ceil 10gbit quantum 1514",
    ]


@pytest.fixture
def booted(system, mocker):
    """eth0 (seed 002's config, 100mbit: r2q 63) has shapekit's tree and its cap sets."""
    mocker.patch("time.time", return_value=NOW)
    system.roots["eth0"] = {"kind": "htb", "handle": "5c:", "root": True}
    system.answers[("ipset", "list", "-n")] = "SHAPEKIT-eth0-4\nSHAPEKIT-eth0-6\n"
    system.answers[("ip", "-j", "addr", "show")] = "[]"
    return system


CLASSES = ("tc", "class", "show", "dev", "eth0")
GROUP_1 = "class htb 5c:8001 parent 5c:1 leaf 8001: prio 0 rate 100Mbit ceil 100Mbit burst 1600b cburst 1600b \n"


def test_a_run_time_caps_class_carries_its_quantum_and_a_new_rate_a_new_one(booted, cli):
    booted.answers[CLASSES] = GROUP_1  # the config's caps' group: the run-time cap's class goes in it
    cli(limit_ip_app, "add", "198.51.100.7", "20mbit", "--config", str(INCIDENT_CONFIG))
    booted.answers[CLASSES] = GROUP_1 + "class htb 8001:4 root leaf 8103: prio 0 rate 20Mbit ceil 20Mbit\n"
    cli(limit_ip_app, "add", "198.51.100.7", "30mbit", "--config", str(INCIDENT_CONFIG))

    assert booted.batches() == [
        "class add dev eth0 parent 8001: classid 8001:4 htb rate 20mbit ceil 20mbit quantum 39682\n"
        "qdisc add dev eth0 parent 8001:4 handle 8103: sfq perturb 10\n",
        "class change dev eth0 parent 8001: classid 8001:4 htb rate 30mbit ceil 30mbit quantum 59523\n",
    ]


def test_installing_caps_changes_a_rate_with_its_quantum(booted, cli, write_config):
    text = INCIDENT_CONFIG.read_text().replace('"198.18.0.102" = "512kbit"', '"198.18.0.102" = "40mbit"')
    booted.answers[CLASSES] = GROUP_1 + "".join(
        f"class htb 8001:{j} root leaf {leaf}: prio 0 rate {r} ceil {r} burst 1600b cburst 1600b \n"
        for j, leaf, r in (("1", "8100", "128Kbit"), ("2", "8101", "512Kbit"), ("3", "8102", "32Kbit"))
    )

    result = cli(limit_ip_app, "--config", str(write_config(text)))

    assert result.exit_code == 0, result.stderr
    assert booted.batches() == [
        "class change dev eth0 parent 8001: classid 8001:2 htb rate 40mbit ceil 40mbit quantum 79365\n"
    ]
