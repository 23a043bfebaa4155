"""Unit tests of the fault-injection pieces that need no running system:
fault specs, reproducible firing decisions, point actions, the catalogue, the report."""

from __future__ import annotations

import struct
import zlib

import pytest
import trio

from domains.dom0.faults import report
from domains.dom0.faults.catalogue import CATALOGUE, KINDS, describe, lookup
from domains.kernel import faultpoint
from ipc import blkif


def test_spec_parsing_and_errors() -> None:
    f = faultpoint.parse_spec("f1", "point=blkback.response action=delay delay=0.01 duration=2 seed=3")
    assert (f.point, f.action, f.delay, f.duration, f.seed) == ("blkback.response", "delay", 0.01, 2.0, 3)
    for bad, word in (("action=delay", "point"), ("point=x action=melt", "melt"),
                      ("point=x action=drop prob=2", "prob"), ("point=x action=drop colour=red", "colour"),
                      ("point=x action=drop count=lots", "count"), ("point=agent action=drop", "agent")):
        with pytest.raises(faultpoint.SpecError, match=word):
            faultpoint.parse_spec("f", bad)


def test_decisions_are_reproducible_from_the_seed() -> None:
    def run(seed: int) -> list[bool]:
        f = faultpoint.parse_spec("f", f"point=p action=drop prob=0.3 seed={seed}")
        return [f.decide() for _ in range(200)]
    assert run(7) == run(7)
    assert run(7) != run(8)
    assert 20 < sum(run(7)) < 100


def test_count_limits_firing() -> None:
    f = faultpoint.parse_spec("f", "point=p action=drop count=3")
    assert [f.decide() for _ in range(5)] == [True, True, True, False, False]
    assert f.over


def test_points_do_nothing_unarmed_and_act_when_armed() -> None:
    rsp = blkif.BlkifResponse(5, blkif.BLKIF_OP_READ, blkif.BLKIF_RSP_OKAY)

    async def main() -> None:
        assert await faultpoint.hit("blkback.response", rsp) is rsp
        faultpoint.arm(faultpoint.parse_spec("a", "point=blkback.response action=corrupt-status count=1 seed=1"))
        bad = await faultpoint.hit("blkback.response", rsp)
        assert bad.id == 5 and bad.status != blkif.BLKIF_RSP_OKAY
        assert await faultpoint.hit("blkback.response", rsp) is rsp     # count spent
        faultpoint.disarm("blkback.response")
        faultpoint.arm(faultpoint.parse_spec("b", "point=blkback.request action=oops"))
        with pytest.raises(faultpoint.InjectedFault):
            await faultpoint.hit("blkback.request")
        faultpoint.disarm("blkback.request")
        faultpoint.arm(faultpoint.parse_spec("c", "point=blkback.write action=skip count=1"))
        assert faultpoint.hit_nowait("blkback.write") is faultpoint.DROP
        assert faultpoint.hit_nowait("blkback.write") is None
        faultpoint.disarm("blkback.write")
        raw = blkif.BlkifRequest(blkif.BLKIF_OP_READ, 9, 0, 0, (blkif.Segment(20, 0, 7),)).pack()
        faultpoint.arm(faultpoint.parse_spec("d", "point=blkfront.request action=garbage seed=2"))
        junk = faultpoint.hit_nowait("blkfront.request", raw)
        assert junk != raw and junk[8:16] == raw[8:16]      # the id survives
        faultpoint.disarm("blkfront.request")
    trio.run(main)


def test_catalogue_covers_every_kind_and_looks_up() -> None:
    assert set(KINDS) == {"crash", "hang", "slow", "corrupt", "events", "control", "resources"}
    assert lookup("crash").mode == "sigkill"
    assert lookup("hang/spin").point == "blkback.request"
    with pytest.raises(KeyError, match="kinds:"):
        lookup("melt")
    with pytest.raises(KeyError, match="modes:"):
        lookup("crash", "gently")
    text = describe()
    for t in CATALOGUE:
        assert t.name in text
        if t.how == "point":
            faultpoint.parse_spec("x", f"point={t.point} action={t.action}")   # every spec is armable


