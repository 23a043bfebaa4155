"""The ``disk`` guest workload: write, read back, and check every acknowledged write.

What it is for
    Fault injection is only worth something with a checker (Jepsen's lesson):
    this workload keeps, for every 4 KiB block it has written, the version of
    the block's last *acknowledged* write, and checks every read against it.
    Each block's content is a pure function of (domain, block, version), with
    the block number and version in a header, so a read that returns stale,
    misplaced or torn data is caught and named.

What it does
    ``workers`` tasks (default 8, so 8 requests in flight) each own the blocks
    b with ``b % workers == i`` (no two in-flight writes overlap, so the
    expected content of every block is always known).  Each step writes the
    next version of a random block or reads one back and verifies it; every
    ``flush_every`` writes one worker issues a flush.  After every reconnect
    of the frontend (its backend was restarted) one sweep re-reads and checks
    *every* block written so far.  Counters go to
    ``/local/domain/<id>/data/workload/``: ops, errors, verify_failures,
    reconnects, replayed, sweeps, blocks_written, and ``recovered_at`` (wall
    clock of the first completed I/O after the latest reconnect, for the
    recovery-time benchmark).

Command line (``extra``): ``workload=disk disk_blocks=N disk_workers=N``.
Run as part of a combined workload (``disk+net``) its counters are prefixed
``disk_`` (see workloads.py).
"""

from __future__ import annotations

import hashlib
import random
import struct
import time

import trio

from domains.domu.blkfront import BlockIOError, open_vbd

BLOCK = 4096
SECTORS_PER_BLOCK = BLOCK // 512
_HEADER = struct.Struct("<8sIIQ")      # magic, domid, block, version
MAGIC = b"mxdisk01"


