"""The xenbus side of netback: one vif's handshake, and the bridges its vifs join.

In Xen
    Linux's netback (drivers/net/xen-netback/xenbus.c) is probed for every
    ``backend/vif/<fe>/<devid>`` directory the toolstack writes.  It
    publishes what it offers (``feature-rx-copy``, ``feature-sg``, ...) and
    goes to InitWait.  netfront allocates its tx and rx rings, grants them,
    makes an event channel and writes ``tx-ring-ref``, ``rx-ring-ref``,
    ``event-channel`` and ``request-rx-copy = 1``.  netback maps the rings,
    binds the channel, and goes to Connected; the hotplug script has already
    put the interface ``vif<fe>.<devid>`` on the bridge named in ``bridge``.
    When the frontend closes (or the guest dies) netback disconnects and
    waits for it to start over.

Here
    :class:`NetifBackend` is that handshake for one vif, as a trio task the
    driver domain's :class:`~domains.kernel.xenbus.BackendWatcher` starts and
    cancels.  The data path is :class:`~domains.driverdom.netback.Netback`;
    the "hotplug script" is :class:`Bridges`, which joins the vif to the
    software :class:`~domains.driverdom.bridge.Bridge` named by ``bridge``
    (made on first use, default ``xenbr0``).  The handshake mirrors
    blkback's: InitWait, connect only on the frontend's Initialised (a
    frontend still showing Connected speaks of a ring from a previous
    backend), Connected; when the frontend leaves, Closing and Closed, then
    InitWait again for its next attempt.

Invariant
    Nothing the frontend writes crashes this domain.  Missing or garbage
    ring references, an event channel that cannot be bound, or
    ``request-rx-copy`` not 1 close this vif with an ``error`` node saying
    why.  A frontend that breaks the ring protocol at run time (netback's
    :attr:`~domains.driverdom.netback.Netback.error`) gets its vif
    disconnected (state Closed, ``error`` written) and is not served again
    until its directory is re-made; every other vif carries on.  A failure
    that is not the frontend's (a hypercall the hypervisor refused, the event
    channel lost) raises BackendError instead: the driver domain's
    BackendWatcher restarts the vif with a fresh handshake after a back-off,
    and its progress check restarts a vif whose rings stall.

Where this differs from Xen
    No hotplug script and no kernel interface: the bridge is in this
    process.  One queue per vif (no ``multi-queue-*``), no split event
    channels, no GSO/checksum offload; see netback.py.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio

from domains.driverdom.bridge import Bridge, BridgeError
from domains.driverdom.netback import Netback
from domains.kernel.grant_table import GrantError
from domains.kernel.xenbus import (FRONTEND_GONE, XenbusState, backend_fail, backend_handshake,
                                   device_progress, frontend_is, read_nodes, switch_state,
                                   to_int, wait_until, write_nodes)

if TYPE_CHECKING:
    from domains.kernel.boot import Kernel

log = logging.getLogger("netif_backend")

DEFAULT_BRIDGE = "xenbr0"


class Bridges:
    """The driver domain's bridges, by name; a bridge exists once a vif names it."""

    def __init__(self) -> None:
        self.by_name: dict[str, Bridge] = {}

    def get(self, name: str) -> Bridge:
        bridge = self.by_name.get(name)
        if bridge is None:
            bridge = self.by_name[name] = Bridge(name)
            log.info("created bridge %s", name)
        return bridge


class VifRefused(Exception):
    """This vif cannot be served; the message says why (it goes to ``error``)."""


class BackendError(Exception):
    """This attempt failed for a reason that is not the frontend's (a hypercall
    the hypervisor refused, a lost event channel); it propagates so the
    BackendWatcher restarts the vif, with a fresh handshake, after a back-off."""


