"""shape-init --check: the pure comparison, and the command's exit codes."""

from __future__ import annotations

import json
import re
from dataclasses import replace

from paths import SEED_CONFIG

from shapekit.commands.init import init_app
from shapekit.config.load import load_config
from shapekit.plan import drift
from shapekit.plan import tree as plan
from shapekit.plan.mangle import MangleState

TC_CLASSES = """\
class htb 5c:1090 parent 5c:10 leaf 1090: prio 7 rate 512Kbit ceil 2048Kbit burst 1600b cburst 1599b
class htb 5c:1010 parent 5c:10 leaf 1010: prio 0 rate 10Mbit ceil 50Mbit burst 1600b cburst 1600b
class htb 5c:1 root rate 100Mbit ceil 100Mbit burst 1600b cburst 1600b
class htb 5c:10 parent 5c:1 rate 50Mbit ceil 50Mbit burst 1600b cburst 1600b
class htb 5c:2 parent 5c:1 leaf 2: prio 0 rate 100Mbit ceil 100Mbit burst 1600b cburst 1600b
class htb 5c:1030 parent 5c:10 leaf 1030: prio 5 rate 512Kbit ceil 50Mbit burst 1600b cburst 1600b
"""
QDISCS = json.dumps(
    [{"kind": "htb", "handle": "5c:", "root": True, "options": {"default": "0x1030"}}]
    + [{"kind": "sfq", "handle": f"{m}:", "parent": f"5c:{m}"} for m in ("2", "1010", "1030", "1090")]
)


def seed_tree() -> drift.Tree:
    config = load_config(SEED_CONFIG, check_owner=False)
    return drift.planned_tree(plan.plan_tree(config.devices["eth0"], config.bypass))


def test_the_seed_tree_read_back_matches_its_plan():
    assert drift.diff_tree("eth0", seed_tree(), drift.kernel_tree(QDISCS, TC_CLASSES, "5c:")) == []


def test_every_kind_of_difference_is_one_line():
    classes = TC_CLASSES.replace("rate 512Kbit ceil 2048Kbit", "rate 512Kbit ceil 4Mbit")
    classes = classes.replace("class htb 5c:1010 parent 5c:10", "class htb 5c:1010 parent 5c:1")
    classes = "\n".join(line for line in classes.splitlines() if "5c:1030" not in line)
    classes += "\nclass htb 5c:77 parent 5c:1 rate 1Mbit ceil 1Mbit burst 1600b cburst 1600b \n"
    qdiscs = QDISCS.replace('"0x1030"', '"0x77"').replace(
        '"kind": "sfq", "handle": "2:"', '"kind": "pfifo", "handle": "2:"'
    )

    lines = drift.diff_tree("eth0", seed_tree(), drift.kernel_tree(qdiscs, classes, "5c:"))

    assert lines == [
        "eth0: unmarked traffic goes to 5c:77, the config says 5c:1030",
        "eth0: class 5c:1030 is missing",
        "eth0: class 5c:77 is not in the config",
        "eth0: class 5c:1010 hangs under 5c:1, the config says 5c:10",
        "eth0: class 5c:1090 ceil is 4mbit, the config says 2048kbit",
        "eth0: leaf qdisc under 5c:2 is pfifo, the config says sfq",
    ]


def atm_seed_tree() -> drift.Tree:
    config = load_config(SEED_CONFIG, check_owner=False)
    device = replace(config.devices["eth0"], overhead=10, linklayer="atm")
    return drift.planned_tree(plan.plan_tree(device, config.bypass))


def with_atm(classes: str) -> str:
    """The class lines as `tc class show` prints a tree whose classes charge overhead 10 and ATM cells."""
    return re.sub(r"(rate \S+) (ceil \S+)", r"\1 overhead 10 \2 linklayer atm", classes)


def test_overhead_and_linklayer_read_back_clean():
    assert drift.diff_tree("eth0", atm_seed_tree(), drift.kernel_tree(QDISCS, with_atm(TC_CLASSES), "5c:")) == []


