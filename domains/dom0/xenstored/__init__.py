"""xenstored: dom0's XenStore daemon (docs/misc/xenstore.txt).

Entry points::

    store = XenStore()                               # the database + operations
    await nursery.start(serve_socket, store, path)   # privileged Unix socket
    await nursery.start(serve_ring, store, domid, buf, notify, wait)  # a guest
    store.introduce_domain(domid) / store.release_domain(domid)
    xs = store.connect()                             # dom0's in-process connection
    await write_domain_entries(xs, domid, name, memory_kb=...)
    await remove_domain_entries(xs, domid)

Modules: store (tree, nodes, paths), permissions, transaction, watch, quota,
domain, core (the operations), connection (wire + in-process clients),
socket_server, ring_server.
"""

from .connection import Connection, InProcessConnection
from .core import XenStore
from .domain import remove_domain_entries, write_domain_entries
from .quota import Quota
from .ring_server import serve_ring
from .socket_server import serve_socket

__all__ = ["XenStore", "Quota", "Connection", "InProcessConnection",
           "serve_socket", "serve_ring", "write_domain_entries",
           "remove_domain_entries"]
