"""GemModel and baselines: shapes, gradients, determinism, ablations, ESMM, learning."""

from __future__ import annotations

import dataclasses
from dataclasses import replace

import numpy as np
import pytest
import torch
from torchrec import KeyedJaggedTensor

from opengem.model.baselines import BaselineConfig, DCNBaseline, DLRMBaseline
from opengem.model.batch import NONSEQ_KEYS, TABLE_OF, make_kjt, synthetic_batch
from opengem.model.config import GemConfig, gem_last_n, load_gem_config, preset, with_pyramid
from opengem.model.gem import GemModel, n_params
from opengem.model.heads import funnel_logits, funnel_loss, funnel_probs
from opengem.model.optim import SplitOptimizer

TINY = preset("tiny")
AGE = (100, 200)  # how far back the magic item sits
AWKWARD = [0, 1, 16_384, 0, 3, 255, 257]  # empty, one, 16k (truncated), around max_len


def _ablations():
    c = TINY
    return {
        "full": c,
        "target_conditioned": replace(c, seq_conditioning="target"),
        "target_no_interleave": replace(c, seq_conditioning="target", interleave=False),
        "no_search": with_pyramid(c, search_len=0),
        "no_seq": replace(c, use_sequence=False),
        "no_interleave": replace(c, interleave=False),
        "no_pyramid": with_pyramid(c, pyramid=False, max_len=64),
        "shared_head": replace(c, heads=replace(c.heads, per_surface=False)),
        "experts": replace(c, heads=replace(c.heads, n_experts=3)),
        "deep_wukong": replace(c, wukong=replace(c.wukong, n_layers=3)),
        "last50": gem_last_n(c, 50),
    }


def _finite_grads(model):
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("name", list(_ablations()))
def test_forward_backward_awkward_batches(name):
    cfg = _ablations()[name]
    torch.manual_seed(0)
    model = GemModel(cfg)
    for lengths in (AWKWARD, [0], [5]):
        b = synthetic_batch(cfg, lengths, seed=len(lengths))
        loss, logits = model.loss(b)
        assert logits.shape == (len(lengths), 2) and torch.isfinite(logits).all()
        model.zero_grad()
        loss.backward()
        _finite_grads(model)
    emb = model.sparse.ec.embeddings["item"].weight
    assert emb.grad is not None  # the shared item table learns from target and history


@pytest.mark.parametrize("M", [DLRMBaseline, DCNBaseline])
def test_baselines_same_api(M):
    torch.manual_seed(0)
    m = M(BaselineConfig(features=TINY.features, d=8, dense_arch=(16,), over_arch=(16,)))
    b = synthetic_batch(TINY, AWKWARD)
    loss, logits = m.loss(b)
    loss.backward()
    _finite_grads(m)
    p = m.predict(b)
    assert logits.shape == p.shape == (len(AWKWARD), 2) and (p[:, 1] <= p[:, 0]).all()


def test_determinism_under_seed():
    b = synthetic_batch(TINY, AWKWARD, seed=3)
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        m = GemModel(TINY)
        outs.append((m.state_dict(), m(b)))
    (s1, y1), (s2, y2) = outs
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)
    assert torch.equal(y1, y2)
    torch.manual_seed(124)
    assert not torch.equal(GemModel(TINY)(b), y1)


def test_all_optional_parts_off_is_the_plain_non_sequence_path():
    cfg = replace(TINY, use_sequence=False, interleave=False, heads=replace(TINY.heads, per_surface=False))
    torch.manual_seed(0)
    m = GemModel(cfg).eval()
    assert not any(k.startswith(("seq.", "ctx_", "seq_gate")) for k in m.state_dict())
    b = synthetic_batch(cfg, [0, 4, 300], seed=1)
    # Plain path by hand: embeddings ‖ dense tokens -> Wukong -> one head -> ESMM.
    nonseq, _, _ = m.sparse(b, 0)
    x = m.wukong(m.in_norm(torch.cat([nonseq, m.dense(b.dense)], 1)))
    by_hand = funnel_logits(m.heads.towers[0](m.heads.trunk(x.flatten(1))))
    torch.testing.assert_close(m(b), by_hand)
    # History and surface are ignored.
    b2 = dataclasses.replace(b, seq={k: v.flip(0) for k, v in b.seq.items()}, surface_idx=b.surface_idx.flip(0))
    torch.testing.assert_close(m(b2), m(b))


