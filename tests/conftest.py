"""Fixtures that start a real hypervisor and prove it left nothing behind.

`hv`         a hypervisor of the test's own (dom0 is a puppet), stopped after
             the test; then every process it ever had (hypervisor, zygote,
             domains) must be gone, no socket file may remain in its run
             directory, and /dev/shm must hold nothing new.
`shared_hv`  one hypervisor per test module, for tests that do not disturb
             each other.  After each test every guest it left is destroyed and
             must vanish (record and process); at the end of the module the
             same full leak check as `hv` runs.  If a test kills the hypervisor
             itself, that test fails and the next one gets a new hypervisor.

Unix socket paths must fit in 107 bytes, so a run directory is pytest's
tmp_path only when that is short enough, else a fresh /tmp/mx-* directory.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile

import pytest

from tests.hvharness import HypervisorUnderTest, proc_state, wait_for

LONGEST_SOCKET = "/hypervisor/hypercall.sock"


def _run_dir(tmp_path=None) -> tuple[str, bool]:
    """A run directory with room for our socket names; True if we must remove it."""
    if tmp_path is not None and len(str(tmp_path)) + len(LONGEST_SOCKET) < 100:
        return str(tmp_path), False
    return tempfile.mkdtemp(prefix="mx-"), True


def _shm() -> set[str]:
    # multiprocessing's semaphores (sem.mp-*) belong to other test suites that may
    # run at the same time (the bench harness); nothing in microxen uses them.
    return {name for name in os.listdir("/dev/shm") if not name.startswith("sem.mp-")}


def _gone(pid: int) -> bool:
    # A zombie has released everything but its pid; it is gone as a process.
    return proc_state(pid) in ("X", "Z")


def stop_and_check(h: HypervisorUnderTest, shm_before: set[str]) -> None:
    """Stop the hypervisor; fail if any of its processes, sockets or shm objects remain."""
    pids = {h.proc.pid, *h.process_tree(), *h.seen_pids}
    if h.proc.poll() is None:
        try:
            pids.update(h.pids())
        except Exception:
            pass   # dom0 may be what broke; the process tree still names everyone
    h.stop()
    for guest in h.guests.values():
        guest.conn.close()
    h.dom0.conn.close()
    wait_for(lambda: all(_gone(p) for p in pids), timeout=10,
             what=lambda: f"processes {sorted(p for p in pids if not _gone(p))} to exit")
    sockets = [os.path.join(d, f) for d, _, files in os.walk(h.run_dir) for f in files
               if stat.S_ISSOCK(os.lstat(os.path.join(d, f)).st_mode)]
    assert not sockets, f"socket files left behind: {sockets}"
    new_shm = _shm() - shm_before
    assert not new_shm, f"left in /dev/shm: {sorted(new_shm)}"


@pytest.fixture
def hv(tmp_path):
    shm_before = _shm()
    run_dir, remove = _run_dir(tmp_path)
    h = HypervisorUnderTest(run_dir)
    try:
        yield h
    finally:
        try:
            stop_and_check(h, shm_before)
        finally:
            if remove:
                shutil.rmtree(run_dir, ignore_errors=True)


class _Shared:
    """The module's hypervisor, replaced if a test broke it."""

    def __init__(self) -> None:
        self.shm_before = _shm()
        self.run_dir, _ = _run_dir()
        self.h = HypervisorUnderTest(self.run_dir)
        # dom0's VIRQ_DOM_EXC port lives as long as this hypervisor, and so
        # does its line: bound now, it is part of every test's baseline.
        self.h.dom_exc_port()

    def renew(self) -> None:
        stop_and_check(self.h, self.shm_before)
        shutil.rmtree(self.run_dir, ignore_errors=True)
        self.__init__()

    def close(self) -> None:
        try:
            stop_and_check(self.h, self.shm_before)
        finally:
            shutil.rmtree(self.run_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def _shared_box():
    box = _Shared()
    try:
        yield box
    finally:
        box.close()


@pytest.fixture
def shared_hv(_shared_box):
    h = _shared_box.h
    shm_before = _shm()
    fds_before = _open_fds(h.proc.pid)
    yield h
    if h.proc.poll() is not None:
        _shared_box.renew()
        pytest.fail(f"the hypervisor died during the test (exit status {h.proc.returncode})")
    clean_guests(h)
    new_shm = _shm() - shm_before
    assert not new_shm, f"left in /dev/shm: {sorted(new_shm)}"
    # Every frame, pidfd and page socket of a destroyed domain must be closed.
    # (ZeroMQ closes a dead peer's connection on its own thread, hence the wait.)
    wait_for(lambda: len(_open_fds(h.proc.pid)) <= len(fds_before), timeout=10,
             what=lambda: f"the hypervisor to close {_describe_fds(h.proc.pid, fds_before)}")


def _open_fds(pid: int) -> set[str]:
    return set(os.listdir(f"/proc/{pid}/fd"))


def _describe_fds(pid: int, before: set[str]) -> list[str]:
    out = []
    for fd in sorted(_open_fds(pid) - before, key=int):
        try:
            out.append(f"{fd} -> {os.readlink(f'/proc/{pid}/fd/{fd}')}")
        except OSError:
            pass
    return out


def clean_guests(h: HypervisorUnderTest) -> None:
    """Destroy every guest a test left; each record and process must then vanish."""
    dom0_pid = h.info(0)["pid"]
    h.dom0.do("unmap_all")   # dom0's mappings would keep dying guests' records alive
    pids = set(h.process_tree())
    for domid, info in h.domains().items():
        if domid != 0 and "d" not in info["state"]:
            h.destroy(domid)
    for guest in h.guests.values():
        guest.conn.close()
    h.guests.clear()
    wait_for(lambda: set(h.domains()) == {0}, timeout=10,
             what=lambda: f"guest records to go (still {sorted(h.domains())})")
    zygote = h.builder_pid()
    strays = pids - {dom0_pid, zygote}
    wait_for(lambda: all(_gone(p) for p in strays), timeout=10,
             what=lambda: f"guest processes {sorted(p for p in strays if not _gone(p))} to exit")
    live = {p for p in h.process_tree() if not _gone(p)}
    assert live == {zygote, dom0_pid}, f"processes outlived their domains: {live - {zygote, dom0_pid}}"
