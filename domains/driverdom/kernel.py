"""The driver domain kernel: a small domain that runs backends and nothing else.

In Xen
    A *driver domain* (xl.cfg ``driver_domain = 1``) is an unprivileged
    domain that owns a piece of hardware and serves it to other domains
    through split drivers.  If it crashes, the hardware's driver crashed, not
    dom0; the toolstack restarts it and the frontends reconnect.  Its kernel
    watches ``/local/domain/<self>/backend/`` and starts a backend for every
    device the toolstack assigns to it there (Linux's xenbus backend bus).

Here
    This kernel connects to XenStore over its ring, prints to its console,
    starts a :class:`~domains.kernel.xenbus.BackendWatcher` per device type it
    can serve (``vbd`` -> blkback, ``vif`` -> netback on a bridge, see
    netif_backend.py), and writes a *heartbeat*: an increasing
    counter at ``/local/domain/<self>/data/heartbeat`` every
    ``heartbeat=SECONDS`` (command line, default 0.5).  dom0's watchdog reads
    it: a driver domain whose heartbeat stops is hung, even if its process is
    alive, and is restarted like a crashed one.

    Each device is *supervised* by its BackendWatcher (xenbus.py): a backend
    task that dies is restarted with back-off (a fresh handshake; its
    frontend sees Closed and reconnects), and one that has requests pending
    but serves none for ``device_timeout=SECONDS`` (command line, default 2)
    is kicked, then restarted.  That catches a *ring-only* hang here, per
    device, without restarting the domain's other devices; a hang of the
    whole kernel stops the heartbeat and is dom0's watchdog's business.

Invariant
    Nothing a frontend writes can stop this kernel: each device is its own
    task, and a failing backend task is logged and restarted, never propagated.

Where this differs from Xen
    Xen has no standard heartbeat; a real deployment would use the domain's
    watchdog timer (SCHEDOP_watchdog).  A XenStore node is easier to watch and
    to show to someone learning: ``xl xenstore-read`` prints it.
"""

from __future__ import annotations

from functools import partial

import trio

from domains.driverdom import blkback, host_link, netif_backend
from domains.kernel import control, faultpoint
from domains.kernel.boot import Kernel, boot
from domains.kernel.console import Console
from domains.kernel.xenbus import BackendWatcher

DEFAULT_HEARTBEAT = 0.5
#: A device with work pending that serves nothing for this long is kicked, and
#: restarted after twice this long (command line ``device_timeout=SECONDS``; 0: off).
DEFAULT_DEVICE_TIMEOUT = 2.0


def _number(raw: str | None, default: float) -> float:
    try:
        return float(raw) if raw is not None else default
    except ValueError:
        return default


async def heartbeat(k: Kernel, xs, interval: float) -> None:
    node = f"/local/domain/{k.domid}/data/heartbeat"
    count = 0
    while True:
        count += 1
        await xs.write(node, str(count).encode())
        await trio.sleep(interval)


async def main(k: Kernel) -> None:
    console = Console(k)
    await console.write(f"microxen driver domain kernel: {k.name} (domain {k.domid}) booting\n")
    interval = _number(k.cmdline.get("heartbeat"), DEFAULT_HEARTBEAT)
    async with k.xenstore() as xs:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(heartbeat, k, xs, max(interval, 0.05))
            nursery.start_soon(faultpoint.agent, k, xs)
            stall = _number(k.cmdline.get("device_timeout"), DEFAULT_DEVICE_TIMEOUT)
            vbd = BackendWatcher(xs, k.domid, "vbd", partial(blkback.serve, k, xs),
                                 stall_timeout=stall)
            nursery.start_soon(vbd.run)
            bridges = netif_backend.Bridges()
            vif = BackendWatcher(xs, k.domid, "vif",
                                 partial(netif_backend.serve, k, xs, bridges),
                                 stall_timeout=stall)
            nursery.start_soon(vif.run)
            if "tap" in k.cmdline:   # the "NIC": a TAP device on xenbr0 (host_link.py)
                nursery.start_soon(host_link.run, k, xs, bridges.get("xenbr0"),
                                   k.cmdline["tap"], console)
            await console.write(f"{k.name}: serving backend/vbd and backend/vif\n")
            await control.run(k, xs)


def kernel_main(start: dict, fds: dict) -> int:
    return boot(start, fds, main)
