"""shape-init and shape-flush: the exact commands, with every process mocked."""

from __future__ import annotations

import json

import pytest
from paths import HOLD_GSO, HOLD_GSO_SCRIPT, INCIDENT_CONFIG, READ_GSO, SEED_CONFIG

from shapekit.commands.flush import flush_app
from shapekit.commands.init import init_app
from shapekit.errors import CommandFailed
from shapekit.state import load_last_init

# Seed 000's tc half (../shared/seeds/000_*), as shapekit builds it from conf/shapekit.toml:
# the seed's unshaped 100:1 (mark 1001) is 5c:2, its shaped partition 1:1/1:10 is 5c:10,
# both under the top class at the line rate. Last, the root's filter that sends a packet whose mark's top
# byte names a cap group to that group's class (prio 1: before the fw filters): there with no cap yet.
SEED_000_BATCH = """\
qdisc add dev eth0 root handle 5c: htb default 1030
class add dev eth0 parent 5c: classid 5c:1 htb rate 100mbit ceil 100mbit quantum 198412
class add dev eth0 parent 5c:1 classid 5c:2 htb rate 100mbit ceil 100mbit quantum 198412
qdisc add dev eth0 parent 5c:2 handle 2: sfq perturb 10
class add dev eth0 parent 5c:1 classid 5c:10 htb rate 50mbit ceil 50mbit quantum 99206 prio 5
class add dev eth0 parent 5c:10 classid 5c:1010 htb rate 10mbit ceil 50mbit quantum 19841 prio 0
qdisc add dev eth0 parent 5c:1010 handle 1010: sfq perturb 10
class add dev eth0 parent 5c:10 classid 5c:1030 htb rate 512kbit ceil 50mbit quantum 1514 prio 5
qdisc add dev eth0 parent 5c:1030 handle 1030: sfq perturb 10
class add dev eth0 parent 5c:10 classid 5c:1090 htb rate 512kbit ceil 2048kbit quantum 1514 prio 7
qdisc add dev eth0 parent 5c:1090 handle 1090: sfq perturb 10
filter add dev eth0 parent 5c: protocol all prio 10 handle 1001 fw flowid 5c:2
filter add dev eth0 parent 5c: protocol all prio 10 handle 11010 fw flowid 5c:1010
filter add dev eth0 parent 5c: protocol all prio 10 handle 11030 fw flowid 5c:1030
filter add dev eth0 parent 5c: protocol all prio 10 handle 11090 fw flowid 5c:1090
filter add dev eth0 parent 5c: protocol all prio 1 bpf bytecode "6,32 0 0 4294963220,116 0 0 24,21 2 0 0,4 0 0 6062080,22 0 0 0,6 0 0 0"
"""

# The same as a shell script (--dry-run): a word with spaces in single quotes.
SEED_000_SCRIPT = "".join(f"tc {line}\n" for line in SEED_000_BATCH.replace('"', "'").splitlines())

PROBE = ("unshare", "--net", "--", "tc", "-batch", "-")
PROBE_HTB = "qdisc add dev lo root handle 1: htb\nclass add dev lo parent 1: classid 1:1 htb rate 1mbit\n"
PROBE_BPF = PROBE_HTB + 'filter add dev lo parent 1: protocol all prio 1 bpf bytecode "1,6 0 0 0"\n'
READ_ROOT = ("tc", "-j", "qdisc", "show", "dev", "eth0")
GROUP_FILTER = (
    'filter add dev eth0 parent 5c: protocol all prio 1 bpf bytecode "6,32 0 0 4294963220,116 0 0 24,'
    '21 2 0 0,4 0 0 6062080,22 0 0 0,6 0 0 0"\n'
)
BATCH = ("tc", "-batch", "-")
LIST_IFBS = ("ip", "-j", "link", "show", "type", "ifb")


