"""domains/kernel/io_pool.py: a driver's I/O pages, given out in runs.

The frames are real memfds placed in the pool's real VmArea by a stand-in
for the hypervisor's populate_physmap.  Checked: frames are populated the
first time a slot is used and only then; runs are served first come, first
served, so a large request is not starved by small ones; a waiter that is
cancelled leaves the line; a run whose frames cannot be had is given back.
"""

from __future__ import annotations

import itertools
import os

import pytest
import trio

from domains.kernel.io_pool import IoPagePool
from ipc.page import new_frame


class FakeMemory:
    def __init__(self) -> None:
        self.gfns = itertools.count(0x100)
        self.populated: list[list[int]] = []
        self.fail = False

    async def alloc_into(self, area, slots):
        await trio.sleep(0)                      # a hypercall: other tasks run meanwhile
        if self.fail:
            raise OSError(12, "reservation exhausted")
        for slot in slots:
            fd = new_frame("test")
            area.map(slot, fd)
            os.close(fd)
        self.populated.append(list(slots))
        return [next(self.gfns) for _ in slots]


def pool(npages=16, max_run=8):
    mem = FakeMemory()
    return mem, IoPagePool(mem, npages, max_run)


def test_frames_come_on_first_use_only():
    mem, p = pool()

    async def main():
        a = await p.take(3)                      # a block of 4, of which 3 are used
        assert (a, mem.populated) == (0, [[0, 1, 2]])
        p.view(a, 3 * 4096)[:] = b"\1" * 3 * 4096
        p.give(a, 3)
        b = await p.take(4)                      # the same block, one more frame
        assert b == 0 and mem.populated == [[0, 1, 2], [3]]
        assert bytes(p.view(b, 4)) == b"\1" * 4 and p.gfns[:5] == [0x100, 0x101, 0x102, 0x103, 0]
        p.give(b, 4)
    trio.run(main)
    p.area.close()


def test_first_come_first_served():
    mem, p = pool(npages=16, max_run=8)
    order = []

    async def main():
        small = await p.take(4)
        big_ones = [await p.take(8)]             # 4 + 8 of 16: the rest is one block of 4
        async with trio.open_nursery() as nursery:
            async def want(name, n):
                start = await p.take(n)
                order.append(name)
                await trio.sleep(0.01)
                p.give(start, n)
            nursery.start_soon(want, "big", 8)   # waits: no block of 8 is free
            await trio.sleep(0.01)
            nursery.start_soon(want, "small", 2) # would fit, but waits behind "big"
            await trio.sleep(0.01)
            assert order == []                   # "small" did not jump the line
            p.give(big_ones[0], 8)               # now both are served, in order
        p.give(small, 4)
    trio.run(main)
    assert order == ["big", "small"] and p.buddy.free_pages == 16
    p.area.close()


def test_a_cancelled_waiter_leaves_the_line():
    mem, p = pool(npages=8, max_run=8)

    async def main():
        whole = await p.take(8)
        got = []
        async with trio.open_nursery() as nursery:
            scope = trio.CancelScope()

            async def doomed():
                with scope:
                    await p.take(8)

            async def want(n):
                start = await p.take(n)
                got.append(n)
                p.give(start, n)
            nursery.start_soon(doomed)           # first in line ...
            await trio.sleep(0.01)
            nursery.start_soon(want, 8)          # ... this one behind it
            await trio.sleep(0.01)
            scope.cancel()                       # gives up its place in line
            await trio.sleep(0.01)
            p.give(whole, 8)
        assert got == [8] and p.buddy.free_pages == 8
    trio.run(main)
    p.area.close()


def test_a_run_without_frames_is_given_back():
    mem, p = pool()
    mem.fail = True

    async def main():
        with pytest.raises(OSError):
            await p.take(4)
    trio.run(main)
    assert p.buddy.free_pages == 16 and not any(p.area.mapped)
    p.area.close()
