"""Process-health metrics every daemon exports: garbage-collector pauses, store catch-ups."""

from __future__ import annotations

import gc

import numpy as np

from opengem.ops import metrics


def _value(name: str, labels: dict | None = None) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels or {}) or 0.0


def test_gc_pauses_are_timed_by_generation():
    metrics.watch_gc()
    metrics.watch_gc()  # idempotent: one callback
    n_callbacks = len(gc.callbacks)
    before = _value("opengem_gc_pause_seconds_count", {"generation": "2"})
    gc.collect()
    gc.collect()
    assert _value("opengem_gc_pause_seconds_count", {"generation": "2"}) == before + 2
    assert _value("opengem_gc_pause_seconds_sum", {"generation": "2"}) > 0
    metrics.watch_gc()
    assert len(gc.callbacks) == n_callbacks


def test_a_secondarys_catch_up_is_timed(tmp_path):
    from opengem.features.store import SequenceStore

    w = SequenceStore(tmp_path / "db")
    r = SequenceStore.open_reader(tmp_path / "db", tmp_path / "sec")
    try:
        n = 10
        cols = {"user_id": np.full(n, 7), "ts": 1_700_000_000_000 + np.arange(n), "item_id": np.arange(n),
                "surface": np.array(["feed"] * n), "kind": np.array(["view"] * n), "is_ad": np.zeros(n, bool)}
        before = _value("opengem_store_catch_up_seconds_count")
        w.apply(cols, (0, 0))
        r.catch_up()
        assert _value("opengem_store_catch_up_seconds_count") == before + 1
        assert len(r.read(7)) == n
    finally:
        r.close()
        w.close()
