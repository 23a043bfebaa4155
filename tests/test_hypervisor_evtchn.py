"""Event channels against a real hypervisor: every EVTCHNOP, and every refusal.

Each guest is a real process running the puppet kernel; the test makes it issue
exact hypercalls.  What is checked is what public/event_channel.h promises:
a port pair connects only the two domains it was made for, a send sets the
peer's pending bit (and coalesces), and a dead domain's peers are left unbound.
"""

from __future__ import annotations

import errno
import itertools

import pytest

from ipc.event_abi import (EVTCHNSTAT_closed, EVTCHNSTAT_interdomain, EVTCHNSTAT_unbound,
                           EVTCHNSTAT_virq, VIRQ_CONSOLE, VIRQ_DOM_EXC, VIRQ_TIMER)
from tests.hvharness import PuppetError, proc_state, wait_for

_names = itertools.count()


def guest(h, **extra):
    return h.create(f"ev{next(_names)}", **extra)


def evtchn(caller, cmd: str, /, **args):
    return caller.hypercall("event_channel_op", cmd, **args)


def refused(expected_errno: int, fn, /, *args, **kw) -> PuppetError:
    with pytest.raises(PuppetError) as info:
        fn(*args, **kw)
    assert info.value.errno == expected_errno, str(info.value)
    return info.value


def connect(h):
    """Two guests joined by an interdomain channel: (a, port in a, b, port in b)."""
    a, b = guest(h), guest(h)
    pa = a.do("alloc_unbound", remote_dom=b.domid)
    pb = b.do("bind_interdomain", remote_dom=a.domid, remote_port=pa)
    return a, pa, b, pb


def test_alloc_unbound_then_bind_interdomain_joins_exactly_two_ports(shared_hv):
    a, b = guest(shared_hv), guest(shared_hv)
    pa = a.do("alloc_unbound", remote_dom=b.domid)
    assert pa > 0   # port 0 is never handed out
    assert evtchn(a, "status", port=pa) == {"status": EVTCHNSTAT_unbound, "remote_dom": b.domid}
    pb = b.do("bind_interdomain", remote_dom=a.domid, remote_port=pa)
    assert evtchn(a, "status", port=pa) == {"status": EVTCHNSTAT_interdomain,
                                            "remote_dom": b.domid, "remote_port": pb}
    assert evtchn(b, "status", port=pb) == {"status": EVTCHNSTAT_interdomain,
                                            "remote_dom": a.domid, "remote_port": pa}
    assert shared_hv.info(a.domid)["evtchn_ports"] == 1


def test_send_rings_the_peer_in_both_directions(shared_hv):
    a, pa, b, pb = connect(shared_hv)
    a.do("notify", port=pa)
    assert b.do("wait", port=pb) is True
    b.do("notify", port=pb)
    assert a.do("wait", port=pa) is True


def test_sends_while_the_receiver_is_paused_coalesce_into_one_upcall(shared_hv):
    h = shared_hv
    a, pa, b, pb = connect(h)
    before = a.do("fire_count", port=pa)
    pid = h.info(a.domid)["pid"]
    h.dom0.hypercall("domctl", "pausedomain", domid=a.domid)
    wait_for(lambda: proc_state(pid) == "T", what="the receiver to stop")
    for _ in range(50):
        b.do("notify", port=pb)
    h.dom0.hypercall("domctl", "unpausedomain", domid=a.domid)
    after = a.do("fire_count", port=pa)
    assert after["upcalls"] == before["upcalls"] + 1
    assert after["fires"] == before["fires"] + 1
    assert a.do("pending", port=pa) is False


def test_masked_port_stays_pending_until_unmask_delivers_it_once(shared_hv):
    a, pa, b, pb = connect(shared_hv)
    before = a.do("fire_count", port=pa)
    a.do("mask", port=pa)
    for _ in range(5):
        b.do("notify", port=pb)
    assert a.do("pending", port=pa) is True
    assert a.do("fire_count", port=pa) == before   # masked: no upcall at all
    evtchn(a, "unmask", port=pa)
    after = a.do("fire_count", port=pa)
    assert after == {"upcalls": before["upcalls"] + 1, "fires": before["fires"] + 1}
    assert a.do("pending", port=pa) is False
    refused(errno.EINVAL, evtchn, a, "unmask", port=999)


