"""distill.memory: the fixed glibc mmap threshold the Distiller sets on CPU."""

from __future__ import annotations

import subprocess
import sys

import pytest

from distill import memory


def _glibc() -> bool:
    import platform

    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def test_a_users_setting_wins(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert memory.fix_mmap_threshold() is False


@pytest.mark.skipif(not _glibc(), reason="glibc only")
def test_large_freed_blocks_go_back_to_the_system():
    # Blocks of 9-31 MB in changing sizes, each freed after a smaller one is made: with the dynamic
    # threshold they end up on the heap and the resident set grows; with the fixed one it stays put.
    code = r"""
import sys, numpy as np
from distill import memory
if sys.argv[1] == "fixed":
    assert memory.fix_mmap_threshold()
def rss():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) // 1024
keep = []
for i in range(60):
    a = np.ones((9 + (i * 7) % 23) * 2**18, dtype=np.float32)  # 9-31 MB, touched
    keep.append(np.ones(2**16, dtype=np.uint8))  # a small block that outlives it
    del a
print(rss())
"""
    out = {}
    for mode in ("dynamic", "fixed"):
        r = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        out[mode] = int(r.stdout.strip())
    print(out)
    assert out["fixed"] < out["dynamic"] - 20, out
