"""The serving lifecycle without gRPC: validate → featurize → score → rank.

Featurization goes through the trainer's own functions, so served and trained
scores agree (CONVENTIONS.md, "Stores and stream"; the parity test in
``tests/serving`` holds them to it):

* the user's history is read once per request by
  :func:`opengem.model.data.examples_batch` -- the trainer's read
  (``read_batch(user, before_ts=request ts, max_len)``) and batch builder --
  for a one-row *user batch*;
* the candidates' ids, the request context and the dense features come from
  :func:`opengem.model.batch.make_batch` over the candidates. The only dense
  features that depend on the candidate are the ``hist_log_same_*`` counters
  (how often the user met this ad / advertiser / category); ``make_batch``
  computes them from, per candidate, just the history events that match it
  (equal counts, a fraction of the work). The other dense features are the
  user batch's row.

What is shared across candidates. :class:`Scorer` runs GEM's sequence
*embedding lookup* and the pyramid's *input stage* (LayerNorm, level cut,
chunk pooling: ``PyramidArch.init``) once per request and broadcasts the
result. The pyramid *layers* cannot be shared without changing the model: each
branch prepends the target ad token and a summary of the candidate's
non-sequence features to the history tokens, and attention mixes them into
every token, so from layer 1 on every history token is candidate-specific.
:func:`shared_raw_logits` mirrors ``GemModel.represent`` with that one
difference; each loaded version is checked against the model's own
``predict`` on a canary request (:func:`canary_check`), and a version where
they disagree is served through ``predict`` on a replicated batch instead.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from opengem.features.types import JaggedSeq, SeqArrays, country_name
from opengem.model.batch import DENSE_FEATURES, GemBatch, make_batch
from opengem.model.data import examples_batch
from opengem.model.gem import GemModel
from opengem.model.heads import funnel_probs
from opengem.model.pyramid import PyramidState
from opengem.model.registry import LoadedModel
from opengem.stream.events import AD_FORMATS, DEVICES, MAX_ID, MIN_TS_MS
from opengem.stream.joiner import Example

log = logging.getLogger(__name__)

# Dense features that depend on the candidate (everything else is the user's).
TARGET_DENSE = tuple(i for i, name in enumerate(DENSE_FEATURES) if name.startswith("hist_log_same_"))


class RequestError(ValueError):
    """A request that cannot be scored as sent (gRPC INVALID_ARGUMENT, HTTP 400)."""


# --------------------------------------------------------------------------- request


@dataclass(frozen=True)
class AdCandidate:
    """One ad to score; attributes left None are looked up in the store."""

    ad_id: int
    advertiser_id: int | None = None
    category: int | None = None
    ad_format: str | None = None
    bid: float = 1.0


@dataclass(frozen=True)
class RankQuery:
    """A validated-shape ranking request (values are checked by :func:`validate`)."""

    user_id: int
    surface: str
    candidates: tuple[AdCandidate, ...]
    ts_ms: int
    hour: int | None = None
    device: str | None = None
    country: str | None = None
    age_bucket: int | None = None
    tasks: tuple[str, ...] = ()  # empty: all of the model's
    value_task: str = ""  # empty: the server's default
    request_id: str = ""


def _check_int(what: str, v: int | None, lo: int, hi: int) -> None:
    if v is not None and not lo <= v <= hi:
        raise RequestError(f"{what}={v} out of range [{lo}, {hi}]")


def validate(q: RankQuery, *, surfaces: Sequence[str], tasks: Sequence[str], max_candidates: int,
             max_future_ms: int = 24 * 3600 * 1000, now_ms: int | None = None) -> None:
    """Raise :class:`RequestError` with a message naming the first problem.

    The rules are the event schema's (``opengem.stream.events``), so anything
    the store could have recorded can be scored and nothing else.
    """
    if q.surface not in surfaces:
        raise RequestError(f"unknown surface {q.surface!r}; the model serves {list(surfaces)}")
    if not q.candidates:
        raise RequestError("no candidates")
    if len(q.candidates) > max_candidates:
        raise RequestError(f"{len(q.candidates)} candidates exceed the limit of {max_candidates}")
    _check_int("user_id", q.user_id, 0, MAX_ID)
    now = int(time.time() * 1000) if now_ms is None else now_ms
    _check_int("context.ts_ms", q.ts_ms, MIN_TS_MS, now + max_future_ms)
    _check_int("context.hour", q.hour, 0, 23)
    _check_int("context.age_bucket", q.age_bucket, 0, 7)
    if q.device is not None and q.device not in DEVICES:
        raise RequestError(f"context.device={q.device!r} not one of {list(DEVICES)}")
    if q.country is not None and not (len(q.country) == 2 and q.country.isascii()
                                      and q.country.isalpha() and q.country.isupper()):
        raise RequestError(f"context.country={q.country!r} must be two upper-case letters")
    for t in q.tasks + ((q.value_task,) if q.value_task else ()):
        if t not in tasks:
            raise RequestError(f"unknown task {t!r}; the model has {list(tasks)}")
    for i, c in enumerate(q.candidates):
        _check_int(f"candidates[{i}].ad_id", c.ad_id, 0, MAX_ID)
        _check_int(f"candidates[{i}].advertiser_id", c.advertiser_id, 0, MAX_ID)
        _check_int(f"candidates[{i}].category", c.category, 0, 2**31 - 1)
        if c.ad_format is not None and c.ad_format not in AD_FORMATS:
            raise RequestError(f"candidates[{i}].ad_format={c.ad_format!r} not one of {list(AD_FORMATS)}")
        if not (math.isfinite(c.bid) and c.bid >= 0):
            raise RequestError(f"candidates[{i}].bid={c.bid} must be finite and >= 0")


# --------------------------------------------------------------------------- featurize


def candidate_examples(q: RankQuery, reader: Any) -> list[Example]:
    """One unlabelled :class:`Example` per candidate, as the joiner would have written it.

    Attributes the request leaves out come from the store: the user's latest
    age / country / device, each ad's latest advertiser / category / format.
    Users and ads the store never saw keep them unknown (cold start).
    """
    need_user = q.age_bucket is None or q.country is None or q.device is None
    age, country, device = q.age_bucket, q.country, q.device
    if need_user:
        uf = reader.user_features([q.user_id])
        age = age if age is not None else (int(uf.age_bucket[0]) if uf.age_bucket[0] >= 0 else None)
        country = country if country is not None else country_name(int(uf.country[0]))
        device = device if device is not None else (DEVICES[uf.device[0]] if uf.device[0] >= 0 else None)
    cands = q.candidates
    missing = [i for i, c in enumerate(cands) if c.advertiser_id is None or c.category is None or c.ad_format is None]
    adv = [c.advertiser_id for c in cands]
    cat = [c.category for c in cands]
    fmt = [c.ad_format for c in cands]
    if missing:
        try:
            itf = reader.item_features([cands[i].ad_id for i in missing])
        except LookupError:  # no shard open yet: every ad is new
            itf = None
        if itf is not None:
            for j, i in enumerate(missing):
                if adv[i] is None and itf.advertiser_id[j] >= 0:
                    adv[i] = int(itf.advertiser_id[j])
                if cat[i] is None and itf.category[j] >= 0:
                    cat[i] = int(itf.category[j])
                if fmt[i] is None and itf.ad_format[j] >= 0:
                    fmt[i] = AD_FORMATS[itf.ad_format[j]]
    return [
        Example(request_id=q.request_id, ts=q.ts_ms, surface=q.surface, user_id=q.user_id, item_id=c.ad_id,
                advertiser_id=adv[i], ad_format=fmt[i], category=cat[i], age_bucket=age, country=country,
                device=device, hour=q.hour, click=0, conversion=0, click_ts=None, conversion_ts=None)
        for i, c in enumerate(cands)
    ]


class _Recording:
    """Forwards ``read_batch`` to a store and keeps the answer (the raw history)."""

    def __init__(self, reader: Any):
        self.reader = reader
        self.last: JaggedSeq | None = None

    def read_batch(self, *args: Any, **kw: Any) -> JaggedSeq:
        self.last = self.reader.read_batch(*args, **kw)
        return self.last


@dataclass(frozen=True, eq=False)
class RequestBatch:
    """user: 1-row GemBatch holding the history; cands: B-row GemBatch without it."""

    user: GemBatch
    cands: GemBatch

    @property
    def history_events(self) -> int:
        return int(self.user.seq_lengths[0])

    def replicated(self) -> GemBatch:
        """The B-row batch the trainer would build: every row carries the user's history."""
        B, n = len(self.cands), self.history_events
        return dataclasses.replace(
            self.cands, seq_lengths=torch.full((B,), n, dtype=torch.int64),
            seq={k: v.repeat(B) for k, v in self.user.seq.items()},
        )


