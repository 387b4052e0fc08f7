"""Sequence store: append throughput, bytes per stored event, read latency.

Data: a synthetic, simulator-like stream (:func:`synth`): per user, sessions
hours apart (lognormal, median 3 h) of events seconds apart (lognormal, median
8 s); one dominant surface per session; 25 % ad events (impressions, clicks,
conversions), clicks / conversions / likes on the item of the user's previous
impression / view; organic items Zipf(1.05) over 1M ids, ads Zipf(1.05) over
50k ids (ids shuffled, not rank-ordered); category and advertiser functions of
the item; 0.5 % of events arrive up to minutes late (out of order). Users'
streams are interleaved by time and cut into Kafka-like records of 4096
events (pyarrow RecordBatches with dictionary-encoded strings, as the Arrow
producer sends them; conversion is inside the clock).

Figures (JSON keys):

* ``appends_per_s`` -- opengem store, max_events=4096, one durable (fsync)
  commit per record of 4096 events, on users whose histories are at the cap
  (retention active): the last records of the stream after loading the rest.
* ``baseline_appends_per_s`` -- the simple approach: one RocksDB key per user
  holding the whole history (np.save'd structured array), read, appended,
  trimmed to 4096 and rewritten on every record (one fsynced WriteBatch per
  record too), seeded untimed with the same capped histories and timed on the
  first of the same records; ``append_speedup`` = opengem on those records /
  baseline.
* ``appends_per_s_many_users`` (and ``..._8_records_per_commit``) -- 20k new
  users with short histories, the simulator's population.
* ``bytes_per_event`` -- SST bytes of the sequence column family (chunks,
  tails, user heads, directories, offsets) after a full compaction / stored
  events, vs ``raw_bytes_per_event`` = 18 (ts int64 + item int64 + surface u8
  + kind u8); ``baseline_bytes_per_event`` -- the baseline after the same
  compaction (zstd too). ``item_cf_bytes`` -- the item column family.
* ``read_p50_ms`` / ``read_p99_ms`` -- ``read`` of the last 4096 events of one
  random user, decoded into arrays, warm block cache; ``read_cold_*`` -- first
  read of each user after reopening (SST blocks from the OS page cache); ``read_asof_p99_ms`` -- with a random
  ``before_ts`` in the last 30 days (the trainer's point-in-time read);
  ``baseline_read_*`` -- np.load of the baseline's key + sort by ts.
* ``read_batch_256_ms`` -- ``read_batch`` of 256 random users, max_len 4096.

``--size`` (on its own: a few minutes for 1M events) measures only the bytes:
``--size-events`` (default 1M, quick 200k) simulator events
(``opengem.stream.simulator``, the stream bench/ingest.py's full run sends,
``SimConfig(seed=1)`` at n / 10,000 s), split into ``--partitions`` (4) shards
by the producer's partitioner, appended through the store's own path
(``--size-commit`` records of 8192 events per durable commit), then
``compact()``. JSON (``bench/results/store-size.json``): ``bytes_per_event`` =
SST bytes of the sequence column family (everything in it: chunks,
directories, tails, user heads, the item attribute table, meta / offsets) /
stored events -- the figure bench/ingest.py's ``store_size`` reports -- and
``breakdown``: bytes per stored event of each key kind, measured by copying
that kind's keys into a store of their own with the same options and
compacting it (the kinds are contiguous key ranges in the real store: the
first key byte is the kind, so this is its SST share up to block boundaries);
``*_per_own_event`` for chunks (events in sealed chunks) and tails (tail
segments + tail packs, per event in a tail); ``read_p50_ms`` / ``read_p99_ms``
/ ``read_batch_256_ms``: warm reads (max_len 4096) of shard 0's users after
the compaction (context for the packs' read cost; no baseline in this mode --
run it with the old tree first on PYTHONPATH for an A/B). ``--pack-events``
sets ``StoreConfig.pack_events``.
"""

from __future__ import annotations

import io
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import parser, table, write  # noqa: E402

from opengem.features import SequenceStore, StoreConfig  # noqa: E402
from opengem.stream.events import AD_FORMATS, DEFAULT_SURFACES, DEVICES, KINDS  # noqa: E402

