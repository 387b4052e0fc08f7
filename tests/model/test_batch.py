"""GemBatch / make_batch: hashing, leakage guard, validate() rejections."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from opengem.features.types import JaggedSeq, SeqArrays
from opengem.model.batch import (
    NONSEQ_KEYS, GemBatch, dt_bucket, make_batch, make_kjt, stable_hash, synthetic_batch,
)
from opengem.model.config import preset
from opengem.stream.joiner import Example

CFG = preset("tiny")


def _example(i: int, **kw) -> Example:
    d = dict(
        request_id=f"r{i}", ts=1_700_000_000_000 + i, surface="reels", user_id=100 + i, item_id=555,
        advertiser_id=9, ad_format="video", category=3, age_bucket=2, country="US", device="ios", hour=13,
        click=1, conversion=0, click_ts=None, conversion_ts=None, p_click=0.1, p_conversion=0.01,
    )
    d.update(kw)
    return Example(**d)


def _seq(ts, item) -> SeqArrays:
    n = len(ts)
    return SeqArrays(
        ts=np.asarray(ts, np.int64), item_id=np.asarray(item, np.int64), surface=np.zeros(n, np.int8),
        kind=np.full(n, 3, np.int8), category=np.full(n, 3, np.int32), advertiser_id=np.full(n, -1, np.int64),
    )


def test_stable_hash_is_stable_and_in_range():
    ids = np.array([-1, 0, 1, 2**62, 555], np.int64)
    h = stable_hash(ids, 512, "item")
    assert h[0] == 0 and (h[1:] >= 1).all() and (h < 512).all()
    np.testing.assert_array_equal(h, stable_hash(ids, 512, "item"))
    # pinned values: a change would silently invalidate every checkpoint
    assert stable_hash(np.array([555, 0, 123456789]), 1 << 16, "item").tolist() == [8574, 31983, 22188]
    assert not np.array_equal(stable_hash(np.arange(50), 512, "item"), stable_hash(np.arange(50), 512, "user"))


def test_dt_bucket_monotone():
    b = dt_bucket(np.array([0, 999, 1000, 60_000, 3_600_000, 86_400_000, 10**15]), 34)
    assert (np.diff(b) >= 0).all() and b.min() >= 1 and b.max() <= 33


def test_make_batch_shares_rows_and_guards_leakage():
    t0 = 1_700_000_000_000
    exs = [_example(0), _example(1, surface="feed", advertiser_id=None, country=None, device=None), _example(2)]
    seqs = JaggedSeq.from_rows([
        _seq([t0 - 5000, t0 - 10], [555, 7]),
        _seq([], []),
        _seq([t0 - 1, t0 + 2, t0 + 50], [1, 2, 3]),  # t0+2 is the impression ts of ex 2: dropped, as is later
    ])
    b = make_batch(exs, seqs, CFG)
    assert b.seq_lengths.tolist() == [2, 0, 1]
    item = b.sparse["item_id"].values()
    assert b.seq["item"][0] == item[0]  # same raw item, same row in the shared table
    assert b.sparse["advertiser_id"].values()[1] == 0 and b.sparse["country"].values()[1] == 0
    assert b.surface_idx.tolist() == [2, 0, 2]
    assert b.labels.tolist() == [[1.0, 0.0]] * 3
    assert b.dense.shape == (3, b.dense.shape[1]) and torch.isfinite(b.dense).all()
    assert b.seq["dt"][0] > b.seq["dt"][1]  # 5 s ago is an older bucket than 10 ms ago
    # Ground truth is never a feature.
    exs2 = [dataclasses.replace(e, p_click=0.9, p_conversion=0.5) for e in exs]
    b2 = make_batch(exs2, seqs, CFG)
    assert torch.equal(b.dense, b2.dense) and torch.equal(b.sparse.values(), b2.sparse.values())


def _bad(b: GemBatch, **kw) -> GemBatch:
    return dataclasses.replace(b, **kw)


def test_validate_rejects_inconsistent_batches():
    b = synthetic_batch(CFG, [0, 3, 1])
    b.validate(CFG.features)
    seq_short = {**b.seq, "item": b.seq["item"][:-1]}
    cases = [
        dict(seq_lengths=torch.tensor([0, 3, 2])),  # lengths sum != values
        dict(seq_lengths=torch.tensor([-1, 4, 1])),  # negative length
        dict(seq=seq_short),
        dict(seq={**b.seq, "kind": -b.seq["kind"]}),  # negative ids
        dict(dense=b.dense.clone().fill_(float("nan"))),
        dict(labels=b.labels[:2]),
        dict(surface_idx=torch.tensor([0, 1])),
        dict(sparse=make_kjt({k: np.full(2, 1) for k in NONSEQ_KEYS})),  # stride != B
        dict(sparse=make_kjt({k: np.full(3, -1 if k == "hour" else 1) for k in NONSEQ_KEYS})),
    ]
    for kw in cases:
        with pytest.raises(ValueError):
            _bad(b, **kw).validate()
    with pytest.raises(ValueError):  # only the config knows the table sizes
        _bad(b, seq={**b.seq, "item": b.seq["item"] + 10_000}).validate(CFG.features)
    with pytest.raises(ValueError):
        _bad(b, surface_idx=torch.tensor([0, 1, 9])).validate(CFG.features)
