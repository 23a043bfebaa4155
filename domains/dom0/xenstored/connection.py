"""One xenstored client: decode its requests, answer them, send its events.

In Xen
    C xenstored keeps a ``struct connection`` per client -- a Unix-socket
    peer (dom0 tools, privileged) or a domain's ring (identity = the
    introduced domid).  Requests are parsed from the byte stream, handled in
    order, and answered with the same type, ``req_id`` and ``tx_id`` (or
    XS_ERROR and an errno name).  Watch events for the client are queued on
    the same connection, so they interleave with replies in order.

Here
    :class:`Connection` knows nothing about sockets or rings.  Its
    :meth:`Connection.serve` runs the client given two coroutines,
    ``receive_some(n) -> bytes`` and ``send_all(bytes)``, which the socket
    and ring transports supply.  Requests are decoded from a bounded read,
    handled synchronously by :class:`~.core.XenStore` (so each one is atomic)
    and their replies sent in one write.

    :class:`InProcessConnection` is dom0's own connection for code running
    in the daemon's trio loop (the toolstack): async methods returning
    Python values, watch events through a trio memory channel, no socket.

Invariants
    * Bad input never escapes: a malformed request gets an XS_ERROR reply;
      a header announcing more than XENSTORE_PAYLOAD_MAX closes only this
      connection; an internal error is logged and answered with EIO.
    * Bounded memory per client: at most one read (``RECV_SIZE``) of
      undecoded bytes, and at most ``Quota.max_outstanding`` requests handled
      before their replies are written.  A client that stops reading its
      replies stops being read (backpressure), and watch events beyond
      ``Quota.max_pending_events`` are dropped, as C xenstored drops them.
    * Fairness: after each batch the connection's task yields in trio's
      FIFO run queue, so a flooding domain gets one batch per round like
      everyone else.
"""

from __future__ import annotations

import logging
from typing import Awaitable, Callable, TypeVar

import trio

from ipc.xs_wire import (HEADER, XENSTORE_PAYLOAD_MAX, Decoder, Message,
                         PayloadTooLong, XenStoreError, XsType, encode,
                         error_message, split_strings)

from domains.kernel.xenstore import ClientWatch, TxView, WatchEvent, run_transaction

from .core import XenStore, parse_domid
from .transaction import Transaction

__all__ = ["Connection", "InProcessConnection", "WatchEvent", "RECV_SIZE"]

log = logging.getLogger("microxen.xenstored")

RECV_SIZE = 65536
_HEADER_PACK = HEADER.pack
_OK = b"OK\0"

ReceiveSome = Callable[[int], Awaitable[bytes]]
SendAll = Callable[[bytes], Awaitable[None]]


# -- request handlers: payload in, reply payload out --------------------------
# Each takes (store, conn, msg, args) where args is the payload split at NULs.

def _arg(args: list[bytes], i: int, what: str) -> bytes:
    if len(args) <= i:
        raise XenStoreError("EINVAL", f"missing {what}")
    return args[i]


def _h_read(s: XenStore, c, m: Message, a) -> bytes:
    return s.read(c, a[0] if a else _arg(a, 0, "path"), m.tx_id)


def _h_write(s: XenStore, c, m: Message, a) -> bytes:
    cut = m.payload.find(b"\0")
    if cut < 0:
        raise XenStoreError("EINVAL", "WRITE needs <path>|<value>")
    s.write(c, m.payload[:cut], m.payload[cut + 1:], m.tx_id)
    return _OK


def _h_mkdir(s, c, m, a) -> bytes:
    s.mkdir(c, _arg(a, 0, "path"), m.tx_id)
    return _OK


def _h_rm(s, c, m, a) -> bytes:
    s.rm(c, _arg(a, 0, "path"), m.tx_id)
    return _OK


def _h_directory(s, c, m, a) -> bytes:
    return b"".join(n.encode() + b"\0" for n in s.directory(c, _arg(a, 0, "path"), m.tx_id))


def _h_directory_part(s, c, m, a) -> bytes:
    off = _arg(a, 1, "offset")
    if not off.isdigit():
        raise XenStoreError("EINVAL", f"bad offset {off[:16]!r}")
    gen, names = s.directory_part(c, _arg(a, 0, "path"), int(off), m.tx_id)
    return str(gen).encode() + b"\0" + names


def _h_get_perms(s, c, m, a) -> bytes:
    return "".join(p + "\0" for p in s.get_perms(c, _arg(a, 0, "path"), m.tx_id)).encode()


def _h_set_perms(s, c, m, a) -> bytes:
    s.set_perms(c, _arg(a, 0, "path"), a[1:], m.tx_id)
    return _OK


