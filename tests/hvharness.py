"""A real hypervisor with puppet domains, for testing hypercalls one by one.

Starts `python -m hypervisor` in its own run directory with dom0 running the
puppet kernel (tests/kernels/puppet.py), so the test can make dom0, and any
guest it creates, perform exact hypercalls and memory accesses.
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
            raise PuppetError(reply["error"], reply.get("errno"))
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
    def __init__(self, message: str, errno: int | None) -> None:
        super().__init__(message)
        self.errno = errno


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
        args = {"name": name, "kernel": "tests.kernels.puppet", "memory_kb": memory_mib * 1024,
                "cmdline": f"puppet={self.listen_path}", **extra}
        domid = self.dom0.hypercall("domctl", "createdomain", **args)["domid"]
        self.dom0.hypercall("domctl", "unpausedomain", domid=domid)
        guest = self.accept()
        assert guest.domid == domid
        self.guests[domid] = guest
        return guest

    def info(self, domid: int) -> dict:
        return self.dom0.hypercall("domctl", "getdomaininfo", domid=domid)

    def pids(self) -> list[int]:
        return [d["pid"] for d in self.dom0.hypercall("sysctl", "getdomaininfolist") if d["pid"]]

    def wait_state(self, domid: int, letter: str, timeout: float = 10) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            info = self.info(domid)
            if letter in info["state"]:
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"d{domid} never reached state {letter}: {info['state']}")
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
        os.unlink(self.listen_path)
