"""Domains: the hypervisor's table of who exists and in what state.

In Xen, `struct domain` is the hypervisor's record of a guest: its id, its
memory, its event channels and grant table, its vCPUs and its run state.  Here
each domain is also an OS process that the domain builder forked; the record
holds its pid and a pidfd, so that the moment the process dies, for whatever
reason, the hypervisor's poll loop sees it.

Life of a domain (Xen's, mapped):

    createdomain  -> built, *paused*: the process exists, but its boot
                     hypercall is not answered until the toolstack unpauses it
    unpause       -> running (the OS says whether it is on a CPU: r, or blocked: b)
    pause         -> SIGSTOP; unpause -> SIGCONT
    SCHEDOP_shutdown(reason) or the process dying
                  -> shutdown (s) or crashed (c); VIRQ_DOM_EXC tells dom0, whose
                     toolstack applies on_poweroff / on_reboot / on_crash
    destroydomain -> dying (d): process killed, ports closed, grants released;
                     the record goes away once no other domain maps its pages

The run-state letters are xl's: r b p s c d.
"""

from __future__ import annotations

import os
import socket
import time
import uuid as uuidlib
from dataclasses import dataclass, field
from typing import Any

from ipc.event_abi import SharedInfo
from ipc.sched_abi import SHUTDOWN_crash

DOMID_FIRST_GUEST = 1
DOMID_MAX = 0x7FEF  # DOMID_FIRST_RESERVED - 1


@dataclass
class Domain:
    domid: int
    name: str
    uuid: str
    kernel: str
    vcpus: int
    privileged: bool
    secret: bytes
    shared_info_fd: int
    shared_info: SharedInfo
    pid: int = 0
    pidfd: int = -1
    fdsock: socket.socket | None = None     # our end of the page-descriptor socketpair
    upcall_fd: int = -1                      # the domain's "interrupt line": an eventfd
    doorbell_fd: int = -1                    # its event-send doorbell: an eventfd it writes
    routing_id: bytes | None = None          # the ZeroMQ connection bound to this domid
    created: float = field(default_factory=time.monotonic)
    paused_by_toolstack: bool = False
    booted: bool = False                     # the toolstack has unpaused it for the first time
    boot_req: int | None = None              # the boot hypercall we are holding
    shutdown_reason: int | None = None       # SHUTDOWN_* once shut down or crashed
    process_gone: bool = False
    dying: bool = False
    start_info: dict[str, Any] = field(default_factory=dict)
    cpu_affinity: list[int] | None = None
    online_vcpus: int = 0
    extra_cpu_time: float = 0.0              # CPU time of a process already gone

    @property
    def alive(self) -> bool:
        return not self.process_gone and not self.dying

    def run_state(self) -> str:
        """xl's six state letters, with the five not in the state shown as '-'."""
        letters = ["-"] * 6
        if self.dying:
            letters[5] = "d"
        elif self.shutdown_reason == SHUTDOWN_crash:
            letters[4] = "c"
        elif self.shutdown_reason is not None:
            letters[3] = "s"
        elif not self.booted or self.paused_by_toolstack:
            letters[2] = "p"
        elif _proc_state(self.pid) == "R":
            letters[0] = "r"
        else:
            letters[1] = "b"
        return "".join(letters)

    def cpu_time(self) -> float:
        """Seconds of CPU the domain's process has used, as the OS counts it."""
        if self.process_gone or not self.pid:
            return self.extra_cpu_time
        return _proc_cpu_seconds(self.pid) or self.extra_cpu_time


def new_uuid(given: str | None) -> str:
    return str(uuidlib.UUID(given)) if given else str(uuidlib.uuid4())


