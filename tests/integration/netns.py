"""Real-kernel helpers: network namespaces and veth pairs, and reading tc state back.

Everything happens inside namespaces the fixture creates, with addresses
from 198.18.0.0/15 and fd00::/8; the host's own namespace is never touched.
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


def sh(*argv: str, check: bool = True, stdin: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(argv, input=stdin, capture_output=True, text=True, check=check, timeout=timeout)


def script(name: str) -> str:
    """A shapekit console script of the Python running the tests."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else (shutil.which(name) or name)


def parse_classes(text: str) -> dict[str, dict[str, str]]:
    """`tc class show` text by class id. (iproute2 6.1 prints no JSON for HTB classes.)"""
    classes = {}
    for line in text.splitlines():
        tokens = line.split()
        if len(tokens) < 3 or tokens[0] != "class":
            continue
        fields: dict[str, str] = {"kind": tokens[1]}
        rest = tokens[3:]
        i = 0
        while i < len(rest):
            if rest[i] == "root":
                fields["parent"] = "root"
                i += 1
            else:
                fields[rest[i]] = rest[i + 1] if i + 1 < len(rest) else ""
                i += 2
        classes[tokens[2]] = fields
    return classes


@dataclass
class Namespace:
    name: str
    dev: str
    addr4: str
    addr6: str

    def run(self, *argv: str, check: bool = True, stdin: str | None = None, timeout: float = 60):
        return sh("ip", "netns", "exec", self.name, *argv, check=check, stdin=stdin, timeout=timeout)


@dataclass
class NetPair:
    """Two namespaces joined by a veth pair: `left` sends through the shaped device to `right`."""

    left: Namespace
    right: Namespace
    workdir: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def dev(self) -> str:
        return self.left.dev

    def write_config(self, text: str, name: str = "shapekit.toml") -> Path:
        path = self.workdir / name
        path.write_text(text.replace("DEV", self.dev))
        path.chmod(0o644)
        return path

    def shapekit(self, command: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """Run a shapekit command inside the left namespace."""
        argv = ("ip", "netns", "exec", self.left.name, script(command), *args)
        result = subprocess.run(argv, capture_output=True, text=True, env=self.env, timeout=60)
        if check and result.returncode != 0:
            raise AssertionError(f"{command} {' '.join(args)} exited {result.returncode}: {result.stderr}")
        return result

    def qdiscs(self, dev: str | None = None) -> list[dict]:
        return json.loads(self.left.run("tc", "-j", "qdisc", "show", "dev", dev or self.dev).stdout)

    def classes(self) -> dict[str, dict[str, str]]:
        return parse_classes(self.left.run("tc", "class", "show", "dev", self.dev).stdout)

    def snapshot(self) -> tuple[str, str, str]:
        """Everything tc says about the device, without counters (HTB's direct_packets_stat is one: a stray
        packet, an IPv6 router solicitation, counts there)."""
        show = ("qdisc", "class", "filter")
        texts = (self.left.run("tc", "-d", kind, "show", "dev", self.dev).stdout for kind in show)
        return tuple(re.sub(r" direct_packets_stat \d+", "", text) for text in texts)

    def save(self, tool: str = "iptables-save", table: str = "mangle") -> str:
        """A table of the left namespace, without comments and counters: comparable across runs."""
        text = self.left.run(tool, "-t", table).stdout
        return "\n".join(re.sub(r" \[\d+:\d+\]$", "", line) for line in text.splitlines() if not line.startswith("#"))

    def class_bytes(self, classid: str, dev: str | None = None) -> int:
        shown = self.left.run("tc", "-s", "class", "show", "dev", dev or self.dev, "classid", classid).stdout
        return int(shown.split("Sent ")[1].split()[0])

    def add_addresses(self, *addresses: str) -> None:
        """More addresses on the right namespace's end: more hosts to send to."""
        for address in addresses:
            family, prefix = ("-6", "/64") if ":" in address else ("-4", "/24")
            self.right.run(
                "ip",
                family,
                "addr",
                "add",
                address + prefix,
                "dev",
                self.right.dev,
                *(["nodad"] if ":" in address else []),
            )

    def goodput(
        self,
        seconds: int = 5,
        ipv6: bool = False,
        port: int | None = None,
        cport: int | None = None,
        to: str | None = None,
        download: bool = False,
        window: str | None = None,
        bitrate: str | None = None,
    ) -> float:
        """TCP goodput left → right (`download`: right → left) in bits/s, measured by iperf3 at the receiver.

        The receiver counts until the shaper's queue has drained, so its rate is
        exact; `-O` (omit) would skew it (iperf3 3.12 keeps the omitted seconds).
        A download's queue is filled by a remote sender that no local socket
        holds back, so it is long when the sender stops: its rate is read from
        the receiver's per-second intervals after the first, not from the total.
        `window` (iperf3 -w, e.g. "16K") caps the sockets' buffers: how much a
        flow queues in a slow FIFO class, where iperf3's own end-of-test
        messages wait behind it. `bitrate` (iperf3 -b, e.g. "4M") paces the sender.
        """
        server_addr = to or (self.right.addr6 if ipv6 else self.right.addr4)
        port = str(port or 5201 + secrets.randbelow(1000))
        client_args = (["--cport", str(cport)] if cport else []) + (["-w", window] if window else [])
        client_args += ["-b", bitrate] if bitrate else []
        server = subprocess.Popen(
            ["ip", "netns", "exec", self.right.name, "iperf3", "-s", "-1", "-B", server_addr, "-p", port],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            for _ in range(50):
                result = self.left.run(
                    "iperf3", "-c", server_addr, "-p", port, "-t", str(seconds), "-J", *client_args,
                    *(["-R"] if download else []),
                    check=False, timeout=seconds + 30,
                )  # fmt: skip
                report = json.loads(result.stdout or "{}")
                if "error" not in report and download:
                    return _steady_rate(report)
                if "error" not in report:
                    return float(report["end"]["sum_received"]["bits_per_second"])
                if "connect" not in report["error"]:
                    raise AssertionError(f"iperf3: {report['error']}")
                time.sleep(0.1)
            raise AssertionError("iperf3 server did not start")
        finally:
            server.kill()
            server.wait()


def _steady_rate(report: dict) -> float:
    """Bits/s the receiver (an iperf3 -R client) got over every interval but the first (slow start) and the last (cut short)."""
    intervals = [i["sum"] for i in report["intervals"][1:-1]]
    return sum(i["bytes"] for i in intervals) * 8 / sum(i["seconds"] for i in intervals)
