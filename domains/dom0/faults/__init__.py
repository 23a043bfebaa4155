"""Fault injection: faults on demand, campaigns with a checker, and a report.

- ``run.py fault --list`` describes every fault kind (catalogue.py);
- ``run.py fault KIND DOMAIN [options]`` injects one into a running system
  (inject.py), waits for it to end and says what the domain reported;
- ``run.py campaign ...`` boots a system, injects many, checks each and writes
  a report (campaign.py, checker.py, report.py);
- ``pytest_plugin.py`` gives tests the same powers as fixtures.

The in-domain half (fault points, the fault agent) is domains/kernel/faultpoint.py.
"""

from __future__ import annotations

import argparse
import sys
import time


def fault_main(argv: list[str]) -> int:
    from domains.dom0.client import APIError, NotRunning, resolve_run_dir
    from domains.dom0.faults.catalogue import describe
    from domains.dom0.faults.inject import FaultError, FaultInjector
    p = argparse.ArgumentParser(prog="run.py fault",
                                description="inject one fault into a running system")
    p.add_argument("--list", action="store_true", help="describe every fault kind and mode")
    p.add_argument("kind", nargs="?", help="crash, hang, slow, corrupt, events, control, "
                   "resources (or KIND/MODE)")
    p.add_argument("domain", nargs="?", help="target domain, by name or id")
    p.add_argument("--mode", help="which variant of the kind (see --list)")
    p.add_argument("--run-dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="for control faults: the device (FRONTEND_ID/DEVID or DEVID)")
    for opt, conv in (("duration", float), ("delay", float), ("prob", float), ("count", int),
                      ("fraction", float)):
        p.add_argument(f"--{opt}", type=conv)
    p.add_argument("--node", help="for control/xs-*: which backend node (default state)")
    p.add_argument("--value", help="for control/xs-rewrite: the value to write")
    p.add_argument("--no-wait", action="store_true",
                   help="leave the fault armed and return (clear it with xl xenstore-rm)")
    args = p.parse_args(argv)
    if args.list:
        print(describe())
        return 0
    if not args.kind or not args.domain:
        p.print_usage(sys.stderr)
        print("run.py fault: give KIND and DOMAIN, or --list", file=sys.stderr)
        return 2
    run_dir = resolve_run_dir(args.run_dir)
    try:
        fi = FaultInjector(run_dir)
    except (NotRunning, OSError) as exc:
        print(f"run.py fault: {exc}", file=sys.stderr)
        return 1
    try:
        params = {k: getattr(args, k) for k in ("duration", "delay", "prob", "count", "fraction",
                                                 "node", "value")}
        inj = fi.inject(args.kind, args.domain, args.mode, seed=args.seed, device=args.device,
                        **params)
        print(f"injected {inj.type.name} into {inj.domain} (d{inj.domid}): {inj.detail}")
        if not fi.wait_armed(inj):
            print(f"warning: {inj.domain} has not acknowledged the fault (is its fault agent "
                  f"running?)", file=sys.stderr)
        if args.no_wait:
            if inj.node:
                print(f"left armed at {inj.node}")
            return 0
        if inj.params.get("duration"):
            time.sleep(max(0.0, inj.ends_at - time.monotonic()))
        elif inj.type.how != "outside":
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and not fi.agent_status(inj).startswith("done"):
                time.sleep(0.02)
        status = fi.agent_status(inj)
        fi.clear(inj)
        print(f"fault over ({status or 'no report from the domain'}); expected: {inj.type.expect}")
        return 0
    except (FaultError, APIError, OSError) as exc:
        print(f"run.py fault: {exc}", file=sys.stderr)
        return 1
    finally:
        fi.close()


def campaign_main(argv: list[str]) -> int:
    from domains.dom0.faults import campaign
    return campaign.main(argv)


__all__ = ["fault_main", "campaign_main"]
