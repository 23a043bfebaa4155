"""xenstored's side of a guest's ring page.

In Xen
    After INTRODUCE, xenstored maps the guest's xenstore page
    (``struct xenstore_domain_interface``), binds the event channel, and from
    then on reads requests from ``req[]`` and writes replies and watch events
    to ``rsp[]`` (docs/misc/xenstore-ring.txt).  The connection's identity is
    the introduced domid; nothing the guest writes can change it.  If the
    guest corrupts the ring indexes or sends an oversized message, xenstored
    stops serving it and, if it advertised the feature, says why in the
    page's ``error`` word.

Here
    :func:`serve_ring` serves one guest given its page as a writable buffer
    and the two event-channel callables (``notify`` kicks the guest, ``wait``
    returns after the guest kicked us).  It introduces the domain if nobody
    has yet, and stops when the domain is released
    (:meth:`~.core.XenStore.release_domain`) or the task is cancelled.

Invariant
    A misbehaving guest ends only its own connection: errors are reported in
    the ring's ``error`` word and logged; the daemon and every other client
    carry on.

Differences from Xen
    The ring-reconnection feature (``connection`` word) is not offered; a
    guest that wants a fresh connection is re-introduced by the toolstack.
"""

from __future__ import annotations

import logging

import trio

from domains.kernel.exception_groups import first_leaf
from ipc.xs_ring import (RingEndpoint, RingIndexError, Notify, Wait,
                         XENSTORE_ERROR_PROTO, XENSTORE_ERROR_RINGIDX,
                         XENSTORE_SERVER_FEATURE_ERROR)

from .connection import Connection
from .core import XenStore

__all__ = ["serve_ring"]

log = logging.getLogger("microxen.xenstored")


class _RingConnection(Connection):
    def __init__(self, store: XenStore, domid: int, endpoint: RingEndpoint) -> None:
        super().__init__(store, domid, privileged=False, name=f"domain {domid} ring")
        self.endpoint = endpoint

    def protocol_error(self, why: str) -> None:
        self.endpoint.ring.error = XENSTORE_ERROR_PROTO


async def serve_ring(store: XenStore, domid: int, buf, notify: Notify, wait: Wait,
                     *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve domain ``domid`` on its xenstore ring until released or cancelled."""
    endpoint = RingEndpoint(buf, notify, wait, side="server")
    ring = endpoint.ring
    ring.server_features = ring.server_features | XENSTORE_SERVER_FEATURE_ERROR
    conn = _RingConnection(store, domid, endpoint)
    if not store.domains.is_introduced(domid):
        store.introduce_domain(domid)
    info = store.domains.get(domid)
    try:
        with trio.CancelScope() as scope:
            info.closers.append(scope.cancel)
            task_status.started()
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(endpoint.run)
                    await conn.serve(endpoint.receive_some, endpoint.send_all)
                    nursery.cancel_scope.cancel()
            except* RingIndexError as group:     # out of the nursery, in a group
                log.warning("xenstored: domain %d: %s; connection stopped", domid,
                            first_leaf(group))
                ring.error = XENSTORE_ERROR_RINGIDX
            finally:
                if scope.cancel in info.closers:
                    info.closers.remove(scope.cancel)
    finally:
        conn.close()
        endpoint.close()
