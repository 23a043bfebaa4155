"""sysctl: questions about the whole machine (public/sysctl.h).

physinfo for `xl info`, getdomaininfolist for `xl list`, readconsole for
`xl dmesg`.  Privileged only: an ordinary guest does not get to see the host.
"""

from __future__ import annotations

import os
import platform

from hypervisor import domctl

VERSION = "4.17-microxen"


def physinfo(hv, caller, args) -> dict:
    hv.policy.require_privileged(caller, "sysctl physinfo")
    return {
        "nr_cpus": os.cpu_count(), "total_memory_kb": hv.memory.total_pages * 4,
        "free_memory_kb": hv.memory.free_pages * 4, "xen_version": VERSION,
        "host": platform.node(), "release": platform.release(), "machine": platform.machine(),
        "policy": hv.policy.name, "nr_domains": len(list(hv.domains)),
        "uptime": hv.conring.uptime(),
    }


def getdomaininfolist(hv, caller, args) -> list:
    hv.policy.require_privileged(caller, "sysctl getdomaininfolist")
    return [domctl.info(hv, dom) for dom in hv.domains]


def readconsole(hv, caller, args) -> list:
    hv.policy.require_privileged(caller, "sysctl readconsole")
    return hv.conring.read(clear=bool(args.get("clear")))


OPS = {"physinfo": physinfo, "getdomaininfolist": getdomaininfolist, "readconsole": readconsole}
