"""The xenbus side of netfront: connecting a vif, and reconnecting when its backend dies.

In Xen
    Linux's netfront (drivers/net/xen-netfront.c) is probed for every
    ``device/vif/<devid>`` directory.  It reads ``mac``, waits for the backend
    to reach InitWait, allocates and grants its tx and rx rings, allocates an
    event channel and, in one XenStore transaction, writes ``tx-ring-ref``,
    ``rx-ring-ref``, ``event-channel`` and ``request-rx-copy = 1``.  When the
    backend is Connected, the interface comes up.  If the backend goes away
    (its driver domain crashed and the toolstack made a new one), netfront
    tears down its rings and runs the same handshake with whatever backend
    ``backend`` now names.

Here
    :class:`NetifFrontend` is that handshake around the data path
    :class:`~domains.domu.netfront.Netfront`, for one vif.  One
    :class:`Netfront` lives as long as the vif: across a reconnection it is
    ``disconnect()``-ed (in-flight packets are kept), ``prepare()``-d for the
    new backend domid, and ``connect()``-ed to the new event channel, which
    replays the kept packets first.  A network stack on top
    (:class:`~domains.domu.netstack.NetStack`) therefore never notices
    anything but a pause.

    The backend is considered gone when any of these is seen: its ``state``
    leaves Connected (or its directory vanished with its domain), the
    frontend's ``backend`` node names another backend, the event channel's
    far end is no longer bound (the hypervisor unbinds a dead domain's
    channels and raises the survivor's port: a wake that brings no response
    on either ring is followed at once by a status check, and a check runs
    every :data:`PEER_CHECK` seconds regardless), or the backend broke the
    ring protocol (a producer index past the ring: netfront stops trusting
    it and we reconnect).  Only the hypervisor saying "not bound" counts: a
    status question that fails or goes unanswered keeps the connection.

    The guest's address: there is no DHCP here, so the guest reads the
    ``ip`` node the toolstack wrote in the backend directory (``xl.cfg``'s
    ``vif = ["ip=10.0.0.1/24, ..."]``; a bare address means /24).

Invariant
    A backend that misbehaves (a state that is no number, a refused
    handshake) costs a reconnection attempt, never an exception out of the
    driver.  Packets sent while disconnected wait for the next backend.

Where this differs from Xen
    Linux's netfront drops the packets in flight on reconnect; this one
    replays them (see netfront.py), so a receiver may see a duplicate but a
    sender loses nothing it queued.  One queue, one event channel.
"""

from __future__ import annotations

import ipaddress
import logging
from typing import TYPE_CHECKING

import trio

from domains.domu.blkfront import CLEANUP_TIMEOUT, RETRY_DELAY
from domains.domu.netfront import Netfront
from domains.kernel.xenbus import (FrontendDevice, XenbusState, connect_retrying,
                                   frontend_start_over, peer_gone, publish_and_wait_connected,
                                   first_device, read_node)
from ipc.ring import RingError

if TYPE_CHECKING:
    from domains.kernel.boot import Kernel

log = logging.getLogger("netif_frontend")

#: How often a connected frontend asks whether the backend's channel end is still
#: bound even when no wake made it suspicious (a fallback: death raises the port).
PEER_CHECK = 1.0
DEFAULT_PREFIX = 24


