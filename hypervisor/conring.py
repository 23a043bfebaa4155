"""The hypervisor's console ring: what `xl dmesg` shows.

Xen keeps its own log in a fixed-size ring in hypervisor memory (the "conring")
and dom0 reads it with the sysctl `readconsole`.  Guests may add lines with the
`console_io` hypercall; Xen prefixes them with "(dN)" so nobody can impersonate
the hypervisor.  Here the ring is a bounded deque of lines, mirrored to
`<run-dir>/logs/hypervisor.log` so a crash leaves a trail on disk.
"""

from __future__ import annotations

import collections
import time
from typing import TextIO

CONRING_LINES = 8192
MAX_LINE = 1024


class ConsoleRing:
    def __init__(self, logfile: TextIO | None = None) -> None:
        self.lines: collections.deque[str] = collections.deque(maxlen=CONRING_LINES)
        self.logfile = logfile
        self.start = time.monotonic()
        self.seq = 0  # lines ever written; lets a reader ask for "what is new"

    def printk(self, text: str) -> None:
        line = f"(XEN) [{time.monotonic() - self.start:10.6f}] {text}"[:MAX_LINE]
        self._append(line)

    def guest_write(self, domid: int, text: str) -> None:
        for part in text.splitlines() or [""]:
            self._append(f"(d{domid}) {part}"[:MAX_LINE])

    def _append(self, line: str) -> None:
        self.lines.append(line)
        self.seq += 1
        if self.logfile is not None:
            self.logfile.write(line + "\n")
            self.logfile.flush()

    def uptime(self) -> float:
        return time.monotonic() - self.start

    def read(self, clear: bool = False) -> list[str]:
        out = list(self.lines)
        if clear:
            self.lines.clear()
        return out


def _console_write(hv, caller, args) -> None:
    """CONSOLEIO_write: a domain adds lines to the hypervisor's log, marked as its own."""
    text = args.get("text")
    if isinstance(text, str):
        hv.conring.guest_write(caller.domid, text[:MAX_LINE])


OPS = {"write": _console_write}
