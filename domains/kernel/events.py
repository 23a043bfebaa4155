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

A send without waiting is not a message on the hypercall channel.  A port
bound to a peer holds a *line* (hypervisor/event_channel.py): the write end
of the peer port's pipe, handed over by the hypervisor when it bound the
channel, so the send is one `write` and wakes the peer with no hypervisor
process in between.  Our own end's line is what we wait on; what the
hypervisor raises through shared_info (a peer's death, a VIRQ) is forwarded
into it, so one descriptor says "look".  A port without a line yet (the end
that allocated it learns of its peer only later) sends by the doorbell: the
port's send-request byte in shared_info and an eventfd the hypervisor polls
(see ipc/event_abi.py), while the line is asked for in the background.
Either way the send is unordered with respect to hypercalls still in
flight on the channel; nothing needs that order, because a notification
only says "look at the ring", and the ring is already written.  A doorbell
send the hypervisor refuses is logged there (xl dmesg), as a
fire-and-forget hypercall's failure would be.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import trio

from domains.kernel import faultpoint
from ipc.channel import HypercallError
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
        #: The port's line (see hypervisor/event_channel.py): our read and
        #: write ends, and the bound peer's write end; -1 until the
        #: hypervisor has handed them over.
        self.line_r = self.line_w = self.send_w = -1
        self._fetching = False

    def _attach(self, fds: list[int], send: bool) -> None:
        """Take the line the hypervisor handed us: [read, write] (+ the peer's write end)."""
        if self.closed:
            for fd in fds:
                os.close(fd)
            return
        if self.line_r < 0:
            self.line_r, self.line_w = fds[0], fds[1]
            if self._fired:                   # raised before the line came: carry it over
                self._fired = False
                _poke(self.line_w)
            self._wake.set()                  # a waiter on the old path moves to the line
        else:
            os.close(fds[0])
            os.close(fds[1])
        if send and len(fds) > 2:
            if self.send_w < 0:
                self.send_w = fds[2]
            else:
                os.close(fds[2])

    def _fire(self) -> None:
        """The hypervisor raised this port (shared_info): wake whoever waits."""
        if self.line_w >= 0:
            _poke(self.line_w)                # one descriptor to wait on, whoever rang
        else:
            self._fired = True
            self._wake.set()

    def _drain(self) -> bool:
        try:
            return bool(os.read(self.line_r, 4096))
        except BlockingIOError:
            return False

    async def wait(self) -> None:
        """Return once the port has been signalled since the last wait."""
        while True:
            if self.line_r >= 0:
                if self._drain():
                    return
                try:
                    await trio.lowlevel.wait_readable(self.line_r)
                except trio.ClosedResourceError:
                    await trio.sleep_forever()    # closed under us: nothing will ring
            elif self._fired:
                self._fired = False
                self._wake = trio.Event()
                return
            else:
                await self._wake.wait()

    def fired(self) -> bool:
        """Consume a pending signal without sleeping."""
        if self.line_r >= 0:
            return self._drain()
        was, self._fired = self._fired, False
        if was:
            self._wake = trio.Event()
        return was

    def _cut(self) -> None:
        if self.line_r >= 0:
            trio.lowlevel.notify_closing(self.line_r)
        for fd in (self.line_r, self.line_w, self.send_w):
            if fd >= 0:
                os.close(fd)
        self.line_r = self.line_w = self.send_w = -1

    async def notify(self) -> None:
        await self.events.hv.call("event_channel_op", "send", port=self.port)

    def notify_nowait(self) -> None:
        """Ring the peer without waiting for the hypervisor's answer (the hot path)."""
        if faultpoint.intercept_send(self): return
        self.events.send_nowait(self)

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
        self.events.send_nowait(self, faults=False)

    async def status(self) -> dict:
        return await self.events.hv.call("event_channel_op", "status", port=self.port)

    async def peer_alive(self) -> bool:
        """Is the other end still bound?  (It goes back to unbound when the peer dies.)"""
        return (await self.status())["status"] == EVTCHNSTAT_interdomain

    async def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.events.ports.pop(self.port, None)
            self._cut()
            await self.events.hv.call("event_channel_op", "close", port=self.port)


class EventChannels:
    def __init__(self, shared_info: SharedInfo, doorbell_fd: int) -> None:
        self.shared_info = shared_info
        self.doorbell_fd = doorbell_fd
        self.ports: dict[int, Port] = {}
        self.hv: "Hypervisor"   # set by the kernel once the channel exists
        #: Where lines are fetched in the background; set by the kernel at boot.
        self.nursery: trio.Nursery | None = None
        self.unclaimed: set[int] = set()

    def send_nowait(self, port: Port, *, faults: bool = True) -> None:
        """A send that waits for no answer: down the port's line if it has
        one, else by the doorbell (a send request in shared_info and an
        eventfd the hypervisor polls), asking for the line meanwhile.

        ``faults=False`` keeps it out of the ``hypercall.nowait`` fault point
        (see :meth:`Port.kick`); there a send can be dropped, or its port
        number garbled into one the hypervisor must refuse or harmlessly ring.
        """
        number = port.port
        if faults:
            number = faultpoint.hit_nowait("hypercall.nowait", number)
            if number is faultpoint.DROP:
                return
        if number == port.port:
            if port.send_w >= 0:
                if _poke(port.send_w):
                    return
                os.close(port.send_w)         # no reader left: the peer's end is gone
                port.send_w = -1
            else:
                self._fetch_line(port)
        self.shared_info.request_send(number)
        os.eventfd_write(self.doorbell_fd, 1)

    def _fetch_line(self, port: Port) -> None:
        if not port._fetching and not port.closed and self.nursery is not None:
            port._fetching = True
            self.nursery.start_soon(self._get_line, port)

    async def _get_line(self, port: Port) -> None:
        try:
            r, fds = await self.hv.call_fds("event_channel_op", "line", port=port.port)
        except HypercallError:
            return                            # closed meanwhile: the doorbell serves
        finally:
            port._fetching = False
        port._attach(fds, r["send"])

    def upcall(self) -> None:
        """Called by the hypercall reader for every upcall (the line raised once)."""
        for port in self.shared_info.take_pending():
            handle = self.ports.get(port)
            if handle is not None:
                handle._fire()
            else:
                self.unclaimed.add(port)   # fired before we made its Port: keep it

    def _adopt(self, port: int, fds: list[int] | None = None, send: bool = False) -> Port:
        handle = Port(self, port)
        self.ports[port] = handle
        if fds:
            handle._attach(fds, send)
        if port in self.unclaimed:
            self.unclaimed.discard(port)
            handle._fire()
        return handle

    async def alloc_unbound(self, remote_dom: int) -> Port:
        r, fds = await self.hv.call_fds("event_channel_op", "alloc_unbound", remote_dom=remote_dom)
        return self._adopt(r["port"], fds, r["send"])

    async def bind_interdomain(self, remote_dom: int, remote_port: int) -> Port:
        r, fds = await self.hv.call_fds("event_channel_op", "bind_interdomain",
                                        remote_dom=remote_dom, remote_port=remote_port)
        return self._adopt(r["local_port"], fds, r["send"])

    async def bind_virq(self, virq: int) -> Port:
        r, fds = await self.hv.call_fds("event_channel_op", "bind_virq", virq=virq)
        return self._adopt(r["port"], fds, r["send"])

    def adopt(self, port: int) -> Port:
        """A port made for us by someone else (the builder's store/console
        ports): its line is asked for in the background."""
        handle = self.ports.get(port)
        if handle is None:
            handle = self._adopt(port)
            self._fetch_line(handle)
        return handle


def _poke(fd: int) -> bool:
    """One byte down a line; True unless nobody can read it any more.  A full
    pipe is a notification already pending: they coalesce."""
    try:
        os.write(fd, b"\1")
    except BlockingIOError:
        pass
    except OSError:                           # EPIPE: every read end is closed
        return False
    return True
