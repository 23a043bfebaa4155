"""The XenStore ring's doorbell and the fault points."""

from __future__ import annotations

import pytest
import trio

from domains.kernel import faultpoint
from domains.kernel.events import Port

class _Hv:
    def __init__(self) -> None:
        self.sent: list[tuple] = []

    def call_nowait(self, hypercall: str, cmd: str, *, faults: bool = True, **args) -> None:
        if faults:
            data = faultpoint.hit_nowait("hypercall.nowait", (hypercall, cmd, args))
            if data is faultpoint.DROP:
                return
        self.sent.append((hypercall, cmd, args["port"]))


class _Events:
    def __init__(self) -> None:
        self.hv = _Hv()


@pytest.mark.parametrize("point", ["evtchn.send", "hypercall.nowait"])
def test_the_xenstore_doorbell_is_outside_the_notification_fault_points(point: str) -> None:
    """A device's notifications may be dropped by a fault; the XenStore ring's
    doorbell (Port.kick) is not, so a driver domain's control plane goes on."""
    async def main() -> None:
        events = _Events()
        port = Port(events, 3)
        faultpoint.arm(faultpoint.parse_spec("f", f"point={point} action=drop"))
        try:
            port.notify_nowait()
            assert events.hv.sent == []
            await port.kick()
            assert events.hv.sent == [("event_channel_op", "send", 3)]
        finally:
            faultpoint.disarm(point)
    trio.run(main)
