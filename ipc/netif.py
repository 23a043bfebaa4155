"""The network device protocol (``xen/include/public/io/netif.h``), byte for byte.

What it is in Xen
-----------------
A virtual network interface (VIF) is a frontend (netfront, in the guest) and a
backend (netback, in dom0 or a network driver domain) sharing *two* rings:

* the **tx** ring carries packets the guest sends.  Each request grants one
  page holding (part of) a packet: ``gref``, ``offset`` and ``size`` within
  that page, ``flags`` (``NETTXF_more_data`` chains several requests into one
  packet; the first request's ``size`` is the whole packet's length) and an
  ``id`` echoed in the response with a status.
* the **rx** ring carries packets to the guest.  The guest posts empty pages
  (``netif_rx_request``: id and gref); netback copies a received packet into
  one and answers with a ``netif_rx_response`` whose ``status`` is the number
  of bytes written when positive, or a ``NETIF_RSP_*`` error when negative.

x86_64 layouts::

    netif_tx_request (12)   netif_tx_response (4)   netif_rx_request (8)
      0 u32 gref              0 u16 id                0 u16 id
      4 u16 offset            2 i16 status            2 u16 pad
      6 u16 flags                                     4 u32 gref
      8 u16 id
     10 u16 size            netif_rx_response (8)
                              0 u16 id, 2 u16 offset, 4 u16 flags, 6 i16 status

Ring entry sizes are therefore 12 bytes (tx) and 8 bytes (rx); a 4 KiB ring
holds 256 entries of either kind.

What it does here
-----------------
Pure encoding and decoding into frozen dataclasses, with range checks on
encode.  Decoding a request never fails (every bit pattern is a well-formed
struct); whether a tx request's ``offset + size`` stays inside its page is
checked by :meth:`NetifTxRequest.problem`, for the backend to call before
touching the page.

Where this differs from Xen
---------------------------
Extra-info slots (``netif_extra_info``: GSO, multicast, hash) share the tx
request and rx response slots in Xen.  They are not produced here; a backend
that sees ``NETTXF_extra_info`` can decode the slot with
:func:`unpack_extra_info` and is expected to reject what it does not support.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

PAGE_SIZE = 4096

# tx flags (netif_tx_request.flags)
NETTXF_csum_blank = 1 << 0
NETTXF_data_validated = 1 << 1
NETTXF_more_data = 1 << 2
NETTXF_extra_info = 1 << 3

# rx flags (netif_rx_response.flags)
NETRXF_data_validated = 1 << 0
NETRXF_csum_blank = 1 << 1
NETRXF_more_data = 1 << 2
NETRXF_extra_info = 1 << 3
NETRXF_gso_prefix = 1 << 4

NETIF_RSP_DROPPED = -2
NETIF_RSP_ERROR = -1
NETIF_RSP_OKAY = 0
#: No response: the slot answered an auxiliary request such as an extra-info.
NETIF_RSP_NULL = 1

XEN_NETIF_MAX_TX_SIZE = 0xFFFF
#: A packet may span at most this many tx slots before a backend may reject it.
XEN_NETIF_NR_SLOTS_MIN = 18

XEN_NETIF_EXTRA_TYPE_NONE = 0
XEN_NETIF_EXTRA_TYPE_GSO = 1
XEN_NETIF_EXTRA_TYPE_MCAST_ADD = 2
XEN_NETIF_EXTRA_TYPE_MCAST_DEL = 3
XEN_NETIF_EXTRA_TYPE_HASH = 4
XEN_NETIF_EXTRA_FLAG_MORE = 1 << 0

_TX_REQ = struct.Struct("<IHHHH")
_TX_RSP = struct.Struct("<Hh")
_RX_REQ = struct.Struct("<H2xI")
_RX_RSP = struct.Struct("<HHHh")
_EXTRA = struct.Struct("<BB6s")

TX_REQUEST_SIZE = _TX_REQ.size     # 12
TX_RESPONSE_SIZE = _TX_RSP.size    # 4
RX_REQUEST_SIZE = _RX_REQ.size     # 8
RX_RESPONSE_SIZE = _RX_RSP.size    # 8
#: sizeof(union netif_tx_sring_entry) and sizeof(union netif_rx_sring_entry).
TX_ENTRY_SIZE = max(TX_REQUEST_SIZE, TX_RESPONSE_SIZE)
RX_ENTRY_SIZE = max(RX_REQUEST_SIZE, RX_RESPONSE_SIZE)


class NetifError(ValueError):
    """A value cannot be encoded or decoded as netif.h describes."""


def _check(name: str, value: int, lo: int, hi: int) -> None:
    if not lo <= value <= hi:
        raise NetifError(f"{name}={value} out of range {lo}..{hi}")


def _need(kind: str, data: bytes, size: int) -> None:
    if len(data) < size:
        raise NetifError(f"{kind} needs {size} bytes, got {len(data)}")


@dataclass(frozen=True)
class NetifTxRequest:
    """``struct netif_tx_request``: one granted fragment of an outgoing packet."""

    gref: int
    offset: int
    flags: int
    id: int
    size: int

    def problem(self, fragment_size: int | None = None) -> str | None:
        """Why a backend must refuse this fragment, or None.

        The first request of a multi-slot packet carries the *whole packet's*
        length in ``size``; its own fragment is that minus the later slots'
        sizes, which only the backend can compute, so it passes it as
        ``fragment_size``.  For every other slot ``size`` is the fragment.
        """
        length = self.size if fragment_size is None else fragment_size
        if self.offset >= PAGE_SIZE:
            return f"offset {self.offset} outside the {PAGE_SIZE}-byte page"
        if length < 0 or self.offset + length > PAGE_SIZE:
            return (f"fragment at offset {self.offset} of {length} bytes "
                    f"crosses the end of the page")
        return None

    def pack(self) -> bytes:
        _check("gref", self.gref, 0, 0xFFFFFFFF)
        for name in ("offset", "flags", "id", "size"):
            _check(name, getattr(self, name), 0, 0xFFFF)
        return _TX_REQ.pack(self.gref, self.offset, self.flags, self.id, self.size)

    @classmethod
    def unpack(cls, data: bytes) -> "NetifTxRequest":
        _need("netif_tx_request", data, TX_REQUEST_SIZE)
        return cls(*_TX_REQ.unpack_from(data, 0))


@dataclass(frozen=True)
class NetifTxResponse:
    """``struct netif_tx_response``."""

    id: int
    status: int

    def pack(self) -> bytes:
        _check("id", self.id, 0, 0xFFFF)
        _check("status", self.status, -0x8000, 0x7FFF)
        return _TX_RSP.pack(self.id, self.status)

    @classmethod
    def unpack(cls, data: bytes) -> "NetifTxResponse":
        _need("netif_tx_response", data, TX_RESPONSE_SIZE)
        return cls(*_TX_RSP.unpack_from(data, 0))


@dataclass(frozen=True)
class NetifRxRequest:
    """``struct netif_rx_request``: an empty guest page offered for a packet."""

    id: int
    gref: int

    def pack(self) -> bytes:
        _check("id", self.id, 0, 0xFFFF)
        _check("gref", self.gref, 0, 0xFFFFFFFF)
        return _RX_REQ.pack(self.id, self.gref)

    @classmethod
    def unpack(cls, data: bytes) -> "NetifRxRequest":
        _need("netif_rx_request", data, RX_REQUEST_SIZE)
        return cls(*_RX_REQ.unpack_from(data, 0))


@dataclass(frozen=True)
class NetifRxResponse:
    """``struct netif_rx_response``: ``status`` > 0 is the byte count written
    at ``offset`` in the posted page; < 0 is a ``NETIF_RSP_*`` error."""

    id: int
    offset: int
    flags: int
    status: int

    def pack(self) -> bytes:
        for name in ("id", "offset", "flags"):
            _check(name, getattr(self, name), 0, 0xFFFF)
        _check("status", self.status, -0x8000, 0x7FFF)
        return _RX_RSP.pack(self.id, self.offset, self.flags, self.status)

    @classmethod
    def unpack(cls, data: bytes) -> "NetifRxResponse":
        _need("netif_rx_response", data, RX_RESPONSE_SIZE)
        return cls(*_RX_RSP.unpack_from(data, 0))


@dataclass(frozen=True)
class NetifExtraInfo:
    """``struct netif_extra_info`` kept raw: type, flags and 6 bytes of union."""

    type: int
    flags: int
    data: bytes = bytes(6)

    def pack(self) -> bytes:
        _check("type", self.type, 0, 0xFF)
        _check("flags", self.flags, 0, 0xFF)
        if len(self.data) != 6:
            raise NetifError(f"extra info union is 6 bytes, got {len(self.data)}")
        return _EXTRA.pack(self.type, self.flags, self.data)


def unpack_extra_info(data: bytes) -> NetifExtraInfo:
    """Decode a tx-request or rx-response slot that holds an extra-info."""
    _need("netif_extra_info", data, _EXTRA.size)
    return NetifExtraInfo(*_EXTRA.unpack_from(data, 0))
