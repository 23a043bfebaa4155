"""xl.cfg parsing: every syntax form of xl.cfg(5), defaults, and located errors."""

from __future__ import annotations

import json
import textwrap

import pytest

from domains.dom0.toolstack.xlcfg import (
    ACTIONS,
    ConfigError,
    CpuSet,
    DomainConfig,
    ListValue,
    parse_config_file,
    parse_config_text,
    parse_cpulist,
    parse_settings,
)


def cfg(text: str, **kw) -> DomainConfig:
    return parse_config_text(textwrap.dedent(text), "guest.cfg", **kw)


def error(text: str) -> str:
    with pytest.raises(ConfigError) as e:
        cfg(text)
    return str(e.value)


# -- syntax ---------------------------------------------------------------------------

def test_both_quote_styles_and_numbers():
    s = parse_settings('a = "x"\nb = \'y\'\nc = 10\nd = 0x1F\ne = 010\nf = 0\n')
    assert {k: v.value.text for k, v in s.items()} == {
        "a": "x", "b": "y", "c": "10", "d": "0x1F", "e": "010", "f": "0"}
    assert s["a"].value.quoted and not s["c"].value.quoted
    assert [s[k].line for k in "abcdef"] == [1, 2, 3, 4, 5, 6]


def test_number_bases_like_strtol():
    c = cfg('name="g"\nmemory = 0x100\nmaxmem = 0400\nvcpus = 010\n')
    assert (c.memory, c.maxmem, c.vcpus) == (256, 256, 8)


def test_semicolon_separates_settings():
    c = cfg('name="h0"; type="hvm"\n')
    assert (c.name, c.type) == ("h0", "hvm")


def test_comments_everywhere():
    c = cfg("""\
        # leading comment
        name = "g"   # trailing comment
        disk = [ # inside a list
           '/img,,xvda', # after an item
        ] # after the list
        #last line without newline""")
    assert c.name == "g" and len(c.disk) == 1


def test_hash_inside_string_is_not_a_comment():
    assert cfg('name="g"\nextra = "a#b"\n').extra == "a#b"


def test_lists_span_lines_trailing_comma_and_nesting():
    s = parse_settings('l = [\n "a",\n\n "b",\n]\nm = [ [ "x", 1 ], [] ]\nn = []\n', "f")
    assert [i.text for i in s["l"].value.items] == ["a", "b"]
    assert s["l"].line == 1
    assert s["l"].value.items[1].line == 4
    m = s["m"].value
    assert isinstance(m.items[0], ListValue) and m.items[1].items == ()
    assert s["n"].value.items == ()


def test_string_escapes():
    s = parse_settings(r'''a = "q\"q\\n\n\t\x41\101"''' + "\nb = 'it\\'s'\n")
    assert s["a"].value.text == 'q"q\\n\n\tAA'
    assert s["b"].value.text == "it's"


def test_plus_equals_appends():
    c = cfg('name="g"\nextra="a"\nextra += " b"\ndisk=["/i,,xvda"]\ndisk += ["/j,,xvdb"]\n')
    assert c.extra == "a b"
    assert [d.vdev for d in c.disk] == ["xvda", "xvdb"]


def test_last_assignment_wins():
    assert cfg('name="a"\nmemory=64\nmemory=128\n').memory == 128


def test_blank_file_parts_and_crlf():
    c = cfg('\r\n\r\nname = "g"\r\nmemory = 64\r\n;;\n')
    assert c.memory == 64


def test_file_without_trailing_newline():
    assert cfg('name="g"\nmemory=99').memory == 99


# -- defaults (as xl/libxl apply them) ------------------------------------------------

def test_defaults():
    c = cfg('name = "minimal"\n')
    assert c.type == "pv"
    assert (c.memory, c.maxmem) == (32, 32)
    assert (c.vcpus, c.maxvcpus) == (1, 1)
    assert c.cpus is None
    assert (c.on_poweroff, c.on_reboot, c.on_crash, c.on_watchdog, c.on_soft_reset) == \
        ("destroy", "restart", "destroy", "destroy", "soft-reset")
    assert c.driver_domain is False
    assert c.disk == [] and c.vif == [] and c.ignored == []
    assert (c.max_grant_frames, c.max_maptrack_frames) == (64, 1024)
    assert c.uuid is None and c.kernel is None and c.cmdline is None


def test_maxmem_defaults_to_memory_and_memory_to_maxmem():
    assert cfg('name="g"\nmemory=300\n').maxmem == 300
    assert cfg('name="g"\nmaxmem=300\n').memory == 300
    c = cfg('name="g"\nmemory=256\nmaxmem=512\n')
    assert (c.memory, c.maxmem) == (256, 512)


