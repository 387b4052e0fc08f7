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
