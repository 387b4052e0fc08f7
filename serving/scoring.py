"""The serving lifecycle without gRPC: validate → featurize → score → rank.

Featurization goes through the trainer's own functions where it reads the
store, and is held to the trainer's batch by the parity tests in
``tests/serving`` (CONVENTIONS.md, "Stores and stream"):

* the user's history is read once per request by
  :func:`opengem.model.data.examples_batch` -- the trainer's read
  (``read_batch(user, before_ts=request ts, max_len)``) and batch builder --
  for a one-row *user batch* (history columns, the dense counters);
* the B candidate rows are built as columns (:func:`featurize`): they differ
  from the user row only in the ad's ids (hashed by the same ``ids_to_rows``)
  and the ``hist_log_same_*`` counters (how often the user met this ad /
  advertiser / category), counted over the same history by sorting instead of
  a (B, L) comparison. No per-candidate Python objects: at 500 candidates the
  per-candidate ``Example`` + ``make_batch`` path cost more than the model
  of a DLRM. :func:`candidate_examples` still builds those Examples -- the
  trainer's input for the same request, which the parity tests score.

Scoring (:class:`Scorer`) goes through the model's own split,
``GemModel.encode_user`` once per request and ``GemModel.candidate_logits``
over all candidates in one batch; ``GemModel.represent`` is defined through
the same two halves, so there is no serving mirror of the model. With the
presets' ``seq_conditioning="user"`` the whole sequence arch runs once per
request and per candidate only target attention, the search branch's
selection and Wukong + heads; with ``"target"`` (the ablation) the pyramid's
layers run per candidate. Each loaded version is still checked against the
model's own ``predict`` on a replicated canary request (:func:`canary_check`);
a version where they disagree is served through ``predict`` instead.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch

from opengem.features.types import JaggedSeq, country_name
from opengem.model.batch import DENSE_FEATURES, NONSEQ_KEYS, GemBatch, ids_to_rows, make_kjt
from opengem.model.data import examples_batch
from opengem.model.gem import GemModel
from opengem.model.heads import funnel_probs
from opengem.model.registry import LoadedModel
from opengem.model.wukong import freeze_derived, mlp_precision
from opengem.stream.events import AD_FORMATS, DEVICES, MAX_ID, MIN_TS_MS
from opengem.stream.joiner import Example

log = logging.getLogger(__name__)


class RequestError(ValueError):
    """A request that cannot be scored as sent (gRPC INVALID_ARGUMENT, HTTP 400)."""


# --------------------------------------------------------------------------- request


class AdCandidate(NamedTuple):
    """One ad to score; attributes left None are looked up in the store. Immutable; a named
    tuple rather than a frozen dataclass: a request builds hundreds (~1 vs ~4 us each)."""

    ad_id: int
    advertiser_id: int | None = None
    category: int | None = None
    ad_format: str | None = None
    bid: float = 1.0


class CandidateColumns(NamedTuple):
    """A request's candidates as columns, each (B,): ad_id, advertiser_id and category int64
    (-1: not given), ad_format int64 (an index into AD_FORMATS; -1: not given), bid float64,
    given int64 bits (1 advertiser_id, 2 category, 4 ad_format). Built with a few C-level
    passes (the candidates are tuples); at 500 candidates the per-candidate Python they replace
    cost ~0.9 ms a request (``validate`` 0.58 ms, five attribute passes of ~0.06 ms each)."""

    ad_id: np.ndarray
    advertiser_id: np.ndarray
    category: np.ndarray
    ad_format: np.ndarray
    bid: np.ndarray
    given: np.ndarray


def _int_column(col: tuple[Any, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Ints or None -> (int64 column with -1 for None, bool "given"). Raises TypeError /
    ValueError / OverflowError for anything else (the caller then checks value by value)."""
    n = len(col)
    missing = col.count(None)
    if missing == n:
        return np.full(n, -1, np.int64), np.zeros(n, bool)
    if missing:
        given = np.fromiter((v is not None for v in col), bool, n)
        col = tuple(-1 if v is None else v for v in col)
    else:
        given = np.ones(n, bool)
    if not all(_is_int(v) for v in col):  # no bools, floats or strings through np.array
        raise TypeError("not all ints")
    return np.array(col, np.int64), given


