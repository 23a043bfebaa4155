"""The block suite: blkfront -> blkback -> raw image.

What this measures
------------------
A real microxen system (``run.py up`` in a scratch run directory): a ``blkdom``
driver domain serving raw images to guests running ``bench.kernels.blk``.
Inside each guest, through blkfront's API:

* ``block.randread_4k_qd1`` / ``_qd32``, ``block.randwrite_4k_qd1`` / ``_qd32``
  (IOPS): 4 KiB requests at random aligned offsets in a 16 MiB region;
* ``block.seqwrite_1m`` / ``block.seqread_1m`` (MiB/s): 1 MiB requests in
  order over the region, one at a time, pass after pass for the run's
  duration (each write pass ends with a flush); ``_qd4``: four in flight;

once with persistent grants (the default) and once with per-request grant
maps (``*_pergrant`` figures), so the two strategies are compared on the same
machine in the same run.  Each is compared (ratio = slowdown factor) with the
same operation done by ``pread``/``pwrite`` on *the same image file* from one
process (a thread per request in flight for depths 4 and 32), measured
right after in this process:
the floor blkback could reach if the ring, the grants and the three processes
cost nothing.  Between the two sits the *split-driver ceiling*
(``block.ceiling_*``, bench/split_ceiling.py): two bare processes sharing a
buffer and a pipe each way, the second doing the file I/O, on the same
page-cached image.  No split driver can beat it here, so a target the
ceiling misses is one no split driver could meet on this machine.

(Recovery from a blkdom crash is the ``recovery`` suite.)

Differences from how Xen is measured: fio on bare metal, with O_DIRECT.  Here
the page cache is warm and every domain is a Python process on two shared
cores, so only the ratios mean much.
"""

from __future__ import annotations

import json
import mmap
import os
import threading
import time

from bench import split_ceiling
from bench.harness import Figure, compare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def blk_system(configs: dict[str, str]):
    import sys
    sys.path.insert(0, ROOT)
    from tests.blocksys import System
    return System(configs, watchdog_timeout=3.0)


def _bench_guest(name: str, persistent: bool, direct: bool = False) -> str:
    return (f'name = "{name}"\nkernel = "bench.kernels.blk"\nmemory = 64\n'
            f'extra = "persistent={1 if persistent else 0}"\n'
            f'disk = ["format=raw, vdev=xvda, access=rw, backend=blkdom, '
            f'{"direct-io-safe, " if direct else ""}target=disks/{name}.img?size=32M"]\n')


#: The bench guests: (name, persistent grants, O_DIRECT backend).
GUESTS = (("bpers", True, False), ("bgrant", False, False), ("bdirect", True, True))


def _through_blkfront(ctx, secs: float) -> tuple[dict[str, dict], str]:
    from tests.blocksys import BLKDOM
    s = blk_system({"blkdom": BLKDOM, **{name: _bench_guest(name, pers, direct)
                                       for name, pers, direct in GUESTS}})
    results: dict[str, dict] = {}
    try:
        s.up()
        for name, _p, _d in GUESTS:          # one at a time, so they do not compete
            domid = s.list()[name]["domid"]
            base = f"/local/domain/{domid}/data/bench"
            s.wait_for(lambda: s.read(f"{base}/ready") == "1", timeout=60, what=f"{name} ready")
            ctx.log(f"block: {name} measuring ...")
            s.xl("xenstore-write", f"{base}/go", json.dumps({"secs": secs, "region_mb": 16}))
            raw = s.wait_for(lambda: s.read(f"{base}/result"), timeout=60 + 10 * secs,
                             what=f"{name}'s results")
            results[name] = json.loads(raw)
        disks = os.path.join(s.run_dir, "disks")
        s.down()
        return results, disks
    except BaseException:
        s.down(check=False)
        s.cleanup()
        raise


