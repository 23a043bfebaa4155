"""The guest bench kernel: a domU that runs measuring loops on command.

What this is
------------
In Xen a micro-benchmark of the hypervisor is a small guest kernel that
hammers one hypercall in a loop and reads the clock. This is that kernel for
microxen. It boots like any guest (``domains.kernel.boot``), connects to the
dom0 bench kernel's control socket (``bench=<path>`` on its cmdline), says
hello with the moment its ``main`` started, and then runs one loop per
command, answering with raw nanosecond samples. dom0 decides what to measure;
the guest only measures.

Loops (each command's timed section uses the guest kernel library and the
hypervisor, nothing else):

* ``ping`` / ``pong``: an interdomain event-channel round trip. The pinger
  notifies and waits for its port to fire; the ponger waits and notifies
  back. ``mode`` picks ``await port.notify()`` or ``port.notify_nowait()``.
* ``hypercall_seq``: one null hypercall (``sched_op yield``) at a time.
* ``hypercall_pipe``: ``window`` trio tasks each looping on the null
  hypercall, so ``window`` calls are in flight on the one channel.
* ``map_single`` / ``map_batch``: GNTTABOP_map_grant_ref then unmap, one
  grant or a batch per hypercall.
* ``copy``: GNTTABOP_copy of whole pages from another domain's grants into
  our own frames, a batch per hypercall, ``window`` hypercalls in flight.

Diagnostic twins (``ping_raw``, ``pong_raw``, ``hypercall_raw``,
``hypercall_raw_pipe``) run the same loops on the bare hypercall socket with
blocking receives, bypassing trio and the library's reader task, so a
benchmark can tell the guest library's cost from the hypervisor's.

Invariant: an event-channel loop never starts with a stray pending event (the
bind's own raise is consumed), so every wait in a ping pairs with exactly one
notify of the peer.

Where this differs from Xen: a Xen guest would read the TSC; we read
CLOCK_MONOTONIC (``perf_counter_ns``), which every process on the host shares,
so dom0 can subtract a guest's timestamp from its own.
"""

from __future__ import annotations

import faulthandler
import os
import select
import time
import traceback
from typing import Any, Awaitable, Callable

import msgpack
import trio

from bench.kernels.link import Link, LinkClosed, connect
from domains.kernel.boot import Kernel, boot
from domains.kernel.events import Port
from ipc import channel
from ipc.grant_abi import GNTCOPY_source_gref, GNTST_okay
from ipc.page import PAGE_SIZE

clock = time.perf_counter_ns
LOOP_SLACK_S = 10.0  # a loop that takes this long past its expected time is stuck


class Agent:
    """What one guest keeps between commands: its ports, pages and control link."""

    def __init__(self, k: Kernel, link: Link) -> None:
        self.k = k
        self.link = link
        self.ports: dict[int, Port] = {}
        self.granted: list[Any] = []   # pages we granted to a peer
        self.copy_dest: list[Any] = []  # our own frames a grant copy writes into

    def port(self, number: int) -> Port:
        try:
            return self.ports[number]
        except KeyError:
            raise ValueError(f"port {number} was not adopted or bound by this guest") from None


# --- event channels -------------------------------------------------------------

async def op_adopt(a: Agent, cmd: dict) -> int:
    """Take a port dom0 allocated in our table for a peer (alloc_unbound on our behalf)."""
    port = a.k.events.adopt(cmd["port"])
    a.ports[port.port] = port
    return port.port


async def op_bind(a: Agent, cmd: dict) -> int:
    """Bind to the peer's unbound port; swallow the raise Xen does on bind."""
    port = await a.k.events.bind_interdomain(cmd["remote_dom"], cmd["remote_port"])
    # bind_interdomain raises our new port so an early send is never lost. The
    # upcall precedes the reply on our one ordered channel, so it has been seen
    # by now; a round trip makes sure, then we consume it.
    await a.k.hv.call("sched_op", "yield")
    port.fired()
    a.ports[port.port] = port
    return port.port


def _check_mode(mode: Any) -> None:
    if mode not in ("await", "nowait"):
        raise ValueError(f"mode must be 'await' or 'nowait', got {mode!r}")


