"""The suite registry: which benchmark suites exist, loaded only when asked for.

What this is
------------
Each area of microxen (the hypervisor, XenStore, the block and network split
drivers, recovery from a driver-domain crash) owns its own benchmark suite,
written by the engineer who owns that area. A suite is a module
``bench/<name>_bench.py`` defining::

    def run(ctx: bench.Context) -> list[bench.Figure]: ...

and is found here by name, without anyone editing this file. Modules are
imported lazily, when the suite is run, so a broken or not-yet-written suite
never stops another from running, and ``python -m bench baselines`` imports
nothing of microxen at all.

Invariant: asking for a suite that cannot be loaded gives one clear line,
``suite X not available: <why>``, never a traceback.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.harness import Figure

__all__ = ["LazySuite", "SUITES", "SuiteUnavailable", "register_suite"]

SuiteFn = Callable[[Any], list[Figure]]

# Suites the design card names; any other bench/<name>_bench.py is found too.
KNOWN_SUITES = ("hypervisor", "xenstore", "block", "network", "recovery")


class SuiteUnavailable(Exception):
    """A suite was asked for but cannot be loaded; the message says why."""


class LazySuite:
    """A suite living in a module that is imported on first use.

    Calling it runs the suite; :meth:`load` only imports and checks it.
    """

    def __init__(self, name: str, module: str, attribute: str = "run") -> None:
        self.name = name
        self.module = module
        self.attribute = attribute

    def load(self) -> SuiteFn:
        try:
            mod = importlib.import_module(self.module)
        except ModuleNotFoundError as exc:
            if exc.name and (exc.name == self.module or self.module.startswith(exc.name + ".")):
                raise SuiteUnavailable(
                    f"suite {self.name} not available: module {self.module} does not exist "
                    f"(expected {self.module.replace('.', '/')}.py defining "
                    f"{self.attribute}(ctx))"
                ) from None
            raise SuiteUnavailable(
                f"suite {self.name} not available: importing {self.module} failed: "
                f"no module named {exc.name!r}"
            ) from None
        except Exception as exc:  # noqa: BLE001 - any import-time failure, one line
            raise SuiteUnavailable(
                f"suite {self.name} not available: importing {self.module} failed: "
                f"{type(exc).__name__}: {exc}"
            ) from None
        fn = getattr(mod, self.attribute, None)
        if not callable(fn):
            raise SuiteUnavailable(
                f"suite {self.name} not available: {self.module} has no "
                f"{self.attribute}(ctx) function"
            )
        return fn

    def available(self) -> bool:
        """Whether the module exists (without importing it)."""
        try:
            return importlib.util.find_spec(self.module) is not None
        except (ImportError, ValueError):
            return False

    def __call__(self, ctx: Any) -> list[Figure]:
        return self.load()(ctx)

    def __repr__(self) -> str:
        return f"LazySuite({self.name!r}, {self.module!r})"


SUITES: dict[str, SuiteFn] = {"baselines": LazySuite("baselines", "bench.baselines")}


def register_suite(name: str, fn: SuiteFn) -> None:
    """Register a suite under ``name`` (replacing any lazy entry of that name)."""
    if not name or not name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"register_suite: invalid suite name {name!r}")
    if not callable(fn):
        raise TypeError(f"register_suite({name!r}): suite must be callable")
    SUITES[name] = fn


def _discover() -> None:
    for name in KNOWN_SUITES:
        SUITES.setdefault(name, LazySuite(name, f"bench.{name}_bench"))
    here = Path(__file__).resolve().parent
    for path in sorted(here.glob("*_bench.py")):
        name = path.stem[: -len("_bench")]
        if name:
            SUITES.setdefault(name, LazySuite(name, f"bench.{path.stem}"))


_discover()


def load(name: str) -> SuiteFn:
    """The runnable suite called ``name``; SuiteUnavailable with a clear reason if none."""
    if name not in SUITES:
        raise SuiteUnavailable(
            f"suite {name} not available: unknown suite; known suites: {', '.join(sorted(SUITES))}"
        )
    suite = SUITES[name]
    return suite.load() if isinstance(suite, LazySuite) else suite