def _matching(hist: SeqArrays, examples: Sequence[Example]) -> JaggedSeq:
    """Per example, the history events with its item, advertiser or category (oldest first)."""
    def col(name: str) -> np.ndarray:
        return np.array([-1 if (v := getattr(e, name)) is None else v for e in examples], np.int64)[:, None]

    item, adv, cat = col("item_id"), col("advertiser_id"), col("category")
    hit = ((hist.item_id[None, :] == item)
           | ((hist.advertiser_id[None, :] == adv) & (adv >= 0))
           | ((hist.category[None, :].astype(np.int64) == cat) & (cat >= 0)))  # (B, L)
    rows, ev = np.nonzero(hit)  # row-major: per row in history order
    lengths = np.bincount(rows, minlength=len(examples)).astype(np.int64)
    return JaggedSeq(lengths=lengths, **{k: v[ev] for k, v in hist.columns().items()})


def featurize(examples: Sequence[Example], reader: Any, cfg: Any) -> RequestBatch:
    """Examples of one request (one user, one ts) -> :class:`RequestBatch`."""
    rec = _Recording(reader)
    user = examples_batch(examples[:1], rec, cfg)
    assert rec.last is not None
    hist = rec.last.row(0)
    cands = make_batch(examples, _matching(hist, examples), cfg)
    dense = user.dense.expand(len(examples), -1).clone()
    dense[:, TARGET_DENSE] = cands.dense[:, TARGET_DENSE]
    B = len(examples)
    cands = dataclasses.replace(
        cands, dense=dense, seq_lengths=torch.zeros(B, dtype=torch.int64),
        seq={k: v[:0] for k, v in cands.seq.items()},
    )
    return RequestBatch(user=user, cands=cands)


