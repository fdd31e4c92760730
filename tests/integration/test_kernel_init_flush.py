"""shape-init and shape-flush on a real kernel, inside namespaces the tests make."""

from __future__ import annotations

import os
import stat

import pytest
from netns import sh

from shapekit.plan.tc_text import tc_rate

# The test kernel lacks sch_sfq and cls_fw: classes are picked by iptables
# CLASSIFY (classifier = "classify") and leaves are pfifo.
TREE = """
[device.DEV]
rate = "100mbit"
default = "bulk"
leaf = "pfifo"
classifier = "classify"

[device.DEV.classes.shaped]
rate = "20mbit"
ceil = "20mbit"
classid = 0x10

[device.DEV.classes.fast]
parent = "shaped"
rate = "10mbit"
prio = 0

[device.DEV.classes.bulk]
parent = "shaped"
rate = "2mbit"
ceil = "2mbit"
prio = 5
"""

BORROW = """
[device.DEV]
rate = "100mbit"
default = "elastic"
leaf = "pfifo"
classifier = "classify"

[device.DEV.classes.elastic]
rate = "1mbit"
ceil = "4mbit"
"""


def test_init_builds_the_configured_tree(netpair):
    netpair.shapekit("shape-init", "--config", str(netpair.write_config(TREE)))

    qdiscs = netpair.qdiscs()
    root = next(q for q in qdiscs if q.get("root"))
    assert (root["kind"], root["handle"], root["options"]["default"]) == ("htb", "5c:", "0x12")
    leaves = {q["parent"]: (q["kind"], q["handle"]) for q in qdiscs if not q.get("root")}
    assert leaves == {"5c:2": ("pfifo", "2:"), "5c:11": ("pfifo", "11:"), "5c:12": ("pfifo", "12:")}

    classes = netpair.classes()
    assert set(classes) == {"5c:1", "5c:2", "5c:10", "5c:11", "5c:12"}
    expected = {  # class id: parent, rate, ceil
        "5c:1": ("root", 100_000_000, 100_000_000),
        "5c:2": ("5c:1", 100_000_000, 100_000_000),  # the unshaped bypass class, within the line
        "5c:10": ("5c:1", 20_000_000, 20_000_000),
        "5c:11": ("5c:10", 10_000_000, 20_000_000),  # ceil defaults to the parent's
        "5c:12": ("5c:10", 2_000_000, 2_000_000),
    }
    for cid, (parent, rate, ceil) in expected.items():
        got = classes[cid]
        assert (got["parent"], tc_rate(got["rate"]), tc_rate(got["ceil"])) == (parent, rate, ceil), cid
    assert (classes["5c:11"]["prio"], classes["5c:12"]["prio"]) == ("0", "5")
    assert (classes["5c:11"]["leaf"], classes["5c:12"]["leaf"]) == ("11:", "12:")


@pytest.mark.parametrize("ipv6", [False, True], ids=["ipv4", "ipv6"])
def test_traffic_in_a_2mbit_class_runs_at_its_rate(netpair, ipv6):
    netpair.shapekit("shape-init", "--config", str(netpair.write_config(TREE)))

    ratio = netpair.goodput(ipv6=ipv6) / 2_000_000
    print(f"goodput/rate {'ipv6' if ipv6 else 'ipv4'} 2mbit: {ratio:.3f}")
    assert 0.90 <= ratio <= 1.0, f"goodput/rate = {ratio:.3f}"
    sent = netpair.left.run("tc", "-s", "class", "show", "dev", netpair.dev, "classid", "5c:12").stdout
    assert int(sent.split("Sent ")[1].split()[0]) > 1_000_000  # the default class carried it


def test_a_class_alone_borrows_up_to_its_ceil(netpair):
    netpair.shapekit("shape-init", "--config", str(netpair.write_config(BORROW)))

    ratio = netpair.goodput() / 4_000_000
    print(f"goodput/ceil 1mbit->4mbit: {ratio:.3f}")
    assert 0.90 <= ratio <= 1.0, f"goodput/ceil = {ratio:.3f}"


def test_check_is_clean_after_the_first_three_boot_commands_with_no_caps(netpair):
    """shape-limit-ip has nothing to install without caps: --check does not ask for it."""
    config = str(netpair.write_config(TREE))
    for command in ("shape-init", "shape-bypass", "shape-mark"):
        netpair.shapekit(command, "--config", config)
    check = netpair.shapekit("shape-init", "--check", "--config", config, check=False)
    assert (check.returncode, check.stdout) == (0, "the kernel matches the config and saved state\n"), (
        check.stdout + check.stderr
    )
    netpair.shapekit("shape-limit-ip", "--config", config)
    check = netpair.shapekit("shape-init", "--check", "--config", config, check=False)
    assert (check.returncode, check.stdout) == (0, "the kernel matches the config and saved state\n"), (
        check.stdout + check.stderr
    )


