"""The block device protocol (``xen/include/public/io/blkif.h``), byte for byte.

What it is in Xen
-----------------
A virtual block device (VBD) is a frontend (blkfront, in the guest) and a
backend (blkback, in dom0 or a storage driver domain) sharing one ring of
``union { blkif_request; blkif_response; }`` entries.  A request names an
operation, a start sector and up to 11 *segments*; each segment is a grant
reference to one 4 KiB page of the guest plus the first and last 512-byte
sector of that page to transfer.  The backend maps (or copies) those pages,
does the I/O, and writes a response carrying the request's ``id`` and a
status.  Larger transfers use ``BLKIF_OP_INDIRECT``: the request carries grant
references to pages that themselves hold arrays of segments.

x86_64 layouts (natural C alignment, as gcc lays out blkif.h)::

    blkif_request (112 bytes)           blkif_response (16 bytes)
      0  u8   operation                   0  u64 id
      1  u8   nr_segments                 8  u8  operation
      2  u16  handle                     10  i16 status
      8  u64  id
     16  u64  sector_number
     24  seg[11] x 8 bytes: u32 gref, u8 first_sect, u8 last_sect, 2 pad

    blkif_request_discard (32 bytes)    blkif_request_indirect (64 bytes)
      0  u8   operation (5)               0  u8   operation (6)
      1  u8   flag                        1  u8   indirect_op (READ/WRITE)
      2  u16  handle                      2  u16  nr_segments
      8  u64  id                          8  u64  id
     16  u64  sector_number              16  u64  sector_number
     24  u64  nr_sectors                 24  u16  handle
                                         28  u32  indirect_grefs[8]

What it does here
-----------------
Pure encoding and decoding between those bytes and small dataclasses.  The
ring itself is :mod:`ipc.ring`; use :data:`ENTRY_SIZE` as its entry size.

Invariant: decoding never trusts the guest.  :func:`unpack_request` turns any
112 bytes into a request object or raises :class:`BlkifRequestError`, which
carries the ``id`` and ``operation`` it could read so that the backend can
still answer ``BLKIF_RSP_ERROR`` instead of crashing or dropping the request.
It checks what the protocol itself bounds (segment count, sector range within
a page); whether the sectors exist on the disk is the backend's question.

Where this differs from Xen
---------------------------
Nothing in the layout.  Xen's C code reads fields straight from the shared
page; here a request is always decoded from a private copy of the slot.
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass, field

# -- constants (values from blkif.h) ------------------------------------------
BLKIF_OP_READ = 0
BLKIF_OP_WRITE = 1
BLKIF_OP_WRITE_BARRIER = 2
BLKIF_OP_FLUSH_DISKCACHE = 3
BLKIF_OP_RESERVED_1 = 4
BLKIF_OP_DISCARD = 5
BLKIF_OP_INDIRECT = 6

OP_NAMES = {
    BLKIF_OP_READ: "read",
    BLKIF_OP_WRITE: "write",
    BLKIF_OP_WRITE_BARRIER: "write-barrier",
    BLKIF_OP_FLUSH_DISKCACHE: "flush-diskcache",
    BLKIF_OP_RESERVED_1: "reserved-1",
    BLKIF_OP_DISCARD: "discard",
    BLKIF_OP_INDIRECT: "indirect",
}

BLKIF_RSP_EOPNOTSUPP = -2
BLKIF_RSP_ERROR = -1
BLKIF_RSP_OKAY = 0

BLKIF_MAX_SEGMENTS_PER_REQUEST = 11
BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST = 8
BLKIF_DISCARD_SECURE = 1 << 0

#: blkif.h counts sectors in 512-byte units, whatever the disk's own sector size.
SECTOR_SIZE = 512
PAGE_SIZE = 4096
SECTORS_PER_PAGE = PAGE_SIZE // SECTOR_SIZE
#: Segments that fit in one indirect page (each segment is 8 bytes).
SEGS_PER_INDIRECT_FRAME = PAGE_SIZE // 8
MAX_INDIRECT_SEGMENTS = SEGS_PER_INDIRECT_FRAME * BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST

# vdisk info bits written by the backend to XenStore "info".
VDISK_CDROM = 0x1
VDISK_REMOVABLE = 0x2
VDISK_READONLY = 0x4

# -- struct formats ("<" = little-endian, no implicit padding; padding is spelt
#    out with "x" so the offsets match gcc's natural alignment) ---------------
#: ``struct blkif_request_segment`` (gref, first_sect, last_sect), and the
#: head of ``struct blkif_request`` before its segments (public for the
#: drivers' fast paths, which pack and slice them directly).
SEGMENT = struct.Struct("<IBBxx")                       # 8 bytes
REQUEST_HEAD = struct.Struct("<BBH4xQQ")                # 24 bytes
SEGMENT_SIZE = SEGMENT.size
_REQUEST_SIZE = REQUEST_HEAD.size + BLKIF_MAX_SEGMENTS_PER_REQUEST * SEGMENT.size
_DISCARD = struct.Struct("<BBH4xQQQ")                   # 32 bytes
#: blkif_request_indirect's fields: operation, indirect_op, nr_segments, id,
#: sector_number, handle, indirect_grefs[8] (public for backends' fast paths).
INDIRECT_LAYOUT = struct.Struct("<BBH4xQQH2x8I")        # 60 bytes + 4 tail pad
_INDIRECT_SIZE = 64
_RESPONSE = struct.Struct("<QBxh4x")                    # 16 bytes

REQUEST_SIZE = _REQUEST_SIZE          # sizeof(struct blkif_request) == 112
RESPONSE_SIZE = _RESPONSE.size        # sizeof(struct blkif_response) == 16
#: sizeof(union blkif_sring_entry): the ring's entry size.
ENTRY_SIZE = max(REQUEST_SIZE, RESPONSE_SIZE)
assert REQUEST_SIZE == 112 and RESPONSE_SIZE == 16 and _DISCARD.size == 32


class BlkifError(ValueError):
    """A value cannot be encoded as blkif.h describes."""


class BlkifRequestError(BlkifError):
    """A request read from the ring breaks the protocol.

    ``id`` and ``operation`` are what the slot held, so the backend can answer
    with ``BLKIF_RSP_ERROR`` for that id.
    """

    def __init__(self, id: int, operation: int, message: str) -> None:
        self.id, self.operation = id, operation
        super().__init__(f"blkif request id={id} op={operation}: {message}")


def _check_range(name: str, value: int, bits: int, signed: bool = False) -> None:
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    if not lo <= value <= hi:
        raise BlkifError(f"{name}={value} does not fit in {'' if signed else 'u'}int{bits}")


@dataclass(frozen=True)
class Segment:
    """``struct blkif_request_segment``: sectors first..last (inclusive) of
    the page behind grant reference ``gref``."""

    gref: int
    first_sect: int
    last_sect: int

    @property
    def nr_sectors(self) -> int:
        return self.last_sect - self.first_sect + 1

    def problem(self) -> str | None:
        """Why this segment is invalid, or None."""
        if self.first_sect > self.last_sect:
            return f"first_sect {self.first_sect} > last_sect {self.last_sect}"
        if self.last_sect >= SECTORS_PER_PAGE:
            return f"last_sect {self.last_sect} beyond the page ({SECTORS_PER_PAGE} sectors)"
        return None

    def pack(self) -> bytes:
        _check_range("gref", self.gref, 32)
        _check_range("first_sect", self.first_sect, 8)
        _check_range("last_sect", self.last_sect, 8)
        return SEGMENT.pack(self.gref, self.first_sect, self.last_sect)

    @classmethod
    def unpack(cls, data: bytes, offset: int = 0) -> "Segment":
        return cls(*SEGMENT.unpack_from(data, offset))


@dataclass(frozen=True)
class BlkifRequest:
    """``struct blkif_request``: READ, WRITE, WRITE_BARRIER, FLUSH_DISKCACHE."""

    operation: int
    id: int
    sector_number: int = 0
    handle: int = 0
    segments: tuple[Segment, ...] = ()

    @property
    def nr_segments(self) -> int:
        return len(self.segments)

    @property
    def nr_sectors(self) -> int:
        return sum(s.nr_sectors for s in self.segments)

    def pack(self) -> bytes:
        if len(self.segments) > BLKIF_MAX_SEGMENTS_PER_REQUEST:
            raise BlkifError(f"{len(self.segments)} segments; at most "
                             f"{BLKIF_MAX_SEGMENTS_PER_REQUEST} fit in a request")
        _check_range("operation", self.operation, 8)
        _check_range("handle", self.handle, 16)
        _check_range("id", self.id, 64)
        _check_range("sector_number", self.sector_number, 64)
        out = bytearray(REQUEST_SIZE)
        REQUEST_HEAD.pack_into(out, 0, self.operation, len(self.segments), self.handle,
                            self.id, self.sector_number)
        for i, seg in enumerate(self.segments):
            out[REQUEST_HEAD.size + i * 8:REQUEST_HEAD.size + (i + 1) * 8] = seg.pack()
        return bytes(out)


@dataclass(frozen=True)
class BlkifRequestDiscard:
    """``struct blkif_request_discard``: forget ``nr_sectors`` from ``sector_number``."""

    id: int
    sector_number: int
    nr_sectors: int
    handle: int = 0
    flag: int = 0
    operation: int = field(default=BLKIF_OP_DISCARD, init=False)

    def pack(self) -> bytes:
        _check_range("flag", self.flag, 8)
        _check_range("handle", self.handle, 16)
        _check_range("id", self.id, 64)
        _check_range("sector_number", self.sector_number, 64)
        _check_range("nr_sectors", self.nr_sectors, 64)
        return _DISCARD.pack(BLKIF_OP_DISCARD, self.flag, self.handle, self.id,
                             self.sector_number, self.nr_sectors)


@dataclass(frozen=True)
class BlkifRequestIndirect:
    """``struct blkif_request_indirect``: the segments live in the granted
    pages ``indirect_grefs`` (see :func:`pack_indirect_segments`)."""

    indirect_op: int
    id: int
    sector_number: int
    nr_segments: int
    indirect_grefs: tuple[int, ...]
    handle: int = 0
    operation: int = field(default=BLKIF_OP_INDIRECT, init=False)

    def pack(self) -> bytes:
        if len(self.indirect_grefs) > BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST:
            raise BlkifError(f"{len(self.indirect_grefs)} indirect pages; at most "
                             f"{BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST}")
        _check_range("indirect_op", self.indirect_op, 8)
        _check_range("nr_segments", self.nr_segments, 16)
        _check_range("handle", self.handle, 16)
        _check_range("id", self.id, 64)
        _check_range("sector_number", self.sector_number, 64)
        for g in self.indirect_grefs:
            _check_range("indirect gref", g, 32)
        grefs = list(self.indirect_grefs) + [0] * (8 - len(self.indirect_grefs))
        head = INDIRECT_LAYOUT.pack(BLKIF_OP_INDIRECT, self.indirect_op, self.nr_segments,
                              self.id, self.sector_number, self.handle, *grefs)
        return head + bytes(_INDIRECT_SIZE - len(head))

    def nr_indirect_pages(self) -> int:
        return -(-self.nr_segments // SEGS_PER_INDIRECT_FRAME)


@dataclass(frozen=True)
class BlkifResponse:
    """``struct blkif_response``."""

    id: int
    operation: int
    status: int

    def pack(self) -> bytes:
        _check_range("id", self.id, 64)
        _check_range("operation", self.operation, 8)
        _check_range("status", self.status, 16, signed=True)
        return _RESPONSE.pack(self.id, self.operation, self.status)

    @classmethod
    def unpack(cls, data: bytes) -> "BlkifResponse":
        if len(data) < RESPONSE_SIZE:
            raise BlkifError(f"response needs {RESPONSE_SIZE} bytes, got {len(data)}")
        return cls(*_RESPONSE.unpack_from(data, 0))


AnyRequest = BlkifRequest | BlkifRequestDiscard | BlkifRequestIndirect


def pack_request(req: AnyRequest) -> bytes:
    """Encode any request kind for a ring slot."""
    return req.pack()


def unpack_request(data: bytes) -> AnyRequest:
    """Decode and check one request copied from a ring slot.

    Raises :class:`BlkifRequestError` (with id and operation) for anything the
    protocol forbids; raises :class:`BlkifError` if ``data`` is too short to
    hold even the id.
    """
    if len(data) < REQUEST_HEAD.size:
        raise BlkifError(f"request needs {REQUEST_SIZE} bytes, got {len(data)}")
    op, nseg, handle, rid, sector = REQUEST_HEAD.unpack_from(data, 0)
    if op in (BLKIF_OP_READ, BLKIF_OP_WRITE, BLKIF_OP_WRITE_BARRIER,
              BLKIF_OP_FLUSH_DISKCACHE):
        if len(data) < REQUEST_SIZE:
            raise BlkifRequestError(rid, op, f"slot holds {len(data)} bytes, need {REQUEST_SIZE}")
        if nseg > BLKIF_MAX_SEGMENTS_PER_REQUEST:
            raise BlkifRequestError(rid, op, f"nr_segments {nseg} exceeds "
                                    f"{BLKIF_MAX_SEGMENTS_PER_REQUEST}")
        if nseg == 0 and op in (BLKIF_OP_READ, BLKIF_OP_WRITE):
            raise BlkifRequestError(rid, op, "read/write with no segments")
        segs = tuple(Segment.unpack(data, REQUEST_HEAD.size + i * 8) for i in range(nseg))
        for i, s in enumerate(segs):
            why = s.problem()
            if why:
                raise BlkifRequestError(rid, op, f"segment {i}: {why}")
        return BlkifRequest(op, rid, sector, handle, segs)
    if op == BLKIF_OP_DISCARD:
        _, flag, handle, rid, sector, nr = _DISCARD.unpack_from(data, 0)
        return BlkifRequestDiscard(rid, sector, nr, handle, flag)
    if op == BLKIF_OP_INDIRECT:
        fields = INDIRECT_LAYOUT.unpack_from(data, 0)
        _, iop, nseg, rid, sector, handle = fields[:6]
        if iop not in (BLKIF_OP_READ, BLKIF_OP_WRITE):
            raise BlkifRequestError(rid, op, f"indirect_op {iop} is not read or write")
        if not 0 < nseg <= MAX_INDIRECT_SEGMENTS:
            raise BlkifRequestError(rid, op, f"nr_segments {nseg} not in 1..{MAX_INDIRECT_SEGMENTS}")
        npages = -(-nseg // SEGS_PER_INDIRECT_FRAME)
        return BlkifRequestIndirect(iop, rid, sector, nseg, tuple(fields[6:6 + npages]), handle)
    raise BlkifRequestError(rid, op, f"unknown operation {op}")


@functools.lru_cache(maxsize=SEGS_PER_INDIRECT_FRAME)
def segment_array(nseg: int) -> struct.Struct:
    """``blkif_request_segment[nseg]`` as one Struct (gref, first_sect,
    last_sect for each), so a whole indirect page's worth is packed or
    unpacked in one call: the hot path of a large read or write."""
    return struct.Struct("<" + "IBBxx" * nseg)


def pack_indirect_segments(segments: list[Segment] | tuple[Segment, ...]) -> list[bytes]:
    """Lay out segments into the indirect pages an indirect request points to
    (each page an array of 512 ``blkif_request_segment``)."""
    pages = []
    for start in range(0, len(segments), SEGS_PER_INDIRECT_FRAME):
        page = bytearray(PAGE_SIZE)
        for i, seg in enumerate(segments[start:start + SEGS_PER_INDIRECT_FRAME]):
            page[i * 8:(i + 1) * 8] = seg.pack()
        pages.append(bytes(page))
    return pages


def unpack_indirect_segments(req: BlkifRequestIndirect, pages: list[bytes]) -> tuple[Segment, ...]:
    """Read and check ``req.nr_segments`` segments out of its indirect pages."""
    if len(pages) < req.nr_indirect_pages():
        raise BlkifRequestError(req.id, req.operation,
                                f"{req.nr_segments} segments need {req.nr_indirect_pages()} "
                                f"indirect pages, got {len(pages)}")
    segs = []
    for i in range(req.nr_segments):
        page, slot = divmod(i, SEGS_PER_INDIRECT_FRAME)
        seg = Segment.unpack(pages[page], slot * 8)
        why = seg.problem()
        if why:
            raise BlkifRequestError(req.id, req.operation, f"indirect segment {i}: {why}")
        segs.append(seg)
    return tuple(segs)
