"""A test kernel driven from pytest: every domain action on command.

The puppet connects back to a Unix socket named in its cmdline
(`puppet=/path`), says hello with its domid, and then executes commands the test
sends (msgpack maps), answering each with {"ok": value} or {"error": ...}.  It
lets tests act as a domain, including a malicious one, through the real kernel
library and the real hypervisor.

Commands (op, then its fields):
  hypercall hypercall cmd args   any hypercall through the kernel library
  raw bytes / raw_multipart frames   bytes straight onto the channel, no answer awaited
  raw_call msg                   [req_id] + msg sent as is; the hypervisor's answer returned
  impersonate domid              a second connection claiming `domid`: "refused"/"accepted"
  alloc nr / free gfns / poke gfn offset data / peek gfn offset len     own pages
  grant domid gfn [readonly] / grant_raw ref flags domid gfn / end_access ref / gnt_flags ref
  map dom ref [readonly] / unmap handle / unmap_all / map_read / map_write handle offset ...
  map_write_raw handle offset data   a store only the MMU can stop (SIGSEGV if read-only)
  map_fd_writable dom ref        try to turn a read-only grant into write access
  steal_frames victim            try to open another domain's frames via the hypervisor's fds
  alloc_unbound / bind_interdomain / bind_virq / notify port / wait port / fired port
  notify_nowait port             a send without an answer (line or doorbell), through the library
  lines port / close_port port   which ends of its line the port holds / Port.close()
  doorbell_raw ports / send_requests   send requests for any port numbers, one ring;
                                 which request bytes are still set
  mask port [masked] / pending port / fire_count port (upcalls and fires so far)
  exit (kernel returns: poweroff) / crash (process exits without a word)
"""

from __future__ import annotations

import ctypes
import faulthandler
import mmap
import os

import msgpack
import trio
import zmq

from domains.kernel.boot import Kernel, boot
from ipc.event_abi import NR_EVENT_CHANNELS, SEND_BASE
from ipc.page import map_frame


async def main(k: Kernel) -> None:
    path = k.cmdline["puppet"]
    stream = await trio.open_unix_socket(path)
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
    await stream.send_all(msgpack.packb({"hello": k.domid, "start_info": k.start_info}))
    pages = k.memory.pages   # builder-populated frames and our own allocations
    maps: dict[int, object] = {}
    ports: dict[int, object] = {}
    _count_upcalls(k)
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
                reply = {"error": f"{type(exc).__name__}: {exc}", "errno": getattr(exc, "errno", None),
                         "status": getattr(exc, "status", None)}
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
    if op == "map_fd_writable":
        # Ask for a read-only mapping, then try to get write access to the page
        # anyway, the ways a hostile kernel would: a writable mmap of the
        # descriptor, then re-opening it read-write through /proc/self/fd.
        result, fds = await k.hv.call_fds("grant_table_op", "map_grant_ref",
                                          ops=[{"dom": cmd["dom"], "ref": cmd["ref"], "readonly": True}])
        attempts = {}
        try:
            try:
                map_frame(fds[0], writable=True).close()
                attempts["mmap"] = "allowed"
            except OSError as exc:
                attempts["mmap"] = exc.errno
            try:
                os.close(os.open(f"/proc/self/fd/{fds[0]}", os.O_RDWR))
                attempts["reopen"] = "allowed"
            except OSError as exc:
                attempts["reopen"] = exc.errno
        finally:
            for fd in fds:
                os.close(fd)
            await k.hv.call("grant_table_op", "unmap_grant_ref",
                            handles=[r["handle"] for r in result["results"] if "handle" in r])
        return attempts
    if op == "steal_frames":
        return _steal_frames(cmd["victim"])
    if op == "gnt_flags":
        from ipc.grant_abi import read_entry
        return read_entry(k.grants.table, cmd["ref"])[0]
    if op == "free":
        await k.memory.free([pages[g] for g in cmd["gfns"]])
        return None
    if op == "raw_call":
        # A hand-made hypercall message ([req_id] + cmd["msg"]); we still wait for
        # the answer, so a test can see what the hypervisor made of it.
        from domains.kernel.hypercall import _Pending
        req_id = next(k.hv._ids)
        pending = k.hv._pending[req_id] = _Pending()
        try:
            await k.hv._send(msgpack.packb([req_id, *cmd["msg"]], use_bin_type=True))
            with trio.fail_after(cmd.get("timeout", 5)):
                await pending.event.wait()
        finally:
            k.hv._pending.pop(req_id, None)
        if pending.error is not None:
            raise pending.error
        return pending.value
    if op == "raw_multipart":
        k.hv.sock.send_multipart(cmd["frames"])
        return None
    if op == "impersonate":
        return await _impersonate(k, cmd["domid"])
    if op == "alloc_unbound":
        p = await k.events.alloc_unbound(cmd["remote_dom"])
        ports[p.port] = _counted(p)
        return p.port
    if op == "bind_interdomain":
        p = await k.events.bind_interdomain(cmd["remote_dom"], cmd["remote_port"])
        ports[p.port] = _counted(p)
        return p.port
    if op == "bind_virq":
        p = await k.events.bind_virq(cmd["virq"])
        ports[p.port] = _counted(p)
        return p.port
    if op == "mask":
        k.events.shared_info.set_mask(cmd["port"], cmd.get("masked", True))
        return None
    if op == "fire_count":
        # A hypercall round trip first: every upcall the hypervisor pushed before
        # answering it has been handled once the answer is here (one ordered channel).
        await k.hv.call("grant_table_op", "query_size")
        return {"upcalls": k.hv.upcalls, "fires": ports[cmd["port"]].fire_count}
    if op == "unmap_all":
        await k.grants.unmap_many(list(maps.values()))
        maps.clear()
        return None
    if op == "notify":
        await ports[cmd["port"]].notify()
        return None
    if op == "lines":
        port = ports[cmd["port"]]
        return {"recv": port.line_r >= 0, "send": port.send_w >= 0}
    if op == "close_port":
        await ports.pop(cmd["port"]).close()
        return None
    if op == "notify_nowait":
        ports[cmd["port"]].notify_nowait()
        return None
    if op == "doorbell_raw":
        # Send requests for any port numbers at all, then one ring of the doorbell.
        for port in cmd["ports"]:
            k.events.shared_info.request_send(port)
        os.eventfd_write(k.events.doorbell_fd, 1)
        return None
    if op == "send_requests":
        si = k.events.shared_info
        return [p for p in range(NR_EVENT_CHANNELS) if si.buf[SEND_BASE + p]]
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


