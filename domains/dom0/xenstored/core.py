"""xenstored's core: every XenStore operation, checked and applied.

In Xen
    C xenstored's ``core.c`` receives a request from a connection, works out
    who is asking (the connection's domain), checks permissions and quotas,
    applies the change to the database or to the caller's transaction, fires
    watches and replies.

Here
    :class:`XenStore` owns the :class:`~.store.Tree`, the
    :class:`~.watch.WatchTable`, the :class:`~.domain.DomainTable` and the
    :class:`~.quota.Quota`, and has one method per operation taking a
    *caller* -- any object with ``domid``, ``privileged`` and a
    ``transactions`` dict (a wire :class:`~.connection.Connection` or the
    in-process :class:`~.connection.InProcessConnection`).  Methods take and
    return Python values; encoding is the connection's business.  Every
    method is synchronous, so one request is atomic with respect to every
    other without any lock.

Invariant
    The caller's identity comes from the connection, never from the request.
    Each operation checks everything (path syntax, permission, quota)
    before it changes anything, so a refused request changes nothing.
"""

from __future__ import annotations

import logging
from typing import Callable, Protocol

from ipc.xs_wire import XENSTORE_PAYLOAD_MAX, XenStoreError

from .domain import DomainTable
from .permissions import (OWNER, READ, WRITE, DOMID_FIRST_RESERVED, Perms,
                          access, format_perms, inherit_perms, parse_perms)
from .quota import Quota
from .store import (SPECIAL_PATHS, Change, Tree, View, basename_of,
                    canonical_path, domain_path, make_node, missing_ancestors,
                    parent_of, remove_node, write_node)
from .transaction import Transaction
from .watch import WatchTable

__all__ = ["XenStore", "Caller"]

log = logging.getLogger("microxen.xenstored")


class Caller(Protocol):
    domid: int
    privileged: bool
    transactions: dict[int, Transaction]

    def deliver_watch_event(self, epath: str, token: bytes) -> None: ...


