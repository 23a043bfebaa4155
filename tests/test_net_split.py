"""netfront <-> netback <-> bridge in one process, over real memfd pages.

The grant and event operations come from the local stand-in
(tests/test_net_localxen.py), which checks grant entries as the hypervisor
does.  Covered: frames both ways, multi-slot packets on tx and rx, the
notification rules (nothing stalls), hostile ring entries from a frontend
(error responses or a disconnected vif, never a crash), a hostile backend
seen from netfront, and replay of in-flight packets after reconnecting to a
new backend.
"""

from __future__ import annotations

import contextlib

import pytest
import trio
import trio.testing

from domains.domu.netfront import Netfront, NetfrontError
from domains.driverdom.bridge import Bridge
from domains.driverdom.netback import Netback
from ipc.netif import (NETIF_RSP_ERROR, NETIF_RSP_OKAY, NETTXF_more_data, RX_ENTRY_SIZE,
                       TX_ENTRY_SIZE, NetifRxResponse, NetifTxRequest, NetifTxResponse)
from ipc.ring import BackRing, FrontRing
from tests.test_net_localxen import LocalXen

DD = 0          # the driver domain
TIMEOUT = 10


def mac(n: int) -> bytes:
    return bytes([0x00, 0x16, 0x3E, 0, 0, n])


def frame(dst: int, src: int, payload: bytes) -> bytes:
    return mac(dst) + mac(src) + b"\x88\xb5" + payload     # 0x88b5: local experimental


@contextlib.asynccontextmanager
async def vifs(n: int, bridge: Bridge | None = None, **nf_args):
    """``n`` guests (domids 1..n), each netfront wired to a netback on one bridge."""
    xen = LocalXen([DD, *range(1, n + 1)], pages=2048)
    dd = xen.kernel(DD)
    bridge = bridge or Bridge()
    fronts, backs, kernels = [], [], [dd]
    try:
        async with trio.open_nursery() as nursery:
            for d in range(1, n + 1):
                k = xen.kernel(d)
                kernels.append(k)
                nf = await Netfront.create(k.grants, k.memory, DD, **nf_args)
                fe_port, be_port = xen.event_channel()
                nb = await Netback.connect(dd.grants, dd.memory, d, nf.tx_ring_ref,
                                           nf.rx_ring_ref, be_port, name=f"vif{d}.0")
                port = bridge.add_port(nb.name, nb.deliver)
                nb.on_packet = lambda f, port=port: bridge.input(port, f)
                await nursery.start(nb.run)
                await nursery.start(nf.run)
                nf.connect(fe_port)
                fronts.append(nf)
                backs.append(nb)
            yield xen, fronts, backs, bridge
            nursery.cancel_scope.cancel()
    finally:
        for k in kernels:
            k.close()
        xen.close()


async def recv(nf: Netfront) -> bytes:
    with trio.fail_after(TIMEOUT):
        return await nf.receive()


def test_frames_both_ways_through_the_bridge():
    async def main():
        async with vifs(2) as (_x, (a, b), (va, vb), bridge):
            await a.send(frame(0xFF, 1, b"hello from 1"))   # unknown dst: flooded to 2
            got = await recv(b)
            assert got == frame(0xFF, 1, b"hello from 1")
            await b.send(frame(1, 2, b"reply"))             # 1 was learnt: forwarded
            assert await recv(a) == frame(1, 2, b"reply")
            assert bridge.lookup(mac(1)) == "vif1.0" and bridge.lookup(mac(2)) == "vif2.0"
            with trio.fail_after(TIMEOUT):
                await a.flush()
            assert a.stats.tx_packets == 1 and va.stats.tx_packets == 1
            assert vb.stats.rx_packets == 1 and b.stats.rx_packets == 1
            assert a.in_flight == 0
    trio.run(main)


