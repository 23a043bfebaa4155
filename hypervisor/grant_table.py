"""Grant tables: how one domain lets another touch one of its pages
(public/grant_table.h, version 1; docs/misc/grant-tables.txt).

The granting domain writes an entry in its own grant table: "domain D may map
(or only read) my frame F".  It then passes the entry's index, the *grant
reference*, to D through XenStore or a ring.  D asks the hypervisor to map
(granter, ref); the hypervisor reads the entry, checks that it names D, and if
so gives D that frame and nothing else.  The granter never hands out a frame
number that D could use by itself.

Here a "mapping" is the frame's descriptor sent to D over its page-descriptor
socket (a read-only descriptor for a read-only grant, so the kernel refuses a
writable mmap).  The hypervisor records every mapping in D's *maptrack* table
and sets GTF_reading/GTF_writing in the granter's entry while any mapping
exists, so the granter can see that it must not end access yet.

GNTTABOP_copy is the other way to move data: the hypervisor copies between two
pages (either side a grant or the caller's own frame) with its own mappings.
No page descriptor leaves the hypervisor.

Invariants:
- a map or copy succeeds only if the granter's entry permits the caller, and
  only with the access (read or write) the entry allows;
- a page stays alive while mapped, even after its owner dies (the owner's
  record stays "dying" until the last mapping goes);
- when a mapper dies, all its mappings are released and the granters' status
  flags cleared;
- the mapper's maptrack table is bounded; exhausting it gives
  GNTST_no_device_space, never an unbounded structure.

Where this differs from Xen: the hypervisor cannot tear a mapping out of
another process's address space.  An unmap is the mapper's promise to munmap;
a mapper that lies keeps read access to exactly that one page of a granter that
trusted it, and the frame is never reused for anyone else.
"""

from __future__ import annotations

import errno
import mmap
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ipc.channel import HypercallError
from ipc.grant_abi import (GNTCOPY_dest_gref, GNTCOPY_source_gref, GNTST_bad_copy_arg,
                           GNTST_bad_domain, GNTST_bad_gntref, GNTST_bad_handle,
                           GNTST_bad_page, GNTST_general_error, GNTST_no_device_space,
                           GNTST_okay, GNTST_permission_denied, GRANT_ENTRY,
                           GRANT_ENTRY_SIZE, GTF_permit_access, GTF_reading,
                           GTF_readonly, GTF_type_mask, GTF_writing)
from ipc.page import PAGE_SIZE, map_frame, new_frame, readonly_fd

if TYPE_CHECKING:
    from hypervisor.broker import Hypervisor
    from hypervisor.domain import Domain
    from hypervisor.memory import Frame

DEFAULT_MAPTRACK = 4096
MAX_BATCH = 1024


@dataclass
class MapTrack:
    granter: int
    ref: int
    frame: "Frame"
    readonly: bool


@dataclass
class GrantTable:
    nr_frames: int
    fd: int
    view: mmap.mmap
    max_maptrack: int = DEFAULT_MAPTRACK
    maptrack: dict[int, MapTrack] = field(default_factory=dict)   # mappings this domain holds
    busy: dict[int, list[int]] = field(default_factory=dict)      # ref -> [readers, writers] of our entries
    next_handle: int = 1

    @property
    def nr_entries(self) -> int:
        return self.nr_frames * PAGE_SIZE // GRANT_ENTRY_SIZE

    @classmethod
    def create(cls, domid: int, nr_frames: int, max_maptrack: int) -> "GrantTable":
        fd = new_frame(f"gnttab-d{domid}", nr_frames)
        return cls(nr_frames, fd, map_frame(fd, npages=nr_frames), max_maptrack)

    def entry(self, ref: int) -> tuple[int, int, int]:
        return GRANT_ENTRY.unpack_from(self.view, ref * GRANT_ENTRY_SIZE)

    def set_status(self, ref: int) -> None:
        """Reflect our mappings in the entry's GTF_reading / GTF_writing bits."""
        readers, writers = self.busy.get(ref, (0, 0))
        off = ref * GRANT_ENTRY_SIZE
        flags = self.view[off] & ~(GTF_reading | GTF_writing)
        if readers or writers:
            flags |= GTF_reading
        if writers:
            flags |= GTF_writing
        self.view[off] = flags

    def close(self) -> None:
        self.view.close()
        os.close(self.fd)