class NetifBackend:
    """One vif's backend: ``/local/domain/<self>/backend/vif/<fe>/<devid>``."""

    def __init__(self, k: "Kernel", xs, bridges: Bridges, path: str) -> None:
        self.k = k
        self.xs = xs
        self.bridges = bridges
        self.path = path
        self.netback: Netback | None = None

    async def run(self) -> None:
        xs, path = self.xs, self.path
        raw = await read_nodes(xs, [f"{path}/{k}" for k in ("frontend", "frontend-id", "handle",
                                                             "bridge")])
        fe_path = (raw[0] or b"").decode(errors="replace")
        fe_id, handle = to_int(raw[1]), to_int(raw[2], 0)
        bridge_name = (raw[3] or DEFAULT_BRIDGE.encode()).decode(errors="replace").strip() \
            or DEFAULT_BRIDGE
        if not fe_path or fe_id is None:
            await self._fail(f"incomplete backend directory (frontend={fe_path!r}, "
                             f"frontend-id={fe_id!r})")
            return
        name = f"vif{fe_id}.{handle}"
        await write_nodes(xs, ((f"{path}/{key}", value) for key, value in (
            ("feature-rx-copy", 1), ("feature-rx-flip", 0), ("feature-sg", 1),
            ("feature-gso-tcpv4", 0), ("feature-multicast-control", 0))))
        log.info("%s: %s for d%d on bridge %s", path, name, fe_id, bridge_name)
        await backend_handshake(
            xs, path, fe_path, lambda: self._connect_and_serve(fe_path, fe_id, name, bridge_name),
            VifRefused, log)

    async def _fail(self, why: str) -> None:
        await backend_fail(self.xs, self.path, why, log)

    async def _connect_and_serve(self, fe_path: str, fe_id: int, name: str,
                                 bridge_name: str) -> None:
        xs, k = self.xs, self.k
        raw = await read_nodes(xs, [f"{fe_path}/{k}" for k in ("tx-ring-ref", "rx-ring-ref",
                                                                "event-channel", "request-rx-copy")])
        tx_ref, rx_ref, evtchn = to_int(raw[0]), to_int(raw[1]), to_int(raw[2])
        rx_copy = to_int(raw[3], 0)
        if tx_ref is None or rx_ref is None or evtchn is None:
            raise VifRefused(f"frontend {fe_path} is Initialised without tx-ring-ref, "
                             f"rx-ring-ref and event-channel")
        if rx_copy != 1:
            raise VifRefused(f"frontend {fe_path} did not set request-rx-copy=1 "
                             f"(page flipping is not supported)")
        try:
            port = await k.events.bind_interdomain(fe_id, evtchn)
        except Exception as exc:
            # Often transient (out of ports for a moment): the watcher retries.
            raise BackendError(f"cannot bind event channel {evtchn} of d{fe_id}: {exc}") from None
        nb = None
        bridge = self.bridges.get(bridge_name)
        attached = False
        try:
            try:
                nb = await Netback.connect(k.grants, k.memory, fe_id, tx_ref, rx_ref, port,
                                           name=name)
            except GrantError as exc:
                raise VifRefused(f"cannot map tx-ring-ref {tx_ref}/rx-ring-ref {rx_ref} "
                                 f"of d{fe_id}: {exc}") from None
            except Exception as exc:
                raise BackendError(f"cannot map tx-ring-ref {tx_ref}/rx-ring-ref {rx_ref} "
                                   f"of d{fe_id}: {exc}") from None
            try:
                bport = bridge.add_port(nb.name, nb.deliver)
            except BridgeError as exc:
                raise VifRefused(str(exc)) from None
            attached = True
            nb.on_packet = lambda frame: bridge.input(bport, frame)
            self.netback = nb
            progress = device_progress(self.path)
            progress.add_ring(nb.tx)
            progress.add_ring(nb.rx, lambda: bool(nb.rx_queue) and nb.rx.unconsumed_requests() > 0)
            progress.kick = nb.kick
            progress.nudge = port.notify_nowait
            async with trio.open_nursery() as nursery:
                await nursery.start(nb.run)
                await switch_state(xs, self.path, XenbusState.Connected)
                log.info("%s: connected (tx-ring-ref %d, rx-ring-ref %d, port %d)",
                         self.path, tx_ref, rx_ref, port.port)

                async def watch_frontend() -> None:
                    await wait_until(xs, [f"{fe_path}/state"],
                                     frontend_is(xs, fe_path, FRONTEND_GONE))
                    nursery.cancel_scope.cancel()
                nursery.start_soon(watch_frontend)
                # nb.run is a child: it returns when the vif is closed or the
                # frontend broke the protocol.
                await _stopped(nb)
                nursery.cancel_scope.cancel()
            if nb.error is not None:
                if nb.frontend_at_fault:
                    raise VifRefused(f"disconnected: {nb.error}")
                raise BackendError(f"vif failed: {nb.error}")
        finally:
            with trio.CancelScope(shield=True):
                self.netback = None
                if attached:
                    try:
                        bridge.remove_port(name)
                    except BridgeError:
                        pass
                if nb is not None:
                    try:
                        await nb.close()
                    except Exception:
                        log.debug("%s: closing netback failed", self.path, exc_info=True)
                try:
                    await port.close()
                except Exception:
                    pass


async def _stopped(nb: Netback) -> None:
    await nb._stopped.wait()


async def serve(k: "Kernel", xs, bridges: Bridges, path: str) -> None:
    """The BackendWatcher entry: serve one vif until its directory goes."""
    await NetifBackend(k, xs, bridges, path).run()


__all__ = ["Bridges", "NetifBackend", "serve", "DEFAULT_BRIDGE"]
