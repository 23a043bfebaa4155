"""The guest network stack: encoders/decoders, ARP, ping, UDP, hostile input."""

from __future__ import annotations

import struct

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from domains.domu.netstack import (ARPOP_REPLY, ARPOP_REQUEST, BROADCAST_MAC, ETH_P_ARP,
                                   ETH_P_IP, ICMP_ECHO_REQUEST, IPPROTO_UDP, ArpPacket,
                                   EthernetFrame, IcmpEcho, Ipv4Packet, NetStack, PacketError,
                                   UdpDatagram, checksum, format_mac, parse_mac)

A_MAC, B_MAC = "00:16:3e:00:00:0a", "00:16:3e:00:00:0b"


def test_checksum_known_value():
    # RFC 1071's worked example: words 0001 f203 f4f5 f6f7 sum to ddf2, complement 220d.
    assert checksum(bytes.fromhex("0001f203f4f5f6f7")) == 0x220D
    assert checksum(b"\x01") == checksum(b"\x01\x00")


def test_mac_parsing():
    assert format_mac(parse_mac(A_MAC)) == A_MAC
    with pytest.raises(ValueError, match="six colon-separated"):
        parse_mac("00:16:3e")
    with pytest.raises(ValueError, match="non-hex"):
        parse_mac("00:16:3e:zz:00:01")


def test_round_trips():
    eth = EthernetFrame(BROADCAST_MAC, parse_mac(A_MAC), ETH_P_ARP, b"abc")
    enc = eth.encode()
    assert len(enc) == 60                                   # padded to the minimum
    assert EthernetFrame.decode(enc).payload[:3] == b"abc"
    arp = ArpPacket(ARPOP_REQUEST, parse_mac(A_MAC), "10.0.0.1", bytes(6), "10.0.0.2")
    assert ArpPacket.decode(arp.encode()) == arp
    ip = Ipv4Packet("10.0.0.1", "10.0.0.2", IPPROTO_UDP, b"payload", ident=7)
    assert Ipv4Packet.decode(ip.encode()) == ip
    assert checksum(ip.encode()[:20]) == 0
    echo = IcmpEcho(ICMP_ECHO_REQUEST, 0x1234, 9, b"data")
    assert IcmpEcho.decode(echo.encode()) == echo
    udp = UdpDatagram(1000, 2000, b"hi")
    assert UdpDatagram.decode(udp.encode("10.0.0.1", "10.0.0.2"), "10.0.0.1", "10.0.0.2") == udp


def test_decoders_name_what_is_wrong():
    with pytest.raises(PacketError, match="ethernet: frame of 3 bytes"):
        EthernetFrame.decode(b"abc")
    good = Ipv4Packet("10.0.0.1", "10.0.0.2", 17, b"x").encode()
    with pytest.raises(PacketError, match="header checksum"):
        Ipv4Packet.decode(good[:11] + bytes([good[11] ^ 1]) + good[12:])
    with pytest.raises(PacketError, match="version field is 6"):
        Ipv4Packet.decode(bytes([0x65]) + good[1:])
    udp = UdpDatagram(1, 2, b"abc").encode("10.0.0.1", "10.0.0.2")
    with pytest.raises(PacketError, match="udp: checksum"):
        UdpDatagram.decode(udp, "10.0.0.1", "10.0.0.3")
    frag = bytearray(good)
    frag[6:8] = struct.pack("!H", 0x2000)          # MF set
    frag[10:12] = b"\0\0"
    frag[10:12] = struct.pack("!H", checksum(bytes(frag[:20])))
    with pytest.raises(PacketError, match="fragments"):
        Ipv4Packet.decode(bytes(frag))


class Wire:
    """Two stacks joined by an in-memory link (each direction a trio channel)."""

    def __init__(self) -> None:
        self.a_tx, self.b_rx = trio.open_memory_channel(100)
        self.b_tx, self.a_rx = trio.open_memory_channel(100)
        self.a = NetStack(A_MAC, "10.0.0.1", self.a_tx.send)
        self.b = NetStack(B_MAC, "10.0.0.2", self.b_tx.send)
        self.frames_seen: list[bytes] = []

    async def run(self, nursery: trio.Nursery) -> None:
        nursery.start_soon(self.a.run, self.a_rx.receive)
        nursery.start_soon(self.b.run, self.b_rx.receive)


