"""netfront and netback on the real hypervisor, with the real domain kernel.

Two domains built by the real hypervisor run this module as their kernel
(``kernel_main`` below): one is a netback, one a netfront.  They get their
pages from ``k.memory``, grant and copy through ``k.grants`` (real grant
tables, real ``GNTTABOP_copy`` hypercalls) and signal through ``k.events``
ports.  The test plays the toolstack and XenStore: it relays the frontend's
``tx-ring-ref``/``rx-ring-ref``/``event-channel`` to the backend over a Unix
socket (there is no xenbus here; that glue is another module's job).  The
backend reflects every packet back to the guest, which checks every byte.
"""

from __future__ import annotations

import json
import socket

import pytest
import trio

from domains.kernel.boot import Kernel, boot

pytestmark = pytest.mark.timeout(120)

SIZES = [60, 1514, 4096, 4097, 9014, 20000, 60, 65535] * 8


# --- the kernel the two domains run ---------------------------------------------------


def kernel_main(start: dict, fds: dict) -> int:
    return boot(start, fds, main)


async def main(k: Kernel) -> None:
    stream = await trio.open_unix_socket(k.cmdline["ctl"])
    buf = b""

    async def send(msg: dict) -> None:
        await stream.send_all(json.dumps(msg).encode() + b"\n")

    async def recv() -> dict:
        nonlocal buf
        while b"\n" not in buf:
            data = await stream.receive_some(65536)
            if not data:
                raise ConnectionError("test hung up")
            buf += data
        line, buf = buf.split(b"\n", 1)
        return json.loads(line)

    await send({"hello": k.domid, "role": k.cmdline["role"]})
    if k.cmdline["role"] == "back":
        await _backend(k, send, recv)
    else:
        await _frontend(k, send, recv)


async def _backend(k: Kernel, send, recv) -> None:
    from domains.driverdom.netback import Netback

    fe = await recv()
    port = await k.events.bind_interdomain(fe["domid"], fe["event-channel"])
    nb = await Netback.connect(k.grants, k.memory, fe["domid"], fe["tx-ring-ref"],
                               fe["rx-ring-ref"], port, name=f"vif{fe['domid']}.0")
    nb.on_packet = lambda f: nb.deliver(f[6:12] + f[0:6] + f[12:])    # a mirror, not a bridge
    async with trio.open_nursery() as nursery:
        await nursery.start(nb.run)
        await send({"state": "Connected"})
        await recv()                                                 # "stop"
        await send({**vars(nb.stats), "error": nb.error})
        await nb.close()
        nursery.cancel_scope.cancel()


async def _frontend(k: Kernel, send, recv) -> None:
    from domains.domu.netfront import Netfront

    back = (await recv())["backend"]
    nf = await Netfront.create(k.grants, k.memory, back, nr_tx_pages=32, nr_rx_pages=32)
    port = await k.events.alloc_unbound(back)
    await send({"domid": k.domid, "tx-ring-ref": nf.tx_ring_ref, "rx-ring-ref": nf.rx_ring_ref,
                "event-channel": port.port, "request-rx-copy": 1})
    await recv()                                                     # backend Connected
    me, peer = bytes([0, 0x16, 0x3E, 0, 0, 1]), bytes([0, 0x16, 0x3E, 0, 0, 2])
    async with trio.open_nursery() as nursery:
        await nursery.start(nf.run)
        nf.connect(port)
        bad = 0

        async def reader():
            nonlocal bad
            for i, size in enumerate(SIZES):
                got = await nf.receive()
                want = me + peer + b"\x88\xb5" + _body(i, size - 14)
                bad += got != want
        with trio.fail_after(60):
            async with trio.open_nursery() as inner:
                inner.start_soon(reader)
                for i, size in enumerate(SIZES):
                    await nf.send(peer + me + b"\x88\xb5" + _body(i, size - 14))
            await nf.flush()
        await send({"received": len(SIZES), "bad": bad, **vars(nf.stats)})
        await recv()                                                 # "stop"
        try:
            await nf.close()
        except Exception as exc:
            import traceback
            await send({"closed": False, "error": traceback.format_exc()})
            raise
        await send({"closed": True})
        nursery.cancel_scope.cancel()


def _body(i: int, n: int) -> bytes:
    return bytes((i * 31 + j) & 0xFF for j in range(n))


# --- the test (plays dom0's toolstack and XenStore) --------------------------------------


class Peer:
    def __init__(self, conn: socket.socket) -> None:
        self.conn, self.buf = conn, b""
        conn.settimeout(60)

    def send(self, msg: dict) -> None:
        self.conn.sendall(json.dumps(msg).encode() + b"\n")

    def recv(self) -> dict:
        while b"\n" not in self.buf:
            data = self.conn.recv(65536)
            if not data:
                raise ConnectionError("domain hung up")
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)


def test_netfront_and_netback_as_real_domains(hv):
    path = f"{hv.run_dir}/net.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(4)
    listener.settimeout(30)
    peers = []
    try:
        doms = {}
        for role in ("back", "front"):
            domid = hv.dom0.hypercall("domctl", "createdomain", name=f"net-{role}",
                                      kernel="tests.test_net_hypervisor", memory_kb=32 * 1024,
                                      cmdline=f"role={role} ctl={path}")["domid"]
            hv.dom0.hypercall("domctl", "unpausedomain", domid=domid)
            peer = Peer(listener.accept()[0])
            peers.append(peer)
            hello = peer.recv()
            assert hello == {"hello": domid, "role": role}
            doms[role] = (domid, peer)
        (back_id, back), (_front_id, front) = doms["back"], doms["front"]
        front.send({"backend": back_id})
        back.send(front.recv())                 # the refs and port, as XenStore would carry them
        front.send(back.recv())                 # Connected
        result = front.recv()
        assert result["received"] == len(SIZES) and result["bad"] == 0
        assert result["tx_errors"] == 0 and result["rx_errors"] == 0
        assert result["grants_leaked"] == 0
        back.send({"op": "stop"})
        stats = back.recv()
        assert stats["error"] is None and stats["tx_packets"] == len(SIZES)
        assert stats["rx_packets"] == len(SIZES) and stats["rx_dropped"] == 0
        front.send({"op": "stop"})
        assert front.recv() == {"closed": True}
        for role in ("back", "front"):
            hv.wait_state(doms[role][0], "s", timeout=20)    # powered off cleanly
    except BaseException:
        # Show what the domains said (pytest prints captured output on failure).
        for role in ("back", "front"):
            try:
                with open(f"{hv.run_dir}/logs/net-{role}.log") as f:
                    print(f"--- net-{role}.log ---\n" + f.read()[-3000:])
            except OSError:
                pass
        raise
    finally:
        for p in peers:
            p.conn.close()
        listener.close()
