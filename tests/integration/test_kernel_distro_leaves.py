"""Leaf qdiscs this machine's kernel lacks (fq_codel, cake, sfq on an ingress tree), moving real traffic.

Run in the distro-kernel lane (tests/distro/run: Debian's own kernel), and on
any host kernel that has the modules. Goodput is read at the receiver: an
upload's from iperf3's total (the local sender keeps the queue short), a
download's from its per-second intervals after slow start (a remote sender
fills the queue; see netns.NetPair.goodput).
"""

from __future__ import annotations

import json

import pytest

EGRESS = """
[device.DEV]
rate = "1gbit"
default = "bulk"
leaf = "{leaf}"
classifier = "fw"

[device.DEV.classes.interactive]
rate = "2mbit"
ceil = "8mbit"
prio = 0
{interactive_leaf}

[device.DEV.classes.bulk]
rate = "1mbit"
ceil = "4mbit"
prio = 5

[[mark]]
class = "interactive"
proto = "tcp"
dport = 5300
"""
INTERACTIVE_CEIL, BULK_CEIL = 8_000_000, 4_000_000
# (device leaf, interactive class's own leaf) → the leaf kinds the kernel must hold
LEAVES = {
    "fq_codel": (("fq_codel", None), {"5c:10": "fq_codel", "5c:11": "fq_codel"}),
    "cake": (("cake", None), {"5c:10": "cake", "5c:11": "cake"}),
    "class-leaf": (("pfifo", "fq_codel"), {"5c:10": "fq_codel", "5c:11": "pfifo"}),
}
MODULES = {"fq_codel": ("sch_fq_codel",), "cake": ("sch_cake",), "class-leaf": ("sch_fq_codel",)}


def leaf_kinds(pair, dev: str | None = None) -> dict[str, str]:
    return {q["parent"]: q["kind"] for q in pair.qdiscs(dev) if not q.get("root") and q["parent"] != "5c:2"}


@pytest.mark.parametrize(
    "case", [pytest.param(c, marks=pytest.mark.distro_kernel("cls_fw", *MODULES[c])) for c in LEAVES]
)
def test_each_class_holds_its_ceil_through_its_leaf_qdisc(netpair, case):
    (leaf, interactive_leaf), kinds = LEAVES[case]
    own = f'leaf = "{interactive_leaf}"' if interactive_leaf else ""
    config = str(netpair.write_config(EGRESS.format(leaf=leaf, interactive_leaf=own)))
    for command in ("shape-init", "shape-bypass", "shape-mark", "shape-limit-ip"):
        netpair.shapekit(command, "--config", config)
    assert leaf_kinds(netpair) == kinds

    interactive = netpair.goodput(port=5300) / INTERACTIVE_CEIL
    bulk = netpair.goodput(port=7002) / BULK_CEIL

    print(f"{case}: goodput/ceil interactive {interactive:.3f}, bulk {bulk:.3f}")
    assert 0.90 <= interactive <= 1.0
    assert 0.90 <= bulk <= 1.0
    assert netpair.class_bytes("5c:10") > 3_000_000 and netpair.class_bytes("5c:11") > 1_500_000
    result = netpair.shapekit("shape-init", "--config", config, "--check", check=False)
    assert result.returncode == 0, result.stdout


@pytest.mark.distro_kernel("sch_cake")
def test_cake_runs_unlimited_under_htb(netpair):
    config = str(netpair.write_config(EGRESS.format(leaf="cake", interactive_leaf="")))
    netpair.shapekit("shape-init", "--config", config)
    cake = next(q for q in netpair.qdiscs() if q["kind"] == "cake")
    options = cake["options"]
    assert (options["bandwidth"], options["diffserv"], options["flowmode"]) == (
        "unlimited",
        "besteffort",
        "triple-isolate",
    )
    assert options["split_gso"] is True


INGRESS = """
[device.DEV]
rate = "1gbit"
leaf = "sfq"

[device.DEV.ingress]
rate = "20mbit"
default = "normal"
leaf = "sfq"

[device.DEV.ingress.classes.normal]
rate = "4mbit"
ceil = "8mbit"

[device.DEV.ingress.classes.torrent]
rate = "1mbit"
ceil = "4mbit"
prio = 7

[[mark]]
class = "torrent"
direction = "in"
proto = "tcp"
sport = "61000:63000"
"""


@pytest.mark.distro_kernel("sch_sfq", "cls_fw")
@pytest.mark.parametrize("ipv6", [False, True], ids=["ipv4", "ipv6"])
def test_an_ingress_tree_with_sfq_leaves_holds_each_class_ceil(netpair, ipv6):
    config = str(netpair.write_config(INGRESS))
    for command in ("shape-init", "shape-bypass", "shape-mark"):
        netpair.shapekit(command, "--config", config)
    ifb = f"ifb-{netpair.dev}"
    assert leaf_kinds(netpair, ifb) == {"5c:10": "sfq", "5c:11": "sfq"}

    normal = netpair.goodput(download=True, ipv6=ipv6, port=7001) / 8_000_000
    torrent = netpair.goodput(download=True, ipv6=ipv6, port=61001) / 4_000_000

    print(f"ingress sfq {'ipv6' if ipv6 else 'ipv4'}: goodput/ceil normal {normal:.3f}, torrent {torrent:.3f}")
    assert 0.90 <= normal <= 1.0
    assert 0.90 <= torrent <= 1.0
    assert netpair.class_bytes("5c:11", dev=ifb) > 1_500_000
    stats = json.loads(netpair.left.run("tc", "-s", "-j", "qdisc", "show", "dev", ifb).stdout)
    assert sum(q["bytes"] for q in stats if q["kind"] == "sfq") > 4_000_000  # the sfq leaves carried it
