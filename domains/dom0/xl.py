"""xl: the command-line toolstack, as a client of dom0's management API.

Names, options and output shapes are xl's (docs/man/xl.1.pod.in).  Every command
that names a domain accepts its name or its id.  Errors print a message naming
what was wrong and exit non-zero; the running system is left as it was.
"""

from __future__ import annotations

import json
import os
import select
import sys
import termios
import time
import tty

from domains.dom0.client import APIError, Client, NotRunning, resolve_run_dir

USAGE = """usage: run.py xl [--run-dir DIR] <subcommand> [args]

 create [-n] [-c] FILE     create a domain from a config file (-n: dry run, print it as JSON)
 destroy DOMAIN            terminate a domain immediately
 shutdown [-w] DOMAIN      ask a domain to shut down (-w: wait until it is gone)
 reboot [-w] DOMAIN        ask a domain to reboot
 pause DOMAIN / unpause DOMAIN
 list [-l] [DOMAIN...]     list domains (-l: JSON)
 console DOMAIN            attach to a domain's console (Ctrl-] detaches)
 info                      information about the host
 dmesg [-c]                the hypervisor's log (-c: clear it after reading)
 uptime [DOMAIN...]        how long domains have run
 domid NAME / domname ID   translate between names and ids
 rename DOMAIN NEWNAME
 mem-set DOMAIN MEM        set the memory target (MiB, or with suffix k/m/g)
 mem-max DOMAIN MEM        set the maximum memory
 vcpu-list [DOMAIN...]     list vCPUs
 vcpu-pin DOMAIN VCPU CPUS pin vCPUs to host CPUs (CPUS: all, 0-1, 0,1)
 vcpu-set DOMAIN N         set the number of online vCPUs
 top [-b] [-i N] [-d S]    xentop: domains' resource use, refreshing
 xenstore-ls [PATH]        xenstore-read PATH...  xenstore-write PATH VALUE...
 xenstore-rm PATH...        xenstore-watch [-n N] PATH
 block-list DOMAIN         list a domain's virtual block devices
 block-attach DOMAIN DISKSPEC   add a disk (xl-disk-configuration syntax)
 block-detach DOMAIN VDEV  remove a disk
 network-list DOMAIN       list a domain's virtual network interfaces
 network-attach DOMAIN VIFSPEC  add a vif (xl-network-configuration syntax)
 network-detach DOMAIN DEVID|MAC  remove a vif
"""


class UsageError(Exception):
    pass


STATE_COLUMNS = "rbpscd"


def format_list(domains: list[dict]) -> list[str]:
    lines = [f"{'Name':<40}{'ID':>5}{'Mem':>6}{'VCPUs':>6}{'State':>9}{'Time(s)':>10}"]
    for d in domains:
        lines.append(f"{d['name']:<40}{d['domid']:>5}{d['memory_mib']:>6}{d['online_vcpus']:>6}"
                     f"{d['state']:>9}{d['cpu_time']:>10.1f}")
    return lines


def parse_mem(text: str) -> int:
    """xl's memory argument: MiB by default, or with a b/k/m/g/t suffix."""
    units = {"b": 1 / (1 << 20), "k": 1 / 1024, "m": 1, "g": 1024, "t": 1 << 20}
    t = text.strip().lower()
    mult = 1.0
    if t and t[-1] in units:
        mult, t = units[t[-1]], t[:-1]
    try:
        value = int(float(t) * mult)
    except ValueError:
        raise UsageError(f"invalid memory size '{text}'") from None
    if value <= 0:
        raise UsageError(f"memory size '{text}' must be positive")
    return value


def parse_cpus(text: str) -> list[int]:
    ncpu = os.cpu_count() or 1
    if text == "all":
        return list(range(ncpu))
    cpus: set[int] = set()
    for part in text.split(","):
        try:
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                cpus.update(range(lo, hi + 1))
            else:
                cpus.add(int(part))
        except ValueError:
            raise UsageError(f"invalid CPU list '{text}'") from None
    bad = [c for c in cpus if not 0 <= c < ncpu]
    if bad or not cpus:
        raise UsageError(f"CPU list '{text}' names CPUs this host does not have (0-{ncpu - 1})")
    return sorted(cpus)


