"""blkback: the backend half of a virtual block device (VBD).

In Xen
    blkback (Linux drivers/block/xen-blkback) runs in dom0 or a storage driver
    domain.  For each VBD the toolstack made, it opens the physical device
    named in its backend directory's ``params``, publishes the disk's size and
    features, waits for the guest's blkfront to share a ring, and then serves
    ``blkif`` requests: it maps the guest's granted pages, does the I/O on the
    real device, and answers each request with its ``id`` and a status.

Here
    The "physical device" is a raw image file, and only this process (the
    driver domain) ever opens it: that is the device assignment.  The ring and
    every data page are guest pages mapped through the hypervisor's grant
    table, so data moves through shared memory and never through a socket.

    Operations: READ, WRITE, WRITE_BARRIER and FLUSH_DISKCACHE (answered only
    after ``fdatasync`` returns, so an acknowledged flush is on stable
    storage), DISCARD (a hole punched in the image), and INDIRECT
    (``feature-max-indirect-segments``, as Linux's blkback): a read or write
    whose up to 256 segments live in granted *indirect pages* instead of the
    ring slot, so 1 MiB travels as one request and one preadv/pwritev instead
    of 24 requests of 11 pages.

    Grants are used in one of two ways, chosen by the frontend:
    *persistent* (``feature-persistent``, as Linux does): a page granted once
    is mapped on first use and kept mapped until the device disconnects, so
    the steady state costs no grant hypercall at all; or *per request*: map
    every segment's page, do the I/O, unmap.  bench/block_bench.py measures
    both.  Persistent mappings are placed side by side in one area of
    address space (domains/kernel/vmap.py), in the order they are first
    seen: blkfront sends the same runs of its I/O pool again and again, so
    a 1 MiB request is then one view for preadv/pwritev and one iovec for
    the kernel, not 256.

Invariant
    A guest cannot crash or wedge blkback.  Every request is decoded from a
    private copy of its slot; a bad grant reference, a sector range outside
    the disk, a segment outside its page, an unknown operation or a write to a
    read-only disk gets BLKIF_RSP_ERROR (or EOPNOTSUPP) for that request id and
    nothing else happens.  A producer index that runs past the ring
    (RingCorruptError) cannot be answered at all: the device is disconnected
    (state Closed) and this backend stops serving it; the driver domain and
    every other device carry on.  A hypercall that fails while serving a
    request (a grant map or unmap the hypervisor refuses) gets that request
    BLKIF_RSP_ERROR; one that fails outside a request (binding, the ring)
    raises out of the task, and the driver domain's BackendWatcher restarts
    the device with a fresh handshake.  The rings are registered with the
    watcher's progress check (xenbus.DeviceProgress), which restarts a device
    that has requests and answers none.

The data path
    Each wake-up takes every request the ring holds, serves them in ring
    order, then publishes all their responses at once and sends at most one
    event (ring.h's hold-off rules decide whether the frontend is even
    listening), so a busy ring costs one notification per batch, not per
    request; only the answer to a large request (PUSH_AT_PAGES) is pushed
    as soon as it is made.  A read or write is a single preadv/pwritev between the image
    and memoryviews of the granted pages: the guest's memory is the I/O
    buffer, as with DMA, and no bytes object is made on the way.

    The image is read through this domain's page cache unless the
    toolstack wrote ``direct-io-safe = 1`` (the disk spec's
    ``direct-io-safe`` flag, which gives QEMU's qdisk the same permission):
    then it is opened with O_DIRECT and every transfer goes to the device
    itself, as Linux's blkback submits bios to the disk and caches nothing.
    In that mode reads and writes are queued on the device with Linux AIO
    (domains/driverdom/aio.py) and answered as they complete, so up to a
    ring's worth are in flight.  In both modes flushes, barriers and
    discards wait until every request taken before them is done; a flush's
    ``fdatasync`` then runs beside the requests after it.

    Once a connection's pages are persistently mapped, a read or write of
    whole pages (direct or indirect) takes a fast lane (``_fast_io``): its
    segments, copied out of the slot or the indirect page, are looked up
    byte for byte among the arrangements of pages already decoded on this
    connection, so only a new one is unpacked and checked; in page-cache
    mode it is then served inline; in O_DIRECT mode, with no task of its
    own, queued for the next ``io_submit`` as it is taken off the ring and
    answered from its completion callback (Linux's end_io).  Everything else, and everything
    while a fault is armed in this domain, takes the general path, which
    names what is wrong.

Where this differs from Xen
    In page-cache mode requests are served one after another, in ring order
    (Linux queues many to the block layer): each preadv or pwritev then
    costs a few microseconds, less than any hand-off would.  Worker threads
    were tried for O_DIRECT mode and measured slower than even serving
    inline on two cores; AIO is what pays.  Discard always punches a hole
    (reads of it return zeros).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import struct
from functools import partial
from typing import TYPE_CHECKING, NamedTuple

import trio

from domains.driverdom import aio
from domains.kernel import exception_groups, faultpoint
from domains.kernel.grant_table import GrantError, Mapping
from domains.kernel.vmap import VmArea
from ipc.channel import HypercallError
from domains.kernel.xenbus import (FRONTEND_GONE, XenbusState, backend_fail, backend_handshake,
                                   device_progress, frontend_is, read_nodes, switch_state,
                                   to_int, wait_until, write_nodes)
from ipc import blkif
from ipc.ring import BackRing, RingCorruptError, RingError

if TYPE_CHECKING:
    from domains.kernel.boot import Kernel

log = logging.getLogger("blkback")

SECTOR = blkif.SECTOR_SIZE
#: Persistent grants kept per device (Linux: max_persistent_grants, 1056).
MAX_PERSISTENT_GRANTS = 1056
#: Segments one indirect request may carry (Linux's MAX_INDIRECT_SEGMENTS):
#: 1 MiB in 4 KiB pages, whose 8-byte descriptors fill half an indirect page.
MAX_INDIRECT_SEGMENTS = 256
assert MAX_INDIRECT_SEGMENTS <= blkif.SEGS_PER_INDIRECT_FRAME    # one table page a request
#: In page-cache mode a request of at least this many pages is pushed to the
#: frontend as soon as it is answered, not with the rest of its batch: one
#: notification is cheap beside a transfer that size, and holding a large
#: answer back until the batch is done stalls a frontend with several in
#: flight (measured: 1 MiB reads at queue depth 4).  Small requests are still
#: pushed once per batch, which is what saves notifications at depth 32.
PUSH_AT_PAGES = 16
#: Fast-lane decodings a connection remembers (see Connection._fast_io):
#: one per distinct run of pages the frontend uses, so a few dozen in practice.
IO_CACHE_SIZE = 512

_libc = ctypes.CDLL(None, use_errno=True)      # the C library, as the process has it
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02


def punch_hole(fd: int, offset: int, length: int) -> None:
    """fallocate(PUNCH_HOLE): the blocks go back to the host file system."""
    r = _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE,
                        ctypes.c_long(offset), ctypes.c_long(length))
    if r != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class Disconnect(Exception):
    """The device cannot go on (a corrupt ring); the message says why."""


class BackendError(Exception):
    """This attempt failed for a reason that is not the frontend's (a hypercall);
    it propagates so the BackendWatcher restarts the device after a back-off."""


class BlkBack:
    """One VBD's backend: ``/local/domain/<self>/backend/vbd/<fe>/<devid>``."""

    def __init__(self, k: "Kernel", xs, path: str) -> None:
        self.k = k
        self.xs = xs
        self.path = path
        self.fd = -1
        self.sectors = 0
        self.readonly = False
        #: Opened with O_DIRECT (the toolstack wrote ``direct-io-safe = 1``
        #: and the file system allows it): I/O goes to the device, not this
        #: domain's page cache, as Linux's blkback does.
        self.direct = False
        self.stats = {"requests": 0, "errors": 0}

    # -- the xenbus side ----------------------------------------------------------
    async def run(self) -> None:
        try:
            await self._run()
        finally:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1

    async def _run(self) -> None:
        xs, path = self.xs, self.path
        raw = await read_nodes(xs, [f"{path}/{k}" for k in ("frontend", "frontend-id", "params",
                                                             "mode", "direct-io-safe")])
        fe_path = (raw[0] or b"").decode(errors="replace")
        fe_id = to_int(raw[1])
        params = (raw[2] or b"").decode(errors="replace")
        mode = (raw[3] or b"w").decode(errors="replace")
        if not fe_path or fe_id is None or not params:
            await self._fail(f"incomplete backend directory (frontend={fe_path!r}, "
                             f"frontend-id={fe_id!r}, params={params!r})")
            return
        self.readonly = mode.startswith("r")
        flags = (os.O_RDONLY if self.readonly else os.O_RDWR) | os.O_CLOEXEC
        try:
            if to_int(raw[4], 0) == 1:
                self.fd = _open_direct(params, flags)
                self.direct = self.fd >= 0
            if self.fd < 0:
                self.fd = os.open(params, flags)
            size = os.fstat(self.fd).st_size
        except OSError as exc:
            await self._fail(f"cannot open {params}: {exc.strerror}")
            return
        self.sectors = size // SECTOR
        info = blkif.VDISK_READONLY if self.readonly else 0
        await write_nodes(xs, ((f"{path}/{key}", value) for key, value in (
            ("sectors", self.sectors), ("sector-size", SECTOR),
            ("physical-sector-size", SECTOR), ("info", info),
            ("feature-flush-cache", 1), ("feature-barrier", 1),
            ("feature-discard", 0 if self.readonly else 1),
            ("discard-granularity", SECTOR), ("discard-alignment", 0),
            ("discard-secure", 0), ("feature-persistent", 1),
            ("feature-max-indirect-segments", MAX_INDIRECT_SEGMENTS))))
        log.info("%s: serving %s (%d sectors, %s, %s) to d%d", path, params, self.sectors,
                 "ro" if self.readonly else "rw", "O_DIRECT" if self.direct else "page cache",
                 fe_id)
        await backend_handshake(xs, path, fe_path,
                                lambda: self._connect_and_serve(fe_path, fe_id),
                                Disconnect, log)

    async def _fail(self, why: str) -> None:
        await backend_fail(self.xs, self.path, why, log)

    async def _connect_and_serve(self, fe_path: str, fe_id: int) -> None:
        xs = self.xs
        raw = await read_nodes(xs, [f"{fe_path}/{k}" for k in ("ring-ref", "event-channel",
                                                                "feature-persistent")])
        ring_ref, evtchn = to_int(raw[0]), to_int(raw[1])
        persistent = to_int(raw[2], 0) == 1
        if ring_ref is None or evtchn is None:
            raise Disconnect(f"frontend {fe_path} is Initialised without ring-ref/event-channel")
        try:
            ring_map = await self.k.grants.map(fe_id, ring_ref)
        except GrantError as exc:
            raise Disconnect(f"cannot map ring-ref {ring_ref} of d{fe_id}: {exc}") from None
        conn = None
        try:
            try:
                port = await self.k.events.bind_interdomain(fe_id, evtchn)
            except Exception as exc:
                # Often transient (the domain is out of ports for a moment): not
                # the frontend's fault, so the watcher retries with back-off.
                raise BackendError(f"cannot bind event channel {evtchn} of d{fe_id}: {exc}") from None
            conn = Connection(self, fe_id, ring_map, port, persistent)
            progress = device_progress(self.path)
            progress.add_ring(conn.ring)
            progress.kick = port._fire          # as if the frontend's event arrived
            progress.nudge = port.notify_nowait
            await switch_state(xs, self.path, XenbusState.Connected)
            log.info("%s: connected (ring-ref %d, port %d, %s grants)", self.path, ring_ref,
                     port.port, "persistent" if persistent else "per-request")
            async with trio.open_nursery() as nursery:
                async def watch_frontend() -> None:
                    await wait_until(xs, [f"{fe_path}/state"],
                                     frontend_is(xs, fe_path, FRONTEND_GONE))
                    nursery.cancel_scope.cancel()
                nursery.start_soon(watch_frontend)
                await conn.serve()
        finally:
            with trio.CancelScope(shield=True):
                if conn is not None:
                    await conn.close()
                else:
                    try:
                        await self.k.grants.unmap_many([ring_map])
                    except Exception:
                        pass