def test_report_figures_and_png() -> None:
    records = [{"kind": "slow", "fault": "slow/response", "outcome": "recovered_transparently",
                "recovery_ms": float(ms)} for ms in range(1, 101)]
    records.append({"kind": "crash", "fault": "crash/sigkill", "outcome": "unrecovered",
                    "recovery_ms": None})
    s = report.summarise(records, {"lost_writes": 0}, 60.0, {"seed": 1})
    assert s["faults_injected"] == 101 and s["unrecovered"] == 1 and not s["passed"]
    assert s["recovery_ms"]["max"] == 100 and 50 <= s["recovery_ms"]["p50"] <= 51
    assert s["per_kind"] == {"slow": 100, "crash": 1}
    png = report.plot(records)
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    w, h = struct.unpack(">II", png[16:24])
    n = struct.unpack(">I", png[33:37])[0]
    assert png[37:41] == b"IDAT" and len(zlib.decompress(png[41:41 + n])) == h * (1 + 3 * w)


def test_disk_checker_accepts_exactly_what_overlapping_writes_allow() -> None:
    from domains.dom0.faults.checker import _FAILURE, _READ
    from domains.domu.disk_workload import DiskChecker, block_content
    c = DiskChecker(4)

    def write_issued(v: int) -> None:
        c.issued[868] = v

    def write_acked(v: int) -> None:
        c.acked[868] = v

    write_issued(555)
    write_acked(555)
    # The race a campaign found: a sweep read issued while 556 was in flight;
    # 556 and then 557 are acknowledged before the sweep looks at its data.
    since = c.acked[868]
    write_issued(556)
    write_acked(556)
    write_issued(557)
    write_acked(557)
    assert c.check(868, block_content(4, 868, 556), since)          # legal: it overlapped
    assert c.check(868, block_content(4, 868, 557), since)
    # Older than what was acknowledged when the read was issued: a lost write,
    # reported so that dom0's checker counts it as one.
    assert not c.check(868, block_content(4, 868, 554), since)
    m = _FAILURE.search("VERIFY FAILURE (sweep) " + c.failures[-1] + " | evidence")
    assert m and int(m.group(2)) == 555 and _READ.search(m.group(3)).group(2) == "554"
    # Newer than any write issued, the right header with a wrong body, or
    # another domain's block: corruption.
    assert not c.check(868, block_content(4, 868, 558), since)
    bad = bytearray(block_content(4, 868, 556))
    bad[-1] ^= 1
    assert not c.check(868, bytes(bad), since)
    assert not c.check(868, block_content(5, 868, 556), since)
    # A write that failed may or may not have landed.
    c.indeterminate[868] = 558
    assert c.check(868, block_content(4, 868, 558))


def test_blkfront_request_history_is_bounded_and_keeps_no_data() -> None:
    """A failure report's request history: the last few per sector, for the
    most recently used sectors only, and never a request's data."""
    import types
    from domains.domu import blkfront
    dev = blkfront.BlkFront(types.SimpleNamespace(domid=1, memory=None), None, 51712)
    for seq in range(blkfront.HISTORY_SECTORS + 10):
        req = blkfront._Req(blkif.BLKIF_OP_WRITE, seq * 8, 8, b"x" * 4096, seq=seq)
        req.trace.append(("put", 1, 0, [0x100], [8]))
        dev._remember(req)
    assert len(dev._recent) == blkfront.HISTORY_SECTORS
    assert dev.history(0) == "none"                                  # the oldest sector went
    assert dev.history(8 * (blkfront.HISTORY_SECTORS + 9)).startswith("#4105 write [('put'")
    for seq in range(10):
        dev._remember(blkfront._Req(blkif.BLKIF_OP_READ, 80, 8, seq=100000 + seq))
    assert len(dev._recent[80]) == blkfront.HISTORY_PER_SECTOR
    assert all(len(entry) == 3 and not isinstance(entry[2], bytes)
               for entry in dev._recent[80])
