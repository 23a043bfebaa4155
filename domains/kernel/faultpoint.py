"""Fault points: named places in a domain kernel where dom0 can make things go wrong.

What this is
    Fault-injection studies of driver isolation (MINIX 3's, Nooks', Xen's own
    driver-domain papers) put a *fault point* in the driver's code and arm it
    from outside: "at the next response, lie about the status", "stop serving
    the ring", "panic".  This module is the in-domain half.  Code calls
    ``await faultpoint.hit("blkback.response", rsp)`` (or the synchronous
    ``hit_nowait``) at a named place; when nothing is armed that is one dict
    lookup.  When a fault is armed there it may delay, hang, raise (``raise``:
    a bug that ends one task; ``oops``: a bug the kernel panics on), spin,
    drop or rewrite the value passing through.

How a fault is armed
    dom0 writes ``/local/domain/<self>/faults/<fault-id>`` = a spec line,
    for example ``point=blkback.response action=corrupt-status prob=0.5
    count=10 duration=2 seed=7``, and makes the node *dom0-owned*
    (permissions ``n0 r<self>``), so the domain may read it but never forge
    or remove a fault.  The :class:`Agent` (a task in the domain kernel)
    watches ``faults/``, ignores any node whose owner is not dom0, arms what it
    finds, disarms what went, and reports in its own
    ``data/faults/<fault-id>`` = ``armed`` / ``fired=N`` / ``done fired=N``.
    A fault fires with probability ``prob`` at each hit, at most ``count``
    times (0: no limit), until ``duration`` seconds after arming (0: until
    removed); each decision comes from ``random.Random(seed)``, so a run is
    reproducible up to the order in which requests reach the point.

    Some faults have no point: they are actions of the agent itself
    (``point=agent``): ``action=shutdown-crash`` (SCHEDOP_shutdown with reason
    crash, as a panicking kernel does), ``action=exhaust-grants`` and
    ``action=exhaust-evtchn`` (take every free grant reference or
    event-channel port and hold them for ``duration``).

    The agent also answers *probes* for the campaign's checker: dom0 writes a
    token to ``faults/probe`` and the agent writes ``<token> <completed>
    <errors> <net-rx>`` to ``data/faults/probe``: the counts of block I/O
    completions and of checked UDP datagrams received that it saw at
    ``count()`` points.  That is how dom0 learns within milliseconds that a
    guest is completing I/O again after a fault.

Invariant
    Unarmed, a fault point changes nothing and costs one dict lookup.  Only
    dom0 can arm one.  Every action is bounded by the spec (count, duration),
    except those meant to kill the domain (panic, spin), whose end is the
    domain's restart.

Where this differs from Xen
    Xen has no fault-injection framework in its tree; Linux has
    ``CONFIG_FAULT_INJECTION`` (failslab, fail_page_alloc, fail_make_request)
    armed through debugfs.  Arming through XenStore keeps it visible with
    ``xl xenstore-ls`` and reachable without a shell in the domain.
"""

from __future__ import annotations

import logging
import random
import struct
import time
from dataclasses import dataclass, field
from typing import Any

import trio

from ipc.event_abi import NR_EVENT_CHANNELS

log = logging.getLogger("faultpoint")

#: What a point returns to say "pretend this never happened" (drop a message,
#: skip an operation).  Callers test ``is DROP``.
DROP = object()

#: Every action a point can carry out; ``describe()`` in dom0's catalogue says what each means.
ACTIONS = {
    "delay", "hang", "spin", "oops", "drop", "duplicate",
    "corrupt-id", "corrupt-status", "corrupt-op", "corrupt-prod",
    "garbage", "bad-gref", "bad-sector", "corrupt-args",
    "skip", "raise",
}
AGENT_ACTIONS = {"shutdown-crash", "exhaust-grants", "exhaust-evtchn"}


class InjectedFault(Exception):
    """A bug on purpose: raised at a point armed with ``action=oops``."""


class SpecError(ValueError):
    """A fault spec that cannot be armed; the message says which word and why."""


@dataclass
class Fault:
    """One armed fault."""

    name: str
    point: str
    action: str
    prob: float = 1.0
    count: int = 0
    duration: float = 0.0
    delay: float = 0.0
    seed: int = 0
    armed_at: float = field(default_factory=time.monotonic)
    fired: int = 0
    rng: random.Random = field(default_factory=random.Random)

    @property
    def over(self) -> bool:
        if self.count and self.fired >= self.count:
            return True
        return bool(self.duration) and time.monotonic() - self.armed_at >= self.duration

    def decide(self) -> bool:
        """Does this hit fire?  (Counts it if so.)"""
        if self.over:
            return False
        if self.prob < 1.0 and self.rng.random() >= self.prob:
            return False
        self.fired += 1
        return True

    def remaining(self) -> float:
        if not self.duration:
            return float("inf")
        return max(0.0, self.duration - (time.monotonic() - self.armed_at))


