"""memory_op against a real hypervisor: populate, balloon, reservation queries.

Reservations are accounted pages charged against the host; shared frames are
real memfd pages.  The checks: the accounting adds up in physinfo, nobody goes
past their maximum or the host's free memory, and a frame given back while
another domain maps it stays alive for that mapper.
"""

from __future__ import annotations

import errno
import itertools

import pytest

from tests.hvharness import PuppetError

_names = itertools.count()
MIB_PAGES = 256


def guest(h, **extra):
    return h.create(f"mem{next(_names)}", **extra)


def memop(caller, cmd: str, /, **args):
    return caller.hypercall("memory_op", cmd, **args)


def refused(expected_errno: int, fn, /, *args, **kw) -> None:
    with pytest.raises(PuppetError) as info:
        fn(*args, **kw)
    assert info.value.errno == expected_errno, str(info.value)


def free_kb(h) -> int:
    return h.dom0.hypercall("sysctl", "physinfo")["free_memory_kb"]


def test_populate_physmap_hands_the_owner_fresh_zeroed_pages(shared_hv):
    h = shared_hv
    g = guest(h)
    gfns = g.do("alloc", nr=3)
    assert len(set(gfns)) == 3
    assert h.info(g.domid)["shared_pages"] == 3
    for gfn in gfns:
        assert g.do("peek", gfn=gfn, offset=0, len=4096) == bytes(4096)
    g.do("poke", gfn=gfns[0], offset=4090, data=b"edge!!")
    assert g.do("peek", gfn=gfns[0], offset=4090, len=6) == b"edge!!"
    assert g.do("peek", gfn=gfns[1], offset=4090, len=6) == bytes(6)   # separate pages
    for bad in (0, 513, -1, "2", None):
        refused(errno.EINVAL, memop, g, "populate_physmap", nr_extents=bad)
    assert h.info(g.domid)["shared_pages"] == 3


def test_populate_stops_at_the_reservation(shared_hv):
    h = shared_hv
    g = guest(h, memory_mib=0, memory_kb=16)   # a 4-page domain
    assert memop(g, "current_reservation") == 4
    g.do("alloc", nr=3)
    refused(errno.ENOMEM, g.do, "alloc", nr=2)
    g.do("alloc", nr=1)
    refused(errno.ENOMEM, g.do, "alloc", nr=1)
    assert h.info(g.domid)["shared_pages"] == 4


def test_populate_for_another_domain_is_the_builders_job(shared_hv):
    h = shared_hv
    a, b = guest(h), guest(h)
    refused(errno.EPERM, memop, a, "populate_physmap", domid=b.domid, nr_extents=1)
    out = memop(h.dom0, "populate_physmap", domid=b.domid, nr_extents=2)
    assert len(out["gfns"]) == 2 and h.info(b.domid)["shared_pages"] == 2
    refused(errno.ESRCH, memop, h.dom0, "populate_physmap", domid=4000, nr_extents=1)


def test_balloon_down_and_up_within_the_maximum(shared_hv):
    h = shared_hv
    g = guest(h, memory_mib=16)
    start_free = free_kb(h)
    assert memop(g, "current_reservation") == 16 * MIB_PAGES
    assert memop(g, "maximum_reservation") == 16 * MIB_PAGES
    assert memop(g, "decrease_reservation", nr_extents=4 * MIB_PAGES) == {"nr_done": 4 * MIB_PAGES}
    assert memop(g, "current_reservation") == 12 * MIB_PAGES
    assert free_kb(h) == start_free + 4 * 1024
    assert memop(g, "increase_reservation", nr_extents=4 * MIB_PAGES) == {"nr_done": 4 * MIB_PAGES}
    assert free_kb(h) == start_free
    refused(errno.ENOMEM, memop, g, "increase_reservation", nr_extents=1)   # at its maximum
    h.dom0.hypercall("domctl", "setmaxmem", domid=g.domid, max_memory_kb=20 * 1024)
    memop(g, "increase_reservation", nr_extents=4 * MIB_PAGES)
    assert h.info(g.domid)["tot_pages"] == 20 * MIB_PAGES
    assert free_kb(h) == start_free - 4 * 1024
    for bad in (-1, "1", None, True):
        refused(errno.EINVAL, memop, g, "increase_reservation", nr_extents=bad)
        refused(errno.EINVAL, memop, g, "decrease_reservation", nr_extents=bad)
    assert h.info(g.domid)["tot_pages"] == 20 * MIB_PAGES


