"""XenStore benchmark: latency and throughput of xenstored, with baselines.

What it measures (each server runs in its own process, as in the system):

* READ and WRITE latency (median, p99, in µs) and throughput over the Unix
  socket, against a raw request/response round trip on the same kind of
  socket served by the same framework (a trio echo server) in the same run.
  The ratio says what XenStore itself costs on top of the transport.
* The same over the shared-memory ring from another process, against a raw
  echo over the same ring code and kicks.
* Pipelined throughput (32 requests in flight) on the socket.
* Watch-event fan-out: one WRITE, 100 watchers on separate connections;
  time until all 100 have their event.

* READ and WRITE latency from a real guest domain over its ring, through the
  whole system (hypervisor event channels, dom0's xenstored).

``run(ctx)`` returns Figures for ``run.py bench xenstore``; the measuring
functions return dicts ``{"name", "value", "unit"}`` (comparisons also carry
``{"baseline", "baseline_value", "ratio"}``).
"""

from __future__ import annotations

import mmap
import multiprocessing as mp
import os
import socket
import statistics
import struct
import sys
import tempfile
import time

import trio

from ipc.xs_wire import XsType, encode

N_OPS = 4000
WARMUP = 200
ROUNDS = 4
WATCHERS = 100
FANOUT_ROUNDS = 40


# -- servers (child processes) ------------------------------------------------------

def _socket_echo_server(path: str) -> None:
    async def main():
        listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await listener.bind(path)
        listener.listen(16)
        async with trio.open_nursery() as n:
            while True:
                s, _ = await listener.accept()

                async def echo(s=s):
                    with s:
                        while True:
                            data = await s.recv(65536)
                            if not data:
                                return
                            view = memoryview(data)
                            while view:
                                view = view[await s.send(view):]
                n.start_soon(echo)
    trio.run(main)


def _xenstored_socket_server(path: str) -> None:
    from domains.dom0.xenstored import XenStore, serve_socket
    trio.run(serve_socket, XenStore(), path)


def _kick_pair(sock: socket.socket):
    sock.setblocking(False)
    tsock = trio.socket.from_stdlib_socket(sock)

    async def notify():
        await trio.lowlevel.checkpoint()
        try:
            sock.send(b"!")
        except BlockingIOError:
            pass

    async def wait():
        if not await tsock.recv(4096):
            await trio.sleep_forever()
    return notify, wait


def _ring_server(kind: str, page_fd: int, kick: socket.socket) -> None:
    page = mmap.mmap(page_fd, 4096)
    notify, wait = _kick_pair(kick)

    async def echo():
        from ipc.xs_ring import RingEndpoint
        ep = RingEndpoint(page, notify, wait, side="server")
        async with trio.open_nursery() as n:
            n.start_soon(ep.run)
            while True:
                await ep.send_all(await ep.receive_some())

    async def xenstored():
        from domains.dom0.xenstored import XenStore, serve_ring
        store = XenStore()
        # Give the guest a home (normally the toolstack's job).
        dom0 = store.connect()
        await dom0.mkdir("/local/domain/1")
        await dom0.set_perms("/local/domain/1", ["n1"])
        await dom0.write("/local/domain/1/bench", "x" * 16)
        await serve_ring(store, 1, page, notify, wait)

    trio.run(echo if kind == "echo" else xenstored)


# -- clients ----------------------------------------------------------------------------

def _recv_frame(s: socket.socket, buf: bytearray) -> bytes:
    while True:
        if len(buf) >= 16:
            length = struct.unpack_from("<I", buf, 12)[0]
            if len(buf) >= 16 + length:
                frame = bytes(buf[:16 + length])
                del buf[:16 + length]
                return frame
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError("server closed")
        buf += chunk


def _wait_for_socket(path: str, timeout: float = 20.0) -> socket.socket:
    deadline = time.monotonic() + timeout
    while True:
        try:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(path)
            return s
        except OSError:
            s.close()
            if time.monotonic() > deadline:
                raise TimeoutError(f"no server at {path}")
            time.sleep(0.02)


def _latencies(s: socket.socket, frame: bytes, n: int) -> list[float]:
    buf = bytearray()
    for _ in range(WARMUP):
        s.sendall(frame)
        _recv_frame(s, buf)
    out = []
    pc = time.perf_counter_ns
    for _ in range(n):
        t0 = pc()
        s.sendall(frame)
        _recv_frame(s, buf)
        out.append((pc() - t0) / 1000)
    return out


def _pipelined(s: socket.socket, frame: bytes, n: int, window: int = 32) -> float:
    """Requests per second with ``window`` requests in flight."""
    buf = bytearray()
    t0 = time.perf_counter()
    sent = recvd = 0
    while sent < min(window, n):
        s.sendall(frame)
        sent += 1
    while recvd < n:
        _recv_frame(s, buf)
        recvd += 1
        if sent < n:
            s.sendall(frame)
            sent += 1
    return n / (time.perf_counter() - t0)


def _p99(xs: list[float]) -> float:
    return sorted(xs)[int(len(xs) * 0.99) - 1]


