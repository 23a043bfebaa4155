"""Unit tests of blkback's request handling, with a fake grant table.

The backend is given hostile ring entries (bad grant references, sectors off
the end of the disk, segments outside their page, unknown operations, too many
segments, a producer index past the ring) and must answer BLKIF_RSP_ERROR /
EOPNOTSUPP for that id, or disconnect the device, and never raise anything
else.  Flushes must reach fdatasync before they are answered.
"""

from __future__ import annotations

import mmap
import os
import struct
import weakref

import pytest
import trio

from domains.driverdom import blkback
from domains.driverdom.blkback import BlkBack, Connection, Disconnect
from domains.kernel.grant_table import GrantError, Mapping
from ipc import blkif
from ipc.grant_abi import GNTST_bad_gntref
from ipc.page import map_frame, new_frame
from ipc.ring import FrontRing

FE = 7
SECTORS = 64


class FakeGrants:
    """The frontend's grants: ``pages`` are the guest's own mappings of
    real one-page memfds (ref -> mmap), which the backend maps as the real
    grant table does, on its own or into a slot of its area."""

    def __init__(self, pages: dict[int, mmap.mmap], fds: dict[int, int]) -> None:
        self.pages = pages
        self.fds = fds
        self.mapped = 0
        self.unmapped = 0

    async def map_many(self, grants, readonly=False, area=None, slots=None):
        for dom, ref in grants:
            if dom != FE or ref not in self.pages:
                raise GrantError(GNTST_bad_gntref, f"no grant {ref}")
        out = []
        for i, (dom, ref) in enumerate(grants):
            if area is None:
                out.append(Mapping(dom, ref, ref, map_frame(self.fds[ref], not readonly), readonly))
            else:
                area.map(slots[i], self.fds[ref])
                out.append(Mapping(dom, ref, ref, area.pages(slots[i]), False, slots[i]))
        self.mapped += len(out)
        return out

    async def unmap_many(self, maps):
        for m in maps:
            m.release()
        self.unmapped += len(maps)


class FakePort:
    port = 1

    def notify_nowait(self) -> None:
        pass

    async def wait(self) -> None:
        await trio.sleep_forever()

    async def close(self) -> None:
        pass


class FakeKernel:
    def __init__(self, grants) -> None:
        self.grants = grants


def make(tmp_path, persistent=True, readonly=False):
    fds = {10 + i: new_frame("test") for i in range(4)}
    pages = {ref: map_frame(fd) for ref, fd in fds.items()}
    grants = FakeGrants(pages, fds)
    weakref.finalize(grants, lambda: [os.close(fd) for fd in fds.values()])
    back = BlkBack(FakeKernel(grants), None, "backend/vbd/7/51712")
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(SECTORS * 512))
    back.fd = os.open(image, os.O_RDWR)
    back.sectors = SECTORS
    back.readonly = readonly
    ring_fd = fds[8] = new_frame("ring")            # the guest's ring page, and blkback's map of it
    front = FrontRing.init(map_frame(ring_fd), blkif.ENTRY_SIZE)
    conn = Connection(back, FE, Mapping(FE, 8, 0, map_frame(ring_fd), False), FakePort(),
                      persistent)
    return back, conn, front, pages, grants


def serve_a_while(conn, front, secs: float = 2.0) -> list[blkif.BlkifResponse]:
    """Run the backend's serve loop for ``secs``; the responses it published."""
    async def main():
        with trio.move_on_after(secs):
            await conn.serve()
    trio.run(main)
    return [blkif.BlkifResponse.unpack(r) for r in front.responses()]


def make_direct(tmp_path):
    """make(), with the image opened O_DIRECT (the pages are page-aligned)."""
    back, conn, front, pages, grants = make(tmp_path)
    os.close(back.fd)
    back.fd = os.open(tmp_path / "disk.img", os.O_RDWR | os.O_DIRECT)
    back.direct = True
    return back, conn, front, pages, grants