def test_increase_beyond_host_memory_is_enomem(shared_hv):
    h = shared_hv
    g = guest(h, memory_mib=4)
    h.dom0.hypercall("domctl", "setmaxmem", domid=g.domid, max_memory_kb=1 << 30)
    free_pages = free_kb(h) // 4
    refused(errno.ENOMEM, memop, g, "increase_reservation", nr_extents=free_pages + 1)
    assert h.info(g.domid)["tot_pages"] == 4 * MIB_PAGES
    memop(g, "increase_reservation", nr_extents=free_pages)
    assert free_kb(h) == 0
    refused(errno.ENOMEM, h.dom0.hypercall, "domctl", "createdomain", name="mem-none",
            kernel="tests.kernels.puppet", memory_kb=4)


def test_decrease_cannot_take_shared_frames_away(shared_hv):
    h = shared_hv
    g = guest(h, memory_mib=0, memory_kb=32)   # 8 pages
    g.do("alloc", nr=5)
    refused(errno.EINVAL, memop, g, "decrease_reservation", nr_extents=4)
    memop(g, "decrease_reservation", nr_extents=3)
    assert memop(g, "current_reservation") == 5


def test_giving_back_frames_by_gfn(shared_hv):
    h = shared_hv
    g = guest(h)
    gfns = g.do("alloc", nr=3)
    total = memop(g, "current_reservation")
    g.do("free", gfns=gfns[:2])
    info = h.info(g.domid)
    assert info["shared_pages"] == 1 and info["tot_pages"] == total - 2
    for bad in ([gfns[0]], [gfns[2], gfns[2]], [0x999], "x", [None]):
        refused(errno.EINVAL, memop, g, "decrease_reservation", gfns=bad)
    assert h.info(g.domid)["shared_pages"] == 1
    # a freed frame cannot be granted any more
    other = guest(h)
    ref = g.do("grant", domid=other.domid, gfn=gfns[0])
    with pytest.raises(PuppetError, match="not a page"):
        other.do("map", dom=g.domid, ref=ref)


def test_a_frame_given_back_while_mapped_stays_alive_for_the_mapper(shared_hv):
    h = shared_hv
    a, b = guest(h), guest(h)
    [gfn] = a.do("alloc", nr=1)
    a.do("poke", gfn=gfn, offset=0, data=b"keep me")
    handle = b.do("map", dom=a.domid, ref=a.do("grant", domid=b.domid, gfn=gfn))
    a.do("free", gfns=[gfn])
    assert h.info(a.domid)["shared_pages"] == 0
    assert b.do("map_read", handle=handle, offset=0, len=7) == b"keep me"
    b.do("unmap", handle=handle)


def test_reservation_queries_about_others_need_privilege(shared_hv):
    h = shared_hv
    a, b = guest(h, memory_mib=8), guest(h)
    for cmd in ("current_reservation", "maximum_reservation", "decrease_reservation",
                "increase_reservation"):
        refused(errno.EPERM, memop, a, cmd, domid=b.domid, nr_extents=1)
    assert memop(h.dom0, "current_reservation", domid=a.domid) == 8 * MIB_PAGES
    assert memop(h.dom0, "maximum_reservation", domid=a.domid) == 8 * MIB_PAGES
    memop(h.dom0, "decrease_reservation", domid=a.domid, nr_extents=MIB_PAGES)   # a balloon target
    assert memop(a, "current_reservation") == 7 * MIB_PAGES
    refused(errno.ESRCH, memop, h.dom0, "current_reservation", domid=4000)
