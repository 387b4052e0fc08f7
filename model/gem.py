"""GemModel: SparseArch + DenseArch -> InterFormer-interleaved Pyramid / Wukong -> heads.

::

    batch.sparse (KJT) ──► SparseArch ──► non-seq tokens (B, F, d) ─┐
    batch.dense ─────────► DenseArch ───► dense tokens (B, n_dt, d) ┴► X (B, n0, d)
    batch.seq (jagged) ──► SparseArch ──► events (B, L, d) + mask ──► PyramidArch
    for layer i (InterFormer):
        ctx_i = [target ad token ‖ gate ⊙ compress_i(X)]      non-seq -> sequence
        state, S_i = pyramid.layer(i, state, ctx_i)           S_i: (B, n_s, d)
        X = wukong.layers[i](X ‖ gate ⊙ S_i)                  sequence -> non-seq
    flatten(X) ──► MultiDomainHeads (surface tower) ──► stage logits ──► funnel (ESMM)

Embeddings (TorchRec, so ``DistributedModelParallel`` can shard them): an
``EmbeddingBagCollection`` for ids only the request has (user, ad format,
age, country, device, hour) and an ``EmbeddingCollection`` holding the tables
the target ad *shares* with the history (item, advertiser, category,
surface; plus kind and time-delta buckets), looked up in one call for both.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec import (
    EmbeddingBagCollection, EmbeddingBagConfig, EmbeddingCollection, EmbeddingConfig, KeyedJaggedTensor,
)
from torchrec.modules.embedding_configs import PoolingType

from opengem.model.batch import N_DENSE, NONSEQ_KEYS, SEQ_KEYS, TABLE_OF, FeatureConfig, GemBatch
from opengem.model.config import GemConfig
from opengem.model.heads import FunnelRanker, MultiDomainHeads, mlp
from opengem.model.pyramid import PyramidArch, PyramidState
from opengem.model.wukong import WukongArch

# Request-only ids -> EmbeddingBagCollection; ids shared with the history -> EmbeddingCollection.
EBC_KEYS = ("user_id", "ad_format", "age_bucket", "country", "device", "hour")
EC_KEYS = ("item_id", "advertiser_id", "category", "surface")
TARGET_KEYS = ("item_id", "advertiser_id", "category")  # summed into the target ad token


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
    that history as a 1-row ``batch`` and ``mask`` expanded to (B, L).
    0 = no match (or padding); missing ids (row 0) never match.
    """
    B = mask.shape[0]
    targets = batch.sparse if targets is None else targets
    if len(batch) == 1 and B > 1:
        idx = idx.repeat(B)
    rows = torch.repeat_interleave(torch.arange(B, device=mask.device), mask.sum(1))  # (N',)
    level = torch.zeros(idx.numel(), dtype=torch.int64, device=mask.device)
    for lv, (seq_key, key) in enumerate(MATCH_KEYS, start=1):
        target = first_ids(targets, key)  # (B,)
        hit = (batch.seq[seq_key][idx] == target[rows]) & (target[rows] > 0)
        level = torch.where(hit, lv, level)
    out = torch.zeros(mask.shape, dtype=torch.int64, device=mask.device)
    out[mask] = level
    return out


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
        jts = batch.sparse.to_dict()
        B = len(batch)
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
        if cfg.use_sequence:
            self.seq = PyramidArch(d, cfg.pyramid)
            n_s, n_seq = self.seq.n_summary, cfg.pyramid.n_layers
            n_ex = n_seq if cfg.interleave else 1  # how many exchanges
            extra = (n_s,) * n_ex
            x_counts = [n0] + [cfg.wukong.n_out] * (n_ex - 1)  # X's token count before exchange i
            self.ctx_w = nn.ParameterList(nn.Parameter(torch.randn(cfg.n_ctx, n) / n**0.5) for n in x_counts)
            self.ctx_norm = nn.LayerNorm(d)
            self.ctx_gate = nn.Parameter(torch.zeros(n_ex, cfg.n_ctx, d))  # sigmoid -> 0.5 at init
            self.seq_gate = nn.Parameter(torch.zeros(n_ex, n_s, d))
            if cfg.pyramid.search_len:
                # What a search-branch event shares with the ad (row 0, no match, is never used there).
                self.match_emb = nn.Parameter(torch.empty(N_MATCH, d).uniform_(-cfg.emb_init, cfg.emb_init))
        # Per-token LayerNorm: puts table rows and dense tokens on one scale.
        self.in_norm = nn.LayerNorm(d)
        self.wukong = WukongArch(n0, d, cfg.wukong, extra)
        self.heads = MultiDomainHeads(self.wukong.n_out * d, len(fc.surfaces), len(fc.tasks), cfg.heads)

    def _ctx(self, i: int, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Non-seq summary for the sequence: (B, 1 + n_ctx, d)."""
        c = self.ctx_norm(torch.einsum("cn,bnd->bcd", self.ctx_w[i], x))  # (B, n_ctx, d)
        return torch.cat([target, torch.sigmoid(self.ctx_gate[i]) * c], dim=1)

    def seq_state(self, batch: GemBatch, events: torch.Tensor, mask: torch.Tensor) -> PyramidState:
        """The sequence arch's initial state: the age branches, then the search branch."""
        return self.add_search(self.seq.init(events, mask), batch, events, mask)

    def add_search(self, st: PyramidState, hist: GemBatch, events: torch.Tensor, mask: torch.Tensor,
                   targets: KeyedJaggedTensor | None = None) -> PyramidState:
        """Append the search branch: history events matching each row's target ad, tagged
        with how they match. events (B, L, d), mask (B, L) from ``self.sparse(hist, max_len)``;
        a server sharing one user's age branches across B ads passes the 1-row ``hist``,
        events / mask expanded to B rows and the ads as ``targets``."""
        if not self.cfg.pyramid.search_len:
            return st
        idx, _, _ = truncate_recent(hist.seq_lengths, self.cfg.pyramid.max_len)
        match = target_match(hist, idx, mask, targets)  # (B, L)
        return self.seq.add_search(st, events + self.match_emb[match], match > 0)

    def represent(self, batch: GemBatch) -> torch.Tensor:
        cfg = self.cfg
        max_len = cfg.pyramid.max_len if cfg.use_sequence else 0
        nonseq, events, mask = self.sparse(batch, max_len)
        x = self.in_norm(torch.cat([nonseq, self.dense(batch.dense)], dim=1))  # (B, n0, d)
        layers = self.wukong.layers
        if cfg.use_sequence:
            target = nonseq[:, self._target].sum(1, keepdim=True)  # (B, 1, d)
            st = self.seq_state(batch, events, mask)
            if cfg.interleave:
                for i, layer in enumerate(layers):
                    if i < cfg.pyramid.n_layers:
                        st, s = self.seq.layer(i, st, self._ctx(i, x, target))  # s: (B, n_s, d)
                        x = torch.cat([x, torch.sigmoid(self.seq_gate[i]) * s], dim=1)
                    x = layer(x)
            else:
                ctx = self._ctx(0, x, target)
                for i in range(cfg.pyramid.n_layers):
                    st, s = self.seq.layer(i, st, ctx)
                x = torch.cat([x, torch.sigmoid(self.seq_gate[0]) * s], dim=1)
                for layer in layers:
                    x = layer(x)
        else:
            x = self.wukong(x)  # (B, n_out, d)
        return x.flatten(1)

    def raw_logits(self, batch: GemBatch) -> torch.Tensor:
        """Funnel stage logits (B, n_tasks): click | impression, conversion | click."""
        return self.heads(self.represent(batch), batch.surface_idx)



def n_params(model: nn.Module) -> dict[str, int]:
    """Parameter counts: embeddings (TorchRec tables) vs dense, and the total."""
    tables = [m for m in model.modules() if isinstance(m, (EmbeddingBagCollection, EmbeddingCollection))]
    emb = sum(p.numel() for m in tables for p in m.parameters())
    tot = sum(p.numel() for p in model.parameters())
    return {"embedding": emb, "dense": tot - emb, "total": tot}
