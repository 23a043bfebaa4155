"""Linux native AIO: many O_DIRECT transfers in flight without a thread each.

In Xen
    Linux's blkback hands bios to the block layer and is called back as each
    completes; QEMU's qdisk backend does the same from user space with Linux
    AIO: ``io_submit`` queues a transfer on the device and returns at once,
    and an eventfd says when ``io_getevents`` has completions to collect.

Here
    The same, through ctypes: an :class:`AioContext` owns one kernel AIO
    context and one eventfd; :meth:`AioContext.transfer` submits one
    preadv/pwritev of a request's granted pages and sleeps (in trio) until
    the reaper task, woken by the eventfd, hands it its result.  So a
    driver domain keeps up to a ring's worth of requests on the device
    while its event loop goes on, and pays no thread hand-off per request.

Invariant
    A buffer given to a transfer is not released until the kernel says the
    transfer is over: a cancelled caller still waits for its completion, and
    :meth:`AioContext.close` (``io_destroy``) waits for every outstanding
    one.  Only O_DIRECT descriptors belong here (for anything else Linux
    runs AIO synchronously inside ``io_submit``).

Where it is not available (an architecture whose syscall numbers we do not
know, a kernel without AIO) :func:`open_context` returns None and the
backend does its transfers inline.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform

import trio

log = logging.getLogger("aio")

#: io_setup, io_destroy, io_getevents, io_submit for the architectures we know.
_SYSCALLS = {"x86_64": (206, 207, 208, 209), "aarch64": (0, 1, 4, 2)}
IOCB_CMD_PREADV = 7
IOCB_CMD_PWRITEV = 8
IOCB_FLAG_RESFD = 1

_libc = ctypes.CDLL(None, use_errno=True)
_ONE = ctypes.c_long(1)
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


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


class _Transfer:
    __slots__ = ("iocb", "iov", "done", "res")

    def __init__(self, iocb: _Iocb, iov) -> None:
        self.iocb, self.iov = iocb, iov        # alive until the kernel is done with them
        self.done = trio.Event()
        self.res = 0


class Pin:
    """A writable buffer held still for the kernel: ``addr`` is where it is.
    While a Pin lives the buffer cannot be released or closed; drop the
    Pin (``release``) first."""
    __slots__ = ("_obj", "addr", "len")

    def __init__(self, buffer) -> None:
        self._obj = ctypes.c_char.from_buffer(buffer)
        self.addr = ctypes.addressof(self._obj)
        self.len = len(buffer)

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

    async def transfer(self, fd: int, iov: list[tuple[int, int]], pos: int,
                       is_read: bool) -> int:
        """preadv/pwritev of the memory ``iov`` names ((address, length) pairs
        of buffers the caller keeps pinned, see :func:`pin`) at ``pos``;
        returns the byte count or raises OSError."""
        await self._slots.acquire()
        try:
            vec = (_Iovec * len(iov))(*iov)
            tag, self._next = self._next, self._next + 1
            iocb = _Iocb(data=tag, opcode=IOCB_CMD_PREADV if is_read else IOCB_CMD_PWRITEV,
                         fildes=fd, buf=ctypes.addressof(vec), nbytes=len(iov),
                         offset=pos, flags=IOCB_FLAG_RESFD, resfd=self._efd)
            job = _Transfer(iocb, vec)
            ptr = ctypes.pointer(iocb)
            self._inflight[tag] = job
            try:
                _check(_libc.syscall(self._submit_nr, self._ctx, _ONE, ctypes.byref(ptr)),
                       "io_submit")
            except BaseException:
                del self._inflight[tag]
                raise
            with trio.CancelScope(shield=True):     # the kernel owns the buffers until done
                await job.done.wait()
        finally:
            self._slots.release()
        if job.res < 0:
            raise OSError(-job.res, os.strerror(-job.res))
        return job.res

    async def reap(self) -> None:
        """Hand out completions for ever (run as a task beside the transfers)."""
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
                        job.res = ev.res
                        job.done.set()
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
