"""`python -m shapekit COMMAND [ARGS]`: run a command by its name (what bin/ uses)."""

from __future__ import annotations

import sys

from shapekit.commands import common as cli

MAINS = {
    "shape-init": cli.init_main,
    "shape-mark": cli.mark_main,
    "shape-bypass": cli.bypass_main,
    "shape-limit-ip": cli.limit_ip_main,
    "shape-flush": cli.flush_main,
    "shape-status": cli.status_main,
}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in MAINS:
        sys.stderr.write(f"usage: python -m shapekit {{{','.join(MAINS)}}} [ARGS]\n")
        sys.exit(2)
    command = sys.argv.pop(1)
    MAINS[command]()


if __name__ == "__main__":
    main()
