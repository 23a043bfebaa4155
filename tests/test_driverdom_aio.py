"""Linux AIO as the O_DIRECT block backend uses it (domains/driverdom/aio.py).

Real kernel AIO on a real O_DIRECT file: transfers complete with the right
bytes, many at once; a bad descriptor is an OSError for that transfer only;
io_destroy leaves nothing behind.
"""

from __future__ import annotations

import mmap
import os
import struct

import pytest
import trio

from domains.driverdom import aio

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def direct_file(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(1 << 20))
    fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    yield path, fd
    os.close(fd)


def test_transfers_read_and_write_many_at_once(direct_file):
    path, fd = direct_file
    ctx = aio.open_context(32)
    assert ctx is not None
    bufs = [mmap.mmap(-1, 8192) for _ in range(32)]
    for i, b in enumerate(bufs):
        b[:] = bytes([i]) * 8192

    async def main():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ctx.run)

            async def one(i: int, is_read: bool) -> None:
                v = memoryview(bufs[i])
                halves = [aio.Pin(v[:4096]), aio.Pin(v[4096:])]
                try:
                    got = await ctx.transfer(fd, b"".join(p.iovec for p in halves),
                                             i * 8192, is_read)
                finally:
                    for p in halves:
                        p.release()
                    v.release()
                assert got == 8192
            async with trio.open_nursery() as inner:
                for i in range(32):
                    inner.start_soon(one, i, False)
            assert ctx.outstanding() == 0
            for b in bufs:
                b[:] = bytes(8192)
            async with trio.open_nursery() as inner:
                for i in range(32):
                    inner.start_soon(one, i, True)
            nursery.cancel_scope.cancel()
    trio.run(main)
    ctx.close()
    data = path.read_bytes()
    for i, b in enumerate(bufs):
        assert bytes(b) == bytes([i]) * 8192 == data[i * 8192:(i + 1) * 8192]


def test_a_failed_transfer_is_an_error_for_its_caller_only(direct_file):
    _path, fd = direct_file
    ctx = aio.open_context(4)
    buf = mmap.mmap(-1, 4096)
    pin = aio.Pin(buf)

    async def main():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ctx.run)
            with pytest.raises(OSError):            # not a descriptor: io_submit refuses
                await ctx.transfer(999999, pin.iovec, 0, True)
            with pytest.raises(OSError):            # misaligned for O_DIRECT: EINVAL
                await ctx.transfer(fd, struct.pack("QQ", pin.addr + 1, 511), 0, True)
            assert await ctx.transfer(fd, pin.iovec, 0, True) == 4096
            nursery.cancel_scope.cancel()
    trio.run(main)
    ctx.close()
    pin.release()
    buf.close()         # the pin is gone, so the buffer can close
    assert ctx.outstanding() == 0


def test_a_plugged_batch_goes_in_one_io_submit_at_unplug(direct_file, monkeypatch):
    """While plugged, submit() queues without waking the context's task;
    unplug() hands the whole batch to the kernel at once, in one call."""
    path, fd = direct_file
    ctx = aio.open_context(8)
    bufs = [mmap.mmap(-1, 4096) for _ in range(4)]
    pins = [aio.Pin(b) for b in bufs]
    calls = []
    real = ctx._submit_batch
    monkeypatch.setattr(ctx, "_submit_batch", lambda batch: (calls.append(len(batch)),
                                                             real(batch)))
    results = []

    async def main():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ctx.run)
            await trio.sleep(0.01)
            ctx.plug()
            for i, pin in enumerate(pins):
                ctx.submit(fd, pin.iovec, i * 4096, True, results.append)
            await trio.sleep(0.05)               # the context's task ran meanwhile
            assert calls == [] and ctx.outstanding() == 4
            ctx.unplug()
            assert calls == [4]
            with trio.fail_after(10):
                while len(results) < 4:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    trio.run(main)
    ctx.close()
    assert results == [4096] * 4
    assert [bytes(b) for b in bufs] == [path.read_bytes()[i * 4096:(i + 1) * 4096]
                                        for i in range(4)]
    for pin in pins:
        pin.release()