def _h_watch(s, c, m, a) -> bytes:
    path, token = _arg(a, 0, "path"), _arg(a, 1, "token")
    s.watch(c, path, token)
    c.initial_event = (path.decode("ascii"), token)
    return _OK


def _h_unwatch(s, c, m, a) -> bytes:
    s.unwatch(c, _arg(a, 0, "path"), _arg(a, 1, "token"))
    return _OK


def _h_tx_start(s, c, m, a) -> bytes:
    if m.tx_id:
        raise XenStoreError("EINVAL", "TRANSACTION_START inside a transaction")
    return str(s.transaction_start(c)).encode() + b"\0"


def _h_tx_end(s, c, m, a) -> bytes:
    flag = _arg(a, 0, "T or F")
    if flag not in (b"T", b"F"):
        raise XenStoreError("EINVAL", f"TRANSACTION_END wants T or F, not {flag[:8]!r}")
    s.transaction_end(c, m.tx_id, flag == b"T")
    return _OK


def _privileged(c, what: str) -> None:
    if not c.privileged:
        raise XenStoreError("EACCES", f"{what} is for dom0 only")


def _h_introduce(s, c, m, a) -> bytes:
    _privileged(c, "INTRODUCE")
    domid = parse_domid(_arg(a, 0, "domid"))
    try:
        mfn, port = int(_arg(a, 1, "mfn")), int(_arg(a, 2, "evtchn"))
    except ValueError:
        raise XenStoreError("EINVAL", "INTRODUCE wants <domid>|<mfn>|<evtchn>|") from None
    s.introduce_domain(domid, mfn, port)
    if s.ring_connector is not None:
        s.ring_connector(domid, mfn, port)
    return _OK


def _h_release(s, c, m, a) -> bytes:
    _privileged(c, "RELEASE")
    s.release_domain(parse_domid(_arg(a, 0, "domid")))
    return _OK


def _h_get_domain_path(s, c, m, a) -> bytes:
    return s.get_domain_path(parse_domid(_arg(a, 0, "domid"))).encode() + b"\0"


def _h_is_introduced(s, c, m, a) -> bytes:
    _privileged(c, "IS_DOMAIN_INTRODUCED")
    return b"T\0" if s.is_domain_introduced(parse_domid(_arg(a, 0, "domid"))) else b"F\0"


def _h_resume(s, c, m, a) -> bytes:
    _privileged(c, "RESUME")
    parse_domid(_arg(a, 0, "domid"))
    return _OK


def _h_set_target(s, c, m, a) -> bytes:
    _privileged(c, "SET_TARGET")
    s.set_target(parse_domid(_arg(a, 0, "domid")), parse_domid(_arg(a, 1, "target")))
    return _OK


def _h_reset_watches(s, c, m, a) -> bytes:
    s.reset_watches(c)
    return _OK


def _h_control(s, c, m, a) -> bytes:
    _privileged(c, "CONTROL")
    return s.control(c, a)


HANDLERS: dict[int, Callable] = {
    XsType.READ: _h_read, XsType.WRITE: _h_write, XsType.MKDIR: _h_mkdir,
    XsType.RM: _h_rm, XsType.DIRECTORY: _h_directory,
    XsType.DIRECTORY_PART: _h_directory_part, XsType.GET_PERMS: _h_get_perms,
    XsType.SET_PERMS: _h_set_perms, XsType.WATCH: _h_watch,
    XsType.UNWATCH: _h_unwatch, XsType.TRANSACTION_START: _h_tx_start,
    XsType.TRANSACTION_END: _h_tx_end, XsType.INTRODUCE: _h_introduce,
    XsType.RELEASE: _h_release, XsType.GET_DOMAIN_PATH: _h_get_domain_path,
    XsType.IS_DOMAIN_INTRODUCED: _h_is_introduced, XsType.RESUME: _h_resume,
    XsType.SET_TARGET: _h_set_target, XsType.RESET_WATCHES: _h_reset_watches,
    XsType.CONTROL: _h_control,
}