def test_seed_000_tree_is_one_batch_after_the_kernel_probes(system, cli):
    result = cli(init_app, "--config", str(SEED_CONFIG))

    assert result.exit_code == 0, result.stderr
    assert system.calls == [
        (PROBE, PROBE_HTB),
        (PROBE, PROBE_BPF),  # the group filter's classifier
        (PROBE, PROBE_HTB + "qdisc add dev lo parent 1:1 handle 2: sfq perturb 10\n"),
        (PROBE, PROBE_HTB + "filter add dev lo parent 1: protocol all prio 1 handle 1 fw flowid 1:1\n"),
        (READ_ROOT, None),  # not shapekit's tree: none built flat, with caps to move into groups
        (("ipset", "list", "-t"), None),  # nor cap sets made before cap groups
        (LIST_IFBS, None),  # none of shapekit's: no ingress shaping to take away
        (READ_ROOT, None),
        (READ_GSO, None),  # 65535, the kernel's: to be held to 9, what the 100mbit line sends in a millisecond
        (BATCH, SEED_000_BATCH),
        (HOLD_GSO, None),  # after the tree
    ]


def test_classify_pfifo_variant_has_pfifo_leaves_and_no_fw_filters(system, cli, write_config):
    text = (
        SEED_CONFIG.read_text()
        .replace('leaf = "sfq"', 'leaf = "pfifo"')
        .replace('classifier = "fw"', 'classifier = "classify"')
    )

    result = cli(init_app, "--config", str(write_config(text)))

    assert result.exit_code == 0, result.stderr
    expected = "".join(
        line.replace("sfq perturb 10", "pfifo") + "\n" for line in SEED_000_BATCH.splitlines() if " fw " not in line
    )
    assert system.batches() == [expected]
    assert [argv for argv, _ in system.calls].count(PROBE) == 3  # htb, bpf, pfifo: no fw probe


def test_leaf_none_adds_no_leaf_qdisc_and_fq_codel_is_plain(system, cli, write_config):
    text = SEED_CONFIG.read_text()
    cli(init_app, "--config", str(write_config(text.replace('leaf = "sfq"', 'leaf = "none"'), "none.toml")))
    cli(init_app, "--config", str(write_config(text.replace('leaf = "sfq"', 'leaf = "fq_codel"'), "fq.toml")))

    none, fq_codel = system.batches()
    assert "qdisc add dev eth0 parent" not in none and "sfq" not in none
    assert "qdisc add dev eth0 parent 5c:1010 handle 1010: fq_codel\n" in fq_codel


CAKE = "cake unlimited besteffort triple-isolate split-gso"


def leaf_lines(system) -> list[str]:
    """The leaf qdisc lines of the first batch."""
    return [line for line in system.batches()[0].splitlines() if line.startswith("qdisc add dev eth0 parent")]


def test_leaf_cake_puts_an_unlimited_one_tin_cake_under_the_bypass_and_every_leaf_class(system, cli, write_config):
    text = SEED_CONFIG.read_text().replace('leaf = "sfq"', 'leaf = "cake"')

    result = cli(init_app, "--config", str(write_config(text)))

    assert result.exit_code == 0, result.stderr
    assert leaf_lines(system) == [
        f"qdisc add dev eth0 parent 5c:2 handle 2: {CAKE}",
        f"qdisc add dev eth0 parent 5c:1010 handle 1010: {CAKE}",
        f"qdisc add dev eth0 parent 5c:1030 handle 1030: {CAKE}",
        f"qdisc add dev eth0 parent 5c:1090 handle 1090: {CAKE}",
    ]
    assert system.batches() == [SEED_000_BATCH.replace("sfq perturb 10", CAKE)]
    assert (PROBE, PROBE_HTB + f"qdisc add dev lo parent 1:1 handle 2: {CAKE}\n") in system.calls


def test_leaf_cake_goes_under_each_caps_class_too(system, cli, write_config):
    text = INCIDENT_CONFIG.read_text().replace("[device.eth0.limits]", 'leaf = "cake"\n[device.eth0.limits]')

    result = cli(init_app, "--config", str(write_config(text)))

    assert result.exit_code == 0, result.stderr
    assert leaf_lines(system) == [
        f"qdisc add dev eth0 parent 5c:2 handle 2: {CAKE}",
        f"qdisc add dev eth0 parent 5c:10 handle 10: {CAKE}",
        "qdisc add dev eth0 parent 5c:8001 handle 8001: htb",  # the caps' group
        f"qdisc add dev eth0 parent 8001:1 handle 8100: {CAKE}",
        f"qdisc add dev eth0 parent 8001:2 handle 8101: {CAKE}",
        f"qdisc add dev eth0 parent 8001:3 handle 8102: {CAKE}",
    ]


