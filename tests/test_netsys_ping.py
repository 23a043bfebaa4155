"""Integration: two guests talk through the network driver domain.

A real system (hypervisor, dom0, netdom, two guests as processes): the guests
ARP, ping each other and exchange a UDP stream whose every datagram carries a
sequence number and a body the receiver checks, all through netfront, netback
and netdom's bridge.  Also: `xl network-list`, `network-attach` and
`network-detach` write and remove the vif directories with Xen's keys.
"""

from __future__ import annotations

import pytest

from tests.blocksys import System, running
from tests.netsys import NETDOM, pair

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def system():
    yield from running({"netdom": NETDOM, **pair("net")})


def test_guests_ping_each_other_and_udp_arrives_in_order(system: System) -> None:
    s = system
    for name in ("guest1", "guest2"):
        s.wait_for(lambda: s.counters(name).get("ping_ok", 0) >= 20, what=f"{name} pinging")
        s.wait_for(lambda: s.counters(name).get("udp_rx", 0) >= 300, what=f"{name} receiving UDP")
    for name in ("guest1", "guest2"):
        c = s.counters(name)
        assert c["errors"] == 0 and c["verify_failures"] == 0, (name, c)
        assert c["udp_lost"] == 0 and c["udp_dup"] == 0 and c["udp_reordered"] == 0, (name, c)
        assert c["reconnects"] == 0, (name, c)
        assert 0 < c["rtt_last_us"]


def test_network_list_attach_detach(system: System) -> None:
    s = system
    doms = s.list()
    g1, nd = doms["guest1"]["domid"], doms["netdom"]["domid"]
    out = s.xl("network-list", "guest1").splitlines()
    assert out[0].startswith("Idx") and len(out) == 2
    assert "00:16:3e:00:01:01" in out[1] and f"/local/domain/{nd}/backend/vif/{g1}/0" in out[1]
    s.wait_for(lambda: s.read(f"/local/domain/{g1}/device/vif/0/state") == "4",
               what="guest1's vif connected")
    be = f"/local/domain/{nd}/backend/vif/{g1}/0"
    for key, value in (("frontend", f"/local/domain/{g1}/device/vif/0"),
                       ("frontend-id", str(g1)), ("handle", "0"), ("bridge", "xenbr0"),
                       ("mac", "00:16:3e:00:01:01"), ("ip", "10.0.0.1/24"), ("state", "4"),
                       ("feature-rx-copy", "1")):
        assert s.read(f"{be}/{key}") == value, key
    s.xl("network-attach", "guest1", "backend=netdom,bridge=xenbr1,mac=00:16:3e:aa:bb:cc")
    be1 = f"/local/domain/{nd}/backend/vif/{g1}/1"
    fe1 = f"/local/domain/{g1}/device/vif/1"
    assert s.read(f"{fe1}/mac") == "00:16:3e:aa:bb:cc"
    assert s.read(f"{fe1}/backend") == be1 and s.read(f"{fe1}/backend-id") == str(nd)
    # netback offers the device (InitWait); the workload uses only vif 0.
    s.wait_for(lambda: s.read(f"{be1}/state") == "2", what="netback to offer vif 1")
    assert len(s.xl("network-list", "guest1").splitlines()) == 3
    s.xl("network-detach", "guest1", "1")
    assert s.read(f"{fe1}/mac") is None and s.read(f"{be1}/state") is None
    with pytest.raises(RuntimeError, match="no vif"):
        s.xl("network-detach", "guest1", "7")
    with pytest.raises(RuntimeError, match="unknown vif parameter"):
        s.xl("network-attach", "guest1", "backend=netdom,colour=blue")
    with pytest.raises(RuntimeError, match="does not exist"):
        s.xl("network-attach", "guest1", "backend=nosuchdom")
    # None of that disturbed the running vif.
    before = s.counters("guest1")["ping_ok"]
    s.wait_for(lambda: s.counters("guest1")["ping_ok"] > before + 10, what="guest1 to carry on")
    assert s.counters("guest1")["reconnects"] == 0