def parse_spec(name: str, text: str) -> Fault:
    """``key=value`` words -> Fault; raise SpecError naming the bad word."""
    words = dict(w.partition("=")[::2] for w in text.split())
    point, action = words.pop("point", ""), words.pop("action", "")
    if not point:
        raise SpecError(f"fault {name}: no point= given")
    if point == "agent":
        if action not in AGENT_ACTIONS:
            raise SpecError(f"fault {name}: agent action {action!r} is not one of {sorted(AGENT_ACTIONS)}")
    elif action not in ACTIONS:
        raise SpecError(f"fault {name}: action {action!r} is not one of {sorted(ACTIONS)}")
    f = Fault(name, point, action)
    for key, conv in (("prob", float), ("count", int), ("duration", float),
                      ("delay", float), ("seed", int)):
        if key in words:
            try:
                setattr(f, key, conv(words.pop(key)))
            except ValueError:
                raise SpecError(f"fault {name}: {key} must be a number") from None
    words.pop("gen", None)
    if words:
        raise SpecError(f"fault {name}: unknown option(s) {', '.join(sorted(words))}")
    if not 0.0 <= f.prob <= 1.0 or f.count < 0 or f.duration < 0 or f.delay < 0:
        raise SpecError(f"fault {name}: prob must be 0..1 and count/duration/delay >= 0")
    f.rng = random.Random(f.seed)
    return f


# -- the armed table (one per domain process) -----------------------------------

_armed: dict[str, Fault] = {}
_counts: dict[str, int] = {}
_agent: "Agent | None" = None


def arm(fault: Fault) -> None:
    _armed[fault.point] = fault


def disarm(point: str) -> Fault | None:
    return _armed.pop(point, None)


def quiet() -> bool:
    """No fault is armed in this domain: a data path may take its fast lane,
    one that passes no fault point."""
    return not _armed


def armed(point: str) -> Fault | None:
    """The fault armed at ``point`` if it fires on this hit, else None."""
    if not _armed:
        return None
    f = _armed.get(point)
    if f is None or not f.decide():
        return None
    if _agent is not None:
        _agent.changed.set()
    return f


def count(point: str, status: int = 0) -> None:
    """Count an event (an I/O completion) for probes; ``status`` != 0 counts an error too."""
    _counts[point] = _counts.get(point, 0) + 1
    if status:
        _counts[point + ".errors"] = _counts.get(point + ".errors", 0) + 1


async def hit(point: str, value: Any = None) -> Any:
    """An awaitable fault point: returns ``value``, changed, or DROP."""
    if not _armed:
        return value
    f = armed(point)
    if f is None:
        return value
    return await _apply(f, value)


def hit_nowait(point: str, value: Any = None) -> Any:
    """A fault point where we may not sleep: actions that need time are refused."""
    if not _armed:
        return value
    f = armed(point)
    if f is None:
        return value
    return _apply_now(f, value)


async def _apply(f: Fault, value: Any) -> Any:
    if f.action == "delay":
        await trio.sleep(f.delay)
        return value
    if f.action == "hang":
        # Stop here while the rest of the domain (heartbeat, XenStore) lives on.
        await trio.sleep(f.remaining())
        return value
    return _apply_now(f, value)


def _apply_now(f: Fault, value: Any) -> Any:
    a = f.action
    if a in ("drop", "skip"):
        return DROP
    if a == "oops":
        log.error("fault %s: injected bug at %s; the kernel will panic", f.name, f.point)
        if _agent is not None:
            _agent.panic(f"injected bug at {f.point}")
        raise InjectedFault(f"fault {f.name}: injected bug at {f.point}")
    if a == "raise":
        # A bug the kernel survives: the exception ends the task it hit (a
        # backend), and the driver domain's supervisor restarts that device.
        log.error("fault %s: injected exception at %s", f.name, f.point)
        raise InjectedFault(f"fault {f.name}: injected exception at {f.point}")
    if a == "spin":
        log.error("fault %s: spinning forever at %s", f.name, f.point)
        while True:                 # an infinite loop: the whole kernel stops here
            time.sleep(0.05)        # (sleeping, so the host's other domains still run)
    mutate = _MUTATORS.get(a)
    if mutate is None:
        log.warning("fault %s: action %s means nothing at %s", f.name, a, f.point)
        return value
    return mutate(f, value)


# -- corruptions: how each one rewrites the value passing through ------------------

def _response_field(f: Fault, rsp: Any, name: str, value: int) -> Any:
    from dataclasses import replace
    return replace(rsp, **{name: value})


