"""A tiny shell on the guest's console (hvc0), what a getty would give you.

`xl console guest1` attaches to it: typed characters travel xl -> dom0's
management API -> xenconsoled -> the console page's `in` ring -> here, and the
echo and output go back the same way through the `out` ring.  It exists so that
a person at the console can see input reach the guest and ask it things.

Commands: help, uname, uptime, free, workload, xenstore-read PATH, poweroff, reboot.
"""

from __future__ import annotations

import time

from domains.kernel.console import Console
from ipc.sched_abi import SHUTDOWN_poweroff, SHUTDOWN_reboot

PROMPT = "# "


async def run(k, xs, console: Console) -> None:
    started = time.monotonic()
    line = bytearray()
    await console.write(f"\r\n{k.name} login: root (automatic)\r\n{PROMPT}")
    while True:
        for byte in await console.read():
            if byte in (13, 10):                 # Enter
                await console.write("\r\n")
                reply = await _command(k, xs, line.decode(errors="replace").strip(), started)
                if reply:
                    await console.write(reply.replace("\n", "\r\n") + "\r\n")
                line.clear()
                await console.write(PROMPT)
            elif byte in (8, 127):               # Backspace
                if line:
                    line.pop()
                    await console.write("\b \b")
            elif byte >= 32:
                line.append(byte)
                await console.write(bytes([byte]))


async def _command(k, xs, text: str, started: float) -> str:
    words = text.split()
    if not words:
        return ""
    cmd, args = words[0], words[1:]
    if cmd == "help":
        return "commands: help uname uptime free workload xenstore-read PATH poweroff reboot"
    if cmd == "uname":
        return f"microxen {k.name} domain {k.domid}"
    if cmd == "uptime":
        return f"up {time.monotonic() - started:.1f} s"
    if cmd == "free":
        pages = await k.hv.call("memory_op", "current_reservation")
        shared = len(k.memory.pages) + k.memory.area_pages
        return f"reservation {pages * 4} KiB ({pages // 256} MiB), shared pages {shared}"
    if cmd == "workload":
        base = f"/local/domain/{k.domid}/data/workload"
        try:
            keys = await xs.directory(base)
        except OSError:
            return "no workload"
        return " ".join(f"{key}={(await xs.read(f'{base}/{key}')).decode()}" for key in sorted(keys))
    if cmd == "xenstore-read" and len(args) == 1:
        try:
            return (await xs.read(args[0])).decode(errors="replace")
        except OSError as exc:
            return f"xenstore-read: {args[0]}: {exc}"
    if cmd in ("poweroff", "reboot"):
        await k.shutdown(SHUTDOWN_poweroff if cmd == "poweroff" else SHUTDOWN_reboot)
    return f"{cmd}: command not found"
