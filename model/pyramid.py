"""Pyramid-parallel sequence arch over thousands of history events.

The history (B, L, d), right-aligned (most recent event last) with a mask, is
cut by age into ``n_levels`` segments that run as parallel *branches*:

    level 0: the most recent R events, one token each (full resolution)
    level j: the next R * c^j older events, merged c^j -> 1 (chunk mean + linear)
    last level: everything older, up to ``max_len``, merged c^(n_levels-1) -> 1

so each branch holds about R tokens however long the history is. Every branch
is a small pre-LN transformer stack with its own weights; after each layer its
tokens are merged again by ``shrink`` (down to ``min_tokens``), so token counts
shrink level by level. Each branch sees, prepended, its own CLS token and the
*context tokens* (the target ad and the non-sequence summary from the
interaction arch) -- the conditioning. The branches meet in the summary of
every layer: the branch CLS tokens ‖ PMA pooling (learned queries attending
over all branches' tokens) ‖ the most recent tokens of level 0.

A *search* branch (``search_len`` > 0) runs beside them: the most recent
``search_len`` events that share the target ad's item, advertiser or category,
wherever they lie inside ``max_len``, at full resolution (SIM's "hard search",
Pi et al. 2020). Age-based branches can only see an old event through a
chunk mean and attention over hundreds of unrelated tokens, so one key event
far back reaches the summary with weight ~1/L -- in tests a model could not
pick up a target-matched event 100-200 events back in a few hundred steps.
The search branch hands it over undiluted, at O(L) cost for the selection.

*Candidate-independent mode* (``search_apart=True``, GEM's
``seq_conditioning="user"``): the context tokens carry user / request
features only, so the age branches, their summary and their tokens depend on
the user alone and a server computes them once per request. The search branch
is the one part that must see the ad (its events are chosen by the ad): here
it only prepares its tokens (:meth:`PyramidArch.search_tokens`) and has no
transformer layers; GEM reads them per candidate with target attention
(SIM's second stage, :class:`TargetAttention`). The PMA and the summary cover
the age branches only.

With ``pyramid=False`` there is one full-resolution branch over the last
``max_len`` events (the ablation; attention is then quadratic in max_len).
Empty histories work: a branch with no events attends to its prefix only.
Time order comes from the time-delta bucket embedded in every event token and
from the level embedding, not from positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class PyramidConfig:
    # Sequence layers (each interleaves with one Wukong layer in GEM).
    n_layers: int = 2
    # Longest history used; reads are truncated to the most recent max_len events.
    max_len: int = 1024
    # False: one full-resolution branch over max_len events (ablation).
    pyramid: bool = True
    # Events of level 0 = tokens per branch: recent past at full resolution.
    recent: int = 64
    # Parallel branches (time scales).
    n_levels: int = 3
    # Each level covers c x more events than the one before, merged c^j -> 1.
    level_factor: int = 4
    # Per-layer token merge factor inside a branch (1: no shrinking).
    shrink: int = 2
    # A branch stops shrinking at this many tokens.
    min_tokens: int = 8
    n_heads: int = 2
    # FFN hidden = ffn_mult * d, the usual transformer ratio is 4; 2 is cheaper on CPU.
    ffn_mult: int = 2
    # PMA learned queries pooling all branches into the summary.
    n_pma: int = 2
    # Most recent level-0 tokens copied into the summary (last-N signal).
    n_recent: int = 2
    # Target-matched events (same item / advertiser / category as the ad) in the
    # search branch; 0: no search branch.
    search_len: int = 32
    # Extra search slots for the most recent matching events of rare, high-intent kinds
    # (SEARCH_STRONG_KINDS: conversions, clicks, follows) wherever they lie inside max_len:
    # a heavy user has ~100-170 category matches in 1,024 events, so one old conversion
    # in the ad's category is rarely among the ``search_len`` most recent. 0: off.
    search_strong: int = 0

    def __post_init__(self) -> None:
        if self.pyramid and self.max_len <= self.level_start(self.n_levels - 1):
            raise ValueError(f"max_len {self.max_len} does not reach the last pyramid level")
        if self.search_len < 0:
            raise ValueError(f"search_len must be >= 0, got {self.search_len}")
        if self.search_strong < 0 or (self.search_strong and not self.search_len):
            raise ValueError(f"search_strong must be >= 0 and needs a search branch, got {self.search_strong}")

    @property
    def n_branches(self) -> int:
        """Age-based branches plus the search branch."""
        return (self.n_levels if self.pyramid else 1) + (self.search_len > 0)

    def level_start(self, j: int) -> int:
        """Age rank (0 = most recent) of the first event of level j."""
        return sum(self.recent * self.level_factor**i for i in range(j))

    def segments(self) -> list[tuple[int, int, int]]:
        """[(first age rank, end age rank, merge factor)] per branch."""
        if not self.pyramid:
            return [(0, self.max_len, 1)]
        out = []
        for j in range(self.n_levels):
            s = self.level_start(j)
            e = self.max_len if j == self.n_levels - 1 else min(self.max_len, s + self.recent * self.level_factor**j)
            out.append((s, e, self.level_factor**j))
        return out

    @property
    def n_summary(self) -> int:
        return self.n_branches + self.n_pma + self.n_recent


def recent_positions(keep: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Where the most recent ``k`` kept tokens of each row go, right-aligned.

    keep: (B, L) bool -> (b (n,), l (n,), pos (n,), K): token (b, l) goes to slot
    pos of row b in a (B, K) output, K = min(k, max row count), oldest first.
    """
    B = keep.shape[0]
    b, l = keep.nonzero(as_tuple=True)  # row-major: oldest first within a row
    if not b.numel():
        return b, l, b, 0
    counts = torch.bincount(b, minlength=B)  # (B,)
    start = torch.cumsum(counts, 0) - counts
    rank = counts[b] - (torch.arange(b.numel(), device=b.device) - start[b])  # 1 = the most recent
    sel = rank <= k
    K = min(k, int(counts.max()))
    return b[sel], l[sel], K - rank[sel], K


