"""The worker's plain ingest steps, on real RocksDB shards, without a broker."""

from __future__ import annotations

import json

import pytest

from opengem.stream.codec import dicts_to_batch, encode_batch
from opengem.stream.ingest import IngestConfig, Ingestor, Record, ShardMismatch, bind_topic
from opengem.stream.joiner import JoinerConfig
from opengem.stream.simulator import SimConfig, Simulator

JOINER = JoinerConfig(click_window_ms=60_000, conversion_window_ms=600_000)


def sim_records(n: int, per_record: int = 512, seed: int = 4) -> list[Record]:
    out = []
    for i, rb in enumerate(Simulator(SimConfig(seed=seed)).record_batches(n, batch_size=per_record)):
        out.append(Record(0, i, encode_batch(rb)))
    return out


def test_arrow_rows_that_fail_validation_become_dead_letters_and_the_rest_is_stored(tmp_path):
    good = {"event_id": "a", "user_id": 7, "ts": 1767225600000, "surface": "feed", "kind": "view",
            "item_id": 3, "is_ad": False}
    rows = [good, {**good, "event_id": "b", "surface": "billboard"}, {**good, "event_id": "c", "ts": 1767225600001},
            {**good, "event_id": "d", "kind": "click"}]  # click without request_id, is_ad false
    raw = encode_batch(dicts_to_batch(rows))
    ing = Ingestor(tmp_path, cfg=IngestConfig(joiner=JOINER))
    dead, _ = ing.process([Record(2, 10, raw, b"7")])
    assert [(d.row, d.reason) for d in dead] == [(1, "unknown_value"), (3, "inconsistent")]
    assert json.loads(dead[0].value)["surface"] == "billboard"
    headers = dict(dead[0].headers("opengem.events"))
    assert headers["opengem-source"] == b"opengem.events/2/10#1"
    seq = ing.shard(2).store.read(7)
    assert seq.ts.tolist() == [1767225600000, 1767225600001]
    assert ing.shard(2).store.applied_offset(2) == 10


def test_a_record_that_is_all_bad_still_advances_the_offsets(tmp_path):
    ing = Ingestor(tmp_path, cfg=IngestConfig(joiner=JOINER))
    dead, _ = ing.process([Record(0, 0, b"\x00garbage"), Record(0, 1, b'{"event_id": 1}')])
    assert [d.reason for d in dead] == ["bad_format", "bad_type"]
    assert ing.shard(0).applied() == 1


def test_replaying_records_is_a_no_op_and_examples_are_acked_once(tmp_path):
    records = sim_records(60_000)
    ing = Ingestor(tmp_path, cfg=IngestConfig(joiner=JOINER))
    examples = []
    for i in range(0, len(records), 10):
        _, ex = ing.process(records[i:i + 10], now_ms=2**62)
        examples.extend(ex)
    assert examples, "the joiner closed no window"
    assert ing.pending_examples() == []  # all acked
    stored = ing.counts["events"]
    assert stored == 60_000
    _, again = ing.process(records[:50], now_ms=2**62)
    assert again == [] and ing.counts["events"] == stored
    ing.close()
    # Reopen: the shard knows where it stands.
    ing2 = Ingestor(tmp_path, cfg=IngestConfig(joiner=JOINER))
    assert ing2.resume_offset(0) == len(records)


def test_unacked_examples_survive_a_restart(tmp_path):
    records = sim_records(30_000)
    ing = Ingestor(tmp_path, cfg=IngestConfig(joiner=JOINER))
    prep = ing.prepare(records, now_ms=2**62)
    pairs = ing.commit(prep)  # "crash" before producing / acking
    assert pairs
    ing.close()
    ing2 = Ingestor(tmp_path, cfg=IngestConfig(joiner=JOINER))
    ing2.shard(0)
    assert sorted(ex.example_id for _, ex in ing2.pending_examples()) == sorted(ex.example_id for _, ex in pairs)


def test_shards_refuse_another_incarnation_of_the_topic(tmp_path):
    bind_topic(tmp_path, "opengem.events", "id-1")
    bind_topic(tmp_path, "opengem.events", "id-1")
    with pytest.raises(ShardMismatch, match="--rebuild"):
        bind_topic(tmp_path, "opengem.events", "id-2")


def test_example_records_stay_under_the_size_limit_and_round_trip(tmp_path):
    from opengem.stream.joiner import decode_examples, encode_example_records

    ing = Ingestor(tmp_path, cfg=IngestConfig(joiner=JOINER))
    _, pairs = ing.process(sim_records(60_000), now_ms=2**62)
    exs = [ex for _, ex in pairs]
    recs = encode_example_records(exs, max_bytes=64 << 10)
    assert len(recs) > 1 and all(len(r) <= 64 << 10 for r in recs)
    assert [e for r in recs for e in decode_examples(r)] == exs