def test_history_beyond_max_len_is_ignored():
    cfg = gem_last_n(TINY, 50)
    torch.manual_seed(0)
    m = GemModel(cfg).eval()
    b = synthetic_batch(cfg, [80, 50], seed=2)
    seq = {k: v.clone() for k, v in b.seq.items()}
    seq["item"][:30] = 1  # the 30 oldest events of row 0 are beyond the last 50
    torch.testing.assert_close(m(dataclasses.replace(b, seq=seq)), m(b))
    seq["item"][40] = 1  # inside the window: matters
    assert not torch.allclose(m(dataclasses.replace(b, seq=seq)), m(b))


def test_esmm_consistency():
    raw = torch.tensor([[0.0, 0.0], [100.0, 100.0], [-100.0, 50.0], [3.0, -40.0], [20.0, 20.0]])
    p = funnel_probs(raw)
    assert (p[:, 1] <= p[:, 0]).all()
    lg = funnel_logits(raw)
    assert torch.isfinite(lg).all()
    torch.testing.assert_close(torch.sigmoid(lg), p, atol=1e-6, rtol=1e-4)
    loss = funnel_loss(lg, torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 0.0], [1.0, 0.0], [1.0, 1.0]]))
    assert torch.isfinite(loss)
    torch.manual_seed(0)
    m = GemModel(TINY)
    p = m.predict(synthetic_batch(TINY, AWKWARD))
    assert ((p >= 0) & (p <= 1)).all() and (p[:, 1] <= p[:, 0]).all()


def test_config_presets_and_toml_table():
    assert n_params(GemModel(TINY))["total"] < 50_000
    cfg = load_gem_config({"d": 16, "wukong": {"n_layers": 3}}, base="tiny")
    assert cfg.d == 16 and cfg.wukong.n_layers == 3 and cfg.wukong.n_fm == TINY.wukong.n_fm
    with pytest.raises(ValueError):
        load_gem_config({"wukong": {"n_layerz": 3}}, base="tiny")
    with pytest.raises(ValueError):  # interleaving needs a Wukong layer per sequence layer
        replace(TINY, wukong=replace(TINY.wukong, n_layers=1))


# --------------------------------------------------------------------------- learning


def _task_batch(cfg: GemConfig, n: int, rng: np.random.Generator, target_key: bool = True):
    """click = parity(user + item) (a pure id interaction); conversion | click = a key item
    sits in the history 100..200 events back (far beyond the recent branch). With
    ``target_key`` the key item is the target ad itself (the simulator's long-range intent
    is target-matched too), else one fixed item whatever the ad."""
    fc = cfg.features
    L = 200
    user, item = rng.integers(0, 6, n), rng.integers(0, 6, n)
    click = ((user + item) % 2).astype(np.float32)
    magic = rng.random(n) < 0.5
    b = synthetic_batch(cfg, [L] * n, seed=int(rng.integers(1 << 30)))
    cols = {k: np.ones(n, np.int64) for k in NONSEQ_KEYS}  # other ids: constant
    cols["user_id"], cols["item_id"] = 10 + user, 10 + item
    seq = {k: v.clone() for k, v in b.seq.items()}
    hist = seq["item"].view(n, L)
    hist[hist < 20] += 20  # neither key row appears by chance
    age = rng.integers(*AGE, n)
    rows = np.flatnonzero(magic)
    key = torch.from_numpy(10 + item[rows]) if target_key else 3
    hist[rows, L - 1 - age[rows]] = key
    labels = torch.from_numpy(np.stack([click, click * magic], 1).astype(np.float32))
    return dataclasses.replace(
        b, sparse=make_kjt(cols), dense=torch.zeros_like(b.dense), seq=seq, labels=labels, surface_idx=b.surface_idx * 0
    ).validate(fc)