def _cmp(name: str, value: float, unit: str, baseline: str, base: float) -> dict:
    return {"name": name, "value": round(value, 2), "unit": unit, "baseline": baseline,
            "baseline_value": round(base, 2), "ratio": round(value / base, 2)}


def _start(target, *args) -> mp.Process:
    p = mp.get_context("fork").Process(target=target, args=args, daemon=True)
    p.start()
    return p


def _stop(p: mp.Process) -> None:
    p.terminate()
    p.join(10)
    if p.is_alive():
        p.kill()
        p.join(5)


def bench_socket(tmp: str) -> list[dict]:
    echo_path, xs_path = os.path.join(tmp, "echo"), os.path.join(tmp, "xenstored")
    procs = [_start(_socket_echo_server, echo_path), _start(_xenstored_socket_server, xs_path)]
    try:
        es, xs = _wait_for_socket(echo_path), _wait_for_socket(xs_path)
        with es, xs:
            xs.sendall(encode(XsType.WRITE, 1, 0, b"/bench\0" + b"x" * 16))
            _recv_frame(xs, bytearray())
            read = encode(XsType.READ, 1, 0, b"/bench\0")
            write = encode(XsType.WRITE, 1, 0, b"/bench\0" + b"y" * 16)
            # Alternate short blocks so drift (CPU frequency, the other
            # core's load) hits the baseline and XenStore alike.
            raw_r, xs_r, raw_w, xs_w = [], [], [], []
            raw_tp, xs_tp = [], []
            for _ in range(ROUNDS):
                raw_r += _latencies(es, read, N_OPS // ROUNDS)
                xs_r += _latencies(xs, read, N_OPS // ROUNDS)
                raw_w += _latencies(es, write, N_OPS // ROUNDS)
                xs_w += _latencies(xs, write, N_OPS // ROUNDS)
                raw_tp.append(_pipelined(es, read, N_OPS))
                xs_tp.append(_pipelined(xs, read, N_OPS))
            raw_tp, xs_tp = statistics.median(raw_tp), statistics.median(xs_tp)
    finally:
        for p in procs:
            _stop(p)
    out = []
    for op, xs_l, raw_l in (("READ", xs_r, raw_r), ("WRITE", xs_w, raw_w)):
        out.append(_cmp(f"socket {op} latency median", statistics.median(xs_l), "us",
                        "raw unix-socket round trip median", statistics.median(raw_l)))
        out.append(_cmp(f"socket {op} latency p99", _p99(xs_l), "us",
                        "raw unix-socket round trip p99", _p99(raw_l)))
        out.append(_cmp(f"socket {op} throughput (1 in flight)",
                        1e6 / statistics.mean(xs_l), "ops/s",
                        "raw unix-socket round trips", 1e6 / statistics.mean(raw_l)))
    out.append(_cmp("socket READ throughput (32 in flight)", xs_tp, "ops/s",
                    "raw unix-socket echo (32 in flight)", raw_tp))
    return out


async def _ring_latencies(page, notify, wait, frames: dict[str, bytes]) -> dict[str, list[float]]:
    from ipc.xs_ring import RingEndpoint
    ep = RingEndpoint(page, notify, wait, side="guest")
    results = {}
    async with trio.open_nursery() as n:
        n.start_soon(ep.run)
        buf = bytearray()

        async def roundtrip(frame: bytes) -> None:
            await ep.send_all(frame)
            while True:
                if len(buf) >= 16:
                    length = struct.unpack_from("<I", buf, 12)[0]
                    if len(buf) >= 16 + length:
                        del buf[:16 + length]
                        return
                buf.extend(await ep.receive_some())

        pc = time.perf_counter_ns
        for name, frame in frames.items():
            for _ in range(WARMUP):
                await roundtrip(frame)
            lat = []
            for _ in range(N_OPS // 2):
                t0 = pc()
                await roundtrip(frame)
                lat.append((pc() - t0) / 1000)
            results[name] = lat
        n.cancel_scope.cancel()
    ep.close()
    return results


def bench_ring() -> list[dict]:
    read = encode(XsType.READ, 1, 0, b"bench\0")
    write = encode(XsType.WRITE, 1, 0, b"bench\0" + b"y" * 16)
    measured = {}
    for kind in ("echo", "xenstored"):
        fd = os.memfd_create(f"bench-ring-{kind}")
        os.ftruncate(fd, 4096)
        ours, theirs = socket.socketpair()
        proc = _start(_ring_server, kind, fd, theirs)
        page = mmap.mmap(fd, 4096)
        try:
            notify, wait = _kick_pair(ours)
            measured[kind] = trio.run(_ring_latencies, page, notify, wait,
                                      {"READ": read, "WRITE": write})
        finally:
            _stop(proc)
            page.close()
            os.close(fd)
            ours.close()
            theirs.close()
    out = []
    for op in ("READ", "WRITE"):
        xs_l, raw_l = measured["xenstored"][op], measured["echo"][op]
        out.append(_cmp(f"ring {op} latency median (guest in another process)",
                        statistics.median(xs_l), "us", "raw ring echo median",
                        statistics.median(raw_l)))
        out.append(_cmp(f"ring {op} latency p99", _p99(xs_l), "us", "raw ring echo p99",
                        _p99(raw_l)))
        out.append(_cmp(f"ring {op} throughput (1 in flight)", 1e6 / statistics.mean(xs_l),
                        "ops/s", "raw ring echo", 1e6 / statistics.mean(raw_l)))
    return out


async def _fanout(path: str) -> list[float]:
    from domains.kernel.xenstore import open_socket_client
    from contextlib import AsyncExitStack
    times = []
    async with AsyncExitStack() as stack:
        writer = await stack.enter_async_context(open_socket_client(path))
        watches = []
        for i in range(WATCHERS):
            c = await stack.enter_async_context(open_socket_client(path))
            w = await c.watch("/fanout", f"w{i}")
            await w.next(10)                      # the initial event
            watches.append(w)
        for r in range(FANOUT_ROUNDS):
            t0 = time.perf_counter()
            await writer.write("/fanout", str(r))
            for w in watches:
                await w.next(10)
            times.append((time.perf_counter() - t0) * 1e6)
    return times


def bench_fanout(tmp: str) -> list[dict]:
    path = os.path.join(tmp, "xenstored-fanout")
    proc = _start(_xenstored_socket_server, path)
    try:
        _wait_for_socket(path).close()
        times = trio.run(_fanout, path)
    finally:
        _stop(proc)
    med = statistics.median(times)
    return [
        {"name": f"watch fan-out to {WATCHERS} watchers, median (write -> all events)",
         "value": round(med, 1), "unit": "us"},
        {"name": f"watch fan-out to {WATCHERS} watchers, p99", "value": round(_p99(times), 1),
         "unit": "us"},
        {"name": "watch events delivered per second (fan-out)",
         "value": round(WATCHERS / (med / 1e6)), "unit": "events/s"},
    ]


def bench_guest(n: int) -> list[dict]:
    """READ/WRITE latency from a real guest domain over its ring (the whole system)."""
    import json
    import shutil
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run_dir = tempfile.mkdtemp(prefix="mxxs-")
    cfg = os.path.join(run_dir, "xsguest.cfg")
    with open(cfg, "w") as f:
        f.write(f'name = "xsguest"\nkernel = "bench.kernels.xsguest"\nmemory = 32\n'
                f'cmdline = "n={n}"\n')
    py = [sys.executable, os.path.join(root, "run.py")]
    try:
        subprocess.run(py + ["up", "--run-dir", run_dir, "--detach", "--config", cfg],
                       check=True, capture_output=True, timeout=60, cwd=root)
        deadline = time.monotonic() + 120
        raw = ""
        while not raw:
            if time.monotonic() > deadline:
                raise RuntimeError("the guest never reported its XenStore timings")
            time.sleep(0.2)
            r = subprocess.run(py + ["xl", "--run-dir", run_dir, "xenstore-read",
                                     "/local/domain/1/data/xsbench"],
                               capture_output=True, text=True, timeout=30, cwd=root)
            raw = r.stdout.strip() if r.returncode == 0 else ""
        samples = json.loads(raw)
    finally:
        subprocess.run(py + ["down", "--run-dir", run_dir], capture_output=True, timeout=60,
                       cwd=root)
        shutil.rmtree(run_dir, ignore_errors=True)
    out = []
    for op in ("read", "write"):
        out.append({"name": f"guest ring {op.upper()} latency median (real domain)",
                    "value": round(samples[op]["median"], 1), "unit": "us"})
        out.append({"name": f"guest ring {op.upper()} latency p99 (real domain)",
                    "value": round(samples[op]["p99"], 1), "unit": "us"})
    return out


def run(ctx=None) -> list:
    """The suite entry for `run.py bench xenstore`: Figures for the report."""
    from bench.harness import Figure
    scale = getattr(ctx, "scale", 1.0) if ctx is not None else 1.0
    with tempfile.TemporaryDirectory(prefix="xsbench-") as tmp:
        rows = bench_socket(tmp) + bench_ring() + bench_fanout(tmp) + \
            bench_guest(max(100, int(2000 * scale)))
    figures = []
    for row in rows:
        unit = row["unit"]
        better = "higher" if unit.endswith("/s") else "lower"
        ratio, base = None, row.get("baseline_value")
        if base:   # the harness's convention: how many times slower than the baseline
            ratio = round(row["value"] / base if better == "lower" else base / row["value"], 3)
        figures.append(Figure(name="xenstore." + _slug(row["name"]), value=row["value"], unit=unit,
                              baseline=row.get("baseline"), baseline_value=base,
                              ratio=ratio, better=better))
    return figures


def _slug(text: str) -> str:
    import re
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


if __name__ == "__main__":
    for fig in run():
        extra = ""
        if fig.baseline:
            extra = f"   vs {fig.baseline}: {fig.baseline_value} ({fig.ratio}x)"
        print(f"{fig.name}: {fig.value} {fig.unit}{extra}")
    sys.stdout.flush()
