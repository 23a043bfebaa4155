"""The whole-system network suite: guests talking through a real network driver domain.

What this measures
------------------
Unlike ``network`` (netfront/netback/bridge in forked processes with a local
grant stand-in), this suite boots the real system with ``run.py up``: the
hypervisor process, dom0, a driver domain ``netdom`` running netback and the
bridge ``xenbr0``, and guests whose ``net``/``ping`` workloads
(``domains/domu/net_workload.py``) produce the traffic.  Every grant copy and
event goes through the hypervisor process.  Figures:

* ``netsys.udp_throughput`` (MB/s) and ``netsys.udp_pps`` (datagrams/s):
  guest1 sends 1400-byte UDP datagrams to guest2 as fast as netfront accepts
  them; guest2's receiver counts verified datagrams and bytes.  Rates come
  from two of guest2's counter snapshots (each stamped with the time it was
  true), so the XenStore reads do not blur them.  Against
  ``baseline.udp_throughput``/``udp_pps`` (raw UDP over loopback).  The
  detail keeps the loss the receiver counted (netback drops when guest2
  falls behind, as a full qdisc would).
* ``netsys.ping_rtt_p50``/``_p99`` (µs): guest1 pings guest2 every 5 ms; the
  guest's stack keeps the last 1000 round trips.  Against
  ``baseline.udp_rtt_p50``/``_p99``.
(Recovery from a netdom crash is the ``recovery`` suite.)

Run directories are short ``/tmp/mxs*`` names, removed afterwards, and each
system is stopped with ``run.py down`` even when a measurement fails.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Iterator

from bench.harness import Figure, compare, p50
from bench.procs import BenchError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NETDOM = ('name = "netdom"\ntype = "pv"\nkernel = "driverdom"\nmemory = 64\n'
          'driver_domain = 1\nextra = "heartbeat=0.2"\non_crash = "restart"\n')


def guest(n: int, workload: str) -> str:
    return (f'name = "guest{n}"\ntype = "pv"\nkernel = "domu"\nmemory = 64\n'
            f'workload = "{workload}"\non_crash = "destroy"\n'
            f'vif = ["mac=00:16:3e:00:02:{n:02x}, backend=netdom, ip=10.0.0.{n}/24"]\n')


class _System:
    def __init__(self, run_dir: str) -> None:
        from domains.dom0.client import Client
        self.run_dir = run_dir
        self.client = Client(run_dir, timeout=30)

    def domains(self) -> dict[str, dict]:
        return {d["name"]: d for d in self.client.call("list") if "d" not in d["state"]}

    def counters(self, name: str) -> dict[str, float]:
        from tests.blocksys import workload_counters
        try:
            return workload_counters(self.client, name)
        except RuntimeError:
            return {}

    def snapshot(self, name: str) -> dict[str, float]:
        """Counters that were all true at one moment (``at`` did not move meanwhile)."""
        for _ in range(20):
            c = self.counters(name)
            again = self.counters(name).get("at")
            if c.get("at") is not None and c.get("at") == again:
                return c
        raise BenchError(f"netsys: could not read a consistent snapshot of {name}")

    def wait_for(self, predicate, timeout: float, what: str, poll: float = 0.05) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                value = predicate()
            except (KeyError, OSError):
                value = None
            if value:
                return value
            time.sleep(poll)
        raise BenchError(f"netsys: timed out after {timeout}s waiting for {what}")


@contextlib.contextmanager
def system(configs: dict[str, str], watchdog_timeout: float = 1.5) -> Iterator[_System]:
    run_dir = tempfile.mkdtemp(prefix="mxs", dir="/tmp")
    env = dict(os.environ, MICROXEN_WATCHDOG_TIMEOUT=str(watchdog_timeout))
    args = [sys.executable, os.path.join(ROOT, "run.py"), "up", "--run-dir", run_dir, "--detach"]
    for name, text in configs.items():
        path = os.path.join(run_dir, f"{name}.cfg")
        with open(path, "w") as f:
            f.write(text)
        args += ["--config", path]
    try:
        r = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise BenchError(f"netsys: run.py up failed: {r.stderr.strip()}")
        s = _System(run_dir)
        try:
            yield s
        finally:
            s.client.close()
    finally:
        subprocess.run([sys.executable, os.path.join(ROOT, "run.py"), "down", "--run-dir", run_dir],
                       cwd=ROOT, env=env, capture_output=True, timeout=60)
        shutil.rmtree(run_dir, ignore_errors=True)


def _scaled(n: int, scale: float, minimum: int) -> int:
    return max(minimum, int(n * scale))


def measure_throughput(scale: float) -> tuple[list[float], list[float], dict]:
    runs, window = _scaled(5, scale, 2), max(1.0, 2.0 * scale)
    configs = {"netdom": NETDOM,
               "guest1": guest(1, "net peer=10.0.0.2 udp_interval=0 udp_size=1400 ping_interval=1"),
               "guest2": guest(2, "net")}
    mbps, pps = [], []
    with system(configs) as s:
        s.wait_for(lambda: s.counters("guest2").get("udp_rx", 0) > 200, 60, "UDP to flow")
        prev = s.snapshot("guest2")
        first = prev
        for _ in range(runs):
            time.sleep(window)
            cur = s.snapshot("guest2")
            dt = cur["at"] - prev["at"]
            mbps.append((cur["udp_rx_bytes"] - prev["udp_rx_bytes"]) / dt / 1e6)
            pps.append((cur["udp_rx"] - prev["udp_rx"]) / dt)
            prev = cur
        sender = s.counters("guest1")
        detail = {"datagram_payload": 1400, "window_s": window,
                  "udp_lost": int(prev["udp_lost"] - first["udp_lost"]),
                  "udp_received": int(prev["udp_rx"] - first["udp_rx"]),
                  "errors": int(prev["errors"] + sender.get("errors", 0)),
                  "verify_failures": int(prev["verify_failures"])}
    return mbps, pps, detail


def measure_ping(scale: float) -> dict[str, float]:
    configs = {"netdom": NETDOM,
               "guest1": guest(1, "ping peer=10.0.0.2 ping_interval=0.005"),
               "guest2": guest(2, "ping")}
    want = _scaled(1000, scale, 200)
    with system(configs) as s:
        s.wait_for(lambda: s.counters("guest1").get("ping_ok", 0) >= 50, 60, "pings")
        start = s.counters("guest1")["ping_ok"]
        s.wait_for(lambda: s.counters("guest1").get("ping_ok", 0) >= start + want, 120,
                   f"{want} more pings")
        time.sleep(0.6)          # one more publication, so the window holds only those
        return s.counters("guest1")


def run(ctx: Any) -> list[Figure]:
    ctx.log("netsys: UDP throughput guest1 -> guest2 through netdom ...")
    mbps, pps, tdetail = measure_throughput(ctx.scale)
    figures = [
        compare("netsys.udp_throughput", p50(mbps), "MB/s", ctx.baseline("udp_throughput"), True,
                {"runs": [round(x, 2) for x in mbps], **tdetail}),
        compare("netsys.udp_pps", p50(pps), "pkt/s", ctx.baseline("udp_pps"), True,
                {"runs": [round(x) for x in pps], **tdetail}),
    ]
    ctx.log("netsys: ping latency guest1 -> guest2 ...")
    c = measure_ping(ctx.scale)
    info = {"pings": int(c.get("ping_ok", 0)), "timeouts": int(c.get("ping_timeouts", 0)),
            "window": "last 1000 pings"}
    figures.append(compare("netsys.ping_rtt_p50", c["rtt_p50_us"], "us",
                           ctx.baseline("udp_rtt_p50"), False, dict(info)))
    figures.append(compare("netsys.ping_rtt_p99", c["rtt_p99_us"], "us",
                           ctx.baseline("udp_rtt_p99"), False, dict(info)))
    return figures


if __name__ == "__main__":   # a quick look without the harness
    scale = float(os.environ.get("SCALE", "0.5"))
    m, p, d = measure_throughput(scale)
    print(f"UDP {p50(m):.2f} MB/s {p50(p):.0f} pkt/s {d}")
    c = measure_ping(scale)
    print(f"ping p50 {c['rtt_p50_us']:.0f} us p99 {c['rtt_p99_us']:.0f} us")
