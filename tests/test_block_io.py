"""Integration: guests write and read back their disks through blkfront/blkback.

Real processes: a blkdom driver domain serving two guests' raw images, each
guest running the `disk` workload (write, read back, verify, flush).
"""

from __future__ import annotations

import os
import signal

import pytest

from domains.domu.disk_workload import BLOCK, MAGIC, _HEADER, block_content
from tests.blocksys import BLKDOM, System, guest, running

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def system():
    yield from running({"blkdom": BLKDOM, "guest1": guest("guest1"), "guest2": guest("guest2")})


def test_guests_write_read_verify_and_flush(system: System) -> None:
    for name in ("guest1", "guest2"):
        system.wait_for(lambda: system.counters(name).get("ops", 0) >= 2000,
                        what=f"{name} to complete 2000 disk operations")
    # A full verification sweep of every acknowledged write, on request.
    for name in ("guest1", "guest2"):
        domid = system.list()[name]["domid"]
        before = system.counters(name).get("sweeps", 0)
        system.xl("xenstore-write", f"/local/domain/{domid}/data/workload/sweep", "1")
        system.wait_for(lambda: system.counters(name).get("sweeps", 0) > before,
                        what=f"{name}'s verification sweep")
        c = system.counters(name)
        assert c["errors"] == 0 and c["verify_failures"] == 0, c
        assert c["blocks_written"] > 0
    # xl block-list shows a connected device served by blkdom.
    out = system.xl("block-list", "guest1")
    row = out.splitlines()[1].split()
    assert row[0] == "51712" and row[1] == str(system.list()["blkdom"]["domid"]) and row[3] == "4"
    domids = {n: system.list()[n]["domid"] for n in ("guest1", "guest2")}
    system.down()
    # What reached the image files is each guest's own data, block by block.
    for name, domid in domids.items():
        path = os.path.join(system.run_dir, "disks", f"{name}.img")
        assert os.path.getsize(path) == 16 << 20
        written = 0
        with open(path, "rb") as f:
            for block in range(1024):
                data = f.read(BLOCK)
                if data == bytes(BLOCK):
                    continue
                magic, dom, blk, version = _HEADER.unpack_from(data)
                assert (magic, dom, blk) == (MAGIC, domid, block)
                assert data == block_content(domid, block, version)
                written += 1
        assert written > 0


def test_block_attach_list_detach(system: System) -> None:
    system.xl("block-attach", "guest1", "format=raw, vdev=xvdb, access=ro, backend=blkdom, "
                                        "direct-io-safe, target=disks/extra.img?size=1M")
    names = [line.split()[0] for line in system.xl("block-list", "guest1").splitlines()[1:]]
    assert names == ["51712", "51728"]
    bd = system.list()["blkdom"]["domid"]
    g1 = system.list()["guest1"]["domid"]
    system.wait_for(lambda: system.read(f"/local/domain/{bd}/backend/vbd/{g1}/51728/state") == "2",
                    what="the new backend to reach InitWait")
    assert system.read(f"/local/domain/{bd}/backend/vbd/{g1}/51728/info") == "4"   # read-only
    # direct-io-safe reaches the backend, as libxl writes it, and blkback opens O_DIRECT.
    assert system.read(f"/local/domain/{bd}/backend/vbd/{g1}/51728/direct-io-safe") == "1"
    assert system.read(f"/local/domain/{bd}/backend/vbd/{g1}/51712/direct-io-safe") is None
    with open(os.path.join(system.run_dir, "logs", "blkdom.log")) as f:
        assert "extra.img (2048 sectors, ro, O_DIRECT)" in f.read()
    system.xl("block-detach", "guest1", "xvdb")
    names = [line.split()[0] for line in system.xl("block-list", "guest1").splitlines()[1:]]
    assert names == ["51712"]
    with pytest.raises(RuntimeError, match="no disk"):
        system.xl("block-detach", "guest1", "xvdc")
    with pytest.raises(RuntimeError, match="does not exist"):
        system.xl("block-attach", "guest1", "vdev=xvdc, backend=nosuchdom, target=disks/x.img?size=1M")
    with pytest.raises(RuntimeError, match="does not exist; add"):
        system.xl("block-attach", "guest1", "vdev=xvdc, backend=blkdom, target=disks/missing.img")



def test_detach_waits_for_the_backend_to_let_go() -> None:
    """block-detach returns only after blkback has stopped serving the old ring.

    Otherwise requests still queued on it could be written after the disk's
    next user has written the same blocks.  A hung backend cannot answer: the
    detach then goes ahead after a bounded wait, and dom0 says so.  (The
    watchdog is slowed down so that it does not restart the hung blkdom first.)
    """
    system = System({"blkdom": BLKDOM, "guest1": guest("guest1"), "guest2": guest("guest2")},
                    watchdog_timeout=60).up()
    try:
        logs = os.path.join(system.run_dir, "logs")
        system.wait_for(lambda: system.counters("guest1").get("ops", 0) > 100,
                        what="guest1's disk to be busy")
        system.xl("block-detach", "guest1", "xvda")
        with open(os.path.join(logs, "Domain-0.log")) as f:
            assert "did not close" not in f.read()       # blkdom answered Closed first
        pid = system.kill("blkdom", signal.SIGSTOP)
        try:
            system.xl("block-detach", "guest2", "xvda")
        finally:
            os.kill(pid, signal.SIGCONT)
        with open(os.path.join(logs, "Domain-0.log")) as f:
            assert "the backend did not close" in f.read()
        assert system.xl("block-list", "guest2").splitlines()[1:] == []
    finally:
        system.down()
        system.cleanup()