async def op_ping(a: Agent, cmd: dict) -> list[int]:
    """Notify the peer, wait for its answer; one sample per round trip."""
    _check_mode(cmd["mode"])
    port = a.port(cmd["port"])
    total, warmup = cmd["n"] + cmd["warmup"], cmd["warmup"]
    samples = [0] * total
    wait = port.wait
    with trio.fail_after(LOOP_SLACK_S + total * 0.005):
        if cmd["mode"] == "await":
            notify = port.notify
            for i in range(total):
                t0 = clock()
                await notify()
                await wait()
                samples[i] = clock() - t0
        else:
            notify_nowait = port.notify_nowait
            for i in range(total):
                t0 = clock()
                notify_nowait()
                await wait()
                samples[i] = clock() - t0
    return samples[warmup:]


async def op_pong(a: Agent, cmd: dict) -> int:
    """Wait for the peer's notification and answer it, ``n + warmup`` times."""
    _check_mode(cmd["mode"])
    port = a.port(cmd["port"])
    total = cmd["n"] + cmd["warmup"]
    wait = port.wait
    with trio.fail_after(LOOP_SLACK_S + total * 0.005):
        if cmd["mode"] == "await":
            notify = port.notify
            for _ in range(total):
                await wait()
                await notify()
        else:
            notify_nowait = port.notify_nowait
            for _ in range(total):
                await wait()
                notify_nowait()
    return total


# --- the same loops without trio (diagnostic) ------------------------------------
#
# These block the whole kernel on a plain zmq recv, bypassing the kernel
# library's reader task, trio events and task switches. Compared with the
# trio loops above they say how much of a round trip is the guest library and
# how much is the hypervisor and ZeroMQ.

class _Blocking:
    """The hypercall socket used synchronously, for the length of one loop."""

    def __init__(self, a: Agent, timeout_s: float = 5.0) -> None:
        self.hv = a.k.hv
        self.sock = a.k.hv.sock
        self.shared_info = a.k.events.shared_info
        self.doorbell = a.k.events.doorbell_fd
        self.timeout_ms = int(timeout_s * 1000)

    def __enter__(self) -> "_Blocking":
        self.hv.drain()   # nothing of the library's may be left waiting
        self.sock.rcvtimeo = self.timeout_ms
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.rcvtimeo = -1
        self.hv.drain()   # re-arm the edge-triggered FD for the reader task

    def call(self, req_id: int, hypercall: str, cmd: str, args: dict) -> Any:
        self.sock.send(channel.encode_call(req_id, hypercall, cmd, args))
        while True:
            msg = msgpack.unpackb(self.sock.recv(), raw=False, strict_map_key=False)
            if msg[0] == channel.REPLY and msg[1] == req_id:
                return msg

    def send_nowait(self, port: Port) -> None:
        """By hand: down the port's line if it has one, else the doorbell
        (a send request in shared_info and one eventfd write)."""
        if port.send_w >= 0:
            os.write(port.send_w, b"\1")
            return
        self.shared_info.request_send(port.port)
        os.eventfd_write(self.doorbell, 1)

    def wait_port(self, port: Port) -> None:
        """Block until ``port`` is signalled: on its line if it has one, else
        on the upcall line until an upcall shows it pending.

        An event the library's reader saw before this loop took over is still
        latched in the Port: consume that first, or we would wait for an
        upcall that already came.
        """
        if port.fired():
            return
        if port.line_r >= 0:
            while True:
                if not select.select([port.line_r], [], [], self.timeout_ms / 1000)[0]:
                    raise TimeoutError(f"nothing on the line of port {port.port}")
                if port.fired():
                    return
        line, si, number = self.hv.upcall_fd, self.shared_info, port.port
        while True:
            if not select.select([line], [], [], self.timeout_ms / 1000)[0]:
                raise TimeoutError(f"no upcall for port {number}")
            try:
                os.eventfd_read(line)
            except BlockingIOError:
                continue
            if number in list(si.take_pending()):
                return


async def op_ping_raw(a: Agent, cmd: dict) -> list[int]:
    port = a.port(cmd["port"])
    total, warmup = cmd["n"] + cmd["warmup"], cmd["warmup"]
    samples = [0] * total
    with _Blocking(a) as b:
        for i in range(total):
            t0 = clock()
            b.send_nowait(port)
            b.wait_port(port)
            samples[i] = clock() - t0
    return samples[warmup:]