def req(op, rid, sector, segs=()):
    return blkif.BlkifRequest(op, rid, sector, 0, tuple(blkif.Segment(*s) for s in segs)).pack()


def general_path_ids(conn, monkeypatch) -> list[int]:
    """The ids of the requests ``conn`` serves through :meth:`handle` (the
    general path, not a fast lane), in the order it takes them."""
    handled: list[int] = []
    general = conn.handle

    async def counting(raw):
        handled.append(int.from_bytes(raw[8:16], "little"))    # the request's id
        return await general(raw)
    monkeypatch.setattr(conn, "handle", counting)
    return handled


@pytest.mark.parametrize("persistent", [True, False])
def test_write_then_read_through_granted_pages(tmp_path, persistent):
    back, conn, _f, pages, grants = make(tmp_path, persistent)

    async def main():
        pages[10][:4096] = bytes(range(256)) * 16
        r = await conn.handle(req(blkif.BLKIF_OP_WRITE, 1, 8, [(10, 0, 7)]))
        assert (r.id, r.status) == (1, blkif.BLKIF_RSP_OKAY)
        r = await conn.handle(req(blkif.BLKIF_OP_READ, 2, 8, [(11, 0, 3), (12, 4, 7)]))
        assert r.status == blkif.BLKIF_RSP_OKAY
        assert pages[11][:2048] == pages[10][:2048]
        assert pages[12][2048:4096] == pages[10][2048:4096]
    trio.run(main)
    assert os.pread(back.fd, 4096, 8 * 512) == bytes(pages[10])
    if persistent:
        assert grants.unmapped == 0 and len(conn.pgrants) == 3
    else:
        assert grants.unmapped == grants.mapped == 3


def test_hostile_requests_get_errors_not_crashes(tmp_path):
    back, conn, _f, pages, _g = make(tmp_path)
    E, NS = blkif.BLKIF_RSP_ERROR, blkif.BLKIF_RSP_EOPNOTSUPP
    bad = [
        (req(blkif.BLKIF_OP_READ, 1, 0, [(999, 0, 7)]), E),                # bad grant ref
        (req(blkif.BLKIF_OP_WRITE, 2, SECTORS - 4, [(10, 0, 7)]), E),      # off the end
        (req(blkif.BLKIF_OP_READ, 3, 2**63, [(10, 0, 7)]), E),             # absurd sector
        (req(blkif.BLKIF_OP_READ, 4, 0, [(10, 7, 3)]), E),                 # first > last
        (req(blkif.BLKIF_OP_READ, 5, 0, [(10, 0, 9)]), E),                 # past the page
        (req(blkif.BLKIF_OP_READ, 6, 0), E),                               # no segments
        (struct.pack("<BBH4xQQ", 99, 0, 0, 7, 0) + bytes(88), NS),          # unknown op
        (struct.pack("<BBH4xQQ", 0, 12, 0, 8, 0) + bytes(88), E),           # 12 segments
        (blkif.BlkifRequestIndirect(3, 9, 0, 1, (10,)).pack() + bytes(48), E),  # indirect flush
        (blkif.BlkifRequestDiscard(10, SECTORS - 1, 2).pack() + bytes(80), E),
        (req(blkif.BLKIF_OP_READ, 2**64 - 1, 0, [(10, 0, 0)]), blkif.BLKIF_RSP_OKAY),  # any id echoes
    ]

    async def main():
        for raw, want in bad:
            r = await conn.handle(raw)
            assert r.status == want, (raw[:24], r)
            assert r.id == struct.unpack_from("<Q", raw, 8)[0]
    trio.run(main)
    assert back.stats["errors"] == len(bad) - 1


