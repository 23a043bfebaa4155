"""A real hypervisor with puppet domains, for testing hypercalls one by one.

Starts `python -m hypervisor` in its own run directory with dom0 running the
puppet kernel (tests/kernels/puppet.py), so the test can make dom0, and any
guest it creates, perform exact hypercalls and memory accesses.

    h = HypervisorUnderTest(run_dir)
    g = h.create("g1")                    # createdomain + unpause; returns its Puppet
    d = h.build("g2"); ...; h.boot(d)     # the same in two steps (set_start_info, seed between)
    g.do("alloc", nr=1); g.hypercall("event_channel_op", "send", port=1)
    h.info(domid), h.domains(), h.dmesg(), h.destroy(domid), h.wait_state(domid, "c")
    h.process_tree(), h.builder_pid()     # the real processes, read from /proc
    h.stop()

tests/conftest.py wraps this in the `hv` and `shared_hv` fixtures with leak checks.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import msgpack

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Puppet:
    def __init__(self, conn: socket.socket, hello: dict) -> None:
        self.conn = conn
        self.conn.settimeout(20)
        self.domid = hello["hello"]
        self.start_info = hello["start_info"]
        self.unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)

    def do(self, op: str, **kw):
        """Run a command; return its value or raise PuppetError."""
        reply = self.send(op, **kw)
        if "error" in reply:
            raise PuppetError(reply["error"], reply.get("errno"), reply.get("status"))
        return reply["ok"]

    def send(self, op: str, **kw) -> dict:
        self.conn.sendall(msgpack.packb({"op": op, **kw}, use_bin_type=True))
        return self._read()

    def _read(self) -> dict:
        while True:
            for msg in self.unpacker:
                return msg
            data = self.conn.recv(65536)
            if not data:
                raise ConnectionError(f"puppet d{self.domid} hung up")
            self.unpacker.feed(data)

    def hypercall(self, hypercall: str, cmd: str, **args):
        return self.do("hypercall", hypercall=hypercall, cmd=cmd, args=args)


class PuppetError(Exception):
    """A puppet command failed: `errno` for a hypercall error, `status` (GNTST_*) for a grant."""

    def __init__(self, message: str, errno: int | None, status: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno
        self.status = status


class HypervisorUnderTest:
    def __init__(self, run_dir: str, host_memory: int = 2048) -> None:
        self.run_dir = run_dir
        self.listen_path = os.path.join(run_dir, "puppets.sock")
        os.makedirs(run_dir, exist_ok=True)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.listen_path)
        self.listener.listen(64)
        self.listener.settimeout(20)
        env = dict(os.environ, PYTHONPATH=ROOT)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hypervisor", "--run-dir", run_dir,
             "--host-memory", str(host_memory), "--dom0-memory", "256",
             "--dom0-kernel", "tests.kernels.puppet", "--preload", "tests.kernels.puppet",
             "--dom0-args", json.dumps({"cmdline": f"puppet={self.listen_path}"})],
            cwd=ROOT, env=env, start_new_session=True)
        self.dom0 = self.accept()
        self.guests: dict[int, Puppet] = {}
        # every process this system has had, so a leak check can name them all
        # even after the hypervisor itself is gone
        self.seen_pids: set[int] = {self.proc.pid}
        self.process_tree()

    def accept(self) -> Puppet:
        conn, _ = self.listener.accept()
        conn.settimeout(20)
        unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
        while True:
            data = conn.recv(65536)
            if not data:
                raise ConnectionError("puppet hung up before hello")
            unpacker.feed(data)
            for hello in unpacker:
                return Puppet(conn, hello)

    def create(self, name: str, memory_mib: int = 16, **extra) -> Puppet:
        return self.boot(self.build(name, memory_mib, **extra))

    def build(self, name: str, memory_mib: int = 16, **extra) -> int:
        """createdomain only: the new domain exists, paused, and has not booted."""
        args = {"name": name, "kernel": "tests.kernels.puppet", "memory_kb": memory_mib * 1024,
                "cmdline": f"puppet={self.listen_path}", **extra}
        domid = self.dom0.hypercall("domctl", "createdomain", **args)["domid"]
        self.seen_pids.add(self.info(domid)["pid"])
        return domid

    def boot(self, domid: int) -> Puppet:
        """Unpause a built domain and wait for its puppet to report in."""
        self.dom0.hypercall("domctl", "unpausedomain", domid=domid)
        guest = self.accept()
        assert guest.domid == domid
        self.guests[domid] = guest
        return guest

    def destroy(self, domid: int) -> None:
        self.dom0.hypercall("domctl", "destroydomain", domid=domid)
        guest = self.guests.pop(domid, None)
        if guest is not None:
            guest.conn.close()

    def domains(self) -> dict[int, dict]:
        return {d["domid"]: d for d in self.dom0.hypercall("sysctl", "getdomaininfolist")}

    def dmesg(self) -> list[str]:
        return self.dom0.hypercall("sysctl", "readconsole")

    def info(self, domid: int) -> dict:
        return self.dom0.hypercall("domctl", "getdomaininfo", domid=domid)

    def pids(self) -> list[int]:
        pids = [d["pid"] for d in self.dom0.hypercall("sysctl", "getdomaininfolist") if d["pid"]]
        self.seen_pids.update(pids)
        return pids

    def builder_pid(self) -> int:
        """The zygote: the hypervisor's one and only child process."""
        kids = children(self.proc.pid)
        assert len(kids) == 1, f"the hypervisor should have one child (the zygote), has {kids}"
        return kids[0]

    def dom_exc_port(self) -> int:
        """dom0's port for VIRQ_DOM_EXC, bound on first use."""
        if getattr(self, "_dom_exc", None) is None:
            from ipc.event_abi import VIRQ_DOM_EXC
            self._dom_exc = self.dom0.do("bind_virq", virq=VIRQ_DOM_EXC)
        return self._dom_exc

    def process_tree(self) -> list[int]:
        """Every descendant of the hypervisor process: the zygote and the domains."""
        tree = descendants(self.proc.pid)
        self.seen_pids.update(tree)
        return tree

    def wait_state(self, domid: int, letter: str, timeout: float = 10) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            info = self.info(domid)
            if letter in info["state"]:
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"d{domid} never reached state {letter}: {info['state']}")
            time.sleep(0.01)

    def wait_gone(self, domid: int, timeout: float = 10) -> None:
        """Wait until the hypervisor has no record of `domid` at all."""
        deadline = time.monotonic() + timeout
        while domid in self.domains():
            if time.monotonic() > deadline:
                raise TimeoutError(f"d{domid} still listed: {self.domains()[domid]['state']}")
            time.sleep(0.01)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.listener.close()
        try:
            os.unlink(self.listen_path)
        except FileNotFoundError:
            pass   # the hypervisor sweeps every socket in its run directory on the way out


def children(pid: int) -> list[int]:
    """Direct children of `pid`, read from /proc (no psutil)."""
    out: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return out


def descendants(pid: int) -> list[int]:
    out, todo = [], children(pid)
    while todo:
        child = todo.pop()
        out.append(child)
        todo.extend(children(child))
    return out


def proc_state(pid: int) -> str:
    """The one-letter state in /proc/<pid>/stat ('T' stopped, 'Z' zombie), or 'X' if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode()
    except OSError:
        return "X"
    return data[data.rfind(")") + 2:].split()[0]


def wait_for(predicate, timeout: float = 10, what="condition"):
    """Poll `predicate` until it returns something truthy; fail after `timeout` seconds.

    `what` names the condition in the error; it may be a callable, evaluated only
    on timeout, so the message describes the state at that moment.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for "
                               f"{what() if callable(what) else what}")
        time.sleep(0.005)