async def op_pong_raw(a: Agent, cmd: dict) -> int:
    port = a.port(cmd["port"])
    total = cmd["n"] + cmd["warmup"]
    with _Blocking(a) as b:
        for _ in range(total):
            b.wait_port(port)
            b.send_nowait(port)
    return total


async def op_hypercall_raw(a: Agent, cmd: dict) -> list[int]:
    total, warmup = cmd["n"] + cmd["warmup"], cmd["warmup"]
    samples = [0] * total
    with _Blocking(a) as b:
        for i in range(total):
            t0 = clock()
            b.call(1 << 40 | i, "sched_op", "yield", {})
            samples[i] = clock() - t0
    return samples[warmup:]


async def op_hypercall_raw_pipe(a: Agent, cmd: dict) -> int:
    """``window`` null hypercalls in flight on the bare socket: the hypervisor's ceiling."""
    total, window = cmd["n"], max(1, min(cmd["window"], cmd["n"]))
    msgs = [channel.encode_call(1 << 41 | i, "sched_op", "yield", {}) for i in range(total)]
    with _Blocking(a) as b:
        send, recv = b.sock.send, b.sock.recv
        t0 = clock()
        for i in range(window):
            send(msgs[i])
        sent = window
        for _ in range(total):
            recv()
            if sent < total:
                send(msgs[sent])
                sent += 1
        return clock() - t0


# --- null hypercalls -------------------------------------------------------------

async def op_hypercall_seq(a: Agent, cmd: dict) -> list[int]:
    call = a.k.hv.call
    total, warmup = cmd["n"] + cmd["warmup"], cmd["warmup"]
    samples = [0] * total
    with trio.fail_after(LOOP_SLACK_S + total * 0.005):
        for i in range(total):
            t0 = clock()
            await call("sched_op", "yield")
            samples[i] = clock() - t0
    return samples[warmup:]


async def _pipelined(total: int, window: int, one: Callable[[], Awaitable[Any]]) -> int:
    """Run ``one()`` ``total`` times with ``window`` in flight; elapsed ns."""
    remaining = total

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await one()

    t0 = clock()
    with trio.fail_after(LOOP_SLACK_S + total * 0.005):
        async with trio.open_nursery() as nursery:
            for _ in range(max(1, min(window, total))):
                nursery.start_soon(worker)
    return clock() - t0


async def op_hypercall_pipe(a: Agent, cmd: dict) -> int:
    call = a.k.hv.call
    await _pipelined(cmd["warmup"], cmd["window"], lambda: call("sched_op", "yield"))
    return await _pipelined(cmd["n"], cmd["window"], lambda: call("sched_op", "yield"))


# --- grants ----------------------------------------------------------------------

def _pattern(i: int) -> bytes:
    return bytes([(i * 37 + 11) & 0xFF]) * PAGE_SIZE


async def op_grant_pages(a: Agent, cmd: dict) -> list[int]:
    """Populate ``nr`` frames, fill each with a known pattern, grant them to ``peer``."""
    pages = await a.k.memory.alloc(cmd["nr"])
    refs = []
    for i, page in enumerate(pages):
        page.map[:] = _pattern(i)
        refs.append(a.k.grants.grant_access(cmd["peer"], page.gfn, readonly=False))
    a.granted = pages
    return refs


async def op_map_single(a: Agent, cmd: dict) -> dict:
    """map_grant_ref + unmap_grant_ref of one grant per hypercall, ``n`` times."""
    grants = a.k.grants
    dom, refs = cmd["dom"], cmd["refs"]
    m = await grants.map(dom, refs[0])
    ok = m.map[:PAGE_SIZE] == _pattern(0)
    await grants.unmap(m)
    total, warmup = cmd["n"] + cmd["warmup"], cmd["warmup"]
    with trio.fail_after(LOOP_SLACK_S + total * 0.01):
        for i in range(total):
            if i == warmup:
                t0 = clock()
            m = await grants.map(dom, refs[i % len(refs)])
            await grants.unmap(m)
    return {"elapsed_ns": clock() - t0, "pairs": cmd["n"], "content_ok": ok}


