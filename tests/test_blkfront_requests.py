"""Unit tests of how blkfront lays requests on the ring (no processes).

A fake kernel stands in for grants and memory (its frames are real memfds,
placed in the device's real I/O page pool); the test plays the backend on
the same ring page.  Checked: a large request becomes one
BLKIF_OP_INDIRECT request whose indirect page lists every segment; a
request replayed to a backend that takes fewer segments goes as several
parts, those that find no free ring slot wait in the backlog, and the
request completes (with its data in order) only when every part has.
"""

from __future__ import annotations

import itertools
import os

import trio

from domains.domu.blkfront import BlkFront, _Conn, _Req
from ipc import blkif
from ipc.page import new_frame
from ipc.ring import BackRing, FrontRing


class FakeGrants:
    def __init__(self) -> None:
        self.refs = itertools.count(100)
        self.granted: dict[int, tuple[int, bool]] = {}
        self.ended: list[int] = []

    def grant_access(self, domid: int, gfn: int, readonly: bool = False) -> int:
        ref = next(self.refs)
        self.granted[ref] = (gfn, readonly)
        return ref

    def end_access_deferred(self, ref: int) -> bool:
        self.ended.append(ref)
        return True


class FakeMemory:
    """Frames for the pool: gfns 10, 11, ... in the order slots are filled."""

    def __init__(self) -> None:
        self.gfns = itertools.count(10)

    async def alloc_into(self, area, slots: list[int]) -> list[int]:
        for slot in slots:
            fd = new_frame("test")
            area.map(slot, fd)
            os.close(fd)
        return [next(self.gfns) for _ in slots]


class FakeKernel:
    domid = 5

    def __init__(self) -> None:
        self.grants = FakeGrants()
        self.memory = FakeMemory()


class FakePage:
    def __init__(self, gfn: int) -> None:
        self.gfn = gfn
        self.map = bytearray(4096)


class FakePort:
    def notify_nowait(self) -> None:
        pass


def frontend(persistent: bool, max_segs: int):
    k = FakeKernel()
    fe = BlkFront(k, None, 51712)
    fe._indirect = [FakePage(1000 + i) for i in range(32)]
    ring_page = FakePage(1)
    ring = FrontRing.init(ring_page.map, blkif.ENTRY_SIZE)
    conn = _Conn("be", 0, ring_page, 8, ring, FakePort(), persistent)
    conn.max_segs = max_segs
    back = BackRing(ring_page.map, blkif.ENTRY_SIZE)
    return k, fe, conn, back


def read_request(fe: BlkFront, npages: int) -> _Req:
    req = _Req(blkif.BLKIF_OP_READ, 64, npages * 8)
    req.run, req.npages = trio.run(fe.pool.take, npages), npages
    return req


def fill(fe: BlkFront, slot: int, byte: int) -> None:
    """What the backend does: fill one of the request's pages."""
    fe.pool.view(slot, 4096)[:] = bytes([byte]) * 4096


def test_a_large_read_is_one_indirect_request():
    k, fe, conn, back = frontend(persistent=False, max_segs=256)
    req = read_request(fe, 40)
    fe._put(conn, req)
    conn.ring.push_requests()
    (raw,) = back.requests()
    ind = blkif.unpack_request(raw)
    assert isinstance(ind, blkif.BlkifRequestIndirect)
    assert (ind.indirect_op, ind.sector_number, ind.nr_segments) == (blkif.BLKIF_OP_READ, 64, 40)
    table_gfn, table_ro = k.grants.granted[ind.indirect_grefs[0]]
    table = fe._indirect[ind.id]
    assert table_gfn == table.gfn and table_ro       # the backend only reads it
    segs = blkif.unpack_indirect_segments(ind, [bytes(table.map)])
    assert [k.grants.granted[s.gref] for s in segs] == [(10 + i, False) for i in range(40)]
    assert all((s.first_sect, s.last_sect) == (0, 7) for s in segs)
    for i in range(40):                              # the backend fills the pages
        fill(fe, req.run + i, i)
    fe._complete(conn, blkif.BlkifResponse(ind.id, blkif.BLKIF_OP_INDIRECT, 0))
    assert req.done.is_set() and req.status == 0
    assert req.result == b"".join(bytes([i]) * 4096 for i in range(40))
    assert sorted(k.grants.ended) == sorted(k.grants.granted)   # per-request grants end


