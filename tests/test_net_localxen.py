"""A local stand-in for the hypervisor's grant tables and event channels.

What this is
------------
netfront and netback talk to their kernel through three small interfaces
(grants, memory, an event port; see :mod:`domains.driverdom.netback` and
:mod:`domains.domu.netfront`).  A booted domain kernel provides them by
hypercalls to the real hypervisor.  This module provides them *without* a
hypervisor, over the same kind of memory, so the split drivers can be tested
and benchmarked on their own, across real processes:

* every domain's memory is one memfd of ``pages`` pages; a page is known by
  its gfn (its index in that memfd), mapped with ``mmap`` at ``gfn * 4096``;
* every domain's grant table is a memfd in the real ``grant_entry_v1`` layout
  (:mod:`ipc.grant_abi`); granting writes an entry, ``map``/``copy`` check the
  granter's entry exactly as the hypervisor does (permit flag, grantee domid,
  read-only) and set ``GTF_reading``/``GTF_writing`` while mapped, so
  ``end_access`` refuses a mapped page as it would with the real one;
* an event channel is a ``socketpair``: ``notify_nowait`` writes a byte (a
  full socket buffer means "already pending": notifications coalesce), and
  ``wait`` sleeps in trio until the socket is readable and drains it.

Build a :class:`LocalXen` *before* forking (it creates every descriptor), then
in each process call :meth:`LocalXen.kernel` for the domain it plays.

Where this differs from the real thing
--------------------------------------
Every process holds every domain's memfd, so the *OS* does not enforce
isolation here; only the grant checks in this module do.  Isolation by the OS
is the hypervisor's job and is tested there.  Pages are never reclaimed from
a dead domain, and there is no maptrack limit.

The bottom of this file tests the stand-in itself, so the driver tests built
on it can be trusted.
"""

from __future__ import annotations

import mmap
import os
import socket
from dataclasses import dataclass
from typing import Any

import pytest
import trio

from domains.kernel.grant_table import GrantError
from ipc.grant_abi import (GNTCOPY_dest_gref, GNTCOPY_source_gref, GNTST_bad_copy_arg,
                           GNTST_bad_domain, GNTST_bad_gntref, GNTST_bad_page, GNTST_okay,
                           GNTST_permission_denied, GNTTAB_NR_RESERVED_ENTRIES, GRANT_ENTRY,
                           GRANT_ENTRY_SIZE, GTF_permit_access, GTF_reading, GTF_readonly,
                           GTF_type_mask, GTF_writing)
from ipc.page import PAGE_SIZE


class _Refused(Exception):
    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status


@dataclass
class LocalPage:
    gfn: int
    map: mmap.mmap


@dataclass
class LocalMapping:
    dom: int
    ref: int
    handle: int
    map: mmap.mmap
    readonly: bool


