"""Disk specifications: the strings inside ``disk = [ ... ]``.

What it is in Xen
-----------------
``xl-disk-configuration(5)`` defines a small language for one virtual block
device (VBD): comma-separated *positional* parameters ``target, format, vdev,
access``, ``key=value`` pairs, and bare flags, in any mix::

    /srv/guest.img,raw,xvda,rw
    /srv/guest.img,,xvda                       (empty = default)
    format=raw, vdev=xvda, access=rw, target=/srv/guest.img
    /root/image.iso,,hdc,cdrom                 (cdrom is a flag)
    phy:/dev/vg/guest,xvda,w                   (deprecated xend syntax)

``target=`` must come last because it swallows the rest of the string,
commas included.  The guest-visible name (``vdev``, e.g. ``xvda``) is turned
into the integer that the frontend and backend use as the device id in
XenStore (``device/vbd/51712``), following ``docs/misc/vbd-interface.txt``::

    xvd, disk < 16 and partition < 16:   202 << 8 | disk << 4 | partition
    xvd, larger:                          1 << 28 | disk << 8 | partition
    sd (disk, partition < 16):              8 << 8 | disk << 4 | partition
    hd disks 0-1 (partition < 64):          3 << 8 | disk << 6 | partition
    hd disks 2-3 (partition < 64):         22 << 8 | (disk-2) << 6 | partition

so ``xvda`` is 51712, ``xvdb`` 51728, ``hda`` 768, ``sda`` 2048.  Disk
letters count like spreadsheet columns: ``a``..``z`` are 0..25, ``aa`` is 26.

What it does here
-----------------
:func:`parse_disk_spec` parses one string into a :class:`DiskSpec` or raises
:class:`DiskSpecError` naming what was wrong.  It does no I/O: whether the
target exists is the toolstack's question when it creates the domain.

Where this differs from Xen
---------------------------
* ``target`` is kept as written.  xl prepends ``/dev/`` to a relative target;
  here targets are usually image files, and a relative path is resolved by
  the toolstack against the config file's directory.
* Formats other than ``raw`` parse (they are valid xl) but the backend here
  serves raw images only; the toolstack refuses them at create time.
* COLO replication and virtio disks (``colo``, ``specification=virtio``) are
  refused with an explanation rather than silently ignored.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

FORMATS = ("raw", "qcow", "qcow2", "vhd", "qed")
BACKENDTYPES = ("phy", "qdisk", "standalone", "tap")
ACCESS = {"r": "ro", "ro": "ro", "w": "rw", "rw": "rw"}

# Deprecated prefixes of the old ``[<format>:][<target>]`` syntax.
_PREFIX_FORMATS = {"raw": "raw", "qcow": "qcow", "qcow2": "qcow2", "vhd": "vhd"}
_PREFIX_SCRIPTS = {"iscsi": "block-iscsi", "nbd": "block-nbd", "enbd": "block-enbd",
                   "drbd": "block-drbd"}
_PREFIX_IGNORED = ("tapdisk", "tap2", "tap", "aio", "ioemu", "file", "phy")

_FLAGS = ("cdrom", "discard", "no-discard", "direct-io-safe", "trusted", "untrusted")
_KEYS = ("target", "format", "vdev", "access", "devtype", "backend", "backendtype",
         "script", "specification", "grant_usage")
_REFUSED = {
    "colo": "COLO disk replication is not supported here",
    "colo-host": "COLO disk replication is not supported here",
    "colo-port": "COLO disk replication is not supported here",
    "colo-export": "COLO disk replication is not supported here",
    "active-disk": "COLO disk replication is not supported here",
    "hidden-disk": "COLO disk replication is not supported here",
}

# VBD number encodings (docs/misc/vbd-interface.txt).
XVD_MAJOR = 202
SD_MAJOR = 8
HD_MAJOR_01 = 3
HD_MAJOR_23 = 22
XVD_EXTENDED = 1 << 28


class DiskSpecError(ValueError):
    """A disk specification string is malformed; the message says how."""


@dataclass(frozen=True)
class DiskSpec:
    """One virtual block device, as ``xl-disk-configuration(5)`` describes it."""

    vdev: str
    target: str | None = None
    format: str = "raw"
    access: str = "rw"                 # "rw" or "ro"
    devtype: str = "disk"              # "disk" or "cdrom"
    backend: str | None = None         # backend domain name or id; None = dom0
    backendtype: str | None = None
    script: str | None = None
    discard: bool = True
    direct_io_safe: bool = False
    trusted: bool = True

    @property
    def readonly(self) -> bool:
        return self.access == "ro"

    @property
    def is_cdrom(self) -> bool:
        return self.devtype == "cdrom"

    @property
    def devid(self) -> int:
        """The Xen virtual device number (``device/vbd/<devid>`` in XenStore)."""
        return vdev_to_devid(self.vdev)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["devid"] = self.devid
        return d


# -- vdev names ---------------------------------------------------------------------

def _letters_to_index(letters: str) -> int:
    """Bijective base-26: a=0 .. z=25, aa=26 .. zz=701, aaa=702 ..."""
    n = 0
    for ch in letters:
        n = n * 26 + (ord(ch) - ord("a") + 1)
    return n - 1


def index_to_letters(index: int) -> str:
    """Inverse of the disk-letter numbering: 0 -> 'a', 26 -> 'aa'."""
    if index < 0:
        raise ValueError(f"disk index must be >= 0, got {index}")
    out = ""
    n = index + 1
    while n:
        n, r = divmod(n - 1, 26)
        out = chr(ord("a") + r) + out
    return out


_VDEV_NAME = re.compile(r"^(xvd|hd|sd)([a-z]+)(0|[1-9][0-9]*)?$")
_VDEV_DP = re.compile(r"^d(0|[1-9][0-9]*)(?:p(0|[1-9][0-9]*))?$")


def _xvd_number(disk: int, part: int, vdev: str) -> int:
    if disk < 16 and part < 16:
        return (XVD_MAJOR << 8) | (disk << 4) | part
    if disk < (1 << 20) and part < 256:
        return XVD_EXTENDED | (disk << 8) | part
    raise DiskSpecError(f"vdev '{vdev}': Xen virtual disks go up to disk {(1 << 20) - 1} "
                        f"partition 255 (got disk {disk} partition {part})")


def _parse_c_number(text: str) -> int | None:
    """strtol(text, 0): decimal, 0x hex or leading-0 octal; None if not a number."""
    try:
        if re.fullmatch(r"0[xX][0-9a-fA-F]+", text):
            return int(text, 16)
        if re.fullmatch(r"0[0-7]*", text):
            return int(text, 8) if len(text) > 1 else 0
        if re.fullmatch(r"[1-9][0-9]*", text):
            return int(text)
    except ValueError:
        return None
    return None


def vdev_to_devid(vdev: str) -> int:
    """Translate a guest device name (``xvda``, ``hdc2``, ``d1p2``, ``51712``)
    into the Xen virtual device number, or raise :class:`DiskSpecError`."""
    num = _parse_c_number(vdev)
    if num is not None:
        if not 0 < num < (2 << 28):
            raise DiskSpecError(f"vdev number {vdev} is outside the VBD number space")
        return num
    m = _VDEV_DP.match(vdev)
    if m:
        return _xvd_number(int(m.group(1)), int(m.group(2) or 0), vdev)
    m = _VDEV_NAME.match(vdev)
    if not m:
        raise DiskSpecError(
            f"vdev '{vdev}' is not a valid virtual device name "
            f"(expected xvdX, hdX, sdX with an optional partition number, dN[pM], or a number)")
    kind, letters, part_s = m.groups()
    disk = _letters_to_index(letters)
    part = int(part_s or 0)
    if kind == "xvd":
        return _xvd_number(disk, part, vdev)
    if kind == "sd":
        if disk > 15 or part > 15:
            raise DiskSpecError(f"vdev '{vdev}': SCSI disks go up to sdp15 "
                                f"(disk 15, partition 15); use xvd names beyond that")
        return (SD_MAJOR << 8) | (disk << 4) | part
    # hd
    if disk > 3 or part > 63:
        raise DiskSpecError(f"vdev '{vdev}': IDE disks go up to hdd63 "
                            f"(disk 3, partition 63); use xvd names beyond that")
    if disk < 2:
        return (HD_MAJOR_01 << 8) | (disk << 6) | part
    return (HD_MAJOR_23 << 8) | ((disk - 2) << 6) | part


def devid_to_vdev(devid: int) -> str:
    """A canonical name for a virtual device number (inverse of vdev_to_devid)."""
    if devid & XVD_EXTENDED and devid < (2 << 28):
        disk, part = (devid >> 8) & 0xFFFFF, devid & 0xFF
        return f"xvd{index_to_letters(disk)}{part or ''}"
    major = devid >> 8
    if major == XVD_MAJOR:
        return f"xvd{index_to_letters((devid >> 4) & 0xF)}{(devid & 0xF) or ''}"
    if major == SD_MAJOR:
        return f"sd{index_to_letters((devid >> 4) & 0xF)}{(devid & 0xF) or ''}"
    if major == HD_MAJOR_01:
        return f"hd{index_to_letters((devid >> 6) & 0x3)}{(devid & 0x3F) or ''}"
    if major == HD_MAJOR_23:
        return f"hd{index_to_letters(2 + ((devid >> 6) & 0x3))}{(devid & 0x3F) or ''}"
    raise ValueError(f"virtual device number {devid} has no standard name")


# -- the spec string ------------------------------------------------------------------

def _strip_prefixes(target: str, found: dict[str, str]) -> str:
    """Peel the deprecated ``phy:``, ``tap:aio:``, ``raw:``, ``iscsi:`` prefixes."""
    while True:
        m = re.match(r"^([a-z0-9]+):(.*)$", target, re.S)
        if not m:
            return target
        word, rest = m.groups()
        if word in _PREFIX_FORMATS:
            found.setdefault("format", _PREFIX_FORMATS[word])
        elif word in _PREFIX_SCRIPTS:
            found.setdefault("script", _PREFIX_SCRIPTS[word])
        elif word not in _PREFIX_IGNORED:
            return target
        target = rest


def parse_disk_spec(spec: str) -> DiskSpec:
    """Parse one ``DISKSPEC`` string.  Raises :class:`DiskSpecError`."""
    if not isinstance(spec, str):
        raise DiskSpecError(f"a disk spec must be a string, got {spec!r}")
    values: dict[str, str] = {}
    flags: dict[str, bool] = {}
    positional: list[str] = []
    order = ("target", "format", "vdev", "access")

    def setval(key: str, value: str) -> None:
        if key in values:
            raise DiskSpecError(f"'{key}' given more than once")
        values[key] = value

    rest = spec
    while True:
        rest = rest.lstrip(" \t")
        if rest.startswith("target="):
            # Swallows the remainder, commas and trailing blanks included.
            setval("target", rest[len("target="):])
            break
        item, sep, rest = rest.partition(",")
        item = item.strip(" \t")
        if "=" in item:
            key, _, value = item.partition("=")
            key, value = key.strip(), value.strip()
            if key in _REFUSED:
                raise DiskSpecError(f"'{key}': {_REFUSED[key]}")
            if key not in _KEYS:
                raise DiskSpecError(f"unknown disk parameter '{key}' (known: "
                                    f"{', '.join(_KEYS)}; flags: {', '.join(_FLAGS)})")
            setval(key, value)
        elif item in _FLAGS:
            flags[item] = True
        elif item in _REFUSED:
            raise DiskSpecError(f"'{item}': {_REFUSED[item]}")
        else:
            positional.append(item)
        if not sep:
            break

    # Old xend syntax "[fmt:]target,vdev[:devtype],access": three positionals
    # where the second carries the vdev (maybe with :cdrom).
    deprecated = (len(positional) in (2, 3) and positional[1] not in FORMATS + ("",)
                  and _looks_like_vdev(positional[1]))
    if deprecated:
        target, vdev = positional[0], positional[1]
        prefix_found: dict[str, str] = {}
        if target:
            target = _strip_prefixes(target, prefix_found)
        if ":" in vdev:
            vdev, _, dt = vdev.partition(":")
            if dt != "cdrom":
                raise DiskSpecError(f"'{positional[1]}': only ':cdrom' may follow a vdev")
            flags["cdrom"] = True
        mapped = {"target": target, "vdev": vdev}
        if len(positional) == 3:
            mapped["access"] = positional[2]
        mapped.update({k: v for k, v in prefix_found.items() if k not in values})
        for k, v in mapped.items():
            setval(k, v)
    else:
        if len(positional) > 4:
            raise DiskSpecError(f"too many positional parameters ({len(positional)}); "
                                f"the order is target, format, vdev, access")
        for key, value in zip(order, positional):
            if key == "target" and value:
                prefix_found = {}
                value = _strip_prefixes(value, prefix_found)
                for k, v in prefix_found.items():
                    if k not in values:
                        setval(k, v)
            if key in values and value == "":
                continue            # empty positional: the named one stands
            setval(key, value)

    return _build(spec, values, flags)


def _looks_like_vdev(text: str) -> bool:
    try:
        vdev_to_devid(text.partition(":")[0])
        return True
    except DiskSpecError:
        return False


def _build(spec: str, values: dict[str, str], flags: dict[str, bool]) -> DiskSpec:
    fmt = values.get("format") or "raw"
    if fmt not in FORMATS:
        raise DiskSpecError(f"format '{fmt}' is not one of {', '.join(FORMATS)}")
    devtype = values.get("devtype") or ("cdrom" if flags.get("cdrom") else "disk")
    if devtype not in ("disk", "cdrom"):
        raise DiskSpecError(f"devtype '{devtype}' is not supported (only cdrom)")
    if flags.get("cdrom"):
        devtype = "cdrom"
    access_raw = values.get("access") or ("ro" if devtype == "cdrom" else "rw")
    if access_raw not in ACCESS:
        raise DiskSpecError(f"access '{access_raw}' must be one of r, ro, rw, w")
    vdev = values.get("vdev")
    if not vdev:
        raise DiskSpecError(f"no vdev in disk spec '{spec}' (the virtual device, e.g. xvda, "
                            f"is mandatory)")
    vdev_to_devid(vdev)                          # raises with a clear message
    target = values.get("target") or None
    if target is None and devtype != "cdrom":
        raise DiskSpecError(f"no target in disk spec '{spec}' "
                            f"(only an empty cdrom drive may omit it)")
    backendtype = values.get("backendtype") or None
    if backendtype is not None and backendtype not in BACKENDTYPES:
        raise DiskSpecError(f"backendtype '{backendtype}' is not one of {', '.join(BACKENDTYPES)}")
    spec_kind = values.get("specification") or "xen"
    if spec_kind != "xen":
        raise DiskSpecError(f"specification '{spec_kind}': only 'xen' (blkif) disks exist here")
    if "grant_usage" in values:
        raise DiskSpecError("'grant_usage' only applies to virtio disks, which do not exist here")
    if flags.get("discard") and flags.get("no-discard"):
        raise DiskSpecError("both 'discard' and 'no-discard' given")
    if flags.get("trusted") and flags.get("untrusted"):
        raise DiskSpecError("both 'trusted' and 'untrusted' given")
    return DiskSpec(
        vdev=vdev,
        target=target,
        format=fmt,
        access=ACCESS[access_raw],
        devtype=devtype,
        backend=values.get("backend") or None,
        backendtype=backendtype,
        script=values.get("script") or None,
        discard=not flags.get("no-discard", False),
        direct_io_safe=flags.get("direct-io-safe", False),
        trusted=not flags.get("untrusted", False),
    )
