"""The run directory: one place for everything a running system owns.

Sockets, logs, console logs, reports all live under it, so two systems with two
run directories never touch each other.  It is `--run-dir`, else
`$MICROXEN_RUN_DIR`, else `/tmp/microxen-<uid>`.

Layout:
    hypervisor/hypercall.sock   the hypervisor's ZeroMQ endpoint
    hypervisor.pid              the hypervisor's pid while it runs
    xenstored/socket            XenStore for tools (XENSTORED_PATH points here)
    dom0/toolstack.sock         the management API (xl talks to it)
    dom0/ready                  written once dom0 has booted the system
    logs/<domain>.log           each domain's own log; logs/hypervisor.log
    console/<domain>.log        each guest's console output
"""

from __future__ import annotations

import os
import stat


def resolve(given: str | None) -> str:
    path = given or os.environ.get("MICROXEN_RUN_DIR") or f"/tmp/microxen-{os.getuid()}"
    return os.path.abspath(path)


def sweep_sockets(run_dir: str) -> list[str]:
    """Remove every socket file under the run directory; return what was removed.

    The hypervisor calls this last, after every domain is dead: a domain killed
    with SIGKILL cannot remove its own sockets, so the one who outlives them all does.
    """
    removed = []
    for top, _dirs, files in os.walk(run_dir):
        for name in files:
            path = os.path.join(top, name)
            try:
                if stat.S_ISSOCK(os.lstat(path).st_mode):
                    os.unlink(path)
                    removed.append(path)
            except FileNotFoundError:
                pass
    return removed
