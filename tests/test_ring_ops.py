"""Unit tests of every ring.h operation in ipc/ring.py."""

from __future__ import annotations

import mmap
import struct

import pytest

from ipc.ring import (
    RING_HEADER_SIZE,
    BackRing,
    FrontRing,
    RingCorruptError,
    RingError,
    SharedRing,
    rd32,
    ring_size,
)

ENTRY = 16          # a made-up protocol: 16-byte entries
PAGE = 4096
U32 = 0xFFFFFFFF


def req(i: int) -> bytes:
    return struct.pack("<QQ", i, ~i & 0xFFFFFFFFFFFFFFFF)


def rsp(i: int) -> bytes:
    return struct.pack("<Q", i | (1 << 63))


def pair(start: int = 0, size: int = PAGE, entry: int = ENTRY):
    buf = bytearray(size)
    front = FrontRing.init(buf, entry, start=start)
    back = BackRing(buf, entry, start=start)
    return buf, front, back


def header(buf) -> tuple[int, int, int, int]:
    return struct.unpack_from("<IIII", buf, 0)


# -- geometry -------------------------------------------------------------------

def test_rd32_rounds_down_to_power_of_two():
    assert [rd32(x) for x in (0, 1, 2, 3, 4, 5, 31, 32, 33, 4032)] == \
        [0, 1, 2, 2, 4, 4, 16, 32, 32, 2048]


@pytest.mark.parametrize("entry,expected", [(112, 32), (12, 256), (8, 256), (16, 128),
                                            (64, 32), (4032, 1)])
def test_ring_size_single_page(entry, expected):
    assert ring_size(PAGE, entry) == expected


@pytest.mark.parametrize("order", [0, 1, 2, 3])
def test_ring_size_multi_page(order):
    assert ring_size(PAGE << order, 112) == 32 << order


def test_ring_size_too_small():
    with pytest.raises(RingError, match="no room"):
        ring_size(64 + 111, 112)
    with pytest.raises(RingError, match="positive"):
        ring_size(PAGE, 0)


def test_shared_ring_rejects_readonly_and_oversize():
    with pytest.raises(RingError, match="writable"):
        SharedRing(bytes(PAGE), 16)
    with pytest.raises(RingError, match="exceeds"):
        SharedRing(bytearray(PAGE), 16, size=2 * PAGE)


def test_slot_offsets_and_masking():
    s = SharedRing(bytearray(PAGE), 112)
    assert s.nr_ents == 32
    assert s.slot_offset(0) == RING_HEADER_SIZE
    assert s.slot_offset(1) == RING_HEADER_SIZE + 112
    assert s.slot_offset(32) == RING_HEADER_SIZE
    assert s.slot_offset(U32) == RING_HEADER_SIZE + 31 * 112
    s.release()


def test_multi_page_ring_uses_all_pages():
    buf = bytearray(4 * PAGE)
    f = FrontRing.init(buf, 112)
    assert f.size == 128
    for i in range(128):
        f.put_request(bytes([i % 256]) * 112)
    assert f.full()
    assert buf[RING_HEADER_SIZE + 127 * 112] == 127


def test_size_argument_limits_ring_inside_larger_buffer():
    buf = bytearray(3 * PAGE)
    f = FrontRing.init(buf, 112, size=2 * PAGE)
    assert f.size == 64


# -- init -----------------------------------------------------------------------

def test_front_init_writes_shared_ring_init():
    buf = bytearray(b"\xAA" * PAGE)
    f = FrontRing.init(buf, ENTRY)
    assert header(buf) == (0, 1, 0, 1)
    assert buf[16:64] == bytes(48)                  # pvt and __pad cleared
    assert buf[64] == 0xAA                          # entries untouched, as in C
    assert (f.req_prod_pvt, f.rsp_cons) == (0, 0)