def test_close_returns_the_peer_to_unbound(shared_hv):
    a, pa, b, pb = connect(shared_hv)
    evtchn(a, "close", port=pa)
    assert evtchn(a, "status", port=pa) == {"status": EVTCHNSTAT_closed}
    assert evtchn(b, "status", port=pb) == {"status": EVTCHNSTAT_unbound, "remote_dom": a.domid}
    evtchn(b, "send", port=pb)   # sending on an unbound port is a no-op, as in Xen
    refused(errno.EINVAL, evtchn, a, "send", port=pa)
    refused(errno.EINVAL, evtchn, a, "close", port=pa)


def test_sending_on_a_port_the_caller_does_not_own_is_refused(shared_hv):
    a, pa, b, pb = connect(shared_hv)
    c = guest(shared_hv)
    before = a.do("fire_count", port=pa)
    for port in (pb, pa, 0, -1, 5000, "1", None):
        refused(errno.EINVAL, evtchn, c, "send", port=port)
    assert a.do("fire_count", port=pa) == before   # nothing reached the real owner


def test_a_send_without_an_answer_rings_the_peer_as_the_hypercall_does(shared_hv):
    a, pa, b, pb = connect(shared_hv)
    a.do("notify_nowait", port=pa)         # by the doorbell: a's line has no send end yet
    assert b.do("wait", port=pb) is True
    b.do("notify_nowait", port=pb)         # down b's line: binding gave it a's write end
    assert a.do("wait", port=pa) is True
    assert a.do("send_requests") == [] and b.do("send_requests") == []   # each one served


def _with_lines(h):
    """Two connected guests whose ports both hold a whole line."""
    a, pa, b, pb = connect(h)
    assert b.do("lines", port=pb) == {"recv": True, "send": True}   # given at binding
    assert a.do("lines", port=pa) == {"recv": True, "send": False}  # unbound when made
    a.do("notify_nowait", port=pa)         # the doorbell rings, and the line is asked for
    assert b.do("wait", port=pb) is True
    wait_for(lambda: a.do("lines", port=pa)["send"], what="a's send end")
    return a, pa, b, pb


def test_a_bound_port_rings_its_peer_down_its_line_while_the_hypervisor_is_stopped(shared_hv):
    """Once the hypervisor has handed out the line, a notification needs no
    hypervisor process at all: it arrives with the hypervisor SIGSTOPped."""
    import os
    import signal
    h = shared_hv
    a, pa, b, pb = _with_lines(h)
    os.kill(h.proc.pid, signal.SIGSTOP)
    try:
        wait_for(lambda: proc_state(h.proc.pid) == "T", what="the hypervisor to stop")
        a.do("notify_nowait", port=pa)
        assert b.do("wait", port=pb, timeout=2) is True
        b.do("notify_nowait", port=pb)
        assert a.do("wait", port=pa, timeout=2) is True
    finally:
        os.kill(h.proc.pid, signal.SIGCONT)
    assert a.do("send_requests") == [] and b.do("send_requests") == []   # no doorbell used


def test_the_hypervisor_hands_out_a_send_end_only_for_a_bound_port(shared_hv):
    a, b, c = guest(shared_hv), guest(shared_hv), guest(shared_hv)
    pa = a.do("alloc_unbound", remote_dom=b.domid)
    got = a.do("hypercall", hypercall="event_channel_op", cmd="line", args={"port": pa})
    assert got == {"port": pa, "send": False}   # nobody bound yet: nothing to ring
    for port in (pa, 0, 999, "x"):              # c holds no port: no line of any kind
        refused(errno.EINVAL, evtchn, c, "line", port=port)