def test_maxvcpus_defaults_to_vcpus():
    c = cfg('name="g"\nvcpus=3\n')
    assert (c.vcpus, c.maxvcpus) == (3, 3)
    c = cfg('name="g"\nvcpus=2\nmaxvcpus=4\n')
    assert (c.vcpus, c.maxvcpus) == (2, 4)


# -- recognised keys ------------------------------------------------------------------------

FULL = """\
    name = "web1"
    uuid = "3F2504E0-4F89-11D3-9A0C-0305E82C3301"
    type = "pvh"
    memory = 512
    maxmem = 1024
    vcpus = 2
    maxvcpus = 4
    cpus = ["2", "3-8,^5"]
    kernel = "/boot/vmlinuz"
    ramdisk = "/boot/initrd"
    cmdline = "console=hvc0"
    disk = [ '/srv/web1.img,raw,xvda,rw', '/srv/cd.iso,,hdc,cdrom' ]
    vif = [ 'mac=00:16:3e:01:02:03,bridge=br1', '' ]
    on_poweroff = "preserve"
    on_reboot = "rename-restart"
    on_crash = "coredump-restart"
    on_watchdog = "restart"
    on_soft_reset = "destroy"
    driver_domain = 1
    seclabel = "system_u:system_r:domU_t"
    max_grant_frames = 32
    workload = "kv-store"
"""


def test_all_recognised_keys():
    c = cfg(FULL)
    assert c.name == "web1"
    assert c.uuid == "3f2504e0-4f89-11d3-9a0c-0305e82c3301"
    assert c.type == "pvh"
    assert (c.memory, c.maxmem, c.vcpus, c.maxvcpus) == (512, 1024, 2, 4)
    assert isinstance(c.cpus, list) and c.cpus[1].resolve(16) == [3, 4, 6, 7, 8]
    assert (c.kernel, c.ramdisk, c.cmdline) == ("/boot/vmlinuz", "/boot/initrd", "console=hvc0")
    assert [d.devid for d in c.disk] == [51712, 5632]
    assert c.disk[1].is_cdrom and c.disk[1].readonly
    assert c.vif[0].mac == "00:16:3e:01:02:03" and c.vif[0].bridge == "br1"
    assert c.vif[1].mac_generated and c.vif[1].mac.startswith("00:16:3e:")
    assert (c.on_poweroff, c.on_reboot, c.on_crash, c.on_watchdog, c.on_soft_reset) == \
        ("preserve", "rename-restart", "coredump-restart", "restart", "destroy")
    assert c.driver_domain is True
    assert c.seclabel == "system_u:system_r:domU_t"
    assert c.max_grant_frames == 32
    assert c.workload == "kv-store"
    assert c.ignored == [] and c.warnings == []


def test_to_dict_is_json():
    d = cfg(FULL).to_dict()
    again = json.loads(json.dumps(d))
    assert again["name"] == "web1"
    assert again["disk"][0]["devid"] == 51712
    assert again["cpus"][0] == {"text": "2", "all": False, "cpus": [2], "exclude": []}
    assert again["vif"][0]["mac"] == "00:16:3e:01:02:03"


def test_generated_macs_are_deterministic_and_distinct():
    a = cfg('name="g"\nvif=["", "", ""]\n')
    b = cfg('name="g"\nvif=["", "", ""]\n')
    assert [v.mac for v in a.vif] == [v.mac for v in b.vif]
    assert len({v.mac for v in a.vif}) == 3
    other = cfg('name="h"\nvif=[""]\n')
    assert other.vif[0].mac != a.vif[0].mac
    with_uuid = cfg('name="g"\nuuid="3f2504e0-4f89-11d3-9a0c-0305e82c3301"\nvif=[""]\n')
    assert with_uuid.vif[0].mac != a.vif[0].mac        # seeded by uuid when present


@pytest.mark.parametrize("action", ACTIONS)
def test_every_action_accepted(action):
    assert cfg(f'name="g"\non_crash="{action}"\n').on_crash == action


def test_type_and_deprecated_builder():
    assert cfg('name="g"\nbuilder="hvm"\n').type == "hvm"
    c = cfg('name="g"\nbuilder="generic"\n')
    assert c.type == "pv" and "builder is deprecated" in c.warnings[0]
    c = cfg('name="g"\ntype="pvh"\nbuilder="hvm"\n')
    assert c.type == "pvh" and "builder ignored" in c.warnings[0]
    assert cfg('name="g"\npvh=1\n').type == "pvh"


def test_root_and_extra_build_cmdline():
    assert cfg('name="g"\nroot="/dev/xvda1"\nextra="ro quiet"\n').cmdline == \
        "root=/dev/xvda1 ro quiet"
    assert cfg('name="g"\nextra="single"\n').cmdline == "single"


