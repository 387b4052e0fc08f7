"""The signal budget: the simulator's impression trace, the join, and the intent posterior
(checked against the simulator's own hidden state on a real stream)."""

from __future__ import annotations

import numpy as np
import pytest

from opengem.model import signal_budget as sb
from opengem.stream.events import KIND_INDEX
from opengem.stream.simulator import SimConfig, Simulator

K = KIND_INDEX


def _stream(cfg: SimConfig, n: int):
    sim = Simulator(cfg)
    sim.trace = []
    chunks = list(sim._chunks(n, 8192))
    cols = {k: np.concatenate([getattr(c, k) for c in chunks]) for k in ("user", "ts", "kind", "item", "cat", "req")}
    trace = {k: np.concatenate([d[k] for d in sim.trace]) for k in sim.trace[0]}
    return cols, trace


def test_trace_terms_rebuild_the_probabilities_and_leave_the_stream_unchanged():
    cfg = SimConfig(seed=3, n_users=300)
    cols, tr = _stream(cfg, 40_000)
    plain = list(Simulator(cfg)._chunks(40_000, 8192))
    assert np.array_equal(np.concatenate([c.item for c in plain]), cols["item"])  # the trace changes nothing
    np.testing.assert_allclose(1 / (1 + np.exp(-tr["z_click"])), tr["p_click"], rtol=1e-12)
    np.testing.assert_allclose(1 / (1 + np.exp(-tr["z_cvr"])), tr["p_cvr"], rtol=1e-12)
    active = tr["long_range_gap"] >= cfg.long_range_min_gap
    np.testing.assert_array_equal(tr["cvr_long_range"], cfg.long_range_strength * active)
    assert active.any() and (tr["click_interactions"] != 0).any()
    # every impression of the stream is in the trace, once
    imp = cols["kind"] == K["impression"]
    assert set(cols["req"][imp]) <= set(tr["req"])
    off = SimConfig(seed=3, n_users=300, interactions=False, long_range=False)
    _, tr_off = _stream(off, 10_000)
    assert not tr_off["click_interactions"].any() and not tr_off["cvr_long_range"].any()
    assert (tr_off["long_range_gap"] == -1).all()


def test_join_matches_rows_and_refuses_a_foreign_stream():
    _, tr = _stream(SimConfig(seed=1, n_users=200), 20_000)
    rng = np.random.default_rng(0)
    pick = rng.choice(len(tr["req"]), 500, replace=False)
    idx = sb.join_rows(tr, tr["user"][pick], tr["ts"][pick], tr["p_click"][pick])
    np.testing.assert_array_equal(tr["req"][idx], tr["req"][pick])
    with pytest.raises(ValueError, match="disagree"):
        sb.join_rows(tr, tr["user"][pick], tr["ts"][pick], tr["p_click"][pick] + 0.01)
    with pytest.raises(ValueError, match="no impression"):
        sb.join_rows(tr, tr["user"][pick], tr["ts"][pick] + 10**12, tr["p_click"][pick])


def _posterior_one(kinds, cats, target, *, cause="follow", q=0.5, gap=3, items=None):
    k = np.array([K[x] for x in kinds])
    items = np.arange(len(k)) if items is None else np.array(items)
    return float(sb.intent_posterior(k, np.array(cats), items, np.array([0, len(k)]), np.array([target]),
                                     cause=cause, plant_prob=q, min_gap=gap)[0])


def test_intent_posterior_follows_the_rule_by_hand():
    # a follow of category 7 with 3 activations after it (+1: the impression) -> gap 4 >= 3
    assert _posterior_one(["follow", "view", "view", "view"], [7, 1, 1, 1], 7) == pytest.approx(0.5)
    assert _posterior_one(["follow", "view", "view", "view"], [7, 1, 1, 1], 6) == 0.0  # other category
    assert _posterior_one(["follow", "view"], [7, 1], 7) == 0.0  # gap 2 < 3
    # clicks and conversions are not activations
    assert _posterior_one(["follow", "click", "conversion", "view"], [7, 7, 7, 1], 7) == 0.0
    # a later follow (any category) may have replaced the intent: q (1 - q)
    assert _posterior_one(["follow", "view", "follow", "view", "view"], [7, 1, 2, 1, 1], 7) == pytest.approx(0.25)
    # two candidate plants in the category add up
    assert _posterior_one(["follow", "follow", "view", "view", "view"], [7, 7, 1, 1, 1], 7) == pytest.approx(0.75)
    # conversion cause: the plant sits at the converted impression (same item), not at the conversion
    kinds = ["impression", "view", "click", "conversion", "view"]
    assert _posterior_one(kinds, [7, 1, 7, 7, 1], 7, cause="conversion", q=1.0, gap=3,
                          items=[9, 5, 9, 9, 4]) == 1.0  # impression + 2 views after it + 1 = 3
    assert _posterior_one(kinds, [7, 1, 7, 7, 1], 7, cause="conversion", q=1.0, gap=4,
                          items=[9, 5, 9, 9, 4]) == 0.0
    assert _posterior_one(["follow", "view", "view", "view"], [7, 1, 1, 1], 7, cause="conversion", q=1.0) == 0.0


