"""``python -m bench`` / ``run.py bench``: run benchmark suites and report.

Usage::

    python -m bench [SUITE ...] [--json FILE] [--run-dir DIR] [--quick | --scale F] [--list]

With no SUITE, every suite whose module exists is run. Figures are printed as
an aligned table on stdout (progress goes to stderr) and, with ``--json``,
written as ``{"date", "machine", "figures": [...]}``. Baselines that a system
suite asked for through ``ctx.baseline(...)`` appear in the report even when
the ``baselines`` suite itself was not run, so every ratio can be checked.

Every run works in a fresh directory (under ``--run-dir``, else
``$MICROXEN_RUN_DIR``, else the system temp dir) that is removed afterwards,
so two benchmark runs, or a benchmark and a running system, never share
sockets or files.

Exit status: 0 when everything ran; 1 when a suite or baseline failed (the
rest are still reported); 2 for bad arguments or a suite that is not available.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from bench.context import Context
from bench.harness import Figure, Report
from bench.registry import SUITES, LazySuite, SuiteUnavailable, load

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Run microxen benchmark suites against raw baselines.",
    )
    p.add_argument("suites", nargs="*", metavar="SUITE",
                   help=f"suites to run (default: all available); known: {', '.join(SUITES)}")
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON to FILE")
    p.add_argument("--run-dir", metavar="DIR",
                   help="parent of this run's scratch directory (default $MICROXEN_RUN_DIR, "
                   "else the system temp dir)")
    scale = p.add_mutually_exclusive_group()
    scale.add_argument("--quick", action="store_true",
                       help="shrink every count and duration tenfold (smoke runs)")
    scale.add_argument("--scale", type=float, default=None, metavar="F",
                       help="multiply every count and duration by F (default 1.0)")
    p.add_argument("--list", action="store_true", help="list suites and whether they exist")
    return p


def _list_suites() -> None:
    for name, suite in SUITES.items():
        if isinstance(suite, LazySuite):
            state = "available" if suite.available() else f"not written ({suite.module})"
        else:
            state = "registered"
        print(f"{name:12s} {state}")


def main(argv: list[str]) -> int:
    """Run the suites named in ``argv``; return the process exit status."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse has already printed the reason
        return int(exc.code) if isinstance(exc.code, int) else 2
    if args.list:
        _list_suites()
        return 0
    scale = 0.1 if args.quick else (1.0 if args.scale is None else args.scale)
    if not scale > 0:
        print(f"bench: --scale must be > 0, got {scale}", file=sys.stderr)
        return 2

    names: list[str] = list(dict.fromkeys(args.suites))
    if not names:
        names = [n for n, s in SUITES.items() if not isinstance(s, LazySuite) or s.available()]
    suites = {}
    unavailable = []
    for name in names:
        try:
            suites[name] = load(name)
        except SuiteUnavailable as exc:
            unavailable.append(str(exc))
    if unavailable:
        for line in unavailable:
            print(f"bench: {line}", file=sys.stderr)
        return 2

    parent = args.run_dir or os.environ.get("MICROXEN_RUN_DIR") or None
    if parent is not None:
        try:
            Path(parent).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            print(f"bench: cannot create run directory {parent!r}: {exc}", file=sys.stderr)
            return 2
    run_dir = tempfile.mkdtemp(prefix="bench.", dir=parent)
    report = Report()
    ctx = Context(run_dir, scale=scale)
    try:
        for name, suite in suites.items():
            ctx.log(f"running suite {name} ...")
            try:
                figures = suite(ctx)
            except KeyboardInterrupt:
                ctx.error(name, "interrupted")
                break
            except Exception as exc:  # noqa: BLE001 - one suite failing must not hide others
                ctx.error(name, f"{type(exc).__name__}: {exc}")
                continue
            if not isinstance(figures, list) or not all(isinstance(f, Figure) for f in figures):
                ctx.error(name, "suite did not return a list of Figure")
                continue
            report.extend(figures)
        seen = report.names()
        report.extend(f for f in ctx.measured_baselines() if f.name not in seen)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)

    for where, message in ctx.errors:
        report.add_error(where, message)
    print(report.table())
    if args.json:
        try:
            report.write_json(args.json)
        except OSError as exc:
            print(f"bench: cannot write JSON report to {args.json!r}: {exc}", file=sys.stderr)
            return 1
        ctx.log(f"wrote {args.json}")
    if ctx.errors:
        for where, message in ctx.errors:
            print(f"bench: FAILED {where}: {message}", file=sys.stderr)
        return 1
    return 0
