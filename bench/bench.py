#!/usr/bin/env python3
"""shapekit benchmarks. Run as root; everything happens in network namespaces this script makes and deletes.

    bench/bench.py all [--caps 100 1000 10000]      # every table below (several minutes)
    bench/bench.py apply [--caps ...]               # apply time: shapekit vs seed 002's loop vs the floor
    bench/bench.py add [--caps ...] [--repeat 10]   # one `shape-limit-ip add` with N caps installed
    bench/bench.py packet [--caps 10000]            # unlimited flow throughput with N caps vs none
    bench/bench.py boot --rounds 10                 # seed 000's boot: four commands vs shape-init --all
    bench/bench.py tcconfig [--caps 100]            # tcconfig's tcset as a peer (installs it in bench/.tcconfig; no lsmod)
    bench/bench.py ingress [--caps 10000]           # --in caps: build, one add, and a download's cost vs linear u32
    bench/bench.py scale [--caps 10000 100000]      # caps at ISP scale: apply, add, sync, flush, memory, a flow
    bench/bench.py metrics [--caps 10000]           # one shape-status --format prometheus sample: time, memory
    bench/bench.py hosts [--caps 10000]             # top talkers: shape-status --hosts vs conntrack accounting
    bench/bench.py latency [--seconds 20]           # seed 000's promise: ssh, DNS, ping under 8 torrent uploads
    bench/bench.py all --quick [--skip latency]     # tiny N: keeps the script working (CI)

Each table is printed and written as JSON to bench/results/NAME.json. The
three apply columns run side by side in one run, so their ratios hold on
a noisy, shared machine even when the seconds do not.

- shapekit: `shape-init` + `shape-limit-ip` from a config holding the N caps
  (the commands that build what the seed loop builds), and the whole boot
  sequence (`shape-init`, `shape-bypass`, `shape-mark`, `shape-limit-ip`).
- seed loop: seed 002's script (three processes per host), with two changes
  the test kernel forces: its `fw` filters become `u32 match ip dst` filters
  (no cls_fw here), and class ids are written in hex (the seed's `1:$mark`
  breaks at mark 10000, which tc reads as 0x10000).
- flat floor: the flat layout (every cap a class under the top class, as
  shapekit built them before cap groups), written by this script as one
  `tc -batch` and one `ipset restore` + `iptables-restore`; groups floor:
  shapekit's layout (cap groups of 512, the root's bpf filter, entries with
  mark bits) written the same way: what any tool must at least spend.
- scale: at 10,000 and 100,000 caps, apply (`shape-init` + `shape-limit-ip`
  from a config holding them) and shapekit's peak memory, one `add` with them
  installed, a `sync` of them all and then of 1% changed, `shape-flush`, and
  an unlimited flow to an uncapped host against a pair with no caps; beside
  the floors and their teardown (groups newest first; the flat tree in one
  `qdisc del`, up to the flat layout's 32,767 caps).
- hosts: the two sources `shape-status --hosts` could count hosts from, side
  by side: its counters ipsets, and conntrack accounting (nf_conntrack_acct,
  read from /proc/net/nf_conntrack at both ends of the same interval). Three
  hosts at paced rates (iperf3 -b) against iperf3's goodput; the same with
  accounting turned on after the flows began; an unlimited flow's Gbit/s with
  each counting (interleaved rounds); and reading N hosts (N connections).
- latency: seed 000's promise under 8 torrent uploads, round trips of ping,
  DNS, ssh, a TCP connect and the torrent class's own, with no shaping,
  shapekit, seed 000's script, FireQOS and wondershaper (bench/latency.py
  says how); also a PNG of their CDFs. `tests/distro/run --bench latency`
  runs it in Debian's kernel, with the leaves this one lacks.
"""

from __future__ import annotations

import argparse
import compileall
import importlib.util
import ipaddress
import json
import os
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from helpers import delete_namespaces, run, save, table, tool
from latency import bench_latency, plot, report

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
LINE = "10gbit"


