"""NetifFrontend's connection events, without a system: what wakes a task that
waits for the vif to come back (the ping workload's retry), and what does not."""

from __future__ import annotations

from types import SimpleNamespace

import trio
from trio.testing import wait_all_tasks_blocked

from domains.domu.netif_frontend import NetifFrontend


def _vif() -> NetifFrontend:
    return NetifFrontend(SimpleNamespace(domid=3), xs=None, devid=0)


def test_wait_reconnected_wakes_on_the_next_connection_only() -> None:
    async def main() -> None:
        vif = _vif()
        vif._mark_connected()                      # connection 1
        woken: list[int] = []

        async def waiter(since: int) -> None:
            await vif.wait_reconnected(since)
            woken.append(vif.stats["connects"])
        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter, 1)
            await wait_all_tasks_blocked()
            assert woken == []                     # still connection 1: nothing new
            vif._mark_disconnected()
            await wait_all_tasks_blocked()
            assert woken == []                     # down is not back
            vif._mark_connected()                  # connection 2
            await wait_all_tasks_blocked()
            assert woken == [2]
        with trio.fail_after(1):
            await vif.wait_reconnected(1)          # already happened: at once
        vif._mark_disconnected()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter, 1)          # happened, but down now: wait
            await wait_all_tasks_blocked()
            assert woken == [2]
            vif._mark_connected()
        assert woken == [2, 3]
    trio.run(main)
