"""Students: shapes on awkward histories, the auxiliary distillation head, the Student
Adapter's calibration, table sharing (frozen / fine-tuned), the user-side representation."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from opengem.model.batch import synthetic_batch
from opengem.model.config import preset
from opengem.model.gem import GemModel
from opengem.model.heads import funnel_logits
from opengem.model.student import (
    StudentAdapter,
    StudentConfig,
    StudentInputs,
    StudentLearner,
    StudentModel,
    blank_target,
    representation_dim,
    teacher_user_representation,
)

TINY = preset("tiny")


def _cfg(**kw) -> StudentConfig:
    return StudentConfig(features=TINY.features, d=TINY.d, history=16, hidden=(16, 8), **kw)


@pytest.mark.parametrize("lengths", [[0, 0, 0], [1], [0, 5, 300, 1], [2000, 0]])
@pytest.mark.parametrize("repr_dim", [0, 12])
def test_shapes_and_gradients_on_awkward_histories(lengths, repr_dim):
    torch.manual_seed(0)
    m = StudentModel(_cfg(distill=True, repr_dim=repr_dim))
    b = synthetic_batch(TINY, lengths, seed=1)
    B = len(lengths)
    x = StudentInputs(b, torch.randn(B, repr_dim), torch.tensor([i % 2 == 0 for i in range(B)])) if repr_dim else b
    serve, distill = m.heads(x)
    assert serve.shape == distill.shape == (B, 2)
    p = m.predict(x)
    assert torch.isfinite(p).all() and (p[:, 1] <= p[:, 0] + 1e-7).all()  # pCVR <= pCTR (funnel)
    (funnel_logits(serve).sum() + funnel_logits(distill).sum()).backward()
    grads = [q.grad for q in m.bottom.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    if repr_dim:
        with pytest.raises(ValueError, match="reps"):
            m.predict(StudentInputs(b, torch.randn(B, repr_dim + 1), torch.ones(B, dtype=torch.bool)))


def test_a_fresh_student_predicts_the_prior_rates():
    m = StudentModel(_cfg())
    p = m.predict(synthetic_batch(TINY, [0, 3, 200, 40] * 16, seed=2)).mean(0)
    assert 0.02 < float(p[0]) < 0.12 and float(p[1]) < 0.03


def test_the_distillation_loss_never_reaches_the_serving_head():
    torch.manual_seed(0)
    m = StudentModel(_cfg(distill=True))
    b = synthetic_batch(TINY, [4, 0, 30, 7], seed=3)
    serve, distill = m.heads(b)
    dl = F.binary_cross_entropy_with_logits(funnel_logits(distill), torch.rand(4, 2))
    g_serve = torch.autograd.grad(dl, list(m.serve_head.parameters()), allow_unused=True, retain_graph=True)
    assert all(g is None for g in g_serve)
    g_bottom = torch.autograd.grad(dl, list(m.bottom.parameters()), allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in g_bottom)  # but it shapes the shared bottom


def test_adapter_recalibrates_a_biased_teacher_on_fresh_labels():
    rng = np.random.default_rng(0)
    n = 40_000
    true = 1 / (1 + np.exp(-rng.normal(-3.0, 1.0, n)))  # ~7 % base rate
    y = (rng.random(n) < true).astype(float)
    z = np.log(true / (1 - true))
    teacher = 1 / (1 + np.exp(-(2.0 * z + 2.5)))  # over-confident and too high: what a stale teacher may be
    ad = StudentAdapter(n_tasks=1, window=20_000, refit_every=5_000)
    assert np.allclose(ad.transform(teacher[:10, None])[:, 0], teacher[:10])  # identity before any fit
    for i in range(0, n // 2, 1000):
        ad.update(teacher[i:i + 1000, None], y[i:i + 1000, None])
    assert ad.fits >= 1
    p_raw, p_ad = teacher[n // 2:], ad.transform(teacher[n // 2:, None])[:, 0]
    y_test = y[n // 2:]

    def ll(p):
        return -np.mean(y_test * np.log(p) + (1 - y_test) * np.log1p(-p))

    oracle = ll(true[n // 2:])
    assert ll(p_raw) > 1.08 * oracle and ll(p_ad) < 1.01 * oracle  # the adapter closes the gap to the truth
    assert p_ad.mean() / y_test.mean() == pytest.approx(1.0, abs=0.1)  # calibrated
    assert p_raw.mean() / y_test.mean() > 1.3
    assert ad.a[0] == pytest.approx(0.5, abs=0.1) and ad.b[0] == pytest.approx(-1.25, abs=0.3)  # inverts 2z + 2.5


def test_adapter_keeps_its_fit_on_a_window_with_too_few_positives_and_stays_in_range():
    rng = np.random.default_rng(1)
    n = 1024
    p = 1 / (1 + np.exp(-rng.normal(-5.0, 1.0, (n, 2))))
    y = np.zeros((n, 2))
    y[:200, 0] = 1  # task 0: enough positives; task 1: 3 positives, all where the teacher is lowest
    y[np.argsort(p[:, 1])[:3], 1] = 1
    ad = StudentAdapter(2, window=n, refit_every=n)
    ad.update(p, y, np.full(n, 4.0))
    assert ad.fits == 1
    assert (ad.a[1], ad.b[1]) == (1.0, 0.0)  # untouched: 3 < min_labels positives
    assert StudentAdapter.A_RANGE[0] <= ad.a[0] <= StudentAdapter.A_RANGE[1]
    assert np.average(ad.transform(p)[:, 0], weights=np.full(n, 4.0)) == pytest.approx(200 / n, abs=0.03)  # level
    assert abs(ad.b[0]) <= StudentAdapter.B_MAX
    sep = StudentAdapter(1, window=n, refit_every=n, min_labels=1)  # a separable window: clamped, finite
    z = np.linspace(-6, -1, n)[:, None]
    sep.update(1 / (1 + np.exp(-z)), (z > -1.5).astype(float))
    assert np.isfinite(sep.a).all() and sep.a[0] <= StudentAdapter.A_RANGE[1] and abs(sep.b[0]) <= StudentAdapter.B_MAX


def test_adapted_targets_are_computed_before_the_adapter_sees_the_batch():
    lr = StudentLearner(_cfg(distill=True), adapter=StudentAdapter(2, refit_every=1, min_labels=1))
    b = synthetic_batch(TINY, [3] * 64, seed=4)
    tp = np.full((64, 2), 0.5)
    before = lr.adapter.transform(tp)
    tgt = lr.targets(tp, b.labels, torch.ones(64))
    assert np.allclose(tgt.numpy(), before)  # this batch's labels did not shape its own targets
    assert lr.adapter.fits == 1 and not np.allclose(lr.adapter.transform(tp), before)  # but the next one's


@pytest.mark.parametrize("mode", ["frozen", "finetune"])
def test_students_start_from_gems_tables_frozen_or_fine_tuned(mode):
    torch.manual_seed(0)
    teacher = GemModel(TINY)
    t_before = {k: v.clone() for k, v in teacher.sparse.state_dict().items()}
    lr = StudentLearner(_cfg(share_tables=mode), teacher=teacher)
    s0 = {k: v.clone() for k, v in lr.model.sparse.state_dict().items()}
    assert all(torch.equal(s0[k], t_before[k]) for k in s0)
    for seed in range(3):
        b = synthetic_batch(TINY, [5, 0, 40, 2] * 8, seed=seed)
        lr.step(b, torch.ones(len(b)))
    after = lr.model.sparse.state_dict()
    moved = any(not torch.equal(after[k], s0[k]) for k in after)
    assert moved == (mode == "finetune")
    assert all(torch.equal(teacher.sparse.state_dict()[k], t_before[k]) for k in t_before)  # the teacher never moves


def test_sharing_needs_the_teachers_dims():
    teacher = GemModel(TINY)
    with pytest.raises(ValueError, match="embedding dim"):
        StudentLearner(dataclasses.replace(_cfg(share_tables="frozen"), d=TINY.d * 2), teacher=teacher)
    with pytest.raises(ValueError, match="share_tables"):
        _cfg(share_tables="sometimes")


def test_user_representation_ignores_the_target_ad():
    torch.manual_seed(0)
    teacher = GemModel(TINY)
    b1 = synthetic_batch(TINY, [0, 7, 120], seed=5)
    b2 = synthetic_batch(TINY, [0, 7, 120], seed=6)  # other ids everywhere ...
    # ... then b2 takes b1's user side: only the ad (and its match counters) differ
    from opengem.model.batch import NONSEQ_KEYS, make_kjt

    cols = {k: (b2 if k in ("item_id", "advertiser_id", "category", "ad_format") else b1).sparse[k].values()
            for k in NONSEQ_KEYS}
    b2 = dataclasses.replace(b1, sparse=make_kjt(cols))
    assert not torch.equal(teacher.represent(b1), teacher.represent(b2))  # the full representation sees the ad
    r1, r2 = teacher_user_representation(teacher, b1), teacher_user_representation(teacher, b2)
    assert r1.shape == (3, representation_dim(teacher))
    torch.testing.assert_close(r1, r2)
    blank = blank_target(b1)
    assert int(blank.sparse["item_id"].values().abs().sum()) == 0 and torch.equal(blank.seq_lengths, b1.seq_lengths)


def test_surface_mask_selects_the_students_surface():
    lr = StudentLearner(_cfg(surface=TINY.features.surfaces[1]))
    b = synthetic_batch(TINY, [1] * 50, seed=7)
    assert torch.equal(lr.surface_mask(b), b.surface_idx == 1)
    with pytest.raises(ValueError, match="unknown surface"):
        _cfg(surface="billboard")


def test_select_rows_keeps_each_rows_history():
    from opengem.model.student import select_rows

    b = synthetic_batch(TINY, [3, 0, 5, 1, 2], seed=8)
    sel = select_rows(b, torch.tensor([False, True, True, False, True]))
    assert sel.seq_lengths.tolist() == [0, 5, 2]
    off = b.seq_offsets
    for k in b.seq:
        assert torch.equal(sel.seq[k], torch.cat([b.seq[k][off[2]:off[3]], b.seq[k][off[4]:off[5]]]))
    assert torch.equal(sel.sparse["user_id"].values(), b.sparse["user_id"].values()[[1, 2, 4]])
    assert torch.equal(sel.labels, b.labels[[1, 2, 4]])
    sel.validate(TINY.features)
    assert len(select_rows(b, torch.zeros(5, dtype=torch.bool))) == 0


def test_a_published_student_loads_and_scores_the_same(tmp_path):
    from opengem.model.registry import load, publish

    torch.manual_seed(0)
    lr = StudentLearner(_cfg(distill=True, repr_dim=6, surface=TINY.features.surfaces[0]))
    b = synthetic_batch(TINY, [0, 9, 33, 1], seed=9)
    x = StudentInputs(b, torch.randn(4, 6), torch.tensor([True, False, True, True]))
    lr.step(x, torch.ones(4), np.full((4, 2), 0.2))
    v = publish(tmp_path / "models", lr.model, {"note": "student"})
    got = load(tmp_path / "models", v.name)
    assert got.kind == "student" and got.model.cfg == lr.model.cfg
    torch.testing.assert_close(got.model.predict(x), lr.predict(x), rtol=0, atol=0)


def _mean_served(lr: StudentLearner, b) -> torch.Tensor:
    return lr.predict(b).mean(0)


@pytest.mark.parametrize("mix", [0.0, 0.5, 1.0])
def test_soft_mix_pulls_the_served_scores_toward_the_teacher(mix):
    b = synthetic_batch(TINY, [3, 0, 12, 5] * 16, seed=5)
    b.labels.zero_()  # labels say 0, the teacher 0.4 / 0.2: the serving head lands in between by the mix
    tp = np.tile([0.4, 0.2], (len(b), 1))
    lr = StudentLearner(_cfg(soft_mix=mix), lr=1e-2, seed=0)
    for _ in range(150):
        lr.step(b, torch.ones(len(b)), tp)
    p = _mean_served(lr, b)
    want = torch.tensor([mix * 0.4, mix * 0.2])  # the minimiser of (1 - mix) BCE(0) + mix BCE(tp)
    assert torch.allclose(p, want, atol=0.04), (p, want)


def test_soft_mix_uses_the_adapted_targets_and_updates_the_adapter():
    lr = StudentLearner(_cfg(soft_mix=0.5), adapter=StudentAdapter(2, refit_every=1, min_labels=1))
    b = synthetic_batch(TINY, [3] * 64, seed=4)
    lr.step(b, torch.ones(64), np.full((64, 2), 0.5))
    assert lr.adapter.fits == 1 and len(lr.adapter._w) == 64  # no distillation head, still adapted


def test_distill_step_reads_no_label_and_teaches_the_serving_head():
    b = synthetic_batch(TINY, [3, 0, 12, 5] * 16, seed=6)
    tp = np.tile([0.3, 0.1], (len(b), 1))
    states = []
    for y in (0.0, 1.0):
        b.labels.fill_(y)
        lr = StudentLearner(_cfg(distill=True), adapter=StudentAdapter(2, refit_every=1, min_labels=1), lr=1e-2)
        for _ in range(100):
            lr.distill_step(b, torch.ones(len(b)), tp)
        assert len(lr.adapter._w) == 0 and lr.adapter.fits == 0  # no label reached the adapter
        states.append(lr.model.state_dict())
    for k in states[0]:
        torch.testing.assert_close(states[0][k], states[1][k])  # labels 0 or 1: the same student
    assert torch.allclose(_mean_served(lr, b), torch.tensor([0.3, 0.1]), atol=0.03)


def test_representation_projection_width_dropout_and_config_checks():
    m = StudentModel(_cfg(repr_dim=12, repr_width=4, repr_dropout=0.5))
    assert m.repr_proj.out_features == 4 and m.repr_drop.p == 0.5
    assert m.bottom[0].in_features == StudentModel(_cfg()).bottom[0].in_features + 4 + 1
    b = synthetic_batch(TINY, [3, 0, 7], seed=7)
    x = StudentInputs(b, torch.randn(3, 12), torch.ones(3, dtype=torch.bool))
    m.eval()
    torch.testing.assert_close(m.predict(x), m.predict(x))  # dropout off in eval: served scores are stable
    for bad in ({"soft_mix": 1.5}, {"soft_mix": -0.1}, {"repr_dropout": 1.0}, {"repr_width": -1}):
        with pytest.raises(ValueError):
            _cfg(**bad)
