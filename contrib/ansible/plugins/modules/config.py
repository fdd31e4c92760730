# Copyright: shapekit developers
# MIT License (see https://opensource.org/licenses/MIT)

from __future__ import annotations

DOCUMENTATION = r"""
module: config
short_description: Put a shapekit config on a host and its shaping in the kernel
description:
  - Writes shapekit's TOML config to O(dest) and runs shapekit's boot sequence (C(shape-init --all)) when
    the kernel does not already hold what the config says.
  - Checks the new config before anything changes (C(shape-init --all --dry-run)). A bad config fails the
    task with shapekit's one-line message, and neither the file nor the kernel changes.
  - Whether the kernel differs is what C(shape-init --check) says. A file that changes only in ways the
    kernel does not see (comments) is written without rebuilding the trees.
  - If the boot sequence fails, shapekit has undone what it applied (or left a device unshaped, never
    half-shaped), O(dest) is left as it was, and the module applies that old config again.
  - O(state=absent) runs C(shape-flush) and removes O(dest).
  - Needs shapekit installed on the host (C(init/install)) and root (C(become)).
version_added: 0.1.0
author: shapekit developers (@shapekit)
options:
  content:
    description:
      - The config's TOML text, e.g. from C(lookup('template', 'shapekit.toml.j2')).
      - Exactly one of O(content) and O(src) with O(state=present).
    type: str
  src:
    description:
      - A TOML file on the controller, looked up as M(ansible.builtin.copy)'s O(ansible.builtin.copy#module:src)
        is (a role's C(files/) first).
    type: path
  dest:
    description: Where the config lives on the host; the init scripts read C(/etc/shapekit/shapekit.toml).
    type: path
    default: /etc/shapekit/shapekit.toml
  state:
    description:
      - V(present) puts the config in O(dest) and its shaping in the kernel.
      - V(absent) removes everything shapekit installed (C(shape-flush)) and O(dest).
    type: str
    choices: [present, absent]
    default: present
  forget:
    description: With O(state=absent), also delete the saved run-time entries (C(shape-flush --forget)).
    type: bool
    default: false
  skip_absent:
    description:
      - Skip configured devices that do not exist now (C(--skip-absent)), as the init scripts do at boot, so that
        a hot-plug device that is down (ppp0, wg0) does not fail the task. V(false) fails it instead.
    type: bool
    default: true
attributes:
  check_mode:
    description: Reports what would change, and changes nothing.
    support: full
  diff_mode:
    description: Shows what changes.
    support: full
    details: The config file's diff, and the script C(shape-init --all --dry-run) prints when the kernel differs.
notes:
  - Run-time entries (C(shape-limit-ip add), C(shape-bypass add)) stay saved across config changes.
  - A device taken out of the config keeps its tree until C(shape-flush --dev DEV) or O(state=absent), since
    C(shape-init) builds and compares the devices the config names.
  - The new config is checked in a private temporary directory of the module's own (root) process, since
    shapekit refuses a config that a user other than root could change.
seealso:
  - module: shapekit.shapekit.cap
"""

EXAMPLES = r"""
- name: Shape the edge uplinks
  become: true
  shapekit.shapekit.config:
    src: shapekit.toml

- name: From a template
  become: true
  shapekit.shapekit.config:
    content: "{{ lookup('ansible.builtin.template', 'shapekit.toml.j2') }}"

- name: No shaping at all
  become: true
  shapekit.shapekit.config:
    state: absent
"""

RETURN = r"""
kernel_differences:
  description: What C(shape-init --check) found different before the run (or, for absent, what C(shape-flush) removes).
  returned: always
  type: list
  elements: str
script:
  description: The commands the run applied (or, in check mode, would apply), as C(--dry-run) prints them.
  returned: always
  type: str
"""

import os
import shutil
import tempfile
from typing import Any

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.shapekit.shapekit.plugins.module_utils.shapekit import (
    DEFAULT_CONFIG,
    run_shapekit,
    shapekit_command,
)