# --------------------------------------------------------------------------- score


def shared_raw_logits(m: GemModel, user: GemBatch, cands: GemBatch) -> torch.Tensor:
    """``GemModel.raw_logits`` of the replicated batch, with the history embedded and
    pooled once: (B, n_tasks). Mirrors ``GemModel.represent`` line for line."""
    cfg = m.cfg
    nonseq, _, _ = m.sparse(cands, 0)  # (B, F, d): no history lookup
    _, events, mask = m.sparse(user, cfg.pyramid.max_len)  # (1, L, d), (1, L)
    x = m.in_norm(torch.cat([nonseq, m.dense(cands.dense)], dim=1))  # (B, n0, d)
    B = x.shape[0]
    st = m.seq.init(events, mask)  # once per request
    st = PyramidState([t.expand(B, -1, -1) for t in st.tokens], [t.expand(B, -1) for t in st.masks],
                      [t.expand(B, -1, -1) for t in st.cls])
    st = m.add_search(st, user, events.expand(B, -1, -1), mask.expand(B, -1), targets=cands.sparse)
    target = nonseq[:, m._target].sum(1, keepdim=True)  # (B, 1, d)
    if cfg.interleave:
        for i, layer in enumerate(m.wukong.layers):
            if i < cfg.pyramid.n_layers:
                st, s = m.seq.layer(i, st, m._ctx(i, x, target))  # s: (B, n_s, d)
                x = torch.cat([x, torch.sigmoid(m.seq_gate[i]) * s], dim=1)
            x = layer(x)
    else:
        ctx = m._ctx(0, x, target)
        s = None
        for i in range(cfg.pyramid.n_layers):
            st, s = m.seq.layer(i, st, ctx)
        x = torch.cat([x, torch.sigmoid(m.seq_gate[0]) * s], dim=1)
        for layer in m.wukong.layers:
            x = layer(x)
    return m.heads(x.flatten(1), cands.surface_idx)