class Connection:
    """One connected ring: the request loop and the grant cache."""

    def __init__(self, back: BlkBack, fe_id: int, ring_map: Mapping, port, persistent: bool) -> None:
        self.back = back
        self.k = back.k
        self.fe_id = fe_id
        self.ring_map = ring_map
        self.ring = BackRing(ring_map.map, blkif.ENTRY_SIZE)
        self.port = port
        self.persistent = persistent
        self.pgrants: dict[int, Mapping] = {}
        #: Persistent mappings live in one area, each in the next free slot
        #: when first seen, so the pages of a run the frontend sends again
        #: and again (its I/O pool, domains/kernel/io_pool.py) lie side by
        #: side: one view and one iovec instead of one per page.
        self.area = VmArea(MAX_PERSISTENT_GRANTS) if persistent else None
        self._map_lock = trio.Lock()    # one first-sight mapping at a time: slots stay unique
        #: The fast lane's decodings: a request's segment bytes -> what to
        #: do with them (see _fast_io).
        self._io_cache: dict[bytes, _FastIo] = {}
        self.aio: "aio.AioContext | None" = None   # O_DIRECT mode's, while serving
        self._busy = 0                  # requests being served by tasks of their own
        self._idle = trio.Event()       # set each time _busy drops to 0
        self._broken: str | None = None # why such a task found the ring unusable

    async def close(self) -> None:
        try:
            self.ring.release()
        except Exception:
            pass
        for io in self._io_cache.values():       # a live view keeps the area mapped
            for view in io.views:
                view.release()
        self._io_cache.clear()
        maps = list(self.pgrants.values()) + [self.ring_map]
        self.pgrants.clear()
        for m in maps:
            m.release()
        if self.area is not None:
            try:
                self.area.close()               # the area's mappings go now ...
            except BufferError:
                # ... unless a view of it survived (a bug): then they stay
                # mapped, and the hypervisor must not be told otherwise.
                log.error("d%d: a view of the grant area is still in use; its "
                          "%d mappings stay until this domain ends", self.fe_id,
                          sum(self.area.mapped))
                maps = [m for m in maps if m.slot < 0]
        try:
            await self.k.grants.unmap_many(maps)
        except Exception:
            log.debug("unmapping after disconnect failed", exc_info=True)
        try:
            await self.port.close()
        except Exception:
            pass

    async def serve(self) -> None:
        """Answer requests until the ring breaks (Disconnect) or we are cancelled.

        Page-cache mode answers each request before taking the next: a
        preadv from the page cache costs less than any hand-off would.  In
        O_DIRECT mode each read and write waits for the device, so each runs
        as a task of its own whose transfer is queued on the device with
        Linux AIO, and is answered when it completes, in whatever order
        that is (as Linux's blkback hands bios to the block layer).  In
        both modes a flush, barrier or discard first waits for every request
        taken before it; a flush's fdatasync then runs in a task while the
        reads and writes after it go on."""
        with exception_groups.unwrap(Disconnect):     # a bare Disconnect, as promised
            await self._serve_in_mode()

    async def _serve_in_mode(self) -> None:
        if not self.back.direct or (ctx := aio.open_context(self.ring.size)) is None:
            await self._serve(None)
            return
        try:
            async with trio.open_nursery() as outer:
                # The context's task outlives the request tasks: they wait,
                # shielded, for their completions, so it stops only once they
                # are done.
                submitter = trio.CancelScope(shield=True)

                async def run_aio() -> None:
                    with submitter:
                        await ctx.run()
                outer.start_soon(run_aio)
                try:
                    await self._serve(ctx)
                finally:
                    # Transfers answered from their completions have no task
                    # for the nursery to wait for: wait for them here.
                    with trio.CancelScope(shield=True):
                        while self._busy:
                            await self._idle.wait()
                    submitter.cancel()
        finally:
            ctx.close()

    async def _serve(self, ctx: "aio.AioContext | None") -> None:
        ring = self.ring
        self.aio = ctx
        try:
            async with trio.open_nursery() as nursery:
                while True:
                    if self._broken:
                        raise Disconnect(self._broken)
                    try:
                        reqs = ring.requests()
                    except RingCorruptError as exc:
                        raise Disconnect(f"disconnecting d{self.fe_id}: {exc}") from None
                    if ctx is not None:
                        ctx.plug()          # the batch's transfers go in one io_submit
                    for raw in reqs:
                        if raw[0] in _CONCURRENT_OPS:
                            if ctx is not None:
                                self._busy += 1
                                if not self._start_direct(raw):
                                    nursery.start_soon(self._serve_one, raw)
                                continue
                            if npages := self._serve_inline(raw):
                                if npages >= PUSH_AT_PAGES:
                                    self._push()
                            else:
                                await self._answer(await self.handle(raw))
                            continue
                        # Anything else first waits for every request taken
                        # before it (so a flush covers them all) ...
                        if ctx is not None:
                            ctx.unplug()    # (they cannot finish before they are submitted)
                        while self._busy:
                            await self._idle.wait()
                        if raw[0] == blkif.BLKIF_OP_FLUSH_DISKCACHE:
                            # ... and a flush then runs beside the requests
                            # after it, which it promises nothing about (as
                            # Linux's REQ_PREFLUSH): fdatasync takes a while.
                            self._busy += 1
                            nursery.start_soon(self._serve_one, raw)
                            continue
                        await self._answer(await self.handle(raw))
                    if ctx is not None:
                        ctx.unplug()
                    if reqs:
                        self._push()
                        continue
                    try:
                        if ring.final_check_for_requests():
                            continue
                    except RingCorruptError as exc:
                        raise Disconnect(f"disconnecting d{self.fe_id}: {exc}") from None
                    await self.port.wait()
        finally:
            self.aio = None

    async def _serve_one(self, raw: bytes) -> None:
        """One request answered on its own: a read or write of O_DIRECT
        mode, or a flush in either mode."""
        try:
            await self._answer(await self.handle(raw))
            self._push()
        except Disconnect as exc:
            self._break(exc)
        finally:
            self._done_one()

    def _break(self, exc: Disconnect) -> None:
        """A request answered outside the serve loop broke the ring: the loop
        raises it where it is awaited (woken as if the frontend had kicked)."""
        self._broken = str(exc)
        self.port._fire()

    def _done_one(self) -> None:
        self._busy -= 1
        if not self._busy:
            self._idle.set()
            self._idle = trio.Event()

    def _fast_io(self, raw: bytes) -> "tuple[int, int, int, _FastIo] | None":
        """(op, id, sector, io) of a read or write, direct or indirect, of
        whole pages this connection already maps persistently, inside the
        disk and allowed by its mode; None for anything else (a page seen
        for the first time, part of a page, a request that breaks a rule),
        which :meth:`handle` serves and names the problem of.

        The data path's common case, so it does little: the request's
        segments are copied (privately: the guest may rewrite its pages)
        and looked up as they are, bytes for bytes, among the decodings
        already made on this connection.  Only a new arrangement of pages
        is unpacked and checked (:meth:`_decode_io`); a frontend that sends
        the same runs of its pool again and again pays that once."""
        op = raw[0]
        if op == blkif.BLKIF_OP_INDIRECT:
            fields = blkif.INDIRECT_LAYOUT.unpack_from(raw)
            op, nseg, rid, sector = fields[1:5]
            if op > blkif.BLKIF_OP_WRITE or not 0 < nseg <= MAX_INDIRECT_SEGMENTS:
                return None
            table = self.pgrants.get(fields[6])    # (256 segments fit one indirect page)
            if table is None:
                return None
            key = bytes(table.map[:nseg * blkif.SEGMENT_SIZE])
        else:
            nseg = raw[1]
            if op > blkif.BLKIF_OP_WRITE or not 0 < nseg <= blkif.BLKIF_MAX_SEGMENTS_PER_REQUEST:
                return None
            rid, sector = _ID_SECTOR.unpack_from(raw, 8)
            key = raw[_SEGS_AT:_SEGS_AT + nseg * blkif.SEGMENT_SIZE]
        io = self._io_cache.get(key)
        if io is None:
            io = self._decode_io(key, nseg)
            if io is None:
                return None
            if len(self._io_cache) >= IO_CACHE_SIZE:
                self._io_cache.clear()      # views in use elsewhere live on until dropped
            self._io_cache[key] = io
        back = self.back
        if sector + nseg * blkif.SECTORS_PER_PAGE > back.sectors \
                or (op == blkif.BLKIF_OP_WRITE and back.readonly):
            return None
        return op, rid, sector, io

    def _decode_io(self, segments: bytes, nseg: int) -> "_FastIo | None":
        """What ``segments`` (packed blkif segments) stand for, if every one
        is a whole page mapped in this connection's area: the runs of
        neighbouring slots they make, as views and as iovecs."""
        f = blkif.segment_array(nseg).unpack(segments)
        if f[1::3].count(0) != nseg or f[2::3].count(blkif.SECTORS_PER_PAGE - 1) != nseg:
            return None
        slots = []
        for gref in f[0::3]:
            m = self.pgrants.get(gref)
            if m is None or m.slot < 0:
                return None
            slots.append(m.slot)
        runs: list[list[int]] = []          # [first slot, count]
        for slot in slots:
            if runs and runs[-1][0] + runs[-1][1] == slot:
                runs[-1][1] += 1
            else:
                runs.append([slot, 1])
        area = self.area
        return _FastIo(nseg, tuple(area.pages(first, count) for first, count in runs),
                       b"".join(aio.iovec(area.addr + first * blkif.PAGE_SIZE,
                                          count * blkif.PAGE_SIZE) for first, count in runs))

    def _serve_inline(self, raw: bytes) -> int:
        """Page-cache mode's common case: a request :meth:`_fast_io`
        accepts is one preadv/pwritev between the file and the mapped
        pages, answered at once; returns how many pages it moved.  0
        (nothing done) for anything else, or while a fault is armed in this
        domain, so that :meth:`handle` serves it through its fault points."""
        if not faultpoint.quiet() or (got := self._fast_io(raw)) is None:
            return 0
        op, rid, sector, io = got
        back = self.back
        back.stats["requests"] += 1
        status = blkif.BLKIF_RSP_OKAY
        try:
            _vector_io(back.fd, io.views, sector * SECTOR, op == blkif.BLKIF_OP_READ)
        except OSError as exc:
            back.stats["errors"] += 1
            log.warning("d%d: I/O error on request id=%d: %s", self.fe_id, rid, exc)
            status = blkif.BLKIF_RSP_ERROR
        self._put_response(blkif.BlkifResponse(rid, op, status))
        return io.npages

    def _start_direct(self, raw: bytes) -> bool:
        """O_DIRECT mode's common case, with no task: a request
        :meth:`_fast_io` accepts (its pages lie in the connection's area,
        which outlives every transfer) goes to the device at once and is answered from its AIO completion, as Linux's
        blkback answers from a bio's end_io.  False for anything else, or
        while a fault is armed in this domain: :meth:`handle` serves it, in
        a task of its own."""
        if not faultpoint.quiet() or (got := self._fast_io(raw)) is None:
            return False
        op, rid, sector, io = got
        back = self.back
        back.stats["requests"] += 1
        self.aio.submit(back.fd, io.iov, sector * SECTOR, op == blkif.BLKIF_OP_READ,
                        partial(self._direct_done, op, rid, sector, io))
        return True

    def _direct_done(self, op: int, rid: int, sector: int, io: "_FastIo", res: int) -> None:
        """A :meth:`_start_direct` transfer is over: answer it."""
        status = blkif.BLKIF_RSP_OKAY
        if res != io.npages * blkif.PAGE_SIZE:
            try:
                if res < 0:
                    raise OSError(-res, os.strerror(-res))
                # Short: do it all again inline, as _do does.
                _vector_io(self.back.fd, io.views, sector * SECTOR, op == blkif.BLKIF_OP_READ)
            except OSError as exc:
                self.back.stats["errors"] += 1
                log.warning("d%d: I/O error on request id=%d: %s", self.fe_id, rid, exc)
                status = blkif.BLKIF_RSP_ERROR
        try:
            self._put_response(blkif.BlkifResponse(rid, op, status))
            self._push()
        except Disconnect as exc:
            self._break(exc)
        finally:
            self._done_one()

    async def _answer(self, rsp: blkif.BlkifResponse) -> None:
        self._put_response(await faultpoint.hit("blkback.response", rsp))

    def _put_response(self, rsp: blkif.BlkifResponse) -> None:
        try:
            self.ring.put_response(rsp.pack())
        except RingError as exc:
            raise Disconnect(f"disconnecting d{self.fe_id}: {exc}") from None

    def _push(self) -> None:
        if self.ring.push_responses_and_check_notify():
            self.port.notify_nowait()
        faultpoint.hit_nowait("blkback.push", self.ring)

    # -- one request ----------------------------------------------------------------
    async def handle(self, raw: bytes) -> blkif.BlkifResponse:
        back = self.back
        back.stats["requests"] += 1
        await faultpoint.hit("blkback.request")
        try:
            req = _decode_rw(raw)
            if req is None:         # anything else, or a bad read/write: the full decoder
                req = blkif.unpack_request(raw)
        except blkif.BlkifRequestError as exc:
            back.stats["errors"] += 1
            log.info("d%d: %s", self.fe_id, exc)
            status = blkif.BLKIF_RSP_EOPNOTSUPP if exc.operation == blkif.BLKIF_OP_RESERVED_1 \
                or exc.operation > blkif.BLKIF_OP_INDIRECT else blkif.BLKIF_RSP_ERROR
            return blkif.BlkifResponse(exc.id, exc.operation & 0xFF, status)
        try:
            status = await self._do(req)
        except _Refused as exc:
            back.stats["errors"] += 1
            log.info("d%d: request id=%d %s: %s", self.fe_id, req.id,
                     blkif.OP_NAMES.get(req.operation, req.operation), exc)
            status = exc.status
        except OSError as exc:
            back.stats["errors"] += 1
            log.warning("d%d: I/O error on request id=%d: %s", self.fe_id, req.id, exc)
            status = blkif.BLKIF_RSP_ERROR
        except (HypercallError, GrantError) as exc:
            # e.g. unmapping a segment failed after the I/O: the request gets an
            # error (the guest may retry it); the device goes on.
            back.stats["errors"] += 1
            log.warning("d%d: hypercall failed on request id=%d: %s", self.fe_id, req.id, exc)
            status = blkif.BLKIF_RSP_ERROR
        return blkif.BlkifResponse(req.id, req.operation, status)

    def _check_range(self, sector: int, count: int) -> None:
        if sector + count > self.back.sectors:
            raise _Refused(f"sectors {sector}..{sector + count - 1} lie outside the disk "
                           f"({self.back.sectors} sectors)")

    async def _do(self, req) -> int:
        back = self.back
        op = req.operation
        if op == blkif.BLKIF_OP_INDIRECT:
            req = await self._indirect_segments(req)
            op = req.operation
        if op == blkif.BLKIF_OP_DISCARD:
            if back.readonly:
                raise _Refused("discard on a read-only disk")
            self._check_range(req.sector_number, req.nr_sectors)
            if req.nr_sectors:
                await trio.to_thread.run_sync(punch_hole, back.fd, req.sector_number * SECTOR,
                                              req.nr_sectors * SECTOR)
            return blkif.BLKIF_RSP_OKAY
        if op in (blkif.BLKIF_OP_WRITE, blkif.BLKIF_OP_WRITE_BARRIER) and back.readonly:
            raise _Refused("write to a read-only disk")
        if op == blkif.BLKIF_OP_FLUSH_DISKCACHE and not req.segments:
            await trio.to_thread.run_sync(os.fdatasync, back.fd)
            return blkif.BLKIF_RSP_OKAY
        self._check_range(req.sector_number, req.nr_sectors)
        is_read = op == blkif.BLKIF_OP_READ
        if not is_read and faultpoint.hit_nowait("blkback.write") is faultpoint.DROP:
            return blkif.BLKIF_RSP_OKAY     # a broken backend, for testing the checker
        if op == blkif.BLKIF_OP_WRITE_BARRIER:
            # A barrier: everything acknowledged before it is on disk first.
            await trio.to_thread.run_sync(os.fdatasync, back.fd)
        maps, temporary = await self._map(req.segments, writable=is_read)
        # The segments are consecutive on disk, so the whole request is one
        # preadv/pwritev straight between the file and the granted pages (the
        # guest's memory): no bytes object in between.
        views: list[memoryview] = []
        made: list[memoryview] = []     # views of this request only, released after
        # Linux AIO needs each buffer's address: a persistent page's is its
        # slot's in the area; any other view is pinned for this request.
        use_aio = self.aio is not None and not any(m.readonly for m in maps)
        iov: list[bytes] = []           # packed struct iovec entries
        pins: list[aio.Pin] = []
        try:
            for seg, m in zip(req.segments, maps):
                lo, hi = seg.first_sect * SECTOR, (seg.last_sect + 1) * SECTOR
                v = memoryview(m.map)[lo:hi]
                made.append(v)
                views.append(v)
                if not use_aio:
                    continue
                if m.slot >= 0:
                    iov.append(aio.iovec(self.area.addr + m.slot * blkif.PAGE_SIZE + lo, hi - lo))
                else:
                    pins.append(aio.Pin(v))
                    iov.append(pins[-1].iovec)
            pos = req.sector_number * SECTOR
            if use_aio:
                if await self.aio.transfer(back.fd, b"".join(iov), pos, is_read) \
                        != sum(map(len, views)):
                    _vector_io(back.fd, views, pos, is_read)    # short: do it all again inline
            else:
                _vector_io(back.fd, views, pos, is_read)
        finally:
            for pin in pins:
                pin.release()
            for v in made:          # a live view would keep the mmap from closing
                v.release()
            if temporary:           # even when cancelled: a mapping must not leak
                with trio.CancelScope(shield=True):
                    await self.k.grants.unmap_many(temporary)
        if op in (blkif.BLKIF_OP_WRITE_BARRIER, blkif.BLKIF_OP_FLUSH_DISKCACHE):
            await trio.to_thread.run_sync(os.fdatasync, back.fd)
        return blkif.BLKIF_RSP_OKAY

    async def _indirect_segments(self, req: blkif.BlkifRequestIndirect) -> "_RwRequest":
        """The read or write an indirect request stands for, its segments
        read (from a private copy, once) out of its indirect pages and checked."""
        nseg = req.nr_segments
        if nseg > MAX_INDIRECT_SEGMENTS:
            raise _Refused(f"{nseg} indirect segments; this backend offers "
                           f"{MAX_INDIRECT_SEGMENTS}")
        maps, temporary = await self._map([_Seg(g, 0, 0) for g in req.indirect_grefs],
                                          writable=False)
        try:
            # Copied before they are looked at: the guest may rewrite its
            # pages meanwhile, and each segment must be checked and used as one.
            table = b"".join(m.map[:blkif.PAGE_SIZE] for m in maps)
        finally:
            if temporary:
                with trio.CancelScope(shield=True):
                    await self.k.grants.unmap_many(temporary)
        f = blkif.segment_array(nseg).unpack_from(table)
        checked = _check_segments(f, 0, nseg)
        if checked is None:
            bad = next(i for i in range(nseg) if blkif.Segment(*f[3 * i:3 * i + 3]).problem())
            raise _Refused(f"indirect segment {bad}: "
                           f"{blkif.Segment(*f[3 * bad:3 * bad + 3]).problem()}")
        segs, total = checked
        return _RwRequest(req.indirect_op, req.id, req.sector_number, segs, total)

    async def _map(self, segments, writable: bool) -> tuple[list[Mapping], list[Mapping]]:
        """Mappings for each segment's page, and the ones to unmap afterwards."""
        grefs = [s.gref for s in segments]
        if not self.persistent:
            try:
                maps = await self.k.grants.map_many([(self.fe_id, g) for g in grefs],
                                                    readonly=not writable)
            except (GrantError, HypercallError) as exc:
                raise _Refused(f"grant map failed: {exc}") from None
            return maps, maps
        temporary: list[Mapping] = []
        if any(g not in self.pgrants for g in grefs):
            async with self._map_lock:      # (another request may have mapped them meanwhile)
                missing = [g for g in dict.fromkeys(grefs) if g not in self.pgrants]
                room = MAX_PERSISTENT_GRANTS - len(self.pgrants)
                keep, extra = missing[:room], missing[room:]
                first = len(self.pgrants)   # slots are never freed while connected
                grants = self.k.grants
                try:
                    new = await grants.map_many([(self.fe_id, g) for g in keep], area=self.area,
                                                slots=list(range(first, first + len(keep)))) \
                        if keep else []
                    try:
                        temporary = await grants.map_many([(self.fe_id, g) for g in extra]) \
                            if extra else []
                    finally:
                        for m in new:       # persistent even if the rest failed
                            self.pgrants[m.ref] = m
                except (GrantError, HypercallError) as exc:
                    raise _Refused(f"grant map failed: {exc}") from None
        by_ref = {m.ref: m for m in temporary}
        return [self.pgrants.get(g) or by_ref[g] for g in grefs], temporary