def test_attach_does_not_touch_shared_page():
    buf = bytearray(b"\x55" * PAGE)
    f = FrontRing(buf, ENTRY, start=7)
    b = BackRing(buf, ENTRY, start=9)
    assert buf[:64] == b"\x55" * 64
    assert (f.req_prod_pvt, f.rsp_cons) == (7, 7)
    assert (b.rsp_prod_pvt, b.req_cons) == (9, 9)


def test_raw_buffer_needs_entry_size():
    with pytest.raises(RingError, match="entry_size"):
        FrontRing(bytearray(PAGE))


def test_both_ends_can_share_one_sharedring_object():
    buf = bytearray(PAGE)
    s = SharedRing(buf, ENTRY)
    f = FrontRing.init(s)
    b = BackRing(s)
    f.put_request(req(1))
    f.push_requests()
    assert b.get_request() == req(1)


# -- requests: front -> back ----------------------------------------------------------

def test_put_request_is_private_until_pushed():
    buf, f, b = pair()
    f.put_request(req(1))
    assert f.req_prod_pvt == 1
    assert header(buf)[0] == 0
    assert b.unconsumed_requests() == 0
    f.push_requests()
    assert header(buf)[0] == 1
    assert b.unconsumed_requests() == 1


def test_request_slot_is_next_slot():
    buf, f, b = pair()
    f.request_slot()[:ENTRY] = req(5)
    f.req_prod_pvt += 1
    f.push_requests()
    assert b.get_request() == req(5)


def test_requests_are_fifo_and_copied():
    buf, f, b = pair()
    for i in range(10):
        f.put_request(req(i))
    f.push_requests()
    got = b.requests()
    assert got == [req(i) for i in range(10)]
    assert b.req_cons == 10
    # A copy: scribbling on the page later does not change what we hold.
    buf[RING_HEADER_SIZE:RING_HEADER_SIZE + ENTRY] = bytes(ENTRY)
    assert got[0] == req(0)


def test_short_entry_written_at_start_of_slot_only():
    buf, f, b = pair(entry=112)
    f.put_request(b"\x11" * 112)
    f.push_requests()
    b.get_request()
    b.put_response(b"\x22" * 16)
    b.push_responses()
    assert f.get_response() == b"\x22" * 16 + b"\x11" * 96


def test_oversize_entry_refused():
    buf, f, b = pair()
    with pytest.raises(RingError, match="does not fit"):
        f.put_request(bytes(ENTRY + 1))


def test_free_requests_and_full():
    buf, f, b = pair()
    assert f.free_requests() == f.size == 128
    for i in range(128):
        f.put_request(req(i))
    assert f.full()
    with pytest.raises(RingError, match="ring full"):
        f.put_request(req(999))
    f.push_requests()
    b.requests()
    b.put_response(rsp(0))
    b.push_responses()
    assert f.full()                   # not until the response is consumed
    f.get_response()
    assert f.free_requests() == 1


def test_get_request_on_empty_ring():
    buf, f, b = pair()
    with pytest.raises(RingError, match="no unconsumed request"):
        b.get_request()
    with pytest.raises(RingError, match="no unconsumed response"):
        f.get_response()


# -- responses: back -> front --------------------------------------------------------

def test_responses_roundtrip():
    buf, f, b = pair()
    for i in range(5):
        f.put_request(req(i))
    f.push_requests()
    for r in b.requests():
        b.put_response(rsp(struct.unpack_from("<Q", r)[0]))
    assert f.unconsumed_responses() == 0             # not pushed yet
    b.push_responses()
    assert f.unconsumed_responses() == 5
    assert [x[:8] for x in f.responses()] == [rsp(i) for i in range(5)]
    assert f.rsp_cons == 5


def test_response_without_request_refused():
    buf, f, b = pair()
    with pytest.raises(RingError, match="no consumed request"):
        b.put_response(rsp(0))


