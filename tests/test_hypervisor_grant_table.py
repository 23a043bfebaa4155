"""Grant tables against a real hypervisor: map, unmap, copy, seed, query_size.

The granter writes an entry in its own table; the mapper asks the hypervisor.
Every refusal of public/grant_table.h is tried from a real guest process, and
the lifetime rules are checked with real deaths: a mapped page outlives its
owner, and a dead mapper's mappings are released.
"""

from __future__ import annotations

import errno
import itertools

import pytest

from ipc.grant_abi import (GNTCOPY_dest_gref, GNTCOPY_source_gref, GNTST_bad_copy_arg,
                           GNTST_bad_domain, GNTST_bad_gntref, GNTST_bad_handle, GNTST_bad_page,
                           GNTST_no_device_space, GNTST_okay, GNTST_permission_denied,
                           GTF_permit_access, GTF_reading, GTF_readonly, GTF_writing)
from tests.hvharness import PuppetError, proc_state

_names = itertools.count()


def guest(h, **extra):
    return h.create(f"gt{next(_names)}", **extra)


def gnttab(caller, cmd: str, /, **args):
    return caller.hypercall("grant_table_op", cmd, **args)


def map_refused(status: int, mapper, /, **kw) -> None:
    with pytest.raises(PuppetError) as info:
        mapper.do("map", **kw)
    assert info.value.status == status, str(info.value)


def shared_page(h, data: bytes = b"granted data", readonly: bool = False):
    """a owns a page holding `data` and grants it to b: (a, gfn, ref, b)."""
    a, b = guest(h), guest(h)
    [gfn] = a.do("alloc", nr=1)
    a.do("poke", gfn=gfn, offset=0, data=data)
    ref = a.do("grant", domid=b.domid, gfn=gfn, readonly=readonly)
    return a, gfn, ref, b


def test_map_read_write_shares_one_page_both_ways(shared_hv):
    a, gfn, ref, b = shared_page(shared_hv, b"hello from a")
    handle = b.do("map", dom=a.domid, ref=ref)
    assert b.do("map_read", handle=handle, offset=0, len=12) == b"hello from a"
    b.do("map_write", handle=handle, offset=100, data=b"hello from b")
    assert a.do("peek", gfn=gfn, offset=100, len=12) == b"hello from b"
    assert a.do("gnt_flags", ref=ref) == GTF_permit_access | GTF_reading | GTF_writing
    assert shared_hv.info(b.domid)["grant_mappings"] == 1
    b.do("unmap", handle=handle)
    assert a.do("gnt_flags", ref=ref) == GTF_permit_access
    assert shared_hv.info(b.domid)["grant_mappings"] == 0


def test_end_access_is_refused_while_mapped_and_allowed_after_unmap(shared_hv):
    a, gfn, ref, b = shared_page(shared_hv)
    handle = b.do("map", dom=a.domid, ref=ref)
    assert a.do("end_access", ref=ref) is False
    assert a.do("gnt_flags", ref=ref) & GTF_permit_access   # refused means unchanged
    b.do("unmap", handle=handle)
    assert a.do("end_access", ref=ref) is True
    map_refused(GNTST_permission_denied, b, dom=a.domid, ref=ref)   # access really ended


def test_a_double_end_cannot_hand_one_reference_to_two_users(shared_hv):
    """Ending a reference twice (a driver's clean-up running twice) must not
    put it on the free list twice: two later grants would share it, and a
    backend's cached mapping of one would serve the other's page."""
    a, gfn, ref, b = shared_page(shared_hv)
    assert a.do("end_access", ref=ref) is True
    assert a.do("end_access", ref=ref) is True      # refused, and reported in the log
    first = a.do("grant", domid=b.domid, gfn=gfn)
    second = a.do("grant", domid=b.domid, gfn=gfn)
    assert first != second
    for r in (first, second):
        assert a.do("end_access", ref=r) is True


