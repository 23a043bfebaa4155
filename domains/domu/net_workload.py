"""The ``ping`` and ``net`` guest workloads: traffic to another guest, checked end to end.

What they are for
    The network half of the driver-isolation story needs a checker as much as
    the disk half: these workloads send traffic through netfront, the driver
    domain's netback and bridge, and the other guest's netfront, and count
    what came back, what was lost, duplicated, reordered or corrupted.

What they do
    Both bring up the guest's first vif (:mod:`domains.domu.netif_frontend`)
    with a :class:`~domains.domu.netstack.NetStack` on it, at the address the
    toolstack wrote in the vif's ``ip=``; both answer pings and ARP.

    * ``ping``: ping the peer every ``ping_interval`` seconds.  One *op* is one
      ping answered.  While a ping is unanswered another goes every
      ``ping_interval``, as Linux's ``ping -i`` does, each with the next
      sequence number and each waiting ``ping_timeout`` for its reply; a
      round in which all of them timed out counts in ``ping_timeouts``, not
      as an error: while the driver domain restarts, pings are delayed, not
      failed.  No ping is sent while the vif has no backend (it would only
      wait in netfront); one in flight when the vif reconnects is sent again
      at once, and a reconnection during the pause between two pings ends
      the pause.  A ping still unanswered after ``give_up`` seconds of
      retrying is an *error*.
    * ``net``: ``ping`` plus a UDP stream.  Every ``udp_interval`` seconds a
      datagram goes to the peer's ``udp_port``; it carries a magic, the
      sender's domid, a sequence number and a body derived from them.  The
      receiver checks each one: a body that does not match its header is a
      *verify failure* (corruption); a sequence number seen before is a
      duplicate (``udp_dup``), one lower than the highest seen is reordered
      (``udp_reordered``); numbers never seen below the highest are lost
      (``udp_lost``).  UDP promises nothing, so loss and duplication are
      counted, not errors; netfront replays its in-flight packets after a
      reconnect, which is why duplicates can appear.

    Counters go to ``/local/domain/<id>/data/workload/`` (each prefixed when
    run as part of a combined workload such as ``disk+net``): ``ops``,
    ``errors``, ``verify_failures``, ``ping_ok``, ``ping_timeouts``,
    ``rtt_last_us``, ``rtt_max_us``, ``rtt_p50_us``/``rtt_p99_us`` (of the
    last 1000 pings), ``udp_tx``, ``udp_rx``, ``udp_rx_bytes``, ``udp_lost``,
    ``udp_dup``, ``udp_reordered``, ``reconnects``, ``at`` (wall clock of the
    snapshot, so rates between two snapshots are exact), and ``recovered_at``
    (wall clock of the first answered ping after the latest reconnect of the
    vif, for the recovery-time benchmark).  Each snapshot writes the counters
    that changed since the last one, all at once, then ``at``.

Configuration
    The guest's xl.cfg ``workload`` string carries the arguments as
    ``key=value`` words after the workload's name, for example::

        workload = "disk+net peer=10.0.0.2"
        workload = "net peer=10.0.0.1 udp_interval=0.005"

    ``peer=IP`` (no default: without it the guest only answers),
    ``ping_interval`` (0.05 s), ``ping_timeout`` (0.5 s), ``give_up`` (30 s),
    ``udp_port`` (7001), ``udp_interval`` (0.01 s), ``udp_size`` (64 bytes).
"""

from __future__ import annotations

import hashlib
import itertools
import struct
import time
from collections import deque

import trio

from domains.domu.netif_frontend import open_vif
from domains.kernel import faultpoint
from domains.kernel.xenbus import write_nodes
from domains.domu.netstack import NetStack

_HEAD = struct.Struct("<8sIQ")       # magic, sender domid, sequence number
MAGIC = b"mxudp001"
#: Sequence numbers remembered for duplicate detection (a sliding window).
WINDOW = 8192
#: Round-trip times kept for the published percentiles (rtt_p50_us, rtt_p99_us).
RTT_WINDOW = 1000


class _Reconnected(Exception):
    """The vif reconnected while a ping was out: send another at once."""


