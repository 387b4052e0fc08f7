"""GemModel: SparseArch + DenseArch -> InterFormer-interleaved Pyramid / Wukong -> heads.

::

    batch.sparse (KJT) ──► SparseArch ──► non-seq tokens (B, F, d) ─┐
    batch.dense ─────────► DenseArch ───► dense tokens (B, n_dt, d) ┴► X (B, n0, d)
    batch.seq (jagged) ──► SparseArch ──► events (B, L, d) + mask ──► PyramidArch
    for layer i (InterFormer):
        ctx_i = ...                                            non-seq -> sequence
        state, S_i = pyramid.layer(i, state, ctx_i)           S_i: (B, n_s, d)
        X = wukong.layers[i](X ‖ gate ⊙ S_i ‖ ...)             sequence -> non-seq
    flatten(X) ──► MultiDomainHeads (surface tower) ──► stage logits ──► funnel (ESMM)

Two sequence encoders (``GemConfig.seq_conditioning``):

* ``"target"`` (InterFormer as published; the ablation): every pyramid branch
  sees, prepended, the target ad token and ``compress_i(X)``, a summary of the
  candidate's interaction state, so from layer 1 on every history token is
  candidate-specific. A server ranking B ads must run the whole pyramid B
  times: at 500 candidates x 1k events that was ~200 ms of model time on 2
  CPU cores, ~10x the serving goal.
* ``"user"`` (the presets): the age branches' prefix is ``ctx_i = gate ⊙
  LN(W_i · U)``, U = the user / request tokens (user, age, country, device,
  hour, surface: the same for every candidate of a ranking call). The
  pyramid, its summaries and its tokens then depend on the user alone:
  :meth:`GemModel.encode_user` computes them once per request. The candidate
  meets the history afterwards, per candidate but cheaply, at every exchange i:

  - target attention (DIN): the ad token queries the age branches' CLS +
    tokens after layer i -> one token (O(B T d) instead of a transformer
    per candidate; the user's keys are projected once);
  - the SIM-style search branch: the ad's most recent matching events
    (same item / advertiser / category, tagged by match level), read by a
    target attention whose query is ``target + gate ⊙ LN(w_i · X_i)`` -- the
    candidate's interaction state at layer i, so here the
    interaction -> sequence direction carries full candidate information.
    This is SIM's second stage as published (multi-head target attention
    over the retrieved behaviours); there is no self-attention among them;
  - the Wukong layers, which take ``S_i ‖ TA_i ‖ SA_i`` (gated) into X.

  What InterFormer's interleaving keeps in this mode: sequence ->
  interaction stays per layer (S_i and the two attentions of layer i enter
  Wukong layer i); interaction -> sequence can only carry user / request
  summaries into the age branches (X_i after Wukong layer 0 mixes in the ad,
  so feeding it back would make the pyramid candidate-specific again), and
  it carries the full interaction state into the search attention's query.
  ``bench/encoder_ab.py`` compares the two encoders' progressive NE on one
  stream (docs/serving.md has the figures).

:meth:`GemModel.represent` is ``_score(_encode(batch), batch)`` with one
embedding lookup for both halves, the server calls
:meth:`encode_user` (1 row) and :meth:`candidate_logits` (B rows) -- the same
two functions, so the served and trained models cannot drift apart.

Embeddings (TorchRec, so ``DistributedModelParallel`` can shard them): an
``EmbeddingBagCollection`` for ids only the request has (user, ad format,
age, country, device, hour) and an ``EmbeddingCollection`` holding the tables
the target ad *shares* with the history (item, advertiser, category,
surface; plus kind and time-delta buckets), looked up in one call for both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torchrec import (
    EmbeddingBagCollection, EmbeddingBagConfig, EmbeddingCollection, EmbeddingConfig, KeyedJaggedTensor,
)
from torchrec.modules.embedding_configs import PoolingType

from opengem.model.batch import N_DENSE, NONSEQ_KEYS, SEQ_KEYS, TABLE_OF, FeatureConfig, GemBatch
from opengem.model.config import GemConfig
from opengem.model.heads import FunnelRanker, MultiDomainHeads, mlp
from opengem.model.pyramid import PyramidArch, PyramidState, TargetAttention, recent_positions
from opengem.model.wukong import WukongArch

# Request-only ids -> EmbeddingBagCollection; ids shared with the history -> EmbeddingCollection.
EBC_KEYS = ("user_id", "ad_format", "age_bucket", "country", "device", "hour")
EC_KEYS = ("item_id", "advertiser_id", "category", "surface")
TARGET_KEYS = ("item_id", "advertiser_id", "category")  # summed into the target ad token
# Ids of the user and the request (the same for every candidate of a ranking call).
USER_KEYS = ("user_id", "age_bucket", "country", "device", "hour", "surface")


def _pool_rows(values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Sum-pool jagged rows: values (N, d), lengths (B,) -> (B, d); empty rows -> 0."""
    rows = torch.repeat_interleave(torch.arange(lengths.numel(), device=values.device), lengths)
    return values.new_zeros(lengths.numel(), values.shape[1]).index_add_(0, rows, values)


