"""Integration: a hostile guest attacks netback through its tx ring.

Its malformed tx requests (a grant it never made, a fragment crossing its
page, a one-slot packet larger than a page, a runt) each get NETIF_RSP_ERROR
and a good packet after them is answered OKAY; its impossible producer index
gets its vif disconnected (backend state Closed, an `error` node naming why).
netdom is not restarted, and two other guests on the same bridge keep pinging
and exchanging checked UDP without a single error.
"""

from __future__ import annotations

import pytest

from ipc.netif import NETIF_RSP_ERROR, NETIF_RSP_OKAY
from tests.blocksys import System, running
from tests.netsys import NETDOM, net_guest, pair

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def system():
    yield from running({"netdom": NETDOM, **pair("net"),
                        "attacker": net_guest("attacker", 66, "none",
                                              kernel="tests.kernels.nethostile")})


def test_hostile_vif_ring_entries(system: System) -> None:
    s = system
    doms = s.list()
    attacker, nd = doms["attacker"]["domid"], doms["netdom"]
    base = f"/local/domain/{attacker}/data/hostile"
    s.wait_for(lambda: s.read(f"{base}/done") == "1", what="the attack to finish")
    for case in ("bad_gref", "crosses_page", "oversize_slot", "runt"):
        assert s.read(f"{base}/{case}") == str(NETIF_RSP_ERROR), case
    assert s.read(f"{base}/still_works") == str(NETIF_RSP_OKAY)
    be = f"/local/domain/{nd['domid']}/backend/vif/{attacker}/0"
    s.wait_for(lambda: s.read(f"{be}/state") == "6", what="the attacker's vif to be closed")
    assert "producer index" in s.read(f"{be}/error")
    before = {n: s.counters(n) for n in ("guest1", "guest2")}
    for name in ("guest1", "guest2"):
        s.wait_for(lambda: s.counters(name)["udp_rx"] > before[name]["udp_rx"] + 200,
                   what=f"{name} to carry on")
        c = s.counters(name)
        assert c["errors"] == 0 and c["verify_failures"] == 0 and c["reconnects"] == 0, c
    now = s.list()["netdom"]
    assert (now["domid"], now["pid"]) == (nd["domid"], nd["pid"])
    assert s.read("/local/domain/0/watchdog/netdom/restarts") is None