def datagram(domid: int, seq: int, size: int) -> bytes:
    head = _HEAD.pack(MAGIC, domid, seq)
    seed = hashlib.blake2b(head, digest_size=32).digest()
    body = (seed * (max(0, size - len(head)) // len(seed) + 1))[:max(0, size - len(head))]
    return head + body


class SequenceChecker:
    """What a UDP receiver saw from each sender: loss, duplicates, reordering."""

    def __init__(self) -> None:
        self.highest: dict[int, int] = {}
        self.seen: dict[int, set[int]] = {}
        self.received = 0        # distinct datagrams
        self.distinct: dict[int, int] = {}
        self.dup = 0
        self.reordered = 0
        self.corrupt = 0

    def check(self, data: bytes) -> bool:
        """Account for one datagram; False if its body does not match its header."""
        try:
            magic, sender, seq = _HEAD.unpack_from(data)
        except struct.error:
            self.corrupt += 1
            return False
        if magic != MAGIC or data != datagram(sender, seq, len(data)):
            self.corrupt += 1
            return False
        seen = self.seen.setdefault(sender, set())
        high = self.highest.get(sender, -1)
        if seq in seen or seq <= high - WINDOW:
            self.dup += 1          # (below the window we cannot tell: call it a duplicate)
            return True
        seen.add(seq)
        self.received += 1
        self.distinct[sender] = self.distinct.get(sender, 0) + 1
        if seq < high:
            self.reordered += 1
        else:
            self.highest[sender] = seq
            if len(seen) > 2 * WINDOW:
                floor = seq - WINDOW
                self.seen[sender] = {s for s in seen if s > floor}
        return True

    @property
    def lost(self) -> int:
        """Sequence numbers below the highest seen that never arrived."""
        return sum(self.highest[s] + 1 - self.distinct.get(s, 0) for s in self.highest)


async def run(k, xs, console, udp: bool = True, prefix: str = "") -> None:
    args = k.cmdline
    peer = args.get("peer")
    ping_interval = float(args.get("ping_interval", 0.05))
    ping_timeout = float(args.get("ping_timeout", 0.5))
    give_up = float(args.get("give_up", 30.0))
    udp_port = int(args.get("udp_port", 7001))
    udp_interval = float(args.get("udp_interval", 0.01))
    udp_size = max(_HEAD.size, min(1400, int(args.get("udp_size", 64))))
    base = f"/local/domain/{k.domid}/data/workload"
    counters = {"ops": 0, "errors": 0, "verify_failures": 0, "ping_ok": 0, "ping_timeouts": 0,
                "rtt_last_us": 0, "rtt_max_us": 0, "udp_tx": 0, "udp_rx": 0, "udp_lost": 0,
                "udp_dup": 0, "udp_reordered": 0, "udp_rx_bytes": 0, "reconnects": 0,
                "rtt_p50_us": 0, "rtt_p99_us": 0}
    checker = SequenceChecker()
    rtts: deque[int] = deque(maxlen=RTT_WINDOW)

    published: dict[str, str] = {}

    async def publish() -> None:
        if rtts:
            ordered = sorted(rtts)
            counters["rtt_p50_us"] = ordered[len(ordered) // 2]
            counters["rtt_p99_us"] = ordered[min(len(ordered) - 1, len(ordered) * 99 // 100)]
        changed = {key: str(value) for key, value in counters.items()
                   if published.get(key) != str(value)}
        await write_nodes(xs, ((f"{base}/{prefix}{key}", value) for key, value in changed.items()))
        published.update(changed)
        # When these values were true: rates are exact between two snapshots.
        await xs.write(f"{base}/{prefix}at", repr(time.time()).encode())

    async with trio.open_nursery() as nursery:
        vif = await open_vif(k, xs, nursery)
        if vif.ip is None:
            counters["errors"] += 1
            await publish()
            await console.write(f"{k.name}: vif {vif.dev.nodename} has no ip= in its backend "
                                f"directory; the net workload needs one\n")
            return
        stack = NetStack(vif.mac, vif.ip, vif.nf.send, prefix_len=vif.prefix_len)
        nursery.start_soon(stack.run, vif.nf.receive)
        await console.write(f"{k.name}: net workload on {vif.dev.nodename}: {vif.ip}/"
                            f"{vif.prefix_len} mac {vif.mac}, peer {peer or '(none: answering only)'}"
                            f"{', with UDP' if udp else ''}\n")
        seen_reconnects = 0

        seqs = itertools.count(1)

        async def ping_or_reconnect() -> float:
            """Ping until one is answered, as ``ping -i`` does: while none is,
            another echo request goes every ``ping_interval`` (for as long as
            ``ping_timeout``), each waiting ``ping_timeout`` for its reply;
            TimeoutError once all have.  If the vif reconnects meanwhile, give
            up on them at once (_Reconnected): a ping lost with a crashed
            driver domain is never answered, and waiting out its timeout
            would hide how soon the new one served."""
            c0 = vif.stats["connects"]
            rtt: float | None = None
            failed: OSError | None = None       # TimeoutError is one
            reconnected = False
            out = 0                              # pings sent and not yet timed out
            sending = True
            async with trio.open_nursery() as nursery:
                async def attempt(seq: int) -> None:
                    nonlocal rtt, failed, out
                    try:
                        rtt = await stack.ping(peer, seq=seq, timeout=ping_timeout)
                    except TimeoutError as exc:
                        failed, out = failed or exc, out - 1
                        if out or sending:
                            return               # a later one may yet be answered
                    except OSError as exc:
                        failed = exc
                    nursery.cancel_scope.cancel()

                async def sender() -> None:
                    nonlocal out, sending
                    for n in itertools.count(1):
                        out += 1
                        nursery.start_soon(attempt, next(seqs))
                        if ping_interval <= 0 or n * ping_interval >= ping_timeout:
                            break
                        await trio.sleep(ping_interval)
                    sending = False

                async def reconnect() -> None:
                    nonlocal reconnected
                    await vif.wait_reconnected(c0)
                    reconnected = True
                    nursery.cancel_scope.cancel()
                nursery.start_soon(sender)
                nursery.start_soon(reconnect)
            if rtt is not None:
                return rtt
            if reconnected:
                raise _Reconnected
            raise failed or TimeoutError("ping: no answer")

        async def pinger() -> None:
            nonlocal seen_reconnects
            while True:
                started = time.monotonic()
                while True:
                    if not vif.connected:
                        # A ping sent now would only wait in netfront for the
                        # next backend: send it when the vif is back.
                        with trio.move_on_after(max(0.0, started + give_up - time.monotonic())):
                            await vif.wait_connected()
                    try:
                        rtt = await ping_or_reconnect()
                    except _Reconnected:
                        continue        # the new backend is up: ask again now
                    except TimeoutError:
                        counters["ping_timeouts"] += 1
                        if time.monotonic() - started > give_up:
                            counters["errors"] += 1
                            await console.write(f"ping {peer}: no answer for {give_up}s\n")
                            break
                        continue
                    except OSError as exc:      # no route: a configuration error
                        counters["errors"] += 1
                        await console.write(f"ping {peer}: {exc}\n")
                        return
                    counters["ping_ok"] += 1
                    counters["ops"] += 1
                    counters["rtt_last_us"] = int(rtt * 1e6)
                    rtts.append(int(rtt * 1e6))
                    counters["rtt_max_us"] = max(counters["rtt_max_us"], int(rtt * 1e6))
                    r = vif.stats["reconnects"]
                    if r > seen_reconnects:
                        seen_reconnects = r
                        await xs.write(f"{base}/{prefix}recovered_at", repr(time.time()).encode())
                    break
                # Between pings, a new backend cuts the wait short: the first
                # ping after a driver domain's restart goes as soon as the vif
                # is back, so ``recovered_at`` does not depend on where in its
                # interval the crash happened.
                c0 = vif.stats["connects"]
                with trio.move_on_after(ping_interval):
                    await vif.wait_reconnected(c0)

        async def udp_sender() -> None:
            sock = stack.udp_bind(0)
            seq = 0
            while True:
                try:
                    await sock.sendto(datagram(k.domid, seq, udp_size), (peer, udp_port))
                    seq += 1
                    counters["udp_tx"] = seq
                except TimeoutError:
                    await trio.sleep(ping_timeout)     # ARP not answered yet: try again
                    continue
                except OSError as exc:
                    # A send that fails (no backend for a moment, no grant free) is
                    # an error to count, not a reason to stop the stream for good.
                    counters["errors"] += 1
                    await console.write(f"udp to {peer}: {exc}\n")
                    await trio.sleep(ping_timeout)
                    continue
                await trio.sleep(udp_interval)

        async def udp_receiver() -> None:
            sock = stack.udp_bind(udp_port)
            while True:
                data, _addr = await sock.recvfrom()
                if checker.check(data):
                    faultpoint.count("net.rx")      # for dom0's fault-campaign probes
                    counters["udp_rx"] = checker.received
                    counters["udp_rx_bytes"] += len(data)
                    counters["ops"] += 1
                else:
                    counters["verify_failures"] += 1
                    await console.write(f"UDP VERIFY FAILURE: {data[:24].hex()}...\n")

        async def publisher() -> None:
            while True:
                counters["reconnects"] = vif.stats["reconnects"]
                counters["udp_lost"] = checker.lost
                counters["udp_dup"] = checker.dup
                counters["udp_reordered"] = checker.reordered
                await publish()
                await trio.sleep(0.5)

        nursery.start_soon(publisher)
        if udp:
            nursery.start_soon(udp_receiver)
        if peer:
            nursery.start_soon(pinger)
            if udp:
                nursery.start_soon(udp_sender)
