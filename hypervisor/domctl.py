"""domctl: the control domain's operations on other domains (public/domctl.h).

Everything the toolstack does to a domain's existence goes through here:
create, destroy, pause, unpause, query, set limits, pin vCPUs, hand over
start_info.  Every operation is refused (EPERM) unless the security policy says
the caller may control domains; every argument is checked before anything
changes, so a bad request changes nothing.
"""

from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING, Any

from hypervisor import domain
from hypervisor.builder import BuildError
from ipc.channel import HypercallError
from ipc.event_abi import NR_EVENT_CHANNELS
from ipc.grant_abi import DEFAULT_GRANT_FRAMES

if TYPE_CHECKING:
    from hypervisor.broker import Hypervisor
    from hypervisor.domain import Domain

MAX_VCPUS = 128
MAX_NAME = 64


def _int(args: dict, key: str, lo: int, hi: int, default: Any = None) -> int:
    value = args.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise HypercallError(errno.EINVAL, f"{key} must be an integer in [{lo}, {hi}], got {value!r}")
    return value


def target(hv: "Hypervisor", caller: "Domain", args: dict, what: str) -> "Domain":
    hv.policy.require_privileged(caller, f"domctl {what}")
    domid = args.get("domid")
    dom = hv.domains.get(domid) if isinstance(domid, int) else None
    if dom is None:
        raise HypercallError(errno.ESRCH, f"{what}: no domain {domid!r}")
    return dom


def createdomain(hv: "Hypervisor", caller: "Domain", args: dict) -> dict:
    hv.policy.require_privileged(caller, "domctl createdomain")
    name = args.get("name")
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME or not name.isprintable() \
            or "/" in name:
        raise HypercallError(errno.EINVAL, f"name must be 1-{MAX_NAME} printable characters without '/'")
    kernel = args.get("kernel")
    if not isinstance(kernel, str):
        raise HypercallError(errno.EINVAL, "kernel must be a string")
    memory_kb = _int(args, "memory_kb", 4, 1 << 40)
    max_kb = _int(args, "max_memory_kb", memory_kb, 1 << 40, memory_kb)
    vcpus = _int(args, "vcpus", 1, MAX_VCPUS, 1)
    max_ports = _int(args, "max_evtchn_port", 2, NR_EVENT_CHANNELS, NR_EVENT_CHANNELS)
    grant_frames = _int(args, "max_grant_frames", 1, 64, DEFAULT_GRANT_FRAMES)
    maptrack = _int(args, "max_maptrack", 1, 1 << 20, 4096)
    cmdline = args.get("cmdline", "")
    if not isinstance(cmdline, str):
        raise HypercallError(errno.EINVAL, "cmdline must be a string")
    uuid = args.get("uuid")
    try:
        uuid = domain.new_uuid(uuid) if uuid is not None else None
    except (ValueError, TypeError, AttributeError):
        raise HypercallError(errno.EINVAL, f"uuid {uuid!r} is not a UUID") from None
    try:
        dom = domain.create_domain(
            hv, name=name, kernel=kernel, memory_pages=(memory_kb + 3) // 4,
            max_pages=(max_kb + 3) // 4, vcpus=vcpus, privileged=bool(args.get("privileged")),
            uuid=uuid, max_ports=max_ports, grant_frames=grant_frames, maptrack=maptrack,
            cmdline=cmdline)
    except BuildError as exc:
        raise HypercallError(errno.EINVAL, str(exc)) from None
    return {"domid": dom.domid}


def destroydomain(hv, caller, args) -> None:
    dom = target(hv, caller, args, "destroydomain")
    if dom.domid == 0:
        raise HypercallError(errno.EINVAL, "domain 0 cannot be destroyed")
    domain.destroy_domain(hv, dom)


def pausedomain(hv, caller, args) -> None:
    dom = target(hv, caller, args, "pausedomain")
    if dom.domid == caller.domid or not dom.alive:
        raise HypercallError(errno.EINVAL, f"domain {dom.domid} cannot be paused now")
    domain.pause_domain(dom)


def unpausedomain(hv, caller, args) -> None:
    dom = target(hv, caller, args, "unpausedomain")
    if not dom.alive:
        raise HypercallError(errno.EINVAL, f"domain {dom.domid} is not alive")
    domain.unpause_domain(hv, dom)


