"""The benchmark harness: figures, comparisons, percentiles, timers and the report.

What this is
------------
Xen's own performance work always states a number *against* something: a
paravirtualised disk against the same disk from dom0, a netfront against the
host's loopback. microxen does the same. Every measured number is a
:class:`Figure`; a figure that has a reference point (a raw baseline measured on
the same machine in the same run, see ``bench.baselines``) also carries that
baseline's name and value and the ratio between the two.

Conventions (read these before quoting a ratio)
-----------------------------------------------
* ``better`` says which direction is good for a figure: ``"lower"`` for times
  and latencies, ``"higher"`` for rates, bandwidths and IOPS.
* ``ratio`` is always a **slowdown factor**, "how many times worse than the raw
  baseline", so that every ratio in a report reads the same way:

  - for times (lower is better):   ``ratio = ours / baseline``
  - for rates (higher is better):  ``ratio = baseline / ours``

  So ``ratio == 3.0`` means "three times slower than the raw floor" whatever the
  unit, ``1.0`` means "as fast as raw", and below 1.0 means "faster than the
  baseline" (which usually means the baseline measured something different, and
  is worth a look).
* Latencies are reported as medians (p50) and 99th percentiles from many
  samples, never as means: these machines have two cores and are noisy, and a
  mean is dragged around by a single descheduling.

Differences from how Xen is measured
------------------------------------
Xen is benchmarked on bare metal with pinned vCPUs and dedicated cores. Here
every "domain" is a Python process sharing two cores with the rest of the
system, so absolute numbers are small and jittery; only ratios measured in the
same run, on the same machine, mean much.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

__all__ = [
    "Figure",
    "Report",
    "Timer",
    "compare",
    "latency_figures",
    "machine_info",
    "measure_ns",
    "now_ns",
    "p50",
    "p99",
    "percentile",
    "rate_figure",
    "RECOVERY_QUIET",
]

LOWER = "lower"
HIGHER = "higher"

#: How long a recovery measurement leaves the system alone after killing a
#: driver domain.  Each guest stamps its own ``recovered_at``, so polling during
#: the recovery would gain nothing and only add load to what is being timed.
RECOVERY_QUIET = 1.0

# Units that are clearly times (lower is better) or rates (higher is better).
# Used only to guess `better` when a caller does not say; compare() is explicit.
_TIME_UNITS = {"ns", "us", "ms", "s"}
_RATE_SUFFIXES = ("/s", "iops", "GB/s", "MB/s")


@dataclasses.dataclass
class Figure:
    """One measured number, optionally compared against a baseline.

    ``baseline`` is the *name* of the reference figure (e.g.
    ``"baseline.zmq_relay_rtt_p50"``), ``baseline_value`` its value in the same
    unit, and ``ratio`` the slowdown factor described in the module docstring.
    ``detail`` holds anything else worth keeping (sample counts, p99 next to a
    p50, notes about page-cache effects, ...); it must be JSON-serialisable.
    """

    name: str
    value: float
    unit: str
    baseline: str | None = None
    baseline_value: float | None = None
    ratio: float | None = None
    detail: dict[str, Any] | None = None
    better: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"Figure name must be a non-empty string, got {self.name!r}")
        if isinstance(self.value, bool) or not isinstance(self.value, (int, float)):
            raise TypeError(f"Figure {self.name!r}: value must be a number, got {self.value!r}")
        if self.better is None:
            self.better = _guess_better(self.unit)
        if self.better not in (LOWER, HIGHER, None):
            raise ValueError(
                f"Figure {self.name!r}: better must be 'lower' or 'higher', got {self.better!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; non-finite numbers (an inf ratio) become None."""
        return _finite(dataclasses.asdict(self))


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _guess_better(unit: str) -> str | None:
    if unit in _TIME_UNITS:
        return LOWER
    if unit.endswith(_RATE_SUFFIXES):
        return HIGHER
    return None


def compare(
    name: str,
    value: float,
    unit: str,
    baseline_fig: Figure,
    higher_is_better: bool,
    detail: dict[str, Any] | None = None,
) -> Figure:
    """Make a Figure for ``value`` compared against ``baseline_fig``.

    The ratio is a slowdown factor (see the module docstring): ours/baseline
    when lower is better (times), baseline/ours when higher is better (rates).
    Units must match: comparing microseconds against a rate is a bug, and is
    refused with a ValueError rather than producing a meaningless ratio.
    """
    if baseline_fig.unit != unit:
        raise ValueError(
            f"compare({name!r}): unit {unit!r} does not match baseline "
            f"{baseline_fig.name!r} unit {baseline_fig.unit!r}"
        )
    base = float(baseline_fig.value)
    ours = float(value)
    if higher_is_better:
        ratio = base / ours if ours > 0 else math.inf
    else:
        ratio = ours / base if base > 0 else math.inf
    return Figure(
        name=name,
        value=value,
        unit=unit,
        baseline=baseline_fig.name,
        baseline_value=baseline_fig.value,
        ratio=ratio,
        detail=detail,
        better=HIGHER if higher_is_better else LOWER,
    )


# --- percentiles ---------------------------------------------------------------


