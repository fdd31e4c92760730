# Copyright: shapekit developers
# MIT License (see https://opensource.org/licenses/MIT)
"""What the shapekit modules share: finding shapekit's commands on the host and running them."""

from __future__ import annotations

from ansible.module_utils.basic import AnsibleModule

# Where init/install links the commands, and where it puts the virtualenv.
COMMAND_DIRS = ["/usr/local/sbin", "/opt/shapekit/bin"]
DEFAULT_CONFIG = "/etc/shapekit/shapekit.toml"


def shapekit_command(module: AnsibleModule, name: str) -> str:
    """The path of one of shapekit's commands on the managed host; fails the task when it is not there."""
    return module.get_bin_path(name, required=True, opt_dirs=COMMAND_DIRS)


def run_shapekit(
    module: AnsibleModule, argv: list[str], allowed: tuple[int, ...] = (0,), shown: dict[str, str] | None = None
) -> tuple[int, str, str]:
    """Run one shapekit command; on an exit status not in `allowed`, fail the task with shapekit's own
    one-line message (its stderr), as a person running the command would read it. `shown`: paths in
    the message to name otherwise (a scratch copy of the config by the file it stands for)."""
    rc, out, err = module.run_command(argv)
    if rc not in allowed:
        message = err.strip() or out.strip() or f"exit status {rc}"
        for path, name in (shown or {}).items():
            message = message.replace(path, name)
        module.fail_json(msg=message, rc=rc, cmd=" ".join(argv), stdout=out, stderr=err)
    return rc, out, err
