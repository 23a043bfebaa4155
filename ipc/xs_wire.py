"""The XenStore wire format: Xen's ``io/xs_wire.h`` in Python.

In Xen
    Every XenStore message, in either direction and over either transport
    (xenstored's Unix socket for dom0 tools, or the shared ring page for a
    guest), is a 16-byte ``struct xsd_sockmsg`` header -- ``type``,
    ``req_id``, ``tx_id``, ``len``, four native-endian ``uint32_t`` -- followed
    by ``len`` bytes of payload.  Payloads are usually NUL-terminated strings
    (``path\\0value`` for WRITE, ``path\\0`` for READ, ...).  Errors are sent as
    a message of type XS_ERROR whose payload is the *name* of an errno value
    (``"ENOENT\\0"``), never its number, so that differently-numbered systems
    agree.

Here
    This module is pure encoding and decoding, with no I/O, so the daemon, the
    guest kernel's client, tests and benchmarks all share one definition.
    :class:`Decoder` is incremental: feed it whatever bytes a socket or ring
    produced and it hands back the complete messages, keeping any partial one.

Invariant
    A header with ``len`` above :data:`XENSTORE_PAYLOAD_MAX` is a fatal
    protocol violation (xenstore.txt: the connection is killed), because the
    byte stream can no longer be trusted.  An unknown ``type`` with a sane
    length is *not* fatal: the frame is consumed whole, so the stream stays in
    step and the server can answer that one request with an error.

Differences from Xen
    All of Xen's architectures that run XenStore are little-endian, so the
    header is packed explicitly little-endian rather than "native".
    ``EQUOTA`` is not in the C header's table; it is the string oxenstored
    (Xen's OCaml daemon) sends when a per-domain quota is exhausted, and this
    system uses it the same way.  A C client that does not know it maps it to
    EINVAL, exactly as it would against oxenstored.
"""

from __future__ import annotations

import errno as _errno
import struct
from dataclasses import dataclass
from enum import IntEnum

__all__ = [
    "XsType", "XS_ERRORS", "XENSTORE_PAYLOAD_MAX", "XENSTORE_ABS_PATH_MAX",
    "XENSTORE_REL_PATH_MAX", "HEADER", "HEADER_SIZE", "Message",
    "XenStoreError", "ProtocolError", "PayloadTooLong", "UnknownType", "Decoder",
    "encode", "split_strings", "join_strings", "error_message", "errno_of",
]


class XsType(IntEnum):
    """``enum xsd_sockmsg_type``: the numbers are part of the ABI."""

    CONTROL = 0           # formerly XS_DEBUG
    DIRECTORY = 1
    READ = 2
    GET_PERMS = 3
    WATCH = 4
    UNWATCH = 5
    TRANSACTION_START = 6
    TRANSACTION_END = 7
    INTRODUCE = 8
    RELEASE = 9
    GET_DOMAIN_PATH = 10
    WRITE = 11
    MKDIR = 12
    RM = 13
    SET_PERMS = 14
    WATCH_EVENT = 15
    ERROR = 16
    IS_DOMAIN_INTRODUCED = 17
    RESUME = 18
    SET_TARGET = 19
    # 20 was XS_RESTRICT; Xen removed it and the number stays unused.
    RESET_WATCHES = 21
    DIRECTORY_PART = 22
    INVALID = 0xFFFF      # guaranteed never to be a valid type


#: One past the last valid type number (``XS_TYPE_COUNT``).
XS_TYPE_COUNT = 23
_VALID_TYPES = frozenset(int(t) for t in XsType if t is not XsType.INVALID)

#: Error names in the order of ``xsd_errors[]`` in xs_wire.h, then EQUOTA
#: (oxenstored's quota error, see the module docstring).
XS_ERRORS: tuple[str, ...] = (
    "EINVAL", "EACCES", "EEXIST", "EISDIR", "ENOENT", "ENOMEM", "ENOSPC",
    "EIO", "ENOTEMPTY", "ENOSYS", "EROFS", "EBUSY", "EAGAIN", "EISCONN",
    "E2BIG", "EPERM", "EQUOTA",
)


def errno_of(name: str) -> int:
    """The host errno number for an xs_wire error name (EQUOTA -> EDQUOT)."""
    if name == "EQUOTA":
        return _errno.EDQUOT
    return getattr(_errno, name, _errno.EINVAL)


XENSTORE_PAYLOAD_MAX = 4096
XENSTORE_ABS_PATH_MAX = 3072
XENSTORE_REL_PATH_MAX = 2048

#: ``struct xsd_sockmsg``: type, req_id, tx_id, len.
HEADER = struct.Struct("<IIII")
HEADER_SIZE = HEADER.size  # 16


@dataclass(slots=True)
class Message:
    """One xsd_sockmsg: header fields plus the raw payload bytes."""

    type: int
    req_id: int
    tx_id: int
    payload: bytes

    def encode(self) -> bytes:
        return encode(self.type, self.req_id, self.tx_id, self.payload)

    def strings(self) -> list[bytes]:
        """The payload split into its NUL-terminated strings."""
        return split_strings(self.payload)


