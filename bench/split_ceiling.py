"""The split-driver ceiling: what any frontend/backend pair could reach here.

What this measures
------------------
A split driver, whatever its protocol, moves a request's data through
memory both sides share and wakes the other side when there is work.  The
cheapest such pair this machine can run is two processes, a shared memory
buffer and a pipe each way, with no protocol, no hypervisor, no grants and
almost no Python between the system calls: the "backend" does the
``preadv``/``pwritev`` between the image file and the shared buffer, the
"frontend" copies a read's data out of it (``read`` returns bytes, as
blkfront's does) or a write's data into it, and each side writes one pipe
message per batch of requests.  The 4 KiB runs batch perfectly (every
completion the frontend has seen is answered with new requests in one
message), so they are a ceiling, not a model.

Comparing the raw baseline (one process, ``pread``/``pwrite``) with this
says what the split itself costs on this machine: two processes, their
wake-ups on another vCPU and the extra copy.  Comparing blkfront/blkback
with this says what everything else costs (the ring protocol, grants,
Python and trio in three processes).  A target that the ceiling itself
misses cannot be met by any split driver here.
"""

from __future__ import annotations

import mmap
import os
import random
import struct
import subprocess
import sys
import time

#: One request: op (0 read, 1 write, 2 fdatasync, 3 stop), buffer slot, offset, length.
_REQ = struct.Struct("<BxxxIQQ")
SLOT = 1 << 20          # each slot holds one request's data (up to 1 MiB)
SLOTS = 32

_BACKEND = r"""
import os, struct, sys
R = struct.Struct("<BxxxIQQ")
fd, shm_fd, req_r, rsp_w = (int(x) for x in sys.argv[1:5])
import mmap
shm = mmap.mmap(shm_fd, %(size)d)
view = memoryview(shm)
buf = b""
while True:
    buf += os.read(req_r, 65536)
    if not buf:
        break
    n = len(buf) // R.size
    done = bytearray()
    for i in range(n):
        op, slot, off, length = R.unpack_from(buf, i * R.size)
        if op == 3:
            os._exit(0)
        if op == 2:
            os.fdatasync(fd)
        elif op == 0:
            os.preadv(fd, [view[slot * %(slot)d:slot * %(slot)d + length]], off)
        else:
            os.pwritev(fd, [view[slot * %(slot)d:slot * %(slot)d + length]], off)
        done.append(slot)
    buf = buf[n * R.size:]
    os.write(rsp_w, bytes(done))
""" % {"size": SLOT * SLOTS, "slot": SLOT}


class _Pair:
    """The backend process and the frontend's ends of the shared buffer and pipes."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDWR)
        self.shm_fd = os.memfd_create("split-ceiling")
        os.ftruncate(self.shm_fd, SLOT * SLOTS)
        self.shm = mmap.mmap(self.shm_fd, SLOT * SLOTS)
        self.view = memoryview(self.shm)
        req_r, self.req_w = os.pipe()
        self.rsp_r, rsp_w = os.pipe()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _BACKEND, str(self.fd), str(self.shm_fd), str(req_r),
             str(rsp_w)], pass_fds=(self.fd, self.shm_fd, req_r, rsp_w))
        os.close(req_r)
        os.close(rsp_w)

    def send(self, reqs: list[tuple[int, int, int, int]]) -> None:
        os.write(self.req_w, b"".join(_REQ.pack(*r) for r in reqs))

    def wait(self) -> bytes:
        return os.read(self.rsp_r, 4096)      # the slots whose requests are done

    def close(self) -> None:
        try:
            self.send([(3, 0, 0, 0)])
            self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        self.view.release()
        self.shm.close()
        for fd in (self.fd, self.shm_fd, self.req_w, self.rsp_r):
            os.close(fd)


def _sequential(pair: _Pair, write: bool, depth: int, secs: float, region: int) -> float:
    """1 MiB requests in order over ``region``, ``depth`` in flight, for
    ``secs`` (a write pass ends with an fdatasync, as the raw baseline's
    does); MiB/s."""
    chunk = bytes(SLOT)
    nchunks = region // SLOT
    nxt = done = syncs = 0
    deadline = time.monotonic() + secs

    def issue(slot: int) -> None:
        nonlocal nxt, syncs
        off = (nxt % nchunks) * SLOT
        if write:
            pair.view[slot * SLOT:(slot + 1) * SLOT] = chunk
        reqs = [(1 if write else 0, slot, off, SLOT)]
        if write and nxt % nchunks == nchunks - 1:
            reqs.append((2, SLOTS - 1, 0, 0))     # answered as slot SLOTS - 1
            syncs += 1
        pair.send(reqs)
        nxt += 1
    start = time.monotonic()
    for slot in range(depth):
        issue(slot)
    outstanding = depth
    while outstanding or syncs:
        for slot in pair.wait():
            if slot == SLOTS - 1:
                syncs -= 1
                continue
            if not write:
                bytes(pair.view[slot * SLOT:(slot + 1) * SLOT])
            done += 1
            outstanding -= 1
            if nxt < nchunks or time.monotonic() < deadline:
                issue(slot)
                outstanding += 1
    return done / (time.monotonic() - start)


def _random(pair: _Pair, write: bool, depth: int, secs: float, region: int) -> float:
    """4 KiB requests at random aligned offsets, ``depth`` in flight; IOPS."""
    rng = random.Random(1)
    block = 4096
    nblocks = region // block
    data = bytes(range(256)) * 16
    op = 1 if write else 0

    def request(slot: int) -> tuple[int, int, int, int]:
        if write:
            pair.view[slot * SLOT:slot * SLOT + block] = data
        return (op, slot, rng.randrange(nblocks) * block, block)
    done = 0
    deadline = time.monotonic() + secs
    start = time.monotonic()
    pair.send([request(slot) for slot in range(depth)])
    outstanding = depth
    while outstanding:
        slots = pair.wait()
        again = []
        for slot in slots:
            if not write:
                bytes(pair.view[slot * SLOT:slot * SLOT + block])
            done += 1
            if time.monotonic() < deadline:
                again.append(request(slot))
        outstanding += len(again) - len(slots)
        if again:
            pair.send(again)
    return done / (time.monotonic() - start)


def measure(path: str, secs: float, region: int = 16 << 20) -> dict[str, float]:
    """The ceiling's figures for the image at ``path`` (page cache), named
    as the block suite names its own: seq{write,read}_1m[_qd4] in MiB/s,
    rand{read,write}_4k_qd{1,32} in IOPS."""
    pair = _Pair(path)
    out: dict[str, float] = {}
    try:
        for write in (True, False):
            for depth in (1, 4):
                name = f"seq{'write' if write else 'read'}_1m" + ("_qd4" if depth > 1 else "")
                out[name] = _sequential(pair, write, depth, secs, region)
        for depth in (1, 32):
            for write in (False, True):
                out[f"rand{'write' if write else 'read'}_4k_qd{depth}"] = \
                    _random(pair, write, depth, secs, region)
    finally:
        pair.close()
    return out