class XenStore:
    """The daemon's state and operations (transport-independent)."""

    def __init__(self, quota: Quota | None = None) -> None:
        self.tree = Tree()
        self.watches = WatchTable()
        self.domains = DomainTable()
        self.quota = quota or Quota()
        self._next_txid = 1
        #: Called as ``ring_connector(domid, mfn, port)`` when INTRODUCE
        #: arrives over the wire, to go and serve that domain's ring.
        self.ring_connector: Callable[[int, int, int], None] | None = None

    # -- helpers -------------------------------------------------------------
    def _view(self, caller: Caller, txid: int) -> View:
        if not txid:
            return self.tree
        tx = caller.transactions.get(txid)
        if tx is None:
            raise XenStoreError("ENOENT", f"no transaction {txid} on this connection")
        return tx

    def _perm(self, caller: Caller, perms: Perms) -> int:
        target = self.domains.target_of(caller.domid) if not caller.privileged else None
        return access(perms, caller.domid, caller.privileged, target)

    def _need(self, caller: Caller, view: View, path: str, bit: int):
        node = view.get(path)
        if node is None:
            raise XenStoreError("ENOENT", path)
        if not self._perm(caller, node.perms) & bit:
            raise XenStoreError("EACCES", f"domain {caller.domid} may not "
                                f"{'read' if bit == READ else 'change'} {path}")
        return node

    def _announce(self, view: View, changes: list[Change]) -> None:
        if view is self.tree:
            for c in changes:
                self.watches.fire(c)
        else:
            view.changes.extend(changes)   # type: ignore[attr-defined]

    def _owned(self, view: View, domid: int) -> int:
        if isinstance(view, Transaction):
            return view.owned(domid)
        return self.tree.nodes_by_owner.get(domid, 0)

    def _check_create(self, caller: Caller, view: View, path: str,
                      value_size: int) -> None:
        """Permission and quota checks for creating ``path`` (and parents)."""
        top, missing = missing_ancestors(view, path)
        self._need(caller, view, top, WRITE)
        if not caller.privileged:
            self.quota.check_nodes(caller.domid, self._owned(view, caller.domid),
                                   len(missing))
            self.quota.check_node_size(caller.domid, value_size + 16, path)

    # -- database operations ------------------------------------------------
    def read(self, caller: Caller, path: bytes | str, txid: int = 0) -> bytes:
        p = canonical_path(_b(path), caller.domid)
        view = self._view(caller, txid)
        return self._need(caller, view, p, READ).value

    def write(self, caller: Caller, path: bytes | str, value: bytes,
              txid: int = 0) -> None:
        p = canonical_path(_b(path), caller.domid)
        view = self._view(caller, txid)
        node = view.get(p)
        if node is None:
            self._check_create(caller, view, p, len(value))
        else:
            if not self._perm(caller, node.perms) & WRITE:
                raise XenStoreError("EACCES", f"domain {caller.domid} may not change {p}")
            if not caller.privileged:
                self.quota.check_node_size(
                    caller.domid, node.size() - len(node.value) + len(value), p)
        changes: list[Change] = []
        write_node(view, p, value, self._new_perms(caller), changes)
        self._announce(view, changes)

    def mkdir(self, caller: Caller, path: bytes | str, txid: int = 0) -> None:
        p = canonical_path(_b(path), caller.domid)
        view = self._view(caller, txid)
        node = view.get(p)
        if node is not None:
            if not self._perm(caller, node.perms) & WRITE:
                raise XenStoreError("EACCES", f"domain {caller.domid} may not change {p}")
            return
        self._check_create(caller, view, p, 0)
        changes: list[Change] = []
        make_node(view, p, self._new_perms(caller), changes)
        self._announce(view, changes)

    def rm(self, caller: Caller, path: bytes | str, txid: int = 0) -> None:
        p = canonical_path(_b(path), caller.domid)
        if p == "/":
            raise XenStoreError("EINVAL", "cannot remove /")
        view = self._view(caller, txid)
        node = view.get(p)
        if node is None:
            if view.get(parent_of(p)) is None:
                raise XenStoreError("ENOENT", f"neither {p} nor its parent exists")
            return
        if not self._perm(caller, node.perms) & WRITE:
            raise XenStoreError("EACCES", f"domain {caller.domid} may not remove {p}")
        changes: list[Change] = []
        remove_node(view, p, changes)
        self._announce(view, changes)

    def directory(self, caller: Caller, path: bytes | str, txid: int = 0) -> list[str]:
        p = canonical_path(_b(path), caller.domid)
        view = self._view(caller, txid)
        return list(self._need(caller, view, p, READ).children)

    def directory_part(self, caller: Caller, path: bytes | str, offset: int,
                       txid: int = 0) -> tuple[int, bytes]:
        """(generation, NUL-terminated child names from byte ``offset``).

        Like C xenstored, the answer is cut to fit one payload; an extra
        empty string marks the end of the list.
        """
        p = canonical_path(_b(path), caller.domid)
        view = self._view(caller, txid)
        node = self._need(caller, view, p, READ)
        names = b"".join(c.encode() + b"\0" for c in node.children)
        gen = str(node.generation).encode() + b"\0"
        if offset > len(names):
            raise XenStoreError("EINVAL", f"offset {offset} beyond the "
                                f"{len(names)}-byte child list of {p}")
        room = XENSTORE_PAYLOAD_MAX - len(gen) - 1
        chunk = names[offset:]
        if len(chunk) <= room:
            return node.generation, chunk + b"\0"
        cut = chunk.rfind(b"\0", 0, room) + 1   # whole names only
        return node.generation, chunk[:cut]

    def get_perms(self, caller: Caller, path: bytes | str, txid: int = 0) -> list[str]:
        p = canonical_path(_b(path), caller.domid, allow_special=True)
        if p in SPECIAL_PATHS:
            return format_perms(self.watches.special_perms[p])
        view = self._view(caller, txid)
        return format_perms(self._need(caller, view, p, READ).perms)

    def set_perms(self, caller: Caller, path: bytes | str,
                  perms: list[bytes] | list[str], txid: int = 0) -> None:
        p = canonical_path(_b(path), caller.domid, allow_special=True)
        new = parse_perms([_b(x) for x in perms])
        if p in SPECIAL_PATHS:
            if not caller.privileged:
                raise XenStoreError("EACCES", f"only dom0 may set perms of {p}")
            self.watches.special_perms[p] = new
            return
        view = self._view(caller, txid)
        node = view.get(p)
        if node is None:
            raise XenStoreError("ENOENT", p)
        if not self._perm(caller, node.perms) & OWNER:
            raise XenStoreError("EACCES", f"domain {caller.domid} does not own {p}")
        if not caller.privileged:
            if new[0][0] != node.owner:
                raise XenStoreError("EPERM", f"domain {caller.domid} may not give "
                                    f"{p} to domain {new[0][0]}")
            if len(new) > 5:
                raise XenStoreError("E2BIG", f"{len(new)} permission entries; limit 5")
        view.put(p, node.evolve(perms=new))
        view.owner_changed(node.owner, new[0][0])   # type: ignore[attr-defined]
        # Readers of the old or the new perms may care: announce with both.
        self._announce(view, [Change(p, new)] if new == node.perms
                       else [Change(p, node.perms), Change(p, new)])

    def _new_perms(self, caller: Caller):
        domid, priv = caller.domid, caller.privileged
        return lambda parent: inherit_perms(parent, domid, priv)

    # -- watches -------------------------------------------------------------
    def watch(self, caller: Caller, path: bytes | str, token: bytes) -> None:
        """Add a watch and queue its initial event (after the caller's reply)."""
        raw = _b(path)
        p = canonical_path(raw, caller.domid, allow_special=True)
        self.quota.check_watches(caller.domid, self.watches.count(caller))
        strip = 0 if raw[:1] in (b"/", b"@") else len(domain_path(caller.domid)) + 1
        self.watches.add(caller, p, bytes(token), strip)

    def unwatch(self, caller: Caller, path: bytes | str, token: bytes) -> None:
        p = canonical_path(_b(path), caller.domid, allow_special=True)
        self.watches.remove(caller, p, bytes(token))

    def reset_watches(self, caller: Caller) -> None:
        """RESET_WATCHES: drop all of the caller's watches and transactions."""
        self.watches.remove_all(caller)
        caller.transactions.clear()

    # -- transactions --------------------------------------------------------
    def transaction_start(self, caller: Caller) -> int:
        self.quota.check_transactions(caller.domid, len(caller.transactions))
        # Ids are global and free-running, so a stale id from an ended
        # transaction is not soon reused; 0 means "no transaction".
        txid = self._next_txid
        while txid == 0 or txid in caller.transactions:
            txid = (txid + 1) & 0xFFFFFFFF
        self._next_txid = (txid + 1) & 0xFFFFFFFF
        caller.transactions[txid] = Transaction(self.tree, txid, caller.domid)
        return txid

    def transaction_end(self, caller: Caller, txid: int, commit: bool) -> None:
        tx = caller.transactions.pop(txid, None)
        if tx is None:
            raise XenStoreError("ENOENT", f"no transaction {txid} on this connection")
        if not commit:
            return
        bad = tx.conflicts()
        if bad:
            raise XenStoreError("EAGAIN", f"transaction {txid} conflicts on "
                                f"{', '.join(bad[:3])}")
        for c in tx.apply():
            self.watches.fire(c)

    # -- domains -------------------------------------------------------------
    def introduce_domain(self, domid: int, mfn: int = 0, port: int = 0) -> None:
        """Record that ``domid`` is connected and fire @introduceDomain."""
        _check_domid(domid, allow_dom0=False)
        self.domains.introduce(domid, mfn, port)
        self.watches.fire_special("@introduceDomain")

    def release_domain(self, domid: int) -> None:
        """Forget ``domid``: close its ring connections, fire @releaseDomain."""
        _check_domid(domid, allow_dom0=False)
        info = self.domains.release(domid)
        if info is None:
            raise XenStoreError("ENOENT", f"domain {domid} was not introduced")
        for close in info.closers:
            close()
        self.watches.fire_special("@releaseDomain")

    def is_domain_introduced(self, domid: int) -> bool:
        return domid == 0 or self.domains.is_introduced(domid)

    def get_domain_path(self, domid: int) -> str:
        _check_domid(domid, allow_dom0=True)
        return domain_path(domid)

    def set_target(self, domid: int, target: int) -> None:
        _check_domid(domid, allow_dom0=False)
        _check_domid(target, allow_dom0=False)
        info = self.domains.get(domid)
        if info is None:
            raise XenStoreError("ENOENT", f"domain {domid} was not introduced")
        info.target = target

    # -- CONTROL -------------------------------------------------------------
    CONTROL_COMMANDS = ("check", "help", "log", "print", "quota")

    def control(self, caller: Caller, args: list[bytes]) -> bytes:
        if not args:
            raise XenStoreError("EINVAL", "CONTROL needs a command")
        cmd = args[0].decode("ascii", "replace")
        if cmd == "help":
            return "".join(f"{c}\n" for c in self.CONTROL_COMMANDS).encode() + b"\0"
        if cmd == "check":
            problems = self.check()
            if problems:
                raise XenStoreError("EIO", "; ".join(problems[:3]))
            return b"OK\0"
        if cmd == "log":
            return b"OK\0"
        if cmd == "print":
            log.info("CONTROL print: %s", b" ".join(args[1:]).decode("utf-8", "replace"))
            return b"OK\0"
        if cmd == "quota":
            q = self.quota
            return (f"nodes {q.max_nodes}\nnode-size {q.max_node_size}\n"
                    f"watches {q.max_watches}\ntransactions {q.max_transactions}\n"
                    f"outstanding {q.max_outstanding}\n").encode() + b"\0"
        raise XenStoreError("EINVAL", f"unknown CONTROL command {cmd!r}")

    def check(self) -> list[str]:
        """Consistency check of the tree (CONTROL check)."""
        nodes = self.tree.nodes
        problems = []
        for path, node in nodes.items():
            if path == "/":
                continue
            parent = nodes.get(parent_of(path))
            if parent is None:
                problems.append(f"{path} has no parent")
            elif basename_of(path) not in parent.children:
                problems.append(f"{path} missing from its parent's children")
        return problems

    # -- connections ---------------------------------------------------------
    def connect(self, domid: int = 0, privileged: bool | None = None):
        """dom0's in-process connection (privileged when ``domid`` is 0).

        Returns a :class:`~.connection.InProcessConnection`: async methods,
        watch events through a trio channel, no socket involved.
        """
        from .connection import InProcessConnection   # it imports us
        return InProcessConnection(self, domid, privileged)

    def disconnect(self, caller: Caller) -> None:
        """A client went away: its watches and transactions go with it."""
        self.reset_watches(caller)


def _b(x: bytes | str) -> bytes:
    return x.encode() if isinstance(x, str) else x


def _check_domid(domid: int, *, allow_dom0: bool) -> None:
    if not 0 <= domid < DOMID_FIRST_RESERVED or (domid == 0 and not allow_dom0):
        raise XenStoreError("EINVAL", f"{domid} is not a valid domain id here")


def parse_domid(raw: bytes) -> int:
    text = raw.decode("ascii", "replace")
    if not text.isdigit() or len(text) > 5:
        raise XenStoreError("EINVAL", f"bad domid {text[:16]!r}")
    return int(text)

