"""The management API: dom0's toolstack, reachable from outside.

`xl`, the web dashboard of a later wave, and any orchestration client talk to
the same toolstack library through this Unix socket at
`<run-dir>/dom0/toolstack.sock`, so no front end scrapes another's output.

Framing: each message is a 4-byte big-endian length and a msgpack map.
Request `{"method": NAME, "args": {...}}`; reply `{"ok": VALUE}` or
`{"error": MESSAGE}`.  The `console` method turns the connection into a raw
byte pipe to a guest's console after its reply; `xs_watch` into a stream of
watch-event frames `{"path", "token"}`.

Every method name is in METHODS; nothing else on the Toolstack is reachable.
Malformed frames close that connection and nothing else.
"""

from __future__ import annotations

import logging
import os
import struct
from typing import TYPE_CHECKING, Any

import msgpack
import trio

from domains.dom0.toolstack.libxl import ToolstackError

if TYPE_CHECKING:
    from domains.dom0.kernel import Dom0

log = logging.getLogger("api")
_LEN = struct.Struct(">I")
MAX_FRAME = 1 << 20


async def read_frame(stream: trio.abc.ReceiveStream, buf: bytearray) -> Any:
    """Read one framed msgpack value; None at a clean end of stream."""
    while True:
        if len(buf) >= 4:
            (n,) = _LEN.unpack_from(buf)
            if n > MAX_FRAME:
                raise ValueError(f"frame of {n} bytes is over the {MAX_FRAME}-byte limit")
            if len(buf) >= 4 + n:
                data = bytes(buf[4:4 + n])
                del buf[:4 + n]
                return msgpack.unpackb(data, raw=False, strict_map_key=False)
        chunk = await stream.receive_some(65536)
        if not chunk:
            if buf:
                raise ValueError("connection closed in the middle of a frame")
            return None
        buf.extend(chunk)


def frame(value: Any) -> bytes:
    data = msgpack.packb(value, use_bin_type=True)
    return _LEN.pack(len(data)) + data


class ManagementAPI:
    METHODS = {"list", "info", "dmesg", "create", "destroy", "shutdown", "pause", "unpause",
               "mem_set", "mem_max", "vcpu_pin", "vcpu_set", "rename", "find", "uptime",
               "xs_read", "xs_write", "xs_ls", "xs_rm", "xs_directory", "xs_watch", "console", "ping",
               "block_list", "block_attach", "block_detach", "network_list",
               "network_attach", "network_detach"}

    def __init__(self, dom0: "Dom0", path: str) -> None:
        self.dom0 = dom0
        self.path = path

    async def serve(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        if os.path.exists(self.path):
            os.unlink(self.path)
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        await sock.bind(self.path)
        sock.listen(64)
        listener = trio.SocketListener(sock)
        try:
            task_status.started()
            await trio.serve_listeners(self._client, [listener])
        finally:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    async def _client(self, stream: trio.SocketStream) -> None:
        buf = bytearray()
        async with stream:
            while True:
                try:
                    req = await read_frame(stream, buf)
                except (ValueError, msgpack.UnpackException, trio.BrokenResourceError) as exc:
                    log.info("dropping a management client: %s", exc)
                    return
                if req is None:
                    return
                if not isinstance(req, dict) or req.get("method") not in self.METHODS \
                        or not isinstance(req.get("args", {}), dict):
                    await stream.send_all(frame({"error": f"unknown request {str(req)[:80]}"}))
                    continue
                method, args = req["method"], req.get("args", {})
                if method == "console":
                    await self._console(stream, buf, args)
                    return
                if method == "xs_watch":
                    await self._watch(stream, args)
                    return
                try:
                    value = await getattr(self.dom0, f"api_{method}")(**args)
                    reply = {"ok": value}
                except ToolstackError as exc:
                    reply = {"error": str(exc)}
                except TypeError as exc:
                    reply = {"error": f"bad arguments to {method}: {exc}"}
                except Exception as exc:   # the toolstack must survive any request
                    log.exception("api %s failed", method)
                    reply = {"error": f"{method} failed: {type(exc).__name__}: {exc}"}
                try:
                    await stream.send_all(frame(reply))
                except trio.BrokenResourceError:
                    return

    async def _watch(self, stream: trio.SocketStream, args: dict) -> None:
        """Stream XenStore watch events (one frame each) until the client goes."""
        path = args.get("path")
        if not isinstance(path, str):
            await stream.send_all(frame({"error": "xs_watch needs a path"}))
            return
        try:
            watch = await self.dom0.xs.watch(path)
        except OSError as exc:
            await stream.send_all(frame({"error": f"xenstore: {path}: {exc}"}))
            return
        await stream.send_all(frame({"ok": path}))
        async with watch:
            async with trio.open_nursery() as nursery:
                async def until_client_leaves() -> None:
                    while await stream.receive_some(64):
                        pass
                    nursery.cancel_scope.cancel()
                nursery.start_soon(until_client_leaves)
                try:
                    async for event in watch:
                        await stream.send_all(frame({"path": event.path, "token": event.token}))
                except trio.BrokenResourceError:
                    pass
                nursery.cancel_scope.cancel()

    async def _console(self, stream: trio.SocketStream, buf: bytearray, args: dict) -> None:
        """Attach a client to a guest console: output out, keystrokes in."""
        try:
            info = await self.dom0.toolstack.find(args.get("dom"))
            con, output = self.dom0.consoled.listen(info["domid"])
        except (ToolstackError, KeyError) as exc:
            await stream.send_all(frame({"error": str(exc) or "domain has no console"}))
            return
        await stream.send_all(frame({"ok": info["domid"]}))
        async with trio.open_nursery() as nursery:
            async def pump_out() -> None:
                async for data in output:
                    await stream.send_all(data)
                nursery.cancel_scope.cancel()

            async def pump_in() -> None:
                if buf:
                    await self.dom0.consoled.write_input(info["domid"], bytes(buf))
                while True:
                    data = await stream.receive_some(4096)
                    if not data:
                        break
                    await self.dom0.consoled.write_input(info["domid"], data)
                nursery.cancel_scope.cancel()
            nursery.start_soon(pump_out)
            nursery.start_soon(pump_in)
