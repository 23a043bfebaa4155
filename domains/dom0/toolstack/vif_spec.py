"""Network interface specifications: the strings inside ``vif = [ ... ]``.

What it is in Xen
-----------------
``xl-network-configuration(5)`` describes one virtual network interface (VIF)
as comma-separated ``key=value`` pairs, all optional::

    'mac=00:16:3e:74:3d:76,bridge=xenbr0'
    'bridge=xenbr1,backend=netdom,rate=10Mb/s@20ms,mtu=9000'
    ''                                  (all defaults)

Each VIF's ``devid`` is its index in the list, unless ``devid=`` says
otherwise.  The frontend sees it as ``device/vif/<devid>`` in XenStore; the
backend's interface is named ``vif<domid>.<devid>`` unless ``vifname=`` is
given.  A VIF with no ``mac=`` gets one inside Xen's Organizationally Unique
Identifier 00:16:3e.

What it does here
-----------------
:func:`parse_vif_spec` parses one string into a :class:`VifSpec` or raises
:class:`VifSpecError` naming what was wrong.  :func:`generate_mac` makes the
default MAC: xl draws three random bytes; here they come from a hash of a seed
(the domain's uuid or name) and the devid, so a domain restarted by the
watchdog keeps its MAC and tests are reproducible.  Like xl, the fourth octet
has its top bit clear.

Where this differs from Xen
---------------------------
* ``type``/``model`` (HVM emulated NICs) and ``script`` are parsed and kept;
  there is no device model or hotplug script here, so the toolstack ignores
  them and says so.
* ``vlan`` is kept as text (validated); the bridge here is untagged.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from dataclasses import asdict, dataclass, replace

XEN_OUI = (0x00, 0x16, 0x3E)
DEFAULT_BRIDGE = "xenbr0"
DEFAULT_RATE_INTERVAL_US = 50_000
MTU_MIN, MTU_MAX = 68, 65535

_KEYS = ("mac", "bridge", "backend", "ip", "model", "type", "vifname", "script", "rate",
         "mtu", "gatewaydev", "netdev", "devid", "vlan", "accel")
_FLAGS = ("trusted", "untrusted")
_MAC = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")
_IFNAME = re.compile(r"^[A-Za-z0-9_.\-]{1,15}$")


class VifSpecError(ValueError):
    """A vif specification string is malformed; the message says how."""


@dataclass(frozen=True)
class VifRate:
    """Credit-based rate limit: ``bytes_per_interval`` every ``interval_us``."""

    bytes_per_interval: int
    interval_us: int
    text: str

    @property
    def bytes_per_second(self) -> float:
        return self.bytes_per_interval * 1_000_000 / self.interval_us


@dataclass(frozen=True)
class VifSpec:
    """One virtual network interface, as ``xl-network-configuration(5)`` describes it."""

    devid: int
    mac: str | None = None               # lower-case aa:bb:cc:dd:ee:ff
    mac_generated: bool = False          # True when filled in by generate_mac
    bridge: str = DEFAULT_BRIDGE
    backend: str | None = None           # backend domain name or id; None = dom0
    ip: tuple[str, ...] = ()
    model: str | None = None
    type: str | None = None              # "vif" or "ioemu" (HVM only)
    vifname: str | None = None
    script: str | None = None
    rate: VifRate | None = None
    mtu: int | None = None               # None: 1500, or the bridge's MTU
    gatewaydev: str | None = None
    vlan: str | None = None
    trusted: bool = True

    def backend_ifname(self, domid: int) -> str:
        """The backend's interface name: ``vifname`` or ``vif<domid>.<devid>``."""
        return self.vifname or f"vif{domid}.{self.devid}"

    def with_mac(self, seed: str | bytes) -> "VifSpec":
        """This VIF with a MAC: its own, or one generated from ``seed``."""
        if self.mac is not None:
            return self
        return replace(self, mac=generate_mac(seed, self.devid), mac_generated=True)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ip"] = list(self.ip)
        return d


def normalise_mac(text: str) -> str:
    """Check a MAC address for a guest NIC and return it in lower case."""
    if not _MAC.match(text):
        raise VifSpecError(f"mac '{text}' is not six two-digit hex groups separated by ':' "
                           f"(e.g. 00:16:3e:12:34:56)")
    octets = [int(x, 16) for x in text.split(":")]
    if octets[0] & 1:
        raise VifSpecError(f"mac '{text}' is a multicast address (low bit of the first octet "
                           f"set); a NIC needs a unicast address")
    if not any(octets):
        raise VifSpecError(f"mac '{text}' is all zeros")
    return text.lower()


def generate_mac(seed: str | bytes, devid: int) -> str:
    """A MAC in Xen's OUI 00:16:3e, the same every time for the same seed and devid."""
    if isinstance(seed, str):
        seed = seed.encode()
    h = hashlib.sha256(seed + b"/vif/" + str(devid).encode()).digest()
    octets = (*XEN_OUI, h[0] & 0x7F, h[1], h[2])
    return ":".join(f"{o:02x}" for o in octets)


_RATE = re.compile(r"^(\d+)\s*([GMK]?)([Bb])/s(?:@(\d+)\s*(s|ms|us)?)?$")


