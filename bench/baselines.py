"""Raw baselines: the physical floor every microxen figure is compared against.

What this is
------------
When Xen's developers report that a paravirtualised disk reaches 90% of native
throughput, "native" is measured on the same machine, the same day. microxen's
"native" is the cost of the mechanisms it is built from, used bare, between
ordinary OS processes, with nothing of microxen in the way:

* ZeroMQ DEALER/ROUTER over ``ipc://`` between two processes: the floor of one
  hypercall (request and reply on the domain's channel).
* ZeroMQ through a relay process (A -> ROUTER -> B and back): the floor of any
  brokered design, where two domains talk only through the hypervisor, as an
  event-channel notification or a XenStore request does here.
* A Unix stream socket request/response: the floor without ZeroMQ at all.
* memcpy between two shared-memory mappings (memfd + mmap, like grant pages):
  the floor of a grant copy or of moving data through a ring's buffers.
* pread/pwrite on a file: the floor of blkback serving a disk image.
* UDP over loopback: the floor of netback/netfront moving packets.

Every function here returns a list of :class:`~bench.harness.Figure` named
``baseline.<what>`` and is registered in :data:`BASELINES`, which says which
figures each one provides, so ``Context.baseline("zmq_relay_rtt")`` can measure
just the group it needs, once per run.

How the numbers are taken (these machines have 2 cores and are noisy)
---------------------------------------------------------------------
* Every measurement is warmed up first, then repeated in ``ROUNDS`` rounds.
  Latency rounds interleave with throughput runs of the same pair of
  processes, so a burst of noise spreads over both rather than spoiling one.
* Latencies are quoted as p50 and p99 of all samples; rates as the median of
  the rounds, with every round kept in ``detail["runs"]``.
* Every wait has a timeout; every child has an idle timeout and dies with its
  parent; every socket file and test file lives in a temporary directory that
  is removed afterwards.
* ``scale`` shrinks every count and duration (tests use a tiny scale).
* Process placement matters more than anything else on a 2-vCPU VM: a round
  trip between processes on different vCPUs costs several times one between
  processes sharing a vCPU, and the scheduler chooses either. Headline
  latencies are unpinned, like microxen's domains; each latency baseline also
  reports ``..._same_cpu_p50`` and ``..._cross_cpu_p50`` measured pinned (only
  on machines with at least two CPUs), so a run can be read correctly.

Where this differs from a real Xen host
---------------------------------------
Xen's floor is hardware: shared-memory rings and an event-channel interrupt
cost well under a microsecond. Here the floor is Python talking through the
kernel, tens of microseconds; that is precisely why microxen is compared with
these numbers rather than with Xen's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import mmap
import os
import random
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from bench.harness import Figure, latency_figures, p50, p99, rate_figure
from bench.procs import BenchError, Child

__all__ = [
    "BASELINES",
    "Baseline",
    "file_io",
    "find_group",
    "memcpy",
    "unix_rtt",
    "udp",
    "zmq_relay",
    "zmq_rtt",
]

ROUNDS = 3
PIPELINE_WINDOW = 64
MESSAGE_SIZE = 64  # bytes: about the size of a msgpack hypercall
REPLY_TIMEOUT_S = 5.0  # the parent gives up on a peer after this long
CHILD_IDLE_S = 10.0  # a child with nothing to do for this long exits
STOP = b"\x00STOP"


def _scaled(n: float, scale: float, minimum: float) -> Any:
    """``n * scale`` but never below ``minimum``; keeps int-ness of ``n``."""
    value = max(minimum, n * scale)
    return int(value) if isinstance(n, int) else float(value)


@contextlib.contextmanager
def _scratch_dir(directory: str | None, prefix: str) -> Iterator[str]:
    """A private temporary directory, removed with everything in it afterwards.

    Unix socket paths are limited to 107 bytes, so a ``directory`` too long to
    hold ``<dir>/<prefix>XXXXXXXX/<name>`` falls back on the system temp dir.
    """
    base = directory
    if base is not None and len(base) > 75:
        base = None
    path = tempfile.mkdtemp(prefix=prefix, dir=base)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _rtt_samples(send: Callable[[], object], recv: Callable[[], object], n: int) -> list[int]:
    clock = time.perf_counter_ns
    out = [0] * n
    for i in range(n):
        t0 = clock()
        send()
        recv()
        out[i] = clock() - t0
    return out


def _pipelined_rate(
    send: Callable[[], object], recv: Callable[[], object], total: int, window: int
) -> float:
    """Keep ``window`` requests in flight until ``total`` replies came back; msgs/s."""
    t0 = time.perf_counter_ns()
    sent = 0
    for _ in range(min(window, total)):
        send()
        sent += 1
    for _ in range(total):
        recv()
        if sent < total:
            send()
            sent += 1
    elapsed = time.perf_counter_ns() - t0
    return total / (elapsed / 1e9)


# --- CPU placement ------------------------------------------------------------------
#
# On a 2-vCPU virtual machine a round trip costs about four times more when the
# two processes sit on different vCPUs (every wake-up is an inter-processor
# interrupt that the host must deliver to a halted vCPU) than when they share
# one. The scheduler picks either, run by run, so an unpinned latency is
# bimodal. The headline figures stay unpinned (microxen's domains are not
# pinned either), and every latency baseline also reports both placements,
# pinned explicitly, so a reader can tell which mode a run landed in.


def _pin(pid: int, cpus: set[int]) -> None:
    """Pin every thread of ``pid`` (0: this process) to ``cpus``.

    sched_setaffinity acts on one thread; ZeroMQ's I/O threads must move too.
    """
    target = os.getpid() if pid == 0 else pid
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{target}/task")]
    except OSError:
        tids = [target]
    for tid in tids:
        try:
            os.sched_setaffinity(tid, cpus)
        except OSError:
            pass  # a thread that just exited


def _placement_figures(
    prefix: str,
    children: dict[str, int | None],
    send: Callable[[], object],
    recv: Callable[[], object],
    samples: int,
) -> list[Figure]:
    """``<prefix>_same_cpu_p50`` and ``<prefix>_cross_cpu_p50`` (µs), pinned.

    ``children`` maps each child's role to its pid. "same" puts this process
    and every child on one CPU; "cross" alternates them over two CPUs, so
    every hop crosses. Affinities are restored after.
    Returns nothing on a one-CPU machine.
    """
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return []
    roles = ["client", *children]
    pids = [0, *(pid or 0 for pid in children.values())]
    if 0 in pids[1:]:
        return []  # a child without a pid cannot be pinned
    layouts = {
        "same_cpu": [cpus[0]] * len(pids),
        "cross_cpu": [cpus[i % 2] for i in range(len(pids))],
    }
    original = set(cpus)
    figures = []
    try:
        for label, layout in layouts.items():
            for pid, cpu in zip(pids, layout):
                _pin(pid, {cpu})
            _rtt_samples(send, recv, max(5, samples // 10))
            batch = _rtt_samples(send, recv, samples)
            figures.append(
                Figure(
                    f"{prefix}_{label}_p50",
                    p50(batch) / 1e3,
                    "us",
                    detail={"samples": len(batch), "p99": p99(batch) / 1e3,
                            "cpus": dict(zip(roles, layout))},
                    better="lower",
                )
            )
    finally:
        for pid in pids:
            _pin(pid, original)
    return figures


# --- ZeroMQ, direct ---------------------------------------------------------------


def _zmq_router_echo(endpoint: str) -> None:
    """Child: a ROUTER that sends every message back to whoever sent it."""
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.linger = 0
    sock.rcvtimeo = int(CHILD_IDLE_S * 1000)
    sock.bind(endpoint)
    try:
        while True:
            try:
                frames = sock.recv_multipart()
            except zmq.Again:
                return
            if frames[-1] == STOP:
                return
            sock.send_multipart(frames)
    finally:
        sock.close()
        ctx.term()


def _zmq_client(ctx: Any, endpoint: str, routing_id: bytes | None = None) -> Any:
    import zmq

    sock = ctx.socket(zmq.DEALER)
    # Long enough for the final STOP to leave, short enough never to hang a run.
    sock.linger = 1000
    sock.rcvtimeo = int(REPLY_TIMEOUT_S * 1000)
    sock.sndtimeo = int(REPLY_TIMEOUT_S * 1000)
    sock.sndhwm = sock.rcvhwm = 10000
    if routing_id is not None:
        sock.routing_id = routing_id
    sock.connect(endpoint)
    return sock


def _zmq_timeout(what: str) -> BenchError:
    return BenchError(f"{what}: no reply within {REPLY_TIMEOUT_S:.0f} s")


def zmq_rtt(scale: float = 1.0, directory: str | None = None) -> list[Figure]:
    """ZeroMQ DEALER (this process) -> ROUTER echo (child) over ipc://.

    Figures: ``baseline.zmq_rtt_p50``/``_p99`` (µs, one 64-byte request and its
    reply) and ``baseline.zmq_msgs_per_s`` (round trips per second with
    ``PIPELINE_WINDOW`` requests in flight).
    """
    import zmq

    warmup = _scaled(300, scale, 5)
    samples = _scaled(2000, scale, 10)
    total = _scaled(20000, scale, 100)
    payload = b"x" * MESSAGE_SIZE
    with _scratch_dir(directory, "mxb-zmq-") as scratch:
        endpoint = f"ipc://{scratch}/echo"
        with Child("zmq-router-echo", _zmq_router_echo, endpoint) as child:
            ctx = zmq.Context()
            sock = _zmq_client(ctx, endpoint)
            try:
                send = lambda: sock.send(payload)  # noqa: E731
                recv = sock.recv
                lat: list[int] = []
                round_p50: list[float] = []
                rates: list[float] = []
                _rtt_samples(send, recv, warmup)
                for _ in range(ROUNDS):
                    batch = _rtt_samples(send, recv, samples)
                    round_p50.append(p50(batch) / 1e3)
                    lat += batch
                    rates.append(_pipelined_rate(send, recv, total, PIPELINE_WINDOW))
                placed = _placement_figures("baseline.zmq_rtt", {"echo": child.pid}, send, recv,
                                            samples // 2)
                sock.send(STOP)
            except zmq.Again as exc:
                raise _zmq_timeout("zmq_rtt: ROUTER echo child") from exc
            finally:
                sock.close()
                ctx.term()
            child.stop()
    info = {"transport": "ipc", "message_bytes": MESSAGE_SIZE, "round_p50_us": round_p50}
    return latency_figures("baseline.zmq_rtt", lat, "us", info) + [
        rate_figure(
            "baseline.zmq_msgs_per_s",
            rates,
            "msg/s",
            {"window": PIPELINE_WINDOW, "messages_per_run": total, **info},
        )
    ] + placed


# --- ZeroMQ through a relay (the brokered floor) -------------------------------------


def _zmq_relay(endpoint: str) -> None:
    """Child: a ROUTER relay. [src, dst, payload] in -> [dst, src, payload] out.

    This is the shape of the hypervisor broker: peers never talk directly, the
    relay learns who sent a message from the connection it arrived on, and a
    destination it does not know is dropped. An empty destination addresses
    the relay itself (only STOP is understood).
    """
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.linger = 0
    sock.rcvtimeo = int(CHILD_IDLE_S * 1000)
    sock.sndhwm = sock.rcvhwm = 10000
    sock.bind(endpoint)
    try:
        while True:
            try:
                frames = sock.recv_multipart()
            except zmq.Again:
                return
            if len(frames) != 3:
                continue
            src, dst, payload = frames
            if not dst:
                if payload == STOP:
                    return
                continue
            sock.send_multipart([dst, src, payload])
    finally:
        sock.close()
        ctx.term()


def _zmq_relay_peer(endpoint: str, routing_id: bytes) -> None:
    """Child: peer B behind the relay, echoing [src, payload] back to src."""
    import zmq

    ctx = zmq.Context()
    sock = _zmq_client(ctx, endpoint, routing_id)
    sock.linger = 0
    sock.rcvtimeo = int(CHILD_IDLE_S * 1000)
    try:
        while True:
            try:
                src, payload = sock.recv_multipart()
            except zmq.Again:
                return
            except ValueError:
                continue
            if payload == STOP:
                return
            sock.send_multipart([src, payload])
    finally:
        sock.close()
        ctx.term()


def _relay_handshake(sock: Any, peer: bytes) -> None:
    """Ping ``peer`` through the relay until it answers.

    The relay drops messages for a peer it has not met yet, so the first pings
    may vanish; each carries a sequence number so a late answer to an early
    ping is recognised and discarded.
    """
    import zmq

    deadline = time.monotonic() + REPLY_TIMEOUT_S
    attempt = 0
    while time.monotonic() < deadline:
        attempt += 1
        token = b"hs%d" % attempt
        sock.send_multipart([peer, token])
        if sock.poll(200, zmq.POLLIN):
            _, answer = sock.recv_multipart()
            if answer == token:
                break
    else:
        raise BenchError(f"zmq_relay: peer {peer!r} never answered through the relay")
    # Discard any late answers to earlier pings.
    while sock.poll(50, zmq.POLLIN):
        sock.recv_multipart()


def zmq_relay(scale: float = 1.0, directory: str | None = None) -> list[Figure]:
    """A (this process) -> relay ROUTER (child) -> B (child) -> relay -> A.

    Figures: ``baseline.zmq_relay_rtt_p50``/``_p99`` (µs) and
    ``baseline.zmq_relay_msgs_per_s`` (round trips/s, window of
    ``PIPELINE_WINDOW``). This is the physical floor of a brokered design:
    four ZeroMQ hops and three processes on two cores.
    """
    import zmq

    warmup = _scaled(300, scale, 5)
    samples = _scaled(2000, scale, 10)
    total = _scaled(10000, scale, 100)
    payload = b"x" * MESSAGE_SIZE
    peer = b"B"
    with _scratch_dir(directory, "mxb-relay-") as scratch:
        endpoint = f"ipc://{scratch}/relay"
        with Child("zmq-relay", _zmq_relay, endpoint) as relay, Child(
            "zmq-relay-peer", _zmq_relay_peer, endpoint, peer
        ) as peer_child:
            ctx = zmq.Context()
            sock = _zmq_client(ctx, endpoint, b"A")
            try:
                _relay_handshake(sock, peer)
                send = lambda: sock.send_multipart([peer, payload])  # noqa: E731
                recv = sock.recv_multipart
                lat: list[int] = []
                round_p50: list[float] = []
                rates: list[float] = []
                _rtt_samples(send, recv, warmup)
                for _ in range(ROUNDS):
                    batch = _rtt_samples(send, recv, samples)
                    round_p50.append(p50(batch) / 1e3)
                    lat += batch
                    rates.append(_pipelined_rate(send, recv, total, PIPELINE_WINDOW))
                placed = _placement_figures("baseline.zmq_relay_rtt",
                                            {"relay": relay.pid, "peer": peer_child.pid},
                                            send, recv,
                                            samples // 2)
                sock.send_multipart([peer, STOP])
                sock.send_multipart([b"", STOP])
            except zmq.Again as exc:
                raise _zmq_timeout("zmq_relay: relay or peer child") from exc
            finally:
                sock.close()
                ctx.term()
            peer_child.stop()
            relay.stop()
    info = {"transport": "ipc", "hops": 4, "message_bytes": MESSAGE_SIZE, "round_p50_us": round_p50}
    return latency_figures("baseline.zmq_relay_rtt", lat, "us", info) + [
        rate_figure(
            "baseline.zmq_relay_msgs_per_s",
            rates,
            "msg/s",
            {"window": PIPELINE_WINDOW, "messages_per_run": total, **info},
        )
    ] + placed


# --- Unix stream socket -------------------------------------------------------------


def _unix_echo(sock: socket.socket, parents_end: socket.socket) -> None:
    """Child: echo bytes on a stream socket until EOF."""
    parents_end.close()  # or the parent's close would never reach us as EOF
    sock.settimeout(CHILD_IDLE_S)
    try:
        while True:
            try:
                data = sock.recv(65536)
            except TimeoutError:
                return
            if not data:
                return
            sock.sendall(data)
    finally:
        sock.close()


def unix_rtt(scale: float = 1.0, directory: str | None = None) -> list[Figure]:
    """64-byte request/response over a Unix stream socket between two processes.

    Uses a socketpair made before the fork (same kernel path as a bound
    socket once connected, and no socket file to clean up). Figures:
    ``baseline.unix_rtt_p50``/``_p99`` (µs).
    """
    warmup = _scaled(300, scale, 5)
    samples = _scaled(3000, scale, 10)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with Child("unix-echo", _unix_echo, theirs, ours) as child:
            theirs.close()
            ours.settimeout(REPLY_TIMEOUT_S)
            payload = b"x" * MESSAGE_SIZE
            buf = bytearray(MESSAGE_SIZE)
            view = memoryview(buf)

            def recv() -> None:
                got = 0
                while got < MESSAGE_SIZE:
                    n = ours.recv_into(view[got:])
                    if n == 0:
                        raise BenchError("unix_rtt: echo child closed the socket")
                    got += n

            send = lambda: ours.sendall(payload)  # noqa: E731
            try:
                _rtt_samples(send, recv, warmup)
                lat: list[int] = []
                round_p50: list[float] = []
                for _ in range(ROUNDS):
                    batch = _rtt_samples(send, recv, samples)
                    round_p50.append(p50(batch) / 1e3)
                    lat += batch
                placed = _placement_figures("baseline.unix_rtt", {"echo": child.pid}, send, recv,
                                            samples // 2)
            except TimeoutError as exc:
                raise BenchError("unix_rtt: echo child did not answer in time") from exc
            finally:
                view.release()
                ours.close()
            child.stop()
    finally:
        ours.close()
        theirs.close()
    info = {"socket": "AF_UNIX SOCK_STREAM socketpair", "message_bytes": MESSAGE_SIZE,
            "round_p50_us": round_p50}
    return latency_figures("baseline.unix_rtt", lat, "us", info) + placed


# --- memcpy between shared mappings ---------------------------------------------------


def _shared_mapping(name: str, size: int) -> mmap.mmap:
    """A memfd-backed shared mapping: what a granted page is in microxen."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)  # the mapping keeps the memory alive
    m.write(b"\xa5" * size)  # fault every page in before timing
    m.seek(0)
    return m