def _need(args: list[str], n: int, usage: str) -> None:
    if len(args) != n:
        raise UsageError(f"usage: xl {usage}")


def _flags(args: list[str], allowed: str) -> tuple[set[str], list[str]]:
    flags, rest = set(), []
    for a in args:
        if a.startswith("-") and len(a) > 1 and not a[1:].isdigit():
            for ch in a[1:]:
                if ch not in allowed:
                    raise UsageError(f"unrecognized option '-{ch}'")
                flags.add(ch)
        else:
            rest.append(a)
    return flags, rest


def cmd_list(c: Client, args: list[str]) -> int:
    flags, names = _flags(args, "l")
    domains = c.call("list")
    if names:
        wanted = []
        for n in names:
            match = [d for d in domains if d["name"] == n or str(d["domid"]) == n]
            if not match:
                raise APIError(f"domain '{n}' does not exist")
            wanted += match
        domains = wanted
    if "l" in flags:
        print(json.dumps([{
            "domid": d["domid"], "name": d["name"], "uuid": d["uuid"], "state": d["state"],
            "pid": d["pid"], "memory": d["memory_mib"], "maxmem": d["max_pages"] // 256,
            "vcpus": d["vcpus"], "online_vcpus": d["online_vcpus"], "cpu_time": d["cpu_time"],
            "kernel": d["kernel"], "shutdown_reason": d["shutdown_reason"],
            "cpu_affinity": d["cpu_affinity"],
        } for d in domains], indent=4))
    else:
        print("\n".join(format_list(domains)))
    return 0


def cmd_create(c: Client, args: list[str]) -> int:
    flags, rest = _flags(args, "nc")
    _need(rest, 1, "create [-n] [-c] FILE")
    path = rest[0]
    try:
        with open(path) as f:
            text = f.read()
    except OSError as exc:
        raise UsageError(f"cannot read config file '{path}': {exc.strerror}") from None
    if "n" in flags:
        from domains.dom0.toolstack.xlcfg import ConfigError, parse_config_text as parse_config
        try:
            print(json.dumps(parse_config(text, path).to_dict(), indent=4))
        except ConfigError as exc:
            raise APIError(str(exc)) from None
        return 0
    r = c.call("create", config=text, filename=path)
    print(f"Parsing config from {path}")
    print(f"Domain {r['domid']} ({r['name']}) created")
    if "c" in flags:
        return console(c, r["name"])
    return 0


def cmd_shutdown(c: Client, args: list[str], reason: str = "poweroff") -> int:
    flags, rest = _flags(args, "wF")
    _need(rest, 1, f"{'shutdown' if reason == 'poweroff' else 'reboot'} [-w] DOMAIN")
    domid = c.call("shutdown", dom=rest[0], reason=reason)
    print(f"{'Shutting down' if reason == 'poweroff' else 'Rebooting'} domain {domid}")
    if "w" in flags:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if not any(d["domid"] == domid for d in c.call("list")):
                print(f"Domain {domid} has been shut down.")
                return 0
            time.sleep(0.05)
        raise APIError(f"domain {domid} did not shut down within 60 s")
    return 0


def cmd_simple(method: str, usage: str):
    def run(c: Client, args: list[str]) -> int:
        _need(args, 1, usage)
        c.call(method, dom=args[0])
        return 0
    return run


