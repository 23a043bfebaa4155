"""Unit tests: xsd_sockmsg framing (ipc.xs_wire) and the ring page (ipc.xs_ring)."""

from __future__ import annotations

import mmap
import os
import shutil
import struct
import subprocess

import pytest
import trio
import trio.testing
from hypothesis import given, settings, strategies as st

from ipc import xs_ring, xs_wire
from ipc.xs_ring import XENSTORE_RING_SIZE, RingEndpoint, RingIndexError, XenstoreRing
from ipc.xs_wire import (Decoder, Message, PayloadTooLong, UnknownType,
                         XenStoreError, XsType, encode, split_strings)


# -- xs_wire -------------------------------------------------------------------

def test_type_numbers_match_xs_wire_h():
    assert XsType.CONTROL == 0 and XsType.DIRECTORY == 1 and XsType.READ == 2
    assert XsType.WRITE == 11 and XsType.WATCH_EVENT == 15 and XsType.ERROR == 16
    assert XsType.IS_DOMAIN_INTRODUCED == 17 and XsType.SET_TARGET == 19
    assert XsType.RESET_WATCHES == 21 and XsType.DIRECTORY_PART == 22
    assert XsType.INVALID == 0xFFFF
    assert xs_wire.XENSTORE_PAYLOAD_MAX == 4096


def test_error_table_order_matches_header():
    header = "/usr/include/xen/io/xs_wire.h"
    if not os.path.exists(header):
        pytest.skip("libxen-dev header not installed")
    names = [line.split("(")[1].split(")")[0] for line in open(header)
             if line.strip().startswith("XSD_ERROR(E")]
    assert list(xs_wire.XS_ERRORS[:len(names)]) == names
    assert "EQUOTA" in xs_wire.XS_ERRORS


def test_encode_and_header_layout():
    raw = encode(XsType.READ, 7, 3, b"/local\0")
    assert raw[:16] == struct.pack("<IIII", 2, 7, 3, 7)
    assert raw[16:] == b"/local\0"
    with pytest.raises(PayloadTooLong):
        encode(XsType.WRITE, 1, 0, b"x" * 4097)


def test_decoder_byte_at_a_time_and_batches():
    msgs = [Message(XsType.WRITE, i, 0, b"/a\0" + bytes([i]) * i) for i in range(20)]
    stream = b"".join(m.encode() for m in msgs)
    d = Decoder()
    got = []
    for i in range(len(stream)):
        got += d.feed(stream[i:i + 1])
    assert got == msgs and d.pending_bytes == 0
    assert Decoder().feed(stream) == msgs


def test_decoder_rejects_oversized_len_naming_offset():
    d = Decoder()
    good = encode(XsType.READ, 1, 0, b"/\0")
    bad = struct.pack("<IIII", XsType.READ, 9, 0, 4097)
    with pytest.raises(PayloadTooLong, match="offset 18.*len=4097"):
        d.feed(good + bad)


def test_decoder_unknown_type_consumes_frame_and_continues():
    d = Decoder()
    first = encode(XsType.READ, 1, 0, b"/\0")
    unknown = struct.pack("<IIII", 20, 2, 0, 3) + b"abc"   # 20: removed XS_RESTRICT
    last = encode(XsType.READ, 3, 0, b"/\0")
    with pytest.raises(UnknownType) as info:
        d.feed(first + unknown + last)
    assert info.value.message.req_id == 2
    assert [m.req_id for m in d.take_ready()] == [1]
    assert [m.req_id for m in d.feed(b"")] == [3]
    lenient = Decoder(strict_types=False)
    assert [m.type for m in lenient.feed(first + unknown + last)] == [2, 20, 2]


def test_split_strings():
    assert split_strings(b"") == []
    assert split_strings(b"a\0b\0") == [b"a", b"b"]
    assert split_strings(b"a\0b") == [b"a", b"b"]
    assert split_strings(b"a\0\0") == [b"a", b""]


