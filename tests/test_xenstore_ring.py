"""Integration tests: a guest in another process talks to xenstored over a
real shared-memory ring (a memfd page mapped by both) with real cross-process
event-channel kicks (a byte on a socketpair).

This file is also the guest program: ``python -m tests.test_xenstore_ring
guest <page-fd> <kick-fd> <scenario>`` runs one scenario as domain 5 and
prints a JSON report on stdout.
"""

from __future__ import annotations

import json
import mmap
import os
import socket
import struct
import sys
from contextlib import contextmanager

import pytest
import trio

from domains.dom0.xenstored import (Quota, XenStore, serve_ring,
                                    write_domain_entries)
from ipc.xs_ring import (XENSTORE_ERROR_PROTO, XENSTORE_ERROR_RINGIDX,
                         XENSTORE_SERVER_FEATURE_ERROR, XenstoreRing)
from ipc.xs_wire import XenStoreError, XsType

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUEST = 5


# -- the event channel stand-in -------------------------------------------------------

def kick_pair(sock: socket.socket):
    """notify/wait callables over one end of a socketpair.

    A kick is one byte; many kicks coalesce like an event channel's pending
    bit: ``wait`` drains whatever has arrived.
    """
    sock.setblocking(False)
    tsock = trio.socket.from_stdlib_socket(sock)

    async def notify() -> None:
        await trio.lowlevel.checkpoint()
        try:
            sock.send(b"!")
        except BlockingIOError:
            pass                     # the peer already has kicks pending

    async def wait() -> None:
        data = await tsock.recv(4096)
        if not data:
            await trio.sleep_forever()   # peer gone: no more kicks, ever
    return notify, wait


@contextmanager
def shared_page():
    fd = os.memfd_create("xenstore-ring")
    os.ftruncate(fd, 4096)
    page = mmap.mmap(fd, 4096)
    try:
        yield fd, page
    finally:
        page.close()
        os.close(fd)


# -- the guest side (runs in the child process) -------------------------------------------

async def guest_main(page_fd: int, kick_fd: int, scenario: str) -> dict:
    from domains.kernel.xenstore import open_ring_client
    page = mmap.mmap(page_fd, 4096)
    notify, wait = kick_pair(socket.socket(fileno=kick_fd))
    report: dict = {}

    async def err(coro) -> str:
        try:
            await coro
            return "OK"
        except XenStoreError as e:
            return e.name

    try:
        if scenario == "raw-oversized":
            ring = XenstoreRing(page)
            ring.write_request(struct.pack("<IIII", XsType.WRITE, 1, 0, 100_000))
            ring.release()
            await notify()
            return {"sent": True}
        if scenario == "raw-bad-index":
            ring = XenstoreRing(page)
            ring.req_prod = ring.req_cons + 5000
            ring.release()
            await notify()
            return {"sent": True}
        async with open_ring_client(page, notify, wait) as xs:
            if scenario == "basic":
                await xs.write("data/hello", "from the guest")
                report["read"] = (await xs.read("data/hello")).decode()
                report["abs"] = (await xs.read(f"/local/domain/{GUEST}/name")).decode()
                report["dir"] = await xs.directory(f"/local/domain/{GUEST}")
                report["perms"] = await xs.get_perms("data/hello")
                with XenstoreRing(page) as ring:
                    report["features"] = ring.server_features
                w = await xs.watch("control/shutdown", "sd")
                report["initial"] = (await w.next(10)).path
                await xs.write("data/watch-ready", "1")
                ev = await w.next(20)
                report["event"] = [ev.path, ev.token]
                report["shutdown"] = (await xs.read("control/shutdown")).decode()

                async def bump(t):
                    v = int(await t.read("data/counter") or b"0")
                    await t.write("data/counter", str(v + 1))
                await xs.write("data/counter", "41")
                await xs.run_transaction(bump)
                report["counter"] = (await xs.read("data/counter")).decode()
                # Pipelining across the small ring: many requests in flight.
                async with trio.open_nursery() as n:
                    for i in range(64):
                        n.start_soon(xs.write, f"data/p/{i}", "x" * 200)
                report["pipelined"] = len(await xs.directory("data/p"))
            elif scenario == "attack":
                report["read_other"] = await err(xs.read("/local/domain/6/name"))
                report["list_other"] = await err(xs.directory("/local/domain/6"))
                report["write_other"] = await err(xs.write("/local/domain/6/data/x", "1"))
                report["write_name"] = await err(xs.write("name", "pwned"))
                report["write_target"] = await err(xs.write("memory/target", "99999999"))
                report["write_root"] = await err(xs.write("/evil", "1"))
                report["list_root"] = await err(xs.directory("/"))
                report["give_away"] = await err(xs.set_perms("data", [f"n6"]))
                report["chmod_name"] = await err(xs.set_perms("name", [f"b{GUEST}"]))
                report["introduce"] = await err(xs.introduce(7, 1, 1))
                report["release"] = await err(xs.release(6))
                report["control"] = await err(xs.control("help"))
                report["is_introduced"] = await err(xs.is_domain_introduced(6))
                report["dotdot"] = await err(xs.read("../6/name"))
                report["special_perms"] = await err(xs.set_perms("@releaseDomain", [f"b{GUEST}"]))
                report["big_value"] = await err(xs.write("data/big", "x" * 3000))
                created = 0
                while created < 100:
                    r = await err(xs.write(f"data/q{created}", ""))
                    if r != "OK":
                        report["quota"] = r
                        break
                    created += 1
                report["created"] = created
                report["watches"] = [await err(xs.watch("data", f"w{i}")) for i in range(4)]
                report["tx"] = [await err(xs.transaction_start()) for _ in range(3)]
                report["still_ok"] = (await xs.read("name")).decode()
        return report
    finally:
        page.close()


