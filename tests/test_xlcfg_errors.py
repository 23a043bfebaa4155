"""Bad xl.cfg input: every error names file, line and problem, and nothing crashes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from domains.dom0.toolstack.xlcfg import ConfigError, parse_config_text


def err(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as e:
        parse_config_text(text, "guest.cfg")
    return e.value


@pytest.mark.parametrize("text,line,message", [
    # quotes
    ('name = "g\n', 1, "unterminated string"),
    ("name = 'g\"\n", 1, "unterminated string"),
    ('name = "g"\nextra = "a\\q"\n', 2, "unknown escape \\q"),
    # lists
    ('name = "g"\ndisk = [ "/a,,xvda",\n  "/b,,xvdb"\n', 2, "unterminated list"),
    ('name = "g"\ndisk = [ "/a,,xvda" "/b,,xvdb" ]\n', 2, "expected ',' or ']'"),
    ('name = "g"\ndisk = [ , "/a,,xvda" ]\n', 2, "starts with ','"),
    # structure
    ('name = "g"\nmemory 512\n', 2, "expected '=' after 'memory'"),
    ('name = "g"\nmemory =\n', 2, "missing value after 'memory ='"),
    ('name = "g"\nmemory = 512 1024\n', 2, "expected a newline or ';'"),
    ('name = "g"\n= 5\n', 2, "expected a setting name"),
    ('name = "g"\nMemory = 5\n', 2, "must be lower-case"),
    ('name = "g"\ntype = pv\n', 2, "bare word 'pv' is not a value"),
    ('name = "g"\ndriver_domain = True\n', 2, 'write booleans as 0 or 1'),
    ('name = "g"\nmemory = -5\n', 2, "looks like Python"),
    ('name = "g"\nvcpus = (1)\n', 2, "unexpected character '('"),
    ('name = "g"\nextra = "a"\nextra += [ "b" ]\n', 3, "must add a list to a list"),
    # numbers
    ('name = "g"\nmemory = "lots"\n', 2, 'memory must be a positive integer (MiB), got "lots"'),
    ('name = "g"\nmemory = 512M\n', 2, "memory must be a positive integer (MiB), got 512M"),
    ('name = "g"\nmemory = 0\n', 2, "memory must be a positive integer (MiB), got 0"),
    ('name = "g"\nmemory = 09\n', 2, "got 09"),
    ('name = "g"\nmemory = 0x\n', 2, "got 0x"),
    ('name = "g"\nmemory = 1.5\n', 2, "got 1.5"),
    ('name = "g"\nmemory = [ 1 ]\n', 2, "memory must be a positive integer (MiB), got a list"),
    ('name = "g"\nvcpus = 0\n', 2, "vcpus must be a positive integer, got 0"),
    ('name = "g"\nmemory = 512\nmaxmem = 256\n', 3, "maxmem (256 MiB) must be at least memory"),
    ('name = "g"\nvcpus = 4\nmaxvcpus = 2\n', 3, "maxvcpus (2) must be at least vcpus (4)"),
    ('name = "g"\ndriver_domain = "yes"\n', 2, "driver_domain must be a boolean"),
    # strings and names
    ('name = 5\n', 1, "name must be the domain name in quotes, got 5"),
    ('name = "12"\n', 1, "not all digits"),
    ('name = "a/b"\n', 1, "'/'"),
    ('name = ""\n', 1, "must be non-empty"),
    ('name = "g"\nkernel = [ "/k" ]\n', 2, "kernel must be a path, got a list"),
    ('name = "g"\nuuid = "not-a-uuid"\n', 2, "uuid must look like"),
    # type and actions
    ('name = "g"\ntype = "xen"\n', 2, 'type must be one of pv, pvh, hvm; got "xen"'),
    ('name = "g"\nbuilder = "linux"\n', 2, 'builder must be "generic" or "hvm"'),
    ('name = "g"\non_crash = "explode"\n', 2, 'on_crash must be one of destroy, restart, '
                                              'rename-restart, preserve, coredump-destroy, '
                                              'coredump-restart, soft-reset; got "explode"'),
    ('name = "g"\non_reboot = "Restart"\n', 2, 'got "Restart"'),
    # cpus
    ('name = "g"\ncpus = "0-3,x"\n', 2, "cpus: 'x' is not a CPU number"),
    ('name = "g"\ncpus = "4-2"\n', 2, "range end 2 is below its start 4"),
    ('name = "g"\ncpus = "nodes:0-1"\n', 2, "NUMA"),
    ('name = "g"\ncpus = [\n "1",\n "zz" ]\n', 4, "cpus[1]: 'zz'"),
    # devices (line of the list item)
    ('name = "g"\ndisk = [\n "/a,,xvda",\n "/b,,zzz",\n]\n', 4, 'disk[1] "/b,,zzz": vdev'),
    ('name = "g"\ndisk = [ "/a,,xvda", "/b,,xvda" ]\n', 2, "same device as disk[0]"),
    ('name = "g"\ndisk = [ "/a,,xvda,rx" ]\n', 2, "access 'rx' must be one of r, ro, rw, w"),
    ('name = "g"\ndisk = [ 5 ]\n', 2, "disk[0] must be a disk spec string in quotes"),
    ('name = "g"\nvif = [ "mac=00:16:3e:zz:00:01" ]\n', 2, 'vif[0] "mac=00:16:3e:zz:00:01": '
                                                         "mac '00:16:3e:zz:00:01'"),
    ('name = "g"\nvif = [ "mac=01:16:3e:00:00:01" ]\n', 2, "multicast"),
    ('name = "g"\nvif = [ "bridge=br0", "colour=red" ]\n', 2, "unknown vif parameter 'colour'"),
    ('name = "g"\nvif = [ "mac=00:16:3e:00:00:01", "mac=00:16:3E:00:00:01" ]\n', 2,
     "used twice"),
    ('name = "g"\nvif = [ "devid=1", "" ]\n', 2, "devid 1 is already used"),
    # missing name
    ('memory = 5\n', None, "name is mandatory"),
])
def test_error_is_located(text, line, message):
    e = err(text)
    assert e.file == "guest.cfg"
    assert e.line == line, str(e)
    assert message in e.message, str(e)
    where = f"guest.cfg:{line}: " if line is not None else "guest.cfg: "
    assert str(e) == where + e.message


def test_exact_message_of_the_brief():
    e = err('name = "g"\n\n\n\n\n\nmemory = "lots"\n')
    assert str(e) == 'guest.cfg:7: memory must be a positive integer (MiB), got "lots"'


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list('ab=[]",;\'#\n \\x0123+-.memoryname')),
               max_size=80))
def test_arbitrary_text_never_crashes(text):
    try:
        parse_config_text(text, "fuzz.cfg")
    except ConfigError as e:
        assert str(e).startswith("fuzz.cfg")


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60))
def test_arbitrary_unicode_never_crashes(text):
    try:
        parse_config_text('name = "g"\n' + text, "fuzz.cfg")
    except ConfigError:
        pass
