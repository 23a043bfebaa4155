"""Configs for whole-system network tests (the System harness is tests/blocksys.py).

``NETDOM`` is a network driver domain with a fast heartbeat; :func:`net_guest`
is a guest with one vif on it (``ip=10.0.0.<n>``) and, optionally, a disk on
blkdom.  Run directories are short ``/tmp/mxb*`` names (Unix socket paths are
limited to 108 bytes).
"""

from __future__ import annotations

NETDOM = """
name = "netdom"
type = "pv"
kernel = "driverdom"
memory = 64
driver_domain = 1
extra = "heartbeat=0.2"
on_crash = "restart"
"""


def net_guest(name: str, n: int, workload: str, disk: bool = False, kernel: str = "domu",
              vif: bool = True) -> str:
    """A guest ``name`` with address 10.0.0.<n> on netdom's xenbr0."""
    text = (f'name = "{name}"\ntype = "pv"\nkernel = "{kernel}"\nmemory = 64\n'
            f'workload = "{workload}"\non_crash = "destroy"\n')
    if vif:
        text += (f'vif = ["mac=00:16:3e:00:01:{n:02x}, bridge=xenbr0, backend=netdom, '
                 f'ip=10.0.0.{n}/24"]\n')
    if disk:
        text += (f'disk = ["format=raw, vdev=xvda, access=rw, backend=blkdom, '
                 f'target=disks/{name}.img?size=16M"]\n')
    return text


def pair(workload: str = "net", disk: bool = False) -> dict[str, str]:
    """guest1 (10.0.0.1) and guest2 (10.0.0.2), each running ``workload`` at the other."""
    return {"guest1": net_guest("guest1", 1, f"{workload} peer=10.0.0.2", disk),
            "guest2": net_guest("guest2", 2, f"{workload} peer=10.0.0.1", disk)}
