"""The learning bridge xenbr0: learning, forwarding, flooding, no hairpin, ageing."""

from __future__ import annotations

import pytest

from domains.driverdom.bridge import Bridge, BridgeError

BCAST = b"\xff" * 6


def mac(n: int) -> bytes:
    return bytes([0x00, 0x16, 0x3E, 0, 0, n])


def frame(dst: bytes, src: bytes, body: bytes = b"x" * 46) -> bytes:
    return dst + src + b"\x08\x00" + body


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def br():
    clock = Clock()
    bridge = Bridge("xenbr0", ageing_time=300, clock=clock)
    seen: dict[str, list[bytes]] = {}
    for name in ("vif1.0", "vif2.0", "vif3.0"):
        seen[name] = []
        bridge.add_port(name, seen[name].append)
    return bridge, seen, clock


def test_unknown_unicast_and_broadcast_flood_but_not_back(br):
    bridge, seen, _ = br
    f = frame(mac(9), mac(1))
    bridge.input("vif1.0", f)
    assert seen == {"vif1.0": [], "vif2.0": [f], "vif3.0": [f]}
    b = frame(BCAST, mac(2))
    bridge.input("vif2.0", b)
    assert seen["vif1.0"] == [b] and seen["vif3.0"] == [f, b] and seen["vif2.0"] == [f]
    assert bridge.stats.flooded == 2


def test_learnt_mac_is_forwarded_to_one_port(br):
    bridge, seen, _ = br
    bridge.input("vif1.0", frame(BCAST, mac(1)))
    for s in seen.values():
        s.clear()
    f = frame(mac(1), mac(3))
    bridge.input("vif3.0", f)
    assert seen == {"vif1.0": [f], "vif2.0": [], "vif3.0": []}
    assert bridge.lookup(mac(1)) == "vif1.0" and bridge.lookup(mac(3)) == "vif3.0"
    assert bridge.stats.forwarded == 1


def test_destination_on_the_ingress_port_is_filtered(br):
    bridge, seen, _ = br
    bridge.input("vif1.0", frame(BCAST, mac(1)))
    for s in seen.values():
        s.clear()
    bridge.input("vif1.0", frame(mac(1), mac(7)))      # both behind vif1.0
    assert seen == {"vif1.0": [], "vif2.0": [], "vif3.0": []}
    assert bridge.stats.filtered == 1


def test_a_moved_mac_is_relearnt(br):
    bridge, _seen, _ = br
    bridge.input("vif1.0", frame(BCAST, mac(5)))
    bridge.input("vif2.0", frame(BCAST, mac(5)))
    assert bridge.lookup(mac(5)) == "vif2.0"


def test_entries_age_out_and_then_flood_again(br):
    bridge, seen, clock = br
    bridge.input("vif1.0", frame(BCAST, mac(1)))
    clock.now += 299
    assert bridge.lookup(mac(1)) == "vif1.0"
    clock.now += 2
    assert bridge.lookup(mac(1)) is None
    for s in seen.values():
        s.clear()
    f = frame(mac(1), mac(2))
    bridge.input("vif2.0", f)
    assert seen["vif1.0"] == [f] and seen["vif3.0"] == [f]    # flooded, not forwarded
    clock.now += 1000
    assert bridge.age() == 1                                # mac(2) went; mac(1) already gone
    assert bridge.fdb == {}


def test_multicast_source_is_never_learnt_and_runts_are_dropped(br):
    bridge, seen, _ = br
    bridge.input("vif1.0", frame(mac(2), b"\x01\x00\x5e\x00\x00\x01"))
    assert bridge.fdb == {}
    bridge.input("vif1.0", b"short")
    assert bridge.stats.malformed == 1
    assert seen["vif2.0"] == [frame(mac(2), b"\x01\x00\x5e\x00\x00\x01")]


def test_removing_a_port_forgets_its_macs_and_bad_ports_are_refused(br):
    bridge, seen, _ = br
    bridge.input("vif1.0", frame(BCAST, mac(1)))
    bridge.remove_port("vif1.0")
    assert bridge.lookup(mac(1)) is None
    with pytest.raises(BridgeError, match="no port named 'vif1.0'"):
        bridge.remove_port("vif1.0")
    with pytest.raises(BridgeError, match="already attached"):
        bridge.add_port("vif2.0", print)
    bridge.input("vif1.0", frame(BCAST, mac(1)))          # a frame from a port now gone
    assert bridge.stats.unknown_port == 1


def test_a_failing_port_does_not_stop_the_others(br):
    bridge, seen, _ = br

    def broken(_frame: bytes) -> None:
        raise OSError("device gone")
    port = bridge.add_port("vif4.0", broken)
    f = frame(BCAST, mac(1))
    bridge.input("vif1.0", f)
    assert seen["vif2.0"] == [f] and seen["vif3.0"] == [f]
    assert port.tx_errors == 1