def test_a_class_leaf_overrides_the_devices_for_that_class_only(system, cli, write_config):
    text = SEED_CONFIG.read_text().replace("mark = 11010\n", 'mark = 11010\nleaf = "fq_codel"\n')

    result = cli(init_app, "--config", str(write_config(text)))

    assert result.exit_code == 0, result.stderr
    assert system.batches() == [
        SEED_000_BATCH.replace(
            "qdisc add dev eth0 parent 5c:1010 handle 1010: sfq perturb 10\n",
            "qdisc add dev eth0 parent 5c:1010 handle 1010: fq_codel\n",
        )
    ]
    assert "qdisc add dev eth0 parent 5c:1030 handle 1030: sfq perturb 10\n" in system.batches()[0]
    assert [stdin for argv, stdin in system.calls if argv == PROBE] == [
        PROBE_HTB,
        PROBE_BPF,
        PROBE_HTB + "qdisc add dev lo parent 1:1 handle 2: fq_codel\n",  # for [device.eth0.classes.high]
        PROBE_HTB + "qdisc add dev lo parent 1:1 handle 2: sfq perturb 10\n",  # for [device.eth0]
        PROBE_HTB + "filter add dev lo parent 1: protocol all prio 1 handle 1 fw flowid 1:1\n",
    ]


def test_seed_002_tree_is_a_default_class_at_the_line_rate_and_a_class_per_cap(system, cli):
    result = cli(init_app, "--config", str(INCIDENT_CONFIG))

    assert result.exit_code == 0, result.stderr
    assert (
        system.batches()
        == [
            "qdisc add dev eth0 root handle 5c: htb default 10\n"
            "class add dev eth0 parent 5c: classid 5c:1 htb rate 100mbit ceil 100mbit quantum 198412\n"
            "class add dev eth0 parent 5c:1 classid 5c:2 htb rate 100mbit ceil 100mbit quantum 198412\n"
            "qdisc add dev eth0 parent 5c:2 handle 2: sfq perturb 10\n"
            "class add dev eth0 parent 5c:1 classid 5c:10 htb rate 100mbit ceil 100mbit quantum 198412\n"
            "qdisc add dev eth0 parent 5c:10 handle 10: sfq perturb 10\n"
            "filter add dev eth0 parent 5c: protocol all prio 10 handle 1001 fw flowid 5c:2\n"
            "filter add dev eth0 parent 5c: protocol all prio 10 handle 6029328 fw flowid 5c:10\n"
            + GROUP_FILTER
            + "class add dev eth0 parent 5c:1 classid 5c:8001 htb rate 100mbit ceil 100mbit quantum 198412\n"
            "qdisc add dev eth0 parent 5c:8001 handle 8001: htb\n"  # the caps' group 1, its caps 8001:1-3 in it
            "class add dev eth0 parent 8001: classid 8001:1 htb rate 128kbit ceil 128kbit quantum 1514\n"
            "qdisc add dev eth0 parent 8001:1 handle 8100: sfq perturb 10\n"
            "class add dev eth0 parent 8001: classid 8001:2 htb rate 512kbit ceil 512kbit quantum 1514\n"
            "qdisc add dev eth0 parent 8001:2 handle 8101: sfq perturb 10\n"
            "class add dev eth0 parent 8001: classid 8001:3 htb rate 32kbit ceil 32kbit quantum 1514\n"
            "qdisc add dev eth0 parent 8001:3 handle 8102: sfq perturb 10\n"
        ]
    )


def test_percentages_are_of_the_parents_ceil_and_resolve_to_the_seeds_own_rates(system, cli, write_config):
    text = (
        SEED_CONFIG.read_text()
        .replace('rate = "50mbit"         # SHAPEDLINK\nceil = "50mbit"', 'rate = "50%"\nceil = "50%"')  # of the line
        .replace('rate = "10mbit"         # HIGHPRIO\nceil = "50mbit"', 'rate = "20%"\nceil = "100%"')  # of shaped
        .replace('rate = "512kbit"        # TOR\nceil = "2048kbit"', 'rate = "1.024%"\nceil = "4.096%"')
    )
    assert text.count("%") == 6

    result = cli(init_app, "--config", str(write_config(text)), "--dry-run")

    assert result.exit_code == 0, result.stderr
    assert result.stdout == "# eth0: shapekit's HTB tree (run as one tc -batch)\n" + SEED_000_SCRIPT + HOLD_GSO_SCRIPT


