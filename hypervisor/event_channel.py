"""Event channels: the hypervisor's doorbells (public/event_channel.h).

An event channel is a pair of ports, one in each of two domains.  Sending on one
end sets the *pending* flag of the other end in the remote domain's shared_info
page and, unless the port is masked or an upcall is already outstanding, pushes
an upcall.  A notification carries no data: data lives in shared rings, and the
event only says "look".  Ports are also how the hypervisor raises virtual IRQs
(VIRQ_DOM_EXC tells dom0 that some domain changed state).

Operations (EVTCHNOP_*): alloc_unbound, bind_interdomain, bind_virq, send,
close, status, unmask, and `line` (ours: see below).  Port 0 is never handed
out, as in Xen.  `send` also
has a fast path, the doorbell: a domain sets send-request bytes in its
shared_info and writes an eventfd; `doorbell` serves them with the same checks
(see ipc/event_abi.py for why it exists).

Lines: sending without this process at all
    In Xen a send runs hypervisor code on the sender's own vCPU; nothing
    else has to be scheduled before the receiver is woken.  Here the
    hypervisor is a process, and relaying a notification costs a wake-up of
    it between the two domains: half of every event-channel round trip.  So
    each port can have a *line*, a pipe the hypervisor makes: its read end is
    the right to be woken on that port, its write end the right to wake it.
    The owner gets both ends (the write end to forward what the hypervisor
    raised through shared_info, so that one descriptor wakes it), and the
    domain bound to it, its write end only: the kernel's pipe then carries
    the notification straight from one domain to the other.  The hypervisor
    hands a write end out only where it would accept the send itself, when
    it binds the channel or when the owner of a bound port asks (`line`),
    so the check is made once, at binding, not per send: the pipe is a
    capability.

    Where this differs from Xen: a capability cannot be taken back.  A
    domain that closed its end still holds the peer port's write end and may
    poke that port until its owner closes it (the pipe then has no reader,
    and writes fail); a spurious notification, which every ring absorbs.  A
    write end can only write: a holder cannot swallow the owner's events.
    And a line does not look at the port's mask: masking governs only what
    this process raises (nothing here masks a bound port).

Invariants kept here:
- a domain sends only on ports it owns, and only to the peer it bound (a
  line's write end is handed out under the same rule);
- a port is bound interdomain only if the remote end was allocated for this
  caller (alloc_unbound's remote_dom), so nobody can attach to a port meant for
  someone else;
- when a domain dies every one of its ports closes; each interdomain peer goes
  back to unbound and is notified, so it learns at once that its partner is
  gone (Xen leaves the peer to notice through XenStore; we also ring the bell);
- a domain has at most `max_ports` ports: the next allocation gets ENOSPC.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ipc.channel import HypercallError
from ipc.event_abi import (DOMID_SELF, EVTCHNSTAT_closed, EVTCHNSTAT_interdomain,
                           EVTCHNSTAT_unbound, EVTCHNSTAT_virq, NR_EVENT_CHANNELS,
                           NR_VIRQS, VIRQ_CONSOLE, VIRQ_DOM_EXC)

if TYPE_CHECKING:
    from hypervisor.broker import Hypervisor
    from hypervisor.domain import Domain

GLOBAL_VIRQS = {VIRQ_DOM_EXC, VIRQ_CONSOLE}  # bound only by privileged domains


@dataclass
class Port:
    state: int
    remote_dom: int = -1     # unbound: who may bind; interdomain: the peer
    remote_port: int = 0
    virq: int = -1
    line: tuple[int, int] | None = None   # (read end, write end), made when first asked for

    def ends(self) -> tuple[int, int]:
        """The port's line, made now if it has none."""
        if self.line is None:
            self.line = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        return self.line

    def cut_line(self) -> None:
        if self.line is not None:
            for fd in self.line:
                os.close(fd)
            self.line = None


class PortTable:
    """One domain's ports."""

    def __init__(self, max_ports: int = NR_EVENT_CHANNELS) -> None:
        self.max_ports = max(2, min(max_ports, NR_EVENT_CHANNELS))
        self.ports: dict[int, Port] = {}
        self.virqs: dict[int, int] = {}   # virq -> port

    def allocate(self, port: Port) -> int:
        for p in range(1, self.max_ports):
            if p not in self.ports:
                self.ports[p] = port
                return p
        raise HypercallError(errno.ENOSPC, f"all {self.max_ports - 1} event-channel ports in use")

    def get(self, port: Any) -> Port:
        if not isinstance(port, int) or port not in self.ports:
            raise HypercallError(errno.EINVAL, f"port {port!r} is not allocated")
        return self.ports[port]


