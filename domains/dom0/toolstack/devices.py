"""The toolstack's side of split devices: writing the XenStore directories.

In Xen
    libxl never talks to a frontend or a backend.  To give a guest a disk it
    writes two XenStore directories in one transaction (libxl_device.c,
    libxl_disk.c) and lets the drivers meet there:

        /local/domain/<be>/backend/vbd/<fe>/<devid>   perms n<be> r<fe>
            frontend, frontend-id, params, mode, type, device-type, dev,
            removable, bootable, online, discard-enable, state = 1
        /local/domain/<fe>/device/vbd/<devid>          perms n<fe> r<be>
            backend, backend-id, virtual-device, device-type, state = 1

    Each side owns its own directory and may only read the other's.
    ``backend=NAME`` in a disk spec names a driver domain; libxl resolves it
    to a domid when the guest is created.  On destroy both directories go.

Here
    The same paths, keys and permissions.  What every split device type
    shares (disks here, vifs in vifs.py) is in this module too:
    :class:`SplitDevice` (where a device's two directories are),
    :func:`write_device_dirs` (both directories in one transaction, or a
    rebind), :func:`rebind_devices` (every device of a re-created driver
    domain in one transaction), :func:`forget_domain` and
    :func:`remove_device_dirs`.  :class:`Devices` is the hook the
    Toolstack calls (``build`` during create, ``destroy`` during teardown) and
    what ``xl block-list / block-attach / block-detach`` use.  It remembers
    every VBD it made, so that when a driver domain is re-created (crash,
    hang, or ``on_crash = "restart"``) it can *rebind*: write each VBD's
    backend directory again under the new driver domain's id and point the
    frontend's ``backend``/``backend-id`` at it (re-permissioning the
    frontend's nodes so the new backend may read them).  The frontend notices
    and reconnects.  Removing a device goes as in libxl: ``online = 0`` and
    ``state = Closing`` first, and the directories go only once the backend
    answers Closed (:func:`close_backend`, bounded for a backend that is hung).

    Disk images: ``target`` is the image file.  An absolute path is used as
    it is; a relative one is relative to the run directory.  If the file does
    not exist, the toolstack creates it, sparse, when the target ends with
    ``?size=N[K|M|G]`` (for example ``target=disks/guest1.img?size=64M``);
    without a size a missing image is an error.  An existing image is used as
    it is and the size suffix is ignored.  Only the driver domain ever opens
    the image.

Invariant
    A VBD is either fully written (both directories) or not at all; a refused
    disk spec changes nothing in XenStore.  A live backend has stopped serving
    a device's ring before the device's directories are removed.

Where this differs from Xen
    No hotplug scripts: the "physical device" is a file the backend opens by
    itself.  A disk with no ``backend=`` would be served by dom0 in Xen; dom0
    runs no blkback here, so such a disk is refused with a message that says
    to name a driver domain.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable

import trio

from domains.dom0.toolstack.disk_spec import DiskSpec, DiskSpecError, devid_to_vdev, parse_disk_spec
from domains.kernel.xenbus import XenbusState, read_state, wait_until

if TYPE_CHECKING:
    from domains.dom0.toolstack.libxl import Toolstack

log = logging.getLogger("devices")

_SIZE = re.compile(r"^(.*)\?size=([0-9]+)([kKmMgG]?)$")
_UNITS = {"": 1 << 20, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}   # bare number: MiB


def _error(msg: str) -> Exception:
    from domains.dom0.toolstack.libxl import ToolstackError
    return ToolstackError(msg)


#: One directory's keys and values, as toolstack code writes them.
DirKeys = Iterable[tuple[str, Any]]


class SplitDevice:
    """Where one split device the toolstack made meets its drivers in XenStore.

    A subclass (a dataclass) has ``frontend``, ``devid``, ``backend_name``
    and ``backend`` (the current backend domid; None while it is down) and
    names its ``devtype`` (``vbd``, ``vif``).
    """
    devtype: ClassVar[str]

    @property
    def be_path(self) -> str:
        return f"/local/domain/{self.backend}/backend/{self.devtype}/{self.frontend}/{self.devid}"

    @property
    def fe_path(self) -> str:
        return f"/local/domain/{self.frontend}/device/{self.devtype}/{self.devid}"


@dataclass
class Vbd(SplitDevice):
    """One virtual block device the toolstack made."""
    devtype: ClassVar[str] = "vbd"
    frontend: int
    devid: int
    spec: DiskSpec
    backend_name: str
    backend: int | None            # current backend domid; None while it is down
    params: str                    # absolute image path


def split_target(target: str) -> tuple[str, int | None]:
    """``path?size=64M`` -> (path, bytes); a plain path -> (path, None)."""
    m = _SIZE.match(target)
    if not m:
        return target, None
    path, num, unit = m.groups()
    return path, int(num) * _UNITS[unit.lower()]


def prepare_image(target: str, run_dir: str) -> str:
    """Resolve a disk target to an absolute image path, creating it if asked."""
    path, size = split_target(target)
    if not path:
        raise _error(f"disk target '{target}' names no file")
    full = path if os.path.isabs(path) else os.path.join(run_dir, path)
    full = os.path.normpath(full)
    if os.path.exists(full):
        if not os.path.isfile(full):
            raise _error(f"disk target '{full}' is not a regular file (only raw image files "
                         f"can be served here)")
        return full
    if size is None:
        raise _error(f"disk image '{full}' does not exist; add '?size=64M' to the target to "
                     f"have the toolstack create it")
    if size <= 0 or size % 512:
        raise _error(f"disk size in '{target}' must be a positive multiple of 512 bytes")
    os.makedirs(os.path.dirname(full), exist_ok=True)
    with open(full, "xb") as f:
        f.truncate(size)                    # sparse: no blocks until written
    log.info("created sparse disk image %s (%d bytes)", full, size)
    return full


class Devices:
    """Block devices of every domain, as XenStore directories."""

    def __init__(self, xs, run_dir: str) -> None:
        self.xs = xs
        self.run_dir = run_dir
        self.toolstack: "Toolstack | None" = None
        self.vbds: dict[tuple[int, int], Vbd] = {}
        self.driver_domains_seen: set[str] = set()
        self.last_detached: int | None = None
        from domains.dom0.toolstack.vifs import VifDevices
        self.net = VifDevices(self)            # vif = [...]: see vifs.py

    # -- the Toolstack hooks ------------------------------------------------------
    async def build(self, domid: int, cfg) -> None:
        for spec in getattr(cfg, "disk", None) or []:
            if isinstance(spec, str):
                spec = self._parse(spec)
            await self.attach(domid, spec)
        await self.net.build(domid, cfg)

    async def rebind_served(self, domid: int, cfg) -> None:
        """A driver domain (re)built: point every device it serves at ``domid``.

        The Toolstack calls this once the domain runs.  The new backend
        cannot see a device before its directory is written, and that
        directory and the frontend's reset are one transaction, so booting
        meanwhile is safe; its BackendWatcher finds the devices by its watch.
        """
        if not getattr(cfg, "driver_domain", False):
            return
        if cfg.name in self.driver_domains_seen:
            from domains.dom0.watchdog import bump
            await bump(self.xs, cfg.name, "restarts")
        self.driver_domains_seen.add(cfg.name)
        await rebind_devices(self.xs, [(vbd, self.dir_keys) for vbd in self.vbds.values()]
                             + [(vif, self.net.dir_keys) for vif in self.net.vifs.values()],
                             cfg.name, domid)

    async def destroy(self, domid: int) -> None:
        """Remove the domain's own disks; orphan those it served (kept for rebind)."""
        await forget_domain(self.xs, self.vbds, domid)
        await self.net.destroy(domid)

    # -- attach / detach ------------------------------------------------------------
    def _parse(self, text: str) -> DiskSpec:
        try:
            return parse_disk_spec(text)
        except DiskSpecError as exc:
            raise _error(f"disk spec '{text}': {exc}") from None

    async def _backend_domid(self, name: str) -> int:
        assert self.toolstack is not None
        for info in await self.toolstack.list():
            if "d" in info["state"]:
                continue
            if info["name"] == name or str(info["domid"]) == name:
                return info["domid"]
        raise _error(f"backend domain '{name}' does not exist (start the driver domain first)")

    async def attach(self, domid: int, spec: DiskSpec | str) -> Vbd:
        if isinstance(spec, str):
            spec = self._parse(spec)
        if spec.format != "raw":
            raise _error(f"disk {spec.vdev}: format '{spec.format}' is not served here (raw only)")
        if spec.target is None:
            raise _error(f"disk {spec.vdev}: an empty drive has nothing to serve")
        if not spec.backend:
            raise _error(f"disk {spec.vdev}: no backend= given; dom0 runs no blkback here, "
                         f"so name a driver domain, e.g. backend=blkdom")
        if (domid, spec.devid) in self.vbds:
            raise _error(f"domain {domid} already has a disk {spec.vdev} ({spec.devid})")
        backend = await self._backend_domid(spec.backend)
        if backend == domid:
            raise _error(f"disk {spec.vdev}: a domain cannot be its own backend")
        params = prepare_image(spec.target, self.run_dir)
        vbd = Vbd(domid, spec.devid, spec, spec.backend, backend, params)
        await self._write(vbd, fresh=True)
        self.vbds[(domid, spec.devid)] = vbd
        return vbd

    async def detach(self, domid: int, vdev: str) -> None:
        vbd = self._find(domid, vdev)
        await remove_device_dirs(self.xs, vbd)
        del self.vbds[(vbd.frontend, vbd.devid)]
        self.last_detached = vbd.devid

    def _find(self, domid: int, vdev: str) -> Vbd:
        from domains.dom0.toolstack.disk_spec import vdev_to_devid
        try:
            devid = vdev_to_devid(vdev)
        except DiskSpecError as exc:
            raise _error(str(exc)) from None
        vbd = self.vbds.get((domid, devid))
        if vbd is None:
            raise _error(f"domain {domid} has no disk {vdev}")
        return vbd

    # -- XenStore ----------------------------------------------------------------------
    async def _write(self, vbd: Vbd, fresh: bool) -> None:
        await write_device_dirs(self.xs, vbd, fresh, *self.dir_keys(vbd))

    @staticmethod
    def dir_keys(vbd: Vbd) -> tuple[DirKeys, DirKeys]:
        """The keys of a VBD's backend and frontend directories (libxl_disk.c)."""
        spec = vbd.spec
        backend = (("frontend", vbd.fe_path), ("frontend-id", vbd.frontend),
                   ("params", vbd.params), ("mode", "r" if spec.readonly else "w"),
                   ("type", "phy"), ("device-type", spec.devtype),
                   ("dev", spec.vdev), ("removable", 0), ("bootable", 1),
                   ("online", 1), ("discard-enable", int(spec.discard)),
                   *((("direct-io-safe", 1),) if spec.direct_io_safe else ()),
                   ("state", 1))
        frontend = (("virtual-device", vbd.devid), ("device-type", spec.devtype), ("state", 1))
        return backend, frontend

    # -- xl block-list -----------------------------------------------------------------
    async def list(self, domid: int) -> list[dict[str, Any]]:
        out = []
        for vbd in sorted((v for v in self.vbds.values() if v.frontend == domid),
                          key=lambda v: v.devid):
            fe = vbd.fe_path

            async def rd(path: str) -> str:
                return await read_for_list(self.xs, path)
            be_state = await rd(f"{vbd.be_path}/state") if vbd.backend is not None else "-1"
            out.append({"vdev": vbd.devid, "name": devid_to_vdev(vbd.devid),
                        "backend": vbd.backend if vbd.backend is not None else -1,
                        "backend_name": vbd.backend_name,
                        "state": await rd(f"{fe}/state"), "backend_state": be_state,
                        "evtch": await rd(f"{fe}/event-channel"),
                        "ring_ref": await rd(f"{fe}/ring-ref"),
                        "be_path": vbd.be_path if vbd.backend is not None else "-",
                        "params": vbd.params})
        return out


