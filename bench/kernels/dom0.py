"""The dom0 bench kernel: the control domain as benchmark orchestrator.

What this is
------------
In Xen the control domain builds guests and wires them together; a benchmark
of the hypervisor is therefore naturally run *from dom0*: create two guests,
give them an event channel and some grants, let them measure, collect. This
kernel is booted as domain 0 by ``python -m hypervisor --dom0-kernel
bench.kernels.dom0``; its plan (what to measure, how many times) arrives in
start_info (``--dom0-args '{"bench": {...}}'``), and its results go back to
the benchmark driver over the control link (``bench.kernels.link``).

What it does, in order:

1. creates two guests running ``bench.kernels.guest`` (``bench-ping`` and
   ``bench-pong``), allocates an unbound port in the pong guest for the ping
   guest (EVTCHNOP_alloc_unbound with ``dom``, as Xen's toolstack does for
   the console and XenStore channels) and has the ping guest bind it;
2. event-channel round trips, both notify styles, in interleaved rounds;
   then again with the hypervisor and both guests pinned to one CPU, and
   spread over two (``domctl setvcpuaffinity`` pins guests, the driver pins
   the hypervisor process when asked);
3. null hypercalls in the ping guest: one at a time, and pipelined;
4. grants: the ping guest grants 16 pages to the pong guest, which maps and
   unmaps them (singly and as a batch) and grant-copies them;
5. destroys both, then times domain creation: create, unpause and wait for
   the guest to report in, one domain after another, keeping each running,
   until the largest batch is reached; counts them with ``sysctl
   getdomaininfolist``; then destroys them one by one, timing that too.

Invariant: every guest this kernel creates is destroyed by it before it
reports its results, unless a step failed (then the hypervisor's shutdown
destroys what is left; the driver checks that no process survives).

Where this differs from Xen: there is no xl here. dom0 issues the raw domctl
and event-channel hypercalls itself, as libxl would underneath.
"""

from __future__ import annotations

import faulthandler
import os
import time
import traceback
from typing import Any

import trio

from bench.kernels.link import Link, LinkClosed, connect, listen, unwrap
from domains.kernel.boot import Kernel, boot

clock = time.perf_counter_ns
GUEST_KERNEL = "bench.kernels.guest"
HELLO_TIMEOUT_S = 20.0


class Guests:
    """Guests reporting in on the control socket, by domid."""

    def __init__(self) -> None:
        self.hellos: dict[int, tuple[Link, dict, int]] = {}
        self._arrived: dict[int, trio.Event] = {}

    def _event(self, domid: int) -> trio.Event:
        return self._arrived.setdefault(domid, trio.Event())

    async def serve(self, listener: trio.SocketListener) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                stream = await listener.accept()
                nursery.start_soon(self._hello, stream)

    async def _hello(self, stream: trio.SocketStream) -> None:
        link = Link(stream, "guest")
        try:
            hello = await link.recv(timeout=HELLO_TIMEOUT_S)
            domid = int(hello["hello"])
        except (LinkClosed, trio.TooSlowError, KeyError, TypeError, ValueError):
            await stream.aclose()
            return
        link.peer = f"guest d{domid}"
        self.hellos[domid] = (link, hello, clock())
        self._event(domid).set()

    async def wait(self, domid: int, timeout: float = HELLO_TIMEOUT_S) -> tuple[Link, dict, int]:
        try:
            with trio.fail_after(timeout):
                await self._event(domid).wait()
        except trio.TooSlowError:
            raise TimeoutError(f"guest d{domid} did not report in within {timeout:.0f} s; "
                               f"see its log under logs/") from None
        return self.hellos[domid]

    async def forget(self, domid: int) -> None:
        entry = self.hellos.pop(domid, None)
        self._arrived.pop(domid, None)
        if entry is not None:
            await entry[0].aclose()