def select_recent(x: torch.Tensor, keep: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The most recent ``k`` tokens of each row where ``keep`` holds, right-aligned.

    x: (B, L, d), keep: (B, L) bool -> (B, K, d), (B, K) bool with K = min(k, max row count);
    the order within a row is kept (oldest first).
    """
    B, L, d = x.shape
    b, l, pos, K = recent_positions(keep, k)
    out, m = x.new_zeros(B, K, d), keep.new_zeros(B, K)
    out[b, pos] = x[b, l]
    m[b, pos] = True
    return out, m


class TokenMerge(nn.Module):
    """Chunk mean over ``factor`` consecutive valid tokens, then a linear map.

    x: (B, T, d), mask: (B, T) bool -> (B, ceil(T / factor), d), (B, ceil(T / factor)) bool.
    Chunks are aligned to the most recent end (left padding); empty chunks are masked.
    """

    def __init__(self, d: int, factor: int):
        super().__init__()
        self.factor = factor
        self.proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, d = x.shape
        f = self.factor
        pad = (-T) % f
        x = F.pad(x, (0, 0, pad, 0))  # (B, T', d)
        w = F.pad(mask, (pad, 0), value=False).to(x.dtype).view(B, -1, f, 1)  # (B, T'/f, f, 1)
        x = x.view(B, -1, f, d)
        n = w.sum(2)  # (B, T'/f, 1)
        out = self.proj((x * w).sum(2) / n.clamp(min=1))  # (B, T'/f, d)
        m = n.squeeze(-1) > 0
        return out * m.unsqueeze(-1), m


class Block(nn.Module):
    """Pre-LN transformer block. x: (B, T, d), mask: (B, T) bool (True = real) -> (B, T, d)."""

    def __init__(self, d: int, n_heads: int, ffn_mult: int):
        super().__init__()
        self.h = n_heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.ffn = nn.Sequential(nn.Linear(d, ffn_mult * d), nn.GELU(), nn.Linear(ffn_mult * d, d))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)  # (B, H, T, Dh)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])  # (B, H, T, Dh)
        x = x + self.out(a.transpose(1, 2).reshape(B, T, d))
        return x + self.ffn(self.ln2(x))


class PMA(nn.Module):
    """Pooling by multi-head attention: n learned queries over (B, T, d) keys -> (B, n, d)."""

    def __init__(self, d: int, n: int, n_heads: int):
        super().__init__()
        self.h = n_heads
        self.queries = nn.Parameter(torch.randn(n, d) * 0.02)
        self.ln = nn.LayerNorm(d)
        self.q, self.kv, self.out = nn.Linear(d, d), nn.Linear(d, 2 * d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        n, h = self.queries.shape[0], self.h
        q = self.q(self.queries).view(1, n, h, d // h).transpose(1, 2).expand(B, -1, -1, -1)  # (B, H, n, Dh)
        k, v = self.kv(self.ln(x)).view(B, T, 2, h, d // h).permute(2, 0, 3, 1, 4)  # (B, H, T, Dh)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])  # (B, H, n, Dh)
        return self.out(a.transpose(1, 2).reshape(B, n, d))


class TargetAttention(nn.Module):
    """DIN-style target attention (Zhou et al. 2018): each candidate's ad token queries a user's tokens.

    q: (B, 1, d); keys: (B_k, T, d), mask: (B_k, T) bool with B_k = B (training: a
    history per row) or 1 (serving: one user's tokens shared by B candidates, which
    then run as B queries of a single attention, so the keys are projected once)
    -> (B, 1, d). The cheap, per-candidate way for the ad to read a
    candidate-independent encoding: O(B T d) instead of a transformer per candidate.
    """

    def __init__(self, d: int, n_heads: int):
        super().__init__()
        self.h = n_heads
        self.ln_q, self.ln_k = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.kv, self.out = nn.Linear(d, d), nn.Linear(d, 2 * d), nn.Linear(d, d)

    def forward(self, q: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.attend(q, self.project(keys), mask)

    def project(self, keys: torch.Tensor) -> torch.Tensor:
        """Keys (..., d) -> their keys ‖ values (..., 2d); per token, so a caller may project
        distinct tokens once and gather (the search branch's events repeat across candidates)."""
        return self.kv(self.ln_k(keys))

    def attend(self, q: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """q (B, 1, d), kv (B_k, T, 2d) from :meth:`project`, mask (B_k, T) -> (B, 1, d)."""
        B, d, h = q.shape[0], q.shape[-1], self.h
        Bk, T = kv.shape[:2]
        if Bk != B:
            if Bk != 1:
                raise ValueError(f"keys for {Bk} rows, queries for {B}")
            q = q.transpose(0, 1)  # (1, B, d): the candidates as queries of one row
        nq = q.shape[1]
        qh = self.q(self.ln_q(q)).view(Bk, nq, h, d // h).transpose(1, 2)  # (B_k, H, nq, Dh)
        k, v = kv.view(Bk, T, 2, h, d // h).permute(2, 0, 3, 1, 4)  # (B_k, H, T, Dh)
        a = F.scaled_dot_product_attention(qh, k, v, attn_mask=mask[:, None, None, :])  # (B_k, H, nq, Dh)
        return self.out(a.transpose(1, 2).reshape(Bk, nq, d)).reshape(B, 1, d)


    def attend_pairs(self, q: torch.Tensor, kv: torch.Tensor, qi: torch.Tensor, ki: torch.Tensor) -> torch.Tensor:
        """:meth:`attend` for queries that read different subsets of one shared key table, given as
        pairs instead of a padded (B, T) gather.

        q (B, 1, d); kv (N, 2d) from :meth:`project`; pairs (qi[j], ki[j]), (n,) int64 each:
        query qi[j] reads key ki[j] (every query needs at least one pair, each pair once)
        -> (B, 1, d), equal to :meth:`attend` on each query's keys gathered into (B, T, 2d)
        with a mask, up to float rounding. O(n d) where the padded form is O(B T d):
        a server's search branch has ~6 matches per candidate in 33 slots.
        """
        B, d, h = q.shape[0], q.shape[-1], self.h
        dh = d // h
        qh = self.q(self.ln_q(q.reshape(B, d))).view(B, h, dh)
        k = kv[:, :d].reshape(-1, h, dh)  # (N, H, Dh)
        v = kv[:, d:].reshape(-1, h, dh)
        s = (qh.index_select(0, qi) * k.index_select(0, ki)).sum(-1) * dh**-0.5  # (n, H)
        idx = qi[:, None].expand(-1, h)
        top = s.new_full((B, h), -torch.inf).scatter_reduce_(0, idx, s, "amax")  # per query: the softmax shift
        e = torch.exp(s - top.index_select(0, qi))
        w = e / e.new_zeros(B, h).index_add_(0, qi, e).index_select(0, qi)  # (n, H): softmax per query
        a = q.new_zeros(B, h, dh).index_add_(0, qi, w.unsqueeze(-1) * v.index_select(0, ki))  # (B, H, Dh)
        return self.out(a.view(B, d)).view(B, 1, d)


@dataclass
class PyramidState:
    """Per branch b: tokens[b] (B, T_b, d), masks[b] (B, T_b) bool, cls[b] (B, 1, d)."""

    tokens: list[torch.Tensor]
    masks: list[torch.Tensor]
    cls: list[torch.Tensor]


class PyramidArch(nn.Module):
    """Pyramid-parallel encoder, run layer by layer so GEM can interleave it.

    ``init(events (B, L, d), mask (B, L))`` -> state of the age-based branches;
    ``add_search(state, events, hit (B, L))`` -> state with the search branch;
    ``layer(i, state, ctx (B, n_ctx, d))`` -> state, summary (B, n_summary, d);
    with ``search_apart``: ``layer`` runs the age branches only and ``search_tokens(events, B, sel)``
    prepares the search tokens on their own (per candidate);
    ``forward(events, mask, ctx)`` runs every layer with a fixed ctx -> summary.
    """

    def __init__(self, d: int, cfg: PyramidConfig, search_apart: bool = False):
        super().__init__()
        self.cfg = cfg
        # True: layer() runs the age branches only; search_tokens() prepares the search tokens apart.
        self.search_apart = search_apart and cfg.search_len > 0
        nb = cfg.n_branches
        self.segments = cfg.segments()
        # Summary tokens of layer(): without the search branch's CLS when it runs apart.
        self.n_summary = cfg.n_summary - self.search_apart
        self.in_norm = nn.LayerNorm(d)
        self.pool = nn.ModuleList(TokenMerge(d, f) if f > 1 else nn.Identity() for _, _, f in self.segments)
        self.search_len = cfg.search_len
        self.level_emb = nn.Parameter(torch.randn(nb, d) * 0.02)
        self.cls0 = nn.Parameter(torch.randn(nb, d) * 0.02)
        nt = nb - self.search_apart  # branches with transformer layers here
        self.blocks = nn.ModuleList(
            nn.ModuleList(Block(d, cfg.n_heads, cfg.ffn_mult) for _ in range(nt)) for _ in range(cfg.n_layers)
        )
        self.merges = nn.ModuleList(
            nn.ModuleList(TokenMerge(d, cfg.shrink) for _ in range(nt)) for _ in range(max(cfg.n_layers - 1, 0))
        ) if cfg.shrink > 1 else None
        self.pma = nn.ModuleList(PMA(d, cfg.n_pma, cfg.n_heads) for _ in range(cfg.n_layers)) if cfg.n_pma else None
        self.out_norm = nn.LayerNorm(d)

    def init(self, events: torch.Tensor, mask: torch.Tensor) -> PyramidState:
        """The age-based branches. events: (B, L, d) right-aligned, mask: (B, L) bool; L <= max_len.

        They depend on the user only, so a server computes them once per request;
        with a search branch, :meth:`add_search` must follow (it depends on the ad).
        """
        B, L, d = events.shape
        x = self.in_norm(events) * mask.unsqueeze(-1)
        toks, masks = [], []
        for b, (s, e, f) in enumerate(self.segments):
            lo, hi = max(L - e, 0), max(L - s, 0)  # positions of ages [s, e)
            xb, mb = x[:, lo:hi], mask[:, lo:hi]  # (B, n_b, d)
            if f > 1 and xb.shape[1]:
                xb, mb = self.pool[b](xb, mb)  # (B, ceil(n_b / f), d)
            toks.append((xb + self.level_emb[b]) * mb.unsqueeze(-1))
            masks.append(mb)
        cls = [self.cls0[b].expand(B, 1, d) for b in range(len(toks))]
        return PyramidState(toks, masks, cls)

    def add_search(self, st: PyramidState, events: torch.Tensor, hit: torch.Tensor) -> PyramidState:
        """Append the search branch: the most recent ``search_len`` events where ``hit``.

        events: (B_u, L, d) right-aligned, B_u = B or 1; hit: (B, L) bool, False on
        padding. A no-op without a search branch.
        """
        if not self.search_len:
            return st
        sb = self.search_tokens(events, hit.shape[0], recent_positions(hit, self.search_len))
        return PyramidState(st.tokens + sb.tokens, st.masks + sb.masks, st.cls + sb.cls)

    def search_tokens(self, events: torch.Tensor, B: int, sel: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int],
                      tag: torch.Tensor | None = None) -> PyramidState:
        """The search branch alone, one branch of B rows, from a selection of events.

        events: (B_u, L, d) right-aligned, B_u = B or 1 (one user's history shared by
        B candidates, as a server has it); sel = (b, l, pos, K) from
        :func:`recent_positions`: event (b or 0, l) goes to slot pos of row b;
        tag: (n, d) added to the selected events (what the caller knows about each
        match). Only the selected events are gathered, normed and tagged (all of it
        per token), so a shared history is never copied B times.
        """
        b, l, pos, K = sel
        d = events.shape[-1]
        x = events[b if events.shape[0] > 1 else torch.zeros_like(b), l]  # (n, d)
        if tag is not None:
            x = x + tag
        xs = x.new_zeros(B, K, d)
        ms = torch.zeros(B, K, dtype=torch.bool, device=x.device)
        xs[b, pos] = self.search_values(x)
        ms[b, pos] = True
        return PyramidState([xs], [ms], [self.search_cls.expand(B, 1, d)])

    def search_values(self, x: torch.Tensor) -> torch.Tensor:
        """Selected (tagged) events (n, d) -> the search branch's tokens (n, d): LayerNorm + its level embedding."""
        return self.in_norm(x) + self.level_emb[len(self.segments)]

    @property
    def search_cls(self) -> torch.Tensor:
        """(1, 1, d): the search branch's CLS token before any layer."""
        return self.cls0[len(self.segments)].view(1, 1, -1)

    def layer(self, i: int, st: PyramidState, ctx: torch.Tensor) -> tuple[PyramidState, torch.Tensor]:
        """One layer of every branch; ctx: (B, n_ctx, d). Returns (state, summary (B, n_summary, d)).

        A state from :meth:`init` alone gets an empty search branch (no event matches).
        """
        n_age = len(self.segments)
        if not self.search_apart and len(st.tokens) < len(self.blocks[i]):
            B, _, d = st.tokens[0].shape
            st = self.add_search(st, st.tokens[0].new_zeros(B, 0, d), st.masks[0].new_zeros(B, 0))
        if self.search_apart and len(st.tokens) != n_age:
            raise ValueError("with the search branch apart, layer() takes the age branches only")
        toks, masks, cls = [], [], []
        for b in range(len(st.tokens)):
            c, xb, mb = self._branch(i, b, st.cls[b], st.tokens[b], st.masks[b], ctx)
            cls.append(c)
            toks.append(xb)
            masks.append(mb)
        st = PyramidState(toks, masks, cls)
        return st, self.summary(i, st)

    def _branch(self, i: int, b: int, cls: torch.Tensor, xb: torch.Tensor, mb: torch.Tensor,
                ctx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Branch b's layer i: [cls ‖ ctx ‖ tokens] through its block, then the token merge.

        cls (B, 1, d), xb (B, T, d), mb (B, T), ctx (B, n_ctx, d) -> cls, tokens, mask.
        """
        B, P = ctx.shape[0], 1 + ctx.shape[1]
        seq = torch.cat([cls, ctx, xb], dim=1)  # (B, P + T_b, d)
        m = torch.cat([mb.new_ones(B, P), mb], dim=1)
        out = self.blocks[i][b](seq, m)
        xb = out[:, P:] * mb.unsqueeze(-1)
        merge = b < len(self.segments) and xb.shape[1] > self.cfg.min_tokens  # search tokens stay whole
        if self.merges is not None and i < len(self.merges) and merge:
            xb, mb = self.merges[i][b](xb, mb)
        return out[:, :1], xb, mb

    def summary(self, i: int, st: PyramidState) -> torch.Tensor:
        """CLS of every branch ‖ PMA over all tokens ‖ the n_recent latest level-0 tokens."""
        cls = torch.cat(st.cls, dim=1)  # (B, nb, d)
        parts = [cls]
        if self.pma is not None:
            keys = torch.cat([cls] + st.tokens, dim=1)
            km = torch.cat([cls.new_ones(cls.shape[:2], dtype=torch.bool)] + st.masks, dim=1)
            parts.append(self.pma[i](keys, km))  # (B, n_pma, d)
        k = self.cfg.n_recent
        if k:
            x0 = st.tokens[0][:, -k:]
            parts.append(F.pad(x0, (0, 0, k - x0.shape[1], 0)))  # (B, k, d), zeros where absent
        return self.out_norm(torch.cat(parts, dim=1))

    def forward(self, events: torch.Tensor, mask: torch.Tensor, ctx: torch.Tensor,
                hit: torch.Tensor | None = None) -> torch.Tensor:
        """All layers with a fixed ctx -> the last summary. hit: (B, L) bool, the search
        branch's candidates (None: no event matches)."""
        if self.search_apart:
            raise ValueError("forward() runs the whole arch; with the search branch apart, call init / layer / "
                             "search_tokens")
        hit = mask & hit if hit is not None else torch.zeros_like(mask)
        st = self.add_search(self.init(events, mask), events, hit)
        s = None
        for i in range(self.cfg.n_layers):
            st, s = self.layer(i, st, ctx)
        return s
