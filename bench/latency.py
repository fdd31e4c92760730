"""Seed 000's promise, measured: ssh, DNS and ping stay responsive while uploads fill the line.

    server A (shaped by the tool under test) -> router R -> client B

R's link towards B is the ISP's modem: tbf at LINE_MBIT with a buffer of
BUFFER_MS, the queue that makes an unshaped uplink slow (bufferbloat). A runs
8 uploads from the torrent port range and one in the default class, all to B,
started together; during them, probes measure round trips:

- ping: B pings A; A's echo reply is icmp (class high);
- dns: A sends a 40-byte UDP request to B's port 53 and waits for the echo (high);
- ssh: a 64-byte request/response on an established connection, B to A's port 22 (the bypass);
- connect: the time of a new TCP connection from B to A's port 22 (its SYN-ACK: the bypass);
- torrent: the same request/response to A's port 62000, in the torrent class itself.

Each configuration shapes A's side at SHAPED of the line, as seed 000's tree:
- none: no shaping;
- shapekit-LEAF: the bundled config (conf/shapekit.toml, seed 000's tree) with
  its line and shaped partition at 95% and leaf LEAF;
- seed: seed 000's own script, its tc half as written (LINK and SHAPEDLINK at 95%),
  with the leaf this kernel has, and its iptables marks with port matches where
  it used layer7; fw filters where the kernel has cls_fw, else CLASSIFY rules to
  the same classes;
- fireqos: FireQOS (Debian's package, unpacked into bench/.peers) with the same
  classes, rates and matches, and its own choice of leaf (fq_codel) where the
  kernel has it;
- wondershaper: Debian 12's wondershaper at the same uplink, run as shipped. It
  builds a CBQ tree, and Linux retired CBQ in 6.3 and in 6.1.80, so Debian 12's
  own kernels since 6.1.0-19 (2024) refuse it: there its tc commands fail, it
  leaves only its ingress policer, and the run measures what its users get.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from helpers import delete_namespaces, run, table, tool
from probe import INTERVAL

HERE = Path(__file__).resolve().parent
PEERS = HERE / ".peers"
LINE_MBIT = 20
SHAPED = 0.95
BUFFER_MS = 300
MODEM_BURST = 2 * 1514  # the modem's tbf bucket: it sends at its rate, a frame or two at a time
TORRENT_FLOWS = 8
TORRENT_PORTS = 61001  # the first upload's source port; seed 000 marks 61000:63000 as torrent
TORRENT_CEIL_KBIT = 2048  # seed 000's TOR_MAX
# TCP's payload per frame HTB counts: a 1448-byte segment (with timestamps) in a 1514-byte frame
PAYLOAD_SHARE = 1448 / 1514
PROBES = ("ping", "dns", "ssh", "connect", "torrent")
A_IP, R_A_IP, R_B_IP, B_IP = "198.18.30.1", "198.18.30.2", "198.18.31.1", "198.18.31.2"


@dataclass
class Trio:
    """Three namespaces, A - R - B, with the modem's queue on R's link to B."""

    token: str = field(default_factory=lambda: secrets.token_hex(3))
    tmp: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="shapekit-latency-")))

    def __post_init__(self) -> None:
        self.a, self.r, self.b = (f"skb-{self.token}-{x}" for x in "arb")
        self.dev = f"skb{self.token}a"  # A's side, where the shaping goes

    def up(self) -> None:
        for ns in (self.a, self.r, self.b):
            run("ip", "netns", "add", ns)
            run("ip", "-n", ns, "link", "set", "lo", "up")
        r_a, r_b, b_dev = f"skb{self.token}ra", f"skb{self.token}rb", f"skb{self.token}b"
        run("ip", "link", "add", self.dev, "netns", self.a, "type", "veth", "peer", "name", r_a, "netns", self.r)
        run("ip", "link", "add", r_b, "netns", self.r, "type", "veth", "peer", "name", b_dev, "netns", self.b)
        for ns, dev, address in (
            (self.a, self.dev, A_IP),
            (self.r, r_a, R_A_IP),
            (self.r, r_b, R_B_IP),
            (self.b, b_dev, B_IP),
        ):
            run("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", dev)
            run("ip", "-n", ns, "link", "set", dev, "up")
        run("ip", "-n", self.a, "route", "add", "default", "via", R_A_IP)
        run("ip", "-n", self.b, "route", "add", "default", "via", R_B_IP)
        run("ip", "netns", "exec", self.r, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        # TCP sizes its GSO super-packets up to 64 KB when the path's min RTT is under 0.5 ms (a data
        # centre's; tcp_tso_rtt_log, Linux 6.0+), and these namespaces' RTT is 0.1 ms. HTB charges a
        # super-packet whole, so one of 23 KB leaves the 20 Mbit/s modem holding 10 ms. Over the internet
        # the uploads' peers are tens of ms away: tcp_tso_rtt_log=0 gives the sizing an uplink sees.
        if Path("/proc/sys/net/ipv4/tcp_tso_rtt_log").exists():
            run("ip", "netns", "exec", self.a, "sysctl", "-qw", "net.ipv4.tcp_tso_rtt_log=0")
        limit = LINE_MBIT * 1_000_000 // 8 * BUFFER_MS // 1000
        run("ip", "netns", "exec", self.r, "tc", "qdisc", "add", "dev", r_b, "root", "tbf",
            "rate", f"{LINE_MBIT}mbit", "burst", str(MODEM_BURST), "limit", str(limit))  # fmt: skip

    def down(self) -> None:
        delete_namespaces(self.a, self.r, self.b)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def run_in(self, ns: str, *argv: str, stdin: str | None = None, env: dict[str, str] | None = None) -> str:
        return run("ip", "netns", "exec", ns, *argv, stdin=stdin, env=env)

    def start_in(self, ns: str, *argv: str) -> subprocess.Popen:
        """A process in `ns`, its stdout piped; iperf3's complaints when it is stopped are not shown."""
        quiet = subprocess.DEVNULL if argv[0] == "iperf3" else None
        return subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdout=subprocess.PIPE, stderr=quiet, text=True)

    def kernel_has(self, kind: str) -> bool:
        """Whether the kernel takes a qdisc (or, for "fw", the fw classifier), tried on A's loopback."""
        setup = ["root", "handle", "1:", "htb"] if kind == "fw" else ["root", "handle", "1:", *kind.split()]
        try:
            self.run_in(self.a, "tc", "qdisc", "add", "dev", "lo", *setup)
            if kind == "fw":
                self.run_in(self.a, "tc", "filter", "add", "dev", "lo", "parent", "1:", "protocol", "ip",
                            "handle", "1", "fw", "flowid", "1:1")  # fmt: skip
            return True
        except RuntimeError:
            return False
        finally:
            subprocess.run(["ip", "netns", "exec", self.a, "tc", "qdisc", "del", "dev", "lo", "root"],
                           capture_output=True)  # fmt: skip


