"""Examples + a feature store -> GemBatch: the one read path of trainer, evaluator and server.

:func:`examples_batch` reads every example's user history *as of the
impression* (``before_ts = example.ts``, the most recent ``max_len`` events)
through the store's ``read_batch`` -- the same function the server calls --
and hands it to :func:`make_batch`, which derives every dense feature from
that history. Nothing at or after the impression can reach a batch.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from opengem.model.batch import GemBatch, make_batch


def history_len(cfg: Any) -> int:
    """How many recent events a model needs: its pyramid's ``max_len`` (0 without a sequence arch)."""
    if getattr(cfg, "use_sequence", False):
        return int(cfg.pyramid.max_len)
    return 0


def examples_batch(examples: Sequence[Any], reader: Any, cfg: Any, max_len: int | None = None) -> GemBatch:
    """``reader``: anything with the store read API (SequenceStore, ShardedReader, MemorySequenceStore).

    ``max_len`` defaults to what the model reads (:func:`history_len`), with a
    floor of 256 so the history counters see a meaningful window even for
    models without a sequence arch.
    """
    if max_len is None:
        max_len = max(history_len(cfg), 256)
    uids = np.fromiter((e.user_id for e in examples), np.int64, len(examples))
    ts = np.fromiter((e.ts for e in examples), np.int64, len(examples))
    seqs = reader.read_batch(uids, before_ts=ts, max_len=max_len)
    return make_batch(examples, seqs, cfg)
