# Copyright: shapekit developers
# MIT License (see https://opensource.org/licenses/MIT)

from __future__ import annotations

DOCUMENTATION = r"""
module: cap
short_description: Cap one host's traffic at a rate now, with shapekit
description:
  - Adds, changes or lifts a run-time per-IP cap with C(shape-limit-ip add) and C(shape-limit-ip remove).
    The cap takes effect within a second, without rebuilding anything, and survives a reboot until it is
    removed or lapses.
  - Idempotent. A cap in force for O(host) in O(direction) (on O(dev)) with the same rate, the same
    O(comment) and, with O(for), some expiry (without, none) is left as it is, its expiry too.
  - Bad input (a host, a rate, a device) fails the task with shapekit's one-line message and changes nothing.
  - Needs shapekit installed on the host and its trees built (M(shapekit.shapekit.config)), and root.
version_added: 0.1.0
author: shapekit developers (@shapekit)
options:
  host:
    description: The IPv4/IPv6 address or CIDR block.
    type: str
    required: true
  rate:
    description: A tc rate, C(128kbit), C(2mbit), C(64kbps) (bytes/s). Required with O(state=present).
    type: str
  for:
    description: The cap lapses by itself after this long, C(90s), C(30m), C(2h), C(1d). Not with O(direction=in).
    type: str
    aliases: [duration]
  comment:
    description: Why, shown by C(shape-limit-ip list).
    type: str
    default: ""
  direction:
    description:
      - V(out) caps traffic sent to O(host) (uploads to it); V(in) traffic arriving from it, on the device's
        C([device.X.ingress]) tree.
      - With O(state=absent) and no O(direction), both ways are lifted.
    type: str
    choices: [out, in]
  dev:
    description: The device, when the config shapes several.
    type: str
  config:
    description: shapekit's config file on the host.
    type: path
    default: /etc/shapekit/shapekit.toml
  state:
    description: V(present) puts the cap in force; V(absent) lifts the host's run-time caps.
    type: str
    choices: [present, absent]
    default: present
attributes:
  check_mode:
    description: Reports what would change, and changes nothing.
    support: full
  diff_mode:
    description: Shows what changes.
    support: full
notes:
  - A cap from the config (C([device.X.limits])) cannot be lifted here; change the config instead.
seealso:
  - module: shapekit.shapekit.config
"""

EXAMPLES = r"""
- name: Hold a noisy client to 128 kbit/s for two hours on every edge
  become: true
  shapekit.shapekit.cap:
    host: 203.0.113.7
    rate: 128kbit
    for: 2h
    comment: ticket 4711

- name: Lift it
  become: true
  shapekit.shapekit.cap:
    host: 203.0.113.7
    state: absent

# Ad hoc, during an incident:
#   ansible edge -b -m shapekit.shapekit.cap -a "host=203.0.113.7 rate=128kbit for=2h"
"""

RETURN = r"""
caps:
  description: The host's caps in force after the run (in check mode, before it), as C(shape-limit-ip list --json) gives them.
  returned: always
  type: list
  elements: dict
"""

import ipaddress
import json
from typing import Any

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.shapekit.shapekit.plugins.module_utils.shapekit import (
    DEFAULT_CONFIG,
    run_shapekit,
    shapekit_command,
)

# tc's units in bits per second (tc(8)); a rate in any other form is compared as written.
UNITS = {"bit": 1, "bps": 8}
for _prefix, _power in (("k", 1), ("m", 2), ("g", 3), ("t", 4)):
    UNITS[_prefix + "bit"] = 1000**_power
    UNITS[_prefix + "bps"] = 8 * 1000**_power
    UNITS[_prefix + "ibit"] = 1024**_power
    UNITS[_prefix + "ibps"] = 8 * 1024**_power


def bits_per_second(rate: str) -> float | str:
    text = rate.strip().lower()
    for unit in sorted(UNITS, key=len, reverse=True):
        if text.endswith(unit):
            try:
                return float(text[: -len(unit)]) * UNITS[unit]
            except ValueError:
                break
    return text


