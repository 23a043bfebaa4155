"""Integration tests: xenstored over its real Unix socket.

Clients are the kernel's XenStore client, raw sockets sending hostile bytes,
and Debian's own xenstore-utils (the C libxenstore) via XENSTORED_PATH.
"""

from __future__ import annotations

import functools
import inspect
import os
import shutil
import socket
import struct

import pytest
import trio

from domains.dom0.xenstored import XenStore, serve_socket, write_domain_entries
from domains.kernel.xenstore import open_socket_client
from ipc.xs_wire import (Decoder, XenStoreError, XsType, encode, split_strings)

HAVE_TOOLS = shutil.which("xenstore-read") is not None


def with_daemon(fn):
    """Run ``fn(store, path)`` inside trio with xenstored on a fresh socket."""
    @functools.wraps(fn)
    def wrapper(tmp_path, *args, **kwargs):
        path = str(tmp_path / "xenstored" / "socket")

        async def main():
            store = XenStore()
            with trio.fail_after(60):
                async with trio.open_nursery() as nursery:
                    await nursery.start(serve_socket, store, path)
                    await fn(store, path, *args, **kwargs)
                    nursery.cancel_scope.cancel()
        trio.run(main)
        assert not os.path.exists(path), "socket file left behind"
    # pytest sees tmp_path plus the test's own parameters, not store/path.
    params = list(inspect.signature(fn).parameters.values())[2:]
    del wrapper.__wrapped__
    wrapper.__signature__ = inspect.Signature(
        [inspect.Parameter("tmp_path", inspect.Parameter.POSITIONAL_OR_KEYWORD)] + params)
    return wrapper


