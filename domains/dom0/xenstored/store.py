"""The XenStore database: a tree of nodes with values, permissions, generations.

In Xen
    xenstored keeps a hierarchical database (docs/misc/xenstore.txt).  Every
    path names a node; every node has a (possibly empty) byte value, a
    permission list and an ordered list of children; a node's parents always
    exist.  C xenstored also gives each node a *generation count*, bumped on
    every change, which it uses to detect transaction conflicts and which
    DIRECTORY_PART returns so a client can tell a listing changed under it.

Here
    :class:`Tree` is a flat ``dict`` from canonical absolute path to
    :class:`Node` (lookups are one hash probe on the hot READ path), plus the
    operations every view of the store shares.  :class:`View` is the small
    interface (``get``/``put``/``delete``) that both the live tree and a
    transaction's private overlay implement, so WRITE, MKDIR, RM and
    SET_PERMS are written once (:func:`write_node`, :func:`make_node`,
    :func:`remove_node`) and run unchanged inside or outside a transaction.

Invariant
    A :class:`Node` object is never changed once it is in a view: a writer
    copies it (:meth:`Node.evolve`) and puts the copy.  Transactions can
    therefore hold references to committed nodes without copying the store.
    Every path in the tree has its parent in the tree.

Differences from Xen
    No on-disk TDB and no live-update state; the store lives and dies with
    the xenstored process, as in a Xen host reboot.
"""

from __future__ import annotations

import re
from typing import Iterator, Protocol

from ipc.xs_wire import (XENSTORE_ABS_PATH_MAX, XENSTORE_REL_PATH_MAX,
                         XenStoreError)

from .permissions import Perms, DOM0_ONLY

__all__ = ["Node", "Tree", "View", "Change", "canonical_path", "parent_of",
           "basename_of", "is_child", "domain_path", "SPECIAL_PATHS",
           "write_node", "make_node", "remove_node"]

#: The only ``@`` paths that mean anything (watch targets, xenstore.txt).
SPECIAL_PATHS = ("@introduceDomain", "@releaseDomain")

_VALID_PATH = re.compile(rb"^[A-Za-z0-9\-/_@]+$")


def domain_path(domid: int) -> str:
    """A domain's home, the base of its relative paths (GET_DOMAIN_PATH)."""
    return f"/local/domain/{domid}"


_path_cache: dict[tuple[bytes, int], str] = {}
_PATH_CACHE_MAX = 8192


def canonical_path(raw: bytes, caller_domid: int, *,
                   allow_special: bool = False) -> str:
    """Validate a wire path and make it absolute (cached: this is the hot path)."""
    key = (raw, caller_domid)
    hit = _path_cache.get(key)
    if hit is not None:
        return hit
    path = _canonical_path(raw, caller_domid, allow_special)
    if path[0] == "/":          # special names depend on allow_special: not cached
        if len(_path_cache) >= _PATH_CACHE_MAX:
            _path_cache.clear()
        _path_cache[key] = path
    return path


def _canonical_path(raw: bytes, caller_domid: int, allow_special: bool) -> str:
    """Validate a wire path and make it absolute; EINVAL says what is wrong.

    Relative paths are taken from the caller's /local/domain/<domid>, as
    xenstore.txt describes.  Special ``@`` paths pass only where watches or
    permissions use them.
    """
    if not raw:
        raise XenStoreError("EINVAL", "empty path")
    if raw[:1] == b"@":
        name = raw.decode("ascii", "replace")
        if allow_special and name in SPECIAL_PATHS:
            return name
        raise XenStoreError("EINVAL", f"special path {name!r} not allowed here")
    if not _VALID_PATH.match(raw):
        raise XenStoreError(
            "EINVAL", f"path {raw[:80]!r} has characters outside [A-Za-z0-9-/_@]")
    path = raw.decode("ascii")
    if path[0] != "/":
        if len(path) > XENSTORE_REL_PATH_MAX:
            raise XenStoreError(
                "EINVAL", f"relative path of {len(path)} bytes exceeds "
                f"XENSTORE_REL_PATH_MAX ({XENSTORE_REL_PATH_MAX})")
        path = f"{domain_path(caller_domid)}/{path}"
    if len(path) > XENSTORE_ABS_PATH_MAX:
        raise XenStoreError(
            "EINVAL", f"path of {len(path)} bytes exceeds "
            f"XENSTORE_ABS_PATH_MAX ({XENSTORE_ABS_PATH_MAX})")
    if path != "/" and (path.endswith("/") or "//" in path):
        raise XenStoreError("EINVAL", f"path {path[:80]!r} has an empty component")
    return path