def test_a_line_to_a_closed_port_falls_back_to_the_hypervisor_which_refuses_nothing(shared_hv):
    """b closes its port: a's write end has no reader left, so a's next send
    goes by the doorbell, where a send on an unbound port is a no-op."""
    h = shared_hv
    a, pa, b, pb = _with_lines(h)
    b.do("close_port", port=pb)
    assert evtchn(a, "status", port=pa) == {"status": EVTCHNSTAT_unbound, "remote_dom": b.domid}
    a.do("notify_nowait", port=pa)
    wait_for(lambda: not a.do("lines", port=pa)["send"], what="a to drop the dead end")
    wait_for(lambda: a.do("send_requests") == [], what="the doorbell to be served")
    assert not any(f"d{a.domid}: event send refused" in line for line in h.dmesg())


def test_a_port_requested_many_times_before_a_ring_is_sent_once(shared_hv):
    a, pa, b, pb = connect(shared_hv)
    before = a.do("fire_count", port=pa)
    b.do("doorbell_raw", ports=[pb, pb, pb])   # one byte, however often it is set
    assert a.do("wait", port=pa) is True
    assert a.do("fire_count", port=pa)["fires"] == before["fires"] + 1


def test_doorbell_requests_for_ports_the_caller_does_not_hold_are_refused_and_logged(shared_hv):
    """A hostile domain may set any request byte: each is checked as the
    hypercall would be, refused ones reach nobody, and the hypervisor goes on."""
    h = shared_hv
    a, pa, b, pb = connect(h)
    c = guest(h, max_evtchn_port=4)            # holds no port at all
    before_a, before_b = a.do("fire_count", port=pa), b.do("fire_count", port=pb)
    c.do("doorbell_raw", ports=[0, 1, 3, pa, pb, 4, 1023])
    wait_for(lambda: sum("event send refused" in line and f"d{c.domid}:" in line
                         for line in h.dmesg()) >= 3, what="the refusals in the log")
    # Ports at or past its limit are never looked at: the bytes stay, harmless.
    assert c.do("send_requests") == [4, 1023]
    assert a.do("fire_count", port=pa) == before_a
    assert b.do("fire_count", port=pb) == before_b
    a.do("notify_nowait", port=pa)             # everybody is still served
    assert b.do("wait", port=pb) is True
    assert evtchn(c, "status", port=1) == {"status": EVTCHNSTAT_closed}


def test_binding_a_port_meant_for_another_domain_is_refused(shared_hv):
    h = shared_hv
    a, b, c = guest(h), guest(h), guest(h)
    pa = a.do("alloc_unbound", remote_dom=b.domid)
    refused(errno.EINVAL, evtchn, c, "bind_interdomain", remote_dom=a.domid, remote_port=pa)
    assert evtchn(a, "status", port=pa)["status"] == EVTCHNSTAT_unbound
    pb = b.do("bind_interdomain", remote_dom=a.domid, remote_port=pa)
    # once bound, nobody else can take it over, not even the intended peer again
    refused(errno.EINVAL, evtchn, c, "bind_interdomain", remote_dom=a.domid, remote_port=pa)
    refused(errno.EINVAL, evtchn, b, "bind_interdomain", remote_dom=a.domid, remote_port=pa)
    assert evtchn(a, "status", port=pa)["remote_port"] == pb
    refused(errno.EINVAL, evtchn, c, "bind_interdomain", remote_dom=a.domid, remote_port=777)
    refused(errno.ESRCH, evtchn, c, "bind_interdomain", remote_dom=4000, remote_port=1)
    refused(errno.ESRCH, evtchn, c, "bind_interdomain", remote_dom="0", remote_port=1)


def test_alloc_unbound_for_another_domain_needs_privilege(shared_hv):
    h = shared_hv
    a, b = guest(h), guest(h)
    refused(errno.EPERM, evtchn, b, "alloc_unbound", dom=a.domid, remote_dom=b.domid)
    refused(errno.EINVAL, evtchn, a, "alloc_unbound", remote_dom=-1)
    refused(errno.EINVAL, evtchn, a, "alloc_unbound", remote_dom="b")
    assert shared_hv.info(a.domid)["evtchn_ports"] == 0
    # the toolstack makes a guest's xenstore/console ports this way
    port = evtchn(h.dom0, "alloc_unbound", dom=a.domid, remote_dom=b.domid)["port"]
    pb = b.do("bind_interdomain", remote_dom=a.domid, remote_port=port)
    assert evtchn(a, "status", port=port)["remote_port"] == pb


