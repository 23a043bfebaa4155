"""Vif specs (xl-network-configuration(5)) and generated MACs."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from domains.dom0.toolstack.vif_spec import (
    VifSpecError,
    generate_mac,
    normalise_mac,
    parse_rate,
    parse_vif_spec,
)


def test_man_page_examples():
    v = parse_vif_spec("mac=00:16:3E:74:3d:76,model=rtl8139,bridge=xenbr0")
    assert (v.mac, v.model, v.bridge) == ("00:16:3e:74:3d:76", "rtl8139", "xenbr0")
    assert parse_vif_spec("mac=00:16:3E:74:34:32").mac == "00:16:3e:74:34:32"
    v = parse_vif_spec("", devid=3)
    assert (v.devid, v.mac, v.bridge, v.backend) == (3, None, "xenbr0", None)


def test_all_keys():
    v = parse_vif_spec("mac=00:16:3e:00:00:01, bridge=br1, backend=netdom, ip=10.0.0.2 fd00::2,"
                       "model=e1000, type=vif, vifname=guest-eth0, script=vif-route,"
                       "rate=1MB/s@20ms, mtu=9000, gatewaydev=eth1, vlan=10p/20, untrusted")
    assert v.bridge == "br1" and v.backend == "netdom"
    assert v.ip == ("10.0.0.2", "fd00::2")
    assert (v.model, v.type, v.vifname, v.script) == ("e1000", "vif", "guest-eth0", "vif-route")
    assert (v.rate.bytes_per_interval, v.rate.interval_us) == (20000, 20000)
    assert v.mtu == 9000 and v.gatewaydev == "eth1" and v.vlan == "10p/20"
    assert v.trusted is False
    assert v.to_dict()["ip"] == ["10.0.0.2", "fd00::2"]


def test_netdev_is_alias_of_gatewaydev():
    assert parse_vif_spec("netdev=eth0").gatewaydev == "eth0"


def test_devid_override_and_backend_ifname():
    v = parse_vif_spec("devid=5", devid=0)
    assert v.devid == 5
    assert v.backend_ifname(7) == "vif7.5"
    assert parse_vif_spec("vifname=web0").backend_ifname(7) == "web0"


@pytest.mark.parametrize("text,per_interval,interval", [
    ("10Mb/s", 62500, 50000),            # 10 megabits/s over the 50 ms default
    ("250KB/s", 12500, 50000),
    ("1MB/s@20ms", 20000, 20000),        # the man page's worked example
    ("1GB/s@1s", 10**9, 10**6),
    ("800b/s@1s", 100, 10**6),
    ("100KB/s@500us", 50, 500),
])
def test_rates(text, per_interval, interval):
    r = parse_rate(text)
    assert (r.bytes_per_interval, r.interval_us) == (per_interval, interval)


@pytest.mark.parametrize("bad", ["10", "10Mb", "fast", "10Tb/s", "0MB/s", "1b/s@1us",
                                 "1MB/s@0ms", "1MB/s@20h"])
def test_bad_rates(bad):
    with pytest.raises(VifSpecError, match="rate"):
        parse_rate(bad)


@pytest.mark.parametrize("mac,message", [
    ("00:16:3e:zz:00:01", "not six two-digit hex groups"),
    ("00:16:3e:00:01", "not six two-digit hex groups"),
    ("00-16-3e-00-00-01", "not six two-digit hex groups"),
    ("0:16:3e:00:00:01", "not six two-digit hex groups"),
    ("01:16:3e:00:00:01", "multicast"),
    ("ff:ff:ff:ff:ff:ff", "multicast"),
    ("00:00:00:00:00:00", "all zeros"),
])
def test_bad_macs(mac, message):
    with pytest.raises(VifSpecError, match=message):
        parse_vif_spec(f"mac={mac}")
    with pytest.raises(VifSpecError):
        normalise_mac(mac)


@pytest.mark.parametrize("spec,message", [
    ("colour=red", "unknown vif parameter 'colour'"),
    ("bridge", "is not key=value"),
    ("bridge=a,bridge=b", "'bridge' given more than once"),
    ("ip=10.0.0.300", "ip '10.0.0.300'"),
    ("type=nic", "type 'nic'"),
    ("mtu=big", "mtu 'big'"),
    ("mtu=10", "mtu '10'"),
    ("mtu=70000", "mtu '70000'"),
    ("devid=-1", "devid '-1'"),
    ("vifname=a name with spaces", "vifname"),
    ("bridge=averyveryverylongbridgename", "bridge"),
    ("vlan=5000", "VLAN ids are 1..4094"),
    ("vlan=10q", "vlan term '10q'"),
    ("trusted,untrusted", "both"),
    ("accel=x", "accel"),
])
def test_vif_errors(spec, message):
    with pytest.raises(VifSpecError) as e:
        parse_vif_spec(spec)
    assert message in str(e.value)


def test_generated_mac_in_xen_oui_and_deterministic():
    a = generate_mac("guest1", 0)
    assert a == generate_mac("guest1", 0)
    assert a.startswith("00:16:3e:")
    assert int(a.split(":")[3], 16) < 0x80
    assert a != generate_mac("guest1", 1) != generate_mac("guest2", 1)
    assert normalise_mac(a) == a


@given(st.text(max_size=20), st.integers(0, 1000))
def test_generated_macs_always_valid(seed, devid):
    mac = generate_mac(seed, devid)
    assert normalise_mac(mac) == mac and mac.startswith("00:16:3e:")


def test_with_mac_keeps_given_mac():
    v = parse_vif_spec("mac=00:16:3e:00:00:09")
    assert v.with_mac("seed") is v
    g = parse_vif_spec("", devid=2).with_mac("seed")
    assert g.mac == generate_mac("seed", 2) and g.mac_generated


@given(st.text(max_size=40))
def test_any_spec_parses_or_clean_error(text):
    try:
        parse_vif_spec(text)
    except VifSpecError as e:
        assert str(e)
