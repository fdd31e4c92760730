"""gso_max_segs on a real kernel: shape-init holds a slow line's, --check sees it, shape-flush puts it back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

SLOW = """
[device.DEV]
rate = "20mbit"
leaf = "pfifo"
classifier = "classify"
"""


def gso_max_segs(netpair) -> int:
    return json.loads(netpair.left.run("ip", "-d", "-j", "link", "show", "dev", netpair.dev).stdout)[0]["gso_max_segs"]


def set_gso(netpair, segs: int) -> None:
    netpair.left.run("ip", "link", "set", "dev", netpair.dev, "gso_max_segs", str(segs))


def held_file(netpair) -> Path:
    return Path(netpair.env["SHAPEKIT_STATE_DIR"]) / "gso.json"


def test_init_holds_a_20mbit_lines_gso_to_2_and_flush_puts_the_value_back(netpair):
    config = str(netpair.write_config(SLOW))
    set_gso(netpair, 30)  # the admin's own value: what flush must put back

    netpair.shapekit("shape-init", "--config", config)

    assert gso_max_segs(netpair) == 2  # 2,500 bytes a millisecond at 20mbit: two segments
    assert json.loads(held_file(netpair).read_text()) == {netpair.dev: {"held": 2, "was": 30}}
    check = netpair.shapekit("shape-init", "--check", "--dev", netpair.dev, "--config", config, check=False)
    assert (check.returncode, check.stdout) == (0, "the kernel matches the config and saved state\n"), check.stdout

    netpair.shapekit("shape-flush")

    assert gso_max_segs(netpair) == 30
    assert not held_file(netpair).exists()


def test_check_sees_the_hold_undone_and_init_restores_it(netpair):
    config = str(netpair.write_config(SLOW))
    netpair.shapekit("shape-init", "--config", config)
    set_gso(netpair, 65535)

    check = netpair.shapekit("shape-init", "--check", "--dev", netpair.dev, "--config", config, check=False)
    netpair.shapekit("shape-init", "--config", config)

    assert (check.returncode, check.stdout) == (
        1,
        f"{netpair.dev}: gso_max_segs is 65535; the config holds it to 2 (run shape-init)\n",
    )
    assert gso_max_segs(netpair) == 2
    netpair.shapekit("shape-flush")
    assert gso_max_segs(netpair) == 65535  # the value before the first hold, kept across the second


def test_a_value_set_after_the_hold_is_left_by_flush(netpair):
    netpair.shapekit("shape-init", "--config", str(netpair.write_config(SLOW)))
    set_gso(netpair, 16)

    netpair.shapekit("shape-flush")

    assert gso_max_segs(netpair) == 16
    assert not held_file(netpair).exists()


def test_a_fast_line_and_keep_are_left_alone(netpair):
    before = gso_max_segs(netpair)
    fast = SLOW.replace('"20mbit"', '"1gbit"')
    keep = SLOW.replace('leaf = "pfifo"', 'leaf = "pfifo"\ngso_max_segs = "keep"')

    for text in (fast, keep):
        netpair.shapekit("shape-init", "--config", str(netpair.write_config(text)))
        assert gso_max_segs(netpair) == before
        assert not held_file(netpair).exists()


@pytest.mark.distro_kernel("sch_fq_codel", "cls_fw")
def test_debian_61_holds_and_puts_back_gso_under_a_seed_tree(netpair):
    """The same on Debian's 6.1 kernel, with the seed's fw classifier and fq_codel leaves."""
    config = str(netpair.write_config(SLOW.replace('"pfifo"', '"fq_codel"').replace('"classify"', '"fw"')))
    before = gso_max_segs(netpair)

    netpair.shapekit("shape-init", "--config", config)
    held = gso_max_segs(netpair)
    check = netpair.shapekit("shape-init", "--check", "--dev", netpair.dev, "--config", config, check=False)
    netpair.shapekit("shape-flush")

    assert held == 2
    assert check.returncode == 0, check.stdout
    assert gso_max_segs(netpair) == before