class LocalPort:
    """One end of an event channel over a socketpair; same surface as ``Port``."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.port = sock.fileno()
        self.closed = False

    def notify_nowait(self) -> None:
        try:
            self.sock.send(b"\x01")
        except BlockingIOError:
            pass                      # bytes already pending: the event coalesces

    async def notify(self) -> None:
        self.notify_nowait()

    def fired(self) -> bool:
        try:
            data = self.sock.recv(4096)
        except BlockingIOError:
            return False
        if not data:
            raise ConnectionError("event channel: the other end is closed")
        return True

    async def wait(self) -> None:
        while True:
            if self.fired():
                return
            await trio.lowlevel.wait_readable(self.sock)

    async def close(self) -> None:
        self.close_now()

    def close_now(self) -> None:
        if not self.closed:
            self.closed = True
            self.sock.close()


class LocalXen:
    """Memory and grant tables for a set of domains, created before fork."""

    def __init__(self, domids: list[int], pages: int = 1024, grant_entries: int = 2048) -> None:
        self.pages = pages
        self.grant_entries = grant_entries
        self.mem_fd: dict[int, int] = {}
        self.table_fd: dict[int, int] = {}
        self._socks: list[socket.socket] = []
        for d in domids:
            self.mem_fd[d] = _memfd(f"dom{d}-mem", pages * PAGE_SIZE)
            self.table_fd[d] = _memfd(f"dom{d}-gnttab", grant_entries * GRANT_ENTRY_SIZE)

    def event_channel(self) -> tuple[LocalPort, LocalPort]:
        """A bound pair of ports (``alloc_unbound`` + ``bind_interdomain`` in one)."""
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        for s in (a, b):
            s.setblocking(False)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        self._socks += [a, b]
        return LocalPort(a), LocalPort(b)

    def kernel(self, domid: int) -> "LocalKernel":
        return LocalKernel(self, domid)

    def close(self) -> None:
        for fd in list(self.mem_fd.values()) + list(self.table_fd.values()):
            try:
                os.close(fd)
            except OSError:
                pass
        self.mem_fd.clear()
        self.table_fd.clear()
        for s in self._socks:
            s.close()


def _memfd(label: str, size: int) -> int:
    fd = os.memfd_create(f"microxen-test-{label}", 0)   # inherited across fork on purpose
    os.ftruncate(fd, size)
    return fd


class LocalKernel:
    """What one domain's process sees: ``.grants`` and ``.memory`` like a Kernel's."""

    def __init__(self, xen: LocalXen, domid: int) -> None:
        self.xen = xen
        self.domid = domid
        self._views: dict[int, mmap.mmap] = {}
        self._tables: dict[int, mmap.mmap] = {}
        self.grants = LocalGrants(self)
        self.memory = LocalMemory(self)

    def view(self, dom: int) -> mmap.mmap:
        """All of domain ``dom``'s memory (the "hypervisor's" mapping of it)."""
        if dom not in self._views:
            if dom not in self.xen.mem_fd:
                raise _Refused(GNTST_bad_domain, f"no domain {dom}")
            self._views[dom] = mmap.mmap(self.xen.mem_fd[dom], self.xen.pages * PAGE_SIZE)
        return self._views[dom]

    def table(self, dom: int) -> mmap.mmap:
        if dom not in self._tables:
            if dom not in self.xen.table_fd:
                raise _Refused(GNTST_bad_domain, f"no domain {dom}")
            self._tables[dom] = mmap.mmap(self.xen.table_fd[dom],
                                          self.xen.grant_entries * GRANT_ENTRY_SIZE)
        return self._tables[dom]

    def close(self) -> None:
        for m in list(self._views.values()) + list(self._tables.values()):
            try:
                m.close()
            except BufferError:
                pass           # a ring view still exists; the process is ending anyway
        self._views.clear()
        self._tables.clear()


class LocalMemory:
    def __init__(self, k: LocalKernel) -> None:
        self.k = k
        self._free = list(range(k.xen.pages - 1, -1, -1))

    async def alloc(self, nr: int) -> list[LocalPage]:
        if nr > len(self._free):
            raise MemoryError(f"dom{self.k.domid}: {nr} pages asked, {len(self._free)} free")
        out = []
        for _ in range(nr):
            gfn = self._free.pop()
            m = mmap.mmap(self.k.xen.mem_fd[self.k.domid], PAGE_SIZE, offset=gfn * PAGE_SIZE)
            m[:] = bytes(PAGE_SIZE)
            out.append(LocalPage(gfn, m))
        return out

    async def free(self, pages: list[LocalPage]) -> None:
        for p in pages:
            p.map.close()
            self._free.append(p.gfn)


