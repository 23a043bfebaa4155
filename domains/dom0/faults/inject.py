"""Injecting one fault into a running system, from outside it.

The :class:`FaultInjector` is what ``run.py fault``, the campaign runner and
the pytest plugin share.  It talks to the system the way dom0's tools do: the
management API (domain list, pids, memory targets), xenstored's socket (fault
specs, device nodes) and, for faults that come from outside any domain, the
host (signals).  Point and agent faults are written to
``/local/domain/<id>/faults/<fault-id>`` as a dom0-owned node the target's
fault agent arms (domains/kernel/faultpoint.py); the agent's answer appears
in ``/local/domain/<id>/data/faults/<fault-id>``.

Invariant
    An injection either happens completely (and is returned as an
    :class:`Injection` the caller can clear) or raises FaultError naming what
    was wrong, with nothing changed.
"""

from __future__ import annotations

import itertools
import os
import random
import signal
import time
from dataclasses import dataclass, field

from domains.dom0.client import APIError, Client
from domains.dom0.faults.catalogue import FaultType, lookup
from domains.dom0.faults.xs import XsSocket


class FaultError(Exception):
    """A fault that cannot be injected; the message says why."""


@dataclass
class Injection:
    id: str
    type: FaultType
    domain: str
    domid: int
    pid: int | None
    params: dict
    seed: int
    t0: float = field(default_factory=time.monotonic)
    wall: float = field(default_factory=time.time)
    node: str | None = None
    detail: str = ""
    restore: dict = field(default_factory=dict)
    cleared: bool = False

    @property
    def ends_at(self) -> float:
        """When a timed fault stops by itself (t0 for one-shot faults)."""
        return self.t0 + float(self.params.get("duration", 0) or 0)

    def to_dict(self) -> dict:
        return {"id": self.id, "fault": self.type.name, "domain": self.domain, "domid": self.domid,
                "params": self.params, "seed": self.seed, "wall": self.wall, "detail": self.detail}


_seq = itertools.count(1)


