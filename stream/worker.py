"""`opengem stream`: the Faust worker — a thin adapter around :mod:`opengem.stream.ingest`.

One agent consumes ``opengem.events`` in batches (``stream.take_events``), and
for each batch:

1. ``Ingestor.prepare`` decodes/validates (JSON per event, JSON arrays, Arrow
   batches), turning bad input into dead letters with the reason attached;
2. the dead letters are produced to ``opengem.events.dlq`` and their acks awaited;
3. ``Ingestor.commit`` appends to the partition shards' RocksDB stores and feeds
   the label joiner, each in one write batch with the records' offsets (the WAL
   is written at once and fsynced every ``wal_sync_interval_s`` off the loop);
4. the joiner's newly closed examples are produced to ``opengem.examples``
   (one JSON-array record per partition) and acknowledged back to the joiner
   once Kafka has them -- in the background, while the next chunk is ingested
   (``examples_in_flight``); until then they stay in the joiner's outbox.

Faust acks the batch's events only when the loop body has finished, so the
consumer group never commits an offset whose effect is not in the shards' WAL
(survives a killed process; a power loss can lose the last unsynced second,
and then the shards' own offsets make the worker seek back). The shards
hold their own offsets: on a partition's first batch after an assignment the
worker compares the batch's first offset with the shard's applied offset and
seeks back if the shard is behind (a shard lost or restored from an older copy),
so the shard, not the group, decides where consumption resumes.

Partition-aligned scale-out: every worker of the group owns the shards of the
partitions it is assigned (``<data_dir>/shards/opengem.events/pNNNN``); see
the README ("Scaling out") for how a shard moves on rebalance. A worker opens
the shards of its partitions when they are assigned (off the event loop) and
re-sends their unacknowledged examples then, whether or not new records come;
it closes them when they are revoked, which Faust does only after the agent
has finished the events it took, so the next owner can open them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from opengem.config import Config
from opengem.ops import metrics
from opengem.stream.codec import ARROW_CONTENT_TYPE, ARROW_MAGIC, CONTENT_TYPE_HEADER, JSON_CONTENT_TYPE
from opengem.stream.ingest import IngestConfig, Ingestor, Record
from opengem.stream.joiner import encode_example_batches, encode_example_records

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerConfig:
    # Records per batch handed to the ingestor. Per-shard commit costs are mostly
    # fixed (heads, tails, write batch): per event, a batch of 500 one-event JSON
    # records costs ~50 us, 2k ~26 us, 8k ~18 us, 16k ~15 us (CPU, this machine).
    # In practice take_within_s closes a batch first (~8k events at Faust's rate).
    take_max: int = 16_000
    # Events (not records) handled per store/joiner commit: bounds the time the
    # event loop is held (~0.3 s) when records are Arrow batches of thousands.
    chunk_events: int = 32_768
    # Flush a partial batch after this long: the latency from Kafka to the store
    # (and the reader's catch-up adds its interval); longer batches amortize better.
    take_within_s: float = 1.0
    # Faust's commit interval for the consumer group's offsets (seconds).
    commit_interval_s: float = 1.0
    ingest: IngestConfig = field(default_factory=IngestConfig)
    # Faust's app id = consumer group id of the workers.
    app_id: str = "opengem-stream"
    # Prometheus metrics on 127.0.0.1:<port>/metrics (a free port if taken; None: off).
    metrics_port: int | None = 9101
    # How often the slow gauges (store size, joiner outcomes) are refreshed.
    gauge_interval_s: float = 5.0
    # After SIGTERM/SIGINT, exit hard if Faust's shutdown has not finished by then
    # (it retries forever while the broker is unreachable).
    shutdown_timeout_s: float = 20.0
    # fsync of the shards' WALs, off the event loop (commits themselves do not fsync:
    # see IngestConfig); a power loss loses at most this much, a killed process nothing.
    wal_sync_interval_s: float = 1.0
    # Batches of examples whose acks from Kafka may still be awaited while the worker goes
    # on ingesting (0: wait for each before the next chunk). Unacked examples stay in the
    # joiner's durable outbox, so nothing is lost if the worker dies meanwhile.
    examples_in_flight: int = 2
    # How examples go to opengem.examples: "arrow" -- Arrow IPC records (encode_example_batches:
    # ~0.45x the encoding time and ~0.35x the bytes of JSON on 128k examples; the encoding was most
    # of the worker's example step, ~15 % of its Arrow-path time); "json" -- JSON arrays, for
    # consumers outside opengem that want text. opengem's consumers read both (decode_examples).
    examples_format: str = "arrow"

    def __post_init__(self) -> None:
        if self.examples_format not in EXAMPLE_FORMATS:
            raise ValueError(f"examples_format must be one of {', '.join(EXAMPLE_FORMATS)}, "
                             f"got {self.examples_format!r}")


EXAMPLE_FORMATS = ("arrow", "json")


def build_app(cfg: Config, bootstrap: str, embedded: bool, wcfg: WorkerConfig = WorkerConfig(),
              ingestor: Ingestor | None = None) -> tuple[Any, Ingestor]:
    """The Faust app and the ingestor it drives (not started)."""
    import faust

    from opengem.stream.broker import faust_timing

    from pathlib import Path

    k = cfg.kafka
    Path(cfg.data_dir).mkdir(parents=True, exist_ok=True)
    ing = ingestor or Ingestor(cfg.data_dir, surfaces=cfg.surfaces, cfg=wcfg.ingest, topic=k.events_topic)
    app = faust.App(
        wcfg.app_id,
        broker=[f"kafka://{b.strip()}" for b in bootstrap.split(",") if b.strip()],
        value_serializer="raw",
        key_serializer="raw",
        store="memory://",  # no Faust tables: the shards are the state
        topic_disable_leader=True,
        topic_allow_declare=False,
        consumer_auto_offset_reset="earliest",
        stream_wait_empty=True,  # Faust's default; the rebalance handlers below rely on it
        broker_commit_interval=wcfg.commit_interval_s,
        web_enabled=False,
        datadir=f"{cfg.data_dir}/faust",
        **faust_timing(embedded),
    )
    events = app.topic(k.events_topic, key_type=bytes, value_type=bytes)
    dlq = app.topic(k.dlq_topic, key_type=bytes, value_type=bytes)
    examples_topic = app.topic(k.examples_topic, key_type=bytes, value_type=bytes)
    checked: set[int] = set()  # partitions whose shard position was checked since assignment
    stats = {"batches": 0, "started": time.monotonic(), "examples_s": 0.0, "examples_wait_s": 0.0}
    app.opengem_stats = stats  # type: ignore[attr-defined]

    # Shards of the assigned partitions are opened as soon as they are assigned, off the
    # event loop, and their unacknowledged examples re-sent -- not on a partition's first
    # record: a partition may get none for a long time (its stream consumed to the end
    # before the rebalance), and its outbox, and the shard's ownership (the RocksDB LOCK the
    # next owner waits for), must not wait for new data.
    owned: set[int] = set()  # partitions of the events topic assigned to this worker
    openers: dict[int, asyncio.Future] = {}  # partition -> opening its shard (see open_shard)

    async def open_shard(p: int) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(None, ing.shard, p)
            if p in owned:  # (revoked meanwhile: on_revoked waits for this, then closes it)
                # Examples a previous owner closed but never saw acknowledged: send them first.
                await produce_examples(ing.pending_examples(p))
        except Exception:
            log.exception("opening the shard of partition %d failed", p)
            raise

    def shard_ready(p: int) -> asyncio.Future:
        """The opener of ``p``'s shard (started here if the assignment's has not been)."""
        fut = openers.get(p)
        if fut is None or (fut.done() and not fut.cancelled() and fut.exception() is not None):
            # (A failed open is tried again when asked next: the agent, restarted by Faust
            # after the failure reached it, asks again with its next record.)
            fut = openers[p] = asyncio.ensure_future(open_shard(p))
            fut.add_done_callback(lambda f: f.cancelled() or f.exception())  # logged in open_shard
        return fut

    # Faust calls these only once the agent has acked every event it took (the default
    # stream_wait_empty, set explicitly below): a revoked shard is never written after its
    # release, and a batch body never sees an assignment change half-way.
    @app.on_partitions_revoked.connect
    async def on_revoked(app_: Any, revoked: Any, **kw: Any) -> None:  # noqa: ARG001
        parts = [tp.partition for tp in revoked if tp.topic == k.events_topic]
        owned.difference_update(parts)
        checked.difference_update(parts)
        opening = [openers.pop(p) for p in parts if p in openers]
        if opening:  # an open still running in the executor: close the shard after it
            await asyncio.gather(*opening, return_exceptions=True)
        ing.release(parts)

    @app.on_partitions_assigned.connect
    async def on_assigned(app_: Any, assigned: Any, **kw: Any) -> None:  # noqa: ARG001
        checked.clear()
        owned.clear()
        owned.update(tp.partition for tp in assigned if tp.topic == k.events_topic)
        ing.release([p for p in ing.partitions() if p not in owned and p not in openers])
        for p in sorted(owned):
            shard_ready(p)

    n_examples_parts = [_partition_count(bootstrap, k.examples_topic)]
    encode = encode_example_batches if wcfg.examples_format == "arrow" else encode_example_records

    def headers(rec: bytes) -> list:
        """The record's content type, by its first bytes (an Arrow encoding falls back to JSON for
        values Arrow refuses; decode_examples goes by the bytes too -- the header is for other tools)."""
        return [(CONTENT_TYPE_HEADER, ARROW_CONTENT_TYPE if rec[:4] == ARROW_MAGIC else JSON_CONTENT_TYPE)]
    inflight: deque = deque()  # example sends whose acks are awaited, oldest first

    async def produce_examples(pairs: list) -> None:
        """One record per source partition holding its examples as a JSON array.

        Per-example records cost ~200 µs each in Faust/aiokafka — more than the
        whole ingest of the events that made them; an array per batch costs ~nothing.
        The acks are awaited in the background (at most ``examples_in_flight``
        batches at a time) and then acknowledged to the joiners; a failed send
        raises here, at the next call.
        """
        if not pairs:
            return
        t0 = time.perf_counter()
        by_part: dict[int, list] = {}
        for p, ex in pairs:
            by_part.setdefault(p, []).append(ex)
        futs = [await examples_topic.send(value=rec, partition=p % n_examples_parts[0], headers=headers(rec))
                for p, exs in by_part.items() for rec in encode(exs)]

        async def acked() -> None:
            await asyncio.gather(*futs)
            ing.ack_examples(pairs)

        inflight.append(asyncio.ensure_future(acked()))
        t1 = time.perf_counter()
        while inflight and (inflight[0].done() or len(inflight) > wcfg.examples_in_flight):
            await inflight.popleft()
        t2 = time.perf_counter()
        stats["examples_wait_s"] += t2 - t1  # of which waiting for acks past examples_in_flight
        stats["examples_s"] += t2 - t0  # the loop's time in here (encoding, sends, waits)

    @app.timer(wcfg.gauge_interval_s)
    async def refresh_gauges() -> None:
        ing.update_gauges()

    @app.timer(wcfg.wal_sync_interval_s)
    async def sync_wal() -> None:
        await asyncio.get_running_loop().run_in_executor(None, ing.sync_wal)

    fences: dict[int, int] = {}  # partition -> after a seek back, drop records past this offset

    @app.agent(events, concurrency=1)
    async def ingest(stream: Any) -> None:
        from faust.types import TP

        async for batch in stream.take_events(wcfg.take_max, within=wcfg.take_within_s):
            t_batch = time.monotonic()
            records = []
            in_batch: set[int] = set()  # partitions with records already taken from this batch
            for ev in batch:
                m = ev.message
                p = m.partition
                if p not in checked and p not in in_batch:
                    # (Once this batch holds records of p, a rebalance clearing `checked` at one
                    # of the awaits below must not make the next one look like a gap.)
                    checked.add(p)
                    await asyncio.shield(shard_ready(p))  # open, and its outbox re-sent
                    resume = ing.resume_offset(p)
                    if m.offset > resume:
                        log.warning("shard of partition %d is behind the consumer group (next offset %d, "
                                    "group at %d): seeking back", p, resume, m.offset)
                        fences[p] = m.offset
                        await app.consumer.seek(TP(k.events_topic, p), resume)
                if p in fences:
                    # Records fetched before the seek (offset > fence) are dropped; the first
                    # record at or below the fence comes from the new position.
                    if m.offset > fences[p]:
                        continue
                    del fences[p]
                in_batch.add(p)
                # A null value (a tombstone) is bad input like any other: it goes to the DLQ.
                records.append(Record(p, m.offset, m.value if m.value is not None else b"", m.key))
            # take_events counts records, and an Arrow record holds thousands of events:
            # work in chunks of about chunk_events, yielding to the loop in between so
            # heartbeats and fetches go on. (prepare/commit on a thread of their own
            # measured slower: GIL hand-offs with Faust's per-message Python.)
            for chunk in _chunks(records, wcfg.chunk_events):
                prep = ing.prepare(chunk)
                if prep.dead:
                    futs = [await dlq.send(key=d.key, value=d.value, headers=d.headers(k.events_topic))
                            for d in prep.dead]
                    await asyncio.gather(*futs)
                pairs = ing.commit(prep)
                await produce_examples(pairs)
                await asyncio.sleep(0)
            metrics.STREAM_BATCH_SECONDS.observe(time.monotonic() - t_batch)
            stats["batches"] += 1
            stats["last_batch_at"] = time.monotonic()

    return app, ing


def _chunks(records: list, max_events: int):
    """Split records into runs of about ``max_events`` events (a record's size estimated from its bytes)."""
    out: list = []
    n = 0
    for r in records:
        out.append(r)
        # JSON: one event per ~300 bytes; Arrow: ~60 bytes per event. An estimate is enough.
        n += max(1, len(r.value) // (60 if r.value[:4] == ARROW_MAGIC else 300))
        if n >= max_events:
            yield out
            out, n = [], 0
    if out:
        yield out


def _partition_count(bootstrap: str, topic: str) -> int:
    from kafka import KafkaConsumer

    c = KafkaConsumer(bootstrap_servers=bootstrap, client_id="opengem-metadata")
    try:
        deadline = time.monotonic() + 10
        parts = c.partitions_for_topic(topic)
        while not parts and time.monotonic() < deadline:
            time.sleep(0.1)
            parts = c.partitions_for_topic(topic)
        return max(1, len(parts or ()))
    finally:
        c.close()


def _exit_after(seconds: float) -> None:
    """Hard-exit the process unless it has exited by itself within ``seconds``.

    Faust's shutdown commits offsets and leaves the group; with the broker gone
    it retries forever and the process ignores SIGTERM. Exiting without that is
    safe: every commit is already in the shards' WAL (the same state a kill -9
    leaves, which the tests cover) and the group's offsets are only hints.
    """
    def watchdog() -> None:
        time.sleep(seconds)
        log.error("shutdown did not finish within %.0f s (broker unreachable?): exiting now", seconds)
        logging.shutdown()
        os._exit(3)

    threading.Thread(target=watchdog, name="shutdown-watchdog", daemon=True).start()


def _worker_class() -> type:
    import faust

    class Worker(faust.Worker):
        shutdown_timeout_s = 20.0

        def _on_sigterm(self) -> None:
            _exit_after(self.shutdown_timeout_s)
            super()._on_sigterm()

        def _on_sigint(self) -> None:
            _exit_after(self.shutdown_timeout_s)
            super()._on_sigint()

    return Worker


def run_worker(cfg: Config, bootstrap: str, embedded: bool, wcfg: WorkerConfig = WorkerConfig(),
               loglevel: str = "warning") -> None:
    """Run the worker until SIGINT/SIGTERM (Faust's own signal handling stops it cleanly)."""
    import faust

    app, ing = build_app(cfg, bootstrap, embedded, wcfg)
    if wcfg.metrics_port is not None:
        port = metrics.serve(wcfg.metrics_port)
        print(f"metrics at http://127.0.0.1:{port}/metrics", flush=True)
    worker = _worker_class()(app, loglevel=loglevel, quiet=True)
    worker.shutdown_timeout_s = wcfg.shutdown_timeout_s
    # Faust's start-up spinner leaves the root logger at DEBUG: every debug call
    # in Faust and aiokafka then builds a record (~25% of the batched path).
    worker.spinner = None
    try:
        worker.execute_from_commandline()
    finally:
        ing.close()
