"""A domain kernel's shareable pages.

Pages that will be shared (rings, I/O buffers) must be real frames the
hypervisor knows: they come from XENMEM_populate_physmap, one memfd each,
mapped here read-write.  A page is known by its gfn, which is what goes into a
grant entry.  `free` gives frames back (decrease_reservation): the balloon and
a driver tearing down use it.  `alloc_into` places fresh frames in the slots
of a VmArea (domains/kernel/vmap.py) instead, so that a driver's pool of I/O
pages is one contiguous buffer; such frames are the area's, and live as long
as it does.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ipc.page import MAX_POPULATE_BATCH, map_frame

if TYPE_CHECKING:
    from domains.kernel.hypercall import Hypervisor
    from domains.kernel.vmap import VmArea


@dataclass
class Page:
    gfn: int
    map: mmap.mmap

    @property
    def view(self) -> memoryview:
        return memoryview(self.map)


class Memory:
    def __init__(self, hv: "Hypervisor") -> None:
        self.hv = hv
        self.pages: dict[int, Page] = {}
        self.area_pages = 0     # frames living in VmAreas (see alloc_into)

    def adopt(self, gfns: list[int], fds: list[int]) -> list[Page]:
        pages = []
        for gfn, fd in zip(gfns, fds):
            try:
                page = Page(gfn, map_frame(fd))
            finally:
                os.close(fd)   # the mapping keeps the page; the descriptor is not needed
            self.pages[gfn] = page
            pages.append(page)
        return pages

    async def alloc(self, nr: int) -> list[Page]:
        result, fds = await self.hv.call_fds("memory_op", "populate_physmap", nr_extents=nr)
        return self.adopt(result["gfns"], fds)

    async def alloc_into(self, area: "VmArea", slots: list[int]) -> list[int]:
        """Fresh frames in ``slots`` of ``area``; returns their gfns, in order."""
        gfns: list[int] = []
        for lo in range(0, len(slots), MAX_POPULATE_BATCH):
            part = slots[lo:lo + MAX_POPULATE_BATCH]
            result, fds = await self.hv.call_fds("memory_op", "populate_physmap",
                                                 nr_extents=len(part))
            try:
                for slot, fd in zip(part, fds):
                    area.map(slot, fd)
            finally:
                for fd in fds:
                    os.close(fd)   # the mapping keeps the page
            gfns += result["gfns"]
        self.area_pages += len(slots)
        return gfns

    async def free(self, pages: list[Page]) -> None:
        for page in pages:
            self.pages.pop(page.gfn, None)
            page.map.close()
        await self.hv.call("memory_op", "decrease_reservation", gfns=[p.gfn for p in pages])