def test_cmdline_overrides_root_and_extra_and_says_so():
    c = cfg('name="g"\nroot="/dev/xvda1"\nextra="x"\ncmdline="y"\n')
    assert c.cmdline == "y"
    assert [(i.key, i.line) for i in c.ignored] == [("root", 2), ("extra", 3)]
    assert "cmdline" in c.ignored[0].reason


def test_booleans_are_numbers():
    assert cfg('name="g"\ndriver_domain=0\n').driver_domain is False
    assert cfg('name="g"\ndriver_domain=7\n').driver_domain is True
    assert cfg('name="g"\ndriver_domain="1"\n').driver_domain is True


def test_quoted_number_accepted_like_xl():
    assert cfg('name="g"\nmemory="512"\n').memory == 512


# -- cpus ---------------------------------------------------------------------------------

@pytest.mark.parametrize("text,ncpus,expected", [
    ("all", 4, [0, 1, 2, 3]),
    ("0-3,5,^1", 8, [0, 2, 3, 5]),
    ("all,^7", 8, [0, 1, 2, 3, 4, 5, 6]),
    ("all,^5-8", 10, [0, 1, 2, 3, 4, 9]),
    ("3", 8, [3]),
    ("2-4", 3, [2]),
])
def test_cpulist_forms(text, ncpus, expected):
    assert parse_cpulist(text).resolve(ncpus) == expected


def test_cpus_single_string_applies_to_every_vcpu():
    c = cfg('name="g"\nvcpus=3\ncpus="0-1"\n')
    assert isinstance(c.cpus, CpuSet)
    assert c.vcpu_affinity(4) == [[0, 1]] * 3


def test_cpus_list_is_per_vcpu():
    c = cfg('name="g"\nvcpus=3\ncpus=["2", "3-8,^5"]\n')
    assert c.vcpu_affinity(10) == [[2], [3, 4, 6, 7, 8], list(range(10))]


def test_cpus_bare_number():
    assert cfg('name="g"\ncpus=2\n').vcpu_affinity(4) == [[2]]


# -- ignored and unknown settings ----------------------------------------------------------

def test_inapplicable_settings_reported_with_reason():
    c = cfg("""\
        name = "g"
        bootloader = "pygrub"
        vnc = 1
        sdl = 0
        serial = "pty"
        pci = [ '0000:00:1b.0' ]
        usb = 1
        cpu_weight = 512
        vfb = [ 'vnc=1' ]
    """)
    got = {i.key: (i.line, i.known) for i in c.ignored}
    assert got == {"bootloader": (2, True), "vnc": (3, True), "sdl": (4, True),
                   "serial": (5, True), "pci": (6, True), "usb": (7, True),
                   "cpu_weight": (8, True), "vfb": (9, True)}
    assert all(i.reason for i in c.ignored)
    assert "bootloader" in c.ignored[0].reason or "kernel" in c.ignored[0].reason
    assert str(c.ignored[0]).startswith("guest.cfg:2: bootloader ignored: ")


def test_unknown_keys_reported_not_dropped():
    c = cfg('name="g"\nmemroy = 512\nfoo_bar = [1, 2]\n')
    assert [(i.key, i.line, i.known) for i in c.ignored] == [("memroy", 2, False),
                                                           ("foo_bar", 3, False)]
    assert "not in xl.cfg" in c.ignored[0].reason


# -- command-line overrides ---------------------------------------------------------------

def test_overrides_win_and_errors_name_command_line():
    c = cfg('name="g"\nmemory=64\n', overrides=["memory=128", 'extra="x"'])
    assert c.memory == 128 and c.extra == "x"
    with pytest.raises(ConfigError) as e:
        cfg('name="g"\n', overrides=["memory=0"])
    assert str(e.value).startswith("<command line 1>:1: memory must be")


# -- files ---------------------------------------------------------------------------------

def test_parse_config_file(tmp_path):
    p = tmp_path / "guest.cfg"
    p.write_text('name = "f"\nmemory = lots\n')
    with pytest.raises(ConfigError) as e:
        parse_config_file(p)
    assert e.value.file == str(p) and e.value.line == 2
    p.write_text('name = "f"\nmemory = 64\n')
    assert parse_config_file(p).memory == 64
    assert parse_config_file(p).source == str(p)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        parse_config_file(tmp_path / "nope.cfg")


def test_non_utf8_file(tmp_path):
    p = tmp_path / "bin.cfg"
    p.write_bytes(b'name = "g"\nextra = "\xff"\n')
    with pytest.raises(ConfigError) as e:
        parse_config_file(p)
    assert e.value.line == 2 and "UTF-8" in e.value.message
