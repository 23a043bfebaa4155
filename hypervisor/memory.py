"""Memory: the host's pages, each domain's reservation, and the frames behind them.

Xen accounts every page of the machine to exactly one owner.  A domain has a
*reservation* (`tot_pages`, bounded by `max_pages`) and grows or shrinks it with
XENMEM_increase_reservation / decrease_reservation: that is ballooning.  The
toolstack fills a new domain's memory with XENMEM_populate_physmap.

Here the reservation is an accounted number of 4 KiB pages, charged against a
configured host memory size, so asking for more than the host has fails with
ENOMEM and leaves nothing half-made.  The pages a domain *shares* (rings, I/O
buffers, its xenstore and console pages) are real: each is a one-page memfd
(see ipc/page.py), created here and known by a guest frame number (gfn).  A
domain's process heap is its own business and is not modelled page by page.

Invariant: a frame belongs to one domain.  Its descriptor is held by the
hypervisor and handed out only to its owner or, through a grant, to a domain the
owner named.  A frame is never recycled for another domain; when its owner
frees it and no foreign mapping holds it, its descriptor is closed and the
kernel frees the page.
"""

from __future__ import annotations

import errno
import mmap
import os
from dataclasses import dataclass, field

from ipc.channel import HypercallError
from ipc.page import MAX_POPULATE_BATCH, PAGE_SIZE, map_frame, new_frame


@dataclass
class Frame:
    owner: int
    gfn: int
    fd: int
    foreign_maps: int = 0     # grant mappings held by other domains
    released: bool = False    # the owner gave it back (or died); close when unmapped
    _view: mmap.mmap | None = None

    def view(self) -> mmap.mmap:
        """The hypervisor's own mapping, made on first use (grant copy)."""
        if self._view is None:
            self._view = map_frame(self.fd)
        return self._view

    def close(self) -> None:
        if self._view is not None:
            self._view.close()
            self._view = None
        os.close(self.fd)
        self.fd = -1


@dataclass
class DomainMemory:
    max_pages: int
    tot_pages: int
    frames: dict[int, Frame] = field(default_factory=dict)
    next_gfn: int = 0x100     # gfns below are left for the builder's special pages


class HostMemory:
    """The machine: total pages, and who holds how many."""

    def __init__(self, total_mib: int) -> None:
        self.total_pages = total_mib * 256
        self.domains: dict[int, DomainMemory] = {}

    @property
    def free_pages(self) -> int:
        return self.total_pages - sum(m.tot_pages for m in self.domains.values())

    def reserve(self, domid: int, pages: int, max_pages: int) -> DomainMemory:
        if pages <= 0:
            raise HypercallError(errno.EINVAL, "a domain needs a positive amount of memory")
        if pages > self.free_pages:
            raise HypercallError(
                errno.ENOMEM,
                f"host has {self.free_pages // 256} MiB free, domain asks for {pages // 256} MiB")
        mem = DomainMemory(max_pages=max(max_pages, pages), tot_pages=pages)
        self.domains[domid] = mem
        return mem

    def set_reservation(self, domid: int, pages: int) -> None:
        mem = self.domains[domid]
        if pages < len(mem.frames):
            raise HypercallError(
                errno.EBUSY,
                f"domain {domid} has {len(mem.frames)} pages populated; release them first")
        if pages > mem.max_pages:
            raise HypercallError(
                errno.ENOMEM, f"domain {domid} maximum is {mem.max_pages // 256} MiB")
        if pages - mem.tot_pages > self.free_pages:
            raise HypercallError(errno.ENOMEM, f"host has {self.free_pages // 256} MiB free")
        mem.tot_pages = pages

    def populate(self, domid: int, nr: int) -> list[Frame]:
        """Create `nr` frames for `domid` inside its reservation."""
        mem = self.domains[domid]
        if not 0 < nr <= MAX_POPULATE_BATCH:
            raise HypercallError(errno.EINVAL, f"populate between 1 and {MAX_POPULATE_BATCH} pages")
        if len(mem.frames) + nr > mem.tot_pages:
            raise HypercallError(
                errno.ENOMEM,
                f"domain {domid} reservation is {mem.tot_pages} pages, "
                f"{len(mem.frames)} in use, {nr} more asked")
        made: list[Frame] = []
        try:
            for _ in range(nr):
                fd = new_frame(f"d{domid}")
                frame = Frame(owner=domid, gfn=mem.next_gfn, fd=fd)
                mem.next_gfn += 1
                made.append(frame)
        except OSError as exc:
            for frame in made:
                frame.close()
            raise HypercallError(errno.ENOMEM, f"host could not allocate a page: {exc}") from None
        for frame in made:
            mem.frames[frame.gfn] = frame
        return made

    def release(self, domid: int, gfn: int) -> None:
        """The owner gives a frame back; it is freed once nobody maps it."""
        frame = self.domains[domid].frames.pop(gfn, None)
        if frame is None:
            raise HypercallError(errno.EINVAL, f"gfn {gfn:#x} is not populated in domain {domid}")
        frame.released = True
        if frame.foreign_maps == 0:
            frame.close()

    def lookup(self, domid: int, gfn: int) -> Frame | None:
        mem = self.domains.get(domid)
        return None if mem is None else mem.frames.get(gfn)

    def release_all(self, domid: int) -> list[Frame]:
        """A dying domain's frames: close the unmapped ones, return those still mapped."""
        mem = self.domains.get(domid)
        if mem is None:
            return []
        held = []
        for frame in mem.frames.values():
            frame.released = True
            if frame.foreign_maps:
                held.append(frame)
            else:
                frame.close()
        mem.frames.clear()
        mem.tot_pages = len(held)   # only pages still mapped elsewhere stay charged to the host
        return held

    def forget(self, domid: int) -> None:
        self.domains.pop(domid, None)


