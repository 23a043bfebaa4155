"""The network suite: netfront -> netback -> bridge -> netback -> netfront.

What this measures
------------------
Two guests and a network driver domain, each a separate forked process,
exchange Ethernet frames the way Xen's split network driver moves them:

    guest A (netfront)  --tx ring-->  driver domain (netback vif1.0)
                                           |  bridge xenbr0
    guest B (netfront)  <--rx ring--  driver domain (netback vif2.0)

Rings and packet buffers are real shared memfd pages; the grant checks and
event channels come from the local stand-in ``tests/test_net_localxen.py``
(no hypervisor process, so no hypercall round trips: every grant copy is a
local memmove after an entry check).  Figures:

* ``network.throughput`` (MB/s) and ``network.pps`` (frames/s): A sends
  1442-byte frames (a UDP datagram with 1400 bytes of payload) as fast as
  netfront lets it for a short run; B counts what arrives, from its first to
  its last frame, as the UDP baseline does.  Compared with
  ``baseline.udp_throughput`` and ``baseline.udp_pps`` (raw UDP over loopback
  between two processes).
* ``network.ping_rtt_p50``/``_p99`` (µs): ICMP echo from A's stack to B's and
  back, compared with ``baseline.udp_rtt``.

A frame crosses two process boundaries (A to the driver domain, the driver
domain to B) where the baseline crosses one; a ratio near 2 would already be
"as good as the kernel".  The detail of each figure keeps the drop counters:
netback drops (like a full qdisc) when B falls behind.

The processes are built by :class:`NetTopology`, which the integration test
(``tests/test_net_integration.py``) uses too.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any, Callable

import trio

from bench.harness import Figure, compare, latency_figures, p50
from bench.procs import BenchError, Child

DD = 0
GUESTS = {1: ("00:16:3e:00:00:01", "10.0.0.1"), 2: ("00:16:3e:00:00:02", "10.0.0.2")}
IDLE_S = 30.0


# --- control lines between the processes (XenStore's role, much simplified) ------------


class Line:
    """JSON messages, one per line, over a socket; blocking or trio flavours."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def send(self, msg: Any) -> None:
        self.sock.setblocking(True)
        self.sock.sendall(json.dumps(msg).encode() + b"\n")

    def recv(self, timeout: float = IDLE_S) -> Any:
        self.sock.settimeout(timeout)
        while b"\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("control line closed")
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    async def asend(self, msg: Any) -> None:
        self.sock.setblocking(False)
        data = json.dumps(msg).encode() + b"\n"
        while data:
            await trio.lowlevel.wait_writable(self.sock)
            try:
                data = data[self.sock.send(data):]
            except BlockingIOError:
                pass

    async def arecv(self) -> Any:
        self.sock.setblocking(False)
        while b"\n" not in self.buf:
            await trio.lowlevel.wait_readable(self.sock)
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                continue
            if not data:
                raise ConnectionError("control line closed")
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)


# --- the processes -----------------------------------------------------------------------


def _driver_domain(xen: Any, vifs: list[tuple[int, Any, socket.socket]],
                   parent: socket.socket) -> None:
    from domains.driverdom.bridge import Bridge
    from domains.driverdom.netback import Netback

    async def main() -> None:
        k = xen.kernel(DD)
        bridge = Bridge("xenbr0")
        backs = []
        ctl = Line(parent)
        async with trio.open_nursery() as nursery:
            for domid, port, sock in vifs:
                line = Line(sock)
                refs = await line.arecv()
                nb = await Netback.connect(k.grants, k.memory, domid, refs["tx-ring-ref"],
                                           refs["rx-ring-ref"], port, name=f"vif{domid}.0")
                bport = bridge.add_port(nb.name, nb.deliver)
                nb.on_packet = lambda f, bport=bport: bridge.input(bport, f)
                await nursery.start(nb.run)
                backs.append(nb)
                await line.asend({"state": "Connected"})
            await ctl.asend({"ready": True})
            await ctl.arecv()          # "stop"
            await ctl.asend({nb.name: {**vars(nb.stats), "error": nb.error} for nb in backs})
            nursery.cancel_scope.cancel()

    trio.run(main)


