"""The hypervisor broker: one process, one poll loop, every hypercall.

This is the part of Xen that runs below every domain.  It owns the domain table,
event channels, grant tables and memory accounting, and it answers hypercalls.
It contains no device, disk, network, console or XenStore code: those live in
domains.

The loop is a plain synchronous `zmq.Poller` over:
- the hypercall ROUTER socket (every domain's DEALER connects here),
- the ZAP socket, where ZeroMQ asks us to authenticate each new connection,
- two lines per domain: a pidfd, readable the instant its process dies, and
  its doorbell, an eventfd it writes when it has event-channel sends for us,
- a signal wake-up socket (SIGTERM / SIGINT shut the system down).

Identity: ZAP maps a connection's PLAIN credentials (domid, per-domain secret)
to a User-Id, and ZeroMQ stamps that User-Id on every message from that
connection.  `_caller` reads it; nothing in a message body can change it.

A single thread means no locks: a hypercall runs to completion before the next
one starts, which is also what makes the grant and event-channel invariants easy
to see.  A handler that raises HypercallError answers with that errno; any other
exception is a hypervisor bug, logged with its traceback, and answered EFAULT
rather than taking the system down.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import signal
import socket
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import zmq

from hypervisor import (conring, domain, domctl, event_channel, grant_table, memory,
                        sched, sysctl)
from hypervisor.builder import Builder, become_subreaper
from hypervisor.domain import Domain, DomainTable
from hypervisor.xsm import DummyPolicy
from ipc import channel, fdpass, rundir
from ipc.channel import BadMessage, HypercallError

log = logging.getLogger("xen")
_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)   # plain ints: pyzmq's enum arithmetic is slow


@dataclass
class WithFds:
    """A hypercall result that hands the caller page descriptors as well."""
    result: Any
    fds: list[int]
    close_after: list[int] = field(default_factory=list)


Handler = Callable[["Hypervisor", Domain, dict], Any]


class Hypervisor:
    def __init__(self, run_dir: str, host_memory_mib: int, preload: list[str]) -> None:
        self.run_dir = run_dir
        self.sock_dir = os.path.join(run_dir, "hypervisor")
        os.makedirs(self.sock_dir, exist_ok=True)
        os.makedirs(os.path.join(run_dir, "logs"), exist_ok=True)
        self.endpoint = f"ipc://{self.sock_dir}/hypercall.sock"
        self.logfile = open(os.path.join(run_dir, "logs", "hypervisor.log"), "a", buffering=1)
        self.conring = conring.ConsoleRing(self.logfile)
        self.domains = DomainTable()
        self.memory = memory.HostMemory(host_memory_mib)
        self.evtchn: dict[int, event_channel.PortTable] = {}
        self.grants: dict[int, grant_table.GrantTable] = {}
        self.policy = DummyPolicy()
        self.running = True
        # The zygote must be forked before any ZeroMQ context exists.
        become_subreaper()
        self.builder = Builder(run_dir, preload, self.endpoint)
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.linger = 0
        self.router.sndhwm = self.router.rcvhwm = 100_000
        self.zap = self.ctx.socket(zmq.REP)
        self.zap.linger = 0
        self.zap.bind("inproc://zeromq.zap.01")
        self.router.plain_server = True
        self.router.bind(self.endpoint)
        self.poller = zmq.Poller()
        self.poller.register(self.router, zmq.POLLIN)
        self.poller.register(self.zap, zmq.POLLIN)
        # Domains' pidfds and doorbells live in one epoll set, registered in the
        # poller as a single fd: zmq.Poller rebuilds its list on every poll, so
        # two hundred descriptors there would slow every hypercall.
        self._lines: dict[int, Callable[[], None]] = {}
        self._line_set = select.epoll()
        self.poller.register(self._line_set.fileno(), zmq.POLLIN)
        self._sig_r, self._sig_w = socket.socketpair()
        self._sig_r.setblocking(False)
        self._sig_w.setblocking(False)
        signal.set_wakeup_fd(self._sig_w.fileno(), warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda *_: None)   # the wake-up fd does the work
        self.poller.register(self._sig_r.fileno(), zmq.POLLIN)
        self.hypercalls: dict[str, dict[str, Handler]] = {
            "event_channel_op": event_channel.OPS,
            "grant_table_op": grant_table.OPS,
            "memory_op": memory.OPS,
            "sched_op": sched.OPS,
            "domctl": domctl.OPS,
            "sysctl": sysctl.OPS,
            "console_io": conring.OPS,
        }
        self.conring.printk(f"microxen hypervisor up: {host_memory_mib} MiB host memory, "
                            f"{os.cpu_count()} CPUs, policy {self.policy.name}")

    # -- services the hypercall handlers use ----------------------------------
    def upcall(self, dom: Domain) -> None:
        """Raise the domain's interrupt line: 'look at your shared_info'.

        The line is an eventfd the domain was born with, not a message on its
        hypercall channel: one write system call here, and the domain wakes on
        the descriptor itself, with no ZeroMQ I/O thread in between on either
        side.  The count it carries means nothing; the pending bits do.
        """
        if dom.upcall_fd >= 0:
            try:
                os.eventfd_write(dom.upcall_fd, 1)
            except OSError:
                pass   # the pending byte stays set; the domain sees it on its next scan

    def watch_process(self, dom: Domain) -> None:
        """Listen on a new domain's lines: its death and its doorbell."""
        self._listen(dom.pidfd, lambda: domain.domain_died(self, dom))
        self._listen(dom.doorbell_fd, lambda: self._doorbell(dom))

    def unwatch_process(self, dom: Domain) -> None:
        """The process is gone: stop listening (the doorbell closes with the record)."""
        self._unlisten(dom.doorbell_fd)
        if dom.pidfd >= 0:
            self._unlisten(dom.pidfd)
            os.close(dom.pidfd)
            dom.pidfd = -1

    def _listen(self, fd: int, handler: Callable[[], None]) -> None:
        self._lines[fd] = handler
        self._line_set.register(fd, select.EPOLLIN)

    def _unlisten(self, fd: int) -> None:
        if self._lines.pop(fd, None) is not None:
            self._line_set.unregister(fd)

    def _doorbell(self, dom: Domain) -> None:
        try:
            os.eventfd_read(dom.doorbell_fd)
        except BlockingIOError:
            return
        event_channel.doorbell(self, dom)

    def frame_freed(self, owner: int) -> None:
        """A page of `owner` was unmapped for the last time; a dying owner may now go."""
        dom = self.domains.get(owner)
        if dom is not None and dom.dying and not any(
                f for f in _held_frames(self, owner)):
            domain.reap_domain(self, dom)

    def release_boot(self, dom: Domain) -> None:
        """The toolstack unpaused a new domain: answer its held boot hypercall."""
        if dom.boot_req is not None and dom.routing_id is not None:
            req, dom.boot_req = dom.boot_req, None
            # Events raised before it could hear them wait on its upcall line.
            self._reply(dom, req, self._start_info(dom))

    def dom0_died(self) -> None:
        self.conring.printk("Domain 0 crashed: shutting the machine down")
        self.running = False

    # -- the loop ---------------------------------------------------------------
    def run(self) -> None:
        while self.running:
            for sock, _ev in self.poller.poll():
                if sock is self.router:
                    self._drain_router()
                elif sock is self.zap:
                    self._authenticate()
                elif sock == self._sig_r.fileno():
                    self._signal()
                elif sock == self._line_set.fileno():
                    self._domain_lines()
        self.shutdown()

    def _domain_lines(self) -> None:
        for fd, _ev in self._line_set.poll(0):
            handler = self._lines.get(fd)   # gone if a death earlier in this batch took it
            if handler is not None:
                handler()

    def _signal(self) -> None:
        try:
            self._sig_r.recv(64)
        except BlockingIOError:
            pass
        self.conring.printk("shutdown requested")
        self.running = False

    def _authenticate(self) -> None:
        """ZAP: turn (domid, secret) into the connection's User-Id, or refuse it."""
        frames = self.zap.recv_multipart()
        version, request_id = frames[0], frames[1]
        status, user = b"400", b""
        if len(frames) >= 8 and frames[5] == b"PLAIN":
            try:
                domid = int(frames[6])
            except ValueError:
                domid = -1
            dom = self.domains.get(domid)
            if dom is not None and dom.alive and dom.routing_id is None \
                    and _same(frames[7], dom.secret):
                status, user = b"200", str(domid).encode()
        if status != b"200":
            self.conring.printk("refused a hypercall connection with bad credentials")
        self.zap.send_multipart([version, request_id, status, b"OK" if user else b"denied", user, b""])

    def _drain_router(self) -> None:
        while self.router.getsockopt(_EVENTS) & _POLLIN:
            try:
                routing_id, frame = self.router.recv_multipart(zmq.NOBLOCK, copy=False)
            except ValueError:
                continue   # a multi-part message we never asked for: drop it
            except zmq.Again:
                return
            self._hypercall(routing_id.bytes, frame)

    def _hypercall(self, routing_id: bytes, frame: zmq.Frame) -> None:
        try:
            caller = self.domains.get(int(frame.get("User-Id")))
        except (ValueError, TypeError):
            return
        if caller is None or not caller.alive:
            return
        if caller.routing_id != routing_id:
            # First message on this domain's authenticated connection.
            caller.routing_id = routing_id
        try:
            req_id, hypercall, cmd, args = channel.decode_call(frame.bytes)
        except BadMessage as exc:
            self.conring.printk(f"d{caller.domid}: bad hypercall message: {exc}")
            return
        if hypercall == "boot":
            self._boot(caller, req_id)
            return
        table = self.hypercalls.get(hypercall)
        handler = table.get(cmd) if table else None
        if handler is None:
            self._reply(caller, req_id, HypercallError(errno.ENOSYS, f"no hypercall {hypercall}/{cmd}"))
            return
        try:
            result = handler(self, caller, args)
        except HypercallError as exc:
            result = exc
        except Exception:
            self.conring.printk(f"BUG in {hypercall}/{cmd} from d{caller.domid}:\n"
                                + traceback.format_exc())
            result = HypercallError(errno.EFAULT, f"{hypercall}/{cmd} failed inside the hypervisor")
        self._reply(caller, req_id, result)

    def _reply(self, dom: Domain, req_id: int, result: Any) -> None:
        if dom.routing_id is None:
            return
        if req_id == 0:   # fire-and-forget: nobody waits; only a failure is worth a log line
            if isinstance(result, HypercallError):
                self.conring.printk(f"d{dom.domid}: unanswered hypercall failed: {result}")
            if isinstance(result, WithFds):
                for fd in result.close_after:
                    os.close(fd)
            return
        if isinstance(result, WithFds):
            try:
                fdpass.send_fds(dom.fdsock, req_id, result.fds)
                payload = channel.encode_reply(req_id, 0, result.result, len(result.fds))
            except (OSError, AttributeError) as exc:
                payload = channel.encode_reply(req_id, errno.EAGAIN, f"could not pass pages: {exc}")
            finally:
                for fd in result.close_after:
                    os.close(fd)
        elif isinstance(result, HypercallError):
            payload = channel.encode_reply(req_id, result.errno, result.message)
        else:
            payload = channel.encode_reply(req_id, 0, result)
        try:
            self.router.send_multipart([dom.routing_id, payload], zmq.NOBLOCK)
        except zmq.Again:
            self.conring.printk(f"d{dom.domid}: not reading its channel; reply dropped")

    # -- boot ---------------------------------------------------------------------
    def _boot(self, caller: Domain, req_id: int) -> None:
        """The domain's first hypercall, answered once the toolstack unpauses it.

        This stands for the moment Xen starts vCPU 0 of a built domain with
        start_info in a register: until then the domain exists but does not run.
        """
        if caller.boot_req is not None or caller.start_info.get("_delivered"):
            self._reply(caller, req_id, HypercallError(errno.EALREADY, "already booted"))
            return
        caller.boot_req = req_id
        if caller.booted:
            self.release_boot(caller)

    def _start_info(self, dom: Domain) -> WithFds:
        """start_info, plus the descriptors of every frame the builder populated."""
        dom.start_info["_delivered"] = True
        mem = self.memory.domains[dom.domid]
        info = {k: v for k, v in dom.start_info.items() if not k.startswith("_")}
        info.update(domid=dom.domid, name=dom.name, uuid=dom.uuid, vcpus=dom.vcpus,
                    nr_pages=mem.tot_pages, privileged=dom.privileged,
                    frames=list(mem.frames))
        return WithFds(info, [f.fd for f in mem.frames.values()])

    # -- shutdown -----------------------------------------------------------------
    def shutdown(self) -> None:
        """Destroy every domain, stop the zygote, remove our sockets."""
        for dom in list(self.domains):
            if not dom.dying:
                domain.destroy_domain(self, dom)
        self.builder.close()
        self._line_set.close()
        self.router.close()
        self.zap.close()
        self.ctx.term()
        rundir.sweep_sockets(self.run_dir)   # dom0 died by SIGKILL: its sockets are ours to remove
        self.conring.printk("hypervisor stopped")
        self.logfile.close()


def _same(a: bytes, b: bytes) -> bool:
    import hmac
    return hmac.compare_digest(a, b)


def _held_frames(hv: Hypervisor, owner: int):
    for table in hv.grants.values():
        for track in table.maptrack.values():
            if track.granter == owner:
                yield track.frame
