"""Integration: a short campaign passes and reports; a campaign against a
deliberately broken backend (one that acknowledges writes without doing them)
is caught by the checker and fails."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.timeout(300)


def _campaign(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(ROOT, "run.py"), "campaign", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=240)


def test_short_campaign_recovers_everything_and_writes_a_report(tmp_path) -> None:
    r = _campaign("--faults", "24", "--seed", "7", "--report", str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["faults_injected"] == 24
    for key in ("recovered_transparently", "recovered_with_guest_visible_error", "guest_crashes",
                "unrecovered", "lost_writes", "corrupted_reads", "unaffected_domain_disruptions",
                "hypervisor_or_dom0_failures"):
        assert key in report
    assert report["lost_writes"] == report["corrupted_reads"] == report["guest_crashes"] == 0
    assert report["recovery_ms"]["p50"] is not None and report["recovery_ms"]["max"] is not None
    assert sum(report["per_kind"].values()) == 24
    assert (tmp_path / "recovery.png").read_bytes().startswith(b"\x89PNG")
    assert "faults/minute" in (tmp_path / "report.md").read_text()
    assert "[1/24" in r.stdout        # progress as it goes


def test_the_checker_catches_a_backend_that_loses_writes(tmp_path) -> None:
    r = _campaign("--faults", "4", "--seed", "5", "--kinds", "corrupt/lose-write",
                  "--include", "corrupt/lose-write", "--report", str(tmp_path))
    assert r.returncode != 0, r.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["lost_writes"] > 0 and not report["passed"]
    assert report["per_fault"] == {"corrupt/lose-write": 4}


def test_a_terminated_campaign_takes_its_system_down(tmp_path) -> None:
    """SIGTERM (a CI timeout, a kill) is handled like Ctrl-C: the campaign's
    system goes down, nothing is left running, and the report still comes."""
    import signal
    import time
    run_dir = str(tmp_path / "run")
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "run.py"), "campaign",
                          "--faults", "100000", "--seed", "3", "--run-dir", run_dir,
                          "--report", str(tmp_path / "report")],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        seen = ""
        deadline = time.monotonic() + 120
        while "[1/" not in seen and time.monotonic() < deadline:   # faults are being injected
            seen += p.stdout.readline()
        assert "[1/" in seen, seen
        p.send_signal(signal.SIGTERM)
        out, _ = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert "interrupted" in out, out
    assert (tmp_path / "report" / "report.json").exists()
    left = subprocess.run(["pgrep", "-f", f"--run-dir {run_dir}"], capture_output=True, text=True)
    assert left.stdout.strip() == "", f"processes left running: {left.stdout}"