def test_read_only_grant_maps_read_only_and_refuses_read_write(shared_hv):
    a, gfn, ref, b = shared_page(shared_hv, b"read me", readonly=True)
    map_refused(GNTST_permission_denied, b, dom=a.domid, ref=ref)   # asks for write
    handle = b.do("map", dom=a.domid, ref=ref, readonly=True)
    assert b.do("map_read", handle=handle, offset=0, len=7) == b"read me"
    assert a.do("gnt_flags", ref=ref) == GTF_permit_access | GTF_readonly | GTF_reading
    with pytest.raises(PuppetError):   # mmap is PROT_READ: Python refuses the store
        b.do("map_write", handle=handle, offset=0, data=b"X")
    assert a.do("peek", gfn=gfn, offset=0, len=7) == b"read me"
    b.do("unmap", handle=handle)


def test_a_grant_made_to_another_domain_cannot_be_mapped(shared_hv):
    a, gfn, ref, b = shared_page(shared_hv)
    c = guest(shared_hv)
    map_refused(GNTST_permission_denied, c, dom=a.domid, ref=ref)
    map_refused(GNTST_permission_denied, c, dom=a.domid, ref=ref, readonly=True)
    assert a.do("gnt_flags", ref=ref) == GTF_permit_access   # untouched
    assert shared_hv.info(c.domid)["grant_mappings"] == 0


def test_mapping_with_the_wrong_domid_or_ref_is_refused(shared_hv):
    a, gfn, ref, b = shared_page(shared_hv)
    c = guest(shared_hv)
    map_refused(GNTST_permission_denied, b, dom=c.domid, ref=ref)   # c never granted it
    map_refused(GNTST_permission_denied, b, dom=0, ref=ref)
    map_refused(GNTST_permission_denied, b, dom=b.domid, ref=ref)
    for bad_dom in (4000, -1, "1", None):
        map_refused(GNTST_bad_domain, b, dom=bad_dom, ref=ref)
    for bad_ref in (-1, 1 << 20, "0", 2.5):
        map_refused(GNTST_bad_gntref, b, dom=a.domid, ref=bad_ref)
    # the grant itself still works for the domain it names
    b.do("unmap", handle=b.do("map", dom=a.domid, ref=ref))


def test_a_domain_cannot_grant_a_page_it_does_not_own(shared_hv):
    h = shared_hv
    victim, a, b = guest(h), guest(h), guest(h)
    [vgfn] = victim.do("alloc", nr=1)
    victim.do("poke", gfn=vgfn, offset=0, data=b"victim secret")
    # a has no page at that gfn: gfns are per domain, the entry names a's own space
    a.do("grant_raw", ref=20, flags=GTF_permit_access, domid=b.domid, gfn=vgfn)
    map_refused(GNTST_bad_page, b, dom=a.domid, ref=20)
    a.do("grant_raw", ref=21, flags=GTF_permit_access | GTF_reading | GTF_writing,
         domid=b.domid, gfn=0xFFFFFFFF)
    map_refused(GNTST_bad_page, b, dom=a.domid, ref=21)
    a.do("grant_raw", ref=22, flags=2, domid=b.domid, gfn=vgfn)   # not GTF_permit_access
    map_refused(GNTST_permission_denied, b, dom=a.domid, ref=22)


def test_batched_map_reports_each_op(shared_hv):
    a, gfn, ref, b = shared_page(shared_hv)
    out = gnttab(b, "map_grant_ref", ops=[{"dom": a.domid, "ref": ref},
                                          {"dom": a.domid, "ref": ref + 1},
                                          "not a map"])
    statuses = [r["status"] for r in out["results"]]
    assert statuses[0] == GNTST_okay and statuses[1] == GNTST_permission_denied
    assert statuses[2] < 0
    assert "why" in out["results"][1]
    gnttab(b, "unmap_grant_ref", handles=[out["results"][0]["handle"]])
    for bad in ([], "x", [{}] * 1025, None):
        with pytest.raises(PuppetError) as info:
            gnttab(b, "map_grant_ref", ops=bad)
        assert info.value.errno == errno.EINVAL


def test_unmap_of_an_unknown_handle(shared_hv):
    b = guest(shared_hv)
    assert gnttab(b, "unmap_grant_ref", handles=[12345, -1, "x"])["results"] == [GNTST_bad_handle] * 3
    with pytest.raises(PuppetError) as info:
        gnttab(b, "unmap_grant_ref", handles="all")
    assert info.value.errno == errno.EINVAL


