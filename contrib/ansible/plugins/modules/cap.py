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
  - Bad input (a host, a rate, a duration, a device) fails the task with shapekit's one-line message and
    changes nothing, in check mode too (C(shape-limit-ip add --dry-run) checks it first).
  - O(state=absent) lifts the host's run-time caps, on each device it has one (or on O(dev)); a cap from the
    config then takes over again, with a warning.
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
  - To extend a cap's O(for), lift it (O(state=absent)) and add it again.
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
from decimal import Decimal, InvalidOperation
from typing import Any

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.shapekit.shapekit.plugins.module_utils.shapekit import (
    DEFAULT_CONFIG,
    run_shapekit,
    shapekit_command,
)

# tc's units in bits per second (tc(8)), as decimals: 4.1mbit is 4100kbit exactly.
UNITS = {"bit": Decimal(1), "bps": Decimal(8)}
for _prefix, _power in (("k", 1), ("m", 2), ("g", 3), ("t", 4)):
    UNITS[_prefix + "bit"] = Decimal(1000) ** _power
    UNITS[_prefix + "bps"] = 8 * Decimal(1000) ** _power
    UNITS[_prefix + "ibit"] = Decimal(1024) ** _power
    UNITS[_prefix + "ibps"] = 8 * Decimal(1024) ** _power


def bits_per_second(rate: str) -> Decimal | str:
    """A rate as bits/s, to compare what the task asks with what shapekit lists; else its text."""
    text = rate.strip().lower()
    unit = next((unit for unit in sorted(UNITS, key=len, reverse=True) if text.endswith(unit)), None)
    try:
        return Decimal(text[: -len(unit)]) * UNITS[unit] if unit else text
    except InvalidOperation:
        return text


def network(host: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    """A host as shapekit reads it (an address, or a block without host bits), else None."""
    try:
        return ipaddress.ip_network(host.strip())
    except ValueError:
        return None


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
    """Whether a cap in force is the one asked for (a cap that lapses: any expiry; its expiry is kept)."""
    return (
        bits_per_second(cap["rate"]) == bits_per_second(params["rate"])
        and (cap.get("comment") or "") == params["comment"]
        and bool(cap.get("expires")) == (params["for"] is not None)
    )


def selected(caps: list[dict[str, Any]], dev: str | None, direction: str | None) -> list[dict[str, Any]]:
    return [cap for cap in caps if direction in (None, cap["direction"]) and dev in (None, cap["dev"])]


def add_argv(limit_ip: str, params: dict[str, Any], direction: str) -> list[str]:
    argv = [limit_ip, "add", params["host"], params["rate"], "--config", params["config"]]
    argv += ["--for", params["for"]] if params["for"] is not None else []  # "" too: shapekit refuses it
    argv += ["--comment", params["comment"]] if params["comment"] else []
    argv += ["--in"] if direction == "in" else []
    return argv + (["--dev", params["dev"]] if params["dev"] else [])


def present(module: AnsibleModule, limit_ip: str, before: list[dict[str, Any]]) -> dict[str, Any]:
    params = module.params
    direction = params["direction"] or "out"
    argv = add_argv(limit_ip, params, direction)
    run_shapekit(module, [*argv, "--dry-run"])  # bad input fails here, in check mode too, with shapekit's line
    mine = selected(before, params["dev"], direction)
    if any(satisfied(cap, params) for cap in mine):
        return {"changed": False, "caps": before}
    if not module.check_mode:
        run_shapekit(module, argv)
        return {"changed": True, "caps": caps_of(module, limit_ip, params["config"], params["host"])}
    wanted = {"host": params["host"], "direction": direction, "rate": params["rate"], "dev": params["dev"] or "-",
              "expires": params["for"] and f"+{params['for']}", "comment": params["comment"]}  # fmt: skip
    return {"changed": True, "caps": before, "would_be": [cap for cap in before if cap not in mine] + [wanted]}


def absent(module: AnsibleModule, limit_ip: str, before: list[dict[str, Any]]) -> dict[str, Any]:
    """Lift the host's run-time caps (on each device it has one); a cap from the config stays, with a warning."""
    params = module.params
    run_time = [cap for cap in selected(before, params["dev"], params["direction"]) if cap["source"] == "run-time"]
    result = {"changed": bool(run_time), "caps": before, "would_be": [cap for cap in before if cap not in run_time]}
    if not run_time or module.check_mode:
        return result
    for dev in sorted({cap["dev"] for cap in run_time}):
        argv = [limit_ip, "remove", params["host"], "--config", params["config"], "--dev", dev]
        run_shapekit(module, argv + (["--" + params["direction"]] if params["direction"] else []))
    result["caps"] = caps_of(module, limit_ip, params["config"], params["host"])
    if selected(result["caps"], params["dev"], params["direction"]):
        module.warn(f"{params['host']} stays capped by the config ([device.X.limits] in {params['config']})")
    return result


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
    if network(params["host"]) is None:
        module.fail_json(
            msg=f"{params['host']}: not an IPv4/IPv6 address or CIDR block (e.g. 203.0.113.7, 2001:db8::/64)"
        )
    limit_ip = shapekit_command(module, "shape-limit-ip")
    before = caps_of(module, limit_ip, params["config"], params["host"])
    result = (present if params["state"] == "present" else absent)(module, limit_ip, before)
    would_be = result.pop("would_be", result["caps"])
    if module._diff:  # in check mode, what the caps would be
        result["diff"] = {
            "before": describe(before),
            "after": describe(would_be if module.check_mode else result["caps"]),
        }
    module.exit_json(**result)


if __name__ == "__main__":
    main()
