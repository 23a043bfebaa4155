"""Domain 0: the control domain.

dom0 is the first domain the hypervisor builds and the only privileged one.  It
runs, as trio tasks in one process:
- xenstored (socket for tools, one ring per guest), see xenstored/;
- xenconsoled, logging every guest's console, see xenconsoled.py;
- the toolstack library and its management API (what xl talks to), toolstack/ and api.py;
- the VIRQ_DOM_EXC handler, which applies on_poweroff / on_reboot / on_crash;
- the driver-domain watchdog (the devices layer, when configured).

At boot it writes its own XenStore entries, starts those services, then builds
the domains of the system configuration handed to it in start_info, and
finally writes `<run-dir>/dom0/ready`.
"""

from __future__ import annotations

import logging
import os

import trio

from domains.dom0.api import ManagementAPI
from domains.dom0.store_rings import StoreRings
from domains.dom0.toolstack.libxl import Toolstack, ToolstackError
from domains.dom0.xenconsoled import XenConsoled
from domains.kernel.boot import Kernel, boot
from ipc.event_abi import VIRQ_DOM_EXC

log = logging.getLogger("dom0")


class Dom0:
    """dom0's services, and the management API's methods (api_*)."""

    def __init__(self, k: Kernel) -> None:
        from domains.dom0.xenstored import InProcessConnection, XenStore
        self.k = k
        self.store = XenStore()
        self.xs = InProcessConnection(self.store, 0)
        self.rings = StoreRings(k, self.store)
        self.consoled = XenConsoled(k)
        from domains.dom0.toolstack.devices import Devices
        self.devices = Devices(self.xs, k.run_dir)
        self.toolstack = Toolstack(k, self.xs, self.rings, self.consoled, self.devices)
        self.devices.toolstack = self.toolstack
        self.dir = os.path.join(k.run_dir, "dom0")
        os.makedirs(self.dir, exist_ok=True)
        self.boot_errors: list[str] = []

    async def run(self) -> None:
        from domains.dom0.xenstored import serve_socket
        k = self.k
        sock_dir = os.path.join(k.run_dir, "xenstored")
        os.makedirs(sock_dir, exist_ok=True)
        async with trio.open_nursery() as nursery:
            await nursery.start(_started, serve_socket(self.store, os.path.join(sock_dir, "socket")))
            await self.xs.write("/local/domain/0/name", b"Domain-0")
            await self.xs.write("/local/domain/0/domid", b"0")
            virq = await k.events.bind_virq(VIRQ_DOM_EXC)
            nursery.start_soon(self._dom_exc, virq)
            from domains.dom0.watchdog import Watchdog
            nursery.start_soon(Watchdog(self.toolstack, self.xs).run)
            api = ManagementAPI(self, os.path.join(self.dir, "toolstack.sock"))
            await nursery.start(api.serve)
            for item in k.start_info.get("domains", []):
                await self._boot_domain(item)
            with open(os.path.join(self.dir, "ready"), "w") as f:
                f.write("\n".join(self.boot_errors) + "\n" if self.boot_errors else "ok\n")
            await k.printk("dom0: ready")

    async def _boot_domain(self, item: dict) -> None:
        try:
            await self.api_create(config=item["config"], filename=item["filename"])
        except ToolstackError as exc:
            log.error("%s", exc)
            self.boot_errors.append(str(exc))

    async def _dom_exc(self, port) -> None:
        while True:
            await port.wait()
            try:
                await self.toolstack.handle_dom_exc()
            except Exception:
                log.exception("handling VIRQ_DOM_EXC")

    # -- the management API ------------------------------------------------------
    async def api_ping(self) -> str:
        return "pong"

    async def api_list(self) -> list[dict]:
        return await self.toolstack.list()

    async def api_find(self, dom) -> dict:
        return await self.toolstack.find(dom)

    async def api_info(self) -> dict:
        return await self.toolstack.info()

    async def api_dmesg(self, clear: bool = False) -> list[str]:
        return await self.toolstack.dmesg(clear)

    async def api_uptime(self) -> list[dict]:
        import time
        now = time.time()
        out = []
        for info in await self.toolstack.list():
            rec = self.toolstack.records.get(info["domid"])
            started = rec.created if rec else now - (await self.toolstack.info())["uptime"]
            out.append({"name": info["name"], "domid": info["domid"], "uptime": now - started})
        return out

    async def api_create(self, config: str, filename: str = "<config>") -> dict:
        from domains.dom0.toolstack.xlcfg import ConfigError, parse_config_text as parse_config
        try:
            cfg = parse_config(config, filename)
        except ConfigError as exc:
            raise ToolstackError(str(exc)) from None
        domid = await self.toolstack.create(cfg)
        return {"domid": domid, "name": cfg.name}

    async def api_destroy(self, dom) -> None:
        await self.toolstack.destroy(dom)

    async def api_shutdown(self, dom, reason: str = "poweroff") -> int:
        return await self.toolstack.shutdown(dom, reason)

    async def api_pause(self, dom) -> None:
        await self.toolstack.pause(dom)

    async def api_unpause(self, dom) -> None:
        await self.toolstack.unpause(dom)

    async def api_mem_set(self, dom, mib: int) -> None:
        await self.toolstack.mem_set(dom, mib)

    async def api_mem_max(self, dom, mib: int) -> None:
        await self.toolstack.mem_max(dom, mib)

    async def api_vcpu_pin(self, dom, vcpu: int, cpus: list[int]) -> None:
        await self.toolstack.vcpu_pin(dom, vcpu, cpus)

    async def api_vcpu_set(self, dom, count: int) -> None:
        await self.toolstack.vcpu_set(dom, count)

    async def api_rename(self, dom, name: str) -> None:
        await self.toolstack.rename(dom, name)

    # -- block devices (xl block-list / block-attach / block-detach) -------------------
    async def api_block_list(self, dom) -> list[dict]:
        info = await self.toolstack.find(dom)
        return await self.devices.list(info["domid"])

    async def api_block_attach(self, dom, spec: str) -> dict:
        info = await self.toolstack.find(dom)
        vbd = await self.devices.attach(info["domid"], spec)
        record = self.toolstack.records.get(info["domid"])
        if record is not None and hasattr(record.config, "disk"):
            record.config.disk.append(vbd.spec)     # a restarted domain keeps it
        return {"vdev": vbd.devid, "backend": vbd.backend}

    async def api_block_detach(self, dom, vdev: str) -> None:
        info = await self.toolstack.find(dom)
        await self.devices.detach(info["domid"], vdev)
        record = self.toolstack.records.get(info["domid"])
        if record is not None and hasattr(record.config, "disk"):
            record.config.disk = [d for d in record.config.disk
                                  if getattr(d, "devid", None) != self.devices.last_detached]

    # -- network devices (xl network-list / network-attach / network-detach) -------------
    async def api_network_list(self, dom) -> list[dict]:
        info = await self.toolstack.find(dom)
        return await self.devices.net.list(info["domid"])

    async def api_network_attach(self, dom, spec: str) -> dict:
        info = await self.toolstack.find(dom)
        record = self.toolstack.records.get(info["domid"])
        seed = (getattr(record.config, "uuid", None) or record.config.name) if record else None
        vif = await self.devices.net.attach(info["domid"], spec, seed=seed)
        if record is not None and hasattr(record.config, "vif"):
            record.config.vif.append(vif.spec)     # a restarted domain keeps it
        return {"devid": vif.devid, "mac": vif.spec.mac, "backend": vif.backend}

    async def api_network_detach(self, dom, which: str) -> None:
        info = await self.toolstack.find(dom)
        vif = await self.devices.net.detach(info["domid"], str(which))
        record = self.toolstack.records.get(info["domid"])
        if record is not None and hasattr(record.config, "vif"):
            record.config.vif = [v for v in record.config.vif if v.devid != vif.devid]

    async def api_xs_read(self, path: str) -> str:
        return (await self._xs(self.xs.read, path)).decode(errors="replace")

    async def api_xs_write(self, path: str, value: str) -> None:
        await self._xs(self.xs.write, path, value.encode())

    async def api_xs_rm(self, path: str) -> None:
        await self._xs(self.xs.rm, path)

    async def api_xs_directory(self, path: str) -> list[str]:
        return await self._xs(self.xs.directory, path)

    async def api_xs_ls(self, path: str = "/") -> list[tuple[str, str]]:
        """Every node under `path` with its value, depth first (xenstore-ls)."""
        out: list[tuple[str, str]] = []

        async def walk(p: str, depth: int) -> None:
            for child in sorted(await self._xs(self.xs.directory, p)):
                cp = p.rstrip("/") + "/" + child
                try:
                    value = (await self.xs.read(cp)).decode(errors="replace")
                except OSError:
                    value = ""
                out.append(("  " * depth + child, value))
                await walk(cp, depth + 1)
        await walk(path, 0)
        return out

    async def _xs(self, fn, *args):
        try:
            return await fn(*args)
        except OSError as exc:
            raise ToolstackError(f"xenstore: {args[0]}: {exc}") from None


async def _started(service, task_status=trio.TASK_STATUS_IGNORED) -> None:
    task_status.started()
    await service


async def main(k: Kernel) -> None:
    await Dom0(k).run()


def kernel_main(start: dict, fds: dict) -> int:
    return boot(start, fds, main)