def test_a_percentage_rounds_down_to_whole_bits(system, cli, write_config):
    config = write_config(
        '[device.eth1]\nrate = "1mbit"\ndefault = "a"\nleaf = "none"\nclassifier = "classify"\n'
        '[device.eth1.classes.a]\nrate = "33.3333333%"\nceil = "66.66666666%"\n'
    )

    cli(init_app, "--config", str(config))

    assert "classid 5c:10 htb rate 333333bit ceil 666666bit quantum 4166\n" in system.batches()[0]


def test_overhead_and_linklayer_go_to_every_class_the_bypass_and_the_caps(system, cli, write_config):
    text = INCIDENT_CONFIG.read_text().replace(
        "[device.eth0.limits]", 'overhead = 40\nlinklayer = "atm"\n[device.eth0.limits]'
    )

    result = cli(init_app, "--config", str(write_config(text)))

    assert result.exit_code == 0, result.stderr
    charged = " overhead 40 linklayer atm"
    assert system.batches() == [
        "qdisc add dev eth0 root handle 5c: htb default 10\n"
        f"class add dev eth0 parent 5c: classid 5c:1 htb rate 100mbit ceil 100mbit quantum 198412{charged}\n"
        f"class add dev eth0 parent 5c:1 classid 5c:2 htb rate 100mbit ceil 100mbit quantum 198412{charged}\n"
        "qdisc add dev eth0 parent 5c:2 handle 2: sfq perturb 10\n"
        f"class add dev eth0 parent 5c:1 classid 5c:10 htb rate 100mbit ceil 100mbit quantum 198412{charged}\n"
        "qdisc add dev eth0 parent 5c:10 handle 10: sfq perturb 10\n"
        "filter add dev eth0 parent 5c: protocol all prio 10 handle 1001 fw flowid 5c:2\n"
        "filter add dev eth0 parent 5c: protocol all prio 10 handle 6029328 fw flowid 5c:10\n"
        + GROUP_FILTER
        + f"class add dev eth0 parent 5c:1 classid 5c:8001 htb rate 100mbit ceil 100mbit quantum 198412{charged}\n"
        "qdisc add dev eth0 parent 5c:8001 handle 8001: htb\n"
        f"class add dev eth0 parent 8001: classid 8001:1 htb rate 128kbit ceil 128kbit quantum 1514{charged}\n"
        "qdisc add dev eth0 parent 8001:1 handle 8100: sfq perturb 10\n"
        f"class add dev eth0 parent 8001: classid 8001:2 htb rate 512kbit ceil 512kbit quantum 1514{charged}\n"
        "qdisc add dev eth0 parent 8001:2 handle 8101: sfq perturb 10\n"
        f"class add dev eth0 parent 8001: classid 8001:3 htb rate 32kbit ceil 32kbit quantum 1514{charged}\n"
        "qdisc add dev eth0 parent 8001:3 handle 8102: sfq perturb 10\n"
    ]


@pytest.mark.parametrize(
    ("keys", "charged"), [("overhead = 8\n", " overhead 8"), ('linklayer = "atm"\n', " linklayer atm")]
)
def test_overhead_alone_or_linklayer_alone_is_passed_alone(system, cli, write_config, keys, charged):
    text = INCIDENT_CONFIG.read_text().replace("[device.eth0.limits]", keys + "[device.eth0.limits]")

    cli(init_app, "--config", str(write_config(text)))

    assert f"classid 5c:1 htb rate 100mbit ceil 100mbit quantum 198412{charged}\n" in system.batches()[0]


def test_ethernet_with_no_overhead_is_todays_tree_exactly(system, cli, write_config):
    text = SEED_CONFIG.read_text().replace(
        'classifier = "fw"', 'classifier = "fw"\noverhead = 0\nlinklayer = "ethernet"'
    )

    cli(init_app, "--config", str(write_config(text)))

    assert system.batches() == [SEED_000_BATCH]


def test_an_existing_root_qdisc_is_deleted_first(system, cli):
    system.roots["eth0"] = {"kind": "htb", "handle": "5c:", "root": True}

    cli(init_app, "--config", str(SEED_CONFIG))

    assert system.batches() == ["qdisc del dev eth0 root\n" + SEED_000_BATCH]


