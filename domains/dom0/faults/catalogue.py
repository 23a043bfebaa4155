"""The fault catalogue: every kind of fault this system can inject, and what each means.

A *kind* is one of the classes of the fault-injection literature (crash, hang,
slow, corrupt, events, control, resources); a *mode* is one concrete way of
causing it.  Each :class:`FaultType` says:

- ``how``: ``outside`` (dom0 acts on the domain: a signal, a XenStore edit, a
  balloon target), ``point`` (a fault point inside the domain's kernel, armed
  through XenStore: see domains/kernel/faultpoint.py) or ``agent`` (the
  domain's fault agent acts itself: a SCHEDOP_shutdown, grabbing resources);
- ``targets``: which domains it makes sense against (``driver``: driver
  domains, where the fault points are in the backend; ``guest``: guests,
  where they are in the frontend; ``any``);
- ``expect``: what the system is expected to do about it (how it is detected
  and how it recovers), which the report quotes next to what happened;
- ``campaign``: its weight when a campaign draws faults against driver
  domains (0: never drawn, for faults whose expected outcome is not
  "recovered", such as a backend that lies about request ids).

Parameters (``delay``, ``duration``, ``prob``, ``count``) have defaults here
and can be set on the command line or drawn from the campaign's seed.
Network modes are named ``net-...``; their points live in netback
(``netback.tx`` before a tx batch is answered, ``netback.response`` and
``netback.response.raw`` on each tx response, ``netback.push`` when the tx
responses are published) and they are aimed only at driver domains that serve
vifs (``serves="vif"``); block modes only at those that serve vbds.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class FaultType:
    kind: str
    mode: str
    how: str                    # outside | point | agent
    targets: str                # driver | guest | any
    description: str
    expect: str
    point: str = ""
    action: str = ""
    defaults: dict = field(default_factory=dict)
    campaign: int = 0           # weight in a driver-domain campaign
    restart: bool = False       # recovery is a restart of the target domain
    serves: str = ""            # the device type the target must serve (vbd, vif); "" any

    @property
    def name(self) -> str:
        return f"{self.kind}/{self.mode}"


CATALOGUE: list[FaultType] = [
    # -- crash ---------------------------------------------------------------------
    FaultType("crash", "sigkill", "outside", "any",
              "SIGKILL the domain's process from outside (a machine check, a power cut).",
              "hypervisor sees the process die (pidfd) -> VIRQ_DOM_EXC -> on_crash=restart; "
              "frontends reconnect and replay", campaign=4, restart=True),
    FaultType("crash", "oops", "point", "driver",
              "Raise an exception inside blkback's request handler; the kernel treats the "
              "oops as fatal (panic_on_oops) and reports SCHEDOP_shutdown(crash).",
              "VIRQ_DOM_EXC -> restart -> replay", point="blkback.request", action="oops",
              defaults={"count": 1}, campaign=3, restart=True, serves="vbd"),
    FaultType("crash", "shutdown", "agent", "any",
              "The domain asks to crash: SCHEDOP_shutdown with reason crash.",
              "VIRQ_DOM_EXC -> on_crash (restart for driver domains)", action="shutdown-crash",
              campaign=2, restart=True),
    # -- hang ----------------------------------------------------------------------
    FaultType("hang", "sigstop", "outside", "driver",
              "SIGSTOP the domain: alive, but no instruction of it runs.",
              "dom0's watchdog sees the heartbeat stop -> destroy + restart", campaign=2,
              restart=True),
    FaultType("hang", "spin", "point", "driver",
              "An infinite loop inside blkback's request handler: the whole kernel stops.",
              "the heartbeat stops -> watchdog -> restart", point="blkback.request",
              action="spin", defaults={"count": 1}, campaign=2, restart=True, serves="vbd"),
    FaultType("hang", "rings", "point", "driver",
              "Stop serving the rings for `duration` seconds while the rest of the domain "
              "(heartbeat, XenStore) lives on.",
              "guests see a stall as long as the fault; nothing in the system detects a "
              "ring-only hang that does not end (see the report's notes)",
              point="blkback.request", action="hang", defaults={"count": 1, "duration": 0.3},
              campaign=6, serves="vbd"),
    # -- slow ----------------------------------------------------------------------
    FaultType("slow", "response", "point", "driver",
              "Delay every response by `delay` seconds for `duration` seconds.",
              "transparent: guests see latency, never an error", point="blkback.response",
              action="delay", defaults={"delay": 0.02, "duration": 0.3}, campaign=14, serves="vbd"),
    # -- corrupt -------------------------------------------------------------------
    FaultType("corrupt", "status", "point", "driver",
              "Answer `count` requests with a wrong status (an error, or a status that "
              "does not exist).", "the guest sees an I/O error for those requests and "
              "carries on (a lying backend cannot be masked)", point="blkback.response",
              action="corrupt-status", defaults={"count": 1}, campaign=0, serves="vbd"),
    FaultType("corrupt", "op", "point", "driver",
              "Answer `count` requests with a wrong operation code.",
              "blkfront matches answers by id only: transparent",
              point="blkback.response", action="corrupt-op", defaults={"count": 2}, campaign=6, serves="vbd"),
    FaultType("corrupt", "id", "point", "driver",
              "Answer `count` requests with a wrong id.",
              "blkfront ignores ids it did not issue; the real request is then never "
              "answered until the next reconnect; an id that names another outstanding "
              "request completes the wrong request (the checker may see lost writes)",
              point="blkback.response", action="corrupt-id", defaults={"count": 1}, serves="vbd"),
    FaultType("corrupt", "prod", "point", "driver",
              "Publish a response producer index that runs past the ring.",
              "blkfront refuses the ring (RingCorruptError), reconnects and replays",
              point="blkback.push", action="corrupt-prod", defaults={"count": 1}, campaign=0, serves="vbd"),
    FaultType("corrupt", "garbage", "point", "guest",
              "A guest puts garbage in its request slots (ids kept).",
              "blkback answers BLKIF_RSP_ERROR; the guest sees errors; nobody else notices",
              point="blkfront.request", action="garbage", defaults={"count": 1}),
    FaultType("corrupt", "bad-gref", "point", "guest",
              "A guest names grant references it never granted.",
              "the grant map fails; blkback answers BLKIF_RSP_ERROR", point="blkfront.request",
              action="bad-gref", defaults={"count": 1}),
    FaultType("corrupt", "bad-sector", "point", "guest",
              "A guest asks for sectors far outside its disk.",
              "blkback answers BLKIF_RSP_ERROR", point="blkfront.request",
              action="bad-sector", defaults={"count": 1}),
    FaultType("corrupt", "guest-prod", "point", "guest",
              "A guest pushes its request producer index past the ring.",
              "blkback disconnects that device (state Closed); other devices and guests "
              "carry on", point="blkfront.push", action="corrupt-prod", defaults={"count": 1}),
    FaultType("corrupt", "lose-write", "point", "driver",
              "A deliberately broken backend: acknowledge `count` writes without "
              "performing them (to test the checker).",
              "nothing in the system can see it; the campaign's checker must report lost "
              "writes", point="blkback.write", action="skip", defaults={"count": 8}, serves="vbd"),
    # -- events ----------------------------------------------------------------------
    FaultType("events", "drop", "point", "any",
              "Drop the domain's outgoing event-channel notifications with probability "
              "`prob` for `duration` seconds.",
              "the peer polls a silent channel every second (blkfront STALL_CHECK): delay",
              point="evtchn.send", action="drop", defaults={"prob": 0.5, "duration": 0.3},
              campaign=8),
    FaultType("events", "duplicate", "point", "any",
              "Send every outgoing notification twice for `duration` seconds.",
              "transparent: notifications coalesce", point="evtchn.send", action="duplicate",
              defaults={"duration": 0.3}, campaign=8),
    FaultType("events", "delay", "point", "any",
              "Deliver outgoing notifications `delay` seconds late for `duration` seconds.",
              "transparent: latency", point="evtchn.send", action="delay",
              defaults={"delay": 0.02, "duration": 0.3}, campaign=8),
    # -- control ---------------------------------------------------------------------
    FaultType("control", "hypercall-corrupt", "point", "any",
              "Garble the port number of fire-and-forget event sends (the doorbell's "
              "requests) for `duration` seconds.",
              "the hypervisor refuses the send and logs it; the lost notification "
              "costs the peer a stall check", point="hypercall.nowait", action="corrupt-args",
              defaults={"prob": 0.5, "duration": 0.3}, campaign=5),
    FaultType("control", "hypercall-drop", "point", "any",
              "Drop fire-and-forget event sends with probability `prob` for "
              "`duration` seconds.", "as a dropped notification: delay",
              point="hypercall.nowait", action="drop", defaults={"prob": 0.5, "duration": 0.3},
              campaign=5),
    FaultType("control", "xs-delete", "outside", "driver",
              "Delete a device's backend `state` node in XenStore (`node=` names another "
              "key).", "the frontend sees its backend leave Connected, reconnects; the "
              "backend starts over", defaults={"node": "state"}, campaign=6),
    FaultType("control", "xs-rewrite", "outside", "driver",
              "Rewrite a device's backend `state` node to Closing (`value=` to choose).",
              "the frontend reconnects and replays; the backend starts over",
              defaults={"node": "state", "value": "5"}, campaign=6),
    # -- resources -------------------------------------------------------------------
    FaultType("resources", "grants", "agent", "any",
              "Take every free grant reference of the domain for `duration` seconds.",
              "backends map, they do not grant: transparent for a driver domain; a guest "
              "cannot grant new pages meanwhile", action="exhaust-grants",
              defaults={"duration": 0.3}, campaign=4),
    FaultType("resources", "evtchn", "agent", "any",
              "Take every free event-channel port of the domain for `duration` seconds.",
              "running connections are unaffected; a reconnect meanwhile would fail",
              action="exhaust-evtchn", defaults={"duration": 0.3}, campaign=4),
    FaultType("resources", "balloon", "outside", "any",
              "Balloon the domain down to `fraction` of its memory for `duration` seconds "
              "(xl mem-set), then back.",
              "the balloon driver gives back unshared pages; I/O carries on (a driver "
              "domain runs no balloon driver: the target is ignored)",
              defaults={"fraction": 0.5, "duration": 0.3}, campaign=3),
    # -- device-level supervision and the network driver domain ------------------------
    FaultType("crash", "exception", "point", "driver",
              "Raise an exception inside blkback's request handler that the kernel survives: "
              "the backend task dies, the domain lives.",
              "the driver domain's BackendWatcher sees the task die, sets the vbd Closed and "
              "restarts it after a back-off; blkfront reconnects and replays",
              point="blkback.request", action="raise", defaults={"count": 1}, campaign=4,
              serves="vbd"),
    FaultType("hang", "rings-forever", "point", "driver",
              "Stop serving one vbd's ring for good while the domain's heartbeat goes on.",
              "the BackendWatcher's progress check sees requests taken and none answered for "
              "2 x device_timeout and restarts that device; blkfront replays",
              point="blkback.request", action="hang", defaults={"count": 1}, campaign=3,
              serves="vbd"),
    FaultType("crash", "net-exception", "point", "driver",
              "Raise an exception inside netback's tx path that the kernel survives.",
              "the vif's task fails, the BackendWatcher sets it Closed and restarts it; "
              "netfront reconnects (datagrams in flight may be lost: UDP)",
              point="netback.tx", action="raise", defaults={"count": 1}, campaign=4, serves="vif"),
    FaultType("crash", "net-oops", "point", "driver",
              "Raise an exception inside netback's tx path that the kernel panics on.",
              "VIRQ_DOM_EXC -> restart of the network driver domain -> netfronts reconnect",
              point="netback.tx", action="oops", defaults={"count": 1}, campaign=3, restart=True,
              serves="vif"),
    FaultType("hang", "net-spin", "point", "driver",
              "An infinite loop inside netback's tx path: the whole kernel stops.",
              "the heartbeat stops -> watchdog -> restart", point="netback.tx", action="spin",
              defaults={"count": 1}, campaign=2, restart=True, serves="vif"),
    FaultType("hang", "net-rings", "point", "driver",
              "Stop serving a vif's tx ring for `duration` seconds (heartbeat goes on).",
              "a stall as long as the fault; UDP datagrams queue or drop", point="netback.tx",
              action="hang", defaults={"count": 1, "duration": 0.3}, campaign=5, serves="vif"),
    FaultType("hang", "net-rings-forever", "point", "driver",
              "Stop serving a vif's tx ring for good while the heartbeat goes on.",
              "the BackendWatcher's progress check restarts that vif; netfront reconnects",
              point="netback.tx", action="hang", defaults={"count": 1}, campaign=3, serves="vif"),
    FaultType("slow", "net-response", "point", "driver",
              "Delay every tx batch by `delay` seconds for `duration` seconds.",
              "transparent: latency", point="netback.tx", action="delay",
              defaults={"delay": 0.02, "duration": 0.3}, campaign=8, serves="vif"),
    FaultType("corrupt", "net-status", "point", "driver",
              "Answer `count` tx requests with a wrong status.",
              "netfront counts a failed transmit; UDP may lose that datagram",
              point="netback.response", action="corrupt-status", defaults={"count": 1},
              campaign=3, serves="vif"),
    FaultType("corrupt", "net-id", "point", "driver",
              "Answer `count` tx requests with a wrong id.",
              "netfront ignores or refuses an id it did not issue (reconnecting if need be)",
              point="netback.response", action="corrupt-id", defaults={"count": 1},
              campaign=0, serves="vif"),
    FaultType("corrupt", "net-garbage", "point", "driver",
              "Put random bytes in `count` tx response slots.",
              "netfront refuses or ignores the slot; at worst a reconnect",
              point="netback.response.raw", action="garbage", defaults={"count": 1},
              campaign=0, serves="vif"),
    FaultType("corrupt", "net-prod", "point", "driver",
              "Publish a tx response producer index that runs past the ring.",
              "netfront refuses the ring (RingCorruptError), reconnects",
              point="netback.push", action="corrupt-prod", defaults={"count": 1}, campaign=3,
              serves="vif"),
]

BY_NAME: dict[str, FaultType] = {t.name: t for t in CATALOGUE}
KINDS: list[str] = list(dict.fromkeys(t.kind for t in CATALOGUE))


class UnknownFault(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


def lookup(kind: str, mode: str | None = None) -> FaultType:
    """``crash`` (first mode), ``crash/oops`` or ``("crash", "oops")``."""
    if mode is None and "/" in kind:
        kind, mode = kind.split("/", 1)
    if kind not in KINDS:
        raise UnknownFault(f"unknown fault kind '{kind}'; kinds: {', '.join(KINDS)} "
                           f"(run.py fault --list describes them)")
    if mode is None:
        return next(t for t in CATALOGUE if t.kind == kind)
    t = BY_NAME.get(f"{kind}/{mode}")
    if t is None:
        modes = [x.mode for x in CATALOGUE if x.kind == kind]
        raise UnknownFault(f"fault kind '{kind}' has no mode '{mode}'; modes: {', '.join(modes)}")
    return t


def describe() -> str:
    """The text of `run.py fault --list`."""
    lines = []
    for kind in KINDS:
        lines.append(f"{kind}")
        for t in (x for x in CATALOGUE if x.kind == kind):
            opts = " ".join(f"{k}={v}" for k, v in t.defaults.items())
            lines.append(f"  {t.name:<28} [{t.how}; targets {t.targets}]"
                         + (f"  defaults: {opts}" if opts else ""))
            lines.append(f"      {t.description}")
            lines.append(f"      expected: {t.expect}")
    return "\n".join(lines)
