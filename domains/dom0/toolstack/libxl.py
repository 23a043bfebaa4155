"""The toolstack library: what libxl is to xl.

Everything a person or a program does to domains goes through here: build a
domain from its configuration, destroy it, shut it down, apply its
on_poweroff / on_reboot / on_crash action, list and describe domains, set
memory and vCPUs.  `xl` (and any other front end, through the management API in
api.py) is a thin layer on top.

Building a domain is the sequence Xen's libxl + libxc follow, as hypercalls:

1. domctl createdomain: the hypervisor forks the domain's process, paused;
2. populate_physmap two frames in the guest for its XenStore and console rings;
3. alloc_unbound two event channels in the guest whose remote end is dom0;
4. seed grant references 1 (XenStore) and 0 (console) in the guest's table, so
   dom0 can map those pages without the guest's help;
5. set_start_info: the frame numbers, ports and command line;
6. write the domain's XenStore entries and introduce it to xenstored (which
   maps the ring and binds the port), start its console in xenconsoled;
7. write the backend and frontend entries of its devices;
8. unpause; a driver domain re-created after a crash then gets the devices
   it served pointed at it (their backend directories written under its new
   domid), which it finds through its watch as it boots.

If any step fails, everything made so far is undone: destroy leaves nothing.
"""

from __future__ import annotations

import errno
import logging
import time
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

from ipc.channel import HypercallError
from ipc.grant_abi import GNTTAB_RESERVED_CONSOLE, GNTTAB_RESERVED_XENSTORE
from ipc.sched_abi import REASON_NAMES, SHUTDOWN_crash, SHUTDOWN_poweroff, SHUTDOWN_reboot

from domains.dom0.xenstored.domain import remove_domain_entries
from domains.kernel.xenbus import gather

if TYPE_CHECKING:
    from domains.kernel.boot import Kernel

log = logging.getLogger("libxl")

#: Grant mappings one maptrack frame holds in Xen (a 16-byte struct
#: grant_mapping per entry), so xl.cfg's max_maptrack_frames means here what
#: it means there: how many foreign pages a domain may map at once.
MAPTRACK_PER_FRAME = 4096 // 16

# `kernel =` in a config names a guest kernel program.  Short names for ours;
# any importable module with a kernel_main also works (tests use their own).
KERNELS = {
    "domu": "domains.domu.kernel",
    "driverdom": "domains.driverdom.kernel",
}


class ToolstackError(Exception):
    """A request the toolstack refuses; the message says what and why."""


@dataclass
class DomainRecord:
    """What the toolstack remembers about a domain it built."""
    domid: int
    config: Any                      # the parsed DomainConfig
    created: float = field(default_factory=time.time)
    handled_shutdown: bool = False
    console: Any = None              # the xenconsoled task handle
    restarts: int = 0


def kernel_module(kernel: str) -> str:
    if not kernel:
        raise ToolstackError("no kernel given: set kernel = \"domu\" (or \"driverdom\")")
    if kernel in KERNELS:
        return KERNELS[kernel]
    if "/" in kernel or kernel.endswith((".gz", ".img")) or "vmlinuz" in kernel:
        raise ToolstackError(
            f"kernel {kernel!r} is not a guest kernel program: this system's kernels are "
            f"Python modules ({', '.join(sorted(KERNELS))}, or a module path)")
    return kernel


def guest_cmdline(cfg) -> str:
    """The command line the guest kernel sees: xl's cmdline/extra plus our workload."""
    words = (cfg.cmdline or "").split()
    if cfg.workload and not any(w.startswith("workload=") for w in words):
        words.append(f"workload={cfg.workload}")
    return " ".join(words)


