"""The ground-truth simulator: determinism, validity, calibration, and one test per signal.

Signal tests compare a switch on and off on the same seed and read the true
probabilities carried by impressions (``p_click``, ``p_conversion``), so they
are sharp without huge samples. The constants they rely on (interaction signs,
the intent rule) are the documented ones (docs/simulator.md).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from opengem.config import from_dict
from opengem.stream.events import AD_FORMATS, DEVICES, validate
from opengem.stream.simulator import (
    AD_ID_BASE,
    AGE_SIGN,
    COUNTRIES,
    COUNTRY_SIGN,
    DEVICE_SIGN,
    FORMAT_SIGN,
    HOUR_SIGN,
    SimConfig,
    Simulator,
    conversion_delay_cdf,
    normalized_entropy,
)

# Small worlds make per-user statistics dense; heavy_tail off spreads events over users.
SMALL = SimConfig(n_users=2_000, n_organic_items=20_000, n_ads=1_000, n_advertisers=200)


def columns(cfg: SimConfig, n: int) -> tuple[Simulator, dict[str, np.ndarray]]:
    """The first ``n`` events as numpy columns (strings as object arrays)."""
    sim = Simulator(cfg)
    t = pa.Table.from_batches(list(sim.record_batches(n)))
    out = {}
    for name in t.schema.names:
        col = t.column(name).combine_chunks()
        if pa.types.is_dictionary(col.type):
            col = col.dictionary_decode()
        if pa.types.is_integer(col.type) and col.null_count:
            out[name] = np.asarray(col.fill_null(-1).to_numpy(), dtype=np.int64)
        else:
            out[name] = col.to_numpy(zero_copy_only=False)
    return sim, out


def logit(p: np.ndarray) -> np.ndarray:
    return np.log(p) - np.log1p(-p)


# ------------------------------------------------------------------ basics


def test_determinism_and_batch_size_independence():
    a = list(Simulator(SimConfig(seed=3)).events(30_000))
    b = [e for batch in Simulator(SimConfig(seed=3)).batches(30_000, batch_size=777) for e in batch]
    assert len(a) == 30_000 and a == b
    c = list(Simulator(SimConfig(seed=4)).events(30_000))
    assert [(e.user_id, e.item_id, e.kind) for e in a] != [(e.user_id, e.item_id, e.kind) for e in c]
    assert {e.event_id for e in a}.isdisjoint(e.event_id for e in c)
    # a stream restarts for each iterator and n is a prefix
    sim = Simulator(SimConfig(seed=3))
    assert list(sim.events(1_000)) == a[:1_000]
    assert list(sim.events(1_000)) == a[:1_000]


def test_parquet_and_arrow_carry_the_same_stream(tmp_path):
    sim = Simulator(SMALL)
    rows = sim.to_parquet(tmp_path / "e.parquet", 5_000)
    assert rows == 5_000
    t = pq.read_table(tmp_path / "e.parquet")
    evs = list(Simulator(SMALL).events(5_000))
    assert [validate(r, now_ms=2**50) for r in t.to_pylist()] == [
        validate(e.to_dict(), now_ms=2**50) for e in evs
    ]


def test_events_validate_ordered_and_linked():
    evs = list(Simulator(SimConfig(seed=1, events_per_second=20.0)).events(150_000))
    now = evs[-1].ts
    for e in evs:
        assert validate(e.to_dict(), now_ms=now) == e
    ts = np.array([e.ts for e in evs])
    assert (np.diff(ts) >= 0).all()
    assert ts[0] >= SimConfig().start_ts_ms
    assert len({e.event_id for e in evs}) == len(evs)
    imps, clicks = {}, {}
    n_conv = 0
    for e in evs:
        key = (e.user_id, e.item_id, e.surface, e.is_ad)
        if e.kind == "impression":
            assert e.request_id not in imps
            assert 0 < e.p_click < 1 and 0 < e.p_conversion <= e.p_click
            imps[e.request_id] = (e.ts, key)
        elif e.kind == "click":
            assert e.request_id in imps and e.request_id not in clicks
            its, ikey = imps[e.request_id]
            assert ikey == key and e.ts >= its
            clicks[e.request_id] = e.ts
        elif e.kind == "conversion":
            n_conv += 1
            assert e.request_id in clicks and e.ts >= clicks.pop(e.request_id)
            assert imps[e.request_id][1] == key
        else:
            assert not e.is_ad and e.request_id is None and e.ad_format is None and e.advertiser_id is None
    assert len(imps) > 10_000 and n_conv > 50


def test_surfaces_differ_and_custom_surfaces_work():
    _, c = columns(SMALL, 100_000)
    imp = c["kind"] == "impression"
    ctr = {s: c["p_click"][imp & (c["surface"] == s)].mean() for s in SMALL.surfaces}
    ad_share = {s: (c["is_ad"] & (c["surface"] == s)).sum() / (c["surface"] == s).sum() for s in SMALL.surfaces}
    assert max(ctr.values()) > 1.5 * min(ctr.values())
    assert max(ad_share.values()) > 2 * min(ad_share.values())
    cfg = dataclasses.replace(SMALL, surfaces=("home", "search"))
    evs = list(Simulator(cfg).events(5_000))
    assert {e.surface for e in evs} == {"home", "search"}
    for e in evs:
        validate(e.to_dict(), surfaces=cfg.surfaces, now_ms=evs[-1].ts)


def test_config_from_toml_table():
    cfg = from_dict(SimConfig, {"seed": 2, "surfaces": ["feed"], "drift": False, "drift_strength": 1})
    assert cfg.surfaces == ("feed",) and cfg.drift_strength == 1.0
    with pytest.raises(ValueError):
        SimConfig(cross_domain_strength=2.0)


# ------------------------------------------------------------------ calibration


def _check_bins(p: np.ndarray, y: np.ndarray, equal_mass: bool) -> None:
    """Ten bins of impressions by p (deciles of p, or equal expected counts); |binomial z| < 4 in each."""
    order = np.argsort(p)
    if equal_mass:
        cum = np.cumsum(p[order])
        cuts = np.searchsorted(cum, cum[-1] * np.arange(1, 10) / 10)
    else:
        cuts = len(p) * np.arange(1, 10) // 10
    for k, idx in enumerate(np.split(order, cuts)):
        expected, var = p[idx].sum(), (p[idx] * (1 - p[idx])).sum()
        assert expected > 20
        z = (y[idx].sum() - expected) / math.sqrt(var)
        assert abs(z) < 4, f"bin {k}: observed {y[idx].sum()} expected {expected:.1f} (z={z:.1f})"


def _isin(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    s = set(b.tolist())
    return np.fromiter((x in s for x in a.tolist()), bool, len(a))


def test_oracle_probabilities_match_empirical_rates():
    # Conversions at their click's ts and clicks within 300 s: drop the last 300 s of
    # impressions, whose outcomes may lie beyond the end of the sample.
    cfg = dataclasses.replace(SMALL, delayed_conversions=False)
    _, c = columns(cfg, 600_000)
    imp = np.flatnonzero((c["kind"] == "impression") & (c["ts"] < c["ts"][-1] - 300_000))
    rid = c["request_id"]
    clicked = _isin(rid[imp], rid[c["kind"] == "click"])
    converted = _isin(rid[imp], rid[c["kind"] == "conversion"])
    pc, pv = c["p_click"][imp], c["p_conversion"][imp]
    _check_bins(pc, clicked, equal_mass=False)  # p_click deciles
    _check_bins(pv, converted, equal_mass=True)  # conversions are rare: bins of equal expected count
    # the oracle beats the base rate, and NE of a constant predictor is 1
    assert normalized_entropy(clicked, pc) < 0.97
    assert normalized_entropy(clicked, np.full(len(pc), clicked.mean())) == pytest.approx(1.0)


# ------------------------------------------------------------------ signals


def _cross_domain_corr(strength_on: bool) -> float:
    cfg = dataclasses.replace(SMALL, heavy_tail=False, long_range=False, cross_domain=strength_on)
    _, c = columns(cfg, 400_000)
    K = cfg.n_categories
    org = (~c["is_ad"]) & (c["surface"] == "reels")
    counts = np.zeros((cfg.n_users, K))
    np.add.at(counts, (c["user_id"][org], c["category"][org]), 1)
    share = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    imp = (c["kind"] == "impression") & (c["surface"] == "feed") & (counts.sum(1)[c["user_id"]] >= 20)
    cat = c["category"][imp]
    x = share[c["user_id"][imp], cat]
    y = logit(c["p_click"][imp])
    for v in (x, y):  # remove category main effects (popularity, category CTR)
        v -= (np.bincount(cat, v, K) / np.maximum(np.bincount(cat, minlength=K), 1))[cat]
    return float(np.corrcoef(x, y)[0, 1])


def test_cross_domain_signal_switches():
    # organic interest on reels predicts ad clicks on feed only when cross_domain is on
    on, off = _cross_domain_corr(True), _cross_domain_corr(False)
    assert on > 0.1, on
    assert abs(off) < 0.04, off


def _intent_effect(long_range: bool) -> tuple[float, float, int]:
    """Mean CVR-logit lift of ads in the user's planted category: (active intents, not yet active, n active)."""
    gap = 40
    cfg = dataclasses.replace(SMALL, n_users=500, heavy_tail=False, cross_domain=False, long_range=long_range,
                              long_range_plant_prob=1.0, long_range_min_gap=gap)
    _, c = columns(cfg, 300_000)
    act = np.isin(c["kind"], ["impression", "view", "like", "share", "comment", "follow"])
    n_seen = [0] * cfg.n_users
    plant_cat = [-1] * cfg.n_users
    plant_n = [0] * cfg.n_users
    state = []  # per impression: 0 no match, 1 match not yet active, 2 match active
    rows = zip(c["user_id"][act].tolist(), c["kind"][act].tolist(), c["category"][act].tolist())
    imp_rows = []
    for i, (u, k, cat) in enumerate(rows):  # replay the documented rule from the events alone
        if k == "impression":
            match = plant_cat[u] == cat
            state.append(0 if not match else (2 if n_seen[u] - plant_n[u] >= gap else 1))
            imp_rows.append(i)
        elif k == "follow":
            plant_cat[u], plant_n[u] = cat, n_seen[u]
        n_seen[u] += 1
    state = np.array(state)
    zv = logit(c["p_conversion"][act][imp_rows] / c["p_click"][act][imp_rows])
    base = zv[state == 0].mean()
    return zv[state == 2].mean() - base, zv[state == 1].mean() - base, int((state == 2).sum())