def _guest(xen: Any, domid: int, port: Any, dd_sock: socket.socket, parent: socket.socket,
           workload: str) -> None:
    from domains.domu.netfront import Netfront
    from domains.domu.netstack import NetStack

    async def main() -> None:
        k = xen.kernel(domid)
        nf = await Netfront.create(k.grants, k.memory, DD)
        dd = Line(dd_sock)
        await dd.asend({"tx-ring-ref": nf.tx_ring_ref, "rx-ring-ref": nf.rx_ring_ref,
                        "event-channel": port.port, "request-rx-copy": 1})
        await dd.arecv()               # the backend is Connected
        mac, ip = GUESTS[domid]
        async with trio.open_nursery() as nursery:
            await nursery.start(nf.run)
            nf.connect(port)
            stack = NetStack(mac, ip, nf.send)
            ctl = Line(parent)
            await ctl.asend({"ready": True})
            await WORKLOADS[workload](nf, stack, ctl, nursery)
            nursery.cancel_scope.cancel()

    trio.run(main)


# --- workloads (each runs in a guest) ----------------------------------------------------


async def _serve_commands(nf: Any, stack: Any, ctl: Line, nursery: trio.Nursery) -> None:
    """A guest with a running stack that does what the parent asks, then reports."""
    nursery.start_soon(stack.run, nf.receive)
    echo = stack.udp_bind(7)

    async def echo_server() -> None:
        while True:
            data, addr = await echo.recvfrom()
            await echo.sendto(data, addr)
    nursery.start_soon(echo_server)
    while True:
        cmd = await ctl.arecv()
        if cmd["op"] == "ping":
            rtts = []
            for seq in range(1, cmd["count"] + 1):
                rtts.append(await stack.ping(cmd["ip"], seq=seq, timeout=5))
            await ctl.asend({"rtts": rtts})
        elif cmd["op"] == "udp_echo":
            sock = stack.udp_bind()
            bad = 0
            for i, size in enumerate(cmd["sizes"]):
                data = i.to_bytes(4, "big") + bytes((i + j) & 0xFF for j in range(size - 4))
                await sock.sendto(data, (cmd["ip"], 7))
                with trio.fail_after(5):
                    got, _addr = await sock.recvfrom()
                bad += got != data
            sock.close()
            await ctl.asend({"echoed": len(cmd["sizes"]), "bad": bad})
        elif cmd["op"] == "stop":
            await ctl.asend({"netfront": vars(nf.stats), "stack": vars(stack.stats),
                             "icmp_answered": len(stack.icmp_log)})
            return


def _udp_frame(payload: bytes) -> bytes:
    from domains.domu.netstack import (ETH_P_IP, IPPROTO_UDP, EthernetFrame, Ipv4Packet,
                                       UdpDatagram, parse_mac)
    (smac, sip), (dmac, dip) = GUESTS[1], GUESTS[2]
    udp = UdpDatagram(40000, 9, payload).encode(sip, dip)
    ip = Ipv4Packet(sip, dip, IPPROTO_UDP, udp).encode()
    return EthernetFrame(parse_mac(dmac), parse_mac(smac), ETH_P_IP, ip).encode()


_PAYLOAD_AT = 14 + 20 + 8


async def _source(nf: Any, _stack: Any, ctl: Line, nursery: trio.Nursery) -> None:
    """Send data frames for a timed run; then END markers until told to move on."""
    while True:
        cmd = await ctl.arecv()
        if cmd["op"] == "stop":
            await ctl.asend({"netfront": vars(nf.stats)})
            return
        run, size = cmd["run"], cmd["size"]
        data = _udp_frame(b"D" + bytes([run]) + bytes(size - 2))
        end = _udp_frame(b"E" + bytes([run]) + bytes(14))
        sent = 0
        deadline = time.perf_counter() + cmd["seconds"]
        while time.perf_counter() < deadline:
            for _ in range(64):
                await nf.send(data)
            sent += 64
            await trio.lowlevel.checkpoint()
        await ctl.asend({"sent": sent})
        with trio.move_on_after(IDLE_S):
            async with trio.open_nursery() as n:
                async def markers() -> None:
                    while True:       # pacing, not synchronisation: markers may be dropped
                        await nf.send(end)
                        await trio.sleep(0.02)
                n.start_soon(markers)
                await ctl.arecv()     # "next"
                n.cancel_scope.cancel()