async def op_map_batch(a: Agent, cmd: dict) -> dict:
    """map_many of every ref in one hypercall, then unmap_many, ``n`` times."""
    grants = a.k.grants
    batch = [(cmd["dom"], r) for r in cmd["refs"]]
    ms = await grants.map_many(batch)
    ok = all(m.map[:PAGE_SIZE] == _pattern(i) for i, m in enumerate(ms))
    await grants.unmap_many(ms)
    total, warmup = cmd["n"] + cmd["warmup"], cmd["warmup"]
    with trio.fail_after(LOOP_SLACK_S + total * 0.05):
        for i in range(total):
            if i == warmup:
                t0 = clock()
            ms = await grants.map_many(batch)
            await grants.unmap_many(ms)
    return {"elapsed_ns": clock() - t0, "batches": cmd["n"], "batch": len(batch),
            "content_ok": ok}


async def op_copy(a: Agent, cmd: dict) -> dict:
    """GNTTABOP_copy of ``len(refs)`` whole pages per hypercall into our own frames.

    ``window == 1``: per-hypercall samples; otherwise the elapsed time of ``n``
    hypercalls with ``window`` in flight.
    """
    refs, dom = cmd["refs"], cmd["dom"]
    if len(a.copy_dest) < len(refs):
        a.copy_dest += await a.k.memory.alloc(len(refs) - len(a.copy_dest))
    ops = [{"source": {"domid": dom, "ref": ref, "offset": 0},
            "dest": {"gfn": a.copy_dest[i].gfn, "offset": 0},
            "len": PAGE_SIZE, "flags": GNTCOPY_source_gref}
           for i, ref in enumerate(refs)]
    for page in a.copy_dest:
        page.map[:] = bytes(PAGE_SIZE)
    status = await a.k.grants.copy(ops)
    if any(s != GNTST_okay for s in status):
        raise RuntimeError(f"grant copy failed: statuses {status}")
    ok = all(a.copy_dest[i].map[:PAGE_SIZE] == _pattern(i) for i in range(len(refs)))
    call = a.k.hv.call
    total, warmup, window = cmd["n"] + cmd["warmup"], cmd["warmup"], cmd["window"]
    if window <= 1:
        samples = [0] * total
        with trio.fail_after(LOOP_SLACK_S + total * 0.02):
            for i in range(total):
                t0 = clock()
                await call("grant_table_op", "copy", ops=ops)
                samples[i] = clock() - t0
        return {"samples": samples[warmup:], "bytes_per_call": len(refs) * PAGE_SIZE,
                "content_ok": ok}
    await _pipelined(warmup, window, lambda: call("grant_table_op", "copy", ops=ops))
    elapsed = await _pipelined(cmd["n"], window, lambda: call("grant_table_op", "copy", ops=ops))
    return {"elapsed_ns": elapsed, "calls": cmd["n"], "bytes_per_call": len(refs) * PAGE_SIZE,
            "content_ok": ok}


async def op_exit(a: Agent, cmd: dict) -> None:
    return None


OPS: dict[str, Callable[[Agent, dict], Awaitable[Any]]] = {
    "adopt": op_adopt,
    "bind": op_bind,
    "ping": op_ping,
    "pong": op_pong,
    "hypercall_seq": op_hypercall_seq,
    "hypercall_raw": op_hypercall_raw,
    "hypercall_raw_pipe": op_hypercall_raw_pipe,
    "ping_raw": op_ping_raw,
    "pong_raw": op_pong_raw,
    "hypercall_pipe": op_hypercall_pipe,
    "grant_pages": op_grant_pages,
    "map_single": op_map_single,
    "map_batch": op_map_batch,
    "copy": op_copy,
    "exit": op_exit,
}


async def main(k: Kernel) -> None:
    t_main = clock()   # boot is done: the hypervisor answered our boot hypercall
    path = k.cmdline.get("bench")
    if not path:
        raise ValueError("bench guest needs bench=<dom0 control socket> on its cmdline")
    link = await connect(path, "dom0")
    await link.send({"hello": k.domid, "t_main": t_main})
    agent = Agent(k, link)
    while True:
        try:
            cmd = await link.recv(timeout=None)
        except LinkClosed:
            return
        op = cmd.get("op")
        handler = OPS.get(op)
        try:
            if handler is None:
                raise ValueError(f"unknown bench op {op!r}; known: {', '.join(OPS)}")
            reply = {"ok": await handler(agent, cmd)}
        except Exception as exc:  # reported to dom0, which names this guest in its error
            traceback.print_exc()
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        await link.send(reply)
        if op == "exit":
            return


def kernel_main(start: dict, fds: dict) -> int:
    faulthandler.enable()
    return boot(start, fds, main)
