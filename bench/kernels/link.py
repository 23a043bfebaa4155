"""The benchmark control link: msgpack maps over a Unix stream socket, under trio.

What this is
------------
The side channel that carries *commands and results* between the benchmark
driver, the dom0 bench kernel and the guest bench kernels. It is the
benchmark's serial console: nothing measured travels on it.

Invariant: every receive has a deadline (the caller's, or ``DEFAULT_TIMEOUT``),
so a domain that died or hung turns into a clear error naming the peer, never
a benchmark that waits forever.
"""

from __future__ import annotations

import socket
from typing import Any

import msgpack
import trio

DEFAULT_TIMEOUT = 30.0


class LinkClosed(ConnectionError):
    """The peer hung up (its domain died or finished)."""


class Link:
    """One peer on the control link: ``await send(map)``, ``await recv()``."""

    def __init__(self, stream: trio.abc.Stream, peer: str = "peer") -> None:
        self.stream = stream
        self.peer = peer
        self._unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)

    async def send(self, message: dict[str, Any]) -> None:
        await self.stream.send_all(msgpack.packb(message, use_bin_type=True))

    async def recv(self, timeout: float | None = DEFAULT_TIMEOUT) -> dict[str, Any]:
        """The next message; LinkClosed on EOF, trio.TooSlowError past ``timeout``."""
        with trio.fail_after(timeout if timeout is not None else float("inf")):
            while True:
                for message in self._unpacker:
                    return message
                data = await self.stream.receive_some(1 << 16)
                if not data:
                    raise LinkClosed(f"{self.peer} closed the control link")
                self._unpacker.feed(data)

    async def call(self, message: dict[str, Any], timeout: float = DEFAULT_TIMEOUT) -> Any:
        """Send a command and return the ``ok`` value of its answer (or raise its error)."""
        await self.send(message)
        return unwrap(await self.recv(timeout), self.peer, message.get("op"))

    async def aclose(self) -> None:
        await self.stream.aclose()


class RemoteError(RuntimeError):
    """A command failed in the domain that ran it; the message says where and why."""


def unwrap(reply: dict[str, Any], peer: str, op: Any) -> Any:
    if "error" in reply:
        raise RemoteError(f"{peer}: {op}: {reply['error']}")
    return reply.get("ok")


async def connect(path: str, peer: str) -> Link:
    return Link(await trio.open_unix_socket(path), peer)


def listen(path: str, backlog: int = 256) -> trio.SocketListener:
    """A trio listener on a fresh Unix socket at ``path`` (trio 0.22 has no helper)."""
    plain = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        plain.bind(path)
        plain.listen(backlog)
    except BaseException:
        plain.close()
        raise
    return trio.SocketListener(trio.socket.from_stdlib_socket(plain))
