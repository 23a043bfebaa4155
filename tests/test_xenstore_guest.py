"""XenStore permissions and quotas, probed from inside a real guest domain."""

from __future__ import annotations

import json

import pytest

from tests.systemharness import System

PROBE = """
name = "probe"
kernel = "tests.kernels.xsprobe"
memory = 32
"""


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    cfg = tmp_path_factory.mktemp("cfg") / "probe.cfg"
    cfg.write_text(PROBE)
    s = System([str(cfg)])
    try:
        domid = s.domain("probe")["domid"]
        path = f"/local/domain/{domid}/data/probe"
        raw = s.wait(lambda: s.xl("xenstore-read", path, check=False).stdout.strip() or None,
                     timeout=60, what="the probe's results")
        yield json.loads(raw), s
    finally:
        s.down()


def test_a_guest_reads_and_writes_only_what_it_may(results):
    r, _ = results
    assert r["read_own_name"] == "ok"
    assert r["write_own_data"] == "ok"
    assert r["read_dom0"] == "EACCES"
    assert r["write_dom0"] == "EACCES"
    assert r["write_own_name"] == "EACCES"     # the toolstack owns it; the guest may only read
    assert r["write_root"] == "EACCES"
    assert r["give_away"] == "EPERM"
    assert r["introduce"] == "EACCES"


def test_quotas_stop_a_flooding_guest(results):
    r, _ = results
    assert r["big_node"] == "E2BIG"
    assert r["flood_error"] == "EQUOTA" and 900 <= r["flood_nodes_created"] <= 1000
    assert r["watch_error"] == "EQUOTA" and r["watches_made"] == 128
    assert r["transaction_error"] == "EQUOTA" and r["transactions_made"] == 10
    assert r["still_served"] == "ok"


def test_dom0_is_unaffected_by_the_flood(results):
    _, s = results
    assert s.xl("xenstore-read", "/local/domain/0/name").stdout.strip() == "Domain-0"
    assert "evil" not in s.xl("xenstore-ls", "/").stdout