def parse_rate(text: str) -> VifRate:
    """Parse ``RATE/s[@INTERVAL]``: e.g. ``10Mb/s``, ``250KB/s``, ``1MB/s@20ms``."""
    m = _RATE.match(text.strip())
    if not m:
        raise VifSpecError(f"rate '{text}' is not RATE/s[@INTERVAL] (e.g. 10Mb/s, 250KB/s, "
                           f"1MB/s@20ms; units GB MB KB B for bytes, Gb Mb Kb b for bits)")
    amount, prefix, unit, ival, iunit = m.groups()
    bytes_per_sec = int(amount) * {"": 1, "K": 10**3, "M": 10**6, "G": 10**9}[prefix]
    if unit == "b":
        bytes_per_sec //= 8
    interval_us = DEFAULT_RATE_INTERVAL_US
    if ival is not None:
        interval_us = int(ival) * {"s": 1_000_000, "ms": 1000, "us": 1, None: 1}[iunit]
    if bytes_per_sec <= 0:
        raise VifSpecError(f"rate '{text}' is zero")
    if interval_us <= 0:
        raise VifSpecError(f"rate '{text}': the interval must be positive")
    per_interval = bytes_per_sec * interval_us // 1_000_000
    if per_interval <= 0:
        raise VifSpecError(f"rate '{text}' allows less than one byte per "
                           f"{interval_us} us interval")
    return VifRate(per_interval, interval_us, text.strip())


_VLAN_TERM = re.compile(r"^(\d+)(p|u)?$|^(\d+)-(\d+)(u)?$|^(\d+)\+(\d+)x(\d+)(u)?$")


def _check_vlan(text: str) -> str:
    for term in text.split("/"):
        m = _VLAN_TERM.match(term)
        if not m:
            raise VifSpecError(f"vlan term '{term}' is not N, Np, Nu, N-M or N+OFFxCOUNT")
        ids = [int(x) for x in m.groups() if x and x.isdigit()]
        first = ids[0]
        if not 1 <= first <= 4094 or (m.group(4) and not first <= int(m.group(4)) <= 4094):
            raise VifSpecError(f"vlan term '{term}': VLAN ids are 1..4094")
    return text


def parse_vif_spec(spec: str, devid: int = 0) -> VifSpec:
    """Parse one ``vifspec`` string; ``devid`` is its index in the vif list."""
    if not isinstance(spec, str):
        raise VifSpecError(f"a vif spec must be a string, got {spec!r}")
    values: dict[str, str] = {}
    flags: set[str] = set()
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        if item in _FLAGS:
            flags.add(item)
            continue
        key, eq, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not eq:
            raise VifSpecError(f"'{item}' is not key=value (known keys: {', '.join(_KEYS)})")
        if key not in _KEYS:
            raise VifSpecError(f"unknown vif parameter '{key}' (known: {', '.join(_KEYS)})")
        if key == "netdev":              # deprecated alias
            key = "gatewaydev"
        if key in values:
            raise VifSpecError(f"'{key}' given more than once")
        values[key] = value
    if "trusted" in flags and "untrusted" in flags:
        raise VifSpecError("both 'trusted' and 'untrusted' given")
    if "accel" in values:
        raise VifSpecError("'accel' (the old netchannel2 accelerator) is not supported")

    if "devid" in values:
        if not values["devid"].isdigit():
            raise VifSpecError(f"devid '{values['devid']}' must be a non-negative integer")
        devid = int(values["devid"])
    mac = normalise_mac(values["mac"]) if values.get("mac") else None
    ips: tuple[str, ...] = ()
    if values.get("ip"):
        out = []
        for addr in values["ip"].split():
            try:
                ipaddress.ip_interface(addr)
                out.append(addr)
            except ValueError:
                raise VifSpecError(f"ip '{addr}' is not an IPv4 or IPv6 address") from None
        ips = tuple(out)
    vtype = values.get("type") or None
    if vtype is not None and vtype not in ("vif", "ioemu"):
        raise VifSpecError(f"type '{vtype}' must be 'vif' or 'ioemu'")
    for key in ("vifname", "bridge", "gatewaydev"):
        if values.get(key) and not _IFNAME.match(values[key]):
            raise VifSpecError(f"{key} '{values[key]}' is not a valid interface name "
                               f"(1-15 letters, digits, '.', '-', '_')")
    mtu = None
    if values.get("mtu"):
        if not values["mtu"].isdigit() or not MTU_MIN <= int(values["mtu"]) <= MTU_MAX:
            raise VifSpecError(f"mtu '{values['mtu']}' must be an integer {MTU_MIN}..{MTU_MAX}")
        mtu = int(values["mtu"])
    return VifSpec(
        devid=devid,
        mac=mac,
        bridge=values.get("bridge") or DEFAULT_BRIDGE,
        backend=values.get("backend") or None,
        ip=ips,
        model=values.get("model") or None,
        type=vtype,
        vifname=values.get("vifname") or None,
        script=values.get("script") or None,
        rate=parse_rate(values["rate"]) if values.get("rate") else None,
        mtu=mtu,
        gatewaydev=values.get("gatewaydev") or None,
        vlan=_check_vlan(values["vlan"]) if values.get("vlan") else None,
        trusted="untrusted" not in flags,
    )
