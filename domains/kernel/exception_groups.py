"""How an error leaves a nursery: trio's strict exception groups.

Every domain kernel runs its drivers as trio tasks in nurseries (structured
concurrency: a task never outlives the block that started it).  When
something inside a nursery raises, the nursery cancels its other tasks and
re-raises.  Since trio 0.25 it always re-raises an ``ExceptionGroup``, even
for one exception, so that the caller cannot mistake "one task failed" for
"the only thing that happened"; the kernels run with
``strict_exception_groups=True`` on every trio version (domains/kernel/boot.py).

So a caller that waits for *one* kind of failure out of a nursery (a ring
broken by a hostile guest, say) does one of two things:

* catches it with ``except* Kind`` (PEP 654), wherever it came from, and
  takes :func:`first_leaf` of the group for its message;
* or the function that owns the nursery promises to raise ``Kind`` as it is,
  by wrapping the nursery in :func:`unwrap` (blkback's ``Connection.serve``
  promises a bare ``Disconnect``).

Anything else in the group still propagates as a group: nothing is dropped.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator


def first_leaf(exc: BaseException) -> BaseException:
    """The first exception inside ``exc``, through any nesting of groups."""
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


@contextmanager
def unwrap(*kinds: type[BaseException]) -> Iterator[None]:
    """Re-raise a ``kinds`` exception that leaves the block inside exception
    groups as the bare exception (the first one, if several).  Other
    exceptions in the same group are raised beside it, in a group."""
    try:
        yield
    except* kinds as group:
        raise first_leaf(group) from None