# --- the configurations ----------------------------------------------------------------


def shaped_kbit() -> int:
    return int(LINE_MBIT * 1000 * SHAPED)


def shapekit_config(dev: str, leaf: str, fw: bool, gso: str | None = None) -> str:
    """conf/shapekit.toml with its line and shaped partition at SHAPED of the bottleneck, on `dev`; `gso`: its
    gso_max_segs setting ("keep" or a number), else shapekit's own ("auto")."""
    text = (HERE.parent / "conf" / "shapekit.toml").read_text()
    line = f'"{shaped_kbit()}kbit"'
    for old, new in (
        ("[device.eth0", f"[device.{dev}"),
        ('rate = "100mbit"', f"rate = {line}"),
        ('"50mbit"', line),
        ('leaf = "sfq"', f'leaf = "{leaf}"'),
        ('classifier = "fw"', f'classifier = "{"fw" if fw else "classify"}"\n{gso_setting(gso)}'),
    ):
        if old not in text:
            raise RuntimeError(f"conf/shapekit.toml no longer holds {old}: update bench/latency.py")
        text = text.replace(old, new)
    return text


def gso_setting(gso: str | None) -> str:
    if gso is None:
        return ""
    return f"gso_max_segs = {gso}" if gso.isdigit() else f'gso_max_segs = "{gso}"'


