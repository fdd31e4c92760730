"""gso_max_segs: shape-init holds a slow line's GSO super-packets, shape-flush puts the value back."""

from __future__ import annotations

import json

import pytest
from paths import HOLD_GSO, HOLD_GSO_SCRIPT, READ_GSO, SEED_CONFIG

from shapekit.commands.flush import flush_app
from shapekit.commands.init import init_app
from shapekit.config.load import load_config
from shapekit.errors import CommandFailed
from shapekit.plan import gso
from shapekit.plan.gso import Gso, Held

PUT_BACK = ("ip", "link", "set", "dev", "eth0", "gso_max_segs", "65535")
SHAPEKIT_ROOT = {"kind": "htb", "handle": "5c:", "root": True}


LEFT_UNSHAPED = "eth0's sent traffic was left unshaped (its tree removed, gso_max_segs as it was)\n"


def init_over_a_tree(system, cli):
    """shape-init where eth0 has shapekit's tree (what a failed hold takes away)."""
    system.roots["eth0"] = SHAPEKIT_ROOT
    return cli(init_app, "--config", str(SEED_CONFIG))


def device(write_config, line: str, setting: str = ""):
    text = f'[device.eth0]\nrate = "{line}"\n{setting}'
    return load_config(write_config(text), check_owner=False).devices["eth0"]


@pytest.mark.parametrize(
    ("line", "setting", "segs"),
    [
        ("20mbit", "", 2),  # 2,500 bytes a millisecond: two segments
        ("1500kbit", "", 1),
        ("100mbit", "", 9),
        ("500mbit", "", 42),
        ("600mbit", "", None),  # 64 KB in under a millisecond: left alone
        ("10gbit", "", None),
        ("20mbit", 'gso_max_segs = "keep"', None),
        ("10gbit", "gso_max_segs = 4", 4),
    ],
)
def test_auto_holds_a_super_packet_to_what_the_line_sends_in_a_millisecond(write_config, line, setting, segs):
    assert gso.wanted_segs(device(write_config, line, setting)) == segs


@pytest.mark.parametrize(
    ("want", "now", "before", "cmds", "after"),
    [
        (9, 65535, None, [HOLD_GSO], Held(9, 65535)),  # first run
        (9, 9, Held(9, 65535), [], Held(9, 65535)),  # again: nothing to do, the old value kept
        (9, 65535, Held(9, 64), [HOLD_GSO], Held(9, 65535)),  # rebooted: the kernel's value is the one to keep
        (9, 4, None, [], None),  # the driver (or the admin) has it lower: left alone
        (4, 9, Held(9, 65535), [HOLD_GSO[:-1] + ("4",)], Held(4, 65535)),  # a new setting: the first value kept
        (None, 9, Held(9, 65535), [PUT_BACK], None),  # "keep" now: put back
        (None, 7, Held(9, 65535), [], None),  # someone set 7 since: theirs stays
    ],
)
def test_plan_hold(want, now, before, cmds, after):
    assert gso.plan_hold("eth0", want, Gso(now, 65535), before) == (cmds, after)


def test_the_value_put_back_is_no_more_than_the_driver_takes_now():
    """A bond whose members changed may take less than it did: the kernel refuses more than tso_max_segs."""
    assert gso.release("eth0", Gso(9, 64), Held(9, 65535)) == [PUT_BACK[:-1] + ("64",)]


def test_drift_names_the_value_and_what_the_config_holds():
    assert gso.gso_drift("eth0", 9, 65535, None) == [
        "eth0: gso_max_segs is 65535; the config holds it to 9 (run shape-init)"
    ]
    assert gso.gso_drift("eth0", 9, 4, None) == []
    assert gso.gso_drift("eth0", None, 9, Held(9, 65535)) == [
        "eth0: gso_max_segs is held to 9, which the config no longer asks for (run shape-init)"
    ]
    assert gso.gso_drift("eth0", None, 65535, Held(9, 65535)) == []


@pytest.mark.parametrize("value", ['"fast"', "0", "65536", "true", "2.5"])
def test_a_bad_value_is_one_line_and_changes_nothing(system, cli, write_config, value):
    config = write_config(f'[device.eth0]\nrate = "20mbit"\ngso_max_segs = {value}\n')

    result = cli(init_app, "--config", str(config))

    assert result.exit_code == 2
    assert "device.eth0.gso_max_segs" in result.stderr and '"auto", "keep" or a number' in result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert system.calls == []