def test_xenstore_error_carries_name_and_errno():
    e = XenStoreError("ENOENT", "/x")
    assert e.name == "ENOENT" and e.errno == 2 and "/x" in str(e)
    assert XenStoreError("EQUOTA").errno == xs_wire.errno_of("EQUOTA")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=3000), st.integers(min_value=1, max_value=97))
def test_decoder_never_crashes_on_garbage(data, step):
    d = Decoder()
    for i in range(0, len(data), step):
        try:
            d.feed(data[i:i + step])
        except (PayloadTooLong, UnknownType):
            return


# -- xs_ring -------------------------------------------------------------------

def test_ring_offsets_match_c_struct(tmp_path):
    """A C program compiled against xs_wire.h sees the same bytes we write."""
    header = "/usr/include/xen/io/xs_wire.h"
    cc = shutil.which("cc")
    if not (cc and os.path.exists(header)):
        pytest.skip("needs a C compiler and libxen-dev")
    src = tmp_path / "ring.c"
    src.write_text(r'''
#include <stdio.h>
#include <stdint.h>
#include <stddef.h>
#include <xen/io/xs_wire.h>
int main(int argc, char **argv) {
    static struct xenstore_domain_interface s;
    FILE *f = fopen(argv[1], "rb");
    if (fread(&s, 1, sizeof s, f) != sizeof s) return 2;
    printf("%zu %zu %zu %zu %zu %zu %zu %zu\n", offsetof(struct xenstore_domain_interface, req_cons),
        offsetof(struct xenstore_domain_interface, req_prod), offsetof(struct xenstore_domain_interface, rsp_cons),
        offsetof(struct xenstore_domain_interface, rsp_prod), offsetof(struct xenstore_domain_interface, server_features),
        offsetof(struct xenstore_domain_interface, connection), offsetof(struct xenstore_domain_interface, error),
        sizeof s);
    printf("%u %u %u %u %u %u %u\n", s.req_cons, s.req_prod, s.rsp_cons, s.rsp_prod,
        s.server_features, s.connection, s.error);
    printf("%c %c %c\n", s.req[MASK_XENSTORE_IDX(s.req_cons)], s.req[MASK_XENSTORE_IDX(s.req_prod - 1)],
        s.rsp[MASK_XENSTORE_IDX(s.rsp_prod - 1)]);
    return 0;
}
''')
    exe = tmp_path / "ring"
    subprocess.run([cc, "-o", str(exe), str(src)], check=True, timeout=60)
    page = bytearray(4096)
    ring = XenstoreRing(page)
    ring.req_cons = ring.req_prod = 0xFFFFFFFE        # wraps mid-message
    ring.rsp_cons = ring.rsp_prod = 1022
    assert ring.write_request(b"hello") == 5
    assert ring.write_response(b"abcZ") == 4
    ring.server_features = xs_ring.XENSTORE_SERVER_FEATURE_ERROR
    ring.error = xs_ring.XENSTORE_ERROR_PROTO
    (tmp_path / "page").write_bytes(page)
    out = subprocess.run([str(exe), str(tmp_path / "page")], check=True, timeout=60,
                         capture_output=True, text=True).stdout.splitlines()
    assert out[0] == "2048 2052 2056 2060 2064 2068 2072 2076"
    assert out[1] == "4294967294 3 1022 1026 2 0 3"
    # "hello" straddles the wrap: first and last bytes at the masked indexes.
    assert out[2] == "h o Z"
    assert bytes(page[1022:1024]) == b"he" and bytes(page[0:3]) == b"llo"


def test_ring_free_running_indexes_wrap_u32():
    ring = XenstoreRing(bytearray(4096))
    ring.req_cons = ring.req_prod = 0xFFFFFF00
    data = bytes(range(256)) * 4
    assert ring.write_request(data) == 1024          # exactly full
    assert ring.write_request(b"x") == 0
    assert ring.req_prod == (0xFFFFFF00 + 1024) & 0xFFFFFFFF
    assert ring.read_request(1000) == data[:1000]
    assert ring.write_request(b"0123456789" * 100) == 1000
    assert ring.read_request() == data[1000:] + b"0123456789" * 100


