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
    and follows it, on standing watches: :class:`OtherendWatch`) and :class:`BackendWatcher` (a driver domain's loop that
    starts one backend per directory that appears under
    ``/local/domain/<self>/backend/<type>/`` and stops it when the directory
    goes).  It also holds the two halves of the handshake that every device
    type runs the same way: the frontend's :func:`publish_and_wait_connected`
    (publish its ring details and Initialised in one transaction, then wait
    for the backend's Connected; :func:`connect_retrying` and
    :func:`frontend_start_over` start it over) and the backend's
    :func:`backend_handshake` (InitWait, wait for Initialised, connect and
    serve, Closing/Closed, wait for the frontend to start over).  The block
    and network drivers use them.

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
from functools import partial
from typing import Awaitable, Callable, Iterable, TypeVar

import trio

from domains.kernel.exception_groups import first_leaf

log = logging.getLogger("xenbus")

T = TypeVar("T")


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
    return to_int(await read_node(xs, path), default)


async def gather(calls: Iterable[Callable[[], Awaitable[T]]]) -> list[T]:
    """Make several requests (XenStore's, or hypercalls) at once; their results, in order.

    XenStore answers a connection's requests in order, each tagged with its
    request id, so the client may have many in flight.  A handshake reads
    and writes a dozen keys; sent one after another they cost a dozen
    round trips, which is most of a driver's recovery time.
    """
    calls = list(calls)
    out: list = [None] * len(calls)

    async def one(i: int) -> None:
        out[i] = await calls[i]()
    async with trio.open_nursery() as nursery:
        for i in range(len(calls)):
            nursery.start_soon(one, i)
    return out


async def read_nodes(xs, paths: Iterable[str]) -> list[bytes | None]:
    """Several :func:`read_node` at once, in one round trip's time (:func:`gather`)."""
    return await gather(partial(read_node, xs, path) for path in paths)


def to_int(raw: bytes | None, default: int | None = None) -> int | None:
    """A node's value as an integer (``default`` if absent or not a number)."""
    if raw is None:
        return default
    try:
        return int(raw.decode().strip())
    except (ValueError, UnicodeDecodeError):
        return default


async def write_nodes(xs, items: Iterable[tuple[str, object]]) -> None:
    """Write several nodes at once (see :func:`read_nodes`); all are written
    when this returns."""
    await gather(partial(xs.write, path, str(value).encode()) for path, value in items)


async def switch_state(xs, dirpath: str, state: XenbusState) -> None:
    """xenbus_switch_state: publish our state."""
    await xs.write(f"{dirpath}/state", str(int(state)).encode())


async def wait_until(xs, paths: Iterable[str], check: Callable[[], Awaitable[object]],
                     timeout: float = float("inf"), poll: float = POLL_INTERVAL):
    """Return the first truthy value of ``await check()``, re-checking whenever a
    watched path changes (and every ``poll`` seconds regardless).

    The watches are set (all at once) before the first check, so a change
    that check cannot have seen fires one of them.  Each watch's first event
    is the one xenstored sends when it is set, which xenstored queues at
    once, before any change event: it tells nothing the first check does not,
    and is not a reason to check again.

    Raises trio.TooSlowError after ``timeout`` seconds.
    """
    with trio.fail_after(timeout):
        wake = trio.Event()
        async with trio.open_nursery() as nursery:
            watches = []

            async def add(path: str) -> None:
                watches.append(await xs.watch(path))
            try:
                await gather(partial(add, path) for path in paths)
            except BaseException:
                await _unwatch_all(watches)
                raise

            async def pump(w) -> None:
                initial = True
                async for _ in w:
                    if not initial:
                        wake.set()
                    initial = False
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
                await _unwatch_all(watches)


async def _unwatch_all(watches: list) -> None:
    """Remove ``watches`` (all at once), even from a cancelled task."""
    async def one(w) -> None:
        try:
            await w.unwatch()
        except Exception:
            pass
    with trio.CancelScope(shield=True):
        await gather(partial(one, w) for w in watches)


