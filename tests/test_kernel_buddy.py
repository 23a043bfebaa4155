"""domains/kernel/buddy.py: runs of pages from a buddy allocator.

Property-checked against a model (every page in at most one allocated run,
the accounting right, everything merging back to whole blocks once freed),
plus the rules a reader of the allocator should be able to rely on.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from domains.kernel.buddy import BuddyAllocator, order_for


def test_order_for():
    assert [order_for(n) for n in (1, 2, 3, 4, 5, 11, 16, 17, 256)] == \
        [0, 1, 2, 2, 3, 4, 4, 5, 8]
    with pytest.raises(ValueError):
        order_for(0)


def test_splits_prefer_low_addresses_and_merge_back():
    b = BuddyAllocator(16, max_order=3)          # two blocks of 8
    assert b.alloc(1) == 0
    assert b.alloc(1) == 1                       # the buddy of the first
    assert b.alloc(2) == 2
    assert b.alloc(8) == 8                       # the untouched block
    assert b.alloc(4) == 4
    assert b.alloc(1) is None and b.free_pages == 0
    for start, n in ((0, 1), (2, 2), (1, 1), (4, 4)):
        b.free(start, n)
    assert b.largest_free() == 8 and b.alloc(8) == 0


def test_bad_frees_and_sizes_are_refused():
    b = BuddyAllocator(8, max_order=3)
    start = b.alloc(3)                           # a block of 4
    with pytest.raises(ValueError):
        b.free(start, 1)                         # wrong size
    b.free(start, 3)
    with pytest.raises(ValueError):
        b.free(start, 3)                         # double free
    with pytest.raises(ValueError):
        b.alloc(9)                               # beyond the largest block
    with pytest.raises(ValueError):
        BuddyAllocator(12, max_order=3)          # not a whole number of blocks


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 32), st.integers(0, 1 << 30)),
                max_size=120))
def test_allocations_never_overlap_and_all_merge_back(ops):
    b = BuddyAllocator(128, max_order=5)
    owner = [None] * 128
    live: list[tuple[int, int]] = []
    for is_alloc, n, pick in ops:
        if is_alloc or not live:
            start = b.alloc(n)
            if start is None:
                # Refused only when no free block of that order is left.
                assert b.largest_free() < (1 << order_for(n))
                continue
            size = 1 << order_for(n)
            assert start % size == 0 and start + size <= 128
            assert all(o is None for o in owner[start:start + size])
            owner[start:start + size] = [start] * size
            live.append((start, n))
        else:
            start, n = live.pop(pick % len(live))
            b.free(start, n)
            size = 1 << order_for(n)
            owner[start:start + size] = [None] * size
        assert b.free_pages == owner.count(None)
    for start, n in live:
        b.free(start, n)
    assert [b.alloc(32) for _ in range(4)] == [0, 32, 64, 96]