def test_sizes_are_bytes_and_allocated_ids_follow_file_order(system, cli, write_config):
    config = write_config(
        '[device.eth1]\nrate = "2gbit"\ndefault = "b"\nleaf = "none"\nclassifier = "classify"\n'
        '[device.eth1.classes.a]\nrate = "1kbps"\nburst = "5k"\ncburst = 3000\nquantum = "1514b"\n'
        '[device.eth1.classes.b]\nrate = "1.5mbit"\nceil = "1gibit"\n'
    )

    result = cli(init_app, "--config", str(config))

    assert result.exit_code == 0, result.stderr
    assert system.batches() == [
        "qdisc add dev eth1 root handle 5c: htb default 11\n"
        "class add dev eth1 parent 5c: classid 5c:1 htb rate 2gbit ceil 2gbit quantum 200000\n"
        "class add dev eth1 parent 5c:1 classid 5c:2 htb rate 2gbit ceil 2gbit quantum 200000\n"
        "class add dev eth1 parent 5c:1 classid 5c:10 htb rate 8kbit ceil 2gbit quantum 1514 burst 5120b cburst 3000b\n"
        "class add dev eth1 parent 5c:1 classid 5c:11 htb rate 1500kbit ceil 1073741824bit quantum 1514\n"
        + GROUP_FILTER.replace("eth0", "eth1")
    ]


def test_dry_run_prints_a_script_and_runs_only_queries(system, cli, mocker):
    mocker.patch("os.geteuid", return_value=1000)  # and needs no root

    result = cli(init_app, "--config", str(SEED_CONFIG), "--dry-run")

    assert result.exit_code == 0, result.stderr
    assert result.stdout == "# eth0: shapekit's HTB tree (run as one tc -batch)\n" + SEED_000_SCRIPT + HOLD_GSO_SCRIPT
    assert system.calls == [(READ_ROOT, None), (LIST_IFBS, None), (READ_ROOT, None), (READ_GSO, None)]


def test_verbose_echoes_each_command(system, cli):
    result = cli(init_app, "--config", str(SEED_CONFIG), "-v")

    assert result.stderr.splitlines() == [f"+ {line}" for line in SEED_000_SCRIPT.splitlines()] + [
        "+ ip link set dev eth0 gso_max_segs 9"
    ]


def test_dev_selects_devices(system, cli, write_config):
    config = write_config('[device.eth0]\nrate = "10mbit"\n[device.eth1]\nrate = "20mbit"\n')

    cli(init_app, "--config", str(config), "--dev", "eth1")

    assert [b.splitlines()[1] for b in system.batches()] == [
        "class add dev eth1 parent 5c: classid 5c:1 htb rate 20mbit ceil 20mbit quantum 192307"
    ]


def test_config_comes_from_shapekit_config_env(system, cli, monkeypatch):
    monkeypatch.setenv("SHAPEKIT_CONFIG", str(INCIDENT_CONFIG))

    assert cli(init_app).exit_code == 0
    assert len(system.batches()) == 1


def test_a_failed_batch_names_the_command_and_removes_the_partial_tree(system, cli):
    stderr = "Warning: sch_htb: quantum of class 5C0001 is big. Consider r2q change.\nError: Specified qdisc kind is unknown.\nCommand failed -:7\n"

    def fail_half_way(argv, stdin):
        if argv == BATCH and stdin.startswith("qdisc add"):
            system.roots["eth0"] = {"kind": "htb", "handle": "5c:", "root": True}  # lines 1-6 applied
            raise CommandFailed("tc -batch -", stderr)

    system.hooks.append(fail_half_way)

    result = cli(init_app, "--config", str(SEED_CONFIG))

    assert result.exit_code == 1
    assert result.stderr == (
        "shape-init: `tc qdisc add dev eth0 parent 5c:1010 handle 1010: sfq perturb 10` failed: "
        "Error: Specified qdisc kind is unknown.; eth0 was left unshaped (shapekit's partial tree removed)\n"
    )
    assert system.calls[-2:] == [(READ_ROOT, None), (BATCH, "qdisc del dev eth0 root\n")]


