"""A hostile guest kernel for the block tests: it attacks blkback through its ring.

It connects its vbd like any guest, then puts malformed requests on the ring
(bad grant references, sectors off the disk, unknown operations, too many
segments) and records each answer's status under data/hostile/<case>.  Last it
publishes a request producer index far past the ring, which blkback can only
answer by disconnecting the device; it then writes data/hostile/done.
"""

from __future__ import annotations

import struct

import trio

from domains.domu.blkfront import open_vbd
from domains.kernel import control
from domains.kernel.boot import Kernel, boot
from ipc import blkif


def _req(op, rid, sector, segs=()):
    return blkif.BlkifRequest(op, rid, sector, 0, tuple(blkif.Segment(*s) for s in segs)).pack()


CASES = {
    "bad_gref": lambda rid: _req(blkif.BLKIF_OP_READ, rid, 0, [(2000, 0, 7)]),
    "beyond_disk": lambda rid: _req(blkif.BLKIF_OP_READ, rid, 1 << 40, [(9, 0, 7)]),
    "bad_segment": lambda rid: _req(blkif.BLKIF_OP_READ, rid, 0, [(9, 6, 2)]),
    "unknown_op": lambda rid: struct.pack("<BBH4xQQ", 77, 0, 0, rid, 0) + bytes(88),
    "too_many_segments": lambda rid: struct.pack("<BBH4xQQ", 0, 200, 0, rid, 0) + bytes(88),
}


async def main(k: Kernel) -> None:
    async with k.xenstore() as xs:
        base = f"/local/domain/{k.domid}/data/hostile"
        async with trio.open_nursery() as nursery:
            dev = await open_vbd(k, xs, nursery)
            for name, build in CASES.items():
                status, _ = await dev.submit_raw(build)
                await xs.write(f"{base}/{name}", str(status).encode())
            # A good request still works afterwards.
            await dev.write(0, b"\x5a" * 512)
            ok = await dev.read(0, 1) == b"\x5a" * 512
            await xs.write(f"{base}/still_works", b"1" if ok else b"0")
            conn = dev._conn
            conn.ring.sring.req_prod = (conn.ring.req_prod_pvt + 1000) & 0xFFFFFFFF
            conn.port.notify_nowait()
            await xs.write(f"{base}/done", b"1")
            await control.run(k, xs)


def kernel_main(start: dict, fds: dict) -> int:
    return boot(start, fds, main)
