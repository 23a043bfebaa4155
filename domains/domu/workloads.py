"""Guest workloads, named by `extra = "workload=NAME"` in a guest's config.

A workload keeps its counters in XenStore under
`/local/domain/<domid>/data/workload/` (ops, errors, verify_failures), where
`run.py up` and anyone with `xl xenstore-ls` can watch them.

- heartbeat: count seconds alive; proves the guest is scheduled and its
  XenStore ring works.
- disk: write, read back and verify the first virtual disk through blkfront,
  checking every acknowledged write (disk_workload.py).
"""

from __future__ import annotations

import trio


async def publish(xs, domid: int, counters: dict[str, int]) -> None:
    base = f"/local/domain/{domid}/data/workload"
    for key, value in counters.items():
        await xs.write(f"{base}/{key}", str(value).encode())


async def heartbeat(k, xs, console) -> None:
    counters = {"ops": 0, "errors": 0, "verify_failures": 0}
    while True:
        counters["ops"] += 1
        await publish(xs, k.domid, counters)
        await trio.sleep(1)


async def disk(k, xs, console) -> None:
    """Write, read back and verify the guest's first disk (see disk_workload.py)."""
    from domains.domu import disk_workload
    await disk_workload.run(k, xs, console)


WORKLOADS = {"heartbeat": heartbeat, "disk": disk}


async def run(name: str, k, xs, console) -> None:
    fn = WORKLOADS.get(name)
    if fn is None:
        await console.write(f"unknown workload '{name}'; known: {', '.join(sorted(WORKLOADS))}\n")
        return
    await console.write(f"{k.name}: starting workload {name}\n")
    await fn(k, xs, console)
