"""Disk specs (xl-disk-configuration(5)) and vdev numbers (vbd-interface.txt)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from domains.dom0.toolstack.disk_spec import (
    DiskSpec,
    DiskSpecError,
    devid_to_vdev,
    index_to_letters,
    parse_disk_spec,
    vdev_to_devid,
)

HDA_DISK = DiskSpec(vdev="hda", target="/dev/vg/guest-volume", format="raw", access="rw")
HDC_CDROM = DiskSpec(vdev="hdc", target="/root/image.iso", format="raw", access="ro",
                     devtype="cdrom")


# The man page's two groups of equivalent strings.
@pytest.mark.parametrize("spec", [
    "/dev/vg/guest-volume,,hda",
    "/dev/vg/guest-volume,raw,hda,rw",
    "format=raw, vdev=hda, access=rw, target=/dev/vg/guest-volume",
    "raw:/dev/vg/guest-volume,hda,w",
])
def test_man_page_equivalents_disk(spec):
    assert parse_disk_spec(spec) == HDA_DISK


@pytest.mark.parametrize("spec", [
    "/root/image.iso,,hdc,cdrom",
    "/root/image.iso,,hdc,,cdrom",
    "/root/image.iso,raw,hdc,devtype=cdrom",
    "format=raw, vdev=hdc, access=ro, devtype=cdrom, target=/root/image.iso",
    "raw:/root/image.iso,hdc:cdrom,ro",
])
def test_man_page_equivalents_cdrom(spec):
    assert parse_disk_spec(spec) == HDC_CDROM


def test_empty_cdrom_old_syntax():
    d = parse_disk_spec(",hdc:cdrom,r")
    assert d.target is None and d.is_cdrom and d.readonly


def test_target_swallows_rest_including_commas_and_blanks():
    d = parse_disk_spec("vdev=xvda, target=/srv/a,b=c d ")
    assert d.target == "/srv/a,b=c d "


def test_target_keyword_after_empty_positional():
    assert parse_disk_spec(",raw,xvda,rw,target=/x").target == "/x"


@pytest.mark.parametrize("access,expected", [("r", "ro"), ("ro", "ro"), ("w", "rw"),
                                             ("rw", "rw"), ("", "rw")])
def test_access_spellings(access, expected):
    assert parse_disk_spec(f"/img,raw,xvda,{access}").access == expected


def test_other_parameters_and_flags():
    d = parse_disk_spec("/img,raw,xvdb,ro,backend=stordom,backendtype=phy,script=block-x,"
                        "no-discard,direct-io-safe,untrusted")
    assert d.backend == "stordom" and d.backendtype == "phy" and d.script == "block-x"
    assert (d.discard, d.direct_io_safe, d.trusted, d.readonly) == (False, True, False, True)
    d = parse_disk_spec("/img,,xvdb,discard,trusted")
    assert (d.discard, d.trusted, d.backend) == (True, True, None)


def test_whitespace_before_parameters_ignored():
    assert parse_disk_spec("  /img ,  raw , xvda ,  rw").target == "/img"


@pytest.mark.parametrize("prefix,fmt,script", [
    ("phy:", "raw", None), ("file:", "raw", None), ("tap:aio:", "raw", None),
    ("tap2:tapdisk:aio:", "raw", None), ("qcow2:", "qcow2", None), ("vhd:", "vhd", None),
    ("iscsi:", "raw", "block-iscsi"), ("drbd:", "raw", "block-drbd"),
])
def test_deprecated_prefixes(prefix, fmt, script):
    d = parse_disk_spec(f"{prefix}/dev/vg/g,xvda,w")
    assert (d.target, d.format, d.script) == ("/dev/vg/g", fmt, script)


def test_formats():
    for fmt in ("raw", "qcow", "qcow2", "vhd", "qed"):
        assert parse_disk_spec(f"/i,{fmt},xvda").format == fmt


def test_to_dict_has_devid():
    assert parse_disk_spec("/i,,xvdb").to_dict()["devid"] == 51728


@pytest.mark.parametrize("spec,message", [
    ("/img,qcow3,xvda", "format 'qcow3' is not one of"),
    ("/img,raw,zzz", "vdev 'zzz' is not a valid virtual device name"),
    ("/img,raw,xvda,rx", "access 'rx' must be one of r, ro, rw, w"),
    ("/img", "no vdev"),
    ("vdev=xvda", "no target"),
    ("/a,raw,xvda,rw,extra", "too many positional parameters"),
    ("/img,,xvda,devtype=floppy", "devtype 'floppy'"),
    ("/img,,xvda,backendtype=nfs", "backendtype 'nfs'"),
    ("/img,,xvda,colour=red", "unknown disk parameter 'colour'"),
    ("/img,,xvda,vdev=xvdb", "'vdev' given more than once"),
    ("/img,,xvda,discard,no-discard", "both 'discard' and 'no-discard'"),
    ("/img,,xvda,colo", "COLO"),
    ("/img,,xvda,specification=virtio", "only 'xen'"),
    ("/img,xvda:floppy,w", "only ':cdrom'"),
    ("/img,,hde", "IDE disks go up to hdd63"),
    ("/img,,sdq", "SCSI disks go up to sdp15"),
])
def test_disk_errors(spec, message):
    with pytest.raises(DiskSpecError) as e:
        parse_disk_spec(spec)
    assert message in str(e.value)


def test_non_string_spec():
    with pytest.raises(DiskSpecError, match="must be a string"):
        parse_disk_spec(5)  # type: ignore[arg-type]


# -- vdev numbers -------------------------------------------------------------------------

@pytest.mark.parametrize("vdev,number", [
    ("xvda", 51712), ("xvdb", 51728), ("xvda1", 51713), ("xvdp15", (202 << 8) | (15 << 4) | 15),
    ("xvdq", (1 << 28) | (16 << 8)), ("xvda16", (1 << 28) | 16),
    ("xvdtq37", (1 << 28) | (536 << 8) | 37), ("d536p37", (1 << 28) | (536 << 8) | 37),
    ("d0", 51712), ("d0p0", 51712), ("d1p2", 51730), ("xvdaa", (1 << 28) | (26 << 8)),
    ("hda", 768), ("hdb", 832), ("hdc", 5632), ("hdc2", (22 << 8) | 2), ("hdd63", (22 << 8) | (1 << 6) | 63),
    ("sda", 2048), ("sdb3", (8 << 8) | (1 << 4) | 3), ("sdp15", 2303),
    ("51712", 51712), ("0xca00", 51712), ("0145000", 51712),
])
def test_vdev_numbers(vdev, number):
    assert vdev_to_devid(vdev) == number


@pytest.mark.parametrize("bad", ["xvd", "xvdA", "hd", "sd1", "vda", "d", "dp1", "d1p",
                                 "xvda-1", "hdz", "0", "", "xvd\u00e9"])
def test_bad_vdevs(bad):
    with pytest.raises(DiskSpecError):
        vdev_to_devid(bad)


def test_letters_are_bijective_base_26():
    assert [index_to_letters(i) for i in (0, 25, 26, 27, 51, 52, 701, 702)] == \
        ["a", "z", "aa", "ab", "az", "ba", "zz", "aaa"]


@given(st.integers(0, (1 << 20) - 1), st.integers(0, 255))
def test_xvd_roundtrip(disk, part):
    name = f"xvd{index_to_letters(disk)}{part or ''}"
    assert devid_to_vdev(vdev_to_devid(name)) == name
    assert vdev_to_devid(f"d{disk}p{part}") == vdev_to_devid(name)


@given(st.sampled_from(["hd", "sd"]), st.integers(0, 3), st.integers(0, 15))
def test_hd_sd_roundtrip(kind, disk, part):
    name = f"{kind}{index_to_letters(disk)}{part or ''}"
    assert devid_to_vdev(vdev_to_devid(name)) == name


@given(st.text(max_size=40))
def test_any_spec_parses_or_clean_error(text):
    try:
        parse_disk_spec(text)
    except DiskSpecError as e:
        assert str(e)
