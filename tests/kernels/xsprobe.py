"""A guest that tests XenStore's permissions and quotas from inside a real domain.

Booted by the toolstack like any guest (kernel = "tests.kernels.xsprobe"), it
talks to xenstored over its own ring, tries what an unprivileged guest must and
must not be able to do, and publishes the outcome of each probe as JSON in
/local/domain/<domid>/data/probe.  A second round then checks that after all
that flooding it is still served.
"""

from __future__ import annotations

import json

from domains.kernel.boot import Kernel, boot
from ipc.xs_wire import XenStoreError


async def _outcome(coro) -> str:
    try:
        await coro
        return "ok"
    except XenStoreError as exc:
        return exc.name


async def main(k: Kernel) -> None:
    home = f"/local/domain/{k.domid}"
    results: dict[str, object] = {}
    async with k.xenstore() as xs:
        results["read_own_name"] = await _outcome(xs.read(f"{home}/name"))
        results["write_own_data"] = await _outcome(xs.write(f"{home}/data/x", b"1"))
        results["read_dom0"] = await _outcome(xs.read("/local/domain/0/name"))
        results["write_dom0"] = await _outcome(xs.write("/local/domain/0/evil", b"1"))
        results["write_own_name"] = await _outcome(xs.write(f"{home}/name", b"impostor"))
        results["write_root"] = await _outcome(xs.write("/evil", b"1"))
        results["give_away"] = await _outcome(xs.set_perms(f"{home}/data/x", ["n0"]))
        results["introduce"] = await _outcome(xs.introduce(k.domid + 1, 1, 1))
        results["big_node"] = await _outcome(xs.write(f"{home}/data/big", b"x" * 3000))
        # Flood nodes until the quota stops us.
        created, flood_error = 0, "none"
        for i in range(5000):
            try:
                await xs.write(f"{home}/data/flood/n{i}", b"v")
                created += 1
            except XenStoreError as exc:
                flood_error = exc.name
                break
        results["flood_nodes_created"], results["flood_error"] = created, flood_error
        watches, watch_error = [], "none"
        for i in range(500):
            try:
                watches.append(await xs.watch(f"{home}/data/w{i}", f"t{i}"))
            except XenStoreError as exc:
                watch_error = exc.name
                break
        results["watches_made"], results["watch_error"] = len(watches), watch_error
        for w in watches:
            await w.unwatch()
        txs, tx_error = [], "none"
        for _ in range(50):
            try:
                txs.append(await xs.transaction_start())
            except XenStoreError as exc:
                tx_error = exc.name
                break
        results["transactions_made"], results["transaction_error"] = len(txs), tx_error
        for tx in txs:
            await xs.transaction_end(tx, commit=False)
        await xs.rm(f"{home}/data/flood")
        results["still_served"] = await _outcome(xs.write(f"{home}/data/after", b"ok"))
        await xs.write(f"{home}/data/probe", json.dumps(results).encode())
        await k.printk("xsprobe: done")
        async with await xs.watch(f"{home}/control/shutdown") as w:
            async for _ in w:
                if (await xs.read(f"{home}/control/shutdown")) in (b"poweroff", b"reboot"):
                    return


def kernel_main(start: dict, fds: dict) -> int:
    return boot(start, fds, main)
