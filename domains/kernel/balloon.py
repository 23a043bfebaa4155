"""The balloon driver: follow the toolstack's memory target.

`xl mem-set` writes a new target (KiB) to `memory/target`.  The guest's balloon
driver watches it and moves its reservation towards it with
XENMEM_decrease_reservation (give pages back to the host) or
increase_reservation (take more, up to its maximum), then reports what it
achieved.  The hypervisor enforces the limits; the balloon only asks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ipc.channel import HypercallError

if TYPE_CHECKING:
    from domains.kernel.boot import Kernel


async def run(k: "Kernel", xs) -> None:
    node = f"/local/domain/{k.domid}/memory/target"
    async with await xs.watch(node) as watch:
        async for _event in watch:
            try:
                target_pages = int((await xs.read(node)).decode() or 0) // 4
            except (OSError, ValueError):
                continue
            if target_pages <= 0:
                continue
            current = await k.hv.call("memory_op", "current_reservation")
            try:
                if target_pages < current:
                    await k.hv.call("memory_op", "decrease_reservation",
                                    nr_extents=current - target_pages)
                elif target_pages > current:
                    await k.hv.call("memory_op", "increase_reservation",
                                    nr_extents=target_pages - current)
            except HypercallError as exc:
                k.log.warning("balloon: cannot reach %d pages: %s", target_pages, exc.message)
            now = await k.hv.call("memory_op", "current_reservation")
            k.log.info("balloon: target %d KiB, reservation now %d KiB", target_pages * 4, now * 4)