def memcpy(scale: float = 1.0, directory: str | None = None) -> list[Figure]:
    """Python memoryview slice assignment between two memfd mappings, in GB/s.

    Copies a whole region block by block, the way a grant copy or a ring
    consumer moves 4 KiB pages; at 4 KiB the per-slice Python overhead is a
    large part of the cost, and that is the honest floor for Python code.
    Figures: ``baseline.memcpy_4k``, ``baseline.memcpy_64k`` and, for
    reference, ``baseline.memcpy_1m`` (GB/s, 10^9 bytes/s). Block sizes are
    interleaved pass by pass.
    """
    region = 8 << 20
    blocks = {"4k": 4 << 10, "64k": 64 << 10, "1m": 1 << 20}
    passes = _scaled(12, scale, 2)
    budget_s = _scaled(2.0, scale, 0.05)
    src = _shared_mapping("mxb-memcpy-src", region)
    dst = _shared_mapping("mxb-memcpy-dst", region)
    rates: dict[str, list[float]] = {k: [] for k in blocks}
    try:
        with memoryview(src) as s, memoryview(dst) as d:
            offsets = {k: range(0, region, size) for k, size in blocks.items()}
            # Warm-up pass of each size.
            for key, size in blocks.items():
                for off in offsets[key]:
                    d[off : off + size] = s[off : off + size]
            deadline = time.monotonic() + budget_s
            for n in range(passes):
                for key, size in blocks.items():
                    t0 = time.perf_counter_ns()
                    for off in offsets[key]:
                        d[off : off + size] = s[off : off + size]
                    elapsed = time.perf_counter_ns() - t0
                    rates[key].append(region / elapsed)  # bytes/ns == GB/s
                if n >= 1 and time.monotonic() > deadline:
                    break
    finally:
        src.close()
        dst.close()
    info = {"region_bytes": region, "mapping": "memfd MAP_SHARED"}
    return [
        rate_figure(f"baseline.memcpy_{key}", rates[key], "GB/s", {"block_bytes": size, **info})
        for key, size in blocks.items()
    ]


