"""The towers' output bias starts at the base rates: a fresh model predicts the priors, not 0.5."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch

from opengem.features.memory import MemorySequenceStore
from opengem.model.config import HeadConfig, preset
from opengem.model.data import examples_batch
from opengem.model.gem import GemModel
from opengem.model.heads import STAGE_PRIORS, MultiDomainHeads, prior_logits
from opengem.stream.joiner import Example
from opengem.stream.simulator import SimConfig, Simulator


@pytest.fixture(scope="module")
def long_history_examples():
    """Impressions of the busiest simulated users, with the store holding their histories."""
    events = [e for b in Simulator(SimConfig(seed=3, n_users=40)).batches(20_000) for e in b]
    store = MemorySequenceStore()
    store.apply(events, (0, 0))
    count = collections.Counter(e.user_id for e in events)
    imps = [e for e in events if e.kind == "impression" and count[e.user_id] > 1_000][-128:]
    examples = [Example(request_id=e.request_id, ts=e.ts, surface=e.surface, user_id=e.user_id, item_id=e.item_id,
                        advertiser_id=e.advertiser_id, ad_format=e.ad_format, category=e.category,
                        age_bucket=e.age_bucket, country=e.country, device=e.device, hour=e.hour, click=0,
                        conversion=0, click_ts=None, conversion_ts=None) for e in imps]
    return examples, store


@pytest.mark.parametrize("name", ["tiny", "base"])
def test_a_fresh_model_predicts_the_prior_rates_on_long_histories(long_history_examples, name):
    examples, store = long_history_examples
    cfg = preset(name)
    batch = examples_batch(examples, store, cfg)
    assert len(batch) == 128 and batch.seq_lengths.float().mean() > 200  # long histories
    ctr, cvr = STAGE_PRIORS
    for seed in range(3):
        torch.manual_seed(seed)
        with torch.no_grad():
            p = GemModel(cfg).eval().predict(batch)  # (B, 2): pCTR, pCVR over impressions
        mean = p.mean(0)
        # Untrained: the base rates up to the random last layer's spread (without the bias: ~0.5, ~0.25).
        assert mean[0].item() == pytest.approx(ctr, rel=0.25)
        assert mean[1].item() == pytest.approx(ctr * cvr, rel=0.35)
        assert p[:, 0].max() < 4 * ctr
        assert p[:, 0].std() > 0  # the features still move the predictions: only the bias is set


def test_prior_logits_and_their_checks():
    torch.testing.assert_close(prior_logits((0.5, 0.2), 3), torch.tensor([0.0, float(np.log(0.25)), 0.0]))
    with pytest.raises(ValueError):
        prior_logits((0.0,), 1)
    heads = MultiDomainHeads(8, 3, 2, HeadConfig(trunk=(4,), tower=(4,)), priors=(0.01, 0.3))
    for tower in heads.towers:
        torch.testing.assert_close(tower[-1].bias, prior_logits((0.01, 0.3), 2))


@pytest.mark.parametrize("n_experts", [0, 2])
def test_a_one_surface_batch_in_eval_runs_its_tower_alone_with_the_same_logits(n_experts):
    torch.manual_seed(0)
    heads = MultiDomainHeads(8, 3, 2, HeadConfig(trunk=(6,), tower=(5,), n_experts=n_experts))
    with torch.no_grad():
        for t in heads.towers:
            t[-1].bias.normal_()  # towers that differ
    h = torch.randn(7, 8)
    for s in range(3):
        idx = torch.full((7,), s)
        heads.train()
        want = heads(h, idx)  # every tower, gathered
        heads.eval()
        got = heads(h, idx)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    mixed = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    heads.eval()
    torch.testing.assert_close(heads(h, mixed), torch.stack([heads(h[i:i + 1], mixed[i:i + 1])[0] for i in range(7)]))
    with pytest.raises(IndexError):
        heads(h, torch.full((7,), 3))


def test_shared_stages_come_from_one_tower_for_every_surface_and_the_others_per_surface():
    torch.manual_seed(1)
    heads = MultiDomainHeads(8, 3, 2, HeadConfig(trunk=(6,), tower=(5,), shared_stages=(1,)), priors=(0.02, 0.1))
    assert [t[-1].out_features for t in heads.towers] == [1, 1, 1] and heads.shared[-1].out_features == 1
    torch.testing.assert_close(heads.shared[-1].bias, prior_logits((0.02, 0.1), 2)[1:])
    with torch.no_grad():
        for t in heads.towers:
            t[-1].bias.normal_()
    h = torch.randn(5, 8)
    by_surface = [heads.eval()(h, torch.full((5,), s)) for s in range(3)]
    for s in (1, 2):  # the conversion stage is the same tower's output whatever the surface; the click is not
        torch.testing.assert_close(by_surface[s][:, 1], by_surface[0][:, 1])
        assert not torch.allclose(by_surface[s][:, 0], by_surface[0][:, 0])
    mixed = torch.tensor([0, 1, 2, 0, 1])
    heads.train()
    train_out = heads(h, mixed)
    torch.testing.assert_close(train_out, torch.stack([by_surface[int(s)][i] for i, s in enumerate(mixed)]))
    train_out.sum().backward()
    assert heads.shared[0].weight.grad.abs().sum() > 0 and all(t[-1].weight.grad is not None for t in heads.towers)
    for bad in (HeadConfig(shared_stages=(2,)), HeadConfig(shared_stages=(0, 1)),
                HeadConfig(shared_stages=(1,), n_experts=2), HeadConfig(shared_stages=(1,), per_surface=False)):
        with pytest.raises(ValueError):
            MultiDomainHeads(8, 3, 2, bad)


def test_a_config_without_shared_stages_keeps_the_model_fingerprint_it_had_before_the_field():
    from dataclasses import replace

    from opengem.model import evaluate as ev

    cfg = preset("tiny")
    d = ev._model_describe(cfg)
    assert "shared_stages" not in d["heads"] and d["heads"]["tower"] == cfg.heads.tower
    assert ev._model_describe(replace(cfg, heads=replace(cfg.heads, shared_stages=(1,))))["heads"]["shared_stages"] == (1,)
