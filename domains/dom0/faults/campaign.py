"""The campaign runner: many faults over time, each checked, and a report.

    python run.py campaign --faults N --seed S [--config FILE ...] [--report DIR]
                           [--duration SECONDS] [--kinds LIST] [--include LIST]

Boots a system in a run directory of its own (the default one: blkdom and
netdom, two guests running the verifying disk workload and a checked UDP
stream to each other, a bystander guest with no device;
or the xl.cfg files given), waits until the workloads run, then, for each
fault: draws a fault type (weighted, see catalogue.py), a driver-domain target
serving that fault's device type (blkdom for block faults, netdom for
network faults) and the fault's parameters from the seed; checks isolation; injects it; waits
until it has ended and every guest completes I/O again (see checker.py); and
records the outcome and the recovery time.  An unrecovered fault is repaired
by SIGKILLing the driver domain (so on_crash restarts it) and counted as
unrecovered.  At the end every guest sweeps its whole disk; the checker counts
lost writes and corrupted reads.  Exit status 0 only if nothing was lost,
no guest crashed, nothing was left unrecovered and nothing else was disturbed.

``--faults 0`` with ``--duration`` injects as many faults as fit; with both
set, faults are spread evenly over the duration.
"""

from __future__ import annotations

import argparse
import random
import signal
import sys
import time

from domains.dom0.client import APIError
from domains.dom0.faults import report
from domains.dom0.faults.catalogue import CATALOGUE, FaultType, lookup
from domains.dom0.faults.checker import Checker
from domains.dom0.faults.inject import FaultError, FaultInjector
from domains.dom0.faults.system import RunningSystem


def choose_types(kinds: str | None, include: str | None) -> list[tuple[FaultType, int]]:
    pool = [(t, t.campaign) for t in CATALOGUE if t.campaign and t.targets in ("driver", "any")]
    for name in (include or "").split(","):
        if name.strip():
            t = lookup(name.strip())
            if t.targets == "guest":
                raise FaultError(f"{t.name} targets guests; campaigns aim at driver domains")
            pool = [(x, w) for x, w in pool if x is not t] + [(t, max(t.campaign, 5))]
    if kinds:
        wanted = {k.strip() for k in kinds.split(",") if k.strip()}
        pool = [(t, w) for t, w in pool if t.kind in wanted or t.name in wanted]
    if not pool:
        raise FaultError(f"no fault type matches --kinds {kinds!r}")
    return pool


def draw(rng: random.Random, pool: list[tuple[FaultType, int]]) -> tuple[FaultType, dict, int]:
    t = rng.choices([p[0] for p in pool], weights=[p[1] for p in pool])[0]
    params = {}
    if "duration" in t.defaults:
        params["duration"] = round(rng.uniform(0.1, 0.4), 3)
    if "delay" in t.defaults:
        params["delay"] = round(rng.uniform(0.002, 0.03), 4)
    if "prob" in t.defaults:
        params["prob"] = round(rng.uniform(0.2, 0.9), 2)
    return t, params, rng.getrandbits(31)


