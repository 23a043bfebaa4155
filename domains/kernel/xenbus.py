"""XenBus: how a split driver's two halves find each other and agree on a state.

In Xen
    A paravirtual device has a *frontend* (in the guest) and a *backend* (in
    dom0 or a driver domain).  They never call each other; they meet in
    XenStore.  The toolstack writes two directories (io/xenbus.h,
    docs/misc/pv-drivers-lifecycle):

        /local/domain/<fe>/device/<type>/<devid>/         owned by the frontend
            backend     = /local/domain/<be>/backend/<type>/<fe>/<devid>
            backend-id  = <be>
            state       = 1
        /local/domain/<be>/backend/<type>/<fe>/<devid>/   owned by the backend
            frontend    = /local/domain/<fe>/device/<type>/<devid>
            frontend-id = <fe>
            state       = 1
            (plus device parameters, e.g. params for a disk)

    Each side publishes a ``state`` node and watches the other's.  The states
    (enum xenbus_state) are Initialising(1), InitWait(2), Initialised(3),
    Connected(4), Closing(5), Closed(6).  The usual handshake: the backend
    goes to InitWait once it has published what it offers; the frontend then
    allocates a ring, grants it, makes an event channel, writes ``ring-ref``
    and ``event-channel`` and goes to Initialised; the backend maps the ring,
    binds the channel and goes to Connected; the frontend reads the device's
    properties and goes to Connected.  Either side leaves through Closing to
    Closed.

Here
    The same nodes, names and numbers.  This module holds what every split
    driver needs, whatever its device type: the state constants, reading and
    switching a state, waiting (with watches) for the other end to reach a
    state, and two small bases: :class:`FrontendDevice` (finds its backend
    and follows it) and :class:`BackendWatcher` (a driver domain's loop that
    starts one backend per directory that appears under
    ``/local/domain/<self>/backend/<type>/`` and stops it when the directory
    goes).  The block drivers use them; the network drivers can too.

Invariant
    A state written by the other end is data from a possibly hostile domain:
    anything that is not a number 1..6 reads as Unknown (0), never an
    exception.  Every wait has a watch *and* a periodic re-read, so a dropped
    watch event delays a driver but never hangs it.

Where this differs from Xen
    Linux's xenbus core runs probe/otherend_changed callbacks; here a driver
    is a trio task that awaits state changes directly, which reads as a
    straight line.  Nothing else differs.
"""

from __future__ import annotations

import logging
from enum import IntEnum
from typing import Awaitable, Callable, Iterable

import trio

log = logging.getLogger("xenbus")


class XenbusState(IntEnum):
    """enum xenbus_state (io/xenbus.h)."""

    Unknown = 0
    Initialising = 1
    InitWait = 2
    Initialised = 3
    Connected = 4
    Closing = 5
    Closed = 6
    Reconfiguring = 7
    Reconfigured = 8


#: How often a wait re-reads XenStore even without a watch event (seconds).
POLL_INTERVAL = 1.0


def parse_state(raw: bytes | None) -> XenbusState:
    """A state node's bytes -> XenbusState; garbage or absence is Unknown."""
    if not raw:
        return XenbusState.Unknown
    try:
        return XenbusState(int(raw.strip() or b"0"))
    except ValueError:
        return XenbusState.Unknown


async def read_node(xs, path: str) -> bytes | None:
    """A node's value, or None if it does not exist (or cannot be read)."""
    try:
        return await xs.read(path)
    except OSError:
        return None


async def read_state(xs, dirpath: str) -> XenbusState:
    return parse_state(await read_node(xs, f"{dirpath}/state"))


async def read_int(xs, path: str, default: int | None = None) -> int | None:
    raw = await read_node(xs, path)
    if raw is None:
        return default
    try:
        return int(raw.decode().strip())
    except (ValueError, UnicodeDecodeError):
        return default


async def switch_state(xs, dirpath: str, state: XenbusState) -> None:
    """xenbus_switch_state: publish our state."""
    await xs.write(f"{dirpath}/state", str(int(state)).encode())


