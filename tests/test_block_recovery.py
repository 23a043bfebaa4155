"""Integration: the storage driver domain dies or hangs under load; nothing is lost.

Two guests run the `disk` workload (which checks every acknowledged write)
against blkdom; a third guest has no disk.  blkdom is SIGKILLed from outside
(repeatedly), or SIGSTOPped so that only the heartbeat watchdog can notice.
Each time: a new blkdom is built, both disk guests reconnect and carry on
with zero errors and zero verification failures (a full sweep of every
acknowledged block runs after each reconnect), and the third guest is never
touched.  The same holds with O_DIRECT disks, where blkback has Linux AIO
transfers in flight (answered from their completions) when it is killed.
"""

from __future__ import annotations

import os
import signal

import pytest

from tests.blocksys import BLKDOM, System, guest, running

pytestmark = pytest.mark.timeout(300)

DISK_GUESTS = ("guest1", "guest2")


@pytest.fixture
def system():
    yield from running({"blkdom": BLKDOM, "guest1": guest("guest1"), "guest2": guest("guest2"),
                        "bystander": guest("bystander", workload="heartbeat", disk=False)},
                       watchdog_timeout=1.5)


def _under_load(s: System) -> dict[str, float]:
    ops = {}
    for name in DISK_GUESTS:
        s.wait_for(lambda: s.counters(name).get("ops", 0) >= 500, what=f"{name} under load")
        ops[name] = s.counters(name)["ops"]
    return ops


def _recovered(s: System, old_blkdom: int, reconnects: int, ops_before: dict[str, float]) -> None:
    s.wait_for(lambda: s.list().get("blkdom", {}).get("domid", old_blkdom) != old_blkdom
               and "d" not in s.list()["blkdom"]["state"], what="a new blkdom")
    for name in DISK_GUESTS:
        s.wait_for(lambda: s.counters(name).get("reconnects", 0) >= reconnects,
                   what=f"{name} to reconnect")
        s.wait_for(lambda: s.counters(name).get("sweeps", 0) >= reconnects,
                   what=f"{name}'s post-reconnect verification sweep")
        s.wait_for(lambda: s.counters(name)["ops"] > ops_before[name] + 200,
                   what=f"{name} to carry on")
        c = s.counters(name)
        assert c["errors"] == 0, (name, c)
        assert c["verify_failures"] == 0, (name, c)


def test_sigkill_blkdom_repeatedly(system: System) -> None:
    s = system
    bystander = s.list()["bystander"]
    for round_ in range(1, 4):
        ops = _under_load(s)
        old = s.list()["blkdom"]
        s.kill("blkdom", signal.SIGKILL)
        _recovered(s, old["domid"], round_, ops)
        assert s.read("/local/domain/0/watchdog/blkdom/restarts") == str(round_)
    now = s.list()["bystander"]
    assert (now["domid"], now["pid"]) == (bystander["domid"], bystander["pid"])
    s.wait_for(lambda: s.counters("bystander").get("ops", 0) >= 2, what="bystander alive")


def test_hung_blkdom_is_caught_by_the_watchdog(system: System) -> None:
    s = system
    ops = _under_load(s)
    old = s.list()["blkdom"]
    s.kill("blkdom", signal.SIGSTOP)
    _recovered(s, old["domid"], 1, ops)
    assert s.read("/local/domain/0/watchdog/blkdom/hangs") == "1"
    s.wait_for(lambda: old["pid"] not in [d["pid"] for d in s.list().values()],
               what="the hung blkdom to be destroyed")


@pytest.fixture
def direct_system():
    yield from running({"blkdom": BLKDOM, **{g: guest(g, direct=True) for g in DISK_GUESTS}},
                       watchdog_timeout=1.5)


def test_sigkill_blkdom_serving_o_direct(direct_system: System) -> None:
    """Killed with AIO transfers in flight: the kernel finishes them before the
    process is gone (so before a new blkdom exists), nothing was answered
    before its transfer completed, and the frontends replay the rest."""
    s = direct_system
    ops = _under_load(s)
    with open(os.path.join(s.run_dir, "logs", "blkdom.log")) as f:
        served = f.read()
    if served.count("O_DIRECT)") < len(DISK_GUESTS):
        pytest.skip("this file system refuses O_DIRECT: blkback fell back to the page cache")
    for round_ in range(1, 3):
        old = s.list()["blkdom"]
        s.kill("blkdom", signal.SIGKILL)
        _recovered(s, old["domid"], round_, ops)
        ops = _under_load(s)