def test_a_full_maptrack_gives_no_device_space(shared_hv):
    h = shared_hv
    a, b = guest(h), guest(h, max_maptrack=2)
    [gfn] = a.do("alloc", nr=1)
    ref = a.do("grant", domid=b.domid, gfn=gfn)
    assert gnttab(b, "query_size")["max_maptrack"] == 2
    handles = [b.do("map", dom=a.domid, ref=ref) for _ in range(2)]
    map_refused(GNTST_no_device_space, b, dom=a.domid, ref=ref)
    b.do("unmap", handle=handles.pop())
    handles.append(b.do("map", dom=a.domid, ref=ref))
    for handle in handles:
        b.do("unmap", handle=handle)
    assert a.do("end_access", ref=ref) is True


def test_query_size_and_running_out_of_grant_references(shared_hv):
    h = shared_hv
    a = guest(h, max_grant_frames=1)
    b = guest(h)
    assert gnttab(a, "query_size") == {"nr_frames": 1, "nr_entries": 512, "max_maptrack": 4096}
    [gfn] = a.do("alloc", nr=1)
    refs = [a.do("grant", domid=b.domid, gfn=gfn) for _ in range(512 - 8)]   # 8 are reserved
    assert min(refs) == 8 and max(refs) == 511
    with pytest.raises(PuppetError, match="in use"):
        a.do("grant", domid=b.domid, gfn=gfn)
    assert b.do("map_read", handle=b.do("map", dom=a.domid, ref=511), offset=0, len=1) == b"\0"
    # an entry beyond the table cannot be named
    map_refused(GNTST_bad_gntref, b, dom=a.domid, ref=512)


def test_grant_copy_moves_data_only_where_grants_allow(shared_hv):
    h = shared_hv
    a, gfn_a, ref, b = shared_page(h, b"0123456789")
    ro_ref = a.do("grant", domid=b.domid, gfn=gfn_a, readonly=True)
    [gfn_b] = b.do("alloc", nr=1)
    b.do("poke", gfn=gfn_b, offset=0, data=b"from b")

    def copy(*ops):
        return gnttab(b, "copy", ops=list(ops))["status"]

    # b's own frame -> a's granted page, and a's granted page -> b's frame
    assert copy({"source": {"gfn": gfn_b, "offset": 0}, "dest": {"domid": a.domid, "ref": ref, "offset": 20},
                 "len": 6, "flags": GNTCOPY_dest_gref},
                {"source": {"domid": a.domid, "ref": ro_ref, "offset": 2}, "dest": {"gfn": gfn_b, "offset": 100},
                 "len": 5, "flags": GNTCOPY_source_gref}) == [GNTST_okay, GNTST_okay]
    assert a.do("peek", gfn=gfn_a, offset=20, len=6) == b"from b"
    assert b.do("peek", gfn=gfn_b, offset=100, len=5) == b"23456"
    # refusals, each reported per op, nothing written
    assert copy(
        {"source": {"gfn": gfn_b}, "dest": {"domid": a.domid, "ref": ro_ref, "offset": 0},
         "len": 4, "flags": GNTCOPY_dest_gref},                                     # read-only grant
        {"source": {"domid": a.domid, "gfn": gfn_a}, "dest": {"gfn": gfn_b}, "len": 4},  # a's plain frame
        {"source": {"gfn": 0x999}, "dest": {"gfn": gfn_b}, "len": 4},               # not b's page
        {"source": {"gfn": gfn_b, "offset": 4000}, "dest": {"gfn": gfn_b}, "len": 200},  # crosses the page
        {"source": {"gfn": gfn_b}, "dest": {"gfn": gfn_b, "offset": 4096}, "len": 1},
        {"source": {"gfn": gfn_b}, "dest": {"gfn": gfn_b}, "len": -1},
        {"source": "x", "dest": {"gfn": gfn_b}, "len": 1},
    ) == [GNTST_permission_denied, GNTST_permission_denied, GNTST_bad_page,
          GNTST_bad_copy_arg, GNTST_bad_copy_arg, GNTST_bad_copy_arg, GNTST_bad_copy_arg]
    assert a.do("peek", gfn=gfn_a, offset=0, len=10) == b"0123456789"
    c = guest(h)
    assert gnttab(c, "copy", ops=[{"source": {"domid": a.domid, "ref": ref}, "dest": {"gfn": 0x100},
                                   "len": 1, "flags": GNTCOPY_source_gref}])["status"] == [GNTST_permission_denied]


