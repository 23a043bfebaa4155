"""netback's staging pages: asked of the domain's memory only when a batch
needs them, growing by doubling up to the limit, kept until released."""

from __future__ import annotations

import trio

from domains.driverdom.netback import Staging
from ipc.page import PAGE_SIZE


class _Memory:
    def __init__(self) -> None:
        self.allocs: list[int] = []
        self.freed: list = []
        self.next = 0

    async def alloc(self, nr: int) -> list:
        await trio.sleep(0.01)
        self.allocs.append(nr)
        pages = list(range(self.next, self.next + nr))
        self.next += nr
        return pages

    async def free(self, pages: list) -> None:
        self.freed += pages


def test_pages_are_taken_on_demand_doubling_up_to_the_limit() -> None:
    async def main() -> None:
        mem = _Memory()
        s = Staging(mem, 32, [])
        assert s.pages == [] and s.take(100) is None      # nothing held before a batch
        await s.reserve(1)
        await s.reserve(1)                                # held: asks nothing more
        assert mem.allocs == [1]
        await s.reserve(3)                                # at least what is asked ...
        assert mem.allocs == [1, 2] and len(s.pages) == 3
        await s.reserve(4)                                # ... or twice what is held
        await s.reserve(5)
        assert mem.allocs == [1, 2, 3] and len(s.pages) == 6
        await s.reserve(1000)                             # never past the limit
        assert len(s.pages) == 32 and mem.allocs[-1] == 26
        await s.release()
        assert sorted(mem.freed) == list(range(32)) and s.pages == []
    trio.run(main)


def test_a_batch_bumps_through_the_pages_and_never_crosses_one() -> None:
    async def main() -> None:
        s = Staging(_Memory(), 32, [])
        await s.reserve(2)
        s.reset()
        assert s.take(1400) == (0, 0) and s.take(1400) == (0, 1400)
        assert s.take(1400) == (1, 0)                     # would cross the page: next one
        assert s.take(PAGE_SIZE) is None                  # the batch is full
    trio.run(main)


def test_a_reserve_cancelled_midway_keeps_the_pages_it_was_given() -> None:
    async def main() -> None:
        mem = _Memory()
        s = Staging(mem, 32, [])
        with trio.move_on_after(0.001):
            await s.reserve(4)
        assert len(s.pages) == 4 and mem.allocs == [4]    # not lost to the cancellation
    trio.run(main)
