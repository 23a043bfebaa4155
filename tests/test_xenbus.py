"""The xenbus helpers every split driver shares, against dom0's in-process XenStore:
what makes a driver domain rescan its devices, how waits use their watches, the
handshake's transactional publish, and the XenStore ring's doorbell."""

from __future__ import annotations

import os

import pytest
import trio
from trio.testing import MockClock, wait_all_tasks_blocked

from domains.dom0.xenstored import InProcessConnection, XenStore
from domains.kernel import faultpoint
from domains.kernel.events import EventChannels, Port
from domains.kernel.xenbus import (BackendWatcher, FrontendDevice, XenbusState,
                                   publish_and_wait_connected, read_node, wait_until)
from ipc.event_abi import SharedInfo
from ipc.page import PAGE_SIZE

ROOT = "/local/domain/5/backend/vif"


def _store() -> InProcessConnection:
    return InProcessConnection(XenStore(), 0)


def test_only_device_directories_and_their_scanned_keys_change_a_scan() -> None:
    async def serve(path: str) -> None:
        await trio.sleep_forever()
    w = BackendWatcher(_store(), 5, "vif", serve)
    for path in (ROOT, f"{ROOT}/7", f"{ROOT}/7/0", f"{ROOT}/7/0/frontend", f"{ROOT}/7/0/online",
                 "/local/domain/5/backend", "/local/domain/5"):
        assert w.changes_scan(path), path
    for path in (f"{ROOT}/7/0/state", f"{ROOT}/7/0/feature-sg", f"{ROOT}/7/0/mac",
                 f"{ROOT}/7/0/x/y", "/local/domain/5/backend/vbd/7/0",
                 "/local/domain/5/backend/vifs", "/local/domain/6/device/vif/0"):
        assert not w.changes_scan(path), path


def test_a_devices_own_writes_cost_no_scan_and_queued_events_cost_one() -> None:
    """Writing a device's state and features does not make the watcher look
    again; a burst of device directories (a rebind) is found in few scans."""
    scans = 0
    served: list[str] = []

    class Counting(BackendWatcher):
        async def _scan(self, nursery) -> None:
            nonlocal scans
            scans += 1
            await super()._scan(nursery)

    async def main() -> None:
        xs = _store()

        async def serve(path: str) -> None:
            served.append(path)
            await trio.sleep_forever()
        w = Counting(xs, 5, "vif", serve, stall_timeout=0)

        async def burst() -> None:
            async def body(t) -> None:
                for fe in range(10, 18):
                    await t.write(f"{ROOT}/{fe}/0/frontend", f"/local/domain/{fe}/device/vif/0")
                    await t.write(f"{ROOT}/{fe}/0/online", "1")
                    await t.write(f"{ROOT}/{fe}/0/state", "1")
            await xs.run_transaction(body)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(w.run)
            await wait_all_tasks_blocked()
            first = scans
            await burst()
            await wait_all_tasks_blocked()
            assert len(served) == 8
            assert scans - first <= 2            # not one per event (24 of them)
            before = scans
            for fe in range(10, 18):             # the backends' own writes
                for key in ("state", "feature-sg", "feature-rx-copy"):
                    await xs.write(f"{ROOT}/{fe}/0/{key}", b"2")
            await wait_all_tasks_blocked()
            assert scans == before
            await xs.rm(f"{ROOT}/12")            # a device goes: found, and its task stopped
            await wait_all_tasks_blocked()
            assert scans == before + 1 and sorted(w.running) == sorted(
                f"{ROOT}/{fe}/0" for fe in range(10, 18) if fe != 12)
            nursery.cancel_scope.cancel()
    trio.run(main, clock=MockClock())     # time stands still: no periodic re-scan


def test_wait_until_does_not_check_again_for_a_watchs_initial_event() -> None:
    async def main() -> None:
        xs = _store()
        await xs.write("/a/state", b"1")
        calls = 0

        async def check():
            nonlocal calls
            calls += 1
            return (await xs.read("/a/state")) == b"4"
        with trio.move_on_after(0.1):
            await wait_until(xs, ["/a/state", "/a/other"], check, poll=10)
        assert calls == 1
        calls = 0
        async with trio.open_nursery() as nursery:
            async def change() -> None:
                await trio.sleep(0.05)
                await xs.write("/a/state", b"4")
            nursery.start_soon(change)
            with trio.fail_after(2):
                assert await wait_until(xs, ["/a/state"], check, poll=10)
        assert calls == 2
        assert not xs._watch_channels         # every watch removed afterwards
    trio.run(main, clock=MockClock(autojump_threshold=0))


def test_take_queued_returns_what_has_arrived_without_waiting() -> None:
    async def main() -> None:
        xs = _store()
        w = await xs.watch("/q")
        await trio.sleep(0)
        for i in range(3):
            await xs.write(f"/q/{i}", b"x")
        assert [e.path for e in w.take_queued()] == ["/q", "/q/0", "/q/1", "/q/2"]
        assert w.take_queued() == []
        await w.unwatch()
    trio.run(main)