class Connection:
    """A client of xenstored over some byte stream (socket or ring)."""

    def __init__(self, store: XenStore, domid: int, privileged: bool,
                 name: str = "") -> None:
        self.store = store
        self.domid = domid
        self.privileged = privileged
        self.name = name or f"domid {domid}"
        self.transactions: dict[int, Transaction] = {}
        self.initial_event: tuple[str, bytes] | None = None
        self.dropped_events = 0
        self.closed = False
        self._out: list[bytes] = []
        self._send_all: SendAll | None = None
        self._flushing = False
        self._flushed: trio.Event | None = None
        self._event_waiting = trio.Event()

    # -- request handling (synchronous, atomic) ------------------------------
    def handle(self, msg: Message) -> None:
        """Answer one request; the reply (and any events) join the outbox."""
        handler = HANDLERS.get(msg.type)
        try:
            if handler is None:
                raise XenStoreError("ENOSYS" if msg.type not in (XsType.ERROR, XsType.WATCH_EVENT)
                                    else "EINVAL", f"message type {msg.type}")
            p = msg.payload
            # Most requests are one NUL-terminated path: skip the general split.
            args = [p[:-1]] if p[-1:] == b"\0" and p.count(b"\0") == 1 else split_strings(p)
            payload = handler(self.store, self, msg, args)
            if len(payload) > XENSTORE_PAYLOAD_MAX:
                # e.g. DIRECTORY of a huge node: the client must use DIRECTORY_PART.
                raise XenStoreError("E2BIG", f"reply of {len(payload)} bytes")
            self._out.append(_HEADER_PACK(msg.type, msg.req_id, msg.tx_id, len(payload)) + payload)
        except XenStoreError as e:
            self._out.append(error_message(msg.req_id, msg.tx_id, e.name))
        except Exception:   # a bug here must not take the daemon down
            log.exception("xenstored: internal error on %s request from %s",
                          msg.type, self.name)
            self._out.append(error_message(msg.req_id, msg.tx_id, "EIO"))
        if self.initial_event is not None:
            path, token = self.initial_event
            self.initial_event = None
            self.deliver_watch_event(path, token)

    def deliver_watch_event(self, epath: str, token: bytes) -> None:
        if self.closed:
            return
        if len(self._out) >= self.store.quota.max_pending_events:
            self.dropped_events += 1
            if self.dropped_events == 1 or self.dropped_events % 1000 == 0:
                log.warning("xenstored: %s is not reading; dropped %d watch events",
                            self.name, self.dropped_events)
            return
        self._out.append(encode(XsType.WATCH_EVENT, 0, 0,
                                epath.encode() + b"\0" + token + b"\0"))
        self._event_waiting.set()

    # -- the transport loop --------------------------------------------------
    async def serve(self, receive_some: ReceiveSome, send_all: SendAll) -> None:
        """Serve this client until it disconnects or breaks the protocol."""
        self._send_all = send_all
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._event_writer)
                try:
                    await self._read_loop(receive_some)
                except _PeerGone:
                    pass
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.store.disconnect(self)
            self._out.clear()

    async def _read_loop(self, receive_some: ReceiveSome) -> None:
        decoder = Decoder(strict_types=False)
        batch = max(1, self.store.quota.max_outstanding)
        handle = self.handle
        while True:
            try:
                data = await receive_some(RECV_SIZE)
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if not data:
                return
            try:
                msgs = decoder.feed(data)
            except PayloadTooLong as e:
                log.warning("xenstored: closing %s: %s", self.name, e)
                self.protocol_error(str(e))
                return
            for i, msg in enumerate(msgs, 1):
                handle(msg)
                if i % batch == 0:
                    await self.flush()
            await self.flush()

    def protocol_error(self, why: str) -> None:
        """Hook for transports: the peer broke framing (ring sets ``error``)."""

    async def _event_writer(self) -> None:
        try:
            while True:
                await self._event_waiting.wait()
                self._event_waiting = trio.Event()
                await self.flush()
        except _PeerGone:
            pass   # the reader will see the closed stream too

    async def flush(self) -> None:
        """Write everything queued, in order; one writer at a time."""
        while self._flushing:
            if self._flushed is None:
                self._flushed = trio.Event()
            await self._flushed.wait()
        out = self._out
        if not out:
            return
        self._flushing = True
        try:
            while out:
                data = out[0] if len(out) == 1 else b"".join(out)
                out.clear()
                await self._send_all(data)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            out.clear()
            raise _PeerGone() from None
        finally:
            self._flushing = False
            if self._flushed is not None:
                self._flushed.set()
                self._flushed = None


class _PeerGone(Exception):
    """The client went away while we were writing to it."""


# -- dom0's in-process connection ---------------------------------------------

T = TypeVar("T")


