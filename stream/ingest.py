"""What the stream worker does with a batch of Kafka records — plain functions, no Faust.

For every partition the worker owns there is one *shard*: a sequence store
(:mod:`opengem.features.store`) and a label joiner (:mod:`opengem.stream.joiner`),
both RocksDB, both remembering the last Kafka offset they applied. A batch of
records goes through three steps, in this order, so a crash at any point loses
nothing and duplicates nothing in the stores:

1. :meth:`Ingestor.prepare` decodes and validates every record (JSON per event,
   JSON arrays, or Arrow batches — vectorized). Invalid records (or rows of an
   Arrow batch) become dead-letter messages with the reason attached.
2. The caller produces those dead letters and waits for Kafka's acks
   (at-least-once: a crash before step 3 re-sends them).
3. :meth:`Ingestor.commit` appends the valid events to each shard's store in one
   synced RocksDB write batch together with the records' offsets, then feeds the
   ad events to the joiner (its own synced batch with its own offsets). Each part
   skips records at or below its own applied offset, so a replay is a no-op.
   It returns the examples this commit closed, to produce to
   ``opengem.examples``; the caller acks them with :meth:`Ingestor.ack_examples`
   once Kafka has them. Until then they are in the joiner's durable outbox:
   after a crash (or a rebalance) :meth:`Ingestor.pending_examples` gives them
   to send again (consumers dedup on ``example_id``).

Only after that may the Kafka consumer commit the offsets. The stores, not the
consumer group, say where a shard stands: a worker that finds its shard behind
the group's committed offset (a shard lost or restored from an older copy) seeks
back to the shard's offset + 1 (:meth:`Ingestor.resume_offset`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import threading
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, NamedTuple, Sequence

import numpy as np
import pyarrow as pa

from opengem.features.store import SequenceStore, StoreConfig
from opengem.stream.codec import (
    bulkable_json, check_columns, decode_arrow_columns, read_arrow, read_json_objects, sniff,
)
from opengem.stream.events import AD_KINDS, DEFAULT_SURFACES, Event, EventError, parse_json
from opengem.stream.joiner import Example, JoinerConfig, LabelJoiner

log = logging.getLogger(__name__)

REASON_HEADER = "opengem-reason"
ERROR_HEADER = "opengem-error"
SOURCE_HEADER = "opengem-source"


class Record(NamedTuple):
    """One consumed Kafka record."""

    partition: int
    offset: int
    value: bytes
    key: bytes | None = None


class DeadLetter(NamedTuple):
    """A record (or one row of an Arrow batch) for ``opengem.events.dlq``."""

    key: bytes | None
    value: bytes
    reason: str
    message: str
    partition: int
    offset: int
    row: int | None = None

    def headers(self, topic: str) -> list[tuple[str, bytes]]:
        src = f"{topic}/{self.partition}/{self.offset}" + ("" if self.row is None else f"#{self.row}")
        return [(REASON_HEADER, self.reason.encode()), (ERROR_HEADER, self.message[:500].encode()),
                (SOURCE_HEADER, src.encode())]


class Rows(NamedTuple):
    """Events of several one-event JSON records of one partition, read in bulk: row i came from ``offsets[i]``."""

    batch: pa.RecordBatch
    offsets: np.ndarray  # int64, ascending

    def after(self, offset: int | None) -> "Rows":
        """The rows of records past ``offset`` (all of them for None)."""
        if offset is None or self.offsets.size == 0 or self.offsets[0] > offset:
            return self
        start = int(np.searchsorted(self.offsets, offset, side="right"))
        return Rows(self.batch.slice(start), self.offsets[start:])


@dataclass
class Prepared:
    """The decoded form of a batch of records (see :meth:`Ingestor.prepare`)."""

    # partition -> [(offset, payload)], payload: list[Event], a pyarrow RecordBatch (one Arrow
    # record) or Rows (a run of JSON records; offset = the run's last)
    valid: dict[int, list[tuple[int, Any]]] = field(default_factory=lambda: defaultdict(list))
    dead: list[DeadLetter] = field(default_factory=list)
    records: int = 0
    events: int = 0


@dataclass(frozen=True)
class IngestConfig:
    # Commits write the WAL but do not fsync it (a killed worker loses nothing: the
    # WAL is in the OS page cache); :meth:`Ingestor.sync_wal` fsyncs every shard on
    # an interval (the worker: ``WorkerConfig.wal_sync_interval_s``). A power loss
    # can lose that window, and the shard is then still consistent with its own
    # offsets, which is where the worker resumes (it seeks back past the group's).
    # Measured: 29.2 -> 26.2 us/event of CPU (100k JSON events, 2k-record batches); the
    # fsync's wall-clock wait, which blocked the event loop, was not measured apart.
    store: StoreConfig = field(default_factory=lambda: StoreConfig(sync=False))
    joiner: JoinerConfig = field(default_factory=lambda: JoinerConfig(sync=False))
    # Maximum future skew of an event's ts against the worker's clock: more is
    # a DLQ'd record ("future_ts"), not a poisoned sequence.
    max_future_ms: int = 24 * 3600 * 1000


def _row_json(batch: pa.RecordBatch, row: int) -> bytes:
    """One Arrow row as JSON for the dead-letter topic (values as they arrived)."""
    d = {name: batch.column(i)[row].as_py() for i, name in enumerate(batch.schema.names)}
    return json.dumps(d, default=repr, separators=(",", ":")).encode()


class Shard:
    """The store and the joiner of one partition."""

    def __init__(self, root: Path, partition: int, cfg: IngestConfig, surfaces: Sequence[str]):
        self.partition = partition
        self.dir = root / f"p{partition:04d}"
        self.dir.mkdir(parents=True, exist_ok=True)
        store_cfg = dataclasses.replace(cfg.store, surfaces=tuple(surfaces))
        self.store = SequenceStore(str(self.dir / "store"), store_cfg)
        self.joiner = LabelJoiner(str(self.dir / "joiner"), cfg.joiner)

    def applied(self) -> int | None:
        """The lowest offset both parts applied (None: one of them has nothing)."""
        a, b = self.store.applied_offset(self.partition), self.joiner.applied_offset(self.partition)
        if a is None or b is None:
            return None
        return min(a, b)

    def close(self) -> None:
        self.store.close()
        self.joiner.close()


class Ingestor:
    """Owns the shards of the partitions assigned to this worker."""

    def __init__(self, data_dir: str | Path, *, surfaces: Sequence[str] = DEFAULT_SURFACES,
                 cfg: IngestConfig = IngestConfig(), topic: str = "opengem.events"):
        self.root = Path(data_dir) / "shards" / topic
        self.surfaces = tuple(surfaces)
        self.cfg = cfg
        self.topic = topic
        self._shards: dict[int, Shard] = {}
        # Held by shard, commit, release, sync_wal and update_gauges: the worker commits, revokes
        # partitions and refreshes gauges on its event loop while executor threads open shards
        # (on assignment) and fsync their WALs (every wal_sync_interval_s).
        self._lock = threading.RLock()
        self.counts: Counter[str] = Counter()  # records, events, dead letters by reason, examples
        self.dlq_reasons: Counter[str] = Counter()

    # -- shards -----------------------------------------------------------------------------
    def shard(self, partition: int) -> Shard:
        with self._lock:
            s = self._shards.get(partition)
            if s is None:
                s = self._shards[partition] = Shard(self.root, partition, self.cfg, self.surfaces)
            return s

    def partitions(self) -> list[int]:
        return sorted(self._shards)

    def release(self, partitions: Iterable[int]) -> None:
        """Close the shards of revoked partitions (another worker may open them next)."""
        with self._lock:
            for p in partitions:
                s = self._shards.pop(p, None)
                if s is not None:
                    s.close()

    def resume_offset(self, partition: int) -> int:
        """Where consumption of ``partition`` must resume for this shard: applied + 1, or 0."""
        a = self.shard(partition).applied()
        return 0 if a is None else a + 1

    def close(self) -> None:
        self.release(list(self._shards))

    def sync_wal(self) -> None:
        """fsync every open shard's WAL (safe from another thread: shards are not released meanwhile)."""
        with self._lock:
            for s in self._shards.values():
                s.store.sync_wal()
                s.joiner.sync_wal()

    # -- step 1 ------------------------------------------------------------------------------
    def prepare(self, records: Sequence[Record], now_ms: int | None = None) -> Prepared:
        """Decode and validate ``records``; nothing is written yet.

        One-event JSON records (what any producer sends) are read in bulk per
        partition by pyarrow's JSON reader and validated column-wise, like an
        Arrow record -- per-record ``json.loads`` + ``validate`` cost more than
        Faust's own per-message work. Everything else (JSON arrays, Arrow
        batches, anything the bulk reader refuses) goes record by record, and a
        record keeps its place in its partition's order either way.
        """
        out = Prepared()
        kw = dict(surfaces=self.surfaces, now_ms=now_ms, max_future_ms=self.cfg.max_future_ms)
        runs: dict[int, list[Record]] = {}
        # A bad record inside a partition's run does not end the run (a stream with many bad
        # records would otherwise be read in runs of one or two, ~50x the CPU): it becomes a dead
        # letter at once, and the highest such offset after the run's last record is recorded as
        # consumed right after the run (the run's own entry covers those before it).
        skipped: dict[int, int] = {}
        for r in records:
            out.records += 1
            p = r.partition
            if r.value is not None and bulkable_json(r.value):
                runs.setdefault(p, []).append(r)
                continue
            if p in runs:
                one = Prepared()
                self._prepare_one(one, r, kw)
                if one.events == 0 and one.dead:  # nothing to store: the run goes on
                    out.dead.extend(one.dead)
                    skipped[p] = r.offset
                    continue
                self._flush_run(out, runs.pop(p), skipped.pop(p, None), kw)
                for entry in one.valid[p]:
                    out.valid[p].append(entry)
                out.dead.extend(one.dead)
                out.events += one.events
                continue
            self._prepare_one(out, r, kw)
        for p, run in runs.items():
            self._flush_run(out, run, skipped.pop(p, None), kw)
        return out

    def _flush_run(self, out: Prepared, run: list[Record], skipped: int | None, kw: dict[str, Any]) -> None:
        self._prepare_run(out, run, kw)
        if skipped is not None and skipped > run[-1].offset:
            out.valid[run[0].partition].append((skipped, []))  # consumed: dead letters only

    def _prepare_run(self, out: Prepared, run: list[Record], kw: dict[str, Any]) -> None:
        batch, taken = read_json_objects([r.value for r in run], checked=True)
        refused = sorted(set(range(len(run))) - set(taken))
        dead: list[DeadLetter] = []
        for i in refused:
            r = run[i]
            try:
                parse_json(r.value, **kw)
            except EventError as e:
                dead.append(DeadLetter(r.key, r.value, e.reason, e.message, r.partition, r.offset))
            else:
                # The bulk reader refused what json.loads + validate accept (should not
                # happen): take the run record by record so nothing valid is lost.
                for rec in run:
                    self._prepare_one(out, rec, kw)
                return
        errors = check_columns(batch, **kw) if batch.num_rows else []
        keep = np.ones(batch.num_rows, dtype=bool)
        for row, e in errors:
            r = run[taken[row]]
            dead.append(DeadLetter(r.key, r.value, e.reason, e.message, r.partition, r.offset))
            keep[row] = False
        if errors:
            batch = batch.filter(pa.array(keep))
        offsets = np.fromiter((run[i].offset for i in taken), np.int64, len(taken))[keep]
        out.dead.extend(dead)
        out.valid[run[0].partition].append((run[-1].offset, Rows(batch, offsets)))
        out.events += batch.num_rows

    def _prepare_one(self, out: Prepared, r: Record, kw: dict[str, Any]) -> None:
        value = r.value if r.value is not None else b""
        try:
            if sniff(value) == "arrow":
                batch, errors = decode_arrow_columns(value, **kw)
                if errors:
                    full = read_arrow(value)  # the rows as they arrived, for the DLQ
                    for row, e in errors:
                        out.dead.append(DeadLetter(r.key, _row_json(full, row), e.reason, e.message,
                                                   r.partition, r.offset, row))
                # Even with every row bad the offset is consumed: record it as applied.
                out.valid[r.partition].append((r.offset, batch if batch.num_rows else []))
                out.events += batch.num_rows
                return
            events = parse_json(value, **kw)
            out.valid[r.partition].append((r.offset, events))
            out.events += len(events)
        except EventError as e:
            out.dead.append(DeadLetter(r.key, value, e.reason, e.message, r.partition, r.offset))
            out.valid[r.partition].append((r.offset, []))  # the offset is consumed all the same

    # -- step 3 ------------------------------------------------------------------------------
    def commit(self, prep: Prepared) -> list[tuple[int, Example]]:
        """Durably apply ``prep`` (after its dead letters were acked).

        Returns ``(partition, example)`` pairs to produce: the examples this commit
        closed. Older unacked ones (from before a restart, or still in flight) are
        not repeated: the worker sends :meth:`pending_examples` of a partition on its
        first batch after an assignment."""
        with self._lock:
            return self._commit(prep)

    def _commit(self, prep: Prepared) -> list[tuple[int, Example]]:
        from opengem.ops import metrics as m

        for d in prep.dead:
            self.dlq_reasons[d.reason] += 1
            m.STREAM_DLQ.labels(d.reason).inc()
        self.counts["records"] += prep.records
        self.counts["dead_letters"] += len(prep.dead)
        examples: list[tuple[int, Example]] = []
        for p, items in prep.valid.items():
            shard = self.shard(p)
            n_events = 0
            applied = shard.store.applied_offset(p)
            with shard.store.batch() as b:
                # Records the store already has are skipped one by one; the rest is
                # added in runs: consecutive JSON records as one list (one columnar
                # conversion instead of one per record), Arrow batches as they are.
                run: list[Event] = []
                run_end = None
                for offset, payload in items:
                    if applied is not None and offset <= applied:
                        continue
                    if isinstance(payload, Rows):
                        payload = payload.after(applied).batch
                    if isinstance(payload, list):
                        run.extend(payload)
                        run_end = offset
                        continue
                    if run_end is not None:
                        b.add(run, p, run_end)
                        n_events += len(run)
                        run, run_end = [], None
                    if b.add(payload, p, offset):
                        n_events += len(payload)
                if run_end is not None:
                    b.add(run, p, run_end)
                    n_events += len(run)
            self.counts["events"] += n_events
            label = str(p)
            m.STREAM_RECORDS.labels(label).inc(len(items))
            m.STREAM_EVENTS.labels(label).inc(n_events)
            m.STORE_OFFSET.labels(label).set(items[-1][0])
            j_off = shard.joiner.applied_offset(p)
            ad_parts: list[Any] = []  # Event lists and RecordBatches of the ad events, in order
            last = None
            for offset, payload in items:
                if j_off is not None and offset <= j_off:
                    continue
                last = offset
                ad = _ad_events(payload.after(j_off).batch if isinstance(payload, Rows) else payload)
                if len(ad):
                    ad_parts.append(ad)
            if last is not None:
                examples.extend((p, ex) for ex in shard.joiner.process_parts(p, last, ad_parts))
        return examples

    def pending_examples(self, partition: int | None = None) -> list[tuple[int, Example]]:
        """Examples closed but not yet acknowledged (re-sent after a restart or a rebalance):
        of ``partition`` (its shard is opened if need be), or of every open shard."""
        if partition is not None:
            return [(partition, ex) for ex in self.shard(partition).joiner.outbox(partition)]
        return [(p, ex) for p, s in list(self._shards.items()) for ex in s.joiner.outbox(p)]

    def update_gauges(self) -> None:
        """Refresh the slow-moving gauges (joiner outcomes, pending impressions, store size)."""
        from opengem.ops import metrics as m

        with self._lock:
            self._update_gauges()

    def _update_gauges(self) -> None:
        from opengem.ops import metrics as m

        totals: Counter[str] = Counter()
        pending = 0
        for p, s in list(self._shards.items()):
            totals.update(s.joiner.counters(p))
            pending += s.joiner.pending(p)
            try:
                m.STORE_BYTES.labels(str(p)).set(sum(s.store.disk_bytes().values()))
            except Exception:  # noqa: BLE001 - a size is best effort
                pass
        for outcome, n in totals.items():
            m.JOINER_EVENTS.labels(outcome).set(n)
        m.JOINER_PENDING.set(pending)

    def ack_examples(self, examples: Sequence[tuple[int, Example]]) -> None:
        """Kafka acknowledged these examples: drop them from the joiners' outboxes.

        Only examples that leave an outbox here are counted (``counts["examples"]``,
        ``opengem_joiner_examples_total``): a re-send -- after a restart, or when a
        rebalance closed the shard while its examples were in flight -- is counted
        once, when its ack finally removes it, so the count is of distinct examples."""
        by_part: dict[int, list[str]] = defaultdict(list)
        for p, ex in examples:
            by_part[p].append(ex.example_id)
        removed: set[str] = set()
        for p, ids in by_part.items():
            s = self._shards.get(p)
            if s is not None:
                removed |= s.joiner.ack(ids)
        done = [ex for _, ex in examples if ex.example_id in removed]
        self.counts["examples"] += len(done)
        from opengem.ops import metrics as m

        m.observe_examples(done)

    # -- convenience for tests and the benchmark ----------------------------------------------
    def process(self, records: Sequence[Record], now_ms: int | None = None
                ) -> tuple[list[DeadLetter], list[tuple[int, Example]]]:
        """prepare + commit + ack without a broker (dead letters and examples are returned,
        with the shards' pending examples from before, as the worker would send them)."""
        prep = self.prepare(records, now_ms)
        examples = self.pending_examples() + self.commit(prep)
        self.ack_examples(examples)
        return prep.dead, examples




