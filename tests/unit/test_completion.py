"""bash completion, as init/install installs it (init/bash-completion, with bash-completion's helpers):
a command line typed into bash, split into words as bash splits them, and the completion function run."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shapekit.config.addresses import parse_host
from shapekit.config.rules import Cap
from shapekit.state import save_caps

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
BASH_COMPLETION = Path("/usr/share/bash-completion/bash_completion")
CONFIG = """\
[device.eth0]
rate = "100mbit"

[device.wan0]
rate = "20mbit"
"""

pytestmark = pytest.mark.skipif(
    shutil.which("bash") is None or not BASH_COMPLETION.exists(), reason="needs bash-completion (tests/install)"
)


def bash_words(line: str) -> list[str]:
    """`line` in words as bash's completion gives them: split at blanks, and at its COMP_WORDBREAKS
    (":" and "=" among them), a run of those a word of its own."""
    words = [word for token in line.split() for word in re.findall(r"[:=]+|[^:=]+", token)]
    return words + [""] if not line or line[-1] == " " else words


@pytest.fixture
def complete(tmp_path):
    config = tmp_path / "shapekit.toml"
    config.write_text(CONFIG)
    config.chmod(0o644)
    state = tmp_path / "state"
    state.mkdir()
    hosts = ("198.51.100.7", "198.51.100.0/24", "2001:db8::7")
    caps = [Cap(parse_host(h), 128_000, "eth0", "run-time") for h in hosts]
    caps.append(Cap(parse_host("192.0.2.9"), 128_000, "eth0", "run-time", expires=time.time() - 60))  # lapsed
    save_caps(state, caps)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "SHAPEKIT_STATE_DIR": str(state),
           "SHAPEKIT_CONFIG": str(config)}  # fmt: skip

    def run(line: str) -> list[str]:
        """The line as bash would complete it: each offer put in place of the word being typed."""
        words = bash_words(line)
        script = (
            f"source {BASH_COMPLETION}\nsource {REPO / 'init' / 'bash-completion'}\n"
            'COMP_LINE=$1; COMP_POINT=${#1}; shift; COMP_WORDS=("$@"); COMP_CWORD=$(( $# - 1 ))\n'
            '_shapekit_complete "$1" "${COMP_WORDS[-1]}" "${COMP_WORDS[-2]}"\n'
            'printf "%s\\n" "${COMPREPLY[@]}"\n'
        )
        ran = subprocess.run(["bash", "-c", script, "bash", line, *words], env=env, capture_output=True, text=True,
                             timeout=60)  # fmt: skip
        assert ran.returncode == 0 and ran.stderr == "", ran.stderr
        # readline puts an offer in place of the text after the last blank or word break
        typed = line[: len(line) - len(re.split(r"[\s:=]", line)[-1])]
        return [typed + offer for offer in ran.stdout.splitlines() if offer]

    return run


def test_verbs(complete):
    assert complete("shape-limit-ip ") == [f"shape-limit-ip {verb}" for verb in ("add", "remove", "sync", "list")]
    assert complete("shape-limit-ip re") == ["shape-limit-ip remove"]
    assert complete("shape-bypass ") == ["shape-bypass add", "shape-bypass remove", "shape-bypass list"]


def test_options(complete):
    offered = {line.split()[-1] for line in complete("shape-limit-ip add --")}
    assert {"--dev", "--for", "--comment", "--in", "--config", "--dry-run"} <= offered
    assert complete("shape-flush --fo") == ["shape-flush --forget"]
    assert {"--all", "--check", "--dev", "--skip-absent"} <= {line.split()[-1] for line in complete("shape-init --")}


def test_dev_offers_the_configured_devices(complete, tmp_path):
    assert complete("shape-init --dev ") == ["shape-init --dev eth0", "shape-init --dev wan0"]
    assert complete("shape-flush -d w") == ["shape-flush -d wan0"]
    assert complete("shape-limit-ip add 203.0.113.7 1mbit --dev ") == [
        "shape-limit-ip add 203.0.113.7 1mbit --dev eth0",
        "shape-limit-ip add 203.0.113.7 1mbit --dev wan0",
    ]
    other = tmp_path / "other.toml"
    other.write_text('[device.ppp0]\nrate = "1mbit"\n')
    other.chmod(0o644)
    assert complete(f"shape-init --config {other} --dev ") == [f"shape-init --config {other} --dev ppp0"]


def test_remove_offers_the_capped_hosts_in_force(complete):
    offered = complete("shape-limit-ip remove ")
    assert offered == [f"shape-limit-ip remove {h}" for h in ("198.51.100.0/24", "198.51.100.7", "2001:db8::7")]
    assert complete("shape-limit-ip remove 198.51.100.0") == ["shape-limit-ip remove 198.51.100.0/24"]


def test_an_ipv6_host_completes_across_its_colons(complete):
    assert bash_words("shape-limit-ip remove 2001:db8:") == ["shape-limit-ip", "remove", "2001", ":", "db8", ":"]
    assert complete("shape-limit-ip remove 2001:db8:") == ["shape-limit-ip remove 2001:db8::7"]
    assert complete("shape-limit-ip remove 2001:") == ["shape-limit-ip remove 2001:db8::7"]


def test_no_config_offers_no_devices_and_no_traceback(complete, tmp_path):
    assert complete(f"shape-init --config {tmp_path / 'absent.toml'} --dev ") == []