def test_a_class_without_the_configured_overhead_or_linklayer_is_a_difference():
    have = with_atm(TC_CLASSES).replace("rate 10Mbit overhead 10 ceil 50Mbit linklayer atm", "rate 10Mbit ceil 50Mbit")
    have = have.replace(
        "rate 100Mbit overhead 10 ceil 100Mbit linklayer atm burst 1600b cburst 1600b\n",
        "rate 100Mbit overhead 10 ceil 100Mbit burst 1600b cburst 1600b\n",
        1,
    )

    lines = drift.diff_tree("eth0", atm_seed_tree(), drift.kernel_tree(QDISCS, have, "5c:"))

    assert lines == [
        "eth0: class 5c:1 charges overhead 10 linklayer ethernet, the config says overhead 10 linklayer atm",
        "eth0: class 5c:1010 charges overhead 0 linklayer ethernet, the config says overhead 10 linklayer atm",
    ]
    # and the other way: the kernel's classes charge ATM cells the config no longer asks for
    assert drift.diff_tree("eth0", seed_tree(), drift.kernel_tree(QDISCS, with_atm(TC_CLASSES), "5c:"))[:1] == [
        "eth0: class 5c:1 charges overhead 10 linklayer atm, the config says overhead 0 linklayer ethernet"
    ]


def test_a_device_without_shapekits_root():
    other_root = json.dumps([{"kind": "fq_codel", "handle": "0:", "root": True}])

    assert drift.diff_tree("eth0", seed_tree(), drift.kernel_tree(other_root, "", "5c:")) == [
        "eth0: shapekit's tree is missing (run shape-init)"
    ]


def test_chains_and_sets():
    want = MangleState(
        chains={"SHAPEKIT": ("-A SHAPEKIT -j X",), "SHAPEKIT-MARK": ()}, jumps=("-A POSTROUTING -j SHAPEKIT",)
    )
    have = MangleState(chains={"SHAPEKIT": ("-A SHAPEKIT -j Y",), "SHAPEKIT-OLD": ()})
    entries = drift.parse_set_entries(
        "create SHAPEKIT-eth0-4 hash:net family inet\n"
        "add SHAPEKIT-eth0-4 198.51.100.7 timeout 0 skbmark 0x1000000/0xff000000 skbprio 8001:1\n"
        "add SHAPEKIT-eth0-4 198.51.100.0/24 skbmark 0x1000000/0xff000000 skbprio 8001:2\n"
        "add OTHER 198.51.100.9 skbprio 1:1\n",
        "SHAPEKIT-",
    )

    assert drift.diff_chains(4, want, have) == [
        "IPv4: the jump from POSTROUTING to SHAPEKIT is missing",
        "IPv4: chain SHAPEKIT differs from the config",
        "IPv4: chain SHAPEKIT-MARK is missing",
        "IPv4: chain SHAPEKIT-OLD is not in the config",
    ]
    assert drift.diff_sets({("SHAPEKIT-eth0-4", "198.51.100.7/32", "8001:1")}, entries) == [
        "SHAPEKIT-eth0-4 caps 198.51.100.0/24 (8001:2), which the config and saved state do not"
    ]


def test_with_no_caps_an_empty_limit_chain_is_as_configured():
    want = MangleState(
        chains={
            "SHAPEKIT-LIMIT": ("-A SHAPEKIT-LIMIT -o eth0 -j SET --map-set SHAPEKIT-eth0-4 dst --map-prio --map-mark",)
        }
    )
    before_limit_ip = MangleState(chains={"SHAPEKIT-LIMIT": ()})
    assert drift.diff_chains(4, drift.before_caps(want, before_limit_ip, "SHAPEKIT-LIMIT"), before_limit_ip) == []
    assert drift.diff_chains(4, drift.before_caps(want, want, "SHAPEKIT-LIMIT"), want) == []
    other = MangleState(chains={"SHAPEKIT-LIMIT": ("-A SHAPEKIT-LIMIT -j ACCEPT",)})
    assert drift.diff_chains(4, drift.before_caps(want, other, "SHAPEKIT-LIMIT"), other) == [
        "IPv4: chain SHAPEKIT-LIMIT differs from the config"
    ]


def test_check_exit_codes(system, cli, mocker):
    check = mocker.patch("shapekit.commands.init.check_drift", return_value=[])
    matched = cli(init_app, "--check", "--config", str(SEED_CONFIG))
    check.return_value = ["eth0: class 5c:1030 is missing"]
    drifted = cli(init_app, "--check", "--config", str(SEED_CONFIG))

    assert (matched.exit_code, matched.stdout) == (0, "the kernel matches the config and saved state\n")
    assert (drifted.exit_code, drifted.stdout) == (1, "eth0: class 5c:1030 is missing\n")
    assert system.batches() == []


