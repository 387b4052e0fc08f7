"""Array types of the sequence store: what goes in and what comes out.

* :class:`EventColumns` -- a batch of events as NumPy columns, the store's
  input after normalization (:func:`to_columns` accepts ``Event`` objects, a
  dict of NumPy arrays or a pyarrow RecordBatch / Table).
* :class:`SeqArrays` -- one user's sequence, oldest first.
* :class:`JaggedSeq` -- B users' sequences concatenated; ``lengths`` (B,) is
  the single source of truth, ``offsets`` (B + 1,) is derived from it, and
  :meth:`JaggedSeq.validate` checks the whole thing (CONVENTIONS.md).

Missing optional values are sentinels, never NaN: ``-1`` for category,
advertiser_id, age_bucket, device, ad_format; ``0`` for country (a country is
two ASCII letters packed into a uint16: ``ord(c0) << 8 | ord(c1)``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping, Sequence

import numpy as np

from opengem.stream.events import AD_FORMATS, AD_KINDS, DEVICES, KIND_INDEX, KINDS, Event

N_KINDS = len(KINDS)
N_AD_KINDS = len(AD_KINDS)

# The per-event columns a sequence read returns, with their dtypes.
SEQ_DTYPES: dict[str, np.dtype] = {
    "ts": np.dtype(np.int64),  # ms since epoch
    "item_id": np.dtype(np.int64),
    "surface": np.dtype(np.int8),  # index into the store's surfaces
    "kind": np.dtype(np.int8),  # index into KINDS
    "category": np.dtype(np.int32),  # -1: none
    "advertiser_id": np.dtype(np.int64),  # -1: none (organic events)
}
SEQ_FIELDS = tuple(SEQ_DTYPES)


def country_code(c: str | None) -> int:
    """``"US"`` -> uint16 code; None -> 0."""
    if c is None:
        return 0
    b = c.encode("ascii")
    if len(b) != 2:
        raise ValueError(f"country must be two letters, got {c!r}")
    return b[0] << 8 | b[1]


def country_name(code: int) -> str | None:
    return None if code == 0 else chr(code >> 8) + chr(code & 0xFF)


# --------------------------------------------------------------------------- outputs


@dataclass(frozen=True, eq=False)
class SeqArrays:
    """One user's events, oldest first (sorted by ts, ties in arrival order).

    Every field is (L,) with the dtype in :data:`SEQ_DTYPES`.
    """

    ts: np.ndarray
    item_id: np.ndarray
    surface: np.ndarray
    kind: np.ndarray
    category: np.ndarray
    advertiser_id: np.ndarray

    def __len__(self) -> int:
        return len(self.ts)

    @property
    def is_ad(self) -> np.ndarray:
        """(L,) bool: ad kinds are the first ``len(AD_KINDS)`` of KINDS."""
        return self.kind < N_AD_KINDS

    @classmethod
    def empty(cls) -> "SeqArrays":
        return cls(**{k: np.empty(0, dt) for k, dt in SEQ_DTYPES.items()})

    def columns(self) -> dict[str, np.ndarray]:
        return {k: getattr(self, k) for k in SEQ_FIELDS}

    def equals(self, other: "SeqArrays") -> bool:
        return all(np.array_equal(getattr(self, k), getattr(other, k)) for k in SEQ_FIELDS)


@dataclass(frozen=True, eq=False)
class JaggedSeq:
    """B sequences concatenated. ``lengths``: (B,) int64, the source of truth.

    Value columns are (sum_i L_i,) with the dtypes of :data:`SEQ_DTYPES`; row
    ``i`` is ``values[offsets[i]:offsets[i + 1]]``, oldest first.
    """

    lengths: np.ndarray
    ts: np.ndarray
    item_id: np.ndarray
    surface: np.ndarray
    kind: np.ndarray
    category: np.ndarray
    advertiser_id: np.ndarray

    @property
    def offsets(self) -> np.ndarray:
        """(B + 1,) int64, derived from ``lengths``."""
        out = np.zeros(len(self.lengths) + 1, np.int64)
        np.cumsum(self.lengths, out=out[1:])
        return out

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def is_ad(self) -> np.ndarray:
        return self.kind < N_AD_KINDS

    def row(self, i: int) -> SeqArrays:
        off = self.offsets
        a, b = int(off[i]), int(off[i + 1])
        return SeqArrays(**{k: getattr(self, k)[a:b] for k in SEQ_FIELDS})

    @classmethod
    def from_rows(cls, rows: Sequence[SeqArrays]) -> "JaggedSeq":
        lengths = np.fromiter((len(r) for r in rows), np.int64, len(rows))
        cols = {}
        for k, dt in SEQ_DTYPES.items():
            cols[k] = np.concatenate([getattr(r, k) for r in rows]) if rows else np.empty(0, dt)
        return cls(lengths=lengths, **cols)

    def validate(self) -> "JaggedSeq":
        """Raise ValueError unless lengths, values and dtypes agree; return self.

        Also checks that every row is sorted by ts (the store's read contract).
        """
        lengths = self.lengths
        if lengths.ndim != 1 or lengths.dtype != np.int64:
            raise ValueError(f"lengths must be (B,) int64, got {lengths.shape} {lengths.dtype}")
        if len(lengths) and lengths.min() < 0:
            raise ValueError("negative length")
        total = int(lengths.sum())
        for k, dt in SEQ_DTYPES.items():
            v = getattr(self, k)
            if v.ndim != 1 or v.dtype != dt:
                raise ValueError(f"{k} must be (N,) {dt}, got {v.shape} {v.dtype}")
            if len(v) != total:
                raise ValueError(f"{k} has {len(v)} values, lengths sum to {total}")
        off = self.offsets
        if off[-1] != total:
            raise ValueError("offsets do not end at the number of values")
        if total > 1:
            # A decrease of ts is allowed only where a new row starts.
            dec = np.flatnonzero(np.diff(self.ts) < 0) + 1
            starts = off[1:-1]
            if len(dec) and not np.isin(dec, starts).all():
                raise ValueError("ts not sorted within a row")
        return self

    def to_torch(self, device: Any = None) -> dict[str, Any]:
        """Torch tensors: the value columns (sum L,), ``lengths`` (B,), ``offsets`` (B + 1,)."""
        import torch

        out = {k: torch.from_numpy(np.ascontiguousarray(getattr(self, k))).to(device) for k in SEQ_FIELDS}
        out["lengths"] = torch.from_numpy(self.lengths).to(device)
        out["offsets"] = torch.from_numpy(self.offsets).to(device)
        return out

    def to_padded(self, max_len: int | None = None, pad: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Right-aligned dense copies: each column (B, L) with the most recent event last,
        and a (B, L) bool mask of real events. ``L = max_len`` or the longest row."""
        B = len(self.lengths)
        L = int(self.lengths.max()) if max_len is None and B else (max_len or 0)
        lens = np.minimum(self.lengths, L)
        off = self.offsets
        # Column j of row i holds value off[i+1] - L + j when that is inside the row.
        src = off[1:, None] - L + np.arange(L)[None, :]  # (B, L)
        mask = np.arange(L)[None, :] >= (L - lens)[:, None]
        src = np.where(mask, src, 0)
        out = {}
        for k in SEQ_FIELDS:
            v = getattr(self, k)
            d = v[src] if len(v) else np.zeros((B, L), v.dtype)
            d[~mask] = pad
            out[k] = d
        return out, mask


@dataclass(frozen=True, eq=False)
class UserFeatures:
    """Per-user attributes (latest applied value wins) and counters, each (B,) or (B, K)."""

    age_bucket: np.ndarray  # int8, -1 unknown
    country: np.ndarray  # uint16 code (country_code), 0 unknown
    device: np.ndarray  # int8 index into DEVICES, -1 unknown
    counts: np.ndarray  # (B, len(KINDS)) int64: events ever appended, per kind
    n_events: np.ndarray  # int64: events ever appended
    n_stored: np.ndarray  # int64: events currently stored (after retention)
    last_ts: np.ndarray  # int64: largest ts seen, INT64_MIN if none


@dataclass(frozen=True, eq=False)
class ItemFeatures:
    """Per-item attributes, latest applied value wins, and counters (organic items only
    with ``StoreConfig.item_features = "all"``; unknown items read as -1 / zero counts)."""

    ad_format: np.ndarray  # int8 index into AD_FORMATS, -1 unknown
    advertiser_id: np.ndarray  # int64, -1 unknown
    category: np.ndarray  # int32, -1 unknown
    counts: np.ndarray  # (B, len(KINDS)) int64: impressions, clicks, conversions, views, ...
    last_ts: np.ndarray  # int64


# --------------------------------------------------------------------------- input


@dataclass(frozen=True, eq=False)
class EventColumns:
    """A batch of events as columns, in arrival order. All (N,)."""

    user_id: np.ndarray  # int64
    ts: np.ndarray  # int64
    item_id: np.ndarray  # int64
    surface: np.ndarray  # int8 index into the store's surfaces
    kind: np.ndarray  # int8 index into KINDS
    category: np.ndarray  # int32, -1 none
    advertiser_id: np.ndarray  # int64, -1 none
    age_bucket: np.ndarray  # int8, -1 none
    country: np.ndarray  # uint16, 0 none
    device: np.ndarray  # int8, -1 none
    ad_format: np.ndarray  # int8, -1 none

    def __len__(self) -> int:
        return len(self.user_id)

    @classmethod
    def concat(cls, parts: Sequence["EventColumns"]) -> "EventColumns":
        if len(parts) == 1:
            return parts[0]
        return cls(**{f.name: np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(cls)})

    def take(self, idx: np.ndarray) -> "EventColumns":
        return EventColumns(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})