def info(hv: "Hypervisor", dom: "Domain") -> dict:
    """getdomaininfo's record (xc_dominfo_t, roughly)."""
    mem = hv.memory.domains.get(dom.domid)
    return {
        "domid": dom.domid, "name": dom.name, "uuid": dom.uuid, "kernel": dom.kernel,
        "state": dom.run_state(), "pid": dom.pid if not dom.process_gone else None,
        "tot_pages": mem.tot_pages if mem else 0, "max_pages": mem.max_pages if mem else 0,
        "shared_pages": len(mem.frames) if mem else 0,
        "vcpus": dom.vcpus, "online_vcpus": dom.online_vcpus,
        "cpu_time": dom.cpu_time(), "privileged": dom.privileged,
        "shutdown_reason": dom.shutdown_reason, "cpu_affinity": dom.cpu_affinity,
        "evtchn_ports": len(hv.evtchn[dom.domid].ports) if dom.domid in hv.evtchn else 0,
        "grant_mappings": len(hv.grants[dom.domid].maptrack) if dom.domid in hv.grants else 0,
    }


def getdomaininfo(hv, caller, args) -> dict:
    domid = args.get("domid")
    if domid != caller.domid:
        hv.policy.require_privileged(caller, "domctl getdomaininfo")
    dom = hv.domains.get(domid) if isinstance(domid, int) else None
    if dom is None:
        raise HypercallError(errno.ESRCH, f"no domain {domid!r}")
    return info(hv, dom)


def setmaxmem(hv, caller, args) -> None:
    dom = target(hv, caller, args, "setmaxmem")
    max_kb = _int(args, "max_memory_kb", 4, 1 << 40)
    mem = hv.memory.domains[dom.domid]
    pages = (max_kb + 3) // 4
    if pages < mem.tot_pages:
        raise HypercallError(errno.EINVAL, f"maximum {max_kb} KiB is below the current "
                                           f"{mem.tot_pages * 4} KiB; lower the target first")
    mem.max_pages = pages


def max_vcpus(hv, caller, args) -> None:
    """Set how many of the domain's vCPUs are online (xl vcpu-set)."""
    dom = target(hv, caller, args, "max_vcpus")
    dom.online_vcpus = _int(args, "online", 1, dom.vcpus)


def setvcpuaffinity(hv, caller, args) -> None:
    """Pin a domain to host CPUs: sched_setaffinity on every thread of its process.

    A domain kernel here runs all its vCPUs on one OS thread (Python's GIL would
    serialise them anyway), so pinning any vCPU pins the process.
    """
    dom = target(hv, caller, args, "setvcpuaffinity")
    cpus = args.get("cpus")
    ncpu = os.cpu_count() or 1
    if not isinstance(cpus, list) or not cpus or not all(isinstance(c, int) and 0 <= c < ncpu for c in cpus):
        raise HypercallError(errno.EINVAL, f"cpus must be a non-empty list of CPUs in [0, {ncpu - 1}]")
    _int(args, "vcpu", -1, dom.vcpus - 1, -1)
    if dom.alive:
        try:
            for tid in os.listdir(f"/proc/{dom.pid}/task"):
                os.sched_setaffinity(int(tid), set(cpus))
        except OSError as exc:
            raise HypercallError(errno.EINVAL, f"cannot pin: {exc}") from None
    dom.cpu_affinity = sorted(set(cpus))


def set_start_info(hv, caller, args) -> None:
    """Give a built, not yet booted domain its start_info (what xc_dom_build writes)."""
    dom = target(hv, caller, args, "set_start_info")
    extra = args.get("info")
    if not isinstance(extra, dict) or any(not isinstance(k, str) or k.startswith("_") for k in extra):
        raise HypercallError(errno.EINVAL, "info must be a map of plain keys")
    if dom.start_info.get("_delivered"):
        raise HypercallError(errno.EBUSY, f"domain {dom.domid} has already booted")
    dom.start_info.update(extra)


OPS = {
    "createdomain": createdomain,
    "destroydomain": destroydomain,
    "pausedomain": pausedomain,
    "unpausedomain": unpausedomain,
    "getdomaininfo": getdomaininfo,
    "setmaxmem": setmaxmem,
    "max_vcpus": max_vcpus,
    "setvcpuaffinity": setvcpuaffinity,
    "set_start_info": set_start_info,
}
