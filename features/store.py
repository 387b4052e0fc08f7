"""The RocksDB (rocksdict) sequence store: the writer and its read-only followers.

What it keeps. Per user: the most recent ``max_events`` events of all kinds
on all surfaces -- ts, item id, surface, kind (``is_ad`` is implied by the
kind), category and advertiser_id (the event's own values, so reads are
point-in-time correct even if an item's attributes change; -1 when absent);
the user's latest attributes (age bucket, country, device) and per-kind
counters of every event ever appended. Per item (own column family; by default
ads only, ``StoreConfig.item_features``): latest ad format, advertiser,
category and per-kind counters (impressions, clicks, conversions, ...). Not kept: event_id,
request_id, hour, p_click / p_conversion (the label joiner's business).
Byte layouts: :mod:`opengem.features.codec`.

On-disk format 2: a shard-wide *item attribute
table* (the first-seen category and advertiser_id of every item, immutable
entries, ``A`` keys written in the same batch as the chunks that use them)
lets a chunk whose events carry those values omit them; heads are stored as
differences, dictionary indices bit-packed. Format 3 adds *tail packs*: :meth:`SequenceStore.compact` moves the tails of
users without sealed chunks (most users of a store of short histories) into
shared values of ~``pack_events`` events, columnar across users with one item
dictionary (``codec.encode_pack``); the user head names the pack and slot
(``pack``, ``slot``). Appends after that add raw segments behind the packed
part; the next merge or seal of that user takes it out of the pack into the
user's own keys; the next compaction rebuilds every pack and deletes the old
ones. Format-1 and format-2 stores are read as they are; a writer that opens
one marks it format 3, after which older code refuses it with a clear
message. On bench/ingest.py's 1M simulator events (mostly short histories)
the sequence column family went from 7.37 (format 1) to ~6.2 (format 2) to
~5.9 bytes per stored event (``bench/store.py --size``).

Writes (the stream worker of the shard, the only writer)::

    store = SequenceStore("/data/store-0")           # or open_store("rocksdb:///data/store-0")
    with store.batch() as b:                          # one WriteBatch, one durable write
        for rec in records:
            b.add(rec.events, rec.partition, rec.offset)  # False: applied before, skipped
    store.applied_offset(0)                           # where the store stands in partition 0

``events``: Event objects, a dict of NumPy columns or a pyarrow RecordBatch
(grouped by user with one stable argsort). An append never rewrites a user's
history: a commit adds one small raw *tail segment* per user and rewrites
the user's fixed-size *head*. When the tail reaches ``chunk_events`` events
they are sealed into an immutable columnar *chunk*; before that, more than
``max_raw_tail`` raw events are merged into one encoded segment, and at
``max_tail_segments`` segments the raw ones are concatenated into one raw
segment (bytes only: nothing decoded or encoded; an encoded segment is moved
along as it is). Sealing drops the oldest chunks beyond ``max_events``.
The writer keeps the heads it wrote in memory (``writer_cache_*``, an id ->
row map searched with NumPy), so a commit reads RocksDB only for heads it
has not seen.

Durability: every commit is one ``WriteBatch`` holding the events *and* the
partitions' offsets, written with ``WriteOptions.sync = True`` by default:
the WAL is fsynced before the commit returns, so the worker may commit its
Kafka offsets right after, and after a crash the store is exactly at a
record boundary it knows (``applied_offset``); replaying from any earlier
offset skips what is already in. ``sync=False`` (one fsync saved per commit)
survives a process crash but can lose the last commits on power loss; that
is safe only if the worker resumes from ``applied_offset + 1`` rather than
from the consumer group's committed offset -- which the stream worker does,
so it commits with ``sync=False`` and calls :meth:`SequenceStore.sync_wal`
on an interval (``IngestConfig``).

Reads -- the same code in the writer and in every reader::

    r = SequenceStore.open_reader("/data/store-0", "/tmp/sec-trainer", interval_s=0.5)
    seq = r.read(user_id, before_ts=impression_ts, max_len=2048)      # SeqArrays, oldest first
    batch = r.read_batch(user_ids, before_ts=ts_array, max_len=2048)  # JaggedSeq

Ordering: events are appended in arrival order and read sorted by ts, ties
in arrival order; ``before_ts`` is strict (``ts < before_ts``). The chunk
directory's min / max ts let a read skip chunks that cannot hold any of the
``max_len`` most recent events before ``before_ts``; late events are merely
read from more chunks. Retention is by arrival: the store keeps the events
that arrived last, ``chunk_events * min(total // chunk_events, max_events //
chunk_events) + total % chunk_events`` of them (whole chunks are dropped);
with ts mostly increasing those are the most recent ``max_events`` by ts.
Attributes: the latest *applied* non-null value wins.

Each store object keeps the sealed chunks and tail segments its reads decoded
(``decoded_cache_bytes``, LRU, default 64 MiB; a user's chunks as one
concatenated run, extended by each newly sealed chunk): their keys are written
once, so a hit is exact, and a repeated read of a user fetches its head and
directory and decodes only what arrived since. A reader must be reopened if
its shard's directory is replaced (rebuilt from the topic), as RocksDB
requires anyway.
"""

from __future__ import annotations

import json
import os
import struct
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from rocksdict import (
    AccessType,
    BlockBasedOptions,
    BottommostLevelCompaction,
    Cache,
    CompactOptions,
    DBCompressionType,
    Options,
    Rdict,
    WriteBatch,
    WriteOptions,
)

from opengem.features import codec
from opengem.features.base import SequenceStoreBase, register_backend
from opengem.features.codec import (
    DIR,
    EMPTY_HEAD,
    EMPTY_ITEM_HEAD,
    HEAD,
    I64_MAX,
    I64_MIN,
    ITEM_HEAD,
    REC,
    parse_fixed,
)
from opengem.features.types import (
    N_AD_KINDS,
    N_KINDS,
    SEQ_DTYPES,
    EventColumns,
    ItemFeatures,
    SeqArrays,
    UserFeatures,
)
from opengem.stream.events import DEFAULT_SURFACES, KINDS

_OFF = struct.Struct("<q")
MAX_EVENTS_LIMIT = 16384
ITEMS_CF = "items"
ITEM_FEATURES = ("ads", "all", "none")  # StoreConfig.item_features


@dataclass(frozen=True)
class StoreConfig:
    # Events kept per user: GEM-style sequence encoders look thousands of events back.
    max_events: int = 4096
    # Events per sealed chunk: small enough that a seal (and retention) moves little data,
    # large enough that the columnar encoding and zstd see enough values; a multiple of it is max_events.
    chunk_events: int = 256
    # Tail segments per user before the raw ones are merged into one: bounds the keys a read fetches.
    max_tail_segments: int = 16
    # Events in raw (uncompressed-record) tail segments before they are merged into an
    # encoded one: bounds the share of a history stored at ~9 instead of ~6 bytes per event.
    max_raw_tail: int = 128
    # Surface names; their index is what reads return. Stored in the DB: new names may only be appended.
    surfaces: tuple[str, ...] = DEFAULT_SURFACES
    # zstd level of SST blocks above the bottom level: short-lived data, cheap CPU.
    zstd_level: int = 3
    # zstd level of the bottom level, which holds ~90 % of the data (all of it after compact()).
    # 1M simulator events, format 2: 9 -> 15 is 2 % fewer bytes; 19 only 0.4 % more, at several
    # times the compaction CPU.
    bottommost_zstd_level: int = 15
    # zstd dictionary trained per bottom-level SST file; 0 disables. On the simulator's data a
    # 16 KiB dictionary made format-2 SSTs 0.6 % *larger* (chunks are byte planes of near-random
    # values: little for a dictionary to share), so it is off.
    zstd_dict_bytes: int = 0
    # SST block size: larger blocks compress better (32 -> 128 KiB: 0.7 % fewer bytes); a user's
    # chunks are adjacent keys anyway, and a warm read touches cached blocks only.
    block_size: int = 128 << 10
    # Decompressed-block cache shared by reads; readers' hot users stay in memory.
    block_cache_bytes: int = 256 << 20
    # Decoded sealed chunks and tail segments (NumPy columns, ~30 B per event) kept by the
    # reads of this process, least recently used evicted: their keys are written once, so a
    # hit is exact, and a read of a hot user fetches and decodes only what changed since
    # (its head and newest tail segments). 0 disables it.
    decoded_cache_bytes: int = 64 << 20
    # Memtable size: heads are rewritten on every commit, so a big memtable absorbs most rewrites.
    write_buffer_bytes: int = 64 << 20
    # fsync the WAL on every commit (see the module docstring: the worker commits Kafka offsets after it).
    sync: bool = True
    # Which items get a head (latest ad format / advertiser / category and per-kind counters;
    # one head write per distinct item per commit): "ads" -- items of ad-kind events
    # (impression, click, conversion), what the server reads (``item_features`` of the
    # candidates); "all" -- organic items too (their views, likes, ... counted per item);
    # "none". True / False (the earlier bool) mean "all" / "none". On bench/ingest.py's 1M
    # simulator events (4 shards, ~25k-event commits) "ads" writes 151k item heads instead of
    # 852k, and the worker's prepare + commit without the broker took 0.70-0.80x the CPU
    # (3 alternating runs, /tmp scripts of issue 3's notes: 94.6k -> 119-134k events/s).
    item_features: str = "ads"
    # Format 2: a chunk whose events carry their items' first-seen category / advertiser_id
    # takes them from the shard's item attribute table (``A`` pages, codec.py) instead of
    # storing them: ~1 byte per event less on the simulator's data, the table costs ~0.3.
    item_attr_table: bool = True
    # Format 3: compact() packs the tails of users without sealed chunks into shared tail
    # packs of about this many events (codec.encode_pack; 0: no packs). Larger packs share
    # more (one item dictionary) but a read of one user fetches the whole pack value:
    # 8192 events is ~30 KiB, 1M simulator events 6.24 -> ~5.9 bytes per stored event.
    pack_events: int = 8192
    # The writer keeps the fixed-size user / item heads it wrote in memory (~200 B each with
    # the dict) so that a commit reads them from RocksDB only on a miss; cleared when full.
    writer_cache_users: int = 1_000_000
    writer_cache_items: int = 1_000_000

    def __post_init__(self) -> None:
        problems = []
        if not 1 <= self.chunk_events <= 65535:
            problems.append("chunk_events must be in 1..65535")
        if not 1 <= self.max_events <= MAX_EVENTS_LIMIT:
            problems.append(f"max_events must be in 1..{MAX_EVENTS_LIMIT}")
        elif self.max_events % self.chunk_events:
            problems.append("max_events must be a multiple of chunk_events")
        if self.max_tail_segments < 1:
            problems.append("max_tail_segments must be >= 1")
        if self.max_raw_tail < 1:
            problems.append("max_raw_tail must be >= 1")
        if isinstance(self.item_features, bool):  # the earlier form of the option
            object.__setattr__(self, "item_features", "all" if self.item_features else "none")
        if self.item_features not in ITEM_FEATURES:
            problems.append(f"item_features must be one of {', '.join(ITEM_FEATURES)} (got {self.item_features!r})")
        if not self.surfaces or len(self.surfaces) * N_KINDS > 256:
            problems.append(f"need 1..{256 // N_KINDS} surfaces (surface and kind share a byte)")
        if problems:
            raise ValueError("; ".join(problems))