class RawClient:
    """A bare xsd_sockmsg speaker for hostile and exact-bytes tests."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.decoder = Decoder(strict_types=False)
        self.ready: list = []

    @classmethod
    async def connect(cls, path: str) -> "RawClient":
        s = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await s.connect(path)
        return cls(s)

    async def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[await self.sock.send(view):]

    async def recv_msg(self):
        while not self.ready:
            data = await self.sock.recv(65536)
            if not data:
                return None
            self.ready += self.decoder.feed(data)
        return self.ready.pop(0)

    async def call(self, type_, payload: bytes, req_id: int = 1, tx: int = 0):
        await self.send(encode(type_, req_id, tx, payload))
        return await self.recv_msg()

    def close(self) -> None:
        self.sock.close()


async def run_tool(path: str, *argv: str, check: bool = True) -> str:
    env = dict(os.environ, XENSTORED_PATH=path)
    with trio.fail_after(20):
        proc = await trio.run_process(list(argv), env=env, capture_stdout=True,
                                      capture_stderr=True, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{argv} exited {proc.returncode}: {proc.stderr!r}")
    return proc.stdout.decode()


# -- the kernel client over the socket ---------------------------------------------

@with_daemon
async def test_kernel_client_basic_and_pipelined(store, path):
    async with open_socket_client(path) as xs:
        await xs.write("/k/a", "1")
        assert await xs.read("/k/a") == b"1"
        assert await xs.directory("/k") == ["a"]
        assert await xs.get_perms("/k/a") == ["n0"]
        await xs.set_perms("/k/a", ["n0", "r3"])
        assert await xs.get_perms("/k/a") == ["n0", "r3"]
        with pytest.raises(XenStoreError) as e:
            await xs.read("/k/missing")
        assert e.value.name == "ENOENT"
        results = {}

        async def one(i):
            await xs.write(f"/k/p{i}", str(i))
            results[i] = await xs.read(f"/k/p{i}")
        async with trio.open_nursery() as n:
            for i in range(200):
                n.start_soon(one, i)
        assert results == {i: str(i).encode() for i in range(200)}
        assert await xs.get_domain_path(4) == "/local/domain/4"
        assert not await xs.is_domain_introduced(4)
        await xs.introduce(4, 123, 5)
        assert await xs.is_domain_introduced(4)
        await xs.release(4)
        assert b"OK" in await xs.control("check")


@with_daemon
async def test_kernel_client_watch_and_transactions(store, path):
    async with open_socket_client(path) as a, open_socket_client(path) as b:
        w = await a.watch("/wt", "tok")
        assert (await w.next(5)).path == "/wt"
        await b.write("/wt/x", "1")
        ev = await w.next(5)
        assert (ev.path, ev.token) == ("/wt/x", "tok")
        t = await a.transaction_start()
        await a.write("/wt/x", "2", t)
        await b.write("/wt/x", "3")
        assert (await w.next(5)).path == "/wt/x"
        with pytest.raises(XenStoreError) as e:
            await a.transaction_end(t)
        assert e.value.name == "EAGAIN"

        async def bump(tx):
            v = int(await tx.read("/wt/x"))
            await tx.write("/wt/x", str(v + 1))
        await a.run_transaction(bump)
        assert await b.read("/wt/x") == b"4"
        await w.unwatch()


@with_daemon
async def test_disconnect_drops_watches_and_transactions(store, path):
    async with open_socket_client(path) as a:
        await a.watch("/gone", "t")
        await a.transaction_start()
    async with open_socket_client(path) as b:
        await b.write("/gone/x", "1")          # must not try to reach a's socket
        await b.read("/gone/x")
    assert store.watches.count  # table still usable
    assert not store.watches._by_path        # a's watch went with a


# -- Debian's xenstore-utils -------------------------------------------------------------

@pytest.mark.skipif(not HAVE_TOOLS, reason="xenstore-utils not installed")
@with_daemon
async def test_debian_xenstore_utils_work_unchanged(store, path):
    await run_tool(path, "xenstore-write", "/tool/demo/a", "hello", "/tool/demo/b", "world")
    assert await run_tool(path, "xenstore-read", "/tool/demo/a") == "hello\n"
    listing = await run_tool(path, "xenstore-ls", "/tool/demo")
    assert 'a = "hello"' in listing and 'b = "world"' in listing
    assert (await run_tool(path, "xenstore-list", "/tool/demo")).split() == ["a", "b"]
    await run_tool(path, "xenstore-chmod", "/tool/demo/a", "n0", "r5")
    assert "(n0,r5)" in await run_tool(path, "xenstore-ls", "-p", "/tool/demo")
    await run_tool(path, "xenstore-rm", "/tool/demo/a")
    assert (await run_tool(path, "xenstore-list", "/tool/demo")).split() == ["b"]
    await run_tool(path, "xenstore-exists", "/tool/demo/b")
    out = await run_tool(path, "xenstore-read", "/tool/demo/a", check=False)
    assert out == ""
    # A domain skeleton written by the in-process toolstack is visible to the C client.
    await write_domain_entries(store.connect(), 3, "vm3", memory_kb=4096)
    ls = await run_tool(path, "xenstore-ls", "/local/domain/3")
    assert 'name = "vm3"' in ls and 'target = "4096"' in ls
    # Transactions: xenstore-write uses one; many values, one commit.
    await run_tool(path, "xenstore-write", *sum(([f"/tool/many/k{i}", str(i)] for i in range(50)), []))
    assert len((await run_tool(path, "xenstore-list", "/tool/many")).split()) == 50


@pytest.mark.skipif(not HAVE_TOOLS, reason="xenstore-utils not installed")
@with_daemon
async def test_debian_xenstore_watch_sees_our_writes(store, path):
    env = dict(os.environ, XENSTORED_PATH=path)
    async with trio.open_nursery() as n:
        result = {}

        async def watcher():
            proc = await trio.run_process(["xenstore-watch", "-n", "3", "/tool/watched"],
                                          env=env, capture_stdout=True, check=True)
            result["out"] = proc.stdout.decode().split()
        n.start_soon(watcher)
        # Wait until the C client's watch is registered, then make two changes.
        with trio.fail_after(20):
            while not store.watches._by_path.get("/tool/watched"):
                await trio.sleep(0.01)
        xs = store.connect()
        await xs.write("/tool/watched/a", "1")
        await xs.write("/tool/watched/b", "2")
    assert result["out"][0] == "/tool/watched"
    assert result["out"][1:] == ["/tool/watched/a", "/tool/watched/b"]


# -- hostile input ---------------------------------------------------------------------------

async def assert_still_serving(path: str) -> None:
    async with open_socket_client(path) as xs:
        await xs.write("/alive", "yes")
        assert await xs.read("/alive") == b"yes"


@with_daemon
async def test_oversized_len_closes_only_that_connection(store, path):
    bad = await RawClient.connect(path)
    good = await RawClient.connect(path)
    await bad.send(struct.pack("<IIII", XsType.WRITE, 1, 0, 0xFFFFFFFF) + b"junk")
    assert await bad.recv_msg() is None                 # connection closed
    bad.close()
    reply = await good.call(XsType.WRITE, b"/still\0here")
    assert reply.type == XsType.WRITE and reply.payload == b"OK\0"
    good.close()
    await assert_still_serving(path)


@with_daemon
async def test_unknown_and_client_only_types_get_errors(store, path):
    c = await RawClient.connect(path)
    for t, expected in ((20, b"ENOSYS\0"), (999, b"ENOSYS\0"), (0xFFFF, b"ENOSYS\0"),
                        (XsType.ERROR, b"EINVAL\0"), (XsType.WATCH_EVENT, b"EINVAL\0")):
        reply = await c.call(t, b"whatever\0", req_id=77)
        assert (reply.type, reply.req_id, reply.payload) == (XsType.ERROR, 77, expected)
    reply = await c.call(XsType.READ, b"/\0")
    assert reply.type == XsType.READ                    # same connection still works
    c.close()


@pytest.mark.parametrize("payload,type_,tx,error", [
    (b"/no-nul-in-write", XsType.WRITE, 0, b"EINVAL\0"),
    (b"", XsType.READ, 0, b"EINVAL\0"),
    (b"relative//bad\0", XsType.READ, 0, b"EINVAL\0"),
    (b"/x\0", XsType.READ, 424242, b"ENOENT\0"),
    (b"X\0", XsType.TRANSACTION_END, 0, b"EINVAL\0"),
    (b"\0", XsType.TRANSACTION_START, 5, b"EINVAL\0"),
    (b"/\0zz\0", XsType.SET_PERMS, 0, b"EINVAL\0"),
    (b"notanumber\0", XsType.GET_DOMAIN_PATH, 0, b"EINVAL\0"),
    (b"1\0x\0y\0", XsType.INTRODUCE, 0, b"EINVAL\0"),
    (b"/\0-5\0", XsType.DIRECTORY_PART, 0, b"EINVAL\0"),
    (b"/w\0", XsType.WATCH, 0, b"EINVAL\0"),
    (b"\xff\xfe\0", XsType.READ, 0, b"EINVAL\0"),
])
@with_daemon
async def test_malformed_requests_get_clear_errors(store, path, payload, type_, tx, error):
    c = await RawClient.connect(path)
    reply = await c.call(type_, payload, req_id=9, tx=tx)
    assert (reply.type, reply.req_id, reply.tx_id, reply.payload) == (XsType.ERROR, 9, tx, error)
    assert (await c.call(XsType.READ, b"/\0")).type == XsType.READ
    c.close()


@with_daemon
async def test_garbage_and_truncated_frames_do_not_disturb_others(store, path):
    other = await RawClient.connect(path)
    for junk in (os.urandom(7), os.urandom(5000), encode(XsType.WRITE, 1, 0, b"/t\0v")[:-2],
                 struct.pack("<IIII", 2, 1, 0, 4096) + b"x" * 100, b"\0" * 16):
        c = await RawClient.connect(path)
        await c.send(junk)
        c.close()
        reply = await other.call(XsType.READ, b"/\0")
        assert reply.type == XsType.READ
    # Many concurrent garbage clients, and one that never sends anything.
    idle = await RawClient.connect(path)
    async with trio.open_nursery() as n:
        for _ in range(30):
            async def noise():
                c = await RawClient.connect(path)
                try:
                    await c.send(os.urandom(3000))
                    with trio.move_on_after(0.2):
                        while await c.recv_msg() is not None:
                            pass
                except OSError:
                    pass
                finally:
                    c.close()
            n.start_soon(noise)
    idle.close()
    other.close()
    await assert_still_serving(path)


@with_daemon
async def test_max_payload_write_is_accepted(store, path):
    c = await RawClient.connect(path)
    value = b"v" * (4096 - len(b"/big\0"))
    reply = await c.call(XsType.WRITE, b"/big\0" + value)
    assert reply.payload == b"OK\0"
    reply = await c.call(XsType.READ, b"/big\0")
    assert reply.payload == value
    c.close()


# -- fairness and bounded queues -------------------------------------------------------------

@with_daemon
async def test_flooding_client_that_never_reads_does_not_block_others(store, path):
    flood = await RawClient.connect(path)
    request = encode(XsType.READ, 1, 0, b"/\0")
    async with trio.open_nursery() as n:
        async def pour():
            try:
                await flood.send(request * 200_000)      # 3.2 MB, never read a reply
            except OSError:
                pass
        n.start_soon(pour)
        async with open_socket_client(path) as xs:
            for i in range(100):
                await xs.write("/fair", str(i))
                assert await xs.read("/fair") == str(i).encode()
        n.cancel_scope.cancel()
    flood.close()


@with_daemon
async def test_flooding_client_gets_round_robin_share(store, path):
    flood = await RawClient.connect(path)
    total = 20_000
    request = encode(XsType.READ, 1, 0, b"/\0")
    got = 0
    async with trio.open_nursery() as n:
        async def drain():
            nonlocal got
            while got < total:
                if await flood.recv_msg() is None:
                    return
                got += 1
        n.start_soon(flood.send, request * total)
        n.start_soon(drain)
        async with open_socket_client(path) as xs:
            for i in range(50):
                await xs.read("/")
        # The quiet client finished while the flood was still being served.
        assert got < total
        n.cancel_scope.cancel()
    flood.close()


def test_socket_file_removed_and_stale_socket_replaced(tmp_path):
    path = str(tmp_path / "s")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()                                  # leaves a dead socket file

    async def main():
        with trio.fail_after(20):
            async with trio.open_nursery() as n:
                await n.start(serve_socket, XenStore(), path)
                await assert_still_serving(path)
                n.cancel_scope.cancel()
    trio.run(main)
    assert not os.path.exists(path)
    open(path, "w").close()                        # not a socket: refuse to clobber
    with pytest.raises(FileExistsError):
        trio.run(serve_socket, XenStore(), path)
    os.unlink(path)


def test_split_strings_used_by_tools():
    assert split_strings(b"a\0") == [b"a"]


@with_daemon
async def test_directory_too_big_for_one_reply_is_e2big_and_part_works(store, path):
    xs = store.connect()
    names = [f"entry-number-{i:05d}-with-padding" for i in range(300)]   # > 4096 bytes
    for n in names:
        await xs.write(f"/huge/{n}", "")
    c = await RawClient.connect(path)
    reply = await c.call(XsType.DIRECTORY, b"/huge\0")
    assert (reply.type, reply.payload) == (XsType.ERROR, b"E2BIG\0")
    got, offset = [], 0
    while True:
        reply = await c.call(XsType.DIRECTORY_PART, b"/huge\0" + str(offset).encode() + b"\0")
        assert reply.type == XsType.DIRECTORY_PART
        gen, _, rest = reply.payload.partition(b"\0")
        assert gen.isdigit()
        if rest.endswith(b"\0\0") or rest == b"\0":
            got += [n.decode() for n in rest.split(b"\0") if n]
            break
        got += [n.decode() for n in rest.split(b"\0") if n]
        offset += len(rest)
    assert got == names
    c.close()
