"""The block suite: blkfront -> blkback -> raw image, and recovery from a blkdom crash.

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
cost nothing.

* ``block.recovery_p50`` / ``_p99`` (ms): two guests run the verifying
  ``disk`` workload; blkdom is SIGKILLed; the time from the kill to the first
  I/O completed after the reconnect, in each guest (each guest of each round
  is one sample).  ``block.recovery_all_p50`` is the same per round for the
  *slower* of the two guests: the time until every guest is moving again.
  ``block.recovery_8g*``: the same with eight guests (full-scale runs only).

Differences from how Xen is measured: fio on bare metal, with O_DIRECT.  Here
the page cache is warm and every domain is a Python process on two shared
cores, so only the ratios mean much.
"""

from __future__ import annotations

import json
import mmap
import os
import signal
import threading
import time

from bench.harness import RECOVERY_QUIET, Figure, compare, latency_figures

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _system(configs: dict[str, str]):
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
    s = _system({"blkdom": BLKDOM, **{name: _bench_guest(name, pers, direct)
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


def _recovery(ctx, rounds: int, nguests: int = 2) -> tuple[list[float], list[float]]:
    from tests.blocksys import BLKDOM, guest
    names = [f"guest{n}" for n in range(1, nguests + 1)]
    s = _system({"blkdom": BLKDOM, **{g: guest(g) for g in names}})
    per_guest: list[float] = []
    all_guests: list[float] = []
    stopped = False
    try:
        s.up()
        for r in range(rounds):
            for g in names:
                s.wait_for(lambda: s.counters(g).get("reconnects", 0) >= r
                           and s.counters(g).get("ops", 0) > 200, timeout=60, what=f"{g} busy")
            pid = s.list()["blkdom"]["pid"]      # looked up first: it takes an xl call
            t0 = time.time()
            os.kill(pid, signal.SIGKILL)
            time.sleep(RECOVERY_QUIET)
            times = []
            for g in names:
                rec = s.wait_for(lambda: (s.counters(g).get("recovered_at", 0) > t0
                                          and s.counters(g)["recovered_at"]), timeout=60,
                                 what=f"{g} to recover")
                times.append((rec - t0) * 1e9)
            per_guest += times
            all_guests.append(max(times))
            ctx.log(f"block: recovery round {r + 1} ({nguests} guests): "
                    f"{[round(x / 1e6) for x in times]} ms")
            for g in names:
                c = s.counters(g)
                if c.get("errors") or c.get("verify_failures"):
                    ctx.error("block.recovery", f"{g}: {c}")
        s.down()
        stopped = True
    finally:
        if not stopped:
            s.down(check=False)
        s.cleanup()
    return per_guest, all_guests


def run(ctx) -> list[Figure]:
    secs = max(0.5, 2.0 * ctx.scale)
    figures: list[Figure] = []
    results, disks = _through_blkfront(ctx, secs)
    try:
        raw = _raw_file(os.path.join(disks, "bpers.img"), secs)
        raw_direct = _raw_file(os.path.join(disks, "bdirect.img"), secs, direct=True)
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
        figures += [base, base_direct]
        for guest, suffix, against in (("bpers", "", base), ("bgrant", "_pergrant", base),
                                       ("bdirect", "_direct", base_direct)):
            figures.append(compare(f"block.{key}{suffix}", results[guest][key], unit, against,
                                   True, detail={
                                       "grants": "per-request" if guest == "bgrant" else "persistent",
                                       "backend": "O_DIRECT" if guest == "bdirect" else "page cache"}))
    per_guest, all_guests = _recovery(ctx, max(3, int(5 * ctx.scale)))
    figures += latency_figures("block.recovery", per_guest, unit="ms",
                               detail={"what": "SIGKILL of blkdom to first completed I/O, per guest"})
    figures += latency_figures("block.recovery_all", all_guests, unit="ms",
                               detail={"what": "SIGKILL of blkdom to I/O completed in both guests"})
    if ctx.scale >= 1:
        per_guest, all_guests = _recovery(ctx, 5, nguests=8)
        figures += latency_figures("block.recovery_8g", per_guest, unit="ms",
                                   detail={"what": "as block.recovery, 8 guests on blkdom"})
        figures += latency_figures("block.recovery_8g_all", all_guests, unit="ms",
                                   detail={"what": "SIGKILL of blkdom to I/O completed in all "
                                                   "8 guests"})
    return figures
