"""Machine pages: the unit of memory that domains share.

In Xen a domain's memory is a set of 4 KiB machine frames, and the only way one
domain reaches another's memory is through the hypervisor (a grant map or a grant
copy).  Here a frame is a one-page memfd.  Whoever holds the file descriptor can
mmap the page; whoever does not, cannot.  That is the whole isolation argument:
the hypervisor creates every frame, holds every descriptor, and hands a
descriptor for *exactly one page* to a domain only when Xen's rules say it may
have it.

Read-only sharing is enforced by the kernel, not by politeness: a read-only
grant is delivered as a descriptor re-opened with O_RDONLY through /proc, and
mmap(PROT_WRITE, MAP_SHARED) on such a descriptor fails with EACCES.  A domain
that holds it can read the page and nothing else.

Not yet true, and known: every domain process runs as the same user as the
hypervisor (root on these machines).  Such a process can re-open its read-only
descriptor read-write through /proc/self/fd, and can open any frame the
hypervisor holds through /proc/<hypervisor>/fd.  The OS check above holds only
against a domain running as a different, unprivileged user; running domains
under their own uids (or a user namespace), with the hypervisor non-dumpable,
is the process-hardening work of the security wave.  Two expected-failure
tests (tests/test_hypervisor_hostile.py) record the hole until then.

A page lives as long as any descriptor or mapping of it does; this gives Xen's
rule "a mapped page stays alive even when its owner dies" for free.  memfds are
anonymous, so nothing is ever left behind in /dev/shm.
"""

from __future__ import annotations

import mmap
import os

PAGE_SIZE = 4096
PAGE_SHIFT = 12
#: Frames one XENMEM_populate_physmap may create: the hypervisor refuses
#: more, so a kernel that wants more asks in batches.
MAX_POPULATE_BATCH = 512


def new_frame(label: str = "frame", npages: int = 1) -> int:
    """Create a fresh zero-filled frame (or a run of pages) and return its fd."""
    fd = os.memfd_create(f"microxen-{label}", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, npages * PAGE_SIZE)
    except BaseException:
        os.close(fd)
        raise
    return fd


def readonly_fd(fd: int) -> int:
    """Return a new descriptor for the same pages that the kernel lets only read."""
    return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)


def map_frame(fd: int, writable: bool = True, npages: int = 1) -> mmap.mmap:
    """Map a frame into this process.  A read-only map of a read-only fd faults on write."""
    prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
    return mmap.mmap(fd, npages * PAGE_SIZE, mmap.MAP_SHARED, prot)
