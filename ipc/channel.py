"""The hypercall channel: how a domain traps into the hypervisor.

On real hardware a hypercall is a trap instruction; the hypervisor knows which
domain trapped because it knows which vCPU was running.  Here each domain has a
ZeroMQ DEALER socket connected to the hypervisor's ROUTER.  The connection is
authenticated once, at connect time, with ZeroMQ's ZAP protocol (PLAIN
mechanism): the username is the domid and the password a random secret the
domain builder put in the new process's memory and nowhere else.  The
hypervisor's ZAP handler turns a good secret into the connection's `User-Id`,
and ZeroMQ stamps that User-Id on every message arriving over the connection.
The hypervisor reads the caller's domid from there and only from there: a
message body that names a domid names a *target*, never the caller.

Wire format (msgpack arrays):

    domain -> hypervisor   [req_id, hypercall, cmd, args]      e.g. [7, "event_channel_op", "send", {"port": 3}]
                                                                req_id 0: no reply wanted (fire and forget)
    hypervisor -> domain   [REPLY, req_id, errno, result]      errno 0: result is the value
                                                                errno > 0: result is a message
                           [REPLY, req_id, 0, result, nfds]     nfds page descriptors were sent,
                                                                tagged req_id, on the fd socket

Upcalls ("look at your shared_info") do not travel here: each domain is born
with an eventfd that the hypervisor writes, its interrupt line (see
hypervisor/broker.py).  On this channel a notification would cost a ZeroMQ
send, an I/O thread's wake-up on each side and a decode.

Hypercall names follow Xen's (`event_channel_op`, `grant_table_op`,
`memory_op`, `sched_op`, `domctl`, `sysctl`, `console_io`), and so do the
sub-command names.  This module is the codec and the socket set-up; it knows
nothing of what any hypercall does.
"""

from __future__ import annotations

import errno as _errno
from typing import Any

import msgpack
import zmq

REPLY = 1

MAX_MESSAGE = 1 << 20  # a hypercall argument never needs more; bulk data moves in pages


class HypercallError(Exception):
    """A hypercall failed; `errno` is the Linux errno value Xen would return (negated there)."""

    def __init__(self, errno: int, message: str) -> None:
        super().__init__(f"{_errno.errorcode.get(errno, errno)}: {message}")
        self.errno = errno
        self.message = message


class BadMessage(ValueError):
    """Bytes on the channel that are not a well-formed hypercall."""


def encode_call(req_id: int, hypercall: str, cmd: str, args: dict[str, Any]) -> bytes:
    return msgpack.packb([req_id, hypercall, cmd, args], use_bin_type=True)


def decode_call(data: bytes) -> tuple[int, str, str, dict[str, Any]]:
    """Parse a hypercall; raise BadMessage naming what is wrong."""
    if len(data) > MAX_MESSAGE:
        raise BadMessage(f"message of {len(data)} bytes exceeds {MAX_MESSAGE}")
    try:
        msg = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types
        raise BadMessage(f"not msgpack: {exc.__class__.__name__}") from None
    if not (isinstance(msg, list) and len(msg) == 4):
        raise BadMessage("a hypercall is [req_id, hypercall, cmd, args]")
    req_id, hypercall, cmd, args = msg
    if not isinstance(req_id, int) or not 0 <= req_id < 1 << 63:
        raise BadMessage("req_id must be a non-negative integer")
    if not isinstance(hypercall, str) or not isinstance(cmd, str):
        raise BadMessage("hypercall and cmd must be strings")
    if not isinstance(args, dict):
        raise BadMessage("args must be a map")
    return req_id, hypercall, cmd, args


def encode_reply(req_id: int, err: int, result: Any, nfds: int = 0) -> bytes:
    """A reply; `nfds` > 0 says that many page descriptors wait on the fd socket."""
    msg = [REPLY, req_id, err, result, nfds] if nfds else [REPLY, req_id, err, result]
    return msgpack.packb(msg, use_bin_type=True)


def hypercall_socket(ctx: zmq.Context, endpoint: str, domid: int, secret: bytes) -> zmq.Socket:
    """Create the domain's DEALER, authenticated as `domid`, and connect it."""
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.plain_username = str(domid).encode()
    sock.plain_password = secret
    sock.connect(endpoint)
    return sock
