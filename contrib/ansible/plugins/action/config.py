# Copyright: shapekit developers
# MIT License (see https://opensource.org/licenses/MIT)
"""shapekit.shapekit.config's src: read on the controller, as copy's is, and handed to the module as content."""

from __future__ import annotations

from typing import Any

from ansible.errors import AnsibleActionFail
from ansible.module_utils.common.text.converters import to_text
from ansible.plugins.action import ActionBase


class ActionModule(ActionBase):
    TRANSFERS_FILES = False

    def run(self, tmp: str | None = None, task_vars: dict[str, Any] | None = None) -> dict[str, Any]:
        result = super().run(tmp, task_vars)
        arguments = dict(self._task.args)
        source = arguments.pop("src", None)
        if source is not None:
            if arguments.get("content") is not None:
                raise AnsibleActionFail("src and content are mutually exclusive: give one")
            path = self._find_needle("files", source)
            with open(path, "rb") as handle:
                arguments["content"] = to_text(handle.read(), errors="surrogate_or_strict")
        result.update(self._execute_module(module_args=arguments, task_vars=task_vars))
        return result