def test_response_slot_view():
    buf, f, b = pair()
    f.put_request(req(3))
    f.push_requests()
    b.get_request()
    b.response_slot()[:8] = rsp(3)
    b.rsp_prod_pvt += 1
    b.push_responses()
    assert f.get_response()[:8] == rsp(3)


def test_unconsumed_requests_limited_by_response_space():
    """RING_HAS_UNCONSUMED_REQUESTS never exceeds the slots the backend can
    answer: req_cons may not get more than a ring ahead of rsp_prod_pvt."""
    buf, f, b = pair()
    for i in range(128):
        f.put_request(req(i))
    f.push_requests()
    assert b.unconsumed_requests() == 128
    b.requests()
    assert b.unconsumed_requests() == 0
    assert b.request_cons_overflow(b.req_cons)
    b.put_response(rsp(0))
    assert not b.request_cons_overflow(b.req_cons)


# -- wraparound of the free-running u32 indices -----------------------------------------

@pytest.mark.parametrize("start", [U32 - 3, U32, 2**31 - 2])
def test_indices_wrap_at_2_32(start):
    buf, f, b = pair(start=start)
    assert header(buf) == (start, (start + 1) & U32, start, (start + 1) & U32)
    for i in range(10):
        f.put_request(req(i))
    f.push_requests()
    assert header(buf)[0] == (start + 10) & U32
    assert b.unconsumed_requests() == 10
    got = b.requests()
    assert got == [req(i) for i in range(10)]
    for i in range(10):
        b.put_response(rsp(i))
    b.push_responses()
    assert f.unconsumed_responses() == 10
    assert [r[:8] for r in f.responses()] == [rsp(i) for i in range(10)]
    assert f.rsp_cons == (start + 10) & U32
    assert f.free_requests() == f.size


def test_slots_reused_after_wrap():
    buf, f, b = pair(entry=2048 - 32)      # 2 entries per page
    assert f.size == 2
    for i in range(7):
        f.put_request(req(i) + bytes(2048 - 48))
        f.push_requests()
        assert b.get_request()[:16] == req(i)
        b.put_response(rsp(i))
        b.push_responses()
        assert f.get_response()[:8] == rsp(i)


# -- notification rules --------------------------------------------------------------

def test_first_push_notifies_after_init():
    buf, f, b = pair()
    f.put_request(req(0))
    assert f.push_requests_and_check_notify() is True     # req_event == 1


def test_no_notify_while_backend_is_busy():
    """The backend only asked for an event at index 1; later pushes are silent
    until it sleeps again with final_check_for_requests."""
    buf, f, b = pair()
    f.put_request(req(0))
    assert f.push_requests_and_check_notify()
    f.put_request(req(1))
    assert not f.push_requests_and_check_notify()
    b.requests()
    assert not b.final_check_for_requests()      # sets req_event = req_cons + 1
    assert header(buf)[1] == 3
    f.put_request(req(2))
    assert f.push_requests_and_check_notify()


def test_notify_when_event_inside_batch():
    buf, f, b = pair()
    b.sring.req_event = 5
    for i in range(4):
        f.put_request(req(i))
    assert not f.push_requests_and_check_notify()    # published 1..4, event 5
    f.put_request(req(4))
    assert f.push_requests_and_check_notify()        # published 5
    for i in range(3):
        f.put_request(req(i))
    assert not f.push_requests_and_check_notify()    # 6..8, event 5 is behind


def test_push_nothing_never_notifies():
    buf, f, b = pair()
    assert not f.push_requests_and_check_notify()
    assert not b.push_responses_and_check_notify()


def test_response_notify_rules():
    buf, f, b = pair()
    for i in range(3):
        f.put_request(req(i))
    f.push_requests()
    b.requests()
    b.put_response(rsp(0))
    assert b.push_responses_and_check_notify()        # rsp_event == 1
    b.put_response(rsp(1))
    assert not b.push_responses_and_check_notify()
    f.responses()
    assert not f.final_check_for_responses()
    assert header(buf)[3] == 3
    b.put_response(rsp(2))
    assert b.push_responses_and_check_notify()