class Pair:
    """Two namespaces joined by a veth: `ns`/`dev` shape, `peer_ns` receives at 198.18.0.2."""

    def __init__(self) -> None:
        token = secrets.token_hex(3)
        self.ns, self.peer_ns = f"skb-{token}-l", f"skb-{token}-r"
        self.dev, self.peer_dev = f"skb{token}l", f"skb{token}r"
        self.tmp = Path(tempfile.mkdtemp(prefix="shapekit-bench-"))
        self.env = {**os.environ, "SHAPEKIT_STATE_DIR": str(self.tmp / "state")}

    def up(self) -> None:
        run("ip", "netns", "add", self.ns)
        run("ip", "netns", "add", self.peer_ns)
        run(
            "ip",
            "link",
            "add",
            self.dev,
            "netns",
            self.ns,
            "type",
            "veth",
            "peer",
            "name",
            self.peer_dev,
            "netns",
            self.peer_ns,
        )
        run("ip", "-n", self.ns, "addr", "add", "198.18.0.1/15", "dev", self.dev)
        run("ip", "-n", self.peer_ns, "addr", "add", "198.18.0.2/15", "dev", self.peer_dev)
        for ns, dev in ((self.ns, self.dev), (self.peer_ns, self.peer_dev)):
            run("ip", "-n", ns, "link", "set", dev, "up")
            run("ip", "-n", ns, "link", "set", "lo", "up")

    def down(self) -> None:
        delete_namespaces(self.ns, self.peer_ns)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def inside(self, *argv: str, stdin: str | None = None) -> str:
        return run("ip", "netns", "exec", self.ns, *argv, stdin=stdin, env=self.env)

    def shapekit(self, command: str, *args: str) -> None:
        self.inside(tool(command), *args)

    def timed(self, action: Callable[[], object]) -> float:
        start = time.perf_counter()
        action()
        return time.perf_counter() - start

    def throughput(self, seconds: int = 4, download: bool = False) -> float:
        """Goodput of one unlimited TCP flow to 198.18.0.2 (`download`: from it), which is not capped, bits/s."""
        server = subprocess.Popen(
            ["ip", "netns", "exec", self.peer_ns, "iperf3", "-s", "-1", "-B", "198.18.0.2"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            for _ in range(50):
                out = subprocess.run(
                    ["ip", "netns", "exec", self.ns, "iperf3", "-c", "198.18.0.2", "-t", str(seconds), "-J"]
                    + (["-R"] if download else []),
                    capture_output=True,
                    text=True,
                )
                report = json.loads(out.stdout or "{}")
                if "error" not in report and "end" in report:
                    return float(report["end"]["sum_received"]["bits_per_second"])
                time.sleep(0.1)
            raise RuntimeError("iperf3 did not connect")
        finally:
            server.kill()
            server.wait()


def gso_choice(text: str) -> str:
    """--gso's values: shapekit's gso_max_segs settings other than auto."""
    if text == "keep" or (text.isdigit() and 1 <= int(text) <= 65535):
        return text
    raise argparse.ArgumentTypeError(f"{text!r} is not keep or a number of segments (1..65535)")


@contextmanager
def pair() -> Iterator[Pair]:
    p = Pair()
    try:
        p.up()
        yield p
    finally:
        p.down()


def host(n: int) -> str:
    """The n-th capped host, from 198.18.1.0 (198.18.0.x are the namespaces' own)."""
    n += 256
    return f"198.{18 + n // 65536}.{n // 256 % 256}.{n % 256}"


def kbit(n: int) -> int:
    return 128 * (1 + n % 64)


def config_text(dev: str, caps: int) -> str:
    # leaf "none": caps queue in HTB's own pfifo (a qdisc each would need a handle each: 32,511 at most)
    lines = [f'[device.{dev}]\nrate = "{LINE}"\nleaf = "none"\nclassifier = "classify"\n', f"[device.{dev}.limits]"]
    lines += [f'"{host(n)}" = "{kbit(n)}kbit"' for n in range(caps)]
    return "\n".join(lines) + "\n"


def write_config(p: Pair, caps: int) -> str:
    path = p.tmp / "shapekit.toml"
    path.write_text(config_text(p.dev, caps))
    return str(path)


# --- the three ways to install N caps ------------------------------------------------


def shapekit_caps(p: Pair, caps: int) -> float:
    config = write_config(p, caps)
    return p.timed(lambda: [p.shapekit(c, "--config", config) for c in ("shape-init", "shape-limit-ip")])


def shapekit_boot(p: Pair, caps: int) -> float:
    config = write_config(p, caps)
    commands = ("shape-init", "shape-bypass", "shape-mark", "shape-limit-ip")
    return p.timed(lambda: [p.shapekit(c, "--config", config) for c in commands])


def seed_script(dev: str, caps: int) -> str:
    """Seed 002's loop, as a script (fw → u32 and hex class ids: see the module's doc)."""
    lines = [
        f"NETCARD={dev}",
        "tc qdisc del dev $NETCARD root 2>/dev/null || true",
        "tc qdisc add dev $NETCARD root handle 1: htb default 9999",
        f"tc class add dev $NETCARD parent 1:0 classid 1:9999 htb rate {LINE} ceil {LINE} burst 5k prio 9999",
    ]
    for n in range(caps):
        mark = n + 1
        lines += [
            f"tc class add dev $NETCARD parent 1:0 classid 1:{mark:x} htb rate {kbit(n)}kbit ceil {kbit(n)}kbit burst 5k prio {mark}",
            f"iptables -t mangle -A INPUT -i $NETCARD -s {host(n)} -j CONNMARK --set-mark {mark}",
            f"tc filter add dev $NETCARD parent 1:0 protocol ip prio 1 u32 match ip dst {host(n)} flowid 1:{mark:x}",
        ]
    lines.append("iptables -t mangle -A POSTROUTING -j CONNMARK --restore-mark")
    return "set -e\n" + "\n".join(lines) + "\n"


def seed_loop(p: Pair, caps: int) -> float:
    script = p.tmp / "seed002.sh"
    script.write_text(seed_script(p.dev, caps))
    return p.timed(lambda: p.inside("sh", str(script)))


def floor_texts(dev: str, caps: int) -> tuple[str, str, str]:
    """The flat layout (shapekit before cap groups): every cap a class under the top class, as one tc
    batch and one `ipset restore` + `iptables-restore`: what any tool building it must at least spend."""
    tc = _floor_root(dev)
    sets = [f"create SHAPEKIT-{dev}-4 hash:net family inet skbinfo timeout 0 maxelem 131072"]
    for n in range(caps):
        minor = 0x8000 + n
        tc.append(f"class add dev {dev} parent 5c:1 classid 5c:{minor:x} htb rate {kbit(n)}kbit ceil {kbit(n)}kbit")
        sets.append(f"add SHAPEKIT-{dev}-4 {host(n)} skbprio 5c:{minor:x}")
    return "\n".join(tc) + "\n", "\n".join(sets) + "\n", _floor_rules(dev, "")


def groups_floor_texts(dev: str, caps: int) -> tuple[str, str, str]:
    """shapekit's layout, cap groups of 512 (README, "Caps at scale"), written the same way."""
    tc = _floor_root(dev)
    tc.append(f'filter add dev {dev} parent 5c: protocol all prio 1 bpf bytecode "{GROUP_BYTECODE}"')
    sets = [f"create SHAPEKIT-{dev}-4 hash:net family inet skbinfo timeout 0 maxelem 131072"]
    for n in range(caps):
        group, index = n // 512 + 1, n % 512 + 1
        if index == 1:
            tc.append(f"class add dev {dev} parent 5c:1 classid 5c:{0x8000 + group:x} htb rate {LINE} ceil {LINE}")
            tc.append(f"qdisc add dev {dev} parent 5c:{0x8000 + group:x} handle {0x8000 + group:x}: htb")
        cid = f"{0x8000 + group:x}:{index:x}"
        tc.append(
            f"class add dev {dev} parent {0x8000 + group:x}: classid {cid} htb rate {kbit(n)}kbit ceil {kbit(n)}kbit"
        )
        sets.append(f"add SHAPEKIT-{dev}-4 {host(n)} skbprio {cid} skbmark {group << 24:#x}/0xff000000")
    return "\n".join(tc) + "\n", "\n".join(sets) + "\n", _floor_rules(dev, " --map-mark")


GROUP_BYTECODE = "6,32 0 0 4294963220,116 0 0 24,21 2 0 0,4 0 0 6062080,22 0 0 0,6 0 0 0"


def _floor_root(dev: str) -> list[str]:
    return [
        f"qdisc add dev {dev} root handle 5c: htb default 10",
        f"class add dev {dev} parent 5c: classid 5c:1 htb rate {LINE} ceil {LINE}",
        f"class add dev {dev} parent 5c:1 classid 5c:10 htb rate {LINE} ceil {LINE}",
    ]


def _floor_rules(dev: str, more: str) -> str:
    rule = f"-A SHAPEKIT-LIMIT -o {dev} -j SET --map-set SHAPEKIT-{dev}-4 dst --map-prio{more}"
    return f"*mangle\n:SHAPEKIT-LIMIT - [0:0]\n{rule}\n-A POSTROUTING -j SHAPEKIT-LIMIT\nCOMMIT\n"


def apply_floor(p: Pair, texts: tuple[str, str, str]) -> float:
    tc, sets, rules = texts

    def apply() -> None:
        p.inside("tc", "-batch", "-", stdin=tc)
        p.inside("ipset", "restore", stdin=sets)
        p.inside("iptables-restore", "--noflush", stdin=rules)

    return p.timed(apply)


def floor(p: Pair, caps: int) -> float:
    return apply_floor(p, floor_texts(p.dev, caps))


def groups_floor(p: Pair, caps: int) -> float:
    return apply_floor(p, groups_floor_texts(p.dev, caps))


def tear_down_groups(p: Pair) -> float:
    """The groups deleted newest first, then the root: what shape-flush does (one `qdisc del` of 100,000
    classes holds the rtnl lock for about 26 s on this kernel)."""
    shown = p.inside("tc", "class", "show", "dev", p.dev, "parent", "5c:1")
    groups = sorted(set(re.findall(r"class htb (5c:8[0-9a-f]{3}) ", shown)), key=lambda c: int(c[3:], 16))
    batch = "".join(f"class del dev {p.dev} classid {cid}\n" for cid in reversed(groups))
    return p.timed(lambda: p.inside("tc", "-batch", "-", stdin=batch + f"qdisc del dev {p.dev} root\n"))


def bench_apply(sizes: list[int]) -> list[dict[str, object]]:
    rows = []
    for caps in sizes:
        seconds = {}
        ways = (
            ("shapekit", shapekit_caps),
            ("boot", shapekit_boot),
            ("seed", seed_loop),
            ("floor", floor),
            ("groups_floor", groups_floor),
        )
        for name, way in ways:
            with pair() as p:
                seconds[name] = way(p, caps)
        rows.append(
            {
                "caps": caps,
                "shapekit_s": seconds["shapekit"],
                "shapekit_boot_s": seconds["boot"],
                "seed_loop_s": seconds["seed"],
                "floor_s": seconds["floor"],
                "groups_floor_s": seconds["groups_floor"],
                "seed_over_shapekit": seconds["seed"] / seconds["shapekit"],
                "shapekit_over_floor": seconds["shapekit"] / seconds["groups_floor"],
            }
        )
    return rows


# --- caps at scale -----------------------------------------------------------------

FLAT_MOST = 0x7FFF  # the flat layout's cap minors 8000-fffe


def peak_rss_mb(p: Pair, command: str, *args: str) -> tuple[float, float]:
    """Seconds and shapekit's own peak memory (MB, `/usr/bin/time -v`) of one command in the pair."""
    start = time.perf_counter()
    report = run(
        "ip", "netns", "exec", p.ns, "/usr/bin/time", "-v", tool(command), *args, env=p.env, capture_stderr=True
    )
    seconds = time.perf_counter() - start
    kbytes = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", report).group(1))
    return seconds, kbytes / 1024


def cap_rows(caps: int, rate: Callable[[int], int] = kbit) -> str:
    return "host,rate\n" + "".join(f"{host(n)},{rate(n)}kbit\n" for n in range(caps))


def changed_rows(caps: int) -> str:
    """1% of the rows changed, spread over every group, as a billing system's day: half of them
    re-rated, a quarter gone, a quarter new hosts."""
    changed = max(4, caps // 100)
    picks = [i * caps // changed for i in range(changed)]
    rerated, gone = set(picks[: changed // 2]), set(picks[changed // 2 : changed * 3 // 4])
    rows = [f"{host(n)},{kbit(n) * 2 if n in rerated else kbit(n)}kbit\n" for n in range(caps) if n not in gone]
    rows += [f"{host(caps + n)},1000kbit\n" for n in range(changed - changed * 3 // 4)]
    return "host,rate\n" + "".join(rows)


def bench_scale(sizes: list[int], repeat: int, rounds: int, flow_s: int = 4) -> list[dict[str, object]]:
    return [scale_row(caps, repeat, rounds, flow_s) for caps in sizes]


def scale_row(caps: int, repeat: int, rounds: int, flow_s: int) -> dict[str, object]:
    """Caps at ISP scale: apply, one add, sync, flush, memory, an unlimited flow; floors side by side."""
    row: dict[str, object] = {"caps": caps}
    with pair() as p, pair() as none:
        config = write_config(p, caps)
        init_s, init_mb = peak_rss_mb(p, "shape-init", "--config", config)
        limit_s, limit_mb = peak_rss_mb(p, "shape-limit-ip", "--config", config)
        row |= {"apply_s": init_s + limit_s, "shape_init_mb": init_mb, "shape_limit_ip_mb": limit_mb}
        adds = [
            p.timed(lambda i=i: p.shapekit("shape-limit-ip", "add", host(caps + i), "1mbit", "--config", config))
            for i in range(repeat)
        ]
        row["add_median_s"] = statistics.median(adds)
        zero = write_config(none, 0)
        for command in ("shape-init", "shape-limit-ip"):
            none.shapekit(command, "--config", zero)
        flows: dict[str, list[float]] = {"with": [], "none": []}
        for _ in range(rounds):
            flows["with"].append(p.throughput(flow_s))
            flows["none"].append(none.throughput(flow_s))
        row["flow_ratio"] = statistics.median(flows["with"]) / statistics.median(flows["none"])
        row["flush_s"] = p.timed(lambda: p.shapekit("shape-flush", "--config", config))
    with pair() as p:
        config = write_config(p, 0)
        for command in ("shape-init", "shape-limit-ip"):
            p.shapekit(command, "--config", config)
        (p.tmp / "all.csv").write_text(cap_rows(caps))
        (p.tmp / "changed.csv").write_text(changed_rows(caps))
        row["sync_all_s"], row["sync_all_mb"] = peak_rss_mb(
            p, "shape-limit-ip", "sync", str(p.tmp / "all.csv"), "--config", config
        )
        row["sync_1pct_s"], _ = peak_rss_mb(p, "shape-limit-ip", "sync", str(p.tmp / "changed.csv"), "--config", config)
        # billing's caps are run-time ones: an incident's add among them reads limits.json, not the config
        row["add_runtime_s"], row["add_runtime_mb"] = peak_rss_mb(
            p, "shape-limit-ip", "add", host(caps + caps // 100 + 1), "1mbit", "--config", config
        )
        p.shapekit("shape-flush", "--config", config)
    with pair() as p:
        row["groups_floor_s"] = groups_floor(p, caps)
        row["groups_floor_teardown_s"] = tear_down_groups(p)
    if caps <= FLAT_MOST:
        with pair() as p:
            row["flat_floor_s"] = floor(p, caps)
            row["flat_teardown_s"] = p.timed(lambda: p.inside("tc", "qdisc", "del", "dev", p.dev, "root"))
    row["apply_over_groups_floor"] = row["apply_s"] / row["groups_floor_s"]
    return row


# --- shape-status --format prometheus ---------------------------------------------------


def bench_metrics(caps: int, repeat: int) -> dict[str, object]:
    """One metrics sample with N caps installed (node_exporter's collector takes one every 15 s), next to the
    JSON sample it replaces (one read, not two around --interval), time and peak memory."""
    with pair() as p:
        config = write_config(p, caps)
        for command in ("shape-init", "shape-limit-ip"):
            p.shapekit(command, "--config", config)
        ways = {
            "prometheus": ("--format", "prometheus", "--output", str(p.tmp / "shapekit.prom")),
            "json": ("--json", "--interval", "0.1"),
        }
        runs: dict[str, list[tuple[float, float]]] = {name: [] for name in ways}
        for _ in range(repeat):  # interleaved
            for name, args in ways.items():
                runs[name].append(peak_rss_mb(p, "shape-status", *args, "--config", config))
        lines = (p.tmp / "shapekit.prom").read_text().count("\n")
    row: dict[str, object] = {"caps": caps, "repeat": repeat, "prometheus_lines": lines}
    for name, samples in runs.items():
        row[f"{name}_s"] = statistics.median(s for s, _ in samples)
        row[f"{name}_mb"] = max(mb for _, mb in samples)
    return row


# --- top talkers: where to count them --------------------------------------------------

HOSTS_PACED = {"198.18.0.11": "24M", "198.18.0.12": "12M", "198.18.0.13": "6M"}
HOSTS_CONFIG = '[device.DEV]\nrate = "10gbit"\nleaf = "pfifo"\nclassifier = "classify"\n'
_CT_ORIG = re.compile(r"^ipv4 .* src=198\.18\.0\.1 dst=(\S+) .*? bytes=(\d+) ", re.MULTILINE)


def conntrack_sent(p: Pair) -> dict[str, int]:
    """Bytes sent to each host, summed over its connections, from conntrack's accounting."""
    sent: dict[str, int] = {}
    for host, count in _CT_ORIG.findall(p.inside("cat", "/proc/net/nf_conntrack")):
        sent[host] = sent.get(host, 0) + int(count)
    return sent


def set_acct(p: Pair, on: bool) -> None:
    p.inside("sysctl", "-q", "-w", f"net.netfilter.nf_conntrack_acct={int(on)}")


def hosts_pair(p: Pair) -> str:
    """shapekit's tree and rules on the pair; the three hosts on the peer. The config's path."""
    path = p.tmp / "hosts.toml"
    path.write_text(HOSTS_CONFIG.replace("DEV", p.dev))
    p.shapekit("shape-init", "--all", "--config", str(path))
    for address in HOSTS_PACED:
        run("ip", "-n", p.peer_ns, "addr", "add", f"{address}/15", "dev", p.peer_dev)
    return str(path)


def paced_flows(p: Pair, seconds: int) -> list[subprocess.Popen]:
    servers = [
        subprocess.Popen(["ip", "netns", "exec", p.peer_ns, "iperf3", "-s", "-1", "-B", h, "-p", str(5201 + n)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for n, h in enumerate(HOSTS_PACED)
    ]  # fmt: skip
    time.sleep(0.5)
    clients = [
        subprocess.Popen(["ip", "netns", "exec", p.ns, "iperf3", "-c", h, "-p", str(5201 + n), "-b", rate,
                          "-t", str(seconds), "-J"], stdout=subprocess.PIPE, text=True)
        for n, (h, rate) in enumerate(HOSTS_PACED.items())
    ]  # fmt: skip
    return servers + clients


def goodputs(flows: list[subprocess.Popen]) -> dict[str, float]:
    found = {}
    for host, client in zip(HOSTS_PACED, flows[len(HOSTS_PACED) :], strict=True):
        found[host] = float(json.loads(client.communicate()[0])["end"]["sum_received"]["bits_per_second"])
    for server in flows[: len(HOSTS_PACED)]:
        server.wait()
    return found


def hosts_accuracy(acct_first: bool, window: int) -> dict[str, object]:
    """One window of `window` s inside flows 6 s longer, read both ways; `acct_first`: accounting on before
    the flows."""
    with pair() as p:
        config = hosts_pair(p)
        set_acct(p, acct_first)
        flows = paced_flows(p, window + 6)
        time.sleep(3)
        set_acct(p, True)
        argv = ["ip", "netns", "exec", p.ns, tool("shape-status"), "--config", config, "--hosts", "-i", str(window)]
        counting = subprocess.Popen([*argv, "--json"], stdout=subprocess.PIPE, text=True, env=p.env)
        time.sleep(0.3)  # its counting is in: the conntrack window is the same, give or take its start
        start, first = time.monotonic(), conntrack_sent(p)
        time.sleep(window)
        seconds, last = time.monotonic() - start, conntrack_sent(p)
        counted = json.loads(counting.communicate()[0])
        measured = goodputs(flows)
    by_set = {r["host"]: r["throughput"] for r in counted["hosts"] if r["direction"] == "out"}
    by_ct = {h: (last.get(h, 0) - first.get(h, 0)) * 8 / seconds for h in HOSTS_PACED}
    return {
        h: {"iperf3_mbit": measured[h] / 1e6, "ipset_ratio": by_set.get(h, 0) / measured[h],
            "conntrack_ratio": by_ct[h] / measured[h]}
        for h in HOSTS_PACED
    }  # fmt: skip


def with_counting(p: Pair) -> None:
    """shape-status --hosts counting for the next 8 s (the throughput's 4 s inside them)."""
    path = p.tmp / "hosts.toml"
    path.write_text(HOSTS_CONFIG.replace("DEV", p.dev))
    p.shapekit("shape-init", "--all", "--config", str(path))
    argv = ["ip", "netns", "exec", p.ns, tool("shape-status"), "--config", str(path), "--hosts", "-i", "8"]
    subprocess.Popen(argv, stdout=subprocess.DEVNULL, env=p.env)  # the pair's end kills it
    while "SKHOSTS" not in p.inside("ipset", "list", "-n"):
        time.sleep(0.05)


def with_acct(p: Pair) -> None:
    path = p.tmp / "hosts.toml"
    path.write_text(HOSTS_CONFIG.replace("DEV", p.dev))
    p.shapekit("shape-init", "--all", "--config", str(path))
    set_acct(p, True)


def shapekit_only(p: Pair) -> None:
    path = p.tmp / "hosts.toml"
    path.write_text(HOSTS_CONFIG.replace("DEV", p.dev))
    p.shapekit("shape-init", "--all", "--config", str(path))
    set_acct(p, False)


def hosts_read_cost(hosts: int) -> dict[str, float]:
    """Reading `hosts` hosts both ways: --hosts' whole run less its interval, and two reads of conntrack's table
    (each host one connection: a UDP packet to it)."""
    send = (
        "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        f"for n in range({hosts}): s.sendto(b'x' * 100, (f'198.19.{{n // 256}}.{{n % 256}}', 9))"
    )
    with pair() as p:
        config = hosts_pair(p)
        set_acct(p, True)
        run("ip", "-n", p.ns, "route", "add", "198.19.0.0/16", "via", "198.18.0.2")
        p.inside("sysctl", "-q", "-w", "net.netfilter.nf_conntrack_max=1000000")
        argv = ["ip", "netns", "exec", p.ns, tool("shape-status"), "--config", config, "--hosts", "-i", "3", "--json"]
        start = time.monotonic()
        counting = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=p.env)
        while "SKHOSTS" not in p.inside("ipset", "list", "-n"):  # counting: send now
            time.sleep(0.05)
        p.inside(sys.executable, "-c", send)
        document = json.loads(counting.communicate()[0])
        hosts_s = time.monotonic() - start - document["interval_s"]
        start = time.monotonic()
        read = [conntrack_sent(p) for _ in range(2)]
        conntrack_s = time.monotonic() - start
    return {"hosts": document["hosts_counted"], "hosts_s": hosts_s, "conntrack_entries": len(read[1]),
            "conntrack_s": conntrack_s}  # fmt: skip


def bench_hosts(hosts: int, rounds: int, window: int, flow_s: int = 4) -> dict[str, object]:
    ways = {"shapekit": shapekit_only, "shapekit_counting": with_counting, "shapekit_acct": with_acct}
    gbit = interleaved(ways, rounds, download=False, flow_s=flow_s)
    return {
        "rounds": rounds,
        "window_s": window,
        "accuracy": hosts_accuracy(acct_first=True, window=window),
        "accounting_turned_on_late": hosts_accuracy(acct_first=False, window=window),
        "flow_gbit_s": gbit,
        "counting_ratio": gbit["shapekit_counting"] / gbit["shapekit"],
        "acct_ratio": gbit["shapekit_acct"] / gbit["shapekit"],
        "read": hosts_read_cost(hosts),
    }


# --- seed 000's boot ------------------------------------------------------------------

FOUR_COMMANDS = ("shape-init", "shape-bypass", "shape-mark", "shape-limit-ip")


def seed_000_config(p: Pair) -> str:
    """The bundled config (seed 000's tree, bypass and marks) on the pair's device, with this kernel's leaf and classifier."""
    text = (HERE.parent / "conf" / "shapekit.toml").read_text()
    text = text.replace("[device.eth0", f"[device.{p.dev}").replace('leaf = "sfq"', 'leaf = "pfifo"')
    path = p.tmp / "seed000.toml"
    path.write_text(text.replace('classifier = "fw"', 'classifier = "classify"'))
    return str(path)


def bench_boot(rounds: int) -> dict[str, object]:
    """The boot of seed 000's config, both ways in turn on one pair (flushed between), median of `rounds`."""
    times: dict[str, list[float]] = {"four_commands": [], "all": []}
    with pair() as p:
        config = seed_000_config(p)
        ways = {
            "four_commands": lambda: [p.shapekit(c, "--config", config) for c in FOUR_COMMANDS],
            "all": lambda: p.shapekit("shape-init", "--all", "--config", config),
        }
        for _ in range(rounds):
            for name, way in ways.items():
                times[name].append(p.timed(way))
                p.shapekit("shape-flush", "--config", config)
    medians = {name: statistics.median(seconds) for name, seconds in times.items()}
    return {
        "rounds": rounds,
        **{f"{k}_s": v for k, v in medians.items()},
        "ratio": medians["four_commands"] / medians["all"],
    }


# --- one add -------------------------------------------------------------------------


def bench_add(sizes: list[int], repeat: int) -> list[dict[str, object]]:
    rows = []
    for caps in sizes:
        with pair() as p:
            config = write_config(p, caps)
            for command in ("shape-init", "shape-limit-ip"):
                p.shapekit(command, "--config", config)
            adds = [("shape-limit-ip", "add", host(caps + i), "1mbit", "--config", config) for i in range(repeat)]
            times = [p.timed(lambda argv=argv: p.shapekit(*argv)) for argv in adds]
        rows.append({"caps": caps, "repeat": repeat, "median_s": statistics.median(times), "max_s": max(times)})
    return rows


# --- per-packet cost -----------------------------------------------------------------


def interleaved(
    ways: dict[str, Callable[[Pair], object]], rounds: int, download: bool, flow_s: int = 4
) -> dict[str, float]:
    """Median Gbit/s of one unlimited flow after each setup, a fresh pair each time.

    Rounds are interleaved, so drift on a shared machine hits every column alike.
    """
    results: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(rounds):
        for name, setup in ways.items():
            with pair() as p:
                setup(p)
                results[name].append(p.throughput(flow_s, download=download))
    return {name: statistics.median(values) / 1e9 for name, values in results.items()}


def seed_rules(dev: str, caps: int) -> str:
    """The iptables rules seed 002's loop leaves, loaded at once (how they got there does not matter per packet)."""
    rules = [f"-A INPUT -i {dev} -s {host(n)} -j CONNMARK --set-xmark {n + 1}/0xffffffff" for n in range(caps)]
    return "*mangle\n" + "\n".join([*rules, "-A POSTROUTING -j CONNMARK --restore-mark"]) + "\nCOMMIT\n"


def bench_packet(caps: int, rounds: int, flow_s: int = 4) -> dict[str, object]:
    def shapekit_with(n: int) -> Callable[[Pair], None]:
        return lambda p: shapekit_boot(p, n) and None

    def seed_with(n: int) -> Callable[[Pair], None]:
        return lambda p: p.inside("iptables-restore", "--noflush", stdin=seed_rules(p.dev, n)) and None

    ways = {
        "nothing": lambda p: None,
        "shapekit_0": shapekit_with(0),
        f"shapekit_{caps}": shapekit_with(caps),
        "seed_0": seed_with(0),
        f"seed_{caps}": seed_with(caps),
    }
    gbit = interleaved(ways, rounds, download=False, flow_s=flow_s)
    return {
        "caps": caps,
        "rounds": rounds,
        "gbit_s": gbit,
        "shapekit_ratio": gbit[f"shapekit_{caps}"] / gbit["shapekit_0"],
        "seed_ratio": gbit[f"seed_{caps}"] / gbit["seed_0"],
    }


# --- ingress caps ----------------------------------------------------------------------


def ingress_config(dev: str, caps: int) -> str:
    lines = [f'[device.{dev}]\nrate = "{LINE}"\nleaf = "pfifo"\nclassifier = "classify"\n']
    lines += [f'[device.{dev}.ingress]\nrate = "{LINE}"\nleaf = "pfifo"\n', f"[device.{dev}.limits]"]
    lines += [f'"{host(n)}" = {{ rate = "{kbit(n)}kbit", direction = "in" }}' for n in range(caps)]
    return "\n".join(lines) + "\n"


def linear_filters(dev: str, caps: int) -> str:
    """The same caps as one u32 filter each in one list, as a script without hash tables writes them."""
    return "".join(
        f"filter add dev ifb-{dev} parent 5c: protocol ip pref 999 u32 match ip src {host(n)}/32 flowid 5c:{0x8000 + n:x}\n"
        for n in range(caps)
    )


def bench_ingress(caps: int, rounds: int, repeat: int, flow_s: int = 4) -> dict[str, object]:
    def boot(p: Pair, n: int) -> str:
        path = p.tmp / "shapekit.toml"
        path.write_text(ingress_config(p.dev, n))
        p.shapekit("shape-init", "--config", str(path))
        return str(path)

    def linear(p: Pair) -> None:
        boot(p, caps)
        p.inside("tc", "-batch", "-", stdin=linear_filters(p.dev, caps))  # in front of the hash table

    ways: dict[str, Callable[[Pair], object]] = {
        "nothing": lambda p: None,
        "shapekit_0": lambda p: boot(p, 0),
        f"shapekit_{caps}": lambda p: boot(p, caps),
        f"linear_{caps}": linear,
    }
    gbit = interleaved(ways, rounds, download=True, flow_s=flow_s)
    with pair() as p:
        path = p.tmp / "shapekit.toml"
        path.write_text(ingress_config(p.dev, caps))
        build = p.timed(lambda: p.shapekit("shape-init", "--config", str(path)))
        adds = [
            ("shape-limit-ip", "add", host(caps + i), "1mbit", "--in", "--config", str(path)) for i in range(repeat)
        ]
        add_times = [p.timed(lambda argv=argv: p.shapekit(*argv)) for argv in adds]
    return {
        "caps": caps,
        "rounds": rounds,
        "download_gbit_s": gbit,
        "shapekit_ratio": gbit[f"shapekit_{caps}"] / gbit["shapekit_0"],
        "linear_ratio": gbit[f"linear_{caps}"] / gbit["shapekit_0"],
        "shape_init_s": build,
        "add_in_median_s": statistics.median(add_times),
    }


# --- tcconfig ------------------------------------------------------------------------


def bench_tcconfig(caps: int) -> dict[str, object]:
    """N `tcset --add` rules (one host each), and what they built, read back.

    tcset checks for sch_netem with `lsmod` first; with kmod installed and no
    /proc/modules (this machine), lsmod exits 1 and tcset stops (OSError). It
    skips the check only when lsmod is not found, so it runs here with a PATH
    holding just `tc` and `ip`, the two tools it drives. Each rule then builds
    an HTB class and a u32 filter; the netem qdisc tcset puts under every class
    fails (this kernel has no sch_netem), which tcset logs as an ERROR and
    exits 0 all the same: the bench counts those failures.
    """
    venv = HERE / ".tcconfig"
    if not (venv / "bin" / "tcset").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "tcconfig"], check=True)
    with pair() as p:
        tools = p.tmp / "tcset-path"
        tools.mkdir()
        for name in ("tc", "ip"):
            (tools / name).symlink_to(shutil.which(name) or f"/usr/sbin/{name}")
        netem_failed = 0

        def tcset(n: int) -> None:
            nonlocal netem_failed
            argv = [str(venv / "bin" / "tcset"), p.dev, "--rate", f"{kbit(n)}Kbps", "--network", host(n), "--add"]
            out = run("ip", "netns", "exec", p.ns, "env", f"PATH={tools}", *argv, capture_stderr=True)
            netem_failed += "netem" in out and "command execution failed" in out

        try:
            seconds = p.timed(lambda: [tcset(n) for n in range(caps)])
        except RuntimeError as exc:
            return {"caps": caps, "runs": False, "error": str(exc)}
        classes = p.inside("tc", "class", "show", "dev", p.dev)
        filters = p.inside("tc", "filter", "show", "dev", p.dev)
        netem = p.inside("tc", "qdisc", "show", "dev", p.dev).count("qdisc netem")
    asked = sorted((kbit(n), host(n)) for n in range(caps))
    return {
        "caps": caps,
        "runs": True,
        "seconds": seconds,
        "per_rule_s": seconds / caps,
        "htb_classes": classes.count("class htb"),
        "u32_filters": filters.count("*flowid"),
        "as_asked": tcset_rules(classes, filters) == asked,
        "netem_qdiscs": netem,
        "netem_failures_logged": netem_failed,
    }


def tcset_rules(classes: str, filters: str) -> list[tuple[int, str]]:
    """(rate in kbit, destination) of each class tcset's u32 filters send to, from `tc ... show` text."""
    rates = {cid: int(rate) for cid, rate in re.findall(r"^class htb (\S+) .*? rate (\d+)Kbit ", classes, re.M)}
    rules = re.findall(r"\*flowid (\S+) .*\n(?:  match .*\n)*?  match ([0-9a-f]{8})/ffffffff at 16", filters)
    return sorted((rates.get(cid, 0), str(ipaddress.ip_address(int(dst, 16)))) for cid, dst in rules)


def compile_shapekit() -> None:
    """Byte-compile the shapekit that bench runs, as an install does (pip writes the .pyc files): otherwise,
    with PYTHONDONTWRITEBYTECODE set, every command compiles its modules again (+0.06 s a run)."""
    spec = importlib.util.find_spec("shapekit")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("bench.py: shapekit is not installed in this Python: run it with the checkout's .venv/bin/python")
    for where in spec.submodule_search_locations:
        if os.access(where, os.W_OK):  # the distro-kernel guest sees the checkout read-only
            compileall.compile_dir(where, quiet=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "what",
        choices=[
            "all",
            "apply",
            "add",
            "packet",
            "boot",
            "tcconfig",
            "ingress",
            "scale",
            "metrics",
            "hosts",
            "latency",
        ],
    )
    parser.add_argument("--caps", type=int, nargs="+", help="N (default per table: see above)")
    parser.add_argument("--repeat", type=int, default=10, help="adds to time (median)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved throughput rounds (median)")
    parser.add_argument(
        "--leaves",
        nargs="*",
        choices=["pfifo", "sfq", "fq_codel", "cake"],
        help="latency: shapekit's leaves to run (default: each of these the kernel has)",
    )
    parser.add_argument(
        "--peers",
        nargs="*",
        choices=["seed", "fireqos", "wondershaper"],
        default=["seed", "fireqos", "wondershaper"],
        help="latency: the other shapers to run (wondershaper as Debian 12 ships it: CBQ, which kernels since "
        "6.1.80 refuse, and the run says what it left)",
    )
    parser.add_argument(
        "--seconds", type=float, help="latency: how long the probes run under load (default 20, --quick 4)"
    )
    parser.add_argument(
        "--gso",
        nargs="*",
        default=[],
        type=gso_choice,
        metavar="keep|N",
        help="latency: also run shapekit with these gso_max_segs settings: keep (the kernel's 64 KB "
        "super-packets) or N segments; shapekit's own, auto, always runs",
    )
    parser.add_argument(
        "--congestion", help="latency: the uploads' TCP congestion control, e.g. cubic (default: the kernel's)"
    )
    parser.add_argument("--skip", nargs="*", default=[], help="with all: tables to leave out, e.g. latency scale")
    parser.add_argument("--quick", action="store_true", help="tiny N and one round: checks that the script works")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the JSON goes (default bench/results)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench.py: run as root (it makes network namespaces)")
    compile_shapekit()
    quick = args.quick
    flow_s = 1 if quick else 4  # seconds of each unlimited flow whose Gbit/s a table gives
    tables = ["apply", "add", "packet", "boot", "tcconfig", "ingress", "scale", "metrics", "hosts", "latency"]
    unknown = [name for name in args.skip if name not in tables]
    if unknown:
        parser.error(f"--skip {unknown[0]}: not a table (the tables: {', '.join(tables)})")
    if args.skip and args.what != "all":
        parser.error("--skip goes with all")
    todo = [name for name in tables if name not in args.skip] if args.what == "all" else [args.what]
    if "apply" in todo:
        rows = bench_apply(args.caps or ([10] if quick else [100, 1000, 10000]))
        save("apply", rows, args.out)
        print("apply time, seconds (shapekit = shape-init + shape-limit-ip; boot = all four commands)")
        print(
            table(
                rows,
                [
                    ("caps", "caps", "d"),
                    ("shapekit_s", "shapekit", ".3f"),
                    ("shapekit_boot_s", "boot", ".3f"),
                    ("seed_loop_s", "seed loop", ".3f"),
                    ("floor_s", "flat floor", ".3f"),
                    ("groups_floor_s", "groups floor", ".3f"),
                    ("seed_over_shapekit", "seed/shapekit", ".1f"),
                    ("shapekit_over_floor", "shapekit/groups floor", ".2f"),
                ],
            )
        )
    if "add" in todo:
        rows = bench_add(args.caps or ([10] if quick else [0, 1000, 10000]), 2 if quick else args.repeat)
        save("add", rows, args.out)
        print("\none shape-limit-ip add with N caps installed, seconds")
        print(table(rows, [("caps", "caps", "d"), ("median_s", "median", ".3f"), ("max_s", "max", ".3f")]))
    if "packet" in todo:
        caps = (args.caps or [10 if quick else 10000])[0]
        row = bench_packet(caps, 1 if quick else args.rounds, flow_s)
        save("packet", row, args.out)
        print(f"\nunlimited TCP flow, Gbit/s (median of {row['rounds']}), with {caps} caps vs none")
        for name, value in row["gbit_s"].items():
            print(f"  {name:>16}  {value:7.2f}")
        print(f"  shapekit {caps}/0: {row['shapekit_ratio']:.2f}   seed rules {caps}/0: {row['seed_ratio']:.2f}")
    if "boot" in todo:
        row = bench_boot(1 if quick else args.rounds)
        save("boot", row, args.out)
        print(f"\nseed 000's boot, seconds (median of {row['rounds']}, side by side)")
        print(
            f"  four commands {row['four_commands_s']:.3f}   shape-init --all {row['all_s']:.3f}   ratio {row['ratio']:.2f}"
        )
    if "ingress" in todo:
        caps = (args.caps or [10 if quick else 10000])[0]
        row = bench_ingress(caps, 1 if quick else args.rounds, 2 if quick else args.repeat, flow_s)
        save("ingress", row, args.out)
        print(
            f"\nunlimited download through the IFB, Gbit/s (median of {row['rounds']}), with {caps} --in caps vs none"
        )
        for name, value in row["download_gbit_s"].items():
            print(f"  {name:>16}  {value:7.2f}")
        print(f"  shapekit {caps}/0: {row['shapekit_ratio']:.2f}   linear u32 {caps}/0: {row['linear_ratio']:.2f}")
        print(
            f"  shape-init with {caps} --in caps: {row['shape_init_s']:.2f} s; one add --in: {row['add_in_median_s']:.3f} s"
        )
    if "scale" in todo:
        rows = bench_scale(
            args.caps or ([10] if quick else [10000, 100000]), 2 if quick else 5, 1 if quick else args.rounds, flow_s
        )
        save("scale", rows, args.out)
        print("\ncaps at scale (seconds; MB: peak resident memory of the command; flow: unlimited, N caps / none)")
        columns = [
            ("caps", "caps", "d"),
            ("apply_s", "apply", ".2f"),
            ("groups_floor_s", "groups floor", ".2f"),
            ("apply_over_groups_floor", "apply/floor", ".2f"),
            ("flat_floor_s", "flat floor", ".2f"),
            ("add_median_s", "one add", ".3f"),
            ("sync_all_s", "sync all", ".2f"),
            ("sync_1pct_s", "sync 1%", ".2f"),
            ("add_runtime_s", "add among synced", ".3f"),
            ("flush_s", "flush", ".2f"),
            ("groups_floor_teardown_s", "floor teardown", ".2f"),
            ("flat_teardown_s", "flat teardown", ".2f"),
            ("flow_ratio", "flow", ".3f"),
            ("shape_limit_ip_mb", "MB limit-ip", ".0f"),
            ("sync_all_mb", "MB sync", ".0f"),
        ]
        print(table(rows, columns))
    if "metrics" in todo:
        caps = (args.caps or [10 if quick else 10000])[0]
        row = bench_metrics(caps, 1 if quick else args.rounds)
        save("metrics", row, args.out)
        print(f"\nshape-status with {caps} caps, one sample (median of {row['repeat']}; MB: the most)")
        print(
            f"  --format prometheus {row['prometheus_s']:.3f} s {row['prometheus_mb']:.0f} MB "
            f"({row['prometheus_lines']} lines)   --json --interval 0.1 {row['json_s']:.3f} s {row['json_mb']:.0f} MB"
        )
    if "hosts" in todo:
        hosts = (args.caps or [100 if quick else 10000])[0]
        row = bench_hosts(hosts, 1 if quick else args.rounds, 1 if quick else 4, flow_s)
        save("hosts", row, args.out)
        print(
            "\ntop talkers: what shape-status --hosts counts (ipset) vs conntrack accounting, "
            f"over one {row['window_s']} s window"
        )
        for title, key in (
            ("accounting on before the flows", "accuracy"),
            ("turned on after", "accounting_turned_on_late"),
        ):
            print(f"  {title}:")
            for host, r in row[key].items():
                print(
                    f"    {host}  iperf3 {r['iperf3_mbit']:6.2f} Mbit/s   ipset/iperf3 {r['ipset_ratio']:.3f}"
                    f"   conntrack/iperf3 {r['conntrack_ratio']:.3f}"
                )
        print(
            f"  unlimited flow, Gbit/s (median of {row['rounds']}): "
            + "   ".join(f"{name} {value:.2f}" for name, value in row["flow_gbit_s"].items())
        )
        print(
            f"  while counting / without: {row['counting_ratio']:.3f}   with accounting / without: {row['acct_ratio']:.3f}"
        )
        read = row["read"]
        print(
            f"  reading {read['hosts']} hosts: --hosts {read['hosts_s']:.3f} s beyond its interval; "
            f"conntrack's table ({read['conntrack_entries']} hosts) read twice {read['conntrack_s']:.3f} s"
        )
    if "latency" in todo:
        seconds = args.seconds if args.seconds is not None else (4 if quick else 20)
        result = bench_latency(args.leaves, args.peers, seconds, 2 if quick else 3, args.congestion, args.gso)
        save("latency", result, args.out)
        plot(result, args.out / "latency.png")
        print("\n" + report(result))
    if "tcconfig" in todo:
        row = bench_tcconfig((args.caps or [3 if quick else 100])[0])
        save("tcconfig", row, args.out)
        if row["runs"]:
            print(f"\ntcconfig: {row['caps']} tcset --add in {row['seconds']:.1f} s ({row['per_rule_s']:.2f} s a rule)")
            print(
                f"  built: {row['htb_classes']} HTB classes, {row['u32_filters']} u32 filters, "
                f"{row['netem_qdiscs']} netem qdiscs ({row['netem_failures_logged']} netem adds failed: no sch_netem); "
                f"rates and hosts as asked: {row['as_asked']}"
            )
        else:
            print(f"\ntcconfig does not run here: {row['error']}")


if __name__ == "__main__":
    main()