def test_long_range_intent_switches():
    lift_active, lift_recent, n = _intent_effect(True)
    assert n > 100
    assert abs(lift_active - SMALL.long_range_strength) < 0.4, lift_active
    assert abs(lift_recent) < 0.4, lift_recent  # a recent plant (inside a short window) does nothing yet
    lift_active, lift_recent, _ = _intent_effect(False)
    assert abs(lift_active) < 0.4 and abs(lift_recent) < 0.4


def _interaction_coefs(on: bool) -> np.ndarray:
    """OLS of the click / CVR logits on all main effects plus the documented XOR terms."""
    cfg = dataclasses.replace(SMALL, interactions=on)
    sim, c = columns(cfg, 200_000)
    imp = c["kind"] == "impression"
    age = c["age_bucket"][imp].astype(int)
    fmt = np.array([AD_FORMATS.index(f) for f in c["ad_format"][imp]])
    dev = np.array([DEVICES.index(d) for d in c["device"][imp]])
    ctry = np.array([COUNTRIES.index(x) for x in c["country"][imp]])
    hour = c["hour"][imp].astype(int)
    cat = c["category"][imp]
    surf = np.array([cfg.surfaces.index(s) for s in c["surface"][imp]])

    def onehot(v: np.ndarray, k: int) -> np.ndarray:
        return np.eye(k)[v][:, 1:]

    main = [np.ones((len(age), 1)), onehot(age, 8), onehot(surf * 4 + fmt, 16), onehot(dev, 4), onehot(hour, 24),
            onehot(cat, cfg.n_categories), onehot(ctry, len(COUNTRIES)), onehot(c["advertiser_id"][imp], cfg.n_advertisers)]
    x_afh = AGE_SIGN[age] * FORMAT_SIGN[fmt] * HOUR_SIGN[hour]
    x_dc = DEVICE_SIGN[dev] * sim.cat_sign[cat]
    x_cc = COUNTRY_SIGN[ctry] * sim.cat_sign2[cat]
    X = np.hstack(main + [np.stack([x_afh, x_dc, x_cc], 1)])
    pc, pv = c["p_click"][imp], c["p_conversion"][imp]
    bc = np.linalg.lstsq(X, logit(pc), rcond=None)[0][-3:]
    bv = np.linalg.lstsq(X, logit(pv / pc), rcond=None)[0][-3:]
    return np.array([bc[0], bc[1], bv[2]])


