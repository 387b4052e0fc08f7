"""The model's one batch type, :class:`GemBatch`, and its builder :func:`make_batch`.

A batch holds, for B impressions:

* ``sparse`` -- a TorchRec ``KeyedJaggedTensor`` of the non-sequence ids, keys
  :data:`NONSEQ_KEYS`, already hashed into their tables (one id per key and row
  from :func:`make_batch`; the model also accepts several or none -- they are
  sum-pooled);
* ``dense`` -- (B, D_dense) float32, :data:`DENSE_FEATURES` (log1p counters
  and log recency over the point-in-time history);
* the user's history as jagged columns: ``seq_lengths`` (B,) int64 is the
  single source of truth, ``seq[k]`` (sum_i L_i,) int64 for k in
  :data:`SEQ_KEYS`, oldest event first, no padding;
* ``surface_idx`` (B,) int64 and ``labels`` (B, T) float32.

Ids. Every table reserves row 0 for "missing" (a ``-1`` / ``None`` sentinel).
High-cardinality ids (user, item, advertiser, category, country) are hashed
with a stable splitmix64 of the raw id, salted by the *table* (so the target
ad's item and the same item in the history land on the same row), into
``1 + h % (size - 1)``: new ads get an embedding at once and tables never
grow. Collisions are the price; TorchRec's managed-collision modules would
remove them but tie us to its sharding plans, so hashing is the default.
Small enums (surface, kind, ad format, device, hour, age bucket, time-delta
bucket) map directly to ``1 + code``.

Time deltas. The age of each history event relative to the impression,
``dt = (impression ts - event ts) / 1000`` seconds, is bucketized as
``1 + min(n_dt - 2, floor(log2(1 + dt)))`` -- seconds, minutes, hours, days
and months each get a few buckets.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from torchrec import KeyedJaggedTensor

from opengem.features.types import N_KINDS, JaggedSeq, country_code
from opengem.stream.events import AD_FORMATS, DEFAULT_SURFACES, DEVICES

# Non-sequence id features, in KJT key order.
NONSEQ_KEYS = (
    "user_id", "item_id", "advertiser_id", "category", "ad_format",
    "age_bucket", "country", "device", "hour", "surface",
)
# Per-event history columns (all int64 table rows).
SEQ_KEYS = ("item", "advertiser", "category", "surface", "kind", "dt")
# Which table every id feature uses; shared tables are what makes the target ad
# and the history speak the same language (GEM shares item / category tables).
TABLE_OF = {
    "user_id": "user", "item_id": "item", "advertiser_id": "advertiser", "category": "category",
    "ad_format": "ad_format", "age_bucket": "age_bucket", "country": "country", "device": "device",
    "hour": "hour", "surface": "surface",
    "seq_item": "item", "seq_advertiser": "advertiser", "seq_category": "category",
    "seq_surface": "surface", "seq_kind": "kind", "seq_dt": "dt",
}
_HASHED = frozenset({"user", "item", "advertiser", "category", "country"})

# Dense features, all computed from the point-in-time history in make_batch (never
# from the store's running counters, which would include events after the
# impression -- its own click among them -- when the trainer reads them later).
DENSE_FEATURES = (
    tuple(f"hist_log_count_{i}" for i in range(N_KINDS))
    + ("hist_log_len", "hist_log_recency_s")
    + ("hist_log_same_item", "hist_log_same_advertiser", "hist_log_same_category")
)
N_DENSE = len(DENSE_FEATURES)


@dataclass(frozen=True)
class FeatureConfig:
    """Table sizes (rows, row 0 = missing) and the vocabularies of the enums."""

    surfaces: tuple[str, ...] = DEFAULT_SURFACES  # must match the store's surface codes
    tasks: tuple[str, ...] = ("click", "conversion")  # label columns, funnel order (ESMM)
    # Hashed tables: sized for the simulator's default population; collisions
    # grow slowly past ~ size / 4 distinct ids.
    user_rows: int = 1 << 16
    item_rows: int = 1 << 16
    advertiser_rows: int = 1 << 12
    category_rows: int = 1 << 10
    country_rows: int = 256  # ~250 ISO countries, hashed
    age_bucket_rows: int = 16  # buckets 0..14 kept, others -> missing
    dt_rows: int = 34  # log2 buckets of seconds: up to 2^32 s (> 100 years)

    def rows(self, table: str) -> int:
        fixed = {
            "ad_format": len(AD_FORMATS) + 1, "device": len(DEVICES) + 1, "hour": 25,
            "surface": len(self.surfaces) + 1, "kind": N_KINDS + 1,
        }
        return fixed[table] if table in fixed else getattr(self, f"{table}_rows")

    @property
    def tables(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(TABLE_OF.values()))


# --------------------------------------------------------------------------- hashing


_M1, _M2, _GOLD = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x9E3779B97F4A7C15)


def stable_hash(ids: np.ndarray, rows: int, table: str) -> np.ndarray:
    """Raw int64 ids -> int64 rows in [1, rows); negative ids (missing) -> 0.

    splitmix64(id + salt(table)): identical across processes, platforms and
    releases (unlike Python's ``hash``), so checkpoints stay valid.
    """
    ids = np.asarray(ids, np.int64)
    salt = np.uint64(zlib.crc32(table.encode()))
    with np.errstate(over="ignore"):
        z = ids.astype(np.uint64) + salt * _GOLD
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        z = z ^ (z >> np.uint64(31))
    out = (z % np.uint64(rows - 1)).astype(np.int64) + 1
    return np.where(ids < 0, 0, out)


def _direct(codes: np.ndarray, rows: int) -> np.ndarray:
    """Enum codes 0.. -> rows 1..; negative or too large -> 0 (missing)."""
    codes = np.asarray(codes, np.int64)
    return np.where((codes >= 0) & (codes < rows - 1), codes + 1, 0)


def dt_bucket(dt_ms: np.ndarray, rows: int) -> np.ndarray:
    """(N,) age in ms -> (N,) rows in [1, rows): ``1 + min(rows - 2, floor(log2(1 + s)))``."""
    s = np.maximum(np.asarray(dt_ms, np.float64), 0.0) / 1000.0
    return 1 + np.minimum(rows - 2, np.floor(np.log2(1.0 + s))).astype(np.int64)


def ids_to_rows(feature: str, ids: np.ndarray, cfg: FeatureConfig) -> np.ndarray:
    """Map raw ids / codes of ``feature`` (a key of :data:`TABLE_OF`) to table rows."""
    table = TABLE_OF[feature]
    rows = cfg.rows(table)
    return stable_hash(ids, rows, table) if table in _HASHED else _direct(ids, rows)


# --------------------------------------------------------------------------- batch


@dataclass(frozen=True, eq=False)
class GemBatch:
    """B labelled impressions; see the module docstring for the fields.

    sparse: KJT, keys NONSEQ_KEYS, stride B, values int64 table rows
    dense: (B, D_dense) float32
    seq_lengths: (B,) int64 -- the source of truth for every ``seq`` column
    seq: {k: (sum_i L_i,) int64} for k in SEQ_KEYS, oldest first within a row
    surface_idx: (B,) int64 in [0, n_surfaces)
    labels: (B, T) float32 in {0, 1}
    """

    sparse: KeyedJaggedTensor
    dense: torch.Tensor
    seq_lengths: torch.Tensor
    seq: dict[str, torch.Tensor]
    surface_idx: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.dense.shape[0])

    @property
    def seq_offsets(self) -> torch.Tensor:
        """(B + 1,) int64, derived from ``seq_lengths``."""
        return torch.cat([self.seq_lengths.new_zeros(1), torch.cumsum(self.seq_lengths, 0)])

    def to(self, device: Any) -> "GemBatch":
        return GemBatch(
            sparse=self.sparse.to(device), dense=self.dense.to(device),
            seq_lengths=self.seq_lengths.to(device), seq={k: v.to(device) for k, v in self.seq.items()},
            surface_idx=self.surface_idx.to(device), labels=self.labels.to(device),
        )

    def validate(self, cfg: FeatureConfig | None = None) -> "GemBatch":
        """Raise ValueError unless every field agrees with ``seq_lengths`` / B; return self.

        With ``cfg``, also checks every id is inside its table and the label /
        surface counts.
        """
        B = self.dense.shape[0] if self.dense.ndim == 2 else -1
        if self.dense.ndim != 2 or not self.dense.is_floating_point():
            raise ValueError(f"dense must be (B, D) float, got {tuple(self.dense.shape)} {self.dense.dtype}")
        if not torch.isfinite(self.dense).all():
            raise ValueError("dense has non-finite values")
        for name, t, shape in (("seq_lengths", self.seq_lengths, (B,)), ("surface_idx", self.surface_idx, (B,))):
            if tuple(t.shape) != shape or t.dtype != torch.int64:
                raise ValueError(f"{name} must be {shape} int64, got {tuple(t.shape)} {t.dtype}")
        if self.labels.ndim != 2 or self.labels.shape[0] != B:
            raise ValueError(f"labels must be (B={B}, T), got {tuple(self.labels.shape)}")
        if B and self.seq_lengths.min() < 0:
            raise ValueError("negative sequence length")
        if B and self.surface_idx.min() < 0:
            raise ValueError("negative surface_idx")
        total = int(self.seq_lengths.sum())
        if set(self.seq) != set(SEQ_KEYS):
            raise ValueError(f"seq keys {sorted(self.seq)} != {sorted(SEQ_KEYS)}")
        for k, v in self.seq.items():
            if v.ndim != 1 or v.dtype != torch.int64:
                raise ValueError(f"seq[{k!r}] must be (N,) int64, got {tuple(v.shape)} {v.dtype}")
            if v.numel() != total:
                raise ValueError(f"seq[{k!r}] has {v.numel()} values, seq_lengths sum to {total}")
            if total and v.min() < 0:
                raise ValueError(f"seq[{k!r}] has negative ids")
        kjt = self.sparse
        if tuple(kjt.keys()) != NONSEQ_KEYS:
            raise ValueError(f"sparse keys {kjt.keys()} != {NONSEQ_KEYS}")
        if kjt.stride() != B:
            raise ValueError(f"sparse stride {kjt.stride()} != B={B}")
        kl = kjt.lengths()
        if kl.numel() != len(NONSEQ_KEYS) * B or (kl.numel() and kl.min() < 0):
            raise ValueError("sparse lengths malformed")
        if int(kl.sum()) != kjt.values().numel():
            raise ValueError(f"sparse lengths sum to {int(kl.sum())}, {kjt.values().numel()} values")
        if kjt.values().numel() and kjt.values().min() < 0:
            raise ValueError("sparse has negative ids")
        if cfg is not None:
            if self.labels.shape[1] != len(cfg.tasks):
                raise ValueError(f"labels have {self.labels.shape[1]} tasks, config {len(cfg.tasks)}")
            if B and self.surface_idx.max() >= len(cfg.surfaces):
                raise ValueError("surface_idx out of range")
            for key, jt in kjt.to_dict().items():
                v = jt.values()
                if v.numel() and v.max() >= cfg.rows(TABLE_OF[key]):
                    raise ValueError(f"sparse {key!r} id out of its table")
            for k, v in self.seq.items():
                if v.numel() and v.max() >= cfg.rows(TABLE_OF[f"seq_{k}"]):
                    raise ValueError(f"seq[{k!r}] id out of its table")
        return self


def make_kjt(columns: dict[str, np.ndarray | torch.Tensor]) -> KeyedJaggedTensor:
    """One id per key and row: {key: (B,) int64} in NONSEQ_KEYS order -> KJT."""
    cols = [torch.as_tensor(np.asarray(columns[k]), dtype=torch.int64) for k in NONSEQ_KEYS]
    B = cols[0].numel()
    return KeyedJaggedTensor.from_lengths_sync(
        keys=list(NONSEQ_KEYS), values=torch.cat(cols), lengths=torch.ones(len(cols) * B, dtype=torch.int64),
    )


def _log_recency(now_ms: np.ndarray, last_ts: np.ndarray) -> np.ndarray:
    known = last_ts > np.iinfo(np.int64).min
    dt = np.where(known, np.maximum(now_ms - np.where(known, last_ts, 0), 0), 0) / 1000.0
    return np.where(known, np.log1p(dt), -1.0)  # -1: never seen


def make_batch(
    examples: Sequence[Any],
    seqs: JaggedSeq,
    cfg: Any,
) -> GemBatch:
    """Examples (``opengem.stream.joiner.Example``) + their users' histories -> GemBatch.

    ``seqs`` row i is example i's user history read as of the impression
    (``store.read_batch(user_ids, before_ts=ts, max_len)``, oldest first);
    events at or after the impression time are dropped here as a guard
    against leakage. The dense features are counters over that same
    point-in-time history (per kind, length, recency, and how often the user
    met the target item / advertiser / category), so trainer and server
    compute them identically and nothing after the impression leaks in. ``cfg``: a
    :class:`FeatureConfig` or anything with a ``.features`` one. ``p_click`` /
    ``p_conversion`` are never read.
    """
    cfg = getattr(cfg, "features", cfg)
    B = len(examples)
    if len(seqs) != B:
        raise ValueError(f"{B} examples but {len(seqs)} sequences")
    seqs.validate()
    surf_code = {s: i for i, s in enumerate(cfg.surfaces)}
    dev_code = {s: i for i, s in enumerate(DEVICES)}
    fmt_code = {s: i for i, s in enumerate(AD_FORMATS)}
    opt = lambda v: -1 if v is None else v  # noqa: E731
    ts = np.fromiter((e.ts for e in examples), np.int64, B)
    surface = np.array([surf_code[e.surface] for e in examples], np.int64)
    raw = {
        "user_id": [e.user_id for e in examples],
        "item_id": [e.item_id for e in examples],
        "advertiser_id": [opt(e.advertiser_id) for e in examples],
        "category": [opt(e.category) for e in examples],
        "ad_format": [fmt_code.get(e.ad_format, -1) for e in examples],
        "age_bucket": [opt(e.age_bucket) for e in examples],
        "country": [country_code(e.country) - 1 if e.country else -1 for e in examples],
        "device": [dev_code.get(e.device, -1) for e in examples],
        "hour": [opt(e.hour) for e in examples],
        "surface": surface,
    }
    sparse = make_kjt({k: ids_to_rows(k, np.asarray(v, np.int64), cfg) for k, v in raw.items()})

    # History: drop events not strictly before the impression (leakage guard).
    row = np.repeat(np.arange(B), seqs.lengths)
    keep = seqs.ts < ts[row]
    lengths = np.bincount(row[keep], minlength=B).astype(np.int64)
    seq_np = {
        "item": ids_to_rows("seq_item", seqs.item_id[keep], cfg),
        "advertiser": ids_to_rows("seq_advertiser", seqs.advertiser_id[keep], cfg),
        "category": ids_to_rows("seq_category", seqs.category[keep], cfg),
        "surface": ids_to_rows("seq_surface", seqs.surface[keep], cfg),
        "kind": ids_to_rows("seq_kind", seqs.kind[keep], cfg),
        "dt": dt_bucket(ts[row[keep]] - seqs.ts[keep], cfg.rows("dt")),
    }

    dense = _history_dense(B, row[keep], ts, seqs, keep, raw)
    labels = np.array([[float(getattr(e, t)) for t in cfg.tasks] for e in examples], np.float32).reshape(B, -1)
    return GemBatch(
        sparse=sparse, dense=torch.from_numpy(dense), seq_lengths=torch.from_numpy(lengths),
        seq={k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in seq_np.items()},
        surface_idx=torch.from_numpy(surface), labels=torch.from_numpy(labels),
    ).validate(cfg)


def _history_dense(
    B: int, row: np.ndarray, ts: np.ndarray, seqs: JaggedSeq, keep: np.ndarray, raw: dict[str, Any]
) -> np.ndarray:
    """(B, N_DENSE) float32 from the kept history events (``row``: their example index)."""
    dense = np.zeros((B, N_DENSE), np.float32)
    kinds = seqs.kind[keep].astype(np.int64)
    counts = np.bincount(row * N_KINDS + kinds, minlength=B * N_KINDS).reshape(B, N_KINDS)
    dense[:, :N_KINDS] = np.log1p(counts)
    n = np.bincount(row, minlength=B)
    dense[:, N_KINDS] = np.log1p(n)
    last = np.full(B, np.iinfo(np.int64).min, np.int64)
    np.maximum.at(last, row, seqs.ts[keep])
    dense[:, N_KINDS + 1] = _log_recency(ts, last)
    for j, (col, key) in enumerate((("item_id", "item_id"), ("advertiser_id", "advertiser_id"),
                                     ("category", "category"))):
        target = np.asarray(raw[key], np.int64)
        hit = (getattr(seqs, col)[keep].astype(np.int64) == target[row]) & (target[row] >= 0)
        dense[:, N_KINDS + 2 + j] = np.log1p(np.bincount(row[hit], minlength=B))
    return dense


def synthetic_batch(
    cfg: Any, lengths: Sequence[int], seed: int = 0, labels: np.ndarray | None = None
) -> GemBatch:
    """A random, valid batch with the given history lengths (tests, benchmarks)."""
    cfg = getattr(cfg, "features", cfg)
    rng = np.random.default_rng(seed)
    lengths = np.asarray(lengths, np.int64)
    B, N = len(lengths), int(lengths.sum())
    sparse = make_kjt({k: rng.integers(0, cfg.rows(TABLE_OF[k]), B) for k in NONSEQ_KEYS})
    surface = rng.integers(0, len(cfg.surfaces), B)
    seq = {k: torch.from_numpy(rng.integers(1, cfg.rows(TABLE_OF[f"seq_{k}"]), N)) for k in SEQ_KEYS}
    if labels is None:
        labels = (rng.random((B, len(cfg.tasks))) < 0.3).astype(np.float32)
        labels[:, 1:] *= labels[:, :1]  # conversions only after clicks
    return GemBatch(
        sparse=sparse, dense=torch.from_numpy(rng.normal(size=(B, N_DENSE)).astype(np.float32)),
        seq_lengths=torch.from_numpy(lengths), seq=seq, surface_idx=torch.from_numpy(surface),
        labels=torch.as_tensor(labels, dtype=torch.float32),
    ).validate(cfg)
