"""Start of day for every domain kernel (dom0, driver domains, guests).

A freshly forked domain has: its shared_info and grant-table page descriptors,
its page-descriptor socket, and its ZeroMQ secret.  This module turns those into
a running kernel:

0. tune the process's heap so large I/O buffers are reused (domains/kernel/heap.py);
1. make the process's own ZeroMQ context (never inherited across fork) and the
   authenticated hypercall socket;
2. map shared_info and the grant table;
3. under trio, start the hypercall reader and make the boot hypercall, which the
   hypervisor answers with start_info only once the toolstack unpauses us;
4. adopt the frames the builder populated for us (console and XenStore pages);
5. run the kernel's `main(kernel)`.

If `main` returns the domain powers off; if it raises, it reports a crash with
SCHEDOP_shutdown, as a Linux guest does on panic.  Either way the process ends.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import traceback
from typing import Any, Awaitable, Callable

import trio
import zmq

from domains.kernel.events import EventChannels
from domains.kernel import heap
from domains.kernel.grant_table import GrantTable
from domains.kernel.hypercall import Hypervisor
from domains.kernel.memory import Memory
from ipc.channel import hypercall_socket
from ipc.event_abi import SharedInfo
from ipc.grant_abi import GRANT_ENTRY_SIZE
from ipc.page import PAGE_SIZE, map_frame
from ipc.sched_abi import SHUTDOWN_crash, SHUTDOWN_poweroff

Main = Callable[["Kernel"], Awaitable[Any]]


class Kernel:
    """What every domain kernel has once booted: the hypervisor and its own resources."""

    def __init__(self, hv: Hypervisor, events: EventChannels, grants: GrantTable,
                 memory: Memory, start_info: dict, run_dir: str, nursery: trio.Nursery) -> None:
        self.hv = hv
        self.events = events
        self.grants = grants
        self.memory = memory
        self.start_info = start_info
        self.domid: int = start_info["domid"]
        self.name: str = start_info["name"]
        self.run_dir = run_dir
        self.nursery = nursery
        self.log = logging.getLogger(self.name)

    @property
    def cmdline(self) -> dict[str, str]:
        """`extra`/`cmdline` as key=value words (bare words map to "1")."""
        out = {}
        for word in str(self.start_info.get("cmdline", "")).split():
            key, _, value = word.partition("=")
            out[key] = value if _ else "1"
        return out

    def xenstore(self):
        """An async context manager: our XenStore connection over the ring the builder gave us.

            async with k.xenstore() as xs:
                await xs.read(f"/local/domain/{k.domid}/name")
        """
        from domains.kernel.xenstore import open_ring_client
        page = self.memory.pages[self.start_info["store_gfn"]]
        port = self.events.adopt(self.start_info["store_evtchn"])
        return open_ring_client(page.map, port.kick, port.wait)

    async def printk(self, text: str) -> None:
        """Write to the hypervisor's console (xl dmesg shows it, marked as ours)."""
        await self.hv.call("console_io", "write", text=text)

    async def shutdown(self, reason: int) -> None:
        """SCHEDOP_shutdown: tell the hypervisor we are done, then stop."""
        await self.hv.call("sched_op", "shutdown", reason=reason)
        raise _Halt(0)


class _Halt(Exception):
    def __init__(self, code: int) -> None:
        self.code = code


def boot(start: dict, fds: dict[str, int], main: Main) -> int:
    """The entry the domain builder calls in the new process."""
    heap.tune()
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format=f"%(asctime)s {start['name']}[d{start['domid']}] %(levelname)s %(message)s")
    ctx = zmq.Context(io_threads=1)
    sock = hypercall_socket(ctx, start["endpoint"], start["domid"], start["secret"])
    shared_info = SharedInfo(map_frame(fds["shared_info"]))
    table = map_frame(fds["grant_table"], npages=start["grant_frames"])
    os.close(fds["shared_info"])
    os.close(fds["grant_table"])
    fdsock = socket.socket(fileno=fds["fdsock"])
    try:
        # Strict exception groups on every trio version, so a kernel's error
        # handling is the same everywhere (domains/kernel/exception_groups.py).
        return trio.run(_start, start, sock, fdsock, shared_info, table, main,
                        fds["upcall"], fds["doorbell"], strict_exception_groups=True)
    finally:
        sock.close(linger=0)
        ctx.term()


async def _start(start, sock, fdsock, shared_info, table, main: Main,
                 upcall_fd: int, doorbell_fd: int) -> int:
    events = EventChannels(shared_info, doorbell_fd)
    hv = Hypervisor(sock, fdsock, events.upcall, upcall_fd)
    events.hv = hv
    code = 0
    async with trio.open_nursery() as nursery:
        events.nursery = nursery
        nursery.start_soon(hv.run)
        info, frame_fds = await hv.call_fds("boot", "start_info")
        memory = Memory(hv)
        memory.adopt(info["frames"], frame_fds)
        grants = GrantTable(hv, table, start["grant_frames"] * PAGE_SIZE // GRANT_ENTRY_SIZE)
        kernel = Kernel(hv, events, grants, memory, info, start["run_dir"], nursery)
        try:
            await main(kernel)
            await kernel.shutdown(SHUTDOWN_poweroff)
        except _Halt as halt:
            code = halt.code
        except Exception:
            traceback.print_exc()
            try:
                with trio.fail_after(2):
                    await hv.call("sched_op", "shutdown", reason=SHUTDOWN_crash)
            except Exception:
                pass
            code = 1
        nursery.cancel_scope.cancel()
    return code
