"""One read view over the shards of a topic — what the trainer and the servers open.

The stream worker keeps one store per Kafka partition
(``<data_dir>/shards/<topic>/pNNNN/store``). A user's events all live in the
shard of the partition Kafka's default partitioner gives the user's key
(:func:`opengem.stream.producer.partition_of`), so a read is routed there.
Items (ads) are seen by users of every partition: their counters are summed
over shards and their attributes taken from the shard that saw them last.

Readers are RocksDB secondary instances (:meth:`SequenceStore.open_reader`)
that catch up with the worker every ``interval_s``; the read functions are the
store's own, identical for trainer and server (a parity test holds them to it).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from opengem.features.base import SequenceStoreBase, _before
from opengem.features.store import SequenceStore, StoreConfig
from opengem.features.types import ItemFeatures, JaggedSeq, SeqArrays, UserFeatures


def shard_dir(data_dir: str | Path, topic: str, partition: int) -> Path:
    return Path(data_dir) / "shards" / topic / f"p{partition:04d}"


class ShardedReader:
    """Read-only, partition-routed view of every shard of ``topic``.

    ``n_partitions``: the topic's partition count (routing depends on it).
    ``secondary_root``: scratch space for the secondaries (one sub-folder each).
    ``interval_s``: background catch-up period (None: call :meth:`catch_up`).
    ``stores``: partition -> an already open store (tests, or a worker reading its own shards).
    """

    def __init__(self, data_dir: str | Path, n_partitions: int, *, topic: str = "opengem.events",
                 secondary_root: str | Path | None = None, interval_s: float | None = None,
                 config: StoreConfig | None = None, stores: dict[int, SequenceStoreBase] | None = None):
        if n_partitions < 1:
            raise ValueError("n_partitions must be >= 1")
        self.data_dir, self.topic, self.n_partitions = Path(data_dir), topic, n_partitions
        self.secondary_root = Path(secondary_root) if secondary_root else self.data_dir / "readers" / f"r{id(self):x}"
        self.config = config
        self._stores: dict[int, SequenceStoreBase] = dict(stores or {})
        self._owned = set()
        self._lock = threading.Lock()
        self._pcache: dict[int, int] = {}
        self._open_new()
        self._stop = threading.Event()
        self._thread = None
        if interval_s:
            self._thread = threading.Thread(target=self._run, args=(interval_s,), daemon=True,
                                            name="shard-catch-up")
            self._thread.start()

    # -- shards ------------------------------------------------------------------------------
    def _open_new(self) -> None:
        """Open secondaries for shards that appeared since the last look."""
        for p in range(self.n_partitions):
            if p in self._stores:
                continue
            d = shard_dir(self.data_dir, self.topic, p) / "store"
            if (d / "CURRENT").exists():
                s = SequenceStore.open_reader(str(d), str(self.secondary_root / f"p{p:04d}"), self.config)
                with self._lock:
                    self._stores[p] = s
                    self._owned.add(p)

    def shard_offsets(self) -> dict[int, dict[int, int]]:
        """Partition -> the applied source offsets of its open shard (what this reader sees;
        they move with every commit the reader has caught up with, and a shard that opens
        later adds a key)."""
        with self._lock:
            stores = sorted(self._stores.items())
        return {p: s.applied_offsets() for p, s in stores}

    def catch_up(self, force: bool = False) -> bool:
        """Open new shards, catch every shard up (each skips while its writer wrote nothing,
        unless ``force``). Returns whether any shard caught up."""
        self._open_new()
        done = False
        for s in list(self._stores.values()):
            done = bool(s.catch_up(force)) or done
        return done

    def _run(self, interval_s: float) -> None:
        """Every shard once per ``interval_s``, one at a time, evenly spread over the interval.
        rocksdict holds the GIL through a secondary's ``try_catch_up_with_primary`` (measured:
        every other thread of the process stops for it; ~6-12 ms per shard at ~20k events/s into
        the shard, up to ~170 ms when the writer has flushed), so the shards' catch-ups back to
        back would stall a request thread for their sum; staggered it meets at most one. A shard
        whose writer wrote nothing since its last catch-up is skipped (``PrimaryWatch``)."""
        k, n = 0, max(1, len(self._stores))
        while not self._stop.wait(interval_s / n):
            try:
                if k >= n:  # a round done: look for new shards, start the next round
                    self._open_new()
                    k = 0
                with self._lock:
                    order = sorted(self._stores)
                    s = self._stores[order[k]] if k < len(order) else None
                n = max(1, len(order))
                k += 1
                if s is not None:
                    s.catch_up()
            except Exception:  # noqa: BLE001 - a reader must outlive a transient error
                pass

    def partition(self, user_id: int) -> int:
        p = self._pcache.get(user_id)
        if p is None:
            from opengem.stream.producer import partition_of

            if len(self._pcache) > 1_000_000:
                self._pcache.clear()
            p = self._pcache[user_id] = partition_of(int(user_id), self.n_partitions)
        return p

    # -- reads -------------------------------------------------------------------------------
    def read(self, user_id: int, before_ts: int | None = None, max_len: int | None = None) -> SeqArrays:
        s = self._stores.get(self.partition(user_id))
        return SeqArrays.empty() if s is None else s.read(user_id, before_ts, max_len)

    def read_batch(self, user_ids: Sequence[int] | np.ndarray, before_ts: Any = None,
                   max_len: int | None = None) -> JaggedSeq:
        uids = np.asarray(user_ids, np.int64).reshape(-1)
        before = _before(before_ts, len(uids))
        parts = np.fromiter((self.partition(int(u)) for u in uids), np.int64, len(uids))
        rows: list[SeqArrays | None] = [None] * len(uids)
        for p in np.unique(parts).tolist():
            idx = np.flatnonzero(parts == p)
            s = self._stores.get(p)
            if s is None:
                for i in idx:
                    rows[i] = SeqArrays.empty()
                continue
            got = s.read_batch(uids[idx], None if before is None else before[idx], max_len)
            for j, i in enumerate(idx):
                rows[i] = got.row(j)
        return JaggedSeq.from_rows(rows)  # type: ignore[arg-type]

    def user_features(self, user_ids: Sequence[int] | np.ndarray) -> UserFeatures:
        uids = np.asarray(user_ids, np.int64).reshape(-1)
        parts = np.fromiter((self.partition(int(u)) for u in uids), np.int64, len(uids))
        out = _unknown_users(len(uids))
        for p in np.unique(parts).tolist():
            s = self._stores.get(p)
            if s is None:
                continue
            idx = np.flatnonzero(parts == p)
            for k, v in s.user_features(uids[idx]).__dict__.items():
                out[k][idx] = v
        return UserFeatures(**out)

    def item_features(self, item_ids: Sequence[int] | np.ndarray) -> ItemFeatures:
        items = np.asarray(item_ids, np.int64).reshape(-1)
        feats = [s.item_features(items) for s in self._stores.values()]
        if not feats:
            raise LookupError("no shard is open yet")
        counts = sum(f.counts for f in feats)
        last = np.stack([f.last_ts for f in feats])  # (S, B)
        newest = np.argmax(last, axis=0)
        pick = lambda name: np.stack([getattr(f, name) for f in feats])[newest, np.arange(len(items))]  # noqa: E731
        return ItemFeatures(ad_format=pick("ad_format"), advertiser_id=pick("advertiser_id"),
                            category=pick("category"), counts=counts, last_ts=last.max(axis=0))

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            for p in self._owned:
                self._stores[p].close()
            self._stores.clear()
            self._owned.clear()

    def __enter__(self) -> "ShardedReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _unknown_users(n: int) -> dict[str, np.ndarray]:
    """What a store answers for users it never saw (same dtypes as SequenceStore.user_features)."""
    from opengem.features.codec import empty_heads

    h = empty_heads(n)
    return dict(age_bucket=h["age_bucket"].copy(), country=h["country"].copy(), device=h["device"].copy(),
                counts=h["counts"].astype(np.int64), n_events=h["total"].astype(np.int64),
                n_stored=h["kept"].astype(np.int64), last_ts=h["last_ts"].copy())