class Toolstack:
    def __init__(self, k: "Kernel", xs, rings, consoled, devices=None) -> None:
        self.k = k
        self.hv = k.hv
        self.xs = xs                  # dom0's in-process XenStore connection
        self.rings = rings            # xenstored's ring side (store_rings.StoreRings)
        self.consoled = consoled
        self.devices = devices        # the device-model glue (split drivers), if any
        self.records: dict[int, DomainRecord] = {}

    # -- queries --------------------------------------------------------------
    async def list(self) -> list[dict]:
        infos = await self.hv.call("sysctl", "getdomaininfolist")
        for info in infos:
            info["name"] = await self._name(info)
            info["memory_mib"] = info["tot_pages"] // 256
        return infos

    async def _name(self, info: dict) -> str:
        try:
            return (await self.xs.read(f"/local/domain/{info['domid']}/name")).decode()
        except Exception:
            return info["name"]

    async def find(self, dom: str | int) -> dict:
        """A domain named by name or id, as xl accepts."""
        infos = await self.list()
        for info in infos:   # a dying domain may share its name with its restarted self
            if str(info["domid"]) == str(dom) or (info["name"] == dom and "d" not in info["state"]):
                return info
        raise ToolstackError(f"domain '{dom}' does not exist")

    async def info(self) -> dict:
        return await self.hv.call("sysctl", "physinfo")

    async def dmesg(self, clear: bool = False) -> list[str]:
        return await self.hv.call("sysctl", "readconsole", clear=clear)

    # -- create ---------------------------------------------------------------
    async def create(self, cfg) -> int:
        names = {i["name"] for i in await self.list() if "d" not in i["state"]}
        if cfg.name in names:
            raise ToolstackError(f"domain '{cfg.name}' already exists")
        module = kernel_module(cfg.kernel)
        try:
            r = await self.hv.call(
                "domctl", "createdomain", name=cfg.name, kernel=module,
                memory_kb=cfg.memory * 1024, max_memory_kb=max(cfg.maxmem or 0, cfg.memory) * 1024,
                vcpus=cfg.maxvcpus, uuid=cfg.uuid, cmdline=guest_cmdline(cfg),
                max_evtchn_port=min(cfg.max_event_channels, 1024),
                max_grant_frames=min(cfg.max_grant_frames, 64),
                max_maptrack=min(cfg.max_maptrack_frames * MAPTRACK_PER_FRAME, 1 << 20),
                privileged=False)
        except HypercallError as exc:
            raise ToolstackError(f"cannot create '{cfg.name}': {exc.message}") from None
        domid = r["domid"]
        try:
            await self._build(domid, cfg)
        except BaseException as exc:
            log.warning("building d%d failed, undoing: %s", domid, exc)
            await self._teardown(domid)
            if isinstance(exc, (ToolstackError, HypercallError)):
                raise ToolstackError(f"cannot create '{cfg.name}': {exc}") from None
            raise
        return domid

    async def _build(self, domid: int, cfg) -> None:
        """Steps 2-8 of the module docstring.  Steps that do not depend on each
        other are made at once (hypercalls are pipelined like XenStore
        requests): a driver domain is rebuilt while its guests wait."""
        hv = self.hv
        store_gfn, console_gfn = (await hv.call("memory_op", "populate_physmap",
                                                domid=domid, nr_extents=2))["gfns"]
        ports = await gather([
            partial(hv.call, "event_channel_op", "alloc_unbound", dom=domid, remote_dom=0),
            partial(hv.call, "event_channel_op", "alloc_unbound", dom=domid, remote_dom=0),
            partial(hv.call, "grant_table_op", "seed", domid=domid, ref=GNTTAB_RESERVED_XENSTORE,
                    remote_dom=0, gfn=store_gfn),
            partial(hv.call, "grant_table_op", "seed", domid=domid, ref=GNTTAB_RESERVED_CONSOLE,
                    remote_dom=0, gfn=console_gfn)])
        store_port, console_port = ports[0]["port"], ports[1]["port"]
        await hv.call("domctl", "set_start_info", domid=domid, info={
            "store_gfn": store_gfn, "store_evtchn": store_port,
            "console_gfn": console_gfn, "console_evtchn": console_port,
            "driver_domain": bool(getattr(cfg, "driver_domain", False)),
        })
        record = DomainRecord(domid, cfg)
        self.records[domid] = record

        async def store() -> None:
            await self._write_entries(domid, cfg)
            await self.rings.introduce(domid, store_port)

        async def console() -> None:
            record.console = await self.consoled.attach(domid, cfg.name, console_port)
        await gather([store, console])
        if self.devices is not None:
            await self.devices.build(domid, cfg)
        if cfg.cpus is not None:
            import os
            cpus = sorted({c for mask in cfg.vcpu_affinity(os.cpu_count() or 1) for c in mask})
            await hv.call("domctl", "setvcpuaffinity", domid=domid, vcpu=-1, cpus=cpus)
        if cfg.vcpus < cfg.maxvcpus:
            await hv.call("domctl", "max_vcpus", domid=domid, online=cfg.vcpus)
        await hv.call("domctl", "unpausedomain", domid=domid)
        if self.devices is not None:
            # After the unpause: a re-created driver domain boots while its
            # guests' devices are pointed at it, and finds them by its watch.
            await self.devices.rebind_served(domid, cfg)

    async def _write_entries(self, domid: int, cfg) -> None:
        from domains.dom0.xenstored.domain import write_domain_entries
        await write_domain_entries(self.xs, domid, name=cfg.name,
                                   uuid=(await self.hv.call("domctl", "getdomaininfo", domid=domid))["uuid"],
                                   memory_kb=cfg.memory * 1024,
                                   maxmem_kb=max(cfg.maxmem or 0, cfg.memory) * 1024,
                                   vcpus=cfg.vcpus)

    # -- destroy --------------------------------------------------------------
    async def destroy(self, dom: str | int) -> None:
        info = await self.find(dom)
        if info["domid"] == 0:
            raise ToolstackError("Domain-0 cannot be destroyed")
        await self._teardown(info["domid"])

    async def _teardown(self, domid: int) -> None:
        """Undo everything for a domain, whatever state it is in; never raises."""
        record = self.records.pop(domid, None)
        if self.devices is not None:
            try:
                await self.devices.destroy(domid)
            except Exception:
                log.exception("removing devices of d%d", domid)
        if record is not None and record.console is not None:
            await self.consoled.detach(domid)
        try:
            await self.rings.release(domid)
            await remove_domain_entries(self.xs, domid)
        except Exception:
            log.exception("releasing d%d from xenstored", domid)
        await self._destroydomain(domid)

    async def _destroydomain(self, domid: int) -> None:
        """The hypervisor's part of destroying: kill, close ports, release grants."""
        try:
            await self.hv.call("domctl", "destroydomain", domid=domid)
        except HypercallError as exc:
            if exc.errno != errno.ESRCH:
                log.warning("destroydomain d%d: %s", domid, exc)

    # -- lifecycle ---------------------------------------------------------------
    async def shutdown(self, dom: str | int, reason: str = "poweroff") -> int:
        """Ask the guest (PV control/shutdown), as `xl shutdown` does."""
        info = await self.find(dom)
        if info["domid"] == 0:
            raise ToolstackError("use `run.py down` to stop the whole system")
        await self.xs.write(f"/local/domain/{info['domid']}/control/shutdown", reason.encode())
        return info["domid"]

    async def pause(self, dom: str | int) -> None:
        info = await self.find(dom)
        await self._domctl("pausedomain", info)

    async def unpause(self, dom: str | int) -> None:
        info = await self.find(dom)
        await self._domctl("unpausedomain", info)

    async def _domctl(self, op: str, info: dict, **args) -> Any:
        try:
            return await self.hv.call("domctl", op, domid=info["domid"], **args)
        except HypercallError as exc:
            raise ToolstackError(f"{info['name']}: {exc.message}") from None

    async def mem_set(self, dom: str | int, mib: int) -> None:
        """Set the balloon target; the guest's balloon driver does the rest."""
        info = await self.find(dom)
        if mib <= 0 or mib * 256 > info["max_pages"]:
            raise ToolstackError(f"memory target {mib} MiB must be between 1 and the maximum "
                                 f"{info['max_pages'] // 256} MiB")
        await self.xs.write(f"/local/domain/{info['domid']}/memory/target", str(mib * 1024).encode())

    async def mem_max(self, dom: str | int, mib: int) -> None:
        info = await self.find(dom)
        await self._domctl("setmaxmem", info, max_memory_kb=mib * 1024)
        await self.xs.write(f"/local/domain/{info['domid']}/memory/static-max", str(mib * 1024).encode())

    async def vcpu_pin(self, dom: str | int, vcpu: int, cpus: list[int]) -> None:
        info = await self.find(dom)
        await self._domctl("setvcpuaffinity", info, vcpu=vcpu, cpus=cpus)

    async def vcpu_set(self, dom: str | int, count: int) -> None:
        info = await self.find(dom)
        await self._domctl("max_vcpus", info, online=count)
        for v in range(info["vcpus"]):
            await self.xs.write(f"/local/domain/{info['domid']}/cpu/{v}/availability",
                                b"online" if v < count else b"offline")

    async def rename(self, dom: str | int, new_name: str) -> None:
        info = await self.find(dom)
        if any(i["name"] == new_name for i in await self.list()):
            raise ToolstackError(f"domain '{new_name}' already exists")
        if not new_name or "/" in new_name or not new_name.isprintable():
            raise ToolstackError(f"'{new_name}' is not a valid domain name")
        await self.xs.write(f"/local/domain/{info['domid']}/name", new_name.encode())
        record = self.records.get(info["domid"])
        if record is not None:
            record.config.name = new_name

    # -- reacting to VIRQ_DOM_EXC --------------------------------------------------
    async def handle_dom_exc(self) -> None:
        """Apply the on_* action of every domain that has newly shut down or crashed."""
        for info in await self.hv.call("sysctl", "getdomaininfolist"):
            record = self.records.get(info["domid"])
            reason = info["shutdown_reason"]
            if record is None or reason is None or record.handled_shutdown:
                continue
            record.handled_shutdown = True
            action = self._action(record.config, reason)
            log.info("d%d (%s) %s: on_%s=%s", info["domid"], record.config.name,
                     "crashed" if reason == SHUTDOWN_crash else "shut down",
                     REASON_NAMES.get(reason, reason), action)
            await self.k.printk(f"toolstack: d{info['domid']} {REASON_NAMES.get(reason, reason)}"
                                f" -> {action}")
            if action == "preserve":
                continue
            if action in ("restart", "rename-restart", "coredump-restart"):
                await self.restart(info["domid"])
            else:
                await self._teardown(info["domid"])

    async def restart(self, domid: int) -> int | None:
        """Destroy a domain and build it again from its config; the new domid.

        The order is chosen for the time guests wait on a driver domain:
        first the old domain is destroyed in the hypervisor (its process is
        killed, so whatever it still held - a disk image, rings - is let go
        and it cannot touch them again), then the new one is built (which
        rebinds every device the old one served), and only then is the rest
        of the old domain's bookkeeping undone (its XenStore home, its store
        ring, its console).  Nothing of the new domain depends on that
        bookkeeping: it has a new domid, and the device records already name
        it, so the old domain's directories are removed without touching it.
        A guest (not a driver domain) is torn down fully first: its devices
        (a vif's MAC) must be free before the new guest claims them.
        """
        record = self.records.get(domid)
        if record is None:
            return None
        driver = bool(getattr(record.config, "driver_domain", False))
        if driver:
            await self._destroydomain(domid)
        else:
            # A guest's own devices (its vif's MAC, its disks) are unique to
            # it: the old ones must be gone before the new guest asks for them.
            await self._teardown(domid)
        new = None
        try:
            new = await self.create(record.config)
        except ToolstackError as exc:
            log.error("restarting %s failed: %s", record.config.name, exc)
        finally:
            if driver:
                await self._teardown(domid)
        if new is not None and new in self.records:
            self.records[new].restarts = record.restarts + 1
        return new

    @staticmethod
    def _action(cfg, reason: int) -> str:
        if reason == SHUTDOWN_crash:
            return cfg.on_crash
        if reason == SHUTDOWN_reboot:
            return cfg.on_reboot
        if reason == SHUTDOWN_poweroff:
            return cfg.on_poweroff
        return "destroy"
