"""netback: the backend half of one virtual network interface (a "vif").

What it is in Xen
-----------------
A guest's network device is split in two.  netfront, in the guest, owns two
shared rings (``io/netif.h``) and the packet buffers; netback, in dom0 or a
network driver domain, maps the rings and moves packets between them and the
host's network (a bridge, here :mod:`domains.driverdom.bridge`):

* **tx** (guest to world): netfront puts ``netif_tx_request``\\ s on the tx
  ring, each granting (read-only) a page that holds a fragment of a packet.
  A packet larger than one fragment chains requests with
  ``NETTXF_more_data``; the first request's ``size`` is the whole packet's
  length.  netback copies the fragments out (``GNTTABOP_copy``), answers
  every slot with a ``netif_tx_response`` carrying the request's ``id``, and
  hands the packet to the bridge.
* **rx** (world to guest): netfront posts empty pages with
  ``netif_rx_request`` (id, gref, granted writable).  netback copies an
  arriving packet into one (or, for a packet larger than a page, several,
  flagged ``NETRXF_more_data``) and answers with a ``netif_rx_response``
  whose ``status`` is the byte count, or a negative ``NETIF_RSP_*`` error.

Both rings follow ring.h's notification rules: publish with
``push_*_and_check_notify`` and send an event only when the peer asked for
one; before sleeping, ``final_check_for_*`` asks for an event and looks once
more, so no request published in between is missed.

What it does here
-----------------
:class:`Netback` serves one vif.  Data moves with grant copies, as Linux's
netback does: a tx fragment is copied from the guest's granted page into a
*staging* page that netback owns, and an rx packet from a staging page into
the guest's posted page.  All the copies a batch needs go to the hypervisor
in one ``GNTTABOP_copy`` call, so the cost of crossing into the hypervisor
is paid per batch, not per packet.  The rings themselves are mapped
(``GNTTABOP_map_grant_ref``) for the life of the connection.

The hypervisor-facing operations are two small interfaces, :class:`Grants`
and :class:`EventPort` (plus :class:`StagingMemory` for the staging pages).
A booted domain kernel provides them as they are: ``k.grants``,
``k.events``' ports and ``k.memory``.  Tests and the benchmark provide a
local stand-in over real memfd pages (``tests/test_net_localxen.py``), so the
same code runs in both.

Invariant: nothing the frontend writes can crash netback.  A request naming a
bad grant, a fragment crossing its page or a packet shorter than an Ethernet
header gets an error response for every slot of that packet and is dropped;
a producer index that runs past the ring, or a packet chaining more than
``XEN_NETIF_NR_SLOTS_MIN`` slots, is treated as a hostile frontend: the vif
is *disconnected* (:attr:`Netback.error` says why) and stops touching the
rings, as Linux's ``xenvif_fatal_tx_err`` does.  Other vifs are unaffected.

Where this differs from Xen
---------------------------
* Linux's netback maps tx pages for large packets and copies only headers;
  here every byte is grant-copied, which is simpler and, in a system whose
  "map" is an mmap of a memfd, not slower for Ethernet-sized frames.
* No extra-info slots (GSO, multicast, hash) are accepted: a packet flagged
  ``NETTXF_extra_info`` is answered with ``NETIF_RSP_ERROR`` and its extra
  slots with ``NETIF_RSP_NULL``.  No checksum offload, no rate limiting.
* Packets queued for a guest that has posted no rx buffers wait in a bounded
  queue (:attr:`Netback.rx_queue_max`) and are dropped beyond it, as a full
  qdisc drops; Linux also has a stall timer that this does not.
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import trio

from domains.kernel import faultpoint
from domains.kernel.xenbus import gather
from ipc.grant_abi import GNTCOPY_dest_gref, GNTCOPY_source_gref, GNTST_okay
from ipc.netif import (NETIF_RSP_ERROR, NETIF_RSP_NULL, NETIF_RSP_OKAY, NETRXF_more_data,
                       NETTXF_extra_info, NETTXF_more_data, PAGE_SIZE, RX_ENTRY_SIZE,
                       TX_ENTRY_SIZE, XEN_NETIF_EXTRA_FLAG_MORE, XEN_NETIF_NR_SLOTS_MIN,
                       NetifError, NetifRxRequest, NetifRxResponse, NetifTxRequest,
                       NetifTxResponse, unpack_extra_info)
from ipc.ring import BackRing, RingError

ETH_HLEN = 14
#: Largest packet the backend accepts or delivers (netif.h's XEN_NETIF_MAX_TX_SIZE).
MAX_PACKET = 0xFFFF

log = logging.getLogger(__name__)


# --- what netback needs from its kernel (a booted Kernel provides all of it) ---------


class EventPort(Protocol):
    """An event channel end: ``k.events.bind_interdomain(...)`` returns one."""

    async def wait(self) -> None: ...
    def notify_nowait(self) -> None: ...


class GrantMapping(Protocol):
    map: Any            # a writable buffer (mmap) of the mapped page


class Grants(Protocol):
    """The grant operations netback uses; ``k.grants`` is one."""

    async def map_many(self, grants: list[tuple[int, int]],
                       readonly: bool = False) -> list[Any]: ...
    async def unmap_many(self, mappings: list[Any]) -> None: ...
    async def copy(self, ops: list[dict[str, Any]]) -> list[int]: ...


class StagingPage(Protocol):
    gfn: int
    map: Any


class StagingMemory(Protocol):
    """Where staging pages come from; ``k.memory`` is one."""

    async def alloc(self, nr: int) -> list[Any]: ...
    async def free(self, pages: list[Any]) -> None: ...


class VifDisconnected(Exception):
    """The vif stopped because the frontend broke the protocol (message says how)."""


# --- small helpers ---------------------------------------------------------------------


class Kick:
    """A wake-up flag that coalesces: set many times, one waiter wakes once."""

    def __init__(self) -> None:
        self._flag = False
        self._event = trio.Event()

    def set(self) -> None:
        self._flag = True
        self._event.set()

    async def wait(self) -> None:
        while not self._flag:
            await self._event.wait()
        self._flag = False
        self._event = trio.Event()


class Staging:
    """One direction's pages of a vif, used as a bump allocator for one batch.

    A grant copy moves packet data between the guest's granted pages and
    pages of *ours* the hypervisor knows by gfn, so these must be real
    frames.  They are asked of the domain's memory only when a batch needs
    them (:meth:`reserve`), growing by doubling up to ``limit``, and kept for
    later batches until :meth:`release`.  A vif starts with a few pages per
    direction (``Netback.STAGING_FIRST``), enough for its first packets; one
    that only ever carries pings keeps it at that, a busy one reaches
    ``limit`` within a few batches.  Taking them all at connect time instead made every
    (re)connection of a vif a 64-frame populate_physmap: when a driver
    domain is re-created, eight vifs did that at once, on the handshake's
    critical path.

    Fragments never cross a page boundary (a grant copy cannot), so a fragment
    that does not fit in what is left of a page starts the next one.
    """

    def __init__(self, memory: StagingMemory, limit: int, pages: list[Any]) -> None:
        self.memory = memory
        self.limit = limit
        self.pages = pages
        self.reset()

    async def reserve(self, nr: int) -> None:
        """Hold at least ``min(nr, limit)`` pages."""
        nr = min(nr, self.limit)
        if len(self.pages) >= nr:
            return
        grow = min(self.limit, max(nr, 2 * len(self.pages))) - len(self.pages)
        # Shielded: frames the hypervisor made for us must not be lost to a
        # cancellation between its reply and our bookkeeping.
        with trio.CancelScope(shield=True):
            self.pages += await self.memory.alloc(grow)

    async def release(self) -> None:
        pages, self.pages = self.pages, []
        if pages:
            await self.memory.free(pages)

    def reset(self) -> None:
        self._page = 0
        self._off = 0

    def take(self, length: int) -> tuple[Any, int] | None:
        """Room for ``length`` bytes: (page, offset), or None if the batch is full."""
        if self._off + length > PAGE_SIZE:
            self._page += 1
            self._off = 0
        if self._page >= len(self.pages):
            return None
        place = (self.pages[self._page], self._off)
        self._off += length
        return place


@dataclass
class VifStats:
    tx_packets: int = 0      # guest -> bridge
    tx_bytes: int = 0
    tx_errors: int = 0       # packets answered with NETIF_RSP_ERROR
    rx_packets: int = 0      # bridge -> guest
    rx_bytes: int = 0
    rx_errors: int = 0
    rx_dropped: int = 0      # queue full: the guest was not posting buffers fast enough
    tx_batches: int = 0
    notifications_sent: int = 0
    reasons: list[str] = field(default_factory=list)    # last few refusal reasons

    def refuse(self, why: str) -> None:
        self.reasons.append(why)
        del self.reasons[:-16]


@dataclass
class _TxPacket:
    requests: list[NetifTxRequest]
    extras: int = 0                   # extra-info slots that follow the first request
    problem: str | None = None
    copies: list[tuple[int, int, int]] = field(default_factory=list)  # (op index, staging page idx, off)


class Netback:
    """The backend of one vif: tx and rx rings of frontend ``frontend_domid``.

    Make one with :meth:`connect`, attach :attr:`on_packet` (e.g. to
    ``bridge.input``), run :meth:`run` as a task, feed packets for the guest
    with :meth:`deliver`, and end with :meth:`close`.
    """

    #: Staging pages per direction at most: a batch copies at most this many pages' worth.
    STAGING_PAGES = 32
    #: ... and at first: enough for the packets a reconnection replays and the
    #: bridge has queued, so that the first batches wait for no populate.
    STAGING_FIRST = 4
    rx_queue_max = 1024

    def __init__(self, name: str, grants: Grants, memory: StagingMemory, frontend_domid: int,
                 ring_maps: list[Any], tx_port: EventPort, rx_port: EventPort,
                 first_pages: list[Any]) -> None:
        self.name = name
        self.grants = grants
        self.frontend_domid = frontend_domid
        self._ring_maps = ring_maps
        self.tx = BackRing(ring_maps[0].map, TX_ENTRY_SIZE)
        self.rx = BackRing(ring_maps[1].map, RX_ENTRY_SIZE)
        self.tx_port = tx_port
        self.rx_port = rx_port
        half = len(first_pages) // 2
        self._tx_staging = Staging(memory, self.STAGING_PAGES, first_pages[:half])
        self._rx_staging = Staging(memory, self.STAGING_PAGES, first_pages[half:])
        self.rx_queue: deque[bytes] = deque()
        self._tx_kick = Kick()
        self._rx_kick = Kick()
        self.stats = VifStats()
        #: Where packets from the guest go; set by whoever plugs the vif in.
        self.on_packet: Callable[[bytes], None] = lambda frame: None
        self.error: str | None = None
        #: True when :attr:`error` is the frontend's doing (a protocol violation);
        #: False for our own failures (a refused hypercall, a lost channel).
        self.frontend_at_fault = False
        self.connected = True
        self._scope: trio.CancelScope | None = None
        self._stopped = trio.Event()

    # -- set-up and tear-down --------------------------------------------------------
    @classmethod
    async def connect(cls, grants: Grants, memory: StagingMemory, frontend_domid: int,
                      tx_ring_ref: int, rx_ring_ref: int, port: EventPort,
                      rx_port: EventPort | None = None, name: str = "vif") -> "Netback":
        """Map the frontend's rings (``tx-ring-ref``, ``rx-ring-ref``) and get ready.

        ``port`` is the bound event channel (``event-channel``); pass
        ``rx_port`` too when the frontend uses split channels
        (``event-channel-tx``/``-rx``).  Raises the grant error if a ring
        reference cannot be mapped, with nothing left mapped.  The rings and
        a first staging page for each direction are asked for at once.
        """
        maps: list[Any] = []
        pages: list[Any] = []

        async def map_rings() -> None:
            maps.extend(await grants.map_many([(frontend_domid, tx_ring_ref),
                                               (frontend_domid, rx_ring_ref)]))

        async def first_pages() -> None:
            pages.extend(await memory.alloc(2 * cls.STAGING_FIRST))
        try:
            await gather([map_rings, first_pages])
            return cls(name, grants, memory, frontend_domid, maps, port, rx_port or port, pages)
        except BaseException:
            with trio.CancelScope(shield=True):
                if maps:
                    await grants.unmap_many(maps)
                if pages:
                    await memory.free(pages)
            raise

    async def close(self) -> None:
        """Stop serving, unmap the rings and give the staging pages back."""
        self.connected = False
        if self._scope is not None:
            self._scope.cancel()
            with trio.move_on_after(5):
                await self._stopped.wait()
        if self._ring_maps:
            self.tx.release()
            self.rx.release()
            maps, self._ring_maps = self._ring_maps, []
            await self.grants.unmap_many(maps)
            await self._tx_staging.release()
            await self._rx_staging.release()

    def kick(self) -> None:
        """Wake both ring loops, as an event from the frontend would."""
        self._tx_kick.set()
        self._rx_kick.set()

    def _disconnect(self, why: str, frontend_at_fault: bool = False) -> None:
        """Stop using the rings, say why (and whose fault it was)."""
        if self.error is None:
            self.error = why
            self.frontend_at_fault = frontend_at_fault
            log.warning("%s: disconnecting frontend d%d: %s", self.name, self.frontend_domid, why)
        self.connected = False
        if self._scope is not None:
            self._scope.cancel()

    # -- the service tasks -------------------------------------------------------------
    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Serve both rings until :meth:`close` or a protocol violation.

        Returns (never raises) when the vif disconnects; :attr:`error` then
        says why, or is None after a plain close.
        """
        try:
            with trio.CancelScope() as scope:
                self._scope = scope
                if not self.connected:
                    scope.cancel()
                async with trio.open_nursery() as nursery:
                    if self.rx_port is self.tx_port:
                        nursery.start_soon(self._watch, self.tx_port, [self._tx_kick, self._rx_kick])
                    else:
                        nursery.start_soon(self._watch, self.tx_port, [self._tx_kick])
                        nursery.start_soon(self._watch, self.rx_port, [self._rx_kick])
                    nursery.start_soon(self._tx_loop)
                    nursery.start_soon(self._rx_loop)
                    task_status.started()
        finally:
            self._stopped.set()

    async def _watch(self, port: EventPort, kicks: list[Kick]) -> None:
        try:
            while True:
                await port.wait()
                for kick in kicks:
                    kick.set()
        except Exception as exc:   # the channel is gone (peer died, port closed)
            self._disconnect(f"event channel lost: {type(exc).__name__}: {exc}")

    async def _tx_loop(self) -> None:
        try:
            while True:
                progressed = await self._tx_batch()
                await trio.lowlevel.checkpoint()
                if progressed:
                    continue
                if not self._tx_wait_needed():
                    continue
                await self._tx_kick.wait()
        except (RingError, NetifError, VifDisconnected) as exc:
            self._disconnect(f"tx ring: {exc}", frontend_at_fault=True)
        except Exception as exc:   # e.g. the hypervisor refused a whole copy batch
            log.exception("%s: tx path failed", self.name)
            self._disconnect(f"tx path: {type(exc).__name__}: {exc}")

    async def _rx_loop(self) -> None:
        try:
            while True:
                progressed = await self._rx_batch()
                await trio.lowlevel.checkpoint()
                if progressed:
                    continue
                if self.rx_queue and not self._rx_wait_needed():
                    continue
                await self._rx_kick.wait()
        except (RingError, NetifError, VifDisconnected) as exc:
            self._disconnect(f"rx ring: {exc}", frontend_at_fault=True)
        except Exception as exc:   # e.g. the hypervisor refused a whole copy batch
            log.exception("%s: rx path failed", self.name)
            self._disconnect(f"rx path: {type(exc).__name__}: {exc}")

    # -- tx: guest -> bridge -----------------------------------------------------------
    def _tx_wait_needed(self) -> bool:
        """Ask for an event when more requests come; False if some came meanwhile.

        ``final_check_for_requests`` alone would spin on a packet whose later
        slots are not published yet, so when only an incomplete packet is
        waiting, ask for an event on the *next* index beyond it.
        """
        if not self.tx.final_check_for_requests():
            return True
        prod = self.tx.check_request_prod()
        if self._tx_incomplete_at == prod:
            self.tx.sring.req_event = prod + 1
            return self.tx.check_request_prod() == prod
        return False

    _tx_incomplete_at: int | None = None

    def _parse_tx(self, available: int) -> list[_TxPacket]:
        """Take whole packets off the ring (without consuming a partial one)."""
        packets: list[_TxPacket] = []
        cons = self.tx.req_cons
        taken = 0
        self._tx_incomplete_at = None
        staged = 0
        while taken < available:
            first = NetifTxRequest.unpack(self.tx.sring.read(cons + taken))
            slots = [first]
            extras = 0
            pos = taken + 1
            flags = first.flags
            incomplete = False
            if flags & NETTXF_extra_info:
                # Extra-info slots follow the first request; each says if another follows.
                more_extra = True
                while more_extra:
                    if pos >= available:
                        incomplete = True
                        break
                    extra = unpack_extra_info(self.tx.sring.read(cons + pos))
                    extras += 1
                    pos += 1
                    more_extra = bool(extra.flags & XEN_NETIF_EXTRA_FLAG_MORE)
                    if extras > XEN_NETIF_NR_SLOTS_MIN:
                        raise VifDisconnected(
                            f"packet at index {cons + taken} has more than "
                            f"{XEN_NETIF_NR_SLOTS_MIN} extra-info slots")
            while not incomplete and flags & NETTXF_more_data:
                if pos >= available:
                    incomplete = True
                    break
                req = NetifTxRequest.unpack(self.tx.sring.read(cons + pos))
                slots.append(req)
                pos += 1
                flags = req.flags
                if len(slots) > XEN_NETIF_NR_SLOTS_MIN:
                    raise VifDisconnected(
                        f"packet at index {cons + taken} chains more than "
                        f"{XEN_NETIF_NR_SLOTS_MIN} slots")
            if incomplete:
                if available >= self.tx.size:
                    raise VifDisconnected(f"packet at index {cons + taken} never ends")
                self._tx_incomplete_at = self.tx.sring.req_prod
                break
            if staged + len(slots) > self.STAGING_PAGES and packets:
                break       # the next batch takes it
            staged += len(slots)
            packets.append(_TxPacket(slots, extras, self._tx_problem(slots, extras)))
            taken = pos
        self.tx.req_cons = (cons + taken) & 0xFFFFFFFF
        return packets

    @staticmethod
    def _tx_problem(slots: list[NetifTxRequest], extras: int) -> str | None:
        first = slots[0]
        if extras:
            return "extra-info slots (GSO/multicast/hash) are not supported"
        rest = sum(r.size for r in slots[1:])
        if first.size < rest:
            return f"first slot says the packet is {first.size} bytes but later slots hold {rest}"
        if first.size < ETH_HLEN:
            return f"packet of {first.size} bytes is shorter than an Ethernet header"
        for i, req in enumerate(slots):
            why = req.problem(first.size - rest if i == 0 else None)
            if why:
                return f"slot {i} (id {req.id}, gref {req.gref}): {why}"
        return None

    async def _tx_batch(self) -> bool:
        """Copy out, answer and forward every complete packet available now."""
        if not self.connected:
            return False
        available = self.tx.unconsumed_requests()
        if not available:
            return False
        packets = self._parse_tx(available)
        if not packets:
            return False
        await faultpoint.hit("netback.tx")
        staging = self._tx_staging
        # Each slot's fragment fits in one page: that many pages always suffice.
        await staging.reserve(sum(len(p.requests) for p in packets if not p.problem))
        if not self.connected:
            return False
        ops: list[dict[str, Any]] = []
        staging.reset()
        for pkt in packets:
            if pkt.problem:
                continue
            rest = sum(r.size for r in pkt.requests[1:])
            for i, req in enumerate(pkt.requests):
                length = pkt.requests[0].size - rest if i == 0 else req.size
                if length == 0:
                    continue
                place = staging.take(length)
                assert place is not None, "batch was sized to fit the staging pages"
                page, off = place
                pkt.copies.append((len(ops), staging.pages.index(page), off))
                ops.append({"source": {"domid": self.frontend_domid, "ref": req.gref,
                                       "offset": req.offset},
                            "dest": {"gfn": page.gfn, "offset": off},
                            "len": length, "flags": GNTCOPY_source_gref})
        statuses = await self.grants.copy(ops) if ops else []
        if not self.connected:
            return False
        out: list[bytes] = []
        for pkt in packets:
            status = NETIF_RSP_OKAY
            if pkt.problem is None:
                bad = [i for i, _p, _o in pkt.copies if statuses[i] != GNTST_okay]
                if bad:
                    pkt.problem = f"grant copy failed with status {statuses[bad[0]]}"
            if pkt.problem is not None:
                status = NETIF_RSP_ERROR
                self.stats.tx_errors += 1
                self.stats.refuse(f"tx id {pkt.requests[0].id}: {pkt.problem}")
            else:
                frame = b"".join(
                    bytes(staging.pages[p].map[o:o + ops[i]["len"]]) for i, p, o in pkt.copies)
                out.append(frame)
            self.tx.put_response(_tx_response_fault(NetifTxResponse(pkt.requests[0].id, status)))
            for _ in range(pkt.extras):
                self.tx.put_response(NetifTxResponse(0, NETIF_RSP_NULL).pack())
            for req in pkt.requests[1:]:
                self.tx.put_response(NetifTxResponse(req.id, status).pack())
        faultpoint.hit_nowait("netback.push", self.tx)
        if self.tx.push_responses_and_check_notify():
            self.stats.notifications_sent += 1
            self.tx_port.notify_nowait()
        self.stats.tx_batches += 1
        for frame in out:
            self.stats.tx_packets += 1
            self.stats.tx_bytes += len(frame)
            self.on_packet(frame)
        return True

    # -- rx: bridge -> guest -----------------------------------------------------------
    def deliver(self, frame: bytes) -> None:
        """Queue a packet for the guest (the bridge calls this; it never blocks)."""
        if not self.connected:
            self.stats.rx_dropped += 1
            return
        if len(self.rx_queue) >= self.rx_queue_max or len(frame) > MAX_PACKET:
            self.stats.rx_dropped += 1
            return
        self.rx_queue.append(frame)
        self._rx_kick.set()

    def _rx_wait_needed(self) -> bool:
        """Packets are queued but the guest posted too few buffers: ask for an event."""
        need = _slots_for(len(self.rx_queue[0]))
        if self.rx.unconsumed_requests() >= need:
            return False
        prod = self.rx.check_request_prod()
        # Event when the producer passes the index that would give us enough buffers.
        self.rx.sring.req_event = self.rx.req_cons + need
        return self.rx.check_request_prod() == prod

    async def _rx_batch(self) -> bool:
        """Copy queued packets into posted guest buffers and answer them."""
        if not self.rx_queue or not self.connected:
            return False
        available = self.rx.unconsumed_requests()
        staging = self._rx_staging
        await staging.reserve(sum(_slots_for(len(f)) for f in itertools.islice(
            self.rx_queue, self.STAGING_PAGES)))
        if not self.rx_queue or not self.connected:
            return False
        staging.reset()
        ops: list[dict[str, Any]] = []
        plan: list[tuple[int, list[tuple[NetifRxRequest, int]]]] = []   # (length, [(req, op)])
        while self.rx_queue:
            frame = self.rx_queue[0]
            need = _slots_for(len(frame))
            if need > available:
                break
            places = []
            for i in range(need):
                chunk = frame[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]
                place = staging.take(len(chunk))
                if place is None:
                    break
                places.append((chunk, place))
            if len(places) < need:
                break
            self.rx_queue.popleft()
            available -= need
            slots = []
            for chunk, (page, off) in places:
                req = NetifRxRequest.unpack(self.rx.get_request())
                page.map[off:off + len(chunk)] = chunk
                slots.append((req, len(ops)))
                ops.append({"source": {"gfn": page.gfn, "offset": off},
                            "dest": {"domid": self.frontend_domid, "ref": req.gref, "offset": 0},
                            "len": len(chunk), "flags": GNTCOPY_dest_gref})
            plan.append((len(frame), slots))
        if not plan:
            return False
        statuses = await self.grants.copy(ops)
        if not self.connected:
            return False
        for length, slots in plan:
            failed = any(statuses[op] != GNTST_okay for _r, op in slots)
            if failed:
                self.stats.rx_errors += 1
                self.stats.refuse(f"rx: grant copy to gref {slots[0][0].gref} failed")
            else:
                self.stats.rx_packets += 1
                self.stats.rx_bytes += length
            for n, (req, op) in enumerate(slots):
                more = NETRXF_more_data if n < len(slots) - 1 else 0
                status = NETIF_RSP_ERROR if failed else ops[op]["len"]
                self.rx.put_response(NetifRxResponse(req.id, 0, more, status).pack())
        if self.rx.push_responses_and_check_notify():
            self.stats.notifications_sent += 1
            self.rx_port.notify_nowait()
        return True


def _tx_response_fault(rsp: NetifTxResponse) -> bytes:
    """The ``netback.response`` fault point (a lying backend: wrong id or
    status) and ``netback.response.raw`` (garbage bytes in the slot).
    Unarmed, just the packed response."""
    out = faultpoint.hit_nowait("netback.response", rsp)
    if not isinstance(out, NetifTxResponse):
        out = rsp
    raw = NetifTxResponse(out.id & 0xFFFF, max(-0x8000, min(0x7FFF, out.status))).pack()
    junk = faultpoint.hit_nowait("netback.response.raw", raw)
    return junk if isinstance(junk, bytes) else raw


def _slots_for(length: int) -> int:
    return max(1, -(-length // PAGE_SIZE))