# -- the dom0 side ------------------------------------------------------------------------

async def run_guest(page_fd: int, kick_fd: int, scenario: str) -> dict:
    with trio.fail_after(60):
        proc = await trio.run_process(
            [sys.executable, "-m", "tests.test_xenstore_ring", "guest",
             str(page_fd), str(kick_fd), scenario],
            cwd=REPO, pass_fds=(page_fd, kick_fd), capture_stdout=True,
            capture_stderr=True, check=False)
    assert proc.returncode == 0, proc.stderr.decode()
    return json.loads(proc.stdout.decode().strip().splitlines()[-1])


def run_with_guest(scenario: str, dom0_task=None, quota: Quota | None = None):
    """Serve domain 5's ring in this process while the guest runs in a child."""
    store = XenStore(quota)
    out = {}
    with shared_page() as (page_fd, page):
        ours, theirs = socket.socketpair()
        try:
            async def main():
                dom0 = store.connect()
                await write_domain_entries(dom0, GUEST, "guest5", memory_kb=65536)
                await write_domain_entries(dom0, 6, "guest6", memory_kb=65536)
                notify, wait = kick_pair(ours)
                async with trio.open_nursery() as n:
                    await n.start(serve_ring, store, GUEST, page, notify, wait)
                    if dom0_task:
                        n.start_soon(dom0_task, store, dom0)
                    out["report"] = await run_guest(page_fd, theirs.fileno(), scenario)
                    n.cancel_scope.cancel()
                out["ring"] = XenstoreRing(page)
                out["error"] = out["ring"].error
                out["ring"].release()
                # The daemon still serves everyone else.
                await dom0.write("/after", "fine")
                out["after"] = await dom0.read("/after")
            trio.run(main)
        finally:
            ours.close()
            theirs.close()
    return store, out


