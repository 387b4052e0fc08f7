"""A pure-Python in-memory backend (``memory://``) with the RocksDB store's semantics.

For unit tests of code *around* the store (the stream worker, the trainer's
data path) that want no files. It shares the input normalization, offsets and
idempotence logic of :class:`~opengem.features.base.SequenceStoreBase`, and
keeps exactly what the RocksDB store keeps: per user the events that arrived
last, whole ``chunk_events`` at a time (``chunk_events * min(total //
chunk_events, max_events // chunk_events) + total % chunk_events`` of them).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from opengem.features.base import SequenceStoreBase, register_backend
from opengem.features.codec import I64_MIN
from opengem.features.types import N_AD_KINDS, N_KINDS, SEQ_DTYPES, SEQ_FIELDS, EventColumns, ItemFeatures, SeqArrays, UserFeatures


def kept_count(total: int, max_events: int, chunk_events: int) -> int:
    """Events the store keeps for a user after ``total`` appends (arrival order suffix)."""
    C = chunk_events
    return C * min(total // C, max_events // C) + total % C


class MemorySequenceStore(SequenceStoreBase):
    def __init__(self, config: Any = None):
        from opengem.features.store import StoreConfig

        self.config = config or StoreConfig()
        self.surfaces = tuple(self.config.surfaces)
        self._offsets: dict[int, int] = {}
        self._events: dict[int, list[tuple[int, ...]]] = {}  # uid -> rows in arrival order
        self._users: dict[int, dict[str, Any]] = {}
        self._items: dict[int, dict[str, Any]] = {}

    def applied_offset(self, partition: int) -> int | None:
        return self._offsets.get(int(partition))

    def _commit(self, cols: EventColumns, offsets: dict[int, int]) -> None:
        cfg = self.config
        rows = zip(*(getattr(cols, f).tolist() for f in (
            "user_id", "ts", "item_id", "surface", "kind", "category", "advertiser_id",
            "age_bucket", "country", "device", "ad_format")))
        for uid, ts, item, surface, kind, cat, adv, age, country, device, fmt in rows:
            seq = self._events.setdefault(uid, [])
            seq.append((ts, item, surface, kind, cat, adv))
            u = self._users.setdefault(uid, {"total": 0, "counts": [0] * N_KINDS, "last_ts": I64_MIN,
                                             "age_bucket": -1, "country": 0, "device": -1})
            u["total"] += 1
            u["counts"][kind] += 1
            u["last_ts"] = max(u["last_ts"], ts)
            for k, v, none in (("age_bucket", age, -1), ("country", country, 0), ("device", device, -1)):
                if v != none:
                    u[k] = v
            keep = kept_count(u["total"], cfg.max_events, cfg.chunk_events)
            if len(seq) > keep:
                del seq[: len(seq) - keep]
            if cfg.item_features == "none" or (cfg.item_features == "ads" and kind >= N_AD_KINDS):
                continue
            it = self._items.setdefault(item, {"counts": [0] * N_KINDS, "last_ts": I64_MIN,
                                               "advertiser_id": -1, "category": -1, "ad_format": -1})
            it["counts"][kind] += 1
            it["last_ts"] = max(it["last_ts"], ts)
            for k, v in (("advertiser_id", adv), ("category", cat), ("ad_format", fmt)):
                if v != -1:
                    it[k] = v
        self._offsets.update(offsets)

    def _read_many(self, uids: np.ndarray, before: np.ndarray | None, max_len: int | None) -> list[SeqArrays]:
        out = []
        for i, uid in enumerate(uids.tolist()):
            seq = self._events.get(uid, [])
            if before is not None:
                b = int(before[i])
                seq = [e for e in seq if e[0] < b]
            seq = sorted(seq, key=lambda e: e[0])  # stable: ties keep arrival order
            if max_len is not None:
                seq = seq[max(0, len(seq) - max_len) :] if max_len else []
            cols = list(zip(*seq)) if seq else [[] for _ in SEQ_FIELDS]
            out.append(SeqArrays(*(np.array(c, dtype=dt) for c, dt in zip(cols, SEQ_DTYPES.values()))))
        return out

    def user_features(self, user_ids: Sequence[int] | np.ndarray) -> UserFeatures:
        uids = np.asarray(user_ids, np.int64).reshape(-1).tolist()
        cfg = self.config
        us = [self._users.get(u) for u in uids]
        get = lambda k, d: [d if u is None else u[k] for u in us]  # noqa: E731
        total = get("total", 0)
        return UserFeatures(
            age_bucket=np.array(get("age_bucket", -1), np.int8), country=np.array(get("country", 0), np.uint16),
            device=np.array(get("device", -1), np.int8),
            counts=np.array(get("counts", [0] * N_KINDS), np.int64).reshape(len(uids), N_KINDS),
            n_events=np.array(total, np.int64),
            n_stored=np.array([kept_count(t, cfg.max_events, cfg.chunk_events) for t in total], np.int64),
            last_ts=np.array(get("last_ts", I64_MIN), np.int64),
        )

    def item_features(self, item_ids: Sequence[int] | np.ndarray) -> ItemFeatures:
        items = np.asarray(item_ids, np.int64).reshape(-1).tolist()
        its = [self._items.get(i) for i in items]
        get = lambda k, d: [d if x is None else x[k] for x in its]  # noqa: E731
        return ItemFeatures(
            ad_format=np.array(get("ad_format", -1), np.int8), advertiser_id=np.array(get("advertiser_id", -1), np.int64),
            category=np.array(get("category", -1), np.int32),
            counts=np.array(get("counts", [0] * N_KINDS), np.int64).reshape(len(items), N_KINDS),
            last_ts=np.array(get("last_ts", I64_MIN), np.int64),
        )


register_backend("memory", lambda path="", **kw: MemorySequenceStore(kw.get("config")))