class DomainTable:
    def __init__(self) -> None:
        self.by_id: dict[int, Domain] = {}
        self._next = DOMID_FIRST_GUEST

    def allocate_domid(self) -> int:
        """Xen hands out domids in increasing order and does not reuse them soon."""
        for _ in range(DOMID_MAX):
            domid = self._next
            self._next = DOMID_FIRST_GUEST if self._next >= DOMID_MAX else self._next + 1
            if domid not in self.by_id:
                return domid
        raise RuntimeError("no free domid")

    def add(self, dom: Domain) -> None:
        self.by_id[dom.domid] = dom

    def get(self, domid: int) -> Domain | None:
        return self.by_id.get(domid)

    def remove(self, domid: int) -> None:
        self.by_id.pop(domid, None)

    def by_name(self, name: str) -> Domain | None:
        for dom in self.by_id.values():
            if dom.name == name and not dom.dying:
                return dom
        return None

    def __iter__(self):
        return iter(sorted(self.by_id.values(), key=lambda d: d.domid))


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _proc_stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode()
    except OSError:
        return None
    # the command name is in parentheses and may hold spaces; split after it
    return data[data.rfind(")") + 2:].split()


def _proc_state(pid: int) -> str:
    fields = _proc_stat_fields(pid)
    return fields[0] if fields else "X"


def _proc_cpu_seconds(pid: int) -> float:
    fields = _proc_stat_fields(pid)
    if not fields:
        return 0.0
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / _CLK_TCK


# --- lifecycle (what xen/common/domain.c does) -------------------------------

def create_domain(hv, *, name: str, kernel: str, memory_pages: int, max_pages: int,
                  vcpus: int, privileged: bool, uuid: str | None, max_ports: int,
                  grant_frames: int, maptrack: int, cmdline: str,
                  domid: int | None = None) -> Domain:
    """Build a domain, paused.  Either everything is made or nothing is left."""
    import secrets
    from hypervisor.event_channel import PortTable
    from hypervisor.grant_table import GrantTable
    from ipc.page import map_frame, new_frame

    if domid is None:
        domid = hv.domains.allocate_domid()
    hv.memory.reserve(domid, memory_pages, max_pages)   # ENOMEM before anything else exists
    made: list = []
    try:
        si_fd = new_frame(f"shared-info-d{domid}")
        made.append(lambda: os.close(si_fd))
        shared_info = SharedInfo(map_frame(si_fd))
        made.append(shared_info.close)
        grants = GrantTable.create(domid, grant_frames, maptrack)
        made.append(grants.close)
        upcall_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        made.append(lambda: os.close(upcall_fd))
        doorbell_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        made.append(lambda: os.close(doorbell_fd))
        dom = Domain(domid=domid, name=name, uuid=new_uuid(uuid), kernel=kernel,
                     vcpus=vcpus, online_vcpus=vcpus, privileged=privileged,
                     secret=secrets.token_bytes(32), shared_info_fd=si_fd,
                     shared_info=shared_info, upcall_fd=upcall_fd, doorbell_fd=doorbell_fd)
        dom.start_info = {"cmdline": cmdline}
        hv.evtchn[domid] = PortTable(max_ports)
        hv.grants[domid] = grants
        hv.domains.add(dom)
        made.append(lambda: _forget(hv, domid))
        dom.pid, dom.pidfd, dom.fdsock = hv.builder.spawn(
            domid=domid, name=name, kernel=kernel, secret=dom.secret,
            shared_info_fd=si_fd, grant_table_fd=grants.fd, upcall_fd=upcall_fd,
            doorbell_fd=doorbell_fd, grant_frames=grant_frames)
    except BaseException:
        for undo in reversed(made):
            undo()
        hv.memory.forget(domid)
        raise
    hv.watch_process(dom)
    hv.conring.printk(f"d{domid}: created '{name}' kernel={kernel} pid={dom.pid} "
                      f"memory={memory_pages // 256}MiB vcpus={vcpus}")
    return dom


def _forget(hv, domid: int) -> None:
    hv.domains.remove(domid)
    hv.evtchn.pop(domid, None)
    hv.grants.pop(domid, None)