def test_publish_writes_every_node_in_one_transaction_and_only_for_a_waiting_backend() -> None:
    fe, be = "/local/domain/7/device/vif/0", "/local/domain/5/backend/vif/7/0"

    async def main() -> None:
        xs = _store()
        await xs.write(f"{fe}/backend", be.encode())
        await xs.write(f"{fe}/backend-id", b"5")
        await xs.write(f"{be}/state", b"1")
        dev = FrontendDevice(xs, 7, "vif", 0)
        nodes = [("tx-ring-ref", "8"), ("rx-ring-ref", "9"), ("event-channel", "3")]
        # Not waiting for us (Initialising): nothing is written.
        assert not await publish_and_wait_connected(dev, be, nodes)
        assert await xs.directory(fe) == ["backend", "backend-id"]
        await xs.write(f"{be}/state", b"2")
        seen: list[list[str]] = []

        async def backend() -> None:
            w = await xs.watch(f"{fe}/state")
            async for _ in w:
                if await read_node(xs, f"{fe}/state") == b"3":
                    seen.append(sorted(await xs.directory(fe)))
                    await xs.write(f"{be}/state", b"4")
                    return
        async with trio.open_nursery() as nursery:
            nursery.start_soon(backend)
            await trio.sleep(0.01)
            with trio.fail_after(2):
                assert await publish_and_wait_connected(dev, be, nodes)
        # The backend's first sight of Initialised came with every node.
        assert seen == [sorted(["backend", "backend-id", "tx-ring-ref", "rx-ring-ref",
                                "event-channel", "state"])]
        assert XenbusState(int(await xs.read(f"{fe}/state"))) == XenbusState.Initialised
    trio.run(main)


def test_standing_watches_follow_the_backend_and_cost_no_watch_per_wait() -> None:
    """With :meth:`FrontendDevice.watch_otherend`, waits set and remove no
    watches; the state watch moves when ``backend`` names a new backend (a
    re-created driver domain), and is gone with the device's nursery."""
    fe = "/local/domain/7/device/vif/0"
    old, new = "/local/domain/5/backend/vif/7/0", "/local/domain/9/backend/vif/7/0"

    async def main() -> None:
        xs = _store()
        requests: list[str] = []
        for name in ("watch", "unwatch"):
            def counting(*args, _real=getattr(xs, name), _name=name, **kw):
                requests.append(_name)
                return _real(*args, **kw)
            setattr(xs, name, counting)
        await xs.write(f"{fe}/backend", old.encode())
        await xs.write(f"{fe}/backend-id", b"5")
        await xs.write(f"{old}/state", b"4")
        dev = FrontendDevice(xs, 7, "vif", 0)
        async with trio.open_nursery() as nursery:
            await dev.watch_otherend(nursery)
            with trio.fail_after(2):
                assert await dev.wait_for_backend({XenbusState.Connected}) == (old, 5)
                set_up = list(requests)
                assert set_up == ["watch", "watch"]          # backend, then old/state

                async def crash_and_rebind() -> None:
                    await trio.sleep(0.05)
                    await xs.write(f"{old}/state", b"6")
                    await trio.sleep(0.05)
                    await xs.write(f"{new}/state", b"2")
                    await xs.write(f"{fe}/backend-id", b"9")
                    await xs.write(f"{fe}/backend", new.encode())
                nursery.start_soon(crash_and_rebind)
                assert await dev.wait_for_backend_gone(old) == "backend state Closed"
                assert requests == set_up                    # that wait set no watch
                assert await dev.wait_for_backend({XenbusState.InitWait}, avoid=old) == (new, 9)
                assert requests == set_up + ["unwatch", "watch"]   # moved to new/state
                assert dev.otherend.following == new
            nursery.cancel_scope.cancel()
        assert not xs._watch_channels       # every watch removed with the device
    trio.run(main)


@pytest.mark.parametrize("point", ["evtchn.send", "hypercall.nowait"])
def test_the_xenstore_doorbell_is_outside_the_notification_fault_points(point: str) -> None:
    """A device's notifications may be dropped by a fault; the XenStore ring's
    doorbell (Port.kick) is not, so a driver domain's control plane goes on."""
    async def main() -> None:
        shared_info, bell = SharedInfo(bytearray(PAGE_SIZE)), os.eventfd(0, os.EFD_NONBLOCK)
        try:
            port = Port(EventChannels(shared_info, bell), 3)
            faultpoint.arm(faultpoint.parse_spec("f", f"point={point} action=drop"))
            port.notify_nowait()
            assert shared_info.take_send_requests() == []
            await port.kick()
            assert shared_info.take_send_requests() == [3]
            assert os.eventfd_read(bell) == 1          # rung once: by the kick
        finally:
            faultpoint.disarm(point)
            os.close(bell)
    trio.run(main)
