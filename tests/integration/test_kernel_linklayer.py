"""Link-layer overhead and percentages on a real kernel: a DSL line's ATM cells, emulated, and shapekit in front.

The "modem" is the receiving namespace's own queue at the line rate: its
arriving packets go to an IFB holding HTB at 2mbit under a size table that
charges each packet the 53-byte ATM cells it fills (`stab linklayer atm`, a
mechanism other than the one shapekit uses, so the two check each other).
shapekit shapes the sender at the same 2mbit. Charged by length, shapekit sends
more cells than the line carries and the modem's short queue overflows; charged
cells but not the overhead, one cell a frame too few, the queue still fills;
charged both (`overhead`, `linklayer = "atm"`), the modem's queue stays empty
and the goodput is the cell-rounded rate. The same modem charging the frame
less 4 bytes tells `overhead = -4` (a root size table) from `0`; a ptm tree's
goodput is 64/65 of the plain tree's.

The sender's packets are kept wire-size (`gso_max_segs 1`), as on a DSL line:
a GSO super-packet is charged its cells as one packet (README, Link-layer overhead).
"""

from __future__ import annotations

import contextlib
import json
import math
import subprocess
import threading
import time

import pytest
from netns import parse_classes

LINE = 2_000_000
OVERHEAD = 40  # bytes the emulated line adds to each frame: 1514 + 40 fills 33 cells, 1514 alone 32
MSS = 1448  # iperf3's TCP payload in a 1514-byte frame (1500 MTU, timestamps on)
FRAME = 1514  # the length HTB sees on a veth: Ethernet header included
CELL_RATE_GOODPUT = LINE * MSS / (math.ceil((FRAME + OVERHEAD) / 48) * 53)  # 1.6558mbit: 33 cells a frame
LENGTH_GOODPUT = LINE * MSS / FRAME  # 1.9128mbit: what shapekit gives when it charges lengths
MODEM_QUEUE = 20  # packets: a DSL modem's queue is short

SHAPED = """
[device.DEV]
rate = "2mbit"
default = "bulk"
leaf = "pfifo"
classifier = "classify"
LINK

[device.DEV.classes.bulk]
rate = "50%"
ceil = "100%"

[device.DEV.classes.small]
rate = "25%"
ceil = "50%"

[device.DEV.limits]
"198.18.0.77" = "1mbit"
"""

ATM = f'overhead = {OVERHEAD}\nlinklayer = "atm"'


@contextlib.contextmanager
def atm_modem(pair, overhead: int = OVERHEAD):
    """The right namespace's arriving traffic through a 2mbit ATM-cell queue on an IFB of its own."""
    right, ifb = pair.right, "modem0"
    right.run("ip", "link", "add", ifb, "type", "ifb")
    right.run("ip", "link", "set", ifb, "up")
    batch = (
        f"qdisc add dev {ifb} root handle 1: stab linklayer atm overhead {overhead} mtu 2047 tsize 512 htb default 1\n"
        f"class add dev {ifb} parent 1: classid 1:1 htb rate {LINE}bit ceil {LINE}bit\n"
        f"qdisc add dev {ifb} parent 1:1 handle 10: pfifo limit {MODEM_QUEUE}\n"
        f"qdisc add dev {right.dev} handle ffff: ingress\n"
        f"filter add dev {right.dev} parent ffff: protocol all u32 match u32 0 0 action mirred egress redirect dev {ifb}\n"
    )
    right.run("tc", "-batch", "-", stdin=batch)
    yield ifb  # deleted with the namespace


def modem_drops(pair, ifb: str) -> int:
    shown = pair.right.run("tc", "-s", "qdisc", "show", "dev", ifb, "parent", "1:1").stdout
    return int(shown.split("dropped ")[1].split(",")[0])


def modem_backlog(pair, ifb: str) -> int:
    shown = pair.right.run("tc", "-s", "qdisc", "show", "dev", ifb, "parent", "1:1").stdout
    return int(shown.split("backlog ")[1].split()[1].rstrip("p"))