def domain_shutdown(hv, dom: Domain, reason: int) -> None:
    """Record a shutdown (or crash) once and tell dom0 through VIRQ_DOM_EXC."""
    from hypervisor.event_channel import send_virq
    from ipc.event_abi import VIRQ_DOM_EXC
    from ipc.sched_abi import REASON_NAMES
    if dom.shutdown_reason is not None or dom.dying:
        return
    dom.shutdown_reason = reason
    hv.conring.printk(f"d{dom.domid}: shutdown, reason {REASON_NAMES.get(reason, reason)}")
    send_virq(hv, VIRQ_DOM_EXC)


def domain_died(hv, dom: Domain) -> None:
    """The process is gone.  Release what it held; if it had not shut down, it crashed."""
    from hypervisor import event_channel, grant_table
    from ipc.sched_abi import SHUTDOWN_crash
    if dom.process_gone:
        return
    dom.extra_cpu_time = _proc_cpu_seconds(dom.pid) or dom.extra_cpu_time
    dom.process_gone = True
    hv.unwatch_process(dom)
    try:   # orphaned domains (zygote gone) are our children: reap them
        os.waitpid(dom.pid, os.WNOHANG)
    except ChildProcessError:
        pass
    dom.routing_id = None
    event_channel.domain_gone(hv, dom)
    grant_table.mapper_gone(hv, dom.domid)
    if dom.shutdown_reason is None:
        hv.conring.printk(f"d{dom.domid}: process {dom.pid} died: domain crashed")
    domain_shutdown(hv, dom, SHUTDOWN_crash)
    if dom.domid == 0:
        hv.dom0_died()


def destroy_domain(hv, dom: Domain) -> None:
    """Kill the process, release everything; the record goes once no page of it is mapped."""
    import signal
    from hypervisor.event_channel import send_virq
    from ipc.event_abi import VIRQ_DOM_EXC
    if dom.dying:
        return
    if not dom.process_gone:
        if dom.shutdown_reason is None:
            dom.shutdown_reason = 0   # destroyed, not crashed: no crash action wanted
        _kill_and_wait(dom, signal.SIGKILL)
        domain_died(hv, dom)
    dom.dying = True
    held = hv.memory.release_all(dom.domid)
    if dom.fdsock is not None:
        dom.fdsock.close()
        dom.fdsock = None
    for line in ("upcall_fd", "doorbell_fd"):
        if getattr(dom, line) >= 0:
            os.close(getattr(dom, line))
            setattr(dom, line, -1)
    hv.conring.printk(f"d{dom.domid}: destroyed"
                      + (f", {len(held)} pages still mapped by other domains" if held else ""))
    if not held:
        reap_domain(hv, dom)
    send_virq(hv, VIRQ_DOM_EXC)


def reap_domain(hv, dom: Domain) -> None:
    """Drop the record of a dying domain whose pages are all gone."""
    grants = hv.grants.get(dom.domid)
    if grants is not None:
        grants.close()
    dom.shared_info.close()
    os.close(dom.shared_info_fd)
    hv.memory.forget(dom.domid)
    _forget(hv, dom.domid)


def _kill_and_wait(dom: Domain, sig: int, timeout: float = 2.0) -> None:
    import select
    try:
        os.kill(dom.pid, sig)   # a SIGSTOPped (paused) process dies of SIGKILL too
    except ProcessLookupError:
        return
    if dom.pidfd >= 0:
        select.select([dom.pidfd], [], [], timeout)


def pause_domain(dom: Domain) -> None:
    import signal
    dom.paused_by_toolstack = True
    if dom.booted and not dom.process_gone:
        os.kill(dom.pid, signal.SIGSTOP)


def unpause_domain(hv, dom: Domain) -> None:
    """Resume a paused domain; the first unpause lets it boot."""
    import signal
    dom.paused_by_toolstack = False
    if not dom.booted:
        dom.booted = True
        hv.release_boot(dom)
    elif not dom.process_gone:
        os.kill(dom.pid, signal.SIGCONT)
