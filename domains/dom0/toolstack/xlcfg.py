"""Domain configuration files in xl.cfg syntax.

What it is in Xen
-----------------
``xl create guest.cfg`` reads a file of ``KEY = VALUE`` settings described in
``xl.cfg(5)``.  A value is a "string" or 'string', a number (decimal, ``0x``
hex or ``0``-prefixed octal), or a ``[ list, of, values ]`` that may span
lines, nest, and end with a trailing comma.  Booleans are numbers (0 false,
anything else true).  ``#`` starts a comment; settings are separated by
newlines or ``;``; ``KEY += VALUE`` appends to an earlier string or list.
Keys are lower case.  xl parses this with a flex/bison grammar in libxlu, then
interprets the settings it knows (``xl_parse.c``), and libxl fills in defaults.

What it does here
-----------------
Two steps, kept apart so each can be read on its own:

1. :func:`parse_settings` turns text into :class:`Setting` objects (name,
   value, line), following libxlu's grammar.  Syntax errors raise
   :class:`ConfigError` carrying the file, line and problem.
2. :func:`parse_config_text` / :func:`parse_config_file` interpret the
   settings into a :class:`DomainConfig` with xl's defaults, validating every
   value (``guest.cfg:7: memory must be a positive integer (MiB), got
   "lots"``).  Disk and vif strings go through :mod:`.disk_spec` and
   :mod:`.vif_spec`.

Invariant: nothing is dropped silently.  A setting xl knows but that has no
meaning here (``vnc``, ``bootloader``, ``pci``, ...) and a key xl does not know
at all both end up in ``DomainConfig.ignored`` with the line and the reason.

Where this differs from Xen
---------------------------
* Defaults are libxl's: 32 MiB of memory when ``memory`` is absent
  (``libxl__domain_build_info_setdefault``; xl.cfg(5) itself documents no
  default), 1 vCPU, on_poweroff/on_crash/on_watchdog ``destroy``,
  on_reboot ``restart``, on_soft_reset ``soft-reset``; grant-table limits as
  xl.conf's defaults (64 grant frames, 1024 maptrack frames).
* No fresh uuid is generated here (the parser is pure); the toolstack assigns
  one at create time when ``uuid`` is absent.  A vif without ``mac`` gets a
  deterministic one in 00:16:3e from the uuid (or name) and its devid.
* ``cpus`` NUMA forms (``node:``/``nodes:``) are refused: there is no NUMA
  topology here.
* ``workload`` is our own key: the program the guest runs (see the guest
  kernel).  It is not in xl.cfg(5).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Union

from .disk_spec import DiskSpec, DiskSpecError, parse_disk_spec
from .vif_spec import VifSpec, VifSpecError, parse_vif_spec

# -- errors -------------------------------------------------------------------------


class ConfigError(Exception):
    """A config file problem, located: ``file:line: message``."""

    def __init__(self, file: str, line: int | None, message: str) -> None:
        self.file, self.line, self.message = file, line, message
        where = f"{file}:{line}" if line is not None else file
        super().__init__(f"{where}: {message}")


# -- step 1: syntax -------------------------------------------------------------------

@dataclass(frozen=True)
class Atom:
    """A string or number exactly as written (xl keeps atoms as text)."""

    text: str
    quoted: bool
    line: int

    def shown(self) -> str:
        return f'"{self.text}"' if self.quoted else self.text


@dataclass(frozen=True)
class ListValue:
    items: tuple["Value", ...]
    line: int

    def shown(self) -> str:
        return "a list"


Value = Union[Atom, ListValue]


@dataclass(frozen=True)
class Setting:
    name: str
    value: Value
    line: int
    file: str = "<string>"


@dataclass(frozen=True)
class _Tok:
    kind: str       # IDENT NUMBER STRING = += [ ] , ; NL EOF
    text: str
    line: int


_ESCAPES = {'"': '"', "'": "'", "\\": "\\", "a": "\a", "b": "\b", "f": "\f", "n": "\n",
            "r": "\r", "t": "\t", "v": "\v"}
_PYTHONISH = set("+-.():{}")


def _lex(text: str, file: str) -> list[_Tok]:
    toks: list[_Tok] = []
    i, line, n = 0, 1, len(text)
    while i < n:
        c = text[i]
        if c in " \t\r":
            i += 1
        elif c == "\n":
            toks.append(_Tok("NL", "\n", line))
            line += 1
            i += 1
        elif c == "#":
            while i < n and text[i] != "\n":
                i += 1
        elif c in "[],;=":
            toks.append(_Tok(c, c, line))
            i += 1
        elif c == "+" and text.startswith("+=", i):
            toks.append(_Tok("+=", "+=", line))
            i += 2
        elif c.isalpha() or c == "_":
            j = i
            while j < n and (text[j].isalnum() or text[j] == "_"):
                j += 1
            toks.append(_Tok("IDENT", text[i:j], line))
            i = j
        elif c.isdigit():
            j = i
            while j < n and (text[j].isalnum() or text[j] in "._"):
                j += 1
            toks.append(_Tok("NUMBER", text[i:j], line))
            i = j
        elif c in "\"'":
            i, s = _lex_string(text, i, line, file)
            toks.append(_Tok("STRING", s, line))
        else:
            hint = ""
            if c in _PYTHONISH:
                hint = ("; this looks like Python, but xl.cfg values are only "
                        '"strings", numbers and [lists]')
            raise ConfigError(file, line, f"unexpected character {c!r}{hint}")
    toks.append(_Tok("EOF", "", line))
    return toks


def _lex_string(text: str, i: int, line: int, file: str) -> tuple[int, str]:
    quote = text[i]
    out: list[str] = []
    i += 1
    while True:
        if i >= len(text) or text[i] == "\n":
            raise ConfigError(file, line, f"unterminated string: {quote} opened on this "
                              f"line is not closed before the end of the line")
        c = text[i]
        if c == quote:
            return i + 1, "".join(out)
        if c == "\\":
            if i + 1 >= len(text) or text[i + 1] == "\n":
                raise ConfigError(file, line, "backslash at the end of a line inside a string")
            e = text[i + 1]
            if e in _ESCAPES:
                out.append(_ESCAPES[e])
                i += 2
            elif e == "x":
                m = re.match(r"[0-9a-fA-F]{1,2}", text[i + 2:i + 4])
                if not m:
                    raise ConfigError(file, line, "\\x in a string must be followed by hex digits")
                out.append(chr(int(m.group(0), 16)))
                i += 2 + len(m.group(0))
            elif e in "01234567":
                m = re.match(r"[0-7]{1,3}", text[i + 1:i + 4])
                assert m
                out.append(chr(int(m.group(0), 8)))
                i += 1 + len(m.group(0))
            else:
                raise ConfigError(file, line, f"unknown escape \\{e} in string")
        else:
            out.append(c)
            i += 1


class _Parser:
    """Recursive descent over libxlu's grammar (libxlu_cfg_y.y)."""

    def __init__(self, toks: list[_Tok], file: str) -> None:
        self.toks, self.pos, self.file = toks, 0, file

    def peek(self) -> _Tok:
        return self.toks[self.pos]

    def take(self) -> _Tok:
        t = self.toks[self.pos]
        self.pos += 1
        return t

    def err(self, tok: _Tok, msg: str) -> ConfigError:
        return ConfigError(self.file, tok.line, msg)

    def skip_newlines(self) -> None:
        while self.peek().kind == "NL":
            self.pos += 1

    def settings(self) -> list[tuple[Setting, str]]:
        out = []
        while True:
            t = self.peek()
            if t.kind == "EOF":
                return out
            if t.kind in ("NL", ";"):
                self.take()
                continue
            out.append(self.assignment())
            end = self.peek()
            if end.kind in ("NL", ";", "EOF"):
                continue
            raise self.err(end, f"expected a newline or ';' after the value of "
                                f"{out[-1][0].name}, got {_describe(end)}")

    def assignment(self) -> tuple[Setting, str]:
        key = self.take()
        if key.kind != "IDENT":
            raise self.err(key, f"expected a setting name, got {_describe(key)}")
        if not re.fullmatch(r"[a-z][_0-9a-z]*", key.text):
            raise self.err(key, f"setting name '{key.text}' must be lower-case letters, "
                                f"digits and '_', starting with a letter")
        op = self.take()
        if op.kind not in ("=", "+="):
            raise self.err(op, f"expected '=' after '{key.text}', got {_describe(op)}")
        if self.peek().kind in ("NL", ";", "EOF"):
            raise self.err(self.peek(), f"missing value after '{key.text} {op.text}'")
        value = self.value(key.text)
        return Setting(key.text, value, key.line, self.file), op.kind

    def value(self, key: str) -> Value:
        t = self.take()
        if t.kind == "STRING":
            return Atom(t.text, True, t.line)
        if t.kind == "NUMBER":
            return Atom(t.text, False, t.line)
        if t.kind == "[":
            return self.list_rest(key, t)
        if t.kind == "IDENT":
            raise self.err(t, f"bare word '{t.text}' is not a value for {key}: put strings "
                              f"in quotes (\"{t.text}\") and write booleans as 0 or 1")
        raise self.err(t, f"expected a value for {key}, got {_describe(t)}")

    def list_rest(self, key: str, opened: _Tok) -> ListValue:
        items: list[Value] = []
        while True:
            self.skip_newlines()
            t = self.peek()
            if t.kind == "EOF":
                raise ConfigError(self.file, opened.line,
                                  f"unterminated list: '[' for {key} opened on this line "
                                  f"has no matching ']'")
            if t.kind == "]":
                self.take()
                return ListValue(tuple(items), opened.line)
            if t.kind == "," and not items:
                raise self.err(t, f"list for {key} starts with ','")
            items.append(self.value(key))
            self.skip_newlines()
            t = self.peek()
            if t.kind == ",":
                self.take()
                continue
            if t.kind == "]":
                continue
            if t.kind == "EOF":
                continue      # reported as unterminated above
            raise self.err(t, f"expected ',' or ']' in the list for {key}, got {_describe(t)}")