def test_seed_lets_dom0_map_a_page_of_a_guest_before_it_boots(shared_hv):
    h = shared_hv
    domid = h.build("gt-seeded")
    [gfn] = h.dom0.hypercall("memory_op", "populate_physmap", domid=domid, nr_extents=1)["gfns"]
    h.dom0.hypercall("grant_table_op", "seed", domid=domid, ref=1, remote_dom=0, gfn=gfn)
    g = h.boot(domid)
    assert gfn in g.start_info["frames"]
    handle = h.dom0.do("map", dom=domid, ref=1)
    h.dom0.do("map_write", handle=handle, offset=0, data=b"xenstore page")
    assert g.do("peek", gfn=gfn, offset=0, len=13) == b"xenstore page"
    h.dom0.do("unmap", handle=handle)
    # only a privileged domain may write another's table
    with pytest.raises(PuppetError) as info:
        gnttab(g, "seed", domid=0, ref=2, remote_dom=domid, gfn=gfn)
    assert info.value.errno == errno.EPERM
    for bad in ({"domid": 4000, "ref": 1, "remote_dom": 0, "gfn": gfn},
                {"domid": domid, "ref": 1 << 20, "remote_dom": 0, "gfn": gfn},
                {"domid": domid, "ref": 1, "remote_dom": "0", "gfn": gfn}):
        with pytest.raises(PuppetError) as info:
            gnttab(h.dom0, "seed", **bad)
        assert info.value.errno in (errno.ESRCH, errno.EINVAL)


@pytest.mark.parametrize("release", ["unmap", "mapper_crash", "mapper_destroyed"])
def test_a_mapped_page_outlives_its_owner(shared_hv, release):
    h = shared_hv
    free_before = h.dom0.hypercall("sysctl", "physinfo")["free_memory_kb"]
    a, gfn, ref, b = shared_page(h, b"still here")
    handle = b.do("map", dom=a.domid, ref=ref)
    pid = h.info(a.domid)["pid"]
    h.destroy(a.domid)
    assert proc_state(pid) in ("X", "Z")
    info = h.domains()[a.domid]
    assert info["state"] == "-----d" and info["pid"] is None
    # the dying domain's memory goes back to the host, except the page still mapped
    assert info["tot_pages"] == 1
    assert h.dom0.hypercall("sysctl", "physinfo")["free_memory_kb"] == \
        free_before - 4 - h.info(b.domid)["tot_pages"] * 4
    assert b.do("map_read", handle=handle, offset=0, len=10) == b"still here"
    b.do("map_write", handle=handle, offset=0, data=b"after death")
    assert b.do("map_read", handle=handle, offset=0, len=11) == b"after death"
    # nobody may make a new mapping of a dying domain's pages
    map_refused(GNTST_bad_domain, b, dom=a.domid, ref=ref)
    assert a.domid in h.domains()
    if release == "unmap":
        b.do("unmap", handle=handle)
    elif release == "mapper_crash":
        with pytest.raises(ConnectionError):
            b.do("crash")
    else:
        h.destroy(b.domid)
    h.wait_gone(a.domid)


def test_a_dead_mappers_mappings_are_released(shared_hv):
    h = shared_hv
    a, gfn, ref, b = shared_page(h)
    b.do("map", dom=a.domid, ref=ref)
    b.do("map", dom=a.domid, ref=ref, readonly=True)
    assert a.do("gnt_flags", ref=ref) == GTF_permit_access | GTF_reading | GTF_writing
    assert a.do("end_access", ref=ref) is False
    with pytest.raises(ConnectionError):
        b.do("crash")
    h.wait_state(b.domid, "c")
    assert a.do("gnt_flags", ref=ref) == GTF_permit_access
    assert a.do("end_access", ref=ref) is True