class FaultInjector:
    def __init__(self, run_dir: str) -> None:
        self.run_dir = run_dir
        self.api = Client(run_dir, timeout=15)
        self.xs = XsSocket(run_dir)

    def close(self) -> None:
        self.api.close()
        self.xs.close()

    # -- the system as dom0 sees it ------------------------------------------------
    def domains(self) -> dict[str, dict]:
        return {d["name"]: d for d in self.api.call("list") if "d" not in d["state"]}

    def find(self, domain: str | int) -> dict:
        for name, info in self.domains().items():
            if name == str(domain) or str(info["domid"]) == str(domain):
                return info
        raise FaultError(f"domain '{domain}' does not exist")

    def is_driver_domain(self, domid: int) -> bool:
        return self.xs.read_or(f"/local/domain/{domid}/data/heartbeat") is not None

    def backends(self, domid: int, devtype: str = "") -> list[str]:
        """Backend directories this domain serves (``.../backend/<vbd|vif>/<fe>/<devid>``)."""
        out = []
        for t in ([devtype] if devtype else ["vbd", "vif"]):
            root = f"/local/domain/{domid}/backend/{t}"
            for fe in self.xs.directory(root):
                for dev in self.xs.directory(f"{root}/{fe}"):
                    out.append(f"{root}/{fe}/{dev}")
        return out

    def serves(self, domid: int, devtype: str) -> bool:
        """Does this domain serve devices of ``devtype`` ("" : anything)?"""
        return not devtype or bool(self.xs.directory(f"/local/domain/{domid}/backend/{devtype}"))

    # -- inject ----------------------------------------------------------------------
    def inject(self, kind: str, domain: str | int, mode: str | None = None, seed: int = 0,
               device: str | None = None, **params) -> Injection:
        """Inject one fault; return at once (a timed fault runs on in the domain)."""
        try:
            t = lookup(kind, mode)
        except KeyError as exc:
            raise FaultError(str(exc)) from None
        info = self.find(domain)
        domid = info["domid"]
        if domid == 0:
            raise FaultError("faults are not injected into Domain-0: the campaign checks that "
                             "dom0 never stops")
        driver = self.is_driver_domain(domid)
        if t.targets == "driver" and not driver:
            raise FaultError(f"{t.name} targets driver domains; {info['name']} (d{domid}) is not one")
        if t.targets == "guest" and driver:
            raise FaultError(f"{t.name} targets guests (their frontends); {info['name']} is a "
                             f"driver domain")
        if t.serves and t.targets != "guest" and not self.serves(domid, t.serves):
            raise FaultError(f"{t.name} needs a driver domain serving {t.serves} devices; "
                             f"{info['name']} (d{domid}) serves none")
        merged = dict(t.defaults)
        for k, v in params.items():
            if v is not None:
                merged[k] = v
        inj = Injection(f"f{os.getpid() % 1000}x{next(_seq)}", t, info["name"], domid,
                        info.get("pid"), merged, seed)
        try:
            if t.how == "outside":
                self._outside(inj, device)
            else:
                self._arm(inj)
        except (OSError, APIError) as exc:
            raise FaultError(f"{info['name']} (d{domid}) changed under the injection "
                             f"(restarting?): {exc}") from None
        inj.t0 = time.monotonic()
        return inj

    def _spec(self, inj: Injection) -> str:
        t = inj.type
        words = [f"point={t.point or 'agent'}", f"action={t.action}", f"seed={inj.seed}"]
        for key in ("prob", "count", "duration", "delay"):
            if key in inj.params:
                words.append(f"{key}={inj.params[key]}")
        return " ".join(words)

    def _arm(self, inj: Injection) -> None:
        base = f"/local/domain/{inj.domid}/faults"
        if not self.xs.directory(f"/local/domain/{inj.domid}").count("faults"):
            self.xs.mkdir(base)
        # dom0 owns the directory; the domain may read it and nothing more.
        self.xs.set_perms(base, ["n0", f"r{inj.domid}"])
        inj.node = f"{base}/{inj.id}"
        self.xs.write(inj.node, self._spec(inj))
        self.xs.set_perms(inj.node, ["n0", f"r{inj.domid}"])
        inj.detail = self._spec(inj)

    def _outside(self, inj: Injection, device: str | None) -> None:
        t, p = inj.type, inj.params
        if t.mode in ("sigkill", "sigstop"):
            if not inj.pid:
                raise FaultError(f"no pid known for {inj.domain}")
            os.kill(inj.pid, signal.SIGKILL if t.mode == "sigkill" else signal.SIGSTOP)
            inj.detail = f"{t.mode.upper()} pid {inj.pid}"
        elif t.mode in ("xs-delete", "xs-rewrite"):
            paths = self.backends(inj.domid, t.serves)
            if device:
                paths = [x for x in paths if x.endswith("/" + device.replace(":", "/"))
                         or x.rsplit("/", 1)[-1] == device]
            if not paths:
                raise FaultError(f"{inj.domain} serves no device" + (f" {device}" if device else ""))
            path = random.Random(inj.seed).choice(sorted(paths))
            node = f"{path}/{p.get('node', 'state')}"
            if t.mode == "xs-delete":
                self.xs.rm(node)
                inj.detail = f"rm {node}"
            else:
                self.xs.write(node, str(p.get("value", "5")))
                inj.detail = f"write {node} = {p.get('value', '5')}"
        elif t.mode == "balloon":
            target = self.xs.read_or(f"/local/domain/{inj.domid}/memory/target")
            if target is None:
                raise FaultError(f"{inj.domain} has no memory/target")
            kib = int(target.decode() or 0)
            mib = max(1, int(kib / 1024 * float(p.get("fraction", 0.5))))
            inj.restore["target"] = kib
            try:
                self.api.call("mem_set", dom=inj.domid, mib=mib)
            except APIError as exc:
                raise FaultError(f"balloon {inj.domain}: {exc}") from None
            inj.detail = f"mem-set {mib} MiB (was {kib // 1024})"
        else:
            raise FaultError(f"{t.name}: no outside injection for this mode")

    # -- follow and clear -------------------------------------------------------------
    def agent_status(self, inj: Injection) -> str:
        raw = self.xs.read_or(f"/local/domain/{inj.domid}/data/faults/{inj.id}")
        return raw.decode(errors="replace") if raw is not None else ""

    def wait_armed(self, inj: Injection, timeout: float = 5.0) -> bool:
        """For point and agent faults: has the domain's agent armed it?"""
        if inj.type.how == "outside":
            return True
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.agent_status(inj)
            if st.startswith("error"):
                raise FaultError(f"{inj.domain} refused fault {inj.id}: {st}")
            if st:
                return True
            if not self._alive(inj):
                return True      # it took effect before it could say so (a crash)
            time.sleep(0.003)
        return False

    def _alive(self, inj: Injection) -> bool:
        return any(d["domid"] == inj.domid for d in self.domains().values())

    def clear(self, inj: Injection) -> None:
        """Disarm / undo: remove the spec, restore memory, SIGCONT a stopped domain that lives."""
        if inj.cleared:
            return
        inj.cleared = True
        if inj.node is not None:
            try:
                self.xs.rm(inj.node)
                self.xs.rm(f"/local/domain/{inj.domid}/data/faults/{inj.id}")
            except OSError:
                pass
        if "target" in inj.restore:
            try:
                self.api.call("mem_set", dom=inj.domid, mib=max(1, inj.restore["target"] // 1024))
            except APIError:
                pass
        if inj.type.mode == "sigstop" and inj.pid:
            try:
                os.kill(inj.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass

    # -- probes: is a guest completing I/O? -------------------------------------------
    def probe(self, domain: str | int, timeout: float = 2.0) -> tuple[int, int, int] | None:
        """(I/O completions, error completions, UDP datagrams received) the guest's
        agent has counted; None if it does not answer within ``timeout``."""
        try:
            domid = self.find(domain)["domid"]
        except FaultError:
            return None
        base = f"/local/domain/{domid}/faults"
        if "faults" not in self.xs.directory(f"/local/domain/{domid}"):
            self.xs.mkdir(base)
            self.xs.set_perms(base, ["n0", f"r{domid}"])
        token = f"p{next(_seq)}"
        self.xs.write(f"{base}/probe", token)
        deadline = time.monotonic() + timeout
        reply = f"/local/domain/{domid}/data/faults/probe"
        while time.monotonic() < deadline:
            raw = self.xs.read_or(reply)
            if raw:
                parts = raw.decode(errors="replace").split()
                if len(parts) >= 3 and parts[0] == token:
                    return int(parts[1]), int(parts[2]), int(parts[3]) if len(parts) > 3 else 0
            time.sleep(0.002)
        return None
