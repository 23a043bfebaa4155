"""Integration: every fault kind, injected into a real system, detected and recovered from.

One system for the module (blkdom, guest1 and guest2 running the verifying disk
workload, a bystander guest with no disk), faults in sequence.  For each: the
fault ends (or the domain it killed is re-created), every disk guest completes
I/O again within a bounded time, the outcome is the one the catalogue
expects, and dom0, the hypervisor and the bystander are untouched.  At the end
of the module every guest sweeps its whole disk and nothing may be lost
(the plugin's fault_system fixture checks that).
"""

from __future__ import annotations

import pytest

from domains.dom0.faults.pytest_plugin import fault_configs, fault_system  # noqa: F401  (fixtures)

pytestmark = pytest.mark.timeout(400)

OK = {"recovered_transparently"}
VISIBLE = {"recovered_with_guest_visible_error"}

# (kind, mode, target, options, acceptable outcomes)
CASES = [
    ("crash", "sigkill", "blkdom", {}, OK),
    ("crash", "oops", "blkdom", {}, OK),
    ("crash", "shutdown", "blkdom", {}, OK),
    ("hang", "sigstop", "blkdom", {}, OK),
    ("hang", "spin", "blkdom", {}, OK),
    ("hang", "rings", "blkdom", {"duration": 0.5}, OK),
    ("slow", "response", "blkdom", {"delay": 0.05, "duration": 0.5}, OK),
    ("corrupt", "op", "blkdom", {}, OK),
    ("corrupt", "status", "blkdom", {"count": 2}, VISIBLE),
    ("corrupt", "garbage", "guest2", {"count": 2}, VISIBLE),
    ("corrupt", "bad-gref", "guest2", {"count": 2}, VISIBLE),
    ("corrupt", "bad-sector", "guest2", {"count": 2}, VISIBLE),
    ("events", "drop", "blkdom", {"prob": 1.0, "duration": 0.5}, OK),
    ("events", "duplicate", "blkdom", {"duration": 0.5}, OK),
    ("events", "delay", "blkdom", {"delay": 0.05, "duration": 0.5}, OK),
    ("control", "hypercall-corrupt", "blkdom", {"prob": 1.0, "duration": 0.5}, OK),
    ("control", "hypercall-drop", "blkdom", {"prob": 1.0, "duration": 0.5}, OK),
    ("control", "xs-delete", "blkdom", {}, OK),
    ("control", "xs-rewrite", "blkdom", {}, OK),
    ("resources", "grants", "blkdom", {"duration": 0.5}, OK),
    ("resources", "evtchn", "blkdom", {"duration": 0.5}, OK),
    ("resources", "grants", "guest1", {"duration": 0.5}, OK),
    ("resources", "balloon", "guest1", {"fraction": 0.5, "duration": 0.5}, OK),
]


@pytest.mark.parametrize("kind,mode,target,opts,expected", CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in CASES])
def test_fault_is_detected_and_recovered(fault_system, kind, mode, target, opts, expected) -> None:
    h = fault_system
    inj = h.inject(kind, target, mode=mode, seed=11, **opts)
    assert h.injector.wait_armed(inj), f"{target} never acknowledged {inj.id}"
    out = h.recover(inj, timeout=30)
    assert out.outcome in expected, (kind, mode, out)
    assert out.recovery_ms is not None and out.recovery_ms < 30000
    h.assert_isolated(target)


def test_hostile_guest_ring_is_contained_and_a_driver_restart_heals_it(fault_system) -> None:
    """guest2 pushes its producer index past the ring.  blkback refuses that ring
    (disconnecting the device) and nothing else stops: blkdom keeps its domid,
    guest1 carries on, dom0 and the bystander are untouched.  (guest2's own
    frontend may also trip over its lie and crash: a hostile guest may hurt
    itself.)  Restarting blkdom then brings every guest's disk back."""
    import time
    h = fault_system
    blkdom = h.injector.find("blkdom")["domid"]
    inj = h.inject("corrupt", "guest2", mode="guest-prod", seed=3)
    h.injector.wait_armed(inj)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not h.injector.agent_status(inj).startswith("done") \
            and h.injector.domains().get("guest2", {}).get("domid") == inj.domid:
        time.sleep(0.02)
    h.injector.clear(inj)
    g1 = h.checker.probes()["guest1"]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and h.checker.probes()["guest1"][0] <= g1[0] + 50:
        time.sleep(0.05)
    assert h.checker.probes()["guest1"][0] > g1[0] + 50, "guest1 stopped with guest2's device"
    assert h.injector.find("blkdom")["domid"] == blkdom, "a guest's bad ring took blkdom down"
    h.assert_isolated("guest2")
    h.checker.guest_identity_changes()          # guest2 may have restarted itself
    kill = h.inject("crash", "blkdom", mode="sigkill")
    out = h.recover(kill, timeout=30)
    assert out.outcome in OK, out