async def write_device_dirs(xs, dev: SplitDevice, fresh: bool,
                            be_keys: DirKeys, fe_keys: DirKeys) -> None:
    """Write a split device's two directories in one transaction (libxl_device.c)."""
    be_keys, fe_keys = list(be_keys), list(fe_keys)
    await xs.run_transaction(lambda t: write_device_dirs_in(t, dev, fresh, be_keys, fe_keys))


async def write_device_dirs_in(t, dev: SplitDevice, fresh: bool,
                               be_keys: DirKeys, fe_keys: DirKeys) -> None:
    """Write a split device's two directories in transaction ``t``.

    The backend directory (owned by the backend, readable by the frontend) is
    always written whole, with ``be_keys``.  A ``fresh`` device also gets its
    frontend directory (owned by the frontend, readable by the backend), with
    ``fe_keys``; a rebind instead re-permissions the frontend's existing nodes
    for the new backend and forgets a stale handshake.  Either way the
    frontend's ``backend``/``backend-id`` then name the backend.
    """
    be, fe = dev.be_path, dev.fe_path
    await t.mkdir(be)
    await t.set_perms(be, [f"n{dev.backend}", f"r{dev.frontend}"])
    for key, value in be_keys:
        await t.write(f"{be}/{key}", str(value))
    fe_perms = [f"n{dev.frontend}", f"r{dev.backend}"]
    if fresh:
        await t.mkdir(fe)
        await t.set_perms(fe, fe_perms)
        for key, value in fe_keys:
            await t.write(f"{fe}/{key}", str(value))
    else:
        # The frontend's nodes were readable by the old backend only.
        await t.set_perms(fe, fe_perms)
        for child in await t.directory(fe):
            await t.set_perms(f"{fe}/{child}", fe_perms)
        await _forget_stale_handshake(t, fe)
    await t.write(f"{fe}/backend-id", str(dev.backend))
    await t.write(f"{fe}/backend", be)
    await t.set_perms(f"{fe}/backend-id", fe_perms)
    await t.set_perms(f"{fe}/backend", fe_perms)


