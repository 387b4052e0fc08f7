"""tune_allocator: large tensors reuse freed heap pages instead of faulting in fresh ones (after a
warm-up: the heap first grows until its freed blocks coalesce into one that fits).

Process-wide settings, so each case runs in its own interpreter."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PROBE = """
import json, resource, sys
import torch
from opengem.runtime import tune_allocator
mode, mb = sys.argv[1], int(sys.argv[2])
applied = None if mode == "default" else tune_allocator(256, heap_only=(mode == "heap"))
n = (mb << 20) // 4
for _ in range(12):
    torch.ones(n)  # warm-up: the heap grows until freed blocks coalesce into one that fits (~7 here)
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    torch.ones(n)  # allocated, written, freed
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
print(json.dumps({"applied": applied, "faults_per_alloc": faults / 5, "pages": (mb << 20) // 4096}))
"""


def probe(mode: str, mb: int) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, mode, str(mb)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_heap_only_reuses_pages_of_tensors_above_the_mmap_limit():
    # 48 MiB: above glibc's largest mmap threshold (32 MiB), like a training step's histories
    default, heap = probe("default", 48), probe("heap", 48)
    assert heap["applied"] is True
    assert default["faults_per_alloc"] > 0.5 * default["pages"]  # each allocation maps fresh pages
    assert heap["faults_per_alloc"] < 0.05 * heap["pages"]  # the freed block is reused


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_raised_mmap_threshold_covers_a_ranking_requests_tensors_only():
    small, big = probe("threshold", 16), probe("threshold", 48)
    assert small["applied"] is True
    assert small["faults_per_alloc"] < 0.05 * small["pages"]
    assert big["faults_per_alloc"] > 0.5 * big["pages"]  # above 32 MiB it still maps: why heap_only exists


def test_a_keep_mallopt_cannot_hold_is_refused_not_truncated():
    from opengem.model.train_config import TrainConfig
    from opengem.runtime import MAX_KEEP_MB, tune_allocator
    from opengem.serving.config import ServeConfig

    # 4096 MiB << 20 does not fit mallopt's int: ctypes would pass a wrapped value, here 0,
    # i.e. a trim threshold that hands every freed block back -- the opposite of the setting
    with pytest.raises(ValueError, match="malloc_keep_mb=4096"):
        tune_allocator(4096, heap_only=True)
    assert tune_allocator(0) is False
    with pytest.raises(ValueError, match="malloc_keep_mb"):
        TrainConfig(malloc_keep_mb=MAX_KEEP_MB + 1)
    with pytest.raises(ValueError, match="malloc_keep_mb"):
        ServeConfig(malloc_keep_mb=-1)
