"""The two seeds' configs exactly as shipped, on a kernel that has what they ask for (sfq, fw).

This machine's kernel lacks sch_sfq and cls_fw, so these run in the
distro-kernel lane (tests/distro/run: Debian's own kernel), and on any host
kernel that has both. Each module boots its config once in namespaces of its
own, then measures one thing per test: TCP goodput at the receiver (iperf3's
total, which counts until the shaper's queue has drained; for these local
senders the queue is short). Full-size TCP packets carry 1448 of 1514 bytes
on the wire (IPv6: 1428), so a class's goodput is 0.957 (0.943) of its rate
at most.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import make_netpair
from netns import NetPair

REPO = Path(__file__).resolve().parents[2]
SEED_000 = REPO / "conf" / "shapekit.toml"
SEED_002 = REPO / "conf" / "examples" / "incident.toml"
BOOT = ("shape-init", "shape-bypass", "shape-mark", "shape-limit-ip")

pytestmark = pytest.mark.distro_kernel("sch_sfq", "cls_fw")


def as_shipped(path: Path) -> str:
    """The shipped config with its device `eth0` renamed DEV (write_config puts the test's device there)."""
    text = path.read_text()
    renamed = text.replace("[device.eth0", "[device.DEV")
    assert re.sub(r"\beth0\b", "", renamed.replace("[device.DEV", "")) == re.sub(
        r"\beth0\b", "", text.replace("[device.eth0", "")
    ), "only the device name changes"
    return renamed


def boot(pair: NetPair, path: Path) -> str:
    config = str(pair.write_config(as_shipped(path)))
    for command in BOOT:
        pair.shapekit(command, "--config", config)
    return config


def ratio_of(rate: float, limit: int, what: str) -> float:
    ratio = rate / limit
    print(f"{what}: goodput/limit {ratio:.3f} ({rate / 1e6:.3f} of {limit / 1e6:g} Mbit/s)")
    return ratio


# --- seed 000: the seedbox's upload tree ---------------------------------------------

LINE, SHAPED = 100_000_000, 50_000_000  # conf/shapekit.toml: rate, and the shaped partition's ceil
TORRENT_CEIL = 2_048_000
FAMILIES = pytest.mark.parametrize("ipv6", [False, True], ids=["ipv4", "ipv6"])


@pytest.fixture(scope="module")
def seedbox(tmp_path_factory) -> Iterator[tuple[NetPair, str]]:
    with make_netpair(tmp_path_factory.mktemp("seed000")) as pair:
        yield pair, boot(pair, SEED_000)


def test_seed_000_builds_the_seed_tree_with_sfq_leaves_and_fw_filters(seedbox):
    pair, _ = seedbox
    classes = pair.classes()
    assert {cid: (c["rate"], c["ceil"]) for cid, c in classes.items() if cid in ("5c:10", "5c:1010", "5c:1090")} == {
        "5c:10": ("50Mbit", "50Mbit"),
        "5c:1010": ("10Mbit", "50Mbit"),
        "5c:1090": ("512Kbit", "2048Kbit"),
    }
    leaves = {q["parent"]: q["kind"] for q in pair.qdiscs() if not q.get("root")}
    assert leaves == {"5c:2": "sfq", "5c:1010": "sfq", "5c:1030": "sfq", "5c:1090": "sfq"}
    filters = pair.left.run("tc", "filter", "show", "dev", pair.dev).stdout
    for mark, cid in (("0x3e9", "5c:2"), ("0x2b02", "5c:1010"), ("0x2b16", "5c:1030"), ("0x2b52", "5c:1090")):
        assert re.search(rf"fw .*handle {mark} classid {cid}", filters), f"no fw filter {mark} → {cid}: {filters}"


# flow → (how iperf3 sends it, the class it must land in, that class's ceil)
FLOWS = {
    # 10 s: iperf3's total counts what was still queued when the sender stopped (TSQ lets a
    # socket keep a GSO packet or two there), a few percent of 5 s at 2mbit.
    "torrent port range": ({"cport": 61001, "seconds": 10}, "5c:1090", TORRENT_CEIL),
    "unmarked (default class)": ({"port": 7001}, "5c:1030", SHAPED),
    "dns port (high)": ({"port": 53}, "5c:1010", SHAPED),
    "bypassed port (unshaped)": ({"port": 80}, "5c:2", LINE),  # above the shaped partition
}


@pytest.mark.parametrize("flow", FLOWS)
@FAMILIES
def test_seed_000_each_flow_holds_its_class_ceil(seedbox, flow, ipv6):
    pair, _ = seedbox
    how, classid, ceil = FLOWS[flow]
    before = pair.class_bytes(classid)
    ratio = ratio_of(pair.goodput(ipv6=ipv6, **how), ceil, f"{flow} {'ipv6' if ipv6 else 'ipv4'}")
    assert 0.90 <= ratio <= 1.0
    assert pair.class_bytes(classid) - before > ceil * 0.9 * 4 / 8  # the flow went through that class


def test_seed_000_check_finds_the_kernel_as_configured(seedbox):
    pair, config = seedbox
    result = pair.shapekit("shape-init", "--config", config, "--check", check=False)
    assert (result.returncode, result.stdout.strip()) == (0, "the kernel matches the config and saved state")


def test_seed_000_flush_leaves_nothing_behind(seedbox):
    """Last in this module: it takes the booted tree away."""
    pair, config = seedbox
    pair.shapekit("shape-flush", "--config", config)
    qdiscs = pair.qdiscs()
    assert [q["kind"] for q in qdiscs] == ["noqueue"], qdiscs
    assert pair.left.run("tc", "filter", "show", "dev", pair.dev).stdout == ""
    for tool in ("iptables-save", "ip6tables-save"):
        assert "SHAPEKIT" not in pair.left.run(tool).stdout
    assert "SHAPEKIT" not in pair.left.run("ipset", "list", "-n").stdout


# --- seed 002: per-IP caps on the mail server ---------------------------------------

CAPS = {"198.18.0.101": 128_000, "198.18.0.102": 512_000, "198.18.0.103": 32_000}  # incident.toml
FREE_HOST = "198.18.0.104"


@pytest.fixture(scope="module")
def mail_server(tmp_path_factory) -> Iterator[NetPair]:
    with make_netpair(tmp_path_factory.mktemp("seed002")) as pair:
        pair.add_addresses(*CAPS, FREE_HOST)
        boot(pair, SEED_002)
        yield pair


def test_seed_002_config_caps_exactly_the_seeds_hosts(mail_server):
    assert set(CAPS) == set(re.findall(r'^"([0-9.]+)" = "', SEED_002.read_text(), re.MULTILINE))
    caps = {c["ceil"] for cid, c in mail_server.classes().items() if cid.startswith("8001:")}
    assert caps == {"128Kbit", "512Kbit", "32Kbit"}
    leaves = {q["kind"] for q in mail_server.qdiscs() if not q.get("root")}
    assert leaves == {"sfq", "htb"}  # the caps' group is an HTB qdisc


@pytest.mark.parametrize("host", list(CAPS))
def test_seed_002_each_capped_host_holds_its_cap(mail_server, host):
    rate = CAPS[host]
    seconds = max(5, 512_000 // rate)  # 16 s at 32kbit: the packets still queued at the end weigh less
    ratio = ratio_of(mail_server.goodput(to=host, seconds=seconds), rate, f"cap {host}")
    assert 0.90 <= ratio <= 1.0


def test_seed_002_a_host_without_a_cap_runs_free(mail_server):
    ratio = ratio_of(mail_server.goodput(to=FREE_HOST), LINE, f"free host {FREE_HOST}")
    assert 0.90 <= ratio <= 1.0