_DTYPES = {f: np.dtype(t) for f, t in [
    ("user_id", np.int64), ("ts", np.int64), ("item_id", np.int64), ("surface", np.int8),
    ("kind", np.int8), ("category", np.int32), ("advertiser_id", np.int64), ("age_bucket", np.int8),
    ("country", np.uint16), ("device", np.int8), ("ad_format", np.int8),
]}
_REQUIRED = ("user_id", "ts", "item_id", "surface", "kind")
_NONE = {"category": -1, "advertiser_id": -1, "age_bucket": -1, "country": 0, "device": -1, "ad_format": -1}


def _enum_maps(surfaces: Sequence[str]) -> dict[str, dict[str, int]]:
    return {
        "surface": {s: i for i, s in enumerate(surfaces)},
        "kind": dict(KIND_INDEX),
        "device": {s: i for i, s in enumerate(DEVICES)},
        "ad_format": {s: i for i, s in enumerate(AD_FORMATS)},
    }


def _map_strings(name: str, values: Sequence[Any], mapping: dict[str, int] | None) -> np.ndarray:
    """Map distinct string values (None allowed) to codes; unknown strings raise."""
    out = np.empty(len(values), np.int64)
    for i, v in enumerate(values):
        if v is None:
            if name in _REQUIRED:
                raise ValueError(f"{name} is required, got null")
            out[i] = _NONE[name]
        elif mapping is None:  # country
            out[i] = country_code(v)
        else:
            try:
                out[i] = mapping[v]
            except KeyError:
                raise ValueError(f"unknown {name} {v!r}; known: {sorted(mapping)}") from None
    return out