def test_read_only_disk_refuses_writes_and_discards(tmp_path):
    _b, conn, _f, _p, _g = make(tmp_path, readonly=True)

    async def main():
        r = await conn.handle(req(blkif.BLKIF_OP_WRITE, 1, 0, [(10, 0, 7)]))
        assert r.status == blkif.BLKIF_RSP_ERROR
        r = await conn.handle(blkif.BlkifRequestDiscard(2, 0, 8).pack() + bytes(80))
        assert r.status == blkif.BLKIF_RSP_ERROR
    trio.run(main)


def test_producer_index_past_the_ring_disconnects(tmp_path):
    _b, conn, front, _p, _g = make(tmp_path)
    front.sring.req_prod = front.size + 5      # more requests than the ring holds

    async def main():
        with pytest.raises(Disconnect, match="producer index"):
            await conn.serve()
    trio.run(main)


def test_ring_requests_are_answered_in_order(tmp_path):
    _b, conn, front, pages, _g = make(tmp_path)
    for i in range(front.size):
        front.put_request(req(blkif.BLKIF_OP_READ, 100 + i, i % SECTORS, [(10 + i % 4, 0, 0)]))
    front.push_requests()

    got = serve_a_while(conn, front)
    assert [r.id for r in got] == [100 + i for i in range(front.size)]
    assert all(r.status == blkif.BLKIF_RSP_OKAY for r in got)


def test_flush_and_barrier_are_answered_after_fdatasync(tmp_path, monkeypatch):
    back, conn, _f, pages, _g = make(tmp_path)
    events = []
    real_pwrite = os.pwrite
    monkeypatch.setattr(blkback.os, "fdatasync", lambda fd: events.append("fdatasync"))
    monkeypatch.setattr(blkback.os, "pwrite", lambda fd, d, off: (events.append("write"),
                                                                   real_pwrite(fd, d, off))[1])
    real_pwritev = os.pwritev      # blkback writes a whole request with one pwritev
    monkeypatch.setattr(blkback.os, "pwritev", lambda fd, bufs, off: (events.append("write"),
                                                                       real_pwritev(fd, bufs, off))[1])

    async def main():
        r = await conn.handle(req(blkif.BLKIF_OP_WRITE, 1, 0, [(10, 0, 7)]))
        assert events == ["write"]
        r = await conn.handle(req(blkif.BLKIF_OP_FLUSH_DISKCACHE, 2, 0))
        assert r.status == blkif.BLKIF_RSP_OKAY and events[-1] == "fdatasync"
        events.clear()
        r = await conn.handle(req(blkif.BLKIF_OP_WRITE_BARRIER, 3, 8, [(10, 0, 7)]))
        assert r.status == blkif.BLKIF_RSP_OKAY
        assert events == ["fdatasync", "write", "fdatasync"]
    trio.run(main)


def test_discard_punches_a_hole(tmp_path):
    back, conn, _f, pages, _g = make(tmp_path)
    os.pwrite(back.fd, b"\xff" * 4096, 0)

    async def main():
        r = await conn.handle(blkif.BlkifRequestDiscard(1, 0, 8).pack() + bytes(80))
        assert r.status == blkif.BLKIF_RSP_OKAY
    trio.run(main)
    assert os.pread(back.fd, 4096, 0) == bytes(4096)


def indirect(op, rid, sector, table_ref, nseg):
    return blkif.BlkifRequestIndirect(op, rid, sector, nseg, (table_ref,)).pack() + bytes(48)