class OtherendWatch:
    """A frontend's standing watches on its other end (Linux's ``watch_otherend``).

    Two watches, set once rather than for every wait: ``<frontend>/backend``
    for the life of the device, and ``<backend>/state`` of the backend it
    follows, moved only when ``backend`` names another one (:meth:`follow`).
    Every wait of a handshake is then reads only.  Setting a watch and
    removing it are two requests and an event; a reconnection waits four or
    five times, and when a driver domain serving eight guests is re-created,
    those are eight times the requests xenstored answers while every guest
    waits for it.

    Any event, or :data:`POLL_INTERVAL` without one, makes a waiter check
    again (the check reads what it needs: an event says only "look").
    """

    def __init__(self, xs, nodename: str) -> None:
        self.xs = xs
        self.nodename = nodename
        self.following: str | None = None
        self._state_watch = None
        self._changed = trio.Event()
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Hold the watches until cancelled (start it with ``nursery.start``)."""
        backend = await self.xs.watch(f"{self.nodename}/backend")
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._pump, backend)
                task_status.started(self)
                await trio.sleep_forever()
        finally:
            self._nursery = None
            await _unwatch_all([w for w in (backend, self._state_watch) if w is not None])

    @property
    def active(self) -> bool:
        return self._nursery is not None

    async def _pump(self, watch) -> None:
        async for _ in watch:
            woken, self._changed = self._changed, trio.Event()
            woken.set()

    async def follow(self, be_path: str | None) -> None:
        """Watch the ``state`` of ``be_path`` (and no other backend's)."""
        if be_path == self.following or self._nursery is None:
            return
        old, self._state_watch, self.following = self._state_watch, None, None
        if old is not None:
            await _unwatch_all([old])
        if be_path:
            # Followed only once the watch is set: a follow cut short sets it next time.
            watch = await self.xs.watch(f"{be_path}/state")
            self._state_watch, self.following = watch, be_path
            self._nursery.start_soon(self._pump, watch)

    async def wait_until(self, check: Callable[[], Awaitable[object]],
                         poll: float = POLL_INTERVAL):
        """Like :func:`wait_until`, on these watches."""
        while True:
            changed = self._changed
            value = await check()
            if value:
                return value
            with trio.move_on_after(poll):
                await changed.wait()


class FrontendDevice:
    """The frontend half's XenStore view of one device: ``device/<type>/<devid>``."""

    def __init__(self, xs, domid: int, devtype: str, devid: int | str) -> None:
        self.xs = xs
        self.domid = domid
        self.devtype = devtype
        self.devid = str(devid)
        self.nodename = f"/local/domain/{domid}/device/{devtype}/{self.devid}"
        self.otherend: OtherendWatch | None = None

    async def watch_otherend(self, nursery: trio.Nursery) -> None:
        """Keep standing watches on the backend (:class:`OtherendWatch`) in
        ``nursery``; until this is called each wait sets and removes its own."""
        self.otherend = await nursery.start(OtherendWatch(self.xs, self.nodename).run)

    async def wait_on_backend(self, be_path: str | None, check: Callable[[], Awaitable[object]],
                              poll: float = POLL_INTERVAL):
        """:func:`wait_until` ``check()`` is truthy, woken by ``backend`` and by
        ``<be_path>/state``."""
        paths = [f"{self.nodename}/backend"] + ([f"{be_path}/state"] if be_path else [])
        otherend = self.otherend
        if otherend is None or not otherend.active:
            return await wait_until(self.xs, paths, check, poll=poll)
        await otherend.follow(be_path)
        return await otherend.wait_until(check, poll)

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
        ``states``; return (backend path, backend domid).

        Watch-driven on both ends: ``<frontend>/backend`` (the toolstack may
        point it elsewhere at any time, e.g. at a restarted driver domain) and
        the ``state`` of whichever backend it names *now*; when ``backend``
        changes, the state watch is moved to the new backend.  A backend that
        reaches InitWait is therefore seen within one watch event, not at the
        next poll.
        """
        with trio.fail_after(timeout):
            while True:
                watched = await self.backend_path()

                async def check(watched=watched):
                    raw = await read_nodes(self.xs, [f"{self.nodename}/backend",
                                                     f"{self.nodename}/backend-id"]
                                           + ([f"{watched}/state"] if watched else []))
                    be = raw[0].decode(errors="replace") if raw[0] else None
                    if be != watched:
                        return _MOVED            # re-arm the watches on the new backend
                    beid = to_int(raw[1])
                    if not be or be == avoid or beid is None or not names_domain(be, beid):
                        return None
                    if parse_state(raw[2]) in states:
                        return be, beid
                    return None
                found = await self.wait_on_backend(watched, check)
                if found is not _MOVED:
                    return found


    async def _backend_and_state(self, be_path: str) -> tuple[str | None, XenbusState]:
        """What ``backend`` names now, and the state of the backend at ``be_path``
        (read at once)."""
        raw = await read_nodes(self.xs, [f"{self.nodename}/backend", f"{be_path}/state"])
        return (raw[0].decode(errors="replace") if raw[0] else None), parse_state(raw[1])

    async def wait_for_backend_gone(self, be_path: str) -> str:
        """Wait until the backend we are connected to at ``be_path`` is gone:
        ``backend`` names another one, or its state left Connected (a vanished
        directory reads as Unknown).  Return why, for the log."""
        async def gone():
            be, st = await self._backend_and_state(be_path)
            if be != be_path:
                return "backend moved"
            if st != XenbusState.Connected:
                return f"backend state {st.name}"
            return None
        return await self.wait_on_backend(be_path, gone)


async def first_device(xs, domid: int, devtype: str, timeout: float = float("inf")) -> str:
    """The lowest-numbered ``device/<devtype>/<devid>`` of domain ``domid``,
    waiting for the toolstack to write one (a guest's "my disk", "my vif")."""
    base = f"/local/domain/{domid}/device/{devtype}"

    async def first():
        try:
            devs = await xs.directory(base)
        except OSError:
            return None
        return min(devs, key=lambda d: (len(d), d)) if devs else None
    return await wait_until(xs, [base], first, timeout)


class _NotWaiting(Exception):
    """The backend stopped waiting for us: abandon the publishing transaction."""


async def publish_and_wait_connected(dev: FrontendDevice, be_path: str,
                                     nodes: Iterable[tuple[str, str]],
                                     logger: logging.Logger = log) -> bool:
    """The frontend's half of the handshake, once its ring and channel exist.

    In one transaction, and only while ``backend`` still names ``be_path`` in
    InitWait, write ``nodes`` (``ring-ref``, ``event-channel``, ...) into the
    frontend's directory and switch to Initialised; then wait for that backend
    to answer.  True once it is Connected; False (logged) when it stopped
    waiting before we published, moved, or closed instead: the caller gives
    back what it set up and starts over.
    """
    xs, fe_path = dev.xs, dev.nodename
    items = [(f"{fe_path}/{key}", value) for key, value in nodes] \
        + [(f"{fe_path}/state", int(XenbusState.Initialised))]

    async def publish(t) -> bool:
        # Publish only for the backend we set up for, and only while it
        # waits for us: a stale Initialised (refs granted to a backend that
        # has since gone) would be read by the next backend as ours.
        # Reading both nodes inside the transaction makes a concurrent
        # rebind conflict with it, so the check holds at commit.  The
        # writes go in the same round trip as the check; if it fails, the
        # transaction is abandoned and none of them ever happened.
        waiting, _ = await gather([partial(still_waiting, t, fe_path, be_path),
                                   partial(write_nodes, t, items)])
        if not waiting:
            raise _NotWaiting
        return True
    try:
        published = await xs.run_transaction(publish)
    except _NotWaiting:
        published = False
    if not published:
        logger.info("%s: backend %s stopped waiting before we published; starting over",
                    fe_path, be_path)
        return False

    async def backend_answered():
        be, st = await dev._backend_and_state(be_path)
        if be != be_path:
            return "moved"
        if st == XenbusState.Connected:
            return "connected"
        if st in (XenbusState.Closing, XenbusState.Closed, XenbusState.Unknown):
            return "failed"
        return None
    outcome = await dev.wait_on_backend(be_path, backend_answered, poll=0.2)
    if outcome != "connected":
        logger.info("%s: backend %s did not connect (%s); starting over",
                    fe_path, be_path, outcome)
        return False
    return True


async def connect_retrying(what: str, connect: Callable[[], Awaitable[T | None]],
                           retry_delay: float, logger: logging.Logger = log) -> T:
    """The frontend's "start over" loop: ``await connect()`` until it returns a
    connection.  None (the backend did not connect) means try again at once;
    an exception means a handshake step failed, so try again after
    ``retry_delay`` seconds."""
    while True:
        try:
            conn = await connect()
        except Exception as exc:
            # A backend that died mid-handshake makes our hypercalls naming it
            # (grant, alloc_unbound) or our XenStore reads fail: start over.
            logger.warning("%s: connecting failed (%s: %s); starting over",
                           what, type(exc).__name__, exc)
            await trio.sleep(retry_delay)
            continue
        if conn is not None:
            return conn


async def frontend_start_over(dev: FrontendDevice, port, timeout: float) -> None:
    """Leave a dead connection: back to Initialising (so the next backend sees
    a frontend starting over) and close our event channel ``port``.  Each
    step is bounded by ``timeout``: a lost reply must not keep the device
    from reaching the next backend."""
    with trio.move_on_after(timeout):
        try:
            await dev.switch_state(XenbusState.Initialising)
        except OSError:
            pass
    with trio.move_on_after(timeout):
        try:
            await port.close()
        except Exception:
            pass


#: Frontend states that mean "it left the connection" (or its directory went).
FRONTEND_GONE = frozenset({XenbusState.Initialising, XenbusState.Closing,
                           XenbusState.Closed, XenbusState.Unknown})
#: Frontend states from which a new handshake can begin.
FRONTEND_RESTARTED = frozenset({XenbusState.Initialising, XenbusState.Closed,
                                XenbusState.Unknown})


def frontend_is(xs, fe_path: str, states: Iterable[XenbusState]) -> Callable[[], Awaitable[bool]]:
    """A :func:`wait_until` check: is the frontend's state one of ``states``?"""
    states = frozenset(states)

    async def check() -> bool:
        return await read_state(xs, fe_path) in states
    return check


async def backend_fail(xs, path: str, why: str, logger: logging.Logger = log) -> None:
    """Close a backend device on purpose: write ``error`` saying why, then Closed.

    The frontend sees Closed.  A device whose set-up failed (no disk image,
    say) is then left alone until its directory is re-made; one whose
    frontend misbehaved is offered again when it starts over
    (:func:`backend_handshake`)."""
    logger.warning("%s: %s", path, why)
    try:
        await xs.write(f"{path}/error", why.encode()[:1000])
        await switch_state(xs, path, XenbusState.Closed)
    except OSError:
        pass


async def backend_handshake(xs, path: str, fe_path: str,
                            connect_and_serve: Callable[[], Awaitable[None]],
                            refused: type[Exception] | tuple[type[Exception], ...],
                            logger: logging.Logger = log) -> None:
    """The backend's half of the handshake, for as many connections as the
    frontend makes.

    InitWait; wait for the frontend's Initialised; ``connect_and_serve()``
    (which switches to Connected and returns when the connection ends);
    Closing, Closed; wait for the frontend to start over, and again.  An
    exception of type ``refused`` (the frontend's doing: a ring reference
    it does not grant us, say) closes the device with ``error``
    (:func:`backend_fail`); like Linux's backends, it is offered again once
    the frontend starts over.  That matters for honest frontends too: one
    that gave up on us a moment before we read its Initialised has already
    taken its grant back.  Any other exception propagates to the
    BackendWatcher, which restarts the device.
    """
    while True:
        await switch_state(xs, path, XenbusState.InitWait)
        # Connect only on Initialised: a frontend still showing Connected is
        # talking about a ring from before (a previous backend's).
        await wait_until(xs, [f"{fe_path}/state"],
                         frontend_is(xs, fe_path, {XenbusState.Initialised}))
        try:
            await connect_and_serve()
        except* refused as group:
            # except*: the refusal may come out of nurseries, inside
            # exception groups (see domains/kernel/exception_groups.py).
            await backend_fail(xs, path, str(first_leaf(group)), logger)
        else:
            await switch_state(xs, path, XenbusState.Closing)
            await switch_state(xs, path, XenbusState.Closed)
        if await read_node(xs, f"{path}/online") == b"0":
            return                       # the toolstack is removing the device
        # Wait for the frontend to start over (or be gone).
        await wait_until(xs, [f"{fe_path}/state"], frontend_is(xs, fe_path, FRONTEND_RESTARTED))


#: How long one liveness question to the hypervisor may take before it counts as
#: unanswered (a dropped message): the connection is then kept and asked again later.
PEER_CHECK_TIMEOUT = 1.0


async def still_waiting(t, fe_path: str, be_path: str) -> bool:
    """In transaction ``t``: does ``backend`` still name ``be_path``, in InitWait?"""
    be, state = await read_nodes(t, [f"{fe_path}/backend", f"{be_path}/state"])
    # A node that is gone (None) means the backend went with it.
    return be is not None and be.decode(errors="replace") == be_path \
        and parse_state(state) == XenbusState.InitWait


async def peer_gone(port, what: str) -> bool:
    """Has the far end of ``port`` been unbound (its domain died or closed it)?

    Only the hypervisor's answer "not bound" means gone.  A question that
    fails or goes unanswered (a refused hypercall, a dropped message) says
    nothing about the backend, so the connection is kept; if the backend
    really is gone, the next check or the XenStore watch will say so.
    """
    with trio.move_on_after(PEER_CHECK_TIMEOUT):
        try:
            return not await port.peer_alive()
        except Exception as exc:
            log.warning("%s: cannot ask whether the backend's channel is bound (%s); "
                        "keeping the connection", what, exc)
            return False
    log.warning("%s: no answer about the backend's channel; keeping the connection", what)
    return False


#: wait_for_backend's marker for "the backend node changed under us".
_MOVED = object()


def names_domain(path: str, domid: int) -> bool:
    """Does a backend path live under ``/local/domain/<domid>/``?

    ``backend`` and ``backend-id`` are two nodes read one after the other;
    the toolstack changes both in one transaction, so a pair that disagrees
    was read across a rebind and must be read again.
    """
    return path.startswith(f"/local/domain/{domid}/")


class DeviceProgress:
    """What one backend shows its driver domain about whether it is serving.

    A backend registers the back rings it serves (:meth:`add_ring`) and how
    to wake its loop as an event would (``kick``).  Everything else is read
    from the rings themselves, so the data path pays nothing: a ring's
    ``rsp_prod_pvt`` counts the responses produced, requests taken and not
    yet answered (``req_cons != rsp_prod_pvt``) mean the backend is *busy*
    with them, and unconsumed requests mean work is *pending*.
    :class:`BackendWatcher` reads these to tell an idle device from a stuck one.
    """

    def __init__(self) -> None:
        self.rings: list[tuple[object, Callable[[], bool] | None]] = []
        self.kick: Callable[[], None] | None = None
        #: Send the frontend a (possibly spurious) event: a dropped
        #: notification then costs it one stall period, never a hang.
        self.nudge: Callable[[], None] | None = None

    def add_ring(self, ring, pending: Callable[[], bool] | None = None) -> None:
        """Watch ``ring`` (a BackRing); ``pending`` overrides "has unconsumed
        requests" (an rx ring has work only when there is something to deliver)."""
        self.rings.append((ring, pending))

    def sample(self) -> list[tuple[int, bool, bool]]:
        """Per ring: (responses produced so far, busy, pending).  Rings are
        judged one by one: a vif whose rx ring flows while its tx ring is
        stuck is stuck."""
        out = []
        for ring, has_work in self.rings:
            try:
                out.append((ring.rsp_prod_pvt, ring.req_cons != ring.rsp_prod_pvt,
                            bool(has_work() if has_work else ring.unconsumed_requests())))
            except Exception:   # a corrupt ring: the backend's own loop refuses it
                out.append((0, False, False))
        return out


#: Every running device's progress, by backend path (one driver domain per process).
_progress: dict[str, DeviceProgress] = {}


def device_progress(path: str) -> DeviceProgress:
    """The progress record of the device at ``path`` (made on first use)."""
    p = _progress.get(path)
    if p is None:
        p = _progress[path] = DeviceProgress()
    return p


class BackendWatcher:
    """A driver domain's device discovery and supervision for one device type.

    Watches ``/local/domain/<self>/backend/<type>`` and runs
    ``serve(path)`` as a task for every
    ``<frontend-domid>/<devid>`` directory found there; when the directory is
    removed, the task is cancelled.  When the toolstack takes a device
    offline (``online = 0``, as libxl does before removing one) the task is
    cancelled too - which lets go of the ring and every grant - and only
    then is ``state`` set to Closed: the toolstack's sign that no request
    of the old ring will be served any more.  It looks again (a *scan*:
    every device directory's ``frontend`` and ``online``) when a watch event
    could change what it finds (:meth:`changes_scan`), once for all the
    events queued by then, and every :data:`POLL_INTERVAL` regardless; the
    devices' own writes below the root (states, features) cost no scan.

    Supervision (MINIX 3's reincarnation server, per device):

    - a backend task that *raises* has died: the device's ``state`` is set to
      Closed (so its frontend sees the backend go away and starts over), and
      after a back-off (``backoff`` seconds, doubling on each failure up to
      ``backoff_max``, reset once an attempt has run ``healthy`` seconds) a
      fresh ``serve(path)`` does a new handshake.  A device that keeps
      failing costs one attempt per ``backoff_max``, never a spin;
    - a backend that has work (a request being handled, or requests on its
      ring) and publishes no response for ``stall_timeout`` seconds is
      *stuck*: if it is idle with requests waiting (a lost event) it is
      kicked once; if it is still stuck after another ``stall_timeout`` it is
      cancelled and restarted as if it had died.  A ring-only hang is thus
      caught inside the driver domain, per device, while dom0's watchdog
      keeps catching a whole domain that hangs (its heartbeat stops);
    - every ``stall_timeout`` each connected device is kicked (its loop
      re-reads its rings) and its frontend sent an event: events coalesce,
      so this costs little, and a notification lost either way (an events
      or hypercall fault) costs at most one period;
    - a backend task that *returns* has closed its device on purpose (a
      hostile frontend, a missing disk: it wrote ``error``); it is left
      alone until its directory is re-made.

    Attempts and restarts are published in the device's directory as
    ``restarts`` so ``xl xenstore-ls`` shows them.
    """

    def __init__(self, xs, domid: int, devtype: str,
                 serve: Callable[[str], Awaitable[None]], *,
                 stall_timeout: float = 2.0, backoff: float = 0.05,
                 backoff_max: float = 5.0, healthy: float = 10.0) -> None:
        self.xs = xs
        self.root = f"/local/domain/{domid}/backend/{devtype}"
        self.serve = serve
        self.running: dict[str, trio.CancelScope] = {}
        self.stall_timeout = stall_timeout
        self.backoff = backoff
        self.backoff_max = backoff_max
        self.healthy = healthy
        self.restarts: dict[str, int] = {}
        self._attempts: dict[str, trio.CancelScope] = {}
        self._stalled: set[str] = set()

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            if self.stall_timeout > 0:
                nursery.start_soon(self._stall_watch)
            watch = await self.xs.watch(self.root)
            async with watch:
                while True:
                    await self._scan(nursery)
                    with trio.move_on_after(POLL_INTERVAL):
                        await self._next_change(watch)

    #: The keys of a device directory that a scan reads.
    SCANNED_KEYS = frozenset({"frontend", "online"})

    def changes_scan(self, path: str) -> bool:
        """Could a change at ``path`` (a watch event) change what a scan finds?

        The watch on the root fires for every write below it, and most are
        the devices' own: their ``state``, the features a backend publishes,
        a toolstack writing a dozen keys per device.  A scan depends only on
        which ``<frontend>/<devid>`` directories exist and on their
        ``frontend`` and ``online`` keys.
        """
        if not path.startswith(self.root + "/"):
            return path == self.root or self.root.startswith(path + "/")   # the root itself, or an ancestor removed
        parts = path[len(self.root) + 1:].split("/")
        return len(parts) <= 2 or (len(parts) == 3 and parts[2] in self.SCANNED_KEYS)

    async def _next_change(self, watch) -> None:
        """Wait for a watch event that :meth:`changes_scan`, then take every event
        already queued too: one scan answers them all (a toolstack re-creating
        a driver domain's devices fires a hundred at once)."""
        while not self.changes_scan((await watch.__anext__()).path):
            pass
        watch.take_queued()

    async def _list(self, path: str) -> list[str]:
        try:
            return await self.xs.directory(path)
        except OSError:
            return []

    async def _scan(self, nursery: trio.Nursery) -> None:
        present = set()
        frontends = await self._list(self.root)
        devids = await gather(partial(self._list, f"{self.root}/{fe}") for fe in frontends)
        paths = [f"{self.root}/{fe}/{devid}" for fe, ids in zip(frontends, devids)
                 for devid in ids]
        # Every device's two keys at once: a driver domain that has just been
        # re-created finds all its devices here, and each one waits for this.
        raw = await read_nodes(self.xs, [f"{p}/{k}" for p in paths for k in ("frontend", "online")])
        for i, path in enumerate(paths):
            frontend, online = raw[2 * i], raw[2 * i + 1]
            if frontend is None:
                continue     # a directory the toolstack is still writing has no frontend yet
            if online == b"0":
                continue     # being removed: see _offline
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
        failures = 0
        try:
            with scope:
                while True:
                    started = trio.current_time()
                    _progress[path] = DeviceProgress()
                    try:
                        with trio.CancelScope() as attempt:
                            self._attempts[path] = attempt
                            await self.serve(path)
                            return          # closed on purpose: left alone
                        if path not in self._stalled:
                            return
                        why = f"no progress for {2 * self.stall_timeout:g} s with work pending"
                    except Exception as exc:
                        log.exception("backend %s failed", path)
                        why = f"{type(exc).__name__}: {exc}"
                    finally:
                        self._attempts.pop(path, None)
                        self._stalled.discard(path)
                    if trio.current_time() - started >= self.healthy:
                        failures = 0
                    failures += 1
                    self.restarts[path] = self.restarts.get(path, 0) + 1
                    delay = min(self.backoff_max, self.backoff * 2 ** (failures - 1))
                    log.warning("backend %s died (%s); restart %d in %.2f s", path, why,
                                self.restarts[path], delay)
                    await self._closed(path, why)
                    await trio.sleep(delay)
            if scope.cancelled_caught:
                await self._offline(path)
        finally:
            _progress.pop(path, None)

    async def _offline(self, path: str) -> None:
        """The device's task is gone: if the toolstack is removing the device
        (``online = 0``), say Closed.  In a transaction, so a directory
        removed meanwhile is not re-made by our write."""
        async def body(t) -> bool:
            try:
                online = await t.read(f"{path}/online")
            except OSError:
                return False
            if online != b"0":
                return False
            await t.write(f"{path}/state", str(int(XenbusState.Closed)))
            return True
        try:
            if await self.xs.run_transaction(body):
                log.info("%s: taken offline by the toolstack; ring and grants let go", path)
        except OSError:
            pass

    async def _closed(self, path: str, why: str) -> None:
        """Tell the frontend its backend went away, so it starts over."""
        try:
            await self.xs.write(f"{path}/restarts", str(self.restarts[path]).encode())
            await switch_state(self.xs, path, XenbusState.Closed)
        except OSError:
            pass

    async def _stall_watch(self) -> None:
        """Catch devices that have work and serve none of it (a ring-only hang)."""
        seen: dict[tuple[str, int], tuple[int, float, bool]] = {}   # (path, ring) -> (served, since, kicked)
        period = self.stall_timeout / 4
        ticks = 0
        while True:
            await trio.sleep(period)
            ticks += 1
            now = trio.current_time()
            for path in list(self._attempts):
                p = _progress.get(path)
                if p is not None and ticks % 4 == 0:
                    for poke in (p.kick, p.nudge):   # events coalesce: spurious ones cost nothing
                        if poke is not None:
                            try:
                                poke()
                            except Exception:
                                pass
                for i, (served, busy, pending) in enumerate(p.sample() if p is not None else []):
                    key = (path, i)
                    if not (busy or pending):
                        seen.pop(key, None)
                        continue
                    last, since, kicked = seen.get(key, (served, now, False))
                    if served != last:
                        since, kicked = now, False
                    stuck = now - since
                    if stuck >= 2 * self.stall_timeout:
                        log.warning("backend %s: ring %d has work and served nothing for %.1f s; "
                                    "restarting the device", path, i, stuck)
                        self._stalled.add(path)
                        self._attempts[path].cancel()
                        for k in [k for k in seen if k[0] == path]:
                            del seen[k]
                        break
                    if stuck >= self.stall_timeout and not kicked and not busy and p.kick:
                        log.info("backend %s: requests waiting, no event seen; kicking", path)
                        p.kick()
                        kicked = True
                    seen[key] = (served, since, kicked)
