"""The trainer's input: labelled examples from ``opengem.examples``, with exact cursors.

The stream worker writes examples as JSON-array records (many examples per
record), so a Kafka offset alone cannot say how far training got inside a
record. A :class:`Cursor` per partition does: ``(offset, index)`` = the next
record to read and how many of its examples were already taken. The trainer
checkpoints the cursors with its model; a restart seeks to ``offset`` and
skips ``index`` examples, so it re-trains nothing the checkpoint covers and
skips nothing after it.

Partitions are assigned explicitly (``partitions``), not by a group
rebalance: under ``torchrun`` every rank steps in lockstep, and a rebalance
moving a partition between ranks mid-step would break the cursor bookkeeping.
Rank ``r`` of ``N`` takes the partitions ``p`` with ``p % N == r``. The
group id is still used to commit offsets after each checkpoint, so the usual
Kafka lag tools see the trainer; the checkpoint stays the truth.

The worker re-sends examples it produced but never saw acknowledged before a
crash (at-least-once, ``example_id`` = request id). A window of recent ids
(checkpointed too) drops those duplicates; re-sends land in the same
partition as the original (same user key), so each rank's window suffices.

With negative downsampling (:mod:`opengem.model.sampling`) the source asks
``weigh(example)`` for each example: 0 drops it (the cursor moves past it, it
is never trained), anything else is its training weight. Sampling comes before
the dedup window: a dropped example never enters it, and a re-send of one is
dropped again by the same deterministic decision.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterable, NamedTuple

from opengem.stream.joiner import Example, decode_examples

log = logging.getLogger(__name__)


class Cursor(NamedTuple):
    offset: int  # next record to read
    index: int  # examples of that record already taken


class Item(NamedTuple):
    partition: int
    example: Example
    record_ts_ms: int  # Kafka timestamp of the example's record (producer CreateTime)
    weight: float = 1.0  # training weight (1/r for a kept negative under downsampling)


@dataclass
class _Pending:
    partition: int
    offset: int
    examples: list[Example]
    next_index: int
    ts_ms: int


def assign_partitions(n_partitions: int, rank: int, world_size: int) -> list[int]:
    """The partitions rank ``rank`` of ``world_size`` owns: ``p % world_size == rank``."""
    if n_partitions < world_size:
        raise ValueError(f"{n_partitions} example partition(s) cannot feed {world_size} ranks: "
                         "create the topic with at least as many partitions as ranks")
    return [p for p in range(n_partitions) if p % world_size == rank]


class DedupWindow:
    """The last ``size`` example ids: membership in O(1), oldest forgotten first."""

    def __init__(self, size: int, ids: Iterable[str] = ()):
        self.size = size
        self._order: deque[str] = deque()
        self._set: set[str] = set()
        for i in ids:
            self.add(i)

    def __contains__(self, example_id: str) -> bool:
        return example_id in self._set

    def add(self, example_id: str) -> None:
        if self.size <= 0 or example_id in self._set:
            return
        self._order.append(example_id)
        self._set.add(example_id)
        while len(self._order) > self.size:
            self._set.discard(self._order.popleft())

    def ids(self) -> list[str]:
        return list(self._order)


class ExampleSource:
    """Examples of the given partitions, in offset order per partition, with cursors.

    ``start``: partition -> Cursor from a checkpoint; partitions without one start
    at ``reset`` ("earliest" | "latest"). ``weigh``: example -> training weight,
    0 = drop (default: every example, weight 1).
    """

    def __init__(self, bootstrap: str, topic: str, partitions: list[int], *, start: dict[int, Cursor] | None = None,
                 reset: str = "earliest", group_id: str | None = "opengem-train", dedup: DedupWindow | None = None,
                 client_id: str = "opengem-train", weigh: Callable[[Example], float] | None = None):
        from kafka import KafkaConsumer, TopicPartition

        self.topic = topic
        self.partitions = list(partitions)
        self._tp = {p: TopicPartition(topic, p) for p in self.partitions}
        self._consumer = KafkaConsumer(
            bootstrap_servers=bootstrap, group_id=group_id, enable_auto_commit=False,
            auto_offset_reset=reset, client_id=client_id, max_poll_records=500,
            fetch_max_wait_ms=50, fetch_max_bytes=32 << 20, max_partition_fetch_bytes=8 << 20,
        )
        self._consumer.assign(list(self._tp.values()))
        start = start or {}
        self._skip: dict[int, tuple[int, int]] = {}  # partition -> (offset, examples to skip in it)
        self.cursors: dict[int, Cursor] = {}
        for p, tp in self._tp.items():
            if p in start:
                c = start[p]
                self._consumer.seek(tp, c.offset)
                self.cursors[p] = c
                if c.index:
                    self._skip[p] = (c.offset, c.index)
            elif reset == "earliest":
                self._consumer.seek_to_beginning(tp)
            else:
                self._consumer.seek_to_end(tp)
        self.dedup = dedup or DedupWindow(0)
        self.weigh = weigh
        self._buf: deque[_Pending] = deque()
        self._buffered = 0
        self.duplicates = 0
        self.sampled_out = 0  # negatives dropped by ``weigh``
        self.bad_records = 0

    # -- reading -----------------------------------------------------------------------------
    def _fetch(self, timeout_s: float) -> None:
        polled = self._consumer.poll(timeout_ms=int(timeout_s * 1000), max_records=500)
        for tp, msgs in polled.items():
            for m in msgs:
                try:
                    exs = decode_examples(m.value) if m.value is not None else []
                except (ValueError, TypeError) as e:
                    self.bad_records += 1
                    log.warning("undecodable example record %s/%d@%d skipped: %s", tp.topic, tp.partition,
                                m.offset, e)
                    exs = []
                first = 0
                skip = self._skip.get(tp.partition)
                if skip is not None and skip[0] == m.offset:
                    first = skip[1]
                    del self._skip[tp.partition]
                pend = _Pending(tp.partition, m.offset, exs, first, m.timestamp)
                self._buf.append(pend)
                self._buffered += max(0, len(exs) - first)

    def buffered(self) -> int:
        return self._buffered

    def take(self, n: int, timeout_s: float = 0.0) -> list[Item]:
        """Up to ``n`` examples, waiting at most ``timeout_s`` to fill the request
        (polling at least once when the buffer cannot fill it).

        Cursors advance past everything returned (and past duplicates, sampled-out
        examples and empty records on the way).
        """
        deadline = time.monotonic() + timeout_s
        out: list[Item] = []
        self._drain(out, n)
        while len(out) < n:
            self._fetch(max(0.0, deadline - time.monotonic()))
            self._drain(out, n)
            if time.monotonic() >= deadline:
                break
        return out

    def _drain(self, out: list[Item], n: int) -> None:
        """Move buffered examples into ``out`` until it holds ``n``, advancing the cursors."""
        while self._buf and len(out) < n:
            pend = self._buf[0]
            while pend.next_index < len(pend.examples) and len(out) < n:
                ex = pend.examples[pend.next_index]
                pend.next_index += 1
                self._buffered -= 1
                weight = 1.0 if self.weigh is None else self.weigh(ex)
                if weight <= 0:
                    self.sampled_out += 1
                    continue
                if ex.example_id in self.dedup:
                    self.duplicates += 1
                    continue
                self.dedup.add(ex.example_id)
                out.append(Item(pend.partition, ex, pend.ts_ms, weight))
            if pend.next_index >= len(pend.examples):
                self._buf.popleft()
                self.cursors[pend.partition] = Cursor(pend.offset + 1, 0)
            else:
                self.cursors[pend.partition] = Cursor(pend.offset, pend.next_index)

    # -- bookkeeping -------------------------------------------------------------------------
    def lag(self) -> dict[int, int]:
        """Records between each partition's cursor and its high watermark (from fetch responses)."""
        out = {}
        for p, tp in self._tp.items():
            hw = self._consumer.highwater(tp)
            if hw is not None:
                pos = self.cursors[p].offset if p in self.cursors else self._consumer.position(tp)
                out[p] = max(0, hw - pos)
        return out

    def commit(self, cursors: dict[int, Cursor]) -> None:
        """Best effort: tell the consumer group how far the checkpoint got (for lag tools)."""
        from kafka.errors import KafkaError
        from kafka.structs import OffsetAndMetadata

        offsets = {self._tp[p]: OffsetAndMetadata(c.offset, "", -1) for p, c in cursors.items() if p in self._tp}
        if not offsets:
            return
        try:
            self._consumer.commit(offsets)
        except (KafkaError, AssertionError, TypeError) as e:
            log.debug("group offset commit failed (the checkpoint still holds them): %s", e)

    def close(self) -> None:
        self._consumer.close()


def cursors_to_state(cursors: dict[int, Cursor]) -> dict[str, list[int]]:
    """Checkpoint form: {"<partition>": [offset, index]} (JSON- and weights_only-friendly)."""
    return {str(p): [c.offset, c.index] for p, c in sorted(cursors.items())}


def cursors_from_state(state: dict[str, Any]) -> dict[int, Cursor]:
    return {int(p): Cursor(int(v[0]), int(v[1])) for p, v in state.items()}
