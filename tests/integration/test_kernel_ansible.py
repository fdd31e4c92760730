"""The Ansible collection (contrib/ansible) against a real kernel: ansible-playbook, connection local,
run inside a test namespace (`ip netns exec`), so that its modules drive shapekit's commands there.

The collection is installed as a user would install it (`ansible-galaxy collection install
contrib/ansible`). Results are read as `register` keeps them; one test reads what a person sees with --check --diff.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import make_netpair
from faults import make_faults
from netns import NetPair, script

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

CONFIG = """\
[device.DEV]
rate = "100mbit"
default = "normal"
leaf = "pfifo"
classifier = "classify"   # this kernel has no cls_fw

[device.DEV.classes.normal]
rate = "50mbit"

[device.DEV.classes.high]
rate = "20mbit"
prio = 0
"""
BAD_CONFIG = CONFIG.replace('rate = "20mbit"', 'rate = "20mb"')


@pytest.fixture(scope="module")
def collections(tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = tmp_path_factory.mktemp("collections")
    galaxy = [str(BIN / "ansible-galaxy"), "collection", "install", str(REPO / "contrib" / "ansible"), "-p", str(where)]
    subprocess.run(galaxy, check=True, capture_output=True, text=True)
    return where


@pytest.fixture
def edge(tmp_path: Path, collections: Path) -> Iterator[Edge]:
    with make_netpair(tmp_path) as pair:
        yield Edge(pair, collections)


class Edge:
    """One managed host: a test namespace that ansible-playbook runs in, with connection local."""

    def __init__(self, pair: NetPair, collections: Path) -> None:
        self.pair = pair
        self.dest = pair.workdir / "etc" / "shapekit.toml"
        self.files = pair.workdir / "files"
        self.files.mkdir()
        self.env = {
            **pair.env,
            "ANSIBLE_COLLECTIONS_PATH": str(collections),
            "ANSIBLE_LOCAL_TEMP": str(pair.workdir / "ansible-local"),
            "ANSIBLE_REMOTE_TEMP": str(pair.workdir / "ansible-remote"),
            "ANSIBLE_NOCOLOR": "1",
            "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",  # shape-init and friends, as init/install links them
        }

    def playbook(self, tasks: list[dict], *options: str) -> str:
        """ansible-playbook on this host with these tasks; its stdout, as a person reads it."""
        play = [{"hosts": "localhost", "gather_facts": False, "tasks": tasks}]
        path = self.pair.workdir / "site.yml"
        path.write_text(json.dumps(play))  # JSON is YAML
        argv = ["ip", "netns", "exec", self.pair.left.name, str(BIN / "ansible-playbook"), "-i", "localhost,"]
        argv += ["-c", "local", "-e", f"ansible_python_interpreter={sys.executable}", *options, str(path)]
        ran = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=120, cwd=self.pair.workdir)
        assert "PLAY RECAP" in ran.stdout, ran.stdout + ran.stderr  # it ran, whatever its tasks did
        return ran.stdout

    def run(self, tasks: list[dict], *options: str) -> list[dict]:
        """Each task's result, as `register` keeps it (ansible-core has no JSON callback of its own): every
        task goes on after a failure, and a last task writes the results out, in check mode too."""
        results = self.pair.workdir / "results.json"
        results.unlink(missing_ok=True)
        kept = [{**task, "register": f"result_{n}", "ignore_errors": True} for n, task in enumerate(tasks)]
        names = ", ".join(f"result_{n}" for n in range(len(tasks)))
        write = {"ansible.builtin.copy": {"dest": str(results), "content": f"{{{{ [{names}] | to_json }}}}"},
                 "check_mode": False, "diff": False}  # fmt: skip
        self.playbook([*kept, write], *options)
        return json.loads(results.read_text())

    def config_task(self, text: str | None = None, **args: object) -> dict:
        if text is not None:
            (self.files / "shapekit.toml").write_text(text.replace("DEV", self.pair.dev))
            args["src"] = str(self.files / "shapekit.toml")
        return {"shapekit.shapekit.config": {"dest": str(self.dest), **args}}

    def cap_task(self, **args: object) -> dict:
        return {"shapekit.shapekit.cap": {"config": str(self.dest), **args}}

    def cap_class(self, classid: str) -> str:
        """The cap's class line as tc shows it (its rate)."""
        lines = self.tc("class", "show", "dev", self.pair.dev).splitlines()
        return next((line for line in lines if f" {classid} " in line), "")

    def tc(self, *argv: str) -> str:
        return self.pair.left.run("tc", *argv).stdout

    def shapekit(self, command: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["ip", "netns", "exec", self.pair.left.name, script(command), *argv, "--config", str(self.dest)],
            env=self.pair.env,
            capture_output=True,
            text=True,
            check=check,
        )


