"""Child processes for benchmarks: forked, tied to their parent, always reaped.

What this is
------------
A raw baseline is only a fair floor for microxen if it crosses the same
boundary microxen crosses: one OS process to another. So every baseline that
measures communication forks real processes. This module is the one place that
does it, and it keeps the rule every microxen test keeps (DESIGN invariant 5):
no process outlives the benchmark that started it.

How it keeps that rule
----------------------
* Children are forked (multiprocessing's ``fork`` start method), so they start
  in microseconds and need no pickling. A forked child must not touch any
  ZeroMQ context its parent created; the baselines therefore create their
  contexts *after* forking, in each process separately.
* Each child asks the kernel for SIGKILL when its parent dies
  (``prctl(PR_SET_PDEATHSIG)``), so even a parent killed with SIGKILL leaves no
  orphan behind.
* Each child's blocking calls carry idle timeouts, and :meth:`Child.stop` joins
  with a timeout, then SIGTERM, then SIGKILL. A child that failed is reported
  as an error naming it and its exit code.

Where this differs from microxen proper
---------------------------------------
microxen's domain builder is a zygote that forks domains on request. Here the
benchmark process forks directly: there is no hypervisor to ask.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import traceback
from collections.abc import Callable
from typing import Any

__all__ = ["BenchError", "Child"]

_PR_SET_PDEATHSIG = 1


class BenchError(RuntimeError):
    """A benchmark could not be measured (a child failed, a peer timed out, ...)."""


def _die_with_parent(parent_pid: int) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: fall back on idle timeouts alone
    # The parent may have died between fork and prctl; then nobody would signal us.
    if os.getppid() != parent_pid:
        os._exit(3)


def _child_main(parent_pid: int, target: Callable[..., Any], args: tuple[Any, ...]) -> None:
    _die_with_parent(parent_pid)
    # The parent may be pytest or a suite with signal handlers; a child wants defaults.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        target(*args)
    except BaseException:  # noqa: BLE001 - report anything, then fail with a code
        traceback.print_exc(file=sys.stderr)
        sys.stderr.flush()
        os._exit(1)


class Child:
    """One forked child process running ``target(*args)``.

    Use as a context manager: the child is started on entry and stopped on exit
    (joined, then terminated, then killed). Call :meth:`stop` explicitly with
    ``check=True`` to turn a failed child into a :class:`BenchError`.
    """

    def __init__(self, name: str, target: Callable[..., Any], *args: Any) -> None:
        self.name = name
        ctx = multiprocessing.get_context("fork")
        self._process = ctx.Process(
            target=_child_main, args=(os.getpid(), target, args), name=name, daemon=True
        )
        self._stopped = False
        self._code: int | None = None
        self._pid: int | None = None

    @property
    def pid(self) -> int | None:
        return self._pid

    def start(self) -> Child:
        self._process.start()
        self._pid = self._process.pid
        return self

    def is_alive(self) -> bool:
        return not self._stopped and self._process.is_alive()

    def stop(self, timeout: float = 5.0, check: bool = True) -> int | None:
        """Wait up to ``timeout`` s for the child to exit, then force it.

        Returns the exit code. With ``check``, a non-zero exit raises BenchError.
        """
        if self._stopped:
            return self._code
        proc = self._process
        if proc.pid is None:
            return None
        proc.join(timeout)
        forced = False
        if proc.is_alive():
            forced = True
            proc.terminate()
            proc.join(1.0)
        if proc.is_alive():
            proc.kill()
            proc.join(5.0)
        code = self._code = proc.exitcode
        self._stopped = True
        proc.close()
        if check and (forced or code != 0):
            how = "did not exit in time and was killed" if forced else f"exited with code {code}"
            raise BenchError(f"benchmark child {self.name!r} {how}")
        return code

    def __enter__(self) -> Child:
        return self.start()

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if not self._stopped:
            # On the error path, do not mask the original exception.
            self.stop(timeout=2.0 if exc_type else 5.0, check=False)
