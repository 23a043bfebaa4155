"""The driver-domain watchdog: dom0 restarts a driver domain that dies or hangs.

In Xen
    A driver domain is an ordinary domain as far as the hypervisor cares.
    When it crashes the hypervisor raises VIRQ_DOM_EXC in dom0 and the
    toolstack applies ``on_crash``; with ``on_crash = "restart"`` it is
    destroyed and built again, and libxl re-adds the backends of the devices
    it served, so the guests' frontends reconnect (Xen's "driver domain
    restart" and the idea behind MINIX 3's reincarnation server).  A driver
    domain that *hangs* (alive, not answering) is not a crash to the
    hypervisor; something must notice.  Xen offers SCHEDOP_watchdog for that.

Here
    Death: the hypervisor sees the process die at once (a pidfd), marks the
    domain crashed and raises VIRQ_DOM_EXC; the Toolstack's
    ``handle_dom_exc`` tears it down and re-creates it from its config, and
    the devices layer's ``build`` hook rebinds every disk it served to the new
    domid.  This module adds the *hang* half: every driver domain writes an
    increasing counter to ``/local/domain/<id>/data/heartbeat``; the
    watchdog checks each one every ``timeout / 4`` seconds, and a driver
    domain whose counter has not moved for ``timeout`` seconds (and that the
    toolstack has not paused on purpose) is destroyed and re-created exactly
    as if it had crashed, when its ``on_crash`` asks for a restart.

    ``timeout`` is the environment variable ``MICROXEN_WATCHDOG_TIMEOUT``
    (seconds, default 3), overridden at run time by the XenStore node
    ``/local/domain/0/watchdog/timeout`` if dom0 finds one there.  Every
    re-creation of a driver domain is counted in
    ``/local/domain/0/watchdog/<name>/restarts`` (by the devices layer, which
    sees every rebuild) and every hang in ``.../hangs``, so tests and people
    can see them.

Invariant
    The watchdog only ever touches driver domains (``driver_domain = 1``),
    never a guest or dom0, and a domain freshly (re)built gets a grace period
    to write its first heartbeat.

Where this differs from Xen
    Xen's watchdog is a hypervisor timer the guest kicks; ours is a XenStore
    node dom0 reads, so it is visible with ``xl xenstore-read``.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from domains.dom0.toolstack.libxl import Toolstack

log = logging.getLogger("watchdog")

DEFAULT_TIMEOUT = 3.0
#: Extra time a newly built driver domain has before its first heartbeat counts.
BOOT_GRACE = 5.0
RESTART_ACTIONS = ("restart", "rename-restart", "coredump-restart")


@dataclass
class _Seen:
    value: bytes | None
    since: float


class Watchdog:
    def __init__(self, toolstack: "Toolstack", xs, timeout: float | None = None) -> None:
        self.toolstack = toolstack
        self.xs = xs
        if timeout is None:
            try:
                timeout = float(os.environ.get("MICROXEN_WATCHDOG_TIMEOUT", DEFAULT_TIMEOUT))
            except ValueError:
                timeout = DEFAULT_TIMEOUT
        self.timeout = max(0.2, timeout)
        self.seen: dict[int, _Seen] = {}

    async def _current_timeout(self) -> float:
        try:
            return max(0.2, float((await self.xs.read("/local/domain/0/watchdog/timeout")).decode()))
        except (OSError, ValueError):
            return self.timeout

    async def run(self) -> None:
        while True:
            self.timeout = await self._current_timeout()
            await trio.sleep(self.timeout / 4)
            try:
                await self.check()
            except Exception:
                log.exception("watchdog check failed")

    async def check(self) -> None:
        now = time.monotonic()
        records = self.toolstack.records
        infos = {i["domid"]: i for i in await self.toolstack.hv.call("sysctl", "getdomaininfolist")}
        for domid in list(self.seen):
            if domid not in records:
                del self.seen[domid]
        for domid, record in list(records.items()):
            if not getattr(record.config, "driver_domain", False):
                continue
            info = infos.get(domid)
            if info is None or info["shutdown_reason"] is not None:
                continue            # dead ones are VIRQ_DOM_EXC's business
            try:
                value = await self.xs.read(f"/local/domain/{domid}/data/heartbeat")
            except OSError:
                value = None
            seen = self.seen.get(domid)
            if seen is None:
                self.seen[domid] = _Seen(value, now + (BOOT_GRACE if value is None else 0.0))
                continue
            if value != seen.value or "p" in info["state"]:
                seen.value, seen.since = value, max(now, seen.since)
                continue
            if now - seen.since > self.timeout:
                await self.restart(domid, f"no heartbeat for {now - seen.since:.1f}s")

    async def restart(self, domid: int, why: str) -> None:
        """Destroy a driver domain and, if its on_crash says so, build it again."""
        ts = self.toolstack
        record = ts.records.get(domid)
        if record is None:
            return
        cfg = record.config
        log.warning("driver domain %s (d%d) is hung: %s", cfg.name, domid, why)
        await ts.k.printk(f"watchdog: d{domid} ({cfg.name}) hung ({why}) -> {cfg.on_crash}")
        self.seen.pop(domid, None)
        await bump(self.xs, cfg.name, "hangs")
        if cfg.on_crash in RESTART_ACTIONS:
            await ts.restart(domid)       # destroys the hung one before building anew
        else:
            await ts._teardown(domid)


async def bump(xs, name: str, counter: str) -> int:
    """Add one to ``/local/domain/0/watchdog/<name>/<counter>``; return the new value."""
    node = f"/local/domain/0/watchdog/{name}/{counter}"
    try:
        n = int((await xs.read(node)).decode() or 0)
    except (OSError, ValueError):
        n = 0
    await xs.write(node, str(n + 1).encode())
    return n + 1
