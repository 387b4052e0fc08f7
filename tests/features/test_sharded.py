"""The trainer's and servers' view of all shards: routing, parity with each shard, item totals."""

from __future__ import annotations

from collections import Counter

import numpy as np

from opengem.features.sharded import ShardedReader
from opengem.stream.codec import encode_json
from opengem.stream.ingest import IngestConfig, Ingestor, Record
from opengem.stream.producer import partition_of
from opengem.stream.simulator import SimConfig, Simulator

P = 3


def build(tmp_path, n=30_000):
    events = [e for b in Simulator(SimConfig(seed=8, n_users=500)).batches(n) for e in b]
    ing = Ingestor(tmp_path / "data")
    offsets = Counter()
    records = []
    for e in events:
        p = partition_of(e.user_id, P)
        records.append(Record(p, offsets[p], encode_json([e])))
        offsets[p] += 1
    for i in range(0, len(records), 2000):
        ing.process(records[i:i + 2000], now_ms=2**62)
    return events, ing


def test_routed_reads_equal_each_shards_own_reads_and_see_new_events(tmp_path):
    events, ing = build(tmp_path)
    users = sorted({e.user_id for e in events})
    reader = ShardedReader(tmp_path / "data", P, secondary_root=tmp_path / "sec")
    try:
        reader.catch_up()
        for u in users[:200]:
            own = ing.shard(partition_of(u, P)).store.read(u, None, 4096)
            assert reader.read(u, None, 4096).equals(own)
        # batched, point in time, mixed partitions, an unknown user
        probe = np.array(users[:64] + [10**12])
        before = np.full(len(probe), events[len(events) // 2].ts)
        jag = reader.read_batch(probe, before, 128)
        jag.validate()
        for i, u in enumerate(probe.tolist()):
            assert jag.row(i).equals(reader.read(u, int(before[i]), 128))
            assert (jag.row(i).ts < before[i]).all()
        assert jag.lengths[-1] == 0
        uf = reader.user_features(probe)
        assert uf.n_events[-1] == 0 and uf.n_events[:-1].sum() > 0
        # items: counters summed over the shards
        ads = Counter(e.item_id for e in events if e.kind == "impression")
        top = [a for a, _ in ads.most_common(20)]
        from opengem.stream.events import KIND_INDEX

        f = reader.item_features(top)
        assert f.counts[:, KIND_INDEX["impression"]].tolist() == [ads[a] for a in top]
        # the reader follows the writer: new events show after catch_up
        u = users[0]
        p = partition_of(u, P)
        before_n = len(reader.read(u))
        last = max(e.ts for e in events)
        from opengem.stream.events import Event

        new = Event(event_id="n1", user_id=u, ts=last + 1, surface="feed", kind="view", item_id=1, is_ad=False)
        ing.process([Record(p, 10**6, encode_json([new]))], now_ms=2**62)
        reader.catch_up()
        assert len(reader.read(u)) == before_n + 1
    finally:
        reader.close()
        ing.close()


def test_follower_catches_up_one_shard_at_a_time_spread_over_the_interval(tmp_path):
    """rocksdict holds the GIL through a catch-up: the follower thread takes the shards one by
    one, spaced by interval / shards, so a request meets one shard's catch-up, not their sum;
    every shard still catches up once per interval and new events show within it."""
    import threading
    import time

    events, ing = build(tmp_path, n=3000)
    interval = 0.3
    reader = ShardedReader(tmp_path / "data", P, secondary_root=tmp_path / "sec", interval_s=interval)
    spans: list[tuple[int, float, float]] = []
    lock = threading.Lock()
    try:
        for p, s in reader._stores.items():
            def timed(_orig=s.catch_up, _p=p):
                t = time.monotonic()
                _orig()
                with lock:
                    spans.append((_p, t, time.monotonic()))
            s.catch_up = timed
        u = events[0].user_id
        p = partition_of(u, P)
        n0 = len(reader.read(u))
        from opengem.stream.events import Event

        new = Event(event_id="s1", user_id=u, ts=max(e.ts for e in events) + 1, surface="feed",
                    kind="view", item_id=1, is_ad=False)
        ing.process([Record(p, 10**6, encode_json([new]))], now_ms=2**62)
        t_new = time.monotonic()
        while len(reader.read(u)) == n0:
            assert time.monotonic() - t_new < 3 * interval, "the new event did not show"
            time.sleep(0.01)
        time.sleep(4 * interval)
    finally:
        reader.close()
        ing.close()
    with lock:
        got = sorted(spans, key=lambda x: x[1])
    per = Counter(p for p, _, _ in got)
    assert set(per) == set(range(P)) and min(per.values()) >= 3, per
    for (_, a0, a1), (_, b0, _) in zip(got, got[1:]):
        assert b0 >= a1, "two shards caught up at once"
        assert b0 - a0 >= 0.5 * interval / P, (b0 - a0, interval / P)
    for q in range(P):  # each shard about once per interval (not once per interval x (shards + 1))
        ts = [t for p_, t, _ in got if p_ == q]
        assert np.median(np.diff(ts)) < 1.5 * interval, np.diff(ts)
