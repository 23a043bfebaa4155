"""Passing page descriptors between processes (SCM_RIGHTS).

ZeroMQ carries bytes, not file descriptors, so every domain also holds one end
of a Unix socketpair whose other end the hypervisor holds.  The pair is created
by the domain builder before the domain's process exists, so it is bound to that
domain by construction: no message can claim it.

When a hypercall hands out pages (a grant map, populate_physmap) the hypervisor
first sends the descriptors on this socket, tagged with the hypercall's request
id, and only then sends the hypercall's reply on the ZeroMQ channel.  The domain,
on reading a reply that says descriptors came with it, reads them from the
socket, where they are already waiting.  The tag check makes a mismatch a loud
error rather than a page given to the wrong request.
"""

from __future__ import annotations

import socket
import struct

_TAG = struct.Struct("<Q")
MAX_FDS_PER_MESSAGE = 250  # below the kernel's SCM_MAX_FD (253)


def send_fds(sock: socket.socket, tag: int, fds: list[int]) -> None:
    """Send `fds` in chunks, each chunk labelled with `tag`."""
    for i in range(0, len(fds), MAX_FDS_PER_MESSAGE):
        socket.send_fds(sock, [_TAG.pack(tag)], fds[i:i + MAX_FDS_PER_MESSAGE])


def recv_fds(sock: socket.socket, tag: int, count: int) -> list[int]:
    """Receive exactly `count` descriptors sent under `tag`; anything else is an error."""
    got: list[int] = []
    while len(got) < count:
        want = min(MAX_FDS_PER_MESSAGE, count - len(got))
        data, fds, _flags, _addr = socket.recv_fds(sock, _TAG.size, want)
        if len(data) != _TAG.size or _TAG.unpack(data)[0] != tag:
            for fd in fds:
                _close(fd)
            for fd in got:
                _close(fd)
            raise ConnectionError(f"page descriptors arrived out of order (expected tag {tag})")
        got.extend(fds)
    return got


def _close(fd: int) -> None:
    import os
    try:
        os.close(fd)
    except OSError:
        pass