def measure(pair, ifb: str, link: str) -> tuple[float, int, int]:
    """(goodput bits/s, packets the modem dropped, the modem's longest queue seen) for a tree with `link`."""
    config = str(pair.write_config(SHAPED.replace("LINK", link)))
    pair.shapekit("shape-init", "--config", config)
    dropped_before = modem_drops(pair, ifb)
    longest = [0]
    sampler = _Sampler(lambda: longest.__setitem__(0, max(longest[0], modem_backlog(pair, ifb))))
    with sampler:
        goodput = pair.goodput(seconds=4)
    return goodput, modem_drops(pair, ifb) - dropped_before, longest[0]


class _Sampler:
    """Calls `sample` every 100 ms in a thread while the block runs."""

    def __init__(self, sample) -> None:
        self.sample, self.stop, self.thread = sample, threading.Event(), threading.Thread(target=self._run)

    def _run(self) -> None:
        while not self.stop.wait(0.1):
            with contextlib.suppress(subprocess.SubprocessError, IndexError, ValueError):
                self.sample()

    def __enter__(self) -> _Sampler:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


@pytest.fixture
def wire_size(netpair):
    """The sender hands the qdisc one TCP segment a packet, as a DSL line carries them."""
    netpair.left.run("ip", "link", "set", "dev", netpair.dev, "gso_max_segs", "1")
    return netpair


def test_charged_by_atm_cells_the_modem_queue_stays_empty_and_goodput_is_the_cell_rate(wire_size):
    pair = wire_size
    with atm_modem(pair) as ifb:
        by_length = measure(pair, ifb, "")
        time.sleep(1)  # the modem's queue drains
        cells_only = measure(pair, ifb, 'linklayer = "atm"')
        time.sleep(1)
        by_cells = measure(pair, ifb, ATM)
    print(f"by length: goodput {by_length[0] / 1e6:.4f}mbit, modem drops {by_length[1]}, longest queue {by_length[2]}")
    print(
        f"cells, no overhead: goodput {cells_only[0] / 1e6:.4f}mbit, modem drops {cells_only[1]}, longest queue {cells_only[2]}"
    )
    print(f"by cells:  goodput {by_cells[0] / 1e6:.4f}mbit, modem drops {by_cells[1]}, longest queue {by_cells[2]}")
    print(f"predicted: {CELL_RATE_GOODPUT / 1e6:.4f}mbit by cells, {LENGTH_GOODPUT / 1e6:.4f}mbit by length")

    # Charged by length, shapekit sends 15% more (1749 bytes of cells for 1514) than the line carries: the modem's queue fills and drops.
    assert by_length[1] > 0 and by_length[2] >= MODEM_QUEUE // 2, by_length
    # Charged cells without the overhead, one cell a frame short: 3% too many, the modem's queue grows all along.
    assert cells_only[2] >= 8, cells_only
    # Charged by cells, nothing waits at the modem and the goodput is the cell rate's.
    assert by_cells[1] == 0 and by_cells[2] <= 3, by_cells
    assert 0.97 <= by_cells[0] / CELL_RATE_GOODPUT <= 1.01, by_cells


def test_without_a_modem_goodput_is_the_line_rate_over_the_charge_per_packet(wire_size):
    """The same 2mbit tree: only what a packet is charged (its length, or its cells) moves the goodput."""
    pair = wire_size
    by_length, by_cells = (goodput_alone(pair, link) for link in ("", ATM))

    assert 0.97 <= by_length / LENGTH_GOODPUT <= 1.01, by_length
    assert 0.97 <= by_cells / CELL_RATE_GOODPUT <= 1.01, by_cells


def goodput_alone(pair, link: str) -> float:
    pair.shapekit("shape-init", "--config", str(pair.write_config(SHAPED.replace("LINK", link))))
    return pair.goodput(seconds=4)