def _from_numpy(name: str, a: Any, maps: dict[str, dict[str, int]]) -> np.ndarray:
    dt = _DTYPES[name]
    a = np.asarray(a)
    if a.dtype.kind in "USO" and (name in maps or name == "country"):
        mapping = maps.get(name)
        try:
            uniq, inv = np.unique(a, return_inverse=True)
            codes = _map_strings(name, [None if u is None else str(u) for u in uniq.tolist()], mapping)
            return codes[inv.reshape(-1)].astype(dt)
        except TypeError:  # object array mixing None and str: not sortable
            return _map_strings(name, a.tolist(), mapping).astype(dt)
    if a.dtype.kind == "O":
        return np.array([_NONE.get(name, 0) if v is None else v for v in a.tolist()], dtype=dt)
    if a.dtype.kind == "f":
        if name in _REQUIRED and np.isnan(a).any():
            raise ValueError(f"{name} is required, got NaN")
        a = np.where(np.isnan(a), _NONE.get(name, 0), a)
    if a.dtype.kind == "b":
        return a.astype(dt)
    return a.astype(dt, copy=False)


def _from_arrow(name: str, col: Any, maps: dict[str, dict[str, int]]) -> np.ndarray:
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    dt = _DTYPES[name]
    if pa.types.is_dictionary(col.type) or pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        if not pa.types.is_dictionary(col.type):
            col = pc.dictionary_encode(col)
        idx = col.indices
        if idx.null_count:
            if name in _REQUIRED:
                raise ValueError(f"{name} is required, got null")
            idx = idx.fill_null(-1)
        idx = idx.to_numpy(zero_copy_only=False).astype(np.int64)
        # Map only the dictionary entries some row uses: a batch filtered after
        # validation keeps its dictionary, rejected values (an unknown surface) included.
        words = col.dictionary.to_pylist()
        used = np.unique(idx[idx >= 0])
        codes = np.zeros(len(words), np.int64)
        codes[used] = _map_strings(name, [words[i] for i in used.tolist()], maps.get(name))
        table = np.append(codes, _NONE.get(name, 0))  # index -1 -> the null sentinel
        return table[idx].astype(dt)
    if col.null_count:
        if name in _REQUIRED:
            raise ValueError(f"{name} is required, got null")
        col = col.fill_null(_NONE[name])
    return col.to_numpy(zero_copy_only=False).astype(dt, copy=False)


