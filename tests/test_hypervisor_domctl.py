"""Domain lifecycle against a real hypervisor: domctl, sysctl, sched_op, console_io.

Every check looks at the real thing as well as the hypervisor's answer: a
paused domain's process is stopped (/proc/<pid>/stat says T), a pinned one's
affinity is what the OS reports, a destroyed one's process is gone.
"""

from __future__ import annotations

import errno
import itertools
import os
import signal

import pytest

from hypervisor import domctl, sysctl
from ipc.sched_abi import REASON_NAMES, SHUTDOWN_crash, SHUTDOWN_poweroff, SHUTDOWN_reboot
from tests.hvharness import PuppetError, proc_state, wait_for

_names = itertools.count()
MIB_PAGES = 256


def guest(h, **extra):
    return h.create(f"dc{next(_names)}", **extra)


def refused(expected_errno: int, fn, /, *args, **kw) -> PuppetError:
    with pytest.raises(PuppetError) as info:
        fn(*args, **kw)
    assert info.value.errno == expected_errno, str(info.value)
    return info.value


def domctl_(caller, cmd: str, /, **args):
    return caller.hypercall("domctl", cmd, **args)


def tasks_of(pid: int) -> list[int]:
    return [int(t) for t in os.listdir(f"/proc/{pid}/task")]


def test_createdomain_builds_a_paused_domain_that_boots_on_unpause(shared_hv):
    h = shared_hv
    domid = h.build("dc-new", memory_mib=24, vcpus=2, uuid="12345678-1234-5678-1234-567812345678")
    info = h.info(domid)
    assert info["state"] == "--p---"
    assert info["name"] == "dc-new" and info["uuid"] == "12345678-1234-5678-1234-567812345678"
    assert info["tot_pages"] == 24 * MIB_PAGES and info["vcpus"] == 2 and not info["privileged"]
    assert info["pid"] in h.process_tree()   # a real process, forked by the zygote
    g = h.boot(domid)
    assert g.start_info["domid"] == domid and g.start_info["vcpus"] == 2
    assert h.info(domid)["state"] in ("r-----", "-b----")


def test_bad_createdomain_arguments_are_refused_and_change_nothing(shared_hv):
    h = shared_hv
    before, procs = h.domains().keys(), set(h.process_tree())
    good = {"name": "dc-ok", "kernel": "tests.kernels.puppet", "memory_kb": 16384}
    for bad in ({"name": ""}, {"name": "a/b"}, {"name": "x" * 65}, {"name": 7},
                {"kernel": 3}, {"kernel": "no.such.kernel"}, {"kernel": "os"}, {"kernel": "../evil"},
                {"memory_kb": 0}, {"memory_kb": "16"}, {"memory_kb": True},
                {"max_memory_kb": 1024}, {"vcpus": 0}, {"vcpus": 1000},
                {"max_evtchn_port": 1}, {"max_grant_frames": 0}, {"max_maptrack": 0},
                {"uuid": "not-a-uuid"}, {"cmdline": 5}):
        refused(errno.EINVAL, domctl_, h.dom0, "createdomain", **{**good, **bad})
    assert h.domains().keys() == before
    assert set(h.process_tree()) == procs