class NetifFrontend:
    """The vif ``device/vif/<devid>`` of this guest."""

    def __init__(self, k: "Kernel", xs, devid: int | str, nr_tx_pages: int = 64,
                 nr_rx_pages: int = 64) -> None:
        self.k = k
        self.xs = xs
        self.dev = FrontendDevice(xs, k.domid, "vif", devid)
        self.nr_tx_pages = nr_tx_pages
        self.nr_rx_pages = nr_rx_pages
        self.nf: Netfront | None = None
        self.mac: str = ""
        self.ip: str | None = None
        self.prefix_len = DEFAULT_PREFIX
        self.backend_path: str | None = None
        self.stats = {"reconnects": 0, "connects": 0}
        self._connected = trio.Event()
        self._next_connect = trio.Event()     # set (and replaced) at every connection
        self._first = trio.Event()

    # -- public ---------------------------------------------------------------------
    async def start(self, nursery: trio.Nursery, timeout: float = 60.0) -> "NetifFrontend":
        """Start the driver; return once the vif is connected the first time."""
        raw = await read_node(self.xs, f"{self.dev.nodename}/mac")
        self.mac = (raw or b"").decode(errors="replace").strip()
        if not self.mac:
            raise ValueError(f"{self.dev.nodename}/mac is missing: the toolstack writes it")
        await self.dev.watch_otherend(nursery)
        nursery.start_soon(self._run, nursery)
        with trio.fail_after(timeout):
            await self._first.wait()
        return self

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def wait_connected(self) -> None:
        await self._connected.wait()

    async def wait_reconnected(self, connects: int) -> None:
        """Wait until the vif has connected again since ``stats["connects"]`` was
        ``connects``, and is connected now.  The connection itself wakes the
        waiter: nothing polls."""
        while self.stats["connects"] <= connects or not self.connected:
            await self._next_connect.wait()

    # -- the connection loop ---------------------------------------------------------
    async def _run(self, nursery: trio.Nursery) -> None:
        while True:
            port = await connect_retrying(self.dev.nodename, lambda: self._connect(nursery),
                                          RETRY_DELAY, log)
            try:
                why = await self._watch(port.inner if isinstance(port, _WatchedPort) else port,
                                        port)
                log.info("%s: lost backend %s: %s", self.dev.nodename, self.backend_path, why)
            finally:
                with trio.CancelScope(shield=True):
                    await self._disconnect(port)
            self.stats["reconnects"] += 1

    async def _connect(self, nursery: trio.Nursery):
        dev, k = self.dev, self.k
        be_path, be_id = await dev.wait_for_backend({XenbusState.InitWait})
        if self.nf is None:
            self.nf = await Netfront.create(k.grants, k.memory, be_id, self.nr_tx_pages,
                                            self.nr_rx_pages)
            await nursery.start(self.nf.run)
        else:
            await self.nf.prepare(be_id)
        nf = self.nf
        port = _WatchedPort(await k.events.alloc_unbound(be_id), nf)
        self.backend_path = be_path

        try:
            if not await publish_and_wait_connected(dev, be_path, [
                    ("tx-ring-ref", str(nf.tx_ring_ref)), ("rx-ring-ref", str(nf.rx_ring_ref)),
                    ("event-channel", str(port.port)), ("request-rx-copy", "1"),
                    ("feature-rx-notify", "1")], log):
                await self._disconnect(port)
                return None
            if self.ip is None:
                await self._read_address(be_path)
            nf.connect(port)
            await dev.switch_state(XenbusState.Connected)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._disconnect(port)
            raise
        self._mark_connected()
        log.info("%s: connected to %s (mac %s, ip %s/%d)", dev.nodename, be_path, self.mac,
                 self.ip, self.prefix_len)
        return port

    def _mark_connected(self) -> None:
        """The vif is up on a new connection: wake whoever waits for one."""
        self.stats["connects"] += 1
        self._connected.set()
        woken, self._next_connect = self._next_connect, trio.Event()
        woken.set()
        self._first.set()

    def _mark_disconnected(self) -> None:
        if self._connected.is_set():
            self._connected = trio.Event()

    async def _read_address(self, be_path: str) -> None:
        raw = (await read_node(self.xs, f"{be_path}/ip") or b"").decode(errors="replace")
        for word in raw.split():
            try:
                iface = ipaddress.ip_interface(word if "/" in word else f"{word}/{DEFAULT_PREFIX}")
            except ValueError:
                continue
            if iface.version == 4:
                self.ip, self.prefix_len = str(iface.ip), iface.network.prefixlen
                return

    async def _watch(self, port, watched: "_WatchedPort") -> str:
        dev, be_path = self.dev, self.backend_path
        result: list[str] = []
        async with trio.open_nursery() as nursery:
            async def state_gone() -> None:
                result.append(await dev.wait_for_backend_gone(be_path))
                nursery.cancel_scope.cancel()

            async def channel_gone() -> None:
                while True:
                    with trio.move_on_after(PEER_CHECK):
                        await watched.suspect.wait()
                    watched.suspect = trio.Event()
                    if await peer_gone(port, dev.nodename):
                        result.append("backend's event channel is gone")
                        nursery.cancel_scope.cancel()
                        return

            async def ring_broken() -> None:
                if self.nf is not None:
                    await self.nf.broken.wait()
                    result.append("backend broke the ring protocol")
                    nursery.cancel_scope.cancel()
            nursery.start_soon(state_gone)
            nursery.start_soon(channel_gone)
            nursery.start_soon(ring_broken)
        return result[0] if result else "cancelled"

    async def _disconnect(self, port) -> None:
        """Give back the old rings and channel; the Netfront keeps in-flight packets."""
        self._mark_disconnected()
        if self.nf is not None:
            try:
                await self.nf.disconnect()
            except Exception:
                log.exception("%s: netfront disconnect failed", self.dev.nodename)
        await frontend_start_over(self.dev, port, CLEANUP_TIMEOUT)


class _WatchedPort:
    """The vif's event channel as netfront uses it, reporting empty wakes.

    netfront's service task owns ``wait()``.  When a wake brings no response
    on either ring, it was not the backend answering: most likely the
    hypervisor raising our port because the backend's end died.  ``suspect``
    is then set, and the watcher asks the hypervisor at once, off the data
    path.  Everything else is the plain :class:`~domains.kernel.events.Port`.
    """

    def __init__(self, inner, nf: Netfront) -> None:
        self.inner = inner
        self.nf = nf
        self.suspect = trio.Event()

    async def wait(self) -> None:
        await self.inner.wait()
        conn = self.nf.conn
        try:
            empty = conn is None or not (conn.tx.unconsumed_responses()
                                         or conn.rx.unconsumed_responses())
        except RingError:
            empty = False           # netfront will find the broken ring itself
        if empty:
            self.suspect.set()

    def notify_nowait(self) -> None:
        self.inner.notify_nowait()

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


async def open_vif(k: "Kernel", xs, nursery: trio.Nursery, devid: int | str | None = None,
                   timeout: float = 60.0) -> NetifFrontend:
    """Start the frontend of ``device/vif/<devid>`` (the first one if None)."""
    if devid is None:
        devid = await first_device(xs, k.domid, "vif", timeout)
    return await NetifFrontend(k, xs, devid).start(nursery, timeout)


__all__ = ["NetifFrontend", "open_vif", "PEER_CHECK"]