def seed_tc(dev: str, leaf: str, fw: bool) -> str:
    """Seed 000's tc script as a `tc -force -batch`: its lines as written (those that fail, fail there too)."""
    link = shaped = shaped_kbit()
    sfq = "sfq perturb 10" if leaf == "sfq" else leaf
    lines = [
        f"qdisc del dev {dev} root",
        f"qdisc add dev {dev} root handle 100: htb default 1",
        f"class add dev {dev} parent 100: classid 100:1 htb rate {link}kbit",
        f"qdisc add dev {dev} parent 100:1 handle 1: htb",
        f"class add dev {dev} parent 1: classid 1:1 htb rate {shaped}kbit",
        f"class add dev {dev} parent 100: classid 100:1 htb rate {link}kbit",
        f"qdisc add dev {dev} parent 100:1 {sfq}",
        f"class add dev {dev} parent 1:1 classid 1:10 htb rate {shaped}kbit ceil {shaped}kbit prio 5",
        f"qdisc add dev {dev} parent 1:10 {sfq}",
        f"class add dev {dev} parent 1:10 classid 1:1010 htb rate 10000kbit ceil {shaped}kbit prio 0",
        f"qdisc add dev {dev} parent 1:1010 {sfq}",
        f"class add dev {dev} parent 1:10 classid 1:1030 htb rate 512kbit ceil {shaped}kbit prio 5",
        f"qdisc add dev {dev} parent 1:1030 {sfq}",
        f"class add dev {dev} parent 1:10 classid 1:1090 htb rate 512kbit ceil {TORRENT_CEIL_KBIT}kbit prio 10",
        f"qdisc add dev {dev} parent 1:1090 {sfq}",
    ]
    if fw:
        lines += [
            f"filter add dev {dev} parent 100:0 protocol ip prio 1 handle 1001 fw flowid 100:1",
            f"filter add dev {dev} parent 1:0 protocol ip prio 0 handle 11010 fw flowid 1:1010",
            f"filter add dev {dev} parent 1:0 protocol ip prio 5 handle 11030 fw flowid 1:1030",
            f"filter add dev {dev} parent 1:0 protocol ip prio 10 handle 11090 fw flowid 1:1090",
        ]
    return "\n".join(lines) + "\n"


SEED_CLASSES = {1001: "100:1", 11010: "1:1010", 11030: "1:1030", 11090: "1:1090"}


def seed_rules(fw: bool) -> str:
    """Seed 000's POSTROUTING marks for `iptables-restore`; port matches where it used layer7. Without
    cls_fw, CLASSIFY sends each mark to the class its fw filter named (the inner HTB finds 1:x itself)."""
    classify = (
        []
        if fw
        else [f"-A POSTROUTING -m mark --mark {m} -j CLASSIFY --set-class {c}" for m, c in SEED_CLASSES.items()]
    )
    rules = [
        f"-A POSTROUTING -s {A_IP} -p tcp -m multiport --sports 22,80 -j MARK --set-mark 1001",
        f"-A POSTROUTING -d {A_IP} -p tcp -m multiport --dports 22,80 -j MARK --set-mark 1001",
        *classify[:1],
        "-A POSTROUTING -m mark --mark 1001 -j RETURN",
        "-A POSTROUTING -m connmark --mark 0x0 -j MARK --set-mark 11030",
        "-A POSTROUTING -p udp --dport 53 -j MARK --set-mark 11010",  # -m layer7 --l7proto dns
        "-A POSTROUTING -p tcp --dport 22 -j MARK --set-mark 11010",  # -m layer7 --l7proto ssh
        "-A POSTROUTING -p tcp -m tcp --tcp-flags SYN,RST,ACK SYN -j MARK --set-mark 11010",
        "-A POSTROUTING -p icmp -j MARK --set-mark 11010",
        "-A POSTROUTING -p tcp --sport 61000:63000 -j MARK --set-mark 11090",  # the update's rule
        *classify[1:],
    ]
    return "*mangle\n" + "\n".join(rules) + "\nCOMMIT\n"


def fireqos_config(dev: str, qdisc: str) -> str:
    """Seed 000's classes in FireQOS's words: the first class goes first; ssh joins the interactive class
    (FireQOS has no unshaped bypass)."""
    return f"""interface {dev} world-out output rate {shaped_kbit()}kbit {qdisc}
  class interactive commit 10000kbit
    match tcp port 22
    match udp port 53
    match icmp
    match tcp syn
  class default commit 512kbit
  class torrent commit 512kbit max {TORRENT_CEIL_KBIT}kbit
    match tcp sports 61000:63000
"""