def test_config_check_mode_diff_apply_second_run_and_absent(edge):
    # Check mode on a fresh host: it would change, shows both diffs, and changes nothing.
    (checked,) = edge.run([edge.config_task(CONFIG)], "--check", "--diff")
    assert checked["changed"] is True and not checked.get("failed"), checked
    file_diff, kernel_diff = checked["diff"]
    assert file_diff["before"] == "" and file_diff["after"] == CONFIG.replace("DEV", edge.pair.dev)
    assert f"tc qdisc add dev {edge.pair.dev} root handle 5c: htb" in kernel_diff["after"]
    assert checked["kernel_differences"]
    assert not edge.dest.exists() and "htb" not in edge.tc("qdisc", "show", "dev", edge.pair.dev)

    (applied,) = edge.run([edge.config_task(CONFIG)])
    assert applied["changed"] is True and not applied.get("failed"), applied
    assert edge.dest.read_text() == CONFIG.replace("DEV", edge.pair.dev)
    assert "qdisc htb 5c: root" in edge.tc("qdisc", "show", "dev", edge.pair.dev)
    assert edge.shapekit("shape-init", "--check").returncode == 0

    # The second run, and its check mode: nothing to do.
    (again,) = edge.run([edge.config_task(CONFIG)])
    (again_checked,) = edge.run([edge.config_task(CONFIG)], "--check", "--diff")
    assert again["changed"] is False and again_checked["changed"] is False, (again, again_checked)

    # A change the kernel does not see (a comment) writes the file and leaves the tree alone.
    stats_before = edge.tc("-s", "class", "show", "dev", edge.pair.dev)
    edge.pair.left.run("ping", "-c", "3", "-i", "0.2", "-q", edge.pair.right.addr4)
    (commented,) = edge.run([edge.config_task("# edge uplinks\n" + CONFIG)])
    assert commented["changed"] is True and commented["script"] == "", commented
    assert edge.dest.read_text().startswith("# edge uplinks\n")
    stats_after = edge.tc("-s", "class", "show", "dev", edge.pair.dev)
    assert (
        stats_after != stats_before and "Sent 0 bytes" not in stats_after.split("class htb 5c:1 ")[1].split("class")[0]
    )

    # absent: check mode changes nothing; then flush and the file goes; then nothing to do.
    (absent_checked,) = edge.run([edge.config_task(state="absent")], "--check")
    assert absent_checked["changed"] is True and edge.dest.exists()
    assert "htb" in edge.tc("qdisc", "show", "dev", edge.pair.dev)
    (absent,) = edge.run([edge.config_task(state="absent")])
    assert absent["changed"] is True and not edge.dest.exists()
    assert "htb" not in edge.tc("qdisc", "show", "dev", edge.pair.dev)
    (absent_again,) = edge.run([edge.config_task(state="absent")])
    assert absent_again["changed"] is False


def test_bad_config_fails_with_shapekits_line_and_changes_nothing(edge):
    edge.run([edge.config_task(CONFIG)])
    qdiscs = edge.tc("qdisc", "show", "dev", edge.pair.dev)
    classes = edge.tc("class", "show", "dev", edge.pair.dev)

    (failed,) = edge.run([edge.config_task(BAD_CONFIG)])
    assert failed["failed"] is True and failed["changed"] is False
    assert failed["rc"] == 2
    assert failed["msg"] == (
        f"shape-init: {edge.dest} (new): device.{edge.pair.dev}.classes.high.rate: '20mb' is ambiguous: "
        "write '20mbit' (mbits/s) or '20mbps' (mbytes/s)"
    )
    assert edge.dest.read_text() == CONFIG.replace("DEV", edge.pair.dev)
    assert edge.tc("qdisc", "show", "dev", edge.pair.dev) == qdiscs
    assert edge.tc("class", "show", "dev", edge.pair.dev) == classes


