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

from shapekit.config.model import ROOT_MAJOR, TOP_MINOR, Device, HtbClass, Leaf
from shapekit.config.rules import BYPASS_MINOR, Bypass
from shapekit.config.units import format_rate

Argv = tuple[str, ...]

FW_FILTER_PRIO = 10
# HTB's quantum: the bytes a class may send in its turn when classes of one prio share spare
# bandwidth, so siblings share it in proportion to their quanta. Left to itself HTB takes
# rate / r2q (r2q 10) and, outside 1000..200,000 bytes, clamps it and logs "quantum of class
# ... is small/big. Consider r2q change." shapekit always passes a quantum (no warning): rate / r2q
# with one r2q per tree, 10 or more so that the line's own quantum stays within 200,000 bytes, and
# never below a full-size frame, since HTB gives a class one packet a turn whatever its quantum.
HTB_R2Q = 10
MAX_QUANTUM_AUTO = 200_000
MIN_QUANTUM = 1514
# The leaf qdisc each `leaf` value asks for; "none" keeps HTB's own pfifo.
LEAF_QDISC: dict[str, tuple[str, ...]] = {
    "sfq": ("sfq", "perturb", "10"),
    "fq_codel": ("fq_codel",),
    # HTB shapes, so CAKE runs without a limit of its own; one tin, since HTB's classes already
    # order the traffic; fairness among hosts, then flows; GSO super-packets split, so HTB is
    # charged for (and paces) wire-size packets.
    "cake": ("cake", "unlimited", "besteffort", "triple-isolate", "split-gso"),
    "pfifo": ("pfifo",),
    "none": (),
}


@dataclass(frozen=True)
class RootQdisc:
    """The root qdisc a device has now, as `tc -j qdisc show` reports it."""

    kind: str
    handle: str  # "5c:", "0:" for the kernel's default
    groups: tuple[str, ...] = ()  # the cap groups' classes ("5c:8001"), in the order they were made

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