def unpacked(package: str, *more: str) -> Path:
    """A Debian package (and what it needs) unpacked into bench/.peers/PACKAGE, never installed: their
    maintainer scripts would start the service on this machine's own interfaces."""
    root = PEERS / package
    if not root.exists():
        download = Path(tempfile.mkdtemp(prefix="shapekit-peer-"))
        try:
            subprocess.run(["apt-get", "download", "-q", package, *more], cwd=download, check=True,
                           capture_output=True)  # fmt: skip
            staging = Path(str(root) + ".part")
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            for deb in download.glob("*.deb"):
                subprocess.run(["dpkg", "-x", str(deb), str(staging)], check=True)
            staging.rename(root)
        finally:
            shutil.rmtree(download, ignore_errors=True)
    return root


def fireqos_program() -> Path:
    """FireQOS with its state and config directories moved to $FIREQOS_BENCH_DIR."""
    root = unpacked("fireqos", "firehol-common")
    settings = root / "usr" / "lib" / "firehol" / "install.config"
    text = settings.read_text()
    for name in ("SYSCONFDIR", "LOCALSTATEDIR"):
        text = text.replace(f'{name}="/', f'{name}="${{FIREQOS_BENCH_DIR:?}}/')
        if f'{name}="${{FIREQOS_BENCH_DIR:?}}/' not in text:  # else FireQOS would write to this machine's /etc, /var
            raise RuntimeError(f"{settings} no longer sets {name}: update bench/latency.py's fireqos_program")
    if text != settings.read_text():
        settings.write_text(text)
    return root / "usr" / "lib" / "firehol" / "fireqos"


@dataclass
class Setup:
    """One configuration: how it shapes A, and whether this kernel can run it."""

    name: str
    apply: Callable[[Trio], str | None]  # a note on what it left, where that is not what it meant to
    needs: tuple[str, ...] = ()


def no_shaping(trio: Trio) -> None:
    pass


def shapekit_with(leaf: str, gso: str | None = None) -> Callable[[Trio], None]:
    """shapekit's boot with this leaf; `gso`: the device's gso_max_segs setting ("keep": the kernel's 64 KB
    GSO super-packets, which HTB charges and sends whole; a number: at most that many segments)."""

    def apply(trio: Trio) -> None:
        path = trio.tmp / f"shapekit-{leaf}.toml"
        path.write_text(shapekit_config(trio.dev, leaf, trio.kernel_has("fw"), gso))
        env = {**os.environ, "SHAPEKIT_STATE_DIR": str(trio.tmp / "state")}
        trio.run_in(trio.a, tool("shape-init"), "--all", "--config", str(path), env=env)

    return apply


def seed_script(trio: Trio) -> None:
    fw = trio.kernel_has("fw")
    leaf = "sfq" if trio.kernel_has("sfq") else "pfifo"
    subprocess.run(["ip", "netns", "exec", trio.a, "tc", "-force", "-batch", "-"], input=seed_tc(trio.dev, leaf, fw),
                   text=True, capture_output=True)  # fmt: skip
    trio.run_in(trio.a, "iptables-restore", "--noflush", stdin=seed_rules(fw))


def fireqos(trio: Trio) -> None:
    program = fireqos_program()
    qdisc = next(kind for kind in ("fq_codel", "sfq", "pfifo") if kind == "pfifo" or trio.kernel_has(kind))
    state = trio.tmp / "fireqos"  # its /etc and /var
    for sub in ("etc/firehol", "var/run/fireqos", "var/spool/firehol"):
        (state / sub).mkdir(parents=True, exist_ok=True)
    config = state / "fireqos.conf"
    config.write_text(fireqos_config(trio.dev, qdisc))
    env = {**os.environ, "FIREQOS_BENCH_DIR": str(state)}
    trio.run_in(trio.a, "bash", str(program), "-nc", str(config), "start", env=env)


def wondershaper(trio: Trio) -> str | None:
    """Debian 12's wondershaper as shipped; where the kernel refuses its CBQ root it carries on (it checks
    no command), so say what it left."""
    program = unpacked("wondershaper") / "sbin" / "wondershaper"
    argv = ["bash", str(program), trio.dev, str(LINE_MBIT * 1000 * 10), str(shaped_kbit())]
    ran = subprocess.run(["ip", "netns", "exec", trio.a, *argv], capture_output=True, text=True)
    qdiscs = trio.run_in(trio.a, "tc", "qdisc", "show", "dev", trio.dev)
    if " cbq " in qdiscs:
        return None
    first_error = next((line.strip() for line in ran.stderr.splitlines() if line.strip()), "no error shown")
    policer = trio.run_in(trio.a, "tc", "filter", "show", "dev", trio.dev, "parent", "ffff:")
    left = "its ingress policer" if "police" in policer else "an ingress qdisc" if "ingress" in qdiscs else "nothing"
    return f"the kernel refused its CBQ root ({first_error}) and it went on: it left {left}, A's uploads unshaped"


