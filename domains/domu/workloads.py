"""Guest workloads, named by `extra = "workload=NAME"` in a guest's config.

A workload keeps its counters in XenStore under
`/local/domain/<domid>/data/workload/` (ops, errors, verify_failures), where
`run.py up` and anyone with `xl xenstore-ls` can watch them.

- heartbeat: count seconds alive; proves the guest is scheduled and its
  XenStore ring works.
- disk: write, read back and verify the first virtual disk through blkfront,
  checking every acknowledged write (disk_workload.py).
- ping: ping the peer guest through the first vif (net_workload.py).
- net: ping plus a UDP stream whose sequence numbers and contents the peer
  checks (loss, duplication, reordering, corruption) (net_workload.py).
- A combination joined by '+', e.g. ``disk+net``: the parts run side by side,
  each part's counters prefixed with its name (``disk_ops``, ``net_ops``, ...),
  and ``ops``, ``errors`` and ``verify_failures`` are the sums.

Arguments follow the name as key=value words, in the config's ``workload``
string: ``workload = "disk+net peer=10.0.0.2"`` (the guest kernel sees them
on its command line).
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


async def disk(k, xs, console, prefix: str = "") -> None:
    """Write, read back and verify the guest's first disk (see disk_workload.py)."""
    from domains.domu import disk_workload
    await disk_workload.run(k, xs, console, prefix=prefix)


async def ping(k, xs, console, prefix: str = "") -> None:
    """Ping the peer guest (see net_workload.py)."""
    from domains.domu import net_workload
    await net_workload.run(k, xs, console, udp=False, prefix=prefix)


async def net(k, xs, console, prefix: str = "") -> None:
    """Ping plus a sequence-checked UDP stream to the peer (see net_workload.py)."""
    from domains.domu import net_workload
    await net_workload.run(k, xs, console, udp=True, prefix=prefix)


WORKLOADS = {"heartbeat": heartbeat, "disk": disk, "ping": ping, "net": net}
#: Workloads that can be combined with '+' (they take a counter prefix).
COMBINABLE = {"disk", "ping", "net"}
TOTALS = ("ops", "errors", "verify_failures")


async def totals(k, xs, prefixes: list[str]) -> None:
    """Keep ops/errors/verify_failures as the sums of the parts' prefixed counters."""
    base = f"/local/domain/{k.domid}/data/workload"
    while True:
        for key in TOTALS:
            total = 0
            for p in prefixes:
                try:
                    total += int((await xs.read(f"{base}/{p}{key}")).decode() or 0)
                except (OSError, ValueError):
                    pass
            await xs.write(f"{base}/{key}", str(total).encode())
        await trio.sleep(0.5)


async def run(name: str, k, xs, console) -> None:
    parts = name.split("+")
    unknown = [p for p in parts if p not in WORKLOADS]
    if unknown:
        await console.write(f"unknown workload '{unknown[0]}'; known: "
                            f"{', '.join(sorted(WORKLOADS))}\n")
        return
    await console.write(f"{k.name}: starting workload {name}\n")
    if len(parts) == 1:
        await WORKLOADS[name](k, xs, console)
        return
    if not set(parts) <= COMBINABLE or len(set(parts)) != len(parts):
        await console.write(f"workload '{name}': only distinct parts among "
                            f"{', '.join(sorted(COMBINABLE))} can be combined with '+'\n")
        return
    async with trio.open_nursery() as nursery:
        for part in parts:
            nursery.start_soon(WORKLOADS[part], k, xs, console, f"{part}_")
        nursery.start_soon(totals, k, xs, [f"{p}_" for p in parts])
