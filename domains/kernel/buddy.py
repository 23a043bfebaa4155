"""A buddy allocator: runs of pages carved out of a fixed pool.

In Xen
    Xen's heap (xen/common/page_alloc.c) and Linux's page allocator hand
    out memory in blocks of 2**order pages.  A free block of order n is
    split into two *buddies* of order n-1 when a smaller one is wanted;
    when a block is freed and its buddy is free too, the two merge back.
    Finding a block is a look at one free list per order, and the buddy of
    the block at ``start`` is simply the one at ``start ^ 2**order``.

Here
    blkfront's I/O pages are one vmapped pool (domains/kernel/vmap.py); a
    request needs a contiguous run of them (so its data is one memcpy and
    its segments one slice of a prebuilt table), and this allocator finds
    the run.  A request of n pages takes the block of the next power of two
    above n (an 11-page request takes 16): that is the price of never
    searching for a fit, and it is paid only in pages that sit idle in the
    pool.  Lower addresses are preferred, so a workload of small requests
    stays packed at the start of the pool and its big blocks stay whole.

Invariant
    Every page of the pool is in exactly one place: in one free block, or
    in one allocated block.  Freeing a block that is not allocated (a
    double free, a wrong size) raises instead of corrupting the lists.
"""

from __future__ import annotations


def order_for(npages: int) -> int:
    """The smallest order whose block holds ``npages`` pages."""
    if npages <= 0:
        raise ValueError(f"a run of {npages} pages")
    return (npages - 1).bit_length()


class BuddyAllocator:
    """Blocks of 2**order pages, up to ``2**max_order``, from ``npages`` pages
    (a multiple of the largest block)."""

    def __init__(self, npages: int, max_order: int) -> None:
        top = 1 << max_order
        if npages <= 0 or npages % top:
            raise ValueError(f"{npages} pages is not a positive multiple of {top}")
        self.npages = npages
        self.max_order = max_order
        #: Free blocks by order, as sets of start pages (min() finds the lowest).
        self._free: list[set[int]] = [set() for _ in range(max_order + 1)]
        self._free[max_order] = set(range(0, npages, top))
        self._allocated: dict[int, int] = {}    # start -> order
        self.free_pages = npages

    def alloc(self, npages: int) -> int | None:
        """The first page of a free run of at least ``npages`` pages, or None
        if no block that large is free (the caller waits for a free)."""
        order = order_for(npages)
        if order > self.max_order:
            raise ValueError(f"{npages} pages is more than the largest block "
                             f"({1 << self.max_order})")
        have = order
        while have <= self.max_order and not self._free[have]:
            have += 1
        if have > self.max_order:
            return None
        start = min(self._free[have])
        self._free[have].discard(start)
        while have > order:                   # split, keeping the upper halves free
            have -= 1
            self._free[have].add(start + (1 << have))
        self._allocated[start] = order
        self.free_pages -= 1 << order
        return start

    def free(self, start: int, npages: int) -> None:
        """Give back the run :meth:`alloc` returned for ``npages`` pages."""
        order = order_for(npages)
        if self._allocated.get(start) != order:
            raise ValueError(f"pages {start}..{start + npages - 1} are not an allocated run "
                             f"of that size")
        del self._allocated[start]
        self.free_pages += 1 << order
        while order < self.max_order:         # merge with a free buddy, as far as it goes
            buddy = start ^ (1 << order)
            if buddy not in self._free[order]:
                break
            self._free[order].discard(buddy)
            start = min(start, buddy)
            order += 1
        self._free[order].add(start)

    def largest_free(self) -> int:
        """Pages in the largest free block (0 if none)."""
        for order in range(self.max_order, -1, -1):
            if self._free[order]:
                return 1 << order
        return 0
