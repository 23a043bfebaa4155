"""domains/kernel/vmap.py: one-page frames placed side by side in a VmArea.

Real memfd frames, real mappings: what the guest writes through the area's
one view is what the frame's own mapping (as a peer holding the grant would
have it) sees; an empty slot faults; the area cannot be closed under a
live view, and once closed nothing of it is left in the address space.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys

import pytest

from domains.kernel.vmap import VmArea
from ipc.page import PAGE_SIZE, map_frame, new_frame

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _frames(n: int) -> list[int]:
    return [new_frame("test") for _ in range(n)]


def _mapped_here(addr: int) -> bool:
    with open("/proc/self/maps") as maps:
        for line in maps:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo <= addr < hi:
                return True
    return False


def test_frames_in_neighbouring_slots_are_one_buffer():
    area = VmArea(8)
    fds = _frames(3)
    peers = [map_frame(fd) for fd in fds]        # what a mapper of each frame sees
    try:
        for slot, fd in zip((2, 3, 4), fds):
            area.map(slot, fd)
        for fd in fds:
            os.close(fd)                         # the slots keep the pages alive
        data = bytes(range(256)) * 48            # three pages
        area.pages(2, 3)[:] = data               # one copy across three frames
        assert [bytes(p) for p in peers] == [data[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]
                                            for i in range(3)]
        peers[1][:4] = b"peer"                   # and the other way
        assert bytes(area.view[3 * PAGE_SIZE:3 * PAGE_SIZE + 4]) == b"peer"
        assert list(area.mapped) == [0, 0, 1, 1, 1, 0, 0, 0]
    finally:
        for p in peers:
            p.close()
        area.close()


def test_a_slot_takes_one_frame_and_can_be_emptied():
    area = VmArea(2)
    fd, other = _frames(2)
    try:
        area.map(0, fd)
        with pytest.raises(ValueError):
            area.map(0, other)                   # occupied
        with pytest.raises(IndexError):
            area.map(2, other)
        area.unmap(0)
        area.map(0, other)                       # empty again, so it takes another
    finally:
        os.close(fd)
        os.close(other)
        area.close()


def _no_core_dump() -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def test_an_empty_slot_faults():
    probe = ("from domains.kernel.vmap import VmArea\n"
             "a = VmArea(2)\n"
             "a.view[4096] = 1\n")               # slot 1 holds no frame
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                         timeout=30, preexec_fn=_no_core_dump)
    assert out.returncode == -11                 # SIGSEGV, not a silent private page


def test_close_waits_for_every_view_then_leaves_nothing_mapped():
    area = VmArea(4)
    fd = new_frame("test")
    area.map(1, fd)
    os.close(fd)
    held = area.pages(1)
    with pytest.raises(BufferError):
        area.close()
    held[:3] = b"abc"                            # still usable after the refusal
    assert bytes(area.pages(1)[:3]) == b"abc"
    held.release()
    addr = area.addr
    assert _mapped_here(addr + PAGE_SIZE)
    area.close()
    assert area.closed and not _mapped_here(addr + PAGE_SIZE)
    area.close()                                 # idempotent
