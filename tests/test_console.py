"""`xl console` and `xl create -c` through a real terminal (a pty), as a person types."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time

import pytest

from tests.systemharness import ROOT, System

GUEST = """
name = "talker"
kernel = "domu"
memory = 32
workload = "heartbeat"
"""


@pytest.fixture(scope="module")
def system():
    s = System()
    yield s
    s.down()


class Terminal:
    """A process on the slave side of a pty; we are the keyboard and the screen."""

    def __init__(self, *args: str) -> None:
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen([sys.executable, "run.py", *args], cwd=ROOT,
                                     stdin=slave, stdout=slave, stderr=slave, close_fds=True)
        os.close(slave)
        self.screen = b""

    def type(self, text: bytes) -> None:
        os.write(self.master, text)

    def expect(self, what: bytes, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while what not in self.screen:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"never saw {what!r}; screen: {self.screen[-500:]!r}")
            ready, _, _ = select.select([self.master], [], [], left)
            if ready:
                try:
                    self.screen += os.read(self.master, 4096)
                except OSError:
                    break

    def poke_until(self, key: bytes, what: bytes, timeout: float = 30) -> None:
        """Press `key` every half second until `what` shows: attaching takes a moment,
        and keys typed before xl is attached may land before the guest listens."""
        deadline = time.monotonic() + timeout
        while True:
            self.type(key)
            try:
                self.expect(what, timeout=0.5)
                return
            except AssertionError:
                if time.monotonic() > deadline:
                    raise

    def close(self, timeout: float = 20) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            os.close(self.master)


def test_console_input_reaches_the_guest_and_ctrl_bracket_detaches(system):
    term = Terminal("xl", "--run-dir", system.run_dir, "console", "guest1")
    try:
        term.poke_until(b"\r", b"# ")
        term.type(b"uname\r")
        term.expect(b"microxen guest1 domain")
        term.type(b"\x1d")                      # Ctrl-]
        assert term.close() == 0
    finally:
        if term.proc.poll() is None:
            term.proc.kill()


def test_create_c_attaches_at_boot(system, tmp_path):
    cfg = tmp_path / "talker.cfg"
    cfg.write_text(GUEST)
    term = Terminal("xl", "--run-dir", system.run_dir, "create", "-c", str(cfg))
    try:
        term.expect(b"created")
        term.poke_until(b"\r", b"# ")
        term.type(b"free\r")
        term.expect(b"reservation 32768 KiB")
        term.type(b"\x1d")
        assert term.close() == 0
    finally:
        if term.proc.poll() is None:
            term.proc.kill()
        system.xl("destroy", "talker", check=False)


def test_console_output_is_logged_per_guest(system):
    log = os.path.join(system.run_dir, "console", "guest2.log")
    system.wait(lambda: os.path.exists(log) and b"login" in open(log, "rb").read(),
                what="guest2's console log")


def test_console_of_unknown_domain_is_an_error(system):
    r = system.xl("console", "nosuch", check=False)
    assert r.returncode != 0 and "does not exist" in r.stderr