def _train(cfg, steps=150, seed=0, target_key=True):
    """Online training on fresh batches with the trainer's optimizer split (Adagrad on the
    tables, Adam on the rest); per-task BCE on a held-out batch before and after."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    test = _task_batch(cfg, 256, rng, target_key)
    m = GemModel(cfg)
    opt = SplitOptimizer(m, lr=3e-3, emb_lr=0.05)

    def per_task():
        with torch.no_grad():
            return torch.nn.functional.binary_cross_entropy_with_logits(m(test), test.labels, reduction="none").mean(0)

    before = per_task()
    for _ in range(steps):  # a fresh batch every step, as in the online trainer
        loss, _ = m.loss(_task_batch(cfg, 64, rng, target_key))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return before, per_task()


def test_tiny_model_learns_id_interaction():
    before, after = _train(TINY)
    # click = parity(user + item), an XOR-like interaction: from ~ln 2 to near 0
    assert before[0] > 0.6 and after[0] < 0.1, (before, after)


def test_tiny_model_learns_far_history_item():
    # conversion | click: the target ad 100..200 events back. Without it the best possible
    # is ~0.35 (half of the clicks convert); the search branch finds it at any age.
    before, after = _train(TINY, steps=400)
    assert before[1] > 0.4 and after[1] < 0.15, (before, after)


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="a key item unrelated to the ad, among 200 random ones, reaches the "
                   "summary with weight ~1/L through chunk means and attention; 400 steps are not enough")
def test_tiny_model_learns_far_history_item_unrelated_to_the_ad():
    before, after = _train(TINY, steps=400, target_key=False)
    assert after[1] < 0.15, (before, after)


@pytest.mark.parametrize("mode", ["user", "target"])
@pytest.mark.parametrize("interleave", [True, False])
def test_encode_user_once_equals_represent_per_row(mode, interleave):
    """One user's encoding shared by B candidates == represent() of B rows that each carry the
    history (the trainer's batch): the split is the model's own, not a serving copy."""
    cfg = replace(TINY, seq_conditioning=mode, interleave=interleave)
    torch.manual_seed(0)
    m = GemModel(cfg).eval()
    B, L = 7, 300
    hist = synthetic_batch(cfg, [L], seed=1)
    cands = synthetic_batch(cfg, [0] * B, seed=2)
    cols = {k: cands.sparse[k].values().clone() for k in NONSEQ_KEYS}
    for k in ("user_id", "age_bucket", "country", "device", "hour", "surface"):
        cols[k][:] = hist.sparse[k].values()[0]
    cols["item_id"][:3] = hist.seq["item"][[-1, -50, -299]]  # matched in the history: the search branch works
    cols["category"][3] = hist.seq["category"][-2]
    cands = dataclasses.replace(cands, sparse=make_kjt(cols), surface_idx=hist.surface_idx.repeat(B))
    rep = dataclasses.replace(cands, seq_lengths=torch.full((B,), L), seq={k: v.repeat(B) for k, v in hist.seq.items()})
    with torch.no_grad():
        shared = m.candidate_logits(m.encode_user(hist), cands)
        torch.testing.assert_close(shared, m.raw_logits(rep), atol=1e-6, rtol=0)
        assert shared[:, 0].std() > 0


def test_user_mode_encoding_never_sees_the_candidate():
    """seq_conditioning="user": the pyramid's summaries and tokens are the same whatever the ad
    (so a server computes them once); "target": they are not."""
    b = synthetic_batch(TINY, [200, 200], seed=4)
    seq = {k: v[:200].repeat(2) for k, v in b.seq.items()}  # the same history in both rows
    cols = {k: b.sparse[k].values().clone() for k in NONSEQ_KEYS}
    for k in ("user_id", "age_bucket", "country", "device", "hour", "surface"):
        cols[k][1] = cols[k][0]  # the same user and request; item / advertiser / category differ
    b = dataclasses.replace(b, seq=seq, sparse=make_kjt(cols), dense=b.dense[:1].repeat(2, 1))
    for mode in ("user", "target"):
        torch.manual_seed(0)
        m = GemModel(replace(TINY, seq_conditioning=mode)).eval()
        with torch.no_grad():
            u = m.encode_user(b)
            if mode == "user":
                for s, (k, _) in zip(u.summaries, u.keys):
                    torch.testing.assert_close(s[0], s[1])
                    torch.testing.assert_close(k[0], k[1])
                assert len(u.summaries) == TINY.pyramid.n_layers
            else:
                assert u.summaries == [] and u.state is not None
            out = m.raw_logits(b)
            assert not torch.allclose(out[0], out[1])  # the ads still get different scores


def test_target_match_levels():
    from opengem.model.gem import target_match, truncate_recent

    b = synthetic_batch(TINY, [3, 0, 2], seed=5)
    cols = {k: np.ones(3, np.int64) for k in NONSEQ_KEYS}
    cols["item_id"], cols["advertiser_id"], cols["category"] = [7, 7, 9], [5, 5, 0], [4, 4, 4]
    seq = {k: torch.full_like(v, 2) for k, v in b.seq.items()}
    seq["item"][:] = torch.tensor([7, 8, 8, 9, 8])
    seq["advertiser"][:] = torch.tensor([5, 5, 6, 0, 0])
    seq["category"][:] = torch.tensor([4, 3, 4, 4, 0])
    b = dataclasses.replace(b, sparse=make_kjt(cols), seq=seq).validate(TINY.features)
    idx, _, mask = truncate_recent(b.seq_lengths, 256)
    m = target_match(b, idx, mask)
    # row 0: item > advertiser > category; row 2: item match, then nothing (missing ids never match)
    assert m.tolist() == [[3, 2, 1], [0, 0, 0], [0, 3, 0]]
    assert m[2, 2] == 0 and m[1].sum() == 0


@pytest.mark.parametrize("seed", range(6))
def test_shared_history_match_join_equals_the_dense_compare(seed):
    """A server's B candidates against one history take the sort-merge join; it must select the
    same events at the same levels in the same order as B x L compares (the training path)."""
    from opengem.model import gem as G

    rng = np.random.default_rng(seed)
    L = int(rng.choice([1, 7, 300, 1024]))
    n_ids = int(rng.choice([2, 5, 40]))  # few ids: many ties, many matches per candidate
    hist = synthetic_batch(TINY, [L], seed=seed)
    seq = {k: torch.as_tensor(rng.integers(0, n_ids, L), dtype=torch.int64) for k in hist.seq}
    hist = dataclasses.replace(hist, seq=seq)
    B = int(rng.choice([2, 3, 50, 500]))
    cols = {k: np.ones(B, np.int64) for k in NONSEQ_KEYS}
    for key in ("item_id", "advertiser_id", "category"):
        cols[key] = rng.integers(0, n_ids + 2, B)  # 0 = missing; some ids the history lacks
    targets = make_kjt(cols)
    for max_len, k in ((1024, 32), (64, 4), (1024, 1), (5, 300)):
        idx, _, mask = G.truncate_recent(hist.seq_lengths, max_len)
        got = G.match_positions(hist, idx, mask, targets, k)
        want = _dense_match(G, hist, idx, mask, targets, k)
        assert got[3] == want[3]
        for g, w in zip(got[:3] + got[4:], want[:3] + want[4:]):
            assert torch.equal(g, w)
        if got[0].numel():
            lv = G.target_match(hist, idx, mask, targets)  # (B, L)
            assert torch.equal(lv[got[0], got[1]], got[4]) and bool((got[4] > 0).all())


def _dense_match(G, hist, idx, mask, targets, k):
    """The B x L compare of match_positions, whatever the number of history rows."""
    ids, hm = G._history_ids(hist, idx, mask)
    tg = {key: G.first_ids(targets, key) for _, key in G.MATCH_KEYS}
    hit = None
    for seq_key, key in G.MATCH_KEYS:
        t = tg[key][:, None]
        h = (ids[seq_key] == t) & (t > 0)
        hit = h if hit is None else hit | h
    b, l, pos, K = G.recent_positions(hit & hm, k)
    level = torch.zeros_like(b)
    for lv, (seq_key, key) in enumerate(G.MATCH_KEYS, start=1):
        t = tg[key][b]
        level = torch.where((ids[seq_key][torch.zeros_like(b), l] == t) & (t > 0), lv, level)
    return b, l, pos, K, level


def test_candidates_of_one_request_reuse_the_users_tokens():
    """score_candidates on a 1-row encoding looks up only the ad's ids and repeats the user's
    tokens: bit for bit the full lookup; candidates carrying another user's ids get the full one."""
    torch.manual_seed(0)
    m = GemModel(TINY).eval()
    hist = synthetic_batch(TINY, [120], seed=1)
    cands = synthetic_batch(TINY, [0] * 5, seed=2)
    cols = {k: cands.sparse[k].values().clone() for k in NONSEQ_KEYS}
    for k in ("user_id", "age_bucket", "country", "device", "hour", "surface"):
        cols[k][:] = hist.sparse[k].values()[0]
    same = dataclasses.replace(cands, sparse=make_kjt(cols), surface_idx=hist.surface_idx.repeat(5))
    with torch.no_grad():
        u = m.encode_user(hist)
        got = m._shared_nonseq(u, same)
        assert got is not None and torch.equal(got, m.sparse(same, 0)[0])
        cols["device"][2] = (cols["device"][2] + 1) % TINY.features.rows(TABLE_OF["device"])
        other = dataclasses.replace(same, sparse=make_kjt(cols))
        assert m._shared_nonseq(u, other) is None  # falls back to the full lookup
        assert m._shared_nonseq(m.encode_user(synthetic_batch(TINY, [50, 60], seed=3)), same) is None


def test_strong_search_slots_reach_an_old_conversion_past_the_recent_matches():
    """search_strong: the most recent matching conversion / click / follow gets a slot even when
    search_len more recent matches (views) came after it; the union keeps recency order."""
    from opengem.model.gem import match_positions, strong_kind_rows, truncate_recent
    from opengem.model.batch import ids_to_rows
    from opengem.stream.events import KIND_INDEX

    fc = TINY.features
    L, cat = 120, 5
    hist = synthetic_batch(TINY, [L], seed=3)
    seq = {k: v.clone() for k, v in hist.seq.items()}
    view, conv = (int(ids_to_rows("seq_kind", np.array([KIND_INDEX[x]]), fc)[0]) for x in ("view", "conversion"))
    seq["kind"][:] = view
    seq["category"][:] = cat + 1
    seq["category"][-40:] = cat  # 40 recent views of the category
    seq["category"][10] = cat
    seq["kind"][10] = conv  # one old conversion of the category
    hist = dataclasses.replace(hist, seq=seq)
    cols = {k: torch.zeros(3, dtype=torch.int64) + hist.sparse[k].values()[0] for k in NONSEQ_KEYS}
    cols["category"][:] = torch.tensor([cat, cat, cat + 2])  # two ads of the category, one of none of it
    cols["item_id"][:] = 0
    cols["advertiser_id"][:] = 0
    targets = make_kjt(cols)
    idx, _, mask = truncate_recent(hist.seq_lengths, L)
    rows = strong_kind_rows(fc)
    b0, l0, p0, K0, _ = match_positions(hist, idx, mask, targets, 16)
    assert 10 not in l0.tolist() and K0 == 16
    b, l, pos, K, lev = match_positions(hist, idx, mask, targets, 16, 4, rows)
    assert K == 17 and set(b.tolist()) == {0, 1}
    for r in (0, 1):
        lr, pr = l[b == r], pos[b == r]
        assert lr.tolist() == [10] + list(range(L - 16, L))  # the old conversion first, then the recent 16
        assert pr.tolist() == list(range(17))
    # the shared-history (server) path gives the same selection as rows that carry the history
    rep = dataclasses.replace(hist, seq_lengths=hist.seq_lengths.repeat(3),
                              seq={k: v.repeat(3) for k, v in hist.seq.items()},
                              sparse=targets, dense=hist.dense.repeat(3, 1), surface_idx=hist.surface_idx.repeat(3),
                              labels=hist.labels.repeat(3, 1))
    idx3, _, mask3 = truncate_recent(rep.seq_lengths, L)
    got = match_positions(rep, idx3, mask3, targets, 16, 4, rows)
    for x, y in zip(got[:3] + got[4:], (b, l, pos, lev)):
        torch.testing.assert_close(x, y)
    assert got[3] == K


def test_encode_user_once_equals_represent_per_row_with_strong_search_slots():
    cfg = replace(TINY, pyramid=replace(TINY.pyramid, search_strong=4))
    torch.manual_seed(0)
    m = GemModel(cfg).eval()
    B, L = 5, 300
    hist = synthetic_batch(cfg, [L], seed=1)
    cands = synthetic_batch(cfg, [0] * B, seed=2)
    cols = {k: cands.sparse[k].values().clone() for k in NONSEQ_KEYS}
    for k in ("user_id", "age_bucket", "country", "device", "hour", "surface"):
        cols[k][:] = hist.sparse[k].values()[0]
    cols["category"][:] = hist.seq["category"][[-1, -50, -120, -200, -299]]
    cands = dataclasses.replace(cands, sparse=make_kjt(cols), surface_idx=hist.surface_idx.repeat(B))
    rep = dataclasses.replace(cands, seq_lengths=torch.full((B,), L), seq={k: v.repeat(B) for k, v in hist.seq.items()})
    with torch.no_grad():
        shared = m.candidate_logits(m.encode_user(hist), cands)
        torch.testing.assert_close(shared, m.raw_logits(rep), atol=1e-6, rtol=0)
    assert "_strong_rows" not in m.state_dict()


@pytest.mark.parametrize("n_events", [0, 1, 120, 255, 256, 257, 16_384])
def test_one_row_lookup_equals_the_torchrec_path(n_events):
    """A 1-row batch without autograd (a server's user) reads the tables directly: bit for bit
    what the EmbeddingBagCollection / EmbeddingCollection path returns, for histories that are
    empty, one event, below, at and above max_len; with autograd on, and for batches it does not
    cover (a key with two ids), the TorchRec path runs."""
    torch.manual_seed(0)
    m = GemModel(TINY).eval()
    hist = synthetic_batch(TINY, [n_events], seed=n_events)
    max_len = TINY.pyramid.max_len
    with torch.no_grad():
        fast = m.sparse._one_row(hist, max_len)
        assert fast is not None
        torch.set_grad_enabled(True)
        try:
            ref = m.sparse(hist, max_len)  # autograd on: the TorchRec path
        finally:
            torch.set_grad_enabled(False)
        assert len(fast) == len(ref) == 3
        for a, b in zip(fast, ref):
            assert a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b.detach())
        assert torch.equal(m.sparse(hist, 0)[0], ref[0].detach()) and m.sparse(hist, 0)[1] is None
        cols = {k: hist.sparse[k].values().clone() for k in NONSEQ_KEYS}
        vals = [cols[k] if k != "hour" else torch.cat([cols[k], cols[k]]) for k in NONSEQ_KEYS]
        two = dataclasses.replace(hist, sparse=KeyedJaggedTensor.from_lengths_sync(
            keys=list(NONSEQ_KEYS), values=torch.cat(vals),
            lengths=torch.tensor([2 if k == "hour" else 1 for k in NONSEQ_KEYS])))
        assert m.sparse._one_row(two, max_len) is None
        enc_fast = m.encode_user(hist)
        torch.set_grad_enabled(True)
        try:
            enc_ref = m.encode_user(hist)
        finally:
            torch.set_grad_enabled(False)
        assert all(torch.equal(a, b.detach()) for a, b in zip(enc_fast.summaries, enc_ref.summaries))