def setups(leaves: list[str], peers: list[str], gso: list[str]) -> list[Setup]:
    known = {
        "seed": Setup("seed", seed_script),
        "fireqos": Setup("fireqos", fireqos),
        "wondershaper": Setup("wondershaper", wondershaper),
    }
    return [
        Setup("none", no_shaping),
        *(Setup(f"shapekit-{leaf}", shapekit_with(leaf), (leaf,)) for leaf in leaves),
        *(
            Setup(f"shapekit-{leaf} gso {value}", shapekit_with(leaf, value), (leaf,))
            for value in gso
            for leaf in leaves
        ),
        *(known[peer] for peer in peers),
    ]


# --- one run: load and probes ------------------------------------------------------------


def measure(
    trio: Trio, probe_s: float, warm_s: float = 0.0, load: bool = True, congestion: str | None = None
) -> dict[str, object]:
    """Probe A for `probe_s` seconds, `warm_s` after the uploads began (`load`); return the probes' round
    trips and losses, and the uploads' goodputs over the same window, counted where B receives them."""
    probe = [tool("python3"), str(HERE / "probe.py")]
    ports = list(range(5301, 5302 + TORRENT_FLOWS)) if load else []
    started = [trio.start_in(trio.a, *probe, "serve-tcp", str(port)) for port in (22, 62000)]
    started.append(trio.start_in(trio.b, *probe, "serve-udp", "53"))
    started += [trio.start_in(trio.b, "iperf3", "-s", "-1", "-p", str(port)) for port in ports]
    try:
        _listening(trio, ports)  # iperf3's in B; the probes' peers too
        # The probes connect now, before the load (an ssh session, a torrent peer), and begin at `at`.
        at = time.time() + 1.0 + warm_s
        timing = [str(at), str(probe_s)]
        clients = {
            "dns": trio.start_in(trio.a, *probe, "rr-udp", B_IP, "53", *timing),
            "ssh": trio.start_in(trio.b, *probe, "rr-tcp", A_IP, "22", *timing),
            "connect": trio.start_in(trio.b, *probe, "connect", A_IP, "22", *timing),
            "torrent": trio.start_in(trio.b, *probe, "rr-tcp", A_IP, "62000", *timing),
        }
        time.sleep(1.0)
        for n, port in enumerate(ports):  # they run on past the window and are stopped after it
            torrent = ["--cport", str(TORRENT_PORTS + n)] if n < TORRENT_FLOWS else []
            argv = ["iperf3", "-c", B_IP, "-p", str(port), "-t", str(round(warm_s + probe_s) + 30), *torrent]
            argv += ["-C", congestion] if congestion else []
            started.append(trio.start_in(trio.a, *argv))
        time.sleep(max(0.0, at - time.time()))
        before = (time.monotonic(), _received(trio))
        count = str(int(probe_s / INTERVAL))  # ping at the other probes' pace
        clients["ping"] = trio.start_in(trio.b, "ping", "-n", "-i", str(INTERVAL), "-c", count, "-W", "2", A_IP)
        probes = {name: _finish(name, clients[name]) for name in PROBES}
        after = (time.monotonic(), _received(trio))
        stopped = [p.args for p in started[len(started) - len(ports) :] if p.poll() is not None]
        if stopped or any(port not in before[1] or port not in after[1] for port in ports):
            raise RuntimeError(f"an upload stopped during the probes: {stopped or 'a port B was not receiving on'}")
    finally:
        for process in started:
            process.kill()
            process.wait()
    if not load:
        return {"probes": probes}
    mbit = {port: (after[1].get(port, 0) - before[1].get(port, 0)) * 8 / (after[0] - before[0]) / 1e6 for port in ports}
    return {"probes": probes, "torrent_mbit": sum(mbit[p] for p in ports[:-1]), "default_mbit": mbit[ports[-1]]}


def _received(trio: Trio) -> dict[int, int]:
    """Payload bytes B has received on each local port: its busiest connection there (the upload, not
    iperf3's control connection beside it), from `ss -ti`."""
    received: dict[int, int] = {}
    port = 0
    for line in trio.run_in(trio.b, "ss", "-Htin", "state", "established").splitlines():
        if not line[:1].isspace():  # "Recv-Q Send-Q LOCAL:PORT PEER:PORT", then a line of TCP_INFO
            port = int(line.split()[2].rsplit(":", 1)[1])
        elif count := re.search(r"\bbytes_received:(\d+)", line):
            received[port] = max(received.get(port, 0), int(count[1]))
    return received