T0 = 1_767_225_600_000
RAW_BYTES = 18
KIND_P = {"impression": 0.22, "click": 0.025, "conversion": 0.005,
          "view": 0.55, "like": 0.10, "share": 0.03, "comment": 0.04, "follow": 0.03}
SURFACE_P = np.array([0.5, 0.2, 0.25, 0.05])


def _zipf_sampler(rng: np.random.Generator, n: int, s: float):
    cdf = np.cumsum(1.0 / np.arange(1, n + 1) ** s)
    cdf /= cdf[-1]
    perm = rng.permutation(n)  # ids are arbitrary, not popularity ranks
    return lambda size: perm[np.minimum(np.searchsorted(cdf, rng.random(size)), n - 1)]


def synth(n_users: int, events_per_user: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Columns (arrival order) of ``n_users * events_per_user`` simulator-like events."""
    rng = np.random.default_rng(seed)
    organic = _zipf_sampler(rng, 1_000_000, 1.05)
    ads = _zipf_sampler(rng, 50_000, 1.05)
    n = n_users * events_per_user
    user = np.repeat(np.arange(n_users, dtype=np.int64) * 7919 + 11, events_per_user)
    first = np.zeros(n, bool)
    first[::events_per_user] = True
    new_session = (rng.random(n) < 0.05) | first
    gap = np.where(new_session, rng.lognormal(np.log(3 * 3.6e6), 1.0, n), rng.lognormal(np.log(8e3), 1.0, n))
    gap = gap.astype(np.int64)
    gap[first] = rng.integers(0, 3_600_000, n_users)
    # per-user cumulative time: cumsum, minus the total of previous users
    c = np.cumsum(gap)
    base = np.repeat(c[first] - gap[first], events_per_user)
    ts = T0 + c - base
    session = np.cumsum(new_session)
    dom = rng.choice(4, session[-1] + 1, p=SURFACE_P)[session]
    surface = np.where(rng.random(n) < 0.8, dom, rng.choice(4, n, p=SURFACE_P))
    kinds = list(KIND_P)
    kind = rng.choice(len(kinds), n, p=list(KIND_P.values()))
    kind = np.array([KINDS.index(k) for k in kinds])[kind]
    is_ad = kind < 3
    item = np.where(is_ad, 1_000_000_000 + ads(n), organic(n))
    idx = np.arange(n)
    start = np.repeat(np.flatnonzero(first), events_per_user)
    # clicks / conversions act on the user's previous impression; likes, shares,
    # comments on the previous view (when there is one); 15 % of views revisit a recent item.
    for acts, src in (((1, 2), 0), ((4, 5, 6), 3)):
        prev = np.maximum.accumulate(np.where(kind == src, idx, -1))
        m = np.isin(kind, acts) & (prev >= start)
        item[m] = item[prev[m]]
    lag = rng.integers(1, 50, n)
    src = idx - lag
    m = (kind == 3) & (rng.random(n) < 0.15) & (src >= start)
    m[m] &= kind[src[m]] == 3  # a view revisits an organic item
    item[m] = item[src[m]]
    h = (item * 2654435761) & 0xFFFFFFFF
    category = (h >> 7) % 32
    advertiser = np.where(is_ad, (h >> 13) % 1000, -1)
    # interleave users by time; 0.5 % of events arrive up to minutes late
    late = np.where(rng.random(n) < 0.005, rng.exponential(120_000, n), 0).astype(np.int64)
    order = np.argsort(ts + late, kind="stable")
    uattr = lambda k: rng.integers(0, k, n_users)  # noqa: E731
    age, dev, ctry = uattr(8), uattr(4), uattr(3)
    ui = np.repeat(np.arange(n_users), events_per_user)
    cols = {
        "user_id": user, "ts": ts, "item_id": item, "surface": surface, "kind": kind,
        "category": category.astype(np.int32), "advertiser_id": advertiser,
        "age_bucket": age[ui], "device": dev[ui], "country": ctry[ui],
    }
    return {k: v[order] for k, v in cols.items()}


def to_records(cols: dict[str, np.ndarray], size: int = 4096) -> list:
    """Arrow RecordBatches as the columnar producer sends them (dictionary strings)."""
    import pyarrow as pa

    def dict_col(codes, names, itype):
        return pa.DictionaryArray.from_arrays(pa.array(codes, itype), pa.array(names))

    out = []
    for a in range(0, len(cols["ts"]), size):
        c = {k: v[a : a + size] for k, v in cols.items()}
        is_ad = c["kind"] < 3
        out.append(pa.RecordBatch.from_pydict({
            "user_id": pa.array(c["user_id"]), "ts": pa.array(c["ts"]),
            "surface": dict_col(c["surface"].astype(np.int16), list(DEFAULT_SURFACES), pa.int16()),
            "kind": dict_col(c["kind"].astype(np.int8), list(KINDS), pa.int8()),
            "item_id": pa.array(c["item_id"]), "is_ad": pa.array(is_ad),
            "age_bucket": pa.array(c["age_bucket"].astype(np.int8)),
            "country": dict_col(c["country"].astype(np.int16), ["US", "BR", "IN"], pa.int16()),
            "device": dict_col(c["device"].astype(np.int8), list(DEVICES), pa.int8()),
            "ad_format": pa.DictionaryArray.from_arrays(
                pa.array(np.where(is_ad, c["item_id"] % 4, -1).astype(np.int8), mask=~is_ad), pa.array(list(AD_FORMATS))),
            "advertiser_id": pa.array(c["advertiser_id"], mask=~is_ad),
            "category": pa.array(c["category"]),
        }))
    return out


# --------------------------------------------------------------------------- runs


def append(store: SequenceStore, records: list, first_offset: int = 0, per_commit: int = 1) -> list[float]:
    """Apply records (per_commit of them per durable commit); seconds per commit."""
    times = []
    for i in range(0, len(records), per_commit):
        t = time.perf_counter()
        with store.batch() as b:
            for j, rec in enumerate(records[i : i + per_commit]):
                b.add(rec, 0, first_offset + i + j)
        times.append(time.perf_counter() - t)
    return times


def events(records: list) -> int:
    return sum(r.num_rows for r in records)


class Baseline:
    """One key per user: the whole history as an np.save'd structured array, rewritten per append."""

    DT = np.dtype([("ts", "<i8"), ("item_id", "<i8"), ("surface", "i1"), ("kind", "i1"),
                   ("category", "<i4"), ("advertiser_id", "<i8")])

    def __init__(self, path: Path, max_events: int):
        from rocksdict import Options, Rdict, WriteBatch, WriteOptions, DBCompressionType

        o = Options(raw_mode=True)
        o.create_if_missing(True)
        o.set_compression_type(DBCompressionType.zstd())
        self.db = Rdict(str(path), o)
        self.wo = WriteOptions()
        self.wo.sync = True
        self.WriteBatch = WriteBatch
        self.max_events = max_events

    def seed(self, records: list) -> None:
        """Put each user's last max_events events of ``records`` (untimed): the steady state."""
        from opengem.features import EventColumns, to_columns

        c = EventColumns.concat([to_columns(r, DEFAULT_SURFACES) for r in records])
        order = np.argsort(c.user_id, kind="stable")
        cuts = np.flatnonzero(np.diff(c.user_id[order])) + 1
        wb = self.WriteBatch(raw_mode=True)
        for idx in np.split(order, cuts):
            idx = idx[-self.max_events :]
            h = np.empty(len(idx), self.DT)
            for f in self.DT.names:
                h[f] = getattr(c, f)[idx]
            buf = io.BytesIO()
            np.save(buf, h)
            wb.put(int(c.user_id[idx[0]]).to_bytes(8, "big"), buf.getvalue())
        self.db.write(wb, self.wo)

    def apply(self, rec) -> None:
        from opengem.features import to_columns

        c = to_columns(rec, DEFAULT_SURFACES)
        wb = self.WriteBatch(raw_mode=True)
        order = np.argsort(c.user_id, kind="stable")
        uid = c.user_id[order]
        cuts = np.flatnonzero(np.diff(uid)) + 1
        for idx in np.split(order, cuts):
            key = int(c.user_id[idx[0]]).to_bytes(8, "big")
            new = np.empty(len(idx), self.DT)
            for f in self.DT.names:
                new[f] = getattr(c, f)[idx]
            old = self.db.get(key)
            hist = np.concatenate([np.load(io.BytesIO(old)), new]) if old is not None else new
            hist = hist[-self.max_events :]
            buf = io.BytesIO()
            np.save(buf, hist)
            wb.put(key, buf.getvalue())
        self.db.write(wb, self.wo)

    def compact(self) -> None:
        from rocksdict import BottommostLevelCompaction, CompactOptions

        opts = CompactOptions()
        opts.set_bottommost_level_compaction(BottommostLevelCompaction.force())
        self.db.flush(True)
        self.db.compact_range(None, None, opts)

    def read(self, uid: int) -> np.ndarray:
        h = np.load(io.BytesIO(self.db.get(int(uid).to_bytes(8, "big"))))
        return h[np.argsort(h["ts"], kind="stable")]


# --------------------------------------------------------------------------- --size

KEY_KINDS = {b"C": "chunks", b"D": "directories", b"T": "tails", b"H": "heads", b"P": "tail_packs",
             b"A": "attributes", b"\x00": "meta_offsets"}


def simulator_shards(n: int, partitions: int, batch_size: int = 8192):
    """(partition, RecordBatch) of the simulator's stream as the Arrow producer splits it."""
    import pyarrow as pa

    from opengem.stream.producer import partition_of
    from opengem.stream.simulator import SimConfig, Simulator

    part: dict[int, int] = {}
    for rb in Simulator(SimConfig(seed=1, events_per_second=n / 10_000.0)).record_batches(n, batch_size=batch_size):
        users = rb.column(rb.schema.get_field_index("user_id")).to_numpy(zero_copy_only=False)
        uniq, inv = np.unique(users, return_inverse=True)
        for u in uniq.tolist():
            if u not in part:
                part[u] = partition_of(u, partitions)
        parts = np.fromiter((part[u] for u in uniq.tolist()), np.int32, len(uniq))[inv]
        for p in range(partitions):
            idx = np.flatnonzero(parts == p)
            if len(idx):
                yield p, rb.take(pa.array(idx))


def kind_bytes(store: SequenceStore, scratch: Path) -> dict[str, int]:
    """SST bytes of each key kind of ``store``'s sequence column family, each kind copied
    into a DB of its own (the store's options) and compacted."""
    from rocksdict import BottommostLevelCompaction, Cache, CompactOptions, Rdict, WriteBatch

    from opengem.features.store import _options

    dbs: dict[str, Rdict] = {}
    batches: dict[str, WriteBatch] = {}
    cache = Cache(8 << 20)
    it = store._db.iter()
    it.seek_to_first()
    while it.valid():
        k = bytes(it.key())
        name = KEY_KINDS.get(k[:1], f"other_{k[:1].hex()}")
        if name not in dbs:
            dbs[name] = Rdict(str(scratch / name), _options(store.config, secondary=False, cache=cache))
            batches[name] = WriteBatch(raw_mode=True)
        batches[name].put(k, bytes(it.value()))
        if len(batches[name]) >= 10_000:
            dbs[name].write(batches[name])
            batches[name] = WriteBatch(raw_mode=True)
        it.next()
    del it
    out = {}
    opts = CompactOptions()
    opts.set_bottommost_level_compaction(BottommostLevelCompaction.force())
    for name, db in dbs.items():
        db.write(batches[name])
        db.flush(True)
        db.compact_range(None, None, opts)
        out[name] = db.property_int_value("rocksdb.total-sst-files-size")
        db.close()
    return out


def size_run(args, root: Path) -> None:
    n = args.size_events or (200_000 if args.quick else 1_000_000)
    P, per_commit = args.partitions, args.size_commit
    cfg = StoreConfig(**({"pack_events": args.pack_events} if args.pack_events >= 0 else {}))
    stores = [SequenceStore(root / f"p{p}", cfg) for p in range(P)]
    print(f"appending {n:,} simulator events into {P} shards ({per_commit} records of 8192 per commit)…", flush=True)
    t0 = time.perf_counter()
    pending: dict[int, list] = {p: [] for p in range(P)}
    offsets = [0] * P
    append_s = 0.0

    def flush(p: int) -> None:
        nonlocal append_s
        t = time.perf_counter()
        with stores[p].batch() as b:
            for rb in pending[p]:
                b.add(rb, p, offsets[p])
                offsets[p] += 1
        append_s += time.perf_counter() - t
        pending[p] = []

    for p, rb in simulator_shards(n, P):
        pending[p].append(rb)
        if len(pending[p]) >= per_commit:
            flush(p)
    for p in range(P):
        if pending[p]:
            flush(p)
    gen_append_s = time.perf_counter() - t0
    print("compacting…", flush=True)
    t = time.perf_counter()
    seq = items = stored = chunk_ev = tail_ev = users = 0
    kinds: dict[str, int] = {}
    reads: dict[str, float] = {}
    from opengem.features import codec

    for p, s in enumerate(stores):
        s.compact()
        sz = s.disk_bytes()
        seq += sz["sequences"]
        items += sz["items"]
        uids = []
        it = s._db.iter()
        it.seek(b"H")
        while it.valid() and bytes(it.key())[:1] == b"H":
            uids.append(int.from_bytes(bytes(it.key())[1:9], "big"))
            it.next()
        del it
        uids = np.asarray(uids, np.int64)
        h = codec.parse_heads(s._get(codec.head_keys(uids))) if len(uids) else codec.empty_heads(0)
        stored += int(h["kept"].sum())
        tail_ev += int(h["tail_n"].sum())
        chunk_ev += int((h["kept"] - h["tail_n"]).sum())
        users += len(uids)
        if p == 0:  # reads of shard 0's users after the compaction (mostly packed tails), warm cache
            rng = np.random.default_rng(5)
            pick = rng.choice(uids, 3000)
            timeit_each(lambda u: s.read(int(u), None, 4096), pick[:500])
            lat = timeit_each(lambda u: s.read(int(u), None, 4096), pick)
            tb = []
            for _ in range(20):
                us = rng.choice(uids, 256, replace=False)
                t1 = time.perf_counter()
                s.read_batch(us, None, 4096)
                tb.append(time.perf_counter() - t1)
            reads = {"read_p50_ms": float(np.percentile(lat, 50) * 1e3), "read_p99_ms": float(np.percentile(lat, 99) * 1e3),
                     "read_batch_256_ms": float(np.median(tb) * 1e3)}
        scratch = root / f"kinds{p}"
        for k, v in kind_bytes(s, scratch).items():
            kinds[k] = kinds.get(k, 0) + v
        shutil.rmtree(scratch, ignore_errors=True)
        s.close()
    compact_s = time.perf_counter() - t
    bpe = seq / stored
    breakdown = {k: v / stored for k, v in sorted(kinds.items())}
    figures = {
        "bytes_per_event": bpe, "sequence_bytes": seq, "stored_events": stored, "users": users,
        "events_in_chunks": chunk_ev, "events_in_tails": tail_ev, "item_cf_bytes": items,
        "breakdown": breakdown, "breakdown_sum_per_event": sum(kinds.values()) / stored,
        "chunks_per_own_event": kinds.get("chunks", 0) / max(chunk_ev, 1),
        "tails_per_own_event": (kinds.get("tails", 0) + kinds.get("tail_packs", 0)) / max(tail_ev, 1),
        "raw_bytes_per_event": RAW_BYTES, "append_s": append_s, "generate_and_append_s": gen_append_s,
        "compact_and_measure_s": compact_s, **reads,
    }
    rows = [["bytes per stored event (sequence CF, compacted)", bpe, seq]]
    rows += [[f"  {k}", v, kinds[k]] for k, v in breakdown.items()]
    rows += [["  (sum of the kinds, each compacted alone)", figures["breakdown_sum_per_event"], sum(kinds.values())],
             ["chunks, per event in a chunk", figures["chunks_per_own_event"], chunk_ev],
             ["tails and tail packs, per event in a tail", figures["tails_per_own_event"], tail_ev],
             ["read (shard 0, random user, max_len 4096) p50 ms", reads["read_p50_ms"], ""],
             ["  p99 ms", reads["read_p99_ms"], ""],
             ["read_batch 256 users, ms", reads["read_batch_256_ms"], ""]]
    print()
    print(table(rows, ["measure", "bytes/event", "bytes | events"]))
    print(f"\n{n:,} events, {P} shards, {users:,} users, {stored:,} stored; item CF {items:,} B (not in the figure); "
          f"append {append_s:.1f} s, compact + measure {compact_s:.1f} s")
    config = {"store": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
              "events": n, "partitions": P, "records_per_commit": per_commit, "record_events": 8192,
              "simulator": "SimConfig(seed=1, events_per_second=n / 10000)", "quick": args.quick}
    out = args.out if args.out != "bench/results/store.json" else "bench/results/store-size.json"
    write(out, "store-size", config, figures)


def main() -> None:
    ap = parser("store", __doc__)
    ap.add_argument("--size", action="store_true", help="only bytes per stored event on simulator events (see above)")
    ap.add_argument("--size-events", type=int, default=0, help="--size: events (default 1M, quick 200k)")
    ap.add_argument("--partitions", type=int, default=4, help="--size: shards (bench/ingest.py: 4)")
    ap.add_argument("--pack-events", type=int, default=-1, help="--size: StoreConfig.pack_events (default: its default)")
    ap.add_argument("--size-commit", type=int, default=4, help="--size: records per durable commit")
    ap.add_argument("--users", type=int, default=0, help="users with capped histories (default 2000, quick 1000)")
    ap.add_argument("--per-user", type=int, default=4600, help="events per capped user (> max_events)")
    ap.add_argument("--dir", default=None, help="where the stores go (default: a temp dir)")
    args = ap.parse_args()
    if args.size:
        root = Path(tempfile.mkdtemp(prefix="bench-store-size-", dir=args.dir))
        try:
            size_run(args, root)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        return
    q = args.quick
    n_users, per_user = args.users or (1000 if q else 2000), args.per_user
    timed_records = 40 if q else 150  # the steady-state records at the end of the stream
    base_records = 3 if q else 8  # of which the baseline is timed on the first ones
    many_users, many_events = 20_000, (200_000 if q else 1_000_000)
    cfg = StoreConfig()
    root = Path(tempfile.mkdtemp(prefix="bench-store-", dir=args.dir))
    try:
        print(f"generating {n_users * per_user:,} events of {n_users:,} users, {many_events:,} of {many_users:,}…", flush=True)
        recs = to_records(synth(n_users, per_user, seed=1))
        load, timed = recs[: len(recs) - timed_records], recs[len(recs) - timed_records :]
        many = to_records(synth(many_users, many_events // many_users, seed=2))
        users_per_rec = float(np.mean([len(np.unique(r.column("user_id").to_numpy())) for r in timed]))

        # A. Capped histories: load most of the stream (16 records per commit), then
        # time the last records one durable commit each: retention is active.
        print(f"loading {events(load):,} events…", flush=True)
        store = SequenceStore(root / "capped", cfg)
        load_s = sum(append(store, load, 0, per_commit=16))
        print(f"timing {events(timed):,} events…", flush=True)
        t = append(store, timed, len(load))
        aps = events(timed) / sum(t)
        aps_same = events(timed[:base_records]) / sum(t[:base_records])

        print("baseline…", flush=True)
        base = Baseline(root / "baseline", cfg.max_events)
        base.seed(load)
        t0 = time.perf_counter()
        for rec in timed[:base_records]:
            base.apply(rec)
        base_aps = events(timed[:base_records]) / (time.perf_counter() - t0)

        # B. 20k users with short histories (the simulator's population), 1 and 8 records per commit.
        print("appending (20k users)…", flush=True)
        s2 = SequenceStore(root / "many1", cfg)
        aps_many = events(many) / sum(append(s2, many))
        s2.close()
        s3 = SequenceStore(root / "many8", cfg)
        aps_many8 = events(many) / sum(append(s3, many, per_commit=8))
        s3.close()

        print("compacting…", flush=True)
        store.compact()
        sizes = store.disk_bytes()
        all_uids = np.arange(n_users, dtype=np.int64) * 7919 + 11
        stored = int(store.user_features(all_uids).n_stored.sum())
        bpe = sizes["sequences"] / stored
        base.compact()
        base_bpe = base.db.property_int_value("rocksdb.total-sst-files-size") / sum(len(base.read(u)) for u in all_uids)

        print("reading…", flush=True)
        store.close()
        store = SequenceStore(root / "capped", cfg)  # a cold block cache
        rng = np.random.default_rng(3)
        cold = timeit_each(lambda u: store.read(int(u), None, 4096), rng.permutation(all_uids))  # also warms
        pick = rng.choice(all_uids, 2000)
        warm = timeit_each(lambda u: store.read(int(u), None, 4096), pick)
        t_end = int(max(r.column("ts").to_numpy().max() for r in recs))
        asof = rng.integers(t_end - 30 * 86_400_000, t_end, len(pick))
        warm_asof = timeit_each(lambda i: store.read(int(pick[i]), int(asof[i]), 4096), range(len(pick)))
        base_lat = timeit_each(lambda u: base.read(int(u)), pick)
        tb = []
        for _ in range(10 if q else 30):
            us = rng.choice(all_uids, 256, replace=False)
            t0 = time.perf_counter()
            jb = store.read_batch(us, None, 4096)
            tb.append(time.perf_counter() - t0)
        jb.validate()
        batch_ms = float(np.median(tb) * 1e3)
        # the writer and a reader agree (the parity the tests prove, checked at scale)
        reader = SequenceStore.open_reader(root / "capped", root / "sec", cfg)
        parity = all(reader.read(int(u), None, 4096).equals(store.read(int(u), None, 4096)) for u in pick[:50])
        reader.close()
        store_cfg = store.config_dict()
        store.close()
        base.db.close()

        p = lambda xs, q_: float(np.percentile(np.array(xs) * 1e3, q_))  # noqa: E731
        figures = {
            "appends_per_s": aps,
            "appends_per_s_same_records_as_baseline": aps_same,
            "baseline_appends_per_s": base_aps,
            "append_speedup": aps_same / base_aps,
            "appends_per_s_bulk_load": events(load) / load_s,
            "appends_per_s_many_users": aps_many,
            "appends_per_s_many_users_8_records_per_commit": aps_many8,
            "users_per_record": users_per_rec,
            "bytes_per_event": bpe,
            "raw_bytes_per_event": RAW_BYTES,
            "bytes_ratio_to_raw": bpe / RAW_BYTES,
            "baseline_bytes_per_event": base_bpe,
            "item_cf_bytes": sizes["items"],
            "stored_events": stored,
            "read_p50_ms": p(warm, 50),
            "read_p99_ms": p(warm, 99),
            "read_cold_p50_ms": p(cold, 50),
            "read_cold_p99_ms": p(cold, 99),
            "read_asof_p99_ms": p(warm_asof, 99),
            "baseline_read_p50_ms": p(base_lat, 50),
            "baseline_read_p99_ms": p(base_lat, 99),
            "read_batch_256_ms": batch_ms,
            "read_batch_events": int(jb.lengths.sum()),
            "writer_reader_parity": parity,
        }
        rows = [
            ["appends/s, capped histories (1 record/commit)", aps, "", ""],
            ["  same records as the baseline", aps_same, base_aps, aps_same / base_aps],
            ["appends/s, 20k new users (1 record/commit)", aps_many, "", ""],
            ["appends/s, 20k new users (8 records/commit)", aps_many8, "", ""],
            ["bytes per stored event (after compaction)", bpe, base_bpe, bpe / base_bpe],
            ["  vs raw 18-byte record", bpe, RAW_BYTES, bpe / RAW_BYTES],
            ["read last 4096, p50 ms", p(warm, 50), p(base_lat, 50), p(warm, 50) / p(base_lat, 50)],
            ["read last 4096, p99 ms", p(warm, 99), p(base_lat, 99), p(warm, 99) / p(base_lat, 99)],
            ["read last 4096, cold cache, p99 ms", p(cold, 99), "", ""],
            ["read as-of (random before_ts), p99 ms", p(warm_asof, 99), "", ""],
            ["read_batch 256 users x 4096, ms", batch_ms, "", ""],
        ]
        print()
        print(table(rows, ["measure", "opengem", "baseline", "ratio"]))
        print(f"\n{n_users:,} users, {stored:,} events stored; timed records touch {users_per_rec:.0f} users each; "
              f"baseline timed on {events(timed[:base_records]):,} events; item CF {sizes['items']:,} B; "
              f"writer/reader parity {parity}")
        config = {"store": {k: (list(v) if isinstance(v, tuple) else v) for k, v in store_cfg.items()},
                  "users": n_users, "events_per_user": per_user, "timed_records": timed_records,
                  "baseline_records": base_records, "many_users": many_users, "many_events": many_events,
                  "record_events": 4096, "quick": q}
        write(args.out, "store", config, figures)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def timeit_each(fn, xs) -> list[float]:
    out = []
    for x in xs:
        t = time.perf_counter()
        fn(x)
        out.append(time.perf_counter() - t)
    return out


if __name__ == "__main__":
    main()
