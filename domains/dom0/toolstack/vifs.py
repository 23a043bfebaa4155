"""The toolstack's side of virtual network interfaces: the vif XenStore directories.

In Xen
    For every entry of ``vif = [...]`` libxl (libxl_nic.c) writes, in one
    transaction, the two directories where netfront and netback meet:

        /local/domain/<be>/backend/vif/<fe>/<devid>   perms n<be> r<fe>
            frontend, frontend-id, online = 1, state = 1, script, mac,
            bridge, handle = <devid>, type = vif, ip (if given), mtu, rate
        /local/domain/<fe>/device/vif/<devid>          perms n<fe> r<be>
            backend, backend-id, handle = <devid>, mac, mtu, state = 1

    ``backend=NAME`` names the network driver domain; ``bridge=`` says which
    bridge the backend's ``vif<fe>.<devid>`` interface joins (libxl's hotplug
    script does the ``brctl addif``).  ``ip=`` is a hint for that script (and
    for anti-spoofing rules); a guest normally gets its address from DHCP.

Here
    The same paths, keys and permissions.  The driver domain's kernel reads
    ``bridge`` and joins the vif to a software bridge of that name (no hotplug
    script: ``script`` is not written).  There is no DHCP, so the *guest* reads
    its address from the backend directory's ``ip`` node (it may read that
    directory, as every frontend may): ``ip=10.0.0.1`` or ``ip=10.0.0.1/24``
    (a bare address means /24).

    :class:`VifDevices` is held by :class:`~.devices.Devices`, which calls it
    from its ``build``/``destroy``/``rebind`` hooks, so vifs follow their
    driver domain across a restart exactly as disks do: every vif it served
    is written again under the new domid and the frontend's
    ``backend``/``backend-id`` point at it (re-permissioned so the new backend
    may read the frontend's nodes).  netfront notices and reconnects.  The
    XenStore plumbing itself (both directories in one transaction, the
    rebind, removal) is the one every split device shares, in devices.py.

Invariant
    A vif is either fully written (both directories) or not at all; a refused
    vif spec changes nothing in XenStore.

Where this differs from Xen
    A vif without ``backend=`` would be served by dom0 in Xen; dom0 runs no
    netback here, so it is refused with a message naming the fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from domains.dom0.toolstack.devices import (DirKeys, SplitDevice, forget_domain, read_for_list,
                                            remove_device_dirs, write_device_dirs)
from domains.dom0.toolstack.vif_spec import VifSpec, VifSpecError, parse_vif_spec

if TYPE_CHECKING:
    from domains.dom0.toolstack.devices import Devices


def _error(msg: str) -> Exception:
    from domains.dom0.toolstack.libxl import ToolstackError
    return ToolstackError(msg)


@dataclass
class Vif(SplitDevice):
    """One virtual network interface the toolstack made."""
    devtype: ClassVar[str] = "vif"
    frontend: int
    spec: VifSpec
    backend_name: str
    backend: int | None            # current backend domid; None while it is down

    @property
    def devid(self) -> int:
        return self.spec.devid


class VifDevices:
    """Network interfaces of every domain, as XenStore directories."""

    def __init__(self, devices: "Devices") -> None:
        self.devices = devices
        self.vifs: dict[tuple[int, int], Vif] = {}

    @property
    def xs(self):
        return self.devices.xs

    # -- hooks called by Devices ---------------------------------------------------
    async def build(self, domid: int, cfg) -> None:
        for spec in getattr(cfg, "vif", None) or []:
            await self.attach(domid, spec, seed=getattr(cfg, "uuid", None) or cfg.name)

    async def destroy(self, domid: int) -> None:
        await forget_domain(self.xs, self.vifs, domid)

    # -- attach / detach -------------------------------------------------------------
    def parse(self, text: str, devid: int) -> VifSpec:
        try:
            return parse_vif_spec(text, devid=devid)
        except VifSpecError as exc:
            raise _error(f"vif spec '{text}': {exc}") from None

    def next_devid(self, domid: int) -> int:
        used = {d for (fe, d) in self.vifs if fe == domid}
        return next(i for i in range(len(used) + 1) if i not in used)

    async def attach(self, domid: int, spec: VifSpec | str, seed: str | None = None) -> Vif:
        if isinstance(spec, str):
            spec = self.parse(spec, self.next_devid(domid))
        spec = spec.with_mac(seed or f"domain-{domid}")
        if not spec.backend:
            raise _error(f"vif {spec.devid}: no backend= given; dom0 runs no netback here, "
                         f"so name a driver domain, e.g. backend=netdom")
        if (domid, spec.devid) in self.vifs:
            raise _error(f"domain {domid} already has a vif with devid {spec.devid}")
        for other in self.vifs.values():
            if other.spec.mac == spec.mac:
                raise _error(f"vif {spec.devid}: mac {spec.mac} is already used by "
                             f"vif {other.devid} of domain {other.frontend}")
        backend = await self.devices._backend_domid(spec.backend)
        if backend == domid:
            raise _error(f"vif {spec.devid}: a domain cannot be its own backend")
        vif = Vif(domid, spec, spec.backend, backend)
        await self._write(vif, fresh=True)
        self.vifs[(domid, spec.devid)] = vif
        return vif

    def find(self, domid: int, which: str) -> Vif:
        """A domain's vif named by devid or by MAC (as ``xl network-detach`` takes)."""
        for vif in self.vifs.values():
            if vif.frontend == domid and (str(vif.devid) == which or vif.spec.mac == which.lower()):
                return vif
        raise _error(f"domain {domid} has no vif '{which}' (give its devid or its mac)")

    async def detach(self, domid: int, which: str) -> Vif:
        vif = self.find(domid, which)
        await remove_device_dirs(self.xs, vif)
        del self.vifs[(vif.frontend, vif.devid)]
        return vif

    # -- XenStore ----------------------------------------------------------------------
    async def _write(self, vif: Vif, fresh: bool) -> None:
        await write_device_dirs(self.xs, vif, fresh, *self.dir_keys(vif))

    @staticmethod
    def dir_keys(vif: Vif) -> tuple[DirKeys, DirKeys]:
        """The keys of a vif's backend and frontend directories (libxl_nic.c)."""
        spec = vif.spec
        keys: list[tuple[str, Any]] = [
            ("frontend", vif.fe_path), ("frontend-id", vif.frontend), ("online", 1),
            ("state", 1), ("mac", spec.mac), ("bridge", spec.bridge),
            ("handle", vif.devid), ("type", "vif"), ("mtu", spec.mtu or 1500)]
        if spec.ip:
            keys.append(("ip", " ".join(spec.ip)))
        if spec.rate is not None:
            keys.append(("rate", f"{spec.rate.bytes_per_interval},{spec.rate.interval_us}"))
        if spec.vifname:
            keys.append(("vifname", spec.vifname))
        return keys, (("handle", vif.devid), ("mac", spec.mac), ("mtu", spec.mtu or 1500),
                      ("state", 1))

    # -- xl network-list -----------------------------------------------------------------
    async def list(self, domid: int) -> list[dict[str, Any]]:
        async def rd(path: str) -> str:
            return await read_for_list(self.xs, path)
        out = []
        for vif in sorted((v for v in self.vifs.values() if v.frontend == domid),
                          key=lambda v: v.devid):
            fe = vif.fe_path
            up = vif.backend is not None
            out.append({"idx": vif.devid, "backend": vif.backend if up else -1,
                        "backend_name": vif.backend_name, "mac": vif.spec.mac,
                        "bridge": vif.spec.bridge, "ip": " ".join(vif.spec.ip),
                        "handle": vif.devid,
                        "state": await rd(f"{fe}/state"),
                        "backend_state": await rd(f"{vif.be_path}/state") if up else "-1",
                        "evtch": await rd(f"{fe}/event-channel"),
                        "tx_ring_ref": await rd(f"{fe}/tx-ring-ref"),
                        "rx_ring_ref": await rd(f"{fe}/rx-ring-ref"),
                        "be_path": vif.be_path if up else "-"})
        return out