@pytest.mark.parametrize("persistent", [True, False])
def test_indirect_write_then_read(tmp_path, persistent):
    """An indirect request's segments live in a granted page (here page 13)."""
    back, conn, _f, pages, grants = make(tmp_path, persistent)

    def table(*segs):
        pages[13][:] = b"".join(blkif.pack_indirect_segments(
            [blkif.Segment(*seg) for seg in segs]))

    async def main():
        pages[10][:] = bytes(range(256)) * 16
        pages[11][:] = b"\xa5" * 4096
        table((10, 0, 7), (11, 0, 7))
        r = await conn.handle(indirect(blkif.BLKIF_OP_WRITE, 1, 16, 13, 2))
        assert (r.id, r.operation, r.status) == (1, blkif.BLKIF_OP_INDIRECT, blkif.BLKIF_RSP_OKAY)
        pages[10][:] = pages[11][:] = bytes(4096)
        table((11, 0, 7), (12, 0, 3), (10, 4, 7))     # 16 sectors over three pages
        r = await conn.handle(indirect(blkif.BLKIF_OP_READ, 2, 16, 13, 3))
        assert r.status == blkif.BLKIF_RSP_OKAY
    trio.run(main)
    written = os.pread(back.fd, 8192, 16 * 512)
    assert written == bytes(range(256)) * 16 + b"\xa5" * 4096
    assert bytes(pages[11]) == written[:4096]
    assert pages[12][:2048] == written[4096:6144] and pages[10][2048:] == written[6144:]
    if persistent:
        assert grants.unmapped == 0
    else:
        assert grants.unmapped == grants.mapped


def test_hostile_indirect_requests_get_errors(tmp_path):
    back, conn, _f, pages, _g = make(tmp_path, readonly=False)
    pages[13][:] = b"".join(blkif.pack_indirect_segments(
        [blkif.Segment(10, 0, 7), blkif.Segment(11, 6, 2)]))     # the second is backwards
    E = blkif.BLKIF_RSP_ERROR
    cases = [
        (indirect(blkif.BLKIF_OP_READ, 1, 0, 13, 2), E),          # a bad segment in the table
        (indirect(blkif.BLKIF_OP_READ, 2, 0, 999, 1), E),         # a bad indirect grant
        (indirect(blkif.BLKIF_OP_READ, 3, 0, 13, blkback.MAX_INDIRECT_SEGMENTS + 1), E),
        (indirect(blkif.BLKIF_OP_WRITE, 4, SECTORS - 4, 13, 1), E),  # off the end
        (indirect(blkif.BLKIF_OP_READ, 5, 0, 13, 1), blkif.BLKIF_RSP_OKAY),
    ]

    async def main():
        for raw, want in cases:
            r = await conn.handle(raw)
            assert (r.id, r.status) == (struct.unpack_from("<Q", raw, 8)[0], want), r
    trio.run(main)
    assert back.stats["errors"] == len(cases) - 1


def test_direct_io_reads_and_writes_the_device(tmp_path):
    """direct-io-safe: the image is opened O_DIRECT and granted pages (page
    aligned, as every frame is) are the I/O buffers."""
    import fcntl
    back, conn, _f, pages, _g = make_direct(tmp_path)
    os.close(back.fd)
    back.fd = blkback._open_direct(str(tmp_path / "disk.img"), os.O_RDWR)
    assert back.fd >= 0 and fcntl.fcntl(back.fd, fcntl.F_GETFL) & os.O_DIRECT
    pages[10][:] = b"\x11" * 4096
    pages[11][:] = b"\x22" * 4096

    async def main():
        r = await conn.handle(req(blkif.BLKIF_OP_WRITE, 1, 8, [(10, 0, 7), (11, 0, 3)]))
        assert r.status == blkif.BLKIF_RSP_OKAY
        r = await conn.handle(req(blkif.BLKIF_OP_READ, 2, 8, [(12, 0, 7), (13, 2, 5)]))
        assert r.status == blkif.BLKIF_RSP_OKAY
    trio.run(main)
    assert bytes(pages[12]) == b"\x11" * 4096
    assert bytes(pages[13][1024:3072]) == b"\x22" * 2048


