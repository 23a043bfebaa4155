"""The block bench guest kernel: fio-like loops through blkfront, on command.

A guest booted with this kernel opens its first vbd (``persistent=0|1`` on its
command line picks the grant mode), then waits for dom0 to write ``go`` to
``data/bench/go``.  It runs, for ``secs`` seconds each: 1 MiB sequential
writes over the first ``region_mb`` MiB (which also fills the region; each
pass ends with a flush) and reads, one request at a time and then four in
flight, passing over the region again and again (fio's time_based, so a
first pass's page allocation and grant mapping are not what is measured);
then 4 KiB random reads and writes at queue depth 1 and 32 (4 KiB-aligned
offsets in the region).  It writes the results as JSON to
``data/bench/result``.  ``go`` may also carry ``"only": [names]`` to run
just those figures, which is how one workload is profiled on its own.
Timing is done inside the guest, around blkfront's own API: what a guest
program sees.
"""

from __future__ import annotations

import json
import random
import time

import trio

from domains.domu.blkfront import open_vbd
from domains.kernel.boot import Kernel, boot
from domains.kernel.xenbus import wait_until

BLOCK = 4096


async def _rand(dev, write: bool, depth: int, secs: float, nblocks: int) -> float:
    count = 0
    data = bytes(range(256)) * 16
    deadline = time.monotonic() + secs

    async def worker(seed: int) -> None:
        nonlocal count
        rng = random.Random(seed)
        while time.monotonic() < deadline:
            sector = rng.randrange(nblocks) * 8
            if write:
                await dev.write(sector, data)
            else:
                await dev.read(sector, 8)
            count += 1
    start = time.monotonic()
    async with trio.open_nursery() as nursery:
        for i in range(depth):
            nursery.start_soon(worker, i)
    return count / (time.monotonic() - start)


async def _seq(dev, write: bool, region: int, secs: float, depth: int = 1) -> float:
    """1 MiB requests in order over the region, round and round for ``secs``
    (fio's time_based), ``depth`` of them in flight; a write pass ends with
    a flush.  At least one whole pass is timed."""
    chunk = 1 << 20
    data = bytes(chunk)
    nchunks = region // chunk
    done = 0
    nxt = 0
    deadline = time.monotonic() + secs

    async def worker() -> None:
        nonlocal done, nxt
        while nxt < nchunks or time.monotonic() < deadline:
            i, nxt = nxt, nxt + 1
            off = (i % nchunks) * chunk
            if write:
                await dev.write(off // 512, data)
                if i % nchunks == nchunks - 1:
                    await dev.flush()
            else:
                await dev.read(off // 512, chunk // 512)
            done += 1
    start = time.monotonic()
    async with trio.open_nursery() as nursery:
        for _ in range(depth):
            nursery.start_soon(worker)
    if write:
        await dev.flush()
    return done / (time.monotonic() - start)


async def main(k: Kernel) -> None:
    args = k.cmdline
    persistent = args.get("persistent", "1") == "1"
    async with k.xenstore() as xs:
        base = f"/local/domain/{k.domid}/data/bench"
        async with trio.open_nursery() as nursery:
            dev = await open_vbd(k, xs, nursery, persistent=persistent)
            await xs.write(f"{base}/ready", b"1")

            async def go():
                try:
                    return json.loads((await xs.read(f"{base}/go")).decode() or "null")
                except (OSError, ValueError):
                    return None
            params = await wait_until(xs, [f"{base}/go"], go)
            secs = float(params.get("secs", 2.0))
            region = int(params.get("region_mb", 16)) << 20
            nblocks = region // BLOCK
            # "only": a subset of the figures (profiling one workload); the
            # sequential write always runs first because it fills the region.
            only = set(params.get("only") or ())
            result = {"persistent": persistent}
            result["seqwrite_1m"] = await _seq(dev, True, region, secs)
            jobs = [("seqread_1m", lambda: _seq(dev, False, region, secs)),
                    ("seqwrite_1m_qd4", lambda: _seq(dev, True, region, secs, 4)),
                    ("seqread_1m_qd4", lambda: _seq(dev, False, region, secs, 4))]
            for depth in (1, 32):
                for write in (False, True):
                    name = f"rand{'write' if write else 'read'}_4k_qd{depth}"
                    jobs.append((name, lambda w=write, d=depth: _rand(dev, w, d, secs, nblocks)))
            for name, job in jobs:
                if not only or name in only:
                    result[name] = await job()
            await xs.write(f"{base}/result", json.dumps(result).encode())
            nursery.cancel_scope.cancel()
        await trio.sleep_forever()


def kernel_main(start: dict, fds: dict) -> int:
    return boot(start, fds, main)
