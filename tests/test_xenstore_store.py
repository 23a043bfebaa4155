"""Unit tests of xenstored's semantics through in-process connections.

These exercise the daemon core (store, permissions, quota, transactions,
watches, domains) without a transport; the socket and ring tests repeat the
important cases over real transports.
"""

from __future__ import annotations

import functools

import pytest
import trio

from domains.dom0.xenstored import (Quota, XenStore, remove_domain_entries,
                                    write_domain_entries)
from ipc.xs_wire import XenStoreError


def trio_test(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        async def main():
            with trio.fail_after(30):
                await fn(*args, **kwargs)
        trio.run(main)
    return wrapper


async def expect_error(name: str, coro):
    with pytest.raises(XenStoreError) as info:
        await coro
    assert info.value.name == name, info.value
    return info.value


async def no_more_events(w):
    """Assert nothing is queued on a watch (everything here is synchronous)."""
    await trio.testing.wait_all_tasks_blocked()
    with trio.move_on_after(0) as scope:
        ev = await w.next()
        pytest.fail(f"unexpected event {ev}")
    assert scope.cancelled_caught


import trio.testing  # noqa: E402  (used above)


# -- basic database operations ---------------------------------------------------

@trio_test
async def test_write_read_mkdir_rm_directory():
    xs = XenStore().connect()
    await xs.write("/a/b/c", b"v1")
    assert await xs.read("/a/b/c") == b"v1"
    assert await xs.read("/a/b") == b""                      # parents made empty
    assert await xs.directory("/a") == ["b"]
    await xs.write("/a/b", "dir-value")
    await xs.mkdir("/a/b")                                   # keeps the value
    assert await xs.read("/a/b") == b"dir-value"
    await xs.write("/a/bin", b"\0\1\2binary")
    assert await xs.read("/a/bin") == b"\0\1\2binary"
    assert await xs.directory("/a") == ["b", "bin"]
    await xs.rm("/a/b")
    assert await xs.directory("/a") == ["bin"]
    await expect_error("ENOENT", xs.read("/a/b/c"))
    await xs.rm("/a/nothing")                                # parent exists: fine
    await expect_error("ENOENT", xs.rm("/a/no/thing"))
    await expect_error("EINVAL", xs.rm("/"))
    assert "a" in await xs.directory("/")


@pytest.mark.parametrize("bad", ["", "/a//b", "/a/", "/a b", "/ä", "@other",
                                 "/" + "x" * 3100])
@trio_test
async def test_bad_paths_are_einval(bad):
    xs = XenStore().connect()
    await expect_error("EINVAL", xs.write(bad, b"x"))


@trio_test
async def test_relative_paths_resolve_to_domain_home():
    store = XenStore()
    dom0 = store.connect()
    await dom0.mkdir("/local/domain/3")
    await dom0.set_perms("/local/domain/3", ["n3"])
    guest = store.connect(3)
    await guest.write("data/x", "1")
    assert await dom0.read("/local/domain/3/data/x") == b"1"
    assert await guest.get_domain_path(7) == "/local/domain/7"


@trio_test
async def test_directory_part_pages_long_lists():
    store = XenStore()
    xs = store.connect()
    names = [f"child-with-a-long-name-{i:04d}" for i in range(400)]
    for n in names:
        await xs.write(f"/big/{n}", "")
    caller = xs
    got, offset = [], 0
    gen0 = None
    while True:
        gen, chunk = store.directory_part(caller, "/big", offset)
        gen0 = gen0 or gen
        assert gen == gen0
        assert len(chunk) < 4096
        parts = chunk.split(b"\0")
        if chunk.endswith(b"\0\0") or chunk == b"\0":
            got += [p.decode() for p in parts if p]
            break
        got += [p.decode() for p in parts if p]
        offset += len(chunk)
    assert got == names


# -- permissions -------------------------------------------------------------------

@trio_test
async def test_guest_permissions_follow_xen_rules():
    store = XenStore()
    dom0 = store.connect()
    await write_domain_entries(dom0, 5, "guest5", memory_kb=1024)
    await write_domain_entries(dom0, 6, "guest6", memory_kb=1024)
    g5 = store.connect(5)
    # Reads its own home (r5), cannot rewrite the name dom0 set.
    assert await g5.read("/local/domain/5/name") == b"guest5"
    assert await g5.read("name") == b"guest5"
    await expect_error("EACCES", g5.write("name", "evil"))
    await expect_error("EACCES", g5.write("memory/target", "999999"))
    # Cannot see or touch another guest, nor the root.
    await expect_error("EACCES", g5.read("/local/domain/6/name"))
    await expect_error("EACCES", g5.write("/local/domain/6/data/x", "1"))
    await expect_error("EACCES", g5.directory("/"))
    await expect_error("EACCES", g5.write("/evil", "1"))
    # Owns data/ and what it creates there.
    await g5.write("data/mine", "ok")
    assert await g5.get_perms("data/mine") == ["n5"]
    await g5.write("control/shutdown", "poweroff")
    # May share, may not give away.
    await g5.set_perms("data/mine", ["n5", "r6"])
    g6 = store.connect(6)
    assert await g6.read("/local/domain/5/data/mine") == b"ok"
    await expect_error("EACCES", g6.write("/local/domain/5/data/mine", "x"))
    await expect_error("EPERM", g5.set_perms("data/mine", ["n6"]))
    await expect_error("EACCES", g5.set_perms("name", ["b5"]))
    # Privileged operations.
    await expect_error("EACCES", g5.introduce(9))
    await expect_error("EACCES", g5.control("help"))
    # Bad permission strings are EINVAL.
    await expect_error("EINVAL", dom0.set_perms("/local", ["x0"]))
    await expect_error("EINVAL", dom0.set_perms("/local", []))


@trio_test
async def test_dom0_node_created_in_guest_dir_inherits_perms():
    store = XenStore()
    dom0 = store.connect()
    await write_domain_entries(dom0, 5, "g", memory_kb=1)
    await dom0.write("/local/domain/5/device/vif/0/mac", "00:16:3e:00:00:01")
    assert await dom0.get_perms("/local/domain/5/device/vif/0/mac") == ["n0", "r5"]


# -- quota ---------------------------------------------------------------------------

@trio_test
async def test_quotas_refuse_and_change_nothing():
    store = XenStore(Quota(max_nodes=30, max_node_size=256, max_watches=3,
                           max_transactions=2))
    dom0 = store.connect()
    await write_domain_entries(dom0, 5, "g", memory_kb=1)
    g5 = store.connect(5)
    owned = store.tree.nodes_by_owner[5]
    err = await expect_error("E2BIG", g5.write("data/big", b"x" * 300))
    assert "data/big" in str(err)
    await expect_error("ENOENT", g5.read("data/big"))
    for i in range(30 - owned):
        await g5.write(f"data/n{i}", "")
    await expect_error("EQUOTA", g5.write("data/one-too-many", ""))
    await expect_error("EQUOTA", g5.mkdir("data/x/y/z"))
    await expect_error("ENOENT", g5.read("data/x"))
    await g5.rm("data/n0")
    await g5.write("data/fits-again", "")
    # dom0 is exempt.
    await dom0.write("/local/domain/5/data/huge", b"y" * 3000)
    # Watches and transactions.
    for i in range(3):
        await g5.watch("data", f"t{i}")
    await expect_error("EQUOTA", g5.watch("data", "t3"))
    await g5.transaction_start()
    await g5.transaction_start()
    await expect_error("EQUOTA", g5.transaction_start())


# -- transactions ----------------------------------------------------------------------

@trio_test
async def test_transaction_isolation_commit_and_abort():
    store = XenStore()
    a, b = store.connect(), store.connect()
    await a.write("/t/x", "0")
    tx = await a.transaction_start()
    await a.write("/t/x", "1", tx)
    await a.write("/t/new/leaf", "n", tx)
    assert await a.read("/t/x", tx) == b"1"
    assert await b.read("/t/x") == b"0"                 # not visible yet
    await expect_error("ENOENT", b.read("/t/new/leaf"))
    assert sorted(await a.directory("/t", tx)) == ["new", "x"]
    await a.transaction_end(tx, True)
    assert await b.read("/t/new/leaf") == b"n"
    tx = await a.transaction_start()
    await a.rm("/t/new", tx)
    await a.transaction_end(tx, False)                  # abort
    assert await b.read("/t/new/leaf") == b"n"
    await expect_error("ENOENT", a.transaction_end(tx, True))
    await expect_error("ENOENT", a.read("/t/x", 12345))
    assert store.check() == []


@trio_test
async def test_transaction_conflict_is_eagain_and_disjoint_commits():
    store = XenStore()
    a, b = store.connect(), store.connect()
    await a.write("/c/shared", "0")
    await a.write("/c/other", "0")
    t1 = await a.transaction_start()
    assert await a.read("/c/shared", t1) == b"0"
    await a.write("/c/shared", "from-t1", t1)
    t2 = await b.transaction_start()
    await b.write("/c/other", "from-t2", t2)             # disjoint: both commit
    await b.transaction_end(t2, True)
    await a.transaction_end(t1, True)
    t3 = await a.transaction_start()
    assert await a.read("/c/shared", t3) == b"from-t1"
    await b.write("/c/shared", "interloper")             # committed meanwhile
    await a.write("/c/shared", "from-t3", t3)
    await expect_error("EAGAIN", a.transaction_end(t3, True))
    assert await a.read("/c/shared") == b"interloper"
    # A transaction that created a child conflicts with a concurrent rm of the parent.
    t4 = await a.transaction_start()
    await a.write("/c/dir/child", "x", t4)
    await b.rm("/c")
    await expect_error("EAGAIN", a.transaction_end(t4, True))
    await expect_error("ENOENT", a.read("/c"))


@trio_test
async def test_run_transaction_retries_on_eagain():
    store = XenStore()
    a, b = store.connect(), store.connect()
    await a.write("/counter", "0")
    attempts = 0

    async def body(t):
        nonlocal attempts
        attempts += 1
        v = int(await t.read("/counter"))
        if attempts == 1:
            await b.write("/counter", "100")              # force one conflict
        await t.write("/counter", str(v + 1))
        return v + 1

    assert await a.run_transaction(body) == 101
    assert attempts == 2 and await a.read("/counter") == b"101"


# -- watches -------------------------------------------------------------------------

@trio_test
async def test_watch_initial_event_order_and_subtree():
    store = XenStore()
    xs = store.connect()
    w = await xs.watch("/w", "tok")
    assert (await w.next(5)).path == "/w"                 # initial event, even if absent
    for i in range(20):
        await xs.write(f"/w/k{i}", str(i))
    paths = [(await w.next(5)).path for _ in range(20)]
    assert paths == [f"/w/k{i}" for i in range(20)]       # in commit order
    await xs.write("/elsewhere", "x")
    await xs.rm("/w")
    ev = await w.next(5)
    assert (ev.path, ev.token) == ("/w", "tok")
    await no_more_events(w)
    await w.unwatch()
    await xs.write("/w/again", "1")
    await expect_error("ENOENT", xs.unwatch("/w", "tok"))


@trio_test
async def test_removing_an_ancestor_fires_watches_below_with_wpath():
    store = XenStore()
    xs = store.connect()
    await xs.write("/top/mid/leaf", "1")
    w = await xs.watch("/top/mid/leaf", "deep")
    await w.next(5)
    await xs.rm("/top")
    assert (await w.next(5)).path == "/top/mid/leaf"


@trio_test
async def test_relative_watch_gives_relative_paths_and_perms_filter():
    store = XenStore()
    dom0 = store.connect()
    await write_domain_entries(dom0, 4, "g4", memory_kb=1)
    g4 = store.connect(4)
    w = await g4.watch("control", "ctl")
    assert (await w.next(5)).path == "control"
    await dom0.write("/local/domain/4/control/shutdown", "reboot")
    assert (await w.next(5)).path == "control/shutdown"
    # A node the guest may not read does not produce an event for it.
    wroot = await g4.watch("/", "root")
    await wroot.next(5)
    await dom0.write("/secret/key", "x")
    await dom0.write("/local/domain/4/data/visible", "y")
    assert (await wroot.next(5)).path == "/local/domain/4/data/visible"
    await no_more_events(wroot)


@trio_test
async def test_duplicate_watch_is_eexist_and_reset_watches():
    store = XenStore()
    xs = store.connect()
    w = await xs.watch("/d", "t")
    await expect_error("EEXIST", xs.watch("/d", "t"))
    await xs.watch("/d", "t2")
    await xs.reset_watches()
    await xs.watch("/d", "t")                              # free again
    assert w is not None


@trio_test
async def test_transaction_events_fire_on_commit_only():
    store = XenStore()
    xs, watcher = store.connect(), store.connect()
    w = await watcher.watch("/tx", "t")
    await w.next(5)
    tx = await xs.transaction_start()
    await xs.write("/tx/a", "1", tx)
    await no_more_events(w)
    await xs.transaction_end(tx, True)
    assert (await w.next(5)).path == "/tx/a"
    tx = await xs.transaction_start()
    await xs.write("/tx/b", "1", tx)
    await xs.transaction_end(tx, False)
    await no_more_events(w)


@trio_test
async def test_special_watches_introduce_and_release():
    store = XenStore()
    dom0 = store.connect()
    wi = await dom0.watch("@introduceDomain", "i")
    wr = await dom0.watch("@releaseDomain", "r")
    assert (await wi.next(5)).path == "@introduceDomain"
    assert (await wr.next(5)).path == "@releaseDomain"
    assert not await dom0.is_domain_introduced(7)
    store.introduce_domain(7)
    assert (await wi.next(5)).path == "@introduceDomain"
    assert await dom0.is_domain_introduced(7)
    store.release_domain(7)
    assert (await wr.next(5)).path == "@releaseDomain"
    assert not await dom0.is_domain_introduced(7)
    await expect_error("ENOENT", dom0.release(7))
    await expect_error("EINVAL", dom0.introduce(0))
    # A guest sees special events only if dom0 allowed it.
    g = store.connect(8)
    wg = await g.watch("@releaseDomain", "g")
    await wg.next(5)
    store.introduce_domain(9)
    store.release_domain(9)
    await no_more_events(wg)
    await dom0.set_perms("@releaseDomain", ["n0", "r8"])
    assert await dom0.get_perms("@releaseDomain") == ["n0", "r8"]
    store.introduce_domain(9)
    store.release_domain(9)
    assert (await wg.next(5)).path == "@releaseDomain"


# -- domains ---------------------------------------------------------------------------

@trio_test
async def test_domain_entries_written_and_removed():
    store = XenStore()
    dom0 = store.connect()
    home = await write_domain_entries(dom0, 12, "web", memory_kb=262144, vcpus=2,
                                      uuid="00000000-0000-0000-0000-00000000000c")
    assert home == "/local/domain/12"
    assert await dom0.read(f"{home}/name") == b"web"
    assert await dom0.read(f"{home}/domid") == b"12"
    assert await dom0.read(f"{home}/memory/target") == b"262144"
    assert await dom0.read(f"{home}/cpu/1/availability") == b"online"
    vm = (await dom0.read(f"{home}/vm")).decode()
    assert await dom0.read(f"{vm}/name") == b"web"
    assert await dom0.get_perms(home) == ["n0", "r12"]
    assert await dom0.get_perms(f"{home}/control/shutdown") == ["n12"]
    await remove_domain_entries(dom0, 12)
    assert not await dom0.exists(home)
    assert not await dom0.exists(vm)
    assert not await dom0.exists("/libxl/12")
    await remove_domain_entries(dom0, 12)                  # idempotent
    assert store.check() == []


@trio_test
async def test_control_subset():
    xs = XenStore().connect()
    assert b"check" in await xs.control("help")
    assert await xs.control("check") == b"OK\0"
    await expect_error("EINVAL", xs.control("frobnicate"))