def test_direct_io_falls_back_where_the_file_system_refuses_it(tmp_path, monkeypatch):
    """A file system without O_DIRECT (EINVAL at open): the backend uses the
    page cache instead of failing; any other error is the open's error."""
    import errno
    real_open = os.open

    def no_direct(path, flags, *a):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *a)
    monkeypatch.setattr(blkback.os, "open", no_direct)
    assert blkback._open_direct(str(tmp_path / "x"), os.O_RDWR | os.O_CREAT) == -1
    monkeypatch.setattr(blkback.os, "open", real_open)
    with pytest.raises(FileNotFoundError):
        blkback._open_direct(str(tmp_path / "missing"), os.O_RDWR)


def test_direct_io_serves_reads_and_writes_through_linux_aio(tmp_path, monkeypatch):
    """O_DIRECT mode: reads and writes go to the device with io_submit, each
    answered when it completes; a flush waits for all taken before it."""
    back, conn, front, pages, _g = make_direct(tmp_path)
    events = []

    def no_inline(*a):
        raise AssertionError("an O_DIRECT transfer was done inline")
    monkeypatch.setattr(blkback, "_vector_io", no_inline)
    monkeypatch.setattr(blkback.os, "fdatasync",      # how many answers came before it
                        lambda fd: events.append(("fdatasync", conn.ring.rsp_prod_pvt)))
    pages[10][:] = b"\x11" * 4096
    pages[11][:] = b"\x22" * 4096
    front.put_request(req(blkif.BLKIF_OP_WRITE, 1, 0, [(10, 0, 7)]))
    front.put_request(req(blkif.BLKIF_OP_WRITE, 2, 8, [(11, 0, 7)]))
    front.put_request(req(blkif.BLKIF_OP_FLUSH_DISKCACHE, 3, 0))
    front.put_request(req(blkif.BLKIF_OP_READ, 4, 0, [(12, 0, 7)]))
    front.put_request(req(blkif.BLKIF_OP_READ, 5, 8, [(13, 0, 3)]))
    front.push_requests()

    got = serve_a_while(conn, front)
    assert sorted(r.id for r in got) == [1, 2, 3, 4, 5]
    assert all(r.status == blkif.BLKIF_RSP_OKAY for r in got), got
    assert {r.id for r in got[:2]} == {1, 2}    # the flush after both writes
    # ... both answered before it ran (and perhaps the reads behind it too:
    # its task starts when the serve loop next yields)
    assert len(events) == 1 and events[0][1] >= 2
    assert bytes(pages[12]) == b"\x11" * 4096 and bytes(pages[13][:2048]) == b"\x22" * 2048
    assert conn._busy == 0 and conn.aio is None


@pytest.mark.parametrize("direct", [False, True], ids=["page-cache", "o_direct"])
def test_a_flush_waits_for_the_writes_before_it_not_for_those_after(tmp_path, monkeypatch,
                                                                    direct):
    """The flush's fdatasync starts only once every write taken before it is
    answered, and is answered only when it returns; reads and writes taken
    after it are served meanwhile (it promises nothing about them)."""
    import threading
    back, conn, front, pages, _g = (make_direct if direct else make)(tmp_path)
    release = threading.Event()
    events = []

    def slow_fdatasync(fd):
        events.append(("fdatasync starts", conn.ring.rsp_prod_pvt))
        assert release.wait(5), "the test never released fdatasync"
        events.append(("fdatasync returns", conn.ring.rsp_prod_pvt))
    monkeypatch.setattr(blkback.os, "fdatasync", slow_fdatasync)
    pages[10][:] = b"\x11" * 4096
    pages[11][:] = b"\x22" * 4096
    for r in (req(blkif.BLKIF_OP_WRITE, 1, 0, [(10, 0, 7)]),
              req(blkif.BLKIF_OP_FLUSH_DISKCACHE, 2, 0),
              req(blkif.BLKIF_OP_WRITE, 3, 8, [(11, 0, 7)]),
              req(blkif.BLKIF_OP_READ, 4, 0, [(12, 0, 7)])):
        front.put_request(r)
    front.push_requests()

    async def main():
        with trio.move_on_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(conn.serve)
                while conn.ring.rsp_prod_pvt < 3:     # all but the flush answered
                    await trio.sleep(0.01)
                release.set()
                while conn.ring.rsp_prod_pvt < 4:
                    await trio.sleep(0.01)
                nursery.cancel_scope.cancel()
    trio.run(main)
    got = [blkif.BlkifResponse.unpack(r) for r in front.responses()]
    assert [r.id for r in got][-1] == 2 and sorted(r.id for r in got) == [1, 2, 3, 4]
    assert all(r.status == blkif.BLKIF_RSP_OKAY for r in got), got
    # It started after the write before it was answered (perhaps after the
    # ones behind it too: its task starts when the serve loop next yields).
    assert [e[0] for e in events] == ["fdatasync starts", "fdatasync returns"]
    assert events[0][1] >= 1 and events[1][1] == 3
    assert bytes(pages[12]) == b"\x11" * 4096
    assert conn._busy == 0


