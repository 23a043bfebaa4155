"""Encoding tests of ipc/blkif.py, ipc/netif.py and ipc/console_ring.py."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ipc import blkif, netif
from ipc.console_ring import (
    IN_SIZE,
    INTERFACE_SIZE,
    OUT_SIZE,
    ConsoleRing,
    ConsoleRingCorrupt,
)
from ipc.ring import BackRing, FrontRing

# -- blkif ----------------------------------------------------------------------

def test_blkif_sizes():
    assert blkif.REQUEST_SIZE == 112
    assert blkif.RESPONSE_SIZE == 16
    assert blkif.ENTRY_SIZE == 112
    assert len(blkif.BlkifRequestDiscard(1, 2, 3).pack()) == 32
    assert len(blkif.BlkifRequestIndirect(0, 1, 2, 3, (4,)).pack()) == 64


def test_blkif_request_offsets():
    r = blkif.BlkifRequest(blkif.BLKIF_OP_WRITE, id=0x0102030405060708, sector_number=9,
                           handle=0xBEEF, segments=(blkif.Segment(0xAABBCCDD, 1, 6),))
    b = r.pack()
    assert b[0] == 1 and b[1] == 1
    assert struct.unpack_from("<H", b, 2)[0] == 0xBEEF
    assert b[4:8] == bytes(4)                                   # alignment padding
    assert struct.unpack_from("<Q", b, 8)[0] == 0x0102030405060708
    assert struct.unpack_from("<Q", b, 16)[0] == 9
    assert struct.unpack_from("<IBB", b, 24) == (0xAABBCCDD, 1, 6)
    assert b[32:] == bytes(80)


def test_blkif_response_offsets():
    b = blkif.BlkifResponse(id=7, operation=blkif.BLKIF_OP_READ,
                            status=blkif.BLKIF_RSP_EOPNOTSUPP).pack()
    assert struct.unpack("<QBxh4x", b) == (7, 0, -2)
    assert b[10:12] == b"\xfe\xff"


segments = st.lists(st.builds(blkif.Segment, st.integers(0, 2**32 - 1), st.integers(0, 3),
                              st.integers(4, 7)), min_size=1, max_size=11)


@given(op=st.sampled_from([0, 1, 2]), rid=st.integers(0, 2**64 - 1),
       sector=st.integers(0, 2**64 - 1), handle=st.integers(0, 0xFFFF), segs=segments)
def test_blkif_request_roundtrip(op, rid, sector, handle, segs):
    r = blkif.BlkifRequest(op, rid, sector, handle, tuple(segs))
    assert blkif.unpack_request(r.pack()) == r
    assert r.nr_sectors == sum(s.last_sect - s.first_sect + 1 for s in segs)


def test_blkif_flush_without_segments_ok():
    r = blkif.BlkifRequest(blkif.BLKIF_OP_FLUSH_DISKCACHE, 5)
    assert blkif.unpack_request(r.pack()) == r


def test_blkif_discard_and_indirect_roundtrip():
    d = blkif.BlkifRequestDiscard(11, 2048, 4096, handle=3, flag=blkif.BLKIF_DISCARD_SECURE)
    assert blkif.unpack_request(d.pack()) == d
    i = blkif.BlkifRequestIndirect(blkif.BLKIF_OP_WRITE, 12, 99, 600, (5, 6), handle=1)
    assert blkif.unpack_request(i.pack() + bytes(48)) == i


def test_blkif_indirect_pages_roundtrip():
    segs = tuple(blkif.Segment(1000 + n, n % 8, 7) for n in range(600))
    pages = blkif.pack_indirect_segments(segs)
    assert len(pages) == 2 and all(len(p) == 4096 for p in pages)
    req = blkif.BlkifRequestIndirect(blkif.BLKIF_OP_READ, 1, 0, 600, (8, 9))
    assert blkif.unpack_indirect_segments(req, pages) == segs
    with pytest.raises(blkif.BlkifRequestError, match="need 2 indirect pages"):
        blkif.unpack_indirect_segments(req, pages[:1])


def raw_request(op=1, nseg=1, rid=77, segs=((5, 0, 7),)):
    b = bytearray(112)
    struct.pack_into("<BBH4xQQ", b, 0, op, nseg, 0, rid, 0)
    for i, (g, f, l) in enumerate(segs):
        struct.pack_into("<IBB", b, 24 + 8 * i, g, f, l)
    return bytes(b)


@pytest.mark.parametrize("data,match", [
    (raw_request(nseg=12), "nr_segments 12 exceeds 11"),
    (raw_request(nseg=255), "nr_segments 255"),
    (raw_request(nseg=0), "no segments"),
    (raw_request(segs=((5, 6, 2),)), "first_sect 6 > last_sect 2"),
    (raw_request(segs=((5, 0, 8),)), "last_sect 8 beyond the page"),
    (raw_request(op=4), "unknown operation 4"),
    (raw_request(op=200), "unknown operation 200"),
])
def test_blkif_bad_requests_carry_id(data, match):
    with pytest.raises(blkif.BlkifRequestError, match=match) as e:
        blkif.unpack_request(data)
    assert e.value.id == 77


def test_blkif_bad_indirect():
    b = bytearray(blkif.BlkifRequestIndirect(0, 9, 0, 10, (1,)).pack())
    b[1] = 3
    with pytest.raises(blkif.BlkifRequestError, match="indirect_op 3"):
        blkif.unpack_request(bytes(b))
    b[1] = 0
    struct.pack_into("<H", b, 2, 0)
    with pytest.raises(blkif.BlkifRequestError, match="nr_segments 0"):
        blkif.unpack_request(bytes(b))
    struct.pack_into("<H", b, 2, 4097)
    with pytest.raises(blkif.BlkifRequestError, match="nr_segments 4097"):
        blkif.unpack_request(bytes(b))


@given(st.binary(min_size=112, max_size=112))
def test_blkif_any_bytes_decode_or_clean_error(data):
    try:
        blkif.unpack_request(data)
    except blkif.BlkifRequestError as e:
        assert e.id == struct.unpack_from("<Q", data, 8)[0]


def test_blkif_encode_range_errors():
    with pytest.raises(blkif.BlkifError, match="12 segments"):
        blkif.BlkifRequest(0, 1, segments=(blkif.Segment(1, 0, 7),) * 12).pack()
    with pytest.raises(blkif.BlkifError, match="status=40000"):
        blkif.BlkifResponse(1, 0, 40000).pack()
    with pytest.raises(blkif.BlkifError, match="gref=-1"):
        blkif.Segment(-1, 0, 7).pack()
    with pytest.raises(blkif.BlkifError, match="needs 16 bytes, got 8"):
        blkif.BlkifResponse.unpack(b"\0" * 8)
    with pytest.raises(blkif.BlkifError):
        blkif.unpack_request(b"\0" * 10)


def test_blkif_over_a_ring():
    page = bytearray(4096)
    front = FrontRing.init(page, blkif.ENTRY_SIZE)
    back = BackRing(page, blkif.ENTRY_SIZE)
    reqs = [blkif.BlkifRequest(blkif.BLKIF_OP_READ, i, i * 8, 51712,
                               (blkif.Segment(100 + i, 0, 7),)) for i in range(40)]
    done = []
    pending = list(reqs)
    while pending or len(done) < len(reqs):
        while pending and not front.full():
            front.put_request(pending.pop(0).pack())
        front.push_requests_and_check_notify()
        for raw in back.requests():
            r = blkif.unpack_request(raw)
            back.put_response(blkif.BlkifResponse(r.id, r.operation, blkif.BLKIF_RSP_OKAY).pack())
        back.push_responses_and_check_notify()
        done += [blkif.BlkifResponse.unpack(x) for x in front.responses()]
    assert [d.id for d in done] == list(range(40))


# -- netif ----------------------------------------------------------------------

def test_netif_sizes_and_ring_sizes():
    assert (netif.TX_REQUEST_SIZE, netif.TX_RESPONSE_SIZE) == (12, 4)
    assert (netif.RX_REQUEST_SIZE, netif.RX_RESPONSE_SIZE) == (8, 8)
    assert FrontRing(bytearray(4096), netif.TX_ENTRY_SIZE).size == 256
    assert FrontRing(bytearray(4096), netif.RX_ENTRY_SIZE).size == 256


def test_netif_layouts():
    assert netif.NetifTxRequest(0x11223344, 0x55, 0x66, 0x77, 0x88).pack() == \
        bytes.fromhex("44332211 5500 6600 7700 8800".replace(" ", ""))
    assert netif.NetifTxResponse(3, -2).pack() == b"\x03\x00\xfe\xff"
    assert netif.NetifRxRequest(9, 0xA0B0C0D0).pack() == b"\x09\x00\x00\x00\xd0\xc0\xb0\xa0"
    assert netif.NetifRxResponse(1, 2, 3, -1).pack() == b"\x01\x00\x02\x00\x03\x00\xff\xff"


@given(st.integers(0, 2**32 - 1), st.integers(0, 0xFFFF), st.integers(0, 0xFFFF),
       st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.integers(-0x8000, 0x7FFF))
def test_netif_roundtrips(gref, a, b, c, d, status):
    for obj in (netif.NetifTxRequest(gref, a, b, c, d), netif.NetifTxResponse(a, status),
                netif.NetifRxRequest(a, gref), netif.NetifRxResponse(a, b, c, status)):
        assert type(obj).unpack(obj.pack()) == obj


def test_netif_flag_values():
    assert (netif.NETTXF_csum_blank, netif.NETTXF_data_validated,
            netif.NETTXF_more_data, netif.NETTXF_extra_info) == (1, 2, 4, 8)
    assert (netif.NETRXF_data_validated, netif.NETRXF_csum_blank, netif.NETRXF_more_data,
            netif.NETRXF_extra_info, netif.NETRXF_gso_prefix) == (1, 2, 4, 8, 16)
    assert (netif.NETIF_RSP_DROPPED, netif.NETIF_RSP_ERROR, netif.NETIF_RSP_OKAY,
            netif.NETIF_RSP_NULL) == (-2, -1, 0, 1)


def test_netif_tx_problem():
    assert netif.NetifTxRequest(1, 0, 0, 1, 4096).problem() is None
    assert "crosses" in netif.NetifTxRequest(1, 100, 0, 1, 4000).problem()
    assert "outside" in netif.NetifTxRequest(1, 4096, 0, 1, 0).problem()
    first = netif.NetifTxRequest(1, 0, netif.NETTXF_more_data, 1, 9000)
    assert first.problem(fragment_size=4096) is None
    assert "crosses" in first.problem(fragment_size=4097)


def test_netif_errors():
    with pytest.raises(netif.NetifError, match="id=70000"):
        netif.NetifTxResponse(70000, 0).pack()
    with pytest.raises(netif.NetifError, match="needs 12 bytes"):
        netif.NetifTxRequest.unpack(b"\0" * 4)
    e = netif.NetifExtraInfo(netif.XEN_NETIF_EXTRA_TYPE_GSO, 0, b"\1\2\3\4\5\6")
    assert netif.unpack_extra_info(e.pack() + bytes(4)) == e


# -- console ----------------------------------------------------------------------

def test_console_layout():
    page = bytearray(4096)
    c = ConsoleRing(page)
    assert INTERFACE_SIZE == 3088
    assert c.write_out(b"hello") == 5
    assert page[1024:1029] == b"hello"
    assert struct.unpack_from("<IIII", page, 3072) == (0, 0, 0, 5)
    assert c.write_in(b"ls\n") == 3
    assert page[0:3] == b"ls\n"
    assert struct.unpack_from("<IIII", page, 3072) == (0, 3, 0, 5)


def test_console_both_directions():
    page = bytearray(4096)
    guest, daemon = ConsoleRing(page), ConsoleRing(page)
    guest.write_out(b"boot ok\n")
    assert daemon.out_pending() == 8
    assert daemon.read_out() == b"boot ok\n"
    assert daemon.read_out() == b""
    daemon.write_in(b"x")
    assert guest.in_pending() == 1
    assert guest.read_in() == b"x"


def test_console_full_and_partial_writes():
    c = ConsoleRing(bytearray(4096))
    assert c.write_out(b"a" * 5000) == OUT_SIZE
    assert c.write_out(b"b") == 0
    assert c.read_out(limit=100) == b"a" * 100
    assert c.write_out(b"b" * 200) == 100
    assert c.write_in(b"z" * 2000) == IN_SIZE


@given(st.integers(0, 2**32 - 1), st.lists(st.binary(max_size=700), max_size=20))
def test_console_wraparound_preserves_stream(start, chunks):
    page = bytearray(4096)
    struct.pack_into("<IIII", page, 3072, start, start, start, start)
    c = ConsoleRing(page)
    sent, got = b"", b""
    for ch in chunks:
        n = c.write_out(ch)
        sent += ch[:n]
        got += c.read_out(limit=300)
    got += c.read_out()
    assert got == sent
    assert c.out_cons == c.out_prod == (start + len(sent)) & 0xFFFFFFFF


def test_console_corrupt_indices():
    page = bytearray(4096)
    c = ConsoleRing(page)
    struct.pack_into("<I", page, 3084, 5000)             # out_prod way ahead
    with pytest.raises(ConsoleRingCorrupt, match="5000 bytes ahead"):
        c.read_out()
    struct.pack_into("<II", page, 3072, 0, 2000)           # in_prod 2000 > 1024
    with pytest.raises(ConsoleRingCorrupt):
        c.read_in()
    with pytest.raises(ConsoleRingCorrupt):
        c.write_in(b"x")


def test_console_rejects_small_or_readonly_buffer():
    with pytest.raises(ValueError, match="3088"):
        ConsoleRing(bytearray(100))
    with pytest.raises(ValueError, match="writable"):
        ConsoleRing(bytes(4096))
