"""domains/kernel/heap.py: after tune(), a large I/O buffer comes from the
heap, not from a private mmap that the next free unmaps.

Checked with glibc's own account (malloc_info's mmap total) in a fresh
process each time, before and after tuning, so the test also shows that
without the tuning the same buffer is mmapped.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROBE = r"""
import ctypes, os, re, sys, tempfile
from domains.kernel import heap
libc = ctypes.CDLL(None)
libc.fopen.restype = ctypes.c_void_p
libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
libc.fclose.argtypes = [ctypes.c_void_p]
libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]

def mmapped() -> int:
    with tempfile.NamedTemporaryFile() as tmp:
        f = libc.fopen(tmp.name.encode(), b"w")
        libc.malloc_info(0, f)
        libc.fclose(f)
        xml = open(tmp.name).read()
    return int(re.search(r'<total type="mmap" count="\d+" size="(\d+)"/>', xml).group(1))

if sys.argv[1] == "tuned":
    assert heap.tune()
before = mmapped()
buf = bytes(4 << 20)          # a few 1 MiB requests' worth, as a guest makes
print(mmapped() - before)
"""


def _mmapped_by_a_4mib_buffer(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=ROOT, capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return int(out.stdout)


@pytest.mark.skipif(not hasattr(ctypes.CDLL(None), "malloc_info"),
                    reason="needs glibc's malloc_info")
def test_tuned_heap_keeps_large_buffers_off_mmap():
    assert _mmapped_by_a_4mib_buffer("default") >= 4 << 20
    assert _mmapped_by_a_4mib_buffer("tuned") == 0


def test_tuning_starts_no_process():
    """tune() runs at every domain's boot: it must not spawn anything (as
    ctypes.util.find_library does, running ldconfig)."""
    probe = ("import os, subprocess\n"
             "def refuse(*a, **k):\n"
             "    raise AssertionError('tune() started a process')\n"
             "subprocess.Popen.__init__ = os.fork = os.posix_spawn = refuse\n"
             "from domains.kernel import heap\n"
             "assert heap.tune()\n")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, out.stderr


def test_every_domain_kernel_tunes_its_heap_at_boot(monkeypatch):
    """boot() calls tune() before anything else runs in the new domain."""
    from domains.kernel import boot
    calls = []
    monkeypatch.setattr(boot.heap, "tune", lambda: calls.append("tune") or True)
    monkeypatch.setattr(boot.logging, "basicConfig", lambda **kw: calls.append("log"))
    monkeypatch.setattr(boot.zmq, "Context", lambda **kw: (_ for _ in ()).throw(RuntimeError("stop")))
    with pytest.raises(RuntimeError, match="stop"):
        boot.boot({"name": "t", "domid": 1}, {}, None)
    assert calls[0] == "tune"
