"""XenStore transactions: optimistic, with conflicts detected at commit.

In Xen
    TRANSACTION_START returns an id; requests carrying that id in ``tx_id``
    see and change a private copy of the store.  TRANSACTION_END ``T``
    commits, ``F`` aborts.  If another change got in the way the commit fails
    with ``EAGAIN`` and the client retries the whole transaction (Linux's
    xenbus does this in a loop).  Modern C xenstored only fails a commit when
    a node the transaction *read or wrote* changed meanwhile, which it tells
    from each node's generation count.  Watches fire only when, and if, the
    transaction commits.

Here
    A :class:`Transaction` is a copy-on-write overlay on the live
    :class:`~.store.Tree`: ``get`` looks in the overlay, then in the tree,
    remembering the generation it saw the first time it touched each path;
    writes go only to the overlay.  :meth:`Transaction.conflicts` compares
    those generations with the tree's at commit time;
    :meth:`Transaction.apply` copies the overlay into the tree.

Invariant
    A transaction that commits saw, for every path it touched, exactly the
    committed state that is still current: the result is as if it had run
    alone at the moment of commit.  An aborted or failed transaction leaves
    the tree untouched.

Differences from Xen
    Quota for nodes created in a transaction is checked against committed
    counts plus this transaction's own additions; two concurrent
    transactions could together overshoot by a little, as in C xenstored
    before its commit-time re-check.
"""

from __future__ import annotations

from .store import Change, Node, Tree

__all__ = ["Transaction"]

_ABSENT = object()   # overlay marker: deleted in this transaction


class Transaction:
    def __init__(self, tree: Tree, txid: int, domid: int) -> None:
        self.tree = tree
        self.txid = txid
        self.domid = domid
        self._overlay: dict[str, object] = {}
        self._seen: dict[str, int | None] = {}   # path -> generation (None: absent)
        self.changes: list[Change] = []          # watch events, fired on commit
        self.owner_delta: dict[int, int] = {}    # nodes created - removed, by owner
        self.start_generation = tree.generation

    # -- View ---------------------------------------------------------------
    def _note(self, path: str) -> None:
        if path not in self._seen:
            node = self.tree.nodes.get(path)
            self._seen[path] = None if node is None else node.generation

    def get(self, path: str) -> Node | None:
        got = self._overlay.get(path)
        if got is None:
            self._note(path)
            return self.tree.nodes.get(path)
        return None if got is _ABSENT else got   # type: ignore[return-value]

    def put(self, path: str, node: Node) -> None:
        self._note(path)
        self._overlay[path] = node

    def delete(self, path: str) -> None:
        self._note(path)
        self._overlay[path] = _ABSENT

    def node_created(self, node: Node) -> None:
        o = node.owner
        self.owner_delta[o] = self.owner_delta.get(o, 0) + 1

    def node_removed(self, node: Node) -> None:
        o = node.owner
        self.owner_delta[o] = self.owner_delta.get(o, 0) - 1

    def owner_changed(self, old: int, new: int) -> None:
        if old != new:
            self.owner_delta[old] = self.owner_delta.get(old, 0) - 1
            self.owner_delta[new] = self.owner_delta.get(new, 0) + 1

    def owned(self, domid: int) -> int:
        return self.tree.nodes_by_owner.get(domid, 0) + self.owner_delta.get(domid, 0)

    # -- commit -------------------------------------------------------------
    def conflicts(self) -> list[str]:
        """Paths whose committed state moved since this transaction saw them."""
        nodes = self.tree.nodes
        bad = []
        for path, gen in self._seen.items():
            node = nodes.get(path)
            now = None if node is None else node.generation
            if now != gen:
                bad.append(path)
        return bad

    def apply(self) -> list[Change]:
        """Write the overlay into the tree; return the changes to announce."""
        tree = self.tree
        # Parents before children so the tree never has an orphan.
        for path in sorted(self._overlay, key=len):
            got = self._overlay[path]
            if got is _ABSENT:
                if path in tree.nodes:
                    tree.delete(path)
            else:
                tree.put(path, got.evolve())  # type: ignore[union-attr]
        for owner, delta in self.owner_delta.items():
            tree.nodes_by_owner[owner] = tree.nodes_by_owner.get(owner, 0) + delta
        return self.changes
