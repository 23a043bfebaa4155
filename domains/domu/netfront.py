"""netfront: the guest's half of a virtual network interface.

What it is in Xen
-----------------
netfront is the guest driver behind a PV network device.  It owns everything
shared with the backend: it allocates the tx and rx ring pages, grants them to
the backend domain, and publishes their references and an event channel in
XenStore (``tx-ring-ref``, ``rx-ring-ref``, ``event-channel``,
``request-rx-copy``).  Then:

* to **send**, it copies a packet into pages of its own, grants each page
  *read-only* to the backend, and puts one ``netif_tx_request`` per page on
  the tx ring (``NETTXF_more_data`` on all but the last; the first carries
  the whole length).  When the ``netif_tx_response`` for a slot comes back it
  *ends* the grant, so the backend's access lasts exactly as long as the
  request;
* to **receive**, it keeps the rx ring stocked with empty pages granted
  *writable* (``netif_rx_request``: id, gref).  Each ``netif_rx_response``
  says how many bytes the backend wrote (or a ``NETIF_RSP_*`` error); pieces
  flagged ``NETRXF_more_data`` are joined into one packet.  The page's grant
  is ended and the page re-posted with a fresh one.  While the guest is not
  reading (the receive queue is full) pages are held back instead, so
  packets wait in netback's bounded queue, where a backlog belongs.

What it does here
-----------------
:class:`Netfront` does the above over the small interfaces :class:`Grants`,
:class:`Memory` and :class:`EventPort`, which a booted kernel provides as
``k.grants``, ``k.memory`` and an event-channel ``Port``; tests and the
benchmark supply a local stand-in over real memfd pages.

Lifecycle, as the xenbus glue drives it::

    nf = await Netfront.create(k.grants, k.memory, backend_domid)   # Initialising
    port = await k.events.alloc_unbound(backend_domid)
    # write nf.tx_ring_ref, nf.rx_ring_ref, port.port, request-rx-copy=1; -> Initialised
    nursery.start_soon(nf.run)
    # backend Connected:
    nf.connect(port)                                                # -> Connected
    await nf.send(frame); frame = await nf.receive()
    # backend gone (driver domain crashed) and a new one appeared:
    await nf.disconnect(); await nf.prepare(new_backend_domid); ...; nf.connect(new_port)

Invariant: no packet the guest handed to :meth:`send` is silently forgotten
across a backend change.  Until its tx response arrives a packet is *in
flight*; :meth:`disconnect` keeps every in-flight packet and :meth:`connect`
sends them again on the new rings before anything new (the replay Linux's
blkfront does for block requests; see "differs" below).  A response from a
broken or hostile backend (an id we never used, a length past the page) is
counted and refused, never trusted.  The rings' memory is released only
after the service task has left them (:meth:`disconnect` waits for it), and
a disconnect ends each grant once, however often it is called.

Where this differs from Xen
---------------------------
* Linux's netfront *drops* in-flight tx packets on reconnect (the network may
  lose packets; TCP resends).  microxen promises that no acknowledged I/O is
  lost across a driver-domain restart, and resending costs little, so it
  replays them.  A receiver may therefore see a packet twice if the old
  backend forwarded it but died before answering.
* Packet pages come from a fixed pool allocated at set-up (``nr_tx_pages``,
  ``nr_rx_pages``), not from the guest's socket buffers; a sender waits for
  a free page when the pool is exhausted (back-pressure instead of a qdisc).
* One event channel serves both rings (``feature-split-event-channels`` is
  not used); no checksum offload, GSO or multi-queue.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from ipc.netif import (NETIF_RSP_OKAY, NETRXF_more_data, NETTXF_more_data, PAGE_SIZE,
                       RX_ENTRY_SIZE, TX_ENTRY_SIZE, NetifError, NetifRxRequest,
                       NetifRxResponse, NetifTxRequest, NetifTxResponse)
from domains.kernel.grant_table import GrantError
from ipc.ring import FrontRing, RingError

#: How often a blocked send looks again for a free grant reference (seconds).
GRANT_RETRY = 0.05

log = logging.getLogger(__name__)

ETH_HLEN = 14
MAX_PACKET = 0xFFFF
#: Linux's netfront never chains more than this many tx slots (netif.h's minimum).
MAX_TX_SLOTS = 18


class EventPort(Protocol):
    async def wait(self) -> None: ...
    def notify_nowait(self) -> None: ...


class Grants(Protocol):
    """Granting our own pages; ``k.grants`` is one."""

    def grant_access(self, domid: int, gfn: int, readonly: bool = False) -> int: ...
    def end_access(self, ref: int) -> bool: ...


class Memory(Protocol):
    """Pages of our own; ``k.memory`` is one.  A page has ``.gfn`` and ``.map``."""

    async def alloc(self, nr: int) -> list[Any]: ...
    async def free(self, pages: list[Any]) -> None: ...


class NetfrontError(Exception):
    """Bad use of netfront (message names it), or a broken backend."""


@dataclass
class NetfrontStats:
    tx_packets: int = 0          # acknowledged OK by the backend
    tx_bytes: int = 0
    tx_errors: int = 0           # answered with an error status
    tx_resent: int = 0           # replayed after a reconnect
    rx_packets: int = 0
    rx_bytes: int = 0
    rx_errors: int = 0           # error status, or a response we refused
    grants_leaked: int = 0       # pages whose grant the backend would not give back
    notifications_sent: int = 0
    reasons: list[str] = field(default_factory=list)

    def refuse(self, why: str) -> None:
        self.reasons.append(why)
        del self.reasons[:-16]


@dataclass
class _TxPacket:
    frame: bytes
    ids: list[int] = field(default_factory=list)     # slot ids (= tx page indices) in use
    pending: int = 0                                  # responses still to come
    status: int = NETIF_RSP_OKAY
    done: trio.Event = field(default_factory=trio.Event)


@dataclass
class _Connection:
    """One incarnation of the shared rings, for one backend."""

    backend: int
    tx: FrontRing
    rx: FrontRing
    tx_ring_ref: int
    rx_ring_ref: int
    port: EventPort | None = None
    scope: trio.CancelScope | None = None
    #: Set once the service task has let go of these rings.  A cancelled task
    #: can still be resumed normally (its wakeup was already scheduled), so the
    #: rings' memory is released only after this, never on cancel() alone.
    left: trio.Event = field(default_factory=trio.Event)
    closing: bool = False


class Netfront:
    """The frontend of one vif.  Build it with :meth:`create`."""

    def __init__(self, grants: Grants, memory: Memory, ring_pages: list[Any],
                 tx_pages: list[Any], rx_pages: list[Any], rx_queue_max: int = 1024) -> None:
        self.grants = grants
        self.memory = memory
        self._ring_pages = ring_pages
        self.tx_pages = tx_pages
        self.rx_pages = rx_pages
        self.conn: _Connection | None = None
        self.stats = NetfrontStats()
        # tx: id == index into tx_pages; each id is one slot, so the ring never overflows.
        self._tx_free: list[int] = list(range(len(tx_pages) - 1, -1, -1))
        self._tx_gref: dict[int, int] = {}          # id -> grant ref while in flight
        self._tx_owner: dict[int, _TxPacket] = {}   # id -> packet it carries
        self._inflight: dict[int, _TxPacket] = {}   # first id -> packet (insertion = send order)
        self._replay: deque[_TxPacket] = deque()    # kept across a reconnect, sent first
        self._tx_space = trio.Event()
        # rx: id == index into rx_pages.
        self._rx_gref: dict[int, int] = {}          # id -> grant ref while posted
        self._rx_parts: list[bytes] = []
        self._rx_queue: deque[bytes] = deque()      # received, not yet taken by receive()
        self._rx_queue_max = rx_queue_max
        self._rx_parked: list[int] = []             # pages held back while the queue is full
        self._rx_ready = trio.Event()
        self._connected = trio.Event()
        #: Set when a backend breaks the ring protocol; whoever runs the
        #: handshake (netif_frontend) then reconnects to a backend.
        self.broken = trio.Event()
        self._leaked: list[int] = []                # grant refs to retry end_access on

    # -- set-up --------------------------------------------------------------------
    @classmethod
    async def create(cls, grants: Grants, memory: Memory, backend_domid: int,
                     nr_tx_pages: int = 64, nr_rx_pages: int = 64) -> "Netfront":
        """Allocate rings and packet pages and grant the rings to ``backend_domid``.

        Afterwards :attr:`tx_ring_ref` and :attr:`rx_ring_ref` are what goes to
        XenStore.  A 4 KiB ring has 256 slots; more pages than that cannot be
        in flight at once, so the pools are capped there.
        """
        for name, n in (("nr_tx_pages", nr_tx_pages), ("nr_rx_pages", nr_rx_pages)):
            if not 1 <= n <= 256:
                raise NetfrontError(f"{name}={n}: must be 1..256 (a one-page ring has 256 slots)")
        pages = await _alloc(memory, 2 + nr_tx_pages + nr_rx_pages)
        nf = cls(grants, memory, pages[:2], pages[2:2 + nr_tx_pages], pages[2 + nr_tx_pages:])
        nf._new_rings(backend_domid)
        return nf

    def _new_rings(self, backend: int) -> None:
        tx_page, rx_page = self._ring_pages
        tx = FrontRing.init(tx_page.map, TX_ENTRY_SIZE)
        rx = FrontRing.init(rx_page.map, RX_ENTRY_SIZE)
        try:
            tx_ref = self.grants.grant_access(backend, tx_page.gfn)
            rx_ref = self.grants.grant_access(backend, rx_page.gfn)
        except Exception:
            tx.release()
            rx.release()
            raise
        self.conn = _Connection(backend, tx, rx, tx_ref, rx_ref)

    @property
    def backend_domid(self) -> int:
        return self._need_conn().backend

    @property
    def tx_ring_ref(self) -> int:
        return self._need_conn().tx_ring_ref

    @property
    def rx_ring_ref(self) -> int:
        return self._need_conn().rx_ring_ref

    def _new_connection_event(self) -> None:
        """Make ``_connected`` unset, replacing it only if it was set.

        Tasks wait on the event object they found; connect() sets whichever
        is current.  Replacing an *unset* event (a handshake that failed
        before connect) would leave those tasks waiting on one nobody will
        ever set: the service task would then never serve the next rings.
        """
        if self._connected.is_set():
            self._connected = trio.Event()

    def _need_conn(self) -> _Connection:
        if self.conn is None:
            raise NetfrontError("netfront has no rings: call prepare() after disconnect()")
        return self.conn

    def connect(self, port: EventPort) -> None:
        """The backend is Connected: post rx buffers, replay in-flight packets."""
        conn = self._need_conn()
        if conn.port is not None:
            raise NetfrontError("netfront is already connected")
        conn.port = port
        self.broken = trio.Event()
        self._rx_parked = []
        for i in range(len(self.rx_pages)):
            self._post_rx(conn, i)
        self._push_rx(conn)
        self._drain_replay(conn)     # what does not fit now goes as responses free pages
        self._connected.set()

    # -- the service task ------------------------------------------------------------
    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Take responses off both rings, forever, across reconnections."""
        task_status.started()
        while True:
            conn = self.conn
            if conn is None or conn.port is None or not self._connected.is_set():
                await self._connected.wait()
                continue
            with trio.CancelScope() as scope:
                conn.scope = scope
                try:
                    await self._serve(conn)
                except (RingError, NetifError, NetfrontError) as exc:
                    # A backend that breaks the protocol is not trusted any further.
                    self.stats.refuse(f"backend d{conn.backend}: {exc}")
                    log.warning("netfront: backend d%d broke the protocol: %s", conn.backend, exc)
                    self._new_connection_event()
                    self.broken.set()
                finally:
                    conn.left.set()

    async def _serve(self, conn: _Connection) -> None:
        assert conn.port is not None
        while True:
            self._tx_responses(conn)
            self._rx_responses(conn)
            await trio.lowlevel.checkpoint()
            more_tx = conn.tx.final_check_for_responses()
            more_rx = conn.rx.final_check_for_responses()
            if more_tx or more_rx:
                continue
            await conn.port.wait()

    # -- tx ----------------------------------------------------------------------------
    async def send(self, frame: bytes) -> None:
        """Queue one Ethernet frame for the backend; waits while no page is free.

        Returns once the frame is on the ring (or kept for replay while
        disconnected), not when the backend answered: see :meth:`flush`.
        """
        if not ETH_HLEN <= len(frame) <= MAX_PACKET:
            raise NetfrontError(f"frame of {len(frame)} bytes: must be {ETH_HLEN}..{MAX_PACKET}")
        need = -(-len(frame) // PAGE_SIZE)
        if need > min(MAX_TX_SLOTS, len(self.tx_pages)):
            raise NetfrontError(f"frame of {len(frame)} bytes needs {need} tx slots; at most "
                                f"{min(MAX_TX_SLOTS, len(self.tx_pages))} are allowed")
        pkt = _TxPacket(bytes(frame))
        while True:
            conn = self.conn
            if conn is None or conn.port is None:
                if len(self._replay) < self.REPLAY_MAX:
                    # Disconnected: keep it for the next backend, as an in-flight packet.
                    self._replay.append(pkt)
                    return
                await self._connected.wait()     # bounded: wait for a backend
                continue
            # Packets waiting for replay go first, so the order on the wire is kept.
            if not self._replay and self._start_tx(conn, pkt):
                self._push_tx(conn)
                return
            space = self._tx_space
            if space.is_set():
                space = self._tx_space = trio.Event()
            # Bounded: slots free up with responses, but grant references that
            # someone else exhausted come back without telling us.
            with trio.move_on_after(GRANT_RETRY):
                await space.wait()
            self._repost_parked(conn)

    #: Packets kept while disconnected before send() starts waiting for a backend.
    REPLAY_MAX = 1024

    def _drain_replay(self, conn: _Connection) -> None:
        sent = False
        while self._replay and self._start_tx(conn, self._replay[0]):
            self._replay.popleft()
            self.stats.tx_resent += 1
            sent = True
        if sent:
            self._push_tx(conn)

    def _start_tx(self, conn: _Connection, pkt: _TxPacket) -> bool:
        frame = pkt.frame
        need = max(1, -(-len(frame) // PAGE_SIZE))
        if len(self._tx_free) < need or getattr(self.grants, "free_count", need) < need:
            return False   # no slot, or no grant reference left: wait, never fail the send
        pkt.ids = [self._tx_free.pop() for _ in range(need)]
        pkt.pending = need
        pkt.status = NETIF_RSP_OKAY
        for n, tx_id in enumerate(pkt.ids):
            chunk = frame[n * PAGE_SIZE:(n + 1) * PAGE_SIZE]
            page = self.tx_pages[tx_id]
            page.map[0:len(chunk)] = chunk
            ref = self.grants.grant_access(conn.backend, page.gfn, readonly=True)
            self._tx_gref[tx_id] = ref
            self._tx_owner[tx_id] = pkt
            more = NETTXF_more_data if n < need - 1 else 0
            size = len(frame) if n == 0 else len(chunk)
            conn.tx.put_request(NetifTxRequest(ref, 0, more, tx_id, size).pack())
        self._inflight[pkt.ids[0]] = pkt
        return True

    def _push_tx(self, conn: _Connection) -> None:
        if conn.tx.push_requests_and_check_notify() and conn.port is not None:
            self.stats.notifications_sent += 1
            conn.port.notify_nowait()

    def _tx_responses(self, conn: _Connection) -> None:
        freed = False
        for raw in conn.tx.responses():
            rsp = NetifTxResponse.unpack(raw)
            if rsp.status == 1:        # NETIF_RSP_NULL answers an extra-info slot; we send none
                continue
            pkt = self._tx_owner.pop(rsp.id, None)
            if pkt is None:
                raise NetfrontError(f"tx response for id {rsp.id}, which is not in flight")
            self._end(self._tx_gref.pop(rsp.id))
            self._tx_free.append(rsp.id)
            freed = True
            if rsp.status != NETIF_RSP_OKAY:
                pkt.status = rsp.status
            pkt.pending -= 1
            if pkt.pending == 0:
                self._inflight.pop(pkt.ids[0], None)
                if pkt.status == NETIF_RSP_OKAY:
                    self.stats.tx_packets += 1
                    self.stats.tx_bytes += len(pkt.frame)
                else:
                    self.stats.tx_errors += 1
                    self.stats.refuse(f"tx of {len(pkt.frame)} bytes: status {pkt.status}")
                pkt.done.set()
        if freed:
            self._drain_replay(conn)
            self._tx_space.set()

    @property
    def in_flight(self) -> int:
        """Packets sent and not yet answered (including those kept for replay)."""
        return len(self._inflight) + len(self._replay)

    async def flush(self) -> None:
        """Wait until every packet sent so far has been answered by a backend."""
        while self._inflight or self._replay:
            pkt = next(iter(self._inflight.values()), None) or self._replay[0]
            await pkt.done.wait()

    # -- rx ----------------------------------------------------------------------------
    def _post_rx(self, conn: _Connection, rx_id: int) -> None:
        page = self.rx_pages[rx_id]
        try:
            ref = self.grants.grant_access(conn.backend, page.gfn)
        except GrantError:
            self._rx_parked.append(rx_id)   # no grant reference free: post it later
            return
        self._rx_gref[rx_id] = ref
        conn.rx.put_request(NetifRxRequest(rx_id, ref).pack())

    def _push_rx(self, conn: _Connection) -> None:
        if conn.rx.push_requests_and_check_notify() and conn.port is not None:
            self.stats.notifications_sent += 1
            conn.port.notify_nowait()

    def _rx_responses(self, conn: _Connection) -> None:
        got = False
        for raw in conn.rx.responses():
            got = True
            rsp = NetifRxResponse.unpack(raw)
            ref = self._rx_gref.pop(rsp.id, None)
            if ref is None:
                raise NetfrontError(f"rx response for id {rsp.id}, which was never posted")
            data = b""
            problem = None
            if rsp.status < 0:
                problem = f"status {rsp.status}"
            elif rsp.offset + rsp.status > PAGE_SIZE:
                problem = f"{rsp.status} bytes at offset {rsp.offset} cross the page end"
            else:
                data = bytes(self.rx_pages[rsp.id].map[rsp.offset:rsp.offset + rsp.status])
            self._end(ref)
            if len(self._rx_queue) < self._rx_queue_max:
                self._post_rx(conn, rsp.id)
            else:
                # The guest is not reading: hold the page back, so packets wait in
                # netback's queue (and are dropped there if it fills), not here.
                self._rx_parked.append(rsp.id)
            if problem is not None:
                self.stats.rx_errors += 1
                self.stats.refuse(f"rx id {rsp.id}: {problem}")
                self._rx_parts = [b"!"] if rsp.flags & NETRXF_more_data else []
                continue
            if self._rx_parts[:1] == [b"!"]:     # rest of a packet whose start was refused
                if not rsp.flags & NETRXF_more_data:
                    self._rx_parts = []
                continue
            self._rx_parts.append(data)
            if rsp.flags & NETRXF_more_data:
                continue
            frame = b"".join(self._rx_parts)
            self._rx_parts = []
            self._rx_queue.append(frame)
            self.stats.rx_packets += 1
            self.stats.rx_bytes += len(frame)
            self._rx_ready.set()
        if got:
            self._push_rx(conn)

    async def receive(self) -> bytes:
        """The next Ethernet frame from the backend."""
        while not self._rx_queue:
            ready = self._rx_ready
            if ready.is_set():
                ready = self._rx_ready = trio.Event()
            await ready.wait()
        return self.receive_nowait()

    def receive_nowait(self) -> bytes:
        """A frame if one is waiting, else raise ``trio.WouldBlock``."""
        if not self._rx_queue:
            raise trio.WouldBlock
        frame = self._rx_queue.popleft()
        self._repost_parked(self.conn)
        return frame

    def _repost_parked(self, conn: _Connection | None) -> None:
        if self._rx_parked and conn is not None and conn.port is not None:
            parked, self._rx_parked = self._rx_parked, []
            for rx_id in parked:
                self._post_rx(conn, rx_id)
            self._push_rx(conn)

    # -- reconnection and tear-down --------------------------------------------------
    def _end(self, ref: int) -> None:
        if not self.grants.end_access(ref):
            # The backend still maps it: never reuse that grant; try again later.
            self._leaked.append(ref)
            self.stats.grants_leaked += 1

    def _retry_leaked(self) -> None:
        self._leaked = [ref for ref in self._leaked if not self.grants.end_access(ref)]

    async def disconnect(self) -> None:
        """The backend went away: stop using the rings, keep in-flight packets.

        Every grant we gave the old backend is ended (a dead domain's
        mappings are released by the hypervisor, so this succeeds).  In-flight
        packets move to the replay queue in the order they were sent.
        """
        conn = self.conn
        if conn is None or conn.closing:
            return
        conn.closing = True          # a second caller must not end the same grants again
        self._new_connection_event()
        if conn.scope is not None:
            conn.scope.cancel()
            with trio.CancelScope(shield=True):   # bounded: the task is cancelled
                await conn.left.wait()
        replay = list(self._inflight.values())
        for pkt in replay:
            pkt.ids = []
        self._replay.extendleft(reversed(replay))
        self._inflight.clear()
        self._tx_owner.clear()
        for ref in list(self._tx_gref.values()) + list(self._rx_gref.values()):
            self._end(ref)
        self._tx_gref.clear()
        self._rx_gref.clear()
        self._tx_free = list(range(len(self.tx_pages) - 1, -1, -1))
        self._rx_parts = []
        self._end(conn.tx_ring_ref)
        self._end(conn.rx_ring_ref)
        conn.tx.release()
        conn.rx.release()
        self.conn = None
        self._tx_space.set()      # senders re-check: they now queue for replay

    async def prepare(self, backend_domid: int) -> None:
        """Fresh rings for a (new) backend; then publish the refs and :meth:`connect`."""
        if self.conn is not None:
            raise NetfrontError("netfront still has rings: disconnect() first")
        self._retry_leaked()
        if self._leaked:
            # The old backend still maps our ring pages: use new pages for the rings.
            self._ring_pages = await _alloc(self.memory, 2)
        self._new_rings(backend_domid)

    async def close(self) -> None:
        """Tear down: end every grant and free the pages (in-flight packets are lost)."""
        await self.disconnect()
        self._replay.clear()
        self._retry_leaked()
        pages = self._ring_pages + self.tx_pages + self.rx_pages
        self._ring_pages, self.tx_pages, self.rx_pages = [], [], []
        await self.memory.free(pages)


async def _alloc(memory: Memory, nr: int) -> list[Any]:
    # A page travels as a file descriptor; a Unix socket message carries at most
    # 253 of them (SCM_MAX_FD), so ask for pages in modest batches.
    pages: list[Any] = []
    while len(pages) < nr:
        pages += await memory.alloc(min(64, nr - len(pages)))
    return pages
