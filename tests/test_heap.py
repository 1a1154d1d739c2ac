"""camelid/heap.py: with the thresholds set, a 40 MB block that is freed and asked for again comes back from the
heap without new page faults; with glibc's defaults (CAMELID_HEAP=default) it is a fresh mapping each time (above
the 32 MB to which glibc raises its own threshold), whose pages fault in again. Each case in a process of its own:
mallopt changes the whole process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from camelid.heap import _glibc

PROBE = r"""
import ctypes, json, resource
from camelid.heap import keep_freed_heap
done = keep_freed_heap()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
n = 40 << 20
faults = []
for _ in range(6):
    p = libc.malloc(n)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    ctypes.memset(p, 1, n)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    libc.free(p)
print(json.dumps({"done": done, "faults": faults}))
"""


def _probe(**env) -> dict:
    env = {**os.environ, **env}
    env.pop("GLIBC_TUNABLES", None)
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not _glibc(), reason="mallopt's thresholds are glibc's")
def test_freed_blocks_are_reused_without_page_faults():
    kept = _probe(CAMELID_HEAP="")
    default = _probe(CAMELID_HEAP="default")
    assert kept["done"] is True and default["done"] is False
    pages = (40 << 20) // 4096
    # glibc's default: every block a new mapping, every page a fault
    assert min(default["faults"]) > pages // 2, default
    # kept: after the first touch, the same heap memory again (a few faults at most, never the block's pages)
    assert max(kept["faults"][1:]) < pages // 8, kept


def test_it_steps_aside_for_the_users_own_malloc_settings(monkeypatch):
    from camelid import heap

    monkeypatch.setattr(heap, "_done", None)
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1")
    assert heap.keep_freed_heap() is False