class _FastIo(NamedTuple):
    """A fast-lane request's pages: how many, and the runs of neighbouring
    slots of the area they make, as views (page cache) and as packed
    ``struct iovec`` entries (Linux AIO)."""
    npages: int
    views: tuple[memoryview, ...]
    iov: bytes


#: Where a direct request's id and sector, and its segments, lie in the slot.
_ID_SECTOR = struct.Struct("<QQ")
_SEGS_AT = blkif.REQUEST_HEAD.size


class _Seg(NamedTuple):
    """A checked segment of a read or write (what _do needs of blkif.Segment)."""
    gref: int
    first_sect: int
    last_sect: int


class _RwRequest(NamedTuple):
    """A checked READ or WRITE, decoded by :func:`_decode_rw`."""
    operation: int
    id: int
    sector_number: int
    segments: tuple[_Seg, ...]
    nr_sectors: int


#: ``struct blkif_request`` head plus n segments, for the one-call decode.
_RW_LAYOUT = [struct.Struct(blkif.REQUEST_HEAD.format + blkif.SEGMENT.format[1:] * n)
              for n in range(blkif.BLKIF_MAX_SEGMENTS_PER_REQUEST + 1)]


def _decode_rw(raw: bytes) -> _RwRequest | None:
    """The hot path's decoder: a well-formed READ or WRITE in one struct call.

    Returns None for every other operation and for any read or write that
    breaks a rule, so that blkif.unpack_request decides it and names the
    problem; the two never disagree about a request they both accept.
    """
    op, nseg = raw[0], raw[1]
    if op > blkif.BLKIF_OP_WRITE or not 0 < nseg <= blkif.BLKIF_MAX_SEGMENTS_PER_REQUEST \
            or len(raw) < blkif.REQUEST_SIZE:
        return None
    f = _RW_LAYOUT[nseg].unpack_from(raw)
    checked = _check_segments(f, 5, nseg)
    if checked is None:
        return None
    return _RwRequest(op, f[3], f[4], *checked)