async def _sink(nf: Any, _stack: Any, ctl: Line, nursery: trio.Nursery) -> None:
    """Count data frames per run; report a run on its first END marker."""
    runs: dict[int, list[int]] = {}
    reported: set[int] = set()
    clock = time.perf_counter_ns

    async def stopper() -> None:
        await ctl.arecv()
        await ctl.asend({"netfront": vars(nf.stats)})
        nursery.cancel_scope.cancel()
    nursery.start_soon(stopper)
    while True:
        frame = await nf.receive()
        if len(frame) < _PAYLOAD_AT + 2:
            continue
        kind, run = frame[_PAYLOAD_AT], frame[_PAYLOAD_AT + 1]
        if kind == ord("D"):
            now = clock()
            entry = runs.get(run)
            if entry is None:
                runs[run] = [1, len(frame), now, now]
            else:
                entry[0] += 1
                entry[1] += len(frame)
                entry[3] = now
        elif kind == ord("E") and run not in reported:
            reported.add(run)
            count, nbytes, first, last = runs.get(run, [0, 0, 0, 0])
            await ctl.asend({"run": run, "count": count, "bytes": nbytes, "ns": last - first})


WORKLOADS: dict[str, Callable[..., Any]] = {
    "serve": _serve_commands, "source": _source, "sink": _sink}


# --- the topology, seen from the parent ----------------------------------------------------


class NetTopology:
    """A driver domain and two guests as forked processes, wired by real shared pages.

    ``with NetTopology({1: "serve", 2: "serve"}) as net: net.ask(1, {...})``.
    Every process and descriptor is gone when the block ends.
    """

    def __init__(self, workloads: dict[int, str], pages: int = 1024) -> None:
        from tests.test_net_localxen import LocalXen

        self.workloads = workloads
        self.xen = LocalXen([DD, *workloads], pages=pages)
        self.children: list[Child] = []
        self.lines: dict[int, Line] = {}
        self._socks: list[socket.socket] = []

    def _pair(self) -> tuple[socket.socket, socket.socket]:
        a, b = socket.socketpair()
        self._socks += [a, b]
        return a, b

    def __enter__(self) -> "NetTopology":
        try:
            vifs = []
            guests = []
            for domid, workload in self.workloads.items():
                fe_port, be_port = self.xen.event_channel()
                fe_ctl, be_ctl = self._pair()
                mine, theirs = self._pair()
                vifs.append((domid, be_port, be_ctl))
                guests.append((domid, fe_port, fe_ctl, theirs, workload))
                self.lines[domid] = Line(mine)
            mine, theirs = self._pair()
            self.lines[DD] = Line(mine)
            self.children.append(Child("netback-dd", _driver_domain, self.xen, vifs, theirs).start())
            for domid, fe_port, fe_ctl, theirs, workload in guests:
                self.children.append(
                    Child(f"netfront-d{domid}", _guest, self.xen, domid, fe_port, fe_ctl, theirs,
                          workload).start())
            for domid in (DD, *self.workloads):
                self._expect(domid, "ready")
        except BaseException:
            self.close()
            raise
        return self

    def _expect(self, domid: int, key: str) -> Any:
        try:
            msg = self.lines[domid].recv()
        except (OSError, ConnectionError) as exc:
            raise BenchError(f"d{domid} did not answer: {exc}") from None
        if key not in msg:
            raise BenchError(f"d{domid} answered {msg!r}, expected {key!r}")
        return msg

    def ask(self, domid: int, msg: dict, expect: str) -> Any:
        self.lines[domid].send(msg)
        return self._expect(domid, expect)

    def stop(self) -> dict[int, Any]:
        """Stop every process politely; returns each one's final statistics."""
        out = {}
        for domid in self.workloads:
            out[domid] = self.ask(domid, {"op": "stop"}, "netfront")
        out[DD] = self.ask(DD, {"op": "stop"}, "vif1.0")
        for child in self.children:
            child.stop(timeout=10)
        return out

    def close(self) -> None:
        for child in self.children:
            child.stop(timeout=2, check=False)
        for s in self._socks:
            s.close()
        self.xen.close()

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- the suite ------------------------------------------------------------------------------


