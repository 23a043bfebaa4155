"""The domain builder: a zygote that forks domains.

In Xen the toolstack's domain builder (libxc) loads a kernel into a new domain's
memory and sets up its start_info.  Here a domain is a Python process running a
*guest kernel* module, and the expensive part of starting one is importing
Python code.  So, before the hypervisor creates any ZeroMQ context, it forks one
process, the zygote, which imports every kernel's code once and then waits.  To
build a domain, the hypervisor asks the zygote to fork; the child inherits the
imported modules (copy-on-write) and starts in milliseconds.

Why the ZeroMQ rule: a ZeroMQ context owns I/O threads, and threads do not
survive fork(); a child forked from a process holding a context inherits locked
mutexes and a half-copied state.  The zygote never makes one; each child makes
its own after the fork.

What a child gets, and nothing else:
- its shared_info and grant-table pages (descriptors passed in by the hypervisor);
- its upcall line: an eventfd the hypervisor writes to raise an upcall;
- its doorbell: an eventfd it writes to have its event-channel send requests served;
- one end of a fresh socketpair whose other end goes back to the hypervisor: the
  page-descriptor socket, bound to this domain by construction;
- its ZeroMQ secret, in memory only;
- PR_SET_PDEATHSIG, so if the zygote (and therefore the hypervisor) dies, the
  domain dies too: no domain outlives its hypervisor.

The zygote returns the child's pid and a pidfd opened before the child could be
reaped, so the pid can never be confused with a recycled one.
"""

from __future__ import annotations

import ctypes
import importlib
import os
import signal
import socket
import sys
from typing import Any

import msgpack


PR_SET_NAME = 15
PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
_libc = ctypes.CDLL(None, use_errno=True)


def set_death_signal(sig: int = signal.SIGKILL) -> None:
    """Ask the kernel to kill us when our parent dies."""
    _libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)


def become_subreaper() -> None:
    """Orphaned domains are re-parented to us (not to init), so we can reap them."""
    _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def set_process_name(name: str) -> None:
    """Name the process in `ps -o comm`, `top`: e.g. 'xen:guest1'."""
    _libc.prctl(PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)


class BuildError(Exception):
    pass


class Builder:
    """The hypervisor's handle on the zygote."""

    def __init__(self, run_dir: str, preload: list[str], endpoint: str) -> None:
        self.run_dir = run_dir
        self.endpoint = endpoint
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:  # the zygote
            ours.close()
            try:
                _zygote_main(theirs, run_dir, preload, endpoint)
            finally:
                os._exit(0)
        theirs.close()
        self.pid = pid
        self.sock = ours
        self.sock.settimeout(30)
        reply = msgpack.unpackb(self.sock.recv(65536))   # "ready" once imports are done
        if reply.get("error"):
            raise BuildError(reply["error"])

    def spawn(self, *, domid: int, name: str, kernel: str, secret: bytes,
              shared_info_fd: int, grant_table_fd: int, upcall_fd: int,
              doorbell_fd: int, grant_frames: int) -> tuple[int, int, socket.socket]:
        """Fork a domain; return (pid, pidfd, our end of its page-descriptor socket)."""
        request = msgpack.packb({"domid": domid, "name": name, "kernel": kernel, "secret": secret,
                                 "grant_frames": grant_frames})
        socket.send_fds(self.sock, [request], [shared_info_fd, grant_table_fd, upcall_fd, doorbell_fd])
        data, fds, _flags, _addr = socket.recv_fds(self.sock, 65536, 2)
        reply = msgpack.unpackb(data)
        if reply.get("error"):
            for fd in fds:
                os.close(fd)
            raise BuildError(reply["error"])
        pidfd, sock_fd = fds
        fdsock = socket.socket(fileno=sock_fd)
        fdsock.setblocking(False)   # a domain that stops reading must not stall us
        return reply["pid"], pidfd, fdsock

    def close(self, timeout: float = 5.0) -> None:
        """Stop the zygote: it kills and reaps any child left, then exits."""
        import time
        self.sock.close()
        deadline = time.monotonic() + timeout
        try:
            while os.waitpid(self.pid, os.WNOHANG)[0] == 0:
                if time.monotonic() > deadline:
                    os.kill(self.pid, signal.SIGKILL)
                    os.waitpid(self.pid, 0)
                    break
                time.sleep(0.005)
        except ChildProcessError:
            pass