@pytest.mark.parametrize("cause,q", [("conversion", 1.0), ("follow", 0.3)])
def test_intent_posterior_is_the_simulators_hidden_state_seen_through_the_history(cause, q):
    cfg = SimConfig(seed=5, n_users=100, events_per_second=1.0, heavy_tail=False, long_range_cause=cause,
                    long_range_plant_prob=q, long_range_min_gap=100)
    cols, tr = _stream(cfg, 80_000)
    order = np.lexsort((cols["ts"], cols["user"]))
    u, ts = cols["user"][order], cols["ts"][order]
    kinds, cats, items = cols["kind"][order], cols["cat"][order], cols["item"][order]
    starts, ends = np.searchsorted(u, np.arange(cfg.n_users)), np.searchsorted(u, np.arange(cfg.n_users), "right")
    imp = cols["kind"] == K["impression"]
    req_cat = dict(zip(cols["req"][imp].tolist(), cols["cat"][imp].tolist()))
    rows = np.array([i for i, r in enumerate(tr["req"].tolist()) if r in req_cat])
    ks, cs, its, offs = [], [], [], [0]
    for r in rows:
        s, e = starts[tr["user"][r]], ends[tr["user"][r]]
        j = s + np.searchsorted(ts[s:e], tr["ts"][r], side="left")  # the events before the impression
        ks.append(kinds[s:j]); cs.append(cats[s:j]); its.append(items[s:j]); offs.append(offs[-1] + j - s)
    target = np.array([req_cat[r] for r in tr["req"][rows].tolist()])
    post = sb.intent_posterior(np.concatenate(ks), np.concatenate(cs), np.concatenate(its), np.array(offs), target,
                               cause=cause, plant_prob=q, min_gap=cfg.long_range_min_gap)
    active = tr["long_range_gap"][rows] >= cfg.long_range_min_gap
    assert active.sum() > 100
    if q == 1.0:  # one identifiable cause: the history shows the state exactly (up to a conversion in flight)
        assert np.mean(post[active] > 0.5) > 0.9  # the misses: a conversion still in flight
        assert np.mean(post[~active] > 0.5) < 1e-3
    else:  # decoys: a calibrated probability, higher where the intent is active
        se = np.sqrt(np.sum(post * (1 - post))) / len(post)
        assert abs(post.mean() - active.mean()) < 4 * se + 1e-3
        assert post[active].mean() > 3 * post[~active].mean()


def test_capture_lift_reads_the_oracle_and_ignores_a_model_without_the_intent():
    gap = np.array([-1, -1, 10, 20, 250, 300, 2000])
    masks = sb.gap_masks(gap, 200)
    assert masks["none"].sum() == 2 and masks["pre"].sum() == 2 and masks["256-1024"].sum() == 1
    no_intent = np.array([0.01, 0.02, 0.03, 0.01, 0.02, 0.05, 0.01])
    # a model that is the no-intent oracle times a constant factor prices in nothing
    assert all(abs(v) < 1e-9 for v in sb.lift(no_intent, no_intent, masks).values())
    z = np.log(no_intent / (1 - no_intent))
    with_intent = 1 / (1 + np.exp(-(z + 2.0 * (gap >= 200))))
    got = sb.lift(with_intent, no_intent, masks)
    assert got["pre"] == pytest.approx(0.0) and got["256-1024"] == pytest.approx(2.0)
    assert got["1024-inf"] == pytest.approx(2.0)


def test_without_term_keeps_the_mean_and_drops_the_term():
    _, tr = _stream(SimConfig(seed=2, n_users=300), 30_000)
    idx = np.arange(len(tr["req"]))
    full = tr["p_click"] * tr["p_cvr"] * 0.75
    cut = sb.without_term(tr, idx, "cvr_long_range", "conversion", 0.75)
    assert cut.mean() == pytest.approx(full.mean())
    act = tr["cvr_long_range"] > 0
    assert (cut[act] < full[act]).all()
    # a conversion-only term leaves the click oracle as it is
    np.testing.assert_allclose(sb.without_term(tr, idx, "cvr_interactions", "click", 0.75), tr["p_click"])


