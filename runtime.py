"""Process-wide runtime settings shared by the daemons (allocator tuning)."""

from __future__ import annotations

import ctypes
import ctypes.util

# mallopt(3) parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
# mallopt takes a C int: 2048 MiB would wrap (ctypes truncates silently) into a tiny trim threshold.
MAX_KEEP_MB = 2047


def tune_allocator(keep_mb: int = 256, *, heap_only: bool = False) -> bool:
    """Process-wide, glibc only: serve large allocations from the heap and keep up to
    ``keep_mb`` MiB of freed memory there (``mallopt`` M_TRIM_THRESHOLD).

    By default glibc maps every allocation above its (adaptive) threshold afresh and unmaps it
    on free, so each large intermediate tensor costs an mmap, a munmap and a page fault per
    4 KiB page it touches. ``heap_only=False`` raises the mmap threshold to its maximum
    (32 MiB): enough for a ranking request's tensors. ``heap_only=True`` stops mmap for
    allocations altogether (M_MMAP_MAX = 0; threads' arenas still fall back to mmap when a
    request does not fit their heaps): a training step's tensors are larger than 32 MiB (a
    (256, 1024, 32) float history is exactly 32 MiB), and a GEM base step on 1k-event
    histories took ~150k minor page faults (~500 MiB of fresh pages) each time; with it,
    ~1k. Freed memory then stays with the process up to ``keep_mb`` at the heap's top (its
    RSS stays near its peak, as with any caching allocator). Returns whether the settings
    were applied (False: not glibc, or ``keep_mb`` 0). ``keep_mb`` above
    :data:`MAX_KEEP_MB` (what mallopt's int holds) raises ValueError.
    """
    if not 0 <= keep_mb <= MAX_KEEP_MB:
        raise ValueError(f"malloc_keep_mb={keep_mb} must be in [0, {MAX_KEEP_MB}] (mallopt takes a C int)")
    if keep_mb == 0:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    keep = keep_mb << 20
    mapped = mallopt(_M_MMAP_MAX, 0) if heap_only else mallopt(_M_MMAP_THRESHOLD, min(keep, 32 << 20))
    return bool(mapped) and bool(mallopt(_M_TRIM_THRESHOLD, keep))


def freeze_heap() -> int:
    """Collect once, then move every object the process holds now (imported modules, the
    loaded model, gRPC and protobuf machinery: ~377-426k objects in ``opengem serve``) into the
    garbage collector's permanent generation (``gc.freeze``), so that later full collections
    scan only what was made after. Measured in process with the server's objects: a full
    collection took 204-237 ms, all threads stopped (the GIL), and 0.23-0.7 ms after the freeze
    with a second model loaded since (``bench/serve.py``, ``gc_full_collection_ms``). Python
    starts a full collection on its own once enough objects have survived the younger
    generations (caches filling, model swaps), so without this a request now and then
    waits ~0.2 s. What is frozen is never collected as a cycle: call it once, after start-up,
    not after each model swap (a swapped-out model's tensors are freed by reference count).
    Returns the number of objects frozen."""
    import gc

    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
