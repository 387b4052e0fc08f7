"""Consumer lag per group and partition: what each daemon still has to read.

lag = high watermark - committed offset, per (group, topic, partition). The
high watermarks come from fetch responses (:func:`~opengem.stream.broker.high_watermarks`),
not from ListOffsets, whose LATEST answer the embedded broker gets wrong
after batched produces; the committed offsets from OffsetFetch (the admin
client). A group that never committed on a partition has no lag series there
(its position is unknown, not zero).

What the committed offsets mean per daemon: the stream worker (group
``opengem-stream``) commits after its store writes are durable; the trainer
(``opengem-train``) commits at each checkpoint, so its lag includes the
examples since the last checkpoint (its own ``opengem_train_consumer_lag_records``
is exact); the monitor commits after each scored batch.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Iterable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Lag:
    group: str
    topic: str
    partition: int
    committed: int
    end: int

    @property
    def records(self) -> int:
        return max(0, self.end - self.committed)


class LagCollector:
    """Collects the lag of ``groups`` (empty: every group with offsets on ``topics``)."""

    def __init__(self, bootstrap: str, topics: Iterable[str], groups: Iterable[str] = ()):
        from kafka import KafkaAdminClient

        self.bootstrap = bootstrap
        self.topics = tuple(topics)
        self.groups = tuple(groups)
        self._admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="opengem-lag")
        self._exported: set[tuple[str, str, str]] = set()

    def collect(self) -> tuple[dict[str, dict[int, int]], list[Lag]]:
        """(topic -> partition -> high watermark, the lag of every committed group partition)."""
        from opengem.stream.broker import high_watermarks

        ends = {t: high_watermarks(self.bootstrap, t) for t in self.topics}
        groups = self.groups or tuple(sorted(g["group_id"] for g in self._admin.list_groups()))
        out = []
        for g in groups:
            offsets = self._admin.list_group_offsets(g).get(g, {})
            for tp, om in sorted(offsets.items()):
                if tp.topic in ends and om.offset >= 0 and tp.partition in ends[tp.topic]:
                    out.append(Lag(g, tp.topic, tp.partition, om.offset, ends[tp.topic][tp.partition]))
        return ends, out

    def export(self) -> list[Lag]:
        """Collect and set the ``opengem_kafka_*`` gauges; series of vanished groups are removed."""
        from opengem.ops import metrics as m

        ends, lags = self.collect()
        for topic, parts in ends.items():
            for p, end in parts.items():
                m.KAFKA_HIGH_WATERMARK.labels(topic, str(p)).set(end)
        seen = set()
        for lag in lags:
            key = (lag.group, lag.topic, str(lag.partition))
            seen.add(key)
            m.KAFKA_COMMITTED.labels(*key).set(lag.committed)
            m.KAFKA_LAG.labels(*key).set(lag.records)
        for key in self._exported - seen:
            m.KAFKA_COMMITTED.remove(*key)
            m.KAFKA_LAG.remove(*key)
        self._exported = seen
        return lags

    def close(self) -> None:
        self._admin.close()


def run_lag_thread(collector: LagCollector, interval_s: float, stop: threading.Event) -> threading.Thread:
    """Export the lag every ``interval_s`` until ``stop`` is set; failures are counted and logged."""
    from opengem.ops import metrics as m

    def loop() -> None:
        while True:
            try:
                collector.export()
            except Exception as e:  # noqa: BLE001 - a broker hiccup must not end the collector
                m.KAFKA_LAG_ERRORS.inc()
                log.warning("consumer lag collection failed: %s", e)
            if stop.wait(interval_s):
                return

    t = threading.Thread(target=loop, name="opengem-lag", daemon=True)
    t.start()
    return t
