"""Tests of the benchmark harness (bench/) and smoke runs of every raw baseline.

These check behaviour only: figures are present, positive, correctly named and
in the right units; ratios point the documented way; the CLI reports errors
clearly. They never assert anything about timing.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import bench
from bench import baselines as bl
from bench.context import Context
from bench.harness import (
    Figure,
    Report,
    Timer,
    compare,
    latency_figures,
    measure_ns,
    p50,
    p99,
    percentile,
    rate_figure,
)
from bench.procs import BenchError, Child
from bench.registry import SUITES, LazySuite, register_suite

REPO = Path(__file__).resolve().parent.parent


def _children() -> set[int]:
    """PIDs of live (non-zombie) processes whose parent is this test process."""
    me = os.getpid()
    kids = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == me and fields[0] != "Z":
            kids.add(int(entry))
    return kids


@pytest.fixture
def scratch():
    """A short, private directory; the test asserts it is left empty."""
    path = tempfile.mkdtemp(prefix="mxbt-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


# --- percentiles and timers -----------------------------------------------------------


def test_percentiles_interpolate_linearly():
    samples = list(range(100, 0, -1))  # 1..100, unsorted on purpose
    assert p50(samples) == pytest.approx(50.5)
    assert p99(samples) == pytest.approx(99.01)
    assert percentile(samples, 0) == 1
    assert percentile(samples, 100) == 100
    assert p50([7]) == 7
    assert p99([3, 1, 2]) == pytest.approx(2.98)


@pytest.mark.parametrize("q", [-1, 100.5])
def test_percentile_rejects_bad_q(q):
    with pytest.raises(ValueError, match="0..100"):
        percentile([1, 2, 3], q)


def test_percentile_rejects_empty():
    with pytest.raises(ValueError, match="no samples"):
        p50([])


def test_timer_and_measure_ns():
    with Timer() as t:
        sum(range(1000))
    assert t.ns >= 0 and t.seconds == t.ns / 1e9
    calls = []
    samples = measure_ns(lambda: calls.append(1), iterations=5, warmup=2)
    assert len(samples) == 5 and len(calls) == 7
    assert all(isinstance(s, int) and s >= 0 for s in samples)
    with pytest.raises(ValueError):
        measure_ns(lambda: None, iterations=0)


def test_latency_figures_convert_ns_to_unit():
    figs = latency_figures("x.rtt", [1000, 2000, 3000], "us", {"note": "n"})
    assert [f.name for f in figs] == ["x.rtt_p50", "x.rtt_p99"]
    assert figs[0].value == pytest.approx(2.0)
    assert figs[1].value == pytest.approx(2.98)
    assert all(f.unit == "us" and f.better == "lower" for f in figs)
    assert figs[0].detail["samples"] == 3 and figs[0].detail["note"] == "n"


def test_rate_figure_is_median_of_runs():
    fig = rate_figure("x.rate", [3.0, 1.0, 2.0], "msg/s")
    assert fig.value == 2.0 and fig.better == "higher" and fig.detail["runs"] == [3.0, 1.0, 2.0]


# --- figures and ratio direction -------------------------------------------------------


def test_figure_guesses_direction_from_unit():
    assert Figure("a", 1.0, "us").better == "lower"
    assert Figure("b", 1.0, "GB/s").better == "higher"
    assert Figure("c", 1.0, "iops").better == "higher"
    assert Figure("d", 1.0, "widgets").better is None


def test_figure_rejects_bad_values():
    with pytest.raises(TypeError, match="'a'.*number"):
        Figure("a", "fast", "us")
    with pytest.raises(ValueError, match="non-empty"):
        Figure("", 1.0, "us")
    with pytest.raises(ValueError, match="better"):
        Figure("a", 1.0, "us", better="sideways")


def test_compare_time_ratio_is_ours_over_baseline():
    base = Figure("baseline.zmq_relay_rtt_p50", 100.0, "us")
    fig = compare("xenstore.read_p50", 300.0, "us", base, higher_is_better=False)
    assert fig.ratio == pytest.approx(3.0)
    assert fig.better == "lower"
    assert fig.baseline == "baseline.zmq_relay_rtt_p50" and fig.baseline_value == 100.0


def test_compare_rate_ratio_is_baseline_over_ours():
    base = Figure("baseline.zmq_relay_msgs_per_s", 30000.0, "msg/s")
    fig = compare("evtchn.notify_rate", 10000.0, "msg/s", base, higher_is_better=True)
    assert fig.ratio == pytest.approx(3.0)  # three times slower, read the same way as times
    assert fig.better == "higher"


def test_compare_refuses_unit_mismatch():
    base = Figure("baseline.zmq_rtt_p50", 40.0, "us")
    with pytest.raises(ValueError, match="unit 'ms' does not match"):
        compare("x", 1.0, "ms", base, higher_is_better=False)


def test_compare_zero_rate_gives_inf_ratio_and_json_null(tmp_path):
    base = Figure("baseline.udp_pps", 1000.0, "pkt/s")
    fig = compare("net.pps", 0.0, "pkt/s", base, higher_is_better=True)
    assert math.isinf(fig.ratio)
    report = Report()
    report.add(fig)
    out = tmp_path / "r.json"
    report.write_json(out)
    assert json.loads(out.read_text())["figures"][0]["ratio"] is None


# --- the report --------------------------------------------------------------------------


def test_report_json_shape(tmp_path):
    report = Report()
    base = Figure("baseline.zmq_rtt_p50", 40.0, "us", detail={"samples": 10})
    report.add(base)
    report.add(compare("hv.hypercall_p50", 80.0, "us", base, higher_is_better=False))
    out = tmp_path / "report.json"
    report.write_json(out)
    data = json.loads(out.read_text())
    assert set(data) >= {"date", "machine", "figures"}
    assert set(data["machine"]) >= {"cpu_model", "cores", "python", "kernel"}
    first, second = data["figures"]
    for fig in data["figures"]:
        assert set(fig) >= {"name", "value", "unit", "baseline", "baseline_value", "ratio",
                            "detail", "better"}
    assert first["name"] == "baseline.zmq_rtt_p50" and first["baseline"] is None
    assert second["baseline"] == "baseline.zmq_rtt_p50"
    assert second["ratio"] == pytest.approx(2.0)
    assert not list(tmp_path.glob("*.tmp"))


def test_report_table_is_aligned():
    report = Report()
    base = Figure("baseline.a_long_name_p50", 12.3456, "us")
    report.extend([base, compare("b", 1234567.0, "us", base, higher_is_better=False)])
    lines = report.table().splitlines()
    assert lines[0].startswith("figure") and set(lines[1]) <= {"-", " "}
    assert "baseline.a_long_name_p50" in lines[2] and "1,234,567" in lines[3]
    # The value column is right-aligned: every value ends at the same column.
    header_end = lines[0].index("value") + len("value")
    assert lines[2][:header_end].endswith("12.35") and lines[3][:header_end].endswith("1,234,567")


def test_report_rejects_non_figures():
    with pytest.raises(TypeError, match="expected a Figure"):
        Report().add({"name": "x"})


# --- context and baseline cache ----------------------------------------------------------


@pytest.fixture
def fake_baseline(monkeypatch):
    """Replace the baseline registry with one fast in-process group that counts its runs."""
    runs = []

    def fake(scale: float = 1.0, directory: str | None = None) -> list[Figure]:
        runs.append(directory)
        return latency_figures("baseline.fake_rtt", [10_000, 20_000, 30_000], "us")

    group = bl.Baseline("fake", ("baseline.fake_rtt_p50", "baseline.fake_rtt_p99"), fake, "fake")
    monkeypatch.setattr(bl, "BASELINES", {"fake": group})
    return runs


def test_context_measures_each_baseline_once(tmp_path, fake_baseline):
    ctx = Context(tmp_path, log=lambda m: None)
    a = ctx.baseline("fake_rtt")  # bare latency name means its median
    b = ctx.baseline("baseline.fake_rtt_p50")
    c = ctx.baseline("fake_rtt_p99")
    assert a is b and a.name == "baseline.fake_rtt_p50" and c.name == "baseline.fake_rtt_p99"
    assert fake_baseline == [str(tmp_path)]
    assert [f.name for f in ctx.measured_baselines()] == ["baseline.fake_rtt_p50",
                                                         "baseline.fake_rtt_p99"]


def test_context_unknown_baseline_is_clear(tmp_path):
    ctx = Context(tmp_path, log=lambda m: None)
    with pytest.raises(KeyError, match="unknown baseline figure 'nope'"):
        ctx.baseline("nope")
    with pytest.raises(KeyError, match="unknown baseline group 'nope'"):
        ctx.baseline_group("nope")


def test_context_remembers_a_failed_baseline(tmp_path, monkeypatch):
    calls = []

    def broken(scale: float = 1.0, directory: str | None = None) -> list[Figure]:
        calls.append(1)
        raise BenchError("no peer")

    group = bl.Baseline("broken", ("baseline.broken_p50",), broken, "broken")
    monkeypatch.setattr(bl, "BASELINES", {"broken": group})
    ctx = Context(tmp_path, log=lambda m: None)
    with pytest.raises(BenchError, match="no peer"):
        ctx.baseline("broken")
    with pytest.raises(BenchError, match="failed earlier"):
        ctx.baseline("broken")
    assert calls == [1]


def test_canonical_names():
    assert bl.canonical_name("zmq_relay_rtt") == "baseline.zmq_relay_rtt_p50"
    assert bl.canonical_name("baseline.zmq_relay_rtt_p99") == "baseline.zmq_relay_rtt_p99"
    assert bl.canonical_name("memcpy_4k") == "baseline.memcpy_4k"
    assert bl.find_group("baseline.udp_pps").group == "udp"


# --- the CLI and the suite registry ------------------------------------------------------


def test_unknown_suite_is_a_clear_error(capsys):
    assert bench.main(["no_such_suite"]) == 2
    err = capsys.readouterr().err
    assert "suite no_such_suite not available" in err and "Traceback" not in err


def test_missing_suite_module_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setitem(SUITES, "ghost", LazySuite("ghost", "bench.ghost_bench"))
    assert bench.main(["ghost"]) == 2
    err = capsys.readouterr().err
    assert "suite ghost not available" in err and "bench/ghost_bench.py" in err
    assert "Traceback" not in err


def test_suite_with_broken_import_is_a_clear_error(monkeypatch, tmp_path, capsys):
    (tmp_path / "brokendep_bench.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(SUITES, "brokendep", LazySuite("brokendep", "brokendep_bench"))
    assert bench.main(["brokendep"]) == 2
    err = capsys.readouterr().err
    assert "suite brokendep not available" in err and "no_such_dependency_xyz" in err
    assert "Traceback" not in err


def test_bad_arguments_return_2(capsys):
    assert bench.main(["--no-such-flag"]) == 2
    assert bench.main(["--scale", "0"]) == 2


def test_suites_share_baselines_and_report_them(monkeypatch, tmp_path, fake_baseline, capsys):
    def suite_a(ctx):
        return [compare("a.rtt_p50", 40.0, "us", ctx.baseline("fake_rtt"), False)]

    def suite_b(ctx):
        return [compare("b.rtt_p50", 60.0, "us", ctx.baseline("fake_rtt"), False)]

    monkeypatch.setitem(SUITES, "suite_a", suite_a)
    monkeypatch.delitem(SUITES, "suite_b", raising=False)  # so it is removed afterwards
    register_suite("suite_b", suite_b)
    out = tmp_path / "r.json"
    assert bench.main(["suite_a", "suite_b", "--json", str(out), "--run-dir", str(tmp_path)]) == 0
    assert len(fake_baseline) == 1  # measured once, used twice
    figures = {f["name"]: f for f in json.loads(out.read_text())["figures"]}
    assert figures["a.rtt_p50"]["ratio"] == pytest.approx(2.0)
    assert figures["b.rtt_p50"]["ratio"] == pytest.approx(3.0)
    assert "baseline.fake_rtt_p50" in figures  # the on-demand baseline is reported too
    assert "a.rtt_p50" in capsys.readouterr().out
    # The run's scratch directory is gone; only the report remains.
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_failing_suite_does_not_hide_others(monkeypatch, tmp_path, capsys):
    def good(ctx):
        return [Figure("good.x", 1.0, "us")]

    def bad(ctx):
        raise RuntimeError("boom")

    monkeypatch.setitem(SUITES, "bad", bad)
    monkeypatch.setitem(SUITES, "good", good)
    out = tmp_path / "r.json"
    assert bench.main(["bad", "good", "--json", str(out)]) == 1
    data = json.loads(out.read_text())
    assert [f["name"] for f in data["figures"]] == ["good.x"]
    assert data["errors"] == [{"suite": "bad", "error": "RuntimeError: boom"}]
    assert "FAILED bad: RuntimeError: boom" in capsys.readouterr().err


def test_suite_returning_garbage_is_reported(monkeypatch, capsys):
    monkeypatch.setitem(SUITES, "garbage", lambda ctx: ["not a figure"])
    assert bench.main(["garbage"]) == 1
    assert "did not return a list of Figure" in capsys.readouterr().err


def test_list_suites(capsys):
    assert bench.main(["--list"]) == 0
    out = capsys.readouterr().out
    assert "baselines" in out and "hypervisor" in out


# --- child processes ----------------------------------------------------------------------


def _fail() -> None:
    raise RuntimeError("child failed on purpose")


def _hang() -> None:
    time.sleep(60)


def test_failed_child_is_reported_and_reaped():
    child = Child("failing", _fail).start()
    with pytest.raises(BenchError, match="'failing' exited with code 1"):
        child.stop(timeout=10)
    assert child.pid not in _children()


def test_hung_child_is_killed():
    child = Child("hanging", _hang).start()
    with pytest.raises(BenchError, match="'hanging' did not exit in time"):
        child.stop(timeout=0.2)
    assert child.pid not in _children()


# --- smoke runs of every baseline (tiny counts; behaviour only) ---------------------------

UNITS = {
    "zmq_rtt": {"baseline.zmq_msgs_per_s": "msg/s"},
    "zmq_relay": {"baseline.zmq_relay_msgs_per_s": "msg/s"},
    "unix_rtt": {},
    "memcpy": {"*": "GB/s"},
    "file_io": {"*": "MB/s", "iops": "iops"},
    "udp": {"baseline.udp_throughput": "MB/s", "baseline.udp_pps": "pkt/s"},
}


def _expected_unit(group: str, name: str) -> str:
    table = UNITS[group]
    if name in table:
        return table[name]
    if name.endswith(("_p50", "_p99")):
        return "us"
    if group == "file_io":
        return "MB/s" if "_1m" in name else "iops"
    return table["*"]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("group", list(bl.BASELINES))
def test_baseline_smoke(group, scratch):
    before = _children()
    figures = bl.BASELINES[group].run(scale=0.01, directory=scratch)
    names = [f.name for f in figures]
    assert len(names) == len(set(names))
    expected = set(bl.BASELINES[group].provides)
    if len(os.sched_getaffinity(0)) < 2:  # pinned same/cross-CPU figures need two CPUs
        expected = {n for n in expected if "_cpu_" not in n}
    assert set(names) == expected
    for fig in figures:
        assert isinstance(fig, Figure)
        assert fig.value > 0, fig
        assert fig.unit == _expected_unit(group, fig.name), fig
        assert fig.better == ("lower" if fig.unit == "us" else "higher")
        assert fig.baseline is None and fig.ratio is None
        json.dumps(fig.to_dict(), allow_nan=False)
    for p50_fig in (f for f in figures if f.name.endswith("_p50") and "_cpu_" not in f.name):
        p99_fig = next(f for f in figures if f.name == p50_fig.name[:-4] + "_p99")
        assert p99_fig.value >= p50_fig.value
    assert os.listdir(scratch) == []  # every socket file and test file removed
    assert _children() <= before  # every child reaped


@pytest.mark.timeout(120)
def test_python_m_bench_end_to_end(tmp_path):
    out = tmp_path / "baselines.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "baselines", "--scale", "0.01", "--json", str(out),
         "--run-dir", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=110,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    names = {f["name"] for f in data["figures"]}
    assert names <= {n for b in bl.BASELINES.values() for n in b.provides}
    assert {"baseline.zmq_rtt_p50", "baseline.zmq_relay_rtt_p99", "baseline.unix_rtt_p50",
            "baseline.memcpy_4k", "baseline.file_randread_4k_qd32", "baseline.udp_pps"} <= names
    assert "baseline.zmq_relay_rtt_p50" in proc.stdout
    assert [p.name for p in tmp_path.iterdir()] == ["baselines.json"]


def test_split_ceiling_smoke(tmp_path):
    """The split-driver ceiling runs every figure the block suite compares
    with, each positive, and leaves no process or descriptor behind."""
    from bench import split_ceiling
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(4 << 20))
    fds_before = set(os.listdir("/proc/self/fd"))
    got = split_ceiling.measure(str(image), 0.05, region=4 << 20)
    assert sorted(got) == sorted(
        [f"seq{d}_1m{q}" for d in ("write", "read") for q in ("", "_qd4")]
        + [f"rand{d}_4k_qd{q}" for d in ("read", "write") for q in (1, 32)])
    assert all(v > 0 for v in got.values())
    assert set(os.listdir("/proc/self/fd")) == fds_before
    assert not [p for p in os.listdir("/proc") if p.isdigit()
                and _is_child_of_us(int(p))]


def _is_child_of_us(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1]) == os.getpid()
    except (OSError, ValueError, IndexError):
        return False
