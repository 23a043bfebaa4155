"""Integration: a hostile guest attacks blkback through its ring.

The attacker's malformed requests get BLKIF_RSP_ERROR / EOPNOTSUPP; its
impossible producer index gets its device disconnected (backend state Closed,
an `error` node naming why).  blkdom is not restarted, and another guest on the
same blkdom keeps doing verified I/O without a single error.
"""

from __future__ import annotations

import pytest

from ipc import blkif
from tests.blocksys import BLKDOM, System, guest, running

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def system():
    yield from running({"blkdom": BLKDOM,
                        "attacker": guest("attacker", kernel="tests.kernels.blkhostile",
                                          workload="none"),
                        "guest2": guest("guest2")})


def test_hostile_ring_entries(system: System) -> None:
    s = system
    doms = s.list()
    attacker, bd = doms["attacker"]["domid"], doms["blkdom"]
    base = f"/local/domain/{attacker}/data/hostile"
    s.wait_for(lambda: s.read(f"{base}/done") == "1", what="the attack to finish")
    for case in ("bad_gref", "beyond_disk", "bad_segment", "too_many_segments"):
        assert s.read(f"{base}/{case}") == str(blkif.BLKIF_RSP_ERROR), case
    assert s.read(f"{base}/unknown_op") == str(blkif.BLKIF_RSP_EOPNOTSUPP)
    assert s.read(f"{base}/still_works") == "1"
    be = f"/local/domain/{bd['domid']}/backend/vbd/{attacker}/51712"
    # blkback closed the device with an error naming the broken index; as in
    # Linux, it is offered again once the attacker's frontend starts over.
    s.wait_for(lambda: "producer index" in (s.read(f"{be}/error") or ""),
               what="the attacker's device to be closed with an error")
    before = s.counters("guest2")["ops"]
    s.wait_for(lambda: s.counters("guest2")["ops"] > before + 500, what="guest2 to carry on")
    c = s.counters("guest2")
    assert c["errors"] == 0 and c["verify_failures"] == 0 and c.get("reconnects", 0) == 0
    now = s.list()["blkdom"]
    assert (now["domid"], now["pid"]) == (bd["domid"], bd["pid"])
    assert s.read("/local/domain/0/watchdog/blkdom/restarts") is None