# --- file I/O -----------------------------------------------------------------------


def _drop_cache(fd: int) -> None:
    """Ask the kernel to forget this file's cached pages (they must be clean)."""
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def _random_offsets(count: int, file_size: int, block: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    last = file_size // block
    return [rng.randrange(last) * block for _ in range(count)]


def _qd1(op: Callable[[int], object], offsets: list[int], budget_s: float) -> tuple[int, float]:
    """Run ``op`` at each offset, one at a time, until done or out of time."""
    done = 0
    deadline = time.perf_counter() + budget_s
    t0 = time.perf_counter_ns()
    for off in offsets:
        op(off)
        done += 1
        if not done & 63 and time.perf_counter() > deadline:
            break
    return done, (time.perf_counter_ns() - t0) / 1e9


def _qd_threads(
    make_op: Callable[[], Callable[[int], object]],
    offsets: list[int],
    depth: int,
    budget_s: float,
) -> tuple[int, float]:
    """``depth`` threads each issuing one request at a time: queue depth ``depth``.

    Python threads release the GIL inside pread/pwrite, so up to ``depth``
    requests can be in the kernel at once; when the data is in the page cache
    the GIL, not the disk, is what limits this.
    """
    per_thread = [offsets[i::depth] for i in range(depth)]
    counts = [0] * depth
    barrier = threading.Barrier(depth + 1)
    deadline_box: list[float] = []
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        try:
            op = make_op()
            barrier.wait(REPLY_TIMEOUT_S)
            deadline = deadline_box[0]
            n = 0
            for off in per_thread[index]:
                op(off)
                n += 1
                if not n & 15 and time.perf_counter() > deadline:
                    break
            counts[index] = n
        except BaseException as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(depth)]
    for t in threads:
        t.start()
    deadline_box.append(time.perf_counter() + budget_s)
    t0 = time.perf_counter_ns()
    try:
        barrier.wait(REPLY_TIMEOUT_S)
    except threading.BrokenBarrierError:
        pass
    for t in threads:
        t.join(budget_s + REPLY_TIMEOUT_S)
    elapsed = (time.perf_counter_ns() - t0) / 1e9
    if errors:
        raise BenchError(f"file_io: a queue-depth-{depth} worker failed: {errors[0]!r}")
    if any(t.is_alive() for t in threads):
        raise BenchError(f"file_io: a queue-depth-{depth} worker did not finish in time")
    return sum(counts), elapsed