def r2q(line_rate: int) -> int:
    """The divisor from a class's rate (bytes/s) to its quantum, for a tree with this line rate (bits/s)."""
    return max(HTB_R2Q, -(-line_rate // 8 // MAX_QUANTUM_AUTO))


def quantum(rate: int, line_rate: int) -> int:
    """The quantum (bytes) of a class of `rate` in a tree of `line_rate` (both bits/s)."""
    return max(MIN_QUANTUM, rate // 8 // r2q(line_rate))


# PTM (VDSL2) sends 65 bytes for every 64; neither HTB nor tc's size tables know it, so a ptm tree's
# rates are written 64/65 of the configured ones, rounded down (tc-cake(8), sqm-scripts do the same).
PTM_PAYLOAD, PTM_WIRE = 64, 65


def wire_rate(rate: int, tree: Device) -> int:
    """The rate (bits/s) tc is given for a configured `rate` of `tree`: 64/65 of it on a ptm line."""
    return rate * PTM_PAYLOAD // PTM_WIRE if tree.linklayer == "ptm" else rate


def configured_rate(wire: int, tree: Device) -> int:
    """The configured rate a rate read from the kernel stands for: `wire_rate` undone (rounded up)."""
    return -(-wire * PTM_WIRE // PTM_PAYLOAD) if tree.linklayer == "ptm" else wire


def rate_options(rate: int, ceil: int, tree: Device, explicit_quantum: int | None = None) -> list[str]:
    """A class's rates and quantum in `tree`, charged as the tree's line charges a packet."""
    quantum_bytes = quantum(rate, tree.rate) if explicit_quantum is None else explicit_quantum
    # tc reads a plain number of bytes for the quantum
    rates = ["rate", format_rate(wire_rate(rate, tree)), "ceil", format_rate(wire_rate(ceil, tree))]
    return [*rates, "quantum", str(quantum_bytes), *link_options(tree)]


def link_options(tree: Device) -> tuple[str, ...]:
    """HTB's own per-packet accounting for the line (`overhead`, `linklayer`); none on a plain ethernet line.

    Given to every class of the tree (top, bypass, classes, caps): HTB charges each class by its own
    rate tables. Measured against a size table on the root (`stab`), it is as exact for wire-size
    packets and closer for GSO super-packets, since the size table reads a super-packet's length
    without the headers of its later segments (README, Link-layer overhead). HTB's overhead is
    unsigned: a negative one goes in the root's size table instead (`size_table`), and then no class
    charges anything of its own.
    """
    if tree.overhead < 0:
        return ()
    overhead = ("overhead", str(tree.overhead)) if tree.overhead else ()
    linklayer = ("linklayer", "atm") if tree.linklayer == "atm" else ()
    return overhead + linklayer


def size_table(tree: Device) -> tuple[str, ...]:
    """The root's size table (`stab`) for a negative overhead, which every class of the tree then sees; else none.

    tc's defaults cover 2047 bytes (a 1500-byte MTU's frame) and the kernel extrapolates longer
    packets (GSO super-packets, larger MTUs) from the table's last slot.
    """
    if tree.overhead >= 0:
        return ()
    return ("stab", "overhead", str(tree.overhead), *(("linklayer", "atm") if tree.linklayer == "atm" else ()))


def _class_options(cls: HtbClass, tree: Device) -> tuple[str, ...]:
    options = rate_options(cls.rate, cls.ceil, tree, cls.quantum)
    for name, value in (("burst", cls.burst), ("cburst", cls.cburst)):
        if value is not None:
            options += [name, f"{value}b"]
    if cls.prio is not None:
        options += ["prio", str(cls.prio)]
    return tuple(options)


def leaf_qdisc(dev: str, minor: int, leaf: Leaf, verb: str = "add") -> list[Argv]:
    """The leaf qdisc `MINOR:` under class `5c:MINOR`; none for "none" (HTB's own pfifo)."""
    qdisc = LEAF_QDISC[leaf]
    return [_tc(dev, "qdisc", verb, "parent", classid(minor), "handle", f"{minor:x}:", *qdisc)] if qdisc else []


def _fw_filter(dev: str, mark: int, minor: int) -> Argv:
    return _tc(dev, "filter", "add", "parent", root_handle(), "protocol", "all", "prio", str(FW_FILTER_PRIO),
               "handle", str(mark), "fw", "flowid", classid(minor))  # fmt: skip


def _htb_class(dev: str, parent: str, minor: int, options: tuple[str, ...]) -> Argv:
    return _tc(dev, "class", "add", "parent", parent, "classid", classid(minor), "htb", *options)


def plan_tree(device: Device, bypass: Bypass) -> list[Argv]:
    """Build shapekit's whole HTB tree on an empty root."""
    dev = device.name
    top = classid(TOP_MINOR)
    line = tuple(rate_options(device.rate, device.rate, device))
    default = f"{device.default_class.minor:x}"
    cmds = [
        _tc(dev, "qdisc", "add", "root", "handle", root_handle(), *size_table(device), "htb", "default", default),
        _htb_class(dev, root_handle(), TOP_MINOR, line),
        # Bypassed traffic is not shaped: a class guaranteed the whole line, under the top class so
        # that bypassed and shaped traffic together never exceed the line (the seed's 100:1).
        _htb_class(dev, top, BYPASS_MINOR, line),
        *leaf_qdisc(dev, BYPASS_MINOR, device.leaf),
    ]
    for cls in device.classes:
        parent = top if cls.parent is None else classid(device.by_name(cls.parent).minor)
        cmds.append(_htb_class(dev, parent, cls.minor, _class_options(cls, device)))
        if cls.is_leaf:
            cmds += leaf_qdisc(dev, cls.minor, cls.leaf or device.leaf)
    if device.classifier == "fw":
        cmds.append(_fw_filter(dev, bypass.mark, BYPASS_MINOR))
        cmds += [_fw_filter(dev, cls.mark, cls.minor) for cls in device.classes if cls.mark is not None]
    return cmds


def plan_init(device: Device, bypass: Bypass, current: RootQdisc) -> list[Argv]:
    """Replace whatever root qdisc the device has with shapekit's tree."""
    remove = [] if current.is_kernel_default else _remove_root(device.name, current)
    return remove + plan_tree(device, bypass)


def plan_flush(dev: str, current: RootQdisc) -> list[Argv]:
    """Remove shapekit's tree, and only shapekit's: back to the kernel default."""
    return _remove_root(dev, current) if current.is_shapekit else []


def _remove_root(dev: str, current: RootQdisc) -> list[Argv]:
    """The root qdisc deleted, its cap groups first, newest first.

    Every class binds a filter block; on a device without tc offload (veth,
    ifb, many NICs) the kernel keeps those in one machine-wide list, walked
    from the newest entry for each one unbound. One `qdisc del` of 100,000
    caps held the rtnl lock for 26 s and tripped the soft-lockup watchdog;
    a group at a time takes it for a few milliseconds each.
    """
    groups = [_tc(dev, "class", "del", "classid", cid) for cid in reversed(current.groups)]
    return [*groups, _tc(dev, "qdisc", "del", "root")]


def batch_text(cmds: list[Argv]) -> str:
    """The text `tc -batch -` reads: one command a line, without the `tc`; a word with spaces (bytecode) quoted."""
    assert all(cmd[0] == "tc" for cmd in cmds), "a tc batch holds tc commands only"
    return "".join(" ".join(f'"{word}"' if " " in word else word for word in cmd[1:]) + "\n" for cmd in cmds)


@dataclass(frozen=True)
class KernelFeature:
    """A piece of the kernel a config needs, how to try it, and how to avoid it."""

    name: str  # "the sfq qdisc (sch_sfq)"
    lines: tuple[str, ...]  # batch lines on `lo` that succeed only when it is there
    fix: str  # what to change in the config when it is missing


def kernel_features(devices: list[Device]) -> list[KernelFeature]:
    """What these trees (egress and ingress) need from the kernel, each tried on `lo` of a scratch namespace."""
    base = ("qdisc add dev lo root handle 1: htb", "class add dev lo parent 1: classid 1:1 htb rate 1mbit")
    features = [KernelFeature("HTB (sch_htb)", base, "shapekit needs HTB; no config change avoids it")]
    if any(d.direction == "out" for d in devices):  # the root's filter that finds a capped host's group
        line = 'filter add dev lo parent 1: protocol all prio 1 bpf bytecode "1,6 0 0 0"'
        fix = "shapekit's per-IP caps need it; no config change avoids it"
        features.append(KernelFeature("the bpf classifier (cls_bpf)", (*base, line), fix))
    for leaf, keys in _leaf_keys(devices).items():
        line = f"qdisc add dev lo parent 1:1 handle 2: {' '.join(LEAF_QDISC[leaf])}"
        fix = f'set leaf = "pfifo" (or "none") in {", ".join(f"[{key}]" for key in keys)}'
        features.append(KernelFeature(f"the {leaf} qdisc (sch_{leaf})", (*base, line), fix))
    fw_devices = [d for d in devices if d.classifier == "fw"]
    if fw_devices:
        keys = ", ".join(f"[{d.key}]" for d in fw_devices)
        line = "filter add dev lo parent 1: protocol all prio 1 handle 1 fw flowid 1:1"
        features.append(
            KernelFeature("the fw classifier (cls_fw)", (*base, line), f'set classifier = "classify" in {keys}')
        )
    return features


def _leaf_keys(devices: list[Device]) -> dict[Leaf, list[str]]:
    """Each leaf qdisc the trees ask for, with the config tables that ask for it."""
    keys: dict[Leaf, list[str]] = {}
    for tree in devices:
        keys.setdefault(tree.leaf, []).append(tree.key)
        for cls in tree.classes:
            if cls.leaf is not None:
                keys.setdefault(cls.leaf, []).append(f"{tree.key}.classes.{cls.name}")
    return {leaf: keys[leaf] for leaf in sorted(keys) if leaf != "none"}


def shell_script(header: str, cmds: list[Argv]) -> str:
    """A runnable shell script of the commands, as `--dry-run` prints it."""
    import shlex

    lines = [f"# {header}"] + [shlex.join(cmd) for cmd in cmds]
    return "\n".join(lines) + "\n"