def _is_int(v: Any) -> bool:
    """A Python or NumPy integer, not a bool (np.array would cast floats and bools silently)."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def candidate_columns(cands: Sequence[AdCandidate]) -> CandidateColumns:
    """The candidates as :class:`CandidateColumns`. Raises TypeError / ValueError /
    OverflowError / KeyError for values no column can hold (not ints, an unknown ad format):
    :func:`validate` then reports the first one by candidate."""
    n = len(cands)
    if not n:
        e = np.zeros(0, np.int64)
        return CandidateColumns(e, e, e, e, np.zeros(0), e)
    ad, adv, cat, fmt, bid = zip(*cands)
    ad_id, _ = _int_column(ad)
    if ad_id.min() < 0:  # -1 would read as "not given"
        raise ValueError("negative ad_id")
    advertiser_id, g_adv = _int_column(adv)
    category, g_cat = _int_column(cat)
    g_fmt = np.fromiter((f is not None for f in fmt), bool, n)
    ad_format = np.fromiter((-1 if f is None else _FMT_CODE[f] for f in fmt), np.int64, n)
    if not all(_is_int(b) or isinstance(b, (float, np.floating)) for b in bid):
        raise TypeError("bid not a number")
    given = g_adv.astype(np.int64) + 2 * g_cat + 4 * g_fmt
    return CandidateColumns(ad_id, advertiser_id, category, ad_format, np.array(bid, np.float64), given)


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

    @functools.cached_property
    def columns(self) -> CandidateColumns:
        """:func:`candidate_columns` of the candidates, built once (raises as it does)."""
        return candidate_columns(self.candidates)


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
    bad = _first_bad_candidate(q)
    if bad is None:
        return
    for i, c in enumerate(q.candidates[bad:], start=bad):  # its message, by the rules below
        if c.ad_id is None:
            raise RequestError(f"candidates[{i}].ad_id is required")
        for name, v, hi in (("ad_id", c.ad_id, MAX_ID), ("advertiser_id", c.advertiser_id, MAX_ID),
                            ("category", c.category, 2**31 - 1)):
            if v is not None and not _is_int(v):
                raise RequestError(f"candidates[{i}].{name}={v!r} is not an integer")
            _check_int(f"candidates[{i}].{name}", v, 0, hi)
        if c.ad_format is not None and c.ad_format not in AD_FORMATS:
            raise RequestError(f"candidates[{i}].ad_format={c.ad_format!r} not one of {list(AD_FORMATS)}")
        if not (_is_int(c.bid) or isinstance(c.bid, (float, np.floating))):
            raise RequestError(f"candidates[{i}].bid={c.bid!r} is not a number")
        if not (math.isfinite(c.bid) and c.bid >= 0):
            raise RequestError(f"candidates[{i}].bid={c.bid} must be finite and >= 0")
    # Not reached: whatever the columns cannot hold, the rules above refuse by name.
    raise RequestError(f"candidates[{bad}:] cannot be read as id / attribute / bid columns")


def _first_bad_candidate(q: RankQuery) -> int | None:
    """Index of the first candidate :func:`validate`'s per-candidate rules refuse (None: none),
    checked on the columns; 0 when the columns cannot even be built (then every candidate is
    checked one by one)."""
    try:
        c = q.columns
    except (TypeError, ValueError, OverflowError, KeyError):
        return 0
    ok = (c.ad_id <= MAX_ID) & (c.ad_id >= 0)
    ok &= ((c.given & 1) == 0) | ((c.advertiser_id >= 0) & (c.advertiser_id <= MAX_ID))
    ok &= ((c.given & 2) == 0) | ((c.category >= 0) & (c.category <= 2**31 - 1))
    ok &= np.isfinite(c.bid) & (c.bid >= 0)
    bad = np.flatnonzero(~ok)
    return int(bad[0]) if bad.size else None


# --------------------------------------------------------------------------- featurize


@dataclass(frozen=True, eq=False)
class Attributes:
    """The request's attributes with the store's filled in: user-side scalars, per-candidate columns.

    age / country / device: the user's (None: unknown); ad_id, advertiser_id,
    category, ad_format: (B,) int64 columns, -1 where unknown (ad_format as an
    index into AD_FORMATS).
    """

    age: int | None
    country: str | None
    device: str | None
    ad_id: np.ndarray
    advertiser_id: np.ndarray
    category: np.ndarray
    ad_format: np.ndarray


_FMT_CODE = {f: i for i, f in enumerate(AD_FORMATS)}


def data_version(reader: Any) -> Any:
    """A value that changes whenever what ``reader`` answers may have changed, or None when the
    reader cannot tell (then nothing read from it is cached).

    Every commit of the stream worker advances its shard's applied offsets in the same atomic
    write as the events (features/base.py), so a secondary's offsets after a catch-up say
    whether it sees new data. A :class:`~opengem.features.sharded.ShardedReader`: the offsets of
    every open shard (a shard that opens later changes the value too)."""
    try:
        f = getattr(reader, "applied_offsets", None)
        if callable(f):
            return tuple(sorted(f().items()))
        g = getattr(reader, "shard_offsets", None)  # ShardedReader
        if callable(g):
            return tuple((p, tuple(sorted(offs.items()))) for p, offs in sorted(g().items()))
    except Exception:  # noqa: BLE001 - e.g. a shard closing: then nothing is cached
        log.debug("no data version from %r", reader, exc_info=True)
    return None


class ItemAttributeCache:
    """Ads' attributes (format, advertiser, category) as ``reader.item_features`` last gave
    them, kept until the reader's data changes (:func:`data_version`, checked on every call).

    The store's attributes are "latest value wins", and a secondary reader only sees new
    values after a catch-up that also moves its applied offsets, so a cached value is never
    older than what the reader itself would answer at the start of the call. A catch-up that
    brought anything new empties the cache (which ads changed is not known). Readers without
    offsets are not cached. Thread-safe: entries go into the map of the version read before
    the store was asked, and a map is replaced, never emptied in place."""

    def __init__(self, reader: Any, max_items: int = 1 << 20):
        self.reader, self.max_items = reader, max_items
        self._version: Any = None
        self._map: dict[int, tuple[int, int, int]] = {}
        self.hits = self.misses = 0

    def get(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """ids (n,) int64 -> (ad_format, advertiser_id, category), each (n,) int64, -1 unknown.
        Raises LookupError as ``item_features`` does (no shard open yet)."""
        v = data_version(self.reader)
        if v is None:
            return _item_attributes(self.reader, ids)
        m = self._map
        if v != self._version:
            m = self._map = {}
            self._version = v
        keys = ids.tolist()
        got = [m.get(k) for k in keys]
        miss = [i for i, g in enumerate(got) if g is None]
        self.hits += len(keys) - len(miss)
        self.misses += len(miss)
        if miss:
            fmt, adv, cat = _item_attributes(self.reader, ids[miss])
            if len(m) + len(miss) > self.max_items:
                m = self._map = {}
            for i, row in zip(miss, zip(fmt.tolist(), adv.tolist(), cat.tolist())):
                got[i] = m[keys[i]] = row
        a = np.array(got, np.int64).reshape(len(keys), 3)
        return a[:, 0], a[:, 1], a[:, 2]


def _item_attributes(reader: Any, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``reader.item_features(ids)``'s (ad_format, advertiser_id, category) as int64, -1 unknown."""
    itf = reader.item_features(ids)
    fix = lambda x: np.where(np.asarray(x) >= 0, np.asarray(x, np.int64), -1)  # noqa: E731
    return fix(itf.ad_format), fix(itf.advertiser_id), fix(itf.category)


