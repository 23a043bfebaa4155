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
    may read the frontend's nodes).  netfront notices and reconnects.

Invariant
    A vif is either fully written (both directories) or not at all; a refused
    vif spec changes nothing in XenStore.

Where this differs from Xen
    A vif without ``backend=`` would be served by dom0 in Xen; dom0 runs no
    netback here, so it is refused with a message naming the fix.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from domains.dom0.toolstack.vif_spec import VifSpec, VifSpecError, parse_vif_spec

if TYPE_CHECKING:
    from domains.dom0.toolstack.devices import Devices

log = logging.getLogger("vifs")


def _error(msg: str) -> Exception:
    from domains.dom0.toolstack.libxl import ToolstackError
    return ToolstackError(msg)


@dataclass
class Vif:
    """One virtual network interface the toolstack made."""
    frontend: int
    spec: VifSpec
    backend_name: str
    backend: int | None            # current backend domid; None while it is down

    @property
    def devid(self) -> int:
        return self.spec.devid

    @property
    def be_path(self) -> str:
        return f"/local/domain/{self.backend}/backend/vif/{self.frontend}/{self.devid}"

    @property
    def fe_path(self) -> str:
        return f"/local/domain/{self.frontend}/device/vif/{self.devid}"


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
        for key, vif in list(self.vifs.items()):
            if vif.frontend == domid:
                await self._remove(vif)
                del self.vifs[key]
            elif vif.backend == domid:
                vif.backend = None     # its directory went with the driver domain's home

    async def rebind(self, backend_name: str, new_domid: int) -> int:
        n = 0
        for vif in self.vifs.values():
            if vif.backend_name == backend_name and vif.backend != new_domid:
                vif.backend = new_domid
                await self._write(vif, fresh=False)
                n += 1
        if n:
            log.info("rebound %d vif(s) to %s (d%d)", n, backend_name, new_domid)
        return n

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
        await self._remove(vif)
        del self.vifs[(vif.frontend, vif.devid)]
        return vif

    # -- XenStore ----------------------------------------------------------------------
    async def _write(self, vif: Vif, fresh: bool) -> None:
        spec, be, fe = vif.spec, vif.be_path, vif.fe_path

        async def body(t) -> None:
            await t.mkdir(be)
            await t.set_perms(be, [f"n{vif.backend}", f"r{vif.frontend}"])
            keys: list[tuple[str, Any]] = [
                ("frontend", fe), ("frontend-id", vif.frontend), ("online", 1),
                ("state", 1), ("mac", spec.mac), ("bridge", spec.bridge),
                ("handle", vif.devid), ("type", "vif"), ("mtu", spec.mtu or 1500)]
            if spec.ip:
                keys.append(("ip", " ".join(spec.ip)))
            if spec.rate is not None:
                keys.append(("rate", f"{spec.rate.bytes_per_interval},{spec.rate.interval_us}"))
            if spec.vifname:
                keys.append(("vifname", spec.vifname))
            for key, value in keys:
                await t.write(f"{be}/{key}", str(value))
            fe_perms = [f"n{vif.frontend}", f"r{vif.backend}"]
            if fresh:
                await t.mkdir(fe)
                await t.set_perms(fe, fe_perms)
                for key, value in (("handle", vif.devid), ("mac", spec.mac),
                                   ("mtu", spec.mtu or 1500), ("state", 1)):
                    await t.write(f"{fe}/{key}", str(value))
            else:
                # The frontend's nodes were readable by the old backend only.
                await t.set_perms(fe, fe_perms)
                for child in await t.directory(fe):
                    await t.set_perms(f"{fe}/{child}", fe_perms)
                await _forget_stale_handshake(t, fe)
            await t.write(f"{fe}/backend-id", str(vif.backend))
            await t.write(f"{fe}/backend", be)
            await t.set_perms(f"{fe}/backend-id", fe_perms)
            await t.set_perms(f"{fe}/backend", fe_perms)
        await self.xs.run_transaction(body)

    async def _remove(self, vif: Vif) -> None:
        async def body(t) -> None:
            paths = [vif.fe_path] + ([vif.be_path] if vif.backend is not None else [])
            for path in paths:
                try:
                    await t.rm(path)
                except OSError as exc:
                    if getattr(exc, "name", "") != "ENOENT":
                        raise
        await self.xs.run_transaction(body)

    # -- xl network-list -----------------------------------------------------------------
    async def list(self, domid: int) -> list[dict[str, Any]]:
        async def rd(path: str) -> str:
            try:
                return (await self.xs.read(path)).decode(errors="replace")
            except OSError:
                return "-1"
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


async def _forget_stale_handshake(t, fe: str) -> None:
    """A frontend left in Initialised offered its ring to the *old* backend.

    The new backend is not running yet (it starts after this rebind), so an
    Initialised it would find is stale by definition: its ``ring-ref`` and
    ``event-channel`` were granted to a domain that is gone, and connecting to
    them fails.  Put the frontend back to Initialising in the same
    transaction; the frontend, which sees ``backend`` change, starts over
    anyway (and its own transactional publish conflicts with this one).
    """
    from domains.kernel.xenbus import XenbusState, parse_state
    try:
        state = parse_state(await t.read(f"{fe}/state"))
    except OSError:
        return
    if state == XenbusState.Initialised:
        await t.write(f"{fe}/state", str(int(XenbusState.Initialising)))