def _corrupt_id(f: Fault, rsp: Any) -> Any:
    return _response_field(f, rsp, "id", rsp.id ^ (1 + f.rng.randrange(0xFFFF)))


def _corrupt_status(f: Fault, rsp: Any) -> Any:
    return _response_field(f, rsp, "status", f.rng.choice((-1, -2, 1, 7)))


def _corrupt_op(f: Fault, rsp: Any) -> Any:
    return _response_field(f, rsp, "operation", (rsp.operation + 1 + f.rng.randrange(200)) & 0xFF)


def _corrupt_prod(f: Fault, ring: Any) -> Any:
    """Push the producer index we publish past the ring (the peer must refuse it)."""
    sring = ring.sring
    if hasattr(ring, "rsp_prod_pvt"):
        sring.rsp_prod = (ring.rsp_prod_pvt + ring.size + 1 + f.rng.randrange(ring.size)) & 0xFFFFFFFF
    else:
        # A hostile frontend keeps lying: its private index moves too, so every
        # later push repeats the bad value instead of quietly correcting it.
        ring.req_prod_pvt = (ring.req_prod_pvt + ring.size + 1 + f.rng.randrange(ring.size)) & 0xFFFFFFFF
        sring.req_prod = ring.req_prod_pvt
    return DROP


# A blkif request slot: operation u8, nr_segments u8, handle u16, pad, id u64 at 8,
# sector u64 at 16, then segments of (gref u32, first_sect u8, last_sect u8, pad) at 24.
def _garbage(f: Fault, raw: bytes) -> bytes:
    junk = bytearray(f.rng.randbytes(len(raw)))
    junk[8:16] = raw[8:16]          # keep the id, so the answer can find its request
    return bytes(junk)


def _bad_gref(f: Fault, raw: bytes) -> bytes:
    b = bytearray(raw)
    if b[1]:
        struct.pack_into("<I", b, 24, 0xFFFF0000 | f.rng.randrange(0xFFFF))
    return bytes(b)


def _bad_sector(f: Fault, raw: bytes) -> bytes:
    b = bytearray(raw)
    struct.pack_into("<Q", b, 16, (1 << 62) + f.rng.randrange(1 << 20))
    return bytes(b)


def _corrupt_args(f: Fault, port: int) -> int:
    """A fire-and-forget send's one argument, its port number, becomes another
    port: usually one we do not hold (the hypervisor refuses and logs it), else
    one we do (a spurious notification, which every ring absorbs)."""
    return port ^ (1 + f.rng.randrange(NR_EVENT_CHANNELS - 1))


def _duplicate(f: Fault, value: Any) -> Any:
    return value        # the caller acts twice when it sees the action (see events.py hook)


_MUTATORS = {
    "corrupt-id": _corrupt_id, "corrupt-status": _corrupt_status, "corrupt-op": _corrupt_op,
    "corrupt-prod": _corrupt_prod, "garbage": _garbage, "bad-gref": _bad_gref,
    "bad-sector": _bad_sector, "corrupt-args": _corrupt_args, "duplicate": _duplicate,
}


def intercept_send(port: Any) -> bool:
    """The event-channel send hook: True if the notification was dealt with here
    (dropped, or delayed and sent later), False to send it as usual.  A
    duplicated notification is sent once extra here and once by the caller."""
    if not _armed:
        return False
    f = armed("evtchn.send")
    if f is None:
        return False
    if f.action == "drop":
        return True
    if f.action == "duplicate":
        port.events.send_nowait(port)
        return False
    if f.action == "delay" and _agent is not None:
        _agent.k.nursery.start_soon(_late_send, port, f.delay)
        return True
    return False


async def _late_send(port: Any, delay: float) -> None:
    await trio.sleep(delay)
    if not port.closed:
        port.events.send_nowait(port)


# -- the agent: arming from XenStore ----------------------------------------------------

