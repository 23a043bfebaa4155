"""The event-channel ABI: shared_info's event bits and the virtual IRQ numbers.

In Xen (public/xen.h, public/event_channel.h) every domain has a `shared_info`
page that the hypervisor and the domain both see.  It holds, per event-channel
port, a *pending* bit the hypervisor sets when the port is signalled and a
*mask* bit the domain sets to say "don't interrupt me for this one", plus a
per-vCPU `evtchn_upcall_pending` flag.  Because the bits live in memory, a
thousand sends before the domain looks produce one pending bit and one upcall:
notifications coalesce.

Here the page is a one-page memfd mapped by the hypervisor and the domain.  The
upcall itself is the domain's interrupt line: an eventfd the hypervisor writes
and the domain waits on; it carries no port numbers, only "look at your
shared_info".

The same page carries the other direction too.  EVTCHNOP_send, the commonest
hypercall by far, has a fast path here: the domain sets the port's
*send-request* byte and writes its doorbell, a second eventfd, which the
hypervisor polls.  The hypervisor clears each request and performs the send
exactly as the hypercall would, checks and all.  It is a batched hypercall in
the spirit of Xen's multicall: arguments in memory, one trap for however many
requests piled up.  (Xen has no such page; its send is one hypercall per
notification, because a trap there costs a few hundred cycles, and a message
here costs tens of microseconds.)  Most sends do not even take the doorbell:
a bound port's line carries them straight to the peer (see
hypervisor/event_channel.py); the doorbell serves the rest.

Where this differs from Xen, and why: Xen packs pending and mask as bits and
updates them with atomic instructions.  Python has no atomic read-modify-write
on shared memory, so each port gets a whole byte, which x86 stores atomically.
The hypervisor only ever sets pending bytes and the domain only ever clears them,
so no byte is written by both sides in a read-modify-write race.

Layout of the page (all offsets in bytes):

    0     evtchn_upcall_pending   (set by the hypervisor, cleared by the domain)
    1     evtchn_upcall_mask      (set/cleared by the domain)
    64    evtchn_pending[NR_EVENT_CHANNELS]
    64+N  evtchn_mask[NR_EVENT_CHANNELS]
    64+2N evtchn_send_request[NR_EVENT_CHANNELS]   (set by the domain, cleared by the hypervisor)
"""

from __future__ import annotations

from typing import Iterator

NR_EVENT_CHANNELS = 1024

UPCALL_PENDING = 0
UPCALL_MASK = 1
PENDING_BASE = 64
MASK_BASE = PENDING_BASE + NR_EVENT_CHANNELS
SEND_BASE = MASK_BASE + NR_EVENT_CHANNELS

# Virtual IRQs (public/xen.h).  Only the ones this system raises are listed.
VIRQ_TIMER = 0
VIRQ_DEBUG = 1
VIRQ_CONSOLE = 2     # the hypervisor's console ring has new output (xl dmesg)
VIRQ_DOM_EXC = 3     # a domain changed state: crashed, shut down, died
NR_VIRQS = 24

# evtchn_status states (public/event_channel.h, EVTCHNSTAT_*).
EVTCHNSTAT_closed = 0
EVTCHNSTAT_unbound = 1
EVTCHNSTAT_interdomain = 2
EVTCHNSTAT_pirq = 3
EVTCHNSTAT_virq = 4
EVTCHNSTAT_ipi = 5

DOMID_SELF = 0x7FF0


class SharedInfo:
    """Typed access to one domain's shared_info page (a writable buffer)."""

    def __init__(self, buf) -> None:
        self._backing = buf
        self.buf = memoryview(buf)

    def close(self) -> None:
        """Drop the view and unmap the page (if the backing is an mmap)."""
        self.buf.release()
        if hasattr(self._backing, "close"):
            self._backing.close()

    # -- hypervisor side ------------------------------------------------
    def set_pending(self, port: int) -> bool:
        """Mark `port` pending; True if the domain should get an upcall now."""
        self.buf[PENDING_BASE + port] = 1
        if self.buf[MASK_BASE + port] or self.buf[UPCALL_MASK]:
            return False
        if self.buf[UPCALL_PENDING]:
            return False  # an upcall is already on its way: coalesce
        self.buf[UPCALL_PENDING] = 1
        return True

    def reset_port(self, port: int) -> None:
        """Clear a port's bits when it is (re)allocated."""
        self.buf[PENDING_BASE + port] = 0
        self.buf[MASK_BASE + port] = 0
        self.buf[SEND_BASE + port] = 0

    def take_send_requests(self, limit: int = NR_EVENT_CHANNELS) -> list[int]:
        """Clear and return every port the domain asked us to send on.

        Snapshot, then clear each request before the caller sends: a request
        the domain makes after the snapshot is either cleared here and served
        by a send that happens after it, or left set for the next doorbell,
        which the domain rings after setting it.  Either way none is lost.
        """
        buf = self.buf
        requests = bytes(buf[SEND_BASE:SEND_BASE + limit])
        ports, start = [], 0
        while (port := requests.find(1, start)) >= 0:
            buf[SEND_BASE + port] = 0
            ports.append(port)
            start = port + 1
        return ports

    # -- domain side ------------------------------------------------------
    def take_pending(self, limit: int = NR_EVENT_CHANNELS) -> Iterator[int]:
        """Clear the upcall flag, then yield and clear every pending, unmasked port.

        The order matters: clearing the flag first means a send that lands while
        we scan either shows up in this scan or raises a fresh upcall.
        """
        buf = self.buf
        buf[UPCALL_PENDING] = 0
        pending = bytes(buf[PENDING_BASE:PENDING_BASE + limit])
        start = 0
        while True:
            port = pending.find(1, start)
            if port < 0:
                return
            start = port + 1
            if not buf[MASK_BASE + port]:
                buf[PENDING_BASE + port] = 0
                yield port

    def request_send(self, port: int) -> None:
        """Ask the hypervisor to send on `port`; ring the doorbell after this."""
        self.buf[SEND_BASE + port] = 1

    def is_pending(self, port: int) -> bool:
        return bool(self.buf[PENDING_BASE + port])

    def is_masked(self, port: int) -> bool:
        return bool(self.buf[MASK_BASE + port])

    def set_mask(self, port: int, masked: bool) -> None:
        self.buf[MASK_BASE + port] = 1 if masked else 0
