"""Consumer lag per group and partition against the real embedded broker."""

from __future__ import annotations

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.structs import OffsetAndMetadata

from opengem.ops.lag import LagCollector

pytestmark = pytest.mark.integration


def test_lag_is_the_high_watermark_minus_the_committed_offset(broker, topic_name):
    from opengem.stream.broker import ensure_topics

    ensure_topics(broker.bootstrap, [topic_name], partitions=2)
    p = KafkaProducer(bootstrap_servers=broker.bootstrap, linger_ms=5)
    for i in range(30):
        p.send(topic_name, value=b"x", partition=0 if i < 20 else 1)
    p.flush()
    p.close()
    group = f"{topic_name}-g"
    c = KafkaConsumer(bootstrap_servers=broker.bootstrap, group_id=group, enable_auto_commit=False)
    c.assign([TopicPartition(topic_name, 0), TopicPartition(topic_name, 1)])
    c.commit({TopicPartition(topic_name, 0): OffsetAndMetadata(5, "", -1),
              TopicPartition(topic_name, 1): OffsetAndMetadata(10, "", -1)})
    c.close()
    col = LagCollector(broker.bootstrap, [topic_name], [group, f"{topic_name}-never"])
    try:
        lags = col.export()
    finally:
        col.close()
    assert {(x.group, x.partition): x.records for x in lags} == {(group, 0): 15, (group, 1): 0}

    from opengem.ops import metrics as m

    assert m.KAFKA_LAG.labels(group, topic_name, "0")._value.get() == 15
    assert m.KAFKA_HIGH_WATERMARK.labels(topic_name, "1")._value.get() == 10
