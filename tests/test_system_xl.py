"""The default system end to end, through run.py and xl, as a person uses it."""

from __future__ import annotations

import json
import os
import signal

import pytest

from tests.systemharness import System, run_py

GUEST_CFG = """
name = "extra1"
kernel = "domu"
memory = 32
maxmem = 64
vcpus = 2
workload = "heartbeat"
on_crash = "preserve"
"""


@pytest.fixture(scope="module")
def system():
    s = System()
    yield s
    s.down()


def test_default_system_boots(system):
    names = {d["name"]: d for d in system.domains()}
    assert {"Domain-0", "guest1", "guest2"} <= set(names)
    for name in ("guest1", "guest2"):
        assert names[name]["pid"] and names[name]["memory"] == 64


def test_list_columns_and_state_letters(system):
    out = system.xl("list").stdout.splitlines()
    assert out[0].split() == ["Name", "ID", "Mem", "VCPUs", "State", "Time(s)"]
    for line in out[1:]:
        state = line.split()[4]
        assert len(state) == 6 and all(c in "rbpscd-" for c in state)


def test_workload_counters_in_xenstore(system):
    d = system.domain("guest1")
    path = f"/local/domain/{d['domid']}/data/workload/ops"
    system.wait(lambda: int(system.xl("xenstore-read", path).stdout) >= 2, what="heartbeat ops")


def test_real_xenstore_client(system):
    env = dict(os.environ, XENSTORED_PATH=os.path.join(system.run_dir, "xenstored", "socket"))
    import subprocess
    out = subprocess.run(["xenstore-ls", "/local/domain"], env=env, capture_output=True,
                         text=True, timeout=20)
    if out.returncode == 127:
        pytest.skip("xenstore-utils not installed")
    assert 'name = "guest1"' in out.stdout


def test_create_pause_memset_destroy(system, tmp_path):
    cfg = tmp_path / "extra1.cfg"
    cfg.write_text(GUEST_CFG)
    out = system.xl("create", str(cfg)).stdout
    assert "created" in out
    d = system.domain("extra1")
    assert d["vcpus"] == 2 and d["memory"] == 32
    system.xl("pause", "extra1")
    assert "p" in system.domain("extra1")["state"]
    with open(f"/proc/{d['pid']}/stat") as f:
        assert f.read().rsplit(")", 1)[1].split()[0] == "T"   # really stopped by the OS
    system.xl("unpause", "extra1")
    system.xl("mem-set", "extra1", "48")
    system.wait(lambda: system.domain("extra1")["memory"] == 48, what="balloon to 48 MiB")
    system.xl("vcpu-pin", "extra1", "all", "0")
    assert system.domain("extra1")["cpu_affinity"] == [0]
    assert os.sched_getaffinity(d["pid"]) == {0}
    system.xl("destroy", "extra1")
    assert "extra1" not in {x["name"] for x in system.domains()}


def test_crash_is_preserved_then_destroyed(system, tmp_path):
    cfg = tmp_path / "extra1.cfg"
    cfg.write_text(GUEST_CFG)
    system.xl("create", str(cfg))
    pid = system.domain("extra1")["pid"]
    os.kill(pid, signal.SIGKILL)
    crashed = system.wait(lambda: [d for d in system.domains()
                                   if d["name"] == "extra1" and "c" in d["state"]], what="crash")
    assert crashed[0]["pid"] is None
    system.xl("destroy", "extra1")
    assert "extra1" not in {x["name"] for x in system.domains()}


def test_reboot_restarts_with_new_domid(system):
    old = system.domain("guest2")
    system.xl("reboot", "guest2")
    new = system.wait(lambda: [d for d in system.domains() if d["name"] == "guest2"
                               and d["domid"] != old["domid"] and "d" not in d["state"]],
                      what="guest2 to restart")[0]
    assert new["pid"] != old["pid"]
    system.wait(lambda: old["domid"] not in {d["domid"] for d in system.domains()},
                what="old guest2 record to go")


def test_shutdown_wait(system, tmp_path):
    cfg = tmp_path / "extra1.cfg"
    cfg.write_text(GUEST_CFG)
    system.xl("create", str(cfg))
    out = system.xl("shutdown", "-w", "extra1").stdout
    assert "has been shut down" in out
    assert "extra1" not in {x["name"] for x in system.domains()}


def test_console_log_and_dmesg(system):
    log = os.path.join(system.run_dir, "console", "guest1.log")
    system.wait(lambda: os.path.exists(log) and b"booting" in open(log, "rb").read(), what="console")
    assert "microxen hypervisor up" in system.xl("dmesg").stdout


def test_info_and_names(system):
    info = system.xl("info").stdout
    assert "total_memory" in info and "xen_version" in info
    domid = system.xl("domid", "guest1").stdout.strip()
    assert system.xl("domname", domid).stdout.strip() == "guest1"


@pytest.mark.parametrize("args, message", [
    (["destroy", "nosuch"], "does not exist"),
    (["vcpu-pin", "guest1", "0", "99"], "CPU"),
    (["mem-set", "guest1", "lots"], "invalid memory size"),
    (["mem-set", "guest1", "100000"], "must be between"),
    (["frobnicate"], "unknown subcommand"),
    (["list", "-z"], "unrecognized option"),
    (["create", "/nonexistent.cfg"], "cannot read config file"),
])
def test_bad_input_is_refused_and_changes_nothing(system, args, message):
    before = [(d["domid"], d["name"], d["memory"]) for d in system.domains()]
    r = system.xl(*args, check=False)
    assert r.returncode != 0
    assert message in r.stderr
    after = [(d["domid"], d["name"], d["memory"]) for d in system.domains()]
    assert before == after