def percentile(samples: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of ``samples`` by linear interpolation.

    Same definition as numpy's default ("linear"), so p50 of an even-length
    list is the mean of the two middle values. Raises ValueError on an empty
    list or a q outside 0..100.
    """
    if not 0 <= q <= 100:
        raise ValueError(f"percentile: q must be within 0..100, got {q!r}")
    if len(samples) == 0:
        raise ValueError("percentile: no samples")
    ordered = sorted(samples)
    position = (len(ordered) - 1) * (q / 100.0)
    lower = math.floor(position)
    upper = math.ceil(position)
    if lower == upper:
        return float(ordered[lower])
    fraction = position - lower
    return ordered[lower] + (ordered[upper] - ordered[lower]) * fraction


def p50(samples: Sequence[float]) -> float:
    """Median of ``samples``."""
    return percentile(samples, 50)


def p99(samples: Sequence[float]) -> float:
    """99th percentile of ``samples``."""
    return percentile(samples, 99)


# --- timing --------------------------------------------------------------------

now_ns = time.perf_counter_ns
"""Monotonic nanosecond clock (CLOCK_MONOTONIC on Linux, so comparable across
processes on one machine)."""


class Timer:
    """Context manager measuring wall time with perf_counter_ns.

    >>> with Timer() as t:
    ...     pass
    >>> t.ns >= 0
    True
    """

    def __init__(self) -> None:
        self.start_ns = 0
        self.end_ns = 0

    def __enter__(self) -> Timer:
        self.start_ns = time.perf_counter_ns()
        return self

    def __exit__(self, *exc: object) -> None:
        self.end_ns = time.perf_counter_ns()

    @property
    def ns(self) -> int:
        return self.end_ns - self.start_ns

    @property
    def seconds(self) -> float:
        return self.ns / 1e9


def measure_ns(fn: Callable[[], object], iterations: int, warmup: int = 0) -> list[int]:
    """Call ``fn`` ``warmup`` times untimed, then ``iterations`` times, timing each call.

    Returns the per-call durations in nanoseconds, ready for p50()/p99().
    """
    if iterations < 1:
        raise ValueError(f"measure_ns: iterations must be >= 1, got {iterations}")
    for _ in range(warmup):
        fn()
    clock = time.perf_counter_ns
    samples = []
    for _ in range(iterations):
        t0 = clock()
        fn()
        samples.append(clock() - t0)
    return samples


def latency_figures(
    prefix: str,
    samples_ns: Sequence[float],
    unit: str = "us",
    detail: dict[str, Any] | None = None,
) -> list[Figure]:
    """Turn a list of nanosecond samples into ``<prefix>_p50`` and ``<prefix>_p99``.

    Both figures share a detail dict with the sample count, min and max.
    """
    scale = {"ns": 1.0, "us": 1e3, "ms": 1e6, "s": 1e9}.get(unit)
    if scale is None:
        raise ValueError(f"latency_figures: unsupported unit {unit!r}")
    info = {
        "samples": len(samples_ns),
        "min": min(samples_ns) / scale,
        "max": max(samples_ns) / scale,
    }
    if detail:
        info.update(detail)
    return [
        Figure(f"{prefix}_p50", p50(samples_ns) / scale, unit, detail=info, better=LOWER),
        Figure(f"{prefix}_p99", p99(samples_ns) / scale, unit, detail=dict(info), better=LOWER),
    ]


def rate_figure(
    name: str,
    rates: Sequence[float],
    unit: str,
    detail: dict[str, Any] | None = None,
) -> Figure:
    """A throughput figure from several repeated runs: the median, keeping every run."""
    info: dict[str, Any] = {"runs": [round(r, 3) for r in rates]}
    if detail:
        info.update(detail)
    return Figure(name, p50(rates), unit, detail=info, better=HIGHER)


# --- the machine and the report -------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    """What a reader needs to judge the numbers: CPU, cores, Python, kernel."""
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    return {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "hostname": platform.node(),
    }


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if math.isinf(value):
        return "inf"
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 100:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


class Report:
    """Collects figures from suites; prints an aligned table; writes JSON."""

    def __init__(self) -> None:
        self.figures: list[Figure] = []
        self.errors: list[dict[str, str]] = []
        self.date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        self.machine = machine_info()

    def add(self, figure: Figure) -> None:
        if not isinstance(figure, Figure):
            raise TypeError(f"Report.add: expected a Figure, got {type(figure).__name__}")
        self.figures.append(figure)

    def extend(self, figures: Iterable[Figure]) -> None:
        for figure in figures:
            self.add(figure)

    def add_error(self, suite: str, message: str) -> None:
        self.errors.append({"suite": suite, "error": message})

    def names(self) -> set[str]:
        return {f.name for f in self.figures}

    def table(self) -> str:
        header = ("figure", "value", "unit", "better", "baseline", "x slower")
        rows = [header]
        for f in self.figures:
            rows.append(
                (
                    f.name,
                    _fmt(f.value),
                    f.unit,
                    f.better or "",
                    _fmt(f.baseline_value) if f.baseline else "",
                    _fmt(f.ratio) if f.ratio is not None else "",
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        right = {1, 4, 5}
        lines = []
        for n, row in enumerate(rows):
            cells = [
                cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
                for i, cell in enumerate(row)
            ]
            lines.append("  ".join(cells).rstrip())
            if n == 0:
                lines.append("  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "date": self.date,
            "machine": self.machine,
            "conventions": {
                "ratio": "slowdown vs baseline: ours/baseline when better=lower, "
                "baseline/ours when better=higher; >1 means slower than the baseline",
                "latency": "p50 and p99 over many samples; GB/s and MB/s are 10^9 and 10^6 bytes/s",
            },
            "figures": [f.to_dict() for f in self.figures],
        }
        if self.errors:
            out["errors"] = list(self.errors)
        return out

    def write_json(self, path: str | os.PathLike[str]) -> None:
        data = self.to_dict()
        tmp = f"{os.fspath(path)}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, default=_json_default, allow_nan=False)
            f.write("\n")
        os.replace(tmp, path)


def _json_default(obj: object) -> object:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return repr(obj)
