"""netif_backend's staging reserve: a vif's staging pages are asked of the
hypervisor once, when the vif is probed, and serve every connection after."""

from __future__ import annotations

import trio

from domains.driverdom.netif_backend import StagingReserve


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


def test_connections_reuse_the_pages_reserved_at_probe() -> None:
    async def main() -> None:
        mem = _Memory()
        r = StagingReserve(mem, 64)
        async with trio.open_nursery() as nursery:
            r.start(nursery)
            r.start(nursery)                      # once only
            first = await r.alloc(64)             # waits for the fill, asks nothing more
        assert mem.allocs == [64] and first == list(range(64))
        await r.free(first)                       # the connection closed
        again = await r.alloc(64)
        assert again == first and mem.allocs == [64]
        more = await r.alloc(8)                   # beyond the reserve: the memory as before
        assert mem.allocs == [64, 8] and len(more) == 8
        await r.free(again + more)
        await r.release()
        assert sorted(mem.freed) == list(range(72)) and r.pages == []
    trio.run(main)


def test_a_failed_fill_leaves_connect_to_ask_the_memory_itself() -> None:
    class Refusing(_Memory):
        async def alloc(self, nr: int) -> list:
            if not self.allocs:
                self.allocs.append(-nr)
                raise OSError("ENOMEM")
            return await super().alloc(nr)

    async def main() -> None:
        mem = Refusing()
        r = StagingReserve(mem, 64)
        async with trio.open_nursery() as nursery:
            r.start(nursery)
        assert len(await r.alloc(64)) == 64 and mem.allocs == [-64, 64]
        await r.release()
        assert mem.freed == []
    trio.run(main)


def test_a_reserve_never_started_is_the_memory_itself() -> None:
    async def main() -> None:
        mem = _Memory()
        r = StagingReserve(mem, 64)
        assert len(await r.alloc(64)) == 64 and mem.allocs == [64]
        await r.release()                         # nothing held, nothing waited for
    trio.run(main)