def test_ping_resolves_by_arp_and_matches_sequence_numbers():
    async def main():
        w = Wire()
        async with trio.open_nursery() as n:
            await w.run(n)
            with trio.fail_after(5):
                rtt1 = await w.a.ping("10.0.0.2", seq=1)
                rtt2 = await w.a.ping("10.0.0.2", seq=2, payload=b"x" * 1000)
            assert rtt1 >= 0 and rtt2 >= 0
            assert w.a.arp_cache["10.0.0.2"] == parse_mac(B_MAC)
            assert w.b.arp_cache["10.0.0.1"] == parse_mac(A_MAC)   # learnt from the request
            assert [seq for _ip, _id, seq in w.b.icmp_log] == [1, 2]
            n.cancel_scope.cancel()
    trio.run(main)


def test_ping_to_nobody_times_out_with_a_clear_error():
    async def main():
        w = Wire()
        async with trio.open_nursery() as n:
            await w.run(n)
            with pytest.raises(TimeoutError, match="10.0.0.99"):
                await w.a.ping("10.0.0.99", timeout=0.2)
            with pytest.raises(OSError, match="no route to 192.168.1.1"):
                await w.a.ping("192.168.1.1", timeout=0.2)
            n.cancel_scope.cancel()
    trio.run(main)


def test_udp_between_two_stacks():
    async def main():
        w = Wire()
        async with trio.open_nursery() as n:
            await w.run(n)
            server = w.b.udp_bind(7)
            client = w.a.udp_bind()
            with trio.fail_after(5):
                await client.sendto(b"ping!", ("10.0.0.2", 7))
                data, addr = await server.recvfrom()
                assert data == b"ping!" and addr == ("10.0.0.1", client.port)
                await server.sendto(data.upper(), addr)
                assert await client.recvfrom() == (b"PING!", ("10.0.0.2", 7))
            with pytest.raises(OSError, match="already bound"):
                w.b.udp_bind(7)
            n.cancel_scope.cancel()
    trio.run(main)


def test_frames_for_someone_else_and_unknown_ports_are_dropped():
    async def main():
        sent = []

        async def send(f):
            sent.append(f)
        s = NetStack(A_MAC, "10.0.0.1", send)
        other = EthernetFrame(parse_mac(B_MAC), parse_mac(B_MAC), ETH_P_IP, b"").encode()
        await s.input(other)
        pkt = Ipv4Packet("10.0.0.2", "10.0.0.1", IPPROTO_UDP,
                         UdpDatagram(5, 9999, b"x").encode("10.0.0.2", "10.0.0.1")).encode()
        await s.input(EthernetFrame(parse_mac(A_MAC), parse_mac(B_MAC), ETH_P_IP, pkt).encode())
        assert s.stats.dropped == 2 and sent == []
        # An ARP request for us is answered even with nothing else going on.
        req = ArpPacket(ARPOP_REQUEST, parse_mac(B_MAC), "10.0.0.2", bytes(6), "10.0.0.1")
        await s.input(EthernetFrame(BROADCAST_MAC, parse_mac(B_MAC), ETH_P_ARP, req.encode()).encode())
        reply = ArpPacket.decode(EthernetFrame.decode(sent[0]).payload)
        assert reply.op == ARPOP_REPLY and reply.sender_mac == parse_mac(A_MAC)
    trio.run(main)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.sampled_from([ETH_P_IP, ETH_P_ARP, 0x86DD]))
def test_garbage_never_raises(payload, ethertype):
    async def main():
        async def send(_f):
            pass
        s = NetStack(A_MAC, "10.0.0.1", send)
        await s.input(payload)
        await s.input(EthernetFrame(parse_mac(A_MAC), parse_mac(B_MAC), ethertype, payload).encode())
    trio.run(main)