def test_interactions_switch():
    s = SMALL.interactions_strength
    np.testing.assert_allclose(_interaction_coefs(True), [s, s, s], atol=0.08)
    np.testing.assert_allclose(_interaction_coefs(False), [0, 0, 0], atol=0.08)


def _conversion_delays(on: bool) -> np.ndarray:
    cfg = dataclasses.replace(SMALL, delayed_conversions=on, delayed_conversions_strength=5.0, events_per_second=20.0)
    _, c = columns(cfg, 250_000)
    click_ts = dict(zip(c["request_id"][c["kind"] == "click"], c["ts"][c["kind"] == "click"]))
    conv = c["kind"] == "conversion"
    d = c["ts"][conv] - np.array([click_ts[r] for r in c["request_id"][conv]])
    early = np.array([click_ts[r] for r in c["request_id"][conv]]) < c["ts"][0] + 3_600_000
    return d[early] / 1000.0  # seconds, for clicks in the first hour (their conversions are all in the sample)


def test_delayed_conversions_switch():
    d = _conversion_delays(True)
    assert len(d) > 50
    assert 0.6 * 300 < np.median(d) < 1.6 * 300  # median 5 min
    assert (d > 0).all()
    frac = (d <= 300).mean()
    assert abs(frac - conversion_delay_cdf(dataclasses.replace(SMALL, delayed_conversions_strength=5.0), 300.0)) < 0.15
    d = _conversion_delays(False)
    assert len(d) > 50 and (d == 0).all()