def test_direct_io_answers_mapped_pages_from_the_completion(tmp_path, monkeypatch):
    """Once a persistent page has been mapped into the area, an O_DIRECT read
    or write of whole such pages takes no task: it goes to io_submit as it is
    taken off the ring and is answered from its completion.  A page seen for
    the first time, a partial page or an armed fault takes the general path."""
    from domains.kernel import faultpoint
    back, conn, front, pages, _g = make_direct(tmp_path)
    handled = general_path_ids(conn, monkeypatch)
    for ref in (10, 11):
        pages[ref][:] = bytes([ref]) * 4096
    front.put_request(req(blkif.BLKIF_OP_WRITE, 1, 0, [(10, 0, 7)]))
    front.put_request(req(blkif.BLKIF_OP_WRITE, 2, 8, [(11, 0, 7)]))
    front.push_requests()
    assert sorted(r.id for r in serve_a_while(conn, front, 0.5)) == [1, 2]
    assert sorted(handled) == [1, 2]              # first sight: mapped into the area
    # The same pages again: the fast lane.
    pages[10][:] = b"\x55" * 4096
    front.put_request(req(blkif.BLKIF_OP_WRITE, 3, 16, [(10, 0, 7)]))
    front.put_request(req(blkif.BLKIF_OP_READ, 4, 8, [(11, 0, 7)]))
    front.push_requests()
    got = serve_a_while(conn, front, 0.5)
    assert sorted(r.id for r in got) == [3, 4]
    assert all(r.status == blkif.BLKIF_RSP_OKAY for r in got), got
    assert sorted(handled) == [1, 2]
    assert (tmp_path / "disk.img").read_bytes()[16 * 512:24 * 512] == b"\x55" * 4096
    assert bytes(pages[11]) == bytes([11]) * 4096
    # Part of a mapped page: the general path.
    front.put_request(req(blkif.BLKIF_OP_READ, 5, 16, [(11, 0, 3)]))
    front.push_requests()
    got = serve_a_while(conn, front, 0.5)
    assert [(r.id, r.status) for r in got] == [(5, blkif.BLKIF_RSP_OKAY)]
    assert sorted(handled) == [1, 2, 5]
    assert bytes(pages[11][:2048]) == b"\x55" * 2048
    assert conn._busy == 0 and conn.aio is None
    # With a fault armed anywhere in the domain, every request passes the fault points.
    faultpoint.arm(faultpoint.parse_spec("t", "point=blkback.response action=delay delay=0"))
    try:
        front.put_request(req(blkif.BLKIF_OP_READ, 6, 0, [(10, 0, 7)]))
        front.push_requests()
        assert [r.id for r in serve_a_while(conn, front, 0.5)] == [6]
        assert sorted(handled) == [1, 2, 5, 6]
    finally:
        faultpoint.disarm("blkback.response")


