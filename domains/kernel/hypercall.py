"""The guest side of the hypercall channel, under trio.

A domain kernel calls `await hv.call("event_channel_op", "send", port=3)` and
gets the result or a HypercallError.  Calls are pipelined: each has a request
id, and one reader task matches replies to callers.  Upcalls do not come on
this channel: the hypervisor raises them on an eventfd the domain was born
with (its interrupt line), and a second reader passes them to the
event-channel code.  Nor do sends that wait for no answer: those go by the
doorbell (domains/kernel/events.py).

ZeroMQ under trio: the socket's `zmq.FD` is *edge*-triggered.  It becomes
readable when ZeroMQ's internal state changes, and any send, recv or EVENTS
query may consume that edge.  So after every send we look at `zmq.EVENTS`
ourselves and drain anything that arrived, and the reader does the same after
every wake-up; otherwise a reply that landed during a send would sit unread
while the reader sleeps.  `drain()` is synchronous and never blocks, so the
sender may run it inline.
"""

from __future__ import annotations

import itertools
import os
import socket
from typing import Any, Callable

import msgpack
import trio
import zmq

from ipc import channel, fdpass
from ipc.channel import HypercallError


_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)   # plain ints: pyzmq's enums are slow


class _Pending:
    __slots__ = ("event", "value", "error", "fds")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.value: Any = None
        self.error: HypercallError | None = None
        self.fds: list[int] = []


class Hypervisor:
    """One domain's connection to the hypervisor."""

    def __init__(self, sock: zmq.Socket, fdsock: socket.socket,
                 on_upcall: Callable[[], None], upcall_fd: int) -> None:
        self.sock = sock
        self.upcall_fd = upcall_fd
        self.fdsock = fdsock
        self.fdsock.settimeout(5)   # descriptors are sent before the reply: never a real wait
        self.on_upcall = on_upcall
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._fd = sock.getsockopt(zmq.FD)

    async def call(self, hypercall: str, cmd: str, **args: Any) -> Any:
        value, fds = await self.call_fds(hypercall, cmd, **args)
        for fd in fds:   # a caller that expected no pages gets none
            os.close(fd)
        return value

    async def call_fds(self, hypercall: str, cmd: str, **args: Any) -> tuple[Any, list[int]]:
        """A hypercall whose reply may carry page descriptors."""
        req_id = next(self._ids)
        pending = self._pending[req_id] = _Pending()
        try:
            await self._send(channel.encode_call(req_id, hypercall, cmd, args))
            await pending.event.wait()
        finally:
            self._pending.pop(req_id, None)
        if pending.error is not None:
            raise pending.error
        return pending.value, pending.fds

    async def _send(self, data: bytes) -> None:
        while True:
            try:
                self.sock.send(data, zmq.NOBLOCK)
                break
            except zmq.Again:
                await trio.sleep(0.001)
        self.drain()

    def drain(self) -> None:
        """Handle every message that has arrived, without blocking.

        After any reply, the upcall line is looked at too: the hypervisor
        raises it before it sends any reply that follows, so once a reply is
        handled here the events raised before it are too, as when both came
        on one channel.  (With no reply there is nothing to keep in order,
        and the upcall reader will see the line.)
        """
        sock = self.sock
        replied = False
        while sock.getsockopt(_EVENTS) & _POLLIN:
            try:
                data = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            replied = True
            msg = msgpack.unpackb(data, raw=False, strict_map_key=False)
            _, req_id, err, result = msg[:4]
            pending = self._pending.get(req_id)
            fds = fdpass.recv_fds(self.fdsock, req_id, msg[4]) if len(msg) > 4 else []
            if pending is None:
                for fd in fds:
                    os.close(fd)
                if err:
                    print(f"hypercall {req_id} failed: {result}", flush=True)
                continue
            if err:
                pending.error = HypercallError(err, result)
            else:
                pending.value = result
                pending.fds = fds
            pending.event.set()
        if replied:
            self.take_upcall()

    def take_upcall(self) -> None:
        """If the upcall line is raised, lower it and deliver the upcall."""
        try:
            os.eventfd_read(self.upcall_fd)
        except BlockingIOError:
            return
        self.on_upcall()

    async def run(self) -> None:
        """The reader tasks: wake on the socket's edge (then drain), and on the
        upcall line."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._upcalls)
            while True:
                self.drain()
                await trio.lowlevel.wait_readable(self._fd)

    async def _upcalls(self) -> None:
        while True:
            await trio.lowlevel.wait_readable(self.upcall_fd)
            self.take_upcall()