def page_bounds_ok(offset: int, length: int) -> bool:
    return 0 <= offset and 0 <= length and offset + length <= PAGE_SIZE


# --- memory_op hypercalls (xen/common/memory.c) -------------------------------

def _target(hv, caller, args: dict, what: str) -> int:
    domid = args.get("domid", caller.domid)
    if domid != caller.domid:
        hv.policy.require_privileged(caller, f"memory_op {what} for another domain")
    dom = hv.domains.get(domid) if isinstance(domid, int) else None
    if dom is None or not dom.alive:
        raise HypercallError(errno.ESRCH, f"{what}: no domain {domid!r}")
    return domid


def _count(args: dict) -> int:
    nr = args.get("nr_extents")
    if not isinstance(nr, int) or isinstance(nr, bool) or nr < 0:
        raise HypercallError(errno.EINVAL, f"nr_extents must be a non-negative integer, got {nr!r}")
    return nr


def populate_physmap(hv, caller, args):
    """Create frames in a domain's reservation; the owner gets their descriptors."""
    from hypervisor.broker import WithFds
    domid = _target(hv, caller, args, "populate_physmap")
    frames = hv.memory.populate(domid, _count(args))
    gfns = [f.gfn for f in frames]
    if domid != caller.domid:
        return {"gfns": gfns}   # the builder fills a guest; it does not map the pages itself
    return WithFds({"gfns": gfns}, [f.fd for f in frames])


def decrease_reservation(hv, caller, args) -> dict:
    """Give pages back: the listed frames, or `nr_extents` unshared pages (ballooning)."""
    domid = _target(hv, caller, args, "decrease_reservation")
    mem = hv.memory.domains[domid]
    gfns = args.get("gfns")
    if gfns is not None:
        if not isinstance(gfns, list) or not all(isinstance(g, int) and g in mem.frames for g in gfns) \
                or len(set(gfns)) != len(gfns):
            raise HypercallError(errno.EINVAL, "gfns must list distinct populated frames")
        for gfn in gfns:
            hv.memory.release(domid, gfn)
        mem.tot_pages -= len(gfns)
        return {"nr_done": len(gfns)}
    nr = _count(args)
    if mem.tot_pages - nr < max(len(mem.frames), 1):
        raise HypercallError(errno.EINVAL, f"cannot release {nr} pages: "
                                           f"{len(mem.frames)} of {mem.tot_pages} are shared frames")
    mem.tot_pages -= nr
    return {"nr_done": nr}


def increase_reservation(hv, caller, args) -> dict:
    domid = _target(hv, caller, args, "increase_reservation")
    mem = hv.memory.domains[domid]
    hv.memory.set_reservation(domid, mem.tot_pages + _count(args))
    return {"nr_done": args["nr_extents"]}


def current_reservation(hv, caller, args) -> int:
    return hv.memory.domains[_target(hv, caller, args, "current_reservation")].tot_pages


def maximum_reservation(hv, caller, args) -> int:
    return hv.memory.domains[_target(hv, caller, args, "maximum_reservation")].max_pages


OPS = {
    "populate_physmap": populate_physmap,
    "decrease_reservation": decrease_reservation,
    "increase_reservation": increase_reservation,
    "current_reservation": current_reservation,
    "maximum_reservation": maximum_reservation,
}
