"""A hostile guest kernel for the network tests: it attacks netback through its tx ring.

It runs the vif handshake by hand (so that nothing in netfront stands between
it and the ring), then puts malformed tx requests on the ring (a grant
reference it never made, a fragment crossing its page, a one-slot packet
larger than a page, a packet shorter than an Ethernet header), then one good
packet, and records each answer's status under data/hostile/<case>.  Last it
publishes a producer index far past the ring, which netback can only answer by
disconnecting the vif; it then writes data/hostile/done.
"""

from __future__ import annotations

import trio

from domains.kernel import control
from domains.kernel.boot import Kernel, boot
from domains.kernel.xenbus import FrontendDevice, XenbusState, read_state, wait_until
from domains.kernel.xenstore import open_ring_client
from ipc.netif import RX_ENTRY_SIZE, TX_ENTRY_SIZE, NetifTxRequest, NetifTxResponse
from ipc.ring import FrontRing


async def main(k: Kernel) -> None:
    page = k.memory.pages[k.start_info["store_gfn"]]
    port = k.events.adopt(k.start_info["store_evtchn"])
    async with open_ring_client(page.map, port.notify, port.wait) as xs:
        base = f"/local/domain/{k.domid}/data/hostile"
        dev = FrontendDevice(xs, k.domid, "vif", 0)
        be_path, be_id = await dev.wait_for_backend({XenbusState.InitWait}, timeout=60)
        tx_page, rx_page, data = await k.memory.alloc(3)
        tx = FrontRing.init(tx_page.map, TX_ENTRY_SIZE)
        FrontRing.init(rx_page.map, RX_ENTRY_SIZE)
        tx_ref = k.grants.grant_access(be_id, tx_page.gfn)
        rx_ref = k.grants.grant_access(be_id, rx_page.gfn)
        evtchn = await k.events.alloc_unbound(be_id)

        async def publish(t) -> None:
            await t.write(f"{dev.nodename}/tx-ring-ref", str(tx_ref))
            await t.write(f"{dev.nodename}/rx-ring-ref", str(rx_ref))
            await t.write(f"{dev.nodename}/event-channel", str(evtchn.port))
            await t.write(f"{dev.nodename}/request-rx-copy", "1")
            await t.write(f"{dev.nodename}/state", str(int(XenbusState.Initialised)))
        await xs.run_transaction(publish)

        async def connected():
            return await read_state(xs, be_path) == XenbusState.Connected
        await wait_until(xs, [f"{be_path}/state"], connected, timeout=60)
        await dev.switch_state(XenbusState.Connected)

        # A broadcast frame of a local experimental ethertype: harmless to the bridge.
        data.map[0:64] = b"\xff" * 6 + b"\x00\x16\x3e\x66\x66\x66" + b"\x88\xb5" + bytes(50)
        good = k.grants.grant_access(be_id, data.gfn, readonly=True)
        cases = {
            "bad_gref": NetifTxRequest(9999, 0, 0, 1, 64),
            "crosses_page": NetifTxRequest(good, 4000, 0, 2, 200),
            "oversize_slot": NetifTxRequest(good, 0, 0, 3, 5000),
            "runt": NetifTxRequest(good, 0, 0, 4, 10),
            "still_works": NetifTxRequest(good, 0, 0, 5, 64),
        }
        names = {req.id: name for name, req in cases.items()}
        for req in cases.values():
            tx.put_request(req.pack())
        if tx.push_requests_and_check_notify():
            evtchn.notify_nowait()
        got = 0
        with trio.fail_after(30):
            while got < len(cases):
                for raw in tx.responses():
                    rsp = NetifTxResponse.unpack(raw)
                    await xs.write(f"{base}/{names.get(rsp.id, f'id{rsp.id}')}",
                                   str(rsp.status).encode())
                    got += 1
                if got < len(cases) and not tx.final_check_for_responses():
                    await evtchn.wait()
        tx.sring.req_prod = (tx.req_prod_pvt + 1000) & 0xFFFFFFFF
        evtchn.notify_nowait()
        await xs.write(f"{base}/done", b"1")
        await control.run(k, xs)


def kernel_main(start: dict, fds: dict) -> int:
    return boot(start, fds, main)