class _Refused(Exception):
    def __init__(self, status: int, why: str) -> None:
        self.status, self.why = status, why


def _check_entry(hv: "Hypervisor", caller: "Domain", granter_id: Any, ref: Any,
                 write: bool) -> tuple["Domain", GrantTable, "Frame"]:
    """Find the frame behind (granter, ref) if the entry lets `caller` in."""
    granter = hv.domains.get(granter_id) if isinstance(granter_id, int) else None
    if granter is None or granter.dying or granter_id not in hv.grants:
        raise _Refused(GNTST_bad_domain, f"no domain {granter_id!r}")
    table = hv.grants[granter_id]
    if not isinstance(ref, int) or not 0 <= ref < table.nr_entries:
        raise _Refused(GNTST_bad_gntref, f"grant ref {ref!r} out of range")
    flags, domid, gfn = table.entry(ref)
    if flags & GTF_type_mask != GTF_permit_access or domid != caller.domid:
        raise _Refused(GNTST_permission_denied,
                       f"grant {granter_id}:{ref} is not granted to domain {caller.domid}")
    if write and flags & GTF_readonly:
        raise _Refused(GNTST_permission_denied, f"grant {granter_id}:{ref} is read-only")
    frame = hv.memory.lookup(granter_id, gfn)
    if frame is None:
        raise _Refused(GNTST_bad_page, f"grant {granter_id}:{ref} names gfn {gfn:#x}, not a page of it")
    return granter, table, frame


def map_grant_ref(hv: "Hypervisor", caller: "Domain", args: dict):
    """Batched map: args {"ops": [{"dom", "ref", "readonly"}]}.

    Returns per-op {"status", "handle"} and, alongside, one page descriptor per
    successful op, in order.
    """
    from hypervisor.broker import WithFds
    ops = _batch(args)
    mine = hv.grants[caller.domid]
    results, fds, temporary = [], [], []
    for op in ops:
        readonly = bool(op.get("readonly", False)) if isinstance(op, dict) else False
        try:
            if not isinstance(op, dict):
                raise _Refused(GNTST_general_error, "each op must be a map")
            if len(mine.maptrack) >= mine.max_maptrack:
                raise _Refused(GNTST_no_device_space, f"maptrack full ({mine.max_maptrack} mappings)")
            _granter, table, frame = _check_entry(hv, caller, op.get("dom"), op.get("ref"), not readonly)
        except _Refused as r:
            results.append({"status": r.status, "why": r.why})
            continue
        ref = op["ref"]
        handle = mine.next_handle
        mine.next_handle += 1
        mine.maptrack[handle] = MapTrack(op["dom"], ref, frame, readonly)
        frame.foreign_maps += 1
        counts = table.busy.setdefault(ref, [0, 0])
        counts[1 if not readonly else 0] += 1
        table.set_status(ref)
        if readonly:
            temporary.append(readonly_fd(frame.fd))   # the kernel will refuse PROT_WRITE on it
            fds.append(temporary[-1])
        else:
            fds.append(frame.fd)
        results.append({"status": GNTST_okay, "handle": handle})
    return WithFds({"results": results}, fds, close_after=temporary)


def unmap_grant_ref(hv: "Hypervisor", caller: "Domain", args: dict) -> dict:
    handles = args.get("handles")
    if not isinstance(handles, list) or len(handles) > MAX_BATCH:
        raise HypercallError(errno.EINVAL, f"unmap: handles must be a list of at most {MAX_BATCH}")
    results = [_unmap_one(hv, caller.domid, h) for h in handles]
    return {"results": results}


def _unmap_one(hv: "Hypervisor", mapper: int, handle: Any) -> int:
    mine = hv.grants[mapper]
    track = mine.maptrack.pop(handle, None) if isinstance(handle, int) else None
    if track is None:
        return GNTST_bad_handle
    table = hv.grants.get(track.granter)
    if table is not None:
        counts = table.busy.get(track.ref)
        if counts:
            counts[0 if track.readonly else 1] -= 1
            if counts == [0, 0]:
                del table.busy[track.ref]
            table.set_status(track.ref)
    frame = track.frame
    frame.foreign_maps -= 1
    if frame.released and frame.foreign_maps == 0:
        frame.close()
        hv.frame_freed(track.granter)
    return GNTST_okay