def block_content(domid: int, block: int, version: int) -> bytes:
    head = _HEADER.pack(MAGIC, domid, block, version)
    seed = hashlib.blake2b(head, digest_size=64).digest()
    body = (seed * (BLOCK // len(seed) + 1))[:BLOCK - len(head)]
    return head + body


def describe(data: bytes) -> str:
    if data == bytes(len(data)):
        return "zeros"
    try:
        magic, domid, block, version = _HEADER.unpack_from(data)
    except struct.error:
        return "short read"
    if magic != MAGIC:
        return "garbage"
    return f"block {block} version {version} of d{domid}"


class DiskChecker:
    """The model: for every block, the last acknowledged version and the
    newest version whose write has been issued.

    A read overlaps whatever writes were in flight while it was: it must
    return, byte for byte, a version no older than the one acknowledged when
    the read was *issued* and no newer than the newest write issued before it
    *completed* - or one whose write *failed*: a write answered with an error
    is indeterminate (as on a real disk, it may or may not have reached the
    medium), so both outcomes are legal until the block is written again.
    Anything older is a lost write; anything else is corruption.
    """

    def __init__(self, domid: int) -> None:
        self.domid = domid
        self.acked: dict[int, int] = {}
        self.issued: dict[int, int] = {}    # block -> newest version sent to the disk
        self.indeterminate: dict[int, int] = {}   # block -> version of a failed write
        self.failures: list[str] = []
        #: block -> (time.monotonic(), blkfront reconnects) of its last ack: a
        #: failure report says how long ago, and across which reconnections.
        self.acked_when: dict[int, tuple[float, int]] = {}

    def expected(self, block: int) -> bytes | None:
        v = self.acked.get(block)
        return None if v is None else block_content(self.domid, block, v)

    def check(self, block: int, data: bytes, since: int | None = None) -> bool:
        """Is ``data`` a legal result of a read of ``block`` issued when
        ``since`` was its acknowledged version (default: now)?"""
        low = self.acked.get(block) if since is None else since
        if low is None:
            return True      # nothing acknowledged yet when the read was issued
        try:
            magic, domid, blk, version = _HEADER.unpack_from(data)
        except struct.error:
            version = -1
        if low <= version <= self.issued.get(block, low) and \
                data == block_content(self.domid, block, version):
            return True      # the acknowledged version, or a write that overlapped the read
        failed = self.indeterminate.get(block)
        if failed is not None and data == block_content(self.domid, block, failed):
            return True      # a write that failed did land after all: allowed
        high = self.issued.get(block, low)
        self.failures.append(f"block {block}: expected version {low}"
                             f"{f'..{high}' if high > low else ''}, read {describe(data)}")
        return False


async def run(k, xs, console, prefix: str = "") -> None:
    args = k.cmdline
    nblocks = int(args.get("disk_blocks", 1024))
    nworkers = max(1, int(args.get("disk_workers", 8)))
    flush_every = int(args.get("disk_flush_every", 64))
    base = f"/local/domain/{k.domid}/data/workload"
    counters = {"ops": 0, "errors": 0, "verify_failures": 0, "reconnects": 0, "replayed": 0,
                "sweeps": 0, "blocks_written": 0}
    checker = DiskChecker(k.domid)
    async with trio.open_nursery() as nursery:
        dev = await open_vbd(k, xs, nursery)
        nblocks = min(nblocks, dev.sectors // SECTORS_PER_BLOCK)
        await console.write(f"{k.name}: disk workload on {dev.dev.nodename}: {dev.sectors} sectors, "
                            f"{nblocks} blocks, {nworkers} workers\n")
        seen_reconnects = 0
        want_sweep, sweep_requests = trio.open_memory_channel(1)
        writes = 0

        async def completed() -> None:
            nonlocal seen_reconnects
            counters["ops"] += 1
            r = dev.stats["reconnects"]
            if r > seen_reconnects:
                seen_reconnects = r
                await xs.write(f"{base}/{prefix}recovered_at", repr(time.time()).encode())
                try:
                    want_sweep.send_nowait(r)
                except trio.WouldBlock:
                    pass        # a sweep is already due

        async def worker(i: int) -> None:
            nonlocal writes
            rng = random.Random(k.domid * 1000 + i)
            mine = list(range(i, nblocks, nworkers))
            if not mine:
                return
            while True:
                block = rng.choice(mine)
                try:
                    if block not in checker.acked or rng.random() < 0.5:
                        version = checker.acked.get(block, 0) + 1
                        checker.issued[block] = max(version, checker.issued.get(block, 0))
                        try:
                            await dev.write(block * SECTORS_PER_BLOCK,
                                            block_content(k.domid, block, version))
                            checker.acked[block] = version
                            checker.acked_when[block] = (time.monotonic(), dev.stats["reconnects"])
                            checker.indeterminate.pop(block, None)
                        except BlockIOError:
                            checker.indeterminate[block] = version
                            raise
                        writes += 1
                        if writes % flush_every == 0:
                            await dev.flush()
                    else:
                        since = checker.acked.get(block)
                        data = await dev.read(block * SECTORS_PER_BLOCK, SECTORS_PER_BLOCK)
                        if not checker.check(block, data, since):
                            counters["verify_failures"] += 1
                            await console.write(f"VERIFY FAILURE {checker.failures[-1]}"
                                                f"{await evidence(block)}\n")
                except BlockIOError as exc:
                    counters["errors"] += 1
                    await console.write(f"disk error: {exc}\n")
                    await trio.sleep(0.1)
                await completed()

        async def evidence(block: int) -> str:
            """What a failure report adds: when the block was acknowledged, and
            what a second read finds (the same again: the disk has it; the
            right version: the first read was stale)."""
            when, at = checker.acked_when.get(block, (time.monotonic(), 0))
            try:
                again = describe(await dev.read(block * SECTORS_PER_BLOCK, SECTORS_PER_BLOCK))
            except BlockIOError as exc:
                again = f"error {exc}"
            return (f" | acked {time.monotonic() - when:.3f} s ago, at reconnect {at} "
                    f"(now {dev.stats['reconnects']}); read again: {again}; "
                    f"requests: {dev.history(block * SECTORS_PER_BLOCK)}")

        async def sweeper() -> None:
            async for _ in sweep_requests:
                await sweep()

        async def sweep() -> None:
            for block in sorted(checker.acked):
                version = checker.acked[block]
                try:
                    data = await dev.read(block * SECTORS_PER_BLOCK, SECTORS_PER_BLOCK)
                except BlockIOError:
                    counters["errors"] += 1
                    continue
                # Workers go on writing while we read: see DiskChecker.check.
                if not checker.check(block, data, since=version):
                    counters["verify_failures"] += 1
                    await console.write(f"VERIFY FAILURE (sweep) {checker.failures[-1]}"
                                        f"{await evidence(block)}\n")
            counters["sweeps"] += 1

        async def publisher() -> None:
            while True:
                counters["reconnects"] = dev.stats["reconnects"]
                counters["replayed"] = dev.stats["replayed"]
                counters["blocks_written"] = len(checker.acked)
                for key, value in counters.items():
                    await xs.write(f"{base}/{prefix}{key}", str(value).encode())
                await trio.sleep(0.5)

        async def sweep_on_request() -> None:
            # `xl xenstore-write /local/domain/<id>/data/workload/sweep 1` asks for a full check.
            node = f"{base}/sweep"
            await xs.write(node, b"")
            async with await xs.watch(node) as w:
                async for _ in w:
                    try:
                        if (await xs.read(node)).strip() not in (b"", b"0"):
                            await sweep()
                            await xs.write(node, b"")
                            await xs.write(f"{base}/sweeps", str(counters["sweeps"]).encode())
                    except OSError:
                        pass

        nursery.start_soon(publisher)
        nursery.start_soon(sweep_on_request)
        nursery.start_soon(sweeper)
        for i in range(nworkers):
            nursery.start_soon(worker, i)
