"""The software Ethernet bridge ``xenbr0`` that joins vifs (and a TAP device).

What it is in Xen
-----------------
In a Xen host each guest's network interface appears in the backend domain as
a ``vif<domid>.<devid>`` device; the hotplug script (``vif-bridge``) plugs it
into a Linux bridge, usually ``xenbr0``, alongside the physical NIC.  The
bridge is an ordinary learning switch (IEEE 802.1D without spanning tree):

* **learning**: every frame's *source* MAC is recorded against the port it
  came in on, in the forwarding database (FDB);
* **forwarding**: a frame to a known unicast MAC goes out of that one port;
* **flooding**: a frame to a broadcast, multicast or unknown MAC goes out of
  every port except the one it came in on;
* **ageing**: an FDB entry not refreshed for ``ageing_time`` seconds (Linux's
  default is 300) is forgotten, so a guest that moved is found again by
  flooding.

What it does here
-----------------
:class:`Bridge` is that switch, in the driver domain's process.  A port is
anything with a ``deliver(frame)`` callable: a netback vif
(:meth:`domains.driverdom.netback.Netback.deliver`), a TAP device
(:class:`TapPort`, the "physical NIC" a host's own Linux reaches), or a test's
list.  A port hands received frames in with :meth:`Bridge.input`.
``deliver`` must not block: a port that cannot take a frame drops it, as a
full transmit queue does.

:class:`TapPort` and :func:`tap_in_netns` give the optional host side: a TAP
device created with ``TUNSETIFF`` on ``/dev/net/tun`` and moved into a network
namespace of its own (``ip netns add``, ``ip link set ... netns``), so that
Linux's own stack (its ``ping``, its sockets) talks to a guest without touching
the host's real interfaces.  That needs root and ``/dev/net/tun``;
:func:`tap_unavailable_reason` says why it cannot be used, for tests to skip.

Invariant: a frame never goes back out of the port it came in on, and a
malformed frame (shorter than an Ethernet header) is counted and dropped.

Where this differs from Xen
---------------------------
Linux's bridge lives in the backend's kernel and learns from the fast path in
C; this one is a dict in Python.  There is no spanning tree (a single bridge
cannot loop), no VLAN filtering and no multicast snooping: multicast is
flooded like broadcast.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import trio

ETH_HLEN = 14
DEFAULT_AGEING_TIME = 300.0      # seconds, as Linux's bridge

Deliver = Callable[[bytes], None]


class BridgeError(Exception):
    """A bridge operation was refused; the message says which and why."""


@dataclass
class BridgePort:
    """One port of the bridge and its counters."""

    name: str
    deliver: Deliver
    rx_frames: int = 0     # frames that came in on this port
    tx_frames: int = 0     # frames the bridge sent out of it
    tx_errors: int = 0     # deliver() raised; the frame is lost for this port only


@dataclass
class FdbEntry:
    port: BridgePort
    last_seen: float


@dataclass
class BridgeStats:
    forwarded: int = 0
    flooded: int = 0
    filtered: int = 0      # destination is on the ingress port: nothing to do
    malformed: int = 0
    unknown_port: int = 0


@dataclass
class Bridge:
    """A learning Ethernet switch: ``Bridge("xenbr0")``."""

    name: str = "xenbr0"
    ageing_time: float = DEFAULT_AGEING_TIME
    clock: Callable[[], float] = time.monotonic
    ports: dict[str, BridgePort] = field(default_factory=dict)
    fdb: dict[bytes, FdbEntry] = field(default_factory=dict)
    stats: BridgeStats = field(default_factory=BridgeStats)

    # -- ports ------------------------------------------------------------------
    def add_port(self, name: str, deliver: Deliver) -> BridgePort:
        """``brctl addif``: attach a port; names are unique on a bridge."""
        if name in self.ports:
            raise BridgeError(f"{self.name}: port {name!r} is already attached")
        port = self.ports[name] = BridgePort(name, deliver)
        return port

    def remove_port(self, name: str) -> None:
        """``brctl delif``: detach a port and forget every MAC learnt on it."""
        port = self.ports.pop(name, None)
        if port is None:
            raise BridgeError(f"{self.name}: no port named {name!r}")
        for mac in [m for m, e in self.fdb.items() if e.port is port]:
            del self.fdb[mac]

    # -- the switch ---------------------------------------------------------------
    def input(self, ingress: str | BridgePort, frame: bytes) -> None:
        """A frame arrived on port ``ingress``: learn its source, then forward or flood."""
        port = ingress if isinstance(ingress, BridgePort) else self.ports.get(ingress)
        if port is None or self.ports.get(port.name) is not port:
            self.stats.unknown_port += 1     # a port removed while its frame was in flight
            return
        port.rx_frames += 1
        if len(frame) < ETH_HLEN:
            self.stats.malformed += 1
            return
        dst, src = bytes(frame[0:6]), bytes(frame[6:12])
        now = self.clock()
        if not src[0] & 1:                  # never learn a multicast/broadcast source
            entry = self.fdb.get(src)
            if entry is None:
                self.fdb[src] = FdbEntry(port, now)
            else:
                entry.port, entry.last_seen = port, now
        if not dst[0] & 1:
            entry = self.fdb.get(dst)
            if entry is not None and now - entry.last_seen > self.ageing_time:
                del self.fdb[dst]
                entry = None
            if entry is not None:
                if entry.port is port:
                    self.stats.filtered += 1
                else:
                    self.stats.forwarded += 1
                    self._send(entry.port, frame)
                return
        self.stats.flooded += 1
        for other in list(self.ports.values()):
            if other is not port:
                self._send(other, frame)

    def _send(self, port: BridgePort, frame: bytes) -> None:
        try:
            port.deliver(frame)
            port.tx_frames += 1
        except Exception:   # one broken port must not stop the bridge for the others
            port.tx_errors += 1

    def age(self) -> int:
        """Drop every FDB entry older than ``ageing_time``; return how many went."""
        now = self.clock()
        stale = [m for m, e in self.fdb.items() if now - e.last_seen > self.ageing_time]
        for mac in stale:
            del self.fdb[mac]
        return len(stale)

    def lookup(self, mac: bytes) -> str | None:
        """The port name a MAC was last seen on (``brctl showmacs``), if still fresh."""
        entry = self.fdb.get(mac)
        if entry is None or self.clock() - entry.last_seen > self.ageing_time:
            return None
        return entry.port.name


# --- the optional host side: a TAP device in a network namespace -------------------

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
MAX_FRAME = 65535 + ETH_HLEN


def tap_unavailable_reason() -> str | None:
    """Why a TAP device cannot be made here, or None if it can."""
    if os.geteuid() != 0:
        return "creating a TAP device and a network namespace needs root"
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun does not exist (no tun driver in this kernel/container)"
    if shutil.which("ip") is None:
        return "the 'ip' command (iproute2) is not installed"
    return None


def open_tap(name: str) -> int:
    """Create TAP device ``name`` (TUNSETIFF, no packet-info header); return its fd.

    The device lives as long as the descriptor: closing it removes the device.
    """
    if len(name.encode()) > 15:
        raise BridgeError(f"interface name {name!r} longer than 15 bytes (IFNAMSIZ)")
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        ifr = struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI)
        fcntl.ioctl(fd, TUNSETIFF, ifr)
        os.set_blocking(fd, False)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if proc.returncode != 0:
        raise BridgeError(f"ip {' '.join(args)} failed: {proc.stderr.strip()}")


@contextmanager
def tap_in_netns(tap_name: str, netns: str, address: str) -> Iterator[int]:
    """A TAP device inside a fresh network namespace, addressed and up.

    Yields the TAP fd (the bridge's end).  Linux's end is ``tap_name`` inside
    ``netns`` with ``address`` (CIDR, e.g. ``"10.99.0.1/24"``); run a command
    there with ``ip netns exec NETNS ...``.  Both are removed on exit.
    """
    reason = tap_unavailable_reason()
    if reason:
        raise BridgeError(reason)
    _ip("netns", "add", netns)
    fd = -1
    try:
        fd = open_tap(tap_name)
        _ip("link", "set", tap_name, "netns", netns)
        _ip("-n", netns, "addr", "add", address, "dev", tap_name)
        _ip("-n", netns, "link", "set", tap_name, "up")
        yield fd
    finally:
        if fd >= 0:
            os.close(fd)
        subprocess.run(["ip", "netns", "del", netns], capture_output=True, timeout=10)


class TapPort:
    """A bridge port backed by a TAP fd: the host's Linux stack is the far end."""

    def __init__(self, bridge: Bridge, name: str, fd: int) -> None:
        self.bridge = bridge
        self.fd = fd
        self.port = bridge.add_port(name, self.deliver)
        self.dropped = 0

    def deliver(self, frame: bytes) -> None:
        try:
            os.write(self.fd, frame)
        except OSError as exc:
            # EAGAIN: Linux's queue is full; EIO: the device is down.  Drop, as a NIC would.
            if exc.errno not in (errno.EAGAIN, errno.EIO):
                raise
            self.dropped += 1

    async def run(self) -> None:
        """Read frames Linux sends out of the TAP device into the bridge, forever."""
        while True:
            await trio.lowlevel.wait_readable(self.fd)
            while True:
                try:
                    frame = os.read(self.fd, MAX_FRAME)
                except BlockingIOError:
                    break
                self.bridge.input(self.port, frame)

    def close(self) -> None:
        if self.port.name in self.bridge.ports:
            self.bridge.remove_port(self.port.name)