def test_cold_start_switch():
    churn = dataclasses.replace(SMALL, n_ads=300, new_ads_per_hour=1_200.0)  # mean lifetime 15 min
    sim, c = columns(churn, 150_000)
    imp = c["kind"] == "impression"
    ads = c["item_id"][imp] - AD_ID_BASE
    table = sim.ad_table()
    assert (ads >= churn.n_ads).sum() > 1_000  # impressions of ads created after the start
    assert len(table["item_id"]) > churn.n_ads + 100
    assert ((table["created_ts"][ads] <= c["ts"][imp]) & (c["ts"][imp] < table["retire_ts"][ads])).all()
    assert (table["retire_ts"] < c["ts"][-1]).sum() > 100  # ads retire
    sim, c = columns(dataclasses.replace(churn, cold_start=False), 150_000)
    ads = c["item_id"][c["kind"] == "impression"] - AD_ID_BASE
    assert ads.max() < churn.n_ads and len(sim.ad_table()["item_id"]) == churn.n_ads
    assert len(np.unique(ads)) > 0.9 * churn.n_ads


def test_heavy_tail_switch():
    def max_over_mean(on: bool) -> float:
        cfg = dataclasses.replace(SMALL, n_users=1_000, heavy_tail=on)
        _, c = columns(cfg, 100_000)
        n = np.bincount(c["user_id"][c["kind"] != "click"], minlength=cfg.n_users)
        return n.max() / n.mean()

    assert max_over_mean(True) > 30
    assert max_over_mean(False) < 2


def test_drift_switch():
    def interests(on: bool) -> tuple[np.ndarray, np.ndarray]:
        cfg = dataclasses.replace(SMALL, n_users=500, heavy_tail=False, drift=on, drift_strength=24.0,
                                  events_per_second=20.0)
        sim = Simulator(cfg)
        for _ in sim.batches(100_000, batch_size=100_000):  # ~1.4 h of event time
            pass
        return Simulator(cfg).u.copy(), sim.u

    u0, u1 = interests(False)
    assert np.array_equal(u0, u1)
    u0, u1 = interests(True)
    corr = (u0 * u1).sum(1) / np.linalg.norm(u0, axis=1) / np.linalg.norm(u1, axis=1)
    assert 0.05 < corr.mean() < 0.6  # exp(-24/day * ~1.3 h) ~ 0.27


