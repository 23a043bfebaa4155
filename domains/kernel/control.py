"""The PV control driver: shutdown requests through XenStore.

`xl shutdown` and `xl reboot` do not signal a guest; they write "poweroff" or
"reboot" to `/local/domain/<domid>/control/shutdown`.  The guest watches that
node, clears it to acknowledge, and shuts itself down with SCHEDOP_shutdown
and the matching reason (docs/misc/xenstore-paths).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ipc.sched_abi import SHUTDOWN_crash, SHUTDOWN_poweroff, SHUTDOWN_reboot

if TYPE_CHECKING:
    from domains.kernel.boot import Kernel

REQUESTS = {"poweroff": SHUTDOWN_poweroff, "halt": SHUTDOWN_poweroff,
            "reboot": SHUTDOWN_reboot, "crash": SHUTDOWN_crash}


async def advertise(xs, domid: int) -> None:
    for feature in ("feature-poweroff", "feature-reboot"):
        await xs.write(f"/local/domain/{domid}/control/{feature}", b"1")


async def run(k: "Kernel", xs, before_shutdown=None) -> None:
    """Wait for a shutdown request and carry it out (never returns otherwise)."""
    node = f"/local/domain/{k.domid}/control/shutdown"
    await advertise(xs, k.domid)
    async with await xs.watch(node) as watch:
        async for _event in watch:
            try:
                request = (await xs.read(node)).decode()
            except OSError:
                continue
            if request not in REQUESTS:
                continue
            await xs.write(node, b"")
            k.log.info("control: %s requested", request)
            if before_shutdown is not None:
                await before_shutdown(request)
            await k.shutdown(REQUESTS[request])