def test_status_of_another_domains_port_needs_privilege(shared_hv):
    a, pa, b, pb = connect(shared_hv)
    refused(errno.EPERM, evtchn, b, "status", dom=a.domid, port=pa)
    assert evtchn(shared_hv.dom0, "status", dom=a.domid, port=pa)["status"] == EVTCHNSTAT_interdomain


def test_exhausting_ports_gives_enospc_and_changes_nothing(shared_hv):
    h = shared_hv
    small = guest(h, max_evtchn_port=4)   # ports 1..3
    other = guest(h)
    ports = [small.do("alloc_unbound", remote_dom=other.domid) for _ in range(3)]
    assert ports == [1, 2, 3]
    refused(errno.ENOSPC, small.do, "alloc_unbound", remote_dom=other.domid)
    po = other.do("alloc_unbound", remote_dom=small.domid)
    refused(errno.ENOSPC, small.do, "bind_interdomain", remote_dom=other.domid, remote_port=po)
    assert evtchn(other, "status", port=po)["status"] == EVTCHNSTAT_unbound
    evtchn(small, "close", port=2)
    assert small.do("bind_interdomain", remote_dom=other.domid, remote_port=po) == 2


def test_bind_virq(shared_hv):
    g = guest(shared_hv)
    refused(errno.EPERM, g.do, "bind_virq", virq=VIRQ_DOM_EXC)   # global: dom0's business
    refused(errno.EPERM, g.do, "bind_virq", virq=VIRQ_CONSOLE)
    port = g.do("bind_virq", virq=VIRQ_TIMER)
    assert evtchn(g, "status", port=port) == {"status": EVTCHNSTAT_virq, "virq": VIRQ_TIMER}
    refused(errno.EEXIST, g.do, "bind_virq", virq=VIRQ_TIMER)
    for bad in (-1, 24, 99, "3"):
        refused(errno.EINVAL, g.do, "bind_virq", virq=bad)


def test_virq_dom_exc_tells_dom0_of_a_state_change(shared_hv):
    h = shared_hv
    port = h.dom_exc_port()
    g = guest(h)
    before = h.dom0.do("fire_count", port=port)["fires"]
    g.hypercall("sched_op", "shutdown", reason=0)
    assert h.dom0.do("wait", port=port) is True
    assert h.dom0.do("fire_count", port=port)["fires"] > before


@pytest.mark.parametrize("death", ["crash", "destroy", "sigkill"])
def test_peers_of_a_dead_domain_are_told_and_left_unbound(shared_hv, death):
    h = shared_hv
    a, pa, b, pb = connect(h)
    before = b.do("fire_count", port=pb)["fires"]
    if death == "crash":
        with pytest.raises(ConnectionError):
            a.do("crash")
        h.wait_state(a.domid, "c")
    elif death == "destroy":
        h.destroy(a.domid)
    else:
        import os
        import signal
        os.kill(h.info(a.domid)["pid"], signal.SIGKILL)
        h.wait_state(a.domid, "c")
    assert evtchn(b, "status", port=pb) == {"status": EVTCHNSTAT_unbound, "remote_dom": a.domid}
    assert b.do("fire_count", port=pb)["fires"] == before + 1
    # the dead domain's port number cannot be reached or bound any more
    refused(errno.ESRCH, evtchn, b, "bind_interdomain", remote_dom=a.domid, remote_port=pa)


def test_a_domain_may_bind_a_port_to_itself(shared_hv):
    from ipc.event_abi import DOMID_SELF
    g = guest(shared_hv)
    p1 = g.do("alloc_unbound", remote_dom=DOMID_SELF)
    assert evtchn(g, "status", port=p1)["remote_dom"] == g.domid
    p2 = g.do("bind_interdomain", remote_dom=DOMID_SELF, remote_port=p1)
    before = g.do("fire_count", port=p1)["fires"]
    g.do("notify", port=p2)
    assert g.do("fire_count", port=p1)["fires"] == before + 1
    evtchn(g, "close", port=p2)
    assert evtchn(g, "status", port=p1) == {"status": EVTCHNSTAT_unbound, "remote_dom": g.domid}
