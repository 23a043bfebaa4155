"""The guest kernel: what a PV Linux guest is to Xen, in one module.

A guest boots with start_info naming its XenStore and console pages and their
event channels.  It connects to XenStore over its ring, prints to its console,
and starts its drivers: the control driver (shutdown/reboot), the balloon, a
shell on its console (shell.py), then the workload named in its config
(`workload = "NAME"`), which opens the frontends it needs.
"""

from __future__ import annotations

import trio

from domains.domu import shell
from domains.kernel import balloon, control
from domains.kernel.boot import Kernel, boot
from domains.kernel.console import Console


async def main(k: Kernel) -> None:
    console = Console(k)
    await console.write(f"microxen guest kernel: {k.name} (domain {k.domid}) booting\n")
    async with k.xenstore() as xs:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(balloon.run, k, xs)
            nursery.start_soon(shell.run, k, xs, console)
            await console.write(f"{k.name}: xenstore connected; domain path "
                                f"{await xs.get_domain_path(k.domid)}\n")
            workload = k.cmdline.get("workload")
            if workload:
                from domains.domu import workloads
                nursery.start_soon(workloads.run, workload, k, xs, console)
            await control.run(k, xs)


def kernel_main(start: dict, fds: dict) -> int:
    return boot(start, fds, main)
