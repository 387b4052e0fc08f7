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
  commit per record, on users with long histories (retention active), the
  whole stream; ``appends_per_s_steady`` -- its last records only, where
  every history is at the cap;
  ``appends_per_s_many_users`` -- the same on 20k users (about one event per
  user per record, the simulator's default population).
* ``baseline_appends_per_s`` -- the simple approach: one RocksDB key per user
  holding the whole history (np.save'd structured array), read, appended,
  trimmed to 4096 and rewritten on every record (one fsynced WriteBatch per
  record too); seeded untimed with every user's capped history, then timed on
  the same last records as ``appends_per_s_steady``. ``append_speedup`` = ratio.
* ``bytes_per_event`` -- SST bytes of the sequence column family (chunks,
  tails, user heads, directories) after a full compaction / stored events,
  vs ``raw_bytes_per_event`` = 18 (ts int64 + item int64 + surface u8 + kind u8);
  ``baseline_bytes_per_event`` -- the baseline's SST bytes after compaction
  (zstd too). ``item_bytes`` -- the item column family, separately.
* ``read_p50_ms`` / ``read_p99_ms`` -- read of the last 4096 events of one
  random user, decoded into arrays; ``read_asof_p99_ms`` -- the same with a
  random ``before_ts`` (the trainer's point-in-time read);
  ``baseline_read_p99_ms`` -- reading the baseline's history key.
* ``read_batch_256_ms`` -- ``read_batch`` of 256 random users, max_len 4096.
"""

from __future__ import annotations

import io
import shutil
import sys
import tempfile
import time
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


def run_store(path: Path, records: list, cfg: StoreConfig, per_commit: int = 1,
              last: int = 0) -> tuple[float, float, SequenceStore]:
    """Append all records; (events/s overall, events/s over the last ``last`` records, store)."""
    store = SequenceStore(path, cfg)
    times = []
    for i in range(0, len(records), per_commit):
        t = time.perf_counter()
        with store.batch() as b:
            for j, rec in enumerate(records[i : i + per_commit]):
                b.add(rec, 0, i + j)
        times.append(time.perf_counter() - t)
    n = sum(r.num_rows for r in records)
    tail = records[len(records) - last :] if last else []
    steady = sum(r.num_rows for r in tail) / sum(times[len(times) - last :]) if last else 0.0
    return n / sum(times), steady, store


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

    def read(self, uid: int) -> np.ndarray:
        h = np.load(io.BytesIO(self.db.get(int(uid).to_bytes(8, "big"))))
        return h[np.argsort(h["ts"], kind="stable")]


def percentiles(xs: list[float]) -> tuple[float, float]:
    a = np.array(xs) * 1e3
    return float(np.percentile(a, 50)), float(np.percentile(a, 99))


def main() -> None:
    ap = parser("store", __doc__)
    ap.add_argument("--users", type=int, default=0, help="users with long histories (default 1000, quick 250)")
    ap.add_argument("--per-user", type=int, default=0, help="events per long-history user (default 6000, quick 5000)")
    ap.add_argument("--dir", default=None, help="where the stores go (default: a temp dir)")
    args = ap.parse_args()
    n_users = args.users or (250 if args.quick else 1000)
    per_user = args.per_user or 5000 if args.quick else args.per_user or 6000
    many_users, many_events = 20_000, (200_000 if args.quick else 1_000_000)
    base_records = 6 if args.quick else 20
    reads = 300 if args.quick else 2000
    cfg = StoreConfig()
    root = Path(tempfile.mkdtemp(prefix="bench-store-", dir=args.dir))
    try:
        print(f"generating {n_users * per_user:,} events for {n_users} users and {many_events:,} for {many_users:,}…", flush=True)
        long_recs = to_records(synth(n_users, per_user, seed=1))
        many_recs = to_records(synth(many_users, many_events // many_users, seed=2))
        n_long = sum(r.num_rows for r in long_recs)

        print("appending (long histories)…", flush=True)
        aps, aps_steady, store = run_store(root / "long", long_recs, cfg, last=base_records)
        print("appending (20k users)…", flush=True)
        aps_many, _, s2 = run_store(root / "many", many_recs, cfg)
        s2.close()
        aps_many8, _, s3 = run_store(root / "many8", many_recs, cfg, per_commit=8)
        s3.close()

        # The baseline in the same steady state: seeded (untimed) with every
        # user's capped history, then timed on the same last records.
        print("baseline…", flush=True)
        base = Baseline(root / "baseline", cfg.max_events)
        base.seed(long_recs[: len(long_recs) - base_records])
        t0 = time.perf_counter()
        nb = 0
        for rec in long_recs[len(long_recs) - base_records :]:
            base.apply(rec)
            nb += rec.num_rows
        base_aps = nb / (time.perf_counter() - t0)

        print("compacting…", flush=True)
        store.compact()
        sizes = store.disk_bytes()
        uids = np.unique(long_recs[0].column("user_id").to_numpy())
        all_uids = np.arange(n_users, dtype=np.int64) * 7919 + 11
        stored = int(store.user_features(all_uids).n_stored.sum())
        bpe = sizes["sequences"] / stored
        base.db.flush(True)
        base.db.compact_range(None, None)
        base_bytes = base.db.property_int_value("rocksdb.total-sst-files-size")
        base_stored = sum(len(base.read(u)) for u in all_uids)

        print("reading…", flush=True)
        rng = np.random.default_rng(3)
        pick = rng.choice(all_uids, reads)
        for u in pick[:50]:  # warm the block cache (servers read hot users)
            store.read(int(u), None, 4096)
        lat = []
        for u in pick:
            t = time.perf_counter()
            store.read(int(u), None, 4096)
            lat.append(time.perf_counter() - t)
        p50, p99 = percentiles(lat)
        t_end = int(max(r.column("ts").to_numpy().max() for r in long_recs))
        lat_asof = []
        for u in pick:
            b = int(rng.integers(t_end - 30 * 86_400_000, t_end))
            t = time.perf_counter()
            store.read(int(u), b, 4096)
            lat_asof.append(time.perf_counter() - t)
        _, p99_asof = percentiles(lat_asof)
        lat_base = []
        for u in pick:
            t = time.perf_counter()
            base.read(int(u))
            lat_base.append(time.perf_counter() - t)
        bp50, bp99 = percentiles(lat_base)
        nb_reads = 10 if args.quick else 40
        tb = []
        for _ in range(nb_reads):
            us = rng.choice(all_uids, 256)
            t = time.perf_counter()
            jb = store.read_batch(us, None, 4096)
            tb.append(time.perf_counter() - t)
        jb.validate()
        batch_ms = float(np.median(tb) * 1e3)
        store.close()
        base.db.close()

        figures = {
            "appends_per_s": aps,
            "appends_per_s_steady": aps_steady,
            "appends_per_s_many_users": aps_many,
            "appends_per_s_many_users_8_records_per_commit": aps_many8,
            "baseline_appends_per_s": base_aps,
            "append_speedup": aps_steady / base_aps,
            "bytes_per_event": bpe,
            "raw_bytes_per_event": RAW_BYTES,
            "bytes_ratio_to_raw": bpe / RAW_BYTES,
            "baseline_bytes_per_event": base_bytes / base_stored,
            "item_bytes": sizes["items"],
            "stored_events": stored,
            "read_p50_ms": p50,
            "read_p99_ms": p99,
            "read_asof_p99_ms": p99_asof,
            "baseline_read_p50_ms": bp50,
            "baseline_read_p99_ms": bp99,
            "read_batch_256_ms": batch_ms,
            "read_batch_events": int(jb.lengths.sum()),
        }
        rows = [
            ["appends/s, long histories, whole stream", aps, "", ""],
            ["appends/s, long histories, last records", aps_steady, base_aps, aps_steady / base_aps],
            ["appends/s, 20k users (1 record/commit)", aps_many, "", ""],
            ["appends/s, 20k users (8 records/commit)", aps_many8, "", ""],
            ["bytes per stored event (after compaction)", bpe, base_bytes / base_stored, bpe / (base_bytes / base_stored)],
            ["  vs raw 18-byte record", bpe, RAW_BYTES, bpe / RAW_BYTES],
            ["read last 4096, p50 ms", p50, bp50, p50 / bp50],
            ["read last 4096, p99 ms", p99, bp99, p99 / bp99],
            ["read as-of (random before_ts), p99 ms", p99_asof, "", ""],
            ["read_batch 256 users, ms (median)", batch_ms, "", ""],
        ]
        print()
        print(table(rows, ["measure", "opengem", "baseline", "ratio"]))
        print(f"\n{n_long:,} events appended for {n_users} users; {stored:,} stored; "
              f"both timed on the last {nb:,} events (histories at the cap); item CF {sizes['items']:,} B")
        config = {"store": {k: (list(v) if isinstance(v, tuple) else v) for k, v in store.config_dict().items()},
                  "users": n_users, "events_per_user": per_user, "many_users": many_users,
                  "many_events": many_events, "record_events": 4096, "baseline_records": base_records,
                  "reads": reads, "quick": args.quick}
        write(args.out, "store", config, figures)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
