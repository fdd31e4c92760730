"""Pure functions from configuration (and observed kernel state) to commands.

Nothing here runs anything: a plan is an ordered list of argv tuples, and a
batch is the text `tc -batch -` reads. This is where the seed scripts live
again. Seed 000's tc half becomes `plan_tree`:

    tc qdisc add dev $DEV root handle 100: htb default 1
    tc class add dev $DEV parent 100: classid 100:1 htb rate ${LINK}kbit
    tc class add dev $DEV parent 1:10 classid 1:1010 htb rate ... ceil ... prio 0
    tc qdisc add dev $DEV parent 1:1010 sfq perturb 10
    tc filter add dev $DEV parent 1:0 protocol ip prio 0 handle 11010 fw flowid 1:1010

with one root qdisc `5c:` that shapekit owns, a top class at the line rate,
the unshaped bypass class `5c:2` under it (the seed's `100:1`, mark 1001),
and explicit leaf qdisc handles so a second run gives identical state.
"""

from __future__ import annotations

from dataclasses import dataclass

from shapekit.config import ROOT_MAJOR, TOP_MINOR, Device, HtbClass
from shapekit.config_rules import BYPASS_MINOR, Bypass
from shapekit.units import format_rate

Argv = tuple[str, ...]

FW_FILTER_PRIO = 10
# The leaf qdisc each `leaf` value asks for; "none" keeps HTB's own pfifo.
LEAF_QDISC: dict[str, tuple[str, ...]] = {
    "sfq": ("sfq", "perturb", "10"),
    "fq_codel": ("fq_codel",),
    "pfifo": ("pfifo",),
    "none": (),
}


@dataclass(frozen=True)
class RootQdisc:
    """The root qdisc a device has now, as `tc -j qdisc show` reports it."""

    kind: str
    handle: str  # "5c:", "0:" for the kernel's default

    @property
    def is_shapekit(self) -> bool:
        return self.kind == "htb" and self.handle == root_handle()

    @property
    def is_kernel_default(self) -> bool:
        return self.handle == "0:"


KERNEL_DEFAULT = RootQdisc(kind="noqueue", handle="0:")  # a device with no root qdisc of its own


def root_handle() -> str:
    return f"{ROOT_MAJOR:x}:"


def classid(minor: int) -> str:
    return f"{ROOT_MAJOR:x}:{minor:x}"


def _tc(dev: str, *args: str) -> Argv:
    return ("tc", args[0], args[1], "dev", dev, *args[2:])


def _class_options(cls: HtbClass) -> tuple[str, ...]:
    options = ["rate", format_rate(cls.rate), "ceil", format_rate(cls.ceil)]
    for name, value in (("burst", cls.burst), ("cburst", cls.cburst)):
        if value is not None:
            options += [name, f"{value}b"]
    if cls.quantum is not None:
        options += ["quantum", str(cls.quantum)]  # tc reads a plain number of bytes here
    if cls.prio is not None:
        options += ["prio", str(cls.prio)]
    return tuple(options)


def _leaf(device: Device, minor: int) -> list[Argv]:
    leaf = LEAF_QDISC[device.leaf]
    return [_tc(device.name, "qdisc", "add", "parent", classid(minor), "handle", f"{minor:x}:", *leaf)] if leaf else []


def _fw_filter(dev: str, mark: int, minor: int) -> Argv:
    return _tc(dev, "filter", "add", "parent", root_handle(), "protocol", "all", "prio", str(FW_FILTER_PRIO),
               "handle", str(mark), "fw", "flowid", classid(minor))  # fmt: skip


def _htb_class(dev: str, parent: str, minor: int, options: tuple[str, ...]) -> Argv:
    return _tc(dev, "class", "add", "parent", parent, "classid", classid(minor), "htb", *options)


