"""A guest kernel that times XenStore requests over its own ring, inside a real domain.

The numbers include everything a real guest pays: the ring page, the event
channel through the hypervisor, xenstored's ring server in dom0 and dom0's
trio loop.  Results (median and p99 in µs; a node holds 2 KiB at most) go to
/local/domain/<domid>/data/xsbench as JSON.
"""

from __future__ import annotations

import json
import time

from domains.kernel.boot import Kernel, boot


async def main(k: Kernel) -> None:
    n = int(k.cmdline.get("n", "2000"))
    home = f"/local/domain/{k.domid}"
    async with k.xenstore() as xs:
        await xs.write(f"{home}/data/v", b"x" * 16)
        out = {}
        for op in ("read", "write"):
            samples = []
            for i in range(n + 100):
                t0 = time.perf_counter_ns()
                if op == "read":
                    await xs.read(f"{home}/data/v")
                else:
                    await xs.write(f"{home}/data/v", b"y" * 16)
                if i >= 100:   # warm-up
                    samples.append((time.perf_counter_ns() - t0) / 1000)
            samples.sort()
            out[op] = {"median": samples[len(samples) // 2],
                       "p99": samples[min(len(samples) - 1, int(len(samples) * 0.99))],
                       "n": len(samples)}
        await xs.write(f"{home}/data/xsbench", json.dumps(out).encode())
        async with await xs.watch(f"{home}/control/shutdown") as w:
            async for _ in w:
                if await xs.read(f"{home}/control/shutdown"):
                    return


def kernel_main(start: dict, fds: dict) -> int:
    return boot(start, fds, main)
