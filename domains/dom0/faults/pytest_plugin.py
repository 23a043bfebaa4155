"""A pytest plugin for driver-isolation tests: boot a system, inject, check.

Use it with ``pytest -p domains.dom0.faults.pytest_plugin`` or by importing
the fixtures into a test module (``from domains.dom0.faults.pytest_plugin
import fault_system, fault_configs``).  Fixtures:

``fault_configs``  (module scope) the xl.cfg texts to boot, by name; the
                   default system is blkdom, guest1 and guest2 running the
                   verifying disk workload, and a bystander guest without a
                   disk.  Override it in a test module to boot your own.
``fault_system``   (module scope) a :class:`FaultHarness` on that system,
                   booted in a temporary run directory with the workloads
                   warm.  At the end of the module every guest sweeps its disk,
                   nothing may have been lost, and the system is shut down
                   with a check that no process or socket survives.

A worked example::

    from domains.dom0.faults.pytest_plugin import fault_system, fault_configs

    def test_blkdom_survives_a_kill(fault_system):
        inj = fault_system.inject("crash", "blkdom", mode="sigkill")
        out = fault_system.recover(inj)
        assert out.outcome == "recovered_transparently"
        fault_system.assert_isolated("blkdom")
"""

from __future__ import annotations

import pytest

from domains.dom0.faults.checker import Checker, Outcome
from domains.dom0.faults.inject import FaultInjector, Injection
from domains.dom0.faults.system import RunningSystem, default_configs


class FaultHarness:
    """What a test holds: inject faults, wait for recovery, check isolation and data."""

    def __init__(self, system: RunningSystem) -> None:
        self.system = system
        self.injector = FaultInjector(system.run_dir)
        self.checker = Checker(self.injector, system.run_dir)
        system.remember(self.injector.domains())
        self._before: dict = {}
        self.swept = False   # the final read-back sweep has run (a test may run it itself)

    @property
    def run_dir(self) -> str:
        return self.system.run_dir

    def inject(self, kind: str, domain: str, mode: str | None = None, seed: int = 0,
               **params) -> Injection:
        self._before = self.checker.probes()
        inj = self.injector.inject(kind, domain, mode, seed=seed, **params)
        self.system.remember(self.injector.domains())
        return inj

    def recover(self, inj: Injection, timeout: float = 20.0) -> Outcome:
        """Wait until the fault is over and every disk guest completes I/O again."""
        out = self.checker.await_recovery(inj, self._before, timeout)
        self.system.remember(self.injector.domains())
        return out

    def assert_isolated(self, target: str) -> None:
        """dom0, the hypervisor and every domain the fault was not aimed at are untouched."""
        problems = self.checker.isolation(target)
        assert not problems, problems

    def assert_nothing_lost(self) -> dict:
        """Full read-back sweep in every guest; no lost write, no corrupted read."""
        self.swept = True
        findings = self.checker.final()
        assert findings["lost_writes"] == 0 and findings["corrupted_reads"] == 0, findings
        return findings

    def close(self) -> None:
        self.injector.close()


@pytest.fixture(scope="module")
def fault_configs() -> dict[str, str]:
    return default_configs()


@pytest.fixture(scope="module")
def fault_system(fault_configs):
    system = RunningSystem(configs=fault_configs).up()
    harness = None
    try:
        harness = FaultHarness(system)
        harness.checker.wait_warm()
        yield harness
        if not harness.swept:
            harness.assert_nothing_lost()
    finally:
        if harness is not None:
            harness.close()
        leftovers = system.down(check=False)
        system.cleanup()
        assert not leftovers, leftovers