def _resolve(hv: "Hypervisor", caller: "Domain", domid: Any, what: str) -> "Domain":
    if domid == DOMID_SELF or domid is None:
        return caller
    if not isinstance(domid, int):
        raise HypercallError(errno.EINVAL, f"{what}: domid must be an integer")
    hv.policy.require_control(caller, domid, what)
    dom = hv.domains.get(domid)
    if dom is None or not dom.alive:
        raise HypercallError(errno.ESRCH, f"{what}: no domain {domid}")
    return dom


def alloc_unbound(hv: "Hypervisor", caller: "Domain", args: dict) -> dict:
    """Allocate a port in `dom` (usually self) that `remote_dom` may later bind."""
    dom = _resolve(hv, caller, args.get("dom", DOMID_SELF), "alloc_unbound")
    remote = args.get("remote_dom")
    if remote == DOMID_SELF:
        remote = caller.domid
    if not isinstance(remote, int) or not 0 <= remote < DOMID_SELF:
        raise HypercallError(errno.EINVAL, "alloc_unbound: remote_dom must be a domid")
    port = hv.evtchn[dom.domid].allocate(Port(EVTCHNSTAT_unbound, remote_dom=remote))
    dom.shared_info.reset_port(port)
    if dom is not caller:
        return {"port": port}     # the toolstack builds a guest: the owner asks for its line
    return _with_line(hv, caller, port)


def bind_interdomain(hv: "Hypervisor", caller: "Domain", args: dict) -> dict:
    """Connect a new local port to `remote_port`, an unbound port the remote made for us."""
    remote_dom, remote_port = args.get("remote_dom"), args.get("remote_port")
    if remote_dom == DOMID_SELF:
        remote_dom = caller.domid
    remote = hv.domains.get(remote_dom) if isinstance(remote_dom, int) else None
    if remote is None or not remote.alive:
        raise HypercallError(errno.ESRCH, f"bind_interdomain: no domain {remote_dom!r}")
    rport = hv.evtchn[remote.domid].get(remote_port)
    if rport.state != EVTCHNSTAT_unbound or rport.remote_dom != caller.domid:
        raise HypercallError(
            errno.EINVAL,
            f"bind_interdomain: port {remote_port} of domain {remote.domid} "
            f"is not waiting for domain {caller.domid}")
    table = hv.evtchn[caller.domid]
    local = table.allocate(Port(EVTCHNSTAT_interdomain, remote.domid, remote_port))
    caller.shared_info.reset_port(local)
    rport.state, rport.remote_port = EVTCHNSTAT_interdomain, local
    # Xen raises the local port once bound, so neither side can miss an early send.
    _raise(hv, caller, local)
    return _with_line(hv, caller, local, {"local_port": local})


def bind_virq(hv: "Hypervisor", caller: "Domain", args: dict) -> dict:
    virq = args.get("virq")
    if not isinstance(virq, int) or not 0 <= virq < NR_VIRQS:
        raise HypercallError(errno.EINVAL, f"bind_virq: no such virq {virq!r}")
    if virq in GLOBAL_VIRQS:
        hv.policy.require_privileged(caller, f"bind_virq {virq}")
    table = hv.evtchn[caller.domid]
    if virq in table.virqs:
        raise HypercallError(errno.EEXIST, f"bind_virq: virq {virq} already bound")
    port = table.allocate(Port(EVTCHNSTAT_virq, virq=virq))
    caller.shared_info.reset_port(port)
    table.virqs[virq] = port
    return _with_line(hv, caller, port)


def line(hv: "Hypervisor", caller: "Domain", args: dict) -> Any:
    """A port's line for its owner: both ends, and the peer port's write end
    if the port is bound interdomain (``send`` says whether it came)."""
    portno = args.get("port")
    hv.evtchn[caller.domid].get(portno)
    return _with_line(hv, caller, portno)


def _with_line(hv: "Hypervisor", caller: "Domain", portno: int,
               result: dict | None = None) -> Any:
    """``result`` (by default ``{"port": portno}``) with the port's line attached:
    descriptors [read end, write end] and, for a bound port, the peer's write end."""
    from hypervisor.broker import WithFds
    port = hv.evtchn[caller.domid].ports[portno]
    fds = list(port.ends())
    peer = _peer_port(hv, port)
    if peer is not None:
        fds.append(peer.ends()[1])
    out = dict(result) if result is not None else {"port": portno}
    out["send"] = peer is not None
    return WithFds(out, fds)