def test_many_frames_in_order_with_small_pools():
    """More frames than ring slots and pages: back-pressure, order kept, nothing
    lost except what netback's bounded queue says it dropped."""
    async def main():
        async with vifs(2, nr_tx_pages=8, nr_rx_pages=4) as (_x, (a, b), (_va, vb), _b):
            n = 3000
            got = []

            async def reader():
                while len(got) + vb.stats.rx_dropped < n:
                    with trio.move_on_after(0.05):    # re-check the drop count now and then
                        got.append(await b.receive())
            with trio.fail_after(60):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(reader)
                    for i in range(n):
                        await a.send(frame(2, 1, i.to_bytes(4, "big") + bytes(60)))
            seqs = [int.from_bytes(f[14:18], "big") for f in got]
            assert seqs == sorted(set(seqs))               # in order, no duplicates
            assert len(seqs) + vb.stats.rx_dropped == n
            assert len(seqs) >= 1024                        # at least a queue's worth arrived
    trio.run(main)


@pytest.mark.parametrize("size", [60, 4096, 4097, 9014, 65535])
def test_multi_slot_packets_both_directions(size):
    async def main():
        async with vifs(2) as (_x, (a, b), _v, _b):
            body = bytes((i * 7) & 0xFF for i in range(size - 14))
            await a.send(frame(2, 1, body))
            assert await recv(b) == frame(2, 1, body)
            await b.send(frame(1, 2, body[::-1]))
            assert await recv(a) == frame(1, 2, body[::-1])
    trio.run(main)


def test_netfront_refuses_bad_frames():
    async def main():
        async with vifs(1) as (_x, (a,), _v, _b):
            with pytest.raises(NetfrontError, match="frame of 3 bytes"):
                await a.send(b"abc")
            with pytest.raises(NetfrontError, match="frame of 65536 bytes"):
                await a.send(bytes(65536))
    trio.run(main)


# --- a hostile frontend ---------------------------------------------------------------


@contextlib.asynccontextmanager
async def raw_frontend():
    """A netback serving hand-made rings: the test is the (malicious) frontend."""
    xen = LocalXen([DD, 1], pages=256)
    dd, g = xen.kernel(DD), xen.kernel(1)
    tx_page, rx_page, data = await g.memory.alloc(3)
    tx = FrontRing.init(tx_page.map, TX_ENTRY_SIZE)
    rx = FrontRing.init(rx_page.map, RX_ENTRY_SIZE)
    fe_port, be_port = xen.event_channel()
    nb = await Netback.connect(dd.grants, dd.memory, 1,
                               g.grants.grant_access(DD, tx_page.gfn),
                               g.grants.grant_access(DD, rx_page.gfn), be_port)
    delivered: list[bytes] = []
    nb.on_packet = delivered.append
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(nb.run)
            yield g, tx, rx, data, fe_port, nb, delivered
            nursery.cancel_scope.cancel()
    finally:
        tx.release()
        rx.release()
        dd.close()
        g.close()
        xen.close()


async def responses(ring: FrontRing, port, n: int) -> list[bytes]:
    out: list[bytes] = []
    with trio.fail_after(TIMEOUT):
        while len(out) < n:
            out += ring.responses()
            if len(out) < n and not ring.final_check_for_responses():
                await port.wait()
    return out


def push(ring: FrontRing, port) -> None:
    if ring.push_requests_and_check_notify():
        port.notify_nowait()


def test_hostile_tx_entries_get_error_responses():
    async def main():
        async with raw_frontend() as (g, tx, _rx, data, port, nb, delivered):
            data.map[0:64] = frame(2, 1, bytes(50))
            good = g.grants.grant_access(DD, data.gfn, readonly=True)
            bad = [
                NetifTxRequest(9999, 0, 0, 1, 64),          # a grant ref that was never made
                NetifTxRequest(good, 4000, 0, 2, 200),      # fragment crosses the page end
                NetifTxRequest(good, 0, 0, 3, 5000),        # larger than a page, one slot
                NetifTxRequest(good, 0, 0, 4, 10),          # shorter than an Ethernet header
                NetifTxRequest(good, 0, NETTXF_more_data, 5, 10),   # first smaller than the rest
                NetifTxRequest(good, 0, 0, 6, 64),
                NetifTxRequest(good, 0, 0, 7, 64),          # and a good one after all that
            ]
            for req in bad:
                tx.put_request(req.pack())
            push(tx, port)
            got = [NetifTxResponse.unpack(r) for r in await responses(tx, port, len(bad))]
            assert [r.id for r in got] == [1, 2, 3, 4, 5, 6, 7]
            assert [r.status for r in got] == [NETIF_RSP_ERROR] * 6 + [NETIF_RSP_OKAY]
            assert delivered == [frame(2, 1, bytes(50))]
            assert nb.connected and nb.error is None
            assert nb.stats.tx_errors == 5
            assert any("gref 9999" in r or "status -3" in r for r in nb.stats.reasons)
    trio.run(main)


