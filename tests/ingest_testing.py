"""Shared test setup: events through the stream worker's own ingest path (no broker)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Sequence

from opengem.stream.codec import encode_json
from opengem.stream.ingest import IngestConfig, Ingestor, Record
from opengem.stream.joiner import JoinerConfig
from opengem.stream.producer import partition_of


def ingest_json(data: Path, events: Sequence, partitions: int, chunk: int = 4000) -> list:
    """Write ``events`` as one-event JSON records, keyed by user, into the shards under ``data``
    (short attribution windows, so examples close soon); returns the examples the joiner closed."""
    joiner = JoinerConfig(click_window_ms=60_000, conversion_window_ms=300_000, sync=False)
    ing = Ingestor(data, cfg=IngestConfig(joiner=joiner))
    offsets: Counter[int] = Counter()
    records = []
    for e in events:
        p = partition_of(e.user_id, partitions)
        records.append(Record(p, offsets[p], encode_json([e])))
        offsets[p] += 1
    examples = []
    for i in range(0, len(records), chunk):
        examples += [ex for _, ex in ing.process(records[i:i + chunk], now_ms=2**62)[1]]
    ing.close()
    return examples