def first_ids(kjt: KeyedJaggedTensor, key: str) -> torch.Tensor:
    """(B,) int64: each row's first id of ``key`` (0 = missing where the row has none)."""
    jt = kjt[key]
    lengths, values = jt.lengths(), jt.values()
    starts = torch.cumsum(lengths, 0) - lengths
    return torch.where(lengths > 0, values[starts.clamp(max=max(values.numel() - 1, 0))] if values.numel()
                       else torch.zeros_like(lengths), 0)


# Match levels of a history event against the target ad, strongest wins: same item, same
# advertiser, same category (shared tables: equal rows = equal ids, up to hash collisions).
MATCH_KEYS = (("category", "category"), ("advertiser", "advertiser_id"), ("item", "item_id"))
N_MATCH = len(MATCH_KEYS) + 1


def target_match(batch: GemBatch, idx: torch.Tensor, mask: torch.Tensor,
                 targets: KeyedJaggedTensor | None = None) -> torch.Tensor:
    """How each kept history event matches its row's target ad: (B, L) int64 in [0, N_MATCH).

    idx, mask: from :func:`truncate_recent` on ``batch.seq_lengths`` (the kept
    events, right-aligned). ``targets``: the ads (B rows) when they differ from
    ``batch.sparse`` -- a server scoring B ads against one user's history passes
    that history as a 1-row ``batch`` (and ``mask`` as (1, L) or expanded to
    (B, L)); the one history is then compared with all B ads by broadcasting.
    0 = no match (or padding); missing ids (row 0) never match.
    """
    ids, hm = _history_ids(batch, idx, mask)
    targets = batch.sparse if targets is None else targets
    level = torch.zeros((targets.stride(),) + tuple(hm.shape[1:]), dtype=torch.int64, device=mask.device)
    for lv, (seq_key, key) in enumerate(MATCH_KEYS, start=1):
        target = first_ids(targets, key)[:, None]  # (B, 1)
        level = torch.where((ids[seq_key] == target) & (target > 0), lv, level)
    return level * hm


