"""Pure parts of shape-status: naming the classes, computing rates, rendering a sample."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from shapekit.config.addresses import host_text
from shapekit.config.model import TOP_MINOR, Device
from shapekit.config.rules import BYPASS_MINOR
from shapekit.plan.limits import PlacedCap, cap_classid, group_classid, group_of
from shapekit.plan.tree import classid, configured_rate

if TYPE_CHECKING:  # the kernel's classes come in as data: the plan layer never reads the kernel
    from shapekit.kernel.netlink import ClassStats


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs 4 µs, and there is one per class
class ClassRow:
    name: str
    classid: str
    parent: str
    rate: int  # bits/s, as the kernel keeps it (a ptm tree's: as configured)
    ceil: int
    throughput: float  # bits/s over the interval
    bytes: int
    packets: int
    drops: int
    overlimits: int
    backlog_bytes: int
    backlog_packets: int


@dataclass(frozen=True)
class RuleRow:
    family: int
    chain: str
    rule: str  # the [[mark]] rule's comment ("mark[3] high"), else its match
    packets: int
    bytes: int


def class_names(device: Device, caps: list[PlacedCap], lapsed: list[PlacedCap] = ()) -> dict[str, str]:  # type: ignore[assignment]
    """Class id → what it is in the config and saved state."""
    names = {classid(TOP_MINOR): "(line)", classid(BYPASS_MINOR): "bypass"}
    for cls in device.classes:
        names[classid(cls.minor)] = cls.name + (" (default)" if cls.name == device.default else "")
    if device.direction == "out":
        for group in sorted({group_of(p.slot) for p in [*caps, *lapsed]}):
            names[group_classid(group)] = f"cap group {group}"
    for placed in caps:
        names[cap_classid(device, placed.slot)] = f"cap {_host(placed)}"
    for placed in lapsed:  # its class stays until the next full install
        names.setdefault(cap_classid(device, placed.slot), f"cap {_host(placed)} (lapsed)")
    return names


def _host(placed: PlacedCap) -> str:
    return host_text(placed.cap.host)


def class_rows(
    names: dict[str, str], before: list[ClassStats], after: list[ClassStats], seconds: float, tree: Device | None = None
) -> list[ClassRow]:
    """Rows for the classes of the second sample, shapekit's in tree order first.

    The rates of shapekit's classes in `tree` are shown as configured (a ptm tree's are written 64/65 of them).
    """
    earlier = {c.classid: c for c in before}
    order = {cid: n for n, cid in enumerate(names)}
    rows = []
    for c in sorted(after, key=lambda c: (order.get(c.classid, len(order)), _minor(c.classid))):
        sent = c.bytes - earlier[c.classid].bytes if c.classid in earlier else 0
        rows.append(
            ClassRow(
                name=names.get(c.classid, "(not shapekit's)"),
                classid=c.classid,
                parent=c.parent,
                rate=configured_rate(c.rate, tree) if tree and c.classid in names else c.rate,
                ceil=configured_rate(c.ceil, tree) if tree and c.classid in names else c.ceil,
                throughput=max(sent, 0) * 8 / seconds,
                bytes=c.bytes,
                packets=c.packets,
                drops=c.drops,
                overlimits=c.overlimits,
                backlog_bytes=c.backlog,
                backlog_packets=c.qlen,
            )
        )
    return rows


def _minor(cid: str) -> int:
    return int(cid.split(":")[1] or "0", 16)


_COUNTED = re.compile(r"^\[(\d+):(\d+)\] -A (SHAPEKIT-(?:MARK|BYPASS|LIMIT)) (.*)$", re.MULTILINE)
_COMMENT = re.compile(r'-m comment --comment "([^"]*)"')
_TARGET = re.compile(r" -[jg] \S+.*$")


def rule_rows(family: int, save_with_counters: str) -> list[RuleRow]:
    """The packet counters of shapekit's marking, bypass and cap rules, from `iptables-save -c`."""
    rows = []
    for packets, sent, chain, rule in _COUNTED.findall(save_with_counters):
        comment = _COMMENT.search(rule)
        label = comment.group(1) if comment else _TARGET.sub("", rule).strip()
        if chain == "SHAPEKIT-LIMIT":
            label = "caps on " + label.removeprefix("-o ")
        rows.append(RuleRow(family, chain, label, int(packets), int(sent)))
    return rows


