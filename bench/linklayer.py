#!/usr/bin/env python3
"""Goodput of one 2mbit HTB class charged three ways, with and without GSO: the README's Link-layer table.

    .venv/bin/python bench/linklayer.py [--overhead 10] [--seconds 6]

Run as root. Charged by length; by HTB's own per-class `overhead N linklayer
atm` (what shapekit writes); by a size table on the root (`stab linklayer atm
overhead N`). Each with the veth's GSO super-packets, then with one segment a
packet (`gso_max_segs 1`). One pair of network namespaces, made and deleted
by the tests' own fixture (198.18.0.0/15 only).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

TOP = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TOP / "tests" / "integration"))

from conftest import make_netpair  # noqa: E402  (the tests' namespaces, deleted on the way out)
from netns import NetPair  # noqa: E402

MSS, FRAME, LINE = 1448, 1514, 2_000_000


def tree(pair: NetPair, mode: str, overhead: int) -> None:
    dev = pair.dev
    stab = f"stab linklayer atm overhead {overhead} mtu 2047 tsize 512 " if mode == "stab" else ""
    htb = f" overhead {overhead} linklayer atm" if mode == "htb" else ""
    batch = (
        f"qdisc add dev {dev} root handle 5c: {stab}htb default 10\n"
        f"class add dev {dev} parent 5c: classid 5c:1 htb rate 2mbit ceil 2mbit quantum 1514{htb}\n"
        f"class add dev {dev} parent 5c:1 classid 5c:10 htb rate 2mbit ceil 2mbit quantum 1514{htb}\n"
        f"qdisc add dev {dev} parent 5c:10 handle 10: pfifo\n"
    )
    pair.left.run("tc", "qdisc", "del", "dev", dev, "root", check=False)
    pair.left.run("tc", "-batch", "-", stdin=batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--overhead", type=int, default=10)
    parser.add_argument("--seconds", type=int, default=6)
    args = parser.parse_args()
    cells = math.ceil((FRAME + args.overhead) / 48) * 53
    print(f"predicted: {LINE * MSS / cells / 1e6:.4f}mbit by cells, {LINE * MSS / FRAME / 1e6:.4f}mbit by length")
    with make_netpair(Path("/tmp")) as pair:
        for gso in ("GSO super-packets", "wire-size packets"):
            if gso == "wire-size packets":
                pair.left.run("ip", "link", "set", "dev", pair.dev, "gso_max_segs", "1")
            for mode in ("length", "htb", "stab"):
                tree(pair, mode, args.overhead)
                print(f"{gso:18} {mode:6} {pair.goodput(seconds=args.seconds) / 1e6:.4f}mbit", flush=True)


if __name__ == "__main__":
    main()