def test_second_init_changes_nothing(netpair):
    config = str(netpair.write_config(TREE))
    netpair.shapekit("shape-init", "--config", config)
    first = netpair.snapshot()

    netpair.shapekit("shape-init", "--config", config)

    assert netpair.snapshot() == first


def test_dry_run_prints_a_script_that_builds_the_same_tree(netpair):
    config = str(netpair.write_config(TREE))
    before = netpair.snapshot()
    printed = netpair.shapekit("shape-init", "--config", config, "--dry-run").stdout
    assert netpair.snapshot() == before  # --dry-run changed nothing

    netpair.left.run("sh", "-e", stdin=printed)
    by_script = netpair.snapshot()
    netpair.shapekit("shape-flush")
    netpair.shapekit("shape-init", "--config", config)
    assert netpair.snapshot() == by_script


def test_flush_removes_shapekits_tree_and_nothing_else(netpair):
    netpair.shapekit("shape-init", "--config", str(netpair.write_config(TREE)))

    netpair.shapekit("shape-flush", "--dev", netpair.dev)

    assert [q["kind"] for q in netpair.qdiscs()] == ["noqueue"]  # veth's default
    assert netpair.classes() == {}
    # A root qdisc shapekit did not make stays, and flushing a device without a tree is no error.
    netpair.left.run("tc", "qdisc", "add", "dev", netpair.dev, "root", "handle", "1:", "htb", "default", "1")
    netpair.shapekit("shape-flush")
    netpair.shapekit("shape-flush", "--dev", netpair.dev)
    assert [(q["kind"], q["handle"]) for q in netpair.qdiscs()] == [("htb", "1:")]


BAD_CONFIGS = {
    "toml syntax": '[device.DEV]\nrate = "100mbit\n',
    "ambiguous unit": '[device.DEV]\nrate = "100kb"\n',
    "prio above 7": TREE.replace("prio = 5", "prio = 10"),
    "missing device": '[device.sk-nonesuch]\nrate = "10mbit"\n',
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_input_leaves_the_device_exactly_as_it_was(netpair, case):
    netpair.shapekit("shape-init", "--config", str(netpair.write_config(BORROW, "good.toml")))
    before = netpair.snapshot()

    result = netpair.shapekit("shape-init", "--config", str(netpair.write_config(BAD_CONFIGS[case])), check=False)

    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert netpair.snapshot() == before


def _kernel_has(line: str) -> bool:
    text = f"qdisc add dev lo root handle 1: htb\nclass add dev lo parent 1: classid 1:1 htb rate 1mbit\n{line}\n"
    return sh("unshare", "--net", "tc", "-batch", "-", stdin=text, check=False).returncode == 0


def test_a_missing_kernel_feature_is_refused_before_any_change(netpair):
    if _kernel_has("qdisc add dev lo parent 1:1 handle 2: sfq"):
        pytest.skip("this kernel has sch_sfq: nothing is missing to refuse")
    netpair.shapekit("shape-init", "--config", str(netpair.write_config(BORROW, "good.toml")))
    before = netpair.snapshot()

    result = netpair.shapekit(
        "shape-init", "--config", str(netpair.write_config(TREE.replace('"pfifo"', '"sfq"'))), check=False
    )

    assert result.returncode == 2
    assert "sfq" in result.stderr and 'leaf = "pfifo"' in result.stderr, result.stderr
    assert netpair.snapshot() == before


def test_a_failing_tc_command_leaves_the_device_unshaped(netpair):
    """A `tc` that applies the first four lines of the tree's batch for real, then fails on the fifth."""
    fake_bin = netpair.workdir / "bin"
    fake_bin.mkdir()
    fake_tc = fake_bin / "tc"
    real_tc = sh("sh", "-c", "command -v tc").stdout.strip()
    fake_tc.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = "-batch" ]; then\n'
        "  batch=$(cat)\n"
        f'  case "$batch" in *"class add dev sk"*) ;; *) printf "%s\\n" "$batch" | {real_tc} "$@"; exit $?;; esac\n'
        f'  printf "%s\\n" "$batch" | head -n 4 | {real_tc} -batch - || exit 1\n'
        '  echo "Error: injected failure." >&2; echo "Command failed -:5" >&2; exit 1\n'
        "fi\n"
        f'exec {real_tc} "$@"\n'
    )
    fake_tc.chmod(fake_tc.stat().st_mode | stat.S_IXUSR)
    netpair.env["PATH"] = f"{fake_bin}:{os.environ['PATH']}"

    result = netpair.shapekit("shape-init", "--config", str(netpair.write_config(TREE)), check=False)

    assert result.returncode == 1
    fifth = (
        f"`tc class add dev {netpair.dev} parent 5c:1 classid 5c:10 htb rate 20mbit ceil 20mbit quantum 39682` failed"
    )
    assert fifth in result.stderr and "injected failure" in result.stderr, result.stderr
    assert "left unshaped" in result.stderr
    assert not [q for q in netpair.qdiscs() if q["kind"] == "htb"]