def test_direct_io_fast_lane_takes_indirect_requests(tmp_path, monkeypatch):
    """An indirect read or write whose segment table and data pages are all
    persistently mapped also goes straight to io_submit."""
    back, conn, front, pages, _g = make_direct(tmp_path)
    handled = general_path_ids(conn, monkeypatch)
    pages[13][:] = b"".join(blkif.pack_indirect_segments(
        [blkif.Segment(10, 0, 7), blkif.Segment(11, 0, 7)])).ljust(4096, b"\0")
    pages[10][:] = b"\x0a" * 4096
    pages[11][:] = b"\x0b" * 4096
    for rid, op in ((1, blkif.BLKIF_OP_WRITE), (2, blkif.BLKIF_OP_WRITE)):
        front.put_request(indirect(op, rid, 32, 13, 2))
        front.push_requests()
        got = serve_a_while(conn, front, 0.5)
        assert [(r.id, r.status) for r in got] == [(rid, blkif.BLKIF_RSP_OKAY)]
    assert handled == [1]                # the second found everything mapped
    assert (tmp_path / "disk.img").read_bytes()[32 * 512:48 * 512] == \
        b"\x0a" * 4096 + b"\x0b" * 4096
    pages[10][:] = bytes(4096)
    pages[11][:] = bytes(4096)
    front.put_request(indirect(blkif.BLKIF_OP_READ, 3, 32, 13, 2))
    front.push_requests()
    got = serve_a_while(conn, front, 0.5)
    assert [(r.id, r.status) for r in got] == [(3, blkif.BLKIF_RSP_OKAY)]
    assert handled == [1]
    assert bytes(pages[10]) == b"\x0a" * 4096 and bytes(pages[11]) == b"\x0b" * 4096
    # A table naming a page past the disk's end: the general path refuses it.
    front.put_request(indirect(blkif.BLKIF_OP_READ, 4, SECTORS - 8, 13, 2))
    front.push_requests()
    got = serve_a_while(conn, front, 0.5)
    assert [(r.id, r.status) for r in got] == [(4, blkif.BLKIF_RSP_ERROR)]
    assert handled == [1, 4]


def test_page_cache_serves_mapped_whole_pages_inline(tmp_path, monkeypatch):
    """Page-cache mode: a read or write, direct or indirect, of whole pages
    already persistently mapped is one preadv/pwritev answered in the serve
    loop, without the general path; a page seen for the first time, part
    of a page, a request past the disk's end, a per-request-grant
    connection, or any armed fault goes through :meth:`handle`."""
    from domains.kernel import faultpoint
    back, conn, front, pages, _g = make(tmp_path)
    handled = general_path_ids(conn, monkeypatch)

    def answers(*requests):
        for r in requests:
            front.put_request(r)
        front.push_requests()
        return [(r.id, r.status) for r in serve_a_while(conn, front, 0.3)]
    ok = blkif.BLKIF_RSP_OKAY
    pages[10][:] = b"\x0a" * 4096
    assert answers(req(blkif.BLKIF_OP_WRITE, 1, 0, [(10, 0, 7)])) == [(1, ok)]
    assert handled == [1]                         # first sight: mapped persistently
    pages[10][:] = b"\x5a" * 4096
    assert answers(req(blkif.BLKIF_OP_WRITE, 2, 8, [(10, 0, 7)]),
                   req(blkif.BLKIF_OP_READ, 3, 0, [(10, 0, 7)])) == [(2, ok), (3, ok)]
    assert handled == [1]
    assert bytes(pages[10]) == b"\x0a" * 4096    # read back what write 1 put at sector 0
    assert (tmp_path / "disk.img").read_bytes()[8 * 512:16 * 512] == b"\x5a" * 4096
    # Indirect: the table page (13) and data page (11) are mapped the first time.
    pages[13][:] = b"".join(blkif.pack_indirect_segments(
        [blkif.Segment(10, 0, 7), blkif.Segment(11, 0, 7)])).ljust(4096, b"\0")
    pages[11][:] = b"\x0b" * 4096
    assert answers(indirect(blkif.BLKIF_OP_WRITE, 4, 16, 13, 2)) == [(4, ok)]
    assert answers(indirect(blkif.BLKIF_OP_READ, 5, 8, 13, 2)) == [(5, ok)]
    assert handled == [1, 4]
    assert bytes(pages[10]) == b"\x5a" * 4096 and bytes(pages[11]) == b"\x0a" * 4096
    # What the inline lane leaves to the general path.
    assert answers(req(blkif.BLKIF_OP_READ, 6, 0, [(11, 0, 3)])) == [(6, ok)]
    assert answers(req(blkif.BLKIF_OP_READ, 7, SECTORS - 4, [(11, 0, 7)])) \
        == [(7, blkif.BLKIF_RSP_ERROR)]
    assert handled == [1, 4, 6, 7]
    faultpoint.arm(faultpoint.parse_spec("t", "point=blkback.response action=delay delay=0"))
    try:
        assert answers(req(blkif.BLKIF_OP_READ, 8, 0, [(10, 0, 7)])) == [(8, ok)]
        assert handled == [1, 4, 6, 7, 8]
    finally:
        faultpoint.disarm("blkback.response")
    _b, conn2, front2, pages2, _g2 = make(tmp_path, persistent=False)
    handled2 = general_path_ids(conn2, monkeypatch)
    for rid in (1, 2):
        front2.put_request(req(blkif.BLKIF_OP_READ, rid, 0, [(10, 0, 7)]))
    front2.push_requests()
    assert [r.id for r in serve_a_while(conn2, front2, 0.3)] == [1, 2]
    assert handled2 == [1, 2]                    # per-request grants: never inline


