"""A driver's pool of I/O pages, handed out in contiguous runs.

In Xen
    A frontend moves data through pages of its own that it grants to the
    backend.  Linux's blkfront keeps such pages in a per-ring pool when it
    uses persistent grants, so that the backend maps each one once and the
    steady state costs no grant operation; the data of each request is
    copied into and out of them.

Here
    The pool is one :class:`~domains.kernel.vmap.VmArea` of ``npages``
    slots.  A request takes a contiguous *run* of slots from a buddy
    allocator (domains/kernel/buddy.py), so its data is one memcpy into
    ``view`` and, since slot ``i`` is always the same frame, its grant
    segments can be a slice of a table the driver builds once per
    connection.  Frames are populated (XENMEM_populate_physmap) the first
    time a slot is used, so a guest that only ever does small I/O holds a
    few pages, not the whole pool, and never gives them back: the pool
    lives as long as the device.

Invariant
    A run belongs to one request from :meth:`take` until :meth:`give`.
    Runs are handed out first come, first served: once one request waits,
    later ones queue behind it even if a smaller run is free, so a large
    request cannot be starved by a stream of small ones (in-flight runs
    finish, merge back, and the waiter gets its block).
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING

import trio

from domains.kernel.buddy import BuddyAllocator, order_for
from domains.kernel.vmap import VmArea
from ipc.page import PAGE_SIZE

if TYPE_CHECKING:
    from domains.kernel.memory import Memory


class _Waiter:
    __slots__ = ("npages", "start", "ready")

    def __init__(self, npages: int) -> None:
        self.npages = npages
        self.start = -1
        self.ready = trio.Event()


class IoPagePool:
    """``npages`` I/O pages in one area, given out in runs of up to ``max_run``."""

    def __init__(self, memory: "Memory", npages: int, max_run: int) -> None:
        self.memory = memory
        self.npages = npages
        self.area = VmArea(npages)
        self.buddy = BuddyAllocator(npages, order_for(max_run))
        #: The frame in each slot (0 until populated): what a grant names.
        self.gfns = [0] * npages
        self._waiters: collections.deque[_Waiter] = collections.deque()

    async def take(self, npages: int) -> int:
        """The first slot of a run of ``npages`` populated pages, waiting
        (in line) until one is free."""
        start = None if self._waiters else self.buddy.alloc(npages)
        if start is None:
            start = await self._wait(npages)
        try:
            if self.area.mapped.find(0, start, start + npages) >= 0:
                missing = [s for s in range(start, start + npages) if not self.area.mapped[s]]
                for slot, gfn in zip(missing, await self.memory.alloc_into(self.area, missing)):
                    self.gfns[slot] = gfn
        except BaseException:
            self.give(start, npages)
            raise
        return start

    async def _wait(self, npages: int) -> int:
        waiter = _Waiter(npages)
        self._waiters.append(waiter)
        try:
            await waiter.ready.wait()
        except BaseException:
            if waiter.start >= 0:           # handed a run just as we were cancelled
                self.give(waiter.start, npages)
            else:
                self._waiters.remove(waiter)
                self._serve_waiters()       # those behind us may fit now
            raise
        return waiter.start

    def give(self, start: int, npages: int) -> None:
        """Return a run :meth:`take` handed out."""
        self.buddy.free(start, npages)
        self._serve_waiters()

    def _serve_waiters(self) -> None:
        while self._waiters:
            start = self.buddy.alloc(self._waiters[0].npages)
            if start is None:
                return
            waiter = self._waiters.popleft()
            waiter.start = start
            waiter.ready.set()

    def view(self, start: int, nbytes: int) -> memoryview:
        """``nbytes`` from the start of slot ``start`` (a view into the pool)."""
        off = start * PAGE_SIZE
        return self.area.view[off:off + nbytes]
