"""microxen benchmarks: every figure measured against a raw baseline.

What this is
------------
Xen's performance claims are always relative ("near-native"), and so are
microxen's. This package measures the system's figures (hypercall round trip,
XenStore operations, blkfront/netfront I/O, recovery time) and, in the same
run on the same machine, the raw floor they are built on (``bench.baselines``:
bare ZeroMQ, a bare relay, Unix sockets, memcpy, file I/O, UDP). Each system
figure carries its baseline and a slowdown ratio (``bench.harness``).

Pieces
------
* ``bench.harness``   Figure, compare(), p50/p99, Timer, Report
* ``bench.baselines`` the raw baselines and their registry
* ``bench.context``   Context: run directory, scale, baseline cache
* ``bench.registry``  SUITES: suites found lazily as ``bench/<name>_bench.py``
* ``bench.cli``       main(argv): ``python -m bench`` and ``run.py bench``

Writing a suite: create ``bench/<name>_bench.py`` with
``def run(ctx: Context) -> list[Figure]`` and compare against the floor with
``compare("xenstore.read_rtt_p50", ours_us, "us", ctx.baseline("zmq_relay_rtt"),
higher_is_better=False)``.
"""

from bench.cli import main
from bench.context import Context
from bench.harness import Figure, Report, Timer, compare, latency_figures, p50, p99, percentile
from bench.registry import SUITES, SuiteUnavailable, register_suite

__all__ = [
    "Context",
    "Figure",
    "Report",
    "SUITES",
    "SuiteUnavailable",
    "Timer",
    "compare",
    "latency_figures",
    "main",
    "p50",
    "p99",
    "percentile",
    "register_suite",
]
