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
