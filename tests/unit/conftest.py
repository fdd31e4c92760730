"""Unit fixtures: no root, no kernel. Every process shapekit would run goes to a mock."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from unittest.mock import MagicMock

import pytest
from typer.testing import CliRunner

from shapekit.plan.tc_text import parse_tc_classes

# `tc filter show dev D parent 5c: prio 1` on a tree shape-init built: the group filter.
GROUP_FILTER_SHOWN = (
    "filter protocol all pref 1 bpf chain 0 \n"
    "filter protocol all pref 1 bpf chain 0 handle 0x1 bytecode "
    "'6,32 0 0 4294963220,116 0 0 24,21 2 0 0,4 0 0 6062080,22 0 0 0,6 0 0 0' \n"
)


@dataclass
class System:
    """What the mocked machine answers, and what shapekit asked it to run."""

    run: MagicMock
    roots: dict[str, dict] = field(default_factory=dict)  # dev -> root qdisc as tc -j prints it
    hooks: list = field(default_factory=list)  # each sees (argv, stdin) first, and may raise
    answers: dict[tuple[str, ...], str] = field(default_factory=dict)  # argv → its stdout
    flat: set[str] = field(default_factory=set)  # devices whose shapekit tree has no group filter (built flat)
    gso: dict[str, int] = field(default_factory=dict)  # dev -> gso_max_segs, when not the kernel's 65535
    tso_max: dict[str, int] = field(default_factory=dict)  # dev -> its driver's tso_max_segs, when not 65535

    def answer(self, argv, stdin=None):
        argv = tuple(argv)
        for hook in self.hooks:
            hook(argv, stdin)
        if argv in self.answers:
            return self.answers[argv]
        if argv[:5] == ("ip", "-d", "-j", "link", "show"):
            segs = self.gso.get(argv[6], 65535)
            return json.dumps(
                [{"ifname": argv[6], "gso_max_segs": segs, "tso_max_segs": self.tso_max.get(argv[6], 65535)}]
            )
        if argv[:4] == ("ip", "link", "set", "dev") and argv[5] == "gso_max_segs":
            self.gso[argv[4]] = int(argv[6])
        if argv == ("tc", "-batch", "-") and stdin and stdin.startswith("class show dev "):
            # read.show_classes, a qdisc at a time: each device's `tc class show` answer once
            devices = dict.fromkeys(line.split()[3] for line in stdin.splitlines())
            return "".join(self.answers.get(("tc", "class", "show", "dev", dev), "") for dev in devices)
        if argv[:4] == ("tc", "-j", "-d", "qdisc"):  # with the size table: the same roots
            argv = argv[:2] + argv[3:]
        if argv[:4] == ("tc", "filter", "show", "dev") and argv[5:] == ("parent", "5c:", "prio", "1"):
            return self._group_filter(argv[4])
        if argv[:4] == ("tc", "-j", "qdisc", "show"):
            if len(argv) > 4:  # one device's qdiscs: its root (the groups' when a test answers them)
                return json.dumps([self.roots.get(argv[5], {"kind": "noqueue", "handle": "0:", "root": True})])
            return json.dumps([{**q, "dev": dev} for dev, q in self.roots.items()])
        return ""

    def _group_filter(self, dev: str) -> str:
        """The root's bpf filter that finds cap groups: on shapekit's tree, unless built flat."""
        root = self.roots.get(dev, {})
        if (root.get("kind"), root.get("handle")) != ("htb", "5c:") or dev in self.flat:
            return ""
        return GROUP_FILTER_SHOWN

    def read_class(self, dev: str, cid: str):
        """read.read_class (an rtnetlink get, not a process): from the answer given for `tc class show`."""
        found = parse_tc_classes(self.answers.get(("tc", "class", "show", "dev", dev), "")).get(cid)
        return None if found is None else SimpleNamespace(ceil=found.ceil)

    @property
    def calls(self) -> list[tuple[tuple[str, ...], str | None]]:
        """(argv, stdin) of every process run, in order."""
        return [
            (tuple(c.args[0]), c.args[1] if len(c.args) > 1 else c.kwargs.get("stdin")) for c in self.run.call_args_list
        ]

    def batches(self) -> list[str]:
        """The `tc -batch` texts that change something (not read.show_classes's)."""
        return [
            stdin
            for argv, stdin in self.calls
            if argv == ("tc", "-batch", "-") and not (stdin or "").startswith("class show dev ")
        ]


@pytest.fixture
def system(mocker, tmp_path, monkeypatch) -> System:
    """A root shell on a machine with eth0 and eth1 and every tool, where nothing really runs."""
    monkeypatch.setenv("SHAPEKIT_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("SHAPEKIT_CONFIG", raising=False)
    run = mocker.patch("shapekit.kernel.run.run_command")
    fake = System(run=run)
    run.side_effect = fake.answer
    mocker.patch("shapekit.kernel.read.read_class", side_effect=fake.read_class)
    mocker.patch("os.geteuid", return_value=0)
    mocker.patch("shutil.which", side_effect=lambda name: f"/usr/sbin/{name}")

    def if_nametoindex(name: str) -> int:
        if name not in ("eth0", "eth1", "lo"):
            raise OSError(19, "No such device")
        return 2

    mocker.patch("socket.if_nametoindex", side_effect=if_nametoindex)
    mocker.patch("shapekit.config.files.check_not_writable_by_others")
    return fake


@pytest.fixture
def cli():
    """Run a typer app as its console script would; returns click's Result."""
    runner = CliRunner()

    def invoke(app, *args: str):
        return runner.invoke(app, list(args), catch_exceptions=False)

    return invoke


@pytest.fixture
def write_config(tmp_path):
    def write(text: str, name: str = "shapekit.toml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return write