def test_guest_over_shared_memory_ring():
    async def dom0_task(store, dom0):
        w = await dom0.watch(f"/local/domain/{GUEST}/data/watch-ready")
        await w.next(10)
        await w.next(60)                       # the guest wrote it: its watch is set
        await dom0.write(f"/local/domain/{GUEST}/control/shutdown", "poweroff")

    store, out = run_with_guest("basic", dom0_task)
    r = out["report"]
    assert r["read"] == "from the guest" and r["abs"] == "guest5"
    assert "data" in r["dir"] and "control" in r["dir"]
    assert r["perms"] == [f"n{GUEST}"]
    assert r["features"] & XENSTORE_SERVER_FEATURE_ERROR
    assert r["initial"] == "control/shutdown"
    assert r["event"] == ["control/shutdown", "sd"]
    assert r["shutdown"] == "poweroff"
    assert r["counter"] == "42"
    assert r["pipelined"] == 64
    assert out["error"] == 0 and out["after"] == b"fine"
    assert store.tree.get(f"/local/domain/{GUEST}/data/hello").value == b"from the guest"


def test_malicious_guest_is_refused_and_limited():
    store, out = run_with_guest("attack", quota=Quota(max_nodes=40, max_node_size=2048,
                                                      max_watches=2, max_transactions=2))
    r = out["report"]
    for k in ("read_other", "list_other", "write_other", "write_name", "write_target",
              "write_root", "list_root", "chmod_name", "introduce", "release",
              "control", "is_introduced", "special_perms"):
        assert r[k] == "EACCES", (k, r[k])
    assert r["give_away"] == "EPERM"
    assert r["dotdot"] == "EINVAL"
    assert r["big_value"] == "E2BIG"
    assert r["quota"] == "EQUOTA" and 0 < r["created"] < 40
    assert r["watches"] == ["OK", "OK", "EQUOTA", "EQUOTA"]
    assert r["tx"][:2] != ["EQUOTA", "EQUOTA"] and r["tx"][2] == "EQUOTA"
    assert r["still_ok"] == "guest5"
    # Nothing the guest tried changed what it may not touch.
    assert store.tree.get("/local/domain/6/name").value == b"guest6"
    assert store.tree.get(f"/local/domain/{GUEST}/name").value == b"guest5"
    assert store.tree.get("/evil") is None
    assert store.tree.get(f"/local/domain/{GUEST}/data/big") is None
    assert not store.domains.is_introduced(7)
    assert store.check() == []


@pytest.mark.parametrize("scenario,error", [("raw-oversized", XENSTORE_ERROR_PROTO),
                                            ("raw-bad-index", XENSTORE_ERROR_RINGIDX)])
def test_ring_protocol_violation_sets_error_and_daemon_carries_on(scenario, error):
    seen = {}
    store = XenStore()
    with shared_page() as (page_fd, page):
        ours, theirs = socket.socketpair()
        try:
            async def main():
                dom0 = store.connect()
                await write_domain_entries(dom0, GUEST, "guest5", memory_kb=1)
                notify, wait = kick_pair(ours)
                with trio.fail_after(60):
                    async with trio.open_nursery() as n:
                        await n.start(serve_ring, store, GUEST, page, notify, wait)
                        await run_guest(page_fd, theirs.fileno(), scenario)
                        ring = XenstoreRing(page)
                        while ring.error == 0:
                            await trio.sleep(0.01)
                        seen["error"] = ring.error
                        ring.release()
                        n.cancel_scope.cancel()
                await dom0.write("/after", "fine")
                seen["after"] = await dom0.read("/after")
            trio.run(main)
        finally:
            ours.close()
            theirs.close()
    assert seen == {"error": error, "after": b"fine"}


def test_release_domain_stops_its_ring_server():
    store = XenStore()
    with shared_page() as (_, page):
        a, b = socket.socketpair()
        try:
            async def main():
                notify, wait = kick_pair(a)
                dom0 = store.connect()
                wr = await dom0.watch("@releaseDomain")
                await wr.next(5)
                with trio.fail_after(20):
                    async with trio.open_nursery() as n:
                        await n.start(serve_ring, store, 9, page, notify, wait)
                        assert store.domains.is_introduced(9)
                        store.release_domain(9)
                    # serve_ring returned by itself: the nursery closed.
                assert (await wr.next(5)).path == "@releaseDomain"
            trio.run(main)
        finally:
            a.close()
            b.close()


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "guest":
    result = trio.run(guest_main, int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
    print(json.dumps(result))