def _zygote_main(sock: socket.socket, run_dir: str, preload: list[str], endpoint: str) -> None:
    set_death_signal()
    set_process_name("xen:zygote")
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # Reap children ourselves: the hypervisor watches them through pidfds.
    signal.signal(signal.SIGCHLD, lambda *_: _reap())
    try:
        for name in preload:
            importlib.import_module(name)
    except Exception as exc:
        sock.send(msgpack.packb({"error": f"zygote could not import {name}: {exc}"}))
        return
    sock.send(msgpack.packb({"ready": True}))
    while True:
        try:
            data, fds, _flags, _addr = socket.recv_fds(sock, 65536, 4)
        except InterruptedError:
            continue
        if not data:
            _kill_children()   # the hypervisor is shutting down: leave nothing behind
            return
        req = msgpack.unpackb(data)
        try:
            kernel_main = _find_kernel(req["kernel"])
        except BuildError as exc:
            for fd in fds:
                os.close(fd)
            sock.send(msgpack.packb({"error": str(exc)}))
            continue
        dom_end, hv_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        # Hold SIGCHLD until the pidfd exists, so the child cannot be reaped (and its
        # pid recycled) before we have a handle that names exactly this process.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
        pid = os.fork()
        if pid == 0:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
            sock.close()
            hv_end.close()
            _child(req, fds, dom_end, run_dir, endpoint, kernel_main)
        dom_end.close()
        for fd in fds:
            os.close(fd)
        pidfd = os.pidfd_open(pid)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
        socket.send_fds(sock, [msgpack.packb({"pid": pid})], [pidfd, hv_end.fileno()])
        os.close(pidfd)
        hv_end.close()


def _find_kernel(kernel: str):
    """A kernel is a module with `kernel_main(start: dict, fds: dict)`."""
    if not isinstance(kernel, str) or not kernel.replace(".", "").replace("_", "").isalnum():
        raise BuildError(f"kernel {kernel!r} is not a module name")
    try:
        module = importlib.import_module(kernel)
    except ImportError as exc:
        raise BuildError(f"kernel {kernel!r} cannot be loaded: {exc}") from None
    entry = getattr(module, "kernel_main", None)
    if not callable(entry):
        raise BuildError(f"{kernel!r} is not a guest kernel (it has no kernel_main)")
    return entry


def _child(req: dict[str, Any], fds: list[int], dom_end: socket.socket, run_dir: str,
           endpoint: str, kernel_main) -> None:
    code = 1
    try:
        set_death_signal()
        if os.getppid() == 1:   # the zygote died between fork and prctl
            os._exit(1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        set_process_name(f"xen:{req['name']}")
        logdir = os.path.join(run_dir, "logs")
        os.makedirs(logdir, exist_ok=True)
        log = os.open(os.path.join(logdir, f"{req['name']}.log"),
                      os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        sys.stdout = os.fdopen(1, "w", buffering=1)
        sys.stderr = os.fdopen(2, "w", buffering=1)
        start = {"domid": req["domid"], "name": req["name"], "secret": req["secret"],
                 "endpoint": endpoint, "run_dir": run_dir, "grant_frames": req["grant_frames"]}
        code = kernel_main(start, {"shared_info": fds[0], "grant_table": fds[1],
                                   "upcall": fds[2], "doorbell": fds[3],
                                   "fdsock": dom_end.detach()}) or 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        import traceback
        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _kill_children() -> None:
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for pid in _children():
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


def _children() -> list[int]:
    me = os.getpid()
    out = []
    for tid in os.listdir(f"/proc/{me}/task"):
        try:
            with open(f"/proc/{me}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
        except OSError:
            pass
    return out


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
