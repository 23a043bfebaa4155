"""blkfront: the guest's half of a virtual block device, and its block API.

In Xen
    blkfront (Linux drivers/block/xen-blkfront.c) turns the guest's block I/O
    into ``blkif`` requests on a ring shared with blkback.  Each request names
    sectors and the guest pages (by grant reference) that hold or receive the
    data; blkback answers with the request's ``id``.  blkfront keeps a
    *shadow* copy of every request it has put on the ring.  When the backend
    goes away (its driver domain crashed and was restarted, or the guest was
    migrated) the frontend sets up a brand-new ring and event channel with
    whatever backend the toolstack now names, and *re-issues every request
    that had not been answered* (blkif_recover).  Guests see a pause, not an
    error.

Here
    :class:`BlkFront` is that driver plus the block-device API guest programs
    use: ``await dev.read(sector, count)``, ``await dev.write(sector, data)``,
    ``await dev.flush()``, ``await dev.discard(sector, count)``, at 512-byte
    sector granularity.  Any number of tasks may call them at once; up to one
    ring's worth (32) of blkif requests are in flight, the rest wait for a slot.
    A large read or write is split into requests of up to 11 pages each, or,
    when the backend offers ``feature-max-indirect-segments``, of up to 256
    pages (1 MiB) each, as BLKIF_OP_INDIRECT requests whose segment arrays
    live in an *indirect page* granted beside the data (one per ring slot,
    allocated once).  At most 1024 data pages are in flight at once, so the
    backend's persistent grants (1056 per device, as in Linux) cover them.

    Every request lives in ``inflight`` from the moment it is issued until its
    response arrives, with its own copy of the data to write and its own run
    of data pages (which it keeps across reconnects).  The backend is considered gone
    when any of these is seen:
      * its ``state`` leaves Connected (Closing, Closed, or the node vanished
        because the toolstack removed the dead driver domain's directory);
      * the frontend's ``backend`` node names a different backend;
      * the event channel's peer end is no longer bound (the hypervisor closes
        a dead domain's ports and signals the survivors).
    Then: take any responses the old backend did publish, give back the old
    ring and grants, switch to Initialising, wait for a backend in InitWait,
    connect again and replay ``inflight`` in issue order.

The data path
    A request's data pages are a contiguous run of the device's I/O page
    pool (domains/kernel/io_pool.py: one vmapped area, runs from a buddy
    allocator), so a write's data goes in with one memcpy and a read's
    result comes out with one (as ``pread`` makes its bytes).  Slot ``i``
    of the pool is always the same frame, so with persistent grants a
    connection keeps a table of every slot's packed segment (grant, first
    and last sector), built as slots are first granted, and a request's
    segments are a slice of it: a 1 MiB request costs the same Python as a
    4 KiB one.  Issuing takes a free ring slot without yielding to the
    scheduler when one is free and publishes the request; an event is sent
    only if the backend asked for one (ring.h's hold-off), so while blkback
    is busy a stream of requests costs no notification.  A write's chunks
    are views of one private copy of the caller's data (``bytes`` are
    immutable, so that copy is the caller's own object).

    A request whose pages do not fit the current backend's limit (a replay
    to a backend that offers fewer segments than the one it was issued to)
    goes on the ring as several parts, and parts that find no free ring
    slot wait in the connection's backlog until a response frees one, as
    Linux's blkif_recover requeues what no longer fits.

Grants
    Two modes (``persistent=``): with *persistent grants* (the default, and
    ``feature-persistent`` in XenStore) each data page is granted to the
    backend once per connection and the backend keeps it mapped, so the steady
    state costs no grant operation; *per-request* grants each page for one
    request (read-only for writes) and ends the grant when the answer comes,
    so the backend maps and unmaps every time.  bench/block_bench.py measures
    both; persistent grants are several times faster here because every grant
    map is a hypercall round trip through the hypervisor process.

Invariant
    An acknowledged request was answered OKAY by a backend; an unanswered one
    is never dropped, only replayed.  A caller that stops waiting (its task
    is cancelled) does not take its request back either, as a bio cannot be:
    once on a ring, a request keeps its pages and its ring slot until it is
    answered, so no later request's data shares a page with a backend that
    is still reading or writing it.  A response with an id we did not issue is
    ignored and logged; a response ring that cannot be true is treated as the
    backend going away.

Where this differs from Xen
    Writes are replayed from the frontend's private copy of the data, not
    from the granted pages (which belong to the old connection's grants);
    Linux re-grants the same pages.  The effect is the same.
"""

