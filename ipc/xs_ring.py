"""The XenStore ring page: ``struct xenstore_domain_interface``.

In Xen
    A guest talks to xenstored through one 4 KiB page it shares with the
    daemon (docs/misc/xenstore-ring.txt).  The page holds two 1 KiB byte
    rings -- ``req`` (guest -> xenstored) and ``rsp`` (xenstored -> guest,
    replies and watch events) -- each with a free-running 32-bit consumer and
    producer index, then three u32 words: ``server_features``,
    ``connection`` and ``error``::

        offset  size  field
        0       1024  req[]
        1024    1024  rsp[]
        2048    4     req_cons      2052  4  req_prod
        2056    4     rsp_cons      2060  4  rsp_prod
        2064    4     server_features
        2068    4     connection    2072  4  error

    Byte ``x`` of a stream lives at ``x % 1024``; ``prod - cons`` (mod 2**32)
    is the number of unread bytes and can never exceed 1024.  A producer
    writes data *before* publishing the new producer index; a consumer reads
    data *before* publishing the new consumer index; after moving an index the
    side signals the event channel, so the peer looks again.  Linux's
    xenbus_comms.c signals only when the peer may be asleep on the index it
    moved: a producer when the consumer had read everything before the new
    bytes went in, a consumer when the ring was full (the producer can only
    be waiting for space then).

Here
    :class:`XenstoreRing` lays that struct over any writable buffer (an mmap
    of a shared memfd page in the real system, a bytearray in unit tests),
    byte for byte as a C program using xs_wire.h would see it.  It has the
    guest's half (:meth:`write_request`, :meth:`read_response`) and the
    server's half (:meth:`read_request`, :meth:`write_response`).
    :class:`RingEndpoint` turns one half into an async byte stream given two
    callables from the event-channel layer: ``notify()`` kicks the peer and
    ``wait()`` returns once the peer has kicked us (perhaps spuriously).
    It signals as Linux does, only when the peer may be asleep, and the
    kicks for what it sends go out once per trio scheduler pass: a guest
    sending a batch of requests (a handshake's dozen reads at once) costs one
    kick, not a dozen, and a reply read costs none.  Each kick is a message
    to the hypervisor and an upcall from it, so this is most of what a
    XenStore request costs beyond xenstored's own work.

Invariant
    An index pair whose distance exceeds the ring size is never trusted: the
    reader raises :class:`RingIndexError` rather than read garbage, and the
    server records XENSTORE_ERROR_RINGIDX in the ``error`` word.

Differences from Xen
    C code uses explicit memory barriers between data and index updates.
    Python has none; we rely on x86-64's store ordering (stores become
    visible in program order), on each index being read and written as one
    aligned native 4-byte word (a memoryview cast to "I": struct's "<I"
    moves bytes one at a time, and the peer could see half an index), and
    on every write of ours happening in program order.  The one reordering
    x86-64 does allow, a later load passing an earlier store, would let both
    sides miss each other when deciding whether to signal (publish my index,
    then read yours): :func:`_full_barrier` sits between the two, as mb()
    does in Linux.  On a weakly ordered CPU this module would need real
    barriers everywhere (e.g. a tiny C helper).
"""

from __future__ import annotations

import threading
from functools import partial
from typing import Awaitable, Callable

import trio

__all__ = [
    "XENSTORE_RING_SIZE", "PAGE_SIZE", "XenstoreRing", "RingIndexError",
    "RingEndpoint", "Notify", "Wait",
    "XENSTORE_SERVER_FEATURE_RECONNECTION", "XENSTORE_SERVER_FEATURE_ERROR",
    "XENSTORE_CONNECTED", "XENSTORE_RECONNECT", "XENSTORE_ERROR_NONE",
    "XENSTORE_ERROR_COMM", "XENSTORE_ERROR_RINGIDX", "XENSTORE_ERROR_PROTO",
]

XENSTORE_RING_SIZE = 1024
PAGE_SIZE = 4096
_MASK = XENSTORE_RING_SIZE - 1
_U32 = 0xFFFFFFFF

REQ_OFF = 0
RSP_OFF = 1024
REQ_CONS_OFF = 2048
REQ_PROD_OFF = 2052
RSP_CONS_OFF = 2056
RSP_PROD_OFF = 2060
SERVER_FEATURES_OFF = 2064
CONNECTION_OFF = 2068
ERROR_OFF = 2072
STRUCT_SIZE = 2076

XENSTORE_SERVER_FEATURE_RECONNECTION = 1
XENSTORE_SERVER_FEATURE_ERROR = 2
XENSTORE_CONNECTED = 0
XENSTORE_RECONNECT = 1
XENSTORE_ERROR_NONE = 0
XENSTORE_ERROR_COMM = 1
XENSTORE_ERROR_RINGIDX = 2
XENSTORE_ERROR_PROTO = 3


Notify = Callable[[], Awaitable[None]]
Wait = Callable[[], Awaitable[None]]

