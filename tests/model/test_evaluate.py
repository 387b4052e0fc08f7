"""The evaluation harness (model/evaluate.py): point-in-time data, temporal split, determinism, metrics."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from opengem.model import evaluate as ev
from opengem.model.batch import N_DENSE, DENSE_FEATURES
from opengem.model.config import preset
from opengem.model.metrics import summarize
from opengem.stream.simulator import SimConfig, Simulator

TINY = preset("tiny")
FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
# 10 simulated events/s and short windows: 12k events span 20 min, the label tail ~5 min.
SIM = SimConfig(seed=5, n_users=300, events_per_second=10.0)
DCFG = ev.DatasetConfig(events=12_000, test_events=4_000, click_window_s=60, conversion_window_s=120,
                        max_len=64, negative_rate=0.3, batch_size=128, store_max_events=1024, block_events=2048)


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    torch.set_num_threads(1)
    return ev.materialize(ev.simulator_source(DCFG, SIM), tmp_path_factory.mktemp("eval") / "ds", DCFG,
                          TINY.features, echo=lambda s: None)


def _rows(ds, split):
    out = {k: [] for k in ("ts", "user", "weight", "labels", "dense", "oracle")}
    for b, ex in ds.batches(split):
        out["ts"].append(ex["ts"].numpy()), out["user"].append(ex["user"].numpy())
        out["weight"].append(ex["weight"].numpy()), out["labels"].append(b.labels.numpy())
        out["dense"].append(b.dense.numpy()), out["oracle"].append(ex["oracle"].numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def test_temporal_split_point_in_time_histories_and_sampling(ds):
    train, test = _rows(ds, "train"), _rows(ds, "test")
    m = ds.meta
    # Temporal split: ordered in impression time, every train example before every test one.
    assert np.all(np.diff(train["ts"]) >= 0) and np.all(np.diff(test["ts"]) >= 0)
    assert train["ts"].max() < m["train_end_ts"] <= test["ts"].min() and test["ts"].max() < m["test_end_ts"]
    # Every examples the windows saw is accounted for; kept = what the files hold.
    assert len(train["ts"]) == m["stats"]["train"]["kept"] and len(test["ts"]) == m["stats"]["test"]["examples"]
    # Train negatives downsampled with weight 1/r, positives kept with 1; the test window complete.
    pos = train["labels"].max(1) > 0
    assert np.all(train["weight"][pos] == 1.0)
    np.testing.assert_allclose(train["weight"][~pos], 1 / DCFG.negative_rate, rtol=1e-6)
    r_obs = (~pos).sum() / (m["stats"]["train"]["examples"] - pos.sum())
    assert 0.2 < r_obs < 0.4
    assert np.all(test["weight"] == 1.0)
    # Point in time: the history length feature = the user's events strictly before the
    # impression in the raw simulator stream (capped at max_len), computed independently here.
    evs = [(e.user_id, e.ts) for b in Simulator(SIM).batches(m["events_ingested"], 4096) for e in b]
    users = np.array([u for u, _ in evs])
    times = np.array([t for _, t in evs])
    col = DENSE_FEATURES.index("hist_log_len")
    for rows in (train, test):
        for i in range(0, len(rows["ts"]), 7):
            u, t = rows["user"][i], rows["ts"][i]
            n = min(int(((users == u) & (times < t)).sum()), DCFG.max_len)
            assert math.isclose(rows["dense"][i, col], math.log1p(n), rel_tol=1e-5), (u, t)
    # Oracle probabilities carried per example; windowed conversion = p_conversion x cdf(W).
    assert 0 < m["conversion_window_cdf"] < 1
    assert np.all(test["oracle"][:, 1] <= test["oracle"][:, 0])


def test_materialize_is_deterministic_and_reused(ds, tmp_path):
    again = ev.materialize(ev.simulator_source(DCFG, SIM), tmp_path / "ds2", DCFG, TINY.features, echo=lambda s: None)
    assert again.fingerprint == ds.fingerprint
    for (a, xa), (b, xb) in zip(ds.batches("test"), again.batches("test")):
        assert torch.equal(a.dense, b.dense) and torch.equal(a.seq_lengths, b.seq_lengths)
        assert torch.equal(a.sparse.values(), b.sparse.values()) and torch.equal(xa["ts"], xb["ts"])
    msgs = []
    ev.materialize(ev.simulator_source(DCFG, SIM), tmp_path / "ds2", DCFG, TINY.features, echo=msgs.append)
    assert "reused" in msgs[0]
    other = dataclasses.replace(DCFG, negative_rate=0.5)
    with pytest.raises(FileExistsError):
        ev.materialize(ev.simulator_source(other, SIM), tmp_path / "ds2", other, TINY.features, echo=lambda s: None)


def test_training_is_deterministic_under_a_seed_and_resumes(ds, tmp_path):
    spec = ev.standard_models("tiny", TINY.features)["gem"]
    quiet = lambda s: None  # noqa: E731
    a = ev.train_and_evaluate(spec, ds, seed=1, results_dir=tmp_path / "a", echo=quiet, curve_every=128)
    b = ev.train_and_evaluate(spec, ds, seed=1, results_dir=tmp_path / "b", echo=quiet)
    c = ev.train_and_evaluate(spec, ds, seed=2, results_dir=tmp_path / "c", echo=quiet)
    assert a["test"] == b["test"] and a["fingerprint"] == b["fingerprint"]
    assert a["test"]["all"]["click"]["ne"] != c["test"]["all"]["click"]["ne"]
    assert a["train_examples"] == ds.meta["stats"]["train"]["kept"] and a["curve"]
    msgs = []
    again = ev.train_and_evaluate(spec, ds, seed=1, results_dir=tmp_path / "a", echo=msgs.append)
    assert "skipped" in msgs[0] and again["test"] == ev._finite(a["test"])
    # The oracle is scored on the same examples: its NE is the floor a model is compared with.
    for s in a["test"]:
        assert a["oracle"][s]["click"]["n"] == a["test"][s]["click"]["n"]
    assert a["oracle"]["all"]["click"]["ne"] < 1.0


def test_window_metrics_are_summarize_per_surface_and_weighted_when_sampled():
    rng = np.random.default_rng(0)
    N = 3000
    p = rng.random((N, 2)) * 0.3
    y = (rng.random((N, 2)) < p).astype(np.float32)
    s = rng.integers(0, 3, N)
    w = np.ones(N)
    out = ev.window_metrics(p, y, w, s, ("a", "b", "c"), ("click", "conversion"))
    assert set(out) == {"all", "a", "b", "c"}
    ref = summarize(p[s == 1, 0], y[s == 1, 0])
    assert all(out["b"]["click"][k] == ref[k] for k in ref)
    assert out["all"]["conversion"]["ne"] == summarize(p[:, 1], y[:, 1])["ne"]
    # Weights (downsampled rows) change the estimate; weight 1 everywhere is the exact figure.
    w2 = np.where(y[:, 0] > 0, 1.0, 2.0)
    assert ev.window_metrics(p, y, w2, s, ("a", "b", "c"), ("click", "conversion"))["all"]["click"]["ne"] != \
        out["all"]["click"]["ne"]


def test_summary_gaps_and_gains_follow_their_definitions():
    def res(ne_feed, ne_reels, oracle=(0.8, 0.9)):
        t = {"feed": {"click": {"ne": ne_feed, "auc": 0.7, "calibration": 1.0, "n": 10, "rate": 0.1},
                      "conversion": {"ne": ne_feed, "auc": 0.7, "calibration": 1.0, "n": 10, "rate": 0.1}},
             "reels": {"click": {"ne": ne_reels, "auc": 0.7, "calibration": 1.0, "n": 10, "rate": 0.1},
                       "conversion": {"ne": ne_reels, "auc": 0.7, "calibration": 1.0, "n": 10, "rate": 0.1}}}
        o = {"feed": {"click": {"ne": oracle[0]}, "conversion": {"ne": oracle[0]}},
             "reels": {"click": {"ne": oracle[1]}, "conversion": {"ne": oracle[1]}}}
        return {"test": t, "oracle": o}

    out = ev.summary({"gem": res(0.88, 0.99), "dlrm": res(0.96, 1.1)}, ("feed", "reels"), ("click", "conversion"))
    gap = ((0.88 - 0.8) / 0.8 + (0.99 - 0.9) / 0.9) / 2
    gain = ((0.96 - 0.88) / 0.96 + (1.1 - 0.99) / 1.1) / 2
    assert out["ne_gap_to_oracle"] == pytest.approx(gap)
    assert out["gem_vs_dlrm_ne_gain"] == pytest.approx(gain)
    assert out["models"]["gem"]["feed"]["click"]["oracle_ne"] == 0.8
    assert out["ne_delta_vs_gem"]["dlrm"]["click"]["reels"] == pytest.approx(1.1 - 0.99)


def test_replayed_log_fixture_evaluates(tmp_path):
    """A slice of the KuaiRand extract (tests/fixtures/kuairand_sample.tsv) through the replay mapping."""
    src = ev.replay_source(FIXTURES / "kuairand_sample.tsv", KUAIRAND_MAPPING, 0.25, TINY.features.surfaces)
    dcfg = dataclasses.replace(DCFG, events=src.window_events, test_events=src.window_events - src.train_events,
                               negative_rate=1.0)
    ds = ev.materialize(src, tmp_path / "k", dcfg, TINY.features, echo=lambda s: None)
    st = ds.meta["stats"]
    assert st["train"]["examples"] > 0 and st["test"]["examples"] > 0 and not ds.has_oracle
    assert st["train"]["click_positives"] > 0
    r = ev.train_and_evaluate(ev.standard_models("tiny", TINY.features)["dlrm"], ds, results_dir=tmp_path / "m",
                              echo=lambda s: None)
    assert "oracle" not in r and r["test"]["all"]["click"]["n"] == st["test"]["examples"]


KUAIRAND_MAPPING = "user=user_id,item=video_id,time=time_ms,time_unit=ms,click=is_click,conversion=long_view"


def test_cli_evaluate_writes_table_json_and_plot(tmp_path, capsys):
    from opengem.cli import main

    rc = main(["evaluate", "--replay", str(FIXTURES / "kuairand_sample.tsv"), "--mapping", KUAIRAND_MAPPING,
               "--models", "gem_no_sequence,dlrm", "--preset", "tiny", "--negative-rate", "1",
               "--work", str(tmp_path / "w"), "--data-dir", str(tmp_path / "data")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "NE click" in out and "gem_no_sequence" in out and "dlrm" in out
    doc = json.loads((tmp_path / "w" / "results.json").read_text())
    assert set(doc["models"]) == {"gem_no_sequence", "dlrm"}
    assert doc["models"]["dlrm"]["feed"]["click"]["ne"] > 0
    assert (tmp_path / "w" / "curves.png").stat().st_size > 0