def attributes(q: RankQuery, reader: Any, items: ItemAttributeCache | None = None) -> Attributes:
    """Attributes the request leaves out come from the store: the user's latest age /
    country / device, each ad's latest advertiser / category / format (through ``items``, a
    cache of ``reader``'s, when given). Users and ads the store never saw keep them unknown
    (cold start). One store call per kind, no per-ad Python beyond reading the request."""
    age, country, device = q.age_bucket, q.country, q.device
    if age is None or country is None or device is None:
        uf = reader.user_features([q.user_id])
        age = age if age is not None else (int(uf.age_bucket[0]) if uf.age_bucket[0] >= 0 else None)
        country = country if country is not None else country_name(int(uf.country[0]))
        device = device if device is not None else (DEVICES[uf.device[0]] if uf.device[0] >= 0 else None)
    col = q.columns
    ad, given = col.ad_id, col.given
    adv, cat, fmt = col.advertiser_id.copy(), col.category.copy(), col.ad_format.copy()  # filled in below
    missing = np.flatnonzero(given != 7)
    if missing.size:
        try:
            found = items.get(ad[missing]) if items is not None else _item_attributes(reader, ad[missing])
        except LookupError:  # no shard open yet: every ad is new
            found = None
        if found is not None:
            s_fmt, s_adv, s_cat = found
            for col, got, bit in ((adv, s_adv, 1), (cat, s_cat, 2), (fmt, s_fmt, 4)):
                fill = (given[missing] & bit) == 0
                col[missing[fill]] = got[fill]
    return Attributes(age, country, device, ad, adv, cat, fmt)