_fence = threading.Lock()


def _full_barrier() -> None:
    """mb(): a lock's acquire and release are atomic read-modify-writes (a
    ``lock``-prefixed instruction on x86-64), which no load may pass."""
    with _fence:
        pass


class RingIndexError(RuntimeError):
    """A producer/consumer pair that no honest peer could have written."""


class XenstoreRing:
    """``struct xenstore_domain_interface`` over a shared, writable buffer."""

    __slots__ = ("_mv", "_words")

    def __init__(self, buf) -> None:
        mv = memoryview(buf)
        if mv.readonly:
            raise ValueError("xs_ring: the ring page must be writable")
        if mv.nbytes < STRUCT_SIZE:
            raise ValueError(
                f"xs_ring: buffer of {mv.nbytes} bytes is smaller than "
                f"struct xenstore_domain_interface ({STRUCT_SIZE} bytes)")
        self._mv = mv.cast("B")
        # The indices as native u32s: one aligned load or store each, so the peer
        # never sees a half-written index (struct's "<I" goes byte by byte).
        self._words = self._mv[REQ_CONS_OFF:ERROR_OFF + 4].cast("I")

    def release(self) -> None:
        """Drop our views so the underlying mmap can be closed."""
        self._words.release()
        self._mv.release()

    def __enter__(self) -> "XenstoreRing":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    # -- the u32 words ---------------------------------------------------
    def _get(self, off: int) -> int:
        return self._words[(off - REQ_CONS_OFF) >> 2]

    def _set(self, off: int, value: int) -> None:
        self._words[(off - REQ_CONS_OFF) >> 2] = value & _U32

    req_cons = property(lambda s: s._get(REQ_CONS_OFF),
                        lambda s, v: s._set(REQ_CONS_OFF, v))
    req_prod = property(lambda s: s._get(REQ_PROD_OFF),
                        lambda s, v: s._set(REQ_PROD_OFF, v))
    rsp_cons = property(lambda s: s._get(RSP_CONS_OFF),
                        lambda s, v: s._set(RSP_CONS_OFF, v))
    rsp_prod = property(lambda s: s._get(RSP_PROD_OFF),
                        lambda s, v: s._set(RSP_PROD_OFF, v))
    server_features = property(lambda s: s._get(SERVER_FEATURES_OFF),
                               lambda s, v: s._set(SERVER_FEATURES_OFF, v))
    connection = property(lambda s: s._get(CONNECTION_OFF),
                          lambda s, v: s._set(CONNECTION_OFF, v))
    error = property(lambda s: s._get(ERROR_OFF),
                     lambda s, v: s._set(ERROR_OFF, v))

    # -- generic single-producer/single-consumer byte ring ---------------
    def _space(self, data_off: int, cons_off: int, prod_off: int) -> int:
        cons, prod = self._get(cons_off), self._get(prod_off)
        used = (prod - cons) & _U32
        if used > XENSTORE_RING_SIZE:
            raise RingIndexError(
                f"xs_ring: ring at offset {data_off} has cons={cons} "
                f"prod={prod}: {used} bytes outstanding in a "
                f"{XENSTORE_RING_SIZE}-byte ring")
        return XENSTORE_RING_SIZE - used

    def _put(self, data_off: int, cons_off: int, prod_off: int,
             data: bytes | memoryview) -> int:
        """Copy as much of ``data`` as fits; return how many bytes went in."""
        free = self._space(data_off, cons_off, prod_off)
        n = min(free, len(data))
        if n == 0:
            return 0
        prod = self._get(prod_off)
        start = prod & _MASK
        first = min(n, XENSTORE_RING_SIZE - start)
        mv = self._mv
        mv[data_off + start:data_off + start + first] = data[:first]
        if n > first:
            mv[data_off:data_off + n - first] = data[first:n]
        # The data is in place before the peer can see the new producer.
        self._set(prod_off, prod + n)
        return n

    def _take(self, data_off: int, cons_off: int, prod_off: int,
              limit: int = XENSTORE_RING_SIZE) -> bytes:
        """Consume up to ``limit`` unread bytes."""
        used = XENSTORE_RING_SIZE - self._space(data_off, cons_off, prod_off)
        n = min(used, limit)
        if n == 0:
            return b""
        cons = self._get(cons_off)
        start = cons & _MASK
        first = min(n, XENSTORE_RING_SIZE - start)
        mv = self._mv
        out = bytes(mv[data_off + start:data_off + start + first])
        if n > first:
            out += bytes(mv[data_off:data_off + n - first])
        # Copied out before the producer may overwrite the slots.
        self._set(cons_off, cons + n)
        return out

    #: (data, consumer index, producer index) offsets of each of the two rings.
    REQ = (REQ_OFF, REQ_CONS_OFF, REQ_PROD_OFF)
    RSP = (RSP_OFF, RSP_CONS_OFF, RSP_PROD_OFF)

    def push(self, data_off: int, cons_off: int, prod_off: int,
             data: bytes | memoryview) -> tuple[int, bool]:
        """:meth:`_put`, and whether to signal the consumer: True when it had
        read everything before our bytes went in, so it may be asleep."""
        old = self._get(prod_off)
        n = self._put(data_off, cons_off, prod_off, data)
        if n == 0:
            return 0, False
        _full_barrier()          # our new producer index, before we read theirs
        return n, ((self._get(cons_off) - old) & _U32) <= n

    def pull(self, data_off: int, cons_off: int, prod_off: int,
             limit: int) -> tuple[bytes, bool]:
        """:meth:`_take`, and whether to signal the producer: True when the
        ring was full before we freed space, so it may be waiting for some."""
        old = self._get(cons_off)
        out = self._take(data_off, cons_off, prod_off, limit)
        if not out:
            return out, False
        _full_barrier()          # our new consumer index, before we read theirs
        return out, ((self._get(prod_off) - old) & _U32) >= XENSTORE_RING_SIZE

    # -- guest side --------------------------------------------------------
    def write_request(self, data: bytes | memoryview) -> int:
        return self._put(REQ_OFF, REQ_CONS_OFF, REQ_PROD_OFF, data)

    def read_response(self, limit: int = XENSTORE_RING_SIZE) -> bytes:
        return self._take(RSP_OFF, RSP_CONS_OFF, RSP_PROD_OFF, limit)

    def request_space(self) -> int:
        return self._space(REQ_OFF, REQ_CONS_OFF, REQ_PROD_OFF)

    # -- server side -------------------------------------------------------
    def read_request(self, limit: int = XENSTORE_RING_SIZE) -> bytes:
        return self._take(REQ_OFF, REQ_CONS_OFF, REQ_PROD_OFF, limit)

    def write_response(self, data: bytes | memoryview) -> int:
        return self._put(RSP_OFF, RSP_CONS_OFF, RSP_PROD_OFF, data)

    def response_space(self) -> int:
        return self._space(RSP_OFF, RSP_CONS_OFF, RSP_PROD_OFF)

    def reset(self) -> None:
        """Empty both rings (server side of a reconnect)."""
        self.req_cons = self.req_prod
        self.rsp_prod = self.rsp_cons