def copy(hv: "Hypervisor", caller: "Domain", args: dict) -> dict:
    """Batched GNTTABOP_copy: each op copies `len` bytes between two pages."""
    ops = _batch(args)
    statuses = []
    for op in ops:
        try:
            if not isinstance(op, dict):
                raise _Refused(GNTST_bad_copy_arg, "each op must be a map")
            flags = op.get("flags", 0)
            length = op.get("len")
            src = _copy_side(hv, caller, op.get("source"), bool(flags & GNTCOPY_source_gref), False)
            dst = _copy_side(hv, caller, op.get("dest"), bool(flags & GNTCOPY_dest_gref), True)
            if not isinstance(length, int) or length < 0:
                raise _Refused(GNTST_bad_copy_arg, "len must be a non-negative integer")
            (sframe, soff), (dframe, doff) = src, dst
            if soff + length > PAGE_SIZE or doff + length > PAGE_SIZE:
                raise _Refused(GNTST_bad_copy_arg, "copy crosses a page boundary")
            dframe.view()[doff:doff + length] = sframe.view()[soff:soff + length]
            statuses.append(GNTST_okay)
        except _Refused as r:
            statuses.append(r.status)
    return {"status": statuses}


def _copy_side(hv, caller, side: Any, is_gref: bool, write: bool):
    if not isinstance(side, dict):
        raise _Refused(GNTST_bad_copy_arg, "source and dest must be maps")
    offset = side.get("offset", 0)
    if not isinstance(offset, int) or not 0 <= offset < PAGE_SIZE:
        raise _Refused(GNTST_bad_copy_arg, f"offset {offset!r} outside a page")
    domid = side.get("domid", caller.domid)
    if is_gref:
        _g, _t, frame = _check_entry(hv, caller, domid, side.get("ref"), write)
    else:
        if domid != caller.domid and not caller.privileged:
            raise _Refused(GNTST_permission_denied, "a plain frame must be the caller's own")
        frame = hv.memory.lookup(domid, side.get("gfn")) if isinstance(side.get("gfn"), int) else None
        if frame is None:
            raise _Refused(GNTST_bad_page, f"gfn {side.get('gfn')!r} is not a page of domain {domid}")
    return frame, offset


def seed(hv: "Hypervisor", caller: "Domain", args: dict) -> None:
    """Write an entry in another domain's table before it boots (xc_dom_gnttab_seed).

    The toolstack uses this for the two reserved references, the console and
    XenStore pages, so that dom0's daemons can map them without the guest's help.
    """
    hv.policy.require_privileged(caller, "grant table seed")
    target = args.get("domid")
    table = hv.grants.get(target) if isinstance(target, int) else None
    if table is None:
        raise HypercallError(errno.ESRCH, f"seed: no domain {target!r}")
    ref, remote, gfn = args.get("ref"), args.get("remote_dom"), args.get("gfn")
    if not (isinstance(ref, int) and 0 <= ref < table.nr_entries and isinstance(remote, int)
            and isinstance(gfn, int)):
        raise HypercallError(errno.EINVAL, "seed needs ref, remote_dom and gfn integers")
    flags = GTF_permit_access | (GTF_readonly if args.get("readonly") else 0)
    GRANT_ENTRY.pack_into(table.view, ref * GRANT_ENTRY_SIZE, 0, remote, gfn)
    table.view[ref * GRANT_ENTRY_SIZE] = flags


def query_size(hv: "Hypervisor", caller: "Domain", args: dict) -> dict:
    table = hv.grants[caller.domid]
    return {"nr_frames": table.nr_frames, "nr_entries": table.nr_entries,
            "max_maptrack": table.max_maptrack}


def _batch(args: dict) -> list:
    ops = args.get("ops")
    if not isinstance(ops, list) or not 0 < len(ops) <= MAX_BATCH:
        raise HypercallError(errno.EINVAL, f"ops must be a list of 1 to {MAX_BATCH} operations")
    return ops


def mapper_gone(hv: "Hypervisor", domid: int) -> None:
    """Release every mapping a dead domain held."""
    table = hv.grants.get(domid)
    if table is None:
        return
    for handle in list(table.maptrack):
        _unmap_one(hv, domid, handle)


OPS = {
    "map_grant_ref": map_grant_ref,
    "unmap_grant_ref": unmap_grant_ref,
    "copy": copy,
    "query_size": query_size,
    "seed": seed,
}
