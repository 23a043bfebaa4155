"""A whole system in a run directory of its own, for campaigns and the pytest plugin.

It is booted and stopped through ``run.py up --detach`` / ``run.py down``, the
same entry point people use, with dom0's watchdog timeout shortened
(``MICROXEN_WATCHDOG_TIMEOUT``) so that hangs are caught quickly.  Every pid
ever seen is remembered; ``down()`` checks that none survives and that no
socket is left in the run directory.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

DRIVER = """name = "blkdom"
type = "pv"
kernel = "driverdom"
memory = 64
driver_domain = 1
extra = "heartbeat=0.2 device_timeout=0.5"
on_crash = "restart"
"""


NET_DRIVER = DRIVER.replace('"blkdom"', '"netdom"')


def guest_config(name: str, workload: str = "disk", disk: bool = True, size: str = "16M",
                 vif: str | None = None) -> str:
    """A guest's xl.cfg; ``vif`` is ``"<n>"`` for a vif on netdom with MAC
    00:16:3e:00:00:<n> and address 10.0.0.<n>."""
    text = (f'name = "{name}"\ntype = "pv"\nkernel = "domu"\nmemory = 64\nmaxmem = 128\n'
            f'workload = "{workload}"\non_crash = "restart"\n')
    if disk:
        text += (f'disk = ["format=raw, vdev=xvda, access=rw, backend=blkdom, '
                 f'target=disks/{name}.img?size={size}"]\n')
    if vif is not None:
        text += (f'vif = ["mac=00:16:3e:00:00:{int(vif):02x}, bridge=xenbr0, backend=netdom, '
                 f'ip=10.0.0.{int(vif)}/24"]\n')
    return text


def default_configs(network: bool = True) -> dict[str, str]:
    """blkdom and netdom, two guests running the verifying disk workload and a
    checked UDP stream to each other, and a bystander with no device at all
    (``network=False``: blkdom and disk-only guests)."""
    if not network:
        return {"blkdom": DRIVER, "guest1": guest_config("guest1"),
                "guest2": guest_config("guest2"),
                "bystander": guest_config("bystander", workload="heartbeat", disk=False)}
    return {"blkdom": DRIVER, "netdom": NET_DRIVER,
            "guest1": guest_config("guest1", "disk+net peer=10.0.0.2", vif="1"),
            "guest2": guest_config("guest2", "disk+net peer=10.0.0.1", vif="2"),
            "bystander": guest_config("bystander", workload="heartbeat", disk=False)}


class SystemError_(RuntimeError):
    pass


class RunningSystem:
    def __init__(self, configs: dict[str, str] | None = None, config_files: list[str] | None = None,
                 run_dir: str | None = None, watchdog_timeout: float = 1.5) -> None:
        self.run_dir = run_dir or tempfile.mkdtemp(prefix="mxfi", dir="/tmp")
        self.own_dir = run_dir is None
        os.makedirs(self.run_dir, exist_ok=True)
        self.env = dict(os.environ, MICROXEN_WATCHDOG_TIMEOUT=str(watchdog_timeout),
                        PYTHONPATH=ROOT)
        self.config_paths = list(config_files or [])
        if not self.config_paths:
            for name, text in (configs or default_configs()).items():
                path = os.path.join(self.run_dir, f"{name}.cfg")
                with open(path, "w") as f:
                    f.write(text)
                self.config_paths.append(path)
        self.pids: set[int] = set()
        self.leftovers: list[str] = []

    def run_py(self, *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, os.path.join(ROOT, "run.py"), *args], cwd=ROOT,
                              env=self.env, capture_output=True, text=True, timeout=timeout)

    def up(self) -> "RunningSystem":
        args = ["up", "--run-dir", self.run_dir, "--detach"]
        for p in self.config_paths:
            args += ["--config", p]
        r = self.run_py(*args)
        if r.returncode != 0:
            self.down(check=False)
            raise SystemError_(f"run.py up failed: {r.stderr.strip()}")
        return self

    def remember(self, domains: dict[str, dict]) -> None:
        for d in domains.values():
            if d.get("pid"):
                self.pids.add(d["pid"])

    def hypervisor_pid(self) -> int | None:
        try:
            with open(os.path.join(self.run_dir, "hypervisor.pid")) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None

    def down(self, check: bool = True) -> list[str]:
        hv = self.hypervisor_pid()
        if hv:
            self.pids.add(hv)
        try:
            self.run_py("down", "--run-dir", self.run_dir, timeout=60)
        except subprocess.TimeoutExpired:
            pass
        problems = []
        deadline = time.monotonic() + 10
        for pid in self.pids:
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _alive(pid):
                problems.append(f"process {pid} survived")
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for top, _dirs, files in os.walk(self.run_dir):
            for f in files:
                p = os.path.join(top, f)
                try:
                    if stat.S_ISSOCK(os.lstat(p).st_mode):
                        problems.append(f"socket {p} left behind")
                except FileNotFoundError:
                    pass
        self.leftovers = problems
        if check and problems:
            raise SystemError_("; ".join(problems))
        return problems

    def cleanup(self) -> None:
        if self.own_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