def test_bad_config_names_file_and_line(system, tmp_path):
    cfg = tmp_path / "bad.cfg"
    cfg.write_text('name = "bad"\nkernel = "domu"\nmemory = "lots"\n')
    r = system.xl("create", str(cfg), check=False)
    assert r.returncode != 0 and "bad.cfg:3" in r.stderr
    r = system.xl("create", "-n", str(cfg), check=False)
    assert r.returncode != 0 and "bad.cfg:3" in r.stderr


def test_dry_run_prints_json(system, tmp_path):
    cfg = tmp_path / "extra1.cfg"
    cfg.write_text(GUEST_CFG + 'vnc = 1\n')
    parsed = json.loads(system.xl("create", "-n", str(cfg)).stdout)
    assert parsed["name"] == "extra1" and parsed["memory"] == 32
    assert "extra1" not in {x["name"] for x in system.domains()}


def test_not_a_kernel_is_refused(system, tmp_path):
    cfg = tmp_path / "k.cfg"
    cfg.write_text('name = "k"\nkernel = "/boot/vmlinuz-6.1"\nmemory = 32\n')
    r = system.xl("create", str(cfg), check=False)
    assert r.returncode != 0 and "not a guest kernel" in r.stderr
    cfg.write_text('name = "k"\nkernel = "json"\nmemory = 32\n')
    r = system.xl("create", str(cfg), check=False)
    assert r.returncode != 0 and "not a guest kernel" in r.stderr
    assert "k" not in {x["name"] for x in system.domains()}


def test_too_much_memory_is_refused(system, tmp_path):
    cfg = tmp_path / "big.cfg"
    cfg.write_text('name = "big"\nkernel = "domu"\nmemory = 100000\n')
    r = system.xl("create", str(cfg), check=False)
    assert r.returncode != 0 and "free" in r.stderr
    assert "big" not in {x["name"] for x in system.domains()}


def test_two_systems_side_by_side(system):
    other = System()
    try:
        mine = {d["pid"] for d in system.domains()}
        theirs = {d["pid"] for d in other.domains()}
        assert not mine & theirs
    finally:
        other.down()


def test_up_refuses_bad_config_before_starting(tmp_path):
    bad = tmp_path / "bad.cfg"
    bad.write_text('name = "x"\nmemory = [\n')
    run_dir = tmp_path / "rd"
    r = run_py("up", "--run-dir", str(run_dir), "--detach", "--config", str(bad))
    assert r.returncode != 0 and "bad.cfg" in r.stderr
    assert not (run_dir / "hypervisor.pid").exists()


def test_top_batch_mode(system):
    out = system.xl("top", "-b", "-i", "2", "-d", "0.2").stdout.splitlines()
    headers = [l for l in out if l.split()[:2] == ["NAME", "STATE"]]
    assert len(headers) == 2
    assert any("guest1" in l for l in out)


def test_vcpu_set_list_rename_uptime_memmax(system, tmp_path):
    cfg = tmp_path / "extra1.cfg"
    cfg.write_text(GUEST_CFG)
    system.xl("create", str(cfg))
    try:
        system.xl("vcpu-set", "extra1", "1")
        assert system.domain("extra1")["online_vcpus"] == 1
        rows = [l for l in system.xl("vcpu-list", "extra1").stdout.splitlines() if "extra1" in l]
        assert len(rows) == 2 and "--p" in rows[1]
        r = system.xl("vcpu-set", "extra1", "5", check=False)
        assert r.returncode != 0
        system.xl("mem-max", "extra1", "96")
        assert system.domain("extra1")["maxmem"] == 96
        system.xl("rename", "extra1", "renamed1")
        assert system.domain("renamed1")["domid"]
        r = system.xl("rename", "renamed1", "guest1", check=False)
        assert r.returncode != 0 and "already exists" in r.stderr
        assert "renamed1" in system.xl("uptime").stdout
    finally:
        system.xl("destroy", "renamed1", check=False)
        system.xl("destroy", "extra1", check=False)


def test_xenstore_helpers(system):
    system.xl("xenstore-write", "/tool/test/a", "1", "/tool/test/b", "two")
    assert system.xl("xenstore-read", "/tool/test/b").stdout.strip() == "two"
    assert 'b = "two"' in system.xl("xenstore-ls", "/tool/test").stdout
    system.xl("xenstore-rm", "/tool/test")
    r = system.xl("xenstore-read", "/tool/test/a", check=False)
    assert r.returncode != 0 and "ENOENT" in r.stderr


def test_xenstore_watch_sees_changes(system):
    import subprocess
    import sys
    from tests.systemharness import ROOT
    proc = subprocess.Popen([sys.executable, "run.py", "xl", "--run-dir", system.run_dir,
                             "xenstore-watch", "-n", "2", "/tool/watched"],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline()          # the initial event: the watch is armed
        assert first.strip() == "/tool/watched"
        system.xl("xenstore-write", "/tool/watched/x", "1")
        assert proc.stdout.readline().strip() == "/tool/watched/x"
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
