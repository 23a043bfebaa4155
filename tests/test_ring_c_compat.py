"""Byte compatibility with Xen's own C headers.

tests/test_ring_c_compat.c is compiled against the installed Xen public headers
(/usr/include/xen/io/ring.h, blkif.h, netif.h, console.h) with
DEFINE_RING_TYPES as Xen declares it.  Python writes a ring page to a file, the
C program reads it with the real macros and prints what it sees, answers, and
writes the page back for Python to read.  If a single offset or the notify
arithmetic differed, these tests would fail.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

import pytest

from ipc import blkif, netif
from ipc.console_ring import ConsoleRing
from ipc.ring import BackRing, FrontRing, ring_size

HERE = Path(__file__).parent
SOURCE = HERE / "test_ring_c_compat.c"
HEADERS = [Path("/usr/include/xen/io") / h for h in ("ring.h", "blkif.h", "netif.h", "console.h")]
U32 = 0xFFFFFFFF


def _skip_reason() -> str | None:
    if shutil.which("gcc") is None:
        return "gcc is not installed; cannot build the C side of the compatibility test"
    missing = [str(h) for h in HEADERS if not h.exists()]
    if missing:
        return f"Xen public headers missing ({', '.join(missing)}); install libxen-dev"
    return None


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")


@pytest.fixture(scope="module")
def ringcheck():
    """Build the C side into a private temporary directory, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="microxen-ringcheck-") as tmp:
        out = Path(tmp) / "ringcheck"
        proc = subprocess.run(["gcc", "-std=gnu11", "-Wall", "-Werror", "-O1", "-o", str(out),
                               str(SOURCE)], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, f"compiling {SOURCE.name} failed:\n{proc.stderr}"
        yield out


def run(binary: Path, *args: object) -> list[list[str]]:
    proc = subprocess.run([str(binary), *map(str, args)], capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0, proc.stderr
    return [line.split() for line in proc.stdout.splitlines()]


def field(lines: list[list[str]], key: str) -> list[str]:
    return next(line[1:] for line in lines if line[0] == key)


def test_layout_matches_c(ringcheck):
    out = run(ringcheck, "layout")
    sizes = {line[0]: int(line[1]) for line in out if line[0] != "size"}
    assert sizes["blkif_request"] == blkif.REQUEST_SIZE
    assert sizes["blkif_response"] == blkif.RESPONSE_SIZE
    assert sizes["blkif_request_discard"] == len(blkif.BlkifRequestDiscard(0, 0, 0).pack())
    assert sizes["blkif_request_indirect"] == len(
        blkif.BlkifRequestIndirect(0, 0, 0, 1, (0,)).pack())
    assert sizes["blkif_entry"] == blkif.ENTRY_SIZE
    assert sizes["netif_tx_entry"] == netif.TX_ENTRY_SIZE
    assert sizes["netif_rx_entry"] == netif.RX_ENTRY_SIZE
    assert sizes["ring_offset"] == 64
    assert sizes["xencons_interface"] == 3088
    assert sizes["xencons_in_cons"] == 3072
    assert sizes["xencons_out_prod"] == 3084
    entry = {"blkif": blkif.ENTRY_SIZE, "netif_tx": netif.TX_ENTRY_SIZE,
             "netif_rx": netif.RX_ENTRY_SIZE}
    checked = 0
    for line in out:
        if line[0] == "size":
            _, name, nbytes, n = line
            assert ring_size(int(nbytes), entry[name]) == int(n), line
            checked += 1
    assert checked == 15


@pytest.mark.parametrize("start,pages", [(0, 1), (U32 - 4, 1), (12345, 2)])
def test_blkif_python_front_c_back(ringcheck, tmp_path, start, pages):
    page = bytearray(4096 * pages)
    front = FrontRing.init(page, blkif.ENTRY_SIZE, start=start)
    reqs = [
        blkif.BlkifRequest(blkif.BLKIF_OP_READ, id=1, sector_number=2**40 + 3, handle=51712,
                           segments=tuple(blkif.Segment(900 + k, k % 8, 7) for k in range(11))),
        blkif.BlkifRequest(blkif.BLKIF_OP_WRITE, id=2**64 - 1, sector_number=0, handle=1,
                           segments=(blkif.Segment(2**32 - 1, 0, 0),)),
        blkif.BlkifRequest(blkif.BLKIF_OP_FLUSH_DISKCACHE, id=3),
        blkif.BlkifRequestDiscard(id=4, sector_number=8, nr_sectors=2**33, handle=9,
                                  flag=blkif.BLKIF_DISCARD_SECURE),
        blkif.BlkifRequestIndirect(blkif.BLKIF_OP_WRITE, id=5, sector_number=77,
                                   nr_segments=1000, indirect_grefs=(10, 11), handle=2),
        blkif.BlkifRequest(blkif.BLKIF_OP_WRITE_BARRIER, id=6, sector_number=1,
                           segments=(blkif.Segment(5, 1, 2),)),
    ]
    for r in reqs:
        front.put_request(r.pack())
    assert front.push_requests_and_check_notify()
    path = tmp_path / "ring"
    path.write_bytes(page)
    out = run(ringcheck, "blk-back", path, start)

    assert field(out, "size") == [str(32 * pages)]
    assert field(out, "hdr") == [str((start + 6) & U32), str((start + 1) & U32),
                                 str(start), str((start + 1) & U32)]
    seen = [line for line in out if line[0] in ("req", "discard", "indirect")]
    assert seen[0] == ["req", "0", "11", "51712", "1", str(2**40 + 3)] + \
        [f"{900 + k}:{k % 8}:7" for k in range(11)]
    assert seen[1] == ["req", "1", "1", "1", str(2**64 - 1), "0", f"{2**32 - 1}:0:0"]
    assert seen[2] == ["req", "3", "0", "0", "3", "0"]
    assert seen[3] == ["discard", "1", "9", "4", "8", str(2**33)]
    assert seen[4] == ["indirect", "1", "1000", "5", "77", "2", "10", "11"] + ["0"] * 6
    assert seen[5] == ["req", "2", "1", "0", "6", "1", "5:1:2"]
    assert field(out, "notify") == ["1"]     # rsp_event was start+1: inside the batch
    assert field(out, "more") == ["0"]

    # Read the C backend's responses back with Python.
    page[:] = path.read_bytes()
    rsps = [blkif.BlkifResponse.unpack(x) for x in front.responses()]
    assert [(r.id, r.operation, r.status) for r in rsps] == [
        (q.id, q.operation, (q.id % 3) - 2) for q in reqs]
    # C's final check asked for an event at req_cons + 1.
    assert struct.unpack_from("<I", page, 4)[0] == (start + 7) & U32
    front.put_request(reqs[0].pack())
    assert front.push_requests_and_check_notify()
    front.release()


def test_blkif_c_front_python_back(ringcheck, tmp_path):
    path = tmp_path / "ring"
    out = run(ringcheck, "blk-front", path)
    assert field(out, "notify") == ["1"]
    page = bytearray(path.read_bytes())
    assert struct.unpack_from("<IIII", page, 0) == (3, 1, 0, 1)
    assert page[16:64] == bytes(48)
    back = BackRing(page, blkif.ENTRY_SIZE)
    got = [blkif.unpack_request(x) for x in back.requests()]
    assert got[0] == blkif.BlkifRequest(
        blkif.BLKIF_OP_WRITE, 0x1122334455667788, 0xFEDCBA9876543210, 51712,
        tuple(blkif.Segment(1000 + i, i, 7 - i) for i in range(3)))
    assert got[1] == blkif.BlkifRequestDiscard(42, 1 << 20, 2048, 7, blkif.BLKIF_DISCARD_SECURE)
    assert got[2] == blkif.BlkifRequestIndirect(blkif.BLKIF_OP_READ, 43, 99, 600, (77, 78), 5)
    back.release()


@pytest.mark.parametrize("start", [0, U32 - 2])
def test_netif_tx_python_front_c_back(ringcheck, tmp_path, start):
    page = bytearray(4096)
    front = FrontRing.init(page, netif.TX_ENTRY_SIZE, start=start)
    reqs = [netif.NetifTxRequest(gref=100 + i, offset=i * 64,
                                 flags=netif.NETTXF_more_data if i < 4 else 0,
                                 id=i, size=1500 - i) for i in range(5)]
    reqs.append(netif.NetifTxRequest(2**32 - 1, 0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF))
    for r in reqs:
        front.put_request(r.pack())
    front.push_requests()
    path = tmp_path / "ring"
    path.write_bytes(page)
    out = run(ringcheck, "nettx-back", path, start)
    assert field(out, "size") == ["256"]
    tx = [line[1:] for line in out if line[0] == "tx"]
    assert tx == [[str(r.gref), str(r.offset), str(r.flags), str(r.id), str(r.size)]
                  for r in reqs]
    page[:] = path.read_bytes()
    rsps = [netif.NetifTxResponse.unpack(x) for x in front.responses()]
    assert rsps == [netif.NetifTxResponse(r.id, -2 if r.id & 1 else 0) for r in reqs]


def test_netif_rx_python_front_c_back(ringcheck, tmp_path):
    page = bytearray(4096)
    front = FrontRing.init(page, netif.RX_ENTRY_SIZE)
    for i in range(1, 6):
        front.put_request(netif.NetifRxRequest(i, 5000 + i).pack())
    front.push_requests()
    path = tmp_path / "ring"
    path.write_bytes(page)
    out = run(ringcheck, "netrx-back", path, 0)
    assert [line[1:] for line in out if line[0] == "rx"] == \
        [[str(i), str(5000 + i)] for i in range(1, 6)]
    page[:] = path.read_bytes()
    rsps = [netif.NetifRxResponse.unpack(x) for x in front.responses()]
    flags = netif.NETRXF_data_validated | netif.NETRXF_more_data
    assert rsps == [netif.NetifRxResponse(i, 16, flags,
                                          netif.NETIF_RSP_ERROR if i == 3 else 1500 + i)
                    for i in range(1, 6)]


@pytest.mark.parametrize("start", [0, U32 - 10])
def test_console_python_guest_c_daemon(ringcheck, tmp_path, start):
    page = bytearray(4096)
    struct.pack_into("<IIII", page, 3072, start, start, start, start)
    guest = ConsoleRing(page)
    message = b"Linux version 6.1 (microxen)\n" * 3
    assert guest.write_out(message) == len(message)
    path = tmp_path / "console"
    path.write_bytes(page)
    out = run(ringcheck, "cons-back", path)
    assert field(out, "idx") == [str(start), str(start), str(start),
                                 str((start + len(message)) & U32)]
    assert bytes.fromhex(field(out, "out")[0]) == message
    page[:] = path.read_bytes()
    assert guest.out_pending() == 0
    assert guest.read_in() == b"typed on the C side"
    guest.release()


def test_source_is_next_to_test():
    assert SOURCE.exists() and os.access(SOURCE, os.R_OK)