def test_percentages_overhead_and_linklayer_read_back_and_check_sees_them_lost(netpair):
    config = str(netpair.write_config(SHAPED.replace("LINK", ATM)))
    netpair.shapekit("shape-init", "--config", config)
    netpair.shapekit("shape-limit-ip", "--config", config)

    shown = netpair.left.run("tc", "-d", "class", "show", "dev", netpair.dev).stdout
    classes = parse_classes(shown)
    # 5c:1 top, 5c:2 bypass, 5c:10 bulk, 5c:11 small, 5c:8001 the caps' group, 8001:1 the cap:
    # every class charges ATM cells
    assert sorted(classes) == ["5c:1", "5c:10", "5c:11", "5c:2", "5c:8001", "8001:1"]
    for cid, cls in classes.items():
        assert (cls["overhead"], cls["linklayer"]) == (str(OVERHEAD), "atm"), (cid, cls)
    rates = {cid: (cls["rate"], cls["ceil"]) for cid, cls in classes.items()}
    assert rates["5c:10"] == ("1Mbit", "2Mbit")  # 50% and 100% of the line
    assert rates["5c:11"] == ("500Kbit", "1Mbit")  # 25% and 50%
    check = netpair.shapekit("shape-init", "--check", "--config", config, check=False)
    assert (check.returncode, check.stdout) == (0, "the kernel matches the config and saved state\n"), check.stdout

    # `tc class change` without them sets the class back to plain lengths: --check names it.
    netpair.left.run(
        "tc", "class", "change", "dev", netpair.dev, "parent", "5c:1", "classid", "5c:10", "htb", "rate", "1mbit",
        "ceil", "2mbit",
    )  # fmt: skip
    check = netpair.shapekit("shape-init", "--check", "--config", config, check=False)
    assert check.returncode == 1, check.stdout + check.stderr
    assert (
        f"{netpair.dev}: class 5c:10 charges overhead 0 linklayer ethernet, the config says overhead {OVERHEAD} linklayer atm"
        in check.stdout.splitlines()
    ), check.stdout


# PPPoA VC-MUX on an Ethernet device: the line adds 10 bytes to the IP packet, 4 less than the 14-byte Ethernet header.
# A 1492-byte frame (MTU 1478) minus 4 is exactly 31 cells' payload (1488), so every wrong charge moves it a cell:
# lengths 1492 bytes for 1643 of cells (10% too few: the modem's queue fills), `overhead = 0` 32 cells (3.1% too many:
# goodput lost against the prediction), `overhead = -4` 31 cells (the modem's own).
NEG_MTU = 1478
NEG_FRAME, NEG_MSS = NEG_MTU + 14, NEG_MTU - 52  # 1492, 1426: iperf3's payload with TCP timestamps
NEG_CELLS = math.ceil((NEG_FRAME - 4) / 48)  # 31
NEG_GOODPUT = LINE * NEG_MSS / (NEG_CELLS * 53)  # 1.7359mbit
NEG_ZERO_GOODPUT = LINE * NEG_MSS / ((NEG_CELLS + 1) * 53)  # 1.6816mbit: overhead 0 charges 32 cells