def _ad_events(payload: Any) -> Any:
    """The ad events of a payload: a list of Events, or the ad rows of a batch (the joiner
    reads those column-wise, without an Event per row)."""
    if isinstance(payload, list):
        return [e for e in payload if e.is_ad]
    if payload.num_rows == 0:
        return []
    kind = payload.column(payload.schema.get_field_index("kind"))
    if isinstance(kind, pa.DictionaryArray):
        is_ad_dict = np.isin(np.asarray(kind.dictionary.to_pylist(), dtype=object), AD_KINDS)
        mask = is_ad_dict[kind.indices.to_numpy(zero_copy_only=False)]
    else:
        mask = np.isin(np.asarray(kind.to_pylist(), dtype=object), AD_KINDS)
    if not mask.any():
        return []
    return payload if mask.all() else payload.filter(pa.array(mask))


class ShardMismatch(RuntimeError):
    pass


def bind_topic(data_dir: str | Path, topic: str, tid: str | None) -> None:
    """Tie the shards under ``data_dir`` to one incarnation of ``topic`` (its topic id).

    Shards hold Kafka offsets; offsets of another incarnation of the topic (an
    embedded broker restarted, a topic recreated) would make the worker skip
    records it never saw. Raises ShardMismatch in that case.
    """
    root = Path(data_dir) / "shards" / topic
    root.mkdir(parents=True, exist_ok=True)
    f = root / "TOPIC_ID"
    if tid is None:
        return
    if f.exists():
        have = f.read_text().strip()
        if have != tid:
            raise ShardMismatch(
                f"the shards in {root} were built from another incarnation of {topic} (topic id {have}, "
                f"the broker's is {tid}; an embedded broker restarted?). Run with --rebuild to delete them "
                f"and rebuild from the topic, or point --data-dir elsewhere")
        return
    tmp = root / "TOPIC_ID.tmp"
    tmp.write_text(tid)
    tmp.replace(f)


def wipe(data_dir: str | Path, topic: str = "opengem.events") -> None:
    """Delete every shard (to rebuild them from the topic)."""
    shutil.rmtree(Path(data_dir) / "shards" / topic, ignore_errors=True)