def _model_quality_module():
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "bench" / "model_quality.py"
    spec = importlib.util.spec_from_file_location("_mq", path)
    mq = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(mq)
    finally:
        sys.path.remove(str(path.parent))
    return mq


def test_model_quality_sim_overrides_are_typed_and_checked():
    mq = _model_quality_module()
    cfg = mq.sim_config("long_range_cause=conversion, long_range_plant_prob=1", 4, ("feed", "reels"))
    assert (cfg.long_range_cause, cfg.long_range_plant_prob, cfg.seed, cfg.surfaces) == \
        ("conversion", 1.0, 4, ("feed", "reels"))
    for bad in ("nope=1", "long_range_cause=sometimes", "long_range_plant_prob=2", "long_range"):
        with pytest.raises(SystemExit):
            mq.sim_config(bad, 0, ("feed",))


def test_intent_on_clicks_moves_the_click_logit_only_where_active_and_the_observable_oracle_rebuilds_it():
    cfg = SimConfig(seed=5, n_users=300, long_range_cause="conversion", long_range_plant_prob=1.0,
                    long_range_click_strength=1.5)
    _, tr = _stream(cfg, 60_000)
    active = tr["long_range_gap"] >= cfg.long_range_min_gap
    assert active.sum() > 50
    np.testing.assert_array_equal(tr["click_long_range"], 1.5 * active)
    idx = np.arange(len(tr["req"]))
    # with the hidden state itself as the posterior, the observable oracle is the oracle, for both tasks
    post = active.astype(np.float64)
    np.testing.assert_allclose(sb.p_observable(tr, idx, post, cfg.long_range_strength, 0.75, 1.5, task="click"),
                               tr["p_click"], rtol=1e-10)
    np.testing.assert_allclose(sb.p_observable(tr, idx, post, cfg.long_range_strength, 0.75, 1.5),
                               tr["p_click"] * tr["p_cvr"] * 0.75, rtol=1e-10)
    # without the intent: both logits lose it (active rows drop, the mean is kept)
    for task, full in (("click", tr["p_click"]), ("conversion", tr["p_click"] * tr["p_cvr"] * 0.75)):
        cut = sb.without_intent(tr, idx, task, 0.75)
        assert cut.mean() == pytest.approx(full.mean())
        assert (cut[active] < full[active]).all() and (cut[~active] > full[~active]).all()
    # the default (0) leaves the click oracle alone and the stream as it was
    _, tr0 = _stream(SimConfig(seed=5, n_users=300, long_range_cause="conversion", long_range_plant_prob=1.0), 20_000)
    assert not tr0["click_long_range"].any()
    with pytest.raises(ValueError, match="long_range_click_strength"):
        SimConfig(long_range_click_strength=float("nan"))


def test_a_new_simulator_field_at_its_default_keeps_old_dataset_fingerprints():
    from opengem.model.evaluate import _sim_describe

    assert "long_range_click_strength" not in _sim_describe(SimConfig())
    assert _sim_describe(SimConfig(long_range_click_strength=1.0))["long_range_click_strength"] == 1.0


def test_surface_affinity_spread_scales_the_affinity_per_surface_and_is_off_by_default():
    from opengem.stream.simulator import SURFACE_PROFILES

    cfg = SimConfig(seed=6, n_users=300, surface_affinity_spread=1.0)
    _, tr = _stream(cfg, 30_000)
    _, tr0 = _stream(SimConfig(seed=6, n_users=300), 30_000)
    assert not tr0["click_surface_affinity"].any()
    # same stream of draws up to the click logit: the difference is exactly the surface term
    np.testing.assert_allclose(tr["z_click"] - tr0["z_click"], tr["click_surface_affinity"], atol=1e-12)
    shift = np.array([SURFACE_PROFILES[s].affinity_shift for s in cfg.surfaces])
    assert len(set(np.sign(shift))) == 2  # the surfaces disagree about how much relevance matters
    # term / (A * spread * shift_s) is the user-ad affinity, the same law on every surface
    scale = []
    for s in range(len(cfg.surfaces)):
        m = tr["surface"] == s
        assert m.sum() > 100
        scale.append(np.std(tr["click_surface_affinity"][m] / (cfg.affinity_scale * shift[s])))
    assert max(scale) / min(scale) < 1.3, scale
    with pytest.raises(ValueError, match="surface_affinity_spread"):
        SimConfig(surface_affinity_spread=-0.1)


