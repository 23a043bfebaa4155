"""The guest side of the PV console (io/console.h): hvc0.

Output goes into the `out` ring of the console page the builder gave us, and a
kick tells xenconsoled.  Typed input arrives in the `in` ring.  When the ring is
full we wait for xenconsoled to drain it (it kicks back), so output is never
silently dropped.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

from ipc.console_ring import ConsoleRing

if TYPE_CHECKING:
    from domains.kernel.boot import Kernel


class Console:
    def __init__(self, k: "Kernel") -> None:
        page = k.memory.pages[k.start_info["console_gfn"]]
        self.ring = ConsoleRing(page.map)
        self.port = k.events.adopt(k.start_info["console_evtchn"])
        self._lock = trio.Lock()

    async def write(self, text: str | bytes) -> None:
        data = text.encode() if isinstance(text, str) else text
        async with self._lock:
            while data:
                n = self.ring.write_out(data)
                data = data[n:]
                self.port.notify_nowait()
                if data:
                    with trio.move_on_after(1):
                        await self.port.wait()

    async def read(self) -> bytes:
        """The next typed input (waits for it)."""
        while True:
            data = self.ring.read_in()
            if data:
                self.port.notify_nowait()
                return data
            await self.port.wait()
