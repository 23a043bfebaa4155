"""Xen's shared I/O ring (``xen/include/public/io/ring.h``), byte for byte.

What it is in Xen
-----------------
Every paravirtual device (block, network, ...) talks through one or more
*shared rings*: a page granted by the frontend (in the guest) and mapped by the
backend (in dom0 or a driver domain).  The page starts with a 64-byte header
holding four free-running 32-bit counters, followed by an array of entries.
Each entry is a union of one request and one response: the frontend writes a
request into a slot, the backend later overwrites the same slot with the
response.  The number of entries is the largest power of two that fits, so an
index is turned into a slot with ``idx & (size - 1)`` and the counters may run
freely and wrap at 2**32.

Layout (x86_64, identical to ``DEFINE_RING_TYPES``)::

    offset  0  u32 req_prod    frontend has published requests up to here
    offset  4  u32 req_event   backend wants an event when req_prod passes this
    offset  8  u32 rsp_prod    backend has published responses up to here
    offset 12  u32 rsp_event   frontend wants an event when rsp_prod passes this
    offset 16  pvt[4], __pad[44]   zero here
    offset 64  entry[0], entry[1], ... entry[size-1]

Each side also keeps *private* counters that never leave its own memory:
the frontend's ``req_prod_pvt`` (requests written but not yet published) and
``rsp_cons`` (responses consumed); the backend's ``req_cons`` and
``rsp_prod_pvt``.  A side that trusts a counter written by the other side
without checking it can be driven into an endless loop, so consumers here check
that the peer's producer index never runs more than one ring ahead of them
(``RING_REQUEST_PROD_OVERFLOW`` / ``RING_RESPONSE_PROD_OVERFLOW``) and raise
:class:`RingCorruptError` rather than process garbage.

Notification hold-off
---------------------
A producer does not have to send an event for every entry.  The consumer, just
before going to sleep, writes "wake me when the producer index passes N" into
``req_event``/``rsp_event`` (``final_check_for_*``), and re-checks the ring to
close the race with a producer that published in between.  The producer,
after publishing, notifies only when the consumer's event index lies inside the
range it has just published: ``(new - event) < (new - old)`` in wrapping u32
arithmetic.  :meth:`FrontRing.push_requests_and_check_notify` and
:meth:`BackRing.push_responses_and_check_notify` return that decision; sending
the event itself is the caller's business (an event channel).

Where this differs from Xen, and why
------------------------------------
* The ring is a Python object over a writable buffer (an ``mmap`` of a granted
  memfd page, or a ``bytearray`` in tests).  Entries are handled as ``bytes``;
  the layout of a request or response lives in the protocol modules
  (:mod:`ipc.blkif`, :mod:`ipc.netif`).  This module knows only the entry size.
* Reads of an entry always copy it out (``RING_COPY_REQUEST``), so a malicious
  peer cannot change a request after it has been checked.
* Memory barriers: the counters are read and written through a native ``u32``
  view, so each access is one aligned 4-byte load or store (never torn), and
  x86-64 keeps stores in program order, which is what ``xen_wmb()`` asks for.
  ``xen_mb()`` (store then load) has no direct Python equivalent; the
  final-check re-read after publishing the event index is what makes the
  protocol safe in practice, exactly as ring.h relies on it.
* ``mmap.close()`` refuses while views into the map exist, so call
  :meth:`SharedRing.release` (or use the ring as a context manager) before
  unmapping.
"""

from __future__ import annotations

import mmap
import struct
from typing import Union

#: Anything the ring can live on: a mapped page, or plain memory in tests.
Buffer = Union[bytearray, memoryview, mmap.mmap]

#: Size of the shared header before the first entry (``offsetof(sring, ring)``).
RING_HEADER_SIZE = 64
#: Byte offsets of the four shared counters inside the header.
REQ_PROD_OFFSET, REQ_EVENT_OFFSET, RSP_PROD_OFFSET, RSP_EVENT_OFFSET = 0, 4, 8, 12

_U32 = 0xFFFFFFFF
# The indices are accessed through a native unsigned-int view; ring.h's
# RING_IDX is "unsigned int", native endianness, and that is 4 bytes here.
assert struct.calcsize("@I") == 4


class RingError(Exception):
    """A ring was set up or used in a way ring.h does not allow."""