async def wait_until(xs, paths: Iterable[str], check: Callable[[], Awaitable[object]],
                     timeout: float = float("inf"), poll: float = POLL_INTERVAL):
    """Return the first truthy value of ``await check()``, re-checking whenever a
    watched path changes (and every ``poll`` seconds regardless).

    Raises trio.TooSlowError after ``timeout`` seconds.
    """
    with trio.fail_after(timeout):
        wake = trio.Event()
        async with trio.open_nursery() as nursery:
            watches = []
            for path in paths:
                watches.append(await xs.watch(path))

            async def pump(w) -> None:
                nonlocal wake
                async for _ in w:
                    wake.set()
            for w in watches:
                nursery.start_soon(pump, w)
            try:
                while True:
                    wake = trio.Event()
                    value = await check()
                    if value:
                        return value
                    with trio.move_on_after(poll):
                        await wake.wait()
            finally:
                nursery.cancel_scope.cancel()
                with trio.CancelScope(shield=True):
                    for w in watches:
                        try:
                            await w.unwatch()
                        except Exception:
                            pass


class FrontendDevice:
    """The frontend half's XenStore view of one device: ``device/<type>/<devid>``."""

    def __init__(self, xs, domid: int, devtype: str, devid: int | str) -> None:
        self.xs = xs
        self.domid = domid
        self.devtype = devtype
        self.devid = str(devid)
        self.nodename = f"/local/domain/{domid}/device/{devtype}/{self.devid}"

    async def backend_path(self) -> str | None:
        raw = await read_node(self.xs, f"{self.nodename}/backend")
        return raw.decode(errors="replace") if raw else None

    async def backend_id(self) -> int | None:
        return await read_int(self.xs, f"{self.nodename}/backend-id")

    async def switch_state(self, state: XenbusState) -> None:
        await switch_state(self.xs, self.nodename, state)

    async def state(self) -> XenbusState:
        return await read_state(self.xs, self.nodename)

    async def wait_for_backend(self, states: set[XenbusState], avoid: str | None = None,
                               timeout: float = float("inf")) -> tuple[str, int]:
        """Wait until ``backend`` names a backend (not ``avoid``) whose state is in
        ``states``; return (backend path, backend domid)."""
        async def check():
            be = await self.backend_path()
            beid = await self.backend_id()
            if not be or be == avoid or beid is None:
                return None
            if await read_state(self.xs, be) in states:
                return be, beid
            return None
        return await wait_until(self.xs, [f"{self.nodename}/backend"], check, timeout,
                                poll=0.2)


class BackendWatcher:
    """A driver domain's device discovery for one device type.

    Watches ``/local/domain/<self>/backend/<type>`` and runs
    ``serve(path)`` as a task for every
    ``<frontend-domid>/<devid>`` directory found there; when the directory is
    removed, the task is cancelled.  A backend task that fails is logged and
    the device left alone; the driver domain itself carries on.
    """

    def __init__(self, xs, domid: int, devtype: str,
                 serve: Callable[[str], Awaitable[None]]) -> None:
        self.xs = xs
        self.root = f"/local/domain/{domid}/backend/{devtype}"
        self.serve = serve
        self.running: dict[str, trio.CancelScope] = {}

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            watch = await self.xs.watch(self.root)
            async with watch:
                while True:
                    await self._scan(nursery)
                    with trio.move_on_after(POLL_INTERVAL):
                        await watch.__anext__()

    async def _list(self, path: str) -> list[str]:
        try:
            return await self.xs.directory(path)
        except OSError:
            return []

    async def _scan(self, nursery: trio.Nursery) -> None:
        present = set()
        for fe in await self._list(self.root):
            for devid in await self._list(f"{self.root}/{fe}"):
                path = f"{self.root}/{fe}/{devid}"
                # a directory the toolstack is still writing has no frontend yet
                if await read_node(self.xs, f"{path}/frontend") is None:
                    continue
                present.add(path)
                if path not in self.running:
                    scope = trio.CancelScope()
                    self.running[path] = scope
                    nursery.start_soon(self._guard, path, scope)
        for path, scope in list(self.running.items()):
            if path not in present:
                scope.cancel()
                del self.running[path]

    async def _guard(self, path: str, scope: trio.CancelScope) -> None:
        try:
            with scope:
                await self.serve(path)
        except Exception:
            # The entry stays in `running`, so a broken device is not restarted
            # in a loop; removing and re-adding its directory starts it afresh.
            log.exception("backend %s failed; device left disconnected", path)