class Agent:
    """Watches ``/local/domain/<self>/faults`` and keeps the armed table in step."""

    def __init__(self, k: Any, xs: Any) -> None:
        self.k = k
        self.xs = xs
        self.base = f"/local/domain/{k.domid}/faults"
        self.data = f"/local/domain/{k.domid}/data/faults"
        self.faults: dict[str, Fault] = {}
        self.specs: dict[str, bytes] = {}
        self.changed = trio.Event()
        self._panic: str | None = None
        self._panic_event = trio.Event()

    def panic(self, why: str) -> None:
        self._panic = why
        self._panic_event.set()

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._panicker)
            nursery.start_soon(self._reporter)
            async with await self.xs.watch(self.base) as watch:
                while True:
                    await self.scan(nursery)
                    with trio.move_on_after(1.0):
                        await watch.__anext__()

    async def _panicker(self) -> None:
        """An oops in a driver, with panic_on_oops: the kernel reports a crash."""
        from ipc.sched_abi import SHUTDOWN_crash
        await self._panic_event.wait()
        await self.k.printk(f"{self.k.name}: kernel panic: {self._panic}")
        await self.k.shutdown(SHUTDOWN_crash)

    async def _dom0_owned(self, path: str) -> bool:
        try:
            perms = await self.xs.get_perms(path)
        except OSError:
            return False
        return bool(perms) and perms[0][1:] == "0"

    async def scan(self, nursery: trio.Nursery) -> None:
        try:
            names = await self.xs.directory(self.base)
        except OSError:
            names = []
        present = set()
        for name in names:
            path = f"{self.base}/{name}"
            try:
                spec = await self.xs.read(path)
            except OSError:
                continue
            if not spec or not await self._dom0_owned(path):
                continue           # written by someone other than dom0: not a fault
            present.add(name)
            if name == "probe":
                if self.specs.get(name) != spec:
                    self.specs[name] = spec
                    await self._answer_probe(spec)
                continue
            if self.specs.get(name) == spec:
                continue
            self.specs[name] = spec
            await self._arm(nursery, name, spec.decode(errors="replace"))
        for name in list(self.specs):
            if name not in present:
                del self.specs[name]
                f = self.faults.pop(name, None)
                if f is not None and _armed.get(f.point) is f:
                    disarm(f.point)
                    await self._report(name, f"done fired={f.fired}")

    async def _answer_probe(self, token: bytes) -> None:
        c = _counts
        await self.xs.write(f"{self.data}/probe", b"%s %d %d %d" % (
            token, c.get("io.complete", 0), c.get("io.complete.errors", 0), c.get("net.rx", 0)))

    async def _arm(self, nursery: trio.Nursery, name: str, text: str) -> None:
        try:
            f = parse_spec(name, text)
        except SpecError as exc:
            await self._report(name, f"error {exc}")
            return
        old = self.faults.pop(name, None)
        if old is not None and _armed.get(old.point) is old:
            disarm(old.point)
        self.faults[name] = f
        log.warning("fault %s armed: %s", name, text)
        if f.point == "agent":
            await self._report(name, "armed")
            nursery.start_soon(self._agent_action, name, f)
            return
        arm(f)
        await self._report(name, "armed")

    async def _agent_action(self, name: str, f: Fault) -> None:
        from ipc.sched_abi import SHUTDOWN_crash
        k = self.k
        f.fired = 1
        if f.action == "shutdown-crash":
            await k.printk(f"{k.name}: fault {name}: SCHEDOP_shutdown(crash)")
            await k.shutdown(SHUTDOWN_crash)
        held: list = []
        try:
            if f.action == "exhaust-grants":
                gfn = k.start_info["store_gfn"]
                while True:
                    try:
                        held.append(k.grants.grant_access(0, gfn, readonly=True))
                    except Exception:
                        break
            else:
                while len(held) < 4096:
                    try:
                        held.append(await k.events.alloc_unbound(0))
                    except Exception:
                        break
            await self._report(name, f"holding {len(held)}")
            await trio.sleep(f.duration or 1.0)
        finally:
            with trio.CancelScope(shield=True):
                for h in held:
                    try:
                        if f.action == "exhaust-grants":
                            k.grants.end_access(h)
                        else:
                            await h.close()
                    except Exception:
                        pass
        await self._report(name, f"done fired=1 held={len(held)}")

    async def _reporter(self) -> None:
        """Publish fire counts now and then (not on every hit: that is the hot path)."""
        last: dict[str, int] = {}
        while True:
            await self.changed.wait()
            self.changed = trio.Event()
            for name, f in list(self.faults.items()):
                if f.point != "agent" and last.get(name) != f.fired:
                    last[name] = f.fired
                    await self._report(name, ("done" if f.over else "fired") + f" fired={f.fired}")
            await trio.sleep(0.05)

    async def _report(self, name: str, text: str) -> None:
        try:
            await self.xs.write(f"{self.data}/{name}", text.encode())
        except OSError:
            pass


async def agent(k: Any, xs: Any) -> None:
    """Run this domain's fault agent (a task of the domain kernel)."""
    global _agent
    _agent = Agent(k, xs)
    await _agent.run()


def ensure_agent(k: Any, xs: Any, nursery: trio.Nursery) -> None:
    """Start the agent once per domain, from whichever driver comes up first."""
    global _agent_started
    if not _agent_started:
        _agent_started = True
        nursery.start_soon(agent, k, xs)


_agent_started = False


__all__ = ["hit", "hit_nowait", "count", "intercept_send", "agent", "ensure_agent",
           "Agent", "Fault", "parse_spec", "SpecError", "InjectedFault", "DROP",
           "ACTIONS", "AGENT_ACTIONS"]