def file_io(scale: float = 1.0, directory: str | None = None) -> list[Figure]:
    """pread/pwrite on a file in a temporary directory, like blkback on a disk image.

    What is measured, and what it means:

    * ``baseline.file_seqwrite_1m`` (MB/s): the file written in 1 MiB
      ``pwrite`` calls, then ``fsync``; the time includes the fsync, so this is
      the rate at which data became durable.
    * ``baseline.file_seqread_1m_cold`` (MB/s): after ``POSIX_FADV_DONTNEED``
      dropped this file's pages. "Cold" means "not in this machine's page
      cache"; on a VM the host may still have the disk image cached.
    * ``baseline.file_seqread_1m_warm`` (MB/s): the same read again, from the
      page cache (a memory copy plus a syscall per MiB).
    * ``baseline.file_randread_4k_qd1`` / ``_qd32`` and
      ``baseline.file_randwrite_4k_qd1`` / ``_qd32`` (IOPS): 4 KiB requests at
      random aligned offsets, page cache warm, writes buffered (no sync): the
      cost of the syscall path, which is what blkback adds to. Queue depth 32
      is 32 threads each with one request outstanding (``preadv``/``pwritev``
      into that thread's own page-aligned buffer, as blkback reads into a
      granted page).
    * ``baseline.file_randread_4k_qd1_cold`` / ``_qd32_cold`` (IOPS): random
      reads after dropping the cache, with ``POSIX_FADV_RANDOM`` to stop
      readahead. Pages read stay cached, so a long run drifts warmer; runs are
      short to limit that.
    * ``baseline.file_syncwrite_4k_qd1`` (IOPS): ``pwrite`` + ``fdatasync`` per
      request: the floor for a write with FUA/flush semantics.
    """
    file_size = _scaled(64 << 20, scale, 4 << 20)
    file_size -= file_size % (1 << 20)
    phase_s = _scaled(0.4, scale, 0.02)
    chunk = 1 << 20
    block = 4096
    depth = 32
    figures: list[Figure] = []
    with _scratch_dir(directory, "mxb-file-") as scratch:
        path = os.path.join(scratch, "disk.img")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        big = mmap.mmap(-1, chunk)
        big.write(os.urandom(chunk))
        page = mmap.mmap(-1, block)
        page.write(os.urandom(block))
        try:
            fs_type = _filesystem_of(scratch)
            common = {"file_bytes": file_size, "filesystem": fs_type}

            # Sequential write, durable. The first pass allocates the file's blocks;
            # the overwrite passes are what a disk image sees, so the median is taken.
            seq_write: list[float] = []
            for _ in range(ROUNDS):
                t0 = time.perf_counter_ns()
                for off in range(0, file_size, chunk):
                    os.pwritev(fd, [big], off)
                os.fsync(fd)
                seq_write.append(file_size / ((time.perf_counter_ns() - t0) / 1e9) / 1e6)
            figures.append(rate_figure("baseline.file_seqwrite_1m", seq_write, "MB/s",
                                       {"fsync_included": True,
                                        "note": "run 1 allocates the file, later runs overwrite",
                                        **common}))

            def seq_read() -> float:
                t0 = time.perf_counter_ns()
                for off in range(0, file_size, chunk):
                    if os.preadv(fd, [big], off) != chunk:
                        raise BenchError(f"file_io: short read at offset {off}")
                return file_size / ((time.perf_counter_ns() - t0) / 1e9) / 1e6

            cold: list[float] = []
            warm: list[float] = []
            for _ in range(ROUNDS):
                _drop_cache(fd)
                cold.append(seq_read())
                warm.append(seq_read())
            figures.append(rate_figure("baseline.file_seqread_1m_cold", cold, "MB/s",
                                       {"cache": "POSIX_FADV_DONTNEED before each run", **common}))
            figures.append(rate_figure("baseline.file_seqread_1m_warm", warm, "MB/s",
                                       {"cache": "page cache hot", **common}))

            ops = _scaled(100000, scale, 64)
            offsets = _random_offsets(ops, file_size, block, seed=1)

            def reader() -> Callable[[int], object]:
                buf = mmap.mmap(-1, block)
                return lambda off: os.preadv(fd, [buf], off)

            def writer() -> Callable[[int], object]:
                buf = mmap.mmap(-1, block)
                buf.write(os.urandom(block))
                return lambda off: os.pwritev(fd, [buf], off)

            # Warm random I/O, QD1 and QD32 interleaved round by round.
            rates: dict[str, list[float]] = {k: [] for k in ("r1", "w1", "r32", "w32")}
            for r in range(ROUNDS):
                n, s = _qd1(reader(), offsets, phase_s / ROUNDS)
                rates["r1"].append(n / s)
                n, s = _qd_threads(reader, offsets, depth, phase_s / ROUNDS)
                rates["r32"].append(n / s)
                n, s = _qd1(writer(), offsets, phase_s / ROUNDS)
                rates["w1"].append(n / s)
                n, s = _qd_threads(writer, offsets, depth, phase_s / ROUNDS)
                rates["w32"].append(n / s)
            warm_info = {"block_bytes": block, "cache": "page cache hot",
                         "writes": "buffered, no sync", **common}
            figures += [
                rate_figure("baseline.file_randread_4k_qd1", rates["r1"], "iops", warm_info),
                rate_figure("baseline.file_randwrite_4k_qd1", rates["w1"], "iops", warm_info),
                rate_figure("baseline.file_randread_4k_qd32", rates["r32"], "iops",
                            {"queue_depth": "32 threads", **warm_info}),
                rate_figure("baseline.file_randwrite_4k_qd32", rates["w32"], "iops",
                            {"queue_depth": "32 threads", **warm_info}),
            ]

            # Cold random reads: drop the cache and disable readahead first.
            cold_rates: dict[str, list[float]] = {"r1": [], "r32": []}
            for r in range(ROUNDS):
                # Dropping the cache makes reusing the warm offsets fair; rotate them
                # so each round starts somewhere new.
                cut = (r * len(offsets)) // ROUNDS
                cold_offsets = offsets[cut:] + offsets[:cut]
                _drop_cache(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
                n, s = _qd1(reader(), cold_offsets, phase_s / ROUNDS)
                cold_rates["r1"].append(n / s)
                _drop_cache(fd)
                n, s = _qd_threads(reader, cold_offsets, depth, phase_s / ROUNDS)
                cold_rates["r32"].append(n / s)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_NORMAL)
            cold_info = {"block_bytes": block,
                         "cache": "POSIX_FADV_DONTNEED + POSIX_FADV_RANDOM before each run",
                         **common}
            figures += [
                rate_figure("baseline.file_randread_4k_qd1_cold", cold_rates["r1"], "iops",
                            cold_info),
                rate_figure("baseline.file_randread_4k_qd32_cold", cold_rates["r32"], "iops",
                            {"queue_depth": "32 threads", **cold_info}),
            ]

            # Durable 4 KiB writes, one at a time.
            sync_rates: list[float] = []

            def sync_write(off: int) -> None:
                os.pwritev(fd, [page], off)
                os.fdatasync(fd)

            for r in range(ROUNDS):
                n, s = _qd1(sync_write, offsets[r::ROUNDS], phase_s / ROUNDS)
                sync_rates.append(n / s)
            figures.append(rate_figure("baseline.file_syncwrite_4k_qd1", sync_rates, "iops",
                                       {"block_bytes": block, "sync": "fdatasync per write",
                                        **common}))
        finally:
            os.close(fd)
            big.close()
            page.close()
    return figures