class RingEndpoint:
    """One side of a XenStore ring as an async byte stream.

    ``side`` is ``"guest"`` or ``"server"``.  :meth:`run` must be running (in
    a nursery) for the life of the endpoint: it is the only caller of
    ``wait()``, and on each kick it wakes whichever local task is blocked in
    :meth:`receive_some` or :meth:`send_all`.  Because trio switches tasks
    only at ``await``, checking the ring and then sleeping on the current
    wake-up event cannot miss a kick.

    Notification follows Linux's xenbus_comms.c (see the module docstring):
    only a peer that may be asleep on the index we moved is signalled.
    """

    def __init__(self, buf, notify: Notify, wait: Wait, *, side: str) -> None:
        if side not in ("guest", "server"):
            raise ValueError(f"xs_ring: side must be 'guest' or 'server', not {side!r}")
        self.ring = XenstoreRing(buf)
        self._notify = notify
        self._wait = wait
        self._kicked = trio.Event()
        self._send_lock = trio.Lock()
        self._kick_due = trio.Event()
        r = self.ring
        out, into = (r.REQ, r.RSP) if side == "guest" else (r.RSP, r.REQ)
        self._push = partial(r.push, *out)
        self._pull = partial(r.pull, *into)

    async def run(self) -> None:
        """Relay peer kicks to local waiters, and send ours; runs until cancelled."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._kicker)
            while True:
                await self._wait()
                self._wake()

    async def _kicker(self) -> None:
        """Send the kicks that :meth:`send_all` asks for, one per scheduler pass.

        Requests made at once (:func:`~domains.kernel.xenbus.gather`) are
        written by tasks that all run in the same pass; this task wakes in
        the next one, after all of them, so the batch costs a single kick.
        """
        while True:
            await self._kick_due.wait()
            self._kick_due = trio.Event()
            await self._notify()

    def _wake(self) -> None:
        ev, self._kicked = self._kicked, trio.Event()
        ev.set()

    async def receive_some(self, max_bytes: int = XENSTORE_RING_SIZE) -> bytes:
        """Bytes the peer has produced, waiting for at least one."""
        while True:
            kicked = self._kicked
            data, wake = self._pull(max_bytes)
            if data:
                if wake:
                    await self._notify()   # it may be waiting for space
                return data
            await kicked.wait()

    async def send_all(self, data: bytes) -> None:
        """Put all of ``data`` on the ring, waiting for space as needed."""
        view = memoryview(data)
        async with self._send_lock:
            while view:
                kicked = self._kicked
                n, wake = self._push(view)
                if n:
                    view = view[n:]
                    if wake:                   # it may be asleep on an empty ring
                        self._kick_due.set()
                else:
                    await kicked.wait()

    def close(self) -> None:
        self.ring.release()