def test_init_records_the_value_to_put_back_and_holds_it_once(system, cli, tmp_path):
    first = cli(init_app, "--config", str(SEED_CONFIG))
    saved = json.loads((tmp_path / "state" / "gso.json").read_text())
    second = cli(init_app, "--config", str(SEED_CONFIG))

    assert first.exit_code == second.exit_code == 0
    assert saved == {"eth0": {"held": 9, "was": 65535}}
    assert [argv for argv, _ in system.calls].count(HOLD_GSO) == 1  # the second run finds it held
    assert json.loads((tmp_path / "state" / "gso.json").read_text()) == saved


def test_a_failed_hold_leaves_the_device_unshaped_and_the_record_as_before(system, cli, tmp_path):
    recorded = []

    def refuse(argv, stdin):
        if argv == HOLD_GSO:
            recorded.append(json.loads((tmp_path / "state" / "gso.json").read_text()))  # written first
            raise CommandFailed(" ".join(argv), "Error: Invalid argument\n")

    system.hooks.append(refuse)

    result = init_over_a_tree(system, cli)

    assert result.exit_code == 1
    assert result.stderr == (
        "shape-init: `ip link set dev eth0 gso_max_segs 9` failed: Error: Invalid argument; " + LEFT_UNSHAPED
    )
    assert recorded == [{"eth0": {"held": 9, "was": 65535}}]
    assert system.batches()[-1] == "qdisc del dev eth0 root\n"
    assert not (tmp_path / "state" / "gso.json").exists()


def test_a_record_that_cannot_be_written_leaves_the_device_unshaped_and_unheld(system, cli, mocker):
    mocker.patch(
        "shapekit.commands.init.save_held_gso", side_effect=CommandFailed("writing gso.json", "No space left on device")
    )

    result = init_over_a_tree(system, cli)

    assert result.exit_code == 1
    assert result.stderr == "shape-init: `writing gso.json` failed: No space left on device; " + LEFT_UNSHAPED
    assert HOLD_GSO not in [argv for argv, _ in system.calls]
    assert system.batches()[-1] == "qdisc del dev eth0 root\n"


def test_dry_run_init_prints_the_hold_and_writes_no_record(system, cli, tmp_path):
    result = cli(init_app, "--config", str(SEED_CONFIG), "--dry-run")

    assert result.exit_code == 0, result.stderr
    assert result.stdout.endswith(HOLD_GSO_SCRIPT)
    assert "eth0" not in system.gso
    assert not (tmp_path / "state" / "gso.json").exists()


def test_flush_puts_the_value_back_and_forgets_it(system, cli, tmp_path):
    cli(init_app, "--config", str(SEED_CONFIG))
    system.roots["eth0"] = SHAPEKIT_ROOT
    start = len(system.calls)

    result = cli(flush_app)

    assert result.exit_code == 0, result.stderr
    calls = [argv for argv, _ in system.calls[start:]]
    assert calls[-2:] == [READ_GSO, PUT_BACK]  # last: the tree, chains and sets are gone even if it is refused
    assert calls.index(("tc", "-batch", "-")) < calls.index(READ_GSO)
    assert system.gso["eth0"] == 65535
    assert not (tmp_path / "state" / "gso.json").exists()


def test_flush_leaves_a_value_someone_set_since(system, cli, tmp_path):
    cli(init_app, "--config", str(SEED_CONFIG))
    system.gso["eth0"] = 16

    result = cli(flush_app)

    assert result.exit_code == 0, result.stderr
    assert [argv for argv, _ in system.calls][-1] == READ_GSO  # read, and left
    assert system.gso["eth0"] == 16
    assert not (tmp_path / "state" / "gso.json").exists()


def test_flush_of_another_device_keeps_the_record(system, cli, tmp_path):
    cli(init_app, "--config", str(SEED_CONFIG))

    result = cli(flush_app, "--dev", "eth1")

    assert result.exit_code == 0, result.stderr
    assert json.loads((tmp_path / "state" / "gso.json").read_text()) == {"eth0": {"held": 9, "was": 65535}}


