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
  - If the boot sequence fails, shapekit has already undone what it applied, and O(dest) is left as it was.
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


def write_beside(dest: str, text: str) -> str:
    """`text` in a new file in dest's directory (made if missing), so that it can replace dest atomically."""
    directory = os.path.dirname(dest) or "."
    os.makedirs(directory, mode=0o755, exist_ok=True)
    descriptor, path = tempfile.mkstemp(prefix=".shapekit-", suffix=".toml", dir=directory)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.chmod(path, 0o644)
    return path


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def present(module: AnsibleModule, dest: str, content: str) -> dict[str, Any]:
    init = shapekit_command(module, "shape-init")
    before = read_text(dest)
    scratch = os.path.join(module.tmpdir, "shapekit.toml")
    with open(scratch, "w", encoding="utf-8") as handle:
        handle.write(content)
    shown = {scratch: f"{dest} (new)"}
    # Bad input is exit 2 with one line, before anything is read from or done to the kernel.
    script = run_shapekit(module, [init, "--all", "--dry-run", "--config", scratch], shown=shown)[1]
    check_rc, differences = run_shapekit(module, [init, "--check", "--config", scratch], (0, 1), shown)
    kernel_differs = check_rc == 1
    file_differs = before != content
    result = {
        "changed": kernel_differs or file_differs,
        "kernel_differences": lines(differences) if kernel_differs else [],
        "script": script if kernel_differs else "",
    }
    if module._diff:
        result["diff"] = [{"before_header": dest, "after_header": dest, "before": before or "", "after": content}]
        if kernel_differs:
            result["diff"].append(
                {
                    "before_header": f"the kernel (shape-init --check: {len(result['kernel_differences'])} differences)",
                    "after_header": "shape-init --all --dry-run",
                    "before": "",
                    "after": script,
                }
            )
    if module.check_mode or not result["changed"]:
        return result
    staged = write_beside(dest, content)
    try:
        if kernel_differs:
            # On failure shapekit has undone its run; dest stays as it was.
            run_shapekit(module, [init, "--all", "--config", staged], shown={staged: f"{dest} (new)"})
        module.atomic_move(staged, dest)
    finally:
        if os.path.exists(staged):
            os.unlink(staged)
    return result


def absent(module: AnsibleModule, dest: str, forget: bool) -> dict[str, Any]:
    flush = shapekit_command(module, "shape-flush")
    before = read_text(dest)
    options = ["--forget"] if forget else []
    script = run_shapekit(module, [flush, *options, "--dry-run"])[1]
    kernel_has = bool(script.strip())
    result = {
        "changed": kernel_has or before is not None,
        "kernel_differences": lines(script),
        "script": script,
    }
    if module._diff:
        result["diff"] = [{"before_header": dest, "after_header": dest, "before": before or "", "after": ""}]
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


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "content": {"type": "str"},
            "src": {"type": "path"},
            "dest": {"type": "path", "default": DEFAULT_CONFIG},
            "state": {"type": "str", "choices": ["present", "absent"], "default": "present"},
            "forget": {"type": "bool", "default": False},
        },
        mutually_exclusive=[["content", "src"]],
        required_if=[["state", "present", ["content", "src"], True]],
        supports_check_mode=True,
    )
    params = module.params
    if params["state"] == "absent":
        module.exit_json(**absent(module, params["dest"], params["forget"]))
    if params["content"] is None:
        module.fail_json(msg="src is read on the controller by this module's action plugin: run it as a task")
    module.exit_json(**present(module, params["dest"], params["content"]))


if __name__ == "__main__":
    main()