def _describe(t: _Tok) -> str:
    return {"NL": "end of line", "EOF": "end of file", "STRING": f'string "{t.text}"',
            "NUMBER": f"number {t.text}", "IDENT": f"word '{t.text}'"}.get(t.kind, f"'{t.text}'")


def parse_settings(text: str, file: str = "<string>") -> dict[str, Setting]:
    """Syntax only: the settings of one file, the last assignment of a key
    winning (as in xl), ``+=`` appending to the earlier value."""
    out: dict[str, Setting] = {}
    for s, op in _Parser(_lex(text, file), file).settings():
        if op == "+=" and s.name in out:
            prev = out[s.name]
            s = Setting(s.name, _concat(prev, s, file), s.line, file)
        out[s.name] = s
    return out


def _concat(prev: Setting, new: Setting, file: str) -> Value:
    a, b = prev.value, new.value
    if isinstance(a, ListValue) and isinstance(b, ListValue):
        return ListValue(a.items + b.items, a.line)
    if isinstance(a, Atom) and isinstance(b, Atom):
        return Atom(a.text + b.text, a.quoted or b.quoted, b.line)
    raise ConfigError(file, new.line, f"'{new.name} +=' must add a list to a list or a "
                                      f"string to a string")


# -- step 2: meaning ------------------------------------------------------------------

