"""The init scripts and hotplug hooks, run for real against a namespace's device."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from netns import sh

REPO = Path(__file__).resolve().parents[2]
INIT = REPO / "init"
CONFIG = """
[device.DEV]
rate = "100mbit"
default = "bulk"
leaf = "pfifo"
classifier = "classify"

[device.DEV.classes.bulk]
rate = "2mbit"

[device.DEV.limits]
"198.18.0.2" = "1mbit"

[bypass]
ports = ["22/tcp"]

[[mark]]
class = "bulk"
proto = "udp"
dport = 53
"""


BOOT = ("shape-init", "shape-bypass", "shape-mark", "shape-limit-ip")
INGRESS = """
[device.DEV.ingress]
rate = "40mbit"
default = "bulk_in"
leaf = "pfifo"

[device.DEV.ingress.classes.bulk_in]
rate = "2mbit"

[[mark]]
class = "bulk_in"
direction = "in"
proto = "tcp"
sport = "5900:5999"

[device.DEV.limits."198.18.0.3"]
rate = "2mbit"
direction = "both"
"""


@pytest.fixture
def env(netpair):
    """What the scripts need to find shapekit (the checkout's bin/), its config and state."""
    config = netpair.write_config(CONFIG)
    netpair.env.update(SHAPEKIT_BIN=str(REPO / "bin"), SHAPEKIT_CONFIG=str(config))
    return netpair


def run_in(netpair, *argv: str, extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["ip", "netns", "exec", netpair.left.name, *argv],
        capture_output=True,
        text=True,
        env={**netpair.env, **(extra or {})},
        timeout=120,
    )


def live(netpair) -> bool:
    return netpair.shapekit("shape-init", "--check", check=False).returncode == 0


def has_tree(netpair) -> bool:
    return any(q["kind"] == "htb" and q["handle"] == "5c:" for q in netpair.qdiscs())


def kernel_state(netpair) -> dict[str, object]:
    """What the boot leaves: both trees and the redirect (tc), the chains of each family, the sets."""
    ifb = f"ifb-{netpair.dev}"
    # u32 numbers the table of each pref it is given anew (800:, 801:, ...): the order of changes, not what they do.
    tc = [
        re.sub(
            r"\b(fh|ht) 8[0-9a-f]{2}\b",
            r"\1 8xx",
            netpair.left.run("tc", "-d", kind, "show", "dev", dev, *where).stdout,
        )
        for dev, where in ((netpair.dev, ()), (netpair.dev, ("ingress",)), (ifb, ()))
        for kind in ("qdisc", "class", "filter")
        if not (where and kind == "class")
    ]
    # A set's hash seed (initval) is drawn anew each time it is made.
    sets = sorted(
        re.sub(r" initval 0x[0-9a-f]+", "", line) for line in netpair.left.run("ipset", "save").stdout.splitlines()
    )
    return {"tc": tc, "v4": netpair.save(), "v6": netpair.save("ip6tables-save"), "sets": sets}


def test_all_leaves_the_kernel_as_the_four_boot_commands_do(env):
    env.write_config(CONFIG.replace("[device.DEV.limits]", INGRESS + "\n[device.DEV.limits]"))
    env.shapekit("shape-init")
    env.shapekit("shape-limit-ip", "add", "198.18.0.7", "3mbit", "--comment", "run-time")
    env.shapekit("shape-bypass", "add", "8080/tcp")
    for command in BOOT:
        env.shapekit(command)
    four = kernel_state(env)

    env.shapekit("shape-flush")
    assert not has_tree(env)
    env.shapekit("shape-init", "--all")
    once = kernel_state(env)
    env.shapekit("shape-init", "--all")  # again, as at a reload

    assert once == four
    assert kernel_state(env) == four
    assert "198.18.0.7" in "".join(four["sets"]) and "ifb-" in four["tc"][4]  # it held a run-time cap and an IFB
    assert live(env)
    assert 0.90 <= env.goodput(to=env.right.addr4) / 1_000_000 <= 1.0  # the config's cap holds


@pytest.mark.parametrize("boot", [("shape-init --all",), BOOT], ids=["all", "four-commands"])
def test_a_device_away_at_boot_gets_its_tree_and_caps_when_it_comes(env, boot):
    later, later_peer = env.dev[:-1] + "x", env.right.dev[:-1] + "x"
    env.write_config(CONFIG + f'\n[device.{later}]\nrate = "100mbit"\nleaf = "pfifo"\nclassifier = "classify"\n'
                     f'[device.{later}.limits]\n"198.19.0.2" = "1mbit"\n')  # fmt: skip

    for command in boot:  # shape-init skips the device that is not there, as at boot
        args = command.split() + (["--skip-absent"] if command.startswith("shape-init") else [])
        env.shapekit(*args)
    sh(
        "ip",
        "link",
        "add",
        later,
        "netns",
        env.left.name,
        "type",
        "veth",
        "peer",
        "name",
        later_peer,
        "netns",
        env.right.name,
    )
    env.left.run("ip", "addr", "add", "198.19.0.1/24", "dev", later)
    env.right.run("ip", "addr", "add", "198.19.0.2/24", "dev", later_peer)
    env.left.run("ip", "link", "set", later, "up")
    env.right.run("ip", "link", "set", later_peer, "up")
    hooked = run_in(env, str(INIT / "ifupdown" / "shapekit"), extra={"IFACE": later, "MODE": "start"})

    assert hooked.returncode == 0, hooked.stderr
    assert live(env)  # both trees, the chains naming both devices' sets, both caps' entries
    assert 0.90 <= env.goodput(to="198.19.0.2") / 1_000_000 <= 1.0  # the cap of the device that came later holds


def test_sysv_script_start_status_reload_stop_status(env):
    script = str(INIT / "sysv" / "shapekit")

    started = run_in(env, script, "start")
    status_live = run_in(env, script, "status")
    reloaded = run_in(env, script, "reload")
    after_reload = live(env)
    stopped = run_in(env, script, "stop")
    status_stopped = run_in(env, script, "status")

    assert started.returncode == 0, started.stdout + started.stderr
    assert status_live.returncode == 0, status_live.stdout + status_live.stderr
    assert reloaded.returncode == 0 and after_reload
    assert stopped.returncode == 0 and not has_tree(env)
    assert status_stopped.returncode == 3
    assert "shapekit's tree is missing" in status_stopped.stdout


def test_sysv_status_sees_drift(env):
    script = str(INIT / "sysv" / "shapekit")
    run_in(env, script, "start")

    env.left.run("tc", "class", "del", "dev", env.dev, "classid", "5c:10")

    result = run_in(env, script, "status")
    assert result.returncode == 3
    assert f"{env.dev}: class 5c:10 is missing" in result.stdout


OPENRC_DIRS = "started starting stopping inactive wasinactive exclusive daemons options scheduled failed hotplugged tmp"


def openrc(netpair, service_dir: Path, *actions: str) -> list[subprocess.CompletedProcess]:
    """Run the OpenRC script in a private mount namespace whose /run/openrc is a fresh tmpfs."""
    results = []
    for action in actions:
        script = (
            "mkdir -p /run/openrc && mount -t tmpfs shapekit-test /run/openrc && cd /run/openrc && "
            f"mkdir -p {OPENRC_DIRS} && touch softlevel && "
            # OpenRC keeps its 'started' state in /run/openrc: carry it between the actions.
            f"cp -a {service_dir}/state/. /run/openrc/ 2>/dev/null; "
            f"{service_dir}/init.d/shapekit {action}; rc=$?; "
            f"rm -rf {service_dir}/state; cp -a /run/openrc {service_dir}/state; exit $rc"
        )
        results.append(run_in(netpair, "unshare", "--mount", "sh", "-c", script))
    return results


@pytest.mark.skipif(shutil.which("openrc-run") is None, reason="needs openrc (./run-tests installs it)")
def test_openrc_script_start_status_reload_stop_status(env):
    service_dir = env.workdir / "openrc"
    (service_dir / "init.d").mkdir(parents=True)
    (service_dir / "conf.d").mkdir()
    shutil.copy(INIT / "openrc" / "shapekit", service_dir / "init.d" / "shapekit")
    # OpenRC passes no environment to services: settings go in conf.d, as on a real system.
    (service_dir / "conf.d" / "shapekit").write_text(
        f"SHAPEKIT_BIN={REPO / 'bin'}\nSHAPEKIT_CONFIG={env.env['SHAPEKIT_CONFIG']}\n"
        f"SHAPEKIT_STATE_DIR={env.env['SHAPEKIT_STATE_DIR']}\n"
    )

    started, status_live = openrc(env, service_dir, "start", "status")
    was_live = live(env)
    reloaded, stopped, status_stopped = openrc(env, service_dir, "reload", "stop", "status")

    assert started.returncode == 0, started.stdout + started.stderr
    assert status_live.returncode == 0 and was_live, status_live.stdout + status_live.stderr
    assert reloaded.returncode == 0, reloaded.stdout + reloaded.stderr
    assert stopped.returncode == 0 and not has_tree(env), stopped.stdout + stopped.stderr
    assert status_stopped.returncode == 3, status_stopped.stdout + status_stopped.stderr


def test_if_up_hook_applies_a_configured_device_and_ignores_others(env):
    hook = str(INIT / "ifupdown" / "shapekit")

    other = run_in(env, hook, extra={"IFACE": "lo", "MODE": "start"})
    unconfigured = run_in(env, hook, extra={"IFACE": "sknotconfigured", "MODE": "start"})
    assert other.returncode == 0 and unconfigured.returncode == 0, unconfigured.stderr
    assert not has_tree(env)

    configured = run_in(env, hook, extra={"IFACE": env.dev, "MODE": "start", "PHASE": "post-up"})
    assert configured.returncode == 0, configured.stderr
    assert has_tree(env)


def test_a_deleted_and_recreated_device_gets_its_tree_back_through_the_hook(env):
    for command in ("shape-init", "shape-bypass", "shape-mark", "shape-limit-ip"):
        env.shapekit(command)
    assert live(env)

    env.left.run("ip", "link", "del", env.dev)
    sh(
        "ip",
        "link",
        "add",
        env.dev,
        "netns",
        env.left.name,
        "type",
        "veth",
        "peer",
        "name",
        env.right.dev,
        "netns",
        env.right.name,
    )
    env.left.run("ip", "addr", "add", f"{env.left.addr4}/24", "dev", env.dev)
    env.right.run("ip", "addr", "add", f"{env.right.addr4}/24", "dev", env.right.dev)
    env.left.run("ip", "link", "set", env.dev, "up")
    env.right.run("ip", "link", "set", env.right.dev, "up")
    assert not has_tree(env) and not live(env)

    hooked = run_in(env, str(INIT / "ifupdown" / "shapekit"), extra={"IFACE": env.dev, "MODE": "start"})

    assert hooked.returncode == 0, hooked.stderr
    assert live(env)  # the tree, its cap class, and the chains and sets that stayed
    assert 0.90 <= env.goodput(to=env.right.addr4) / 1_000_000 <= 1.0  # the cap holds again


def test_networkmanager_dispatcher_applies_on_up_only(env):
    script = str(INIT / "networkmanager" / "50-shapekit")

    down = run_in(env, script, env.dev, "down")
    unconfigured = run_in(env, script, "wlan9", "up")
    assert down.returncode == 0 and unconfigured.returncode == 0 and not has_tree(env)

    up = run_in(env, script, env.dev, "up")
    assert up.returncode == 0, up.stderr
    assert has_tree(env)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd (./run-tests installs it)")
@pytest.mark.parametrize(
    "unit",
    [
        "shapekit.service",
        "shapekit@.service",
        "shapekit-metrics.service",
        "shapekit-metrics.timer",
        "shapekit-drift.service",
        "shapekit-drift.timer",
    ],
)
def test_systemd_units_verify(tmp_path, unit):
    # The units name the installed commands; point them at this checkout's bin/ so that
    # systemd-analyze finds every ExecStart executable.
    for each in (INIT / "systemd").iterdir():  # all of them: the timer names its service
        (tmp_path / each.name).write_text(each.read_text().replace("/usr/local/sbin/", f"{REPO}/bin/"))

    result = sh("systemd-analyze", "verify", str(tmp_path / unit), check=False)

    assert result.returncode == 0, result.stderr
    assert "Unknown" not in result.stderr and "not executable" not in result.stderr, result.stderr


def test_install_places_the_commands_config_and_init_files(tmp_path):
    dest = tmp_path / "root"

    result = subprocess.run(
        [str(INIT / "install"), "systemd", "openrc", "ifupdown", "networkmanager"],
        env={**os.environ, "DESTDIR": str(dest)},
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert result.returncode == 0, result.stderr
    for path in (
        "etc/shapekit/shapekit.toml",
        "etc/systemd/system/shapekit.service",
        "etc/systemd/system/shapekit@.service",
        "etc/systemd/system/shapekit-metrics.service",
        "etc/systemd/system/shapekit-metrics.timer",
        "etc/systemd/system/shapekit-drift.service",
        "etc/systemd/system/shapekit-drift.timer",
        "etc/init.d/shapekit",
        "etc/network/if-up.d/shapekit",
        "etc/NetworkManager/dispatcher.d/50-shapekit",
    ):
        assert (dest / path).is_file(), path
    assert (dest / "usr/local/sbin/shape-limit-ip").readlink() == Path("/opt/shapekit/bin/shape-limit-ip")
    version = sh(str(dest / "opt/shapekit/bin/shape-init"), "--version")
    assert version.stdout.startswith("shapekit ")
    assert (dest / "etc/shapekit/shapekit.toml").stat().st_mode & 0o777 == 0o644
    man = dest / "usr/local/share/man"
    for page in ("man8/shape-init.8", "man8/shape-limit-ip.8", "man8/shape-limit-ip-remove.8", "man5/shapekit.toml.5"):
        assert (man / page).is_file(), page
    shown = sh("man", "-l", str(man / "man8/shape-limit-ip-remove.8")).stdout
    assert "shape-limit-ip remove" in shown and "--dev" in shown
    completions = dest / "usr/local/share/bash-completion/completions"
    commands = (
        "shape-init",
        "shape-mark",
        "shape-bypass",
        "shape-limit-ip",
        "shape-flush",
        "shape-status",
        "shape-import",
    )
    for command in commands:
        assert (completions / command).read_text() == (INIT / "bash-completion").read_text(), command
        assert (dest / "usr/local/sbin" / command).readlink() == Path(f"/opt/shapekit/bin/{command}")


def test_the_benchmark_script_runs(tmp_path):
    """Benchmarks are not tests: this only keeps bench/bench.py working, at a tiny N."""
    result = subprocess.run(
        # latency has a test of its own (test_kernel_latency.py), which runs it longer
        [
            sys.executable,
            str(REPO / "bench" / "bench.py"),
            "all",
            "--quick",
            "--skip",
            "latency",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )

    assert result.returncode == 0, result.stderr[-2000:]
    for name in ("apply", "add", "packet", "tcconfig", "ingress", "metrics"):
        assert json.loads((tmp_path / f"{name}.json").read_text())
    assert "seed/shapekit" in result.stdout
    tcconfig = json.loads((tmp_path / "tcconfig.json").read_text())
    # tcset really ran here (no lsmod on its PATH) and built each rule's class and filter as asked.
    assert (tcconfig.get("runs"), tcconfig.get("as_asked"), tcconfig.get("u32_filters")) == (True, True, 3), tcconfig


def test_the_add_against_a_revision_script_runs():
    """bench/add_against.py, at a tiny N against HEAD: it runs both, prints a ratio, and leaves no worktree."""
    worktrees = subprocess.run(["git", "-C", str(REPO), "worktree", "list"], capture_output=True, text=True).stdout
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "add_against.py"), "HEAD", "--caps", "5", "--rounds", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert result.returncode == 0, result.stderr[-2000:]
    assert "5 caps, HEAD: median" in result.stdout and "ratio this checkout / HEAD: " in result.stdout
    assert (
        subprocess.run(["git", "-C", str(REPO), "worktree", "list"], capture_output=True, text=True).stdout == worktrees
    )