def test_a_replay_beyond_the_backend_limit_goes_in_parts_through_the_backlog():
    k, fe, conn, back = frontend(persistent=True, max_segs=11)
    conn.free_ids = [1, 0]                           # only two ring slots free
    req = read_request(fe, 40)                       # 11 + 11 + 11 + 7 pages
    fe._put(conn, req)
    assert len(conn.backlog) == 2 and req.parts_left == 4
    seen = []
    while not req.done.is_set():
        conn.ring.push_requests()
        for raw in back.requests():
            r = blkif.unpack_request(raw)
            seen.append((r.sector_number, len(r.segments)))
            for s in r.segments:
                gfn, _ = k.grants.granted[s.gref]
                fill(fe, fe.pool.gfns.index(gfn), gfn)
            fe._complete(conn, blkif.BlkifResponse(r.id, r.operation, 0))
    assert seen == [(64, 11), (64 + 88, 11), (64 + 176, 11), (64 + 264, 7)]
    assert not conn.backlog and sorted(conn.free_ids) == [0, 1]
    assert req.result == b"".join(bytes([10 + i]) * 4096 for i in range(40))
    assert k.grants.ended == []                      # persistent grants stay


def test_a_failed_part_fails_the_request():
    k, fe, conn, back = frontend(persistent=True, max_segs=11)
    req = read_request(fe, 20)
    fe._put(conn, req)
    conn.ring.push_requests()
    first, second = (blkif.unpack_request(raw) for raw in back.requests())
    fe._complete(conn, blkif.BlkifResponse(first.id, first.operation, blkif.BLKIF_RSP_ERROR))
    assert not req.done.is_set()
    fe._complete(conn, blkif.BlkifResponse(second.id, second.operation, 0))
    assert req.done.is_set() and req.status == blkif.BLKIF_RSP_ERROR and req.result == b""


def test_a_cancelled_request_keeps_its_pages_until_it_is_answered():
    """A caller that stops waiting does not take its request back from the
    backend (a bio cannot be either): the request's pages and ring slot stay
    its own until the answer comes, so no later request's data can share a
    page with a backend still writing it."""
    from domains.domu.blkfront import MAX_INFLIGHT_PAGES, RING_SLOTS
    k, fe, conn, back = frontend(persistent=True, max_segs=11)
    fe._conn = conn

    async def main():
        req = _Req(blkif.BLKIF_OP_READ, 64, 8)
        with trio.move_on_after(0.01):
            await fe._issue(req)                 # nobody answers: the caller gives up
        assert req.abandoned and req.run >= 0 and req.seq in fe.inflight
        assert fe.pool.buddy.free_pages == MAX_INFLIGHT_PAGES - 1
        assert fe._slots.value == RING_SLOTS - 1
        conn.ring.push_requests()
        (raw,) = back.requests()
        fill(fe, req.run, 7)                     # the backend still writes the page ...
        fe._complete(conn, blkif.BlkifResponse(blkif.unpack_request(raw).id,
                                               blkif.BLKIF_OP_READ, 0))
        # ... and only its answer gives everything back.
        assert fe.pool.buddy.free_pages == MAX_INFLIGHT_PAGES and not fe.inflight
        assert fe._slots.value == RING_SLOTS and req.result == bytes([7]) * 4096
        # Cancelled before it reached any ring: nothing to wait for.
        fe._conn = None
        early = _Req(blkif.BLKIF_OP_READ, 64, 8)
        with trio.move_on_after(0.01):
            await fe._issue(early)
        assert not early.abandoned and not fe.inflight
        assert fe.pool.buddy.free_pages == MAX_INFLIGHT_PAGES
    trio.run(main)