def parent_of(path: str) -> str:
    i = path.rfind("/")
    return "/" if i <= 0 else path[:i]


def basename_of(path: str) -> str:
    return path[path.rfind("/") + 1:]


def is_child(child: str, parent: str) -> bool:
    """xenstore.txt's "child": equal, or parent is /, or parent/ prefixes it."""
    if child == parent or parent == "/":
        return True
    return child.startswith(parent) and child[len(parent):len(parent) + 1] == "/"


class Node:
    """One XenStore node.  Treat as immutable once stored (see module doc)."""

    __slots__ = ("value", "perms", "children", "generation")

    def __init__(self, value: bytes = b"", perms: Perms = DOM0_ONLY,
                 children: tuple[str, ...] = (), generation: int = 0) -> None:
        self.value = value
        self.perms = perms
        self.children = children
        self.generation = generation

    def evolve(self, **changes) -> "Node":
        n = Node(self.value, self.perms, self.children, self.generation)
        for k, v in changes.items():
            setattr(n, k, v)
        return n

    @property
    def owner(self) -> int:
        return self.perms[0][0]

    def size(self) -> int:
        """Bytes counted against the node-size quota: value, perms, names."""
        return (len(self.value) + 8 * len(self.perms)
                + sum(len(c) + 1 for c in self.children))


class Change(tuple):
    """A modification to report to watches: (path, perms, recursive removal)."""

    __slots__ = ()

    def __new__(cls, path: str, perms: Perms, removed_tree: bool = False):
        return tuple.__new__(cls, (path, perms, removed_tree))

    path = property(lambda s: s[0])
    perms = property(lambda s: s[1])
    removed_tree = property(lambda s: s[2])


class View(Protocol):
    """What store operations need: the live tree or a transaction overlay."""

    def get(self, path: str) -> Node | None: ...
    def put(self, path: str, node: Node) -> None: ...
    def delete(self, path: str) -> None: ...
    def node_created(self, node: Node) -> None: ...
    def node_removed(self, node: Node) -> None: ...


class Tree:
    """The committed database.  ``generation`` counts every change."""

    def __init__(self) -> None:
        self.nodes: dict[str, Node] = {}
        self.generation = 0
        self.nodes_by_owner: dict[int, int] = {}
        root_perms: Perms = DOM0_ONLY   # as C xenstored: only dom0 may look
        self._seed("/", root_perms)
        for p in ("/local", "/local/domain", "/tool"):
            self._seed(p, root_perms)

    def _seed(self, path: str, perms: Perms) -> None:
        parent = self.nodes.get(parent_of(path)) if path != "/" else None
        self.put(path, Node(b"", perms))
        self.node_created(self.nodes[path])
        if parent is not None:
            self.put(parent_of(path),
                     parent.evolve(children=parent.children + (basename_of(path),)))

    # -- View ---------------------------------------------------------------
    def get(self, path: str) -> Node | None:
        return self.nodes.get(path)

    def put(self, path: str, node: Node) -> None:
        self.generation += 1
        node.generation = self.generation
        self.nodes[path] = node

    def delete(self, path: str) -> None:
        self.generation += 1
        del self.nodes[path]

    def node_created(self, node: Node) -> None:
        o = node.owner
        self.nodes_by_owner[o] = self.nodes_by_owner.get(o, 0) + 1

    def node_removed(self, node: Node) -> None:
        o = node.owner
        self.nodes_by_owner[o] = self.nodes_by_owner.get(o, 1) - 1

    def owner_changed(self, old: int, new: int) -> None:
        if old != new:
            self.nodes_by_owner[old] = self.nodes_by_owner.get(old, 1) - 1
            self.nodes_by_owner[new] = self.nodes_by_owner.get(new, 0) + 1

    def walk(self, path: str = "/") -> Iterator[tuple[str, Node]]:
        """Depth-first (path, node) pairs under and including ``path``."""
        stack = [path]
        while stack:
            p = stack.pop()
            node = self.nodes.get(p)
            if node is None:
                continue
            yield p, node
            base = "" if p == "/" else p
            stack.extend(f"{base}/{c}" for c in reversed(node.children))


