"""The sequence store interface and the backend registry.

A backend is chosen by URL (CONVENTIONS.md, "Stores and stream")::

    open_store("rocksdb:///var/opengem/store-0")             # the writer
    open_store("rocksdb:///var/opengem/store-0", reader=True,
               secondary_dir="/tmp/trainer-sec")             # a read-only follower
    open_store("memory://")                                  # pure Python, for unit tests

Every backend gets idempotent, offset-tracked writes from this base class:
:meth:`SequenceStoreBase.batch` collects the events of many Kafka records,
skips records already applied, and hands one concatenated
:class:`~opengem.features.types.EventColumns` plus the new per-partition
offsets to the backend's ``_commit``, which must apply both atomically.
"""

from __future__ import annotations

import abc
from typing import Any, Callable, Iterator, Sequence
from urllib.parse import urlparse

import numpy as np

from opengem.features.types import (
    EventColumns,
    ItemFeatures,
    JaggedSeq,
    SeqArrays,
    UserFeatures,
    to_columns,
)


class StoreBatch:
    """Records collected for one atomic, durable commit (see :meth:`SequenceStoreBase.batch`)."""

    def __init__(self, store: "SequenceStoreBase"):
        self._store = store
        self._parts: list[EventColumns] = []
        self._offsets: dict[int, int] = {}
        self.records = 0  # records accepted
        self.skipped = 0  # records skipped as already applied

    def add(self, events: Any, partition: int, offset: int) -> bool:
        """Add the events of the Kafka record at (partition, offset).

        Returns False (and adds nothing) when that record was already applied:
        its offset is <= the partition's stored offset or one added earlier
        in this batch. Records of one partition must come in offset order.
        """
        partition, offset = int(partition), int(offset)
        cur = self._offsets.get(partition)
        if cur is None:
            cur = self._store.applied_offset(partition)
        if cur is not None and offset <= cur:
            self.skipped += 1
            return False
        cols = to_columns(events, self._store.surfaces)
        if len(cols):
            self._parts.append(cols)
        self._offsets[partition] = offset
        self.records += 1
        return True

    @property
    def n_events(self) -> int:
        return sum(len(p) for p in self._parts)

    def _commit(self) -> int:
        if not self._offsets:
            return 0
        cols = EventColumns.concat(self._parts) if self._parts else to_columns([], self._store.surfaces)
        self._store._commit(cols, dict(self._offsets))
        n = len(cols)
        self._parts, self._offsets = [], {}
        return n


class SequenceStoreBase(abc.ABC):
    """Per-user event sequences, user / item attributes and counters.

    Writes: one writer per store (the stream worker of its shard).
    Reads: :meth:`read` / :meth:`read_batch` are *the* read functions of the
    trainer and of the servers; the writer's own reads run the same code.
    """

    surfaces: tuple[str, ...]
    read_only: bool = False

    # ------------------------------------------------------------------ writes

    def batch(self) -> "_BatchContext":
        """``with store.batch() as b: b.add(events, partition, offset) ...``

        Commits once on leaving the block without an exception (one atomic,
        durable write of the events and the partitions' new offsets); an
        exception discards everything added.
        """
        if self.read_only:
            raise PermissionError("read-only store")
        return _BatchContext(self)

    def apply(self, events: Any, source: tuple[int, int]) -> int:
        """Apply the events of one Kafka record, ``source = (partition, offset)``.

        Returns the number of events applied: 0 when the record was applied
        before (idempotent replay).
        """
        with self.batch() as b:
            if not b.add(events, *source):
                return 0
            return b.n_events

    @abc.abstractmethod
    def applied_offset(self, partition: int) -> int | None:
        """The last applied offset of ``partition`` (None: nothing yet)."""

    @abc.abstractmethod
    def _commit(self, cols: EventColumns, offsets: dict[int, int]) -> None:
        """Apply ``cols`` (arrival order) and set ``offsets``, atomically and durably."""

    # ------------------------------------------------------------------ reads

    def read(self, user_id: int, before_ts: int | None = None, max_len: int | None = None) -> SeqArrays:
        """The user's events with ``ts < before_ts`` (all if None), the most recent
        ``max_len`` of them (all stored if None), oldest first."""
        return self._read_many(np.array([user_id], np.int64), _before(before_ts, 1), max_len)[0]

    def read_batch(
        self, user_ids: Sequence[int] | np.ndarray, before_ts: Any = None, max_len: int | None = None
    ) -> JaggedSeq:
        """:meth:`read` for B users at once. ``before_ts``: None, an int, or (B,) ints."""
        uids = np.asarray(user_ids, np.int64).reshape(-1)
        return JaggedSeq.from_rows(self._read_many(uids, _before(before_ts, len(uids)), max_len))

    @abc.abstractmethod
    def _read_many(self, uids: np.ndarray, before: np.ndarray | None, max_len: int | None) -> list[SeqArrays]:
        """One :class:`SeqArrays` per user; ``before``: (B,) int64 or None."""

    @abc.abstractmethod
    def user_features(self, user_ids: Sequence[int] | np.ndarray) -> UserFeatures: ...

    @abc.abstractmethod
    def item_features(self, item_ids: Sequence[int] | np.ndarray) -> ItemFeatures: ...

    # ------------------------------------------------------------------ lifecycle

    def catch_up(self, force: bool = False) -> bool:
        """Readers: see the writer's latest committed writes (``force``: even when nothing
        seems new). Returns whether anything was replayed (a backend may skip when it knows
        nothing is new). Writers: no-op, False."""
        return False

    def close(self) -> None:
        pass

    def __enter__(self) -> "SequenceStoreBase":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _BatchContext:
    def __init__(self, store: SequenceStoreBase):
        self._batch = StoreBatch(store)

    def __enter__(self) -> StoreBatch:
        return self._batch

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is None:
            self._batch._commit()


def _before(before_ts: Any, n: int) -> np.ndarray | None:
    if before_ts is None:
        return None
    b = np.asarray(before_ts, np.int64)
    if b.ndim == 0:
        return np.full(n, int(b), np.int64)
    if b.shape != (n,):
        raise ValueError(f"before_ts must be None, an int or ({n},), got shape {b.shape}")
    return b


# --------------------------------------------------------------------------- registry

_BACKENDS: dict[str, Callable[..., SequenceStoreBase]] = {}


def register_backend(scheme: str, factory: Callable[..., SequenceStoreBase]) -> None:
    """``factory(path, **kw)`` opens a store for ``<scheme>://<path>`` URLs."""
    _BACKENDS[scheme] = factory


def open_store(url: str, **kw: Any) -> SequenceStoreBase:
    """Open the store at ``url``: ``rocksdb:///abs/path``, ``rocksdb://rel/path``, ``memory://``.

    Keyword arguments go to the backend (``config=``, ``reader=True``,
    ``secondary_dir=``, ``catch_up_interval_s=`` for rocksdb).
    """
    # Import the built-in backends so that they register themselves.
    from opengem.features import memory, store  # noqa: F401

    u = urlparse(url)
    if u.scheme not in _BACKENDS:
        raise ValueError(f"unknown store backend {u.scheme!r} in {url!r}; known: {sorted(_BACKENDS)}")
    path = (u.netloc + u.path) if u.netloc else u.path
    return _BACKENDS[u.scheme](path, **kw)


def backends() -> Iterator[str]:
    from opengem.features import memory, store  # noqa: F401

    return iter(sorted(_BACKENDS))