ACTIONS = ("destroy", "restart", "rename-restart", "preserve", "coredump-destroy",
           "coredump-restart", "soft-reset")
TYPES = ("pv", "pvh", "hvm")

DEFAULT_MEMORY_MIB = 32            # libxl's default when memory= is absent
DEFAULT_MAX_GRANT_FRAMES = 64      # xl.conf max_grant_frames
DEFAULT_MAX_MAPTRACK_FRAMES = 1024  # xl.conf max_maptrack_frames
DEFAULT_MAX_EVENT_CHANNELS = 1023  # libxl default

_R_DISPLAY = "emulated display/console hardware (HVM device model) is not modelled here"
_R_DM = "there is no QEMU device model here; guests are paravirtual"
_R_BOOT = "no bootloader or firmware here: the guest kernel is named with kernel="
_R_PASSTHRU = ("hardware passthrough is not modelled; the toolstack hands disk images and "
               "TAP devices to driver domains instead")
_R_SCHED = "vCPUs are host threads scheduled by the host OS; Xen scheduler parameters do not apply"
_R_NUMA = "there is no NUMA topology here"
_R_HW = "CPU/MMU virtualisation features have no meaning for a process-based domain"
_R_DEV = "this paravirtual device class has no frontend/backend here (only vbd, vif, console)"
_R_MISC = "not applicable to this system"