def network(host: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | str:
    try:
        return ipaddress.ip_network(host.strip(), strict=False)
    except ValueError:
        return host.strip()


def caps_of(module: AnsibleModule, limit_ip: str, config: str, host: str) -> list[dict[str, Any]]:
    listed = run_shapekit(module, [limit_ip, "list", "--json", "--config", config])[1]
    return [cap for cap in json.loads(listed) if network(cap["host"]) == network(host)]


def describe(caps: list[dict[str, Any]]) -> str:
    """The caps as diff lines: host, direction, rate, device, expiry, comment."""
    out = ""
    for cap in caps:
        until = f" until {cap['expires']}" if cap.get("expires") else ""
        comment = f" # {cap['comment']}" if cap.get("comment") else ""
        out += f"{cap['host']} {cap['direction']} {cap['rate']} dev {cap['dev']}{until}{comment}\n"
    return out


def satisfied(cap: dict[str, Any], params: dict[str, Any]) -> bool:
    """Whether a cap in force is the one asked for."""
    return (
        bits_per_second(cap["rate"]) == bits_per_second(params["rate"])
        and (cap.get("comment") or "") == params["comment"]
        and bool(cap.get("expires")) == bool(params["for"])
    )


def selected(caps: list[dict[str, Any]], params: dict[str, Any], direction: str | None) -> list[dict[str, Any]]:
    return [
        cap
        for cap in caps
        if (direction is None or cap["direction"] == direction) and params["dev"] in (None, cap["dev"])
    ]


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "host": {"type": "str", "required": True},
            "rate": {"type": "str"},
            "for": {"type": "str", "aliases": ["duration"]},
            "comment": {"type": "str", "default": ""},
            "direction": {"type": "str", "choices": ["out", "in"]},
            "dev": {"type": "str"},
            "config": {"type": "path", "default": DEFAULT_CONFIG},
            "state": {"type": "str", "choices": ["present", "absent"], "default": "present"},
        },
        required_if=[["state", "present", ["rate"]]],
        supports_check_mode=True,
    )
    params = module.params
    limit_ip = shapekit_command(module, "shape-limit-ip")
    config = params["config"]
    before = caps_of(module, limit_ip, config, params["host"])
    direction = params["direction"] if params["state"] == "absent" else params["direction"] or "out"
    mine = selected(before, params, direction)

    if params["state"] == "present":
        changed = not any(satisfied(cap, params) for cap in mine)
        argv = [limit_ip, "add", params["host"], params["rate"], "--config", config]
        argv += ["--for", params["for"]] if params["for"] else []
        argv += ["--comment", params["comment"]] if params["comment"] else []
        argv += ["--in"] if direction == "in" else []
        wanted = [{"host": params["host"], "direction": direction, "rate": params["rate"], "dev": params["dev"] or "?",
                   "expires": params["for"] and "+" + params["for"], "comment": params["comment"]}]  # fmt: skip
    else:
        run_time = [cap for cap in mine if cap["source"] == "run-time"]
        if mine and not run_time:
            where = f"remove it from [device.X.limits] in {config}"
            module.fail_json(msg=f"{params['host']} is capped by the config, not at run time: {where}", caps=before)
        if len(run_time) < len(mine):
            module.warn(f"{params['host']} stays capped by the config once its run-time cap is lifted")
        changed = bool(run_time)
        argv = [limit_ip, "remove", params["host"], "--config", config]
        argv += ["--" + direction] if direction else []
        wanted = [cap for cap in mine if cap not in run_time]
    argv += ["--dev", params["dev"]] if params["dev"] else []

    result = {"changed": changed, "caps": before}
    if changed and not module.check_mode:
        run_shapekit(module, argv)
        result["caps"] = caps_of(module, limit_ip, config, params["host"])
    if module._diff:
        # In check mode, what the caps would be: the others, and the one asked for.
        after = [cap for cap in before if cap not in mine] + wanted if module.check_mode and changed else result["caps"]
        result["diff"] = {"before": describe(before), "after": describe(after)}
    module.exit_json(**result)


if __name__ == "__main__":
    main()