def _scaled(n: float, scale: float, minimum: float) -> Any:
    v = max(minimum, n * scale)
    return type(n)(v) if isinstance(n, int) else v


def measure(scale: float = 1.0) -> tuple[list[float], list[float], list[int], dict]:
    """(MB/s per run, frames/s per run, ping RTT samples in ns, detail)."""
    runs = _scaled(5, scale, 2)
    seconds = _scaled(0.5, scale, 0.1)
    size = 1400
    mbps, pps = [], []
    detail: dict[str, Any] = {"frame_bytes": len(_udp_frame(bytes(size))), "runs": []}
    with NetTopology({1: "source", 2: "sink"}) as net:
        for run in range(runs):
            sent = net.ask(1, {"op": "run", "run": run, "seconds": seconds, "size": size},
                           "sent")["sent"]
            got = net._expect(2, "run")
            net.lines[1].send({"op": "next"})
            if got["count"] < 2 or got["ns"] <= 0:
                raise BenchError(f"network: run {run}: the sink saw {got['count']} frames")
            secs = got["ns"] / 1e9
            mbps.append(got["bytes"] / secs / 1e6)
            pps.append(got["count"] / secs)
            detail["runs"].append({"sent": sent, "received": got["count"]})
        detail["final"] = net.stop()
    rtts: list[int] = []
    with NetTopology({1: "serve", 2: "serve"}) as net:
        net.ask(1, {"op": "ping", "ip": GUESTS[2][1], "count": 20}, "rtts")     # warm-up
        for _ in range(_scaled(5, scale, 1)):
            got = net.ask(1, {"op": "ping", "ip": GUESTS[2][1],
                              "count": _scaled(200, scale, 20)}, "rtts")
            rtts += [int(r * 1e9) for r in got["rtts"]]
        net.stop()
    return mbps, pps, rtts, detail


def run(ctx: Any) -> list[Figure]:
    mbps, pps, rtts, detail = measure(ctx.scale)
    lost = [r["sent"] - r["received"] for r in detail["runs"]]
    info = {"mbps_runs": [round(x, 2) for x in mbps], "pps_runs": [round(x) for x in pps],
            "frame_bytes": detail["frame_bytes"], "lost_per_run": lost,
            "path": "netfront(A) -> netback -> xenbr0 -> netback -> netfront(B), 3 processes, "
                    "grant checks by the local stand-in (no hypervisor process)"}
    figures = [
        compare("network.throughput", p50(mbps), "MB/s", ctx.baseline("udp_throughput"), True,
                dict(info)),
        compare("network.pps", p50(pps), "pkt/s", ctx.baseline("udp_pps"), True, dict(info)),
    ]
    base = ctx.baseline("udp_rtt")
    for fig in latency_figures("network.ping_rtt", rtts, "us", {"samples": len(rtts)}):
        ref = base if fig.name.endswith("p50") else ctx.baseline("baseline.udp_rtt_p99")
        figures.append(compare(fig.name, fig.value, "us", ref, False, fig.detail))
    return figures


if __name__ == "__main__":   # a quick look without the harness
    m, p, r, d = measure(float(os.environ.get("SCALE", "0.5")))
    print(f"throughput {p50(m):.1f} MB/s  {p50(p):.0f} frames/s  "
          f"ping p50 {p50(r) / 1e3:.0f} us  lost per run {[x['sent'] - x['received'] for x in d['runs']]}")
