"""Hypervisor benchmark: event channels, hypercalls, grants and domain creation.

What it measures
----------------
Everything is measured *inside domains*, by benchmark kernels booted on a real
microxen hypervisor (``bench.kernels``): dom0 runs ``bench.kernels.dom0``,
which creates guests running ``bench.kernels.guest`` and tells them which loop
to run. This process only starts the hypervisor, pins it when dom0 asks (for
the placement runs), collects raw samples and turns them into figures against
baselines measured in the same run:

* ``hv.evtchn_rtt_{await,nowait}_p50/_p99`` (µs): guest A notifies guest B
  over an interdomain event channel, B waits and notifies back, A waits.
  Compared with the bare ZeroMQ relay round trip (``zmq_relay_rtt``, four hops
  through a third process: the same shape as A -> hypervisor -> B -> hypervisor
  -> A); the ratio against the direct DEALER/ROUTER round trip is in
  ``detail``. Two notify styles:

  - ``await port.notify()`` sends EVTCHNOP_send and sleeps until the
    hypervisor's reply comes back. The reply is off the critical path in
    principle (the hypervisor raises the peer *before* it replies), but each
    side now handles one more message, one more trio event and one more task
    switch per notify, and the hypervisor sends one more message; on two cores
    shared by three busy processes that CPU time is latency. The ponger also
    cannot wait for the next ping until its reply arrived.
  - ``port.notify_nowait()`` does not use the channel at all: it writes a
    byte down the port's line, the write end of the peer port's pipe that
    the hypervisor handed over at binding (the pinger's end, which
    allocated the port, first sends by the doorbell and fetches its line
    during the warm-up), and returns, as Linux's notify_remote_via_evtchn
    does not wait for anything either. A round trip is two pipe writes and
    two wake-ups; the hypervisor process is not involved.

  Then the same, pinned: ``..._same_cpu_p50`` (hypervisor and both guests on
  one CPU) and ``..._cross_cpu_p50`` (every hop crosses CPUs), against the
  relay baseline pinned the same way (see ``bench.baselines``: on a 2-vCPU VM
  a cross-CPU wake-up is an IPI the host must deliver to a halted vCPU).
* ``hv.hypercall_rtt_p50/_p99`` (µs): a null hypercall (``sched_op yield``),
  one at a time, against the direct DEALER/ROUTER round trip (a hypercall is
  exactly that: domain -> hypervisor -> domain), relay ratio in ``detail``;
  ``hv.hypercall_rate_w8/_w64`` (calls/s) with 8 or 64 calls in flight from
  one guest (trio tasks on one channel), against ``zmq_msgs_per_s`` (window
  64); ``..._same_cpu_p50``/``..._cross_cpu_p50`` pinned.
* ``hv.grant_map_unmap_single`` (pairs/s): map_grant_ref + unmap_grant_ref of
  one grant, two hypercalls, a page descriptor passed by SCM_RIGHTS and an
  mmap/munmap; ``hv.grant_map_unmap_batch16`` (grants/s): 16 grants per
  map_many / unmap_many.
* ``hv.grant_copy_64k`` (GB/s): GNTTABOP_copy of 16 whole pages (64 KiB) per
  hypercall, one in flight, and ``hv.grant_copy_64k_pipelined`` with four in
  flight; against ``memcpy_64k`` (Python memoryview copy between two memfd
  mappings).
* ``hv.domain_create_{1,10,100}_p50/_p99`` (ms): from dom0 sending
  createdomain to the new guest's ``main`` starting (its boot hypercall
  answered: the kernel runs). "1": one guest at a time into an otherwise empty
  machine (created, reported in, destroyed, repeated). "10"/"100": guests
  created one after another and left running, latency of the first 10 / all
  100. ``hv.domains_running`` counts them with ``sysctl getdomaininfolist``
  at the end; ``hv.domain_destroy_p50`` times tearing them down.

Diagnostics (same run, same hypervisor; they say where the time goes):

* ``hv.evtchn_rtt_raw_*`` and ``hv.hypercall_rtt_raw_*``: the same loops in the
  same guests, but on the bare doorbell, upcall line and ZeroMQ socket with
  blocking waits, bypassing trio and the kernel library's reader task. The gap to the library figures
  is the guest library's share; the gap to the baseline is the hypervisor's.
* ``hv.hypercall_rate_raw_w64``: 64 bare hypercalls in flight, the hypervisor
  loop's own throughput ceiling.
* ``hv.hypercall_rtt_dom0_{0,N}guests_p50``: dom0's null hypercall with no
  guest, then with N guests running. The hypervisor's poller holds one
  pidfd per domain, and pyzmq's ``Poller.poll`` rebuilds its item array on
  every call, so each wake-up of the loop costs O(domains).
* ``hv.grant_copy_per_op``: the slope of a copy hypercall's p50 over batches
  of 1, 16 and 128 pages, i.e. what each 4 KiB op costs inside the
  hypervisor (entry checks, two page slices, msgpack), against which the
  memcpy itself is small.

What limits each figure (see the report for numbers): event channels and
hypercalls are bounded by ZeroMQ hops plus, per wake-up, a trio task switch
in each guest; grant copy by the hypercall round trip (64 KiB of memcpy is a
few µs, one round trip ~100 µs) and then by the per-op Python cost in the
hypervisor; domain creation by the zygote's fork and the new process's
ZeroMQ/trio start-up.

Invariant: every hypervisor started here is stopped with SIGTERM and waited
for, and every process it had (zygote, domains) is checked to be gone; a
survivor is killed by pid and reported as an error.

Where this differs from how Xen is measured: Xen's numbers come from guest
kernels on dedicated cores with a TSC. Here three Python processes share two
vCPUs with the rest of the machine; only the ratios to the same-run baselines
mean much.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

import msgpack

from bench.context import Context
from bench.harness import Figure, compare, p50, p99, rate_figure
from bench.procs import BenchError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOST_MEMORY_MIB = 2048
DOM0_MEMORY_MIB = 256
GUEST_MEMORY_KB = 4096
START_TIMEOUT_S = 30.0
PAGE_BYTES = 4096
STOP_TIMEOUT_S = 20.0


def _scaled(n: int, scale: float, minimum: int) -> int:
    return max(minimum, int(n * scale))


def make_plan(scale: float) -> dict[str, Any]:
    """The counts each loop runs, shrunk by ``scale`` (``--quick`` is 0.1)."""
    warm = _scaled(300, scale, 20)
    return {
        "guest_memory_kb": GUEST_MEMORY_KB,
        "evtchn": {"n": _scaled(2000, scale, 50), "warmup": warm, "rounds": 3,
                   "placement_n": _scaled(1000, scale, 50)},
        "hypercall": {"n": _scaled(2000, scale, 50), "warmup": warm, "rounds": 3,
                      "pipe_n": _scaled(10000, scale, 200), "windows": [8, 64]},
        "grant": {"nr": 16, "single_n": _scaled(1000, scale, 20),
                  "batch_n": _scaled(200, scale, 5), "copy_n": _scaled(1000, scale, 20),
                  "copy_window": 4, "warmup": _scaled(50, scale, 3), "rounds": 3,
                  "scaling": [1, 16, 128], "scaling_n": _scaled(200, scale, 10)},
        "create": {"single_reps": _scaled(10, scale, 3),
                   "sizes": sorted({10, _scaled(100, scale, 10)})},
    }


# --- the hypervisor under test ------------------------------------------------------


def _descendants(pid: int) -> list[int]:
    out: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        try:
            tids = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{parent}/task/{tid}/children") as f:
                    kids = [int(c) for c in f.read().split()]
            except OSError:
                continue
            out += kids
            todo += kids
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode()
    except OSError:
        return False
    return data[data.rfind(")") + 2:].split()[0] not in ("Z", "X")


def pin_process(pid: int, cpus: set[int]) -> None:
    """sched_setaffinity on every thread of ``pid`` (ZeroMQ's I/O thread too)."""
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        tids = [pid]
    for tid in tids:
        try:
            os.sched_setaffinity(tid, cpus)
        except OSError:
            pass   # a thread that just exited


class HypervisorRun:
    """``python -m hypervisor`` with the dom0 bench kernel, in a short run dir under /tmp."""

    def __init__(self, ctx: Context, plan: dict[str, Any]) -> None:
        self.ctx = ctx
        # Unix socket paths are limited to 107 bytes: keep the run dir short.
        self.run_dir = tempfile.mkdtemp(prefix="mxhv-", dir="/tmp")
        self.plan = dict(plan, driver=os.path.join(self.run_dir, "driver.sock"),
                         control=os.path.join(self.run_dir, "bench.sock"))
        self.proc: subprocess.Popen | None = None
        self.conn: socket.socket | None = None
        self.listener: socket.socket | None = None
        self._unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
        self.seen_pids: set[int] = set()

    def __enter__(self) -> "HypervisorRun":
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _start(self) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.plan["driver"])
        self.listener.listen(1)
        self.listener.settimeout(0.5)
        out = open(os.path.join(self.run_dir, "hypervisor.out"), "wb")
        env = dict(os.environ, PYTHONPATH=ROOT)
        cmd = [sys.executable, "-m", "hypervisor", "--run-dir", self.run_dir,
               "--host-memory", str(HOST_MEMORY_MIB), "--dom0-memory", str(DOM0_MEMORY_MIB),
               "--dom0-kernel", "bench.kernels.dom0",
               "--preload", "bench.kernels.dom0", "--preload", "bench.kernels.guest",
               "--dom0-args", json.dumps({"bench": self.plan})]
        try:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=out,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            out.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                self.conn, _ = self.listener.accept()
                break
            except TimeoutError:
                self._check_alive("starting")
                if time.monotonic() > deadline:
                    raise BenchError(f"dom0 bench kernel did not connect within "
                                     f"{START_TIMEOUT_S:.0f} s{self._logs()}") from None
        self.conn.settimeout(0.5)
        hello = self.recv(START_TIMEOUT_S)
        if hello.get("hello") != 0:
            raise BenchError(f"unexpected first message from dom0: {hello!r}")

    def _check_alive(self, what: str) -> None:
        assert self.proc is not None
        self.seen_pids.update(_descendants(self.proc.pid))
        if self.proc.poll() is not None:
            raise BenchError(f"hypervisor exited with status {self.proc.returncode} while "
                             f"{what}{self._logs()}")

    def _logs(self) -> str:
        """The tail of every log in the run dir, to explain a failure."""
        tails = []
        paths = [os.path.join(self.run_dir, "hypervisor.out")]
        logdir = os.path.join(self.run_dir, "logs")
        if os.path.isdir(logdir):
            paths += sorted(os.path.join(logdir, f) for f in os.listdir(logdir))
        for path in paths[:8]:
            try:
                with open(path, "rb") as f:
                    lines = f.read().decode(errors="replace").strip().splitlines()[-6:]
            except OSError:
                continue
            if lines:
                tails.append(f"--- {os.path.basename(path)}:\n" + "\n".join(lines))
        return ("\n" + "\n".join(tails)) if tails else ""

    def send(self, message: dict[str, Any]) -> None:
        assert self.conn is not None
        self.conn.settimeout(5)
        self.conn.sendall(msgpack.packb(message, use_bin_type=True))
        self.conn.settimeout(0.5)

    def recv(self, timeout: float) -> dict[str, Any]:
        assert self.conn is not None
        deadline = time.monotonic() + timeout
        while True:
            for message in self._unpacker:
                return message
            try:
                data = self.conn.recv(1 << 20)
            except TimeoutError:
                self._check_alive("benchmarking")
                if time.monotonic() > deadline:
                    raise BenchError(f"dom0 bench kernel silent for {timeout:.0f} s"
                                     f"{self._logs()}") from None
                continue
            if not data:
                raise BenchError(f"dom0 bench kernel hung up{self._logs()}")
            self._unpacker.feed(data)

    def collect(self, timeout: float) -> dict[str, Any]:
        """Serve dom0's requests and progress until its results arrive."""
        assert self.proc is not None
        while True:
            msg = self.recv(timeout)
            if "log" in msg:
                self.ctx.log(f"  hypervisor bench: {msg['log']}")
            elif msg.get("op") == "pin_hv":
                pin_process(self.proc.pid, set(msg["cpus"]))
                self.send({"ok": True})
            elif "results" in msg:
                self.seen_pids.update(_descendants(self.proc.pid))
                return msg["results"]
            elif "error" in msg:
                raise BenchError(f"dom0 bench kernel failed: {msg['error']}{self._logs()}")

    def stop(self) -> None:
        """SIGTERM the hypervisor, wait, and make sure nothing it started survives."""
        leftovers: list[int] = []
        try:
            if self.proc is not None:
                self.seen_pids.update(_descendants(self.proc.pid))
                if self.proc.poll() is None:
                    self.proc.send_signal(signal.SIGTERM)
                    try:
                        self.proc.wait(STOP_TIMEOUT_S)
                    except subprocess.TimeoutExpired:
                        self.ctx.error("hypervisor", "did not stop on SIGTERM; killed")
                        os.killpg(self.proc.pid, signal.SIGKILL)
                        self.proc.wait(5)
                deadline = time.monotonic() + 5
                leftovers = [p for p in self.seen_pids if _alive(p)]
                while leftovers and time.monotonic() < deadline:
                    time.sleep(0.02)
                    leftovers = [p for p in leftovers if _alive(p)]
                for pid in leftovers:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
        finally:
            for sock in (self.conn, self.listener):
                if sock is not None:
                    sock.close()
            shutil.rmtree(self.run_dir, ignore_errors=True)
        if leftovers:
            self.ctx.error("hypervisor", f"processes survived the hypervisor's shutdown and "
                                         f"were killed: {sorted(leftovers)}")