def _options(cfg: StoreConfig, *, secondary: bool, cache: Cache) -> Options:
    o = Options(raw_mode=True)
    o.create_if_missing(not secondary)
    o.create_missing_column_families(not secondary)
    o.set_compression_type(DBCompressionType.zstd())
    o.set_compression_options(-14, cfg.zstd_level, 0, 0)
    o.set_bottommost_compression_type(DBCompressionType.zstd())
    o.set_bottommost_compression_options(-14, cfg.bottommost_zstd_level, 0, cfg.zstd_dict_bytes, True)
    if cfg.zstd_dict_bytes:
        o.set_bottommost_zstd_max_train_bytes(100 * cfg.zstd_dict_bytes, True)
    o.set_write_buffer_size(cfg.write_buffer_bytes)
    o.set_level_compaction_dynamic_level_bytes(True)
    o.set_max_background_jobs(2)
    # No bloom filters in the bottom level (~90 % of the keys; 10 bits each was 0.7 % of the
    # bytes): reads there are of keys that exist (a head names them); new ids miss above it.
    o.set_optimize_filters_for_hits(True)
    t = BlockBasedOptions()
    t.set_block_size(cfg.block_size)
    t.set_block_cache(cache)
    t.set_bloom_filter(10, False)  # heads of new users / items are misses: skip SSTs cheaply
    t.set_cache_index_and_filter_blocks(True)
    t.set_pin_l0_filter_and_index_blocks_in_cache(True)
    t.set_format_version(5)
    o.set_block_based_table_factory(t)
    if secondary:
        o.set_max_open_files(-1)  # required by RocksDB secondary instances
    return o


