"""Linux's own network stack talks to a guest through a TAP port on the bridge.

    Linux (in a private netns, 10.99.0.1) <-> TAP <-> xenbr0 <-> netback
        <-> rings <-> netfront <-> guest stack (10.99.0.2)

The TAP device lives in a network namespace made for the test, so the host's
interfaces are never touched.  Needs root and /dev/net/tun; skipped with the
reason otherwise.  There is no ``ping`` binary in this image, so Linux's side
is a short Python program run with ``ip netns exec`` using a raw ICMP socket
(the kernel itself answers the guest's pings).
"""

from __future__ import annotations

import os
import sys
import textwrap

import pytest
import trio

from domains.domu.netstack import NetStack
from domains.driverdom.bridge import Bridge, TapPort, tap_in_netns, tap_unavailable_reason
from tests.test_net_split import vifs

reason = tap_unavailable_reason()
pytestmark = [pytest.mark.skipif(reason is not None, reason=reason or ""),
              pytest.mark.timeout(60)]

LINUX_SIDE = textwrap.dedent("""
    import socket, struct, os
    def csum(b):
        b += b"\\0" * (len(b) % 2)
        s = sum(struct.unpack(f"!{len(b)//2}H", b))
        while s >> 16: s = (s & 0xFFFF) + (s >> 16)
        return ~s & 0xFFFF
    icmp = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    icmp.settimeout(5)
    ident = os.getpid() & 0xFFFF
    for seq in (1, 2, 3):
        body = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + b"from linux"
        body = body[:2] + struct.pack("!H", csum(body)) + body[4:]
        icmp.sendto(body, ("10.99.0.2", 0))
        while True:
            pkt = icmp.recv(2048)
            ihl = (pkt[0] & 15) * 4
            t, _c, _s, i, q = struct.unpack_from("!BBHHH", pkt, ihl)
            if t == 0 and i == ident and q == seq:
                print("reply", seq, flush=True)
                break
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.settimeout(5)
    udp.sendto(b"hello guest", ("10.99.0.2", 7))
    data, addr = udp.recvfrom(2048)
    print("udp", data.decode(), addr[0], flush=True)
""")


def test_linux_and_a_guest_ping_each_other_through_the_bridge():
    async def main():
        ns = f"microxen-test-{os.getpid()}"
        with tap_in_netns(f"mxtap{os.getpid() % 100000}", ns, "10.99.0.1/24") as fd:
            bridge = Bridge("xenbr0")
            tap = TapPort(bridge, "tap0", fd)
            async with vifs(1, bridge=bridge) as (_x, (nf,), (vif,), _b):
                async with trio.open_nursery() as n:
                    n.start_soon(tap.run)
                    stack = NetStack("00:16:3e:00:00:02", "10.99.0.2", nf.send)
                    n.start_soon(stack.run, nf.receive)
                    echo = stack.udp_bind(7)

                    async def echo_server():
                        data, addr = await echo.recvfrom()
                        await echo.sendto(data.upper(), addr)
                    n.start_soon(echo_server)
                    # guest -> Linux: the kernel in the namespace answers.
                    with trio.fail_after(10):
                        rtts = [await stack.ping("10.99.0.1", seq=s, timeout=5) for s in (1, 2, 3)]
                    assert len(rtts) == 3
                    # Linux -> guest: raw ICMP and a UDP socket inside the namespace.
                    with trio.fail_after(20):
                        proc = await trio.run_process(
                            ["ip", "netns", "exec", ns, sys.executable, "-c", LINUX_SIDE],
                            capture_stdout=True, capture_stderr=True, check=False)
                    out = proc.stdout.decode()
                    assert proc.returncode == 0, proc.stderr.decode()
                    assert out.splitlines() == ["reply 1", "reply 2", "reply 3",
                                                "udp HELLO GUEST 10.99.0.2"]
                    assert [q for _ip, _i, q in stack.icmp_log] == [1, 2, 3]
                    assert vif.error is None
                    n.cancel_scope.cancel()
            tap.close()
    trio.run(main)
