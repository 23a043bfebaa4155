"""Integration: the network driver domain dies or hangs under load; the guests carry on.

guest1 and guest2 run the `net` workload (pings plus a sequence-checked UDP
stream) through netdom.  netdom is SIGKILLed from outside, twice, or
SIGSTOPped so that only dom0's heartbeat watchdog can notice.  Each time a new
netdom is built, both netfronts reconnect to it (replaying the packets they had
in flight), and the guests see delay, not errors: no ping gives up, no datagram
is corrupted.  UDP loss is counted, not forbidden: datagrams the dead netdom
had already taken off a tx ring, and those that reach the new bridge before the
other guest's vif is back on it, are gone (printed, so the figure is visible).

A second system checks isolation between device types: a guest that uses only
its disk sees nothing when netdom is killed, and guests that use only the
network see nothing when blkdom is killed.
"""

from __future__ import annotations

import signal

import pytest

from tests.blocksys import BLKDOM, System, guest, running
from tests.netsys import NETDOM, net_guest, pair

pytestmark = pytest.mark.timeout(300)

NET_GUESTS = ("guest1", "guest2")


@pytest.fixture
def system():
    yield from running({"netdom": NETDOM, **pair("net")}, watchdog_timeout=1.5)


def _under_load(s: System) -> dict[str, dict]:
    out = {}
    for name in NET_GUESTS:
        s.wait_for(lambda: s.counters(name).get("udp_rx", 0) >= 200, what=f"{name} under load")
        out[name] = s.counters(name)
    return out


def _recovered(s: System, old_domid: int, reconnects: int, before: dict[str, dict]) -> None:
    s.wait_for(lambda: s.list().get("netdom", {}).get("domid", old_domid) != old_domid
               and "d" not in s.list()["netdom"]["state"], what="a new netdom")
    for name in NET_GUESTS:
        s.wait_for(lambda: s.counters(name).get("reconnects", 0) >= reconnects,
                   what=f"{name} to reconnect")
        s.wait_for(lambda: s.counters(name)["ping_ok"] > before[name]["ping_ok"] + 20
                   and s.counters(name)["udp_rx"] > before[name]["udp_rx"] + 200,
                   what=f"{name} to carry on")
        c = s.counters(name)
        assert c["errors"] == 0, (name, c)
        assert c["verify_failures"] == 0, (name, c)
        print(f"{name} after {reconnects} restart(s): udp_lost={c['udp_lost']:.0f} "
              f"udp_dup={c['udp_dup']:.0f} udp_reordered={c['udp_reordered']:.0f} "
              f"ping_timeouts={c['ping_timeouts']:.0f}")


def test_sigkill_netdom_under_load(system: System) -> None:
    s = system
    for round_ in (1, 2):
        before = _under_load(s)
        old = s.list()["netdom"]
        s.kill("netdom", signal.SIGKILL)
        _recovered(s, old["domid"], round_, before)
        assert s.read("/local/domain/0/watchdog/netdom/restarts") == str(round_)


def test_hung_netdom_is_caught_by_the_watchdog(system: System) -> None:
    s = system
    before = _under_load(s)
    old = s.list()["netdom"]
    s.kill("netdom", signal.SIGSTOP)
    _recovered(s, old["domid"], 1, before)
    assert s.read("/local/domain/0/watchdog/netdom/hangs") == "1"
    s.wait_for(lambda: old["pid"] not in [d["pid"] for d in s.list().values()],
               what="the hung netdom to be destroyed")


@pytest.fixture
def mixed():
    yield from running({"blkdom": BLKDOM, "netdom": NETDOM,
                        "diskonly": guest("diskonly"), **pair("net")}, watchdog_timeout=1.5)


def test_one_device_type_does_not_disturb_the_other(mixed: System) -> None:
    s = mixed
    s.wait_for(lambda: s.counters("diskonly").get("ops", 0) >= 300, what="diskonly under load")
    before = _under_load(s)
    disk_before = s.counters("diskonly")
    # netdom dies: the disk-only guest sees nothing at all.
    old = s.list()["netdom"]
    s.kill("netdom", signal.SIGKILL)
    _recovered(s, old["domid"], 1, before)
    d = s.counters("diskonly")
    assert d["ops"] > disk_before["ops"]
    assert d["errors"] == 0 and d["verify_failures"] == 0 and d.get("reconnects", 0) == 0, d
    # blkdom dies: the network-only guests see nothing at all.
    net_before = {n: s.counters(n) for n in NET_GUESTS}
    old_blk = s.list()["blkdom"]
    s.kill("blkdom", signal.SIGKILL)
    s.wait_for(lambda: s.counters("diskonly").get("reconnects", 0) >= 1,
               what="diskonly to reconnect to the new blkdom")
    s.wait_for(lambda: s.counters("diskonly")["ops"] > d["ops"] + 200, what="diskonly to carry on")
    assert s.list()["blkdom"]["domid"] != old_blk["domid"]
    for name in NET_GUESTS:
        s.wait_for(lambda: s.counters(name)["udp_rx"] > net_before[name]["udp_rx"] + 200,
                   what=f"{name} to carry on")
        c = s.counters(name)
        assert c["reconnects"] == 1 and c["errors"] == 0 and c["verify_failures"] == 0, (name, c)
        assert c["udp_lost"] == net_before[name]["udp_lost"], (name, c)
        assert c["udp_dup"] == net_before[name]["udp_dup"], (name, c)