def _count_upcalls(k: Kernel) -> None:
    """Count upcalls (the line raised), so tests can see notifications coalesce."""
    deliver = k.hv.on_upcall
    k.hv.upcalls = 0

    def counted() -> None:
        k.hv.upcalls += 1
        deliver()
    k.hv.on_upcall = counted


def _counted(port):
    """Count how many times a port is signalled (a wait consumes one or more)."""
    port.fire_count = 0
    fire = port._fire

    def counted() -> None:
        port.fire_count += 1
        fire()
    port._fire = counted
    return port


async def _impersonate(k: Kernel, domid: int) -> str:
    """Open a second hypercall connection claiming to be `domid`, with our own secret.

    Returns the first security event ZeroMQ reports on it: the hypervisor's ZAP
    handler must refuse the handshake.
    """
    from zmq.utils.monitor import recv_monitor_message
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.plain_username = str(domid).encode()
    sock.plain_password = k.hv.sock.getsockopt(zmq.PLAIN_PASSWORD)   # our own, real secret
    mon = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_SUCCEEDED)
    try:
        sock.connect(f"ipc://{k.run_dir}/hypervisor/hypercall.sock")
        with trio.fail_after(5):
            while not mon.poll(0):
                await trio.sleep(0.005)
        event = recv_monitor_message(mon)["event"]
        return "refused" if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH else "accepted"
    finally:
        sock.disable_monitor()
        mon.close(linger=0)
        sock.close(linger=0)
        ctx.term()


def _steal_frames(victim: int) -> int:
    """Try to open the victim's frames read-write from the hypervisor's own fd table.

    The hypervisor is our zygote's parent.  Returns how many of the victim's
    pages we could open; isolation needs this to be zero.
    """
    def ppid(pid: int) -> int:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    hv = ppid(ppid(os.getpid()))
    stolen = 0
    try:
        fds = os.listdir(f"/proc/{hv}/fd")
    except OSError:
        return 0
    for fd in fds:
        try:
            if os.readlink(f"/proc/{hv}/fd/{fd}").startswith(f"/memfd:microxen-d{victim} "):
                os.close(os.open(f"/proc/{hv}/fd/{fd}", os.O_RDWR))
                stolen += 1
        except OSError:
            pass
    return stolen


def _address_of(m: mmap.mmap) -> int:
    """The address of an mmap's pages (CPython's mmap object keeps it right after its header).

    ctypes refuses `from_buffer` on a read-only map, which is exactly the map we
    want to write through, so we read the pointer from the object itself.
    """
    return ctypes.c_void_p.from_address(id(m) + object.__basicsize__).value


def kernel_main(start: dict, fds: dict) -> int:
    faulthandler.enable()   # a fault is reported in the domain's log before the process dies
    return boot(start, fds, main)
