"""Domains as xenstored sees them, and the nodes a toolstack writes for one.

In Xen
    xenstored talks to a guest only after dom0's toolstack INTRODUCEs it
    (domid, the ring page's frame, the event channel); from then on
    IS_DOMAIN_INTRODUCED says ``T``, the guest's relative paths resolve
    under ``/local/domain/<domid>`` (GET_DOMAIN_PATH), and watchers of
    ``@introduceDomain`` hear about it.  RELEASE (or the domain dying) drops
    the connection and fires ``@releaseDomain``.  SET_TARGET lets a device
    model domain act for the domain it serves.

    Separately, libxl writes each new domain's skeleton
    (docs/misc/xenstore-paths.pandoc): ``/local/domain/<id>`` with ``name``,
    ``domid``, ``vm``, ``memory/target``, ``memory/static-max``, ``cpu/``,
    ``control/``, ``device/``, ``data/`` ...; ``/vm/<uuid>``; and
    ``/libxl/<id>`` for the toolstack's own notes.  libxl's permission
    pattern is: the home directory is owned by dom0 and *readable* by the
    guest (``n0 r<id>``), so a guest cannot change its own name or memory
    target; a few subdirectories the guest must write -- ``data``,
    ``drivers``, ``feature``, ``attr``, ``error``, ``control/shutdown`` and
    ``control/feature-*`` -- are owned by the guest (``n<id>``).

Here
    :class:`DomainTable` is xenstored's list of introduced domains and the
    ring connections serving them.  :func:`write_domain_entries` and
    :func:`remove_domain_entries` are the toolstack's half, written against
    the client API (an in-process dom0 connection or a kernel XenStore
    client), inside one transaction so watchers never see half a domain.

Differences from Xen
    There is no machine frame number to map: the ring page arrives as a
    shared-memory buffer and is served by :func:`.ring_server.serve_ring`.
    An INTRODUCE message over the wire records the domain and, if the
    daemon was given a ``ring_connector``, hands (domid, mfn, port) to it
    so the lead's event-channel layer can find the page.
"""

from __future__ import annotations

import uuid as _uuid
from dataclasses import dataclass, field
from typing import Any, Callable

from .store import domain_path

__all__ = ["DomainInfo", "DomainTable", "write_domain_entries",
           "remove_domain_entries", "CONTROL_FEATURES"]


@dataclass
class DomainInfo:
    domid: int
    mfn: int = 0
    port: int = 0
    target: int | None = None
    #: Things to call to drop this domain's ring connections on RELEASE.
    closers: list[Callable[[], None]] = field(default_factory=list)


class DomainTable:
    def __init__(self) -> None:
        self._domains: dict[int, DomainInfo] = {}

    def introduce(self, domid: int, mfn: int = 0, port: int = 0) -> DomainInfo:
        info = self._domains.get(domid)
        if info is None:
            info = self._domains[domid] = DomainInfo(domid, mfn, port)
        else:
            info.mfn, info.port = mfn, port
        return info

    def release(self, domid: int) -> DomainInfo | None:
        return self._domains.pop(domid, None)

    def get(self, domid: int) -> DomainInfo | None:
        return self._domains.get(domid)

    def is_introduced(self, domid: int) -> bool:
        return domid in self._domains

    def target_of(self, domid: int) -> int | None:
        info = self._domains.get(domid)
        return None if info is None else info.target

    def domids(self) -> list[int]:
        return sorted(self._domains)


#: control/ nodes through which the toolstack and guest negotiate shutdown.
CONTROL_FEATURES = ("feature-poweroff", "feature-reboot", "feature-suspend",
                    "feature-s3", "feature-s4")

#: Subdirectories of a guest's home that the guest itself owns (libxl).
GUEST_WRITABLE = ("data", "drivers", "feature", "attr", "error")


async def write_domain_entries(xs: Any, domid: int, name: str, *,
                               memory_kb: int, maxmem_kb: int | None = None,
                               vcpus: int = 1, uuid: str | None = None) -> str:
    """Create a new domain's XenStore skeleton, as libxl does; return its home.

    ``xs`` is any XenStore client with the common API (``transaction``,
    ``write``, ``mkdir``, ``set_perms``): dom0's in-process connection or a
    :class:`domains.kernel.xenstore.XenStoreClient` on the privileged socket.
    """
    home = domain_path(domid)
    uuid = uuid or str(_uuid.uuid4())
    vm = f"/vm/{uuid}"
    ro = ["n0", f"r{domid}"]       # dom0 owns it, the guest may read
    rw = [f"n{domid}"]             # the guest owns it
    maxmem_kb = memory_kb if maxmem_kb is None else maxmem_kb

    async def body(t) -> None:
        await t.mkdir(home)
        await t.set_perms(home, ro)
        await t.mkdir(vm)
        await t.set_perms(vm, ro)
        await t.write(f"{vm}/uuid", uuid)
        await t.write(f"{vm}/name", name)
        await t.mkdir(f"/libxl/{domid}")   # toolstack-private: n0 inherited
        await t.write(f"{home}/name", name)
        await t.write(f"{home}/domid", str(domid))
        await t.write(f"{home}/vm", vm)
        await t.write(f"{home}/memory/target", str(memory_kb))
        await t.write(f"{home}/memory/static-max", str(maxmem_kb))
        for cpu in range(vcpus):
            await t.write(f"{home}/cpu/{cpu}/availability", "online")
        await t.mkdir(f"{home}/device")
        await t.mkdir(f"{home}/control")
        for node in ("shutdown",) + CONTROL_FEATURES:
            await t.write(f"{home}/control/{node}", "")
            await t.set_perms(f"{home}/control/{node}", rw)
        for sub in GUEST_WRITABLE:
            await t.mkdir(f"{home}/{sub}")
            await t.set_perms(f"{home}/{sub}", rw)

    await xs.run_transaction(body)
    return home


async def remove_domain_entries(xs: Any, domid: int) -> None:
    """Remove what :func:`write_domain_entries` made (missing parts are fine)."""
    home = domain_path(domid)

    async def body(t) -> None:
        vm = None
        try:
            vm = (await t.read(f"{home}/vm")).decode()
        except OSError:
            pass
        for path in (home, f"/libxl/{domid}", vm):
            if path and path.startswith(("/local/domain/", "/libxl/", "/vm/")):
                try:
                    await t.rm(path)
                except OSError as e:
                    if getattr(e, "name", "") != "ENOENT":
                        raise

    await xs.run_transaction(body)
