"""Integration: device supervision and the network driver domain under every fault kind.

One system for the module (blkdom and netdom; guest1 and guest2 running the
verifying disk workload and a checked UDP stream to each other; a bystander
with no device).  Each case injects one fault and requires that it ends (or
the domain or device it killed is restarted), that every guest completes
block I/O *and* receives checked UDP datagrams again, that the outcome is
the one expected, and that dom0, the hypervisor, the bystander and the other
driver domain are untouched.  At the end every guest sweeps its disk: no
acknowledged write may be lost and no datagram may arrive corrupted (UDP may
lose datagrams while a vif reconnects; those are counted, not failures).

What is new here, beyond tests/test_faults_block.py:
- a backend task that dies by an exception the kernel survives
  (``crash/exception``, ``crash/net-exception``) is restarted by the driver
  domain's BackendWatcher with a fresh handshake;
- a ring-only hang that never ends (``hang/rings-forever``,
  ``hang/net-rings-forever``) is caught by the watcher's progress check;
- netback's own fault points (tx path, tx responses, producer index) and the
  domain-wide kinds aimed at netdom.
"""

from __future__ import annotations

import pytest

from domains.dom0.faults.pytest_plugin import fault_configs, fault_system  # noqa: F401  (fixtures)

pytestmark = pytest.mark.timeout(500)

OK = {"recovered_transparently"}

CASES = [
    ("crash", "exception", "blkdom", {}),
    ("hang", "rings-forever", "blkdom", {}),
    ("crash", "net-exception", "netdom", {}),
    ("crash", "net-oops", "netdom", {}),
    ("crash", "sigkill", "netdom", {}),
    ("crash", "shutdown", "netdom", {}),
    ("hang", "sigstop", "netdom", {}),
    ("hang", "net-spin", "netdom", {}),
    ("hang", "net-rings", "netdom", {"duration": 0.5}),
    ("hang", "net-rings-forever", "netdom", {}),
    ("slow", "net-response", "netdom", {"delay": 0.05, "duration": 0.5}),
    ("corrupt", "net-status", "netdom", {"count": 2}),
    ("corrupt", "net-prod", "netdom", {}),
    ("events", "drop", "netdom", {"prob": 1.0, "duration": 0.5}),
    ("events", "duplicate", "netdom", {"duration": 0.5}),
    ("events", "delay", "netdom", {"delay": 0.05, "duration": 0.5}),
    ("control", "xs-delete", "netdom", {}),
    ("control", "xs-rewrite", "netdom", {}),
]


@pytest.mark.parametrize("kind,mode,target,opts", CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in CASES])
def test_fault_is_detected_and_recovered(fault_system, kind, mode, target, opts) -> None:
    h = fault_system
    assert h.checker.net_guests, "the default fault system has networked guests"
    inj = h.inject(kind, target, mode=mode, seed=5, **opts)
    assert h.injector.wait_armed(inj), f"{target} never acknowledged {inj.id}"
    out = h.recover(inj, timeout=30)
    assert out.outcome in OK, (kind, mode, out)
    h.assert_isolated(target)


def test_a_device_restart_is_published(fault_system) -> None:
    """After crash/exception the vbd's directory shows how often it was restarted."""
    h = fault_system
    inj = h.inject("crash", "blkdom", mode="exception", seed=9)
    assert h.recover(inj, timeout=30).outcome in OK
    fi = h.injector
    domid = fi.find("blkdom")["domid"]
    counts = [fi.xs.read_or(f"{p}/restarts") for p in fi.backends(domid, "vbd")]
    assert any(c and int(c) >= 1 for c in counts), counts


def test_network_checker_counts(fault_system) -> None:
    net = h_net = fault_system.checker.network()
    assert net["udp_tx"] > 0 and net["udp_rx"] > 0, h_net
    assert net["udp_corrupted"] == 0, net


def test_zz_no_acknowledged_write_was_lost(fault_system) -> None:
    """The final read-back sweep, as a test of its own so a loss is reported, not hidden."""
    fault_system.assert_nothing_lost()
