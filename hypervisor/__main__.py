"""Start the hypervisor: `python -m hypervisor --run-dir DIR [options]`.

Boot order, as on a real machine: the hypervisor comes up, forks its domain
builder, then builds domain 0 (privileged, the control domain) and unpauses it.
Everything else is created by dom0's toolstack.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from hypervisor.broker import Hypervisor
from hypervisor import domain

PRELOAD = ["domains.kernel.boot", "domains.dom0.kernel", "domains.driverdom.kernel",
           "domains.domu.kernel"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="hypervisor")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--host-memory", type=int, default=8192, help="MiB of host memory to model")
    p.add_argument("--dom0-memory", type=int, default=512, help="MiB for domain 0")
    p.add_argument("--dom0-kernel", default="domains.dom0.kernel")
    p.add_argument("--dom0-args", default="{}", help="JSON handed to dom0 in start_info")
    p.add_argument("--preload", action="append", default=[])
    args = p.parse_args(argv)
    run_dir = os.path.abspath(args.run_dir)
    hv = Hypervisor(run_dir, args.host_memory, PRELOAD + args.preload)
    with open(os.path.join(run_dir, "hypervisor.pid"), "w") as f:
        f.write(f"{os.getpid()}\n")
    try:
        dom0 = domain.create_domain(
            hv, domid=0, name="Domain-0", kernel=args.dom0_kernel,
            memory_pages=args.dom0_memory * 256, max_pages=args.dom0_memory * 256, vcpus=1,
            privileged=True, uuid="00000000-0000-0000-0000-000000000000",
            max_ports=1024, grant_frames=4, maptrack=65536, cmdline="")
        dom0.start_info.update(json.loads(args.dom0_args))
        domain.unpause_domain(hv, dom0)
        hv.run()
    finally:
        if hv.running:
            hv.shutdown()
        try:
            os.unlink(os.path.join(run_dir, "hypervisor.pid"))
        except FileNotFoundError:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