def sample_document(when: str, seconds: float, devices: dict[str, list[ClassRow]], rules: list[RuleRow] | None) -> dict:
    """One sample as --json prints it."""
    return {
        "time": when,
        "interval_s": seconds,
        "devices": {dev: [asdict(r) for r in rows] for dev, rows in devices.items()},
        "rules": None if rules is None else [asdict(r) for r in rules],
    }


def human(value: float, unit: str) -> str:
    """1910000, "bit" → "1.91mbit"; bytes as "B"."""
    for scale, prefix in ((1e9, "g"), (1e6, "m"), (1e3, "k")):
        if value >= scale:
            text = f"{value / scale:.3g}"
            return f"{text}{prefix}{unit}" if unit == "bit" else f"{text}{prefix.upper()}{unit}"
    return f"{value:.0f}{unit}"


def render(document: dict) -> str:
    """A sample as tables: one per device, then the rule counters."""
    out = [f"shapekit status at {document['time']} (over {document['interval_s']:g}s)"]
    header = ["NAME", "CLASS", "RATE", "CEIL", "NOW", "SENT", "PACKETS", "DROPS", "OVERLIMITS", "BACKLOG"]
    for dev, rows in document["devices"].items():
        cells = [
            [
                r["name"],
                r["classid"],
                human(r["rate"], "bit"),
                human(r["ceil"], "bit"),
                human(r["throughput"], "bit"),
                human(r["bytes"], "B"),
                str(r["packets"]),
                str(r["drops"]),
                str(r["overlimits"]),
                f"{human(r['backlog_bytes'], 'B')}/{r['backlog_packets']}p",
            ]
            for r in rows
        ]
        out += ["", dev, table(header, cells)]
    rules = document["rules"]
    out.append("")
    if rules is None:
        out.append("rule counters: run as root to read them")
    else:
        cells = [[f"IPv{r['family']}", r["chain"], r["rule"], str(r["packets"]), human(r["bytes"], "B")] for r in rules]
        out.append(table(["FAMILY", "CHAIN", "RULE", "PACKETS", "BYTES"], cells))
    return "\n".join(out)


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]
    )


# --- Prometheus's text format (node_exporter's textfile collector reads it) -------------------------


@dataclass(frozen=True)
class Metric:
    name: str
    kind: str  # "counter" or "gauge"
    help: str


# Each class's samples: (metric, the ClassRow field, its scale).
CLASS_METRICS = (
    (Metric("shapekit_class_sent_bytes_total", "counter", "Bytes the class sent."), "bytes", 1),
    (Metric("shapekit_class_sent_packets_total", "counter", "Packets the class sent."), "packets", 1),
    (Metric("shapekit_class_dropped_packets_total", "counter", "Packets the class dropped."), "drops", 1),
    (Metric("shapekit_class_overlimits_total", "counter", "Times the class was over its rate."), "overlimits", 1),
    (Metric("shapekit_class_backlog_bytes", "gauge", "Bytes queued in the class."), "backlog_bytes", 1),
    (Metric("shapekit_class_queue_packets", "gauge", "Packets queued in the class."), "backlog_packets", 1),
    (Metric("shapekit_class_rate_bytes_per_second", "gauge", "The class's rate (HTB's guaranteed rate)."), "rate", 8),
    (Metric("shapekit_class_ceil_bytes_per_second", "gauge", "The class's ceil (the most it may send)."), "ceil", 8),
)
RULE_METRICS = (
    (Metric("shapekit_rule_matched_packets_total", "counter", "Packets a shapekit rule matched."), "packets"),
    (Metric("shapekit_rule_matched_bytes_total", "counter", "Bytes a shapekit rule matched."), "bytes"),
)
UP = Metric("shapekit_up", "gauge", "1: shape-status read the kernel; 0: it failed (its error is in the log).")
CAPS = Metric("shapekit_caps", "gauge", "Per-IP caps in force, by tree and where they come from.")
LAST_INIT = Metric(
    "shapekit_last_init_timestamp_seconds", "gauge", "When shape-init last finished without an error (Unix time)."
)


@dataclass(frozen=True)
class TreeSample:
    """One tree's classes as read once: the device as configured, and which way its traffic goes."""

    device: str
    direction: str  # "out", or "in" (an ingress tree, on its IFB)
    rows: list[ClassRow]


