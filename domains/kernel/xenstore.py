"""The domain kernel's XenStore client: what Linux calls xenbus_xs.

In Xen
    A guest kernel reaches xenstored through the ring page and event channel
    it was given at boot (start_info's ``store_mfn``/``store_evtchn``); dom0
    tools use xenstored's Unix socket.  Linux's ``drivers/xen/xenbus/
    xenbus_xs.c`` sends requests with fresh ``req_id`` values, lets many be
    in flight at once, matches replies by ``req_id``, turns XS_ERROR into an
    errno, hands WATCH_EVENTs to watch callbacks, and retries transactions
    that end in EAGAIN.

Here
    :class:`XenStoreClient` is that, in trio, over any byte stream: use
    :func:`open_socket_client` (privileged, a Unix socket path) or
    :func:`open_ring_client` (a shared ring page plus ``notify``/``wait``
    callables from the event-channel layer).  One background task reads
    replies; any number of tasks may call methods concurrently (requests are
    pipelined).  :meth:`XenStoreClient.watch` returns an async iterator of
    :class:`WatchEvent`; :meth:`XenStoreClient.run_transaction` retries a
    transaction body on EAGAIN.

    The same method names exist on dom0's in-process connection
    (``domains.dom0.xenstored.connection.InProcessConnection``), so code
    written against one runs against the other.

Invariant
    A reply is delivered only to the request with its ``req_id``; when the
    connection dies every waiting request fails with EIO instead of hanging.
"""

from __future__ import annotations

import itertools
import math
import socket as _socket
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Callable, TypeVar

import trio

from ipc.xs_ring import Notify, RingEndpoint, Wait
from ipc.xs_wire import (Decoder, Message, ProtocolError, XenStoreError,
                         XsType, encode, join_strings, split_strings)

__all__ = ["XenStoreClient", "WatchEvent", "ClientWatch", "TxView",
           "run_transaction", "open_socket_client", "open_ring_client"]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """A WATCH_EVENT: the path that changed and the watch's token."""

    path: str
    token: str


class _Pending:
    __slots__ = ("event", "reply")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.reply: Message | None = None


