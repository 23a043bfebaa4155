"""A minimal guest network stack: Ethernet, ARP, IPv4, ICMP echo and UDP.

What it is in Xen
-----------------
Xen moves Ethernet frames and nothing else: netfront hands the guest's
operating system a network device, and the guest's own TCP/IP stack (Linux's,
a BSD's, a unikernel's) gives those frames meaning.  A microxen guest is a
Python process with no kernel network stack of its own behind netfront, so
this module is that stack, reduced to what a person needs to see the split
driver work: ``ping`` with sequence numbers and round-trip times, and UDP
datagrams between ports.

What it does here
-----------------
* :class:`NetStack` sits on a frame interface: it is given an ``async
  send(frame)`` callable and is fed frames with :meth:`NetStack.input` (or runs
  :meth:`NetStack.run` over an ``async receive()``), so it works the same over
  netfront, over a bridge port, over a TAP device, or over an in-memory wire.
* It answers ARP requests for its address and keeps an ARP cache; it resolves
  next hops before sending (with retries and a timeout).
* It answers ICMP echo requests, and :meth:`NetStack.ping` sends them and
  matches replies by identifier and sequence number.
* :meth:`NetStack.udp_bind` gives a :class:`UdpSocket` with ``sendto`` and
  ``recvfrom``.
* The encoders and decoders are plain functions over ``struct``, usable on
  their own (tests use them to build hostile packets).

Invariant: a frame the stack cannot parse, or that is not for it, is counted
in :attr:`NetStack.stats` and dropped; nothing received from the wire can
raise out of :meth:`NetStack.input`.

Why not an existing stack from PyPI (decision)
----------------------------------------------
The candidates in the package index were weighed:

* **scapy** can encode and dissect every protocol here, but it is a packet
  *crafting* tool: a large dependency (hundreds of protocol modules, imported
  lazily but still tens of milliseconds to import and tens of microseconds per
  layer to build or dissect a packet), with no stack state (ARP cache, echo
  matching, sockets) that we would not write anyway.  Using it for encoding
  only would save perhaps 80 lines of ``struct`` calls and cost a heavy
  dependency in every guest process, plus a slower data path in the benchmark.
* **dpkt** / **pypacker** are lighter parsers with the same gap: encoding only.
* **pytcp** is a real pure-Python TCP/IP stack, but it is built to own a
  TAP/TUN interface and its own run loop (threads, daemon mode); bending it
  onto a trio netfront would be more code than this module, and it is a
  young project to depend on.

So this module is our own: about as long as the glue any of those would need,
readable in one sitting, no new dependency.  The project's rule "do not add
dependencies without a strong reason" decided it.

Where this differs from a real stack
------------------------------------
No IP fragmentation or reassembly (fragments are dropped and counted), no IP
options are generated (received options are skipped), no routing beyond "on
the local subnet, else via ``gateway``", no TCP.  The ARP cache never expires
entries on its own (a guest here lives minutes, not months); a new ARP packet
from a host simply refreshes it.
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import struct
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import trio

ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806
ETH_HLEN = 14
ETH_ZLEN = 60            # minimum frame length without the FCS; short frames are padded
BROADCAST_MAC = b"\xff" * 6

IPPROTO_ICMP = 1
IPPROTO_UDP = 17

ICMP_ECHO_REPLY = 0
ICMP_ECHO_REQUEST = 8

ARPOP_REQUEST = 1
ARPOP_REPLY = 2

_ETH = struct.Struct("!6s6sH")
_ARP = struct.Struct("!HHBBH6s4s6s4s")
_IP = struct.Struct("!BBHHHBBH4s4s")
_ICMP_ECHO = struct.Struct("!BBHHH")
_UDP = struct.Struct("!HHHH")

Mac = bytes
Ip = str


class PacketError(ValueError):
    """A packet could not be decoded; the message names the layer and the field."""


# --- addresses ---------------------------------------------------------------------


def parse_mac(text: str | bytes) -> Mac:
    """``"00:16:3e:00:00:01"`` (or 6 raw bytes) to 6 bytes, with a clear error."""
    if isinstance(text, (bytes, bytearray)):
        if len(text) != 6:
            raise ValueError(f"a MAC address is 6 bytes, got {len(text)}")
        return bytes(text)
    parts = text.split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise ValueError(f"MAC address {text!r} is not six colon-separated hex pairs")
    try:
        return bytes(int(p, 16) for p in parts)
    except ValueError:
        raise ValueError(f"MAC address {text!r} has a non-hex digit") from None


def format_mac(mac: Mac) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def _ip_bytes(ip: Ip) -> bytes:
    return ipaddress.IPv4Address(ip).packed


def _ip_str(raw: bytes) -> Ip:
    return str(ipaddress.IPv4Address(raw))


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071): one's complement of the one's complement sum."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


# --- Ethernet -----------------------------------------------------------------------


@dataclass(frozen=True)
class EthernetFrame:
    dst: Mac
    src: Mac
    ethertype: int
    payload: bytes

    def encode(self) -> bytes:
        frame = _ETH.pack(self.dst, self.src, self.ethertype) + self.payload
        return frame if len(frame) >= ETH_ZLEN else frame + bytes(ETH_ZLEN - len(frame))

    @classmethod
    def decode(cls, frame: bytes) -> "EthernetFrame":
        if len(frame) < ETH_HLEN:
            raise PacketError(f"ethernet: frame of {len(frame)} bytes is shorter than "
                              f"the {ETH_HLEN}-byte header")
        dst, src, ethertype = _ETH.unpack_from(frame)
        return cls(dst, src, ethertype, bytes(frame[ETH_HLEN:]))


# --- ARP ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ArpPacket:
    """ARP for IPv4 over Ethernet (RFC 826)."""

    op: int
    sender_mac: Mac
    sender_ip: Ip
    target_mac: Mac
    target_ip: Ip

    def encode(self) -> bytes:
        return _ARP.pack(1, ETH_P_IP, 6, 4, self.op, self.sender_mac, _ip_bytes(self.sender_ip),
                         self.target_mac, _ip_bytes(self.target_ip))

    @classmethod
    def decode(cls, data: bytes) -> "ArpPacket":
        if len(data) < _ARP.size:
            raise PacketError(f"arp: {len(data)} bytes, need {_ARP.size}")
        htype, ptype, hlen, plen, op, sha, spa, tha, tpa = _ARP.unpack_from(data)
        if (htype, ptype, hlen, plen) != (1, ETH_P_IP, 6, 4):
            raise PacketError(f"arp: not IPv4 over Ethernet (htype={htype} ptype={ptype:#x} "
                              f"hlen={hlen} plen={plen})")
        if op not in (ARPOP_REQUEST, ARPOP_REPLY):
            raise PacketError(f"arp: unknown operation {op}")
        return cls(op, sha, _ip_str(spa), tha, _ip_str(tpa))


# --- IPv4 ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Ipv4Packet:
    src: Ip
    dst: Ip
    proto: int
    payload: bytes
    ttl: int = 64
    ident: int = 0

    def encode(self) -> bytes:
        total = 20 + len(self.payload)
        if total > 0xFFFF:
            raise PacketError(f"ipv4: payload of {len(self.payload)} bytes exceeds 65515")
        # DF set: this stack never fragments, so it says so.
        header = _IP.pack(0x45, 0, total, self.ident, 0x4000, self.ttl, self.proto, 0,
                          _ip_bytes(self.src), _ip_bytes(self.dst))
        csum = checksum(header)
        return header[:10] + struct.pack("!H", csum) + header[12:] + self.payload

    @classmethod
    def decode(cls, data: bytes) -> "Ipv4Packet":
        if len(data) < 20:
            raise PacketError(f"ipv4: {len(data)} bytes is shorter than the 20-byte header")
        vihl, _tos, total, ident, frag, ttl, proto, _csum, src, dst = _IP.unpack_from(data)
        version, ihl = vihl >> 4, (vihl & 0xF) * 4
        if version != 4:
            raise PacketError(f"ipv4: version field is {version}")
        if ihl < 20 or ihl > len(data):
            raise PacketError(f"ipv4: header length {ihl} invalid for a {len(data)}-byte packet")
        if total < ihl or total > len(data):
            raise PacketError(f"ipv4: total length {total} but {len(data)} bytes present "
                              f"(header {ihl})")
        if checksum(bytes(data[:ihl])) != 0:
            raise PacketError("ipv4: header checksum mismatch")
        if frag & 0x3FFF:   # MF set or a fragment offset: a fragment
            raise PacketError("ipv4: fragments are not supported by this stack")
        return cls(_ip_str(src), _ip_str(dst), proto, bytes(data[ihl:total]), ttl, ident)


# --- ICMP echo ----------------------------------------------------------------------


@dataclass(frozen=True)
class IcmpEcho:
    type: int          # ICMP_ECHO_REQUEST or ICMP_ECHO_REPLY
    ident: int
    seq: int
    payload: bytes = b""

    def encode(self) -> bytes:
        body = _ICMP_ECHO.pack(self.type, 0, 0, self.ident, self.seq) + self.payload
        csum = checksum(body)
        return body[:2] + struct.pack("!H", csum) + body[4:]

    @classmethod
    def decode(cls, data: bytes) -> "IcmpEcho":
        if len(data) < _ICMP_ECHO.size:
            raise PacketError(f"icmp: {len(data)} bytes, need {_ICMP_ECHO.size}")
        if checksum(data) != 0:
            raise PacketError("icmp: checksum mismatch")
        typ, code, _c, ident, seq = _ICMP_ECHO.unpack_from(data)
        if typ not in (ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY) or code != 0:
            raise PacketError(f"icmp: type {typ} code {code} is not an echo message")
        return cls(typ, ident, seq, bytes(data[_ICMP_ECHO.size:]))


# --- UDP ----------------------------------------------------------------------------


def _pseudo_header(src: Ip, dst: Ip, proto: int, length: int) -> bytes:
    return _ip_bytes(src) + _ip_bytes(dst) + struct.pack("!BBH", 0, proto, length)


@dataclass(frozen=True)
class UdpDatagram:
    sport: int
    dport: int
    payload: bytes

    def encode(self, src: Ip, dst: Ip) -> bytes:
        length = _UDP.size + len(self.payload)
        raw = _UDP.pack(self.sport, self.dport, length, 0) + self.payload
        csum = checksum(_pseudo_header(src, dst, IPPROTO_UDP, length) + raw) or 0xFFFF
        return raw[:6] + struct.pack("!H", csum) + raw[8:]

    @classmethod
    def decode(cls, data: bytes, src: Ip, dst: Ip) -> "UdpDatagram":
        if len(data) < _UDP.size:
            raise PacketError(f"udp: {len(data)} bytes, need {_UDP.size}")
        sport, dport, length, csum = _UDP.unpack_from(data)
        if length < _UDP.size or length > len(data):
            raise PacketError(f"udp: length field {length} but {len(data)} bytes present")
        data = data[:length]
        # A zero checksum means "not computed" (allowed over IPv4).
        if csum and checksum(_pseudo_header(src, dst, IPPROTO_UDP, length) + bytes(data)) != 0:
            raise PacketError("udp: checksum mismatch")
        return cls(sport, dport, bytes(data[_UDP.size:]))


# --- the stack ----------------------------------------------------------------------

SendFrame = Callable[[bytes], Awaitable[None]]
ReceiveFrame = Callable[[], Awaitable[bytes]]


@dataclass
class StackStats:
    rx_frames: int = 0
    tx_frames: int = 0
    dropped: int = 0
    errors: list[str] = field(default_factory=list)   # the last few decode errors

    def error(self, why: str) -> None:
        self.dropped += 1
        self.errors.append(why)
        del self.errors[:-16]


class UdpSocket:
    """A bound UDP port: datagrams for it queue here (bounded; overflow is dropped)."""

    def __init__(self, stack: "NetStack", port: int, backlog: int = 256) -> None:
        self.stack = stack
        self.port = port
        self._send, self._recv = trio.open_memory_channel[tuple[bytes, tuple[Ip, int]]](backlog)
        self.dropped = 0

    def _deliver(self, data: bytes, addr: tuple[Ip, int]) -> None:
        try:
            self._send.send_nowait((data, addr))
        except trio.WouldBlock:
            self.dropped += 1

    async def sendto(self, data: bytes, addr: tuple[Ip, int]) -> None:
        await self.stack.send_udp(self.port, addr[0], addr[1], data)

    async def recvfrom(self) -> tuple[bytes, tuple[Ip, int]]:
        return await self._recv.receive()

    def close(self) -> None:
        self.stack._udp.pop(self.port, None)


class NetStack:
    """One interface's worth of IPv4: an address, a MAC, ARP, ICMP echo and UDP."""

    def __init__(self, mac: str | Mac, ip: Ip, send: SendFrame, prefix_len: int = 24,
                 gateway: Ip | None = None) -> None:
        self.mac = parse_mac(mac)
        self.ip = str(ipaddress.IPv4Address(ip))
        self.network = ipaddress.IPv4Network(f"{ip}/{prefix_len}", strict=False)
        self.gateway = gateway
        self._send_frame = send
        self.arp_cache: dict[Ip, Mac] = {}
        self._arp_waiters: dict[Ip, trio.Event] = {}
        self._echo_waiters: dict[tuple[int, int], trio.Event] = {}
        self._echo_times: dict[tuple[int, int], int] = {}
        self._ping_ident = os.getpid() & 0xFFFF
        self._ping_seq = itertools.count(1)
        self._ip_ident = itertools.count(1)
        self._udp: dict[int, UdpSocket] = {}
        self._ephemeral = itertools.count(49152)
        self.stats = StackStats()
        self.icmp_log: deque[tuple[str, int, int]] = deque(maxlen=64)   # (peer, ident, seq) answered

    # -- input ------------------------------------------------------------------
    async def run(self, receive: ReceiveFrame) -> None:
        """Feed every frame from ``receive`` into the stack, forever."""
        while True:
            await self.input(await receive())

    async def input(self, frame: bytes) -> None:
        """Handle one received Ethernet frame.  Never raises for bad input."""
        self.stats.rx_frames += 1
        try:
            eth = EthernetFrame.decode(frame)
            if eth.dst not in (self.mac, BROADCAST_MAC):
                self.stats.dropped += 1    # not for us (a flooded unicast): silently ignored
                return
            if eth.ethertype == ETH_P_ARP:
                await self._arp_input(ArpPacket.decode(eth.payload))
            elif eth.ethertype == ETH_P_IP:
                await self._ip_input(eth, Ipv4Packet.decode(eth.payload))
            else:
                self.stats.error(f"ethernet: ethertype {eth.ethertype:#06x} not handled")
        except PacketError as exc:
            self.stats.error(str(exc))

    async def _arp_input(self, arp: ArpPacket) -> None:
        # Learn the sender whenever it is talking to us (RFC 826's merge rule, simplified).
        if arp.target_ip == self.ip or arp.sender_ip in self.arp_cache:
            self._learn(arp.sender_ip, arp.sender_mac)
        if arp.op == ARPOP_REQUEST and arp.target_ip == self.ip:
            reply = ArpPacket(ARPOP_REPLY, self.mac, self.ip, arp.sender_mac, arp.sender_ip)
            await self._send_eth(arp.sender_mac, ETH_P_ARP, reply.encode())

    def _learn(self, ip: Ip, mac: Mac) -> None:
        self.arp_cache[ip] = mac
        waiter = self._arp_waiters.pop(ip, None)
        if waiter is not None:
            waiter.set()

    async def _ip_input(self, eth: EthernetFrame, pkt: Ipv4Packet) -> None:
        if pkt.dst != self.ip and pkt.dst != str(self.network.broadcast_address):
            self.stats.dropped += 1
            return
        if pkt.proto == IPPROTO_ICMP:
            try:
                echo = IcmpEcho.decode(pkt.payload)
            except PacketError as exc:
                self.stats.error(str(exc))
                return
            if echo.type == ICMP_ECHO_REQUEST:
                self.icmp_log.append((pkt.src, echo.ident, echo.seq))
                reply = IcmpEcho(ICMP_ECHO_REPLY, echo.ident, echo.seq, echo.payload)
                # Answer straight back to the frame's sender: no ARP round trip needed.
                self.arp_cache.setdefault(pkt.src, eth.src)
                await self._send_ip(pkt.src, IPPROTO_ICMP, reply.encode(), dst_mac=eth.src)
            else:
                waiter = self._echo_waiters.pop((echo.ident, echo.seq), None)
                if waiter is not None:
                    self._echo_times[(echo.ident, echo.seq)] = time.perf_counter_ns()
                    waiter.set()
        elif pkt.proto == IPPROTO_UDP:
            dgram = UdpDatagram.decode(pkt.payload, pkt.src, pkt.dst)
            sock = self._udp.get(dgram.dport)
            if sock is None:
                self.stats.dropped += 1   # a real stack would send ICMP port unreachable
                return
            sock._deliver(dgram.payload, (pkt.src, dgram.sport))
        else:
            self.stats.error(f"ipv4: protocol {pkt.proto} not handled")

    # -- output -----------------------------------------------------------------
    async def _send_eth(self, dst: Mac, ethertype: int, payload: bytes) -> None:
        self.stats.tx_frames += 1
        await self._send_frame(EthernetFrame(dst, self.mac, ethertype, payload).encode())

    def _next_hop(self, dst: Ip) -> Ip:
        if ipaddress.IPv4Address(dst) in self.network:
            return dst
        if self.gateway is None:
            raise OSError(f"no route to {dst}: not on {self.network} and no gateway set")
        return self.gateway

    async def resolve(self, ip: Ip, timeout: float = 1.0, retries: int = 3) -> Mac:
        """The MAC for ``ip`` on this link, from the cache or by ARP."""
        if ip == str(self.network.broadcast_address):
            return BROADCAST_MAC
        for _ in range(retries):
            mac = self.arp_cache.get(ip)
            if mac is not None:
                return mac
            waiter = self._arp_waiters.setdefault(ip, trio.Event())
            request = ArpPacket(ARPOP_REQUEST, self.mac, self.ip, bytes(6), ip)
            await self._send_eth(BROADCAST_MAC, ETH_P_ARP, request.encode())
            with trio.move_on_after(timeout / retries):
                await waiter.wait()
        mac = self.arp_cache.get(ip)
        if mac is None:
            self._arp_waiters.pop(ip, None)
            raise TimeoutError(f"ARP: no answer from {ip} after {retries} requests in {timeout}s")
        return mac

    async def _send_ip(self, dst: Ip, proto: int, payload: bytes, dst_mac: Mac | None = None,
                       timeout: float = 1.0) -> None:
        if dst_mac is None:
            dst_mac = await self.resolve(self._next_hop(dst), timeout)
        pkt = Ipv4Packet(self.ip, dst, proto, payload, ident=next(self._ip_ident) & 0xFFFF)
        await self._send_eth(dst_mac, ETH_P_IP, pkt.encode())

    async def ping(self, dst: Ip, payload: bytes = b"microxen ping", timeout: float = 1.0,
                   seq: int | None = None) -> float:
        """Send one ICMP echo request; return the round-trip time in seconds.

        Raises TimeoutError if no matching reply arrives within ``timeout``.
        """
        seq = (next(self._ping_seq) if seq is None else seq) & 0xFFFF
        key = (self._ping_ident, seq)
        waiter = self._echo_waiters[key] = trio.Event()
        try:
            with trio.fail_after(timeout):
                mac = await self.resolve(self._next_hop(dst), timeout)
                start = time.perf_counter_ns()
                await self._send_ip(dst, IPPROTO_ICMP,
                                    IcmpEcho(ICMP_ECHO_REQUEST, *key, payload).encode(), mac)
                await waiter.wait()
        except trio.TooSlowError:
            raise TimeoutError(f"ping {dst} seq {seq}: no reply within {timeout}s") from None
        finally:
            self._echo_waiters.pop(key, None)
        return (self._echo_times.pop(key) - start) / 1e9

    def udp_bind(self, port: int = 0) -> UdpSocket:
        """Bind a UDP port (0 picks a free ephemeral one)."""
        if port == 0:
            port = next(p for p in self._ephemeral if p not in self._udp)
        if not 0 < port <= 0xFFFF:
            raise ValueError(f"UDP port {port} out of range 1..65535")
        if port in self._udp:
            raise OSError(f"UDP port {port} already bound")
        sock = self._udp[port] = UdpSocket(self, port)
        return sock

    async def send_udp(self, sport: int, dst: Ip, dport: int, data: bytes) -> None:
        if not 0 < dport <= 0xFFFF:
            raise ValueError(f"UDP destination port {dport} out of range 1..65535")
        dgram = UdpDatagram(sport, dport, data).encode(self.ip, dst)
        await self._send_ip(dst, IPPROTO_UDP, dgram)
