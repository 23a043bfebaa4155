"""A whole microxen system in a temporary run directory, for block-device tests.

Starts it with ``run.py up --detach`` and stops it with ``run.py down``, so the
tests exercise the real entry point.  Every pid ever seen in ``xl list -l`` is
remembered; :meth:`System.down` checks that none survives and that no socket
is left in the run directory.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Iterator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "domains", "dom0", "configs")

BLKDOM = """
name = "blkdom"
type = "pv"
kernel = "driverdom"
memory = 64
driver_domain = 1
extra = "heartbeat=0.2"
on_crash = "restart"
"""


def guest(name: str, workload: str = "disk", disk: bool = True, kernel: str = "domu",
          extra: str = "", direct: bool = False) -> str:
    """A guest's xl.cfg; ``direct`` marks its disk ``direct-io-safe`` (O_DIRECT in blkback)."""
    text = f'name = "{name}"\ntype = "pv"\nkernel = "{kernel}"\nmemory = 64\n' \
           f'workload = "{workload}"\non_crash = "destroy"\n'
    if extra:
        text += f'extra = "{extra}"\n'
    if disk:
        text += (f'disk = ["format=raw, vdev=xvda, access=rw, backend=blkdom, '
                 f'{"direct-io-safe, " if direct else ""}target=disks/{name}.img?size=16M"]\n')
    return text


def workload_counters(client, name: str) -> dict[str, float]:
    """The counters domain ``name``'s workload publishes under
    ``data/workload``, read through dom0's management API (what ``xl`` calls).

    One call for the whole directory, in this process: a loop polling every
    guest must not start an ``xl`` process per guest per poll, which on two
    cores would load the very system whose recovery it is timing.  Raises
    RuntimeError if the directory cannot be read, KeyError for no such domain.
    """
    from domains.dom0.client import APIError
    domid = {d["name"]: d for d in client.call("list")}[name]["domid"]
    try:
        rows = client.call("xs_ls", path=f"/local/domain/{domid}/data/workload")
    except APIError as exc:
        raise RuntimeError(str(exc)) from None
    out = {}
    for key, value in rows:
        try:
            out[key.strip()] = float(value)
        except ValueError:
            pass
    return out


class System:
    def __init__(self, configs: dict[str, str], watchdog_timeout: float = 1.5) -> None:
        self.run_dir = tempfile.mkdtemp(prefix="mxb", dir="/tmp")
        self._client = None
        self.pids: set[int] = set()
        self.env = dict(os.environ, MICROXEN_WATCHDOG_TIMEOUT=str(watchdog_timeout))
        self.config_paths = []
        for name, text in configs.items():
            path = os.path.join(self.run_dir, f"{name}.cfg")
            with open(path, "w") as f:
                f.write(text)
            self.config_paths.append(path)

    def _run(self, *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, os.path.join(ROOT, "run.py"), *args],
                              cwd=ROOT, env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def up(self) -> "System":
        args = ["up", "--run-dir", self.run_dir, "--detach"]
        for p in self.config_paths:
            args += ["--config", p]
        r = self._run(*args)
        if r.returncode != 0:
            self.down(check=False)
            raise RuntimeError(f"run.py up failed: {r.stderr}")
        self.list()
        return self

    def xl(self, *args: str) -> str:
        r = self._run("xl", "--run-dir", self.run_dir, *args, timeout=30)
        if r.returncode != 0:
            raise RuntimeError(f"xl {' '.join(args)}: {r.stderr.strip()}")
        return r.stdout

    def list(self) -> dict[str, dict]:
        doms = json.loads(self.xl("list", "-l"))
        for d in doms:
            if d.get("pid"):
                self.pids.add(d["pid"])
        return {d["name"]: d for d in doms}

    def read(self, path: str, default: str | None = None) -> str | None:
        try:
            return self.xl("xenstore-read", path).strip()
        except RuntimeError:
            return default

    def counters(self, name: str) -> dict[str, float]:
        if self._client is None:
            from domains.dom0.client import Client
            self._client = Client(self.run_dir, timeout=30)
        return workload_counters(self._client, name)

    def wait_for(self, predicate, timeout: float = 30.0, what: str = "condition"):
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            try:
                last = predicate()
            except (RuntimeError, KeyError) as exc:
                last = exc
                value = None
            else:
                value = last
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")

    def kill(self, name: str, sig: int = signal.SIGKILL) -> int:
        pid = self.list()[name]["pid"]
        os.kill(pid, sig)
        return pid

    def down(self, check: bool = True) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        self._run("down", "--run-dir", self.run_dir)
        problems = []
        deadline = time.monotonic() + 10
        for pid in self.pids:
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _alive(pid):
                problems.append(f"process {pid} survived")
                os.kill(pid, signal.SIGKILL)
        for dirpath, _dirs, files in os.walk(self.run_dir):
            for f in files:
                p = os.path.join(dirpath, f)
                if os.path.exists(p) and _is_socket(p):
                    problems.append(f"socket {p} left behind")
        self.leftovers = problems
        if check and problems:
            raise AssertionError("; ".join(problems))

    def cleanup(self) -> None:
        shutil.rmtree(self.run_dir, ignore_errors=True)


def running(configs: dict[str, str], **kwargs) -> Iterator[System]:
    """A pytest fixture's body: the system up, yielded, then stopped (which
    checks that no process or socket was left behind) and its run directory
    removed.  ``yield from running({...})``."""
    s = System(configs, **kwargs).up()
    try:
        yield s
    finally:
        s.down()
        s.cleanup()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _is_socket(path: str) -> bool:
    import stat
    try:
        return stat.S_ISSOCK(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False
