"""Negative downsampling: deterministic keep decisions, weighted metrics, calibration of the trained model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from opengem.model.batch import synthetic_batch
from opengem.model.metrics import summarize
from opengem.model.sampling import NegativeSampler, WeightedWindow, hash_unit, weighted_summary
from opengem.model.train_config import TrainConfig
from opengem.model.trainer import OnlineLearner, model_config

IDS = [f"req-{i}" for i in range(20_000)]


def kept(sampler: NegativeSampler, ids=IDS) -> set[str]:
    return {i for i in ids if sampler.weight(i, positive=False) > 0}


def test_every_positive_is_kept_and_a_seeded_fraction_r_of_the_negatives():
    s = NegativeSampler(0.1, seed=7)
    assert all(s.weight(i, positive=True) == 1.0 for i in IDS[:2000])
    neg = kept(s)
    # Binomial(20k, 0.1): sd 42 examples; +-400 is far outside chance.
    assert abs(len(neg) - 2000) < 400
    assert {s.weight(i, positive=False) for i in neg} == {10.0}
    # Deterministic: a new sampler (a restarted trainer) keeps the same ones; another seed others.
    assert kept(NegativeSampler(0.1, seed=7)) == neg
    other = kept(NegativeSampler(0.1, seed=8))
    assert len(other & neg) < 0.2 * len(neg)  # independent draws overlap ~r = 10 %
    # A lower rate keeps a subset (what the adaptive mode relies on).
    assert kept(NegativeSampler(0.05, seed=7)) < neg
    assert kept(NegativeSampler(1.0, seed=7)) == set(IDS)


def test_the_keep_decision_does_not_depend_on_the_process():
    """Python's hash() is salted per process; the sampler's must not be (replays after a restart)."""
    code = ("import json; from opengem.model.sampling import hash_unit; "
            "print(json.dumps([hash_unit(f'req-{i}', 7) for i in range(50)]))")
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == [hash_unit(f"req-{i}", 7) for i in range(50)]


def test_adaptive_rate_falls_while_behind_and_recovers_within_its_bounds():
    s = NegativeSampler(0.2, min_rate=0.05, max_delay_s=10.0)
    t = 0.0
    rates = []
    for _ in range(20):
        t += 1.0
        rates.append(s.adapt(delay_s=30.0, now=t))
    assert rates[0] == pytest.approx(0.16) and rates[-1] == 0.05 and min(rates) == 0.05
    assert s.adapt(delay_s=30.0, now=t + 0.5) == 0.05  # at most one adjustment a second
    assert s.adapt(delay_s=7.0, now=t + 1.0) == 0.05  # between half the bound and the bound: hold
    for _ in range(40):
        t += 1.0
        s.adapt(delay_s=1.0, now=t)
    assert s.rate == 0.2
    fixed = NegativeSampler(0.2)
    assert fixed.adapt(delay_s=1e6, now=5.0) == 0.2  # max_delay_s = 0: a fixed rate
    with pytest.raises(ValueError, match="negative rate"):
        NegativeSampler(0.0)
    with pytest.raises(ValueError, match="negative_rate"):
        TrainConfig(negative_rate=1.5)


def test_weighted_metrics_of_a_downsampled_stream_estimate_the_full_stream():
    rng = np.random.default_rng(0)
    n = 200_000
    p = np.clip(rng.beta(1, 25, n), 1e-4, 1 - 1e-4)  # mean ~0.04
    y = (rng.random(n) < p).astype(np.float64)
    ids = [f"ex-{i}" for i in range(n)]
    full = summarize(p, y)
    # Unit weights reproduce the unweighted metrics (ties included: scores rounded).
    pr = np.round(p, 3)
    for k, v in summarize(pr[:5000], y[:5000]).items():
        assert weighted_summary(pr[:5000], y[:5000], np.ones(5000))[k] == pytest.approx(v, rel=1e-9)

    s = NegativeSampler(0.05, seed=3)
    w = np.array([s.weight(i, bool(lab)) for i, lab in zip(ids, y)])
    keep = w > 0
    assert keep.mean() < 0.1
    est = weighted_summary(p[keep], y[keep], w[keep])
    assert est["weight"] == pytest.approx(n, rel=0.02)
    for key, tol in (("rate", 0.03), ("calibration", 0.03), ("log_loss", 0.03), ("ne", 0.02), ("auc", 0.01)):
        assert est[key] == pytest.approx(full[key], rel=tol), key
    naive = summarize(p[keep], y[keep])  # what ignoring the weights would report
    assert naive["calibration"] < 0.5 * full["calibration"]

    win = WeightedWindow(window=1000)
    for lo in range(0, 6000, 300):  # whole old chunks drop once the rest fills the window
        win.add("k", p[lo:lo + 300], y[lo:lo + 300], w[lo:lo + 300])
    got = win.summary()["k"]
    assert got["n"] == 1000
    assert got == pytest.approx(weighted_summary(p[5000:6000], y[5000:6000], w[5000:6000]))


def test_downsampled_training_with_weights_stays_calibrated(dist_group):
    """A stream with a known click rate (4 %) and conversion rate given a click (25 %), features
    carrying no signal: a model trained on every positive and 10 % of the negatives, the kept
    negatives weighted 10, predicts the stream's rates (time-averaged over the second half,
    on unsampled batches): pCTR within 20 %, impression-level pCVR within 30 %. Without the
    weights the same run predicts ~0.29 and ~0.075 (the sample's rates; measured)."""
    ctr, cvr, r, B, steps = 0.04, 0.25, 0.1, 64, 150
    tcfg = TrainConfig(preset="tiny", lr=3e-3, metrics_port=None)
    cfg = model_config(tcfg, ("feed", "stories"))
    learner = OnlineLearner("gem", cfg, tcfg, dist_group, seed=0)
    sampler = NegativeSampler(r, seed=0)
    rng = np.random.default_rng(0)
    i, preds, n_pos, n_kept_pos = 0, [], 0, 0
    for step in range(steps):
        labels, weights = [], []
        while len(labels) < B:
            click = rng.random() < ctr
            conv = click and rng.random() < cvr
            w = sampler.weight(f"ex-{i}", click)
            i += 1
            n_pos += click
            if w:
                labels.append([click, conv])
                weights.append(w)
                n_kept_pos += click
        feats = dict(lengths=np.arange(B) % 8, seed=step % 16)  # a small pool of feature rows
        learner.step(synthetic_batch(cfg, labels=np.array(labels, np.float32), **feats), torch.tensor(weights))
        if step >= steps // 2 and step % 10 == 0:
            preds.append(learner.predict(synthetic_batch(cfg, **feats)).mean(0))
    assert n_kept_pos == n_pos  # every positive trained on
    assert i > 5 * steps * B  # most of the stream was sampled out
    pctr, pcvr = torch.stack(preds).mean(0).tolist()
    assert pctr == pytest.approx(ctr, rel=0.2)
    assert pcvr == pytest.approx(ctr * cvr, rel=0.3)