def _filesystem_of(path: str) -> str:
    """The filesystem type holding ``path`` (from /proc/self/mounts), for the record."""
    best, fstype = "", "unknown"
    real = os.path.realpath(path)
    try:
        with open("/proc/self/mounts", encoding="utf-8") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mount = parts[1].replace("\\040", " ")
                if (real == mount or real.startswith(mount.rstrip("/") + "/")) and len(mount) > len(
                    best
                ):
                    best, fstype = mount, parts[2]
    except OSError:
        pass
    return fstype


# --- UDP over loopback --------------------------------------------------------------


def _udp_echo(sock: socket.socket, parents_sock: socket.socket) -> None:
    """Child: echo every datagram back to its sender; STOP ends it."""
    parents_sock.close()
    sock.settimeout(CHILD_IDLE_S)
    try:
        while True:
            try:
                data, addr = sock.recvfrom(65536)
            except TimeoutError:
                return
            if data == STOP:
                return
            sock.sendto(data, addr)
    finally:
        sock.close()


_DATA, _END = ord("D"), ord("E")


def _udp_sink(sock: socket.socket, parents_sock: socket.socket, results: Any) -> None:
    """Child: count datagrams per run; on a run's END marker, report over ``results``.

    Datagram layout: byte 0 is 'D' (data), 'E' (end of run); byte 1 the run
    number. A STOP datagram ends the child.
    """
    parents_sock.close()
    sock.settimeout(CHILD_IDLE_S)
    buf = bytearray(65536)
    clock = time.perf_counter_ns
    runs: dict[int, list[int]] = {}  # run -> [count, bytes, first_ns, last_ns]
    reported: set[int] = set()
    try:
        while True:
            try:
                n = sock.recv_into(buf)
            except TimeoutError:
                return
            kind = buf[0] if n >= 2 else 0
            if kind == _DATA:
                now = clock()
                entry = runs.get(buf[1])
                if entry is None:
                    runs[buf[1]] = [1, n, now, now]
                else:
                    entry[0] += 1
                    entry[1] += n
                    entry[3] = now
            elif kind == _END:
                run = buf[1]
                if run not in reported:
                    reported.add(run)
                    results.send((run, *runs.get(run, [0, 0, 0, 0])))
            elif bytes(buf[:n]) == STOP:
                return
    finally:
        sock.close()
        results.close()