def test_negative_overhead_keeps_a_modem_charging_ethernet_length_less_4_empty(wire_size):
    pair = wire_size
    for side in (pair.left, pair.right):
        side.run("ip", "link", "set", "dev", side.dev, "mtu", str(NEG_MTU))
    with atm_modem(pair, overhead=-4) as ifb:
        by_length = measure(pair, ifb, "")
        time.sleep(1)  # the modem's queue drains
        zero = measure(pair, ifb, 'overhead = 0\nlinklayer = "atm"')
        time.sleep(1)
        right = measure(pair, ifb, 'overhead = -4\nlinklayer = "atm"')
    for name, (goodput, drops, longest) in (("by length", by_length), ("overhead 0", zero), ("overhead -4", right)):
        print(f"{name}: goodput {goodput / 1e6:.4f}mbit, modem drops {drops}, longest queue {longest}")
    print(f"predicted: {NEG_GOODPUT / 1e6:.4f}mbit at 31 cells a frame, {NEG_ZERO_GOODPUT / 1e6:.4f}mbit at 32")

    # By length, 10% more than the line carries: the modem's queue fills and drops.
    assert by_length[1] > 0 and by_length[2] >= MODEM_QUEUE // 2, by_length
    # overhead 0: a cell a frame too many; the modem idles and goodput is 32 cells' rate, 3.1% under the line's.
    assert zero[1] == 0 and zero[2] <= 3, zero
    assert 0.99 <= zero[0] / NEG_ZERO_GOODPUT <= 1.01, zero
    # overhead -4: the modem's own charge, nothing waits there and goodput is the 31-cell prediction.
    assert right[1] == 0 and right[2] <= 3, right
    assert 0.99 <= right[0] / NEG_GOODPUT <= 1.01, right


PTM_LINE = LINE * 64 // 65  # 1969230 bit/s: what tc is given for a 2mbit ptm line
PTM_GOODPUT = PTM_LINE * MSS / FRAME  # 1.8834mbit


def test_ptm_sends_64_of_every_65_bytes_of_the_line_rate(wire_size):
    pair = wire_size
    plain, ptm = (goodput_alone(pair, link) for link in ("", 'linklayer = "ptm"'))
    print(f"plain: goodput {plain / 1e6:.4f}mbit (predicted {LENGTH_GOODPUT / 1e6:.4f})")
    print(
        f"ptm:   goodput {ptm / 1e6:.4f}mbit (predicted {PTM_GOODPUT / 1e6:.4f}), ratio {ptm / plain:.4f} (64/65 = {64 / 65:.4f})"
    )

    assert 0.995 <= plain / LENGTH_GOODPUT <= 1.005, plain
    assert 0.995 <= ptm / PTM_GOODPUT <= 1.005, ptm
    assert abs(ptm / plain - 64 / 65) <= 0.005, (ptm, plain)


def test_a_ptm_tree_reads_back_clean_and_a_run_time_cap_lists_as_given(netpair):
    config = str(netpair.write_config(SHAPED.replace("LINK", 'linklayer = "ptm"')))
    netpair.shapekit("shape-init", "--config", config)
    netpair.shapekit("shape-limit-ip", "--config", config)
    netpair.shapekit("shape-limit-ip", "add", "198.18.0.88", "1mbit", "--config", config)

    classes = parse_classes(netpair.left.run("tc", "class", "show", "dev", netpair.dev).stdout)
    rates = {cid: (cls["rate"], cls["ceil"]) for cid, cls in classes.items()}
    # 64/65 of the configured, in the kernel's whole bytes/s: 2mbit → 1969230bit → 246153 B/s → "1969Kbit";
    # 1mbit → 984615bit → 123076 B/s → 984608bit; 500kbit → 492307bit → 61538 B/s → 492304bit
    assert rates == {
        "5c:1": ("1969Kbit", "1969Kbit"),
        "5c:2": ("1969Kbit", "1969Kbit"),
        "5c:10": ("984608bit", "1969Kbit"),
        "5c:11": ("492304bit", "984608bit"),
        "5c:8001": ("1969Kbit", "1969Kbit"),  # the caps' group, at the line rate
        "8001:1": ("984608bit", "984608bit"),  # the config's cap, 1mbit
        "8001:2": ("984608bit", "984608bit"),  # the run-time cap, 1mbit
    }, rates
    check = netpair.shapekit("shape-init", "--check", "--config", config, check=False)
    assert (check.returncode, check.stdout) == (0, "the kernel matches the config and saved state\n"), check.stdout
    listed = json.loads(netpair.shapekit("shape-limit-ip", "list", "--json", "--config", config).stdout)
    rates = {row["host"]: row["rate"] for row in listed}
    assert rates == {"198.18.0.77": "1mbit", "198.18.0.88": "1mbit"}, listed