def test_flush_removes_only_shapekits_root(system, cli):
    system.roots["eth0"] = {"kind": "htb", "handle": "5c:", "root": True}
    system.roots["eth1"] = {"kind": "htb", "handle": "1:", "root": True}  # not shapekit's

    result = cli(flush_app)

    assert result.exit_code == 0, result.stderr
    assert system.calls == [
        (LIST_IFBS, None),  # no IFB devices of shapekit's
        (("tc", "-j", "qdisc", "show"), None),
        (READ_ROOT, None),  # with the qdiscs under it: no cap groups
        (BATCH, "qdisc del dev eth0 root\n"),
        (("iptables-save", "-t", "mangle"), None),  # no chains of shapekit's: nothing to remove
        (("ip6tables-save", "-t", "mangle"), None),
        (("ipset", "list", "-n"), None),  # no sets either
    ]


def test_flush_of_a_device_without_a_tree_does_nothing(system, cli):
    system.roots["eth1"] = {"kind": "fq_codel", "handle": "0:", "root": True}

    result = cli(flush_app, "--dev", "eth1")

    assert result.exit_code == 0
    assert system.batches() == []


@pytest.mark.parametrize("app", [init_app, flush_app], ids=["init", "flush"])
def test_version_and_help(cli, app):
    assert cli(app, "--version").stdout.startswith("shapekit ")
    assert "--dry-run" in cli(app, "--help").stdout


def test_a_negative_overhead_is_the_roots_size_table_and_no_class_charges_its_own(system, cli, write_config):
    text = INCIDENT_CONFIG.read_text().replace(
        "[device.eth0.limits]", 'overhead = -4\nlinklayer = "atm"\n[device.eth0.limits]'
    )

    result = cli(init_app, "--config", str(write_config(text)))

    assert result.exit_code == 0, result.stderr
    batch = system.batches()[0]
    assert batch.startswith(
        "qdisc add dev eth0 root handle 5c: stab overhead -4 linklayer atm htb default 10\n"
        "class add dev eth0 parent 5c: classid 5c:1 htb rate 100mbit ceil 100mbit quantum 198412\n"
    )
    assert "overhead" not in batch.split("\n", 1)[1] and "linklayer" not in batch.split("\n", 1)[1]


def test_ptm_writes_every_rate_64_65_of_the_configured_and_the_overhead_per_class(system, cli, write_config):
    text = INCIDENT_CONFIG.read_text().replace(
        "[device.eth0.limits]", 'overhead = 22\nlinklayer = "ptm"\n[device.eth0.limits]'
    )

    result = cli(init_app, "--config", str(write_config(text)))

    assert result.exit_code == 0, result.stderr
    line = "rate 98461538bit ceil 98461538bit quantum 198412 overhead 22"
    assert (
        system.batches()
        == [
            "qdisc add dev eth0 root handle 5c: htb default 10\n"
            f"class add dev eth0 parent 5c: classid 5c:1 htb {line}\n"
            f"class add dev eth0 parent 5c:1 classid 5c:2 htb {line}\n"
            "qdisc add dev eth0 parent 5c:2 handle 2: sfq perturb 10\n"
            f"class add dev eth0 parent 5c:1 classid 5c:10 htb {line}\n"
            "qdisc add dev eth0 parent 5c:10 handle 10: sfq perturb 10\n"
            "filter add dev eth0 parent 5c: protocol all prio 10 handle 1001 fw flowid 5c:2\n"
            "filter add dev eth0 parent 5c: protocol all prio 10 handle 6029328 fw flowid 5c:10\n"
            + GROUP_FILTER
            + f"class add dev eth0 parent 5c:1 classid 5c:8001 htb {line}\n"  # the caps' group: at the line rate
            "qdisc add dev eth0 parent 5c:8001 handle 8001: htb\n"
            "class add dev eth0 parent 8001: classid 8001:1 htb rate 126030bit ceil 126030bit quantum 1514 overhead 22\n"
            "qdisc add dev eth0 parent 8001:1 handle 8100: sfq perturb 10\n"
            "class add dev eth0 parent 8001: classid 8001:2 htb rate 504123bit ceil 504123bit quantum 1514 overhead 22\n"
            "qdisc add dev eth0 parent 8001:2 handle 8101: sfq perturb 10\n"
            "class add dev eth0 parent 8001: classid 8001:3 htb rate 31507bit ceil 31507bit quantum 1514 overhead 22\n"
            "qdisc add dev eth0 parent 8001:3 handle 8102: sfq perturb 10\n"
        ]
    )


