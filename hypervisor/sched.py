"""sched_op: a domain's requests about its own scheduling (public/sched.h).

The one that matters here is SCHEDOP_shutdown: a guest says it is done and why
(poweroff, reboot, crash...).  The hypervisor records the reason and raises
VIRQ_DOM_EXC; what happens next (destroy, restart, preserve) is the toolstack's
policy, not the hypervisor's.  SCHEDOP_remote_shutdown lets a privileged domain
shut down another that has no PV shutdown support.
"""

from __future__ import annotations

import errno

from hypervisor import domain
from ipc.channel import HypercallError
from ipc.sched_abi import REASON_NAMES


def _reason(args: dict) -> int:
    reason = args.get("reason")
    if not isinstance(reason, int) or isinstance(reason, bool) or reason not in REASON_NAMES:
        raise HypercallError(errno.EINVAL, f"shutdown reason {reason!r} is not one of {sorted(REASON_NAMES)}")
    return reason


def shutdown(hv, caller, args) -> None:
    domain.domain_shutdown(hv, caller, _reason(args))


def remote_shutdown(hv, caller, args) -> None:
    hv.policy.require_privileged(caller, "SCHEDOP_remote_shutdown")
    reason = _reason(args)
    dom = hv.domains.get(args.get("domid")) if isinstance(args.get("domid"), int) else None
    if dom is None or not dom.alive:
        raise HypercallError(errno.ESRCH, f"no running domain {args.get('domid')!r}")
    domain.domain_shutdown(hv, dom, reason)
    domain.pause_domain(dom)   # a shut-down domain's vCPUs never run again


def yield_(hv, caller, args) -> None:
    return None


OPS = {"shutdown": shutdown, "remote_shutdown": remote_shutdown, "yield": yield_}
