"""The embedded broker: start/stop, topics, group join time, and the ListOffsets workaround."""

from __future__ import annotations

import time

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from opengem.stream.broker import (
    EmbeddedBroker,
    consumer_timing,
    ensure_topics,
    high_watermarks,
    resolve_bootstrap,
    running_embedded,
)

pytestmark = pytest.mark.integration


def test_start_creates_topics_and_stop_cleans_up(tmp_path):
    b = EmbeddedBroker(port=0, topics=("a.events", "a.dlq"), partitions=3, state_dir=str(tmp_path))
    with b:
        assert b.bootstrap.startswith("127.0.0.1:")
        assert running_embedded(str(tmp_path)) == b.bootstrap
        assert resolve_bootstrap("", str(tmp_path)) == (b.bootstrap, True)
        assert resolve_bootstrap(b.bootstrap, "/nonexistent") == (b.bootstrap, True)
        c = KafkaConsumer(bootstrap_servers=b.bootstrap)
        try:
            assert c.partitions_for_topic("a.events") == {0, 1, 2}
            assert c.partitions_for_topic("a.dlq") == {0, 1, 2}
        finally:
            c.close()
        proc = b.proc
    assert proc.poll() is not None, "broker process still running after stop()"
    assert running_embedded(str(tmp_path)) is None
    assert not (tmp_path / "broker.json").exists()


def test_resolve_bootstrap_prefers_configuration_and_explains_absence(tmp_path):
    assert resolve_bootstrap("127.0.0.1:1", str(tmp_path)) == ("127.0.0.1:1", False)
    with pytest.raises(RuntimeError, match="opengem broker"):
        resolve_bootstrap("", str(tmp_path))


def test_high_watermarks_are_right_where_list_offsets_is_wrong(broker, topic_name):
    """Regression for the embedded broker's ListOffsets(LATEST) quirk.

    Records sent in multi-record batches make the broker answer ListOffsets
    with the last batch's base offset + 1. high_watermarks() must still equal
    the number of records in each partition.
    """
    ensure_topics(broker.bootstrap, [topic_name], partitions=3)
    p = KafkaProducer(bootstrap_servers=broker.bootstrap, linger_ms=50, batch_size=1 << 20)
    sent = {0: 0, 1: 0, 2: 0}
    futures = [p.send(topic_name, key=str(i).encode(), value=b"v" * 50) for i in range(3000)]
    p.flush()
    for f in futures:
        sent[f.get(timeout=10).partition] += 1
    p.close()
    assert sum(sent.values()) == 3000 and all(sent.values())

    assert high_watermarks(broker.bootstrap, topic_name) == sent

    # Record (not assert) the broker's own answer, so the note can say whether the quirk persists.
    c = KafkaConsumer(bootstrap_servers=broker.bootstrap)
    try:
        listed = c.end_offsets([TopicPartition(topic_name, i) for i in range(3)])
    finally:
        c.close()
    print("ListOffsets(LATEST):", {tp.partition: o for tp, o in listed.items()}, "true:", sent)


def test_short_session_timeout_makes_group_join_fast(broker, topic_name):
    ensure_topics(broker.bootstrap, [topic_name], partitions=2)
    p = KafkaProducer(bootstrap_servers=broker.bootstrap)
    p.send(topic_name, key=b"1", value=b"hello")
    p.flush()
    p.close()
    t0 = time.monotonic()
    c = KafkaConsumer(topic_name, bootstrap_servers=broker.bootstrap, group_id=f"g-{topic_name}",
                      auto_offset_reset="earliest", **consumer_timing(True))
    try:
        got = []
        while not got and time.monotonic() - t0 < 20:
            for msgs in c.poll(timeout_ms=100).values():
                got.extend(msgs)
        join_s = time.monotonic() - t0
    finally:
        c.close()
    assert [m.value for m in got] == [b"hello"]
    print(f"first record after group join: {join_s:.2f}s")
    assert join_s < 5.0, f"group join took {join_s:.1f}s; embedded-broker timing not applied?"
