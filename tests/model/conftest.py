"""Fixtures for the trainer tests: a real stream in Kafka and real RocksDB shards.

:func:`prepare_stream` runs the stream worker's own ingest steps
(:class:`opengem.stream.ingest.Ingestor`, the code the Faust worker drives)
on simulated events, in process and without Faust: the shards under
``<data>/shards/<events topic>/pNNNN`` and the labelled examples produced to a
fresh examples topic on the session's embedded broker are exactly what a
worker would have left -- in a fraction of the time.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from opengem.config import Config, KafkaConfig
from opengem.stream.joiner import Example, JoinerConfig, encode_example_records


@dataclass
class Stream:
    cfg: Config
    bootstrap: str
    examples: list[Example]  # distinct examples in the topic
    records: int  # example records in the topic (re-sends included)
    max_event_ts: int


def prepare_stream(bootstrap: str, data_dir: Path, *, n_events: int = 20_000, partitions: int = 2, seed: int = 3,
                   n_users: int = 300, resend_every: int = 0) -> Stream:
    """Simulated events -> shards + examples topic. ``resend_every``: also send every k-th
    example record a second time (what the worker does after a crash)."""
    from kafka import KafkaProducer

    from opengem.stream.broker import ensure_topics
    from opengem.stream.ingest import IngestConfig, Ingestor, Record
    from opengem.stream.producer import partition_of
    from opengem.stream.simulator import SimConfig, Simulator

    tag = uuid.uuid4().hex[:10]
    k = KafkaConfig(events_topic=f"test.{tag}.events", examples_topic=f"test.{tag}.examples",
                    dlq_topic=f"test.{tag}.dlq", partitions=partitions)
    cfg = Config(data_dir=str(data_dir), kafka=k)
    ensure_topics(bootstrap, (k.events_topic, k.examples_topic), partitions)
    ing = Ingestor(data_dir, topic=k.events_topic,
                   cfg=IngestConfig(joiner=JoinerConfig(click_window_ms=60_000, conversion_window_ms=120_000)))
    # 10 simulated events/s: 20k events span ~33 min of event time, so clicked impressions
    # close (their 2-min conversion window passes) within the stream.
    sim = Simulator(SimConfig(seed=seed, n_users=n_users, events_per_second=10.0))
    prod = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    offsets = [0] * partitions
    examples: list[Example] = []
    n_records = 0
    max_ts = 0
    try:
        for batch in sim.batches(n_events, batch_size=2_000):
            by_p: dict[int, list[dict]] = {}
            for e in batch:
                by_p.setdefault(partition_of(e.user_id, partitions), []).append(e.to_dict())
                max_ts = max(max_ts, e.ts)
            records = []
            for p, evs in sorted(by_p.items()):
                records.append(Record(p, offsets[p], json.dumps(evs).encode()))
                offsets[p] += 1
            _, pairs = ing.process(records, now_ms=2**62)
            by_part: dict[int, list[Example]] = {}
            for p, ex in pairs:
                by_part.setdefault(p, []).append(ex)
            for p, exs in sorted(by_part.items()):
                for i, rec in enumerate(encode_example_records(exs, max_bytes=32 << 10)):
                    prod.send(k.examples_topic, value=rec, partition=p % partitions)
                    n_records += 1
                    if resend_every and n_records % resend_every == 0:
                        prod.send(k.examples_topic, value=rec, partition=p % partitions)
                        n_records += 1
                examples.extend(exs)
        prod.flush()
    finally:
        prod.close()
        ing.close()
    return Stream(cfg=cfg, bootstrap=bootstrap, examples=examples, records=n_records, max_event_ts=max_ts)


@pytest.fixture(scope="module")
def dist_group():
    """A single-process gloo group for learner-level tests (what the daemon makes without torchrun)."""
    from opengem.model.distributed import init_distributed, shutdown_distributed

    import torch

    info = init_distributed("cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the daemon runs (TrainConfig.threads)
    yield info
    torch.set_num_threads(threads)
    shutdown_distributed(info)


@pytest.fixture
def make_stream(broker, tmp_path):
    """prepare_stream on the session broker, into ``tmp_path/data``."""
    return lambda **kw: prepare_stream(broker.bootstrap, tmp_path / "data", **kw)
