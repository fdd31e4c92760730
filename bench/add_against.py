#!/usr/bin/env python3
"""One `shape-limit-ip add` with N caps installed: this checkout against another revision, side by side.

    bench/add_against.py REV [--caps 10000] [--rounds 8]

Run as root. The revision is checked out into a temporary git worktree; both
run with this checkout's .venv (PYTHONPATH picks the code), in one pair of
network namespaces this script makes and deletes (198.18.0.0/15 only). The
adds alternate, so a noisy, shared machine slows both alike: read the ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOP = Path(__file__).resolve().parent.parent
PYTHON = TOP / ".venv" / "bin" / "python"
NS, PEER, DEV = "skbench-add-l", "skbench-add-r", "skbadd"


def sh(*argv: str, env: dict[str, str] | None = None) -> None:
    subprocess.run(argv, check=True, capture_output=True, text=True, env=env)


def host(n: int) -> str:
    return f"198.19.{n // 250}.{n % 250 + 1}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rev")
    parser.add_argument("--caps", type=int, default=10000)
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("add_against.py: run as root (it makes network namespaces)")
    with tempfile.TemporaryDirectory() as work:
        other = Path(work, "other")
        sh("git", "-C", str(TOP), "worktree", "add", "--detach", str(other), args.rev)
        try:
            medians = compare(Path(work), {args.rev: other, "this checkout": TOP}, args.caps, args.rounds)
        finally:
            sh("git", "-C", str(TOP), "worktree", "remove", "--force", str(other))
    for name, median in medians.items():
        print(f"{args.caps} caps, {name}: median {median * 1000:.0f} ms over {args.rounds} adds")
    this, that = medians["this checkout"], medians[args.rev]
    print(f"ratio this checkout / {args.rev}: {this / that:.2f}")


def compare(work: Path, code: dict[str, Path], caps: int, rounds: int) -> dict[str, float]:
    """Median seconds of one add, per checkout, the adds alternating in one pair of namespaces."""
    for ns in (NS, PEER):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        sh("ip", "netns", "add", ns)
    try:
        sh("ip", "link", "add", DEV, "netns", NS, "type", "veth", "peer", "name", DEV + "p", "netns", PEER)
        sh("ip", "-n", NS, "link", "set", DEV, "up")
        sh("ip", "-n", NS, "addr", "add", "198.18.0.1/15", "dev", DEV)
        work.chmod(0o755)
        config = work / "shapekit.toml"
        lines = [f'[device.{DEV}]\nrate = "10gbit"\nleaf = "pfifo"\nclassifier = "classify"\n[device.{DEV}.limits]\n']
        config.write_text("".join(lines + [f'"{host(n)}" = "1mbit"\n' for n in range(caps)]))
        config.chmod(0o644)
        env = {**os.environ, "SHAPEKIT_STATE_DIR": str(work / "state")}

        def run(checkout: Path, *argv: str) -> float:
            start = time.perf_counter()
            command = ("ip", "netns", "exec", NS, str(PYTHON), "-m", "shapekit", *argv, "--config", str(config))
            sh(*command, env={**env, "PYTHONPATH": str(checkout)})
            return time.perf_counter() - start

        run(TOP, "shape-init")
        run(TOP, "shape-limit-ip")
        times: dict[str, list[float]] = {name: [] for name in code}
        added = caps
        for _ in range(rounds):
            for name, checkout in code.items():
                added += 1
                times[name].append(run(checkout, "shape-limit-ip", "add", host(added), "2mbit"))
        return {name: statistics.median(values) for name, values in times.items()}
    finally:
        for ns in (NS, PEER):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


if __name__ == "__main__":
    main()