def test_ring_rejects_impossible_indexes():
    ring = XenstoreRing(bytearray(4096))
    ring.req_cons, ring.req_prod = 0, 2000
    with pytest.raises(RingIndexError, match="2000 bytes outstanding"):
        ring.read_request()
    with pytest.raises(ValueError):
        XenstoreRing(bytes(4096))
    with pytest.raises(ValueError):
        XenstoreRing(bytearray(100))


def test_ring_endpoint_streams_more_than_the_ring_in_process():
    """Guest and server endpoints over one page with in-process fake kicks."""
    page = bytearray(4096)

    async def main():
        to_server, to_guest = trio.Event(), trio.Event()
        kicks = {"server": to_server, "guest": to_guest}

        def pair(me: str, peer: str):
            async def notify():
                kicks[peer].set()

            async def wait():
                await kicks[me].wait()
                kicks[me] = trio.Event()
            return notify, wait

        g_notify, g_wait = pair("guest", "server")
        s_notify, s_wait = pair("server", "guest")
        guest = RingEndpoint(page, g_notify, g_wait, side="guest")
        server = RingEndpoint(page, s_notify, s_wait, side="server")
        blob = os.urandom(10_000)
        got = bytearray()
        with trio.fail_after(10):
            async with trio.open_nursery() as n:
                n.start_soon(guest.run)
                n.start_soon(server.run)

                async def echo():
                    while len(got) < len(blob):
                        chunk = await server.receive_some()
                        got.extend(chunk)
                        await server.send_all(chunk)
                n.start_soon(echo)
                n.start_soon(guest.send_all, blob)   # concurrently with reading
                back = bytearray()
                while len(back) < len(blob):
                    back += await guest.receive_some()
                n.cancel_scope.cancel()
        assert bytes(got) == blob and bytes(back) == blob

    trio.run(main)


def test_ring_endpoint_signals_only_a_peer_that_may_be_asleep():
    """Linux's rule: a producer kicks when the consumer had read everything, a
    consumer when the ring was full; and what is sent in one scheduler pass
    (a batch of requests made at once) costs one kick."""
    page = bytearray(4096)

    async def main():
        kicks = {"guest": 0, "server": 0}

        def notify_from(side: str):
            async def notify():
                kicks[side] += 1
            return notify

        async def never():
            await trio.sleep_forever()
        guest = RingEndpoint(page, notify_from("guest"), never, side="guest")
        server = RingEndpoint(page, notify_from("server"), never, side="server")
        settle = trio.testing.wait_all_tasks_blocked
        async with trio.open_nursery() as n:
            n.start_soon(guest.run)
            n.start_soon(server.run)
            for _ in range(5):                 # five requests, nobody reading yet
                await guest.send_all(b"x" * 100)
                await settle()
            assert kicks["guest"] == 1
            assert await server.receive_some() == b"x" * 500
            assert kicks["server"] == 0        # the ring was not full: nobody waits
            await guest.send_all(b"y")         # the server had read everything
            await settle()
            assert kicks["guest"] == 2
            await server.receive_some()
            async with trio.open_nursery() as batch:   # three replies at once
                for _ in range(3):
                    batch.start_soon(server.send_all, b"r")
            await settle()
            assert kicks["server"] == 1
            await guest.receive_some()
            await server.send_all(b"z" * XENSTORE_RING_SIZE)   # fills the ring exactly
            await settle()
            assert kicks["server"] == 2
            assert await guest.receive_some(10) == b"z" * 10   # it was full: the
            assert kicks["guest"] == 3          # producer may be waiting for space
            n.cancel_scope.cancel()

    trio.run(main)


def test_ring_over_shared_memfd_is_seen_by_another_mapping():
    fd = os.memfd_create("xs-ring-test")
    try:
        os.ftruncate(fd, 4096)
        a = mmap.mmap(fd, 4096)
        b = mmap.mmap(fd, 4096)
        ra, rb = XenstoreRing(a), XenstoreRing(b)
        assert ra.write_request(b"ping") == 4
        assert rb.read_request() == b"ping"
        assert ra.req_cons == 4
        ra.release()
        rb.release()
        a.close()
        b.close()
    finally:
        os.close(fd)