#: How long removing a device waits for its backend to let go of it.  A backend
#: that is dead or hung does not answer; the directories go after this anyway.
BACKEND_CLOSE_TIMEOUT = 2.0


async def close_backend(xs, dev: SplitDevice, timeout: float = BACKEND_CLOSE_TIMEOUT) -> bool:
    """Ask a device's backend to let go of it, and wait until it has.

    As libxl does before removing a device: ``online = 0`` and ``state =
    Closing`` in the backend's directory, then wait for the backend to say
    Closed.  Only then has it stopped taking requests off the old ring, so
    a guest re-created on the same disk image cannot have its writes
    overtaken by its predecessor's queued ones.  True if the backend
    answered within ``timeout`` seconds.
    """
    be = dev.be_path

    async def body(t) -> bool:
        try:
            await t.read(f"{be}/frontend")
        except OSError:
            return False                 # no backend directory: nothing to close
        await t.write(f"{be}/online", "0")
        await t.write(f"{be}/state", str(int(XenbusState.Closing)))
        return True
    if not await xs.run_transaction(body):
        return True

    async def closed() -> bool:
        return await read_state(xs, be) in (XenbusState.Closed, XenbusState.Unknown)
    try:
        await wait_until(xs, [f"{be}/state"], closed, timeout=timeout)
        return True
    except trio.TooSlowError:
        log.warning("%s: the backend did not close within %.1f s; removing it anyway",
                    be, timeout)
        return False