IGNORED_REASONS: dict[str, str] = {}
for _keys, _reason in [
    ("vnc vnclisten vncdisplay vncunused vncpasswd keymap sdl opengl display xauthority "
     "spice spicehost spiceport spicetls_port spicedisable_ticketing spicepasswd "
     "spiceagent_mouse spicevdagent spice_clipboard_sharing spiceusbredirection "
     "spice_image_compression spice_streaming_video vga stdvga videoram serial soundhw "
     "usb usbdevice usbctrl usbdev vkb_device boot nographic", _R_DISPLAY),
    ("device_model_version device_model_override device_model_stubdomain_override "
     "device_model_stubdomain_seclabel device_model_args device_model_args_pv "
     "device_model_args_hvm device_model_user dm_restrict stubdomain_memory "
     "stubdomain_kernel stubdomain_ramdisk stubdomain_cmdline xen_platform_pci "
     "vendor_device hdtype acpi acpi_s3 acpi_s4 acpi_laptop_slate acpi_firmware "
     "smbios_firmware ms_vm_genid rdm_mem_boundary", _R_DM),
    ("bootloader bootloader_args firmware pvshim pvshim_path pvshim_cmdline pvshim_extra "
     "loader firmware_override bios", _R_BOOT),
    ("pci pci_permissive pci_msitranslate pci_seize pci_power_mgmt gfx_passthru rdm "
     "dtdev iomem ioports irqs passthrough e820_host device_tree", _R_PASSTHRU),
    ("pool cpu_weight cap cpus_soft sched", _R_SCHED),
    ("vnuma numa", _R_NUMA),
    ("hap oos shadow_memory nestedhvm altp2m altp2mhvm cpuid nx pae apic hpet tsc_mode "
     "localtime rtc_timeoffset timer_mode vpt_align mmio_hole viridian vmtrace_buf_kb vpmu "
     "mca_caps gic_version nr_spis vuart sve trap_unmapped_accesses llc_colors "
     "max_grant_version claim_mode", _R_HW),
    ("vtpm p9 pvcalls vfb vkb vdispl vsnd channel tee virtio", _R_DEV),
    ("nomigrate xend_suspend_evtchn_compat init_seclabel on_soft_reset_extra", _R_MISC),
]:
    for _k in _keys.split():
        IGNORED_REASONS[_k] = _reason


@dataclass(frozen=True)
class IgnoredSetting:
    """A setting that was read but has no effect here, and why."""

    key: str
    line: int
    reason: str
    known: bool           # False: not an xl.cfg(5) key at all
    file: str = ""        # where it was set (the config file or the command line)

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.key} ignored: {self.reason}"

    def to_dict(self) -> dict:
        return {"key": self.key, "file": self.file, "line": self.line,
                "reason": self.reason, "known": self.known}


@dataclass(frozen=True)
class CpuSet:
    """One xl CPULIST: ``all``, CPUs and ranges, and ``^`` exclusions."""

    all: bool = False
    cpus: frozenset[int] = frozenset()
    exclude: frozenset[int] = frozenset()
    text: str = ""

    def resolve(self, ncpus: int) -> list[int]:
        """The host CPUs meant, on a host with ``ncpus`` CPUs (0..ncpus-1)."""
        base = set(range(ncpus)) if self.all else set(self.cpus)
        if self.all:
            base |= {c for c in self.cpus if c < ncpus}
        return sorted(c for c in base - set(self.exclude) if c < ncpus)

    def to_dict(self) -> dict:
        return {"text": self.text, "all": self.all, "cpus": sorted(self.cpus),
                "exclude": sorted(self.exclude)}