def to_columns(events: Any, surfaces: Sequence[str]) -> EventColumns:
    """Normalize a batch of events to :class:`EventColumns`.

    ``events``: a sequence of :class:`Event`; a mapping of column name -> array
    (strings or codes for surface / kind / device / ad_format; -1, NaN or None
    for missing optional values); or a pyarrow RecordBatch / Table with the
    Event field names (``opengem.stream.codec.EVENT_SCHEMA``). Columns the
    store does not keep (event_id, request_id, hour, p_click, ...) are ignored;
    ``is_ad`` is implied by ``kind``. Unknown surface / kind names raise ValueError.
    """
    maps = _enum_maps(surfaces)
    n: int
    if events is None:
        events = []
    if isinstance(events, Sequence) and not isinstance(events, (str, bytes)) and (
        len(events) == 0 or isinstance(events[0], Event)
    ):
        rows: Sequence[Event] = events
        n = len(rows)
        cols: dict[str, np.ndarray] = {}
        for name in _DTYPES:
            vals = [getattr(e, name) for e in rows]
            if name in maps or name == "country":
                cols[name] = _map_strings(name, vals, maps.get(name)).astype(_DTYPES[name])
            else:
                cols[name] = np.array([_NONE[name] if v is None else v for v in vals], dtype=_DTYPES[name]).reshape(n)
        return EventColumns(**cols)
    try:
        import pyarrow as pa

        arrow = isinstance(events, (pa.RecordBatch, pa.Table))
    except ImportError:  # pragma: no cover
        arrow = False
    if arrow:
        names = set(events.schema.names)
        n = events.num_rows
        get = lambda k: _from_arrow(k, events.column(k), maps)  # noqa: E731
    elif isinstance(events, Mapping):
        names = set(events)
        n = len(np.asarray(events[_REQUIRED[0]])) if _REQUIRED[0] in events else 0
        get = lambda k: _from_numpy(k, events[k], maps)  # noqa: E731
    else:
        raise TypeError(f"cannot read events from {type(events).__name__}")
    missing = [k for k in _REQUIRED if k not in names]
    if missing:
        raise ValueError(f"missing required columns {missing}")
    cols = {}
    for name, dt in _DTYPES.items():
        if name in names:
            a = get(name)
            if len(a) != n:
                raise ValueError(f"column {name} has {len(a)} rows, expected {n}")
            cols[name] = a
        else:
            cols[name] = np.full(n, _NONE[name], dt)
    return EventColumns(**cols)