# -- operations shared by the live tree and transactions ----------------------
# Permission and quota checks are done by the caller (core.XenStore), which
# knows who is asking; these functions only keep the tree's shape right.

def _child_path(parent: str, name: str) -> str:
    return f"/{name}" if parent == "/" else f"{parent}/{name}"


def missing_ancestors(view: View, path: str) -> tuple[str, list[str]]:
    """(nearest existing ancestor, missing paths from the top down)."""
    missing: list[str] = []
    p = path
    while view.get(p) is None:
        missing.append(p)
        p = parent_of(p)
    missing.reverse()
    return p, missing


def _create_chain(view: View, top: str, missing: list[str], perms_for,
                  leaf_value: bytes, changes: list[Change]) -> None:
    """Create ``missing`` (top-down) under existing ``top``."""
    parent_path, parent = top, view.get(top)
    for p in missing:
        perms = perms_for(parent.perms)
        node = Node(leaf_value if p == missing[-1] else b"", perms)
        view.put(p, node)
        view.node_created(node)
        parent = parent.evolve(children=parent.children + (basename_of(p),))
        view.put(parent_path, parent)
        parent_path, parent = p, node
    # One event, for the requested path, as C xenstored does: watches on the
    # new parents still match it, since it is their child.
    changes.append(Change(missing[-1], parent.perms))


def write_node(view: View, path: str, value: bytes, perms_for,
               changes: list[Change]) -> None:
    """WRITE: set ``path``'s value, creating it and its parents if needed.

    ``perms_for(parent_perms)`` gives a new node's permissions (Xen: inherit
    from the parent; an unprivileged creator becomes the owner).
    """
    node = view.get(path)
    if node is not None:
        view.put(path, node.evolve(value=value))
        changes.append(Change(path, node.perms))
        return
    top, missing = missing_ancestors(view, path)
    _create_chain(view, top, missing, perms_for, value, changes)


def make_node(view: View, path: str, perms_for, changes: list[Change]) -> None:
    """MKDIR: make sure ``path`` exists; existing values stay as they are."""
    if view.get(path) is not None:
        return
    top, missing = missing_ancestors(view, path)
    _create_chain(view, top, missing, perms_for, b"", changes)


def remove_node(view: View, path: str, changes: list[Change]) -> None:
    """RM: delete ``path`` and everything under it (it must exist)."""
    node = view.get(path)
    assert node is not None and path != "/"
    stack = [path]
    while stack:
        p = stack.pop()
        n = view.get(p)
        if n is None:
            continue
        stack.extend(_child_path(p, c) for c in n.children)
        view.delete(p)
        view.node_removed(n)
    parent_path = parent_of(path)
    parent = view.get(parent_path)
    name = basename_of(path)
    view.put(parent_path,
             parent.evolve(children=tuple(c for c in parent.children if c != name)))
    changes.append(Change(path, node.perms, True))
