"""A test kernel driven from pytest: every domain action on command.

The puppet connects back to a Unix socket named in its cmdline
(`puppet=/path`), says hello with its domid, and then executes commands the test
sends (msgpack maps), answering each with {"ok": value} or {"error": ...}.  It
lets tests act as a domain, including a malicious one, through the real kernel
library and the real hypervisor.
"""

from __future__ import annotations

import ctypes
import mmap
import os

import msgpack
import trio

from domains.kernel.boot import Kernel, boot
from ipc.page import map_frame


async def main(k: Kernel) -> None:
    path = k.cmdline["puppet"]
    stream = await trio.open_unix_socket(path)
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
    await stream.send_all(msgpack.packb({"hello": k.domid, "start_info": k.start_info}))
    pages: dict[int, object] = {}
    maps: dict[int, object] = {}
    ports: dict[int, object] = {}
    while True:
        data = await stream.receive_some(65536)
        if not data:
            return
        unpacker.feed(data)
        for cmd in unpacker:
            try:
                value = await _do(k, cmd, pages, maps, ports)
                reply = {"ok": value}
            except Exception as exc:
                reply = {"error": f"{type(exc).__name__}: {exc}", "errno": getattr(exc, "errno", None)}
            await stream.send_all(msgpack.packb(reply, use_bin_type=True))
            if cmd.get("op") == "exit":
                return


async def _do(k: Kernel, cmd: dict, pages, maps, ports):
    op = cmd["op"]
    if op == "hypercall":
        return await k.hv.call(cmd["hypercall"], cmd["cmd"], **cmd.get("args", {}))
    if op == "raw":
        # a message straight onto the channel, bypassing the library (forgery tests)
        k.hv.sock.send(cmd["bytes"])
        return None
    if op == "alloc":
        got = await k.memory.alloc(cmd["nr"])
        for p in got:
            pages[p.gfn] = p
        return [p.gfn for p in got]
    if op == "poke":
        pages[cmd["gfn"]].map[cmd["offset"]:cmd["offset"] + len(cmd["data"])] = cmd["data"]
        return None
    if op == "peek":
        return bytes(pages[cmd["gfn"]].map[cmd["offset"]:cmd["offset"] + cmd["len"]])
    if op == "grant":
        return k.grants.grant_access(cmd["domid"], cmd["gfn"], cmd.get("readonly", False))
    if op == "grant_raw":
        # write an arbitrary entry, as a malicious guest could
        from ipc.grant_abi import GRANT_ENTRY, GRANT_ENTRY_SIZE
        GRANT_ENTRY.pack_into(k.grants.table, cmd["ref"] * GRANT_ENTRY_SIZE, cmd["flags"], cmd["domid"], cmd["gfn"])
        return None
    if op == "end_access":
        return k.grants.end_access(cmd["ref"])
    if op == "map":
        m = await k.grants.map(cmd["dom"], cmd["ref"], cmd.get("readonly", False))
        maps[m.handle] = m
        return m.handle
    if op == "unmap":
        await k.grants.unmap(maps.pop(cmd["handle"]))
        return None
    if op == "map_read":
        m = maps[cmd["handle"]]
        return bytes(m.map[cmd["offset"]:cmd["offset"] + cmd["len"]])
    if op == "map_write":
        m = maps[cmd["handle"]]
        m.map[cmd["offset"]:cmd["offset"] + len(cmd["data"])] = cmd["data"]
        return None
    if op == "map_write_raw":
        # Store through the raw address, so only the MMU can stop it.  For a
        # read-only grant this must kill the process with SIGSEGV.
        m = maps[cmd["handle"]]
        ctypes.memmove(_address_of(m.map) + cmd["offset"], cmd["data"], len(cmd["data"]))
        return None
    if op == "alloc_unbound":
        p = await k.events.alloc_unbound(cmd["remote_dom"])
        ports[p.port] = p
        return p.port
    if op == "bind_interdomain":
        p = await k.events.bind_interdomain(cmd["remote_dom"], cmd["remote_port"])
        ports[p.port] = p
        return p.port
    if op == "notify":
        await ports[cmd["port"]].notify()
        return None
    if op == "wait":
        with trio.fail_after(cmd.get("timeout", 5)):
            await ports[cmd["port"]].wait()
        return True
    if op == "fired":
        return ports[cmd["port"]].fired()
    if op == "pending":
        return k.events.shared_info.is_pending(cmd["port"])
    if op == "exit":
        return None
    if op == "crash":
        os._exit(3)
    raise ValueError(f"unknown puppet op {op!r}")


def _address_of(m: mmap.mmap) -> int:
    """The address of an mmap's pages (CPython's mmap object keeps it right after its header).

    ctypes refuses `from_buffer` on a read-only map, which is exactly the map we
    want to write through, so we read the pointer from the object itself.
    """
    return ctypes.c_void_p.from_address(id(m) + object.__basicsize__).value


def kernel_main(start: dict, fds: dict) -> int:
    return boot(start, fds, main)