def _finish(name: str, client: subprocess.Popen) -> dict[str, object]:
    out, _ = client.communicate(timeout=120)
    if client.returncode not in ((0, 1) if name == "ping" else (0,)):  # ping exits 1 when a reply was lost
        raise RuntimeError(f"the {name} probe failed (exit {client.returncode})")
    return ping_result(out) if name == "ping" else json.loads(out)


def ping_result(out: str) -> dict[str, object]:
    """Round trips and losses from ping's output (its `time=` lines and its `N packets transmitted` line)."""
    rtts = [float(m) for m in re.findall(r" time=([0-9.]+) ms", out)]
    sent = re.search(r"(\d+) packets transmitted", out)
    return {"rtt_ms": rtts, "lost": (int(sent.group(1)) if sent else len(rtts)) - len(rtts)}


def _listening(trio: Trio, ports: list[int]) -> None:
    """Wait for the servers: iperf3's `ports` and UDP 53 in B, TCP 22 and 62000 in A."""
    wanted = [(trio.b, "-Hltn", port) for port in ports] + [(trio.b, "-Hlun", 53)]
    wanted += [(trio.a, "-Hltn", 22), (trio.a, "-Hltn", 62000)]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        listening = {(ns, flags): trio.run_in(ns, "ss", flags) for ns, flags in {(ns, f) for ns, f, _ in wanted}}
        if all(f":{port} " in listening[(ns, flags)] for ns, flags, port in wanted):
            return
        time.sleep(0.05)
    raise RuntimeError("the bench's servers (iperf3, the probes' peers) did not start")


# --- the whole bench -------------------------------------------------------------------


def bench_latency(
    leaves: list[str] | None,
    peers: list[str],
    probe_s: float,
    warm_s: float,
    congestion: str | None = None,
    gso: list[str] | None = None,
) -> dict[str, object]:
    """Every configuration this kernel can run, each in namespaces of its own, one after another: the
    uploads run `warm_s` (slow start, the queues filling), then `probe_s` more while the probes run.

    `leaves`: shapekit's leaves to run (None: each of pfifo, sfq, fq_codel and cake the kernel has).
    `congestion`: the uploads' TCP congestion control (None: the kernel's default).
    `gso`: also run each leaf with each of these gso_max_segs settings ("keep" or a number of segments).
    """
    runs: dict[str, dict[str, object]] = {}
    skipped: dict[str, str] = {}
    notes: dict[str, str] = {}
    with trio_up() as trio:
        runs["idle"] = measure(trio, min(probe_s, 5.0), load=False)
        kernel = os.uname().release
        default_congestion = trio.run_in(trio.a, "sysctl", "-n", "net.ipv4.tcp_congestion_control").strip()
        has = {kind: trio.kernel_has(kind) for kind in ("pfifo", "sfq", "fq_codel", "cake")}
    chosen = leaves if leaves is not None else [leaf for leaf, ok in has.items() if ok]
    for setup in setups(chosen, peers, gso or []):
        with trio_up() as trio:
            missing = [kind for kind in setup.needs if not trio.kernel_has(kind)]
            if missing:
                skipped[setup.name] = f"this kernel has no {missing[0].split()[0]}"
                continue
            if note := setup.apply(trio):
                notes[setup.name] = note
            runs[setup.name] = measure(trio, probe_s, warm_s, congestion=congestion)
    return {
        "kernel": kernel,
        "congestion": congestion or default_congestion,
        "line_mbit": LINE_MBIT,
        "shaped_mbit": shaped_kbit() / 1000,
        "buffer_ms": BUFFER_MS,
        "probe_s": probe_s,
        "torrent_ceil_mbit": TORRENT_CEIL_KBIT / 1000,
        "skipped": skipped,
        "notes": notes,
        "runs": {name: summary(measured) for name, measured in runs.items()},
        "rtt_ms": {name: {probe: r["rtt_ms"] for probe, r in m["probes"].items()} for name, m in runs.items()},
    }


@contextmanager
def trio_up() -> Iterator[Trio]:
    trio = Trio()
    try:
        trio.up()
        yield trio
    finally:
        trio.down()


