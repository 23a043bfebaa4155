"""xenconsoled: the other end of every guest's console.

In Xen each PV guest writes its console output into a shared page
(io/console.h) and kicks an event channel; xenconsoled in dom0 maps that page
(grant reference 0, which the toolstack seeded), copies the output to a log
file and to whoever is attached with `xl console`, and writes typed input into
the page's `in` ring.

Here: one trio task per guest.  Output goes to `<run-dir>/console/<name>.log`
and to every attached client; input from an attached client goes into the
ring.  A guest that corrupts its console page loses its console, not the
daemon: the task logs why and stops serving that one guest.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from ipc.console_ring import ConsoleRing, ConsoleRingCorrupt
from ipc.grant_abi import GNTTAB_RESERVED_CONSOLE

if TYPE_CHECKING:
    from domains.kernel.boot import Kernel

log = logging.getLogger("xenconsoled")


@dataclass
class Console:
    domid: int
    name: str
    ring: ConsoleRing
    port: object
    mapping: object
    logfile: object
    cancel: trio.CancelScope = field(default_factory=trio.CancelScope)
    listeners: list = field(default_factory=list)   # memory-channel senders of attached clients


class XenConsoled:
    def __init__(self, k: "Kernel") -> None:
        self.k = k
        self.dir = os.path.join(k.run_dir, "console")
        os.makedirs(self.dir, exist_ok=True)
        self.consoles: dict[int, Console] = {}

    def log_path(self, name: str) -> str:
        return os.path.join(self.dir, f"{name}.log")

    async def attach(self, domid: int, name: str, remote_port: int) -> Console:
        """Map a new guest's console page and start serving it."""
        mapping = await self.k.grants.map(domid, GNTTAB_RESERVED_CONSOLE)
        try:
            port = await self.k.events.bind_interdomain(domid, remote_port)
        except BaseException:
            await self.k.grants.unmap(mapping)
            raise
        con = Console(domid, name, ConsoleRing(mapping.map), port, mapping,
                      open(self.log_path(name), "ab", buffering=0))
        self.consoles[domid] = con
        self.k.nursery.start_soon(self._serve, con)
        return con

    async def _serve(self, con: Console) -> None:
        with con.cancel:
            while True:
                try:
                    data = con.ring.read_out()
                except ConsoleRingCorrupt as exc:
                    log.warning("d%d corrupted its console page (%s): console dropped", con.domid, exc)
                    return
                if data:
                    con.logfile.write(data)
                    for send in list(con.listeners):
                        try:
                            send.send_nowait(data)
                        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                            pass   # a slow or gone viewer misses output; the log has it all
                    con.port.notify_nowait()   # room in the ring again
                    continue
                await con.port.wait()

    async def write_input(self, domid: int, data: bytes) -> int:
        con = self.consoles[domid]
        n = con.ring.write_in(data)
        await con.port.notify()
        return n

    def listen(self, domid: int):
        """A receive channel of the guest's console output from now on."""
        con = self.consoles[domid]
        send, receive = trio.open_memory_channel(256)
        con.listeners.append(send)
        return con, receive

    async def detach(self, domid: int) -> None:
        con = self.consoles.pop(domid, None)
        if con is None:
            return
        con.cancel.cancel()
        for send in con.listeners:
            await send.aclose()
        con.logfile.close()
        con.ring.release()
        try:
            await con.port.close()
        except Exception:
            pass
        await self.k.grants.unmap(con.mapping)