class InProcessConnection:
    """dom0's own XenStore connection, in the daemon's trio loop.

    Same method names and meanings as the kernel client
    (:class:`domains.kernel.xenstore.XenStoreClient`), so toolstack code can
    take either.  Privileged unless built with ``privileged=False`` (tests use
    that to act as a guest without a ring).
    """

    def __init__(self, store: XenStore, domid: int = 0,
                 privileged: bool | None = None) -> None:
        self.store = store
        self.domid = domid
        self.privileged = (domid == 0) if privileged is None else privileged
        self.transactions: dict[int, Transaction] = {}
        self.closed = False
        self._watch_channels: dict[str, list[trio.MemorySendChannel]] = {}
        self._token_seq = 0

    def deliver_watch_event(self, epath: str, token: bytes) -> None:
        for ch in self._watch_channels.get(token.decode("utf-8", "replace"), ()):
            try:
                ch.send_nowait(WatchEvent(epath, token.decode("utf-8", "replace")))
            except trio.WouldBlock:
                log.warning("xenstored: in-process watcher %r too slow; event dropped",
                            token)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    async def _call(self, fn: Callable[..., T], *args) -> T:
        if self.closed:
            raise XenStoreError("EIO", "connection closed")
        await trio.lowlevel.checkpoint()
        return fn(self, *args)

    async def read(self, path: str, tx: int = 0) -> bytes:
        return await self._call(self.store.read, path, tx)

    async def write(self, path: str, value: bytes | str, tx: int = 0) -> None:
        v = value.encode() if isinstance(value, str) else bytes(value)
        await self._call(self.store.write, path, v, tx)

    async def mkdir(self, path: str, tx: int = 0) -> None:
        await self._call(self.store.mkdir, path, tx)

    async def rm(self, path: str, tx: int = 0) -> None:
        await self._call(self.store.rm, path, tx)

    async def directory(self, path: str, tx: int = 0) -> list[str]:
        return await self._call(self.store.directory, path, tx)

    async def exists(self, path: str, tx: int = 0) -> bool:
        try:
            await self.read(path, tx)
            return True
        except XenStoreError as e:
            if e.name == "ENOENT":
                return False
            raise

    async def get_perms(self, path: str, tx: int = 0) -> list[str]:
        return await self._call(self.store.get_perms, path, tx)

    async def set_perms(self, path: str, perms: list[str], tx: int = 0) -> None:
        await self._call(self.store.set_perms, path, perms, tx)

    async def transaction_start(self) -> int:
        return await self._call(self.store.transaction_start)

    async def transaction_end(self, tx: int, commit: bool = True) -> None:
        await self._call(self.store.transaction_end, tx, commit)

    async def run_transaction(self, body: Callable[[TxView], Awaitable[T]],
                              attempts: int = 16) -> T:
        """Run ``body(t)`` in a transaction, retrying it on EAGAIN."""
        return await run_transaction(self, body, attempts)

    async def watch(self, path: str, token: str | None = None,
                    buffer: int = 1024) -> ClientWatch:
        """Start watching; the initial event is already queued on return."""
        if token is None:
            self._token_seq += 1
            token = f"inproc-{id(self):x}-{self._token_seq}"
        send, receive = trio.open_memory_channel(buffer)
        self._watch_channels.setdefault(token, []).append(send)
        try:
            await self._call(self.store.watch, path, token.encode())
        except BaseException:
            self._watch_channels[token].remove(send)
            raise
        self.deliver_watch_event(path, token.encode())   # the initial event
        return ClientWatch(self, path, token, receive)   # the client's watch type serves here too

    async def unwatch(self, path: str, token: str) -> None:
        await self._call(self.store.unwatch, path, token.encode())
        for ch in self._watch_channels.pop(token, []):
            ch.close()

    async def get_domain_path(self, domid: int) -> str:
        return await self._call(lambda c, d: self.store.get_domain_path(d), domid)

    async def introduce(self, domid: int, mfn: int = 0, port: int = 0) -> None:
        self._need_priv("INTRODUCE")
        await self._call(lambda c: self.store.introduce_domain(domid, mfn, port))

    async def release(self, domid: int) -> None:
        self._need_priv("RELEASE")
        await self._call(lambda c: self.store.release_domain(domid))

    async def is_domain_introduced(self, domid: int) -> bool:
        self._need_priv("IS_DOMAIN_INTRODUCED")
        return await self._call(lambda c: self.store.is_domain_introduced(domid))

    async def reset_watches(self) -> None:
        await self._call(self.store.reset_watches)
        for chans in self._watch_channels.values():
            for ch in chans:
                ch.close()
        self._watch_channels.clear()

    async def control(self, *args: str) -> bytes:
        self._need_priv("CONTROL")
        return await self._call(self.store.control, [a.encode() for a in args])

    def _need_priv(self, what: str) -> None:
        if not self.privileged:
            raise XenStoreError("EACCES", f"{what} is for dom0 only")

    async def aclose(self) -> None:
        if not self.closed:
            self.store.disconnect(self)
            self.closed = True
            for chans in self._watch_channels.values():
                for ch in chans:
                    ch.close()
            self._watch_channels.clear()

    async def __aenter__(self) -> "InProcessConnection":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()