def test_pages_first_seen_together_are_one_run_of_the_area(tmp_path):
    """Persistent mappings go into the connection's area in the order they
    are first seen, so a request over pages first seen together is one
    view and one iovec; a frontend that rewrites a segment table the fast
    lane has already decoded gets the new table decoded, never the old one
    reused."""
    back, conn, front, pages, _g = make(tmp_path)
    ok = blkif.BLKIF_RSP_OKAY
    pages[13][:] = b"".join(blkif.pack_indirect_segments(
        [blkif.Segment(10, 0, 7), blkif.Segment(11, 0, 7), blkif.Segment(12, 0, 7)])
    ).ljust(4096, b"\0")
    for ref in (10, 11, 12):
        pages[ref][:] = bytes([ref]) * 4096

    async def main():
        r = await conn.handle(indirect(blkif.BLKIF_OP_WRITE, 1, 0, 13, 3))   # first sight
        assert r.status == ok
        assert [conn.pgrants[g].slot for g in (13, 10, 11, 12)] == [0, 1, 2, 3]
        _op, _id, sector, io = conn._fast_io(indirect(blkif.BLKIF_OP_READ, 2, 0, 13, 3))
        assert (sector, io.npages, len(io.views), len(io.iov)) == (0, 3, 1, 16)
        assert bytes(io.views[0]) == bytes([10]) * 4096 + bytes([11]) * 4096 + bytes([12]) * 4096
        # The guest swaps two segments in the same table page: new bytes, new decoding.
        pages[13][:24] = b"".join(blkif.Segment(g, 0, 7).pack() for g in (12, 11, 10))
        _op, _id, _s, io2 = conn._fast_io(indirect(blkif.BLKIF_OP_READ, 3, 0, 13, 3))
        assert len(io2.views) == 3 and bytes(io2.views[0]) == bytes([12]) * 4096
        # A segment that is only part of a page is never the fast lane's.
        pages[13][:8] = blkif.Segment(12, 0, 3).pack()
        assert conn._fast_io(indirect(blkif.BLKIF_OP_READ, 4, 0, 13, 3)) is None
        await conn.close()
    trio.run(main)
    assert conn.area.closed
