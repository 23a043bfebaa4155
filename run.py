#!/usr/bin/env python3
"""microxen: the one entry point.

    python run.py up [--run-dir DIR] [--config FILE ...] [--detach]
    python run.py down [--run-dir DIR]
    python run.py xl [--run-dir DIR] SUBCOMMAND ...
    python run.py bench [SUITE ...] [--json FILE]
    python run.py fault --list | KIND DOMAIN [options]
    python run.py campaign --faults N --seed S [--config FILE] [--report DIR]

The run directory holds everything a running system owns: sockets, logs,
console logs, reports.  It is --run-dir, else $MICROXEN_RUN_DIR, else
/tmp/microxen-<uid>.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys


def ensure_dependencies() -> None:
    """On a fresh machine, install our Python dependencies (once) before anything else."""
    missing = [m for m in ("zmq", "msgpack", "trio") if importlib.util.find_spec(m) is None]
    if missing:
        print(f"run.py: installing missing dependencies ({', '.join(missing)}) with pip...",
              file=sys.stderr)
        subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "-e",
                               os.path.dirname(os.path.abspath(__file__))])


def main(argv: list[str]) -> int:
    ensure_dependencies()
    from domains.dom0 import system

    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__.strip())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "up":
        return system.up(rest)
    if command == "down":
        return system.down(rest)
    if command == "xl":
        from domains.dom0 import xl
        return xl.main(rest)
    if command == "bench":
        import bench
        return bench.main(rest)
    if command in ("fault", "campaign"):
        from domains.dom0 import faults
        return faults.fault_main(rest) if command == "fault" else faults.campaign_main(rest)
    print(f"run.py: unknown command '{command}' (try: up, down, xl, bench, fault, campaign)",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
