"""What bench.py and latency.py share: running a command, finding a tool, printing and saving a table."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path


def run(*argv: str, stdin: str | None = None, env: dict[str, str] | None = None, capture_stderr: bool = False) -> str:
    """A command's stdout (and its stderr after it, `capture_stderr`); RuntimeError when it fails."""
    result = subprocess.run(argv, input=stdin, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:8])}: {result.stderr.strip()[:500]}")
    return result.stdout + (result.stderr if capture_stderr else "")


def tool(name: str) -> str:
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name) or name


def table(rows: list[dict[str, object]], columns: list[tuple[str, str, str]]) -> str:
    header = [title for _, title, _ in columns]
    body = [[format(row[key], spec) if key in row else "-" for key, _, spec in columns] for row in rows]
    widths = [max(len(c) for c in col) for col in zip(header, *body, strict=True)]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)) for line in [header, *body])


def save(name: str, data: object, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")


def delete_namespaces(*names: str) -> None:
    """Kill what runs in each namespace, then delete it (a bench's teardown, also after a failure)."""
    for ns in names:
        for pid in subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split():
            subprocess.run(["kill", "-9", pid], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
