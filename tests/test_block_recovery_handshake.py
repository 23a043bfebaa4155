"""Integration: blkdom dies again while the guests are reconnecting to it.

The restart of a driver domain is itself a window of danger: the new blkdom
is booting, its backends are in InitWait, the guests' frontends may have
granted a ring and published ``Initialised`` for it.  If that blkdom dies
there, the frontends hold a half-made connection to a domain that is gone,
and the next blkdom must not be fooled by it (a frontend left in
Initialised with refs granted to the dead domain once made the next backend
fail its handshake and the guest wait forever).

Two kills, each of a *freshly re-created* blkdom:

1. as soon as it exists (it may not have booted its backends yet);
2. paused once its backends are up and the guests' frontends have answered
   (Initialised, or already Connected), then killed while paused.

Each time a further blkdom is built and both disk guests reconnect and carry
on with zero errors and zero verification failures.  Nothing here is timed.
"""

from __future__ import annotations

import signal

import pytest

from tests.blocksys import BLKDOM, System, guest, running

pytestmark = pytest.mark.timeout(300)

DISK_GUESTS = ("guest1", "guest2")
VBD = 51712     # xvda


@pytest.fixture
def system():
    yield from running({"blkdom": BLKDOM, "guest1": guest("guest1"), "guest2": guest("guest2")},
                       watchdog_timeout=1.5)


def _new_blkdom(s: System, old: int) -> dict:
    return s.wait_for(lambda: (lambda d: d if d and d["domid"] != old and "d" not in d["state"]
                               else None)(s.list().get("blkdom")), what="a new blkdom")


def _frontends_answered(s: System, blkdom: int) -> bool:
    for name in DISK_GUESTS:
        fe = f"/local/domain/{s.list()[name]['domid']}/device/vbd/{VBD}"
        if s.read(f"{fe}/backend-id") != str(blkdom):
            return False
        if s.read(f"{fe}/state") not in ("3", "4"):
            return False
    return True


def _reconnects(s: System) -> dict[str, float]:
    return {name: s.counters(name).get("reconnects", 0) for name in DISK_GUESTS}


def _carry_on(s: System, before: dict[str, float]) -> None:
    """Each guest lost at least one more connection since ``before`` and works again."""
    for name in DISK_GUESTS:
        ops = s.counters(name)["ops"]
        s.wait_for(lambda: s.counters(name).get("reconnects", 0) > before[name],
                   timeout=60, what=f"{name} to reconnect")
        s.wait_for(lambda: s.counters(name)["ops"] > ops + 200, timeout=60,
                   what=f"{name} to carry on")
        c = s.counters(name)
        assert c["errors"] == 0, (name, c)
        assert c["verify_failures"] == 0, (name, c)


def test_blkdom_killed_mid_handshake(system: System) -> None:
    s = system
    for name in DISK_GUESTS:
        s.wait_for(lambda: s.counters(name).get("ops", 0) >= 300, what=f"{name} under load")

    # 1. Kill the re-created blkdom the moment it exists.
    first = s.list()["blkdom"]["domid"]
    before = _reconnects(s)
    s.kill("blkdom", signal.SIGKILL)
    second = _new_blkdom(s, first)
    s.kill("blkdom", signal.SIGKILL)
    third = _new_blkdom(s, second["domid"])
    _carry_on(s, before)

    # 2. Let the next one get as far as the guests answering, freeze it, kill it.
    before = _reconnects(s)
    s.kill("blkdom", signal.SIGKILL)
    fourth = _new_blkdom(s, third["domid"])
    s.wait_for(lambda: _frontends_answered(s, fourth["domid"]), timeout=60,
               what="the guests to answer the new blkdom")
    s.xl("pause", "blkdom")
    s.kill("blkdom", signal.SIGKILL)
    fifth = _new_blkdom(s, fourth["domid"])
    _carry_on(s, before)
    assert s.list()["blkdom"]["domid"] == fifth["domid"]
