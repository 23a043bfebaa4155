"""A small synchronous XenStore client on xenstored's Unix socket, for the fault tools.

In Xen
    Tools in dom0 (xenstore-read, xenstore-chmod, libxl) reach xenstored
    through its socket and act as dom0: they may write anywhere and set any
    node's permissions.

Here
    The fault injector needs exactly that, and at campaign rates: write a
    fault spec, make it dom0-owned (``n0 r<domid>``: the target domain may read
    its faults but not forge or remove one), remove it, read a reply.  The
    management API has no set-permissions call, and a trio event loop per
    call would be slow, so this module speaks the wire protocol (ipc/xs_wire)
    directly, one request at a time.

Invariant
    A reply is matched to its request by ``req_id``; an error reply raises
    XenStoreError naming the path.
"""

from __future__ import annotations

import itertools
import os
import socket

from ipc.xs_wire import Decoder, XenStoreError, XsType, encode, join_strings, split_strings


class XsSocket:
    """One connection to ``<run-dir>/xenstored/socket``."""

    def __init__(self, run_dir: str, timeout: float = 10.0) -> None:
        self.path = os.path.join(run_dir, "xenstored", "socket")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(self.path)
        self.decoder = Decoder(strict_types=False)
        self.ids = itertools.count(1)
        self.queue: list = []

    def close(self) -> None:
        self.sock.close()

    def request(self, type_: int, payload: bytes, what: str) -> bytes:
        req_id = next(self.ids) & 0xFFFFFFFF
        self.sock.sendall(encode(type_, req_id, 0, payload))
        while True:
            for msg in self.queue:
                if msg.req_id == req_id and msg.type != XsType.WATCH_EVENT:
                    self.queue.remove(msg)
                    if msg.type == XsType.ERROR:
                        parts = split_strings(msg.payload)
                        name = parts[0].decode("ascii", "replace") if parts else "EIO"
                        raise XenStoreError(name, f"{what}: {name}")
                    return msg.payload
            data = self.sock.recv(65536)
            if not data:
                raise XenStoreError("EIO", f"{what}: xenstored closed the connection")
            self.queue.extend(m for m in self.decoder.feed(data) if m.type != XsType.WATCH_EVENT)

    def read(self, path: str) -> bytes:
        return self.request(XsType.READ, join_strings(path), f"read {path}")

    def read_or(self, path: str, default: bytes | None = None) -> bytes | None:
        try:
            return self.read(path)
        except OSError:
            return default

    def write(self, path: str, value: bytes | str) -> None:
        v = value.encode() if isinstance(value, str) else bytes(value)
        self.request(XsType.WRITE, path.encode() + b"\0" + v, f"write {path}")

    def mkdir(self, path: str) -> None:
        self.request(XsType.MKDIR, join_strings(path), f"mkdir {path}")

    def rm(self, path: str) -> None:
        try:
            self.request(XsType.RM, join_strings(path), f"rm {path}")
        except XenStoreError as exc:
            if exc.name != "ENOENT":
                raise

    def directory(self, path: str) -> list[str]:
        try:
            reply = self.request(XsType.DIRECTORY, join_strings(path), f"directory {path}")
        except XenStoreError as exc:
            if exc.name == "ENOENT":
                return []
            raise
        return [p.decode() for p in split_strings(reply) if p]

    def set_perms(self, path: str, perms: list[str]) -> None:
        self.request(XsType.SET_PERMS, join_strings(path, *perms), f"set_perms {path}")

    def get_perms(self, path: str) -> list[str]:
        return [p.decode() for p in split_strings(
            self.request(XsType.GET_PERMS, join_strings(path), f"get_perms {path}"))]