class RingCorruptError(RingError):
    """The peer published a producer index that cannot be true.

    A well-behaved producer never gets more than ``size`` entries ahead of the
    consumer.  If the shared producer index says otherwise, the peer is broken
    or hostile; the consumer must stop using the ring (and usually disconnect
    the device) instead of walking into slots it has never been given.
    """

    def __init__(self, what: str, prod: int, cons: int, size: int) -> None:
        self.prod, self.cons, self.size = prod, cons, size
        super().__init__(
            f"{what}: producer index {prod} is {(prod - cons) & _U32} entries "
            f"ahead of consumer index {cons}, but the ring holds only {size}"
        )


def rd32(x: int) -> int:
    """Round ``x`` down to a power of two (ring.h's ``__RD32``); 0 stays 0."""
    if x <= 0:
        return 0
    return 1 << (x.bit_length() - 1)


def ring_size(buffer_size: int, entry_size: int) -> int:
    """Number of entries in a ring of ``buffer_size`` bytes (``__RING_SIZE``)."""
    if entry_size <= 0:
        raise RingError(f"entry size must be positive, got {entry_size}")
    if buffer_size < RING_HEADER_SIZE + entry_size:
        raise RingError(
            f"a ring of {buffer_size} bytes has no room for one {entry_size}-byte "
            f"entry after the {RING_HEADER_SIZE}-byte header"
        )
    return rd32((buffer_size - RING_HEADER_SIZE) // entry_size)


def _wrap(x: int) -> int:
    return x & _U32


class SharedRing:
    """The shared page itself: the four counters and the entry slots.

    Both ends construct one of these over their own mapping of the same page.
    ``size`` defaults to the whole buffer; pass ``nr_pages * 4096`` for a
    multi-page ring mapped into a larger buffer.
    """

    def __init__(self, buf: Buffer, entry_size: int, size: int | None = None) -> None:
        view = memoryview(buf)
        if view.readonly:
            view.release()
            raise RingError("a shared ring needs a writable mapping")
        have = view.nbytes
        nbytes = have if size is None else size
        if nbytes > have:
            view.release()
            raise RingError(f"ring size {nbytes} exceeds buffer of {have} bytes")
        try:
            self.nr_ents = ring_size(nbytes, entry_size)
        except RingError:
            view.release()
            raise
        self.entry_size = entry_size
        self._mem = view.cast("B")
        self._idx = self._mem[:16].cast("I")

    # -- the shared counters (each access is a single aligned u32) -------------
    @property
    def req_prod(self) -> int:
        return self._idx[0]

    @req_prod.setter
    def req_prod(self, v: int) -> None:
        self._idx[0] = _wrap(v)

    @property
    def req_event(self) -> int:
        return self._idx[1]

    @req_event.setter
    def req_event(self, v: int) -> None:
        self._idx[1] = _wrap(v)

    @property
    def rsp_prod(self) -> int:
        return self._idx[2]

    @rsp_prod.setter
    def rsp_prod(self, v: int) -> None:
        self._idx[2] = _wrap(v)

    @property
    def rsp_event(self) -> int:
        return self._idx[3]

    @rsp_event.setter
    def rsp_event(self, v: int) -> None:
        self._idx[3] = _wrap(v)

    def init(self, start: int = 0) -> None:
        """``SHARED_RING_INIT``: empty ring, events wanted on the first entry.

        ``start`` is not in ring.h (which always starts at 0); it lets tests
        begin just below 2**32 to exercise index wraparound.
        """
        self.req_prod = start
        self.rsp_prod = start
        self.req_event = start + 1
        self.rsp_event = start + 1
        self._mem[16:RING_HEADER_SIZE] = bytes(RING_HEADER_SIZE - 16)

    # -- entries -----------------------------------------------------------------
    def slot_offset(self, idx: int) -> int:
        """Byte offset of the slot that free-running index ``idx`` refers to."""
        return RING_HEADER_SIZE + (idx & (self.nr_ents - 1)) * self.entry_size

    def slot(self, idx: int) -> memoryview:
        """A live view of one slot (``RING_GET_REQUEST``/``RING_GET_RESPONSE``).

        The peer can change it under you; prefer :meth:`read` for anything you
        are going to check and then act on.
        """
        off = self.slot_offset(idx)
        return self._mem[off:off + self.entry_size]

    def read(self, idx: int) -> bytes:
        """A private copy of one slot (``RING_COPY_REQUEST``/``RING_COPY_RESPONSE``)."""
        off = self.slot_offset(idx)
        return bytes(self._mem[off:off + self.entry_size])

    def write(self, idx: int, data: bytes) -> None:
        """Write an encoded request or response at the start of a slot.

        A response is usually shorter than the union; like C, only its own
        bytes are written and the rest of the slot is left as it was.
        """
        if len(data) > self.entry_size:
            raise RingError(
                f"entry of {len(data)} bytes does not fit a {self.entry_size}-byte slot")
        off = self.slot_offset(idx)
        self._mem[off:off + len(data)] = data

    def release(self) -> None:
        """Drop the views into the buffer so an mmap can be closed."""
        self._idx.release()
        self._mem.release()

    def __enter__(self) -> "SharedRing":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class _RingEnd:
    """What FrontRing and BackRing share: the shared page and its geometry."""

    def __init__(self, buf: Buffer | SharedRing, entry_size: int | None,
                 size: int | None) -> None:
        if isinstance(buf, SharedRing):
            self.sring = buf
        else:
            if entry_size is None:
                raise RingError("entry_size is required when passing a raw buffer")
            self.sring = SharedRing(buf, entry_size, size)

    @property
    def size(self) -> int:
        """``RING_SIZE``: number of slots."""
        return self.sring.nr_ents

    def release(self) -> None:
        self.sring.release()

    def __enter__(self):  # type: ignore[no-untyped-def]
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class FrontRing(_RingEnd):
    """The frontend's half: puts requests on, takes responses off.

    ``FrontRing.init(buf, entry_size)`` is ``XEN_FRONT_RING_INIT`` (it also
    initialises the shared page; only the frontend does that).  The
    constructor alone is ``FRONT_RING_ATTACH`` at index ``start``: it takes an
    already initialised page, e.g. after the frontend reconnects.
    """

    def __init__(self, buf: Buffer | SharedRing, entry_size: int | None = None,
                 size: int | None = None, start: int = 0) -> None:
        super().__init__(buf, entry_size, size)
        self.req_prod_pvt = _wrap(start)
        self.rsp_cons = _wrap(start)

    @classmethod
    def init(cls, buf: Buffer | SharedRing, entry_size: int | None = None,
             size: int | None = None, start: int = 0) -> "FrontRing":
        """``XEN_FRONT_RING_INIT`` (``start`` as in :meth:`SharedRing.init`)."""
        ring = cls(buf, entry_size, size, start)
        ring.sring.init(start)
        return ring

    # -- requests out ----------------------------------------------------------
    def free_requests(self) -> int:
        """``RING_FREE_REQUESTS``: slots not holding an outstanding request."""
        return self.size - _wrap(self.req_prod_pvt - self.rsp_cons)

    def full(self) -> bool:
        """``RING_FULL``."""
        return self.free_requests() == 0

    def request_slot(self) -> memoryview:
        """``RING_GET_REQUEST(ring, req_prod_pvt)``: the next slot to fill."""
        return self.sring.slot(self.req_prod_pvt)

    def put_request(self, data: bytes) -> int:
        """Write one encoded request into the next slot and advance
        ``req_prod_pvt``.  Returns the index used.  Not yet visible to the
        backend: call :meth:`push_requests_and_check_notify`."""
        if self.full():
            raise RingError(f"ring full: {self.size} requests outstanding")
        idx = self.req_prod_pvt
        self.sring.write(idx, data)
        self.req_prod_pvt = _wrap(idx + 1)
        return idx

    def push_requests(self) -> None:
        """``RING_PUSH_REQUESTS``: publish without deciding about events."""
        self.sring.req_prod = self.req_prod_pvt

    def push_requests_and_check_notify(self) -> bool:
        """``RING_PUSH_REQUESTS_AND_CHECK_NOTIFY``: publish; True if the
        backend asked to be woken for an index in the range just published."""
        old = self.sring.req_prod
        new = self.req_prod_pvt
        self.sring.req_prod = new
        return _wrap(new - self.sring.req_event) < _wrap(new - old)

    # -- responses in ----------------------------------------------------------
    def unconsumed_responses(self) -> int:
        """``RING_HAS_UNCONSUMED_RESPONSES`` as a count, after checking that
        the backend's ``rsp_prod`` is believable."""
        prod = self.sring.rsp_prod
        n = _wrap(prod - self.rsp_cons)
        # A response can only answer a request we made; more than that is a lie.
        if n > self.size or n > _wrap(self.req_prod_pvt - self.rsp_cons):
            raise RingCorruptError("response ring", prod, self.rsp_cons, self.size)
        return n

    def get_response(self) -> bytes:
        """Copy out the response at ``rsp_cons`` and consume it."""
        if self.unconsumed_responses() == 0:
            raise RingError("no unconsumed response")
        data = self.sring.read(self.rsp_cons)
        self.rsp_cons = _wrap(self.rsp_cons + 1)
        return data

    def responses(self) -> list[bytes]:
        """Consume every response published so far."""
        n = self.unconsumed_responses()
        out = [self.sring.read(self.rsp_cons + i) for i in range(n)]
        self.rsp_cons = _wrap(self.rsp_cons + n)
        return out

    def final_check_for_responses(self) -> bool:
        """``RING_FINAL_CHECK_FOR_RESPONSES``: True if there is work; else ask
        for an event on the next response and re-check, closing the race."""
        if self.unconsumed_responses():
            return True
        self.sring.rsp_event = self.rsp_cons + 1
        return self.unconsumed_responses() > 0


class BackRing(_RingEnd):
    """The backend's half: takes requests off, puts responses on.

    The constructor is ``BACK_RING_ATTACH`` at index ``start`` (``0`` gives
    ``BACK_RING_INIT``).  A backend never initialises the shared page.
    """

    def __init__(self, buf: Buffer | SharedRing, entry_size: int | None = None,
                 size: int | None = None, start: int = 0) -> None:
        super().__init__(buf, entry_size, size)
        self.rsp_prod_pvt = _wrap(start)
        self.req_cons = _wrap(start)

    # -- requests in -------------------------------------------------------------
    def check_request_prod(self) -> int:
        """Read ``req_prod`` and refuse it if it is more than one ring ahead of
        the responses we have produced (``RING_REQUEST_PROD_OVERFLOW``)."""
        prod = self.sring.req_prod
        if _wrap(prod - self.rsp_prod_pvt) > self.size:
            raise RingCorruptError("request ring", prod, self.req_cons, self.size)
        return prod

    def unconsumed_requests(self) -> int:
        """``RING_HAS_UNCONSUMED_REQUESTS`` as a count: requests published and
        not yet taken, but never more than there are free response slots."""
        prod = self.check_request_prod()
        req = _wrap(prod - self.req_cons)
        rsp = self.size - _wrap(self.req_cons - self.rsp_prod_pvt)
        return min(req, rsp)

    def request_cons_overflow(self, cons: int) -> bool:
        """``RING_REQUEST_CONS_OVERFLOW``: would consuming index ``cons`` take
        a slot whose response has not been written yet?"""
        return _wrap(cons - self.rsp_prod_pvt) >= self.size

    def get_request(self) -> bytes:
        """Copy out the request at ``req_cons`` and consume it."""
        if self.unconsumed_requests() == 0:
            raise RingError("no unconsumed request")
        data = self.sring.read(self.req_cons)
        self.req_cons = _wrap(self.req_cons + 1)
        return data

    def requests(self) -> list[bytes]:
        """Consume every request that can be taken now."""
        n = self.unconsumed_requests()
        out = [self.sring.read(self.req_cons + i) for i in range(n)]
        self.req_cons = _wrap(self.req_cons + n)
        return out

    def final_check_for_requests(self) -> bool:
        """``RING_FINAL_CHECK_FOR_REQUESTS``: True if there is work; else ask
        for an event on the next request and re-check."""
        if self.unconsumed_requests():
            return True
        self.sring.req_event = self.req_cons + 1
        return self.unconsumed_requests() > 0

    # -- responses out -----------------------------------------------------------
    def response_slot(self) -> memoryview:
        """``RING_GET_RESPONSE(ring, rsp_prod_pvt)``."""
        return self.sring.slot(self.rsp_prod_pvt)

    def put_response(self, data: bytes) -> int:
        """Write one encoded response at ``rsp_prod_pvt`` and advance it.
        Returns the index used.  A response may only answer a consumed request."""
        if self.rsp_prod_pvt == self.req_cons:
            raise RingError("no consumed request is waiting for a response")
        idx = self.rsp_prod_pvt
        self.sring.write(idx, data)
        self.rsp_prod_pvt = _wrap(idx + 1)
        return idx

    def push_responses(self) -> None:
        """``RING_PUSH_RESPONSES``."""
        self.sring.rsp_prod = self.rsp_prod_pvt

    def push_responses_and_check_notify(self) -> bool:
        """``RING_PUSH_RESPONSES_AND_CHECK_NOTIFY``."""
        old = self.sring.rsp_prod
        new = self.rsp_prod_pvt
        self.sring.rsp_prod = new
        return _wrap(new - self.sring.rsp_event) < _wrap(new - old)