def test_cap_add_repeat_rerate_and_remove(edge):
    edge.run([edge.config_task(CONFIG)])
    host = "198.18.0.2"
    cap = {"host": host, "rate": "128kbit", "for": "2h", "comment": "ticket 4711"}

    (checked,) = edge.run([edge.cap_task(**cap)], "--check", "--diff")
    assert checked["changed"] is True and checked["caps"] == []
    assert checked["diff"]["after"].startswith(f"{host} out 128kbit dev ")
    assert json.loads(edge.shapekit("shape-limit-ip", "list", "--json").stdout) == []

    (added,) = edge.run([edge.cap_task(**cap)], "--diff")
    assert added["changed"] is True
    (listed,) = json.loads(edge.shapekit("shape-limit-ip", "list", "--json").stdout)
    assert (listed["host"], listed["rate"], listed["direction"], listed["comment"]) == (
        host,
        "128kbit",
        "out",
        "ticket 4711",
    )
    assert listed["expires"] and listed["dev"] == edge.pair.dev
    assert edge.shapekit("shape-init", "--check").returncode == 0
    assert "rate 128Kbit" in edge.cap_class(listed["classid"])

    # The same cap again, written another way (the unit's case, a /32): nothing to do.
    (repeated,) = edge.run([edge.cap_task(**{**cap, "host": f"{host}/32", "rate": "128Kbit"})])
    assert repeated["changed"] is False, repeated

    # A decimal rate, then the same in other units: nothing to do (compared exactly, not as floats).
    rerated, same = edge.run(
        [edge.cap_task(**{**cap, "rate": "4.1mbit"}), edge.cap_task(**{**cap, "rate": "4100kbit"})]
    )
    assert rerated["changed"] is True and same["changed"] is False, (rerated, same)
    assert [c["rate"] for c in rerated["caps"]] == ["4100kbit"]
    assert "rate 4100Kbit" in edge.cap_class(listed["classid"])

    # Bad input fails with shapekit's line and changes nothing, in check mode too.
    checked_bad = {"check_mode": True}
    bad_rate, bad_for, bad_host = edge.run(
        [
            {**edge.cap_task(**{**cap, "rate": "20mb"}), **checked_bad},
            edge.cap_task(**{**cap, "for": ""}),
            edge.cap_task(host="198.18.0.300", rate="1mbit"),
        ]
    )
    assert bad_rate["failed"] is True and bad_rate["rc"] == 2 and "'20mb' is ambiguous" in bad_rate["msg"]
    assert bad_for["failed"] is True and bad_for["rc"] == 2 and "--for" in bad_for["msg"], bad_for
    assert bad_host["failed"] is True and "198.18.0.300" in bad_host["msg"] and "\n" not in bad_host["msg"]
    assert [c["rate"] for c in json.loads(edge.shapekit("shape-limit-ip", "list", "--json").stdout)] == ["4100kbit"]

    (remove_checked,) = edge.run([edge.cap_task(host=host, state="absent")], "--check")
    assert remove_checked["changed"] is True
    assert len(json.loads(edge.shapekit("shape-limit-ip", "list", "--json").stdout)) == 1
    (removed,) = edge.run([edge.cap_task(host=host, state="absent")])
    assert removed["changed"] is True and removed["caps"] == []
    assert json.loads(edge.shapekit("shape-limit-ip", "list", "--json").stdout) == []
    (removed_again,) = edge.run([edge.cap_task(host=host, state="absent")])
    assert removed_again["changed"] is False
    assert "rate 4100Kbit" not in edge.tc("class", "show", "dev", edge.pair.dev)


def test_cap_absent_leaves_a_config_cap_with_a_warning(edge):
    edge.run([edge.config_task(CONFIG + '\n[device.DEV.limits]\n"198.18.0.9" = "1mbit"\n')])
    host = "198.18.0.9"
    only_config, added, lifted = edge.run(
        [
            edge.cap_task(host=host, state="absent"),
            edge.cap_task(host=host, rate="2mbit"),
            edge.cap_task(host=host, state="absent"),
        ]
    )
    assert only_config["changed"] is False and not only_config.get("failed"), only_config
    assert added["changed"] is True and [c["source"] for c in added["caps"]] == ["run-time"]
    assert lifted["changed"] is True and [(c["source"], c["rate"]) for c in lifted["caps"]] == [("config", "1mbit")]
    assert any("stays capped by the config" in warning for warning in lifted.get("warnings", [])), lifted


def test_config_absent_forget_deletes_the_saved_caps(edge):
    edge.run([edge.config_task(CONFIG), edge.cap_task(host="198.18.0.2", rate="1mbit")])
    saved = edge.pair.workdir / "state" / "limits.json"
    assert saved.exists()
    kept, forgotten, again = edge.run(
        [
            edge.config_task(state="absent"),
            edge.config_task(state="absent", forget=True),
            edge.config_task(state="absent", forget=True),
        ]
    )
    assert kept["changed"] is True and forgotten["changed"] is True and again["changed"] is False, (
        kept,
        forgotten,
        again,
    )
    assert not saved.exists()


def test_check_diff_as_a_person_reads_it(edge):
    """The default callback's --check --diff: the config's diff, then the script shape-init would run."""
    out = edge.playbook([edge.config_task(CONFIG)], "--check", "--diff")
    dev = edge.pair.dev
    assert f"--- before: {edge.dest}\n+++ after: {edge.dest}\n" in out
    assert f'+[device.{dev}]\n+rate = "100mbit"\n' in out
    assert "+++ after: shape-init --all --dry-run\n" in out
    assert f"+tc qdisc add dev {dev} root handle 5c: htb default " in out
    assert "changed: [localhost]" in out and "changed=1" in out and "failed=0" in out
    assert not edge.dest.exists()


def test_a_failed_boot_puts_the_old_config_back(edge, tmp_path):
    edge.run([edge.config_task(CONFIG)])
    classes = edge.tc("class", "show", "dev", edge.pair.dev)
    faults = make_faults(tmp_path)  # tests/faults/fake-tool first in PATH: the first change the kernel gets fails
    edge.env = faults.env(edge.env, edge.pair.left.name)
    faults.arm(1)

    (failed,) = edge.run([edge.config_task(CONFIG.replace('rate = "20mbit"', 'rate = "30mbit"'))])

    assert faults.fired
    assert failed["failed"] is True and failed["rc"] == 1, failed
    assert failed["msg"].endswith("; the old config was applied again"), failed["msg"]
    assert edge.dest.read_text() == CONFIG.replace("DEV", edge.pair.dev)
    assert edge.tc("class", "show", "dev", edge.pair.dev) == classes
    assert edge.shapekit("shape-init", "--check").returncode == 0