def _check_segments(f: tuple, start: int, nseg: int) -> tuple[tuple[_Seg, ...], int] | None:
    """The segments among unpacked fields ``f`` (gref, first, last from
    ``start``) and their sector count; None if any leaves its page."""
    segs = []
    total = 0
    for i in range(start, start + 3 * nseg, 3):
        first, last = f[i + 1], f[i + 2]
        if first > last or last >= blkif.SECTORS_PER_PAGE:
            return None
        segs.append(_Seg(f[i], first, last))
        total += last - first + 1
    return tuple(segs), total


def _vector_io(fd: int, views: list[memoryview], pos: int, is_read: bool) -> None:
    """One preadv/pwritev for the whole request; finish a short transfer by hand."""
    done = os.preadv(fd, views, pos) if is_read else os.pwritev(fd, views, pos)
    if done == sum(map(len, views)):
        return
    for v in views:
        n = len(v)
        if done >= n:
            done -= n
            pos += n
            continue
        off, done = done, 0         # the syscall stopped inside this view
        while off < n:
            got = os.preadv(fd, [v[off:]], pos + off) if is_read else os.pwrite(fd, v[off:], pos + off)
            if got <= 0:
                raise OSError(5, f"short {'read' if is_read else 'write'} at byte {pos + off}")
            off += got
        pos += n


def _open_direct(path: str, flags: int) -> int:
    """Open with O_DIRECT, or return -1 where the file system refuses it
    (tmpfs does): the caller then uses the page cache."""
    try:
        return os.open(path, flags | os.O_DIRECT)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        log.info("%s: the file system refuses O_DIRECT; using the page cache", path)
        return -1


#: What O_DIRECT mode serves concurrently; anything else waits for them.
_CONCURRENT_OPS = (blkif.BLKIF_OP_READ, blkif.BLKIF_OP_WRITE, blkif.BLKIF_OP_INDIRECT)


class _Refused(Exception):
    def __init__(self, why: str, status: int = blkif.BLKIF_RSP_ERROR) -> None:
        super().__init__(why)
        self.status = status


async def serve(k: "Kernel", xs, path: str) -> None:
    """The BackendWatcher entry: serve one VBD until its directory goes."""
    await BlkBack(k, xs, path).run()


__all__ = ["BlkBack", "serve", "punch_hole", "MAX_PERSISTENT_GRANTS"]
