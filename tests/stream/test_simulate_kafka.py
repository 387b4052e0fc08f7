"""End to end through the real embedded broker: ≥100k simulated events out and back."""

from __future__ import annotations

import time
from collections import defaultdict

import pytest
from kafka import KafkaConsumer

from opengem.stream.broker import consumer_timing, ensure_topics, high_watermarks
from opengem.stream.codec import decode
from opengem.stream.events import DEFAULT_SURFACES, Event
from opengem.stream.producer import EventProducer, partition_of
from opengem.stream.simulator import SimConfig, Simulator

pytestmark = pytest.mark.integration

N_EVENTS = 100_000


# 100k events as Arrow batches (~50 records) in the default run; as one JSON record per event
# (100k records through kafka-python, ~30 s) in the slow run, and 20k of them by default.
@pytest.mark.parametrize("fmt,n_events", [
    ("json", 20_000),
    pytest.param("json", N_EVENTS, marks=pytest.mark.slow),
    ("arrow", N_EVENTS),
])
def test_events_round_trip_through_a_consumer_group(broker, topic_name, fmt, n_events):
    partitions = 4
    ensure_topics(broker.bootstrap, [topic_name], partitions)
    sent: list[Event] = []
    with EventProducer(broker.bootstrap, topic_name, fmt=fmt) as prod:
        for batch in Simulator(SimConfig(seed=11)).batches(n_events, batch_size=4096):
            prod.send(batch)
            sent.extend(batch)
    assert len(sent) >= n_events
    hw = high_watermarks(broker.bootstrap, topic_name)
    if fmt == "json":
        assert sum(hw.values()) == len(sent)

    t0 = time.monotonic()
    c = KafkaConsumer(topic_name, bootstrap_servers=broker.bootstrap, group_id=f"it-{topic_name}",
                      auto_offset_reset="earliest", enable_auto_commit=False, **consumer_timing(True))
    got: list[tuple[int, Event]] = []
    first_s = None
    n_records = 0
    try:
        deadline = time.monotonic() + 120
        while len(got) < len(sent) and time.monotonic() < deadline:
            for tp, msgs in c.poll(timeout_ms=500, max_records=10_000).items():
                if first_s is None:
                    first_s = time.monotonic() - t0
                for m in msgs:
                    n_records += 1
                    for e in decode(m.value, surfaces=DEFAULT_SURFACES, now_ms=2**62):
                        got.append((tp.partition, e))
        c.commit()
    finally:
        c.close()
    print(f"[{fmt}] group join → first records in {first_s:.2f}s; {len(got):,} events in {n_records:,} records")
    assert first_s is not None and first_s < 5.0, "group join too slow for the embedded broker"
    assert n_records == sum(hw.values()), "records consumed differ from the partitions' high watermarks"

    # Count and field values: exactly the events sent, none lost, none duplicated.
    assert len(got) == len(sent)
    by_id = {e.event_id: e for e in sent}
    assert len(by_id) == len(sent)
    assert {e.event_id for _, e in got} == set(by_id)
    for _, e in got:
        assert e == by_id[e.event_id]

    # A user's events all sit in one partition (the murmur2 partition of its key) and
    # arrive in the order they were produced.
    order = defaultdict(list)
    for p, e in got:
        assert p == partition_of(e.user_id, partitions)
        order[e.user_id].append(e.event_id)
    sent_order = defaultdict(list)
    for e in sent:
        sent_order[e.user_id].append(e.event_id)
    assert order == sent_order
