#!/usr/bin/env python3
"""Latency probes for `bench.py latency`, one process each, run inside a bench namespace.

    probe.py serve-tcp PORT                 # echo every byte back (the ssh and torrent probes' peer)
    probe.py serve-udp PORT                 # echo every datagram back (the DNS probe's peer)
    probe.py rr-tcp HOST PORT AT SECONDS    # 64-byte request, wait for its echo, on one connection
    probe.py rr-udp HOST PORT AT SECONDS    # a DNS-sized (40-byte) datagram, wait for its echo
    probe.py connect HOST PORT AT SECONDS   # a new TCP connection each time: connect()'s time

A client connects at once (rr-tcp: the connection exists before the load, as
an ssh session or a torrent peer's would), then from the time AT (seconds
since the epoch) sends one probe every INTERVAL seconds for SECONDS, and
prints JSON: {"rtt_ms": [...], "lost": N}. A probe unanswered within
TIMEOUT is lost. One process per probe, so no probe waits for another's turn
at the GIL.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from collections.abc import Iterator

INTERVAL = 0.02
TIMEOUT = 15.0  # long enough for a round trip through a 1000-packet queue at 1 Mbit/s


def serve_tcp(port: int) -> None:
    listener = socket.create_server(("", port), reuse_port=True, backlog=256)
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=_echo, args=(conn,), daemon=True).start()


def _echo(conn: socket.socket) -> None:
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with conn:
        while data := conn.recv(4096):
            conn.sendall(data)


def serve_udp(port: int) -> None:
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("", port))
    while True:
        data, peer = server.recvfrom(2048)
        server.sendto(data, peer)


def _connected(host: str, port: int) -> socket.socket:
    """A connection to a peer that may still be starting."""
    deadline = time.monotonic() + 5
    while True:
        try:
            conn = socket.create_connection((host, port), timeout=TIMEOUT)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
            continue
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn


def rr_tcp(host: str, port: int, at: float, seconds: float) -> dict[str, object]:
    conn = _connected(host, port)
    request = b"x" * 64
    rtts: list[float] = []
    lost = 0
    for _ in _ticks(at, seconds):
        start = time.perf_counter()
        conn.sendall(request)
        got = 0
        try:
            while got < len(request):
                if not (data := conn.recv(len(request) - got)):
                    raise ConnectionResetError("the peer closed the connection")
                got += len(data)
        except (TimeoutError, ConnectionError):
            lost += 1  # the stream is now out of step, or gone: start a new connection
            conn.close()
            conn = _connected(host, port)
            continue
        rtts.append((time.perf_counter() - start) * 1000)
    conn.close()
    return {"rtt_ms": rtts, "lost": lost}


def rr_udp(host: str, port: int, at: float, seconds: float) -> dict[str, object]:
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.settimeout(TIMEOUT)
    client.connect((host, port))
    rtts: list[float] = []
    lost = 0
    for n, _ in enumerate(_ticks(at, seconds)):
        request = n.to_bytes(8, "big") + b"q" * 32
        start = time.perf_counter()
        client.send(request)
        try:
            while client.recv(2048) != request:  # a late answer to an earlier probe
                pass
        except (TimeoutError, ConnectionRefusedError):
            lost += 1
            continue
        rtts.append((time.perf_counter() - start) * 1000)
    return {"rtt_ms": rtts, "lost": lost}


def connect(host: str, port: int, at: float, seconds: float) -> dict[str, object]:
    _connected(host, port).close()  # the server is up
    rtts: list[float] = []
    lost = 0
    for _ in _ticks(at, seconds):
        start = time.perf_counter()
        try:
            conn = socket.create_connection((host, port), timeout=TIMEOUT)
        except OSError:
            lost += 1
            continue
        rtts.append((time.perf_counter() - start) * 1000)
        conn.close()
    return {"rtt_ms": rtts, "lost": lost}


def _ticks(at: float, seconds: float) -> Iterator[float]:
    """From the time `at`, a probe every INTERVAL for `seconds`; one that came back late is followed at once,
    never by a burst."""
    if (wait := at - time.time()) > 0:
        time.sleep(wait)
    end = time.monotonic() + seconds
    due = time.monotonic()
    while due < end:
        if (delay := due - time.monotonic()) > 0:
            time.sleep(delay)
        yield due
        due = max(due + INTERVAL, time.monotonic())


def main() -> None:
    kind, *args = sys.argv[1:]
    if kind == "serve-tcp":
        serve_tcp(int(args[0]))
    elif kind == "serve-udp":
        serve_udp(int(args[0]))
    else:
        client = {"rr-tcp": rr_tcp, "rr-udp": rr_udp, "connect": connect}[kind]
        print(json.dumps(client(args[0], int(args[1]), float(args[2]), float(args[3]))))


if __name__ == "__main__":
    main()
