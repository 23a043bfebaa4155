"""domains/kernel/exception_groups.py: one failure out of a nursery, under
trio's strict exception groups, comes out bare where a function promises it."""

from __future__ import annotations

import pytest
import trio

from domains.kernel.exception_groups import first_leaf, unwrap


class Broken(Exception):
    pass


async def _fail_in_nursery(exc: BaseException) -> None:
    async def child():
        raise exc
    async with trio.open_nursery(strict_exception_groups=True) as nursery:
        async with trio.open_nursery(strict_exception_groups=True) as inner:
            inner.start_soon(child)
        nursery.start_soon(trio.sleep_forever)


def test_a_strict_nursery_wraps_even_one_exception():
    with pytest.raises(BaseExceptionGroup) as info:
        trio.run(_fail_in_nursery, Broken("ring"))
    assert isinstance(first_leaf(info.value), Broken)
    assert str(first_leaf(info.value)) == "ring"


def test_unwrap_raises_the_kind_asked_for_bare():
    async def main():
        with unwrap(Broken):
            await _fail_in_nursery(Broken("ring"))
    with pytest.raises(Broken, match="ring"):
        trio.run(main)


def test_unwrap_leaves_other_exceptions_in_their_group():
    async def main():
        with unwrap(Broken):
            await _fail_in_nursery(KeyError("other"))
    with pytest.raises(BaseExceptionGroup) as info:
        trio.run(main)
    assert isinstance(first_leaf(info.value), KeyError)


def test_first_leaf_of_a_bare_exception_is_itself():
    exc = Broken("x")
    assert first_leaf(exc) is exc
