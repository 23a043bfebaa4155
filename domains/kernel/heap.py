"""The domain process's heap: keep large I/O buffers instead of unmapping them.

In Xen a guest kernel's buffers for block and network I/O come from its own
page allocator and are reused request after request.  Here a domain is a
Python process, and its I/O buffers are Python ``bytes``: a 1 MiB read's
result, a write's private copy of its data.  glibc's malloc serves a request
that large with a fresh ``mmap`` and gives it back with ``munmap`` when it is
freed; its dynamic threshold stops doing that after the first free, but the
memory freed at the top of the heap is then trimmed back to the kernel as
soon as more than twice the threshold is free, which a few buffers in flight
reach at once.  Either way the next buffer faults in 256 freshly zeroed pages.
Measured (bench/kernels/blk.py, 1 MiB reads, four in flight): the guest spent
two thirds of its CPU in the kernel doing exactly that, and reached 1.2 GB/s;
with the thresholds below, 6.1 GB/s.

So every domain kernel, before it does anything, raises malloc's mmap
threshold above the largest buffer it makes and its trim threshold above a
queue's worth of them.  The cost is that a domain keeps up to
``TRIM_THRESHOLD`` of freed heap for reuse instead of returning it, bounded
per process.  Nothing here changes what any domain can reach; it is a property
of one process's allocator, like a guest kernel sizing its own slab caches.
"""

from __future__ import annotations

import ctypes

#: Allocations up to this size come from the heap, not a private mmap: the
#: largest buffers are a few MiB (a 1 MiB request's data, a multi-request read).
MMAP_THRESHOLD = 8 << 20
#: Free memory at the top of the heap is given back only beyond this: a queue
#: depth's worth of large buffers stays in the process.
TRIM_THRESHOLD = 32 << 20

_M_TRIM_THRESHOLD = -1     # glibc's <malloc.h> parameter numbers
_M_MMAP_THRESHOLD = -3


def tune() -> bool:
    """Set the thresholds in this process; False where the C library has no
    ``mallopt`` (not glibc), which leaves its defaults: slower, not wrong."""
    try:
        # The process's own symbols, which include the C library's: no
        # ctypes.util.find_library, which runs ldconfig in a subprocess (a
        # stray child and several ms, at every domain's boot).
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) \
        and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