def test_ablation_section_lists_a_model_that_only_a_later_seed_ran():
    mq = _model_quality_module()

    def run(seed, models):
        by = {m: {s: {t: {"ne": ne} for t in ("click", "conversion")} for s in ("all", "feed", "reels")}
              for m, ne in models.items()}
        ci = {m: {t: {"all": {"delta": ne - models["gem"], "lo": ne - models["gem"] - 0.001,
                              "hi": ne - models["gem"] + 0.001}} for t in ("click", "conversion")}
              for m, ne in models.items() if m != "gem"}
        return {"config": {"seed": seed, "events": 10, "preset": "tiny", "max_len": 8, "label": "x",
                           "command": "bench/model_quality.py --sim a=1"},
                "dataset": {"fingerprint": "f", "stats": {"train": {"examples": 5, "kept": 4},
                                                          "test": {"examples": 3}}},
                "models": by, "ne_delta_vs_gem_ci": ci}

    L = mq._ablation_section([run(0, {"gem": 0.9, "gem_no_pyramid": 0.91}),
                              run(1, {"gem": 0.9, "gem_no_pyramid": 0.905, "gem_mmoe": 0.898})],
                             ["a.json", "b.json"], ("click", "conversion"))
    text = "\n".join(L)
    # the seed-1-only model gets its per-surface rows (mean over the one seed that ran it)
    assert "| gem_mmoe | click | -0.0020 | -0.0020 |" in text
    # the ablation's rows average both seeds
    assert "| gem_no_pyramid | conversion | +0.0075 | +0.0075 |" in text
    assert "loses NE by a measured margin in every seed: **yes**" in text
    # the variant is read against its interval, in the seed that ran it only
    assert "* Variant " in text and "(`gem_mmoe`), NE − GEM: seed 1: click -0.0020 [-0.0030, -0.0010] (better)" in text


def test_merge_runs_adds_the_later_runs_models_and_refuses_runs_that_do_not_match(tmp_path):
    import json

    mq = _model_quality_module()

    def run(models, seed=1, fp="f"):
        return {"time": "t", "config": {"seed": seed, "events": 10, "preset": "base", "max_len": 8, "models": list(models),
                                        "command": "c", "wall_s": 1.0},
                "dataset": {"fingerprint": fp}, "models": {m: {"all": {"click": {"ne": v}}} for m, v in models.items()},
                "ne_delta_vs_gem": {m: {"click": {"all": v - models.get("gem", 0.9)}} for m, v in models.items() if m != "gem"},
                "ne_delta_vs_gem_ci": {m: {"click": {"all": {"delta": v - models.get("gem", 0.9)}}}
                                       for m, v in models.items() if m != "gem"},
                "missing_models": []}

    def put(name, doc):
        (tmp_path / name).write_text(json.dumps(doc))
        return tmp_path / name

    a = put("a.json", run({"gem": 0.9, "gem_no_pyramid": 0.91}))
    b = put("b.json", run({"gem": 0.9, "gem_mmoe": 0.89}))
    m = mq.merge_runs([a, b])
    assert m["config"]["models"] == ["gem", "gem_no_pyramid", "gem_mmoe"]
    assert m["ne_delta_vs_gem_ci"]["gem_mmoe"]["click"]["all"]["delta"] == pytest.approx(-0.01)
    assert [x["path"] for x in m["merged_from"]] == [str(a), str(b)]
    for bad, why in ((run({"gem": 0.9001, "gem_mmoe": 0.89}), "gem differs"),
                     (run({"gem": 0.9, "gem_mmoe": 0.89}, seed=0), "seed"),
                     (run({"gem": 0.9, "gem_mmoe": 0.89}, fp="g"), "dataset fingerprint"),
                     (run({"gem_mmoe": 0.89}), "no gem")):
        with pytest.raises(SystemExit, match=why):
            mq.merge_runs([a, put("bad.json", bad)])
    with pytest.raises(SystemExit, match="no gem"):  # the first run is the reference too
        mq.merge_runs([put("first.json", run({"gem_mmoe": 0.89})), a])
    (tmp_path / "torn.json").write_text('{"config": {')
    for unreadable in (tmp_path / "missing.json", tmp_path / "torn.json"):
        with pytest.raises(SystemExit, match="not a readable results file"):
            mq.merge_runs([a, unreadable])


def test_merge_command_refuses_to_write_over_a_committed_result(tmp_path, monkeypatch):
    """`bench/model_quality.py --merge` writes only to an --out of its own: not the default
    results file, not one of its inputs (either would overwrite a committed result)."""
    import sys

    mq = _model_quality_module()
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    for p in (a, b):
        p.write_text("{}")
    for out in ([], ["--out", str(b)]):
        monkeypatch.setattr(sys, "argv", ["model_quality.py", "--merge", f"{a},{b}", *out])
        with pytest.raises(SystemExit, match="an --out of its own"):
            mq.main()
    assert a.read_text() == b.read_text() == "{}"
