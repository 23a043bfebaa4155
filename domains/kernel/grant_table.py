"""A domain kernel's grant table (what Linux's drivers/xen/grant-table.c is).

Granting is a write to our own memory: pick a free reference, write
(domid, gfn) and then the flags.  Ending access is also ours to do, but only if
the hypervisor has not marked the entry GTF_reading/GTF_writing (somebody still
maps it); then we refuse, as Linux's gnttab_end_foreign_access_ref does.
`end_access_deferred` keeps such a reference and takes it back once the peer
has unmapped, as Linux's deferred list does, so references are never leaked.

Mapping someone else's grant is a hypercall: the hypervisor checks their entry
and hands us the page descriptor; we mmap it (read-only if asked, and the
kernel enforces that), or place it in a slot of a VmArea of ours
(domains/kernel/vmap.py) so that many grants make one contiguous buffer.
Such a mapping is released with its area: its owner closes the area before
it tells the hypervisor it has unmapped them.

Where this differs from Xen: Xen clears an entry with an atomic cmpxchg so that
a map racing with end-of-access is caught.  Python has no cmpxchg on shared
memory, so our check-then-clear has a small window; losing it could only leave
the peer with access to a page *we* had granted it, never widen anyone's access.
"""

from __future__ import annotations

import logging
import mmap
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ipc.grant_abi import (GNTST_okay, GNTTAB_NR_RESERVED_ENTRIES, GRANT_ENTRY,
                           GRANT_ENTRY_SIZE, GTF_permit_access, GTF_reading, GTF_readonly,
                           GTF_writing)
from ipc.page import map_frame

if TYPE_CHECKING:
    from domains.kernel.hypercall import Hypervisor
    from domains.kernel.vmap import VmArea

log = logging.getLogger("grant_table")


class GrantError(Exception):
    def __init__(self, status: int, why: str) -> None:
        super().__init__(f"grant status {status}: {why}")
        self.status = status


@dataclass
class Mapping:
    dom: int
    ref: int
    handle: int
    map: mmap.mmap | memoryview     # a view of its slot, when mapped into a VmArea
    readonly: bool
    slot: int = -1                  # which slot of the area, or -1

    def release(self) -> None:
        """Let go of our handle on the page (idempotent).  For a slot of a
        VmArea this drops only the view: the area's close unmaps it."""
        if isinstance(self.map, memoryview):
            self.map.release()
        else:
            self.map.close()


class GrantTable:
    def __init__(self, hv: "Hypervisor", table: mmap.mmap, nr_entries: int) -> None:
        self.hv = hv
        self.table = table
        self.nr_entries = nr_entries
        self._free = list(range(nr_entries - 1, GNTTAB_NR_RESERVED_ENTRIES - 1, -1))
        self._deferred: list[int] = []   # refs still mapped when we wanted them back

    # -- granting -----------------------------------------------------------
    def grant_access(self, domid: int, gfn: int, readonly: bool = False) -> int:
        if not self._free:
            self._reclaim()
        if not self._free:
            raise GrantError(-1, f"all {self.nr_entries} grant references in use")
        ref = self._free.pop()
        off = ref * GRANT_ENTRY_SIZE
        if self.table[off] & GTF_permit_access:
            # Only a double end could put a live reference on the free list.
            log.error("grant ref %d was on the free list while still granted", ref,
                      stack_info=True)
        GRANT_ENTRY.pack_into(self.table, off, 0, domid, gfn)
        self.table[off] = GTF_permit_access | (GTF_readonly if readonly else 0)
        return ref

    def in_use(self, ref: int) -> bool:
        return bool(self.table[ref * GRANT_ENTRY_SIZE] & (GTF_reading | GTF_writing))

    def end_access(self, ref: int) -> bool:
        """Revoke a grant; False (and nothing changed) if it is still mapped.

        Ending a reference that is not granted is the caller's bug (a double
        end): putting it on the free list twice would later hand one reference
        to two users, so it is refused loudly instead.
        """
        if not self.table[ref * GRANT_ENTRY_SIZE] & GTF_permit_access:
            log.error("end_access of grant ref %d, which is not granted (a double end?)", ref,
                      stack_info=True)
            return True
        if self.in_use(ref):
            return False
        GRANT_ENTRY.pack_into(self.table, ref * GRANT_ENTRY_SIZE, 0, 0, 0)
        self._free.append(ref)
        return True

    def end_access_deferred(self, ref: int) -> bool:
        """End access now, or as soon as the peer unmaps (Linux's deferred list).

        A backend that is being torn down may still map our page for a moment;
        rather than leak the reference for good, we keep it and take it back
        the next time we run short.  Returns True if it was ended at once.
        """
        if self.end_access(ref):
            return True
        self._deferred.append(ref)
        return False

    def _reclaim(self) -> None:
        self._deferred = [ref for ref in self._deferred if not self.end_access(ref)]

    @property
    def free_count(self) -> int:
        if len(self._free) < 256 and self._deferred:
            self._reclaim()
        return len(self._free)

    # -- using others' grants ---------------------------------------------------
    async def map(self, dom: int, ref: int, readonly: bool = False) -> Mapping:
        return (await self.map_many([(dom, ref)], readonly))[0]

    async def map_many(self, grants: list[tuple[int, int]], readonly: bool = False,
                       area: "VmArea | None" = None,
                       slots: list[int] | None = None) -> list[Mapping]:
        """Map several grants in one hypercall; all or nothing.  With an
        ``area``, grant ``i`` goes into ``slots[i]`` of it (read-write only)."""
        if area is not None and (readonly or slots is None or len(slots) != len(grants)):
            raise ValueError("an area takes writable mappings, one slot for each grant")
        ops = [{"dom": d, "ref": r, "readonly": readonly} for d, r in grants]
        result, fds = await self.hv.call_fds("grant_table_op", "map_grant_ref", ops=ops)
        out: list[Mapping] = []
        fd_iter = iter(fds)
        failed = None
        for i, ((dom, ref), res) in enumerate(zip(grants, result["results"])):
            if res["status"] != GNTST_okay:
                failed = failed or GrantError(res["status"], res.get("why", ""))
                continue
            fd = next(fd_iter)
            try:
                if area is None:
                    out.append(Mapping(dom, ref, res["handle"],
                                       map_frame(fd, writable=not readonly), readonly))
                else:
                    area.map(slots[i], fd)
                    out.append(Mapping(dom, ref, res["handle"], area.pages(slots[i]), False,
                                       slots[i]))
            finally:
                os.close(fd)
        if failed is not None:
            for m in out:
                m.release()
                if area is not None:
                    area.unmap(m.slot)      # truly gone before we say so
            await self.unmap_many(out)
            raise failed
        return out

    async def unmap_many(self, mappings: list[Mapping]) -> None:
        if not mappings:
            return
        for m in mappings:
            m.release()
        await self.hv.call("grant_table_op", "unmap_grant_ref", handles=[m.handle for m in mappings])

    async def unmap(self, mapping: Mapping) -> None:
        await self.unmap_many([mapping])

    async def copy(self, ops: list[dict[str, Any]]) -> list[int]:
        """GNTTABOP_copy; returns a status per op."""
        return (await self.hv.call("grant_table_op", "copy", ops=ops))["status"]