def read_text(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except FileNotFoundError:
        return None


def write_in(directory: str, text: str) -> str:
    """`text` in a new file in `directory`, mode 0644."""
    descriptor, path = tempfile.mkstemp(prefix=".shapekit-", suffix=".toml", dir=directory)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.chmod(path, 0o644)
    return path


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


class Boot:
    """shape-init on the host, with the options every run of it here takes."""

    def __init__(self, module: AnsibleModule, dest: str) -> None:
        self.module = module
        self.dest = dest
        self.command = shapekit_command(module, "shape-init")
        self.options = ["--skip-absent"] if module.params["skip_absent"] else []

    def run(self, config: str, *argv: str, allowed: tuple[int, ...] = (0,)) -> tuple[int, str, str]:
        shown = {config: f"{self.dest} (new)"} if config != self.dest else {}
        return run_shapekit(self.module, [self.command, *argv, *self.options, "--config", config], allowed, shown)

    def kernel_differences(self, config: str) -> list[str]:
        """What `shape-init --check` finds different; a check that cannot run fails the task."""
        rc, out, err = self.run(config, "--check", allowed=(0, 1))
        if rc == 1 and err.strip():  # exit 1 is also a failed system command, said on stderr
            self.module.fail_json(msg=err.strip(), rc=rc, stdout=out, stderr=err)
        return lines(out) if rc == 1 else []

    def apply(self, staged: str, before: str | None) -> None:
        """The boot sequence with the new config; if it fails, shapekit has undone its run (or left the device
        unshaped), and the old config, still in dest, is applied again."""
        rc, out, err = self.run(staged, "--all", allowed=(0, 1, 2))
        if rc == 0:
            return
        message = err.strip() or f"shape-init --all: exit status {rc}"
        if before is not None:
            again_rc, _out, again_err = self.run(self.dest, "--all", allowed=(0, 1, 2))
            message += (
                "; the old config was applied again"
                if again_rc == 0
                else f"; the old one failed too: {again_err.strip()}"
            )
        self.module.fail_json(msg=message, rc=rc, stdout=out, stderr=err)


def present(module: AnsibleModule, dest: str, content: str) -> dict[str, Any]:
    boot = Boot(module, dest)
    before = read_text(dest)
    # A private directory of this (root) process: shapekit refuses a config others could change.
    scratch_dir = tempfile.mkdtemp(prefix="shapekit-")
    try:
        scratch = write_in(scratch_dir, content)
        # Bad input is exit 2 with one line, before anything is read from or done to the kernel.
        script = boot.run(scratch, "--all", "--dry-run")[1]
        differences = boot.kernel_differences(scratch)
    finally:
        shutil.rmtree(scratch_dir, ignore_errors=True)
    result = {
        "changed": bool(differences) or before != content,
        "kernel_differences": differences,
        "script": script if differences else "",
        "diff": [{"before_header": dest, "after_header": dest, "before": before or "", "after": content}],
    }
    if differences:
        result["diff"].append(
            {
                "before_header": f"the kernel (shape-init --check: {len(differences)} differences)",
                "after_header": "shape-init --all --dry-run",
                "before": "",
                "after": script,
            }
        )
    if module.check_mode or not result["changed"]:
        return result
    directory = os.path.dirname(dest) or "."
    if not os.path.isdir(directory):
        os.makedirs(directory)
        os.chmod(directory, 0o755)  # not the umask's: shapekit refuses a config in a directory others can write
    staged = write_in(directory, content)  # beside dest, so that it replaces dest whole
    try:
        if differences:
            boot.apply(staged, before)
        module.atomic_move(staged, dest)
        os.chmod(dest, 0o644)  # atomic_move gives a new file the umask's mode
    finally:
        if os.path.exists(staged):
            os.unlink(staged)
    return result


def absent(module: AnsibleModule, dest: str, forget: bool) -> dict[str, Any]:
    flush = shapekit_command(module, "shape-flush")
    before = read_text(dest)
    options = ["--forget"] if forget else []
    script = run_shapekit(module, [flush, *options, "--dry-run"])[1]  # with --forget: the files it deletes too
    kernel_has = bool(script.strip())
    result = {
        "changed": kernel_has or before is not None,
        "kernel_differences": lines(script),
        "script": script,
        "diff": [{"before_header": dest, "after_header": dest, "before": before or "", "after": ""}],
    }
    if kernel_has:
        result["diff"].append(
            {"before_header": "the kernel", "after_header": "shape-flush --dry-run", "before": "", "after": script}
        )
    if module.check_mode or not result["changed"]:
        return result
    if kernel_has:
        run_shapekit(module, [flush, *options])
    if before is not None:
        os.unlink(dest)
    return result


def finish(module: AnsibleModule, result: dict[str, Any]) -> None:
    """The task's result; its diff only with --diff."""
    module.exit_json(**{key: value for key, value in result.items() if key != "diff" or module._diff})


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "content": {"type": "str"},
            "src": {"type": "path"},
            "dest": {"type": "path", "default": DEFAULT_CONFIG},
            "state": {"type": "str", "choices": ["present", "absent"], "default": "present"},
            "forget": {"type": "bool", "default": False},
            "skip_absent": {"type": "bool", "default": True},
        },
        mutually_exclusive=[["content", "src"]],
        required_if=[["state", "present", ["content", "src"], True]],
        supports_check_mode=True,
    )
    params = module.params
    if params["state"] == "absent":
        finish(module, absent(module, params["dest"], params["forget"]))
    if params["content"] is None:
        module.fail_json(msg="src is read on the controller by this module's action plugin: run it as a task")
    finish(module, present(module, params["dest"], params["content"]))


if __name__ == "__main__":
    main()
