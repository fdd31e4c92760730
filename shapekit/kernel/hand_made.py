"""What shape-import reads of a hand-made tree. Apart from `read`, so that the commands that
change the kernel do not load shape-import's translation at every start.
"""

from __future__ import annotations

import json

from shapekit.kernel import run
from shapekit.plan import adopt


def read_hand_made_tree(runner: run.Runner, dev: str) -> adopt.TreeReading:
    """What tc holds on `dev` for shape-import: qdiscs, classes (detailed text), each HTB qdisc's filters."""
    qdiscs = runner.query(("tc", "-j", "-d", "qdisc", "show", "dev", dev))  # -d: a size table
    handles = [q["handle"] for q in json.loads(qdiscs or "[]") if q.get("kind") == "htb"]
    has_ingress = any(q.get("kind") in ("ingress", "clsact") for q in json.loads(qdiscs or "[]"))
    return adopt.TreeReading(
        dev=dev,
        qdiscs=qdiscs,
        classes=runner.query(("tc", "-d", "class", "show", "dev", dev)),
        filters={h: runner.query(("tc", "filter", "show", "dev", dev, "parent", h)) for h in handles},
        ingress=runner.query(("tc", "-j", "filter", "show", "dev", dev, "ingress")) if has_ingress else "[]",
    )


def redirect_target(runner: run.Runner, dev: str) -> str | None:
    """The device `dev`'s ingress filters redirect arriving packets to (an IFB), if any."""
    qdiscs = json.loads(runner.query(("tc", "-j", "qdisc", "show", "dev", dev)) or "[]")
    if not any(q.get("kind") in ("ingress", "clsact") for q in qdiscs):
        return None
    return adopt.redirect_target(runner.query(("tc", "-j", "filter", "show", "dev", dev, "ingress")))
