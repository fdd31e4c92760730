"""Real-kernel fixtures: each test gets namespaces and a veth pair of its own, deleted even on failure.

Everything happens inside namespaces the fixture creates, with addresses
from 198.18.0.0/15 and fd00::/8; the host's own namespace is never touched.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from netns import Namespace, NetPair, sh

REQUIRED = ("ip", "tc", "iperf3", "unshare")
# Set by tests/distro/guest-init: this run is inside Debian's kernel, where every test must run.
IN_DISTRO_GUEST = os.environ.get("SHAPEKIT_DISTRO_GUEST") == "1"
# How to tell whether the kernel has a module a `distro_kernel` test needs: tc batch lines on
# `lo` of a scratch namespace that succeed only when it is there.
MODULE_PROBES = {
    "sch_sfq": ("qdisc add dev lo root sfq",),
    "sch_fq_codel": ("qdisc add dev lo root fq_codel",),
    "sch_cake": ("qdisc add dev lo root cake",),
    "cls_fw": (
        "qdisc add dev lo root handle 1: htb",
        "filter add dev lo parent 1: protocol all prio 1 handle 1 fw flowid 1:1",
    ),
}


def kernel_has(module: str) -> bool:
    batch = "".join(line + "\n" for line in MODULE_PROBES[module])
    return sh("unshare", "--net", "tc", "-batch", "-", stdin=batch, check=False).returncode == 0


def pytest_collection_modifyitems(config, items):
    missing = [tool for tool in REQUIRED if shutil.which(tool) is None]
    reason = None
    if os.geteuid() != 0:
        reason = "real-kernel tests need root (they make network namespaces)"
    elif missing:
        reason = f"real-kernel tests need {', '.join(missing)} (./run-tests installs them)"
    has: dict[str, bool] = {}
    for item in items:
        if "tests/integration" not in str(item.fspath):
            continue
        item.add_marker(pytest.mark.kernel)
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))
            continue
        marker = item.get_closest_marker("distro_kernel")
        lacking = [m for m in (marker.args if marker else ()) if not has.setdefault(m, kernel_has(m))]
        if lacking:
            item.add_marker(
                pytest.mark.skip(
                    reason=f"this kernel lacks {', '.join(lacking)}: the distro-kernel lane runs it (tests/distro/run)"
                )
            )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Inside the distro-kernel guest a skip is a failure: the lane exists to run these tests."""
    outcome = yield
    report = outcome.get_result()
    if IN_DISTRO_GUEST and report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped inside the distro-kernel guest, where every test must run: {reason}"


def _delete_namespace(name: str) -> None:
    pids = sh("ip", "netns", "pids", name, check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    sh("ip", "netns", "del", name, check=False)


@pytest.fixture
def netpair(tmp_path: Path) -> Iterator[NetPair]:
    with make_netpair(tmp_path) as pair:
        yield pair


@contextlib.contextmanager
def make_netpair(workdir: Path) -> Iterator[NetPair]:
    """Two fresh namespaces joined by a veth pair, deleted on the way out, even on failure."""
    token = secrets.token_hex(3)
    left = Namespace(f"sk-{token}-l", f"sk{token}l", "198.18.0.1", "fd00:5c::1")
    right = Namespace(f"sk-{token}-r", f"sk{token}r", "198.18.0.2", "fd00:5c::2")
    try:
        for ns in (left, right):
            sh("ip", "netns", "add", ns.name)
        sh(
            "ip",
            "link",
            "add",
            left.dev,
            "netns",
            left.name,
            "type",
            "veth",
            "peer",
            "name",
            right.dev,
            "netns",
            right.name,
        )
        for ns in (left, right):
            ns.run("ip", "link", "set", "lo", "up")
            ns.run("ip", "addr", "add", f"{ns.addr4}/24", "dev", ns.dev)
            ns.run("ip", "-6", "addr", "add", f"{ns.addr6}/64", "dev", ns.dev, "nodad")
            ns.run("ip", "link", "set", ns.dev, "up")
        env = {**os.environ, "SHAPEKIT_STATE_DIR": str(workdir / "state")}
        env.pop("SHAPEKIT_CONFIG", None)
        yield NetPair(left=left, right=right, workdir=workdir, env=env)
    finally:
        for ns in (left, right):
            _delete_namespace(ns.name)
