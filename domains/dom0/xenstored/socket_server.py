"""xenstored's Unix socket: the privileged door for dom0's tools.

In Xen
    C xenstored listens on ``/var/run/xenstored/socket`` (path overridable
    with ``XENSTORED_PATH`` on the client side).  Whoever can open it is a
    dom0 tool -- libxl, ``xenstore-*`` -- and is treated as privileged
    (domid 0).  Each accepted socket is one connection speaking plain
    xsd_sockmsg frames.

Here
    :func:`serve_socket` is a trio task that listens at a given path
    (normally ``<run-dir>/xenstored/socket``) and serves each client with a
    :class:`~.connection.Connection`.  Debian's ``xenstore-read``,
    ``-write``, ``-ls``, ``-rm``, ``-watch`` work against it unchanged with
    ``XENSTORED_PATH`` pointing there.

Invariants
    The socket file is created mode 0600 (only our user may be "dom0") and
    removed when the task ends, however it ends.  One client's bad bytes or
    disconnect never touches the listener or other clients.

Differences from Xen
    No read-only socket (``socket_ro``); Xen has removed it too.
"""

from __future__ import annotations

import errno
import logging
import os
import socket as _socket
import stat

import trio

from .connection import Connection
from .core import XenStore

__all__ = ["serve_socket"]

log = logging.getLogger("microxen.xenstored")


async def serve_socket(store: XenStore, path: str, *,
                       task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``store`` on a Unix socket at ``path`` until cancelled.

    Use ``await nursery.start(serve_socket, store, path)`` to know when the
    socket is accepting.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    _remove_stale(path)
    listener = trio.socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        await listener.bind(path)
        # Only our own user may be "dom0".  (Not umask: it is process-wide.)
        os.chmod(path, 0o600)
        listener.listen(128)
        log.info("xenstored: listening on %s", path)
        async with trio.open_nursery() as nursery:
            task_status.started(path)
            serial = 0
            while True:
                try:
                    sock, _ = await listener.accept()
                except OSError as e:
                    if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                        log.warning("xenstored: accept failed (%s); retrying", e)
                        await trio.sleep(0.05)
                        continue
                    raise
                serial += 1
                nursery.start_soon(_serve_client, store, sock, serial)
    finally:
        listener.close()
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def _remove_stale(path: str) -> None:
    """A leftover socket from a dead daemon may go; anything else may not."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(f"xenstored: {path} exists and is not a socket")
    os.unlink(path)


async def _serve_client(store: XenStore, sock: trio.socket.SocketType,
                        serial: int) -> None:
    conn = Connection(store, domid=0, privileged=True, name=f"socket client {serial}")

    async def send_all(data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = await sock.send(view)
            view = view[n:]

    with sock:
        try:
            await conn.serve(sock.recv, send_all)
        except OSError as e:
            log.debug("xenstored: %s: %s", conn.name, e)
