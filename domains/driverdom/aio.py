"""Linux native AIO: many O_DIRECT transfers in flight without a thread each.

In Xen
    Linux's blkback hands bios to the block layer and is called back as each
    completes; QEMU's qdisk backend does the same from user space with Linux
    AIO: ``io_submit`` queues a transfer on the device and returns at once,
    and an eventfd says when ``io_getevents`` has completions to collect.

Here
    The same, through ctypes: an :class:`AioContext` owns one kernel AIO
    context and one eventfd; :meth:`AioContext.submit` queues one
    preadv/pwritev of a request's granted pages with a function to call
    when it completes (:meth:`AioContext.transfer` is the same, awaited).
    :meth:`AioContext.run` is the context's own task: it submits what is
    queued and, woken by the eventfd, hands out results.
    So a driver domain keeps up to a ring's worth of requests on the device
    while its event loop goes on, and pays no thread hand-off per request.

    Submissions are batched, as Linux *plugs* a block queue around a batch
    of bios: every transfer queued in one pass of the event loop (blkback
    takes a ring's worth of requests at once) goes to the kernel in one
    ``io_submit``.  On a virtual disk each submission ends in a doorbell to
    the device that costs about 30 us; 32 transfers in one call cost about
    4 us each instead of 35.  A caller that queues a batch itself says so
    with :meth:`AioContext.plug` and :meth:`AioContext.unplug` (Linux's
    blk_start_plug / blk_finish_plug): the batch is then submitted by the
    unplug, at once, not by the context's task after a trip through the
    scheduler.

Invariant
    A buffer given to a transfer is not released until the kernel says the
    transfer is over: a cancelled caller still waits for its completion, and
    :meth:`AioContext.close` (``io_destroy``) waits for every outstanding
    one.  :meth:`AioContext.run` must outlive every transfer (they wait on
    it).  Only O_DIRECT descriptors belong here (for anything else Linux
    runs AIO synchronously inside ``io_submit``).

Where it is not available (an architecture whose syscall numbers we do not
know, a kernel without AIO) :func:`open_context` returns None and the
backend does its transfers inline.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import platform
import struct
from typing import Callable

import trio

log = logging.getLogger("aio")

#: io_setup, io_destroy, io_getevents, io_submit for the architectures we know.
_SYSCALLS = {"x86_64": (206, 207, 208, 209), "aarch64": (0, 1, 4, 2)}
IOCB_CMD_PREADV = 7
IOCB_CMD_PWRITEV = 8
IOCB_FLAG_RESFD = 1

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class _Iocb(ctypes.Structure):
    """``struct iocb`` of linux/aio_abi.h (little-endian layout, 64 bytes)."""
    _fields_ = [("data", ctypes.c_uint64), ("key", ctypes.c_uint32),
                ("rw_flags", ctypes.c_int32), ("opcode", ctypes.c_uint16),
                ("reqprio", ctypes.c_int16), ("fildes", ctypes.c_uint32),
                ("buf", ctypes.c_uint64), ("nbytes", ctypes.c_uint64),
                ("offset", ctypes.c_int64), ("reserved2", ctypes.c_uint64),
                ("flags", ctypes.c_uint32), ("resfd", ctypes.c_uint32)]


class _Event(ctypes.Structure):
    _fields_ = [("data", ctypes.c_uint64), ("obj", ctypes.c_uint64),
                ("res", ctypes.c_int64), ("res2", ctypes.c_int64)]


assert ctypes.sizeof(_Iocb) == 64 and ctypes.sizeof(_Event) == 32

#: ``struct iovec`` (base, len) as bytes: a request's vector is the join of its
#: pages' (:attr:`Pin.iovec`), which costs a few us for 256 pages where
#: building a ctypes array from 256 tuples costs a hundred.
_IOVEC = struct.Struct("QQ")


def iovec(addr: int, length: int) -> bytes:
    """One ``struct iovec`` (the memory at ``addr``), packed."""
    return _IOVEC.pack(addr, length)


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


class _Transfer:
    __slots__ = ("iocb", "iov", "on_done")

    def __init__(self, iocb: _Iocb, iov, on_done: Callable[[int], None]) -> None:
        self.iocb, self.iov = iocb, iov        # alive until the kernel is done with them
        self.on_done = on_done


class Pin:
    """A writable buffer held still for the kernel: ``addr`` is where it is.
    While a Pin lives the buffer cannot be released or closed; drop the
    Pin (``release``) first."""
    __slots__ = ("_obj", "addr", "len", "iovec")

    def __init__(self, buffer) -> None:
        self._obj = ctypes.c_char.from_buffer(buffer)
        self.addr = ctypes.addressof(self._obj)
        self.len = len(buffer)
        self.iovec = iovec(self.addr, self.len)     # its struct iovec

    def release(self) -> None:
        self._obj = None


class AioContext:
    """One kernel AIO context and its completion eventfd."""

    def __init__(self, nr: int, calls: tuple[int, int, int, int]) -> None:
        self._setup, self._destroy, self._getevents, self._submit = calls
        self._submit_nr = ctypes.c_long(self._submit)
        self.nr = nr
        self._ctx = ctypes.c_ulong(0)
        _check(_libc.syscall(ctypes.c_long(self._setup), ctypes.c_long(nr),
                           ctypes.byref(self._ctx)), "io_setup")
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._events = (_Event * nr)()
        self._inflight: dict[int, _Transfer] = {}
        self._next = 1
        self._slots = trio.Semaphore(nr)
        self._queue: list[_Transfer] = []      # queued, not yet submitted
        self._queued = trio.Event()
        self._plugged = False

    def submit(self, fd: int, iov: bytes, pos: int, is_read: bool,
               on_done: Callable[[int], None]) -> None:
        """Queue a preadv/pwritev of the memory ``iov`` names (packed
        ``struct iovec`` entries, as :attr:`Pin.iovec` makes them,
        of buffers the caller keeps pinned) at ``pos``;
        ``on_done(result)`` is called from :meth:`run` when it is over, with
        the byte count or a negative errno.  At most ``nr`` may be
        outstanding (:meth:`transfer` waits for room; callers of this count).

        ``on_done`` runs inside the context's task and must not block; it is
        how a backend answers a request straight from its completion, as
        Linux's blkback answers from a bio's end_io, with no task per request.
        """
        n = len(iov) // _IOVEC.size
        vec = (_Iovec * n).from_buffer_copy(iov)
        tag, self._next = self._next, self._next + 1
        iocb = _Iocb(data=tag, opcode=IOCB_CMD_PREADV if is_read else IOCB_CMD_PWRITEV,
                     fildes=fd, buf=ctypes.addressof(vec), nbytes=n,
                     offset=pos, flags=IOCB_FLAG_RESFD, resfd=self._efd)
        job = _Transfer(iocb, vec, on_done)
        self._inflight[tag] = job
        self._queue.append(job)
        if not self._plugged:
            self._queued.set()

    def plug(self) -> None:
        """Hold what is submitted from now on until :meth:`unplug`."""
        self._plugged = True

    def unplug(self) -> None:
        """Submit everything held, now, in one io_submit.  Call it before
        waiting for any of it."""
        self._plugged = False
        if self._queue:
            batch, self._queue = self._queue, []
            self._submit_batch(batch)

    async def transfer(self, fd: int, iov: bytes, pos: int, is_read: bool) -> int:
        """:meth:`submit`, awaited: the byte count, or OSError."""
        try:
            self._slots.acquire_nowait()     # the common case: no trip through the scheduler
        except trio.WouldBlock:
            await self._slots.acquire()
        try:
            done = trio.Event()
            res = 0

            def finished(r: int) -> None:
                nonlocal res
                res = r
                done.set()
            self.submit(fd, iov, pos, is_read, finished)
            with trio.CancelScope(shield=True):     # the kernel owns the buffers until done
                await done.wait()
        finally:
            self._slots.release()
        if res < 0:
            raise OSError(-res, os.strerror(-res))
        return res

    async def run(self) -> None:
        """Submit queued transfers and hand out completions, for ever (a task
        beside the transfers, which it must outlive)."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._reap)
            while True:
                await self._queued.wait()
                self._queued = trio.Event()
                batch, self._queue = self._queue, []
                self._submit_batch(batch)

    def _submit_batch(self, batch: list[_Transfer]) -> None:
        """One io_submit for the whole batch; a transfer the kernel refuses
        (io_submit stops at the first it cannot take) fails alone."""
        ptrs = (ctypes.POINTER(_Iocb) * len(batch))(*(ctypes.pointer(j.iocb) for j in batch))
        i = 0
        while i < len(batch):
            ret = _libc.syscall(self._submit_nr, self._ctx, ctypes.c_long(len(batch) - i),
                                ctypes.byref(ptrs, i * ctypes.sizeof(ptrs._type_)))
            if ret > 0:
                i += ret
                continue
            job = batch[i]
            del self._inflight[job.iocb.data]
            self._finish(job, -(ctypes.get_errno() if ret < 0 else errno.EAGAIN))
            i += 1

    @staticmethod
    def _finish(job: _Transfer, res: int) -> None:
        try:
            job.on_done(res)
        except Exception:   # a caller's bug must not stop every other completion
            log.exception("aio: completion callback failed")

    async def _reap(self) -> None:
        timeout = (ctypes.c_long * 2)(0, 0)
        while True:
            await trio.lowlevel.wait_readable(self._efd)
            try:
                os.eventfd_read(self._efd)
            except BlockingIOError:
                continue
            while True:
                n = _check(_libc.syscall(ctypes.c_long(self._getevents), self._ctx,
                                         ctypes.c_long(0), ctypes.c_long(self.nr),
                                         self._events, timeout), "io_getevents")
                for ev in self._events[:n]:
                    job = self._inflight.pop(ev.data, None)
                    if job is not None:
                        self._finish(job, ev.res)
                if n < self.nr:
                    break

    def outstanding(self) -> int:
        return len(self._inflight)

    def close(self) -> None:
        """io_destroy waits for every outstanding transfer; then the eventfd goes."""
        if self._efd < 0:
            return
        _libc.syscall(ctypes.c_long(self._destroy), self._ctx)
        try:
            trio.lowlevel.notify_closing(self._efd)
        except RuntimeError:        # not inside trio: nobody can be waiting on it
            pass
        os.close(self._efd)
        self._efd = -1


def open_context(nr: int) -> AioContext | None:
    """An AIO context for ``nr`` transfers in flight, or None where Linux AIO
    cannot be had here (the caller then does its transfers inline)."""
    calls = _SYSCALLS.get(platform.machine())
    if calls is None:
        return None
    try:
        return AioContext(nr, calls)
    except OSError as exc:
        log.info("Linux AIO unavailable (%s): transfers are done inline", exc)
        return None
