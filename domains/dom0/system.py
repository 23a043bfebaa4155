"""Power on, power off: `run.py up` and `run.py down`.

`up` is the machine's power button and serial console.  It starts the
hypervisor process (which builds dom0), hands dom0 the system configuration (the
xl.cfg files of the domains to boot), waits until dom0 says it is ready, and
then either returns (--detach) or shows live status until Ctrl-C / SIGTERM,
when it shuts the whole system down.

`down` asks the hypervisor of a run directory to shut down (SIGTERM), waits, and
as a last resort kills its whole process group.  Either way it checks that no
socket is left behind.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

from ipc import rundir
from domains.dom0.client import APIError, Client, NotRunning, resolve_run_dir

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
# The driver domains first: the guests' disks and vifs name them.
DEFAULT_SYSTEM = ["blkdom.cfg", "netdom.cfg", "guest1.cfg", "guest2.cfg"]
BOOT_TIMEOUT = 60.0


def _parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"run.py {prog}")
    p.add_argument("--run-dir", help="where the system keeps its sockets and logs")
    return p


def _hypervisor_pid(run_dir: str) -> int | None:
    try:
        with open(os.path.join(run_dir, "hypervisor.pid")) as f:
            pid = int(f.read().strip())
        os.kill(pid, 0)
        return pid
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return None


def system_config(paths: list[str]) -> list[dict]:
    """Read the xl.cfg files to boot; the default system when none are given."""
    files = paths or [os.path.join(CONFIG_DIR, name) for name in DEFAULT_SYSTEM]
    out = []
    for path in files:
        try:
            with open(path) as f:
                out.append({"filename": path, "config": f.read()})
        except OSError as exc:
            raise SystemExit(f"run.py up: cannot read config {path}: {exc.strerror}")
    return out


def up(argv: list[str]) -> int:
    p = _parser("up")
    p.add_argument("--config", action="append", default=[], metavar="FILE",
                   help="an xl.cfg domain config to boot (repeatable); default: the built-in system")
    p.add_argument("--detach", action="store_true", help="return once dom0 is ready")
    p.add_argument("--host-memory", type=int, default=8192, metavar="MIB")
    args = p.parse_args(argv)
    run_dir = resolve_run_dir(args.run_dir)
    if _hypervisor_pid(run_dir):
        print(f"run.py up: a system is already running in {run_dir}", file=sys.stderr)
        return 1
    domains = system_config(args.config)
    # Check every config before anything starts, so a bad file changes nothing.
    from domains.dom0.toolstack.xlcfg import ConfigError, parse_config_text as parse_config
    for item in domains:
        try:
            parse_config(item["config"], item["filename"])
        except ConfigError as exc:
            print(f"run.py up: {exc}", file=sys.stderr)
            return 1
    os.makedirs(run_dir, exist_ok=True)
    ready = os.path.join(run_dir, "dom0", "ready")
    if os.path.exists(ready):
        os.unlink(ready)
    log = open(os.path.join(run_dir, "hypervisor.out"), "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "hypervisor", "--run-dir", run_dir,
         "--host-memory", str(args.host_memory),
         "--dom0-args", json.dumps({"domains": domains})],
        cwd=ROOT, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True,
        env=dict(os.environ, PYTHONPATH=ROOT))
    deadline = time.monotonic() + BOOT_TIMEOUT
    while not os.path.exists(ready):
        if proc.poll() is not None:
            print(f"run.py up: the hypervisor exited (status {proc.returncode}); "
                  f"see {run_dir}/hypervisor.out and {run_dir}/logs/", file=sys.stderr)
            return 1
        if time.monotonic() > deadline:
            print("run.py up: dom0 did not become ready in time; shutting down", file=sys.stderr)
            _stop(proc.pid, run_dir)
            return 1
        time.sleep(0.02)
    with open(ready) as f:
        problems = f.read().strip()
    if problems != "ok":
        print(f"run.py up: some domains failed to start:\n{problems}", file=sys.stderr)
    if args.detach:
        print(f"microxen is up in {run_dir} (hypervisor pid {proc.pid}); "
              f"stop it with: python run.py down --run-dir {run_dir}")
        return 0
    return _foreground(proc, run_dir)


def _foreground(proc: subprocess.Popen, run_dir: str) -> int:
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    print(f"microxen is up in {run_dir}.  Ctrl-C shuts it down.\n")
    try:
        with Client(run_dir, timeout=10) as client:
            while not stop and proc.poll() is None:
                _show_status(client)
                for _ in range(10):
                    if stop or proc.poll() is not None:
                        break
                    time.sleep(0.1)
    except (NotRunning, OSError) as exc:
        if not stop:
            print(f"lost contact with dom0: {exc}", file=sys.stderr)
    print("\nshutting down...")
    _stop(proc.pid, run_dir)
    print("stopped.")
    return 0


def _show_status(client: Client) -> None:
    from domains.dom0.xl import format_list
    domains = client.call("list")
    lines = format_list(domains)
    for info in domains:
        counters = _workload_counters(client, info["domid"])
        if counters:
            lines.append(f"  {info['name']}: " + " ".join(f"{k}={v}" for k, v in counters.items()))
    sys.stdout.write("\x1b[H\x1b[2J" if sys.stdout.isatty() else "")
    sys.stdout.write(time.strftime("%H:%M:%S") + "\n" + "\n".join(lines) + "\n")
    sys.stdout.flush()


def _workload_counters(client: Client, domid: int) -> dict[str, str]:
    base = f"/local/domain/{domid}/data/workload"
    try:
        keys = client.call("xs_directory", path=base)
    except APIError:
        return {}
    return {k: client.call("xs_read", path=f"{base}/{k}") for k in sorted(keys)}


def _stop(pid: int, run_dir: str, timeout: float = 20.0) -> bool:
    """SIGTERM the hypervisor, wait, then kill its process group if it lingers."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return True
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        try:   # reap it if it is our child
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return True
        except ChildProcessError:
            pass
        time.sleep(0.02)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    rundir.sweep_sockets(run_dir)
    return False


def down(argv: list[str]) -> int:
    args = _parser("down").parse_args(argv)
    run_dir = resolve_run_dir(args.run_dir)
    pid = _hypervisor_pid(run_dir)
    if pid is None:
        print(f"run.py down: no microxen system is running in {run_dir}", file=sys.stderr)
        return 1
    clean = _stop(pid, run_dir)
    print(f"microxen in {run_dir} stopped" + ("" if clean else " (had to be killed)"))
    return 0