@pytest.mark.parametrize("start", [U32 - 1, U32])
def test_notify_rule_across_wrap(start):
    buf, f, b = pair(start=start)
    f.put_request(req(0))
    f.put_request(req(1))
    f.put_request(req(2))
    assert f.push_requests_and_check_notify()        # event start+1 in range


def test_final_check_sees_work_already_there():
    buf, f, b = pair()
    f.put_request(req(0))
    f.push_requests()
    before = header(buf)[1]
    assert b.final_check_for_requests()
    assert header(buf)[1] == before                   # event untouched when busy


def test_final_check_closes_race():
    """A request published between the consumer's check and its setting of
    req_event is found by the re-check, so no wakeup is lost."""
    buf, f, b = pair()
    f.put_request(req(0))
    f.push_requests()
    b.requests()

    class RacingShared:
        """Publishes a request right when the backend writes req_event."""

        def __init__(self, inner):
            self.__dict__["inner"] = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def __setattr__(self, name, value):
            setattr(self.inner, name, value)
            if name == "req_event":
                # The producer publishes in the window between the
                # consumer's first check and its re-check.
                f.put_request(req(1))
                f.push_requests()

    b.sring = RacingShared(b.sring)
    assert b.final_check_for_requests() is True


def test_final_check_for_responses_when_idle_sets_event():
    buf, f, b = pair(start=100)
    assert not f.final_check_for_responses()
    assert header(buf)[3] == 101


# -- corrupt producer indices ------------------------------------------------------------

def test_backend_detects_runaway_req_prod():
    buf, f, b = pair()
    struct.pack_into("<I", buf, 0, 129)          # 129 requests in a 128-slot ring
    with pytest.raises(RingCorruptError, match="129 entries ahead") as e:
        b.unconsumed_requests()
    assert e.value.size == 128
    with pytest.raises(RingCorruptError):
        b.requests()
    with pytest.raises(RingCorruptError):
        b.final_check_for_requests()


def test_backend_detects_runaway_req_prod_after_wrap():
    buf, f, b = pair(start=U32 - 5)
    struct.pack_into("<I", buf, 0, (U32 - 5 + 200) & U32)
    with pytest.raises(RingCorruptError):
        b.unconsumed_requests()


def test_backend_detects_req_prod_going_backwards():
    buf, f, b = pair(start=1000)
    struct.pack_into("<I", buf, 0, 999)          # looks like 2**32-1 pending
    with pytest.raises(RingCorruptError):
        b.unconsumed_requests()


def test_full_ring_is_not_corrupt():
    buf, f, b = pair()
    for i in range(128):
        f.put_request(req(i))
    f.push_requests()
    assert b.unconsumed_requests() == 128


def test_frontend_detects_runaway_rsp_prod():
    buf, f, b = pair()
    for i in range(2):
        f.put_request(req(i))
    f.push_requests()
    struct.pack_into("<I", buf, 8, 3)            # 3 responses to 2 requests
    with pytest.raises(RingCorruptError, match="response ring"):
        f.unconsumed_responses()
    struct.pack_into("<I", buf, 8, 0x80000000)
    with pytest.raises(RingCorruptError):
        f.responses()
    with pytest.raises(RingCorruptError):
        f.final_check_for_responses()


# -- real shared memory ------------------------------------------------------------------

def test_on_mmap_and_release_allows_close():
    m = mmap.mmap(-1, PAGE)
    f = FrontRing.init(m, 112)
    b = BackRing(m, 112)
    f.put_request(b"\x01" * 112)
    f.push_requests()
    assert b.get_request() == b"\x01" * 112
    with pytest.raises(BufferError):
        m.close()
    f.release()
    b.release()
    m.close()


def test_context_manager_releases():
    m = mmap.mmap(-1, PAGE)
    with FrontRing.init(m, 112) as f:
        assert f.size == 32
    m.close()