def test_producer_index_past_the_ring_disconnects_the_vif():
    async def main():
        async with raw_frontend() as (_g, tx, _rx, _data, port, nb, _d):
            tx.sring.req_prod = tx.sring.req_prod + 1000      # a lie: the ring holds 256
            port.notify_nowait()
            with trio.fail_after(TIMEOUT):
                while nb.connected:
                    await trio.sleep(0.001)
            assert "producer index" in nb.error
            nb.deliver(frame(1, 2, b"x" * 50))          # a disconnected vif drops, quietly
            assert nb.stats.rx_dropped == 1
    trio.run(main)


def test_endless_slot_chain_disconnects_the_vif():
    async def main():
        async with raw_frontend() as (g, tx, _rx, data, port, nb, _d):
            ref = g.grants.grant_access(DD, data.gfn, readonly=True)
            for i in range(30):
                tx.put_request(NetifTxRequest(ref, 0, NETTXF_more_data, i, 100).pack())
            push(tx, port)
            with trio.fail_after(TIMEOUT):
                while nb.connected:
                    await trio.sleep(0.001)
            assert "chains more than 18 slots" in nb.error
    trio.run(main)


def test_rx_copy_into_a_bad_grant_is_an_error_response():
    async def main():
        async with raw_frontend() as (g, _tx, rx, data, port, nb, _d):
            from ipc.netif import NetifRxRequest
            ro = g.grants.grant_access(DD, data.gfn, readonly=True)   # not writable
            rw = g.grants.grant_access(DD, data.gfn)
            rx.put_request(NetifRxRequest(11, ro).pack())
            rx.put_request(NetifRxRequest(12, rw).pack())
            push(rx, port)
            nb.deliver(frame(1, 2, b"first" + bytes(50)))
            nb.deliver(frame(1, 2, b"second" + bytes(50)))
            got = [NetifRxResponse.unpack(r) for r in await responses(rx, port, 2)]
            assert got[0].id == 11 and got[0].status == NETIF_RSP_ERROR
            assert got[1].id == 12 and got[1].status == 70
            assert bytes(data.map[14:20]) == b"second"
            assert nb.connected
    trio.run(main)


# --- a hostile backend, seen from netfront ---------------------------------------------


def test_netfront_refuses_a_response_it_never_asked_for():
    async def main():
        xen = LocalXen([DD, 1], pages=512)
        dd, g = xen.kernel(DD), xen.kernel(1)
        try:
            nf = await Netfront.create(g.grants, g.memory, DD, nr_tx_pages=4, nr_rx_pages=4)
            fe_port, be_port = xen.event_channel()
            [txm, rxm] = await dd.grants.map_many([(1, nf.tx_ring_ref), (1, nf.rx_ring_ref)])
            back_tx = BackRing(txm.map, TX_ENTRY_SIZE)
            async with trio.open_nursery() as nursery:
                await nursery.start(nf.run)
                nf.connect(fe_port)
                await nf.send(frame(2, 1, bytes(50)))
                back_tx.requests()
                back_tx.put_response(NetifTxResponse(3, NETIF_RSP_OKAY).pack())  # id 3 unused
                back_tx.push_responses()
                be_port.notify_nowait()
                with trio.fail_after(TIMEOUT):
                    while not nf.stats.reasons:
                        await trio.sleep(0.001)
                assert "id 3, which is not in flight" in nf.stats.reasons[0]
                nursery.cancel_scope.cancel()
            back_tx.release()
            await dd.grants.unmap_many([txm, rxm])
        finally:
            dd.close()
            g.close()
            xen.close()
    trio.run(main)