class LocalGrants:
    """``k.grants`` for one domain: grant our pages, map/copy others' grants."""

    def __init__(self, k: LocalKernel) -> None:
        self.k = k
        self.nr_entries = k.xen.grant_entries
        self._free = list(range(self.nr_entries - 1, GNTTAB_NR_RESERVED_ENTRIES - 1, -1))
        self._handles = 0

    @property
    def table(self) -> mmap.mmap:
        return self.k.table(self.k.domid)

    def grant_access(self, domid: int, gfn: int, readonly: bool = False) -> int:
        if not self._free:
            raise GrantError(-1, f"all {self.nr_entries} grant references in use")
        ref = self._free.pop()
        off = ref * GRANT_ENTRY_SIZE
        GRANT_ENTRY.pack_into(self.table, off, 0, domid, gfn)
        self.table[off] = GTF_permit_access | (GTF_readonly if readonly else 0)
        return ref

    def end_access(self, ref: int) -> bool:
        off = ref * GRANT_ENTRY_SIZE
        if self.table[off] & (GTF_reading | GTF_writing):
            return False
        GRANT_ENTRY.pack_into(self.table, off, 0, 0, 0)
        self._free.append(ref)
        return True

    @property
    def free_count(self) -> int:
        return len(self._free)

    # -- the "hypervisor" side -----------------------------------------------------------
    def _check(self, dom: int, ref: Any, write: bool) -> int:
        """Return the granted gfn if ``dom``'s entry ``ref`` lets us in; else refuse."""
        if not isinstance(ref, int) or not 0 <= ref < self.nr_entries:
            raise _Refused(GNTST_bad_gntref, f"grant ref {ref!r} out of range")
        flags, grantee, gfn = GRANT_ENTRY.unpack_from(self.k.table(dom), ref * GRANT_ENTRY_SIZE)
        if flags & GTF_type_mask != GTF_permit_access or grantee != self.k.domid:
            raise _Refused(GNTST_permission_denied,
                           f"d{dom} ref {ref} is not granted to d{self.k.domid}")
        if write and flags & GTF_readonly:
            raise _Refused(GNTST_permission_denied, f"d{dom} ref {ref} is read-only")
        if not 0 <= gfn < self.k.xen.pages:
            raise _Refused(GNTST_bad_page, f"d{dom} ref {ref} names gfn {gfn}, not a page")
        return gfn

    async def map_many(self, grants: list[tuple[int, int]],
                       readonly: bool = False) -> list[LocalMapping]:
        out: list[LocalMapping] = []
        try:
            for dom, ref in grants:
                gfn = self._check(dom, ref, not readonly)
                m = mmap.mmap(self.k.xen.mem_fd[dom], PAGE_SIZE, offset=gfn * PAGE_SIZE,
                              prot=mmap.PROT_READ | (0 if readonly else mmap.PROT_WRITE))
                table = self.k.table(dom)
                table[ref * GRANT_ENTRY_SIZE] |= GTF_reading if readonly else GTF_writing
                self._handles += 1
                out.append(LocalMapping(dom, ref, self._handles, m, readonly))
        except _Refused as r:
            await self.unmap_many(out)
            raise GrantError(r.status, str(r)) from None
        return out

    async def map(self, dom: int, ref: int, readonly: bool = False) -> LocalMapping:
        return (await self.map_many([(dom, ref)], readonly))[0]

    async def unmap_many(self, mappings: list[LocalMapping]) -> None:
        for m in mappings:
            m.map.close()
            off = m.ref * GRANT_ENTRY_SIZE
            table = self.k.table(m.dom)
            table[off] &= ~(GTF_reading | GTF_writing) & 0xFF

    async def unmap(self, mapping: LocalMapping) -> None:
        await self.unmap_many([mapping])

    async def copy(self, ops: list[dict[str, Any]]) -> list[int]:
        statuses = []
        for op in ops:
            try:
                flags = op.get("flags", 0)
                length = op.get("len")
                sdom, soff = self._side(op.get("source"), bool(flags & GNTCOPY_source_gref), False)
                ddom, doff = self._side(op.get("dest"), bool(flags & GNTCOPY_dest_gref), True)
                if not isinstance(length, int) or length < 0:
                    raise _Refused(GNTST_bad_copy_arg, "len must be a non-negative integer")
                if soff % PAGE_SIZE + length > PAGE_SIZE or doff % PAGE_SIZE + length > PAGE_SIZE:
                    raise _Refused(GNTST_bad_copy_arg, "copy crosses a page boundary")
                self.k.view(ddom)[doff:doff + length] = self.k.view(sdom)[soff:soff + length]
                statuses.append(GNTST_okay)
            except _Refused as r:
                statuses.append(r.status)
        return statuses

    def _side(self, side: Any, is_gref: bool, write: bool) -> tuple[int, int]:
        """(domain, byte offset into its memory) for one side of a copy."""
        if not isinstance(side, dict):
            raise _Refused(GNTST_bad_copy_arg, "source and dest must be maps")
        offset = side.get("offset", 0)
        if not isinstance(offset, int) or not 0 <= offset < PAGE_SIZE:
            raise _Refused(GNTST_bad_copy_arg, f"offset {offset!r} outside a page")
        if is_gref:
            dom = side.get("domid")
            if dom not in self.k.xen.mem_fd:
                raise _Refused(GNTST_bad_domain, f"no domain {dom!r}")
            gfn = self._check(dom, side.get("ref"), write)
        else:
            dom = side.get("domid", self.k.domid)
            if dom != self.k.domid:
                raise _Refused(GNTST_permission_denied, "a plain frame must be the caller's own")
            gfn = side.get("gfn")
            if not isinstance(gfn, int) or not 0 <= gfn < self.k.xen.pages:
                raise _Refused(GNTST_bad_page, f"gfn {gfn!r} is not a page of d{dom}")
        return dom, gfn * PAGE_SIZE + offset


