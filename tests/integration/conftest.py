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
from pathlib import Path

import pytest
from netns import Namespace, NetPair, sh

REQUIRED = ("ip", "tc", "iperf3", "unshare")


def pytest_collection_modifyitems(config, items):
    missing = [tool for tool in REQUIRED if shutil.which(tool) is None]
    reason = None
    if os.geteuid() != 0:
        reason = "real-kernel tests need root (they make network namespaces)"
    elif missing:
        reason = f"real-kernel tests need {', '.join(missing)} (./run-tests installs them)"
    for item in items:
        if "tests/integration" in str(item.fspath):
            item.add_marker(pytest.mark.kernel)
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))


def _delete_namespace(name: str) -> None:
    pids = sh("ip", "netns", "pids", name, check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    sh("ip", "netns", "del", name, check=False)


@pytest.fixture
def netpair(tmp_path: Path):
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
        env = {**os.environ, "SHAPEKIT_STATE_DIR": str(tmp_path / "state")}
        env.pop("SHAPEKIT_CONFIG", None)
        yield NetPair(left=left, right=right, workdir=tmp_path, env=env)
    finally:
        for ns in (left, right):
            _delete_namespace(ns.name)