def test_dry_run_flush_prints_the_put_back_and_keeps_the_record(system, cli, tmp_path):
    cli(init_app, "--config", str(SEED_CONFIG))

    result = cli(flush_app, "--dry-run")

    assert "# eth0: put back its gso_max_segs\nip link set dev eth0 gso_max_segs 65535\n" in result.stdout
    assert system.gso["eth0"] == 9
    assert (tmp_path / "state" / "gso.json").exists()


def test_keep_after_a_hold_puts_the_value_back(system, cli, tmp_path, write_config):
    cli(init_app, "--config", str(SEED_CONFIG))
    keep = SEED_CONFIG.read_text().replace('rate = "100mbit"', 'rate = "100mbit"\ngso_max_segs = "keep"', 1)

    result = cli(init_app, "--config", str(write_config(keep)))

    assert result.exit_code == 0, result.stderr
    assert system.gso["eth0"] == 65535
    assert not (tmp_path / "state" / "gso.json").exists()


def test_a_broken_record_is_refused_before_any_change(system, cli, tmp_path):
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "gso.json").write_text('{"eth0": {"held": 0, "was": 65535}}')

    init = cli(init_app, "--config", str(SEED_CONFIG))
    flush = cli(flush_app)

    for result in (init, flush):
        assert result.exit_code == 2
        assert "gso.json" in result.stderr and "eth0.held" in result.stderr
        assert len(result.stderr.splitlines()) == 1
    assert system.batches() == []
    assert not [argv for argv, _ in system.calls if argv[:3] == ("ip", "link", "set")]


def test_check_reports_a_raised_value_and_a_device_held_but_no_longer_configured(system, cli, tmp_path):
    cli(init_app, "--config", str(SEED_CONFIG))
    system.gso["eth0"] = 65535  # raised by hand
    held = json.loads((tmp_path / "state" / "gso.json").read_text())
    (tmp_path / "state" / "gso.json").write_text(json.dumps({**held, "eth1": {"held": 2, "was": 65535}}))
    system.gso["eth1"] = 2  # held by an earlier config that shaped eth1

    result = cli(init_app, "--check", "--config", str(SEED_CONFIG))

    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert "eth0: gso_max_segs is 65535; the config holds it to 9 (run shape-init)" in lines
    assert "eth1: gso_max_segs is held to 2, but the config does not shape eth1 (shape-flush --dev eth1)" in lines


def test_old_iproute2_without_gso_max_segs_is_refused_before_any_change(system, cli):
    system.answers[READ_GSO] = json.dumps([{"ifname": "eth0"}])

    result = cli(init_app, "--config", str(SEED_CONFIG))

    assert result.exit_code == 2
    assert result.stderr == (
        "shape-init: `ip -d -j link show dev eth0` shows no gso_max_segs (an old iproute2): upgrade iproute2, "
        'or set gso_max_segs = "keep" in [device.eth0]\n'
    )
    assert system.batches() == []


def test_a_fast_line_with_nothing_held_reads_no_gso(system, cli, write_config):
    result = cli(init_app, "--config", str(write_config('[device.eth0]\nrate = "1gbit"\n')))

    assert result.exit_code == 0, result.stderr
    assert not [argv for argv, _ in system.calls if argv[0] == "ip" and "link" in argv and argv[-1] != "ifb"]


def test_a_failed_hold_whose_tree_cannot_be_removed_says_both(system, cli):
    def refuse(argv, stdin):
        if argv == HOLD_GSO:
            raise CommandFailed(" ".join(argv), "Error: Invalid argument\n")
        if argv == ("tc", "-batch", "-") and stdin == "qdisc del dev eth0 root\n":
            raise CommandFailed("tc -batch -", "RTNETLINK answers: Device or resource busy\n")

    system.hooks.append(refuse)

    result = init_over_a_tree(system, cli)

    assert result.exit_code == 1
    assert result.stderr == (
        "shape-init: `ip link set dev eth0 gso_max_segs 9` failed: Error: Invalid argument; removing eth0's tree "
        "failed too: `tc -batch -` failed: RTNETLINK answers: Device or resource busy\n"
    )