# --- reconnection -----------------------------------------------------------------------


@contextlib.contextmanager
def old_and_new_backend():
    """A guest (1), the driver domain it starts on (DD) and the one it moves to (9)."""
    xen = LocalXen([DD, 1, 9], pages=1024)
    dd, g, new_dd = xen.kernel(DD), xen.kernel(1), xen.kernel(9)
    try:
        yield xen, dd, g, new_dd
    finally:
        for k in (dd, g, new_dd):
            k.close()
        xen.close()


async def connect_new_backend(xen, nursery, nf: Netfront, new_dd) -> list[bytes]:
    """Wire nf's current rings to a netback in ``new_dd``; the frames it receives."""
    fe, be = xen.event_channel()
    nb = await Netback.connect(new_dd.grants, new_dd.memory, 1, nf.tx_ring_ref,
                               nf.rx_ring_ref, be)
    got: list[bytes] = []
    nb.on_packet = got.append
    await nursery.start(nb.run)
    nf.connect(fe)
    return got


def test_in_flight_packets_are_replayed_on_a_new_backend():
    """The backend dies with packets on the ring; a new one gets them all, in order."""
    async def main():
        with old_and_new_backend() as (xen, dd, g, new_dd):
            nf = await Netfront.create(g.grants, g.memory, DD, nr_tx_pages=16)
            fe_port, be_port = xen.event_channel()
            async with trio.open_nursery() as nursery:
                await nursery.start(nf.run)
                nf.connect(fe_port)
                # The "old backend" maps the rings and then hangs: nothing is answered.
                old = await dd.grants.map_many([(1, nf.tx_ring_ref), (1, nf.rx_ring_ref)])
                for i in range(10):
                    await nf.send(frame(2, 1, bytes([i]) * 50))
                assert nf.in_flight == 10
                # ... and dies: the hypervisor releases its mappings.
                await dd.grants.unmap_many(old)
                await nf.disconnect()
                await nf.send(frame(2, 1, b"\xaa" * 50))       # sent while disconnected
                assert nf.in_flight == 11
                assert g.grants.free_count == g.grants.nr_entries - 8   # every grant ended
                await nf.prepare(9)
                got = await connect_new_backend(xen, nursery, nf, new_dd)
                with trio.fail_after(TIMEOUT):
                    await nf.flush()
                assert [f[14] for f in got] == list(range(10)) + [0xAA]
                assert nf.stats.tx_resent == 11 and nf.in_flight == 0
                nursery.cancel_scope.cancel()
    trio.run(main)


def test_a_failed_handshake_before_connect_does_not_strand_the_service_task():
    """prepare(); the handshake fails; disconnect(); prepare(); connect(): served.

    Found by a fault campaign: disconnect() used to replace the "connected"
    event even when it was not set, so the service task went on waiting on
    the old one, which nobody would set again, and the vif stayed silent
    although it showed Connected.
    """
    async def main():
        with old_and_new_backend() as (xen, dd, g, new_dd):
            nf = await Netfront.create(g.grants, g.memory, DD, nr_tx_pages=16)
            fe_port, _ = xen.event_channel()
            async with trio.open_nursery() as nursery:
                await nursery.start(nf.run)
                nf.connect(fe_port)
                await nf.disconnect()                  # the first backend goes away
                await trio.testing.wait_all_tasks_blocked()
                await nf.prepare(DD)                   # a handshake that never connects
                await nf.disconnect()
                await nf.prepare(9)                    # the next one does
                got = await connect_new_backend(xen, nursery, nf, new_dd)
                await nf.send(frame(2, 1, b"\x01" * 50))
                with trio.fail_after(TIMEOUT):
                    await nf.flush()                   # needs the service task's tx responses
                assert len(got) == 1
                nursery.cancel_scope.cancel()
    trio.run(main)
