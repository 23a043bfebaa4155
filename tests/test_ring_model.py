"""Property tests: the ring against a plain-Python model of a FIFO pair.

Hypothesis drives a frontend and a backend through random interleavings of
ring.h operations, starting from index values near 2**32 so the free-running
counters wrap.  The model checks:

* requests and responses come out in order and intact;
* the unconsumed counts are what the model says;
* the notify decision is exactly "the peer's event index lies in the range
  just published" (computed with unbounded integers, not u32 tricks);
* no lost wakeups: once a side has gone to sleep (final check said "no work"),
  the next push of new entries to it must say "notify".
"""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from ipc.ring import BackRing, FrontRing

U32 = 1 << 32
ENTRY = 24


def in_published_range(old: int, new: int, event: int) -> bool:
    """Is ``event`` one of old+1 .. new, counted on the unwrapped number line?"""
    n = (new - old) % U32
    return any((old + k) % U32 == event for k in range(1, n + 1))


class RingPair(RuleBasedStateMachine):
    @initialize(
        start=st.one_of(st.just(0), st.integers(U32 - 300, U32 - 1),
                        st.integers(0, U32 - 1)),
        pages=st.sampled_from([1, 2]),
        entry=st.sampled_from([ENTRY, 512, 1000]),
    )
    def setup(self, start, pages, entry):
        self.buf = bytearray(4096 * pages)
        self.front = FrontRing.init(self.buf, entry, start=start)
        self.back = BackRing(self.buf, entry, start=start)
        self.size = self.front.size
        self.next_id = 0
        self.in_flight: list[int] = []     # pushed, not yet taken by the backend
        self.unpushed: list[int] = []      # written by the front, not pushed
        self.taken: list[int] = []         # taken by the backend, not answered
        self.unpushed_rsp: list[int] = []  # answered, not pushed
        self.rsp_in_flight: list[int] = []  # pushed responses, not consumed
        self.back_asleep = False
        self.front_asleep = False

    def outstanding(self) -> int:
        return (len(self.unpushed) + len(self.in_flight) + len(self.taken)
                + len(self.unpushed_rsp) + len(self.rsp_in_flight))

    @staticmethod
    def req(i: int) -> bytes:
        return struct.pack("<QQQ", i, i * 7 + 1, ~i & (2**64 - 1))

    @staticmethod
    def rsp(i: int) -> bytes:
        return struct.pack("<QQ", i, 0xABCDEF ^ i)

    # -- frontend --------------------------------------------------------------------
    # Small batches matter most: a push of exactly one entry is where an
    # off-by-one in the event arithmetic shows.
    @rule(k=st.one_of(st.integers(1, 2), st.integers(1, 40)))
    def front_put(self, k):
        k = min(k, self.size - self.outstanding())
        if k <= 0:
            return
        assert self.front.free_requests() >= k
        for _ in range(k):
            self.front.put_request(self.req(self.next_id))
            self.unpushed.append(self.next_id)
            self.next_id += 1

    @rule()
    def front_push(self):
        old = self.back.sring.req_prod
        event = self.back.sring.req_event
        new = self.front.req_prod_pvt
        notify = self.front.push_requests_and_check_notify()
        assert notify == in_published_range(old, new, event)
        if self.back_asleep and self.unpushed:
            assert notify, "lost wakeup: backend asleep and not notified"
        if notify:
            self.back_asleep = False
        self.in_flight += self.unpushed
        self.unpushed = []

    @rule(k=st.integers(1, 50))
    def front_consume(self, k):
        assert self.front.unconsumed_responses() == len(self.rsp_in_flight)
        for _ in range(min(k, len(self.rsp_in_flight))):
            got = self.front.get_response()
            want = self.rsp_in_flight.pop(0)
            assert got[:16] == self.rsp(want)

    @rule()
    def front_sleep(self):
        work = self.front.final_check_for_responses()
        assert work == bool(self.rsp_in_flight)
        if not work:
            self.front_asleep = True

    # -- backend ---------------------------------------------------------------------
    @rule(k=st.integers(1, 50))
    def back_take(self, k):
        n = self.back.unconsumed_requests()
        assert n == len(self.in_flight)
        for _ in range(min(k, n)):
            got = self.back.get_request()
            want = self.in_flight.pop(0)
            assert got[:24] == self.req(want)
            self.taken.append(want)

    @rule(k=st.one_of(st.integers(1, 2), st.integers(1, 50)))
    def back_answer(self, k):
        for _ in range(min(k, len(self.taken))):
            i = self.taken.pop(0)
            self.back.put_response(self.rsp(i))
            self.unpushed_rsp.append(i)

    @rule()
    def back_push(self):
        old = self.front.sring.rsp_prod
        event = self.front.sring.rsp_event
        new = self.back.rsp_prod_pvt
        notify = self.back.push_responses_and_check_notify()
        assert notify == in_published_range(old, new, event)
        if self.front_asleep and self.unpushed_rsp:
            assert notify, "lost wakeup: frontend asleep and not notified"
        if notify:
            self.front_asleep = False
        self.rsp_in_flight += self.unpushed_rsp
        self.unpushed_rsp = []

    @rule()
    def back_sleep(self):
        work = self.back.final_check_for_requests()
        assert work == bool(self.in_flight)
        if not work:
            self.back_asleep = True

    @precondition(lambda self: hasattr(self, "front"))
    @invariant()
    def counts_agree(self):
        assert self.front.free_requests() == self.size - self.outstanding()
        assert self.back.unconsumed_requests() == len(self.in_flight)
        assert self.front.unconsumed_responses() == len(self.rsp_in_flight)


TestRingModel = RingPair.TestCase
TestRingModel.settings = settings(max_examples=150, stateful_step_count=60, deadline=None,
                                  suppress_health_check=[HealthCheck.too_slow])
