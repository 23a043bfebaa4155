"""Per-domain XenStore quotas: one guest cannot exhaust the daemon.

In Xen
    xenstored is shared by every domain, so it limits what each unprivileged
    domain may consume: nodes it owns, the size of one node, watches,
    concurrent transactions, and requests in flight (C xenstored's
    ``-e/-S/-W/-t`` options and ``quota-*`` settings; oxenstored's
    ``quota-maxentity``, ``quota-maxsize``, ``quota-maxwatch``,
    ``quota-transactions``).  Dom0 is exempt.

Here
    :class:`Quota` holds the limits, with C xenstored's default values, and
    :meth:`Quota.check` raises the error a client sees:

    * a node bigger than ``max_node_size`` (value + perms + child names), or
      a path longer than allowed -> ``E2BIG``;
    * more nodes owned, watches, or open transactions than allowed ->
      ``EQUOTA`` (oxenstored's name; C xenstored says ENOSPC or E2BIG for the
      same events, and a C client shows EQUOTA as EINVAL);
    * more than ``max_outstanding`` requests queued on one connection is
      prevented rather than reported: the transport simply stops reading
      from that connection until it has caught up (see connection.py).

Invariant
    Limits are checked *before* a change is made, so a refused request
    changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from ipc.xs_wire import XenStoreError

__all__ = ["Quota"]


@dataclass
class Quota:
    max_nodes: int = 1000             # nodes one domain may own
    max_node_size: int = 2048         # bytes in one node
    max_watches: int = 128            # watches per connection
    max_transactions: int = 10        # open transactions per connection
    max_outstanding: int = 20         # requests decoded but not yet answered
    max_pending_events: int = 1024    # watch events queued for one client

    def check_nodes(self, domid: int, owned: int, adding: int = 1) -> None:
        if domid != 0 and owned + adding > self.max_nodes:
            raise XenStoreError(
                "EQUOTA", f"domain {domid} would own {owned + adding} nodes; "
                f"quota is {self.max_nodes}")

    def check_node_size(self, domid: int, size: int, path: str) -> None:
        if domid != 0 and size > self.max_node_size:
            raise XenStoreError(
                "E2BIG", f"node {path[:80]} would be {size} bytes; "
                f"limit is {self.max_node_size}")

    def check_watches(self, domid: int, count: int) -> None:
        if domid != 0 and count >= self.max_watches:
            raise XenStoreError(
                "EQUOTA", f"domain {domid} already has {count} watches; "
                f"quota is {self.max_watches}")

    def check_transactions(self, domid: int, count: int) -> None:
        if domid != 0 and count >= self.max_transactions:
            raise XenStoreError(
                "EQUOTA", f"domain {domid} already has {count} open "
                f"transactions; quota is {self.max_transactions}")