class ClientWatch:
    """The events of one watch; ``async for ev in w`` or ``await w.next()``."""

    def __init__(self, client: "XenStoreClient", path: str, token: str,
                 receive: trio.MemoryReceiveChannel) -> None:
        self.client, self.path, self.token = client, path, token
        self._receive = receive

    def __aiter__(self) -> "ClientWatch":
        return self

    async def __anext__(self) -> WatchEvent:
        try:
            return await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise StopAsyncIteration from None

    async def next(self, timeout: float = math.inf) -> WatchEvent:
        with trio.fail_after(timeout):
            return await self.__anext__()

    def take_queued(self) -> list[WatchEvent]:
        """Every event that has already arrived, without waiting (maybe none)."""
        out = []
        while True:
            try:
                out.append(self._receive.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                return out

    async def unwatch(self) -> None:
        await self.client.unwatch(self.path, self.token)

    async def __aenter__(self) -> "ClientWatch":
        return self

    async def __aexit__(self, *exc) -> None:
        if not self.client.closed:
            try:
                await self.unwatch()
            except (XenStoreError, OSError):
                pass


class XenStoreClient:
    """Pipelined XenStore client over ``receive_some``/``send_all``."""

    def __init__(self, receive_some: Callable[[int], Awaitable[bytes]],
                 send_all: Callable[[bytes], Awaitable[None]],
                 *, watch_buffer: int = 1024) -> None:
        self._receive_some = receive_some
        self._send_all = send_all
        self._req_ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._watches: dict[str, list[trio.MemorySendChannel]] = {}
        self._token_seq = itertools.count(1)
        self._watch_buffer = watch_buffer
        self.closed = False
        self.close_reason = ""
        self.dropped_events = 0

    # -- plumbing -------------------------------------------------------------
    async def run_reader(self) -> None:
        """Read replies and events until the stream ends; run in a nursery."""
        decoder = Decoder(strict_types=False)
        try:
            while True:
                data = await self._receive_some(65536)
                if not data:
                    self._fail("xenstored closed the connection")
                    return
                for msg in decoder.feed(data):
                    self._dispatch(msg)
        except ProtocolError as e:
            self._fail(f"bad data from xenstored: {e}")
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as e:
            self._fail(f"connection lost: {e!r}")
        finally:
            if not self.closed:
                self._fail("client closed")

    def _dispatch(self, msg: Message) -> None:
        if msg.type == XsType.WATCH_EVENT:
            parts = split_strings(msg.payload)
            if len(parts) < 2:
                return
            path, token = parts[0].decode("utf-8", "replace"), parts[1].decode("utf-8", "replace")
            for ch in self._watches.get(token, ()):
                try:
                    ch.send_nowait(WatchEvent(path, token))
                except trio.WouldBlock:
                    self.dropped_events += 1
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
            return
        pending = self._pending.pop(msg.req_id, None)
        if pending is not None:
            pending.reply = msg
            pending.event.set()

    def _fail(self, why: str) -> None:
        self.closed = True
        self.close_reason = why
        for p in self._pending.values():
            p.event.set()
        self._pending.clear()
        for chans in self._watches.values():
            for ch in chans:
                ch.close()
        self._watches.clear()

    async def request(self, type_: int, payload: bytes, tx: int = 0) -> bytes:
        """Send one request and return the reply payload (or raise)."""
        if self.closed:
            raise XenStoreError("EIO", f"XenStore connection closed: {self.close_reason}")
        req_id = next(self._req_ids) & 0xFFFFFFFF
        pending = self._pending[req_id] = _Pending()
        try:
            await self._send_all(encode(type_, req_id, tx, payload))
            await pending.event.wait()
        finally:
            self._pending.pop(req_id, None)
        reply = pending.reply
        if reply is None:
            raise XenStoreError("EIO", f"XenStore connection closed: {self.close_reason}")
        if reply.type == XsType.ERROR:
            parts = split_strings(reply.payload)
            raise XenStoreError(parts[0].decode("ascii", "replace") if parts else "EIO")
        if reply.type != type_:
            raise XenStoreError("EIO", f"reply type {reply.type} to request type {type_}")
        return reply.payload

    # -- operations -------------------------------------------------------------
    async def read(self, path: str, tx: int = 0) -> bytes:
        return await self.request(XsType.READ, join_strings(path), tx)

    async def write(self, path: str, value: bytes | str, tx: int = 0) -> None:
        v = value.encode() if isinstance(value, str) else bytes(value)
        await self.request(XsType.WRITE, path.encode() + b"\0" + v, tx)

    async def mkdir(self, path: str, tx: int = 0) -> None:
        await self.request(XsType.MKDIR, join_strings(path), tx)

    async def rm(self, path: str, tx: int = 0) -> None:
        await self.request(XsType.RM, join_strings(path), tx)

    async def directory(self, path: str, tx: int = 0) -> list[str]:
        reply = await self.request(XsType.DIRECTORY, join_strings(path), tx)
        return [p.decode() for p in split_strings(reply) if p]

    async def exists(self, path: str, tx: int = 0) -> bool:
        try:
            await self.read(path, tx)
            return True
        except XenStoreError as e:
            if e.name == "ENOENT":
                return False
            raise

    async def get_perms(self, path: str, tx: int = 0) -> list[str]:
        reply = await self.request(XsType.GET_PERMS, join_strings(path), tx)
        return [p.decode() for p in split_strings(reply)]

    async def set_perms(self, path: str, perms: list[str], tx: int = 0) -> None:
        await self.request(XsType.SET_PERMS, join_strings(path, *perms), tx)

    async def transaction_start(self) -> int:
        reply = await self.request(XsType.TRANSACTION_START, b"\0")
        return int(split_strings(reply)[0])

    async def transaction_end(self, tx: int, commit: bool = True) -> None:
        await self.request(XsType.TRANSACTION_END, b"T\0" if commit else b"F\0", tx)

    async def run_transaction(self, body: Callable[["TxView"], Awaitable[T]],
                              attempts: int = 16) -> T:
        """Run ``body(t)`` in a transaction; start over on EAGAIN."""
        return await run_transaction(self, body, attempts)

    async def watch(self, path: str, token: str | None = None) -> ClientWatch:
        """Set a watch; its first event (``path`` itself) follows at once."""
        if token is None:
            token = f"kw{next(self._token_seq)}"
        send, receive = trio.open_memory_channel(self._watch_buffer)
        self._watches.setdefault(token, []).append(send)
        try:
            await self.request(XsType.WATCH, join_strings(path, token))
        except BaseException:
            chans = self._watches.get(token, [])
            if send in chans:
                chans.remove(send)
            raise
        return ClientWatch(self, path, token, receive)

    async def unwatch(self, path: str, token: str) -> None:
        await self.request(XsType.UNWATCH, join_strings(path, token))
        for ch in self._watches.pop(token, []):
            ch.close()

    async def reset_watches(self) -> None:
        await self.request(XsType.RESET_WATCHES, b"\0")
        for chans in self._watches.values():
            for ch in chans:
                ch.close()
        self._watches.clear()

    async def get_domain_path(self, domid: int) -> str:
        reply = await self.request(XsType.GET_DOMAIN_PATH, join_strings(str(domid)))
        return split_strings(reply)[0].decode()

    async def introduce(self, domid: int, mfn: int = 0, port: int = 0) -> None:
        await self.request(XsType.INTRODUCE, join_strings(str(domid), str(mfn), str(port)))

    async def release(self, domid: int) -> None:
        await self.request(XsType.RELEASE, join_strings(str(domid)))

    async def is_domain_introduced(self, domid: int) -> bool:
        reply = await self.request(XsType.IS_DOMAIN_INTRODUCED, join_strings(str(domid)))
        return reply[:1] == b"T"

    async def control(self, *args: str) -> bytes:
        return await self.request(XsType.CONTROL, join_strings(*args))


class TxView:
    """A client bound to one transaction: ``await t.read(path)`` and so on."""

    def __init__(self, client, tx: int) -> None:
        self._c, self.tx = client, tx

    async def read(self, path: str) -> bytes:
        return await self._c.read(path, self.tx)

    async def write(self, path: str, value: bytes | str) -> None:
        await self._c.write(path, value, self.tx)

    async def mkdir(self, path: str) -> None:
        await self._c.mkdir(path, self.tx)

    async def rm(self, path: str) -> None:
        await self._c.rm(path, self.tx)

    async def directory(self, path: str) -> list[str]:
        return await self._c.directory(path, self.tx)

    async def exists(self, path: str) -> bool:
        return await self._c.exists(path, self.tx)

    async def get_perms(self, path: str) -> list[str]:
        return await self._c.get_perms(path, self.tx)

    async def set_perms(self, path: str, perms: list[str]) -> None:
        await self._c.set_perms(path, perms, self.tx)


async def run_transaction(client, body: Callable[[TxView], Awaitable[T]],
                          attempts: int = 16) -> T:
    """Linux xenbus's loop: start, run the body, end; EAGAIN -> again."""
    for _ in range(attempts):
        tx = await client.transaction_start()
        try:
            result = await body(TxView(client, tx))
        except BaseException:
            with trio.CancelScope(shield=True):
                try:
                    await client.transaction_end(tx, False)
                except (XenStoreError, OSError):
                    pass
            raise
        try:
            await client.transaction_end(tx, True)
            return result
        except XenStoreError as e:
            if e.name != "EAGAIN":
                raise
    raise XenStoreError("EAGAIN", f"transaction still conflicting after {attempts} attempts")


# -- transports ----------------------------------------------------------------

class _LockedSocket:
    """send_all for a trio socket shared by many tasks (frames stay whole)."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self._lock = trio.StrictFIFOLock()

    async def send_all(self, data: bytes) -> None:
        async with self._lock:
            view = memoryview(data)
            while view:
                n = await self.sock.send(view)
                view = view[n:]

    async def receive_some(self, n: int) -> bytes:
        return await self.sock.recv(n)


@asynccontextmanager
async def open_socket_client(path: str) -> AsyncIterator[XenStoreClient]:
    """A client on xenstored's Unix socket (``<run-dir>/xenstored/socket``)."""
    sock = trio.socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        await sock.connect(path)
        stream = _LockedSocket(sock)
        client = XenStoreClient(stream.receive_some, stream.send_all)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.run_reader)
            try:
                yield client
            finally:
                nursery.cancel_scope.cancel()
    finally:
        sock.close()


@asynccontextmanager
async def open_ring_client(buf, notify: Notify, wait: Wait) -> AsyncIterator[XenStoreClient]:
    """A guest's client on its xenstore ring page (see ipc.xs_ring)."""
    endpoint = RingEndpoint(buf, notify, wait, side="guest")
    client = XenStoreClient(endpoint.receive_some, endpoint.send_all)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(endpoint.run)
            nursery.start_soon(client.run_reader)
            try:
                yield client
            finally:
                nursery.cancel_scope.cancel()
    finally:
        endpoint.close()
