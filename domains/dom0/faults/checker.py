"""The checker: did a fault get recovered from, was anything lost, did anything else stop?

Jepsen's lesson, applied to driver isolation: a fault is only worth
injecting with a checker that knows what the system promised.  Ours checks:

- *recovery*: after the fault has ended (its duration is over, its count is
  spent, or the domain it killed has been re-created), every guest running the
  disk workload completes I/O again.  Completions are counted inside each
  guest by the fault agent (``faultpoint.count``) and read with a probe, so
  recovery is seen within milliseconds, not at the workload's 0.5 s
  publishing tick.  Recovery time runs from injection to that moment;
- *guest-visible errors*: requests the guest saw fail (error completions
  counted by the same probe);
- *guest crashes*: a guest whose domid or pid changed;
- *lost writes and corrupted reads*: every acknowledged write is checked by
  the guests' disk workload on read-back and in a final full sweep
  (``data/workload/sweep``); each failure is printed on the guest's console,
  where the checker reads it and sorts it: an older version or zeros where a
  newer write was acknowledged is a lost write, anything else a corrupted read;
- *isolation*: dom0 answers, the hypervisor lives, and the domains the fault
  was not aimed at (dom0, bystander guests) keep their identity and progress.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass

from domains.dom0.client import APIError, NotRunning
from domains.dom0.faults.inject import FaultInjector, Injection

_FAILURE = re.compile(r"VERIFY FAILURE(?: \(sweep\))? block (\d+): expected version (\d+)(?:\.\.\d+)?, read (.*?)(?: \|.*)?$")
_READ = re.compile(r"block (\d+) version (\d+) of d(\d+)")


@dataclass
class Outcome:
    outcome: str
    recovery_ms: float | None
    notes: str = ""


class Checker:
    def __init__(self, fi: FaultInjector, run_dir: str) -> None:
        self.fi = fi
        self.run_dir = run_dir
        doms = self._settled(fi)
        self.disk_guests = sorted(n for n, d in doms.items()
                                  if fi.xs.directory(f"/local/domain/{d['domid']}/device/vbd"))
        self.net_guests = sorted(n for n, d in doms.items()
                                 if fi.xs.directory(f"/local/domain/{d['domid']}/device/vif"))
        self.drivers = sorted(n for n, d in doms.items() if n != "Domain-0"
                              and fi.is_driver_domain(d["domid"]))
        self.bystanders = sorted(n for n in doms if n not in self.disk_guests
                                 and n not in self.net_guests
                                 and n not in self.drivers and n != "Domain-0")
        #: every guest whose I/O the checker follows (disk, network or both)
        self.io_guests = sorted(set(self.disk_guests) | set(self.net_guests))
        self.identity = {n: (d["domid"], d.get("pid")) for n, d in doms.items()}
        self.hv_pid = _read_pid(os.path.join(run_dir, "hypervisor.pid"))
        self.findings = {"guest_crashes": 0, "unaffected_domain_disruptions": 0,
                         "hypervisor_or_dom0_failures": 0, "notes": []}
        self.bystander_ops = {n: self.counter(n, "ops") for n in self.bystanders}
        self._last_target = ""

    @staticmethod
    def _settled(fi: FaultInjector, timeout: float = 60.0) -> dict:
        """The domains, once each has shown what it is: a driver domain its heartbeat,
        a guest its workload counters."""
        deadline = time.monotonic() + timeout
        while True:
            doms = fi.domains()
            pending = [n for n, d in doms.items() if n != "Domain-0"
                       and not fi.is_driver_domain(d["domid"])
                       and not fi.xs.directory(f"/local/domain/{d['domid']}/data/workload")]
            if not pending or time.monotonic() > deadline:
                return doms
            time.sleep(0.1)

    # -- observations ------------------------------------------------------------------
    def counter(self, name: str, key: str) -> float:
        try:
            domid = self.fi.find(name)["domid"]
        except Exception:
            return -1
        base = f"/local/domain/{domid}/data/workload"
        raw = self.fi.xs.read_or(f"{base}/{key}")
        for prefix in ("disk_", "net_"):     # a combined workload prefixes its parts' counters
            if raw is None:
                raw = self.fi.xs.read_or(f"{base}/{prefix}{key}")
        try:
            return float(raw.decode()) if raw else 0.0
        except ValueError:
            return 0.0

    def serves(self, name: str, devtype: str) -> bool:
        try:
            return self.fi.serves(self.fi.find(name)["domid"], devtype)
        except Exception:
            return False

    def probes(self) -> dict[str, tuple[int, int, int] | None]:
        return {g: self.fi.probe(g, timeout=1.0) for g in self.io_guests}

    def _progressed(self, g: str, now: tuple | None, then: tuple | None) -> bool:
        """Has guest ``g`` completed block I/O (if it has a disk) and received a
        checked datagram (if it has a vif) since ``then``?"""
        if now is None:
            return False
        if then is None:
            return True
        disk = g not in self.disk_guests or now[0] > then[0]
        net = g not in self.net_guests or now[2] > then[2]
        return disk and net

    def wait_warm(self, minimum: int = 50, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            p = self.probes()
            if all(v is not None and (g not in self.disk_guests or v[0] >= minimum)
                   and (g not in self.net_guests or v[2] >= minimum) for g, v in p.items()):
                return
            time.sleep(0.1)
        raise RuntimeError(f"the disk workloads did not start within {timeout}s: {self.probes()}")

    # -- one fault ---------------------------------------------------------------------
    def await_recovery(self, inj: Injection, before: dict, timeout: float) -> Outcome:
        """Wait for the fault to end and every disk guest to complete I/O again."""
        fi = self.fi
        t = inj.type
        deadline = inj.t0 + timeout
        if t.restart:
            # The domain is gone once; a new one with the same name must appear.
            while time.monotonic() < deadline:
                d = fi.domains().get(inj.domain)
                if d is not None and d["domid"] != inj.domid:
                    break
                time.sleep(0.005)
            else:
                fi.clear(inj)
                return Outcome("unrecovered", None, f"{inj.domain} was not re-created")
        elif t.how != "outside":
            fi.wait_armed(inj, timeout=max(0.1, deadline - time.monotonic()))
            if inj.params.get("duration"):
                time.sleep(max(0.0, inj.ends_at - time.monotonic()))
            else:
                end = min(deadline, time.monotonic() + 3.0)
                while time.monotonic() < end and not fi.agent_status(inj).startswith("done"):
                    time.sleep(0.005)
        else:
            time.sleep(max(0.0, inj.ends_at - time.monotonic()))
        fi.clear(inj)
        base = self.probes()
        done: dict[str, tuple[int, int, int]] = {}
        while time.monotonic() < deadline and len(done) < len(self.io_guests):
            for g in self.io_guests:
                if g in done:
                    continue
                p = fi.probe(g, timeout=0.5)
                if self._progressed(g, p, base.get(g)):
                    done[g] = p
            if len(done) < len(self.io_guests):
                time.sleep(0.005)
        ms = (time.monotonic() - inj.t0) * 1000
        crashed = self.guest_identity_changes()
        if crashed:
            self.findings["guest_crashes"] += len(crashed)
            self.findings["notes"].append(f"{inj.id} {t.name}: guest(s) {', '.join(crashed)} crashed")
            return Outcome("guest_crashes", ms, ", ".join(crashed))
        if len(done) < len(self.io_guests):
            missing = [g for g in self.io_guests if g not in done]
            return Outcome("unrecovered", None, f"no I/O completed in {', '.join(missing)}")
        errors = sum(done[g][1] - (before.get(g) or (0, 0))[1] for g in done
                     if before.get(g) is not None)
        if errors > 0:
            return Outcome("recovered_with_guest_visible_error", ms, f"{errors} failed requests")
        return Outcome("recovered_transparently", ms)

    def guest_identity_changes(self) -> list[str]:
        doms = self.fi.domains()
        changed = []
        for g in self.io_guests:
            d = doms.get(g)
            now = (d["domid"], d.get("pid")) if d else None
            if now != self.identity.get(g):
                changed.append(g)
                if now is not None:
                    self.identity[g] = now
        return changed

    def isolation(self, target: str) -> list[str]:
        """Problems with domains the fault was not aimed at, dom0 and the hypervisor."""
        problems = []
        if self.hv_pid is None or not _alive(self.hv_pid):
            self.findings["hypervisor_or_dom0_failures"] += 1
            problems.append("the hypervisor process is gone")
            return problems
        try:
            if self.fi.api.call("ping") != "pong":
                raise APIError("bad ping reply")
            doms = self.fi.domains()
        except (APIError, NotRunning, OSError) as exc:
            self.findings["hypervisor_or_dom0_failures"] += 1
            problems.append(f"dom0 does not answer: {exc}")
            return problems
        # The fault's target (and the previous one, whose restart may have ended
        # since) may change identity; every other domain must not.
        aimed = {target, self._last_target}
        self._last_target = target or self._last_target
        for name in ["Domain-0", *self.bystanders, *self.drivers]:
            d = doms.get(name)
            now = (d["domid"], d.get("pid")) if d else None
            if name in aimed or (not target and name in self.drivers):
                if now is not None:
                    self.identity[name] = now
                continue
            if now != self.identity.get(name):
                problems.append(f"{name} changed from {self.identity.get(name)} to {now}")
                self.findings["unaffected_domain_disruptions"] += 1
                if name == "Domain-0":
                    self.findings["hypervisor_or_dom0_failures"] += 1
                if now is not None:
                    self.identity[name] = now
        return problems

    def bystander_progress(self) -> list[str]:
        stalled = []
        for n in self.bystanders:
            ops = self.counter(n, "ops")
            if ops <= self.bystander_ops.get(n, 0):
                stalled.append(n)
                self.findings["unaffected_domain_disruptions"] += 1
            self.bystander_ops[n] = ops
        return stalled

    # -- the end -------------------------------------------------------------------------
    def final(self, sweep_timeout: float = 120.0) -> dict:
        """Ask every disk guest for a full read-back sweep, then count what was lost."""
        fi = self.fi
        started = {}
        for g in self.disk_guests:
            started[g] = self.counter(g, "sweeps")
            domid = fi.find(g)["domid"]
            fi.xs.write(f"/local/domain/{domid}/data/workload/sweep", "1")
        deadline = time.monotonic() + sweep_timeout
        pending = set(self.disk_guests)
        while pending and time.monotonic() < deadline:
            for g in list(pending):
                domid = fi.find(g)["domid"]
                if fi.xs.read_or(f"/local/domain/{domid}/data/workload/sweep") == b"" and \
                        self.counter(g, "sweeps") > started[g]:
                    pending.discard(g)
            time.sleep(0.1)
        if pending:
            self.findings["notes"].append(f"final sweep did not finish in {', '.join(sorted(pending))}")
        time.sleep(0.6)     # one publishing period of the workload's counters
        lost, corrupted, counted, errors = 0, 0, 0, 0
        for g in self.disk_guests:
            counted += int(max(0, self.counter(g, "verify_failures")))
            errors += int(max(0, self.counter(g, "errors")))
            for line in _console_lines(self.run_dir, g):
                m = _FAILURE.search(line)
                if not m:
                    continue
                block, want, got = int(m.group(1)), int(m.group(2)), m.group(3).strip()
                r = _READ.search(got)
                if got == "zeros" or (r and int(r.group(1)) == block and int(r.group(2)) < want):
                    lost += 1
                else:
                    corrupted += 1
                if len(self.findings["notes"]) < 40:
                    self.findings["notes"].append(f"{g}: {line.strip()}")
        if counted > lost + corrupted:     # failures the console lost: count them as lost
            lost += counted - lost - corrupted
        self.findings["network"] = self.network()
        corrupted += self.findings["network"]["udp_corrupted"]
        self.findings.update(lost_writes=lost, corrupted_reads=corrupted,
                             verify_failures=counted, guest_io_errors=errors,
                             unswept=sorted(pending))
        return self.findings


    def network(self) -> dict:
        """The UDP checker's totals over every networked guest.

        UDP promises nothing, so datagrams lost while a vif reconnects (or
        its driver domain restarts), duplicated or reordered are *reported*,
        not failures: ``udp_lost`` counts sequence numbers below a receiver's
        highest that never arrived.  A datagram whose body does not match its
        header is data corruption, which nothing excuses: ``udp_corrupted``
        counts those (each guest prints ``UDP VERIFY FAILURE``), and they are
        added to ``corrupted_reads``.
        """
        out = {"udp_tx": 0, "udp_rx": 0, "udp_lost": 0, "udp_dup": 0, "udp_reordered": 0,
               "udp_corrupted": 0}
        for g in self.net_guests:
            for key in ("udp_tx", "udp_rx", "udp_lost", "udp_dup", "udp_reordered"):
                out[key] += int(max(0, self.counter(g, key)))
            out["udp_corrupted"] += sum(1 for ln in _console_lines(self.run_dir, g, "UDP VERIFY FAILURE"))
        out["udp_loss_ratio"] = round(out["udp_lost"] / out["udp_tx"], 6) if out["udp_tx"] else 0.0
        return out


def _console_lines(run_dir: str, name: str, what: str = "VERIFY FAILURE") -> list[str]:
    try:
        with open(os.path.join(run_dir, "console", f"{name}.log"), errors="replace") as f:
            return [ln for ln in f if what in ln and (what != "VERIFY FAILURE"
                                                     or "UDP VERIFY FAILURE" not in ln)]
    except OSError:
        return []


def _read_pid(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