# --- tests of the stand-in itself ------------------------------------------------------


@pytest.fixture
def xen():
    x = LocalXen([1, 2, 3], pages=64, grant_entries=64)
    yield x
    x.close()


def test_copy_checks_the_granters_entry(xen):
    async def main():
        a, b, c = xen.kernel(1), xen.kernel(2), xen.kernel(3)
        [page] = await a.memory.alloc(1)
        page.map[0:5] = b"hello"
        [mine] = await b.memory.alloc(1)
        ref = a.grants.grant_access(2, page.gfn, readonly=True)
        src = {"domid": 1, "ref": ref, "offset": 0}
        assert await b.grants.copy([{"source": src, "dest": {"gfn": mine.gfn}, "len": 5,
                                     "flags": GNTCOPY_source_gref}]) == [GNTST_okay]
        assert bytes(mine.map[0:5]) == b"hello"
        # the wrong grantee, a write to a read-only grant, a bad ref, a page overrun
        [theirs] = await c.memory.alloc(1)
        assert await c.grants.copy([{"source": src, "dest": {"gfn": theirs.gfn}, "len": 5,
                                     "flags": GNTCOPY_source_gref}]) == [GNTST_permission_denied]
        assert await b.grants.copy([{"source": {"gfn": mine.gfn}, "dest": src, "len": 5,
                                     "flags": GNTCOPY_dest_gref}]) == [GNTST_permission_denied]
        assert await b.grants.copy([{"source": {**src, "ref": 9999}, "dest": {"gfn": mine.gfn},
                                     "len": 5, "flags": GNTCOPY_source_gref}]) == [GNTST_bad_gntref]
        assert await b.grants.copy([{"source": src, "dest": {"gfn": mine.gfn, "offset": 4000},
                                     "len": 200, "flags": GNTCOPY_source_gref}]) == [GNTST_bad_copy_arg]
        a.close(); b.close(); c.close()
    trio.run(main)


def test_end_access_refused_while_mapped(xen):
    async def main():
        a, b = xen.kernel(1), xen.kernel(2)
        [page] = await a.memory.alloc(1)
        ref = a.grants.grant_access(2, page.gfn)
        m = await b.grants.map(1, ref)
        m.map[0:3] = b"abc"
        assert bytes(page.map[0:3]) == b"abc"
        assert a.grants.end_access(ref) is False
        await b.grants.unmap(m)
        assert a.grants.end_access(ref) is True
        with pytest.raises(GrantError):
            await b.grants.map(1, ref)
        a.close(); b.close()
    trio.run(main)


def test_event_channel_coalesces_and_wakes():
    xen = LocalXen([1], pages=1)
    try:
        left, right = xen.event_channel()

        async def main():
            for _ in range(10000):          # far more than the socket buffer holds
                left.notify_nowait()
            with trio.fail_after(5):
                await right.wait()
            async with trio.open_nursery() as n:
                woke = trio.Event()

                async def waiter():
                    await right.wait()
                    woke.set()
                while right.fired():
                    pass
                n.start_soon(waiter)
                await trio.sleep(0)
                left.notify_nowait()
                with trio.fail_after(5):
                    await woke.wait()
        trio.run(main)
    finally:
        xen.close()
