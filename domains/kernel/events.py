"""Event channels as a domain kernel sees them.

The hypervisor sets a port's pending byte in our shared_info page and, if no
upcall is already outstanding, raises our interrupt line (an eventfd; see
hypercall.py).  On an upcall we scan
shared_info, clear each pending port, and wake whichever task waits on it.
Several sends before we look cost one upcall and one wake-up: that coalescing is
the point of keeping the bits in memory.

A `Port` is the handle a driver holds: `await port.notify()` rings the peer
and waits for the hypervisor to confirm (errors are raised); `notify_nowait()`
rings it without waiting (the hot path of every ring), and `await port.kick()`
is the XenStore ring's doorbell (the same, outside the fault points);
`await port.wait()` sleeps until the peer rang (at least once) since the last
wait.

A send without waiting is not a message on the hypercall channel: we set the
port's send-request byte in shared_info and write our doorbell, an eventfd
the hypervisor polls (see ipc/event_abi.py).  One system call, no ZeroMQ on
either side, and sends that pile up before the hypervisor looks cost it one
wake-up.  Such a send is unordered with respect to hypercalls still in
flight on the channel; nothing needs that order, because a notification
only says "look at the ring", and the ring is already written.  A send the
hypervisor refuses is logged there (xl dmesg), as a fire-and-forget
hypercall's failure would be.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import trio

from domains.kernel import faultpoint
from ipc.event_abi import EVTCHNSTAT_interdomain, SharedInfo

if TYPE_CHECKING:
    from domains.kernel.hypercall import Hypervisor


class Port:
    def __init__(self, events: "EventChannels", port: int) -> None:
        self.events = events
        self.port = port
        self._fired = False
        self._wake = trio.Event()
        self.closed = False

    def _fire(self) -> None:
        self._fired = True
        self._wake.set()

    async def wait(self) -> None:
        """Return once the port has been signalled since the last wait."""
        while not self._fired:
            await self._wake.wait()
        self._fired = False
        self._wake = trio.Event()

    def fired(self) -> bool:
        """Consume a pending signal without sleeping."""
        was, self._fired = self._fired, False
        if was:
            self._wake = trio.Event()
        return was

    async def notify(self) -> None:
        await self.events.hv.call("event_channel_op", "send", port=self.port)

    def notify_nowait(self) -> None:
        """Ring the peer without waiting for the hypervisor's answer (the hot path)."""
        if faultpoint.intercept_send(self): return
        self.events.send_nowait(self.port)

    async def kick(self) -> None:
        """The XenStore ring's doorbell: ring the peer without waiting, as an
        awaitable (what :class:`~ipc.xs_ring.RingEndpoint` takes as ``notify``).

        A doorbell on real hardware does not wait for the hypervisor to say it
        rang; waiting would add a hypercall round trip to every XenStore
        request and reply, and the ring's sender holds its lock meanwhile, so
        a domain's requests would go one round trip at a time.  Unlike
        :meth:`notify_nowait` it is outside the event-channel fault points
        (``evtchn.send``, ``hypercall.nowait``): those model a *device's*
        notifications going astray, which its driver survives by polling; a
        XenStore ring has no poll, and a lost doorbell would stall a driver
        domain's whole control plane (its heartbeat with it) instead.
        """
        self.events.send_nowait(self.port, faults=False)

    async def status(self) -> dict:
        return await self.events.hv.call("event_channel_op", "status", port=self.port)

    async def peer_alive(self) -> bool:
        """Is the other end still bound?  (It goes back to unbound when the peer dies.)"""
        return (await self.status())["status"] == EVTCHNSTAT_interdomain

    async def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.events.ports.pop(self.port, None)
            await self.events.hv.call("event_channel_op", "close", port=self.port)


class EventChannels:
    def __init__(self, shared_info: SharedInfo, doorbell_fd: int) -> None:
        self.shared_info = shared_info
        self.doorbell_fd = doorbell_fd
        self.ports: dict[int, Port] = {}
        self.hv: "Hypervisor"   # set by the kernel once the channel exists
        self.unclaimed: set[int] = set()

    def send_nowait(self, port: int, *, faults: bool = True) -> None:
        """EVTCHNOP_send's fast path: a send request in shared_info, then the doorbell.

        ``faults=False`` keeps it out of the ``hypercall.nowait`` fault point
        (see :meth:`Port.kick`); there a send can be dropped, or its port
        number garbled into one the hypervisor must refuse or harmlessly ring.
        """
        if faults:
            port = faultpoint.hit_nowait("hypercall.nowait", port)
            if port is faultpoint.DROP:
                return
        self.shared_info.request_send(port)
        os.eventfd_write(self.doorbell_fd, 1)

    def upcall(self) -> None:
        """Called by the hypercall reader for every upcall (the line raised once)."""
        for port in self.shared_info.take_pending():
            handle = self.ports.get(port)
            if handle is not None:
                handle._fire()
            else:
                self.unclaimed.add(port)   # fired before we made its Port: keep it

    def _adopt(self, port: int) -> Port:
        handle = Port(self, port)
        self.ports[port] = handle
        if port in self.unclaimed:
            self.unclaimed.discard(port)
            handle._fire()
        return handle

    async def alloc_unbound(self, remote_dom: int) -> Port:
        r = await self.hv.call("event_channel_op", "alloc_unbound", remote_dom=remote_dom)
        return self._adopt(r["port"])

    async def bind_interdomain(self, remote_dom: int, remote_port: int) -> Port:
        r = await self.hv.call("event_channel_op", "bind_interdomain",
                               remote_dom=remote_dom, remote_port=remote_port)
        return self._adopt(r["local_port"])

    async def bind_virq(self, virq: int) -> Port:
        r = await self.hv.call("event_channel_op", "bind_virq", virq=virq)
        return self._adopt(r["port"])

    def adopt(self, port: int) -> Port:
        """A port made for us by someone else (the builder's store/console ports)."""
        return self.ports.get(port) or self._adopt(port)
