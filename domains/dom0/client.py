"""A client of dom0's management API, for programs outside the system (xl, run.py).

Synchronous and small: connect to `<run-dir>/dom0/toolstack.sock`, send a
framed request, read the framed reply.  See api.py for the protocol.
"""

from __future__ import annotations

import os
import socket
import struct
from typing import Any

import msgpack

from ipc import rundir

_LEN = struct.Struct(">I")


class NotRunning(Exception):
    pass


class APIError(Exception):
    pass


resolve_run_dir = rundir.resolve


class Client:
    def __init__(self, run_dir: str, timeout: float = 60.0) -> None:
        self.path = os.path.join(run_dir, "dom0", "toolstack.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(self.path)
        except (FileNotFoundError, ConnectionRefusedError):
            self.sock.close()
            raise NotRunning(f"no microxen system is running in {run_dir} "
                             f"(start one with: python run.py up --run-dir {run_dir})") from None
        self.buf = bytearray()

    def call(self, method: str, **args: Any) -> Any:
        data = msgpack.packb({"method": method, "args": args}, use_bin_type=True)
        self.sock.sendall(_LEN.pack(len(data)) + data)
        reply = self.read()
        if "error" in reply:
            raise APIError(reply["error"])
        return reply["ok"]

    def read(self) -> Any:
        while True:
            if len(self.buf) >= 4:
                (n,) = _LEN.unpack_from(self.buf)
                if len(self.buf) >= 4 + n:
                    value = msgpack.unpackb(bytes(self.buf[4:4 + n]), raw=False, strict_map_key=False)
                    del self.buf[:4 + n]
                    return value
            chunk = self.sock.recv(65536)
            if not chunk:
                raise NotRunning("dom0 closed the management connection")
            self.buf.extend(chunk)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