# --- figures -------------------------------------------------------------------------


def _us(ns: float) -> float:
    return ns / 1e3


def _lat_pair(name: str, samples: list[int], base50: Figure, base99: Figure,
              detail: dict[str, Any]) -> list[Figure]:
    info = {"samples": len(samples), "min_us": _us(min(samples)), "max_us": _us(max(samples)),
            **detail}
    return [compare(f"{name}_p50", _us(p50(samples)), "us", base50, False, info),
            compare(f"{name}_p99", _us(p99(samples)), "us", base99, False, dict(info))]


def _optional_baseline(ctx: Context, name: str) -> Figure | None:
    try:
        return ctx.baseline(name)
    except Exception:  # noqa: BLE001 - a pinned baseline is absent on a 1-CPU machine
        return None


def figures_from(results: dict[str, Any], ctx: Context) -> list[Figure]:
    relay50, relay99 = ctx.baseline("zmq_relay_rtt_p50"), ctx.baseline("zmq_relay_rtt_p99")
    zmq50, zmq99 = ctx.baseline("zmq_rtt_p50"), ctx.baseline("zmq_rtt_p99")
    figures: list[Figure] = []

    # Event channels.
    evt = results["evtchn"]
    for mode in ("await", "nowait"):
        samples = evt[mode]
        figures += _lat_pair(
            f"hv.evtchn_rtt_{mode}", samples, relay50, relay99,
            {"notify": "await port.notify()" if mode == "await" else "port.notify_nowait()",
             "path": "guest A -> hypervisor -> guest B -> hypervisor -> guest A",
             "vs_zmq_rtt_p50": _us(p50(samples)) / zmq50.value,
             "target_vs_relay": 1.3})
    raw = evt["raw"]
    figures += _lat_pair("hv.evtchn_rtt_raw", raw, relay50, relay99,
                         {"diagnostic": "same guests and hypervisor, loop on the bare zmq socket "
                                        "without trio or the kernel library",
                          "library_share_of_nowait_p50":
                              1 - p50(raw) / p50(evt["nowait"])})
    hyp = results["hypercall"]
    seq = hyp["seq"]
    figures += _lat_pair("hv.hypercall_rtt", seq, zmq50, zmq99,
                         {"hypercall": "sched_op yield", "from": "unprivileged guest",
                          "vs_zmq_relay_rtt_p50": _us(p50(seq)) / relay50.value})
    figures += _lat_pair("hv.hypercall_rtt_raw", hyp["raw"], zmq50, zmq99,
                         {"diagnostic": "blocking send/recv on the guest's hypercall socket, "
                                        "without trio or the kernel library",
                          "library_share_of_p50": 1 - p50(hyp["raw"]) / p50(seq)})

    # Placement.
    for label, runs in results.get("placement", {}).items():
        relay_pinned = _optional_baseline(ctx, f"zmq_relay_rtt_{label}_p50")
        zmq_pinned = _optional_baseline(ctx, f"zmq_rtt_{label}_p50")
        for mode in ("await", "nowait"):
            value = _us(p50(runs[mode]))
            info = {"samples": len(runs[mode]), "p99_us": _us(p99(runs[mode])),
                    "cpus": runs["layout"]}
            name = f"hv.evtchn_rtt_{mode}_{label}_p50"
            figures.append(compare(name, value, "us", relay_pinned, False, info) if relay_pinned
                           else Figure(name, value, "us", detail=info, better="lower"))
        value = _us(p50(runs["hypercall"]))
        info = {"samples": len(runs["hypercall"]), "p99_us": _us(p99(runs["hypercall"])),
                "cpus": {"guest": runs["layout"]["ping"],
                         "hypervisor": runs["layout"]["hypervisor"]}}
        name = f"hv.hypercall_rtt_{label}_p50"
        figures.append(compare(name, value, "us", zmq_pinned, False, info) if zmq_pinned
                       else Figure(name, value, "us", detail=info, better="lower"))

    # Pipelined null hypercalls.
    zmq_rate = ctx.baseline("zmq_msgs_per_s")
    relay_rate = ctx.baseline("zmq_relay_msgs_per_s")
    for window, rates in hyp["pipe"].items():
        fig = rate_figure(f"hv.hypercall_rate_w{window}", rates, "msg/s",
                          {"in_flight": int(window), "calls_per_run": hyp["pipe_n"],
                           "hypercall": "sched_op yield",
                           "baseline_window": 64})
        out = compare(fig.name, fig.value, "msg/s", zmq_rate, True, fig.detail)
        out.detail["vs_zmq_relay_msgs_per_s"] = relay_rate.value / fig.value
        figures.append(out)

    raw_pipe = rate_figure("hv.hypercall_rate_raw_w64", hyp["raw_pipe_w64"], "msg/s",
                           {"in_flight": 64, "diagnostic": "bare socket in the guest, no trio: "
                            "the hypervisor loop's own ceiling"})
    figures.append(compare(raw_pipe.name, raw_pipe.value, "msg/s", zmq_rate, True,
                           raw_pipe.detail))

    # dom0's own null hypercall, with no guest and with every created guest running:
    # the hypervisor polls one pidfd per domain, so its loop grows with the domain count.
    d0 = results.get("dom0_hypercall", {})
    idle = d0.get("guests_0")
    for key, samples in d0.items():
        count = int(key.split("_")[1])
        info = {"samples": len(samples), "p99_us": _us(p99(samples)), "guests_running": count}
        if idle and count:
            info["vs_no_guests"] = p50(samples) / p50(idle)
        figures.append(compare(f"hv.hypercall_rtt_dom0_{count}guests_p50", _us(p50(samples)),
                               "us", zmq50, False, info))

    # Grants.
    g = results["grant"]
    seq_p50_ns = p50(seq)
    single = rate_figure("hv.grant_map_unmap_single", g["map_single"], "pair/s",
                         {"per_pair_us": 1e6 / p50(g["map_single"]),
                          "hypercalls_per_pair": 2,
                          "null_hypercall_floor_pair_per_s": 1e9 / (2 * seq_p50_ns),
                          "content_ok": g["content_ok"]})
    batch = rate_figure(f"hv.grant_map_unmap_batch{g['nr']}", g["map_batch"], "grant/s",
                        {"batch": g["nr"], "per_batch_us": 1e6 * g["nr"] / p50(g["map_batch"]),
                         "hypercalls_per_batch": 2,
                         "speedup_vs_single": p50(g["map_batch"]) / p50(g["map_single"]),
                         "content_ok": g["content_ok"]})
    figures += [single, batch]
    # How a copy hypercall's cost grows with its batch: the slope is the cost of
    # one 4 KiB op inside the hypervisor (plus the codec), the intercept the
    # round trip. Measured back to back, so the two are comparable.
    scaling = {int(k): _us(p50(v)) for k, v in g.get("scaling", {}).items()}
    slope = intercept = None
    if len(scaling) >= 2:
        xs, ys = list(scaling), list(scaling.values())
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
        intercept = my - slope * mx
        figures.append(Figure("hv.grant_copy_per_op", slope, "us", better="lower", detail={
            "what": "extra time per 4 KiB op in one GNTTABOP_copy hypercall (slope of the "
                    "call's p50 over batch sizes): msgpack of the op, the hypervisor's "
                    "entry checks and lookups, and the page copy",
            "call_p50_us_by_batch": scaling, "intercept_us": intercept,
            "memcpy_4k_us": PAGE_BYTES / ctx.baseline("memcpy_4k").value / 1e3,
            "ceiling_GBps_for_4k_ops": PAGE_BYTES / (slope * 1e3) if slope > 0 else None}))
    memcpy64 = ctx.baseline("memcpy_64k")
    nbytes = g["bytes_per_call"]
    call_ns = p50(g["copy_seq"])
    copy_info: dict[str, Any] = {
        "bytes_per_hypercall": nbytes, "ops_per_hypercall": g["nr"],
        "copy_call_p50_us": _us(call_ns), "copy_call_p99_us": _us(p99(g["copy_seq"])),
        "memcpy_64k_us": _us(nbytes / memcpy64.value),   # GB/s == bytes/ns
        "content_ok": g["content_ok"], "target_ratio": 2.0,
    }
    if slope is not None:
        copy_info.update(round_trip_us=intercept, ops_us=slope * g["nr"],
                         round_trip_share=intercept / (intercept + slope * g["nr"]))
    figures.append(compare("hv.grant_copy_64k", nbytes / call_ns, "GB/s", memcpy64, True,
                           copy_info))
    pipe = rate_figure("hv.grant_copy_64k_pipelined", g["copy_pipe"], "GB/s",
                       {"in_flight": g["copy_window"], **copy_info})
    figures.append(compare(pipe.name, pipe.value, "GB/s", memcpy64, True, pipe.detail))

    # Domain creation.
    figures += creation_figures(results)
    return figures