def run(args: argparse.Namespace) -> int:
    pool = choose_types(args.kinds, args.include)
    system = RunningSystem(config_files=args.config or None, run_dir=args.run_dir)
    print(f"campaign: seed {args.seed}, {args.faults or 'unlimited'} faults"
          f"{f' over {args.duration:g} s' if args.duration else ''}; run dir {system.run_dir}",
          flush=True)
    records: list[dict] = []
    findings: dict = {}
    started = time.monotonic()
    fi = None
    try:
        system.up()
        fi = FaultInjector(system.run_dir)
        checker = Checker(fi, system.run_dir)
        system.remember(fi.domains())
        if not checker.drivers or not checker.io_guests:
            raise FaultError("the system needs a driver domain and a guest running the disk "
                             f"workload (drivers: {checker.drivers}, disk guests: {checker.disk_guests})")
        print(f"campaign: drivers {checker.drivers}, disk guests {checker.disk_guests}, "
              f"net guests {checker.net_guests}, "
              f"bystanders {checker.bystanders}; waiting for the workloads", flush=True)
        checker.wait_warm()
        rng = random.Random(args.seed)
        started = time.monotonic()
        last_bystander = started
        i = 0
        while True:
            if args.faults and i >= args.faults:
                break
            now = time.monotonic()
            if args.duration and now - started >= args.duration:
                break
            if args.duration and args.faults:
                time.sleep(max(0.0, started + i * args.duration / args.faults - now))
            i += 1
            t, params, seed = draw(rng, pool)
            targets = [d for d in checker.drivers if checker.serves(d, t.serves)]
            if not targets:
                continue
            target = rng.choice(targets)
            problems = checker.isolation(target)
            before = checker.probes()
            try:
                inj = fi.inject(t.kind, target, t.mode, seed=seed, **params)
            except FaultError as exc:
                print(f"[{i}] cannot inject {t.name} into {target}: {exc}", flush=True)
                continue
            try:
                system.remember(fi.domains())
                out = checker.await_recovery(inj, before, args.recovery_timeout)
            except (OSError, APIError, FaultError) as exc:
                # The checker lost sight of something mid-fault (a domain vanished
                # under a probe): count it as unrecovered rather than guess.
                from domains.dom0.faults.checker import Outcome
                out = Outcome("unrecovered", None, f"checker error: {exc}")
            problems += checker.isolation(target)
            if time.monotonic() - last_bystander > 5:
                stalled = checker.bystander_progress()
                problems += [f"bystander {n} made no progress" for n in stalled]
                last_bystander = time.monotonic()
            rec = {"n": i, "kind": t.kind, "fault": t.name, "target": target,
                   "t": round(inj.t0 - started, 3), "outcome": out.outcome,
                   "recovery_ms": None if out.recovery_ms is None else round(out.recovery_ms, 1),
                   "notes": out.notes, "detail": inj.detail, "seed": seed}
            if problems:
                rec["isolation"] = problems
            records.append(rec)
            if out.outcome != "recovered_transparently" or problems or i % args.progress_every == 0 \
                    or i <= 3:
                ms = "-" if out.recovery_ms is None else f"{out.recovery_ms:.0f} ms"
                print(f"[{i}{'/' + str(args.faults) if args.faults else ''} "
                      f"{time.monotonic() - started:6.1f}s] {t.name} -> {target}: {out.outcome} "
                      f"{ms} {out.notes} {'; '.join(problems)}".rstrip(), flush=True)
            if out.outcome == "unrecovered":
                _repair(fi, checker, target)
        elapsed = time.monotonic() - started
        print(f"campaign: {len(records)} faults in {elapsed:.1f} s; final read-back sweep...",
              flush=True)
        findings = checker.final()
        checker.isolation("")
    except KeyboardInterrupt:
        print("campaign: interrupted", file=sys.stderr)
        elapsed = time.monotonic() - started
        findings = {"notes": ["interrupted"]}
    finally:
        if fi is not None:
            fi.close()
        leftovers = system.down(check=False)
        if leftovers:
            findings.setdefault("notes", []).extend(leftovers)
        system.cleanup()
    summary = report.summarise(records, findings, elapsed,
                               {"seed": args.seed, "kinds_allowed": [t.name for t, _ in pool]})
    print(f"campaign: {summary['faults_injected']} faults, {summary['faults_per_minute']}/min; "
          + ", ".join(f"{k}={summary[k]}" for k in (*report.OUTCOMES, "lost_writes",
                      "corrupted_reads", "unaffected_domain_disruptions",
                      "hypervisor_or_dom0_failures"))
          + f"; recovery ms p50={summary['recovery_ms']['p50']} p99={summary['recovery_ms']['p99']}"
            f" max={summary['recovery_ms']['max']}", flush=True)
    if args.report:
        for p in report.write(args.report, summary, records):
            print(f"campaign: wrote {p}")
    return 0 if summary["passed"] else 1


def _repair(fi: FaultInjector, checker: Checker, target: str) -> None:
    """Put the system back together after an unrecovered fault: restart the driver domain."""
    try:
        info = fi.domains().get(target)
        if info and info.get("pid"):
            import os
            os.kill(info["pid"], signal.SIGCONT)
            os.kill(info["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            d = fi.domains().get(target)
            if d is not None and (info is None or d["domid"] != info["domid"]):
                break
            time.sleep(0.05)
        checker.guest_identity_changes()
        print(f"campaign: repaired by restarting {target}", flush=True)
    except Exception as exc:
        print(f"campaign: repair of {target} failed: {exc}", flush=True)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="run.py campaign", description=__doc__.split("\n\n")[0])
    p.add_argument("--faults", type=int, default=20, help="how many faults (0: as many as fit in --duration)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--config", action="append", default=[], metavar="FILE",
                   help="an xl.cfg file of the system to boot (repeatable)")
    p.add_argument("--report", metavar="DIR", help="write report.json, report.md, recovery.png here")
    p.add_argument("--duration", type=float, default=0.0, metavar="SECONDS")
    p.add_argument("--kinds", help="only these kinds or kind/mode names (comma-separated)")
    p.add_argument("--include", help="also draw these kind/mode names (e.g. corrupt/lose-write)")
    p.add_argument("--run-dir", help="run directory for the campaign's system (default: a fresh one)")
    p.add_argument("--recovery-timeout", type=float, default=20.0, metavar="SECONDS")
    p.add_argument("--progress-every", type=int, default=25, metavar="N")
    return p


def _terminated(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    if args.faults < 0 or (args.faults == 0 and not args.duration):
        print("run.py campaign: --faults must be positive, or 0 with --duration", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _terminated)   # like Ctrl-C: the system goes down, a report
    try:
        return run(args)
    except FaultError as exc:
        print(f"run.py campaign: {exc}", file=sys.stderr)
        return 2
