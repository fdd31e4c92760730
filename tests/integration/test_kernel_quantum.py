"""No class of any rate makes HTB warn: a sweep of trees from 64kbit to 10gbit, read back from the kernel.

HTB computes a quantum of rate / 10 when it is given none, and logs "quantum
of class 5C0010 is small/big. Consider r2q change." outside 1000..200,000
bytes: Debian 12's kernel in its log (dmesg), newer ones to tc's stderr.
shapekit gives every class its quantum (shapekit.plan.quantum). Needs only
HTB, so it runs on this machine's kernel and in the distro-kernel lane.
"""

from __future__ import annotations

import pytest
from netns import parse_classes

from shapekit.config.units import parse_rate
from shapekit.plan.tree import quantum

LINES = ("64kbit", "1mbit", "10mbit", "100mbit", "1gbit", "10gbit")
RATES = ("64kbit", "100kbit", "512kbit", "1mbit", "3mbit", "10mbit", "50mbit", "100mbit", "1gbit", "4gbit", "10gbit")
RUN_TIME_CAP = ("198.19.0.1", "64kbit", "10gbit")  # added at run time, then re-rated (tc class change)


def sweep_config() -> str:
    """One device per line rate; under each, a class and a cap at every rate up to the line, both ways."""
    parts = []
    for n, line in enumerate(LINES):
        rates = [r for r in RATES if parse_rate(r) <= parse_rate(line)]
        classes = "".join(
            f'[device.q{n}.{{tree}}classes.c{i}]\nparent = "inner"\nrate = "{r}"\nceil = "{line}"\n\n'
            for i, r in enumerate(rates)
        )
        caps = "".join(
            f'"198.19.{n + 1}.{i + 1}" = {{ rate = "{r}", direction = "both" }}\n' for i, r in enumerate(rates)
        )
        tree = f'rate = "{line}"\ndefault = "c0"\nleaf = "none"\n\n[device.q{n}.{{tree}}classes.inner]\nrate = "{line}"\n\n'
        parts.append(
            f'[device.q{n}]\nclassifier = "classify"\n{tree.format(tree="")}{classes.format(tree="")}'
            f"[device.q{n}.ingress]\n{tree.format(tree='ingress.')}{classes.format(tree='ingress.')}"
            f"[device.q{n}.limits]\n{caps}\n"
        )
    return "\n".join(parts)


def kernel_log(pair) -> list[str]:
    return pair.left.run("dmesg").stdout.splitlines()


@pytest.mark.distro_kernel()
def test_no_rate_from_64kbit_to_10gbit_makes_htb_warn(netpair):
    for n in range(len(LINES)):
        netpair.left.run("ip", "link", "add", f"q{n}", "type", "veth", "peer", "name", f"q{n}p")
        netpair.left.run("ip", "link", "set", f"q{n}", "up")
    config = str(netpair.write_config(sweep_config()))
    before = len(kernel_log(netpair))

    said = [netpair.shapekit("shape-init", "--config", config)]
    said.append(netpair.shapekit("shape-limit-ip", "--config", config))
    host, *rates = RUN_TIME_CAP
    for rate in rates:
        said.append(netpair.shapekit("shape-limit-ip", "add", host, rate, "--dev", "q5", "--config", config))

    warnings = [line for line in kernel_log(netpair)[before:] if "HTB" in line or "htb" in line]
    warnings += [line for result in said for line in result.stderr.splitlines() if "r2q" in line]
    assert warnings == []
    # The kernel holds each leaf class's quantum as planned: nothing was clamped.
    checked = 0
    for n, line in enumerate(LINES):
        for dev in (f"q{n}", f"ifb-q{n}"):
            shown = netpair.left.run("tc", "-d", "class", "show", "dev", dev).stdout
            for cid, cls in parse_classes(shown).items():
                if "quantum" in cls:
                    rate = parse_rate(cls["rate"].lower())
                    assert int(cls["quantum"]) == quantum(rate, parse_rate(line)), f"{dev} {cid}: {cls}"
                    checked += 1
    assert checked > 100
