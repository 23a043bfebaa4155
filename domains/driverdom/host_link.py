"""The driver domain's link to Linux: a TAP device on the bridge, in a network namespace.

In Xen a network driver domain owns a real NIC, and the bridge joins the
guests' vifs to it, so the outside world can reach the guests.  Here the
"hardware" is a Linux TAP device: frames the bridge sends to it appear on a
Linux interface, and what Linux sends out of that interface enters the bridge.
So Linux's own `ping` (and any program) can talk to the guests.

To keep the host's networking out of it, the driver domain first moves itself
into a network namespace of its own (unshare(CLONE_NEWNET)); the TAP device and
its address live there.  The namespace belongs to the driver domain's process:
when the domain dies, crashes or is destroyed, the kernel removes the namespace
and the TAP device with it, so nothing is ever left behind, and a restarted
driver domain simply makes a fresh one.  The hypervisor channel is unaffected:
its sockets are Unix sockets on the filesystem, which work across network
namespaces.

To reach the guests from Linux (as root):

    nsenter --net=/proc/<netdom pid>/ns/net ping 10.0.0.1

`xl list -l` gives the pid; the driver domain publishes the interface, address
and namespace path under /local/domain/<id>/data/host-link.

Configured with `cmdline = "tap=10.0.0.254/24"` in the driver domain's config;
without it, or when not root, there is no host link (and the domain says why).
"""

from __future__ import annotations

import ctypes
import ipaddress
import logging
import os
import subprocess

from domains.driverdom.bridge import Bridge, TapPort, open_tap, tap_unavailable_reason

log = logging.getLogger("host_link")

CLONE_NEWNET = 0x40000000
TAP_NAME = "xentap0"


class HostLinkError(Exception):
    pass


def _unshare_net() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise HostLinkError(f"unshare(CLONE_NEWNET) failed: {os.strerror(err)}")


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if proc.returncode != 0:
        raise HostLinkError(f"ip {' '.join(args)}: {proc.stderr.strip()}")


def open_host_link(bridge: Bridge, address: str) -> TapPort:
    """Move into a new network namespace, make the TAP device, join it to `bridge`."""
    try:
        ipaddress.ip_interface(address)
    except ValueError:
        raise HostLinkError(f"tap={address!r} is not an address with a prefix, "
                            f"e.g. 10.0.0.254/24") from None
    reason = tap_unavailable_reason()
    if reason:
        raise HostLinkError(reason)
    _unshare_net()
    _ip("link", "set", "lo", "up")
    fd = open_tap(TAP_NAME)
    try:
        _ip("addr", "add", address, "dev", TAP_NAME)
        _ip("link", "set", TAP_NAME, "up")
        return TapPort(bridge, TAP_NAME, fd)
    except BaseException:
        os.close(fd)
        raise


async def run(k, xs, bridge: Bridge, address: str, console) -> None:
    """Serve the host link for the life of the domain (or say why there is none)."""
    node = f"/local/domain/{k.domid}/data/host-link"
    try:
        port = open_host_link(bridge, address)
    except HostLinkError as exc:
        log.warning("no host link: %s", exc)
        await xs.write(node, f"none: {exc}".encode()[:1000])
        await console.write(f"{k.name}: no host link: {exc}\n")
        return
    where = f"/proc/{os.getpid()}/ns/net"
    await xs.write(node, f"{TAP_NAME} {address} netns={where}".encode())
    await console.write(f"{k.name}: host link {TAP_NAME} {address} on {bridge.name} "
                        f"(nsenter --net={where})\n")
    try:
        await port.run()
    finally:
        port.close()