def test_ptm_with_a_negative_overhead_is_an_ethernet_size_table_and_scaled_rates(system, cli, write_config):
    text = INCIDENT_CONFIG.read_text().replace(
        "[device.eth0.limits]", 'overhead = -4\nlinklayer = "ptm"\n[device.eth0.limits]'
    )

    cli(init_app, "--config", str(write_config(text)))

    assert system.batches()[0].startswith(
        "qdisc add dev eth0 root handle 5c: stab overhead -4 htb default 10\n"
        "class add dev eth0 parent 5c: classid 5c:1 htb rate 98461538bit ceil 98461538bit quantum 198412\n"
    )


# `tc -j qdisc show dev eth0` of a tree with two cap groups (listed as the kernel's hash has them, not in order).
QDISCS_WITH_GROUPS = [
    {"kind": "htb", "handle": "5c:", "root": True},
    {"kind": "sfq", "handle": "2:", "parent": "5c:2"},
    {"kind": "htb", "handle": "8002:", "parent": "5c:8002"},
    {"kind": "sfq", "handle": "8300:", "parent": "8002:1"},
    {"kind": "htb", "handle": "8001:", "parent": "5c:8001"},
    {"kind": "sfq", "handle": "8100:", "parent": "8001:1"},
]
DEL_GROUPS = "class del dev eth0 classid 5c:8002\nclass del dev eth0 classid 5c:8001\n"


def test_flush_deletes_the_cap_groups_newest_first_then_the_root(system, cli):
    system.roots["eth0"] = {"kind": "htb", "handle": "5c:", "root": True}
    system.answers[READ_ROOT] = json.dumps(QDISCS_WITH_GROUPS)

    result = cli(flush_app, "--dev", "eth0")

    assert result.exit_code == 0, result.stderr
    assert system.calls == [
        (LIST_IFBS, None),
        (READ_ROOT, None),
        (BATCH, DEL_GROUPS + "qdisc del dev eth0 root\n"),  # a group at a time, then the rest of the tree
    ]


def test_init_over_a_tree_with_groups_deletes_them_before_its_root(system, cli):
    system.roots["eth0"] = {"kind": "htb", "handle": "5c:", "root": True}
    system.answers[READ_ROOT] = json.dumps(QDISCS_WITH_GROUPS)

    result = cli(init_app, "--config", str(SEED_CONFIG))

    assert result.exit_code == 0, result.stderr
    assert system.batches() == [DEL_GROUPS + "qdisc del dev eth0 root\n" + SEED_000_BATCH]


def test_a_finished_init_is_timed_in_the_state_for_the_metrics_and_a_dry_run_or_failure_is_not(
    system, cli, tmp_path, mocker
):
    mocker.patch("time.time", return_value=1_800_000_000.0)
    cli(init_app, "--config", str(SEED_CONFIG), "--dry-run")
    assert load_last_init(tmp_path / "state") is None

    def tree_fails(argv, stdin):
        if argv == BATCH and stdin == SEED_000_BATCH:
            raise CommandFailed("tc -batch -", "RTNETLINK answers: Invalid argument")

    system.hooks.append(tree_fails)
    assert cli(init_app, "--config", str(SEED_CONFIG)).exit_code == 1
    assert load_last_init(tmp_path / "state") is None

    system.hooks.remove(tree_fails)
    assert cli(init_app, "--config", str(SEED_CONFIG)).exit_code == 0
    assert load_last_init(tmp_path / "state") == 1_800_000_000.0
    mocker.patch("time.time", return_value=1_800_000_060.0)
    assert cli(init_app, "--all", "--config", str(SEED_CONFIG)).exit_code == 0
    assert json.loads((tmp_path / "state" / "init.json").read_text()) == {"finished": 1_800_000_060.0}


def test_a_finish_time_that_cannot_be_written_is_a_warning_the_trees_are_built(system, cli, tmp_path):
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "init.json").mkdir()  # cannot be replaced by a file

    result = cli(init_app, "--config", str(SEED_CONFIG))

    assert result.exit_code == 0, result.stderr
    assert (BATCH, SEED_000_BATCH) in system.calls
    assert result.stderr.startswith("shape-init: warning: `writing ") and result.stderr.count("\n") == 1