def prometheus_text(
    trees: list[TreeSample],
    rules: list[RuleRow] | None,
    caps: dict[tuple[str, str, str], int],
    last_init: float | None,
) -> str:
    """A sample in Prometheus's text format: class counters and gauges, rule counters (None: not root), the
    caps in force by (device, direction, source), and when shape-init last succeeded (None: never)."""
    out = _family(UP, [("", 1)])
    labelled: list[tuple[str, ClassRow]] = []  # once a class: 10,000 caps, 8 metrics
    for tree in trees:
        label = _tree_labels(tree)
        labelled += [(label(r), r) for r in tree.rows]
    for metric, field, scale in CLASS_METRICS:
        if scale == 1:
            out += _family(metric, [(labels, getattr(row, field)) for labels, row in labelled])
        else:
            out += _family(metric, [(labels, getattr(row, field) / scale) for labels, row in labelled])
    positions: dict[tuple[int, str], int] = {}
    numbered = []  # two rules may read alike (the connmark restores): their position tells them apart
    for r in rules or []:
        positions[(r.family, r.chain)] = position = positions.get((r.family, r.chain), 0) + 1
        numbered.append((_labels(family=f"ipv{r.family}", chain=r.chain, position=str(position), rule=r.rule), r))
    for metric, field in RULE_METRICS:
        out += _family(metric, [(labels, getattr(r, field)) for labels, r in numbered])
    out += _family(CAPS, [(_labels(device=d, direction=w, source=s), n) for (d, w, s), n in sorted(caps.items())])
    if last_init is not None:
        out += _family(LAST_INIT, [("", last_init)])
    return "".join(out)


def prometheus_down() -> str:
    """What the metrics file says when a sample failed."""
    return "".join(_family(UP, [("", 0)]))


def _family(metric: Metric, samples: list[tuple[str, float]]) -> list[str]:
    if not samples:
        return []
    head = [f"# HELP {metric.name} {metric.help}\n", f"# TYPE {metric.name} {metric.kind}\n"]
    name = metric.name
    return head + [f"{name}{labels} {value if type(value) is int else _number(value)}\n" for labels, value in samples]


def _tree_labels(tree: TreeSample) -> Callable[[ClassRow], str]:
    """A tree's class labels: device, direction, class id, what the class is, and a cap's host."""
    head = f'{{device="{_escaped(tree.device)}",direction="{_escaped(tree.direction)}",class="'

    def labels(row: ClassRow) -> str:
        name = row.name.removesuffix(" (default)").removesuffix(" (lapsed)")
        name = _SPECIAL_NAMES.get(name, name)
        host = name.startswith("cap ") and not name.startswith("cap group ")
        tail = f',host="{_escaped(name[4:])}"}}' if host else "}"
        return f'{head}{row.classid}",name="{_escaped(name)}"{tail}'  # a class id is hex:hex, nothing to escape

    return labels


_SPECIAL_NAMES = {"(line)": "line", "(not shapekit's)": "other"}


def _labels(**labels: str | None) -> str:
    pairs = [f'{key}="{_escaped(value)}"' for key, value in labels.items() if value is not None]
    return "{" + ",".join(pairs) + "}"


def _escaped(value: str) -> str:
    """A label value as the text format writes it: backslash, double quote and newline escaped."""
    if "\\" not in value and '"' not in value and "\n" not in value:
        return value
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if type(value) is int:  # counters and most gauges: 80,000 of them with 10,000 caps
        return str(value)
    return str(int(value)) if float(value).is_integer() and abs(value) < 2**63 else repr(float(value))


DRIFT_UP = Metric(
    "shapekit_drift_check_up", "gauge", "1: shape-init --check ran; 0: it could not (its error is in the log)."
)
DRIFT = Metric("shapekit_drift", "gauge", "1: the kernel differs from the config and saved state (shape-init --check).")
DRIFT_DIFFERENCES = Metric(
    "shapekit_drift_differences", "gauge", "Ways the kernel differs: lines shape-init --check prints."
)


def drift_text(differences: list[str]) -> str:
    """`shape-init --check` as Prometheus metrics."""
    samples = [(DRIFT_UP, 1), (DRIFT, int(bool(differences))), (DRIFT_DIFFERENCES, len(differences))]
    return "".join(line for metric, value in samples for line in _family(metric, [("", value)]))


def drift_down() -> str:
    """What the drift file says when the check could not run."""
    return "".join(_family(DRIFT_UP, [("", 0)]))