def plan_tree(device: Device, bypass: Bypass) -> list[Argv]:
    """Build shapekit's whole HTB tree on an empty root."""
    dev = device.name
    top = classid(TOP_MINOR)
    rate = format_rate(device.rate)
    line = ("rate", rate, "ceil", rate)
    cmds = [
        _tc(dev, "qdisc", "add", "root", "handle", root_handle(), "htb", "default", f"{device.default_class.minor:x}"),
        _htb_class(dev, root_handle(), TOP_MINOR, line),
        # Bypassed traffic is not shaped: a class guaranteed the whole line, under the top class so
        # that bypassed and shaped traffic together never exceed the line (the seed's 100:1).
        _htb_class(dev, top, BYPASS_MINOR, line),
        *_leaf(device, BYPASS_MINOR),
    ]
    for cls in device.classes:
        parent = top if cls.parent is None else classid(device.by_name(cls.parent).minor)
        cmds.append(_htb_class(dev, parent, cls.minor, _class_options(cls)))
        if cls.is_leaf:
            cmds += _leaf(device, cls.minor)
    if device.classifier == "fw":
        cmds.append(_fw_filter(dev, bypass.mark, BYPASS_MINOR))
        cmds += [_fw_filter(dev, cls.mark, cls.minor) for cls in device.classes if cls.mark is not None]
    return cmds


def plan_init(device: Device, bypass: Bypass, current: RootQdisc) -> list[Argv]:
    """Replace whatever root qdisc the device has with shapekit's tree."""
    remove = [] if current.is_kernel_default else [_tc(device.name, "qdisc", "del", "root")]
    return remove + plan_tree(device, bypass)


def plan_flush(dev: str, current: RootQdisc) -> list[Argv]:
    """Remove shapekit's tree, and only shapekit's: back to the kernel default."""
    return [_tc(dev, "qdisc", "del", "root")] if current.is_shapekit else []


def batch_text(cmds: list[Argv]) -> str:
    """The text `tc -batch -` reads: one command a line, without the `tc`."""
    assert all(cmd[0] == "tc" for cmd in cmds), "a tc batch holds tc commands only"
    return "".join(" ".join(cmd[1:]) + "\n" for cmd in cmds)


@dataclass(frozen=True)
class KernelFeature:
    """A piece of the kernel a config needs, how to try it, and how to avoid it."""

    name: str  # "the sfq qdisc (sch_sfq)"
    lines: tuple[str, ...]  # batch lines on `lo` that succeed only when it is there
    fix: str  # what to change in the config when it is missing


def kernel_features(devices: list[Device]) -> list[KernelFeature]:
    """What these devices need from the kernel, each tried on `lo` of a scratch namespace."""
    base = ("qdisc add dev lo root handle 1: htb", "class add dev lo parent 1: classid 1:1 htb rate 1mbit")
    features = [KernelFeature("HTB (sch_htb)", base, "shapekit needs HTB; no config change avoids it")]
    for leaf in sorted({d.leaf for d in devices} - {"none"}):
        keys = ", ".join(f"[{d.key}]" for d in devices if d.leaf == leaf)
        line = f"qdisc add dev lo parent 1:1 handle 2: {' '.join(LEAF_QDISC[leaf])}"
        module = f"sch_{leaf}"
        features.append(
            KernelFeature(f"the {leaf} qdisc ({module})", (*base, line), f'set leaf = "pfifo" (or "none") in {keys}')
        )
    fw_devices = [d for d in devices if d.classifier == "fw"]
    if fw_devices:
        keys = ", ".join(f"[{d.key}]" for d in fw_devices)
        line = "filter add dev lo parent 1: protocol all prio 1 handle 1 fw flowid 1:1"
        features.append(
            KernelFeature("the fw classifier (cls_fw)", (*base, line), f'set classifier = "classify" in {keys}')
        )
    return features


def shell_script(header: str, cmds: list[Argv]) -> str:
    """A runnable shell script of the commands, as `--dry-run` prints it."""
    import shlex

    lines = [f"# {header}"] + [shlex.join(cmd) for cmd in cmds]
    return "\n".join(lines) + "\n"
