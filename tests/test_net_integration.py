"""Integration: three real processes exchange frames through real shared rings.

A driver domain (two netbacks on bridge xenbr0) and two guests (netfront +
the guest network stack), each a forked process, wired with memfd pages and
socketpair event channels by the local stand-in (tests/test_net_localxen.py).
Guest 1 pings guest 2 and runs UDP echo through it, with datagrams from tiny
to several pages (multi-slot on tx and rx).  Every process must exit cleanly
and report no protocol error.
"""

from __future__ import annotations

import pytest

from bench.network_bench import GUESTS, NetTopology
from tests.hvharness import descendants
import os

pytestmark = pytest.mark.timeout(120)


def test_ping_and_udp_between_guests_through_the_driver_domain():
    before = set(descendants(os.getpid()))
    with NetTopology({1: "serve", 2: "serve"}) as net:
        got = net.ask(1, {"op": "ping", "ip": GUESTS[2][1], "count": 20}, "rtts")
        assert len(got["rtts"]) == 20 and all(r > 0 for r in got["rtts"])
        back = net.ask(2, {"op": "ping", "ip": GUESTS[1][1], "count": 3}, "rtts")
        assert len(back["rtts"]) == 3
        sizes = [4, 18, 100, 1400, 1472, 4000, 4096, 9000, 30000, 65000]
        echo = net.ask(1, {"op": "udp_echo", "ip": GUESTS[2][1], "sizes": sizes * 3}, "echoed")
        assert echo == {"echoed": 30, "bad": 0}
        final = net.stop()
    assert final[2]["icmp_answered"] == 20 and final[1]["icmp_answered"] == 3
    for d in (1, 2):
        nf = final[d]["netfront"]
        assert nf["tx_errors"] == 0 and nf["rx_errors"] == 0 and nf["reasons"] == []
        assert final[d]["stack"]["errors"] == []
    for vif in ("vif1.0", "vif2.0"):
        stats = final[0][vif]
        assert stats["error"] is None and stats["tx_errors"] == 0 and stats["rx_dropped"] == 0
    assert set(descendants(os.getpid())) <= before        # nobody left behind
