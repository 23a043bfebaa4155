"""The block bench guest kernel: fio-like loops through blkfront, on command.

A guest booted with this kernel opens its first vbd (``persistent=0|1`` on its
command line picks the grant mode), then waits for dom0 to write ``go`` to
``data/bench/go``.  It runs, for ``secs`` seconds each: 4 KiB random reads and
writes at queue depth 1 and 32 (4 KiB-aligned offsets in the first
``region_mb`` MiB), then 1 MiB sequential writes (ending with a flush) and
reads of that region, and writes the results as JSON to
``data/bench/result``.  ``go`` may also carry ``"only": [names]`` to run
just those figures (the sequential ones then repeat their pass for ``secs``),
which is how one workload is profiled on its own.  Timing is done inside
the guest, around blkfront's own API: what a guest program sees.
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


async def _seq(dev, write: bool, region: int) -> float:
    chunk = 1 << 20
    data = bytes(chunk)
    start = time.monotonic()
    for off in range(0, region, chunk):
        if write:
            await dev.write(off // 512, data)
        else:
            await dev.read(off // 512, chunk // 512)
    if write:
        await dev.flush()
    return region / (1 << 20) / (time.monotonic() - start)


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
            result["seqwrite_1m"] = await _seq(dev, True, region)
            jobs = [("seqread_1m", lambda: _seq(dev, False, region))]
            for depth in (1, 32):
                for write in (False, True):
                    name = f"rand{'write' if write else 'read'}_4k_qd{depth}"
                    jobs.append((name, lambda w=write, d=depth: _rand(dev, w, d, secs, nblocks)))
            for name, job in jobs:
                if not only or name in only:
                    result[name] = await job()
            for name, write in (("seqwrite_1m", True), ("seqread_1m", False)):
                if name in only:    # profiling: repeat the pass for ``secs``
                    deadline = time.monotonic() + secs
                    while time.monotonic() < deadline:
                        result[name] = await _seq(dev, write, region)
            await xs.write(f"{base}/result", json.dumps(result).encode())
            nursery.cancel_scope.cancel()
        await trio.sleep_forever()


def kernel_main(start: dict, fds: dict) -> int:
    return boot(start, fds, main)
