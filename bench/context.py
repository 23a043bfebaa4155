"""The benchmark run context: where a run lives and which baselines it has measured.

What this is
------------
One ``python -m bench`` run may execute several suites (``baselines``,
``hypervisor``, ``xenstore``, ...). Each suite is a function
``suite(ctx) -> list[Figure]``; ``ctx`` is a :class:`Context`. It carries

* ``run_dir``: the run directory (DESIGN.md, "The run directory"). A suite
  that starts a microxen system starts it under this directory (or a
  subdirectory of it) so that everything it creates is found and removed;
* ``scale``: a factor (1.0 normally, small with ``--quick``) by which suites
  may shrink their iteration counts and durations;
* a cache of raw baselines: ``ctx.baseline("zmq_relay_rtt")`` measures the
  baseline group providing that figure the first time it is asked for, and
  returns the same figure to every later caller in the run. A system figure is
  thus always compared with a floor measured minutes earlier on the same
  machine under the same load.

Invariant: within one run, every baseline group is measured at most once,
and a failed measurement is remembered (and re-raised) rather than retried.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from bench.harness import Figure
from bench.procs import BenchError

__all__ = ["Context"]


class Context:
    """What a suite gets: the run directory, a scale, and the baseline cache."""

    def __init__(
        self,
        run_dir: str | Path,
        scale: float = 1.0,
        log: Callable[[str], None] | None = None,
    ) -> None:
        if not scale > 0:
            raise ValueError(f"Context: scale must be > 0, got {scale!r}")
        self.run_dir = Path(run_dir)
        self.scale = scale
        self._log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self._groups: dict[str, list[Figure]] = {}
        self._failed: dict[str, str] = {}
        self.errors: list[tuple[str, str]] = []

    def log(self, message: str) -> None:
        """Progress output (stderr by default), never mixed into the results table."""
        self._log(message)

    def error(self, where: str, message: str) -> None:
        """Record a non-fatal failure; the run still reports it and exits non-zero."""
        self.errors.append((where, message))
        self.log(f"error: {where}: {message}")

    def baseline_group(self, group: str) -> list[Figure]:
        """All figures of one baseline group, measuring it now if not yet measured."""
        from bench.baselines import BASELINES

        if group not in BASELINES:
            raise KeyError(
                f"unknown baseline group {group!r}; known groups: {', '.join(BASELINES)}"
            )
        if group in self._groups:
            return self._groups[group]
        if group in self._failed:
            raise BenchError(f"baseline group {group!r} failed earlier in this run: "
                             f"{self._failed[group]}")
        self.log(f"measuring baseline {group} ...")
        try:
            figures = BASELINES[group].run(scale=self.scale, directory=str(self.run_dir))
        except Exception as exc:
            self._failed[group] = f"{type(exc).__name__}: {exc}"
            raise
        self._groups[group] = figures
        return figures

    def baseline(self, name: str) -> Figure:
        """The baseline figure ``name`` measured in this run (measured once, reused).

        ``name`` may omit the ``baseline.`` prefix, and a latency named without
        a percentile means its median: ``"zmq_relay_rtt"`` is
        ``"baseline.zmq_relay_rtt_p50"``.
        """
        from bench.baselines import canonical_name, find_group

        full = canonical_name(name)
        group = find_group(full)
        if group is None:
            from bench.baselines import BASELINES

            known = sorted(n for b in BASELINES.values() for n in b.provides)
            raise KeyError(f"unknown baseline figure {name!r}; known: {', '.join(known)}")
        for figure in self.baseline_group(group.group):
            if figure.name == full:
                return figure
        raise BenchError(f"baseline group {group.group!r} did not produce figure {full!r}")

    def measured_baselines(self) -> list[Figure]:
        """Every baseline figure measured so far in this run, in measuring order."""
        return [f for figures in self._groups.values() for f in figures]