# --- the mangle tables (iptables-nft): shape-flush deletes one only when shapekit created it
# and nothing but its chains is in it.


def _tables(netpair, tool: str) -> list[str]:
    """The tables a whole save of the left namespace lists (`-t mangle` shows one even when there is none)."""
    return [line[1:] for line in netpair.left.run(tool).stdout.splitlines() if line.startswith("*")]


def _mark_then_flush(netpair, saves: tuple[str, str] = ("iptables-save", "ip6tables-save")) -> None:
    config = str(netpair.write_config(TREE))
    for command in ("shape-init", "shape-mark"):
        netpair.shapekit(command, "--config", config)
    for tool in saves:
        assert "-A POSTROUTING -j SHAPEKIT" in netpair.save(tool).splitlines(), tool
    netpair.shapekit("shape-flush")


def test_flush_deletes_the_mangle_tables_shapekit_created(netpair):
    assert (_tables(netpair, "iptables-save"), _tables(netpair, "ip6tables-save")) == ([], [])

    _mark_then_flush(netpair)

    assert (_tables(netpair, "iptables-save"), _tables(netpair, "ip6tables-save")) == ([], [])
    assert not (netpair.workdir / "state" / "tables.json").exists()


def test_a_foreign_rule_keeps_its_table_and_itself(netpair):
    config = str(netpair.write_config(TREE))
    netpair.shapekit("shape-mark", "--config", config)  # the table is shapekit's...
    rule = ("-t", "mangle", "-A", "PREROUTING", "-d", "198.18.0.9/32", "-j", "ACCEPT")
    netpair.left.run("iptables", *rule)  # ...and then another tool's too

    _mark_then_flush(netpair)

    assert _tables(netpair, "iptables-save") == ["mangle"]
    assert "-A PREROUTING -d 198.18.0.9/32 -j ACCEPT" in netpair.save().splitlines()
    assert "SHAPEKIT" not in netpair.save()
    assert _tables(netpair, "ip6tables-save") == []  # IPv6's held shapekit's chains alone


def test_a_table_there_before_shapekit_stays(netpair):
    netpair.left.run("iptables", "-t", "mangle", "-N", "OTHER")
    netpair.left.run("iptables", "-t", "mangle", "-X", "OTHER")  # leaves the table, empty
    assert _tables(netpair, "iptables-save") == ["mangle"]

    _mark_then_flush(netpair)

    assert _tables(netpair, "iptables-save") == ["mangle"]
    assert "SHAPEKIT" not in netpair.save()
    assert _tables(netpair, "ip6tables-save") == []


def test_iptables_legacy_keeps_working_and_its_table_stays(netpair):
    """iptables-legacy's tables are kernel modules: shapekit removes its chains and nothing else."""
    legacy = netpair.workdir / "legacy"
    legacy.mkdir()
    multi = sh("sh", "-c", "command -v xtables-legacy-multi").stdout.strip()
    for tool in ("iptables", "iptables-save", "iptables-restore", "ip6tables", "ip6tables-save", "ip6tables-restore"):
        (legacy / tool).symlink_to(multi)  # it acts as the name it is called by
    netpair.env["PATH"] = f"{legacy}:{os.environ['PATH']}"

    _mark_then_flush(netpair, ("iptables-legacy-save", "ip6tables-legacy-save"))

    assert not (netpair.workdir / "state" / "tables.json").exists()  # nothing recorded: nothing to delete
    assert "SHAPEKIT" not in netpair.left.run("iptables-legacy-save", "-t", "mangle").stdout
    assert "SHAPEKIT" not in netpair.left.run("ip6tables-legacy-save", "-t", "mangle").stdout
    assert (_tables(netpair, "iptables-nft-save"), _tables(netpair, "ip6tables-nft-save")) == ([], [])
