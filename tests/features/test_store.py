"""The RocksDB sequence store against a plain Python reference model, in tmp dirs.

Small chunks (chunk_events=8, max_events=32) so that sealing, tail merges and
retention all happen within a few dozen events.
"""

from __future__ import annotations

import dataclasses
from typing import Any
import hashlib
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from opengem.features import (
    JaggedSeq,
    MemorySequenceStore,
    SeqArrays,
    SequenceStore,
    StoreConfig,
    country_code,
    open_store,
)
from opengem.features import codec
from opengem.features.codec import I64_MIN
from opengem.stream.events import AD_FORMATS, AD_KINDS, DEFAULT_SURFACES, KIND_INDEX, KINDS, Event

T0 = 1_767_225_600_000
SMALL = StoreConfig(max_events=32, chunk_events=8, max_tail_segments=3, max_raw_tail=5, sync=False)
# Every append merges the tail, the cap is one chunk, the writer's head caches overflow constantly.
TINY = StoreConfig(max_events=4, chunk_events=4, max_tail_segments=1, max_raw_tail=1, sync=False,
                   writer_cache_users=2, writer_cache_items=3)


# --------------------------------------------------------------------------- reference model


class Reference:
    """What the store must return: per user the events in arrival order, of which
    the last ``C * min(total // C, N // C) + total % C`` are kept (whole chunks of
    C dropped, oldest arrivals first); reads filter ts < before_ts, sort by ts
    (ties in arrival order) and keep the last max_len."""

    def __init__(self, cfg: StoreConfig):
        self.C, self.N = cfg.chunk_events, cfg.max_events
        self.events: dict[int, list[tuple]] = {}
        self.total: dict[int, int] = {}

    def append(self, cols: dict[str, np.ndarray]) -> None:
        for row in zip(*(cols[k].tolist() for k in ("user_id", "ts", "item_id", "surface", "kind", "category", "advertiser_id"))):
            uid = row[0]
            self.events.setdefault(uid, []).append(row[1:])
            self.total[uid] = self.total.get(uid, 0) + 1
            t = self.total[uid]
            keep = self.C * min(t // self.C, self.N // self.C) + t % self.C
            del self.events[uid][: len(self.events[uid]) - keep]

    def read(self, uid: int, before: int | None, max_len: int | None) -> list[tuple]:
        ev = [e for e in self.events.get(uid, []) if before is None or e[0] < before]
        ev = sorted(ev, key=lambda e: e[0])
        return ev if max_len is None else ev[max(0, len(ev) - max_len) :]


def rows(s: SeqArrays) -> list[tuple]:
    return list(zip(s.ts.tolist(), s.item_id.tolist(), s.surface.tolist(), s.kind.tolist(),
                    s.category.tolist(), s.advertiser_id.tolist()))


def make_events(rng: np.random.Generator, n: int, users: int = 4, t0: int = T0, spread: int = 10**6) -> dict[str, np.ndarray]:
    """Columns of n events; surface / kind as strings like the stream sends them."""
    kind = rng.integers(0, len(KINDS), n)
    item = rng.integers(0, 40, n) + np.where(kind < len(AD_KINDS), 1_000_000_000, 0)
    return {
        "user_id": rng.integers(0, users, n),
        "ts": t0 + rng.integers(0, spread, n),
        "item_id": item,
        "surface": np.array(DEFAULT_SURFACES)[rng.integers(0, len(DEFAULT_SURFACES), n)],
        "kind": np.array(KINDS)[kind],
        "is_ad": kind < len(AD_KINDS),
        "category": np.where(rng.random(n) < 0.9, item % 7, -1),
        "advertiser_id": np.where(kind < len(AD_KINDS), item % 5, -1),
        "age_bucket": rng.integers(-1, 8, n),
    }


def ref_cols(ev: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The same columns with surface / kind as indices (what reads return)."""
    out = dict(ev)
    out["surface"] = np.array([DEFAULT_SURFACES.index(s) for s in ev["surface"]])
    out["kind"] = np.array([KIND_INDEX[k] for k in ev["kind"]])
    return out


@pytest.fixture
def store(tmp_path: Path):
    s = SequenceStore(tmp_path / "db", SMALL)
    yield s
    s.close()


# --------------------------------------------------------------------------- round trip


@st.composite
def scenarios(draw):
    """Batches of appends: user ids, ts offsets (late, duplicate and far-apart ones), items."""
    batches = []
    clock = 0
    for _ in range(draw(st.integers(1, 12))):
        n = draw(st.integers(0, 30))
        users = draw(st.lists(st.integers(0, 3), min_size=n, max_size=n))
        # mostly increasing time, sometimes late (negative jitter) or identical
        jit = draw(st.lists(st.sampled_from([0, 0, 1, 5, 1000, -3, -10**6, 2**33]), min_size=n, max_size=n))
        items = draw(st.lists(st.integers(0, 20), min_size=n, max_size=n))
        kinds = draw(st.lists(st.integers(0, len(KINDS) - 1), min_size=n, max_size=n))
        ts = []
        for j in jit:
            clock += 1000
            ts.append(T0 + 10**7 + clock + j)
        batches.append((users, ts, items, kinds))
    return batches


def cols_of(users, ts, items, kinds) -> dict[str, np.ndarray]:
    kinds = np.array(kinds, np.int64)
    items = np.array(items, np.int64)
    return {
        "user_id": np.array(users, np.int64), "ts": np.array(ts, np.int64), "item_id": items,
        "surface": (items % len(DEFAULT_SURFACES)).astype(np.int8), "kind": kinds.astype(np.int8),
        "category": np.where(items % 3 == 0, -1, items * 11), "advertiser_id": np.where(kinds < 3, items + 5, -1),
    }


@pytest.mark.parametrize("backend,cfg", [("rocksdb", SMALL), ("rocksdb", TINY), ("memory", SMALL)],
                         ids=["rocksdb", "rocksdb-tiny", "memory"])
@settings(max_examples=35, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batches=scenarios(), data=st.data())
def test_round_trip_against_reference(backend: str, cfg: StoreConfig, batches, data) -> None:
    with tempfile.TemporaryDirectory() as d:
        s = open_store(f"rocksdb://{d}/db", config=cfg) if backend == "rocksdb" else MemorySequenceStore(cfg)
        ref = Reference(cfg)
        with s:
            for off, b in enumerate(batches):
                cols = cols_of(*b)
                if data.draw(st.booleans()):
                    assert s.apply(cols, (0, 2 * off)) == len(cols["ts"])
                else:  # the same events split over two records of one commit
                    k = len(cols["ts"]) // 2
                    with s.batch() as wb:
                        wb.add({c: v[:k] for c, v in cols.items()}, 0, 2 * off)
                        wb.add({c: v[k:] for c, v in cols.items()}, 0, 2 * off + 1)
                ref.append(cols)
            for uid in range(5):
                for _ in range(4):
                    before = data.draw(st.one_of(st.none(), st.integers(T0, T0 + 10**7 + 1000 * 400)))
                    max_len = data.draw(st.one_of(st.none(), st.integers(0, 50)))
                    assert rows(s.read(uid, before, max_len)) == ref.read(uid, before, max_len)
            uids = np.arange(5)
            before = data.draw(st.one_of(st.none(), st.lists(st.integers(T0, T0 + 10**8), min_size=5, max_size=5)))
            jb = s.read_batch(uids, before, 20).validate()
            for i in range(5):
                assert rows(jb.row(i)) == ref.read(i, None if before is None else before[i], 20)
            feats = s.user_features(uids)
            assert feats.n_stored.tolist() == [len(ref.events.get(u, [])) for u in range(5)]
            assert feats.n_events.tolist() == [ref.total.get(u, 0) for u in range(5)]


# --------------------------------------------------------------------------- retention, idempotence, reopen


def test_retention_keeps_the_latest_whole_chunks(store: SequenceStore) -> None:
    ts = T0 + np.arange(100) * 1000
    for i in range(100):  # one event per commit: tails merge, chunks seal, old chunks go
        store.apply({"user_id": [7], "ts": [ts[i]], "item_id": [i], "surface": ["feed"], "kind": ["view"]}, (0, i))
    # 100 = 12 chunks of 8 + 4: keep 4 chunks (N / C) + the 4 in the tail
    seq = store.read(7)
    assert len(seq) == 36
    np.testing.assert_array_equal(seq.ts, ts[-36:])
    np.testing.assert_array_equal(seq.item_id, np.arange(64, 100))
    assert store.user_features([7]).n_stored.tolist() == [36]
    # dropped chunks are deleted, not just hidden
    it = store._db.iter()
    it.seek(codec.user_key(b"C", 7, 0))
    n_chunks = 0
    while it.valid() and it.key().startswith(codec.user_key(b"C", 7)):
        n_chunks += 1
        it.next()
    assert n_chunks == 4
    # one big append far beyond the cap in a single commit
    big = T0 + 10**9 + np.arange(1000)
    store.apply({"user_id": np.full(1000, 8), "ts": big, "item_id": np.arange(1000),
                 "surface": np.full(1000, "reels"), "kind": np.full(1000, "like")}, (0, 100))
    np.testing.assert_array_equal(store.read(8).ts, big[-32:])
    assert store.read(8, max_len=5).ts.tolist() == big[-5:].tolist()


def test_apply_is_idempotent_per_partition_offset(store: SequenceStore) -> None:
    rng = np.random.default_rng(0)
    ev = make_events(rng, 50)
    assert store.applied_offset(3) is None
    assert store.apply(ev, (3, 10)) == 50
    assert store.applied_offset(3) == 10
    before = store.read_batch(np.arange(4))
    assert store.apply(ev, (3, 10)) == 0  # replayed record
    assert store.apply(ev, (3, 9)) == 0  # older record
    after = store.read_batch(np.arange(4))
    assert np.array_equal(before.lengths, after.lengths) and np.array_equal(before.ts, after.ts)
    assert store.user_features(np.arange(4)).n_events.sum() == 50
    # other partitions are independent
    assert store.apply(make_events(rng, 5), (4, 0)) == 5
    assert store.applied_offset(4) == 0 and store.applied_offset(3) == 10
    # a batch of records: duplicates inside the batch are skipped too, one commit for all
    with store.batch() as b:
        assert b.add(make_events(rng, 5), 3, 11)
        assert not b.add(make_events(rng, 5), 3, 11)
        assert not b.add(make_events(rng, 5), 3, 5)
        assert b.add(make_events(rng, 5), 4, 1)
        assert b.add([], 5, 100)  # a record with no valid events still moves the offset
    assert store.applied_offsets() == {3: 11, 4: 1, 5: 100}
    assert store.user_features(np.arange(4)).n_events.sum() == 65


def test_offsets_are_written_with_the_events_or_not_at_all(store: SequenceStore) -> None:
    rng = np.random.default_rng(1)
    with pytest.raises(RuntimeError):
        with store.batch() as b:
            b.add(make_events(rng, 20), 0, 0)
            raise RuntimeError("worker died before the commit")
    assert store.applied_offset(0) is None
    assert store.user_features(np.arange(4)).n_events.sum() == 0
    # a bad record fails before anything is written
    with pytest.raises(ValueError, match="unknown surface"):
        bad = make_events(rng, 3)
        bad["surface"] = np.array(["feed", "tv", "feed"])
        store.apply(bad, (0, 0))
    assert store.applied_offset(0) is None


def test_replay_after_crash_neither_duplicates_nor_drops(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    records = [make_events(rng, 13, t0=T0 + i * 10**6) for i in range(30)]
    ref = Reference(SMALL)
    for r in records:
        ref.append(ref_cols(r))
    s = SequenceStore(tmp_path / "db", SMALL)
    for off, r in enumerate(records[:17]):
        s.apply(r, (0, off))
    s.close()  # "crash" after offset 16; the consumer group only committed offset 9
    s = SequenceStore(tmp_path / "db", SMALL)
    assert s.applied_offset(0) == 16
    with s.batch() as b:
        added = [b.add(r, 0, off) for off, r in enumerate(records) if off >= 10]
    assert added == [False] * 7 + [True] * 13
    for uid in range(4):
        assert rows(s.read(uid)) == ref.read(uid, None, None)
    s.close()


def test_reopen_keeps_everything_and_checks_the_config(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    s = SequenceStore(tmp_path / "db", SMALL)
    for off in range(20):
        s.apply(make_events(rng, 17, t0=T0 + off * 10**6), (1, off))
    seqs = s.read_batch(np.arange(4), None, None)
    feats = s.user_features(np.arange(4))
    s.close()
    s = open_store(f"rocksdb://{tmp_path}/db", config=SMALL)
    again = s.read_batch(np.arange(4), None, None)
    assert np.array_equal(seqs.lengths, again.lengths)
    for f in ("ts", "item_id", "surface", "kind", "category", "advertiser_id"):
        assert np.array_equal(getattr(seqs, f), getattr(again, f))
    assert np.array_equal(s.user_features(np.arange(4)).counts, feats.counts)
    assert s.applied_offset(1) == 19
    s.close()
    from dataclasses import replace

    with pytest.raises(ValueError, match="chunk_events"):
        SequenceStore(tmp_path / "db", replace(SMALL, chunk_events=16))
    with pytest.raises(ValueError, match="surfaces"):
        SequenceStore(tmp_path / "db", replace(SMALL, surfaces=("reels", "feed")))
    # appending a surface is fine, and the old indices keep their meaning
    s = SequenceStore(tmp_path / "db", replace(SMALL, surfaces=DEFAULT_SURFACES + ("search",)))
    assert s.surfaces[-1] == "search"
    s.close()


# --------------------------------------------------------------------------- out of order, attributes


def test_out_of_order_events_older_than_sealed_chunks(store: SequenceStore) -> None:
    ts = list(T0 + np.arange(20) * 1000)
    store.apply({"user_id": [1] * 20, "ts": ts, "item_id": list(range(20)), "surface": ["feed"] * 20,
                 "kind": ["view"] * 20}, (0, 0))
    late = [T0 - 5, T0 + 4500, T0 + 4500, T0 + 19_000]
    store.apply({"user_id": [1] * 4, "ts": late, "item_id": [100, 101, 102, 103], "surface": ["reels"] * 4,
                 "kind": ["like"] * 4}, (0, 1))
    seq = store.read(1)
    assert np.all(np.diff(seq.ts) >= 0)
    assert seq.item_id[0] == 100
    # ties: the earlier arrival first (item 103 arrived after item 19 at the same ts)
    assert seq.item_id.tolist()[-2:] == [19, 103]
    i = seq.ts.tolist().index(T0 + 4500)
    assert seq.item_id.tolist()[i - 1 : i + 3] == [4, 101, 102, 5]
    # strictly before: point-in-time reads never see ts == before_ts
    assert seq.ts[seq.ts < T0 + 4500].tolist() == store.read(1, T0 + 4500).ts.tolist()
    assert store.read(1, T0 - 5).ts.tolist() == []
    assert store.read(1, T0 + 4501, max_len=3).item_id.tolist() == [4, 101, 102]


@pytest.mark.parametrize("backend", ["rocksdb", "memory"])
@pytest.mark.parametrize("items", ["all", "ads", "none"])
def test_attributes_latest_wins_and_counters(tmp_path: Path, backend: str, items: str) -> None:
    """User / item attributes and counters; ``item_features`` decides which items get a head
    ("ads": the items of ad-kind events, the default), the same in both backends."""
    cfg = dataclasses.replace(SMALL, item_features=items)
    store = SequenceStore(tmp_path / "db", cfg) if backend == "rocksdb" else MemorySequenceStore(cfg)
    ev = [
        Event("a", 1, T0, "feed", "impression", 1_000_000_001, True, request_id="r1", age_bucket=3, country="US",
              device="ios", ad_format="video", advertiser_id=9, category=4),
        Event("b", 1, T0 + 1, "feed", "click", 1_000_000_001, True, request_id="r1", country="BR"),
        Event("c", 1, T0 + 2, "reels", "view", 55, False, age_bucket=4, category=2),
        Event("d", 2, T0 + 3, "feed", "impression", 1_000_000_001, True, request_id="r2", ad_format="image",
              advertiser_id=10, device="web"),
        Event("e", 2, T0 + 4, "feed", "conversion", 1_000_000_001, True, request_id="r2"),
    ]
    store.apply(ev[:3], (0, 0))
    store.apply(ev[3:], (0, 1))
    u = store.user_features([1, 2, 3])
    assert u.age_bucket.tolist() == [4, -1, -1]
    assert u.country.tolist() == [country_code("BR"), 0, 0]
    assert u.device.tolist() == [0, 2, -1]
    k = KIND_INDEX
    assert u.counts[0, [k["impression"], k["click"], k["view"]]].tolist() == [1, 1, 1]
    assert u.counts[1, [k["impression"], k["conversion"]]].tolist() == [1, 1]
    assert u.last_ts.tolist()[:2] == [T0 + 2, T0 + 4]
    it = store.item_features([1_000_000_001, 55, 77])
    if items == "none":
        assert it.counts.sum() == 0 and it.category.tolist() == [-1] * 3 and it.last_ts.tolist() == [I64_MIN] * 3
    else:
        assert it.counts[0, [k["impression"], k["click"], k["conversion"]]].tolist() == [2, 1, 1]
        assert it.advertiser_id.tolist() == [10, -1, -1]
        assert it.ad_format.tolist() == [AD_FORMATS.index("image"), -1, -1]  # latest applied wins over "video"
        assert it.last_ts[0] == T0 + 4
        # the organic item (a view): a head only with "all"
        assert it.category.tolist() == ([4, 2, -1] if items == "all" else [4, -1, -1])  # absent later -> kept
        assert it.counts[1, k["view"]] == (items == "all")
        assert it.counts[2].sum() == 0
    seq = store.read(1)
    assert seq.kind.tolist() == [k["impression"], k["click"], k["view"]]
    assert seq.is_ad.tolist() == [True, True, False]
    assert seq.advertiser_id.tolist() == [9, -1, -1] and seq.category.tolist() == [4, -1, 2]
    store.close()


def test_item_features_option_accepts_the_earlier_bool() -> None:
    assert StoreConfig(item_features=True).item_features == "all"
    assert StoreConfig(item_features=False).item_features == "none"
    with pytest.raises(ValueError, match="item_features must be one of"):
        StoreConfig(item_features="organic")


def test_event_objects_dict_of_arrays_and_arrow_agree(tmp_path: Path) -> None:
    codec_mod = pytest.importorskip("opengem.stream.codec")
    rng = np.random.default_rng(4)
    cols = make_events(rng, 200)
    events = [
        Event(f"e{i}", int(cols["user_id"][i]), int(cols["ts"][i]), str(cols["surface"][i]), str(cols["kind"][i]),
              int(cols["item_id"][i]), bool(cols["is_ad"][i]),
              request_id="r" if cols["is_ad"][i] else None,
              age_bucket=None if cols["age_bucket"][i] < 0 else int(cols["age_bucket"][i]),
              advertiser_id=None if cols["advertiser_id"][i] < 0 else int(cols["advertiser_id"][i]),
              category=None if cols["category"][i] < 0 else int(cols["category"][i]))
        for i in range(200)
    ]
    inputs = {"events": events, "numpy": cols, "arrow": codec_mod.events_to_batch(events)}
    got = {}
    for name, x in inputs.items():
        s = SequenceStore(tmp_path / name, SMALL)
        s.apply(x, (0, 0))
        got[name] = (s.read_batch(np.arange(4)), s.user_features(np.arange(4)).age_bucket)
        s.close()
    for name in ("numpy", "arrow"):
        a, b = got["events"], got[name]
        assert np.array_equal(a[1], b[1])
        for f in ("lengths", "ts", "item_id", "surface", "kind", "category", "advertiser_id"):
            assert np.array_equal(getattr(a[0], f), getattr(b[0], f)), (name, f)


# --------------------------------------------------------------------------- readers


def test_writer_and_reader_reads_are_identical(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    w = SequenceStore(tmp_path / "db", SMALL)
    for off in range(40):
        w.apply(make_events(rng, 11, users=6, t0=T0 + off * 10**5), (0, off))
    r = SequenceStore.open_reader(tmp_path / "db", tmp_path / "sec", SMALL)
    try:
        for uid in range(7):
            for before in (None, T0 + 10**6, T0 + 3 * 10**6):
                for max_len in (None, 1, 10, 33):
                    assert w.read(uid, before, max_len).equals(r.read(uid, before, max_len))
        b = rng.integers(T0, T0 + 5 * 10**6, 7)
        jw, jr = w.read_batch(np.arange(7), b, 16), r.read_batch(np.arange(7), b, 16)
        for f in ("lengths", "ts", "item_id", "surface", "kind", "category", "advertiser_id"):
            assert np.array_equal(getattr(jw, f), getattr(jr, f))
        # new writes are invisible until catch_up, then identical again
        w.apply(make_events(rng, 30, users=6, t0=T0 + 10**7), (0, 40))
        assert len(r.read(0)) != len(w.read(0)) or len(r.read(1)) != len(w.read(1))
        r.catch_up()
        for uid in range(7):
            assert w.read(uid).equals(r.read(uid))
        assert r.applied_offset(0) == 40
        with pytest.raises(PermissionError):
            r.apply(make_events(rng, 1), (0, 41))
    finally:
        r.close()
        w.close()


def test_catch_up_is_skipped_while_the_writer_wrote_nothing(tmp_path: Path) -> None:
    """A secondary's catch-up holds the GIL (rocksdict); with nothing new it is skipped, and any
    write -- one small commit, a flush to an SST, a compaction -- makes the next one happen."""
    rng = np.random.default_rng(6)
    w = SequenceStore(tmp_path / "db", SMALL)
    w.apply(make_events(rng, 20, users=3), (0, 0))
    r = SequenceStore.open_reader(tmp_path / "db", tmp_path / "sec", SMALL)
    try:
        assert r.catch_up()  # the first one always runs
        assert not r.catch_up() and not r.catch_up()  # nothing written since
        for off in range(1, 4):  # every commit is seen, however small
            w.apply(make_events(rng, 1, users=3, t0=T0 + off * 10**7), (0, off))
            assert r.catch_up()
            assert r.applied_offset(0) == off
            assert all(w.read(u).equals(r.read(u)) for u in range(4))
            assert not r.catch_up()
        w.flush()  # memtable -> SST, a new MANIFEST entry and write-ahead log
        assert r.catch_up()
        w.compact()
        assert r.catch_up()
        assert all(w.read(u).equals(r.read(u)) for u in range(4))
        assert r.catch_up(force=True)  # forced: runs even with nothing new
        assert not w.catch_up()  # the writer has nothing to catch up with
    finally:
        r.close()
        w.close()


READER_SCRIPT = textwrap.dedent("""
    import hashlib, sys, time
    from opengem.features import SequenceStore, StoreConfig
    path, sec, want = sys.argv[1], sys.argv[2], int(sys.argv[3])
    cfg = StoreConfig(max_events=32, chunk_events=8, max_tail_segments=3, max_raw_tail=5, sync=False)
    r = SequenceStore.open_reader(path, sec, cfg, interval_s=0.1)
    print("ready", flush=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        s = r.read(1)
        if len(s) >= want:
            print("seen", len(s), hashlib.sha256(s.ts.tobytes() + s.item_id.tobytes() + s.kind.tobytes()).hexdigest(), flush=True)
            break
        time.sleep(0.01)
    r.close()
""")


def test_reader_in_another_process_follows_the_writer(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    w = SequenceStore(tmp_path / "db", SMALL)
    w.apply(make_events(rng, 5, users=1, t0=T0), (0, 0))  # user 0 only
    proc = subprocess.Popen([sys.executable, "-c", READER_SCRIPT, str(tmp_path / "db"), str(tmp_path / "sec"), "20"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        ts = T0 + 10**6 + np.arange(25) * 100
        t0 = time.monotonic()
        for i in range(5):  # user 1's events, five commits
            sl = slice(5 * i, 5 * i + 5)
            w.apply({"user_id": np.ones(5, np.int64), "ts": ts[sl], "item_id": np.arange(25)[sl],
                     "surface": ["stories"] * 5, "kind": ["share"] * 5}, (0, 1 + i))
        line = proc.stdout.readline().split()
        waited = time.monotonic() - t0
        assert line[:1] == ["seen"], proc.stderr.read()
        mine = w.read(1)
        assert int(line[1]) == len(mine) == 25
        assert line[2] == hashlib.sha256(mine.ts.tobytes() + mine.item_id.tobytes() + mine.kind.tobytes()).hexdigest()
        assert waited < 5.0  # the reader catches up every 0.1 s
    finally:
        proc.wait(timeout=30)
        w.close()


# --------------------------------------------------------------------------- jagged batch, registry


def test_read_batch_offsets_validate_and_convert(store: SequenceStore) -> None:
    rng = np.random.default_rng(7)
    for off in range(6):
        store.apply(make_events(rng, 20, users=5, t0=T0 + off * 10**6), (0, off))
    jb = store.read_batch([0, 4, 99, 2], T0 + 3 * 10**6, 12)
    assert jb.offsets.shape == (5,) and jb.offsets[0] == 0 and jb.offsets[-1] == len(jb.ts)
    assert jb.lengths[2] == 0
    jb.validate()
    assert jb.row(1).equals(store.read(4, T0 + 3 * 10**6, 12))
    bad = JaggedSeq(**{**jb.__dict__, "lengths": jb.lengths + np.array([1, 0, 0, -1])})
    with pytest.raises(ValueError):
        bad.validate()
    bad = JaggedSeq(**{**jb.__dict__, "lengths": jb.lengths + 1})
    with pytest.raises(ValueError, match="lengths sum"):
        bad.validate()
    t = jb.to_torch()
    assert t["offsets"].tolist() == jb.offsets.tolist() and t["ts"].dtype.is_floating_point is False
    dense, mask = jb.to_padded()
    assert dense["ts"].shape == mask.shape == (4, int(jb.lengths.max()))
    assert mask.sum() == jb.lengths.sum()
    assert dense["item_id"][1][mask[1]].tolist() == jb.row(1).item_id.tolist()  # right-aligned, oldest first


def test_registry_and_config() -> None:
    with pytest.raises(ValueError, match="unknown store backend"):
        open_store("cassandra://x")
    assert isinstance(open_store("memory://"), MemorySequenceStore)
    with pytest.raises(ValueError, match="multiple of chunk_events"):
        StoreConfig(max_events=100, chunk_events=64)
    with pytest.raises(ValueError, match="max_events"):
        StoreConfig(max_events=32768)
    StoreConfig(max_events=16384)


def test_merge_tails_keeps_every_read_identical_and_shrinks_the_tails(tmp_path):
    from opengem.features.store import SequenceStore, StoreConfig
    from opengem.stream.simulator import SimConfig, Simulator

    s = SequenceStore(str(tmp_path / "s"), StoreConfig(sync=False, chunk_events=64, max_events=256))
    users = set()
    for i, batch in enumerate(Simulator(SimConfig(seed=3, n_users=300)).batches(30_000, batch_size=500)):
        s.apply(batch, (0, i))
        users.update(e.user_id for e in batch)
    uids = np.array(sorted(users))
    before = s.read_batch(uids, before_ts=None, max_len=None)
    cut = s.read_batch(uids, before_ts=int(np.median(before.ts)), max_len=50)
    raw_before = sum(1 for k in s._db.keys() if bytes(k)[:1] == b"T")
    assert s.merge_tails() > 0
    raw_after = sum(1 for k in s._db.keys() if bytes(k)[:1] == b"T")
    assert raw_after <= len(uids) < raw_before  # at most one tail segment per user
    for got, want in ((s.read_batch(uids, before_ts=None, max_len=None), before),
                      (s.read_batch(uids, before_ts=int(np.median(before.ts)), max_len=50), cut)):
        assert got.lengths.tolist() == want.lengths.tolist()
        for col in ("ts", "item_id", "surface", "kind", "category", "advertiser_id"):
            assert getattr(got, col).tolist() == getattr(want, col).tolist(), col
    assert s.merge_tails() == 0  # nothing left to merge
    s.apply(list(Simulator(SimConfig(seed=4, n_users=300)).events(2000)), (0, 10_000))  # appends go on
    assert s.user_features(uids).n_stored.sum() > before.lengths.sum()
    s.close()


@pytest.mark.parametrize("max_tail_segments", [1, 2, 3])
def test_full_tails_merge_raw_segments_by_concatenation(tmp_path: Path, max_tail_segments: int) -> None:
    """A user at max_tail_segments segments with room for more raw events gets one raw segment
    (bytes concatenated, an encoded first segment carried along): reads stay exact, the tail
    keys stay a contiguous range of at most max_tail_segments, and raw events are not encoded
    before max_raw_tail."""
    cfg = StoreConfig(max_events=32, chunk_events=16, max_tail_segments=max_tail_segments, max_raw_tail=6,
                      sync=False)
    ref = Reference(cfg)
    rng = np.random.default_rng(7)
    kinds_seen = set()
    merged_raw = 0
    with SequenceStore(tmp_path / "db", cfg) as s:
        for off in range(60):
            users = [0] + [1] * int(rng.integers(0, 4))  # user 0: one event per commit; user 1: 0..3
            n = len(users)
            cols = cols_of(users, [T0 + 1000 * off + i for i in range(n)], rng.integers(0, 30, n).tolist(),
                           rng.integers(0, len(KINDS), n).tolist())
            assert s.apply(cols, (0, off)) == n
            ref.append(cols)
            h = codec.parse_heads(s._get(codec.head_keys(np.array([0, 1]))))
            for u in (0, 1):
                assert rows(s.read(u)) == ref.read(u, None, None)
                lo, hi = int(h["seg_lo"][u]), int(h["seg_hi"][u])
                assert hi - lo <= max_tail_segments
                segs = s._get([codec.user_key(b"T", u, q) for q in range(lo, hi)])
                assert all(v is not None for v in segs)
                kinds = [v[:1] for v in segs]
                assert kinds.count(codec.SEG_CHUNK) <= 1 and kinds[1:].count(codec.SEG_CHUNK) == 0
                raw = sum((len(v) - 1) // codec.REC.itemsize for v in segs if v[:1] == codec.SEG_RAW)
                assert raw == int(h["raw_n"][u]) <= cfg.max_raw_tail
                assert int(h["tail_n"][u]) == raw + sum(len(codec.decode_segment(v, s._attrs)) for v in segs
                                                        if v[:1] == codec.SEG_CHUNK)
                kinds_seen.add((hi - lo, tuple(kinds)))
                if u == 0:  # one event per commit: a raw segment of several is a merge by concatenation
                    merged_raw = max([merged_raw] + [(len(v) - 1) // codec.REC.itemsize for v in segs
                                                     if v[:1] == codec.SEG_RAW])
            # no tail key outside [seg_lo, seg_hi): merges delete what they replace
            keys = [k for k in s._db.keys(from_key=b"T") if k[:1] == b"T"]
            assert len(keys) == sum(int(h["seg_hi"][u] - h["seg_lo"][u]) for u in (0, 1))
        assert rows(s.read(0)) == ref.read(0, None, None) and s.user_features([0]).n_stored[0] == len(ref.events[0])
    assert merged_raw > max_tail_segments
    if max_tail_segments >= 2:  # the merge with an encoded first segment happened
        assert any(k[:1] == (codec.SEG_CHUNK,) and k.count(codec.SEG_RAW) == 1 for _, k in kinds_seen)


# --------------------------------------------------------------------------- format 2: item attribute table


def test_item_attribute_table_keeps_reads_point_in_time_exact(tmp_path: Path) -> None:
    """Chunks take category / advertiser_id from the table where the events carry the
    item's first values; an item whose attributes changed later keeps its own."""
    cfg = StoreConfig(max_events=64, chunk_events=8, max_tail_segments=3, max_raw_tail=5, sync=False)
    rng = np.random.default_rng(11)
    ref = Reference(cfg)
    s = SequenceStore(tmp_path / "db", cfg)
    reader = SequenceStore.open_reader(tmp_path / "db", tmp_path / "sec", cfg)
    for off in range(40):
        ev = make_events(rng, 23, users=3, t0=T0 + off * 10**6)
        ev["category"] = np.where(ev["item_id"] % 11 == 0, ev["item_id"] % 7 + off // 10, ev["item_id"] % 7)  # a few change
        s.apply(ev, (0, off))
        ref.append(ref_cols(ev))
        reader.catch_up()  # the reader's table lags and catches up on a miss
        for u in range(3):
            assert rows(reader.read(u)) == rows(s.read(u)) == ref.read(u, None, None)
    chunks = [v for k, v in s._db.items(from_key=b"C") if k[:1] == b"C"]
    flagged = sum(bool(v[2] & codec._ATTRS_TABLE) for v in chunks)
    assert 0 < flagged < len(chunks)
    s.close()
    reader.close()
    again = SequenceStore(tmp_path / "db", cfg)  # the table is read back
    for u in range(3):
        assert rows(again.read(u)) == ref.read(u, None, None)
    again.close()


def test_small_table_keys_are_merged(tmp_path: Path) -> None:
    s = SequenceStore(tmp_path / "db", SMALL)
    rng = np.random.default_rng(2)
    ref = Reference(SMALL)
    seen: set[int] = set()
    for off in range(3 * codec.AttrTable.MERGE_KEYS):
        ev = make_events(rng, 5, t0=T0 + off * 10**6)
        ev["item_id"] = ev["item_id"] * 1000 + off  # new items in every commit
        s.apply(ev, (0, off))
        ref.append(ref_cols(ev))
        seen.update(ev["item_id"].tolist())
    keys = [k for k in s._db.keys(from_key=codec.ATTR_PREFIX) if k[:1] == codec.ATTR_PREFIX]
    assert len(keys) <= codec.AttrTable.MERGE_KEYS + 1
    s.close()
    s = SequenceStore.open_reader(tmp_path / "db", tmp_path / "sec", SMALL)
    assert len(s._attrs) == len(seen)
    for u in range(4):
        assert rows(s.read(u)) == ref.read(u, None, None)
    s.close()


def test_attr_table_merges_are_size_tiered() -> None:
    """The writer's merge policy over a long stream of commits with new items: every entry
    is rewritten a few times (once per tier), not once per merge as when every merge took
    the whole table; the number of live keys stays bounded."""
    T = codec.AttrTable
    rng = np.random.default_rng(5)
    keys: dict[int, int] = {}
    seq = total = rewritten = merges = 0
    biggest_merged_over_trigger = 0.0
    t = T()
    while total < 3_000_000:
        m = int(rng.integers(50, 3000))
        keys[seq] = m
        seq += 1
        total += m
        t.keys = keys
        q = t.to_merge()
        if q:
            assert len(q) >= T.MERGE_KEYS and set(q) <= set(keys)
            merged = sum(keys[k] for k in q)
            rewritten += merged
            merges += 1
            top = max(T.tier(keys[k]) for k in q)
            # the tier that triggered holds MERGE_KEYS keys; nothing above it is rewritten
            assert sum(T.tier(keys[k]) == top for k in q) >= T.MERGE_KEYS
            assert all(T.tier(m) <= top for k, m in keys.items() if k in q)
            assert not any(T.tier(m) < top for k, m in keys.items() if k not in q)
            for k in q:
                del keys[k]
            keys[seq] = merged
            seq += 1
        assert len(keys) <= T.MERGE_KEYS * (T.tier(total) + 1)
    assert merges > 50
    assert rewritten / total < T.tier(total) + 1, (rewritten / total, merges)


def test_reader_catch_up_reads_new_attribute_keys(tmp_path: Path) -> None:
    """catch_up reads the writer's new item attribute keys, so the next read that meets
    the new items does not have to (it must not call _fetch_attrs)."""
    w = SequenceStore(tmp_path / "db", SMALL)
    ref = Reference(SMALL)
    rng = np.random.default_rng(3)
    r = SequenceStore.open_reader(tmp_path / "db", tmp_path / "sec", SMALL)
    for off in range(2 * codec.AttrTable.MERGE_KEYS + 3):
        ev = make_events(rng, 6, t0=T0 + off * 10**6)
        ev["item_id"] = ev["item_id"] * 1000 + off  # new items in every commit: new keys, merges
        w.apply(ev, (0, off))
        ref.append(ref_cols(ev))
        if off % 7 == 0:
            r.catch_up()
            fetch, r._fetch_attrs = r._fetch_attrs, None  # a read calling it fails
            try:
                for u in range(4):
                    assert rows(r.read(u)) == ref.read(u, None, None)
            finally:
                r._fetch_attrs = fetch
    r.close()
    w.close()


def test_format_1_store_is_read_and_written_on(tmp_path: Path) -> None:
    """A store written before the attribute table (format 1) reads as it did; the writer
    marks it format 2 (code that reads only format 1 then refuses it); unknown formats are refused."""
    import json
    from dataclasses import replace

    rng = np.random.default_rng(4)
    ref = Reference(SMALL)
    s = SequenceStore(tmp_path / "db", replace(SMALL, item_attr_table=False))  # writes format-1 chunks only
    for off in range(15):
        ev = make_events(rng, 17, t0=T0 + off * 10**6)
        s.apply(ev, (0, off))
        ref.append(ref_cols(ev))
    assert not any(k[:1] == codec.ATTR_PREFIX for k in s._db.keys())
    meta = json.loads(s._get(codec.META_KEY))
    s._db.put(codec.META_KEY, json.dumps(dict(meta, format=1)).encode())
    s.close()
    r = SequenceStore.open_reader(tmp_path / "db", tmp_path / "sec", SMALL)
    assert all(rows(r.read(u)) == ref.read(u, None, None) for u in range(4))
    r.close()
    s = SequenceStore(tmp_path / "db", SMALL)
    assert json.loads(s._get(codec.META_KEY))["format"] == codec.FORMAT_VERSION
    for off in range(15, 30):
        ev = make_events(rng, 17, t0=T0 + off * 10**6)
        s.apply(ev, (0, off))
        ref.append(ref_cols(ev))
    assert all(rows(s.read(u)) == ref.read(u, None, None) for u in range(4))
    s.compact()
    assert all(rows(s.read(u)) == ref.read(u, None, None) for u in range(4))
    s._db.put(codec.META_KEY, json.dumps(dict(meta, format=99)).encode())
    s.close()
    with pytest.raises(ValueError, match="format=99"):
        SequenceStore(tmp_path / "db", SMALL)


# --------------------------------------------------------------------------- tail packs (format 3)

PACKS = StoreConfig(max_events=32, chunk_events=8, max_tail_segments=3, max_raw_tail=5, sync=False, pack_events=12)


def _pack_keys(s: SequenceStore) -> list[bytes]:
    return [bytes(k) for k in s._db.keys(from_key=codec.PACK_PREFIX) if bytes(k)[:1] == codec.PACK_PREFIX]


def _check_reads(s: SequenceStore, ref: Reference, users: range, draw=None) -> None:
    for uid in users:
        for before in (None, T0 + 10**7 + 5_000, T0 + 10**7 + 40_000, T0):
            for max_len in (None, 0, 1, 3, 9, 40):
                assert rows(s.read(uid, before, max_len)) == ref.read(uid, before, max_len), (uid, before, max_len)
    jb = s.read_batch(np.array(list(users)), None, 7).validate()
    for i, uid in enumerate(users):
        assert rows(jb.row(i)) == ref.read(uid, None, 7)


@settings(max_examples=30, deadline=None)
@given(batches=scenarios(), data=st.data())
def test_compaction_packs_tails_and_every_read_stays_exact(batches, data) -> None:
    """Compactions between appends (tails packed, packs rebuilt, old ones deleted), appends
    after them (raw segments after a packed tail, merges and seals that take it back),
    reopening, and a reader: every read equals the reference's."""
    with tempfile.TemporaryDirectory() as d:
        s = SequenceStore(f"{d}/db", PACKS)
        ref = Reference(PACKS)
        try:
            for off, b in enumerate(batches):
                cols = cols_of(*b)
                s.apply(cols, (0, off))
                ref.append(cols)
                if data.draw(st.booleans()):
                    s.compact()
                    h = codec.parse_heads(s._get(codec.head_keys(np.arange(4))))
                    live = {int(q) - 1 for q in h["pack"] if q}
                    assert {int.from_bytes(k[1:9], "big") for k in _pack_keys(s)} == live  # old packs gone
                    # a packed tail is the whole tail of a user without sealed chunks
                    p = h["pack"] > 0
                    assert (h["seg_hi"] == h["seg_lo"])[p].all() and (h["chunk_hi"] == h["chunk_lo"])[p].all()
                    assert (h["raw_n"][p] == 0).all() and (h["tail_n"][p] > 0).all()
                    _check_reads(s, ref, range(5))
                if data.draw(st.booleans()):
                    s.close()
                    s = SequenceStore(f"{d}/db", PACKS)
            _check_reads(s, ref, range(5))
            r = SequenceStore.open_reader(f"{d}/db", f"{d}/sec", PACKS)
            try:
                _check_reads(r, ref, range(5))
            finally:
                r.close()
            assert s.apply(cols_of(*batches[0]), (0, 0)) == 0  # idempotent by (partition, offset) after it all
        finally:
            s.close()


def test_packed_tails_take_appends_merges_and_seals(tmp_path: Path) -> None:
    """After compact(): a small append adds a raw segment after the packed tail; a full
    raw tail merges it with the packed part into one encoded segment; a full tail seals a
    chunk from it. Reads equal the reference's at every step, before and after reopening."""
    rng = np.random.default_rng(21)
    s = SequenceStore(tmp_path / "db", PACKS)
    ref = Reference(PACKS)
    off = 0

    def add(n: int) -> None:
        nonlocal off
        ev = make_events(rng, n, users=6, t0=T0 + 10**7 + off * 10**4, spread=10**4)
        ev["category"] = ev["item_id"] % 7  # attributes of the item: every tail can be packed
        s.apply(ev, (0, off))
        ref.append(ref_cols(ev))
        off += 1

    for _ in range(3):
        add(9)
    s.compact()
    h = codec.parse_heads(s._get(codec.head_keys(np.arange(6))))
    nochunk = h["chunk_hi"] == h["chunk_lo"]
    assert nochunk.any() and (h["pack"][nochunk] > 0).all() and len(_pack_keys(s)) >= 2
    assert not any(bytes(k)[:1] == b"T" for k in s._db.keys(from_key=b"T") if
                   int.from_bytes(bytes(k)[1:9], "big") in np.flatnonzero(nochunk).tolist())
    _check_reads(s, ref, range(7))
    add(6)  # ~1 event per user: raw segments after the packed tails
    _check_reads(s, ref, range(7))
    for _ in range(6):  # raw tails overflow (max_raw_tail 5), tails fill chunks: the packed parts move out
        add(12)
        _check_reads(s, ref, range(7))
    h = codec.parse_heads(s._get(codec.head_keys(np.arange(6))))
    assert (h["pack"] == 0).all()
    s.compact()
    s.compact()  # a second compaction repacks (new packs, old deleted)
    _check_reads(s, ref, range(7))
    s.close()
    s = SequenceStore(tmp_path / "db", PACKS)
    _check_reads(s, ref, range(7))
    add(3)
    _check_reads(s, ref, range(7))
    s.close()


def test_items_with_changed_attributes_are_not_packed(tmp_path: Path) -> None:
    """A tail with an event whose category differs from its item's first-seen one keeps its
    own encoded segment (packs take attributes from the table only); reads stay exact."""
    s = SequenceStore(tmp_path / "db", PACKS)
    ref = Reference(PACKS)
    a = cols_of([0, 0, 1, 1], [T0 + 1, T0 + 2, T0 + 3, T0 + 4], [1, 2, 1, 2], [3, 3, 3, 3])
    b = cols_of([0, 1], [T0 + 5, T0 + 6], [1, 4], [3, 3])
    b["category"][0] = 999  # item 1, seen first with category 11
    for off, c in enumerate((a, b)):
        s.apply(c, (0, off))
        ref.append(c)
    s.compact()
    h = codec.parse_heads(s._get(codec.head_keys(np.array([0, 1]))))
    assert h["pack"][0] == 0 and h["pack"][1] > 0
    _check_reads(s, ref, range(2))
    s.close()


def test_packs_off_and_without_attribute_table(tmp_path: Path) -> None:
    from dataclasses import replace

    rng = np.random.default_rng(2)
    for i, cfg in enumerate((replace(PACKS, pack_events=0), replace(PACKS, item_attr_table=False))):
        s = SequenceStore(tmp_path / f"db{i}", cfg)
        ref = Reference(cfg)
        for off in range(3):
            ev = make_events(rng, 9, users=4)
            s.apply(ev, (0, off))
            ref.append(ref_cols(ev))
        s.compact()
        assert not _pack_keys(s)
        _check_reads(s, ref, range(5))
        s.close()


def test_format_2_store_on_disk_is_read_then_written_on(tmp_path: Path) -> None:
    """tests/features/data/store_format2.tar.gz: a store written by the format-2 code
    (commit 4ee67b4; SMALL config; compacted, then raw segments appended). This code
    reads it exactly as that code did (its reads are in store_format2_reads.npz), writes
    on it (format 3), compacts it into packs and reads the same again."""
    import json
    import tarfile

    data = Path(__file__).parent / "data"
    with tarfile.open(data / "store_format2.tar.gz") as t:
        t.extractall(tmp_path)
    exp = np.load(data / "store_format2_reads.npz")

    def same(s: SequenceStore) -> None:
        for key in exp.files:
            u, b, m = key.split("_")
            r = s.read(int(u), None if b == "None" else int(b), None if m == "None" else int(m))
            got = np.stack([r.ts, r.item_id, r.surface.astype(np.int64), r.kind.astype(np.int64),
                            r.category.astype(np.int64), r.advertiser_id])
            assert np.array_equal(got, exp[key]), key

    path = tmp_path / "store"
    r = SequenceStore.open_reader(path, tmp_path / "sec", SMALL)
    assert json.loads(r._get(codec.META_KEY))["format"] == 2
    same(r)
    r.close()
    s = SequenceStore(path, replace_packs(SMALL))
    same(s)
    assert json.loads(s._get(codec.META_KEY))["format"] == codec.FORMAT_VERSION == 3
    # new users whose attributes are their items' (the fixture's are not: -1 at random)
    rng = np.random.default_rng(8)
    ref = Reference(SMALL)
    for off in range(44, 47):
        ev = make_events(rng, 9, users=3, t0=T0 + off * 10**6)
        ev["user_id"] += 100
        ev["item_id"] += 500  # items new to the table
        ev["category"] = ev["item_id"] % 7
        ev["advertiser_id"] = np.where(ev["advertiser_id"] >= 0, ev["item_id"] % 5, -1)
        s.apply(ev, (0, off))
        ref.append(ref_cols(ev))
    assert s.apply(ev, (0, 43)) == 0  # the fixture's offsets hold
    s.compact()
    assert _pack_keys(s)
    same(s)
    _check_reads(s, ref, range(100, 103))
    s.close()


def replace_packs(cfg: StoreConfig) -> StoreConfig:
    from dataclasses import replace

    return replace(cfg, pack_events=16)


# --------------------------------------------------------------------------- decoded cache

from dataclasses import replace  # noqa: E402

from opengem.features.store import _needed_chunks  # noqa: E402


@settings(max_examples=30, deadline=None)
@given(batches=scenarios(), data=st.data(), capacity=st.sampled_from([0, 3000, 64 << 20]))
def test_decoded_cache_reads_stay_exact_across_appends_merges_and_compactions(batches, data, capacity) -> None:
    """Reads between appends, merges, seals, retention and compactions, by the writer and
    by a catching-up reader, both with a decoded cache (a tiny one evicts all the time),
    equal the reference's -- and a store with the cache off returns the same."""
    cfg = replace(PACKS, decoded_cache_bytes=capacity)
    with tempfile.TemporaryDirectory() as d:
        s = SequenceStore(f"{d}/db", cfg)
        r = SequenceStore.open_reader(f"{d}/db", f"{d}/sec", cfg)
        ref = Reference(cfg)
        try:
            for off, b in enumerate(batches):
                cols = cols_of(*b)
                s.apply(cols, (0, off))
                ref.append(cols)
                op = data.draw(st.sampled_from(["read", "read", "compact", "merge", "none"]))
                if op == "compact":
                    s.compact()
                elif op == "merge":
                    s.merge_tails()
                if op != "none":
                    s.flush()
                    r.catch_up()
                    for uid in range(5):
                        before = data.draw(st.one_of(st.none(), st.integers(T0, T0 + 10**7 + 1000 * 400)))
                        max_len = data.draw(st.one_of(st.none(), st.integers(0, 40)))
                        want = ref.read(uid, before, max_len)
                        assert rows(s.read(uid, before, max_len)) == want
                        assert rows(r.read(uid, before, max_len)) == want
            s.flush()
            r.catch_up()
            _check_reads(s, ref, range(5))
            _check_reads(r, ref, range(5))
            if capacity:
                assert s._decoded.bytes <= capacity and r._decoded.bytes <= capacity
        finally:
            r.close()
            s.close()


def test_decoded_cache_hits_and_results_do_not_alias_it(tmp_path: Path) -> None:
    """A second read of a user takes its sealed chunks from the cache (only the head, the
    directory and what changed are fetched), and writing into a returned array changes
    neither the cache nor the next read."""
    cfg = replace(SMALL, max_events=64)
    s = SequenceStore(tmp_path / "db", cfg)
    rng = np.random.default_rng(3)
    s.apply(make_events(rng, 300, users=2), (0, 0))
    first = s.read(0, None, 64)
    hits = s._decoded.hits
    again = s.read(0, None, 64)
    assert s._decoded.hits > hits
    assert rows(again) == rows(first)
    again.ts[:] = -1
    again.item_id[:] = -1
    assert rows(s.read(0, None, 64)) == rows(first)
    assert rows(s.read(0, None, 1)) == rows(first)[-1:]  # one part only: still a copy
    one = s.read(0, None, 1)
    one.ts[:] = 0
    assert rows(s.read(0, None, 64)) == rows(first)
    ev = make_events(rng, cfg.chunk_events, users=1)  # user 0 of a second store: one sealed chunk, no tail
    s2 = SequenceStore(tmp_path / "db2", cfg)
    s2.apply(ev, (0, 0))
    assert int(codec.parse_heads(s2._get(codec.head_keys(np.array([0]))))["tail_n"][0]) == 0
    whole = s2.read(0)
    whole.ts[:] = 0
    assert rows(s2.read(0)) != rows(whole) and len(s2.read(0).ts) == cfg.chunk_events
    s2.close()
    s.close()


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_needed_chunks_fast_path_equals_the_general_rule(data) -> None:
    """The latest-read shortcut (chunks in ts order) selects what the general rule does."""
    C = data.draw(st.sampled_from([1, 4, 8]))
    K = data.draw(st.integers(1, 12))
    lens = data.draw(st.lists(st.integers(0, 50), min_size=K, max_size=K))
    gaps = data.draw(st.lists(st.integers(1, 50), min_size=K, max_size=K))
    mn, mx, t = [], [], 1000
    for g, ln in zip(gaps, lens):
        t += g
        mn.append(t)
        t += ln
        mx.append(t)
    d = np.array(list(zip(mn, mx)), codec.DIR)
    tail_n = data.draw(st.integers(0, 20))
    tail_min = data.draw(st.integers(900, t + 100))
    tail_max = max(tail_min, data.draw(st.integers(900, t + 100)))
    max_len = data.draw(st.integers(1, K * C + tail_n + 5))
    got = list(_needed_chunks(d.tobytes(), 7, C, None, max_len, tail_n, tail_min, tail_max))
    later = (d["min"][None, :] > d["max"][:, None]).sum(axis=1) * C
    if tail_n:
        later += np.where(tail_min > d["max"], tail_n, 0)
    assert got == (7 + np.flatnonzero(later < max_len)).tolist()


def test_cached_runs_extend_by_new_chunks_and_stay_exact(tmp_path: Path) -> None:
    """A user's sealed chunks are cached as one run: after a new seal, the next latest read
    fetches that chunk alone; a point-in-time read needing older chunks fetches only those;
    retention trims the run; late events across chunk boundaries are still sorted. Every
    read equals the reference's and a cache-less reader's."""
    cfg = replace(SMALL, max_events=64, chunk_events=8, max_raw_tail=4)
    s = SequenceStore(tmp_path / "db", cfg)
    bare = SequenceStore.open_reader(tmp_path / "db", tmp_path / "sec", replace(cfg, decoded_cache_bytes=0))
    ref = Reference(cfg)
    fetched: list[bytes] = []
    get = s._get

    def spy(keys: Any) -> Any:
        if isinstance(keys, list):
            fetched.extend(k for k in keys if k[:1] == b"C")
        return get(keys)

    s._get = spy
    rng = np.random.default_rng(5)
    t = T0
    off = 0

    def append(n: int, late: bool = False) -> None:
        nonlocal t, off
        ev = make_events(rng, n, users=1)
        ts = t + np.arange(n) * 1000
        if late:  # a few events older than the last sealed chunk's: boundaries out of order
            ts[rng.integers(0, n, 3)] -= 40_000
        ev["ts"] = ts
        t = int(ts.max()) + 1000
        s.apply(ev, (0, off))
        ref.append(ref_cols(ev))
        off += 1

    def check(before: int | None, max_len: int | None) -> int:
        fetched.clear()
        got = rows(s.read(0, before, max_len))
        assert got == ref.read(0, before, max_len)
        bare.catch_up(force=True)
        assert rows(bare.read(0, before, max_len)) == got
        return len(fetched)

    append(40)  # 5 sealed chunks
    assert check(None, 32) == 4  # chunks 1..4 (the tail is empty)
    assert check(None, 32) == 0  # all from the run
    append(8)  # one more seal
    assert check(None, 32) == 1  # only the new chunk
    run = s._decoded.get_run(b"R" + (0).to_bytes(8, "big"))
    assert (run.first, run.stop) == (1, 6)
    assert check(None, None) == 1  # chunk 0, older than the run: fetched, the run extended down
    assert s._decoded.get_run(b"R" + (0).to_bytes(8, "big")).first == 0
    assert check(T0 + 20_000, 8) == 0  # point in time, inside the run
    append(40)  # 11 chunks seen, 8 kept (retention dropped 0..2)
    assert check(None, 64) == 5  # 6..10 fetched; the run trimmed to the kept chunks
    run = s._decoded.get_run(b"R" + (0).to_bytes(8, "big"))
    assert (run.first, run.stop) == (3, 11)
    append(16, late=True)  # late events: chunks whose ts ranges overlap
    append(3)  # and a tail
    for before in (None, t - 30_000, t - 70_000):
        for max_len in (None, 1, 10, 40, 64):
            check(before, max_len)
    assert s._decoded.get_run(b"R" + (0).to_bytes(8, "big")).breaks  # the late events made some
    bare.close()
    s.close()