class Scorer:
    """A loaded model version and how to score a :class:`RequestBatch` with it."""

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        m = loaded.model
        self.uses_history = isinstance(m, GemModel) and m.cfg.use_sequence
        self.shared = self.uses_history  # cleared by canary_check if it disagrees with predict

    @property
    def cfg(self) -> Any:
        return self.loaded.model.cfg

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.cfg.features.tasks)

    @property
    def surfaces(self) -> tuple[str, ...]:
        return tuple(self.cfg.features.surfaces)

    def probs(self, rb: RequestBatch) -> torch.Tensor:
        """(B, n_tasks) impression-level probabilities, float32."""
        m = self.loaded.model
        with torch.inference_mode():
            if self.shared:
                return funnel_probs(shared_raw_logits(m, rb.user, rb.cands))
            return m.predict(rb.replicated() if self.uses_history else rb.cands)


def canary_check(scorer: Scorer, atol: float = 1e-5) -> None:
    """Score a fixed canary request (a user with a full history, a new user) and raise
    ValueError unless every score is a finite probability. Where the shared path
    differs from ``predict`` on the replicated batch by more than ``atol``, the
    version is served through ``predict`` (logged)."""
    from opengem.features.memory import MemorySequenceStore
    from opengem.model.data import history_len
    from opengem.stream.events import Event

    cfg = scorer.cfg
    rng = np.random.default_rng(0)
    surfaces = scorer.surfaces
    n = max(history_len(cfg), 8) + 3
    t0 = 1_700_000_000_000
    store = MemorySequenceStore()
    store.apply([Event(event_id=f"c{i}", user_id=1, ts=t0 + 1000 * i, surface=surfaces[i % len(surfaces)],
                       kind="view", item_id=int(rng.integers(0, 50)), is_ad=False,
                       category=int(rng.integers(0, 20))) for i in range(n)], (0, 0))
    cands = tuple(AdCandidate(ad_id=a, advertiser_id=a % 7, category=a % 20, ad_format=AD_FORMATS[a % 4])
                  for a in range(12))
    for user in (1, 2):  # 2: never seen
        q = RankQuery(user_id=user, surface=surfaces[0], candidates=cands, ts_ms=t0 + 1000 * n, hour=12)
        rb = featurize(candidate_examples(q, store), store, cfg)
        try:
            p = scorer.probs(rb)
        except Exception as e:  # noqa: BLE001 - the shared path may not know a new model part
            if not scorer.shared:
                raise ValueError(f"canary request failed: {type(e).__name__}: {e}") from e
            log.warning("model %s: shared-history scoring failed (%s: %s); serving it through predict",
                        scorer.loaded.version, type(e).__name__, e)
            scorer.shared = False
            p = scorer.probs(rb)
        if p.shape != (len(cands), len(scorer.tasks)) or not torch.isfinite(p).all() \
                or (p < 0).any() or (p > 1).any():
            raise ValueError(f"canary scores are not finite probabilities: {p[:3].tolist()}")
        if scorer.shared:
            with torch.inference_mode():
                ref = scorer.loaded.model.predict(rb.replicated())
            err = float((ref - p).abs().max())
            if err > atol:
                log.warning("model %s: shared-history scoring differs from predict by %.2e; "
                            "serving it through predict", scorer.loaded.version, err)
                scorer.shared = False
