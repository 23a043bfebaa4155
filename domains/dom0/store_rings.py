"""xenstored's ring side: one XenStore connection per introduced guest.

When the toolstack introduces a domain, xenstored maps the guest's XenStore page
(grant reference 1, seeded by the toolstack), binds the event channel the
builder allocated, and starts serving requests from the ring with the guest's
domid as the caller, the identity fixed here and nowhere else.  Releasing a
domain stops the task, unmaps the page and fires @releaseDomain.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from ipc.grant_abi import GNTTAB_RESERVED_XENSTORE

if TYPE_CHECKING:
    from domains.kernel.boot import Kernel

log = logging.getLogger("xenstored")


@dataclass
class _Ring:
    mapping: object
    port: object
    cancel: trio.CancelScope
    done: trio.Event


class StoreRings:
    def __init__(self, k: "Kernel", store) -> None:
        self.k = k
        self.store = store
        self.rings: dict[int, _Ring] = {}

    async def introduce(self, domid: int, remote_port: int) -> None:
        from domains.dom0.xenstored import serve_ring
        mapping = await self.k.grants.map(domid, GNTTAB_RESERVED_XENSTORE)
        try:
            port = await self.k.events.bind_interdomain(domid, remote_port)
        except BaseException:
            await self.k.grants.unmap(mapping)
            raise
        ring = _Ring(mapping, port, trio.CancelScope(), trio.Event())
        self.rings[domid] = ring
        self.store.introduce_domain(domid)

        async def serve() -> None:
            try:
                with ring.cancel:
                    await serve_ring(self.store, domid, mapping.map, port.kick, port.wait)
            except Exception:
                log.exception("xenstore ring of d%d failed; connection dropped", domid)
            finally:
                ring.done.set()   # the ring's views of the page are released by now
        self.k.nursery.start_soon(serve)

    async def release(self, domid: int) -> None:
        ring = self.rings.pop(domid, None)
        if self.store.is_domain_introduced(domid):
            self.store.release_domain(domid)
        if ring is None:
            return
        ring.cancel.cancel()
        await ring.done.wait()   # the page can be unmapped only once nothing views it
        try:
            await ring.port.close()
        except Exception:
            pass
        await self.k.grants.unmap(ring.mapping)
