"""Boot the real system (`run.py up --detach`) in a run directory of its own.

Used by end-to-end tests: everything goes through the same commands a person
types, and `down` must leave no process and no socket behind.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_py(*args: str, timeout: float = 90, check: bool = False) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "run.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise AssertionError(f"run.py {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


class System:
    def __init__(self, configs: list[str] | None = None) -> None:
        self.run_dir = tempfile.mkdtemp(prefix="mxs-")
        args = ["up", "--run-dir", self.run_dir, "--detach"]
        for cfg in configs or []:
            args += ["--config", cfg]
        run_py(*args, check=True)
        with open(os.path.join(self.run_dir, "hypervisor.pid")) as f:
            self.hv_pid = int(f.read())
        self.seen: set[int] = set()

    def xl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return run_py("xl", "--run-dir", self.run_dir, *args, check=check)

    def domains(self) -> list[dict]:
        doms = json.loads(self.xl("list", "-l").stdout)
        self.seen.update(d["pid"] for d in doms if d["pid"])
        return doms

    def domain(self, name: str) -> dict:
        for d in self.domains():
            if d["name"] == name and "d" not in d["state"]:
                return d
        raise KeyError(name)

    def wait(self, predicate, timeout: float = 20, what: str = "condition"):
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for {what}")
            time.sleep(0.05)

    def down(self) -> None:
        self.domains() if self.alive() else None
        run_py("down", "--run-dir", self.run_dir)
        self.wait(lambda: not self.alive(), 20, "hypervisor to exit")
        leftovers = [p for p in self.seen | {self.hv_pid} if _alive(p)]
        assert not leftovers, f"processes left behind: {leftovers}"
        sockets = [os.path.join(t, f) for t, _, fs in os.walk(self.run_dir) for f in fs
                   if f.endswith(".sock") or f == "socket"]
        assert not sockets, f"sockets left behind: {sockets}"
        shutil.rmtree(self.run_dir, ignore_errors=True)   # kept only when a check failed

    def alive(self) -> bool:
        return _alive(self.hv_pid)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