def cmd_info(c: Client, args: list[str]) -> int:
    _need(args, 0, "info")
    info = c.call("info")
    rows = [("host", info["host"]), ("release", info["release"]), ("machine", info["machine"]),
            ("nr_cpus", info["nr_cpus"]), ("total_memory", info["total_memory_kb"] // 1024),
            ("free_memory", info["free_memory_kb"] // 1024), ("xen_version", info["xen_version"]),
            ("xen_scheduler", "os"), ("xsm_policy", info["policy"]),
            ("nr_domains", info["nr_domains"]), ("uptime", f"{info['uptime']:.1f}")]
    for key, value in rows:
        print(f"{key:<23}: {value}")
    return 0


def cmd_dmesg(c: Client, args: list[str]) -> int:
    flags, rest = _flags(args, "c")
    _need(rest, 0, "dmesg [-c]")
    print("\n".join(c.call("dmesg", clear="c" in flags)))
    return 0


def cmd_uptime(c: Client, args: list[str]) -> int:
    rows = c.call("uptime")
    if args:
        rows = [r for r in rows if r["name"] in args or str(r["domid"]) in args]
    print(f"{'Name':<40}{'ID':>5} Uptime")
    for r in rows:
        s = int(r["uptime"])
        print(f"{r['name']:<40}{r['domid']:>5} {s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}")
    return 0


def cmd_domid(c: Client, args: list[str]) -> int:
    _need(args, 1, "domid NAME")
    print(c.call("find", dom=args[0])["domid"])
    return 0


def cmd_domname(c: Client, args: list[str]) -> int:
    _need(args, 1, "domname ID")
    if not args[0].isdigit():
        raise UsageError(f"'{args[0]}' is not a domain id")
    print(c.call("find", dom=args[0])["name"])
    return 0


def cmd_rename(c: Client, args: list[str]) -> int:
    _need(args, 2, "rename DOMAIN NEWNAME")
    c.call("rename", dom=args[0], name=args[1])
    return 0


def cmd_mem_set(c: Client, args: list[str]) -> int:
    _need(args, 2, "mem-set DOMAIN MEM")
    c.call("mem_set", dom=args[0], mib=parse_mem(args[1]))
    return 0


def cmd_mem_max(c: Client, args: list[str]) -> int:
    _need(args, 2, "mem-max DOMAIN MEM")
    c.call("mem_max", dom=args[0], mib=parse_mem(args[1]))
    return 0


def cmd_vcpu_list(c: Client, args: list[str]) -> int:
    domains = c.call("list")
    if args:
        domains = [d for d in domains if d["name"] in args or str(d["domid"]) in args]
    print(f"{'Name':<32}{'ID':>5}{'VCPU':>6}{'CPU':>5}{'State':>7}{'Time(s)':>9} Affinity (Hard)")
    for d in domains:
        aff = d["cpu_affinity"]
        aff_s = "all" if not aff else ",".join(str(x) for x in aff)
        for v in range(d["vcpus"]):
            online = v < d["online_vcpus"]
            state = "-b-" if online else "--p"
            print(f"{d['name']:<32}{d['domid']:>5}{v:>6}{'-':>5}{state:>7}"
                  f"{(d['cpu_time'] if v == 0 else 0.0):>9.1f} {aff_s}")
    return 0


def cmd_vcpu_pin(c: Client, args: list[str]) -> int:
    _need(args, 3, "vcpu-pin DOMAIN VCPU|all CPUS")
    vcpu = -1 if args[1] == "all" else _int(args[1], "VCPU")
    c.call("vcpu_pin", dom=args[0], vcpu=vcpu, cpus=parse_cpus(args[2]))
    return 0


def cmd_vcpu_set(c: Client, args: list[str]) -> int:
    _need(args, 2, "vcpu-set DOMAIN N")
    c.call("vcpu_set", dom=args[0], count=_int(args[1], "N"))
    return 0


def _int(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise UsageError(f"{what} must be a number, got '{text}'") from None


def cmd_top(c: Client, args: list[str]) -> int:
    """xentop's columns; -b batch mode, -i iterations, -d delay."""
    batch, iterations, delay = False, None, 3.0
    i = 0
    while i < len(args):
        a = args[i]
        if a == "-b":
            batch = True
        elif a in ("-i", "-d") and i + 1 < len(args):
            if a == "-i":
                iterations = _int(args[i + 1], "-i")
            else:
                try:
                    delay = float(args[i + 1])
                except ValueError:
                    raise UsageError(f"-d needs seconds, got '{args[i + 1]}'") from None
            i += 1
        else:
            raise UsageError(f"xl top: unrecognized argument '{a}'")
        i += 1
    info = c.call("info")
    prev: dict[int, tuple[float, float]] = {}
    n = 0
    while iterations is None or n < iterations:
        now = time.monotonic()
        domains = c.call("list")
        if not batch:
            sys.stdout.write("\x1b[H\x1b[2J")
        print(f"{'NAME':>10} {'STATE':>6} {'CPU(sec)':>9} {'CPU(%)':>6} {'MEM(k)':>9} {'MEM(%)':>6} "
              f"{'MAXMEM(k)':>10} {'MAXMEM(%)':>9} {'VCPUS':>5} {'NETS':>4} {'VBDS':>4}")
        total = info["total_memory_kb"]
        for d in domains:
            t0, c0 = prev.get(d["domid"], (now, d["cpu_time"]))
            pct = 100.0 * (d["cpu_time"] - c0) / (now - t0) if now > t0 else 0.0
            prev[d["domid"]] = (now, d["cpu_time"])
            mem, maxmem = d["tot_pages"] * 4, d["max_pages"] * 4
            print(f"{d['name'][:10]:>10} {d['state']:>6} {d['cpu_time']:>9.0f} {pct:>6.1f} "
                  f"{mem:>9} {100.0 * mem / total:>6.1f} {maxmem:>10} {100.0 * maxmem / total:>9.1f} "
                  f"{d['online_vcpus']:>5} {d.get('nets', 0):>4} {d.get('vbds', 0):>4}")
        sys.stdout.flush()
        n += 1
        if iterations is not None and n >= iterations:
            break
        time.sleep(delay)
    return 0


def cmd_xs_ls(c: Client, args: list[str]) -> int:
    path = args[0] if args else "/"
    for name, value in c.call("xs_ls", path=path):
        print(f'{name} = "{value}"')
    return 0


def cmd_xs_read(c: Client, args: list[str]) -> int:
    if not args:
        raise UsageError("usage: xl xenstore-read PATH...")
    for p in args:
        print(c.call("xs_read", path=p))
    return 0


def cmd_xs_write(c: Client, args: list[str]) -> int:
    if not args or len(args) % 2:
        raise UsageError("usage: xl xenstore-write PATH VALUE [PATH VALUE...]")
    for p, v in zip(args[::2], args[1::2]):
        c.call("xs_write", path=p, value=v)
    return 0


def cmd_xs_rm(c: Client, args: list[str]) -> int:
    if not args:
        raise UsageError("usage: xl xenstore-rm PATH...")
    for p in args:
        c.call("xs_rm", path=p)
    return 0


def cmd_xs_watch(c: Client, args: list[str]) -> int:
    """xenstore-watch [-n N] PATH: print each event's path (the first is the initial one)."""
    count = None
    if args[:1] == ["-n"] and len(args) >= 2:
        count, args = _int(args[1], "-n"), args[2:]
    if len(args) != 1:
        raise UsageError("usage: xl xenstore-watch [-n N] PATH")
    c.call("xs_watch", path=args[0])
    c.sock.settimeout(None)   # events come when they come
    seen = 0
    while count is None or seen < count:
        event = c.read()
        print(event["path"], flush=True)
        seen += 1
    return 0


def cmd_console(c: Client, args: list[str]) -> int:
    _need(args, 1, "console DOMAIN")
    return console(c, args[0])


def console(c: Client, dom: str) -> int:
    """Attach to a guest console.  Ctrl-] detaches, as in xl."""
    c.call("console", dom=dom)
    fd = sys.stdin.fileno()
    interactive = os.isatty(fd)
    old = termios.tcgetattr(fd) if interactive else None
    if interactive:
        tty.setraw(fd, termios.TCSANOW)   # keep keys typed before we attached
    try:
        while True:
            ready, _, _ = select.select([c.sock, fd], [], [])
            if c.sock in ready:
                data = c.sock.recv(4096)
                if not data:
                    return 0
                os.write(sys.stdout.fileno(), data)
            if fd in ready:
                data = os.read(fd, 1024)
                if not data or b"\x1d" in data:   # Ctrl-]
                    if data and data.index(b"\x1d"):
                        c.sock.sendall(data[:data.index(b"\x1d")])
                    return 0
                c.sock.sendall(data)
    finally:
        if old is not None:
            termios.tcsetattr(fd, termios.TCSADRAIN, old)


def cmd_block_list(c: Client, args: list[str]) -> int:
    _need(args, 1, "block-list DOMAIN")
    print(f"{'Vdev':<6}{'BE':>4}  {'handle':>6} {'state':>5} {'evt-ch':>6} {'ring-ref':>8} BE-path")
    for d in c.call("block_list", dom=args[0]):
        print(f"{d['vdev']:<6}{d['backend']:>4}  {d['vdev']:>6} {d['state']:>5} {d['evtch']:>6} "
              f"{d['ring_ref']:>8} {d['be_path']}")
    return 0


def cmd_block_attach(c: Client, args: list[str]) -> int:
    if len(args) < 2:
        raise UsageError("usage: xl block-attach DOMAIN DISKSPEC")
    c.call("block_attach", dom=args[0], spec=",".join(args[1:]))
    return 0


def cmd_block_detach(c: Client, args: list[str]) -> int:
    _need(args, 2, "block-detach DOMAIN VDEV")
    c.call("block_detach", dom=args[0], vdev=args[1])
    return 0


def cmd_network_list(c: Client, args: list[str]) -> int:
    _need(args, 1, "network-list DOMAIN")
    print(f"{'Idx':<4}{'BE':>4} {'Mac Addr.':<18}{'handle':>6} {'state':>5} {'evt-ch':>6} "
          f"{'tx-/rx-ring-ref':>15} BE-path")
    for d in c.call("network_list", dom=args[0]):
        refs = f"{d['tx_ring_ref']}/{d['rx_ring_ref']}"
        print(f"{d['idx']:<4}{d['backend']:>4} {d['mac']:<18}{d['handle']:>6} {d['state']:>5} "
              f"{d['evtch']:>6} {refs:>15} {d['be_path']}")
    return 0


def cmd_network_attach(c: Client, args: list[str]) -> int:
    if len(args) < 2:
        raise UsageError("usage: xl network-attach DOMAIN VIFSPEC (e.g. backend=netdom,bridge=xenbr0)")
    c.call("network_attach", dom=args[0], spec=",".join(args[1:]))
    return 0


def cmd_network_detach(c: Client, args: list[str]) -> int:
    _need(args, 2, "network-detach DOMAIN DEVID|MAC")
    c.call("network_detach", dom=args[0], which=args[1])
    return 0


COMMANDS = {
    "list": cmd_list, "create": cmd_create,
    "destroy": cmd_simple("destroy", "destroy DOMAIN"),
    "shutdown": cmd_shutdown,
    "reboot": lambda c, a: cmd_shutdown(c, a, "reboot"),
    "pause": cmd_simple("pause", "pause DOMAIN"),
    "unpause": cmd_simple("unpause", "unpause DOMAIN"),
    "info": cmd_info, "dmesg": cmd_dmesg, "uptime": cmd_uptime,
    "domid": cmd_domid, "domname": cmd_domname, "rename": cmd_rename,
    "mem-set": cmd_mem_set, "mem-max": cmd_mem_max,
    "vcpu-list": cmd_vcpu_list, "vcpu-pin": cmd_vcpu_pin, "vcpu-set": cmd_vcpu_set,
    "top": cmd_top, "console": cmd_console,
    "xenstore-ls": cmd_xs_ls, "xenstore-read": cmd_xs_read,
    "xenstore-write": cmd_xs_write, "xenstore-rm": cmd_xs_rm, "xenstore-watch": cmd_xs_watch,
    "block-list": cmd_block_list, "block-attach": cmd_block_attach,
    "block-detach": cmd_block_detach,
    "network-list": cmd_network_list, "network-attach": cmd_network_attach,
    "network-detach": cmd_network_detach,
}


def main(argv: list[str]) -> int:
    run_dir = None
    if argv[:1] == ["--run-dir"] and len(argv) >= 2:
        run_dir, argv = argv[1], argv[2:]
    elif argv and argv[0].startswith("--run-dir="):
        run_dir, argv = argv[0].split("=", 1)[1], argv[1:]
    if not argv or argv[0] in ("help", "-h", "--help"):
        print(USAGE, end="")
        return 0 if argv else 2
    name, args = argv[0], argv[1:]
    command = COMMANDS.get(name)
    if command is None:
        print(f"xl: unknown subcommand '{name}'\n{USAGE}", file=sys.stderr, end="")
        return 2
    try:
        if name == "create" and "-n" in args:
            return command(None, args)   # a dry run needs no running system
        with Client(resolve_run_dir(run_dir)) as client:
            return command(client, args)
    except UsageError as exc:
        print(f"xl {name}: {exc}", file=sys.stderr)
        return 2
    except (APIError, NotRunning) as exc:
        print(f"xl {name}: {exc}", file=sys.stderr)
        return 1
