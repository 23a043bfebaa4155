"""Xen Security Modules: who may make which hypercall.

Every privileged operation in Xen goes through an XSM hook.  With the default
"dummy" module the rule is simple: the control domain (and any domain the
toolstack created as privileged) may use domctl and sysctl; everybody else may
act only on itself.  FLASK replaces the rule with a policy of types and allowed
pairs; this module is the one place such a policy would plug in, so the
hypercall handlers ask it and never test `domid == 0` themselves.
"""

from __future__ import annotations

import errno
from typing import Protocol

from ipc.channel import HypercallError


class Subject(Protocol):
    domid: int
    name: str
    privileged: bool


class DummyPolicy:
    """Xen's default policy: privileged domains may control others."""

    name = "dummy"

    def may_control(self, caller: Subject, target_domid: int) -> bool:
        return caller.privileged or caller.domid == target_domid

    def require_privileged(self, caller: Subject, what: str) -> None:
        if not caller.privileged:
            raise HypercallError(
                errno.EPERM,
                f"domain {caller.domid} ({caller.name}) is not privileged: {what} refused")

    def require_control(self, caller: Subject, target_domid: int, what: str) -> None:
        if not self.may_control(caller, target_domid):
            raise HypercallError(
                errno.EPERM,
                f"domain {caller.domid} ({caller.name}) may not {what} domain {target_domid}")