def _udp_pair() -> tuple[socket.socket, socket.socket]:
    socks = []
    for _ in range(2):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    return socks[0], socks[1]


def udp(scale: float = 1.0, directory: str | None = None) -> list[Figure]:
    """Raw UDP over loopback between two processes.

    * ``baseline.udp_rtt_p50``/``_p99`` (µs): 64-byte ping-pong. A lost
      datagram (on loopback this is rare) costs one timeout and is not a sample.
    * ``baseline.udp_throughput`` (MB/s) and ``baseline.udp_pps`` (packets/s):
      one process sends 1400-byte datagrams as fast as it can for a short run;
      the other counts what arrived. Rates are what was *delivered*, measured
      at the receiver from its first to its last datagram; the sender's rate
      and the loss are in ``detail``. UDP has no flow control, so when the
      receiver falls behind the kernel drops datagrams: that is real UDP.
    """
    import multiprocessing

    warmup = _scaled(300, scale, 5)
    samples = _scaled(2000, scale, 10)
    burst_s = _scaled(0.3, scale, 0.02)
    size = 1400
    figures: list[Figure] = []

    # Ping-pong.
    ours, theirs = _udp_pair()
    try:
        with Child("udp-echo", _udp_echo, theirs, ours) as child:
            peer = theirs.getsockname()
            theirs.close()
            ours.settimeout(1.0)
            seq = 0
            lost = 0

            def ping() -> None:
                nonlocal seq
                seq += 1
                ours.sendto(seq.to_bytes(8, "little") + b"x" * (MESSAGE_SIZE - 8), peer)

            def pong() -> None:
                nonlocal lost
                want = seq.to_bytes(8, "little")
                while True:
                    try:
                        data = ours.recv(65536)
                    except TimeoutError:
                        lost += 1
                        if lost > 10:
                            raise BenchError("udp: echo child lost more than 10 datagrams")
                        return
                    if data[:8] == want:
                        return

            _rtt_samples(ping, pong, warmup)
            lat: list[int] = []
            round_p50: list[float] = []
            for _ in range(ROUNDS):
                lost_before = lost
                batch = _rtt_samples(ping, pong, samples)
                if lost != lost_before:  # a timed-out sample is not a latency
                    batch = [ns for ns in batch if ns < 0.9e9]
                round_p50.append(p50(batch) / 1e3)
                lat += batch
            lost_before = lost
            placed = _placement_figures("baseline.udp_rtt", {"echo": child.pid}, ping, pong,
                                        samples // 2)
            if lost != lost_before:
                placed = []  # a timeout landed in a pinned batch; better no figure than a wrong one
            ours.sendto(STOP, peer)
            child.stop()
    finally:
        ours.close()
        theirs.close()
    figures += latency_figures("baseline.udp_rtt", lat, "us",
                               {"message_bytes": MESSAGE_SIZE, "lost": lost,
                                "round_p50_us": round_p50}) + placed

    # Throughput.
    ours, theirs = _udp_pair()
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    results_recv, results_send = multiprocessing.get_context("fork").Pipe(duplex=False)
    mbps: list[float] = []
    pps: list[float] = []
    sent_pps: list[float] = []
    loss: list[float] = []
    try:
        with Child("udp-sink", _udp_sink, theirs, ours, results_send) as child:
            results_send.close()
            peer = theirs.getsockname()
            theirs.close()
            ours.settimeout(REPLY_TIMEOUT_S)
            for run in range(ROUNDS + 1):  # run 0 is the warm-up
                packet = bytes([_DATA, run]) + b"x" * (size - 2)
                sent = 0
                t0 = time.perf_counter_ns()
                deadline = time.perf_counter() + burst_s
                sendto = ours.sendto
                while time.perf_counter() < deadline:
                    for _ in range(32):
                        sendto(packet, peer)
                    sent += 32
                send_s = (time.perf_counter_ns() - t0) / 1e9
                end = bytes([_END, run])
                give_up = time.monotonic() + REPLY_TIMEOUT_S
                while not results_recv.poll(0.01):
                    if time.monotonic() > give_up:
                        raise BenchError("udp: sink child never reported a run")
                    ours.sendto(end, peer)
                got_run, count, nbytes, first_ns, last_ns = results_recv.recv()
                if got_run != run:
                    raise BenchError(f"udp: sink reported run {got_run}, expected {run}")
                if run == 0:
                    continue
                span = (last_ns - first_ns) / 1e9
                sent_pps.append(sent / send_s)
                loss.append(1 - count / sent if sent else 0.0)
                if count > 1 and span > 0:
                    pps.append((count - 1) / span)
                    mbps.append((nbytes * (count - 1) / count) / span / 1e6)
                else:
                    pps.append(0.0)
                    mbps.append(0.0)
            ours.sendto(STOP, peer)
            child.stop()
    finally:
        ours.close()
        theirs.close()
        results_recv.close()
        results_send.close()
    info = {
        "datagram_bytes": size,
        "sender_pps_runs": [round(x) for x in sent_pps],
        "loss_runs": [round(x, 4) for x in loss],
        "measured_at": "receiver (delivered)",
    }
    figures.append(rate_figure("baseline.udp_throughput", mbps, "MB/s", info))
    figures.append(rate_figure("baseline.udp_pps", pps, "pkt/s", info))
    return figures


# --- the registry ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Baseline:
    """A group of baseline figures measured together by one function.

    ``provides`` lists every figure the group can produce; the pinned
    ``*_cpu_p50`` figures are left out on a machine with a single CPU.
    """

    group: str
    provides: tuple[str, ...]
    run: Callable[..., list[Figure]]
    description: str


def _names(*names: str) -> tuple[str, ...]:
    return tuple(f"baseline.{n}" for n in names)


BASELINES: dict[str, Baseline] = {
    b.group: b
    for b in (
        Baseline(
            "zmq_rtt",
            _names("zmq_rtt_p50", "zmq_rtt_p99", "zmq_rtt_same_cpu_p50", "zmq_rtt_cross_cpu_p50",
                   "zmq_msgs_per_s"),
            zmq_rtt,
            "ZeroMQ DEALER/ROUTER between two processes over ipc://",
        ),
        Baseline(
            "zmq_relay",
            _names("zmq_relay_rtt_p50", "zmq_relay_rtt_p99", "zmq_relay_rtt_same_cpu_p50",
                   "zmq_relay_rtt_cross_cpu_p50", "zmq_relay_msgs_per_s"),
            zmq_relay,
            "ZeroMQ A -> relay ROUTER -> B and back: the brokered floor",
        ),
        Baseline(
            "unix_rtt",
            _names("unix_rtt_p50", "unix_rtt_p99", "unix_rtt_same_cpu_p50",
                   "unix_rtt_cross_cpu_p50"),
            unix_rtt,
            "Unix stream socket request/response between two processes",
        ),
        Baseline(
            "memcpy",
            _names("memcpy_4k", "memcpy_64k", "memcpy_1m"),
            memcpy,
            "memoryview copies between two memfd mappings",
        ),
        Baseline(
            "file_io",
            _names("file_seqwrite_1m", "file_seqread_1m_cold", "file_seqread_1m_warm",
                   "file_randread_4k_qd1", "file_randwrite_4k_qd1",
                   "file_randread_4k_qd32", "file_randwrite_4k_qd32",
                   "file_randread_4k_qd1_cold", "file_randread_4k_qd32_cold",
                   "file_syncwrite_4k_qd1"),
            file_io,
            "pread/pwrite on a file in a temporary directory",
        ),
        Baseline(
            "udp",
            _names("udp_rtt_p50", "udp_rtt_p99", "udp_rtt_same_cpu_p50", "udp_rtt_cross_cpu_p50",
                   "udp_throughput", "udp_pps"),
            udp,
            "UDP over loopback between two processes",
        ),
    )
}


def canonical_name(name: str) -> str:
    """``"zmq_relay_rtt"`` -> ``"baseline.zmq_relay_rtt_p50"``.

    The ``baseline.`` prefix is optional, and a latency named without a
    percentile means its median.
    """
    full = name if name.startswith("baseline.") else f"baseline.{name}"
    if find_group(full) is None and find_group(full + "_p50") is not None:
        full += "_p50"
    return full


def find_group(figure_name: str) -> Baseline | None:
    """The baseline group that provides ``figure_name`` (full name), if any."""
    for baseline in BASELINES.values():
        if figure_name in baseline.provides:
            return baseline
    return None


def run(ctx: Any) -> list[Figure]:
    """The ``baselines`` suite: every group, through the run's cache.

    A group that fails is recorded as an error in ``ctx`` and the others still
    run, so one broken mechanism does not hide the rest of the floor.
    """
    figures: list[Figure] = []
    for group in BASELINES:
        try:
            figures += ctx.baseline_group(group)
        except Exception as exc:  # noqa: BLE001 - recorded, reported, run continues
            ctx.error(f"baselines.{group}", f"{type(exc).__name__}: {exc}")
    return figures