class _HeadCache:
    """The writer's copy of fixed-size heads: id -> row of a growable structured array.

    Only the single writer of a store uses it, and it is updated only after the
    commit that wrote those heads is durable, so it always equals the DB. The
    id -> row map is two sorted arrays searched with NumPy (a large one and a
    small one of recent ids, merged into the large one when it grows past a
    quarter of it): no Python per id.
    """

    def __init__(self, dtype: np.dtype, empty: bytes, capacity: int, parse: Any = None):
        self.dtype, self.empty, self.capacity = dtype, empty, capacity
        # multi-get values -> heads (user heads have two on-disk formats: codec.parse_heads)
        self.parse = parse or (lambda vals: parse_fixed(vals, dtype, empty))
        self.clear()

    def clear(self) -> None:
        # True while every head in the DB is in the cache (a store opened empty, never cleared
        # since): a miss is then a new id, and its head is not looked up in RocksDB.
        self.complete = False
        self.n = 0
        self._maps = [(np.empty(0, np.int64), np.empty(0, np.int64))] * 2  # (sorted ids, rows): main, recent
        self.table = np.zeros(1024, self.dtype)

    def __len__(self) -> int:
        return self.n

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Row of each id, -1 where not cached."""
        out = np.full(len(ids), -1, np.int64)
        for keys, rows in self._maps:
            if len(keys):
                pos = np.minimum(np.searchsorted(keys, ids), len(keys) - 1)
                hit = keys[pos] == ids
                out[hit] = rows[pos[hit]]
        return out

    def fetch(self, ids: np.ndarray, keys: list[bytes], get: Any) -> np.ndarray:
        """Heads of ``ids`` (a writable copy): cached rows, else from the DB."""
        rows = self.rows(ids)
        miss = np.flatnonzero(rows < 0)
        if self.complete:
            get = lambda ks: [None] * len(ks)  # noqa: E731
        if len(miss) == len(ids):
            return self.parse(get(keys))
        heads = self.table[np.maximum(rows, 0)]
        if len(miss):
            heads[miss] = self.parse(get([keys[i] for i in miss.tolist()]))
        return heads

    def store(self, ids: np.ndarray, heads: np.ndarray) -> None:
        """Cache ``heads`` of ``ids`` (distinct)."""
        if self.capacity <= 0:
            self.complete = False
            return
        rows = self.rows(ids)
        new = np.flatnonzero(rows < 0)
        if self.n + len(new) > self.capacity:
            self.clear()
            rows = np.full(len(ids), -1, np.int64)
            new = np.arange(len(ids))
        if len(new):
            rows[new] = np.arange(self.n, self.n + len(new))
            self.n += len(new)
            (mk, mr), (rk, rr) = self._maps
            k = np.concatenate([rk, ids[new].astype(np.int64)])
            r = np.concatenate([rr, rows[new]])
            o = np.argsort(k, kind="stable")
            k, r = k[o], r[o]
            if len(k) > max(4096, len(mk) // 4):
                k, r = np.concatenate([mk, k]), np.concatenate([mr, r])
                o = np.argsort(k, kind="stable")
                self._maps = [(k[o], r[o]), (np.empty(0, np.int64), np.empty(0, np.int64))]
            else:
                self._maps = [(mk, mr), (k, r)]
        if self.n > len(self.table):
            grown = np.zeros(max(self.n, 2 * len(self.table)), self.dtype)
            grown[: len(self.table)] = self.table
            self.table = grown
        self.table[rows] = heads


class _Run:
    """One user's sealed chunks ``first .. stop - 1`` decoded and concatenated: the six
    columns, chunk j's events at ``ends[j - first] : ends[j - first + 1]``. ``breaks``:
    the chunk boundaries where ts goes down (a late event overlapping two chunks), as
    indices ``j - first`` of the chunk after the boundary."""

    __slots__ = ("first", "stop", "ends", "cols", "breaks", "nbytes")

    def __init__(self, first: int, ends: list[int], cols: list[np.ndarray]):
        self.first = first
        self.stop = first + len(ends) - 1
        self.ends = ends
        self.cols = cols
        ts = cols[0]
        self.breaks = [j for j in range(1, len(ends) - 1)
                       if ends[j - 1] < ends[j] < ends[j + 1] and ts[ends[j]] < ts[ends[j] - 1]]
        self.nbytes = sum(c.nbytes for c in cols) + _DecodedCache.ENTRY_OVERHEAD + 8 * len(ends)

    def covers(self, s: int, t: int) -> bool:
        return self.first <= s and t <= self.stop

    def parts(self, s: int, t: int) -> list[list[np.ndarray]]:
        """Chunks ``s .. t - 1`` (covered) as one part (views), or one part per chunk where
        a boundary inside is out of order (so that :func:`_finish` sees it and sorts)."""
        a, z = s - self.first, t - self.first
        if not any(a < j < z for j in self.breaks):
            lo, hi = self.ends[a], self.ends[z]
            return [[c[lo:hi] for c in self.cols]]
        e = self.ends
        return [[c[e[j]:e[j + 1]] for c in self.cols] for j in range(a, z)]


class _DecodedCache:
    """Decoded values of sealed chunks and tail segments (``T`` keys), least recently used
    evicted past ``capacity`` bytes (entries' array bytes plus an overhead each).

    A user's sealed chunks are kept as one :class:`_Run` (key ``R`` + user): the chunks
    its reads needed, decoded and concatenated, so that a latest read of a hot user takes
    one slice of it instead of ~16 chunk entries (a read's concatenation and lookups were
    most of its cost); a new chunk sealed since extends the run by that chunk alone. Tail
    segments (and the chunks of a read whose chunks are not consecutive seqs) are kept per
    key.

    Exact because those keys are written once: a chunk or segment is never rewritten
    under its key (seqs only grow; a merge writes a new segment key and deletes the old
    ones), and a format-2 chunk's category / advertiser_id come from item attribute
    table entries, which never change. A read takes from here what the user's head
    names and fetches only the rest. Readers may run in several threads: one lock.
    """

    ENTRY_OVERHEAD = 800  # bytes per entry besides the arrays' data (six ndarray objects, tuple, key, dict slot)

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._d: OrderedDict[bytes, tuple[Any, int]] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = 0  # chunks and segments read from here / not
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._d)

    def get_many(self, keys: list[bytes]) -> list[list[np.ndarray] | None]:
        out: list[list[np.ndarray] | None] = []
        with self._lock:
            d = self._d
            for k in keys:
                e = d.get(k)
                if e is None:
                    out.append(None)
                else:
                    d.move_to_end(k)
                    out.append(e[0])
            hit = sum(v is not None for v in out)
            self.hits += hit
            self.misses += len(keys) - hit
        return out

    def get_run(self, key: bytes) -> _Run | None:
        with self._lock:
            e = self._d.get(key)
            if e is None:
                return None
            self._d.move_to_end(key)
            return e[0]

    def count(self, hits: int, misses: int) -> None:
        with self._lock:
            self.hits += hits
            self.misses += misses

    def put_many(self, entries: list[tuple[bytes, list[np.ndarray]]]) -> None:
        with self._lock:
            d = self._d
            for k, cols in entries:
                if k in d:
                    continue
                nb = sum(c.nbytes for c in cols) + self.ENTRY_OVERHEAD
                d[k] = (cols, nb)
                self.bytes += nb
            self._evict()

    def put_run(self, key: bytes, run: _Run) -> None:
        """Keep ``run`` under ``key``, replacing what was there."""
        with self._lock:
            old = self._d.pop(key, None)
            if old is not None:
                self.bytes -= old[1]
            self._d[key] = (run, run.nbytes)
            self.bytes += run.nbytes
            self._evict()

    def _evict(self) -> None:
        d = self._d
        while self.bytes > self.capacity and d:
            self.bytes -= d.popitem(last=False)[1][1]

    def clear(self) -> None:
        with self._lock:
            self._d.clear()
            self.bytes = 0


def _latest(dst: np.ndarray, values: np.ndarray, valid: np.ndarray, group: np.ndarray) -> None:
    """dst[g] = the last valid value of group g (rows grouped, in arrival order within a group)."""
    idx = np.flatnonzero(valid)
    if len(idx):
        gi = group[idx]
        last = np.empty(len(idx), bool)
        last[:-1] = gi[1:] != gi[:-1]
        last[-1] = True
        dst[gi[last]] = values[idx[last]]


def _groups(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Stable group-by: (order, unique keys, starts, ends) over ``keys[order]``."""
    order = np.argsort(keys, kind="stable")
    s = keys[order]
    brk = np.flatnonzero(s[1:] != s[:-1]) + 1
    starts = np.concatenate([[0], brk])
    ends = np.concatenate([brk, [len(s)]])
    return order, s[starts], starts, ends


# A secondary catches up at least this often even when the primary's files look unchanged.
FORCE_CATCH_UP_S = 5.0


def _primary_files(path: str) -> tuple | None:
    """(name, size, mtime_ns) of the files a secondary's catch-up replays from the primary at
    ``path`` -- write-ahead logs (``*.log``), ``CURRENT``, ``MANIFEST-*`` -- sorted; None when
    the directory cannot be read (then the caller catches up)."""
    try:
        with os.scandir(path) as it:
            out = []
            for e in it:
                n = e.name
                if n.endswith(".log") or n.startswith("MANIFEST-") or n == "CURRENT":
                    st = e.stat()
                    out.append((n, st.st_size, st.st_mtime_ns))
    except OSError:
        return None
    out.sort()
    return tuple(out)


class PrimaryWatch:
    """Whether a RocksDB secondary of the primary at ``path`` has anything to catch up with.

    rocksdict holds the GIL through ``try_catch_up_with_primary`` -- ~1.2-3 ms per shard even
    with nothing new -- so an idle shard's catch-ups stalled every thread of a server or
    trainer for nothing. What a catch-up replays is in the primary's write-ahead logs
    (appended by every write), ``CURRENT`` and the MANIFEST (every flush or compaction): while
    their names, sizes and modification times are those of the last catch-up
    (:func:`_primary_files`, one directory scan), there is nothing new. Usage::

        go, state = watch.due(force)
        if go:
            db.try_catch_up_with_primary()
            watch.caught_up(state)

    The state is taken before the catch-up, so a write during it is caught up next time; it
    is passed back rather than kept here, so two threads catching up at once cannot record
    each other's. ``force``, an unreadable directory, or ``FORCE_CATCH_UP_S`` since the last
    catch-up (file systems whose attributes lag, e.g. NFS attribute caching) catch up
    whatever the files say.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        self._state: tuple | None = None
        self._at = -float("inf")

    def due(self, force: bool = False) -> tuple[bool, tuple | None]:
        """(whether a catch-up is due, the primary's current files for :meth:`caught_up`)."""
        from opengem.ops import metrics

        state = _primary_files(self.path)
        if force or state is None or state != self._state or time.monotonic() - self._at >= FORCE_CATCH_UP_S:
            return True, state
        metrics.STORE_CATCH_UPS.labels("skipped").inc()
        return False, state

    def caught_up(self, state: tuple | None) -> None:
        """Record a catch-up that started when the files were ``state`` (from :meth:`due`)."""
        from opengem.ops import metrics

        metrics.STORE_CATCH_UPS.labels("done").inc()
        self._state, self._at = state, time.monotonic()


class SequenceStore(SequenceStoreBase):
    """The RocksDB backend. ``SequenceStore(path)`` is the writer;
    :meth:`open_reader` opens a read-only RocksDB secondary instance."""

    def __init__(
        self,
        path: str | os.PathLike,
        config: StoreConfig | None = None,
        *,
        secondary_dir: str | os.PathLike | None = None,
        interval_s: float | None = None,
    ):
        self.config = cfg = config or StoreConfig()
        self.path = str(path)
        self.read_only = secondary_dir is not None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._attrs_lock = threading.Lock()  # one _fetch_attrs at a time (a read thread, the follower)
        self._watch = PrimaryWatch(self.path)  # a secondary's catch_up skips while the primary is unchanged
        cache = Cache(cfg.block_cache_bytes)  # one block cache for both column families
        cfs = {ITEMS_CF: _options(cfg, secondary=self.read_only, cache=cache)}
        if self.read_only:
            Path(secondary_dir).mkdir(parents=True, exist_ok=True)
            self._db = _open_secondary(self.path, _options(cfg, secondary=True, cache=cache), cfs,
                                       str(secondary_dir))
        else:
            Path(self.path).mkdir(parents=True, exist_ok=True)
            self._db = Rdict(self.path, _options(cfg, secondary=False, cache=cache), column_families=cfs)
        # Item heads live in their own column family: a different access pattern
        # (hot, tiny, fixed-size) and their own size accounting.
        self._items = self._db.get_column_family(ITEMS_CF)
        self._items_cf = self._db.get_column_family_handle(ITEMS_CF)
        self._user_cache = _HeadCache(HEAD, EMPTY_HEAD, cfg.writer_cache_users, codec.parse_heads)
        self._decoded = _DecodedCache(cfg.decoded_cache_bytes) if cfg.decoded_cache_bytes > 0 else None
        self._item_cache = _HeadCache(ITEM_HEAD, EMPTY_ITEM_HEAD, cfg.writer_cache_items)
        self._wopts = WriteOptions()
        self._wopts.sync = cfg.sync
        self._get = self._db.get
        self.surfaces = self._check_meta()
        self._attrs = codec.AttrTable()
        self._load_attrs()
        self._pack_seq = self._last_pack_seq() + 1  # the writer's next tail pack
        if not self.read_only:  # an empty store: the caches hold every head the writer will write
            self._user_cache.complete = not _has_prefix(self._db, b"H")
            self._item_cache.complete = not _has_prefix(self._items, b"I")
        if self.read_only and interval_s:
            self._thread = threading.Thread(target=self._follow, args=(float(interval_s),),
                                            name="store-catch-up", daemon=True)
            self._thread.start()

    @classmethod
    def open_reader(
        cls,
        path: str | os.PathLike,
        secondary_dir: str | os.PathLike,
        config: StoreConfig | None = None,
        interval_s: float | None = None,
    ) -> "SequenceStore":
        """A read-only follower of the writer at ``path`` (another process is fine).

        ``secondary_dir``: this reader's own scratch directory (one per reader).
        ``interval_s``: if set, a daemon thread calls :meth:`catch_up` that often.
        """
        return cls(path, config, secondary_dir=secondary_dir, interval_s=interval_s)

    # ------------------------------------------------------------------ meta

    def _check_meta(self) -> tuple[str, ...]:
        cfg = self.config
        raw = self._get(codec.META_KEY)
        want = {"format": codec.FORMAT_VERSION, "chunk_events": cfg.chunk_events,
                "kinds": list(KINDS), "surfaces": list(cfg.surfaces)}
        if raw is None:
            if not self.read_only:
                self._db.put(codec.META_KEY, json.dumps(want).encode(), self._wopts)
            return tuple(cfg.surfaces)
        have = json.loads(raw)
        if have["format"] not in codec.READ_FORMATS:
            raise ValueError(f"store at {self.path} has format={have['format']!r}; this code reads formats "
                             f"{list(codec.READ_FORMATS)}")
        for k in ("chunk_events", "kinds"):
            if have[k] != want[k]:
                raise ValueError(f"store at {self.path} has {k}={have[k]!r}, config wants {want[k]!r}")
        if not self.read_only and have["format"] != codec.FORMAT_VERSION:
            # A format-1 store written on from now on: its new chunks may use the item attribute
            # table, so code that reads only format 1 must refuse it (its format check does).
            have["format"] = codec.FORMAT_VERSION
            self._db.put(codec.META_KEY, json.dumps(have).encode(), self._wopts)
        stored = tuple(have["surfaces"])
        if self.read_only:
            return stored
        if tuple(cfg.surfaces[: len(stored)]) != stored:
            raise ValueError(f"store at {self.path} has surfaces {stored}; configured surfaces must extend them")
        if len(cfg.surfaces) > len(stored):
            self._db.put(codec.META_KEY, json.dumps(want).encode(), self._wopts)
        return tuple(cfg.surfaces)

    # ------------------------------------------------------------------ tail packs

    def _last_pack_seq(self) -> int:
        it = self._db.iter()
        it.seek_for_prev(codec.PACK_PREFIX + b"\xff" * 8)
        k = bytes(it.key()) if it.valid() else b""
        del it
        return int.from_bytes(k[1:9], "big") if k[:1] == codec.PACK_PREFIX else -1

    def _pack_seqs(self) -> list[int]:
        out = []
        it = self._db.iter()
        it.seek(codec.PACK_PREFIX)
        while it.valid():
            k = bytes(it.key())
            if k[:1] != codec.PACK_PREFIX:
                break
            out.append(int.from_bytes(k[1:9], "big"))
            it.next()
        del it
        return out

    def _fetch_packs(self, seqs: Any) -> dict[int, bytes] | None:
        """Tail packs by seq -> {seq: value}; None if one is missing (a read raced a compaction)."""
        seqs = sorted(set(seqs))
        if not seqs:
            return {}
        vals = self._get([codec.pack_key(q) for q in seqs])
        if any(v is None for v in vals):
            return None
        return dict(zip(seqs, vals))

    def _decode_packed(self, refs: list[tuple[int, int, int]], packs: dict[int, bytes]) -> dict[int, list[np.ndarray]] | None:
        """refs (owner, pack seq, slot) -> owner -> the six columns of its packed tail;
        None if the packs name items the attribute table lacks even after a fetch."""
        by_pack: dict[int, list[tuple[int, int]]] = {}
        for owner, q, slot in refs:
            by_pack.setdefault(q, []).append((owner, slot))
        out: dict[int, list[np.ndarray]] = {}
        for q, members in by_pack.items():
            slots = np.array([m[1] for m in members], np.int64)
            for attempt in range(2):
                try:
                    cols, lens = codec.decode_pack(packs[q], slots, self._attrs)
                    break
                except codec.MissingAttrs:
                    if attempt:
                        return None
                    self._fetch_attrs()
            ends = np.cumsum(lens).tolist()
            a = 0
            for (owner, _), b in zip(members, ends):
                out[owner] = [c[a:b] for c in cols]
                a = b
        return out

    def pack_tails(self, users_per_batch: int = 4096) -> int:
        """Move the tails of users without sealed chunks into tail packs (writer only,
        between commits; run by :meth:`compact` after :meth:`merge_tails`).

        A user qualifies when its tail is one encoded segment (or a pack slot) whose every
        event carries its item's entries in the attribute table. Each batch of users
        writes its packs, deletes the users' encoded segments and writes their heads (which
        name pack and slot) in one WriteBatch; the packs that held the old slots are
        deleted at the end (a reader that read a head before that reads again).
        Returns the number of users packed."""
        if self.read_only:
            raise RuntimeError("pack_tails on a read-only store")
        G = self.config.pack_events
        if G <= 0 or not self.config.item_attr_table:
            return 0
        old = set(self._pack_seqs())
        keep: set[int] = set()
        done = 0
        for ids, hkeys, heads in self._head_batches(users_per_batch):
            nseg = heads["seg_hi"] - heads["seg_lo"]
            packed = heads["pack"] > 0
            cand = np.flatnonzero((heads["raw_n"] == 0) & (heads["tail_n"] > 0) & (heads["chunk_hi"] == heads["chunk_lo"])
                                  & (((nseg == 1) & ~packed) | ((nseg == 0) & packed)))
            if not len(cand):
                continue
            zc = cand[~packed[cand]]  # tails in one encoded segment
            skeys = codec.seg_keys(ids[zc], heads["seg_lo"][zc])
            vals = self._get(skeys)
            if any(v is None or v[:1] != codec.SEG_CHUNK for v in vals):
                raise RuntimeError("store corrupt: a tail segment is missing")
            tails = [None] * len(cand)
            skey_of = {}
            for j, v, k in zip(np.flatnonzero(~packed[cand]).tolist(), vals, skeys):
                tails[j] = codec.decode_segment(v, self._attrs)
                skey_of[j] = k
            pj = np.flatnonzero(packed[cand])
            if len(pj):
                pseq = heads["pack"][cand[pj]].astype(np.int64) - 1
                packs = self._fetch_packs(pseq.tolist())
                if packs is None:
                    raise RuntimeError("store corrupt: a tail pack is missing")
                refs = [(int(j), int(q), int(sl)) for j, q, sl in zip(pj, pseq, heads["slot"][cand[pj]])]
                got = self._decode_packed(refs, packs)
                if got is None:
                    raise RuntimeError("store corrupt: a tail pack names items the attribute table lacks")
                for j, cols in got.items():
                    tails[j] = codec.columns_to_rec(cols)
            # only tails whose category / advertiser_id are their items' table entries
            cat_adv = np.concatenate(tails)
            found, tcat, tadv = self._attrs.lookup(cat_adv["item_id"])
            ok_ev = found & (tcat == cat_adv["category"]) & (tadv == cat_adv["advertiser_id"])
            lens = np.array([len(t) for t in tails])
            ok = np.logical_and.reduceat(ok_ev, np.concatenate([[0], np.cumsum(lens)[:-1]]))
            for j in np.flatnonzero(~ok).tolist():
                if packed[cand[j]]:
                    keep.add(int(heads["pack"][cand[j]]) - 1)
            sel = np.flatnonzero(ok)
            if not len(sel):
                continue
            wb = WriteBatch(raw_mode=True)
            # consecutive users (key order) into packs of about G events
            groups, cur, ev = [], [], 0
            for j in sel.tolist():
                if cur and (ev + lens[j] > G or len(cur) >= codec.PACK_MAX_SLOTS):
                    groups.append(cur)
                    cur, ev = [], 0
                cur.append(j)
                ev += int(lens[j])
            groups.append(cur)
            for grp in groups:
                q = self._pack_seq
                if q >= (1 << 32) - 1:
                    raise RuntimeError("store has used every tail pack number")
                self._pack_seq += 1
                blob, slot = codec.encode_pack([tails[j] for j in grp])
                wb.put(codec.pack_key(q), blob)
                for j, sl in zip(grp, slot.tolist()):
                    i = int(cand[j])
                    if j in skey_of:
                        wb.delete(skey_of[j])
                    heads["seg_lo"][i] = heads["seg_hi"][i]
                    heads["pack"][i] = q + 1
                    heads["slot"][i] = sl
            self._write_with_heads(wb, hkeys, cand[sel], ids, heads)
            done += len(sel)
        gone = sorted(old - keep)
        if gone:
            wb = WriteBatch(raw_mode=True)
            for q in gone:
                wb.delete(codec.pack_key(q))
            self._db.write(wb, self._wopts)
        return done

    # ------------------------------------------------------------------ item attribute table

    def _load_attrs(self) -> None:
        """Read the whole item attribute table (the ``A`` keys) into memory."""
        self._attrs = codec.AttrTable()
        self._fetch_attrs()
        self._attrs.fold()

    def _fetch_attrs(self, fold: str = "late") -> None:
        """Add the ``A`` keys after the last one read (a reader meets items that the
        writer added after this reader's last look; :meth:`catch_up` calls it too, so
        that reads seldom have to). Serialized: two concurrent adds could each replace
        the table and lose the other's entries behind an advanced ``last_seq``.
        ``fold`` (codec.AttrTable.add): a read leaves the table's merge to the follower
        ("late"); :meth:`catch_up` merges "soon", before the reads that follow it."""
        with self._attrs_lock:
            t = self._attrs
            it = self._db.iter()
            it.seek(codec.attr_key(t.last_seq + 1))
            while it.valid():
                k = bytes(it.key())
                if k[:1] != codec.ATTR_PREFIX:
                    break
                t.add_key(int.from_bytes(k[1:9], "big"), bytes(it.value()), fold=fold)
                it.next()
            del it
            if fold == "soon" and t.needs_fold("soon"):
                t.fold()

    def _decode_groups(self, blobs: list[bytes]) -> tuple | None:
        """codec.decode_chunk_groups with this store's attribute table; None if the
        chunks name items that the table lacks even after reading its new keys
        (the read raced a catch-up: read again)."""
        for attempt in range(2):
            try:
                return codec.decode_chunk_groups(blobs, self._attrs)
            except codec.MissingAttrs:
                if attempt:
                    return None
                self._fetch_attrs()
        return None

    def _add_attrs(self, wb: WriteBatch, cols: EventColumns) -> None:
        """Enter the items of ``cols`` that the table lacks, with their first values in
        arrival order, as one new ``A`` key in ``wb`` (the chunks that use them go in
        the same batch); merge the small keys when there are too many."""
        t = self._attrs
        items, first = np.unique(cols.item_id, return_index=True)
        new = t.add(items, cols.category[first], cols.advertiser_id[first])
        if not len(new[0]):
            return
        self._merge_attrs(wb, t.to_merge())
        t.last_seq += 1
        wb.put(codec.attr_key(t.last_seq), codec.encode_attrs(*new))
        t.keys[t.last_seq] = len(new[0])

    def _merge_attrs(self, wb: WriteBatch, seqs: list[int]) -> None:
        """Replace the ``A`` keys ``seqs`` (all durable) by one new key, in ``wb``."""
        if len(seqs) < 2:
            return
        t = self._attrs
        old = [codec.attr_key(q) for q in seqs]
        vals = self._get(old)
        if any(v is None for v in vals):
            raise RuntimeError("store corrupt: an item attribute key is missing")
        parts = [codec.decode_attrs(v) for v in vals]
        merged = [np.concatenate([p[j] for p in parts]) for j in range(3)]
        o = np.argsort(merged[0], kind="stable")
        t.last_seq += 1
        wb.put(codec.attr_key(t.last_seq), codec.encode_attrs(*(m[o] for m in merged)))
        for q, k in zip(seqs, old):
            wb.delete(k)
            del t.keys[q]
        t.keys[t.last_seq] = len(o)

    def merge_attr_table(self) -> None:
        """Merge the item attribute table into one key (writer only, between commits; run by
        :meth:`compact`): one sorted key is the smallest form of the table."""
        if self.read_only:
            raise RuntimeError("merge_attr_table on a read-only store")
        self._attrs.fold()
        if len(self._attrs.keys) < 2:
            return
        wb = WriteBatch(raw_mode=True)
        try:
            self._merge_attrs(wb, sorted(self._attrs.keys))
            self._db.write(wb, self._wopts)
        except BaseException:
            self._load_attrs()
            raise

    # ------------------------------------------------------------------ offsets

    def applied_offset(self, partition: int) -> int | None:
        v = self._get(codec.offset_key(partition))
        return None if v is None else _OFF.unpack(v)[0]

    def applied_offsets(self) -> dict[int, int]:
        out = {}
        it = self._db.iter()
        it.seek(codec.OFFSET_PREFIX)
        while it.valid() and it.key().startswith(codec.OFFSET_PREFIX):
            out[int(it.key()[len(codec.OFFSET_PREFIX):])] = _OFF.unpack(it.value())[0]
            it.next()
        return out

    # ------------------------------------------------------------------ writes

    def _commit(self, cols: EventColumns, offsets: dict[int, int]) -> None:
        wb = WriteBatch(raw_mode=True)
        cached: list[tuple[_HeadCache, np.ndarray, np.ndarray]] = []
        try:
            if len(cols):
                if self.config.item_attr_table:
                    self._add_attrs(wb, cols)
                cached = self._write_events(wb, cols)
            for p, o in offsets.items():
                wb.put(codec.offset_key(p), _OFF.pack(o))
            self._db.write(wb, self._wopts)
        except BaseException:
            # Nothing was written; the caches may not hold heads of this batch, and the
            # attribute table may hold entries that are not in the DB.
            self._user_cache.clear()
            self._item_cache.clear()
            self._load_attrs()
            raise
        for cache, ids, heads in cached:
            cache.store(ids, heads)

    def _write_events(self, wb: WriteBatch, cols: EventColumns) -> list[tuple[_HeadCache, np.ndarray, np.ndarray]]:
        """Put everything ``cols`` changes into ``wb``; returns the heads to cache once written."""
        cfg = self.config
        C = cfg.chunk_events
        n = len(cols)
        order, uids, starts, ends = _groups(cols.user_id)
        U = len(uids)
        cnt = ends - starts
        g = np.repeat(np.arange(U), cnt)  # user group of each sorted row
        rec = np.empty(n, REC)
        for f in REC.names:
            rec[f] = getattr(cols, f)[order]
        ts = rec["ts"]
        kind = rec["kind"].astype(np.int64)

        hkeys = codec.head_keys(uids)
        heads = self._user_cache.fetch(uids, hkeys, self._get)
        heads["counts"] += np.bincount(g * N_KINDS + kind, minlength=U * N_KINDS).reshape(U, N_KINDS).astype(np.uint32)
        heads["total"] += cnt.astype(np.uint64)
        heads["last_ts"] = np.maximum(heads["last_ts"], np.maximum.reduceat(ts, starts))
        for name, none in (("age_bucket", -1), ("country", 0), ("device", -1)):
            v = getattr(cols, name)[order]
            _latest(heads[name], v, v != none, g)

        # Users whose tail fills a chunk or holds too many raw events are rebuilt (sealed /
        # encoded); the others get their events as raw records: one new segment each, or,
        # with max_tail_segments segments already, one raw segment merged from the old raw
        # ones by concatenating bytes (nothing decoded or encoded).
        nseg = heads["seg_hi"] - heads["seg_lo"]
        rare = (heads["tail_n"] + cnt >= C) | (heads["raw_n"] + cnt > cfg.max_raw_tail)
        if cfg.max_tail_segments < 2:  # no room for an encoded segment + a merged raw one
            rare |= (nseg >= cfg.max_tail_segments) & (heads["tail_n"] > heads["raw_n"])
        ai = np.flatnonzero(~rare)
        if len(ai):
            tmin = np.minimum.reduceat(ts, starts)[ai]
            tmax = np.maximum.reduceat(ts, starts)[ai]
            heads["tail_min"][ai] = np.minimum(heads["tail_min"][ai], tmin)
            heads["tail_max"][ai] = np.maximum(heads["tail_max"][ai], tmax)
            full = nseg[ai] >= cfg.max_tail_segments
            mi, ci = ai[full], ai[~full]
            buf = rec.tobytes()
            if len(mi):
                self._merge_raw(wb, uids, heads, mi, buf, starts, ends)
            if len(ci):  # the common path: one new tail segment per user
                skeys = codec.seg_keys(uids[ci], heads["seg_hi"][ci])
                heads["seg_hi"][ci] += 1
                R = REC.itemsize
                put = wb.put
                raw = codec.SEG_RAW
                for k, a, b in zip(skeys, (starts[ci] * R).tolist(), (ends[ci] * R).tolist()):
                    put(k, raw + buf[a:b])
            c32 = cnt[ai].astype(np.uint32)
            heads["tail_n"][ai] += c32
            heads["raw_n"][ai] += c32
            heads["kept"][ai] += c32
        ri = np.flatnonzero(rare)
        if len(ri):
            self._rebuild_tails(wb, uids, heads, ri, rec, starts, ends)

        put = wb.put
        for k, v in zip(hkeys, codec.head_values(heads)):
            put(k, v)
        out = [(self._user_cache, uids, heads)]
        if cfg.item_features != "none":
            items = self._write_items(wb, cols, cfg.item_features == "ads")
            if items is not None:
                out.append(items)
        return out

    def _merge_raw(self, wb: WriteBatch, uids: np.ndarray, heads: np.ndarray, mi: np.ndarray, buf: bytes,
                   starts: np.ndarray, ends: np.ndarray) -> None:
        """Users ``mi``: their raw tail segments + this commit's events (``buf``: REC bytes,
        rows grouped by user) -> one raw segment. An encoded first segment (the tail has
        one when ``tail_n > raw_n``) moves to a new key as it is, so that the tail's keys
        stay a contiguous range and every key stays immutable. Updates seg_lo / seg_hi."""
        lo = heads["seg_lo"][mi].astype(np.int64)
        hi = heads["seg_hi"][mi].astype(np.int64)
        has_z = (heads["tail_n"][mi] > heads["raw_n"][mi]) & (heads["pack"][mi] == 0)
        n = (hi - lo).tolist()
        rep = np.repeat(np.arange(len(mi)), n)
        seqs = np.arange(int(rep.size)) - np.repeat(np.cumsum(n) - n, n) + np.repeat(lo, n)
        keys = codec.seg_keys(uids[mi][rep], seqs)
        vals = self._get(keys)
        R = REC.itemsize
        put, delete = wb.put, wb.delete
        raw, z = codec.SEG_RAW, codec.SEG_CHUNK
        pos = 0
        for j, (u, k, a, b, hz, h) in enumerate(zip(uids[mi].tolist(), n, (starts[mi] * R).tolist(),
                                                     (ends[mi] * R).tolist(), has_z.tolist(), hi.tolist())):
            vs = vals[pos : pos + k]
            for key in keys[pos : pos + k]:
                delete(key)
            pos += k
            if any(v is None for v in vs) or (hz and vs[0][:1] != z):
                raise RuntimeError(f"store corrupt: user {u} is missing tail segments")
            if hz:
                put(codec.user_key(b"T", u, h), vs[0])
                vs = vs[1:]
            put(codec.user_key(b"T", u, h + hz), b"".join([raw] + [v[1:] for v in vs] + [buf[a:b]]))
        heads["seg_lo"][mi] = hi
        heads["seg_hi"][mi] = hi + 1 + has_z

    def _rebuild_tails(self, wb: WriteBatch, uids: np.ndarray, heads: np.ndarray, ri: np.ndarray,
                       rec: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> None:
        """Seal full chunks / merge tail segments of the users ``ri``; apply retention.

        All the users at once: their tails (packed part, segments, this commit's events)
        are gathered into one REC array, the encoded segments decoded in one call, and
        every chunk and merged remainder encoded by one :func:`codec.encode_chunks`;
        Python runs per user only to name keys."""
        cfg = self.config
        C, N = cfg.chunk_events, cfg.max_events
        R = REC.itemsize
        m = len(ri)
        hr = heads[ri]
        ukeys = uids[ri].tolist()
        lo = hr["seg_lo"].astype(np.int64)
        hi = hr["seg_hi"].astype(np.int64)
        nseg = hi - lo
        rep = np.repeat(np.arange(m), nseg)
        seqs = np.arange(len(rep)) - np.repeat(np.cumsum(nseg) - nseg, nseg) + lo[rep]
        keys = codec.seg_keys(uids[ri][rep], seqs) + codec.dir_keys(uids[ri])
        vals = self._get(keys)
        segvals, dirvals = vals[: len(rep)], vals[len(rep):]
        if any(v is None for v in segvals):
            u = ukeys[int(rep[[v is None for v in segvals].index(True)])]
            raise RuntimeError(f"store corrupt: user {u} is missing tail segments")
        pk = hr["pack"].astype(np.int64)
        packed: dict[int, list[np.ndarray]] = {}
        if pk.any():
            pj = np.flatnonzero(pk)
            packs = self._fetch_packs((pk[pj] - 1).tolist())
            if packs is None:
                raise RuntimeError("store corrupt: a tail pack is missing")
            packed = self._decode_packed([(int(j), int(pk[j]) - 1, int(hr["slot"][j])) for j in pj], packs)
            if packed is None:
                raise RuntimeError("store corrupt: a tail pack names items the attribute table lacks")
        # Every tail as bytes of REC records, in order: packed part, segments, new events.
        zi = [i for i, v in enumerate(segvals) if v[:1] == codec.SEG_CHUNK]
        zbuf, zoff = b"", [0]
        if zi:
            cols, zlens = codec.decode_chunks([segvals[i][1:] for i in zi], self._attrs)
            zbuf = codec.columns_to_rec(cols).tobytes()
            zoff = (np.concatenate([[0], np.cumsum(zlens)]) * R).tolist()
        zat = dict(zip(zi, range(len(zi))))
        nbuf = rec.tobytes()
        na, nb = (starts[ri] * R).tolist(), (ends[ri] * R).tolist()
        pieces = []
        pos = 0
        for j in range(m):
            if j in packed:
                pieces.append(codec.columns_to_rec(packed[j]).tobytes())
            for i in range(pos, pos + int(nseg[j])):
                z = zat.get(i)
                pieces.append(segvals[i][1:] if z is None else zbuf[zoff[z]:zoff[z + 1]])
            pos += int(nseg[j])
            pieces.append(nbuf[na[j]:nb[j]])
        lens = np.fromiter(map(len, pieces), np.int64, len(pieces)) // R
        pieces_per_user = nseg + 1 + np.isin(np.arange(m), list(packed)).astype(np.int64)
        tlen = np.add.reduceat(lens, np.concatenate([[0], np.cumsum(pieces_per_user)[:-1]])) if m else lens[:0]
        tail = np.frombuffer(b"".join(pieces), REC)
        toff = np.zeros(m, np.int64)
        np.cumsum(tlen[:-1], out=toff[1:])

        ndir = np.fromiter((len(v) if v else 0 for v in dirvals), np.int64, m) // DIR.itemsize
        nseal = tlen // C
        tail_n = tlen - nseal * C
        k_total = ndir + nseal
        k_keep = np.minimum(k_total, (N - tail_n - 1) // C + 1)
        drop = k_total - k_keep
        chunk_lo = hr["chunk_lo"].astype(np.int64)
        chunk_hi = hr["chunk_hi"].astype(np.int64)
        # Sealed chunks that retention keeps (one it would drop at once is never written),
        # then the merged remainders (encoded like a chunk, exceptions allowed).
        crep = np.repeat(np.arange(m), nseal)
        c = np.arange(len(crep)) - np.repeat(np.cumsum(nseal) - nseal, nseal)
        write = (chunk_hi - chunk_lo)[crep] + c >= drop[crep]
        cu, cc = crep[write], c[write]
        rj = np.flatnonzero(tail_n)
        enc_attrs = self._attrs if cfg.item_attr_table else None
        blobs, mn, mx = codec.encode_chunks(
            tail, np.concatenate([toff[cu] + cc * C, toff[rj] + nseal[rj] * C]),
            np.concatenate([np.full(len(cu), C, np.int64), tail_n[rj]]), enc_attrs,
            np.concatenate([np.zeros(len(cu), bool), np.ones(len(rj), bool)]))
        nw = len(cu)
        ents = np.zeros(len(crep), DIR)  # directory entries of all sealed chunks (dropped ones stay 0)
        ents["min"][write], ents["max"][write] = mn[:nw], mx[:nw]
        entb = ents.tobytes()
        D = DIR.itemsize
        eoff = (np.concatenate([[0], np.cumsum(nseal)]) * D).tolist()
        put, delete = wb.put, wb.delete
        for b, u, s in zip(blobs, uids[ri][cu].tolist(), (chunk_hi[cu] + cc).tolist()):
            put(codec.user_key(b"C", u, s), b)
        for j, u, clo, chi, dr, ns, old, a, b in zip(range(m), ukeys, chunk_lo.tolist(), chunk_hi.tolist(),
                                                     drop.tolist(), nseal.tolist(), dirvals, eoff[:-1], eoff[1:]):
            for seq in range(clo, min(clo + dr, chi)):
                delete(codec.user_key(b"C", u, seq))
            if ns or dr:
                d = ((old or b"") + entb[a:b])[dr * D:]
                if d:
                    put(codec.user_key(b"D", u), d)
                else:
                    delete(codec.user_key(b"D", u))
        for k in keys[: len(rep)]:
            delete(k)
        for b, u, s in zip(blobs[nw:], uids[ri][rj].tolist(), hi[rj].tolist()):
            put(codec.user_key(b"T", u, s), codec.SEG_CHUNK + b)
        has_t = tail_n > 0
        hr["seg_lo"] = hi
        hr["seg_hi"] = hi + has_t
        hr["pack"] = 0
        hr["slot"] = 0
        hr["chunk_lo"] = chunk_lo + drop
        hr["chunk_hi"] = chunk_hi + nseal
        hr["tail_n"] = tail_n
        hr["raw_n"] = 0
        tmin = np.full(m, I64_MAX, np.int64)
        tmax = np.full(m, I64_MIN, np.int64)
        tmin[rj], tmax[rj] = mn[nw:], mx[nw:]
        hr["tail_min"] = tmin
        hr["tail_max"] = tmax
        hr["kept"] = k_keep * C + tail_n
        heads[ri] = hr

    def _write_items(self, wb: WriteBatch, cols: EventColumns,
                     ads_only: bool) -> tuple[_HeadCache, np.ndarray, np.ndarray] | None:
        """The item heads of ``cols``' items (``ads_only``: of its ad-kind events' items, from
        those events alone) into ``wb``; None when there are none."""
        sel = np.flatnonzero(cols.kind < N_AD_KINDS) if ads_only else None
        if sel is not None and len(sel) == 0:
            return None
        order, items, starts, ends = _groups(cols.item_id if sel is None else cols.item_id[sel])
        if sel is not None:
            order = sel[order]  # rows of ``cols``
        n, M = len(order), len(items)
        g = np.repeat(np.arange(M), ends - starts)
        ikeys = codec.item_keys(items)
        ih = self._item_cache.fetch(items, ikeys, self._items.get)
        kind = cols.kind[order].astype(np.int64)
        ih["counts"] += np.bincount(g * N_KINDS + kind, minlength=M * N_KINDS).reshape(M, N_KINDS).astype(np.uint32)
        ih["last_ts"] = np.maximum(ih["last_ts"], np.maximum.reduceat(cols.ts[order], starts))
        for name in ("advertiser_id", "category", "ad_format"):
            v = getattr(cols, name)[order]
            _latest(ih[name], v, v != -1, g)
        buf = ih.tobytes()
        S = ITEM_HEAD.itemsize
        put, cf = wb.put, self._items_cf
        for i, k in enumerate(ikeys):
            put(k, buf[i * S : (i + 1) * S], cf)
        return self._item_cache, items, ih

    # ------------------------------------------------------------------ reads

    def _read_many(self, uids: np.ndarray, before: np.ndarray | None, max_len: int | None) -> list[SeqArrays]:
        for attempt in range(20):
            out = self._try_read(uids, before, max_len)
            if out is not None:
                return out
            # Raced a write or a catch-up between our two multi-gets: the head we
            # read names keys that are gone now. Read again.
            time.sleep(0.0005 * attempt)
        raise RuntimeError("sequence read kept racing writes")

    def _try_read(self, uids: np.ndarray, before: np.ndarray | None, max_len: int | None) -> list[SeqArrays] | None:
        C = self.config.chunk_events
        B = len(uids)
        if B <= 32:  # a few users: Python ints, no NumPy
            ul = uids.tolist()
            vals = self._get([b"H" + u.to_bytes(8, "big") for u in ul] + [b"D" + u.to_bytes(8, "big") for u in ul])
            fields = codec.head_fields(vals[:B])
        else:
            vals = self._get(codec.head_keys(uids) + codec.dir_keys(uids))
            fields = None
        if fields is None:
            heads = codec.parse_heads(vals[:B])
            cols = {f: heads[f].tolist() for f in codec.READ_FIELDS}
        else:
            cols = dict(zip(codec.READ_FIELDS, map(list, zip(*fields))))
        dirvals = vals[B:]
        cache = self._decoded
        keys: list[bytes] = []  # per user: the chunks' keys it fetches or looks up, then its tail segments' keys
        plan: list[tuple[int, int]] = []  # per user: (chunk keys, segment keys) in `keys`
        refs: list[tuple[int, int, int]] = []  # (user, pack seq, slot) of packed tails
        # Users whose chunks are consecutive seqs s .. t - 1, with a decoded cache: their chunks
        # come from (and go into) the user's cached run; `keys` holds only the ones it lacks.
        runs: dict[int, tuple[bytes, int, int, _Run | None, int]] = {}  # user -> (run key, s, t, run kept, k0)
        lookup: list[int] = []  # indices in `keys` to look up in the per-key cache
        bl = before.tolist() if before is not None else [None] * B
        for i, u in enumerate(uids.tolist()):
            b = bl[i]
            k0 = cols["chunk_lo"][i]
            nk = cols["chunk_hi"][i] - k0
            seqs: Sequence[int] = range(k0, k0 + nk)
            if nk and (dirvals[i] is None or len(dirvals[i]) != nk * DIR.itemsize):
                return None  # head and directory from different writes: raced one, read again
            if nk and (b is not None or (max_len is not None and max_len < cols["kept"][i])):
                seqs = _needed_chunks(dirvals[i], k0, C, b, max_len, cols["tail_n"][i],
                                      cols["tail_min"][i], cols["tail_max"][i])
            ub = u.to_bytes(8, "big")
            pre = b"C" + ub
            n0 = len(keys)
            if cache is not None and len(seqs) and seqs[-1] - seqs[0] == len(seqs) - 1:
                st, t = seqs[0], seqs[-1] + 1
                rk = b"R" + ub
                run = cache.get_run(rk)
                if run is not None and not (st <= run.stop and run.first <= t):
                    run = None  # disjoint from what this read needs: replaced
                if run is not None and run.covers(st, t):
                    seqs = ()
                elif run is not None:
                    seqs = [q for q in range(st, t) if not run.first <= q < run.stop]
                runs[i] = (rk, st, t, run, k0)
                keys.extend([pre + q.to_bytes(4, "big") for q in seqs])
            else:
                keys.extend([pre + q.to_bytes(4, "big") for q in seqs])
                lookup.extend(range(n0, len(keys)))
            nc = len(keys) - n0
            nseg = 0
            if cols["tail_n"][i] and (b is None or cols["tail_min"][i] < b):
                lo, hi = cols["seg_lo"][i], cols["seg_hi"][i]
                pre = b"T" + ub
                n1 = len(keys)
                keys.extend([pre + s.to_bytes(4, "big") for s in range(lo, hi)])
                lookup.extend(range(n1, len(keys)))
                nseg = hi - lo
                if cols["pack"][i]:
                    refs.append((i, cols["pack"][i] - 1, cols["slot"][i]))
            plan.append((nc, nseg))
        got: list[list[np.ndarray] | None] = [None] * len(keys)
        if cache is not None:
            for j, v in zip(lookup, cache.get_many([keys[j] for j in lookup])):
                got[j] = v
        miss = [j for j, v in enumerate(got) if v is None]
        per_key = set(lookup) if cache is not None else ()  # keys cached one by one (not in a run)
        pseqs = sorted({q for _, q, _ in refs})
        fetch = [keys[j] for j in miss] + [codec.pack_key(q) for q in pseqs]
        data = self._get(fetch) if fetch else []
        if any(v is None for v in data):
            return None
        packed: dict[int, list[np.ndarray]] = {}
        if pseqs:
            packed = self._decode_packed(refs, dict(zip(pseqs, data[len(miss):])))
            if packed is None:
                return None
        if miss:
            # One vectorized decode for every encoded chunk / segment fetched; raw
            # segments are records already.
            blobs: list[bytes] = []
            enc: list[int] = []  # key index of each blob
            for j, v in zip(miss, data):
                if keys[j][:1] == b"C":
                    blobs.append(v)
                    enc.append(j)
                elif v[:1] == codec.SEG_CHUNK:
                    blobs.append(v[1:])
                    enc.append(j)
                else:
                    r = np.frombuffer(v, REC, offset=1)
                    got[j] = [r[f] for f in REC.names]
            if blobs:
                decoded = self._decode_groups(blobs)
                if decoded is None:
                    return None
                groups, group, start, lens = decoded
                for j, g, a, n in zip(enc, group.tolist(), start.tolist(), lens.tolist()):
                    # a cached entry must not hold its whole group's arrays (a run's chunks are
                    # copied into the run)
                    got[j] = [c[a : a + n].copy() if j in per_key else c[a : a + n] for c in groups[g]]
            if cache is not None:
                cache.put_many([(keys[j], got[j]) for j in miss if j in per_key])
        out = []
        pos = 0
        for i, (nc, ns) in enumerate(plan):
            if i in runs:
                parts = self._run_parts(cache, runs[i], got[pos : pos + nc])
            else:
                parts = got[pos : pos + nc]
            if i in packed:  # the tail's packed part: before its raw segments
                parts.append(packed[i])
            parts.extend(got[pos + nc : pos + nc + ns])
            pos += nc + ns
            # every tail segment is checked for order (raw ones are in arrival order)
            out.append(_finish(parts, bl[i], max_len, cache is not None, ns))
        return out

    @staticmethod
    def _run_parts(cache: _DecodedCache, spec: tuple[bytes, int, int, _Run | None, int],
                   fetched: list[list[np.ndarray]]) -> list[list[np.ndarray]]:
        """A user's chunks s .. t - 1 as parts for :func:`_finish`, from its cached run and
        ``fetched`` (the chunks the run lacked, in seq order). A run missing some of them is
        replaced by one holding both: the run's chunks that the user still keeps (retention
        drops the oldest, from ``k0`` on they are kept) and the fetched ones, older or newer."""
        rk, s, t, run, k0 = spec
        if run is not None and run.covers(s, t):
            cache.count(t - s, 0)
            return run.parts(s, t)
        cache.count(0 if run is None else t - s - len(fetched), len(fetched))
        if run is None:
            first, pieces, lens = s, fetched, [len(f[0]) for f in fetched]
        else:
            first = max(min(s, run.first), k0)
            older = max(0, run.first - s)  # fetched chunks older than the run, then newer ones
            before, after = fetched[:older], fetched[older:]
            keep = max(run.first, first)
            e = run.ends
            a = e[keep - run.first]
            pieces = [*before, [c[a:] for c in run.cols], *after]
            lens = [len(f[0]) for f in before] + [e[j + 1] - e[j] for j in range(keep - run.first, len(e) - 1)] \
                + [len(f[0]) for f in after]
        ends = [0]
        for n in lens:
            ends.append(ends[-1] + n)
        new = _Run(first, ends, [np.concatenate([p[j] for p in pieces]) if len(pieces) > 1 else pieces[0][j].copy()
                                 for j in range(6)])  # (one piece: a view into its decode group)
        cache.put_run(rk, new)
        return new.parts(s, t)

    def user_features(self, user_ids: Sequence[int] | np.ndarray) -> UserFeatures:
        uids = np.asarray(user_ids, np.int64).reshape(-1)
        h = codec.parse_heads(self._get(codec.head_keys(uids)))
        return UserFeatures(
            age_bucket=h["age_bucket"].copy(), country=h["country"].copy(), device=h["device"].copy(),
            counts=h["counts"].astype(np.int64), n_events=h["total"].astype(np.int64),
            n_stored=h["kept"].astype(np.int64), last_ts=h["last_ts"].copy(),
        )

    def item_features(self, item_ids: Sequence[int] | np.ndarray) -> ItemFeatures:
        items = np.asarray(item_ids, np.int64).reshape(-1)
        h = parse_fixed(self._items.get(codec.item_keys(items)), ITEM_HEAD, EMPTY_ITEM_HEAD)
        return ItemFeatures(
            ad_format=h["ad_format"].copy(), advertiser_id=h["advertiser_id"].copy(),
            category=h["category"].copy(), counts=h["counts"].astype(np.int64), last_ts=h["last_ts"].copy(),
        )

    # ------------------------------------------------------------------ lifecycle

    def catch_up(self, force: bool = False) -> bool:
        """Secondary: replay what the writer wrote since the last catch-up, then read the new
        item attribute keys here rather than in the next read that meets their items (a
        merged key can hold the whole table: decoding it took a read ~7 ms during ingest).
        Skipped while the writer has written nothing since (:class:`PrimaryWatch`; ``force``:
        catch up anyway). Returns whether it caught up."""
        if not self.read_only:
            return False
        from opengem.ops import metrics

        go, state = self._watch.due(force)
        if not go:
            return False
        t = time.perf_counter()
        self._db.try_catch_up_with_primary()
        metrics.STORE_CATCH_UP_SECONDS.observe(time.perf_counter() - t)
        self._watch.caught_up(state)
        if self._attrs is not None:
            self._fetch_attrs(fold="soon")
        return True

    def _follow(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            try:
                self.catch_up()
            except Exception:  # noqa: BLE001 - a failed catch-up is retried next interval
                pass

    def flush(self) -> None:
        self._db.flush(True)

    def user_ids(self) -> np.ndarray:
        """Every user with a history in this store, in key order (a scan of the user heads)."""
        return np.asarray(self._all_uids(), dtype=np.int64)

    def _all_uids(self) -> list[int]:
        """Every user with a head, in key order."""
        uids = []
        it = self._db.iter()
        it.seek(b"H")
        while it.valid():
            k = bytes(it.key())
            if k[:1] != b"H":
                break
            uids.append(int.from_bytes(k[1:9], "big"))
            it.next()
        del it
        return uids

    def merge_tails(self, users_per_batch: int = 4096) -> int:
        """Re-encode every user's tail into one columnar segment (writer only, between commits).

        Appends leave one raw segment (30-byte records) per commit and user until
        ``max_raw_tail`` / ``max_tail_segments`` force a merge, so a store of
        short histories is mostly raw tails. This merges them all, as a sealed
        chunk would be encoded; a maintenance step for idle periods (and
        :meth:`compact`). Returns the number of users rewritten.
        """
        if self.read_only:
            raise RuntimeError("merge_tails on a read-only store")
        done = 0
        for ids, hkeys, heads in self._head_batches(users_per_batch):
            sel = np.flatnonzero((heads["raw_n"] > 0) | (heads["seg_hi"] - heads["seg_lo"] > 1))
            if not len(sel):
                continue
            wb = WriteBatch(raw_mode=True)
            zero = np.zeros(len(ids), np.int64)
            self._rebuild_tails(wb, ids, heads, sel, np.empty(0, REC), zero, zero)
            self._write_with_heads(wb, hkeys, sel, ids, heads)
            done += len(sel)
        return done

    def _head_batches(self, users_per_batch: int):
        """Every user of the store, ``users_per_batch`` at a time: (ids, head keys, heads)."""
        uids = self._all_uids()
        for a in range(0, len(uids), users_per_batch):
            ids = np.asarray(uids[a:a + users_per_batch], np.int64)
            hkeys = codec.head_keys(ids)
            yield ids, hkeys, self._user_cache.fetch(ids, hkeys, self._get)

    def _write_with_heads(self, wb: WriteBatch, hkeys: list[bytes], rows: np.ndarray, ids: np.ndarray,
                          heads: np.ndarray) -> None:
        """Put the heads of ``rows`` into ``wb``, write it, then update the writer's head cache
        (cleared if the write fails: it must never hold heads that are not on disk)."""
        for i, v in zip(rows.tolist(), codec.head_values(heads[rows])):
            wb.put(hkeys[i], v)
        try:
            self._db.write(wb, self._wopts)
        except BaseException:
            self._user_cache.clear()
            raise
        self._user_cache.store(ids, heads)

    def compact(self, merge_tails: bool = True) -> None:
        """Merge the users' tails (:meth:`merge_tails`), pack the short ones
        (:meth:`pack_tails`) and merge the item attribute table
        (:meth:`merge_attr_table`) (writer only), flush the memtables
        and rewrite everything into the bottom level (for size measurements): without
        ``force``, RocksDB would just move flushed files down without recompressing
        them at the bottom level's zstd level."""
        if merge_tails and not self.read_only:
            self.merge_tails()
            self.pack_tails()
            self.merge_attr_table()
        opts = CompactOptions()
        opts.set_bottommost_level_compaction(BottommostLevelCompaction.force())
        for db in (self._db, self._items):
            db.flush(True)
            db.compact_range(None, None, opts)

    def disk_bytes(self) -> dict[str, int]:
        """Bytes of live SST files: ``sequences`` (everything of the default column family:
        chunks, directories, tail segments, tail packs, user heads, the item attribute
        table, meta and offsets) and ``items`` (item heads)."""
        prop = "rocksdb.total-sst-files-size"
        return {"sequences": self._db.property_int_value(prop), "items": self._items.property_int_value(prop)}

    def sync_wal(self) -> None:
        """fsync the write-ahead log: every commit so far survives a power loss (writer only)."""
        if self._db is not None and not self.read_only:
            self._db.flush_wal(True)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._db is not None:
            self._items.close()
            self._db.close()
            # The DB (and its LOCK) is released only once nothing refers to it.
            self._db = self._items = self._items_cf = self._get = None

    def config_dict(self) -> dict[str, Any]:
        return asdict(self.config)


def _has_prefix(db: Any, prefix: bytes) -> bool:
    it = db.iter()
    it.seek(prefix)
    found = it.valid() and bytes(it.key()).startswith(prefix)
    del it
    return found


def _open_secondary(path: str, opts: Options, cfs: dict[str, Options], secondary_dir: str,
                    wait_s: float = 10.0) -> Rdict:
    """A secondary instance; waits while the writer is still creating the store.

    Between the writer's first ``CURRENT`` file and its ``items`` column family
    there is a moment where a follower sees a DB without the family (a reader
    started alongside a fresh worker): that is retried, anything else raised.
    """
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return Rdict(path, opts, column_families=cfs, access_type=AccessType.secondary(secondary_dir))
        except Exception as e:  # rocksdict raises plain Exception with RocksDB's status text
            if "Column family not found" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _needed_chunks(dirval: bytes, k0: int, C: int, b: int | None, max_len: int | None,
                   tail_n: int, tail_min: int, tail_max: int) -> Sequence[int]:
    """Seqs of the chunks (directory value ``dirval``, first seq ``k0``) that may hold
    one of the user's ``max_len`` most recent events with ts < b.

    A chunk is skipped when all its events are >= b, or when at least
    ``max_len`` events that certainly qualify (their whole chunk / tail is
    < b) are strictly later in ts than every event of the chunk.
    """
    d = np.frombuffer(dirval, DIR)
    mn, mx = d["min"], d["max"]
    K = len(d)
    if b is None and max_len is not None:
        # The usual case, a latest read: if the chunks' ts ranges follow each other (no
        # late event overlaps two), chunk j has (K - 1 - j) whole chunks after it.
        mnl, mxl = mn.tolist(), mx.tolist()
        if all(mxl[j] < mnl[j + 1] for j in range(K - 1)):
            first = K  # the events after chunk j only shrink as j grows: the needed ones are a suffix
            for j in range(K - 1, -1, -1):
                if (K - 1 - j) * C + (tail_n if tail_n and tail_min > mxl[j] else 0) >= max_len:
                    break
                first = j
            return range(k0 + first, k0 + K)
    sel = np.ones(K, bool) if b is None else mn < b
    if max_len is not None:
        full = sel if b is None else sel & (mx < b)
        later = (mn[None, :] > mx[:, None]) & full[None, :]  # (K, K): chunk k entirely after chunk j
        after = later.sum(axis=1) * C
        if tail_n and (b is None or tail_max < b):
            after += np.where(tail_min > mx, tail_n, 0)
        sel &= after < max_len
    return (k0 + np.flatnonzero(sel)).tolist()


def _finish(parts: list[tuple[np.ndarray, ...]], b: int | None, max_len: int | None,
            shared: bool = False, raw: int = 0) -> SeqArrays:
    """Concatenate decoded parts (chunks, then the tail: in seq order), keep ts < b,
    sort by ts (stable), keep the last max_len. The last ``raw`` parts may be out of
    order (raw tail segments keep arrival order); every other part is sorted by ts
    already, so the whole is sorted unless one of those is not or two parts overlap
    (late events).
    ``shared``: the parts' arrays are also held elsewhere (the decoded cache), so the
    result never aliases them."""
    if not parts:
        return SeqArrays.empty()
    ordered = True
    prev = None
    first_raw = len(parts) - raw
    for k, p in enumerate(parts):
        t = p[0]
        if not len(t):
            continue
        if (prev is not None and t[0] < prev) or (k >= first_raw and len(t) > 1 and (t[1:] < t[:-1]).any()):
            ordered = False
            break
        prev = t[-1]
    if ordered and b is None and max_len and len(parts) > 1:  # leave out the parts wholly before the last max_len
        n, k = 0, len(parts)
        while k and n < max_len:
            k -= 1
            n += len(parts[k][0])
        parts = parts[k:]
        if n > max_len:  # sorted as a whole: the last max_len start inside the first part
            parts[0] = [c[n - max_len :] for c in parts[0]]
    if len(parts) == 1:
        cols = [c.copy() for c in parts[0]] if shared else list(parts[0])
    else:
        cols = [np.concatenate([p[j] for p in parts]) for j in range(6)]
    ts = cols[0]
    if b is not None:
        m = ts < b
        if not m.all():
            cols = [c[m] for c in cols]
            ts = cols[0]
    if not ordered:
        o = np.argsort(ts, kind="stable")
        cols = [c[o] for c in cols]
    if max_len is not None and len(cols[0]) > max_len:
        cols = [c[len(c) - max_len :] for c in cols]
    return SeqArrays(*(np.ascontiguousarray(c, dtype=dt) for c, dt in zip(cols, SEQ_DTYPES.values())))


def _open_rocksdb(path: str, *, config: StoreConfig | None = None, reader: bool = False,
                  secondary_dir: str | None = None, interval_s: float | None = None) -> SequenceStore:
    if reader:
        if secondary_dir is None:
            raise ValueError("a rocksdb reader needs secondary_dir")
        return SequenceStore.open_reader(path, secondary_dir, config, interval_s)
    return SequenceStore(path, config)


register_backend("rocksdb", _open_rocksdb)