def parse_cpulist(text: str) -> CpuSet:
    """Parse ``"all"``, ``"0-3,5,^1"``, ``"all,^7"``.  Raises ValueError."""
    all_, cpus, excl = False, set(), set()
    parts = [p.strip() for p in text.split(",")]
    if not text.strip():
        raise ValueError("empty CPU list")
    for p in parts:
        neg = p.startswith("^")
        body = p[1:] if neg else p
        if body.startswith(("node:", "nodes:")):
            raise ValueError(f"'{p}': NUMA node pinning is not supported ({_R_NUMA})")
        if body == "all" and not neg:
            all_ = True
            continue
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", body)
        if not m:
            raise ValueError(f"'{p}' is not a CPU number, range N-M, ^exclusion or 'all'")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise ValueError(f"'{p}': range end {hi} is below its start {lo}")
        (excl if neg else cpus).update(range(lo, hi + 1))
    return CpuSet(all_, frozenset(cpus), frozenset(excl), text)


@dataclass
class DomainConfig:
    """A domain's configuration after parsing, validation and defaults."""

    name: str
    source: str = "<string>"
    uuid: str | None = None
    type: str = "pv"
    memory: int = DEFAULT_MEMORY_MIB           # MiB
    maxmem: int = DEFAULT_MEMORY_MIB           # MiB
    vcpus: int = 1
    maxvcpus: int = 1
    cpus: CpuSet | list[CpuSet] | None = None  # one mask for all vCPUs, or one per vCPU
    kernel: str | None = None
    ramdisk: str | None = None
    cmdline: str | None = None                 # effective command line
    root: str | None = None
    extra: str | None = None
    disk: list[DiskSpec] = field(default_factory=list)
    vif: list[VifSpec] = field(default_factory=list)
    on_poweroff: str = "destroy"
    on_reboot: str = "restart"
    on_crash: str = "destroy"
    on_watchdog: str = "destroy"
    on_soft_reset: str = "soft-reset"
    driver_domain: bool = False
    seclabel: str | None = None
    max_grant_frames: int = DEFAULT_MAX_GRANT_FRAMES
    max_maptrack_frames: int = DEFAULT_MAX_MAPTRACK_FRAMES
    max_event_channels: int = DEFAULT_MAX_EVENT_CHANNELS
    workload: str | None = None
    ignored: list[IgnoredSetting] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def vcpu_affinity(self, ncpus: int) -> list[list[int]]:
        """Hard affinity of each vCPU (0..maxvcpus-1) on a host of ``ncpus``."""
        everything = list(range(ncpus))
        if self.cpus is None:
            return [everything for _ in range(self.maxvcpus)]
        if isinstance(self.cpus, CpuSet):
            mask = self.cpus.resolve(ncpus)
            return [mask for _ in range(self.maxvcpus)]
        out = [c.resolve(ncpus) for c in self.cpus[:self.maxvcpus]]
        return out + [everything] * (self.maxvcpus - len(out))

    def to_dict(self) -> dict:
        """JSON-serialisable form (what ``xl create -n`` prints)."""
        cpus: object = None
        if isinstance(self.cpus, CpuSet):
            cpus = self.cpus.to_dict()
        elif isinstance(self.cpus, list):
            cpus = [c.to_dict() for c in self.cpus]
        return {
            "name": self.name, "source": self.source, "uuid": self.uuid, "type": self.type,
            "memory": self.memory, "maxmem": self.maxmem, "vcpus": self.vcpus,
            "maxvcpus": self.maxvcpus, "cpus": cpus, "kernel": self.kernel,
            "ramdisk": self.ramdisk, "cmdline": self.cmdline, "root": self.root,
            "extra": self.extra, "disk": [d.to_dict() for d in self.disk],
            "vif": [v.to_dict() for v in self.vif], "on_poweroff": self.on_poweroff,
            "on_reboot": self.on_reboot, "on_crash": self.on_crash,
            "on_watchdog": self.on_watchdog, "on_soft_reset": self.on_soft_reset,
            "driver_domain": self.driver_domain, "seclabel": self.seclabel,
            "max_grant_frames": self.max_grant_frames,
            "max_maptrack_frames": self.max_maptrack_frames,
            "max_event_channels": self.max_event_channels, "workload": self.workload,
            "ignored": [i.to_dict() for i in self.ignored], "warnings": list(self.warnings),
        }


