"""The PV console page (``xen/include/public/io/console.h``), byte for byte.

What it is in Xen
-----------------
Every PV guest gets one console page at build time (its frame number and an
event channel are in ``start_info``).  The page holds two byte rings, not an
entry ring like blkif/netif::

    offset    0  char in[1024]      keyboard input: xenconsoled -> guest
    offset 1024  char out[2048]     console output: guest -> xenconsoled
    offset 3072  u32 in_cons, in_prod
    offset 3080  u32 out_cons, out_prod

The counters run freely and wrap at 2**32; a byte's position in its array is
``idx & (len(array) - 1)`` (``MASK_XENCONS_IDX``).  Each side writes only its
own counters: the guest writes ``out_prod`` and ``in_cons``, xenconsoled writes
``in_prod`` and ``out_cons``.  Data is written before the producer index
moves, so the reader never sees bytes that are not there yet.  After moving a
counter, a side kicks the console event channel (not done here).

What it does here
-----------------
:class:`ConsoleRing` wraps a mapped page.  The guest side uses
:meth:`ConsoleRing.write_out` and :meth:`ConsoleRing.read_in`; xenconsoled uses
:meth:`ConsoleRing.read_out` and :meth:`ConsoleRing.write_in`.  Writes are
non-blocking: they copy as much as fits and return the count.

Invariant: a reader never trusts the other side's producer.  If
``prod - cons`` exceeds the array, the page is corrupt (or the guest hostile)
and :class:`ConsoleRingCorrupt` is raised, as xenconsoled drops such a
console rather than reading beyond what was written.

Where this differs from Xen
---------------------------
Nothing in the layout.  Counter loads and stores are single aligned native
u32 accesses, and on x86-64 stores are seen in order, which stands in for the
barriers of the C code.
"""

from __future__ import annotations

import mmap
from typing import Union

IN_SIZE = 1024
OUT_SIZE = 2048
IN_OFFSET = 0
OUT_OFFSET = IN_SIZE
INDEX_OFFSET = IN_SIZE + OUT_SIZE          # 3072
#: sizeof(struct xencons_interface).
INTERFACE_SIZE = INDEX_OFFSET + 16         # 3088

_IN_CONS, _IN_PROD, _OUT_CONS, _OUT_PROD = 0, 1, 2, 3
_U32 = 0xFFFFFFFF

Buffer = Union[bytearray, memoryview, mmap.mmap]


class ConsoleRingCorrupt(Exception):
    """A producer index claims more bytes than the ring can hold."""


class ConsoleRing:
    """A ``struct xencons_interface`` on a writable buffer (normally one page)."""

    def __init__(self, buf: Buffer) -> None:
        view = memoryview(buf)
        if view.readonly or view.nbytes < INTERFACE_SIZE:
            n, ro = view.nbytes, view.readonly
            view.release()
            raise ValueError(f"console page must be writable and at least "
                             f"{INTERFACE_SIZE} bytes (got {n} bytes, readonly={ro})")
        self._mem = view.cast("B")
        self._idx = self._mem[INDEX_OFFSET:INDEX_OFFSET + 16].cast("I")

    # -- counters ----------------------------------------------------------------
    @property
    def in_cons(self) -> int:
        return self._idx[_IN_CONS]

    @property
    def in_prod(self) -> int:
        return self._idx[_IN_PROD]

    @property
    def out_cons(self) -> int:
        return self._idx[_OUT_CONS]

    @property
    def out_prod(self) -> int:
        return self._idx[_OUT_PROD]

    # -- the two directions, written once ----------------------------------------
    def _pending(self, cons_i: int, prod_i: int, size: int, what: str) -> tuple[int, int]:
        cons, prod = self._idx[cons_i], self._idx[prod_i]
        n = (prod - cons) & _U32
        if n > size:
            raise ConsoleRingCorrupt(
                f"console {what} ring: producer {prod} is {n} bytes ahead of "
                f"consumer {cons}, but the ring holds {size}")
        return cons, n

    def _read(self, base: int, size: int, cons_i: int, prod_i: int,
              limit: int | None, what: str) -> bytes:
        cons, n = self._pending(cons_i, prod_i, size, what)
        if limit is not None:
            n = min(n, limit)
        out = bytearray()
        while len(out) < n:
            pos = (cons + len(out)) & (size - 1)
            chunk = min(n - len(out), size - pos)
            out += self._mem[base + pos:base + pos + chunk]
        self._idx[cons_i] = (cons + n) & _U32
        return bytes(out)

    def _write(self, base: int, size: int, cons_i: int, prod_i: int,
               data: bytes, what: str) -> int:
        cons = self._idx[cons_i]
        prod = self._idx[prod_i]
        used = (prod - cons) & _U32
        if used > size:
            raise ConsoleRingCorrupt(
                f"console {what} ring: consumer {cons} is {(cons - prod) & _U32} "
                f"bytes behind producer {prod} in a {size}-byte ring")
        n = min(len(data), size - used)
        done = 0
        while done < n:
            pos = (prod + done) & (size - 1)
            chunk = min(n - done, size - pos)
            self._mem[base + pos:base + pos + chunk] = data[done:done + chunk]
            done += chunk
        self._idx[prod_i] = (prod + n) & _U32    # publish after the data
        return n

    # -- guest side ---------------------------------------------------------------
    def write_out(self, data: bytes) -> int:
        """Guest: queue console output.  Returns how many bytes fitted."""
        return self._write(OUT_OFFSET, OUT_SIZE, _OUT_CONS, _OUT_PROD, data, "out")

    def read_in(self, limit: int | None = None) -> bytes:
        """Guest: take pending console input."""
        return self._read(IN_OFFSET, IN_SIZE, _IN_CONS, _IN_PROD, limit, "in")

    # -- xenconsoled side ---------------------------------------------------------
    def read_out(self, limit: int | None = None) -> bytes:
        """Backend: take pending console output of the guest."""
        return self._read(OUT_OFFSET, OUT_SIZE, _OUT_CONS, _OUT_PROD, limit, "out")

    def write_in(self, data: bytes) -> int:
        """Backend: queue console input for the guest.  Returns bytes that fitted."""
        return self._write(IN_OFFSET, IN_SIZE, _IN_CONS, _IN_PROD, data, "in")

    def out_pending(self) -> int:
        """Bytes of output waiting for xenconsoled (checked)."""
        return self._pending(_OUT_CONS, _OUT_PROD, OUT_SIZE, "out")[1]

    def in_pending(self) -> int:
        """Bytes of input waiting for the guest (checked)."""
        return self._pending(_IN_CONS, _IN_PROD, IN_SIZE, "in")[1]

    def release(self) -> None:
        """Drop the views into the buffer so an mmap can be closed."""
        self._idx.release()
        self._mem.release()

    def __enter__(self) -> "ConsoleRing":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
