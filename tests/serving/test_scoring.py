"""Featurize + score without gRPC: parity with the trainer's path, cold start, validation, canary."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from opengem.features.memory import MemorySequenceStore
from opengem.model.baselines import BaselineConfig, DLRMBaseline
from opengem.model.config import preset
from opengem.model.data import examples_batch
from opengem.model.gem import GemModel
from opengem.model.registry import LoadedModel
from opengem.serving.scoring import (
    AdCandidate, RankQuery, RequestError, Scorer, canary_check, candidate_examples, featurize, validate,
)
from opengem.stream.events import AD_FORMATS
from opengem.stream.simulator import SimConfig, Simulator

# float32 forward passes over differently shaped batches: equal up to rounding.
ATOL = 1e-6


@pytest.fixture(scope="module")
def store():
    s = MemorySequenceStore()
    events = [e for b in Simulator(SimConfig(seed=3, n_users=40)).batches(12_000) for e in b]
    s.apply(events, (0, 0))
    s.events = events  # for the tests' choice of users / ads
    return s


def _loaded(model: torch.nn.Module, kind: str) -> LoadedModel:
    return LoadedModel(version="test", kind=kind, model=model.eval(), meta={}, path=None)  # type: ignore[arg-type]


def _models():
    torch.manual_seed(0)
    tiny = preset("tiny")
    assert tiny.seq_conditioning == "user"
    yield "gem", GemModel(tiny)
    yield "gem-no-interleave", GemModel(dataclasses.replace(tiny, interleave=False))
    yield "gem-target", GemModel(dataclasses.replace(tiny, seq_conditioning="target"))
    yield "gem-target-no-interleave", GemModel(dataclasses.replace(tiny, seq_conditioning="target", interleave=False))
    yield "dlrm", DLRMBaseline(BaselineConfig(features=tiny.features, d=8, dense_arch=(16,), over_arch=(16,)))


def _query(store, user: int, n: int = 9, **kw) -> RankQuery:
    ads = sorted({e.item_id for e in store.events if e.is_ad})
    new_ad = 10**12 + 7  # never seen: cold start
    cands = tuple(AdCandidate(ad_id=a) for a in ads[:n - 1]) + (AdCandidate(ad_id=new_ad, bid=2.0),)
    ts = max(e.ts for e in store.events) + 1
    return RankQuery(user_id=user, surface="feed", candidates=cands, ts_ms=ts, **kw)


@pytest.mark.parametrize("name,model", list(_models()), ids=lambda v: v if isinstance(v, str) else "")
def test_served_scores_equal_the_trainers_predict(store, name, model):
    heavy = max({e.user_id for e in store.events}, key=lambda u: sum(e.user_id == u for e in store.events))
    kind = "dlrm" if name == "dlrm" else "gem"
    scorer = Scorer(_loaded(model, kind))
    assert scorer.shared == (kind == "gem")  # GEM goes through encode_user + candidate_logits
    for user in (heavy, 999_999_999):  # a user with a long history, one never seen
        q = _query(store, user, hour=5)
        examples = candidate_examples(q, store)
        got = scorer.probs(featurize(q, store, model.cfg))
        with torch.inference_mode():
            want = model.predict(examples_batch(examples, store, model.cfg))
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
        assert got.shape == (len(examples), 2) and (got[:, 1] <= got[:, 0]).all()
        assert got[:, 0].std() > 0  # candidates are told apart


def test_columnar_featurization_equals_the_trainers_batch(store):
    """featurize's candidate rows == examples_batch's rows, id for id and counter for counter
    (bit-exact: no tolerance), with attributes from the request, from the store and unknown."""
    cfg = preset("tiny")
    heavy = max({e.user_id for e in store.events}, key=lambda u: sum(e.user_id == u for e in store.events))
    ads = [e for e in store.events if e.is_ad]
    seen = list(dict.fromkeys(e.item_id for e in reversed(ads) if e.user_id == heavy))[:6]  # recent in its history
    cands = tuple(AdCandidate(ad_id=a) for a in seen) + (
        AdCandidate(ad_id=seen[0], category=3), AdCandidate(ad_id=seen[1], advertiser_id=10**9, ad_format="video"),
        AdCandidate(ad_id=10**13), AdCandidate(ad_id=ads[0].item_id, advertiser_id=ads[0].advertiser_id,
                                               category=ads[0].category, ad_format=AD_FORMATS[1]))
    for user, kw in ((heavy, dict(hour=5)), (heavy, dict(country="DE", device=None, age_bucket=2)),
                     (999_999_999, {})):
        q = RankQuery(user_id=user, surface="stories", candidates=cands, ts_ms=max(e.ts for e in store.events) + 1,
                      **kw)
        rb = featurize(q, store, cfg)
        want = examples_batch(candidate_examples(q, store), store, cfg)
        assert torch.equal(rb.cands.sparse.values(), want.sparse.values())
        assert torch.equal(rb.cands.sparse.lengths(), want.sparse.lengths())
        assert torch.equal(rb.cands.dense, want.dense)
        assert torch.equal(rb.cands.surface_idx, want.surface_idx)
        rep = rb.replicated()
        assert torch.equal(rep.seq_lengths, want.seq_lengths)
        assert all(torch.equal(rep.seq[k], want.seq[k]) for k in want.seq)
        if user == heavy:
            assert (rb.cands.dense[:len(seen), -3] > 0).all()  # they met these ads before


def test_history_is_read_once_and_shared(store):
    model = GemModel(preset("tiny")).eval()
    calls = []

    class Counting:
        def __getattr__(self, k):
            return getattr(store, k)

        def read_batch(self, uids, **kw):
            calls.append(len(uids))
            return store.read_batch(uids, **kw)

    user = store.events[-1].user_id
    rb = featurize(_query(store, user), Counting(), model.cfg)
    assert calls == [1]
    assert len(rb.user) == 1 and rb.history_events > 0 and len(rb.cands) == 9
    assert int(rb.cands.seq_lengths.sum()) == 0
    # the candidate-dependent dense features differ between a seen ad and a new one
    assert Scorer(_loaded(model, "gem")).shared


def test_attributes_come_from_the_store_when_left_out(store):
    ad_ev = next(e for e in reversed(store.events) if e.is_ad and e.advertiser_id is not None)
    user_ev = next(e for e in reversed(store.events) if e.country is not None and e.device is not None)
    q = RankQuery(user_id=user_ev.user_id, surface="reels", ts_ms=user_ev.ts + 1,
                  candidates=(AdCandidate(ad_id=ad_ev.item_id), AdCandidate(ad_id=ad_ev.item_id, category=3),
                              AdCandidate(ad_id=10**15)))
    ex = candidate_examples(q, store)
    itf = store.item_features([ad_ev.item_id])
    assert ex[0].advertiser_id == int(itf.advertiser_id[0]) and ex[0].ad_format == AD_FORMATS[itf.ad_format[0]]
    assert ex[1].category == 3  # the request wins
    assert ex[2].advertiser_id is None and ex[2].category is None and ex[2].ad_format is None  # new ad
    uf = store.user_features([user_ev.user_id])
    assert ex[0].country is not None and ex[0].device is not None and uf.n_events[0] > 0
    assert all(e.surface == "reels" and e.ts == user_ev.ts + 1 and e.click == 0 for e in ex)


@pytest.mark.parametrize("change,msg", [
    (dict(surface="tv"), "unknown surface"),
    (dict(candidates=()), "no candidates"),
    (dict(candidates=(AdCandidate(ad_id=-1),)), "ad_id=-1"),
    (dict(candidates=(AdCandidate(ad_id=1, ad_format="gif"),)), "ad_format"),
    (dict(candidates=(AdCandidate(ad_id=1, bid=float("nan")),)), "bid"),
    (dict(candidates=(AdCandidate(ad_id=1),) * 11), "exceed the limit of 10"),
    (dict(user_id=-5), "user_id"),
    (dict(tasks=("like",)), "unknown task"),
    (dict(value_task="install"), "unknown task"),
    (dict(country="usa"), "country"),
    (dict(hour=24), "hour"),
    (dict(ts_ms=5), "ts_ms"),
    (dict(ts_ms=4_000_000_000_000), "ts_ms"),
])
def test_validation_names_the_problem(change, msg):
    q = RankQuery(user_id=1, surface="feed", candidates=(AdCandidate(ad_id=1),), ts_ms=1_700_000_000_000)
    kw = dict(surfaces=("feed", "reels"), tasks=("click", "conversion"), max_candidates=10, now_ms=1_700_000_000_000)
    validate(q, **kw)
    with pytest.raises(RequestError, match=msg):
        validate(dataclasses.replace(q, **change), **kw)


def _scalar_rules(cands) -> str | None:
    """validate's per-candidate rules, one candidate at a time (what the columnar check must
    agree with): the message of the first refused candidate, None if all pass."""
    for i, c in enumerate(cands):
        for name, v, hi in (("ad_id", c.ad_id, 2**63 - 1), ("advertiser_id", c.advertiser_id, 2**63 - 1),
                            ("category", c.category, 2**31 - 1)):
            if v is not None and not 0 <= v <= hi:
                return f"candidates[{i}].{name}"
        if c.ad_format is not None and c.ad_format not in AD_FORMATS:
            return f"candidates[{i}].ad_format"
        if not (np.isfinite(c.bid) and c.bid >= 0):
            return f"candidates[{i}].bid"
    return None


def test_columnar_candidate_checks_refuse_the_first_bad_candidate_as_the_rules_do():
    """validate checks the candidates as columns; it must refuse exactly what the per-candidate
    rules refuse and name the same (first) candidate and field, whatever else is wrong later."""
    rng = np.random.default_rng(0)
    kw = dict(surfaces=("feed",), tasks=("click", "conversion"), max_candidates=1000, now_ms=1_700_000_000_000)
    bad_values = [("ad_id", -3), ("ad_id", 2**63), ("advertiser_id", -1), ("advertiser_id", 2**64),
                  ("category", 2**31), ("category", -7), ("ad_format", "gif"), ("bid", float("inf")),
                  ("bid", -0.5), ("bid", float("nan"))]
    for trial in range(60):
        n = int(rng.integers(1, 300))
        cands = [AdCandidate(ad_id=int(rng.integers(0, 10**12)),
                             advertiser_id=None if rng.random() < 0.5 else int(rng.integers(0, 10**6)),
                             category=None if rng.random() < 0.5 else int(rng.integers(0, 2**31)),
                             ad_format=None if rng.random() < 0.5 else AD_FORMATS[int(rng.integers(0, len(AD_FORMATS)))],
                             bid=float(rng.random() * 3)) for _ in range(n)]
        for _ in range(int(rng.integers(0, 3))):  # 0, 1 or 2 bad fields anywhere
            field, value = bad_values[int(rng.integers(0, len(bad_values)))]
            i = int(rng.integers(0, n))
            cands[i] = cands[i]._replace(**{field: value})
        q = RankQuery(user_id=1, surface="feed", candidates=tuple(cands), ts_ms=1_700_000_000_000)
        want = _scalar_rules(cands)
        if want is None:
            validate(q, **kw)
            c = q.columns
            assert c.ad_id.tolist() == [x.ad_id for x in cands]
            assert c.advertiser_id.tolist() == [-1 if x.advertiser_id is None else x.advertiser_id for x in cands]
            assert c.bid.tolist() == [x.bid for x in cands]
            assert c.given.tolist() == [(x.advertiser_id is not None) + 2 * (x.category is not None)
                                        + 4 * (x.ad_format is not None) for x in cands]
        else:
            with pytest.raises(RequestError) as e:
                validate(q, **kw)
            assert str(e.value).startswith(want + "="), (str(e.value), want)


def test_columnar_candidate_checks_take_numpy_numbers_and_refuse_bools():
    """In-process callers may build candidates from NumPy arrays: their integers and floats are
    values like any other (the per-candidate path took them); a bool is not an id."""
    kw = dict(surfaces=("feed",), tasks=("click", "conversion"), max_candidates=10, now_ms=1_700_000_000_000)
    ids = np.array([5, 7], np.int64)
    cands = (AdCandidate(ad_id=ids[0], advertiser_id=np.int32(3), bid=np.float32(1.5)),
             AdCandidate(ad_id=ids[1], category=np.uint16(4), bid=np.float64(2.0)))
    q = RankQuery(user_id=1, surface="feed", candidates=cands, ts_ms=1_700_000_000_000)
    validate(q, **kw)
    assert q.columns.ad_id.tolist() == [5, 7] and q.columns.bid.tolist() == [1.5, 2.0]
    assert q.columns.advertiser_id.tolist() == [3, -1] and q.columns.category.tolist() == [-1, 4]
    for bad, msg in ((AdCandidate(ad_id=True), r"candidates\[1\]\.ad_id=True is not an integer"),
                     (AdCandidate(ad_id=2, category=3.0), r"candidates\[1\]\.category=3\.0 is not an integer"),
                     (AdCandidate(ad_id=None), r"candidates\[1\]\.ad_id is required"),
                     (AdCandidate(ad_id=2, bid="1"), r"candidates\[1\]\.bid='1' is not a number")):
        with pytest.raises(RequestError, match=msg):
            validate(dataclasses.replace(q, candidates=(cands[0], bad)), **kw)


def test_canary_rejects_a_model_with_nan_weights():
    model = GemModel(preset("tiny")).eval()
    canary_check(Scorer(_loaded(model, "gem")))
    with torch.no_grad():
        model.heads.towers[0][0].weight.fill_(float("nan"))
    with pytest.raises(ValueError, match="finite"):
        canary_check(Scorer(_loaded(model, "gem")))


def test_canary_falls_back_to_predict_when_shared_path_disagrees(monkeypatch):
    import opengem.serving.scoring as sc

    model = GemModel(preset("tiny")).eval()
    scorer = Scorer(_loaded(model, "gem"))
    real = sc.shared_logits
    monkeypatch.setattr(sc, "shared_logits", lambda m, u, c: real(m, u, c) + 0.5)
    canary_check(scorer)
    assert not scorer.shared  # and it now scores through predict:
    q = RankQuery(user_id=3, surface="feed", candidates=(AdCandidate(ad_id=1), AdCandidate(ad_id=2)), ts_ms=2**40)
    store = MemorySequenceStore()
    rb = featurize(q, store, model.cfg)
    with torch.inference_mode():
        torch.testing.assert_close(scorer.probs(rb), model.predict(rb.replicated()))
    assert np.isfinite(scorer.probs(rb).numpy()).all()


def test_serve_threads_setting():
    """[serve] threads (torch intra-op threads of the daemon): one by default, negative refused."""
    from opengem.serving.config import ServeConfig

    assert ServeConfig().threads == 1
    with pytest.raises(ValueError, match="threads"):
        ServeConfig(threads=-1)


def _ad_event(user: int, ts: int, item: int, category: int, offset: int) -> dict:
    return {"user_id": np.array([user]), "ts": np.array([ts]), "item_id": np.array([item]),
            "surface": np.array(["feed"]), "kind": np.array(["impression"]), "category": np.array([category]),
            "advertiser_id": np.array([item % 7]), "ad_format": np.array([AD_FORMATS[item % 4]]),
            "device": np.array(["ios"]), "country": np.array(["US"]), "age_bucket": np.array([3])}


@pytest.mark.parametrize("sharded", [False, True])
def test_item_attribute_cache_follows_the_store(tmp_path, sharded):
    """The ranker's ad-attribute cache answers what the reader answers: a cached ad whose
    category changes in the store (latest value wins) is read anew once the reader has caught
    up, and an ad the store never saw stays unknown until it appears."""
    from opengem.features.sharded import ShardedReader, shard_dir
    from opengem.features.store import SequenceStore, StoreConfig
    from opengem.serving.scoring import ItemAttributeCache, attributes, data_version

    path = shard_dir(tmp_path, "opengem.events", 0) / "store"
    path.parent.mkdir(parents=True)
    writer = SequenceStore(str(path), StoreConfig(sync=False))
    writer.apply(_ad_event(1, 1_700_000_000_000, 11, 5, 0), (0, 0))
    writer.flush()
    reader = (ShardedReader(tmp_path, 1, secondary_root=tmp_path / "readers") if sharded
              else SequenceStore.open_reader(str(path), str(tmp_path / "secondary")))
    cache = ItemAttributeCache(reader)
    q = RankQuery(user_id=1, surface="feed", ts_ms=1_700_000_100_000,
                  candidates=(AdCandidate(ad_id=11), AdCandidate(ad_id=12), AdCandidate(ad_id=11, category=9)))
    assert data_version(reader) is not None
    for _ in range(2):  # the second time from the cache
        a = attributes(q, reader, cache)
        assert a.category.tolist() == [5, -1, 9] and a.advertiser_id.tolist() == [11 % 7, -1, 11 % 7]
    assert cache.hits == cache.misses == 3  # the second call asked the store for nothing
    writer.apply(_ad_event(2, 1_700_000_001_000, 11, 6, 1), (0, 1))  # ad 11 moves to category 6
    writer.apply(_ad_event(2, 1_700_000_002_000, 12, 8, 2), (0, 2))  # ad 12 appears
    writer.flush()
    assert attributes(q, reader, cache).category.tolist() == [5, -1, 9]  # not caught up yet: as the reader
    reader.catch_up()
    want = attributes(q, reader)  # straight from the store
    got = attributes(q, reader, cache)
    assert got.category.tolist() == want.category.tolist() == [6, 8, 9]
    assert got.ad_format.tolist() == want.ad_format.tolist()
    reader.close()
    writer.close()


def test_bf16_precision_scores_close_to_fp32_and_canary_bounds_it(store, monkeypatch):
    """[serve] precision = "bf16": the FM MLPs in bfloat16; the canary measures how far that
    moves its scores from the same version's fp32 ones (precision_error), keeps the structural
    checks in fp32, and serves the version in fp32 past BF16_MAX_ERROR. "auto" asks the CPU."""
    import opengem.serving.scoring as sc
    from opengem.serving.config import ServeConfig

    torch.manual_seed(0)
    model = GemModel(preset("tiny")).eval()
    exact = Scorer(_loaded(model, "gem"))
    assert exact.precision == "fp32"
    heavy = max({e.user_id for e in store.events}, key=lambda u: sum(e.user_id == u for e in store.events))
    rb = featurize(_query(store, heavy, hour=5), store, model.cfg)
    want = exact.probs(rb)
    low = Scorer(_loaded(model, "gem"), precision="bf16")  # (the same module: now bf16)
    canary_check(low)
    assert low.precision == "bf16" and low.shared and 0 < low.precision_error <= sc.BF16_MAX_ERROR
    got = low.probs(rb)
    assert not torch.equal(got, want)
    torch.testing.assert_close(got, want, atol=sc.BF16_MAX_ERROR, rtol=0)
    monkeypatch.setattr(sc, "BF16_MAX_ERROR", 0.0)
    again = Scorer(_loaded(model, "gem"), precision="bf16")
    canary_check(again)
    assert again.precision == "fp32" and again.precision_error > 0
    torch.testing.assert_close(again.probs(rb), want, atol=ATOL, rtol=0)  # served in fp32 now
    assert sc.resolve_precision("auto") == ("bf16" if sc.amx_bf16() else "fp32")
    assert ServeConfig().precision == "fp32"
    with pytest.raises(ValueError, match="precision"):
        ServeConfig(precision="fp16")
    with pytest.raises(ValueError, match="precision"):
        Scorer(_loaded(model, "gem"), precision="fp16")
