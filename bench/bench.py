#!/usr/bin/env python3
"""shapekit benchmarks, run as root inside network namespaces this script makes and deletes.

    bench/bench.py add --caps 1000 [--repeat 10]

`add`: seconds for one `shape-limit-ip add` with N caps already installed
(median of --repeat runs, each adding a new host), after the boot sequence
on a config that holds the N caps. Prints a table and writes it as JSON
(bench/results/add.json).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run(*argv: str, stdin: str | None = None) -> str:
    return subprocess.run(argv, input=stdin, capture_output=True, text=True, check=True).stdout


def tool(name: str) -> str:
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name) or name


@contextmanager
def namespace_pair() -> Iterator[tuple[str, str]]:
    """Two namespaces joined by a veth; yields (namespace, device) of the shaping side."""
    token = secrets.token_hex(3)
    left, right, dev = f"skb-{token}-l", f"skb-{token}-r", f"skb{token}l"
    try:
        run("ip", "netns", "add", left)
        run("ip", "netns", "add", right)
        run("ip", "link", "add", dev, "netns", left, "type", "veth", "peer", "name", f"skb{token}r", "netns", right)
        run("ip", "-n", left, "addr", "add", "198.18.0.1/15", "dev", dev)
        run("ip", "-n", right, "addr", "add", "198.18.0.2/15", "dev", f"skb{token}r")
        run("ip", "-n", left, "link", "set", dev, "up")
        run("ip", "-n", right, "link", "set", f"skb{token}r", "up")
        yield left, dev
    finally:
        for ns in (left, right):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def cap_host(n: int) -> str:
    """The n-th host of 198.18.0.0/15, from 198.18.1.0 (198.18.0.x are the namespaces' own)."""
    n += 256
    return f"198.{18 + n // 65536}.{n // 256 % 256}.{n % 256}"


def caps_config(dev: str, caps: int) -> str:
    lines = [f'[device.{dev}]\nrate = "10gbit"\nleaf = "pfifo"\nclassifier = "classify"\n', f"[device.{dev}.limits]"]
    lines += [f'"{cap_host(n)}" = "{1 + n % 100}mbit"' for n in range(caps)]
    return "\n".join(lines) + "\n"


def bench_add(caps: int, repeat: int) -> dict[str, object]:
    with namespace_pair() as (ns, dev), tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "shapekit.toml"
        config.write_text(caps_config(dev, caps))
        env = {**os.environ, "SHAPEKIT_STATE_DIR": f"{tmp}/state"}
        for command in ("shape-init", "shape-limit-ip"):
            subprocess.run(["ip", "netns", "exec", ns, tool(command), "--config", str(config)], env=env, check=True)
        times = []
        for i in range(repeat):
            argv = [
                "ip",
                "netns",
                "exec",
                ns,
                tool("shape-limit-ip"),
                "add",
                cap_host(caps + i),
                "1mbit",
                "--config",
                str(config),
            ]
            start = time.perf_counter()
            subprocess.run(argv, env=env, check=True)
            times.append(time.perf_counter() - start)
    return {"caps_installed": caps, "repeat": repeat, "median_s": statistics.median(times), "max_s": max(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    add = sub.add_parser("add", help="seconds for one shape-limit-ip add with N caps installed")
    add.add_argument("--caps", type=int, nargs="+", default=[1000])
    add.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench.py: run as root (it makes network namespaces)")
    rows = [bench_add(n, args.repeat) for n in args.caps]
    print(f"{'caps installed':>15}  {'median add (s)':>14}  {'max (s)':>8}")
    for row in rows:
        print(f"{row['caps_installed']:>15}  {row['median_s']:>14.3f}  {row['max_s']:>8.3f}")
    out = HERE / "results" / "add.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