class _Reader:
    """Typed access to the settings, every error located at its line."""

    def __init__(self, settings: dict[str, Setting], file: str) -> None:
        self.s, self.file = settings, file
        self.used: set[str] = set()

    def has(self, key: str) -> bool:
        return key in self.s

    def line(self, key: str) -> int | None:
        return self.s[key].line if key in self.s else None

    def where(self, key: str) -> str:
        """The file a setting came from (the config file or the command line)."""
        return self.s[key].file if key in self.s else self.file

    def fail(self, key: str, msg: str, line: int | None = None) -> ConfigError:
        return ConfigError(self.where(key), line if line is not None else self.line(key), msg)

    def atom(self, key: str, what: str) -> Atom | None:
        if key not in self.s:
            return None
        self.used.add(key)
        v = self.s[key].value
        if isinstance(v, ListValue):
            raise self.fail(key, f"{key} must be {what}, got a list")
        return v

    def string(self, key: str, what: str = "a string") -> str | None:
        a = self.atom(key, what)
        if a is None:
            return None
        if not a.quoted:
            raise self.fail(key, f'{key} must be {what} in quotes, got {a.text} '
                                 f'(write {key} = "{a.text}")')
        return a.text

    def integer(self, key: str, what: str, minimum: int = 1) -> int | None:
        a = self.atom(key, what)
        if a is None:
            return None
        n = c_integer(a.text)       # xl accepts a quoted number too
        if n is None or n < minimum:
            raise self.fail(key, f"{key} must be {what}, got {a.shown()}")
        return n

    def boolean(self, key: str) -> bool | None:
        a = self.atom(key, "a boolean (0 or 1)")
        if a is None:
            return None
        n = c_integer(a.text)
        if n is None:
            raise self.fail(key, f"{key} must be a boolean (0 or 1), got {a.shown()}")
        return n != 0

    def string_list(self, key: str, what: str) -> list[Atom]:
        """A list of strings; a lone string is taken as a one-element list."""
        if key not in self.s:
            return []
        self.used.add(key)
        v = self.s[key].value
        items = v.items if isinstance(v, ListValue) else (v,)
        out = []
        for i, item in enumerate(items):
            if not isinstance(item, Atom) or not item.quoted:
                shown = "a list" if isinstance(item, ListValue) else item.text
                raise self.fail(key, f"{key}[{i}] must be {what} in quotes, got {shown}",
                                item.line)
            out.append(item)
        return out


def c_integer(text: str) -> int | None:
    """strtol(text, 0) for a whole string: decimal, 0x hex, 0-prefixed octal."""
    t = text.strip()
    if re.fullmatch(r"0[xX][0-9a-fA-F]+", t):
        return int(t, 16)
    if re.fullmatch(r"0[0-7]*", t):
        return int(t, 8) if len(t) > 1 else 0
    if re.fullmatch(r"[1-9][0-9]*", t):
        return int(t)
    return None


_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-"
                   r"[0-9a-fA-F]{12}$")

_KNOWN = {"name", "uuid", "type", "builder", "pvh", "memory", "maxmem", "vcpus", "maxvcpus",
          "cpus", "kernel", "ramdisk", "extra", "cmdline", "root", "disk", "vif",
          "on_poweroff", "on_reboot", "on_crash", "on_watchdog", "on_soft_reset",
          "driver_domain", "seclabel", "max_grant_frames", "max_maptrack_frames",
          "max_event_channels", "workload"}