class Bench:
    """One run of the plan; ``results`` is what goes back to the driver."""

    def __init__(self, k: Kernel, plan: dict, driver: Link, guests: Guests) -> None:
        self.k = k
        self.plan = plan
        self.driver = driver
        self.guests = guests
        self.results: dict[str, Any] = {}
        self.cpus = sorted(os.sched_getaffinity(0))

    async def log(self, text: str) -> None:
        await self.driver.send({"log": text})

    async def domctl(self, cmd: str, **args: Any) -> Any:
        return await self.k.hv.call("domctl", cmd, **args)

    async def create(self, name: str) -> int:
        r = await self.domctl("createdomain", name=name, kernel=GUEST_KERNEL,
                              memory_kb=self.plan["guest_memory_kb"],
                              cmdline=f"bench={self.plan['control']}")
        return r["domid"]

    async def destroy(self, domid: int) -> None:
        await self.guests.forget(domid)
        await self.domctl("destroydomain", domid=domid)

    # -- the plan ---------------------------------------------------------------
    async def run(self) -> dict:
        t0 = clock()
        a, b = await self.create("bench-ping"), await self.create("bench-pong")
        pb = (await self.k.hv.call("event_channel_op", "alloc_unbound", dom=b,
                                   remote_dom=a))["port"]
        for domid in (a, b):
            await self.domctl("unpausedomain", domid=domid)
        ping, _, _ = await self.guests.wait(a)
        pong, _, _ = await self.guests.wait(b)
        await pong.call({"op": "adopt", "port": pb})
        pa = await ping.call({"op": "bind", "remote_dom": b, "remote_port": pb})
        self.results["pair"] = {"ping": a, "pong": b, "ping_port": pa, "pong_port": pb,
                                "setup_ms": (clock() - t0) / 1e6}
        await self.log(f"guests d{a} and d{b} up, event channel {a}:{pa} <-> {b}:{pb}")

        await self.evtchn(ping, pong, pa, pb)
        await self.placement(ping, pong, pa, pb, a, b)
        await self.hypercalls(ping)
        await self.grants(ping, pong, a, b)
        for domid in (a, b):
            await self.destroy(domid)
        await self.creation()
        return self.results

    async def _rtt(self, ping: Link, pong: Link, pa: int, pb: int, mode: str, n: int,
                   warmup: int) -> list[int]:
        timeout = 30 + (n + warmup) * 0.01
        suffix = "_raw" if mode == "raw" else ""
        await pong.send({"op": "pong" + suffix, "port": pb, "n": n, "warmup": warmup,
                         "mode": mode})
        samples = await ping.call({"op": "ping" + suffix, "port": pa, "n": n, "warmup": warmup,
                                   "mode": mode}, timeout)
        unwrap(await pong.recv(timeout), pong.peer, "pong")
        return samples

    async def evtchn(self, ping: Link, pong: Link, pa: int, pb: int) -> None:
        p = self.plan["evtchn"]
        # "raw": the same guests, notifying and waiting on the bare socket without
        # trio or the kernel library (a diagnostic of where the time goes).
        out: dict[str, list[int]] = {"await": [], "nowait": [], "raw": []}
        for _ in range(p["rounds"]):
            for mode in out:   # interleaved, so a burst of noise spreads over both
                out[mode] += await self._rtt(ping, pong, pa, pb, mode, p["n"], p["warmup"])
        self.results["evtchn"] = out
        await self.log(f"event-channel round trips: {len(out['await'])} per mode")

    async def pin_hypervisor(self, cpus: list[int]) -> None:
        await self.driver.call({"op": "pin_hv", "cpus": cpus})

    async def placement(self, ping: Link, pong: Link, pa: int, pb: int, a: int, b: int) -> None:
        """Same run, pinned: hv+ping+pong on one CPU, then every hop crossing CPUs."""
        if len(self.cpus) < 2:
            return
        p = self.plan["evtchn"]
        c0, c1 = self.cpus[0], self.cpus[1]
        layouts = {"same_cpu": {"ping": c0, "hypervisor": c0, "pong": c0},
                   "cross_cpu": {"ping": c0, "hypervisor": c1, "pong": c0}}
        out: dict[str, Any] = {}
        try:
            for label, layout in layouts.items():
                await self.domctl("setvcpuaffinity", domid=a, cpus=[layout["ping"]])
                await self.domctl("setvcpuaffinity", domid=b, cpus=[layout["pong"]])
                await self.pin_hypervisor([layout["hypervisor"]])
                out[label] = {"layout": layout}
                for mode in ("await", "nowait"):
                    out[label][mode] = await self._rtt(ping, pong, pa, pb, mode,
                                                       p["placement_n"], p["warmup"] // 3)
                out[label]["hypercall"] = await ping.call(
                    {"op": "hypercall_seq", "n": p["placement_n"], "warmup": p["warmup"] // 3})
        finally:
            await self.domctl("setvcpuaffinity", domid=a, cpus=self.cpus)
            await self.domctl("setvcpuaffinity", domid=b, cpus=self.cpus)
            await self.pin_hypervisor(self.cpus)
        self.results["placement"] = out
        await self.log("placement runs done (same CPU, cross CPU)")

    async def hypercalls(self, ping: Link) -> None:
        p = self.plan["hypercall"]
        seq: list[int] = []
        raw: list[int] = []
        pipe: dict[str, list[float]] = {str(w): [] for w in p["windows"]}
        for _ in range(p["rounds"]):
            seq += await ping.call({"op": "hypercall_seq", "n": p["n"], "warmup": p["warmup"]})
            raw += await ping.call({"op": "hypercall_raw", "n": p["n"], "warmup": p["warmup"]})
            for w in p["windows"]:
                ns = await ping.call({"op": "hypercall_pipe", "n": p["pipe_n"],
                                      "warmup": p["warmup"], "window": w}, 60)
                pipe[str(w)].append(p["pipe_n"] / (ns / 1e9))
        raw_pipe = []
        for _ in range(p["rounds"]):
            ns = await ping.call({"op": "hypercall_raw_pipe", "n": p["pipe_n"], "window": 64}, 60)
            raw_pipe.append(p["pipe_n"] / (ns / 1e9))
        self.results["hypercall"] = {"seq": seq, "raw": raw, "pipe": pipe, "pipe_n": p["pipe_n"],
                                     "raw_pipe_w64": raw_pipe}
        await self.log("null hypercalls done")

    async def grants(self, ping: Link, pong: Link, a: int, b: int) -> None:
        p = self.plan["grant"]
        refs = await ping.call({"op": "grant_pages", "peer": b, "nr": p["nr"]})
        out: dict[str, Any] = {"nr": p["nr"], "map_single": [], "map_batch": [],
                               "copy_seq": [], "copy_pipe": [], "content_ok": True}
        for _ in range(p["rounds"]):
            r = await pong.call({"op": "map_single", "dom": a, "refs": refs,
                                 "n": p["single_n"], "warmup": p["warmup"]}, 60)
            out["map_single"].append(r["pairs"] / (r["elapsed_ns"] / 1e9))
            out["content_ok"] &= r["content_ok"]
            r = await pong.call({"op": "map_batch", "dom": a, "refs": refs,
                                 "n": p["batch_n"], "warmup": p["warmup"]}, 60)
            out["map_batch"].append(r["batches"] * r["batch"] / (r["elapsed_ns"] / 1e9))
            out["content_ok"] &= r["content_ok"]
            r = await pong.call({"op": "copy", "dom": a, "refs": refs, "n": p["copy_n"],
                                 "warmup": p["warmup"], "window": 1}, 60)
            out["copy_seq"] += r["samples"]
            out["bytes_per_call"] = r["bytes_per_call"]
            out["content_ok"] &= r["content_ok"]
            r = await pong.call({"op": "copy", "dom": a, "refs": refs, "n": p["copy_n"],
                                 "warmup": p["warmup"], "window": p["copy_window"]}, 60)
            out["copy_pipe"].append(r["calls"] * r["bytes_per_call"] / r["elapsed_ns"])  # GB/s
            out["content_ok"] &= r["content_ok"]
        out["copy_window"] = p["copy_window"]
        # How the cost of one copy hypercall grows with its batch: the slope is
        # the hypervisor's (and the codec's) cost per 4 KiB op.
        many = await ping.call({"op": "grant_pages", "peer": b, "nr": max(p["scaling"])})
        out["scaling"] = {}
        for size in p["scaling"]:
            r = await pong.call({"op": "copy", "dom": a, "refs": many[:size],
                                 "n": p["scaling_n"], "warmup": p["warmup"], "window": 1}, 60)
            out["scaling"][str(size)] = r["samples"]
            out["content_ok"] &= r["content_ok"]
        self.results["grant"] = out
        await self.log("grant map/unmap and copy done")

    async def null_calls(self) -> list[int]:
        """dom0's own null-hypercall round trips (how the loop scales with domains)."""
        p = self.plan["hypercall"]
        call = self.k.hv.call
        samples = []
        for i in range(p["warmup"] + p["n"]):
            t0 = clock()
            await call("sched_op", "yield")
            samples.append(clock() - t0)
        return samples[p["warmup"]:]

    async def boot_one(self, name: str, live: list[int]) -> dict[str, int]:
        """createdomain + unpausedomain, then wait for the guest to report in."""
        t0 = clock()
        domid = await self.create(name)
        t1 = clock()
        live.append(domid)
        await self.domctl("unpausedomain", domid=domid)
        t2 = clock()
        _link, hello, arrived = await self.guests.wait(domid)
        return {"domid": domid, "sent": t0, "created": t1, "unpaused": t2,
                "main": hello["t_main"], "reported": arrived}

    async def creation(self) -> None:
        """Create guests one after another, each running before the next is made."""
        p = self.plan["create"]
        single: list[dict[str, int]] = []
        records: list[dict[str, int]] = []
        live: list[int] = []
        total = max(p["sizes"])
        try:
            self.results["dom0_hypercall"] = {"guests_0": await self.null_calls()}
            for i in range(p["single_reps"]):   # one at a time into an empty machine
                single.append(await self.boot_one(f"bench-s{i:03d}", live))
                await self.destroy(live.pop())
            await self.log(f"{len(single)} single creations done")
            for i in range(total):
                records.append(await self.boot_one(f"bench-g{i:03d}", live))
                if i + 1 in p["sizes"]:
                    await self.log(f"{i + 1} domains created and running")
            self.results["dom0_hypercall"][f"guests_{len(live)}"] = await self.null_calls()
            listing = await self.k.hv.call("sysctl", "getdomaininfolist")
            ours = set(live)
            running = [d for d in listing if d["domid"] in ours
                       and (d["state"][0] == "r" or d["state"][1] == "b")]
            self.results["running"] = {"guests": len(running), "listed": len(listing),
                                       "states": sorted({d["state"] for d in listing})}
            destroy_ns = []
            for domid in list(live):
                await self.guests.forget(domid)
                t0 = clock()
                await self.domctl("destroydomain", domid=domid)
                destroy_ns.append(clock() - t0)
                live.remove(domid)
            after = await self.k.hv.call("sysctl", "getdomaininfolist")
            self.results["destroy"] = {"samples": destroy_ns, "left": len(after)}
        finally:
            self.results["create"] = {"single": single, "records": records, "sizes": p["sizes"]}
            for domid in live:   # only after a failure
                try:
                    await self.destroy(domid)
                except Exception:
                    pass


async def main(k: Kernel) -> None:
    plan = k.start_info.get("bench")
    if not isinstance(plan, dict):
        raise ValueError("the dom0 bench kernel needs a 'bench' plan in start_info "
                         "(--dom0-args '{\"bench\": {...}}')")
    driver = await connect(plan["driver"], "driver")
    await driver.send({"hello": k.domid})
    guests = Guests()
    listener = listen(plan["control"])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(guests.serve, listener)
        bench = Bench(k, plan, driver, guests)
        try:
            results = await bench.run()
            await driver.send({"results": results})
        except Exception as exc:
            traceback.print_exc()
            await driver.send({"error": f"{type(exc).__name__}: {exc}",
                               "partial": bench.results})
        # Stay up: the driver stops the whole machine (SIGTERM to the hypervisor).
        try:
            await driver.recv(timeout=None)
        except LinkClosed:
            pass
        await trio.sleep_forever()


def kernel_main(start: dict, fds: dict) -> int:
    faulthandler.enable()
    return boot(start, fds, main)
