"""XenStore watches: tell clients when a part of the tree changes.

In Xen
    WATCH ``<wpath>|<token>|`` asks xenstored to send WATCH_EVENT
    ``<epath>|<token>|`` whenever a node at or below ``wpath`` is created,
    changed, removed or has its permissions changed (xenstore.txt).  Rules a
    client relies on:

    * a new watch fires once straight away with ``epath == wpath``;
    * a recursive RM of an *ancestor* of ``wpath`` fires with ``epath ==
      wpath``;
    * a watch set with a relative path gets relative event paths;
    * ``@introduceDomain`` and ``@releaseDomain`` are special events raised by
      xenstored itself when domains come and go;
    * a domain is not told about nodes it cannot read;
    * events from a transaction fire only when it commits;
    * UNWATCH removes one (wpath, token) pair; RESET_WATCHES removes all.

Here
    :class:`WatchTable` indexes watches by absolute path, so matching a
    change walks the changed path's ancestors (a few dict probes) instead of
    every watch in the system.  A watcher is anything with
    ``domid``/``privileged`` attributes and a ``deliver_watch_event(epath,
    token)`` method: a wire connection encodes a WATCH_EVENT, the in-process
    dom0 connection puts the event on a trio channel.

Invariant
    Events reach each watcher in the order the changes were committed.

Differences from Xen
    The special nodes' permissions live in this table (default: only dom0
    sees the events; dom0 may SET_PERMS them to let, say, a driver domain
    watch ``@releaseDomain``), as in C xenstored.
"""

from __future__ import annotations

from typing import Protocol

from ipc.xs_wire import XenStoreError

from .permissions import READ, DOM0_ONLY, Perms, access
from .store import SPECIAL_PATHS, Change, is_child, parent_of

__all__ = ["Watcher", "Watch", "WatchTable"]


class Watcher(Protocol):
    domid: int
    privileged: bool

    def deliver_watch_event(self, epath: str, token: bytes) -> None: ...


class Watch:
    __slots__ = ("watcher", "path", "token", "strip")

    def __init__(self, watcher: Watcher, path: str, token: bytes, strip: int) -> None:
        self.watcher = watcher
        self.path = path          # absolute (or a special @ name)
        self.token = token
        self.strip = strip        # chars to drop for relative event paths

    def relative(self, epath: str) -> str:
        return epath[self.strip:] if self.strip else epath


class WatchTable:
    def __init__(self) -> None:
        self._by_path: dict[str, list[Watch]] = {}
        self._by_watcher: dict[int, list[Watch]] = {}   # id(watcher) -> watches
        self.special_perms: dict[str, Perms] = {p: DOM0_ONLY for p in SPECIAL_PATHS}

    def count(self, watcher: Watcher) -> int:
        return len(self._by_watcher.get(id(watcher), ()))

    def add(self, watcher: Watcher, path: str, token: bytes, strip: int) -> Watch:
        mine = self._by_watcher.setdefault(id(watcher), [])
        for w in mine:
            if w.path == path and w.token == token:
                raise XenStoreError("EEXIST", f"watch on {path} with that token exists")
        w = Watch(watcher, path, token, strip)
        mine.append(w)
        self._by_path.setdefault(path, []).append(w)
        return w

    def remove(self, watcher: Watcher, path: str, token: bytes) -> None:
        mine = self._by_watcher.get(id(watcher), [])
        for w in mine:
            if w.path == path and w.token == token:
                self._drop(w)
                return
        raise XenStoreError("ENOENT", f"no watch on {path} with that token")

    def remove_all(self, watcher: Watcher) -> None:
        for w in list(self._by_watcher.get(id(watcher), ())):
            self._drop(w)
        self._by_watcher.pop(id(watcher), None)

    def _drop(self, w: Watch) -> None:
        self._by_watcher[id(w.watcher)].remove(w)
        lst = self._by_path[w.path]
        lst.remove(w)
        if not lst:
            del self._by_path[w.path]

    # -- firing ------------------------------------------------------------
    def fire(self, change: Change) -> None:
        """Deliver one change to every watch it matches and may be seen by."""
        path, perms, removed_tree = change
        by_path = self._by_path
        if not by_path:
            return
        hits: list[tuple[Watch, str]] = []
        # Watches on the changed path and on each of its ancestors.
        p = path
        while True:
            lst = by_path.get(p)
            if lst:
                hits.extend((w, path) for w in lst)
            if p == "/" or p[0] == "@":
                break
            p = parent_of(p)
        # A removed subtree also fires the watches set below it, at wpath.
        if removed_tree:
            for wpath, lst in by_path.items():
                if wpath != path and wpath[0] == "/" and is_child(wpath, path):
                    hits.extend((w, wpath) for w in lst)
        for w, epath in hits:
            watcher = w.watcher
            if access(perms, watcher.domid, watcher.privileged) & READ:
                watcher.deliver_watch_event(w.relative(epath), w.token)

    def fire_special(self, name: str) -> None:
        self.fire(Change(name, self.special_perms[name]))
