"""model/metrics.py against brute force, and model/registry.py's atomic, strict versions."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from opengem.model import metrics
from opengem.model.baselines import DLRMBaseline
from opengem.model.batch import synthetic_batch
from opengem.model.config import preset
from opengem.model.gem import GemModel
from opengem.model.registry import ModelLoadError, latest_version, list_versions, load, publish


class NotATensor:
    """Anything a weights_only load must refuse to unpickle."""


def test_auc_equals_the_pairwise_count_with_ties():
    rng = np.random.default_rng(0)
    p = rng.integers(0, 6, 300) / 5.0  # many ties
    y = (rng.random(300) < 0.3).astype(float)
    pos, neg = p[y == 1], p[y == 0]
    brute = ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (len(pos) * len(neg))
    assert metrics.auc(p, y) == pytest.approx(brute, abs=1e-12)
    assert math.isnan(metrics.auc(p, np.zeros(300)))


def test_ne_of_the_base_rate_is_one_and_calibration_is_mean_over_rate():
    y = np.array([1, 0, 0, 0, 1, 0, 0, 0, 0, 0], float)
    assert metrics.ne(np.full(10, y.mean()), y) == pytest.approx(1.0)
    assert metrics.ne(np.where(y > 0, 0.9, 0.1), y) < 0.5
    assert metrics.calibration(np.full(10, 0.4), y) == pytest.approx(2.0)
    assert math.isnan(metrics.ne([], []))


def test_windowed_metrics_keep_the_last_window():
    w = metrics.WindowedMetrics(window=100)
    w.add("k", np.zeros(80), np.zeros(80))
    w.add("k", np.ones(80), np.ones(80))
    p, y = w.arrays("k")
    assert len(p) == 100 and p[-80:].tolist() == [1.0] * 80 and p[:20].tolist() == [0.0] * 20
    with pytest.raises(ValueError):
        w.add("k", np.zeros(3), np.zeros(4))


@pytest.mark.parametrize("make", [lambda: GemModel(preset("tiny")), lambda: DLRMBaseline()])
def test_publish_then_load_predicts_the_same_and_keeps_k(tmp_path, make):
    torch.manual_seed(0)
    model = make().eval()
    batch = synthetic_batch(model.cfg, [0, 1, 5, 40], seed=1)
    for i in range(4):
        publish(tmp_path, model, {"step": i}, keep=2)
    assert list_versions(tmp_path) == ["00000003", "00000004"] and latest_version(tmp_path) == "00000004"
    got = load(tmp_path)
    assert got.version == "00000004" and got.meta["step"] == 3
    with torch.no_grad():
        torch.testing.assert_close(got.model.predict(batch), model.predict(batch), rtol=0, atol=0)


def test_half_written_tampered_or_mismatched_versions_are_refused(tmp_path):
    model = GemModel(preset("tiny"))
    v = publish(tmp_path, model).name
    (tmp_path / ".tmp-00000009-1").mkdir()  # a crash before the rename: invisible
    assert list_versions(tmp_path) == [v]
    # A pickle that is not just tensors must never be unpickled.
    torch.save({"x": NotATensor()}, tmp_path / v / "model.pt")
    with pytest.raises(ModelLoadError):
        load(tmp_path, v)
    # Tensors that do not fit the config in meta.json.
    v2 = publish(tmp_path, model).name
    meta = json.loads((tmp_path / v2 / "meta.json").read_text())
    meta["config"]["d"] = 16
    (tmp_path / v2 / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ModelLoadError):
        load(tmp_path, v2)
    with pytest.raises(ModelLoadError):
        load(tmp_path / "empty")
