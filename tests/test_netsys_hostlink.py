"""Linux's own ping reaches a guest through netdom's TAP device (needs root)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from domains.driverdom.bridge import tap_unavailable_reason
from tests.systemharness import System

pytestmark = pytest.mark.skipif(
    tap_unavailable_reason() is not None or shutil.which("ping") is None
    or shutil.which("nsenter") is None,
    reason=tap_unavailable_reason() or "ping and nsenter are needed")


@pytest.fixture(scope="module")
def system():
    s = System()            # the default system: netdom has tap=10.0.0.254/24
    yield s
    s.down()


def _netdom(system) -> dict:
    return system.domain("netdom")


def _host_link(system) -> str:
    domid = _netdom(system)["domid"]
    return system.wait(lambda: system.xl("xenstore-read", f"/local/domain/{domid}/data/host-link",
                                         check=False).stdout.strip() or None,
                       what="netdom's host link")


def _ping(system, ip: str) -> subprocess.CompletedProcess:
    pid = _netdom(system)["pid"]
    return subprocess.run(["nsenter", f"--net=/proc/{pid}/ns/net", "ping", "-c", "3",
                           "-i", "0.2", "-W", "2", ip], capture_output=True, text=True, timeout=30)


def test_linux_pings_both_guests(system):
    link = _host_link(system)
    assert link.startswith("xentap0 10.0.0.254/24 netns=/proc/"), link
    for ip in ("10.0.0.1", "10.0.0.2"):
        r = system.wait(lambda: (lambda p: p if p.returncode == 0 else None)(_ping(system, ip)),
                        timeout=30, what=f"ping {ip} from Linux")
        assert " 0% packet loss" in r.stdout


def test_the_namespace_dies_with_netdom_and_comes_back(system):
    old = _netdom(system)
    os.kill(old["pid"], 9)
    new = system.wait(lambda: [d for d in system.domains() if d["name"] == "netdom"
                               and d["domid"] != old["domid"] and d["pid"]
                               and "d" not in d["state"]], what="netdom restarted")[0]
    # The old namespace went with its only process (the kernel may reuse its inode
    # number for the new one, so we check the process, not the inode).
    assert not os.path.exists(f"/proc/{old['pid']}/ns/net")
    assert new["pid"] != old["pid"]
    r = system.wait(lambda: (lambda p: p if p.returncode == 0 else None)(_ping(system, "10.0.0.1")),
                    timeout=30, what="ping through the new netdom")
    assert r.returncode == 0


def test_host_networking_is_untouched(system):
    out = subprocess.run(["ip", "link"], capture_output=True, text=True, timeout=10).stdout
    assert "xentap0" not in out          # the TAP device lives only in netdom's namespace
