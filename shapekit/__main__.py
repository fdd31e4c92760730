"""`python -m shapekit COMMAND [ARGS]`: run a command by its name (what bin/ uses)."""

from __future__ import annotations

import sys

from shapekit.commands import bypass, flush, import_, init, limit_ip, mark, status

MAINS = {
    "shape-init": init.init_main,
    "shape-mark": mark.mark_main,
    "shape-bypass": bypass.bypass_main,
    "shape-limit-ip": limit_ip.limit_ip_main,
    "shape-flush": flush.flush_main,
    "shape-status": status.status_main,
    "shape-import": import_.import_main,
}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in MAINS:
        sys.stderr.write(f"usage: python -m shapekit {{{','.join(MAINS)}}} [ARGS]\n")
        sys.exit(2)
    command = sys.argv.pop(1)
    MAINS[command]()


if __name__ == "__main__":
    main()