def _raw_file(path: str, secs: float, direct: bool = False) -> dict[str, float]:
    """pread/pwrite on the same image, one process (a thread per request in
    flight); with ``direct``, O_DIRECT preadv/pwritev from page-aligned buffers."""
    fd = os.open(path, os.O_RDWR | (os.O_DIRECT if direct else 0))
    local = threading.local()

    def pread(n: int, off: int) -> None:
        if not direct:
            os.pread(fd, n, off)
            return
        buf = local.__dict__.get(n)
        if buf is None:
            buf = local.__dict__[n] = mmap.mmap(-1, n)
        os.preadv(fd, [buf], off)

    def pwrite(data: bytes, off: int) -> None:
        if not direct:
            os.pwrite(fd, data, off)
            return
        buf = local.__dict__.get(("w", len(data)))
        if buf is None:
            buf = local.__dict__[("w", len(data))] = mmap.mmap(-1, len(data))
            buf[:] = data
        os.pwritev(fd, [buf], off)
    region = 16 << 20
    nblocks = region // 4096
    out: dict[str, float] = {}

    def threads(depth: int, work) -> float:
        """Operations a second, ``depth`` threads each running ``work(i)`` (which
        returns how many it did)."""
        count = [0] * depth
        start = time.monotonic()
        ts = [threading.Thread(target=lambda i=i: count.__setitem__(i, work(i)))
              for i in range(depth)]
        for th in ts:
            th.start()
        for th in ts:
            th.join()
        return sum(count) / (time.monotonic() - start)

    try:
        chunk = bytes(1 << 20)
        nchunks = region >> 20
        for write in (True, False):
            for depth in (1, 4):
                nxt = iter(range(1 << 30))      # shared: the threads take chunks in order
                deadline = time.monotonic() + secs

                def seq(_i: int, write=write, depth=depth) -> int:
                    n = 0
                    while True:
                        i = next(nxt)
                        if i >= nchunks and time.monotonic() >= deadline:
                            break
                        off = (i % nchunks) << 20
                        if write:
                            pwrite(chunk, off)
                            if i % nchunks == nchunks - 1:
                                os.fdatasync(fd)
                        else:
                            pread(1 << 20, off)
                        n += 1
                    return n
                rate = threads(depth, seq)
                if write:
                    os.fdatasync(fd)
                name = f"seq{'write' if write else 'read'}_1m" + ("_qd4" if depth > 1 else "")
                out[name] = rate
        import random
        page = bytes(range(256)) * 16
        for depth in (1, 32):
            for write in (False, True):
                deadline = time.monotonic() + secs

                def rand(i: int, write=write) -> int:
                    rng = random.Random(i)
                    n = 0
                    while time.monotonic() < deadline:
                        off = rng.randrange(nblocks) * 4096
                        if write:
                            pwrite(page, off)
                        else:
                            pread(4096, off)
                        n += 1
                    return n
                out[f"rand{'write' if write else 'read'}_4k_qd{depth}"] = threads(depth, rand)
    finally:
        os.close(fd)
    return out


def run(ctx) -> list[Figure]:
    secs = max(0.5, 2.0 * ctx.scale)
    figures: list[Figure] = []
    results, disks = _through_blkfront(ctx, secs)
    try:
        raw = _raw_file(os.path.join(disks, "bpers.img"), secs)
        raw_direct = _raw_file(os.path.join(disks, "bdirect.img"), secs, direct=True)
        ceiling = split_ceiling.measure(os.path.join(disks, "bpers.img"), secs)
    finally:
        import shutil
        shutil.rmtree(os.path.dirname(disks), ignore_errors=True)
    for key, value in raw.items():
        unit = "MiB/s" if key.startswith("seq") else "iops"
        base = Figure(f"block.raw_{key}", value, unit, better="higher",
                      detail={"what": "pread/pwrite on the same image file, one process"})
        base_direct = Figure(f"block.raw_direct_{key}", raw_direct[key], unit, better="higher",
                             detail={"what": "O_DIRECT preadv/pwritev on the same image file, "
                                             "one process"})
        figures += [base, base_direct, compare(
            f"block.ceiling_{key}", ceiling[key], unit, base, True,
            detail={"what": "two bare processes, a shared buffer and a pipe each way, "
                            "the second doing the I/O (bench/split_ceiling.py)"})]
        for guest, suffix, against in (("bpers", "", base), ("bgrant", "_pergrant", base),
                                       ("bdirect", "_direct", base_direct)):
            figures.append(compare(f"block.{key}{suffix}", results[guest][key], unit, against,
                                   True, detail={
                                       "grants": "per-request" if guest == "bgrant" else "persistent",
                                       "backend": "O_DIRECT" if guest == "bdirect" else "page cache"}))
    return figures