def test_empty_and_null_records_are_dead_letters_not_crashes(tmp_path):
    ing = Ingestor(tmp_path, cfg=IngestConfig(joiner=JOINER))
    dead, _ = ing.process([Record(1, 0, b""), Record(1, 1, None)])
    assert [d.reason for d in dead] == ["bad_format", "bad_format"]
    assert ing.shard(1).applied() == 1


def _json_stream(n: int, seed: int = 9) -> list[Record]:
    """Simulated one-event JSON records over 3 partitions, with tricky records mixed in."""
    good = {"event_id": "t", "user_id": 11, "ts": 1767225600000, "surface": "feed", "kind": "view",
            "item_id": 5, "is_ad": False}
    tricky = [
        json.dumps({**good, "event_id": "pretty"}, indent=2).encode(),  # valid, multi-line: record by record
        b'{"event_id": "dup", "event_id": "dup2", "user_id": 11, "ts": 1767225600001, "surface": "feed",'
        b' "kind": "view", "item_id": 6, "is_ad": false}',  # valid for json.loads (last key wins)
        json.dumps([{**good, "event_id": "arr1"}, {**good, "event_id": "arr2"}]).encode(),  # an array
        json.dumps({**good, "user_id": True}).encode(),
        json.dumps({**good, "item_id": 1.0}).encode(),
        json.dumps({**good, "hour": 300}).encode(),
        json.dumps({**good, "p_click": 0.5}).encode(),
        json.dumps({**good, "extra": 1}).encode(),
        b'{"event_id": "nan", "user_id": 1, "ts": 1767225600000, "surface": "feed", "kind": "impression",'
        b' "item_id": 1, "is_ad": true, "request_id": "r", "p_click": NaN}',
        json.dumps(good).encode() + json.dumps(good).encode(),  # two objects in one record
        b'{"event_id": "x", "user_id": ',
        b"   ",
        encode_batch(dicts_to_batch([{**good, "event_id": "arrow-in-json-run"}])),
    ]
    evs = list(Simulator(SimConfig(seed=seed, events_per_second=2)).events(n))  # ~50 min: windows close
    out, offsets = [], [0, 0, 0]
    for i, e in enumerate(evs):
        p = e.user_id % 3
        out.append(Record(p, offsets[p], e.to_json(), str(e.user_id).encode()))
        offsets[p] += 1
        if i % 97 == 0:
            t = tricky[(i // 97) % len(tricky)]
            out.append(Record(p, offsets[p], t, b"x"))
            offsets[p] += 1
    return out


def _ingest_all(root, records, bulk: bool, monkeypatch, step: int = 500):
    import opengem.stream.ingest as ingest_mod

    monkeypatch.setattr(ingest_mod, "bulkable_json", ingest_mod.bulkable_json if bulk else (lambda v: False))
    ing = Ingestor(root, cfg=IngestConfig(joiner=JOINER))
    dead, examples = [], []
    for i in range(0, len(records), step):
        d, ex = ing.process(records[i:i + step], now_ms=2**62)
        dead += d
        examples += ex
    return ing, dead, examples


def test_bulk_json_path_equals_record_by_record(tmp_path, monkeypatch):
    records = _json_stream(6000)
    fast, dead_f, ex_f = _ingest_all(tmp_path / "fast", records, True, monkeypatch)
    slow, dead_s, ex_s = _ingest_all(tmp_path / "slow", records, False, monkeypatch)
    key = lambda d: (d.partition, d.offset, d.row, d.reason, d.message)  # noqa: E731
    assert sorted(map(key, dead_f)) == sorted(map(key, dead_s))
    assert {d.reason for d in dead_f} >= {"bad_type", "out_of_range", "unknown_field", "bad_json", "inconsistent"}
    assert fast.counts["events"] == slow.counts["events"] > 6000  # the valid tricky ones are in too
    assert sorted(e.to_json() for _, e in ex_f) == sorted(e.to_json() for _, e in ex_s) and ex_f
    users = sorted({int(r.key) for r in records if r.key.isdigit()} | {11})
    for p in range(3):
        a = fast.shard(p).store.read_batch(users)
        b = slow.shard(p).store.read_batch(users)
        assert a.lengths.tolist() == b.lengths.tolist()
        for col in ("ts", "item_id", "surface", "kind", "category", "advertiser_id"):
            assert getattr(a, col).tolist() == getattr(b, col).tolist(), col
        assert fast.shard(p).applied() == slow.shard(p).applied()


def test_a_bulk_json_run_replayed_across_the_applied_offset_adds_only_the_new_records(tmp_path, monkeypatch):
    records = [r for r in _json_stream(400) if r.partition == 0 and r.value[:1] == b"{"]
    records = [Record(0, i, r.value, r.key) for i, r in enumerate(records) if b"\n" not in r.value]
    ing = Ingestor(tmp_path, cfg=IngestConfig(joiner=JOINER))
    ing.process(records[:40], now_ms=2**62)
    n40 = ing.counts["events"]
    ing.process(records[25:90], now_ms=2**62)  # one run straddling offset 39
    ing.process(records[:90], now_ms=2**62)  # all old
    ref = Ingestor(tmp_path / "ref", cfg=IngestConfig(joiner=JOINER))
    ref.process(records[:90], now_ms=2**62)
    assert ing.counts["events"] == ref.counts["events"] > n40
    uids = sorted({int(r.key) for r in records[:90] if r.key.isdigit()})
    assert ing.shard(0).store.read_batch(uids).ts.tolist() == ref.shard(0).store.read_batch(uids).ts.tolist()


def test_commit_returns_only_what_it_closed_while_earlier_examples_are_in_flight(tmp_path):
    """With example acks in flight (the worker acks in the background) a commit must not
    hand out the still-unacked examples of earlier commits again; they stay pending."""
    records = sim_records(60_000)
    ing = Ingestor(tmp_path, cfg=IngestConfig(joiner=JOINER))
    half = len(records) // 2
    first = ing.commit(ing.prepare(records[:half], now_ms=2**62))
    second = ing.commit(ing.prepare(records[half:], now_ms=2**62))
    assert first and second
    ids1, ids2 = {ex.example_id for _, ex in first}, {ex.example_id for _, ex in second}
    assert not ids1 & ids2
    assert {ex.example_id for _, ex in ing.pending_examples()} == ids1 | ids2
    ing.ack_examples(second)
    assert {ex.example_id for _, ex in ing.pending_examples()} == ids1
    ing.ack_examples(first)
    assert ing.pending_examples() == [] and ing.counts["examples"] == len(ids1) + len(ids2)


def test_pending_examples_of_a_partition_open_its_shard(tmp_path):
    """After a restart nothing is open yet: asking for one partition's pending examples must
    read its outbox from disk (the worker asks before anything else opens the shard)."""
    records = sim_records(30_000)
    ing = Ingestor(tmp_path, cfg=IngestConfig(joiner=JOINER))
    pairs = ing.commit(ing.prepare(records, now_ms=2**62))
    assert pairs
    ing.close()
    ing2 = Ingestor(tmp_path, cfg=IngestConfig(joiner=JOINER))
    assert ing2.pending_examples() == []  # no shard open
    assert sorted(ex.example_id for _, ex in ing2.pending_examples(0)) == sorted(ex.example_id for _, ex in pairs)
    assert ing2.pending_examples(1) == []


def test_bad_records_inside_a_json_run_do_not_split_it_and_are_consumed(tmp_path):
    """Bad records (not bulk-readable) between and after one-event JSON records of a partition:
    one bulk run for the valid ones, every bad one a dead letter, and the partition's applied
    offset is the batch's last offset even when that record is a bad one."""
    from opengem.stream.codec import encode_json

    events = [e for b in Simulator(SimConfig(seed=5)).batches(300) for e in b][:300]
    records, off = [], 0
    for i, e in enumerate(events):
        records.append(Record(0, off, encode_json([e])))
        off += 1
        if i % 3 == 0:
            records.append(Record(0, off, b"\xff\x00 not json"))
            off += 1
    records.append(Record(0, off, b"[broken"))  # the last record: a bad one after the run
    ing = Ingestor(tmp_path, cfg=IngestConfig(joiner=JOINER))
    prep = ing.prepare(records, now_ms=2**62)
    bad = sum(1 for r in records if not r.value.startswith(b"{"))
    assert len(prep.dead) == bad and prep.events == len(events)
    entries = prep.valid[0]
    assert [o for o, _ in entries] == sorted(o for o, _ in entries)
    assert len([1 for _, p in entries if len(p)]) == 1  # one bulk run, not one per gap
    ing.commit(prep)
    assert ing.shard(0).store.applied_offset(0) == off
    assert ing.resume_offset(0) == off + 1
    assert ing.counts["events"] == len(events)