def _interpret(settings: dict[str, Setting], file: str) -> DomainConfig:
    r = _Reader(settings, file)
    warnings: list[str] = []

    name = r.string("name", "the domain name")
    if name is None:
        raise ConfigError(file, None, "name is mandatory (add name = \"...\")")
    if not name or name.isdigit() or any(c in name for c in "/\\") or \
            any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise r.fail("name", f'name "{name}" is not usable: it must be non-empty, not all '
                             f"digits (it would look like a domid), and contain no '/', '\\' "
                             f"or control characters")
    cfg = DomainConfig(name=name, source=file)

    uuid = r.string("uuid", "a UUID")
    if uuid is not None:
        if not _UUID.match(uuid):
            raise r.fail("uuid", f'uuid must look like 01234567-89ab-cdef-0123-456789abcdef, '
                                 f'got "{uuid}"')
        cfg.uuid = uuid.lower()

    # -- guest type, with the old spellings -----------------------------------------
    gtype = r.string("type", "one of pv, pvh, hvm")
    builder = r.string("builder", 'one of "generic", "hvm"')
    pvh = r.boolean("pvh")
    if gtype is not None and gtype not in TYPES:
        raise r.fail("type", f'type must be one of pv, pvh, hvm; got "{gtype}"')
    if builder is not None:
        if builder not in ("generic", "hvm"):
            raise r.fail("builder", f'builder must be "generic" or "hvm", got "{builder}"')
        if gtype is None:
            gtype = "hvm" if builder == "hvm" else "pv"
            warnings.append(f"{file}:{r.line('builder')}: builder is deprecated; "
                            f'use type = "{gtype}"')
        else:
            warnings.append(f"{file}:{r.line('builder')}: builder ignored because type "
                            f"is given")
    if pvh is not None:
        if gtype is None and pvh:
            gtype = "pvh"
        warnings.append(f"{file}:{r.line('pvh')}: pvh= is deprecated; use type = \"pvh\"")
    cfg.type = gtype or "pv"

    # -- memory and vCPUs ---------------------------------------------------------------
    mem = r.integer("memory", "a positive integer (MiB)")
    maxmem = r.integer("maxmem", "a positive integer (MiB)")
    cfg.memory = mem if mem is not None else (maxmem or DEFAULT_MEMORY_MIB)
    cfg.maxmem = maxmem if maxmem is not None else cfg.memory
    if cfg.maxmem < cfg.memory:
        raise r.fail("maxmem", f"maxmem ({cfg.maxmem} MiB) must be at least memory "
                               f"({cfg.memory} MiB)")
    vcpus = r.integer("vcpus", "a positive integer")
    maxvcpus = r.integer("maxvcpus", "a positive integer")
    cfg.vcpus = vcpus if vcpus is not None else 1
    cfg.maxvcpus = maxvcpus if maxvcpus is not None else cfg.vcpus
    if cfg.maxvcpus < cfg.vcpus:
        raise r.fail("maxvcpus", f"maxvcpus ({cfg.maxvcpus}) must be at least vcpus "
                                 f"({cfg.vcpus})")
    cfg.cpus = _read_cpus(r)

    # -- kernel ------------------------------------------------------------------------
    cfg.kernel = r.string("kernel", "a path")
    cfg.ramdisk = r.string("ramdisk", "a path")
    cmdline = r.string("cmdline", "a string")
    cfg.root = r.string("root", "a string")
    cfg.extra = r.string("extra", "a string")
    if cmdline is not None:
        for k in ("root", "extra"):
            if r.has(k):
                cfg.ignored.append(IgnoredSetting(k, r.line(k) or 0,
                                                  "cmdline is given, which replaces "
                                                  "root and extra", True, r.where(k)))
        cfg.cmdline = cmdline
    elif cfg.root is not None or cfg.extra is not None:
        parts = ([f"root={cfg.root}"] if cfg.root is not None else []) + \
                ([cfg.extra] if cfg.extra else [])
        cfg.cmdline = " ".join(parts)

    # -- devices -----------------------------------------------------------------------
    seen_devid: dict[int, int] = {}
    for i, a in enumerate(r.string_list("disk", "a disk spec string")):
        try:
            d = parse_disk_spec(a.text)
        except DiskSpecError as e:
            raise r.fail("disk", f"disk[{i}] \"{a.text}\": {e}", a.line) from None
        if d.devid in seen_devid:
            raise r.fail("disk", f"disk[{i}] \"{a.text}\": vdev {d.vdev} is the "
                                            f"same device as disk[{seen_devid[d.devid]}]", a.line)
        seen_devid[d.devid] = i
        cfg.disk.append(d)
    seed = cfg.uuid or cfg.name
    vif_ids: dict[int, int] = {}
    for i, a in enumerate(r.string_list("vif", "a vif spec string")):
        try:
            v = parse_vif_spec(a.text, devid=i).with_mac(seed)
        except VifSpecError as e:
            raise r.fail("vif", f"vif[{i}] \"{a.text}\": {e}", a.line) from None
        if v.devid in vif_ids:
            raise r.fail("vif", f"vif[{i}] \"{a.text}\": devid {v.devid} is "
                                            f"already used by vif[{vif_ids[v.devid]}]", a.line)
        vif_ids[v.devid] = i
        cfg.vif.append(v)
    macs = [v.mac for v in cfg.vif]
    if len(set(macs)) != len(macs):
        dup = next(m for m in macs if macs.count(m) > 1)
        raise r.fail("vif", f"vif: mac {dup} is used twice")

    # -- lifecycle actions -----------------------------------------------------------------
    for key in ("on_poweroff", "on_reboot", "on_crash", "on_watchdog", "on_soft_reset"):
        act = r.string(key, "an action")
        if act is None:
            continue
        if act not in ACTIONS:
            raise r.fail(key, f"{key} must be one of {', '.join(ACTIONS)}; got \"{act}\"")
        setattr(cfg, key, act)

    # -- the rest ------------------------------------------------------------------------
    dd = r.boolean("driver_domain")
    cfg.driver_domain = bool(dd)
    cfg.seclabel = r.string("seclabel", "an XSM label")
    for key in ("max_grant_frames", "max_maptrack_frames", "max_event_channels"):
        n = r.integer(key, "a positive integer")
        if n is not None:
            setattr(cfg, key, n)
    cfg.workload = r.string("workload", "a workload description")

    for key, s in settings.items():
        if key in r.used:
            continue
        if key in IGNORED_REASONS:
            cfg.ignored.append(IgnoredSetting(key, s.line, IGNORED_REASONS[key], True, s.file))
        elif key not in _KNOWN:
            cfg.ignored.append(IgnoredSetting(key, s.line, "unknown setting: not in xl.cfg(5)",
                                              False, s.file))
    cfg.ignored.sort(key=lambda i: i.line)
    cfg.warnings = warnings
    return cfg