from __future__ import annotations

import collections
import itertools
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import trio

from domains.kernel import faultpoint
from domains.kernel.io_pool import IoPagePool
from domains.kernel.xenbus import (FrontendDevice, XenbusState, connect_retrying,
                                   frontend_start_over, peer_gone, publish_and_wait_connected,
                                   first_device, read_nodes, to_int)
from ipc import blkif
from ipc.page import PAGE_SIZE
from ipc.ring import FrontRing, RingCorruptError, ring_size

if TYPE_CHECKING:
    from domains.kernel.boot import Kernel
    from domains.kernel.memory import Page

log = logging.getLogger("blkfront")

SECTOR = blkif.SECTOR_SIZE
SEGS = blkif.BLKIF_MAX_SEGMENTS_PER_REQUEST
SECTORS_PER_PAGE = blkif.SECTORS_PER_PAGE
#: How long the frontend waits on a silent event channel before asking the
#: hypervisor whether the backend's end is still bound.
STALL_CHECK = 1.0
#: Bound on each step of giving back a dead connection (a lost reply must not
#: keep the device from reaching the next backend; the worst case is a leaked page).
CLEANUP_TIMEOUT = 2.0
#: Pause before trying again after a handshake step failed (a backend that died
#: mid-handshake, a refused hypercall): a retry, never a wait for something.
RETRY_DELAY = 0.05
#: Requests one single-page ring holds (32 for blkif's 112-byte entries).
RING_SLOTS = ring_size(PAGE_SIZE, blkif.ENTRY_SIZE)
#: Segments this frontend puts in one indirect request (at most the
#: backend's feature-max-indirect-segments): 1 MiB of 4 KiB pages.
MAX_INDIRECT_SEGMENTS = 256
#: Data pages in flight at once: the size of the I/O page pool (Linux sizes
#: its grant pool the same way: with one indirect page per ring slot,
#: 1024 + 32 = blkback's 1056 persistent grants per device, so the steady
#: state maps nothing).
MAX_INFLIGHT_PAGES = 1024
#: A request is ``struct blkif_request``'s head and a slice of packed
#: segments (gref, first_sect, last_sect).
_HEAD, _SEG = blkif.REQUEST_HEAD, blkif.SEGMENT
#: Where a packed segment's last_sect lies, counted from its end.
_LAST_SECT = 5 - _SEG.size
#: How much request history :meth:`BlkFront.history` keeps: the last few
#: requests for each of the most recently used sectors.
HISTORY_PER_SECTOR = 4
HISTORY_SECTORS = 4096


class BlockIOError(OSError):
    """The backend answered a request with an error status."""


@dataclass(eq=False, slots=True)
class _Req:
    op: int
    sector: int
    nsect: int
    data: bytes | memoryview | None = None   # private copy of the data to write
    discard_count: int = 0
    seq: int = -1
    run: int = -1           # first slot of its pages in the I/O pool (-1: none)
    npages: int = 0
    done: trio.Event = field(default_factory=trio.Event)
    status: int | None = None
    result: bytes = b""
    raw: Callable[[int], bytes] | None = None   # tests: build the slot bytes from an id
    grefs: list[int] = field(default_factory=list)   # per-request grants of this connection
    parts_left: int = 0                   # ring requests still unanswered on this connection
    part_status: int = blkif.BLKIF_RSP_OKAY   # the first error any part got
    on_ring: bool = False                 # put on some backend's ring at least once
    abandoned: bool = False               # its caller stopped waiting (see _issue)
    #: What happened to it, for failure reports: ("put", conn, id, gfns, grefs)
    #: (of the first 11 pages),
    #: ("done", conn, id, status, how), ("data", first bytes of the page).
    trace: list = field(default_factory=list)