def summary(measured: dict[str, object]) -> dict[str, object]:
    """p50/p90/p99 and losses per probe; the goodputs and the default class's share of the line."""
    out: dict[str, object] = {
        probe: {**percentiles(r["rtt_ms"]), "samples": len(r["rtt_ms"]), "lost": r["lost"]}
        for probe, r in measured["probes"].items()
    }
    if "torrent_mbit" in measured:
        torrent, default = measured["torrent_mbit"], measured["default_mbit"]
        left = shaped_kbit() / 1000 * PAYLOAD_SHARE - torrent
        out |= {"torrent_mbit": torrent, "default_mbit": default, "default_left_mbit": left}
    return out


def percentiles(rtts: list[float]) -> dict[str, float]:
    if len(rtts) < 2:
        return {"p50": None, "p90": None, "p99": None}
    cuts = statistics.quantiles(rtts, n=100, method="inclusive")
    return {"p50": cuts[49], "p90": cuts[89], "p99": cuts[98]}


def report(result: dict[str, object]) -> str:
    """The table: a row per configuration, p50/p90/p99 per probe in ms, and the goodputs."""
    lines = [
        f"latency under load: {TORRENT_FLOWS} torrent uploads + 1 default, {result['line_mbit']} Mbit/s modem with a "
        f"{result['buffer_ms']} ms buffer, shaped at {result['shaped_mbit']:g} Mbit/s; TCP {result['congestion']}; "
        f"kernel {result['kernel']}",
        "round trips in ms, p50 / p90 / p99; goodput in Mbit/s (default: of what the torrent class left)",
    ]
    rows: list[dict[str, object]] = []
    for name, measured in result["runs"].items():
        row: dict[str, object] = {"config": name}
        for probe in PROBES:
            r = measured[probe]
            times = "-" if r["p50"] is None else f"{r['p50']:.1f} / {r['p90']:.1f} / {r['p99']:.1f}"
            row[probe] = times + (f" ({r['lost']} lost)" if r["lost"] else "")
        if "torrent_mbit" in measured:
            row["torrent_mbit"] = f"{measured['torrent_mbit']:.2f}"
            row["default_mbit"] = f"{measured['default_mbit']:.2f} of {measured['default_left_mbit']:.2f}"
        rows.append(row)
    goodputs = [("torrent_mbit", "torrent Mbit/s", ""), ("default_mbit", "default Mbit/s", "")]
    lines.append(table(rows, [(key, key, "") for key in ("config", *PROBES)] + goodputs))
    lines += [f"  {name}: skipped, {why}" for name, why in result["skipped"].items()]
    lines += [f"  {name}: {note}" for name, note in result.get("notes", {}).items()]
    return "\n".join(lines)


def plot(result: dict[str, object], path: Path) -> None:
    """RTT CDFs, a panel per probe, a curve per configuration (log time axis): the curves bufferbloat work
    compares. matplotlib is the bench's own extra (pip install -e .[bench])."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, grid = pyplot.subplots(2, 3, figsize=(15, 8.5))
    axes = list(grid.flat)
    for axis, probe in zip(axes, PROBES, strict=False):
        for name, probes in result["rtt_ms"].items():
            rtts = sorted(probes[probe])
            if rtts:
                axis.plot(rtts, [(i + 1) / len(rtts) for i in range(len(rtts))], label=name, linewidth=1.4)
        axis.set_xscale("log")
        axis.set_title(probe)
        axis.set_xlabel("round trip, ms")
        axis.set_ylabel("share of probes at most")
        axis.grid(True, which="both", alpha=0.3)
    axes[-1].axis("off")
    axes[-1].legend(*axes[0].get_legend_handles_labels(), loc="center", fontsize="medium", title="configuration")
    figure.suptitle(
        f"{TORRENT_FLOWS} torrent uploads + 1 default through a {result['line_mbit']} Mbit/s modem with a "
        f"{result['buffer_ms']} ms buffer; TCP {result.get('congestion', '?')}; kernel {result['kernel']}"
    )
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    pyplot.close(figure)


def fetch_peers() -> None:
    """Unpack the peers now (the distro-kernel guest has no network: tests/distro/run calls this first)."""
    fireqos_program()
    unpacked("wondershaper")


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["fetch"]:
        sys.exit(
            "usage: bench/latency.py fetch   (unpacks FireQOS and wondershaper into bench/.peers; bench.py runs it)"
        )
    fetch_peers()