def _history_ids(batch: GemBatch, idx: torch.Tensor, mask: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The kept history events' match ids right-aligned: {seq key: (B_h, L) int64, 0 on padding}, mask (B_h, L)."""
    hm = mask[:len(batch)]  # the histories' own mask, B_h = len(batch) (1 for a shared history)
    out = {}
    for seq_key, _ in MATCH_KEYS:
        ids = torch.zeros(hm.shape, dtype=torch.int64, device=mask.device)
        ids[hm] = batch.seq[seq_key][idx]
        out[seq_key] = ids
    return out, hm


# Kinds of the search branch's extra slots (PyramidConfig.search_strong): rare events that
# carry intent, retrieved however many views / impressions of the category came after them.
SEARCH_STRONG_KINDS = ("conversion", "click", "follow")


def match_positions(batch: GemBatch, idx: torch.Tensor, mask: torch.Tensor, targets: KeyedJaggedTensor,
                    k: int, strong: int = 0, strong_rows: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """The search branch's selection without a (B, L) level matrix: the most recent ``k``
    events of each target's row that match it at any level (:func:`target_match` > 0).

    Arguments as for :func:`target_match` (``targets``: B rows). Returns b, l, pos, K
    as :func:`~opengem.model.pyramid.recent_positions` and the match level (n,) of
    each selected event -- equal to ``target_match(...)[b, l]``; only O(B L) boolean
    compares, the rest is O(selected).

    ``strong`` > 0: also the most recent ``strong`` matching events of the
    :data:`SEARCH_STRONG_KINDS`, wherever they lie; the union is ranked by recency
    (:func:`merge_selections`), so a row has up to k + strong slots.
    """
    ids, hm = _history_ids(batch, idx, mask)
    tg = {key: first_ids(targets, key) for _, key in MATCH_KEYS}  # (B,) each
    sel = _match_positions(ids, hm, tg, targets.stride(), k)
    if strong:
        if strong_rows is None:
            raise ValueError("strong > 0 needs strong_rows (the kind rows of SEARCH_STRONG_KINDS)")
        kinds = torch.zeros(hm.shape, dtype=torch.int64, device=hm.device)
        kinds[hm] = batch.seq["kind"][idx]
        sel2 = _match_positions(ids, hm & torch.isin(kinds, strong_rows), tg, targets.stride(), strong)
        sel = merge_selections(sel, sel2, hm.shape[1])
    return sel


def strong_kind_rows(features: Any) -> torch.Tensor:
    """The ``seq_kind`` table rows of :data:`SEARCH_STRONG_KINDS`."""
    from opengem.model.batch import ids_to_rows
    from opengem.stream.events import KIND_INDEX

    codes = np.array([KIND_INDEX[x] for x in SEARCH_STRONG_KINDS], np.int64)
    return torch.from_numpy(ids_to_rows("seq_kind", codes, features))


def merge_selections(a: tuple, b: tuple, L: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """The union of two selections (b, l, pos, K, level) of the same rows, one entry per
    (b, l), re-ranked by recency as :func:`~opengem.model.pyramid.recent_positions` ranks:
    the most recent in slot K - 1, K = the largest row count; ordered by (b, l)."""
    code = torch.cat([a[0] * L + a[1], b[0] * L + b[1]])
    level = torch.cat([a[4], b[4]])
    if not code.numel():
        return a
    code, order = torch.sort(code, stable=True)
    level = level[order]
    first = torch.ones_like(code, dtype=torch.bool)
    first[1:] = code[1:] != code[:-1]
    code, level = code[first], level[first]
    bb, ll = code // L, code % L
    counts = torch.bincount(bb)
    start = torch.cumsum(counts, 0) - counts
    rank = counts[bb] - (torch.arange(bb.numel(), device=bb.device) - start[bb])  # 1 = the most recent
    K = int(counts.max())
    return bb, ll, K - rank, K, level


def _match_positions(ids: dict[str, torch.Tensor], hm: torch.Tensor, tg: dict[str, torch.Tensor], B: int,
                     k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, torch.Tensor]:
    if hm.shape[0] == 1 and B > 1:
        return _shared_match_positions(ids, hm, tg, k)
    hit = None
    for seq_key, key in MATCH_KEYS:
        t = tg[key][:, None]
        h = (ids[seq_key] == t) & (t > 0)  # (B, L) bool (broadcast when B_h = 1)
        hit = h if hit is None else hit | h
    b, l, pos, K = recent_positions(hit & hm, k)
    hb = b if hm.shape[0] > 1 else torch.zeros_like(b)
    level = torch.zeros_like(b)
    for lv, (seq_key, key) in enumerate(MATCH_KEYS, start=1):
        t = tg[key][b]
        level = torch.where((ids[seq_key][hb, l] == t) & (t > 0), lv, level)
    return b, l, pos, K, level


def _shared_match_positions(ids: dict[str, torch.Tensor], hm: torch.Tensor, tg: dict[str, torch.Tensor],
                            k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """:func:`match_positions` for B targets against one shared history (a server's request)
    as a sort-merge join instead of B x L compares.

    ids {seq key: (1, L)}, hm (1, L), tg {target key: (B,)}. Per level, the history's ids are
    sorted once (stably: equal ids stay oldest first), each target's equal range is found by
    binary search and only its k most recent entries are kept (the k most recent matches at
    any level are among the k most recent of some level); the pairs of all levels are then
    merged, one per (b, l) at its strongest level, and ranked as :func:`recent_positions`
    ranks them. O(L log L + B log L + B k log(B k)) -- the same output, in the same order.
    """
    L = hm.shape[1]
    B = next(iter(tg.values())).shape[0]
    dev = hm.device
    pos = hm[0].nonzero().squeeze(1)  # (n_h,) the kept events' positions, ascending
    codes = []
    for lv, (seq_key, key) in enumerate(MATCH_KEYS, start=1):
        h = ids[seq_key][0, pos]
        order = torch.argsort(h, stable=True)
        hs, hp = h[order], pos[order]
        t = tg[key]
        hi = torch.searchsorted(hs, t, side="right")
        lo = torch.maximum(torch.searchsorted(hs, t, side="left"), hi - k)
        n = torch.where(t > 0, hi - lo, 0)  # missing ids (row 0) never match
        b = torch.repeat_interleave(torch.arange(B, device=dev), n)  # (m,) target of each pair
        first = torch.cumsum(n, 0) - n
        j = lo[b] + torch.arange(b.numel(), device=dev) - first[b]
        codes.append((b * L + hp[j]) * N_MATCH + lv)
    key2 = torch.sort(torch.cat(codes)).values  # by (b, l, level)
    if not key2.numel():
        e = key2.new_zeros(0)
        return e, e, e, 0, e
    cell = key2 // N_MATCH
    last = torch.ones_like(cell, dtype=torch.bool)
    last[:-1] = cell[1:] != cell[:-1]  # the strongest level of each (b, l)
    cell, level = cell[last], key2[last] % N_MATCH
    b, l = cell // L, cell % L  # noqa: E741
    counts = torch.bincount(b, minlength=B)
    start = torch.cumsum(counts, 0) - counts
    rank = counts[b] - (torch.arange(b.numel(), device=dev) - start[b])  # 1 = the most recent
    sel = rank <= k
    K = min(k, int(counts.max()))
    return b[sel], l[sel], K - rank[sel], K, level[sel]


def truncate_recent(lengths: torch.Tensor, max_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep each row's most recent ``max_len`` values of a jagged batch.

    lengths: (B,) -> (idx (N',) into the values, kept lengths (B,), mask (B, L) bool)
    where L = max kept length and ``mask`` marks real events right-aligned
    (most recent last), row-major in the same order as ``idx``.
    """
    keep = lengths.clamp(max=max_len)  # (B,)
    ends = torch.cumsum(lengths, 0)
    new_off = torch.cumsum(keep, 0) - keep
    n = int(keep.sum())
    pos = torch.arange(n, device=lengths.device) - torch.repeat_interleave(new_off, keep, output_size=n)
    idx = torch.repeat_interleave(ends - keep, keep, output_size=n) + pos
    L = int(keep.max()) if keep.numel() else 0
    mask = torch.arange(L, device=lengths.device)[None, :] >= (L - keep)[:, None]  # (B, L)
    return idx, keep, mask


class SparseArch(nn.Module):
    """Ids -> embeddings.

    ``nonseq(batch)`` -> (B, F, d) in NONSEQ_KEYS order;
    ``forward(batch, max_len)`` -> (non-seq (B, F, d), events (B, L, d), mask (B, L) bool),
    events being the sum of each event's item, advertiser, category, surface,
    kind and time-delta embeddings, right-aligned; with ``max_len=0`` no sequence.
    """

    def __init__(self, d: int, fc: FeatureConfig, use_sequence: bool, device: torch.device | None = None,
                 init: float | None = None):
        super().__init__()
        self.use_sequence = use_sequence
        dev = device or torch.device("cpu")  # "meta": count parameters without allocating
        # Every table U(-init, init) (None: TorchRec's U(±1/sqrt(rows)), see GemConfig.emb_init).
        rng = {} if init is None else {"weight_init_min": -init, "weight_init_max": init}
        self.ebc = EmbeddingBagCollection(tables=[
            EmbeddingBagConfig(name=TABLE_OF[k], embedding_dim=d, num_embeddings=fc.rows(TABLE_OF[k]),
                               feature_names=[k], pooling=PoolingType.SUM, **rng) for k in EBC_KEYS
        ], device=dev)
        tables: dict[str, list[str]] = {TABLE_OF[k]: [k] for k in EC_KEYS}
        if use_sequence:
            for k in SEQ_KEYS:
                tables.setdefault(TABLE_OF[f"seq_{k}"], []).append(f"seq_{k}")
        self.ec = EmbeddingCollection(tables=[
            EmbeddingConfig(name=t, embedding_dim=d, num_embeddings=fc.rows(t), feature_names=names, **rng)
            for t, names in tables.items()
        ], device=dev)
        self.ec_keys = [k for names in tables.values() for k in names]

    def forward(self, batch: GemBatch, max_len: int = 0):
        B = len(batch)
        if B == 1 and not torch.is_grad_enabled():
            one = self._one_row(batch, max_len)
            if one is not None:
                return one
        jts = batch.sparse.to_dict()
        ebc_in = KeyedJaggedTensor.from_jt_dict({k: jts[k] for k in EBC_KEYS})
        pooled = self.ebc(ebc_in)  # KeyedTensor
        cols, lens = {}, {}
        for k in EC_KEYS:
            cols[k], lens[k] = jts[k].values(), jts[k].lengths()
        mask = None
        if self.use_sequence and max_len:
            idx, keep, mask = truncate_recent(batch.seq_lengths, max_len)
            for k in SEQ_KEYS:
                cols[f"seq_{k}"], lens[f"seq_{k}"] = batch.seq[k][idx], keep
        elif self.use_sequence:  # EC expects every feature it was built with
            for k in SEQ_KEYS:
                cols[f"seq_{k}"], lens[f"seq_{k}"] = batch.seq_lengths.new_zeros(0), batch.seq_lengths.new_zeros(B)
        ec_in = KeyedJaggedTensor.from_lengths_sync(
            keys=self.ec_keys, values=torch.cat([cols[k] for k in self.ec_keys]),
            lengths=torch.cat([lens[k] for k in self.ec_keys]),
        )
        out = self.ec(ec_in)  # {feature: JaggedTensor (N_k, d)}
        toks = []
        for k in NONSEQ_KEYS:
            toks.append(pooled[k] if k in EBC_KEYS else _pool_rows(out[k].values(), out[k].lengths()))
        nonseq = torch.stack(toks, dim=1)  # (B, F, d)
        if mask is None:
            return nonseq, None, None
        ev = sum(out[f"seq_{k}"].values() for k in SEQ_KEYS)  # (N', d)
        events = ev.new_zeros(*mask.shape, ev.shape[-1])
        events[mask] = ev  # (B, L, d), right-aligned
        return nonseq, events, mask

    def _one_row(self, batch: GemBatch, max_len: int):
        """:meth:`forward` of a 1-row batch (a server's user: ``encode_user`` once per request)
        read straight from the tables, bit for bit what the TorchRec path returns: a SUM bag or a
        pooled collection row of one id is that id's row (0 + x), the events the same rows summed
        in the same order. The TorchRec path builds two KeyedJaggedTensors and runs the
        collections' machinery: ~585 ops and ~1.3 ms for one user at ``base``, ~25 ops here.
        None where it does not apply (the caller runs that path): tables that are not the plain
        collections (e.g. sharded), a key without exactly one id."""
        ebc, ec = self.ebc, self.ec
        if type(ebc) is not EmbeddingBagCollection or type(ec) is not EmbeddingCollection:
            return None
        kjt = batch.sparse
        if tuple(kjt.keys()) != NONSEQ_KEYS or kjt.values().numel() != len(NONSEQ_KEYS):
            return None
        if not bool((kjt.lengths() == 1).all()):
            return None
        ids = kjt.values()
        toks = []
        for i, k in enumerate(NONSEQ_KEYS):
            t = (ebc.embedding_bags if k in EBC_KEYS else ec.embeddings)[TABLE_OF[k]].weight
            toks.append(t.index_select(0, ids[i:i + 1]))
        nonseq = torch.stack(toks, dim=1)  # (1, F, d)
        if not (self.use_sequence and max_len):
            return nonseq, None, None
        n = int(batch.seq_lengths[0])
        keep = min(n, max_len)
        ev = None
        for k in SEQ_KEYS:
            rows = ec.embeddings[TABLE_OF[f"seq_{k}"]].weight.index_select(0, batch.seq[k][n - keep:n])
            ev = rows if ev is None else ev + rows  # (keep, d): sum()'s order; 0 + x is x
        mask = torch.ones(1, keep, dtype=torch.bool, device=ids.device)
        return nonseq, ev.view(1, keep, ev.shape[-1]), mask


class DenseArch(nn.Module):
    """dense: (B, D_dense) -> (B, n_tokens, d)."""

    def __init__(self, n_dense: int, hidden: int, n_tokens: int, d: int):
        super().__init__()
        self.n, self.d = n_tokens, d
        self.mlp = mlp((n_dense, hidden, n_tokens * d))

    def forward(self, dense: torch.Tensor) -> torch.Tensor:
        return self.mlp(dense).view(-1, self.n, self.d)


class GemModel(FunnelRanker):
    """forward(batch) -> impression-level logits (B, n_tasks) from each row's surface head.

    ``predict(batch)`` -> probabilities (B, n_tasks): pCTR, pCVR over impressions
    (= pCTR x pCVR | click). ``loss(batch)`` -> (scalar BCE, logits).
    ``represent(batch)`` -> the trunk input (B, n_out * d), GEM's representation
    for students.
    """

    def __init__(self, cfg: GemConfig, device: torch.device | None = None):
        super().__init__()
        self.cfg = cfg
        fc, d = cfg.features, cfg.d
        self.sparse = SparseArch(d, fc, cfg.use_sequence, device, init=cfg.emb_init)
        self.dense = DenseArch(N_DENSE, cfg.dense_hidden, cfg.n_dense_tokens, d)
        n0 = len(NONSEQ_KEYS) + cfg.n_dense_tokens
        self._target = [NONSEQ_KEYS.index(k) for k in TARGET_KEYS]
        extra: tuple[int, ...] = ()
        self._user = [NONSEQ_KEYS.index(k) for k in USER_KEYS]
        self._user_rows = sorted(self._user)  # the same for every candidate of a request
        self.user_first = cfg.use_sequence and cfg.seq_conditioning == "user"
        # the search's strong-kind rows (not a parameter, not in the state dict)
        self.register_buffer("_strong_rows", strong_kind_rows(fc), persistent=False)
        if cfg.use_sequence:
            search = cfg.pyramid.search_len > 0
            self.seq = PyramidArch(d, cfg.pyramid, search_apart=self.user_first)
            n_seq = cfg.pyramid.n_layers
            n_ex = n_seq if cfg.interleave else 1  # how many exchanges
            # Tokens into Wukong per exchange: the pyramid's summary, plus ("user") the target
            # attention over it and over the search tokens, both per candidate.
            n_s = self.seq.n_summary + (search + 1 if self.user_first else 0)
            extra = (n_s,) * n_ex
            x_counts = [n0] + [cfg.wukong.n_out] * (n_ex - 1)  # X's token count before exchange i
            if not self.user_first:
                # Candidate-side context [target ad ‖ compress_i(X)], every branch's prefix.
                self.ctx_w = nn.ParameterList(nn.Parameter(torch.randn(cfg.n_ctx, n) / n**0.5) for n in x_counts)
                self.ctx_norm = nn.LayerNorm(d)
                self.ctx_gate = nn.Parameter(torch.zeros(n_ex, cfg.n_ctx, d))  # sigmoid -> 0.5 at init
            else:
                # User-side context of the age branches: a per-exchange mix of the user / request tokens.
                n_u = len(USER_KEYS)
                self.user_ctx_w = nn.ParameterList(nn.Parameter(torch.randn(cfg.n_ctx, n_u) / n_u**0.5)
                                                   for _ in range(n_ex))
                self.user_ctx_norm = nn.LayerNorm(d)
                self.user_ctx_gate = nn.Parameter(torch.zeros(n_ex, cfg.n_ctx, d))
                # The ad reads the user's pyramid tokens (DIN) ...
                self.target_attn = nn.ModuleList(TargetAttention(d, cfg.pyramid.n_heads) for _ in range(n_ex))
                if search:
                    # ... and its matched events (SIM's second stage), with a query that carries the
                    # candidate's interaction state: target + gate ⊙ LN(w_i · X_i).
                    self.search_q_w = nn.ParameterList(nn.Parameter(torch.randn(1, n) / n**0.5) for n in x_counts)
                    self.search_q_norm = nn.LayerNorm(d)
                    self.search_q_gate = nn.Parameter(torch.zeros(n_ex, 1, d))
                    self.search_attn = nn.ModuleList(TargetAttention(d, cfg.pyramid.n_heads) for _ in range(n_ex))
            self.seq_gate = nn.Parameter(torch.zeros(n_ex, n_s, d))
            if search:
                # What a search-branch event shares with the ad (row 0, no match, is never used there).
                self.match_emb = nn.Parameter(torch.empty(N_MATCH, d).uniform_(-cfg.emb_init, cfg.emb_init))
        # Per-token LayerNorm: puts table rows and dense tokens on one scale.
        self.in_norm = nn.LayerNorm(d)
        self.wukong = WukongArch(n0, d, cfg.wukong, extra)
        self.heads = MultiDomainHeads(self.wukong.n_out * d, len(fc.surfaces), len(fc.tasks), cfg.heads)

    def _ctx(self, i: int, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Candidate-side summary for the sequence: [target ad ‖ gate ⊙ compress_i(X)] (B, 1 + n_ctx, d)."""
        c = self.ctx_norm(torch.matmul(self.ctx_w[i], x))  # (B, n_ctx, d)
        return torch.cat([target, torch.sigmoid(self.ctx_gate[i]) * c], dim=1)

    def _user_ctx(self, i: int, u: torch.Tensor) -> torch.Tensor:
        """User-side summary for the age branches: u (B_u, n_u, d) user / request tokens -> (B_u, n_ctx, d)."""
        c = self.user_ctx_norm(torch.matmul(self.user_ctx_w[i], u))
        return torch.sigmoid(self.user_ctx_gate[i]) * c

    # ------------------------------------------------------------------ the two halves of represent()

    def encode_user(self, hist: GemBatch) -> "UserEncoding":
        """Everything that depends on the user rows of ``hist`` only (a server: one row per request).

        ``hist``: its histories and its user / request ids (user, age, country,
        device, hour, surface) are read; its ad ids are not. See :class:`UserEncoding`.
        """
        max_len = self.cfg.pyramid.max_len if self.cfg.use_sequence else 0
        nonseq, events, mask = self.sparse(hist, max_len)
        return self._encode(hist, nonseq, events, mask)

    def score_candidates(self, u: "UserEncoding", cands: GemBatch) -> torch.Tensor:
        """The trunk input (B, n_out * d) of B candidates against ``u`` (1 row, or B rows).

        ``cands``: the candidates' ids, dense features and surfaces; its histories are not read.
        """
        nonseq = self._shared_nonseq(u, cands)
        if nonseq is None:
            nonseq, _, _ = self.sparse(cands, 0)  # (B, F, d): no history lookup
        return self._score(u, cands, nonseq)

    def _shared_nonseq(self, u: "UserEncoding", cands: GemBatch) -> torch.Tensor | None:
        """The candidates' non-seq tokens (B, F, d) when they share the user / request ids of a
        1-row ``u`` (a server's request): the user's tokens from ``encode_user`` repeated, only
        the ad's ids looked up (one row per id: what the bag / collection lookups return, bit for
        bit). None where that does not hold (the caller runs the full lookup)."""
        sp = self.sparse
        if u.nonseq is None or u.nonseq.shape[0] != 1 or type(sp.ebc) is not EmbeddingBagCollection \
                or type(sp.ec) is not EmbeddingCollection:
            return None  # e.g. sharded tables (DistributedModelParallel)
        F, B = len(NONSEQ_KEYS), len(cands)
        kc, kh = cands.sparse, u.hist.sparse
        if tuple(kc.keys()) != NONSEQ_KEYS or tuple(kh.keys()) != NONSEQ_KEYS or kc.values().numel() != F * B \
                or kh.values().numel() != F or not bool((kc.lengths() == 1).all()) \
                or not bool((kh.lengths() == 1).all()):
            return None  # not one id per key and row
        vals = kc.values().view(F, B)
        if not bool((vals[self._user_rows] == kh.values().view(F, 1)[self._user_rows]).all()):
            return None  # candidates of other users
        toks = []
        for i, k in enumerate(NONSEQ_KEYS):
            if i in self._user_rows:
                toks.append(u.nonseq[0, i].expand(B, -1))
            elif k in EBC_KEYS:
                toks.append(sp.ebc.embedding_bags[TABLE_OF[k]].weight.index_select(0, vals[i]))
            else:
                toks.append(sp.ec.embeddings[TABLE_OF[k]].weight.index_select(0, vals[i]))
        return torch.stack(toks, dim=1)  # (B, F, d)

    def candidate_logits(self, u: "UserEncoding", cands: GemBatch) -> torch.Tensor:
        """Funnel stage logits (B, n_tasks) of ``score_candidates`` through the surface heads."""
        return self.heads(self.score_candidates(u, cands), cands.surface_idx)

    def represent(self, batch: GemBatch) -> torch.Tensor:
        """``score_candidates(encode_user(batch), batch)`` with one embedding lookup for both:
        (B, n_out * d), GEM's representation for students."""
        max_len = self.cfg.pyramid.max_len if self.cfg.use_sequence else 0
        nonseq, events, mask = self.sparse(batch, max_len)
        return self._score(self._encode(batch, nonseq, events, mask), batch, nonseq)

    def raw_logits(self, batch: GemBatch) -> torch.Tensor:
        """Funnel stage logits (B, n_tasks): click | impression, conversion | click."""
        return self.heads(self.represent(batch), batch.surface_idx)

    def _encode(self, hist: GemBatch, nonseq: torch.Tensor, events: torch.Tensor | None,
                mask: torch.Tensor | None) -> "UserEncoding":
        cfg = self.cfg
        if not cfg.use_sequence:
            return UserEncoding(hist, None, None, None, nonseq=nonseq)
        st = self.seq.init(events, mask)  # the age branches' input stage
        if not self.user_first:
            return UserEncoding(hist, events, mask, st, nonseq=nonseq)  # the layers need the candidate
        u = self.in_norm(nonseq[:, self._user])  # (B_u, n_u, d), as these tokens are in X
        enc = UserEncoding(hist, events, mask, None, nonseq=nonseq)
        for i in range(cfg.pyramid.n_layers):
            st, s = self.seq.layer(i, st, self._user_ctx(i if cfg.interleave else 0, u))
            enc.summaries.append(s)  # (B_u, n_summary, d)
            keys = torch.cat(st.cls + st.tokens, dim=1)  # (B_u, T_i, d)
            km = torch.cat([mask.new_ones(keys.shape[0], len(st.cls))] + st.masks, dim=1)
            enc.keys.append((keys, km))
        return enc

    def _search(self, u: "UserEncoding", cands: GemBatch, B: int) -> "SearchSelection | None":
        """Each candidate's most recent matching events (None without a search branch)."""
        if not self.cfg.pyramid.search_len:
            return None
        idx, _, _ = truncate_recent(u.hist.seq_lengths, self.cfg.pyramid.max_len)
        strong = self.cfg.pyramid.search_strong
        b, l, pos, K, level = match_positions(u.hist, idx, u.mask, cands.sparse, self.cfg.pyramid.search_len,
                                              strong, self._strong_rows if strong else None)
        return SearchSelection(B, K, b, l, pos, level)

    def _search_state(self, u: "UserEncoding", sel: "SearchSelection") -> PyramidState:
        """"target" mode: the selection as the pyramid's search branch (B rows)."""
        return self.seq.search_tokens(u.events, sel.B, (sel.b, sel.l, sel.pos, sel.K), self.match_emb[sel.level])

    def _search_kv(self, u: "UserEncoding", sel: "SearchSelection") -> "SearchKV":
        """"user" mode: per exchange, the search attention's keys ‖ values -- its CLS, then each
        candidate's matched events.

        A matched event's token depends on (history row, position, match level) only, and
        the B candidates of a request share one history, so each distinct token is
        normed and projected once. With one shared history (a server) the candidates read
        that table through (candidate, row) pairs (:meth:`TargetAttention.attend_pairs`:
        ~6 matches per candidate, not K = 32 padded slots); else the keys are gathered into
        (B, 1 + K, 2d) rows with a mask.
        """
        L = u.events.shape[1]
        shared = u.events.shape[0] == 1
        hb = torch.zeros_like(sel.b) if shared else sel.b
        code = (hb * L + sel.l) * N_MATCH + sel.level
        uniq, inv = torch.unique(code, return_inverse=True)
        lv, pl, row = uniq % N_MATCH, (uniq // N_MATCH) % L, uniq // (N_MATCH * L)
        toks = self.seq.search_values(u.events[row, pl] + self.match_emb[lv])  # (U, d)
        B, K = sel.B, sel.K
        cls = self.seq.search_cls[0]  # (1, d)
        if shared:
            # Pairs (candidate, row of [CLS, the U distinct tokens]): every candidate reads the CLS.
            dev = toks.device
            qi = torch.cat([torch.arange(B, device=dev), sel.b])
            ki = torch.cat([torch.zeros(B, dtype=torch.int64, device=dev), 1 + inv])
            return SearchKV([att.project(torch.cat([cls, toks])) for att in self.search_attn], None, (qi, ki))
        # Each candidate's slots as rows of a table [CLS, 0, the U distinct tokens]: one gather
        # writes the (B, 1 + K, 2d) keys ‖ values (no zero fill, then scatter, of that tensor).
        slot = torch.ones(B, 1 + K, dtype=torch.int64, device=toks.device)  # 1: the empty slot
        slot[:, 0] = 0
        slot[sel.b, 1 + sel.pos] = 2 + inv
        mask = slot != 1
        out = []
        for att in self.search_attn:
            kv_u = att.project(torch.cat([cls, toks]))  # (1 + U, 2d)
            table = torch.cat([kv_u[:1], kv_u.new_zeros(1, kv_u.shape[-1]), kv_u[1:]])  # (2 + U, 2d)
            out.append(table.index_select(0, slot.view(-1)).view(B, 1 + K, -1))  # (B, 1 + K, 2d)
        return SearchKV(out, mask, None)

    def _score(self, u: "UserEncoding", cands: GemBatch, nonseq: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        x = self.in_norm(torch.cat([nonseq, self.dense(cands.dense)], dim=1))  # (B, n0, d)
        if not cfg.use_sequence:
            return self.wukong(x).flatten(1)  # (B, n_out * d)
        B, layers, n_seq = x.shape[0], self.wukong.layers, cfg.pyramid.n_layers
        target = nonseq[:, self._target].sum(1, keepdim=True)  # (B, 1, d): the ad token
        if self.user_first:
            sel = self._search(u, cands, B)
            if sel is not None:  # keys: the branch's CLS (always there: rows without a match) + its events
                skv = self._search_kv(u, sel)

            def exchange(i: int, x: torch.Tensor, j: int) -> torch.Tensor:
                """X ‖ gate_j ⊙ layer i's tokens for Wukong (exchange j): the user's summary ‖ the
                ad's target attention over the user's layer-i tokens ‖ over its matched events.
                The summary is the user's: gated once, on its one row, then broadcast."""
                g = torch.sigmoid(self.seq_gate[j])  # (n_s, d)
                n_sum = u.summaries[i].shape[1]
                keys, km = u.keys[i]
                att = [self.target_attn[j](target, keys, km)]
                if sel is not None:
                    q = self.search_q_norm(torch.matmul(self.search_q_w[j], x))  # (B, 1, d)
                    q = target + torch.sigmoid(self.search_q_gate[j]) * q
                    att.append(skv.attend(self.search_attn[j], j, q))
                att_t = self.seq.out_norm(torch.cat(att, dim=1))  # (B, 1 [+ 1], d)
                return torch.cat([x, _rows(g[:n_sum] * u.summaries[i], B), g[n_sum:] * att_t], dim=1)

            if cfg.interleave:
                for i, layer in enumerate(layers):
                    if i < n_seq:
                        x = exchange(i, x, i)
                    x = layer(x)
            else:
                x = exchange(n_seq - 1, x, 0)  # the pyramid's last layer, once
                for layer in layers:
                    x = layer(x)
            return x.flatten(1)
        # "target": the pyramid is conditioned on each candidate, so its layers run per candidate
        # on the user's input stage broadcast to B rows.
        st = PyramidState([_rows(t, B) for t in u.state.tokens], [_rows(t, B) for t in u.state.masks],
                          [_rows(t, B) for t in u.state.cls])
        st = self._add_search_target(st, u, cands)
        if cfg.interleave:
            for i, layer in enumerate(layers):
                if i < n_seq:
                    st, s = self.seq.layer(i, st, self._ctx(i, x, target))  # s: (B, n_s, d)
                    x = torch.cat([x, torch.sigmoid(self.seq_gate[i]) * s], dim=1)
                x = layer(x)
        else:
            ctx = self._ctx(0, x, target)
            for i in range(n_seq):
                st, s = self.seq.layer(i, st, ctx)
            x = torch.cat([x, torch.sigmoid(self.seq_gate[0]) * s], dim=1)
            for layer in layers:
                x = layer(x)
        return x.flatten(1)

    def _add_search_target(self, st: PyramidState, u: "UserEncoding", cands: GemBatch) -> PyramidState:
        """``st`` with the search branch appended ("target" mode: it runs with the age branches)."""
        sel = self._search(u, cands, st.tokens[0].shape[0])
        if sel is None:
            return st
        sst = self._search_state(u, sel)
        return PyramidState(st.tokens + sst.tokens, st.masks + sst.masks, st.cls + sst.cls)


@dataclass(frozen=True, eq=False)
class SearchSelection:
    """The search branch's events for B candidates: event (b or 0, l) of the user rows goes to
    slot pos of candidate b's K slots, matching it at ``level`` (all (n,) int64)."""

    B: int
    K: int
    b: torch.Tensor
    l: torch.Tensor  # noqa: E741
    pos: torch.Tensor
    level: torch.Tensor


@dataclass(frozen=True, eq=False)
class SearchKV:
    """The search attention's keys ‖ values per exchange j: ``kv[j]`` (B, 1 + K, 2d) rows with
    ``mask`` (B, 1 + K), or -- one shared history -- (N, 2d) tables read through ``pairs``
    (query index (n,), table row (n,))."""

    kv: list[torch.Tensor]
    mask: torch.Tensor | None
    pairs: tuple[torch.Tensor, torch.Tensor] | None

    def attend(self, att: TargetAttention, j: int, q: torch.Tensor) -> torch.Tensor:
        """Exchange j's search attention for the queries q (B, 1, d) -> (B, 1, d)."""
        if self.pairs is not None:
            return att.attend_pairs(q, self.kv[j], *self.pairs)
        return att.attend(q, self.kv[j], self.mask)


def _rows(t: torch.Tensor, B: int) -> torch.Tensor:
    """A user-side tensor (1 or B rows) as B rows; a view, no copy."""
    return t if t.shape[0] == B else t.expand(B, *t.shape[1:])


@dataclass(eq=False)
class UserEncoding:
    """What :meth:`GemModel.encode_user` computes from the user rows alone (B_u = 1 per request
    at serving, B_u = B in training, where every row is its own user).

    hist: the rows' batch (histories: ids for the search branch's matching);
    events (B_u, L, d) / mask (B_u, L): the embedded, right-aligned histories;
    state: ``seq_conditioning="target"`` only -- the pyramid's input stage
      (its layers need the candidate);
    summaries[i] (B_u, n_summary, d), keys[i] ((B_u, T_i, d), (B_u, T_i)):
      ``"user"`` only -- layer i's summary of the age branches and their CLS +
      tokens, which candidates read through target attention.
    """

    hist: GemBatch
    events: torch.Tensor | None
    mask: torch.Tensor | None
    state: PyramidState | None
    summaries: list[torch.Tensor] = field(default_factory=list)
    keys: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    nonseq: torch.Tensor | None = None  # (B_u, F, d): the rows' non-seq tokens (the user's are reused)

def n_params(model: nn.Module) -> dict[str, int]:
    """Parameter counts: embeddings (TorchRec tables) vs dense, and the total."""
    tables = [m for m in model.modules() if isinstance(m, (EmbeddingBagCollection, EmbeddingCollection))]
    emb = sum(p.numel() for m in tables for p in m.parameters())
    tot = sum(p.numel() for p in model.parameters())
    return {"embedding": emb, "dense": tot - emb, "total": tot}
