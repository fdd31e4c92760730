"""`ansible-test sanity` over the collection in contrib/ansible, as installed by ansible-galaxy.

ansible-test gives each sanity test a virtualenv of its own and bootstraps pip there with a get-pip.py
from ci-files.testing.ansible.com, which a machine with only the package registries cannot reach. Its
cache gets get-pip-offline.py under the name it looks for (Python's ensurepip, then the pinned pip from
the package index); everything else is ansible-test's own, and every one of its sanity tests runs.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
BIN = Path(sys.executable).parent


def test_ansible_test_sanity_passes(tmp_path):
    subprocess.run(
        [str(BIN / "ansible-galaxy"), "collection", "install", str(REPO / "contrib" / "ansible"), "-p", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    collection = tmp_path / "ansible_collections" / "shapekit" / "shapekit"
    # The pip ansible-test pins for its virtualenvs names the script it looks for (get_pip_24_2.py).
    pinned = re.search(
        r"pip='(\d+(?:\.\d+)*)'", (ansible_test_dir() / "_internal" / "python_requirements.py").read_text()
    )
    assert pinned, "ansible-test no longer pins pip in python_requirements.py: look at how it bootstraps pip now"
    cache = Path.home() / ".ansible" / "test" / "cache" / f"get_pip_{pinned[1].replace('.', '_')}.py"
    cache.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(HERE / "get-pip-offline.py", cache)

    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    ran = subprocess.run(
        [str(BIN / "ansible-test"), "sanity", "--local", "--python", version, "--color", "no"],
        cwd=collection,
        capture_output=True,
        text=True,
        timeout=900,
    )
    output = ran.stdout + ran.stderr
    assert ran.returncode == 0, output[-4000:]
    tests = re.findall(r'Running sanity test "([^"]+)"', output)
    assert {"validate-modules", "ansible-doc", "pylint", "yamllint", "import", "compile"} <= set(tests), tests


def ansible_test_dir() -> Path:
    import ansible_test

    return Path(ansible_test.__file__).parent