async def remove_device_dirs(xs, dev: SplitDevice) -> None:
    """Remove a split device's directories, once its backend (if it is up) has
    let go of it (:func:`close_backend`)."""
    if dev.backend is not None:
        await close_backend(xs, dev)
    async def body(t) -> None:
        paths = [dev.fe_path] + ([dev.be_path] if dev.backend is not None else [])
        for path in paths:
            try:
                await t.rm(path)
            except OSError as exc:
                if getattr(exc, "name", "") != "ENOENT":
                    raise
    await xs.run_transaction(body)


async def forget_domain(xs, devs: dict, domid: int) -> None:
    """A domain is going: remove the devices it is the frontend of (from
    XenStore and ``devs``); orphan those it served, kept for the rebind."""
    for key, dev in list(devs.items()):
        if dev.frontend == domid:
            await remove_device_dirs(xs, dev)
            del devs[key]
        elif dev.backend == domid:
            # Its directory goes with the driver domain's home; the frontend
            # sees the backend vanish and waits for the rebind.
            dev.backend = None


#: A device type's directory keys: device -> (backend keys, frontend keys).
KeysOf = Callable[[Any], "tuple[DirKeys, DirKeys]"]


async def rebind_devices(xs, devs: Iterable[tuple[SplitDevice, KeysOf]], backend_name: str,
                         new_domid: int, logger: logging.Logger = log) -> int:
    """Point every device served by ``backend_name`` at its new domid; return how many.

    All of them in one transaction: the re-created driver domain, already
    booting, finds every device it serves in one scan, and dom0 commits once
    (a frontend writing its own directory meanwhile makes it start over).
    ``devs`` pairs each device with what gives its directories' keys.
    """
    moved = [(dev, keys_of) for dev, keys_of in devs
             if dev.backend_name == backend_name and dev.backend != new_domid]
    if not moved:
        return 0
    for dev, _ in moved:
        dev.backend = new_domid

    async def body(t) -> None:
        for dev, keys_of in moved:
            await write_device_dirs_in(t, dev, False, *keys_of(dev))
    await xs.run_transaction(body)
    kinds = sorted({dev.devtype for dev, _ in moved})
    logger.info("rebound %d device(s) (%s) to %s (d%d)", len(moved), ", ".join(kinds),
                backend_name, new_domid)
    return len(moved)


async def read_for_list(xs, path: str) -> str:
    """A node's text for ``xl *-list``; "-1" when it cannot be read."""
    try:
        return (await xs.read(path)).decode(errors="replace")
    except OSError:
        return "-1"


async def _forget_stale_handshake(t, fe: str) -> None:
    """A frontend left in Initialised offered its ring to the *old* backend.

    The new backend cannot have seen this device yet (its directory is
    written in this same transaction), so an Initialised it would find is
    stale by definition: its ``ring-ref`` and
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