def _peer_port(hv: "Hypervisor", port: Port) -> Port | None:
    """The live far end of an interdomain port, if there is one."""
    if port.state != EVTCHNSTAT_interdomain:
        return None
    peer = hv.domains.get(port.remote_dom)
    table = hv.evtchn.get(port.remote_dom)
    if peer is None or not peer.alive or table is None:
        return None
    return table.ports.get(port.remote_port)


def send(hv: "Hypervisor", caller: "Domain", args: dict) -> None:
    port = hv.evtchn[caller.domid].get(args.get("port"))
    if port.state == EVTCHNSTAT_interdomain:
        peer = hv.domains.get(port.remote_dom)
        if peer is not None and peer.alive:
            _raise(hv, peer, port.remote_port)
    elif port.state != EVTCHNSTAT_unbound:   # sending on an unbound port is a no-op in Xen
        raise HypercallError(errno.EINVAL, f"send: port {args.get('port')} cannot be sent on")


def doorbell(hv: "Hypervisor", caller: "Domain") -> None:
    """The domain rang its doorbell: perform every send it has requested.

    Each request is an EVTCHNOP_send with nobody waiting for the answer, so a
    refused one is logged (xl dmesg) rather than returned.
    """
    table = hv.evtchn.get(caller.domid)
    if table is None or not caller.alive:
        return
    for port in caller.shared_info.take_send_requests(table.max_ports):
        try:
            send(hv, caller, {"port": port})
        except HypercallError as exc:
            hv.conring.printk(f"d{caller.domid}: event send refused: {exc}")


def close(hv: "Hypervisor", caller: "Domain", args: dict) -> None:
    close_port(hv, caller, args.get("port"), notify_peer=False)


def close_port(hv: "Hypervisor", dom: "Domain", portno: Any, notify_peer: bool) -> None:
    table = hv.evtchn[dom.domid]
    port = table.get(portno)
    if port.state == EVTCHNSTAT_interdomain:
        peer = hv.domains.get(port.remote_dom)
        ptable = hv.evtchn.get(port.remote_dom)
        if peer is not None and ptable is not None and port.remote_port in ptable.ports:
            pport = ptable.ports[port.remote_port]
            pport.state, pport.remote_dom, pport.remote_port = EVTCHNSTAT_unbound, dom.domid, 0
            if notify_peer and peer.alive:
                _raise(hv, peer, port.remote_port)
    elif port.state == EVTCHNSTAT_virq:
        table.virqs.pop(port.virq, None)
    port.cut_line()
    del table.ports[portno]


def status(hv: "Hypervisor", caller: "Domain", args: dict) -> dict:
    dom = _resolve(hv, caller, args.get("dom", DOMID_SELF), "evtchn status")
    portno = args.get("port")
    port = hv.evtchn[dom.domid].ports.get(portno) if isinstance(portno, int) else None
    if port is None:
        return {"status": EVTCHNSTAT_closed}
    out: dict[str, Any] = {"status": port.state}
    if port.state in (EVTCHNSTAT_unbound, EVTCHNSTAT_interdomain):
        out["remote_dom"] = port.remote_dom
    if port.state == EVTCHNSTAT_interdomain:
        out["remote_port"] = port.remote_port
    if port.state == EVTCHNSTAT_virq:
        out["virq"] = port.virq
    return out


def unmask(hv: "Hypervisor", caller: "Domain", args: dict) -> None:
    """Clear the mask and, if an event arrived while masked, deliver it now."""
    portno = args.get("port")
    hv.evtchn[caller.domid].get(portno)
    caller.shared_info.set_mask(portno, False)
    if caller.shared_info.is_pending(portno):
        _raise(hv, caller, portno)


def _raise(hv: "Hypervisor", dom: "Domain", port: int) -> None:
    if dom.shared_info.set_pending(port):
        hv.upcall(dom)


def send_virq(hv: "Hypervisor", virq: int) -> None:
    """Raise a global VIRQ in every domain that bound it (in practice, dom0)."""
    for domid, table in hv.evtchn.items():
        port = table.virqs.get(virq)
        dom = hv.domains.get(domid)
        if port is not None and dom is not None and dom.alive:
            _raise(hv, dom, port)


def domain_gone(hv: "Hypervisor", dom: "Domain") -> None:
    """Close every port of a dead domain and tell each peer."""
    table = hv.evtchn.get(dom.domid)
    if table is None:
        return
    for portno in list(table.ports):
        close_port(hv, dom, portno, notify_peer=True)


OPS = {
    "alloc_unbound": alloc_unbound,
    "bind_interdomain": bind_interdomain,
    "bind_virq": bind_virq,
    "send": send,
    "close": close,
    "status": status,
    "unmask": unmask,
    "line": line,
}