def _create_breakdown(records: list[dict[str, int]]) -> dict[str, float]:
    return {
        "createdomain_p50_ms": p50([r["created"] - r["sent"] for r in records]) / 1e6,
        "unpause_to_main_p50_ms": p50([r["main"] - r["created"] for r in records]) / 1e6,
        "main_to_reported_p50_ms": p50([r["reported"] - r["main"] for r in records]) / 1e6,
    }


def creation_figures(results: dict[str, Any]) -> list[Figure]:
    figures: list[Figure] = []
    create = results["create"]
    groups: list[tuple[str, list[dict[str, int]], str]] = [
        ("1", create["single"], "one guest at a time into an empty machine, destroyed after")]
    for size in create["sizes"]:
        groups.append((str(size), create["records"][:size],
                       f"guests created one after another, all {size} left running"))
    for label, records, how in groups:
        lat = [(r["main"] - r["sent"]) / 1e6 for r in records]
        info: dict[str, Any] = {"samples": len(lat), "how": how, "max_ms": max(lat),
                                "from": "dom0 sends createdomain",
                                "to": "guest main() starts (boot hypercall answered)",
                                "target_p50_ms": 20.0, **_create_breakdown(records)}
        if len(lat) >= 20:
            info["p50_last10_ms"] = p50(lat[-10:])
        figures.append(Figure(f"hv.domain_create_{label}_p50", p50(lat), "ms", detail=info,
                              better="lower"))
        figures.append(Figure(f"hv.domain_create_{label}_p99", p99(lat), "ms",
                              detail=dict(info), better="lower"))
    running = results["running"]
    figures.append(Figure("hv.domains_running", running["guests"], "domains",
                          detail={"listed_by_getdomaininfolist": running["listed"],
                                  "states": running["states"],
                                  "expected": max(create["sizes"])},
                          better="higher"))
    destroy = results["destroy"]
    figures.append(Figure("hv.domain_destroy_p50", p50(destroy["samples"]) / 1e6, "ms",
                          detail={"samples": len(destroy["samples"]),
                                  "p99_ms": p99(destroy["samples"]) / 1e6,
                                  "domains_left_after": destroy["left"]},
                          better="lower"))
    return figures


def run(ctx: Context) -> list[Figure]:
    # The floors first, while no domain runs, so they see the same idle machine.
    for name in ("zmq_rtt_p50", "zmq_relay_rtt_p50", "memcpy_64k", "memcpy_4k"):
        ctx.baseline(name)
    plan = make_plan(ctx.scale)
    ctx.log("starting a hypervisor with the dom0 bench kernel ...")
    load_before = os.getloadavg()[0]
    with HypervisorRun(ctx, plan) as hv:
        results = hv.collect(timeout=120)
    load_after = os.getloadavg()[0]
    figures = figures_from(results, ctx)
    # Other work on the host shows up in every latency here: keep the evidence.
    for figure in figures:
        figure.detail = dict(figure.detail or {},
                             host_loadavg_1m=[round(load_before, 2), round(load_after, 2)])
    return figures


if __name__ == "__main__":
    import pprint

    scale_arg = float(sys.argv[1]) if len(sys.argv) > 1 else 0.1
    context = Context(tempfile.mkdtemp(prefix="mxb-"), scale=scale_arg)
    try:
        for figure in run(context):
            pprint.pprint(figure.to_dict(), width=120)
    finally:
        shutil.rmtree(context.run_dir, ignore_errors=True)