class XenStoreError(OSError):
    """A XenStore operation failed with one of the xs_wire error names.

    ``name`` is the string on the wire (``"ENOENT"``); ``errno`` the host's
    number for it, so ``except FileNotFoundError``-style code still works.
    """

    def __init__(self, name: str, detail: str = "") -> None:
        if name not in XS_ERRORS:
            detail = f"{detail} (unknown error name {name!r})".strip()
        super().__init__(errno_of(name), f"{name}: {detail}" if detail else name)
        self.name = name
        self.detail = detail


class ProtocolError(ValueError):
    """The byte stream broke the xsd_sockmsg framing rules."""


class PayloadTooLong(ProtocolError):
    """``len`` exceeds XENSTORE_PAYLOAD_MAX: fatal for the connection."""


class UnknownType(ProtocolError):
    """A well-framed message of a type xs_wire.h does not define.

    The frame has been consumed, so the caller may answer it (``message``
    holds it) and carry on reading the stream.
    """

    def __init__(self, text: str, message: Message) -> None:
        super().__init__(text)
        self.message = message


def encode(type_: int, req_id: int, tx_id: int, payload: bytes) -> bytes:
    """Header + payload as bytes; refuses payloads Xen would refuse."""
    if len(payload) > XENSTORE_PAYLOAD_MAX:
        raise PayloadTooLong(
            f"xs_wire: payload of {len(payload)} bytes exceeds "
            f"XENSTORE_PAYLOAD_MAX ({XENSTORE_PAYLOAD_MAX})")
    return HEADER.pack(type_, req_id, tx_id, len(payload)) + payload


def join_strings(*parts: bytes | str, terminate_last: bool = True) -> bytes:
    """NUL-join ``parts``; by default every part gets a trailing NUL."""
    raw = [p.encode() if isinstance(p, str) else p for p in parts]
    out = b"\0".join(raw)
    return out + b"\0" if terminate_last else out


def split_strings(payload: bytes) -> list[bytes]:
    """Split a payload of NUL-terminated strings.

    A final string without its NUL is still returned (some clients omit it on
    the last argument), but a trailing NUL does not create an empty string.
    """
    if not payload:
        return []
    parts = payload.split(b"\0")
    if payload.endswith(b"\0"):
        parts.pop()
    return parts


def error_message(req_id: int, tx_id: int, name: str) -> bytes:
    """An encoded XS_ERROR reply carrying the error's name."""
    return encode(XsType.ERROR, req_id, tx_id, name.encode() + b"\0")


class Decoder:
    """Incremental xsd_sockmsg decoder.

    ``feed(data)`` appends bytes and returns every message now complete.  On
    a bad header it raises: :class:`PayloadTooLong` (the stream is unusable;
    close it) or :class:`UnknownType` (that one frame was consumed; messages
    decoded before it are available from :meth:`take_ready`).
    ``strict_types=False`` passes unknown types through for callers that
    want to judge them themselves.
    """

    __slots__ = ("_buf", "_ready", "strict_types", "max_payload", "offset")

    def __init__(self, *, strict_types: bool = True,
                 max_payload: int = XENSTORE_PAYLOAD_MAX) -> None:
        self._buf = bytearray()
        self._ready: list[Message] = []
        self.strict_types = strict_types
        self.max_payload = max_payload
        #: Stream offset of the next undecoded byte, for error messages.
        self.offset = 0

    @property
    def pending_bytes(self) -> int:
        """Bytes of an incomplete message held back."""
        return len(self._buf)

    def take_ready(self) -> list[Message]:
        """Messages decoded before an :class:`UnknownType` interrupted."""
        out, self._ready = self._ready, []
        return out

    def feed(self, data: bytes) -> list[Message]:
        buf = self._buf
        buf += data
        out = self._ready
        pos = 0
        n = len(buf)
        unpack = HEADER.unpack_from
        try:
            while n - pos >= HEADER_SIZE:
                type_, req_id, tx_id, length = unpack(buf, pos)
                if length > self.max_payload:
                    raise PayloadTooLong(
                        f"xs_wire: header at stream offset {self.offset + pos} "
                        f"declares len={length}, above XENSTORE_PAYLOAD_MAX "
                        f"({self.max_payload}); type={type_} req_id={req_id}")
                end = pos + HEADER_SIZE + length
                if end > n:
                    break
                msg = Message(type_, req_id, tx_id,
                              bytes(buf[pos + HEADER_SIZE:end]))
                pos = end
                if self.strict_types and type_ not in _VALID_TYPES:
                    raise UnknownType(
                        f"xs_wire: unknown message type {type_} at stream "
                        f"offset {self.offset + pos - HEADER_SIZE - length} "
                        f"(req_id={req_id})", msg)
                out.append(msg)
        finally:
            if pos:
                del buf[:pos]
                self.offset += pos
        self._ready = []
        return out