def test_check_needs_root(system, cli, mocker):
    mocker.patch("os.geteuid", return_value=1000)

    result = cli(init_app, "--check", "--config", str(SEED_CONFIG))

    assert result.exit_code == 2 and "run it as root" in result.stderr


def test_skip_unknown_ignores_devices_the_config_does_not_shape(system, cli):
    skipped = cli(init_app, "--dev", "wlan0", "--skip-unknown", "--config", str(SEED_CONFIG))
    refused = cli(init_app, "--dev", "wlan0", "--config", str(SEED_CONFIG))

    assert skipped.exit_code == 0 and system.calls == []
    assert refused.exit_code == 2


def test_python_m_shapekit_runs_a_command_by_name(mocker):
    import sys

    from shapekit.__main__ import main

    init_main = mocker.patch("shapekit.commands.init.init_main")
    mocker.patch.object(sys, "argv", ["shapekit", "shape-init", "--dry-run"])
    mocker.patch.dict("shapekit.__main__.MAINS", {"shape-init": init_main})

    main()

    init_main.assert_called_once_with()
    assert sys.argv == ["shapekit", "--dry-run"]


def test_skip_absent_builds_the_devices_that_are_there(system, cli, write_config):
    config = write_config('[device.eth0]\nrate = "10mbit"\n[device.ppp0]\nrate = "1mbit"\n')

    skipped = cli(init_app, "--skip-absent", "--config", str(config))
    refused = cli(init_app, "--config", str(config))

    assert skipped.exit_code == 0, skipped.stderr
    assert [b.splitlines()[0] for b in system.batches()] == ["qdisc add dev eth0 root handle 5c: htb default 10"]
    assert refused.exit_code == 2 and "device 'ppp0' does not exist" in refused.stderr


def stab_seed_tree(overhead: int, linklayer: str) -> drift.Tree:
    config = load_config(SEED_CONFIG, check_owner=False)
    device = replace(config.devices["eth0"], overhead=overhead, linklayer=linklayer)
    return drift.planned_tree(plan.plan_tree(device, config.bypass))


STAB_QDISCS = QDISCS.replace(
    '"options": {"default": "0x1030"}}',
    '"options": {"default": "0x1030"}, "stab": {"linklayer": "atm", "overhead": -4, "mtu": 2047, "tsize": 512}}',
)


def test_the_roots_size_table_reads_back_clean():
    assert drift.diff_tree("eth0", stab_seed_tree(-4, "atm"), drift.kernel_tree(STAB_QDISCS, TC_CLASSES, "5c:")) == []


def test_a_missing_or_other_size_table_is_a_difference():
    assert drift.diff_tree("eth0", stab_seed_tree(-4, "atm"), drift.kernel_tree(QDISCS, TC_CLASSES, "5c:")) == [
        "eth0: the root's size table is none, the config says overhead -4 linklayer atm"
    ]
    assert drift.diff_tree("eth0", seed_tree(), drift.kernel_tree(STAB_QDISCS, TC_CLASSES, "5c:")) == [
        "eth0: the root's size table is overhead -4 linklayer atm, the config says none"
    ]


def test_a_ptm_tree_reads_back_clean_and_an_unscaled_one_is_a_difference():
    # tc prints the kernel's bytes/s as bits: 64/65 of 100mbit is 98461538bit, kept as 12307692 bytes/s
    scaled = {
        "100Mbit": "98461536bit",
        "50Mbit": "49230768bit",
        "10Mbit": "9846152bit",
        "512Kbit": "504120bit",
        "2048Kbit": "2016488bit",
    }
    ptm = re.sub(r"\b(100Mbit|50Mbit|10Mbit|512Kbit|2048Kbit)\b", lambda m: scaled[m.group(1)], TC_CLASSES)
    want = stab_seed_tree(0, "ptm")

    assert drift.diff_tree("eth0", want, drift.kernel_tree(QDISCS, ptm, "5c:")) == []
    assert "eth0: class 5c:1 rate is 100mbit, the config says 98461538bit" in drift.diff_tree(
        "eth0", want, drift.kernel_tree(QDISCS, TC_CLASSES, "5c:")
    )