@pytest.mark.parametrize("strength", [0.0, 0.6, 1.0])
def test_interest_shift_moves_users_and_categories_by_its_strength(strength):
    # drift off: between the start and the end, only the shift moves the interests
    cfg = dataclasses.replace(SMALL, n_users=3_000, drift=False, events_per_second=100.0, interest_shift_at_s=300.0,
                              interest_shift_strength=strength, category_effect_std=1.0)
    start = Simulator(cfg)
    u0, v0, g0 = start.u.copy(), start.v.copy(), start.cat_effect.copy()
    assert g0.std() > 0.5  # category_effect_std scales the categories' click effects
    sim = Simulator(cfg)
    ts = np.array([e.ts for b in sim.batches(60_000, batch_size=20_000) for e in b])  # ~10 min of event time
    assert sim.shifted_at_ms is not None and ts[0] < sim.shifted_at_ms <= cfg.start_ts_ms + 300_000 + 100_000
    keep = math.sqrt(1 - strength**2)
    for before, after in ((u0, sim.u), (v0, sim.v)):
        corr = float(np.corrcoef(before.ravel(), after.ravel())[0, 1])
        assert corr == pytest.approx(keep, abs=0.02)
        assert after.std() == pytest.approx(1.0, abs=0.03)  # the law stays N(0, I)
    if strength == 0:
        assert np.array_equal(g0, sim.cat_effect)
    else:
        assert not np.allclose(g0, sim.cat_effect)


def test_interest_shift_of_strength_zero_leaves_the_stream_unchanged_and_bad_values_are_refused():
    base = dataclasses.replace(SMALL, n_users=500)
    a = [e for b in Simulator(base).batches(30_000, batch_size=30_000) for e in b]
    b = [e for b in Simulator(dataclasses.replace(base, interest_shift_at_s=60.0, interest_shift_strength=0.0))
         .batches(30_000, batch_size=30_000) for e in b]
    assert a == b
    c = [e for b in Simulator(dataclasses.replace(base, interest_shift_at_s=60.0)).batches(30_000, batch_size=30_000)
         for e in b]
    assert c[:1000] == a[:1000] and c != a  # the same until the shift, not after
    for bad in (dict(interest_shift_strength=1.5), dict(interest_shift_strength=-0.1), dict(category_effect_std=-1.0),
                dict(interest_shift_at_s=-1.0)):
        with pytest.raises(ValueError):
            SimConfig(**bad)


def test_market_drift_is_an_ornstein_uhlenbeck_offset_of_every_click_logit():
    tau = 1800.0
    cfg = dataclasses.replace(SMALL, n_users=500, market_drift_std=0.5, market_drift_tau_s=tau)
    sim = Simulator(cfg)
    t = cfg.start_ts_ms + np.arange(0, 200 * 3600, 60) * 1000  # 200 h, one value per minute
    m = sim.market_offset(t)
    assert m.std() == pytest.approx(0.5, rel=0.15)  # the stationary law N(0, std^2)
    lag = int(tau // 60)
    corr = float(np.corrcoef(m[:-lag], m[lag:])[0, 1])
    assert corr == pytest.approx(math.exp(-1), abs=0.12)  # corr(m(t), m(t + tau)) = 1/e
    # a function of time alone: another simulator asked in another order agrees
    other = Simulator(cfg)
    assert np.array_equal(other.market_offset(t[:100]), m[:100])  # the walk grows on demand ...
    assert np.array_equal(other.market_offset(t[::-1]), m[::-1])  # ... to the same values
    # on the stream: the first events are the same with and without it (its own generator), and
    # each impression's click logit moved by exactly m(ts)
    _, on = columns(cfg, 3_000)
    _, off = columns(dataclasses.replace(cfg, market_drift_std=0.0), 3_000)
    imp = (on["kind"] == "impression") & (off["kind"] == "impression") & (on["ts"] == off["ts"]) \
        & (on["item_id"] == off["item_id"])
    sel = np.flatnonzero(imp)
    assert len(sel) > 20
    d = logit(on["p_click"][sel].astype(np.float64)) - logit(off["p_click"][sel].astype(np.float64))
    np.testing.assert_allclose(d, sim.market_offset(on["ts"][sel]), atol=1e-3)
    assert np.abs(d).max() > 0.01
    assert not sim.market_offset(np.array([], np.int64)).size
    assert np.array_equal(Simulator(SMALL).market_offset(t[:10]), np.zeros(10))
    with pytest.raises(ValueError):
        SimConfig(market_drift_tau_s=0.0)
    with pytest.raises(ValueError):
        SimConfig(market_drift_std=-1.0)
