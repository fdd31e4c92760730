"""shape-import on recorded kernel state: what seed 000's and seed 002's scripts left, read back as TOML.

Each directory in data/import holds what the kernel printed after a script ran
(tc -j qdisc show, tc -d class show, tc filter show per HTB qdisc, tc -j filter
show ingress, iptables-save and ip6tables-save -t mangle, ip -j addr show) and
the config shape-import must write from it:

- this-kernel-000, this-kernel-002: tests/seeds/seed_00N.sh with THIS_KERNEL=1 on this
  project's 6.18 kernel (pfifo and CLASSIFY for sfq and fw; u32 for fw);
- published-000, published-002: the scripts as published, on Debian 12's 6.1 kernel
  (the distro-kernel lane), where seed 000's own sfq replaces its nested qdisc;
- keep-nested-000: seed 000 with KEEP_NESTED=1 on Debian 12's kernel: its tree as the post means it (sfq, fw);
- mixed: data/import/mixed/script.sh, an ingress tree on an IFB and what shapekit cannot express.

by-hand.toml is what a small tree written in the tests below gives: everything expressed, exit 0.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from shapekit.commands.import_ import import_app
from shapekit.config.load import parse_config_text
from shapekit.plan import adopt
from shapekit.plan.adopt_mangle import parse_rule

DATA = Path(__file__).parent / "data" / "import"
SEED_000 = Path(__file__).resolve().parents[2].parent / "shared" / "seeds"


def tree(case: Path, dev: str, suffix: str = "", ifb: adopt.TreeReading | None = None) -> adopt.TreeReading:
    filters = {
        p.stem.rsplit("-", 1)[1] + ":": p.read_text()
        for p in case.glob(f"filter{suffix}-*.txt")
        if suffix or "ifb" not in p.name
    }
    return adopt.TreeReading(
        dev=dev,
        qdiscs=(case / f"qdisc{suffix}.json").read_text(),
        classes=(case / f"class{suffix}.txt").read_text(),
        filters=filters,
        ingress=(case / "ingress.json").read_text() if not suffix else "[]",
        ifb=ifb,
    )


def reading(name: str) -> adopt.KernelReading:
    case = DATA / name
    ifb = tree(case, "ifb0", "-ifb0") if (case / "qdisc-ifb0.json").exists() else None
    mangle = {4: (case / "iptables.txt").read_text(), 6: (case / "ip6tables.txt").read_text()}
    return adopt.KernelReading((tree(case, "eth0", ifb=ifb),), mangle, (case / "addr.json").read_text())


@pytest.mark.parametrize(
    ("name", "left_out"),
    [
        ("this-kernel-000", 2),
        ("this-kernel-002", 6),
        ("published-000", 6),
        ("published-002", 3),
        ("mixed", 3),
        ("keep-nested-000", 2),
    ],
)
def test_recorded_kernel_state_gives_exactly_the_expected_config(name, left_out):
    imported = adopt.adopt(reading(name))
    assert imported.text == (DATA / name / "expected.toml").read_text()
    assert imported.left_out == left_out == imported.text.count("# LEFT OUT:")
    parse_config_text(imported.text, Path(name))  # shape-init takes it


def test_seed_000_nested_tree_is_flattened_with_its_bypass_marks_and_rules_in_first_match_order():
    config = parse_config_text(adopt.adopt(reading("this-kernel-000")).text, Path("x"))
    device = config.devices["eth0"]
    assert device.rate == 100_000_000 and device.default == "c1030" and device.classifier == "classify"
    assert [(c.name, c.parent, c.rate, c.ceil, c.prio, c.mark) for c in device.classes] == [
        ("c1", None, 50_000_000, 50_000_000, None, None),
        ("c10", "c1", 50_000_000, 50_000_000, None, None),
        ("c1010", "c10", 10_000_000, 50_000_000, None, 11010),
        ("c1030", "c10", 512_000, 50_000_000, 5, 11030),
        ("c1090", "c10", 512_000, 2_048_000, 7, 11090),
    ]
    assert config.bypass.mark == 1001
    assert [str(p) for p in config.bypass.ports] == ["22/tcp", "80/tcp"]
    # The script's last match wins, shapekit's first: the rules come turned around, and
    # the catch-all `-m connmark --mark 0x0 -j MARK 11030` is the default class.
    assert [(m.class_name, m.proto, m.sport, m.tcp_syn) for m in config.marks] == [
        ("c1090", "tcp", ("61000:63000",), False),
        ("c1010", "icmp", (), False),
        ("c1010", "tcp", (), True),
    ]


def test_seed_002_classes_that_hold_one_host_become_caps():
    for name in ("published-002", "this-kernel-002"):
        config = parse_config_text(adopt.adopt(reading(name)).text, Path(name))
        device = config.devices["eth0"]
        caps = {str(c.host): c.rate for c in device.limits}
        assert caps == {"198.18.0.101/32": 128_000, "198.18.0.102/32": 512_000, "198.18.0.103/32": 32_000}
        assert [(c.name, c.rate, c.burst) for c in device.classes] == [("c9999", 100_000_000, 5120)]
        assert config.marks == ()


def test_the_posts_own_iptables_save_reads_its_layer7_and_old_style_marks():
    post = (SEED_000 / "000_6a65fdf12fe08ada.txt").read_text() if SEED_000.exists() else ""
    lines = [line for line in post.splitlines() if line.startswith("-A POSTROUTING -m layer7 --l7proto dns")]
    rule = parse_rule(lines[0] if lines else "-A POSTROUTING -m layer7 --l7proto dns -j MARK --set-mark 11010", 4)
    assert (rule.selector.l7proto, rule.target, rule.value, rule.problem) == ("dns", "MARK", 11010, "")
    syn = parse_rule("-A POSTROUTING -p tcp -m tcp --tcp-flags SYN,RST,ACK SYN -j MARK --set-mark 11010", 4)
    assert (syn.selector.proto, syn.selector.tcp_syn, syn.value) == ("tcp", True, 11010)
    ports = parse_rule("-A POSTROUTING -s 10.0.0.1 -p tcp -m multiport --sports 22,80 -j MARK --set-mark 1001", 4)
    assert (ports.selector.src, ports.selector.sport, ports.value) == ("10.0.0.1", ("22", "80"), 1001)


def test_a_class_takes_the_name_its_rules_comment_gives_it():
    config = parse_config_text(adopt.adopt(reading("mixed")).text, Path("mixed"))
    assert [c.name for c in config.devices["eth0"].classes] == ["sip", "c20", "c30"]  # -m comment --comment sip
    assert [c.name for c in config.devices["eth0"].ingress.classes] == ["c10", "c30"]


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("-A POSTROUTING ! -p tcp -j MARK --set-mark 5", "a negated match (`! -p`)"),
        ("-A POSTROUTING -m dscp --dscp 46 -j MARK --set-mark 5", "-m dscp: shapekit has no such match"),
        (
            "-A POSTROUTING -p tcp --tcp-flags ACK ACK -j MARK --set-mark 5",
            "--tcp-flags ACK ACK: shapekit matches SYN only",
        ),
        ("-A POSTROUTING -j MARK --set-xmark 0x5/0xff", "MARK --set-xmark 0x5/0xff: shapekit sets the whole mark"),
    ],
)
def test_a_rule_shapekit_cannot_express_says_why(line, problem):
    assert parse_rule(line, 4).problem == problem


# --- the command ---------------------------------------------------------------------


def answer_recorded(system, name: str) -> None:
    case = DATA / name
    system.roots["eth0"] = {"kind": "htb", "handle": "1:", "root": True}
    system.answers[("tc", "-j", "-d", "qdisc", "show", "dev", "eth0")] = (case / "qdisc.json").read_text()
    system.answers[("tc", "-d", "class", "show", "dev", "eth0")] = (case / "class.txt").read_text()
    for path in case.glob("filter-*.txt"):
        system.answers[("tc", "filter", "show", "dev", "eth0", "parent", path.stem.split("-")[1] + ":")] = (
            path.read_text()
        )
    system.answers[("iptables-save", "-t", "mangle")] = (case / "iptables.txt").read_text()
    system.answers[("ip6tables-save", "-t", "mangle")] = (case / "ip6tables.txt").read_text()
    system.answers[("ip", "-j", "addr", "show")] = (case / "addr.json").read_text()


def test_import_prints_the_config_and_exits_0_when_all_is_expressed(system, cli):
    system.roots["eth0"] = {"kind": "htb", "handle": "1:", "root": True}
    system.answers[("tc", "-j", "-d", "qdisc", "show", "dev", "eth0")] = HDR_QDISC
    system.answers[("tc", "-d", "class", "show", "dev", "eth0")] = HDR_CLASSES
    system.answers[("tc", "filter", "show", "dev", "eth0", "parent", "1:")] = u32(1, "1:20", "c6120028/ffffff00 at 16")
    result = cli(import_app, "--dev", "eth0")
    assert result.exit_code == 0, result.output
    assert result.stdout == (DATA / "by-hand.toml").read_text()
    assert all(argv[0] in ("tc", "iptables-save", "ip6tables-save", "ip") for argv, _ in system.calls)
    assert not [argv for argv, _ in system.calls if {"add", "del", "replace", "change", "-batch"} & set(argv)]


def test_import_writes_the_file_and_exits_3_when_something_is_left_out(system, cli, tmp_path):
    answer_recorded(system, "published-002")
    target = tmp_path / "imported.toml"
    result = cli(import_app, "--output", str(target))  # every device with an HTB root: eth0
    assert result.exit_code == 3, result.output
    assert target.read_text() == (DATA / "published-002" / "expected.toml").read_text()
    assert oct(target.stat().st_mode & 0o777) == "0o644"
    assert "3 thing(s) left in comments (LEFT OUT)" in result.stderr


def test_import_will_not_replace_a_file_unless_forced(system, cli, tmp_path):
    answer_recorded(system, "this-kernel-000")
    target = tmp_path / "shapekit.toml"
    target.write_text("mine\n")
    result = cli(import_app, "--dev", "eth0", "--output", str(target))
    assert result.exit_code == 2
    assert result.stderr == f"shape-import: {target} exists: choose another --output, or pass --force to replace it\n"
    assert target.read_text() == "mine\n"
    assert cli(import_app, "--dev", "eth0", "--output", str(target), "--force").exit_code == 3  # its bypass ports
    assert target.read_text().startswith("# shapekit config written by shape-import")


@pytest.mark.parametrize(
    ("args", "setup", "message"),
    [
        (
            ["--dev", "eth9"],
            None,
            "device 'eth9' does not exist: check the name against `ip link`, or pass --dev with the devices to shape",
        ),
        (["--dev", "eth1"], None, "eth1 has no HTB root qdisc (its root is noqueue): shape-import reads HTB trees"),
        ([], None, "no device here has an HTB tree to import (name one with --dev)"),
        (
            ["--dev", "eth0"],
            "not root",
            "reading the mangle tables (iptables-save) needs root: run shape-import as root",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_2(system, cli, mocker, args, setup, message):
    if setup == "not root":
        answer_recorded(system, "this-kernel-000")
        mocker.patch("shapekit.commands.import_.os.geteuid", return_value=1000)
    result = cli(import_app, *args)
    assert result.exit_code == 2
    assert result.stderr == f"shape-import: {message}\n"
    assert not [argv for argv, _ in system.calls if argv[:1] == ("iptables-save",)] or setup is None


def test_dry_run_lists_what_it_would_read(system, cli):
    result = cli(import_app, "--dry-run", "--dev", "eth0")
    assert result.exit_code == 0
    assert result.stdout.splitlines()[:3] == [
        "# shape-import reads these and changes nothing:",
        "tc -j -d qdisc show dev eth0",
        "tc -d class show dev eth0",
    ]
    assert system.calls == []


# --- HTB's own rules for where a packet goes (net/sched/sch_htb.c, htb_classify) -----------

HDR_QDISC = '[{"kind":"htb","handle":"1:","root":true,"options":{"r2q":10,"default":"0x10"}}]'
HDR_CLASSES = """\
class htb 1:1 root prio 0 quantum 200000 rate 100Mbit ceil 100Mbit linklayer ethernet burst 1600b/1 mpu 0b cburst 1600b/1 mpu 0b level 7
class htb 1:10 parent 1:1 prio 0 quantum 200000 rate 50Mbit ceil 100Mbit linklayer ethernet burst 1600b/1 mpu 0b cburst 1600b/1 mpu 0b level 0
class htb 1:20 parent 1:1 prio 0 quantum 200000 rate 30Mbit ceil 100Mbit linklayer ethernet burst 1600b/1 mpu 0b cburst 1600b/1 mpu 0b level 0
"""


def u32(pref: int, flowid: str, *keys: str) -> str:
    lines = [
        f"filter protocol ip pref {pref} u32 chain 0 fh 80{pref}::800 order 2048 key ht 80{pref} bkt 0 *flowid {flowid} not_in_hw"
    ]
    return "\n".join(lines + [f"  match {k}" for k in keys]) + "\n"


def made_by_hand(filters: str = "", mangle: str = "") -> adopt.Imported:
    tree = adopt.TreeReading("eth0", HDR_QDISC, HDR_CLASSES, {"1:": filters})
    save = f"*mangle\n:POSTROUTING ACCEPT [0:0]\n{mangle}COMMIT\n"
    return adopt.adopt(adopt.KernelReading((tree,), {4: save, 6: "*mangle\nCOMMIT\n"}))


def test_a_filter_to_x_0_is_the_direct_queue_and_to_a_missing_class_the_default():
    imported = made_by_hand(u32(1, "1:0", "c6120010/ffffffff at 16") + u32(2, "1:99", "c6120011/ffffffff at 16"))
    assert "# LEFT OUT: a u32 filter to the unshaped line" in imported.text
    config = parse_config_text(imported.text, Path("x"))
    assert [(m.class_name, str(m.dst)) for m in config.marks] == [("c10", "198.18.0.17/32")]  # 1:99 → the default


def test_classify_to_an_inner_class_falls_to_the_default_and_to_x_0_goes_unshaped():
    imported = made_by_hand(
        mangle="-A POSTROUTING -p tcp -m tcp --dport 22 -j CLASSIFY --set-class 0001:0001\n"
        "-A POSTROUTING -p tcp -m tcp --dport 80 -j CLASSIFY --set-class 0001:0000\n"
    )
    config = parse_config_text(imported.text, Path("x"))
    assert [(m.class_name, m.dport) for m in config.marks] == [("c10", ("22",))]
    assert [str(p) for p in config.bypass.ports] == ["80/tcp"]


def test_a_classify_rule_before_the_mark_it_maps_decides_nothing():
    imported = made_by_hand(
        mangle="-A POSTROUTING -m mark --mark 0x5 -j CLASSIFY --set-class 0001:0020\n"
        "-A POSTROUTING -p udp -j MARK --set-xmark 0x5/0xffffffff\n"
    )
    assert "# LEFT OUT: sets mark 5 (0x5) after the CLASSIFY rule for it, so it decides no class" in imported.text


def test_a_host_class_behind_an_earlier_rule_stays_a_class_not_a_cap():
    classes = (
        HDR_CLASSES + "class htb 1:50 parent 1:1 prio 0 rate 1Mbit ceil 1Mbit burst 1600b/1 cburst 1600b/1 level 0\n"
    )
    tree = adopt.TreeReading(
        "eth0",
        HDR_QDISC,
        classes,
        {
            "1:": u32(1, "1:20", "00060000/00ff0000 at 8", "00000016/0000ffff at 20")
            + u32(2, "1:50", "c6120028/ffffffff at 16")
        },
    )
    config = parse_config_text(adopt.adopt(adopt.KernelReading((tree,), {})).text, Path("x"))
    assert config.devices["eth0"].limits == ()  # ssh to .40 went to 1:20 first: a cap would take it
    assert [(m.class_name, m.dport, str(m.dst)) for m in config.marks] == [
        ("c20", ("22",), "None"),
        ("c50", (), "198.18.0.40/32"),
    ]


def atm_classes(overheads: tuple[int, int, int]) -> str:
    """HDR_CLASSES as `tc -d class show` prints them when the script gave each class overhead N linklayer atm."""
    lines = HDR_CLASSES.splitlines()
    return "".join(
        line.replace(" ceil ", f" overhead {n} ceil ").replace("linklayer ethernet", "linklayer atm") + "\n"
        for line, n in zip(lines, overheads, strict=True)
    )


def test_overhead_and_linklayer_every_class_shares_become_the_trees_keys():
    tree = adopt.TreeReading("eth0", HDR_QDISC, atm_classes((40, 40, 40)), {"1:": ""})
    imported = adopt.adopt(adopt.KernelReading((tree,), {}))

    assert "LEFT OUT" not in imported.text
    assert 'classifier = "classify"\noverhead = 40\nlinklayer = "atm"\n' in imported.text
    device = parse_config_text(imported.text, Path("x")).devices["eth0"]
    assert (device.overhead, device.linklayer) == (40, "atm")


def test_classes_that_charge_differently_are_left_out():
    tree = adopt.TreeReading("eth0", HDR_QDISC, atm_classes((40, 40, 10)), {"1:": ""})
    imported = adopt.adopt(adopt.KernelReading((tree,), {}))

    assert (
        "# LEFT OUT: class 1:20: linklayer atm, overhead 10: shapekit charges every class of a tree alike,"
        " overhead 0..256 with linklayer ethernet or atm\n" in imported.text
    )
    assert "overhead =" not in imported.text and "linklayer =" not in imported.text


STAB_QDISC = HDR_QDISC.replace("}}]", '},"stab":{"linklayer":"atm","overhead":-4,"mtu":2047,"tsize":512}}]')


def test_a_root_size_table_over_classes_that_charge_nothing_becomes_the_trees_keys():
    tree = adopt.TreeReading("eth0", STAB_QDISC, HDR_CLASSES, {"1:": ""})
    imported = adopt.adopt(adopt.KernelReading((tree,), {}))

    assert "LEFT OUT" not in imported.text
    assert 'classifier = "classify"\noverhead = -4\nlinklayer = "atm"\n' in imported.text
    device = parse_config_text(imported.text, Path("x")).devices["eth0"]
    assert (device.overhead, device.linklayer) == (-4, "atm")


def test_a_root_size_table_under_classes_that_charge_too_is_left_out():
    tree = adopt.TreeReading("eth0", STAB_QDISC, atm_classes((40, 40, 40)), {"1:": ""})
    imported = adopt.adopt(adopt.KernelReading((tree,), {}))

    assert (
        "# LEFT OUT: qdisc 1: size table overhead -4 linklayer atm: shapekit writes one only on the root, for"
        " classes that charge nothing of their own, overhead -64..256 with linklayer ethernet or atm\n" in imported.text
    )
    assert 'overhead = 40\nlinklayer = "atm"\n' in imported.text
    assert imported.left_out == 1


def test_a_u32_filter_in_a_hash_table_of_the_scripts_own_is_left_out():
    text = "filter protocol ip pref 1 u32 chain 0 fh 2:7:800 order 2048 key ht 2 bkt 7 *flowid 1:20 not_in_hw\n  match c6120007/ffffffff at 16\n"
    assert "LEFT OUT: a filter in a u32 hash table of the script's own (ht 2)" in made_by_hand(text).text


def test_a_comment_over_two_lines_is_one_rule():
    save = (
        '-A POSTROUTING -p tcp -m tcp --dport 86 -m comment --comment "new\nline" -j CLASSIFY --set-class 0001:0020\n'
    )
    config = parse_config_text(made_by_hand(mangle=save).text, Path("x"))
    assert [c.name for c in config.devices["eth0"].classes] == ["c10", "new-line"]


def test_a_vlan_device_name_is_a_quoted_key(system, cli):
    tree = adopt.TreeReading("eth0.100", HDR_QDISC, HDR_CLASSES, {})
    text = adopt.adopt(adopt.KernelReading((tree,), {})).text
    assert '[device."eth0.100"]' in text
    assert list(parse_config_text(text, Path("x")).devices) == ["eth0.100"]


def test_output_never_replaces_a_device_a_link_or_a_directory(system, cli, tmp_path):
    answer_recorded(system, "this-kernel-000")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    for target in (tmp_path / "dangling", tmp_path, Path("/dev/null")):
        result = cli(import_app, "--dev", "eth0", "--output", str(target), "--force")
        assert result.exit_code == 2
        assert (
            result.stderr
            == f"shape-import: {target} is not a regular file (a device, a directory or a link): choose a new path for --output\n"
        )
    assert not (tmp_path / "nowhere").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["dangling"]


def test_verbose_echoes_each_read_and_a_device_named_twice_is_read_once(system, cli):
    answer_recorded(system, "this-kernel-000")
    result = cli(import_app, "--dev", "eth0", "--dev", "eth0", "-v")
    assert result.exit_code == 3
    assert "+ tc -d class show dev eth0\n" in result.stderr
    assert sum(argv == ("tc", "-d", "class", "show", "dev", "eth0") for argv, _ in system.calls) == 1