class _Conn:
    """One connection to one backend: ring, port, grants."""

    def __init__(self, be_path: str, be_id: int, ring_page: "Page", ring_ref: int,
                 ring: FrontRing, port, persistent: bool) -> None:
        self.be_path, self.be_id = be_path, be_id
        self.ring_page, self.ring_ref, self.ring = ring_page, ring_ref, ring
        self.port = port
        self.persistent = persistent
        self.shadow: dict[int, _Req] = {}
        self.free_ids = list(range(ring.size - 1, -1, -1))
        self.pgrants: dict[int, int] = {}   # gfn -> gref (persistent mode)
        #: Persistent mode: each pool slot's packed segment (its grant, the
        #: whole page), once granted on this connection; ``granted`` marks them.
        self.segtab = bytearray(MAX_INFLIGHT_PAGES * _SEG.size)
        self.granted = bytearray(MAX_INFLIGHT_PAGES)
        #: Segments one request may carry here: 11, or the indirect limit.
        self.max_segs = SEGS
        #: Parts waiting for a ring slot: (request, first page, end page).
        self.backlog: collections.deque[tuple[_Req, int, int]] = collections.deque()
        self.lost = trio.Event()
        self.closed = False
        self.no = 0                 # which connection of this device, for traces


class BlkFront:
    """A virtual block device ``device/vbd/<devid>`` of this guest."""

    def __init__(self, k: "Kernel", xs, devid: int | str, persistent: bool = True) -> None:
        self.k = k
        self.xs = xs
        self.dev = FrontendDevice(xs, k.domid, "vbd", devid)
        self.persistent_wanted = persistent
        self.sectors = 0
        self.sector_size = SECTOR
        self.readonly = False
        self.features: dict[str, int] = {}
        self.inflight: dict[int, _Req] = {}
        self._seq = itertools.count()
        self._conns = itertools.count(1)
        #: (seq, op, trace) of the last few requests starting at each of the
        #: most recently used sectors (see :meth:`history`).  Bounded both
        #: ways, and holding traces only, never a request's data.
        self._recent: collections.OrderedDict[int, collections.deque] = collections.OrderedDict()
        self._slots = trio.Semaphore(RING_SLOTS)
        self.pool = IoPagePool(k.memory, MAX_INFLIGHT_PAGES, MAX_INDIRECT_SEGMENTS)
        self._indirect: list["Page"] = []   # ring id -> its indirect page
        self._max_segs = SEGS               # the last connection's limit, for splitting
        self._conn: _Conn | None = None
        self._connected = trio.Event()
        self.stats = {"reconnects": 0, "replayed": 0, "bogus_responses": 0, "requests": 0}

    # -- public API --------------------------------------------------------------
    async def start(self, nursery: trio.Nursery, timeout: float = 60.0) -> "BlkFront":
        """Start the driver and wait until the device is connected the first time."""
        await self.dev.watch_otherend(nursery)
        nursery.start_soon(self._run)
        faultpoint.ensure_agent(self.k, self.xs, nursery)
        with trio.fail_after(timeout):
            await self._connected.wait()
        return self

    def history(self, sector: int) -> str:
        """The last few requests that started at ``sector``: for a failure
        report, what each went through (connection, ring id, pages, grants,
        completion), oldest first."""
        return "; ".join(f"#{seq} {blkif.OP_NAMES.get(op, op)} {trace}"
                         for seq, op, trace in self._recent.get(sector, ())) or "none"

    def _remember(self, req: _Req) -> None:
        recent = self._recent
        last = recent.get(req.sector)
        if last is None:
            last = recent[req.sector] = collections.deque(maxlen=HISTORY_PER_SECTOR)
            if len(recent) > HISTORY_SECTORS:
                recent.popitem(last=False)
        else:
            recent.move_to_end(req.sector)
        last.append((req.seq, req.op, req.trace))

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def wait_connected(self) -> None:
        await self._connected.wait()

    async def read(self, sector: int, count: int) -> bytes:
        """Read ``count`` sectors from ``sector``."""
        self._check(sector, count)
        if count <= self._max_segs * SECTORS_PER_PAGE:    # one request: the common case
            req = _Req(blkif.BLKIF_OP_READ, sector, count)
            await self._issue(req)
            return req.result
        reqs = [_Req(blkif.BLKIF_OP_READ, s, n) for s, n in self._split(sector, count)]
        await self._all([(self._issue, req) for req in reqs])
        return reqs[0].result if len(reqs) == 1 else b"".join(req.result for req in reqs)

    async def write(self, sector: int, data: bytes) -> None:
        """Write ``data`` (a whole number of sectors) at ``sector``."""
        if len(data) % SECTOR:
            raise ValueError(f"write of {len(data)} bytes is not a whole number of "
                             f"{SECTOR}-byte sectors")
        if self.readonly:
            raise BlockIOError(30, f"{self.dev.nodename} is read-only")
        self._check(sector, len(data) // SECTOR)
        data = memoryview(bytes(data))     # our own immutable copy; chunks are views of it
        if len(data) <= self._max_segs * PAGE_SIZE:       # one request: the common case
            await self._issue(_Req(blkif.BLKIF_OP_WRITE, sector, len(data) // SECTOR, data))
            return
        jobs = []
        for s, n in self._split(sector, len(data) // SECTOR):
            off = (s - sector) * SECTOR
            jobs.append((self._write_one, s, n, data[off:off + n * SECTOR]))
        await self._all(jobs)

    async def _write_one(self, s: int, n: int, chunk: bytes | memoryview) -> None:
        await self._issue(_Req(blkif.BLKIF_OP_WRITE, s, n, chunk))

    async def flush(self) -> None:
        """Return once everything written before is on stable storage."""
        op = (blkif.BLKIF_OP_FLUSH_DISKCACHE if self.features.get("feature-flush-cache", 1)
              else blkif.BLKIF_OP_WRITE_BARRIER)
        await self._issue(_Req(op, 0, 0))

    async def discard(self, sector: int, count: int) -> None:
        """Tell the disk these sectors are unused (they then read as zeros here)."""
        self._check(sector, count)
        await self._issue(_Req(blkif.BLKIF_OP_DISCARD, sector, 0, discard_count=count))

    async def submit_raw(self, build: Callable[[int], bytes], nsect: int = 0) -> tuple[int, int]:
        """Put a hand-made request on the ring (for tests of hostile guests).

        ``build(id)`` returns the slot's bytes.  Returns (status, id) of the answer.
        """
        req = _Req(blkif.BLKIF_OP_READ, 0, nsect, raw=build)
        await self._issue(req)
        return req.status, 0

    def _check(self, sector: int, count: int) -> None:
        if sector < 0 or count < 0 or sector + count > self.sectors:
            raise ValueError(f"sectors {sector}..{sector + count - 1} are outside "
                             f"{self.dev.nodename} ({self.sectors} sectors)")

    def _split(self, sector: int, count: int) -> list[tuple[int, int]]:
        per = self._max_segs * SECTORS_PER_PAGE
        return [(s, min(per, sector + count - s)) for s in range(sector, sector + count, per)]

    @staticmethod
    async def _all(jobs) -> None:
        if len(jobs) == 1:
            fn, *args = jobs[0]
            await fn(*args)
            return
        async with trio.open_nursery() as nursery:
            for fn, *args in jobs:
                nursery.start_soon(fn, *args)

    # -- issuing ------------------------------------------------------------------
    async def _issue(self, req: _Req) -> bytes:
        slots = self._slots
        try:                        # the common case takes a free slot without a
            slots.acquire_nowait()  # trip through the scheduler
        except trio.WouldBlock:
            await slots.acquire()
        npages = -(-req.nsect * SECTOR // PAGE_SIZE) if req.raw is None else 0
        try:
            if npages:
                req.run = await self.pool.take(npages)
                req.npages = npages
            req.seq = next(self._seq)
            self._remember(req)
            self.inflight[req.seq] = req
            self.stats["requests"] += 1
            conn = self._conn
            if conn is not None and not conn.lost.is_set():
                self._put(conn, req)
                self._push(conn)
            try:
                await req.done.wait()
            except BaseException:
                if req.on_ring and not req.done.is_set():
                    # Cancelled while out on a ring: like a bio, it cannot be
                    # taken back.  It stays in flight (replayed if need be)
                    # and gives back its pages and ring slot when answered,
                    # so no later request's data shares a page with a backend
                    # still reading or writing it.
                    req.abandoned = True
                raise
        finally:
            if not req.abandoned:
                self._retire(req)
        if req.raw is not None:
            return b""
        if req.status != blkif.BLKIF_RSP_OKAY:
            what = blkif.OP_NAMES.get(req.op, req.op)
            raise BlockIOError(5, f"{self.dev.nodename}: {what} of sectors {req.sector}.."
                                  f"{req.sector + max(req.nsect, req.discard_count) - 1} "
                                  f"failed (status {req.status})")
        return req.result

    def _retire(self, req: _Req) -> None:
        """A request is over: its place in flight, its pages and its ring slot go back."""
        self.inflight.pop(req.seq, None)
        if req.run >= 0:
            self.pool.give(req.run, req.npages)
            req.run = -1
        self._slots.release()

    def _put(self, conn: _Conn, req: _Req) -> None:
        """Put one request on the ring (synchronous: no other task runs meanwhile).

        Normally one ring request; several parts if its pages exceed what
        this backend takes in one.  A part that finds no free ring id waits
        in the backlog (only a replay can overflow the ring)."""
        npages = req.npages
        per = conn.max_segs
        req.on_ring = True
        req.part_status = blkif.BLKIF_RSP_OKAY
        if npages <= per:
            req.parts_left = 1
            self._put_part(conn, req, 0, npages)
            return
        starts = range(0, npages, per)
        req.parts_left = len(starts)
        for lo in starts:
            self._put_part(conn, req, lo, min(lo + per, npages))

    def _put_part(self, conn: _Conn, req: _Req, lo: int, hi: int) -> None:
        """Pages ``lo``..``hi`` of ``req`` as one ring request (or into the backlog)."""
        if not conn.free_ids:
            conn.backlog.append((req, lo, hi))
            return
        rid = conn.free_ids.pop()
        conn.shadow[rid] = req
        if req.raw is not None:
            conn.ring.put_request(req.raw(rid))
            return
        if req.op == blkif.BLKIF_OP_DISCARD:
            conn.ring.put_request(blkif.BlkifRequestDiscard(rid, req.sector, req.discard_count).pack())
            return
        writing = req.op != blkif.BLKIF_OP_READ
        first, n = req.run + lo, hi - lo
        segs = bytearray()
        if n:           # (a flush or barrier has no pages)
            # The part's bytes: whole pages, then perhaps a last partial one.
            nbytes = min(req.nsect * SECTOR - lo * PAGE_SIZE, n * PAGE_SIZE)
            if writing:
                off = lo * PAGE_SIZE
                self.pool.view(first, nbytes)[:] = req.data[off:off + nbytes]
            if conn.persistent:
                if conn.granted.find(0, first, first + n) >= 0:
                    self._grant_slots(conn, first, n)
                segs = conn.segtab[first * _SEG.size:(first + n) * _SEG.size]
            else:
                gfns = self.pool.gfns
                segs = bytearray(b"".join([_SEG.pack(self._grant(conn, req, gfns[s], writing),
                                                     0, SECTORS_PER_PAGE - 1)
                                           for s in range(first, first + n)]))
            if nbytes % PAGE_SIZE:
                segs[_LAST_SECT] = nbytes % PAGE_SIZE // SECTOR - 1
        sector = req.sector + lo * SECTORS_PER_PAGE
        if n <= SEGS:
            raw = _HEAD.pack(req.op, n, 0, rid, sector) + segs
        else:       # BLKIF_OP_INDIRECT: the segments go in this id's indirect page
            table = self._indirect[rid]
            table.map[:len(segs)] = segs
            raw = blkif.BlkifRequestIndirect(
                req.op, rid, sector, n,
                (self._grant(conn, req, table.gfn, True),)).pack()
        req.trace.append(("put", conn.no, rid, self.pool.gfns[first:first + min(n, SEGS)] if n
                          else [], memoryview(segs).cast("I")[0:2 * SEGS:2].tolist()))
        conn.ring.put_request(faultpoint.hit_nowait("blkfront.request",
                                                    raw.ljust(blkif.REQUEST_SIZE, b"\0")))

    def _grant_slots(self, conn: _Conn, first: int, n: int) -> None:
        """Grant this connection's backend the pool slots ``first``.. that it
        has not been granted yet, and enter them in its segment table."""
        gfns, grant = self.pool.gfns, self.k.grants.grant_access
        for s in range(first, first + n):
            if not conn.granted[s]:
                gref = conn.pgrants[gfns[s]] = grant(conn.be_id, gfns[s])
                _SEG.pack_into(conn.segtab, s * _SEG.size, gref, 0, SECTORS_PER_PAGE - 1)
                conn.granted[s] = 1

    def _grant(self, conn: _Conn, req: _Req, gfn: int, readonly: bool) -> int:
        """The grant reference the backend uses for frame ``gfn`` on this connection."""
        if conn.persistent:
            gref = conn.pgrants.get(gfn)
            if gref is None:
                gref = conn.pgrants[gfn] = self.k.grants.grant_access(conn.be_id, gfn)
            return gref
        gref = self.k.grants.grant_access(conn.be_id, gfn, readonly=readonly)
        req.grefs.append(gref)
        return gref

    def _push(self, conn: _Conn) -> None:
        if conn.ring.push_requests_and_check_notify():
            conn.port.notify_nowait()
        faultpoint.hit_nowait("blkfront.push", conn.ring)

    def _complete(self, conn: _Conn, rsp: blkif.BlkifResponse, how: str = "ring") -> None:
        req = conn.shadow.pop(rsp.id, None) if rsp.id < conn.ring.size else None
        if req is None:
            self.stats["bogus_responses"] += 1
            log.warning("%s: response for id %d, which is not outstanding: ignored",
                        self.dev.nodename, rsp.id)
            return
        conn.free_ids.append(rsp.id)
        if conn.backlog and not conn.closed:
            self._put_part(conn, *conn.backlog.popleft())
            self._push(conn)
        faultpoint.count("io.complete", rsp.status)
        req.trace.append(("done", conn.no, rsp.id, rsp.status, how, req.done.is_set()))
        if rsp.status != blkif.BLKIF_RSP_OKAY and req.part_status == blkif.BLKIF_RSP_OKAY:
            req.part_status = rsp.status
        req.parts_left -= 1
        if req.parts_left > 0:
            return
        status = req.part_status
        if req.op == blkif.BLKIF_OP_READ and req.run >= 0:
            req.trace.append(("data", bytes(self.pool.view(req.run, 24)).hex()))
        self._end_grants(req)
        if req.op == blkif.BLKIF_OP_READ and req.raw is None and status == blkif.BLKIF_RSP_OKAY:
            req.result = bytes(self.pool.view(req.run, req.nsect * SECTOR))
        req.status = status
        req.done.set()
        if req.abandoned:
            self._retire(req)

    def _end_grants(self, req: _Req) -> None:
        for gref in req.grefs:
            if not self.k.grants.end_access_deferred(gref):
                log.debug("grant %d still mapped by the backend; ending it later", gref)
        req.grefs = []

    # -- the connection loop ----------------------------------------------------------
    async def _run(self) -> None:
        while True:
            conn = await connect_retrying(self.dev.nodename, self._connect, RETRY_DELAY, log)
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._responses, conn)
                    nursery.start_soon(self._watch_backend, conn)
                    await conn.lost.wait()
                    nursery.cancel_scope.cancel()
            finally:
                with trio.CancelScope(shield=True):
                    await self._disconnect(conn)
            self.stats["reconnects"] += 1

    async def _connect(self) -> _Conn | None:
        dev, xs, k = self.dev, self.xs, self.k
        be_path, be_id = await dev.wait_for_backend({XenbusState.InitWait})
        # blkback publishes the disk's size and its features before InitWait:
        # one round trip reads them all.  (Linux's blkfront reads the size again
        # at Connected, for disks that grow; these do not.)
        feats = ("feature-flush-cache", "feature-barrier", "feature-discard")
        raw = await read_nodes(xs, [f"{be_path}/{k}" for k in (
            "feature-persistent", "feature-max-indirect-segments", "sectors", "sector-size",
            "info", *feats)])
        persistent = self.persistent_wanted and to_int(raw[0], 0) == 1
        indirect = min(to_int(raw[1], 0) or 0, MAX_INDIRECT_SEGMENTS)
        if indirect > SEGS and not self._indirect:
            self._indirect = await k.memory.alloc(RING_SLOTS)
        page = (await k.memory.alloc(1))[0]
        page.map[:] = bytes(PAGE_SIZE)
        ring = FrontRing.init(page.map, blkif.ENTRY_SIZE)
        ring_ref = k.grants.grant_access(be_id, page.gfn)
        port = await k.events.alloc_unbound(be_id)
        conn = _Conn(be_path, be_id, page, ring_ref, ring, port, persistent)
        conn.no = next(self._conns)
        conn.max_segs = max(indirect, SEGS)

        try:
            if not await publish_and_wait_connected(dev, be_path, [
                    ("ring-ref", str(ring_ref)), ("event-channel", str(port.port)),
                    ("protocol", "x86_64-abi"),
                    ("feature-persistent", "1" if persistent else "0")], log):
                await self._disconnect(conn)
                return None
            self.sectors = to_int(raw[2], 0) or 0
            self.sector_size = to_int(raw[3], SECTOR) or SECTOR
            info = to_int(raw[4], 0) or 0
            self.readonly = bool(info & blkif.VDISK_READONLY)
            for feat, value in zip(feats, raw[5:]):
                self.features[feat] = to_int(value, 0) or 0
            await dev.switch_state(XenbusState.Connected)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._disconnect(conn)
            raise
        # Replay everything not yet answered, in the order it was first issued.
        replay = sorted(self.inflight.values(), key=lambda r: r.seq)
        for req in replay:
            self._put(conn, req)
        if replay:
            if self.stats["reconnects"]:
                self.stats["replayed"] += len(replay)
            self._push(conn)
        self._conn = conn
        self._max_segs = conn.max_segs
        self._connected.set()
        log.info("%s: connected to %s (%d sectors, %s grants, %d segments a request, "
                 "%d requests replayed)", dev.nodename, be_path, self.sectors,
                 "persistent" if persistent else "per-request", conn.max_segs, len(replay))
        return conn

    async def _responses(self, conn: _Conn) -> None:
        """Take responses until the connection is lost.

        Every look at the shared ring may find a producer index the backend
        could not truthfully have written; that is the backend going away
        (reconnect and replay), never an exception out of the guest.
        """
        try:
            await self._take_responses(conn)
        except (RingCorruptError, blkif.BlkifError) as exc:
            log.warning("%s: backend broke the ring (%s); reconnecting", self.dev.nodename, exc)
            conn.lost.set()

    async def _take_responses(self, conn: _Conn) -> None:
        ring, port = conn.ring, conn.port
        checking = False

        async def check_peer() -> None:
            nonlocal checking
            try:
                if await peer_gone(port, self.dev.nodename):
                    log.info("%s: backend's event channel is gone", self.dev.nodename)
                    conn.lost.set()
            finally:
                checking = False
        async with trio.open_nursery() as nursery:
            while True:
                got = ring.responses()
                for raw in got:
                    self._complete(conn, blkif.BlkifResponse.unpack(raw))
                if got or ring.final_check_for_responses():
                    continue
                woke = False
                with trio.move_on_after(STALL_CHECK):
                    await port.wait()
                    woke = True
                if (woke or conn.shadow) and ring.unconsumed_responses() == 0 and not checking:
                    # A wake with nothing to read is what the hypervisor does
                    # when the peer's end dies, but also what an event sent for
                    # responses already taken looks like (common when a backend
                    # answers requests one by one): ask whether it is still
                    # bound, beside the ring rather than in front of it.
                    checking = True
                    nursery.start_soon(check_peer)

    async def _watch_backend(self, conn: _Conn) -> None:
        dev = self.dev
        why = await dev.wait_for_backend_gone(conn.be_path)
        log.info("%s: lost backend %s: %s", dev.nodename, conn.be_path, why)
        conn.lost.set()

    async def _disconnect(self, conn: _Conn) -> None:
        """Give back the old connection; keep the requests for replay.

        Idempotent: a second call (a clean-up path after a failed first one)
        must not end the ring's grant or free its page twice."""
        if conn.closed:
            return
        conn.closed = True
        self._connected = trio.Event() if self._connected.is_set() else self._connected
        if self._conn is conn:
            self._conn = None
        # Responses the old backend did publish are real answers: take them.
        try:
            for raw in conn.ring.responses():
                self._complete(conn, blkif.BlkifResponse.unpack(raw), "drain")
        except Exception:
            pass
        for req in conn.shadow.values():
            self._end_grants(req)
        for req, _lo, _hi in conn.backlog:
            self._end_grants(req)
        conn.shadow.clear()
        conn.backlog.clear()
        for gref in conn.pgrants.values():
            if not self.k.grants.end_access_deferred(gref):
                log.debug("grant %d still mapped by the backend; ending it later", gref)
        conn.pgrants.clear()
        await frontend_start_over(self.dev, conn.port, CLEANUP_TIMEOUT)
        conn.ring.release()
        if self.k.grants.end_access(conn.ring_ref):
            with trio.move_on_after(CLEANUP_TIMEOUT):
                try:
                    await self.k.memory.free([conn.ring_page])
                except Exception:
                    pass
        else:   # the page stays ours (the old backend may still write it); the ref comes back later
            self.k.grants.end_access_deferred(conn.ring_ref)
            log.warning("ring grant %d still mapped; leaking the ring page", conn.ring_ref)


async def open_vbd(k: "Kernel", xs, nursery: trio.Nursery, devid: int | str | None = None,
                   persistent: bool = True, timeout: float = 60.0) -> BlkFront:
    """Start the frontend of ``device/vbd/<devid>`` (the first one if None)."""
    if devid is None:
        devid = await first_device(xs, k.domid, "vbd", timeout)
    return await BlkFront(k, xs, devid, persistent).start(nursery, timeout)


__all__ = ["BlkFront", "BlockIOError", "open_vbd"]