def candidate_examples(q: RankQuery, reader: Any) -> list[Example]:
    """One unlabelled :class:`Example` per candidate, as the joiner would have written it
    (:func:`attributes` filled in): the trainer's input for the same request, which the parity
    tests feed to ``examples_batch``; :func:`featurize` builds the same batch without them."""
    a = attributes(q, reader)
    return [_example(q, a, i) for i in range(len(q.candidates))]


def _example(q: RankQuery, a: Attributes, i: int) -> Example:
    opt = lambda v: None if v < 0 else int(v)  # noqa: E731
    fmt = int(a.ad_format[i])
    return Example(request_id=q.request_id, ts=q.ts_ms, surface=q.surface, user_id=q.user_id,
                   item_id=int(a.ad_id[i]), advertiser_id=opt(a.advertiser_id[i]),
                   ad_format=AD_FORMATS[fmt] if fmt >= 0 else None, category=opt(a.category[i]),
                   age_bucket=a.age, country=a.country, device=a.device, hour=q.hour, click=0, conversion=0,
                   click_ts=None, conversion_ts=None)


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
    # The request it was built from (a student reads its user representation by user id and
    # request time); None for batches built otherwise.
    query: RankQuery | None = None

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


def _count_equal(hist: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """(B,) how many of ``hist`` (L,) equal each target; 0 for targets < 0 (unknown). O((L + B) log L)."""
    s = np.sort(hist.astype(np.int64))
    n = np.searchsorted(s, targets, "right") - np.searchsorted(s, targets, "left")
    return np.where(targets >= 0, n, 0)


def featurize(q: RankQuery, reader: Any, cfg: Any, attrs: Attributes | None = None,
              items: ItemAttributeCache | None = None) -> RequestBatch:
    """A request -> :class:`RequestBatch`, column-wise.

    The user row goes through the trainer's own path (``examples_batch`` on the
    first candidate's example: the store read, the history columns, the dense
    counters). The B candidate rows differ from it only in the ad's ids and the
    ``hist_log_same_*`` counters, so they are built as columns: the user-side
    sparse rows of the user batch repeated, the ad's ids hashed by the same
    ``ids_to_rows``, the counters by sorted counting over the same history
    (``make_batch``'s ``(history == target) & (target >= 0)``). The parity tests
    hold the result to ``examples_batch`` over :func:`candidate_examples`. ``items``: a cache of
    ``reader``'s ad attributes (:class:`ItemAttributeCache`; None: ask the store).
    """
    fc = getattr(cfg, "features", cfg)
    a = attributes(q, reader, items) if attrs is None else attrs
    B = len(a.ad_id)
    rec = _Recording(reader)
    user = examples_batch([_example(q, a, 0)], rec, cfg)
    assert rec.last is not None
    hist = rec.last.row(0)
    before = hist.ts < q.ts_ms  # make_batch's leakage guard, applied the same way
    cols = {k: np.full(B, int(user.sparse[k].values()[0])) for k in NONSEQ_KEYS}  # the user-side rows
    for k, v in (("item_id", a.ad_id), ("advertiser_id", a.advertiser_id), ("category", a.category),
                 ("ad_format", a.ad_format)):
        cols[k] = ids_to_rows(k, v, fc)
    dense = user.dense.expand(B, -1).clone()
    for col, target in (("item_id", a.ad_id), ("advertiser_id", a.advertiser_id), ("category", a.category)):
        j = DENSE_FEATURES.index(f"hist_log_same_{col.removesuffix('_id')}")
        dense[:, j] = torch.from_numpy(np.log1p(_count_equal(getattr(hist, col)[before], target)).astype(np.float32))
    cands = GemBatch(
        sparse=make_kjt(cols), dense=dense, seq_lengths=torch.zeros(B, dtype=torch.int64),
        seq={k: v[:0] for k, v in user.seq.items()}, surface_idx=user.surface_idx.repeat(B),
        labels=torch.zeros(B, user.labels.shape[1]),
    )
    return RequestBatch(user=user, cands=cands, query=q)


# --------------------------------------------------------------------------- score


def shared_logits(m: GemModel, user: GemBatch, cands: GemBatch) -> torch.Tensor:
    """Stage logits (B, n_tasks) of B candidates against one user's history: the model's own
    split, ``encode_user`` once, then ``candidate_logits`` over the candidates in one batch."""
    return m.candidate_logits(m.encode_user(user), cands)


class Scorer:
    """A loaded model version and how to score a :class:`RequestBatch` with it.

    GEM with a sequence arch is scored through the model's own split
    (:func:`shared_logits`): ``encode_user`` on the 1-row user batch, then
    ``candidate_logits`` over all candidates in one batch. ``represent`` is defined
    through the same two halves, so there is no serving copy of the model to drift.
    What the split saves depends on ``seq_conditioning``: with ``"user"`` the whole
    pyramid runs once per request; with ``"target"`` only the history lookup and
    the pyramid's input stage do, and its layers run per candidate.
    """

    def __init__(self, loaded: LoadedModel, precision: str = "fp32"):
        self.loaded = loaded
        m = loaded.model
        freeze_derived(m)  # a served version's weights never change: Wukong keeps what it derives
        # "fp32" | "bf16" (the FM MLPs; wukong.mlp_precision), "auto" resolved by the CPU;
        # canary_check measures what bf16 moves the scores by and falls back to fp32 past a bound
        self.precision = resolve_precision(precision)
        self.precision_error: float | None = None  # max |p_bf16 - p_fp32| on the canary
        mlp_precision(m, self.precision)
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
                return funnel_probs(shared_logits(m, rb.user, rb.cands))
            return m.predict(rb.replicated() if self.uses_history else rb.cands)


# --------------------------------------------------------------------------- students

class StudentScorer(Scorer):
    """A student version (kind "student", model/student.py), scored through its serving head.

    The history part of a student is the user's alone (the mean of the last ``history`` events
    and the most recent one), so it is pooled once per request (``StudentModel.encode_user`` on
    the 1-row user batch) and shared by all candidates (``candidate_raw_logits``), the student's
    counterpart of GEM's split; :meth:`batch` is the trainer's B-row batch for the same request,
    which :func:`canary_check` holds the split to (and falls back to). When the student reads
    representations, the user's GEM representation as of the request time comes from the
    :class:`~opengem.features.representations.RepresentationStore` (``reps``: a secondary reader,
    caught up at most every ``catch_up_s``), by the user and time of ``RequestBatch.query``;
    without a query (a batch built by hand) the representation is "absent", a valid input."""

    def __init__(self, loaded: LoadedModel, reps: Any = None, catch_up_s: float = 0.5):
        super().__init__(loaded)
        self.shared = True  # cleared by canary_check if the split disagrees with predict
        cfg = loaded.model.cfg
        self.history, self.repr_dim = int(cfg.history), int(cfg.repr_dim)
        if self.repr_dim and reps is None:
            raise ValueError(f"student {loaded.version} reads {self.repr_dim}-wide representations: "
                             "it needs the representation store")
        self.reps, self.catch_up_s = reps, catch_up_s
        self._caught_up = -math.inf
        self._lock = threading.Lock()

    def batch(self, rb: RequestBatch) -> GemBatch:
        """The B-row batch the student trains on for this request (history cut to ``history``)."""
        if not self.history:
            return rb.cands
        n = min(rb.history_events, self.history)
        B = len(rb.cands)
        return dataclasses.replace(
            rb.cands, seq_lengths=torch.full((B,), n, dtype=torch.int64),
            seq={k: v[len(v) - n:].repeat(B) for k, v in rb.user.seq.items()},
        )

    def representation(self, q: RankQuery | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, R) float32 representation of the request's user as of its time, (1,) present."""
        if q is None:
            return torch.zeros(1, self.repr_dim), torch.zeros(1, dtype=torch.bool)
        now = time.monotonic()
        if now - self._caught_up >= self.catch_up_s:
            with self._lock:
                if now - self._caught_up >= self.catch_up_s:
                    self.reps.catch_up()
                    self._caught_up = now
        vec, present = self.reps.get([q.user_id], q.ts_ms)
        return torch.from_numpy(vec), torch.from_numpy(present)

    def probs(self, rb: RequestBatch) -> torch.Tensor:
        from opengem.model.student import StudentInputs

        m = self.loaded.model
        b = rb.cands if self.shared else self.batch(rb)
        x: Any = b
        if self.repr_dim:
            vec, present = self.representation(rb.query)
            B = len(b)
            x = StudentInputs(b, vec.expand(B, -1), present.expand(B))
        with torch.inference_mode():
            if self.shared:
                return funnel_probs(m.candidate_raw_logits(m.encode_user(rb.user), x))
            return m.predict(x)


def amx_bf16() -> bool:
    """Whether this CPU has AMX-BF16 tiles (what makes a bfloat16 matmul faster than fp32 here)."""
    try:
        return bool(torch._C._cpu._get_cpu_capability().get("amx_bf16", False))
    except Exception:  # noqa: BLE001 - a private torch API: read the kernel's flags instead
        try:
            with open("/proc/cpuinfo") as f:
                return " amx_bf16" in f.read()
        except OSError:
            return False


def resolve_precision(precision: str) -> str:
    """``[serve] precision`` -> what the model runs ("auto": bf16 where the CPU has AMX-BF16;
    anything else as given: ServeConfig and ``mlp_precision`` refuse what is not fp32 / bf16)."""
    if precision == "auto":
        return "bf16" if amx_bf16() else "fp32"
    return precision


# canary_check: a bf16 version whose canary probabilities move further than this from its own
# fp32 scores is served in fp32 (logged). On a trained base model bfloat16 moved its test
# probabilities by at most 5.5e-4 (bench/precision.py): the bound catches a broken version, not rounding.
BF16_MAX_ERROR = 0.02


def canary_check(scorer: Scorer, atol: float = 1e-5) -> None:
    """Score a fixed canary request (a user with a full history, a new user) and raise
    ValueError unless every score is a finite probability. Where the shared path
    differs from ``predict`` on the replicated batch by more than ``atol`` (both in fp32), the
    version is served through ``predict`` (logged). A bf16 scorer's canary scores are held to
    its fp32 ones: ``precision_error`` is the largest difference; past ``BF16_MAX_ERROR`` the
    version is served in fp32 (logged)."""
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
    model = scorer.loaded.model
    low = scorer.precision == "bf16"
    if low:
        mlp_precision(model, "fp32")  # the checks below in fp32; bf16 is held to them after
    fp32: list[tuple[RequestBatch, torch.Tensor]] = []
    for user in (1, 2):  # 2: never seen
        q = RankQuery(user_id=user, surface=surfaces[0], candidates=cands, ts_ms=t0 + 1000 * n, hour=12)
        rb = dataclasses.replace(featurize(q, store, cfg), query=None)  # no representation read: "absent"
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
        fp32.append((rb, p))
    if low:
        mlp_precision(model, "bf16")
        err = max(float((scorer.probs(rb) - p).abs().max()) for rb, p in fp32)
        scorer.precision_error = err
        if not err <= BF16_MAX_ERROR:  # (a NaN too)
            log.warning("model %s: bf16 scores differ from fp32 by %.2e (> %g); serving it in fp32",
                        scorer.loaded.version, err, BF16_MAX_ERROR)
            mlp_precision(model, "fp32")
            scorer.precision = "fp32"