def _read_cpus(r: _Reader) -> CpuSet | list[CpuSet] | None:
    if not r.has("cpus"):
        return None
    v = r.s["cpus"].value
    r.used.add("cpus")
    try:
        if isinstance(v, Atom):
            if not v.quoted:
                n = c_integer(v.text)
                if n is None:
                    raise ValueError(f"'{v.text}' is not a CPU number")
                return parse_cpulist(str(n))
            return parse_cpulist(v.text)
        out = []
        for i, item in enumerate(v.items):
            if not isinstance(item, Atom):
                raise r.fail("cpus", f"cpus[{i}] must be a CPU list string, got a nested list",
                             item.line)
            try:
                out.append(parse_cpulist(item.text))
            except ValueError as e:
                raise r.fail("cpus", f"cpus[{i}]: {e}", item.line) from None
        return out
    except ValueError as e:
        raise r.fail("cpus", f"cpus: {e}") from None


def parse_config_text(text: str, file: str = "<string>",
                      overrides: Iterable[str] = ()) -> DomainConfig:
    """Parse and interpret xl.cfg text.  ``overrides`` are extra ``KEY=VALUE``
    lines, as given after the file name on ``xl create``'s command line; they
    win over the file."""
    settings = parse_settings(text, file)
    for i, line in enumerate(overrides):
        for key, s in parse_settings(line, f"<command line {i + 1}>").items():
            settings[key] = s
    return _interpret(settings, file)


def parse_config_file(path: str | Path, overrides: Iterable[str] = ()) -> DomainConfig:
    """Read and parse one config file.  Errors name the file as given."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError(str(path), None, f"cannot read config file: {e.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ConfigError(str(path), line,
                          "file is not valid UTF-8 text") from None
    return parse_config_text(text, str(path), overrides)
