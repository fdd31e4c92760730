"""bash completion, as init/install installs it: each command's own script (typer's, printed with
_SHAPE_X_COMPLETE=source_bash), sourced in bash, its completion function run on a command line."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from shapekit.config.addresses import parse_host
from shapekit.config.rules import Cap
from shapekit.state import save_caps

BIN = Path(sys.executable).parent
CONFIG = """\
[device.eth0]
rate = "100mbit"

[device.wan0]
rate = "20mbit"
"""

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


@pytest.fixture
def complete(tmp_path):
    config = tmp_path / "shapekit.toml"
    config.write_text(CONFIG)
    config.chmod(0o644)
    state = tmp_path / "state"
    state.mkdir()
    caps = [Cap(parse_host(h), 128_000, "eth0", "run-time") for h in ("198.51.100.7", "198.51.100.0/24", "2001:db8::7")]
    save_caps(state, caps)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "SHAPEKIT_STATE_DIR": str(state),
           "SHAPEKIT_CONFIG": str(config)}  # fmt: skip

    def run(*words: str) -> list[str]:
        """What bash offers for the last of `words` (a command line being typed)."""
        command = words[0]
        variable = f"_{command.replace('-', '_').upper()}_COMPLETE"
        source = subprocess.run([BIN / command], env={**env, variable: "source_bash"}, capture_output=True, text=True)
        script = source.stdout + (
            'COMP_WORDS=("$@"); COMP_CWORD=$(( $# - 1 ))\n'
            'function=$(complete -p "$1" | sed "s/.*-F \\([^ ]*\\) .*/\\1/")\n'
            '"$function" "$1" "${COMP_WORDS[-1]}" "${COMP_WORDS[-2]}"\n'
            'printf "%s\\n" "${COMPREPLY[@]}"\n'
        )
        ran = subprocess.run(
            ["bash", "-c", script, "bash", *words], env=env, capture_output=True, text=True, timeout=60
        )
        assert ran.returncode == 0 and ran.stderr == "", ran.stderr
        return [line for line in ran.stdout.splitlines() if line]

    return run


def test_verbs(complete):
    assert complete("shape-limit-ip", "") == ["add", "remove", "sync", "list"]
    assert complete("shape-limit-ip", "re") == ["remove"]
    assert complete("shape-bypass", "") == ["add", "remove", "list"]


def test_options(complete):
    assert {"--dev", "--for", "--comment", "--in", "--config", "--dry-run"} <= set(
        complete("shape-limit-ip", "add", "--")
    )
    assert complete("shape-flush", "--fo") == ["--forget"]
    assert {"--all", "--check", "--dev", "--skip-absent"} <= set(complete("shape-init", "--"))


def test_dev_offers_the_configured_devices(complete, tmp_path):
    assert complete("shape-init", "--dev", "") == ["eth0", "wan0"]
    assert complete("shape-flush", "-d", "w") == ["wan0"]
    assert complete("shape-limit-ip", "add", "203.0.113.7", "1mbit", "--dev", "") == ["eth0", "wan0"]
    other = tmp_path / "other.toml"
    other.write_text('[device.ppp0]\nrate = "1mbit"\n')
    other.chmod(0o644)
    assert complete("shape-init", "--config", str(other), "--dev", "") == ["ppp0"]  # the --config given before


def test_remove_offers_the_capped_hosts(complete):
    assert complete("shape-limit-ip", "remove", "") == ["198.51.100.0/24", "198.51.100.7", "2001:db8::7"]
    assert complete("shape-limit-ip", "remove", "198.51.100.0") == ["198.51.100.0/24"]


def test_no_config_offers_no_devices_and_no_traceback(complete, tmp_path):
    assert complete("shape-init", "--config", str(tmp_path / "absent.toml"), "--dev", "") == []