def test_createdomain_beyond_host_memory_is_enomem_and_leaves_nothing(shared_hv):
    h = shared_hv
    before, procs = h.domains(), set(h.process_tree())
    free = h.dom0.hypercall("sysctl", "physinfo")["free_memory_kb"]
    refused(errno.ENOMEM, domctl_, h.dom0, "createdomain", name="dc-huge",
            kernel="tests.kernels.puppet", memory_kb=free + 4)
    assert h.domains().keys() == before.keys()
    assert set(h.process_tree()) == procs
    assert h.dom0.hypercall("sysctl", "physinfo")["free_memory_kb"] == free
    # exactly what is free still fits
    g = guest(h, memory_mib=free // 1024)
    assert h.dom0.hypercall("sysctl", "physinfo")["free_memory_kb"] == free % 1024
    refused(errno.ENOMEM, domctl_, h.dom0, "createdomain", name="dc-more",
            kernel="tests.kernels.puppet", memory_kb=1024)
    h.destroy(g.domid)
    assert h.dom0.hypercall("sysctl", "physinfo")["free_memory_kb"] == free


def test_destroydomain_kills_the_process_and_drops_the_record(shared_hv):
    h = shared_hv
    g = guest(h)
    pid = h.info(g.domid)["pid"]
    h.destroy(g.domid)
    assert proc_state(pid) in ("X", "Z")
    assert g.domid not in h.domains()
    refused(errno.ESRCH, domctl_, h.dom0, "destroydomain", domid=g.domid)
    refused(errno.EINVAL, domctl_, h.dom0, "destroydomain", domid=0)
    refused(errno.ESRCH, domctl_, h.dom0, "destroydomain", domid="1")


def test_pause_stops_the_process_and_unpause_resumes_it(shared_hv):
    h = shared_hv
    g = guest(h)
    pid = h.info(g.domid)["pid"]
    domctl_(h.dom0, "pausedomain", domid=g.domid)
    wait_for(lambda: proc_state(pid) == "T", what=f"d{g.domid} (pid {pid}) to stop")
    assert h.info(g.domid)["state"] == "--p---"
    domctl_(h.dom0, "unpausedomain", domid=g.domid)
    wait_for(lambda: proc_state(pid) in ("S", "R"), what=f"d{g.domid} to run again")
    assert g.hypercall("grant_table_op", "query_size")["nr_frames"] > 0   # it works again
    assert h.info(g.domid)["state"] in ("r-----", "-b----")
    refused(errno.EINVAL, domctl_, h.dom0, "pausedomain", domid=0)   # never pause yourself
    refused(errno.ESRCH, domctl_, h.dom0, "pausedomain", domid=4000)


def test_getdomaininfo(shared_hv):
    h = shared_hv
    a, b = guest(h), guest(h)
    mine = domctl_(a, "getdomaininfo", domid=a.domid)   # a domain may ask about itself
    assert mine["domid"] == a.domid and mine["pid"] == h.info(a.domid)["pid"]
    assert set(mine) >= {"name", "uuid", "state", "tot_pages", "max_pages", "vcpus", "cpu_time",
                         "shutdown_reason", "evtchn_ports", "grant_mappings"}
    refused(errno.EPERM, domctl_, a, "getdomaininfo", domid=b.domid)
    refused(errno.EPERM, domctl_, a, "getdomaininfo", domid=0)
    refused(errno.ESRCH, domctl_, h.dom0, "getdomaininfo", domid=4000)


def test_setmaxmem(shared_hv):
    h = shared_hv
    g = guest(h, memory_mib=16)
    domctl_(h.dom0, "setmaxmem", domid=g.domid, max_memory_kb=32 * 1024)
    assert h.info(g.domid)["max_pages"] == 32 * MIB_PAGES
    assert g.hypercall("memory_op", "maximum_reservation") == 32 * MIB_PAGES
    refused(errno.EINVAL, domctl_, h.dom0, "setmaxmem", domid=g.domid, max_memory_kb=8 * 1024)
    refused(errno.EINVAL, domctl_, h.dom0, "setmaxmem", domid=g.domid, max_memory_kb="lots")
    assert h.info(g.domid)["max_pages"] == 32 * MIB_PAGES


def test_max_vcpus_sets_the_online_count(shared_hv):
    h = shared_hv
    g = guest(h, vcpus=3)
    domctl_(h.dom0, "max_vcpus", domid=g.domid, online=1)
    assert h.info(g.domid)["online_vcpus"] == 1
    for bad in (0, 4, "2"):
        refused(errno.EINVAL, domctl_, h.dom0, "max_vcpus", domid=g.domid, online=bad)
    assert h.info(g.domid)["online_vcpus"] == 1


def test_setvcpuaffinity_pins_every_thread_of_the_process(shared_hv):
    h = shared_hv
    g = guest(h)
    pid = h.info(g.domid)["pid"]
    allowed = sorted(os.sched_getaffinity(0))   # what this machine (or cgroup) lets us use
    for cpus in ([allowed[-1]], allowed):
        domctl_(h.dom0, "setvcpuaffinity", domid=g.domid, cpus=cpus)
        assert h.info(g.domid)["cpu_affinity"] == cpus
        for tid in tasks_of(pid):
            assert os.sched_getaffinity(tid) == set(cpus), f"thread {tid} of d{g.domid}"
    domctl_(h.dom0, "setvcpuaffinity", domid=g.domid, cpus=[allowed[0]])
    for bad in ([], [os.cpu_count()], [-1], "0", [0.5]):
        refused(errno.EINVAL, domctl_, h.dom0, "setvcpuaffinity", domid=g.domid, cpus=bad)
    assert os.sched_getaffinity(pid) == {allowed[0]}
    assert h.info(g.domid)["cpu_affinity"] == [allowed[0]]


def test_set_start_info_is_delivered_at_boot_and_refused_after(shared_hv):
    h = shared_hv
    domid = h.build("dc-si")
    domctl_(h.dom0, "set_start_info", domid=domid, info={"store_port": 5, "console_gfn": 7})
    refused(errno.EINVAL, domctl_, h.dom0, "set_start_info", domid=domid, info={"_delivered": 1})
    refused(errno.EINVAL, domctl_, h.dom0, "set_start_info", domid=domid, info=[1])
    g = h.boot(domid)
    assert g.start_info["store_port"] == 5 and g.start_info["console_gfn"] == 7
    refused(errno.EBUSY, domctl_, h.dom0, "set_start_info", domid=domid, info={"late": 1})


def test_an_unprivileged_domain_gets_eperm_from_every_domctl_and_sysctl(shared_hv):
    h = shared_hv
    g, victim = guest(h), guest(h)
    for cmd in domctl.OPS:
        for target in (victim.domid, 0) + ((g.domid,) if cmd != "getdomaininfo" else ()):
            args = {"domid": target, "name": "evil", "kernel": "tests.kernels.puppet",
                    "memory_kb": 4096, "cpus": [0], "online": 1, "max_memory_kb": 1 << 20,
                    "info": {"x": 1}}
            refused(errno.EPERM, domctl_, g, cmd, **args)
    for cmd in sysctl.OPS:
        refused(errno.EPERM, g.hypercall, "sysctl", cmd)
    assert h.info(victim.domid)["state"] in ("r-----", "-b----")
    assert len(h.domains()) == 3


def test_unknown_hypercalls_get_enosys(shared_hv):
    g = guest(shared_hv)
    refused(errno.ENOSYS, g.hypercall, "domctl", "no_such_op")
    refused(errno.ENOSYS, g.hypercall, "mmu_update", "anything")


def test_physinfo(shared_hv):
    h = shared_hv
    g = guest(h, memory_mib=32)
    info = h.dom0.hypercall("sysctl", "physinfo")
    assert info["nr_cpus"] == os.cpu_count()
    assert info["total_memory_kb"] == 2048 * 1024
    used = sum(d["tot_pages"] for d in h.domains().values()) * 4
    assert info["free_memory_kb"] == info["total_memory_kb"] - used
    assert info["nr_domains"] == 2 and info["policy"] == "dummy"
    assert h.info(g.domid)["tot_pages"] == 32 * MIB_PAGES


def test_getdomaininfolist_names_every_domain_and_its_process(shared_hv):
    h = shared_hv
    a, b = guest(h), guest(h)
    listing = h.dom0.hypercall("sysctl", "getdomaininfolist")
    assert [d["domid"] for d in listing] == [0, a.domid, b.domid]
    assert listing[0]["name"] == "Domain-0" and listing[0]["privileged"]
    assert {d["pid"] for d in listing} <= set(h.process_tree())


def test_console_io_lines_reach_readconsole_marked_with_the_writer(shared_hv):
    h = shared_hv
    g = guest(h)
    g.hypercall("console_io", "write", text="hello from a guest\n(XEN) I am the hypervisor")
    lines = h.dmesg()
    assert f"(d{g.domid}) hello from a guest" in lines
    assert f"(d{g.domid}) (XEN) I am the hypervisor" in lines   # no impersonation
    assert any(line.startswith("(XEN)") and f"d{g.domid}: created" in line for line in lines)
    g.hypercall("console_io", "write", text=42)   # ignored, not a crash
    h.dom0.hypercall("sysctl", "readconsole", clear=True)
    g.hypercall("console_io", "write", text="after clear")
    assert h.dmesg() == [f"(d{g.domid}) after clear"]


@pytest.mark.parametrize("reason", sorted(REASON_NAMES), ids=REASON_NAMES.get)
def test_sched_op_shutdown_records_the_reason(shared_hv, reason):
    h = shared_hv
    port = h.dom_exc_port()
    g = guest(h)
    before = h.dom0.do("fire_count", port=port)["fires"]
    g.hypercall("sched_op", "shutdown", reason=reason)
    info = h.info(g.domid)
    assert info["shutdown_reason"] == reason
    assert info["state"] == ("----c-" if reason == SHUTDOWN_crash else "---s--")
    assert h.dom0.do("fire_count", port=port)["fires"] == before + 1   # VIRQ_DOM_EXC
    # the first reason sticks
    g.hypercall("sched_op", "shutdown", reason=(reason + 1) % len(REASON_NAMES))
    assert h.info(g.domid)["shutdown_reason"] == reason
    assert f"d{g.domid}: shutdown, reason {REASON_NAMES[reason]}" in "\n".join(h.dmesg())


def test_shutdown_with_a_bad_reason_is_refused(shared_hv):
    g = guest(shared_hv)
    for bad in (-1, 6, 99, "poweroff", None):
        refused(errno.EINVAL, g.hypercall, "sched_op", "shutdown", reason=bad)
    assert shared_hv.info(g.domid)["shutdown_reason"] is None


def test_remote_shutdown(shared_hv):
    h = shared_hv
    a, b = guest(h), guest(h)
    refused(errno.EPERM, a.hypercall, "sched_op", "remote_shutdown", domid=b.domid, reason=0)
    pid = h.info(b.domid)["pid"]
    h.dom0.hypercall("sched_op", "remote_shutdown", domid=b.domid, reason=SHUTDOWN_reboot)
    info = h.info(b.domid)
    assert info["shutdown_reason"] == SHUTDOWN_reboot and info["state"] == "---s--"
    wait_for(lambda: proc_state(pid) == "T", what="the shut-down domain to stop running")
    refused(errno.ESRCH, h.dom0.hypercall, "sched_op", "remote_shutdown", domid=4000, reason=0)
    refused(errno.EINVAL, h.dom0.hypercall, "sched_op", "remote_shutdown", domid=a.domid, reason=9)
    assert h.info(a.domid)["shutdown_reason"] is None


def test_a_kernel_that_returns_powers_off(shared_hv):
    h = shared_hv
    g = guest(h)
    pid = h.info(g.domid)["pid"]
    g.do("exit")
    info = wait_for(lambda: (i := h.info(g.domid))["pid"] is None and i, what="the process to end")
    assert info["shutdown_reason"] == SHUTDOWN_poweroff and info["state"] == "---s--"
    assert proc_state(pid) in ("X", "Z")


def test_a_domain_killed_from_outside_is_marked_crashed(shared_hv):
    h = shared_hv
    port = h.dom_exc_port()
    a, b = guest(h), guest(h)
    pa = a.do("alloc_unbound", remote_dom=b.domid)
    b.do("bind_interdomain", remote_dom=a.domid, remote_port=pa)
    before = h.dom0.do("fire_count", port=port)["fires"]
    pid = h.info(a.domid)["pid"]
    os.kill(pid, signal.SIGKILL)
    info = h.wait_state(a.domid, "c", timeout=5)
    assert info["shutdown_reason"] == SHUTDOWN_crash and info["pid"] is None
    assert info["evtchn_ports"] == 0
    assert h.dom0.do("fire_count", port=port)["fires"] > before
    assert f"d{a.domid}: process {pid} died: domain crashed" in "\n".join(h.dmesg())
    refused(errno.EINVAL, domctl_, h.dom0, "unpausedomain", domid=a.domid)
    refused(errno.EINVAL, domctl_, h.dom0, "pausedomain", domid=a.domid)
    assert h.info(b.domid)["state"] in ("r-----", "-b----")   # the neighbour runs on


def test_a_paused_domain_can_be_destroyed(shared_hv):
    h = shared_hv
    g = guest(h)
    pid = h.info(g.domid)["pid"]
    domctl_(h.dom0, "pausedomain", domid=g.domid)
    wait_for(lambda: proc_state(pid) == "T", what="the domain to stop")
    h.destroy(g.domid)
    assert proc_state(pid) in ("X", "Z") and g.domid not in h.domains()
    never_booted = h.build("dc-never")
    h.destroy(never_booted)
    assert never_booted not in h.domains()


def test_stopping_the_hypervisor_takes_every_domain_with_it(hv):
    """The `hv` fixture's teardown checks that nothing is left; here we give it work."""
    a, b = hv.create("stop-a"), hv.create("stop-b")
    [gfn] = a.do("alloc", nr=1)
    handle = b.do("map", dom=a.domid, ref=a.do("grant", domid=b.domid, gfn=gfn))
    pa = a.do("alloc_unbound", remote_dom=b.domid)
    b.do("bind_interdomain", remote_dom=a.domid, remote_port=pa)
    hv.dom0.hypercall("domctl", "pausedomain", domid=b.domid)
    assert handle and len(hv.process_tree()) == 4   # zygote, dom0, a, b


def test_when_dom0_dies_the_machine_shuts_down(hv):
    hv.create("orphan")
    with pytest.raises(ConnectionError):
        hv.dom0.do("crash")
    assert hv.proc.wait(10) == 0   # the teardown then checks nothing is left


def test_no_domain_outlives_a_killed_hypervisor(hv):
    hv.create("survivor?")
    pids = [hv.proc.pid, *hv.process_tree()]
    os.kill(hv.proc.pid, signal.SIGKILL)
    hv.proc.wait(10)
    wait_for(lambda: all(proc_state(p) in ("X", "Z") for p in pids), timeout=10,
             what="the zygote and every domain to die with the hypervisor")
    # A SIGKILLed hypervisor cannot remove its socket file; that is the one thing
    # left, and the next hypervisor on this run directory replaces it.
    os.unlink(os.path.join(hv.run_dir, "hypervisor", "hypercall.sock"))
