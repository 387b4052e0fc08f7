"""Stream worker ingest: simulated events → embedded broker → one worker → shard stores.

Everything runs on one embedded (Tansu) broker. The events are produced
*before* any clock starts, into two topics of 4 partitions:

* ``bench.json``: one JSON event per record (key = user id), what any producer
  can send -- opengem's ``EventProducer(fmt="json")``;
* ``bench.arrow``: one Arrow IPC batch of one partition's events per record,
  ``EventProducer(fmt="arrow").send_batch`` on the simulator's
  ``record_batches(n, 8192)`` (≈ 2k events per record).

Both streams span the same ~2.8 h of event time whatever their length (the
simulator's rate is set to n / 10,000 s; its default gives that for 1M), so
the share of impressions that close into examples (click window 30 min) --
and the worker's cost of producing them -- is the same in ``--quick``.

Every consumer runs in its own subprocess (this file with ``--child``), joins
a fresh consumer group, and is timed from the first message its consumer
receives to its own end condition, so process start-up and the group join are
outside the clock. Measured alternately, ``--repeats`` times; the best run of
each is kept (the machine is shared).

* bare Faust loop (the per-event baseline): a ``faust.App`` with the worker's
  settings (raw serializers, ``faust_timing(True)``, ``topic_disable_leader``,
  no web, ``memory://`` store) whose agent only ``json.loads`` each value;
  ends at the N-th event.
* opengem worker: ``stream.worker.build_app`` itself (the Faust adapter,
  ``Ingestor.prepare`` / ``commit``, DLQ, joiner, example production), on the
  JSON topic and on the Arrow topic; ends when the shards have durably stored
  all N events and the examples of that last batch are acknowledged.
  ``worker_time_breakdown_s``: the fastest run's seconds in ``Ingestor.prepare``,
  ``Ingestor.commit`` (of which ``LabelJoiner.process_parts``) and in the
  worker's ``produce_examples`` (the sends, and waits when more than
  ``examples_in_flight`` batches are unacked: the acks arrive in the
  background); the rest is Faust. Also the
  largest batch (events) and its prepare + commit time (the event loop is
  blocked meanwhile).
* raw aiokafka ceiling: ``AIOKafkaConsumer.getmany`` over all partitions,
  counting records (JSON topic: one event each) or the row counts of the Arrow
  records (read from the IPC stream, zero-copy, no validation); no decoding.

``ceiling_events_per_s`` is the JSON topic's (the issue's "~290k events/s":
one Kafka record per event, and the batched goal of 100k events/s is 35 % of
it); the Arrow topic's is reported as ``arrow_ceiling_events_per_s``.

After a last Arrow run (with a secondary reader, so not one of the timed
repeats) the shards are opened, compacted and sized:

* ``bytes_per_event``: SST bytes of the sequence column family (chunks, tails,
  user heads, directories, offsets) / events stored, vs the raw 18-byte record;
* ``read_last4096_p99_ms``: during that run, a RocksDB secondary reader of
  partition 0's shard (catch-up thread every ``ServeConfig.catch_up_s``, 0.5 s, and the
  server's allocator setting, as ``opengem serve`` runs it) in this process reads the
  last 4096 events of one of the partition's 16 heaviest users, decoded into
  arrays, every ~5 ms, with the store's defaults (its decoded-chunk cache on:
  a repeated read decodes only what arrived since); ``..._nocache_...``: a
  second reader with ``decoded_cache_bytes=0`` taking turns with it (every
  chunk fetched and decoded on every read); ``batched_read_256_users_ms``:
  median ``read_batch`` of the partition's 256 heaviest users (max_len 4096),
  also during ingest (``..._nocache_ms``: the second reader). The baseline:
  the same reads once the worker has exited (``..._idle_...``).

Memory (``worker_rss_mb``): peak RSS (VmHWM) of the worker process in the main
runs, and in two synthetic scenarios streamed as Arrow batches through the
broker (users take turns, sessions of up to 16 events, every user comes back
at least once; 22 % impressions, the rest organic; ``synth_batches``):
"1M users × 100 events" (default store) and "10k users × 16k events"
(``max_events=16384``). Both are scaled down to 2M events (events per user;
the users are kept; ``--quick``: fewer users too) to fit the time budget, so
they are not at steady state: ``memory_scenarios`` gives the RSS at each
tenth of the stream. Each runs with the worker's defaults (``take_max`` 2000
*records*: a batch may hold the whole backlog) and with ``take_max=8``
(≤ ~16k events per batch: the store's, joiner's and Faust's own memory).

The cost of metrics (issue 7): each repeat runs both worker paths with
metrics on (as shipped) and with ``OPENGEM_METRICS=off`` (every metric a
no-op), back to back, the order alternating between repeats.
``metrics_cost`` per path: best events/s of each setting and their ratio, and
the worker process's CPU seconds per event (all threads; steadier than wall
time on a shared machine) with ``cpu_overhead`` = on / off − 1.
``--no-metrics-cost`` skips the extra runs.

CPU time (``cpu_us_per_event``, ``cpu_ratio_to_faust_loop``,
``cpu_batched_events_per_s``, ``cpu_batched_ratio_to_ceiling``): every child's
``process_time`` (all its threads) per event over the same span as its wall
clock, least of the repeats -- the same comparisons, much less disturbed by
other jobs on a shared machine than wall time (``load_average`` is recorded).

JSON keys: events_per_s, faust_loop_events_per_s, ratio_to_faust_loop (best / best;
``ratio_to_faust_loop_median``: the median over repeats of each repeat's own ratio),
batched_events_per_s, ceiling_events_per_s, batched_ratio_to_ceiling,
bytes_per_event, read_last4096_p99_ms, batched_read_256_users_ms,
worker_rss_mb, metrics_cost (+ context keys).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

PARTITIONS = 4
RAW_BYTES = 18
T0_MS = 1_767_225_600_000  # 2026-01-01, the simulator's start


# =========================================================================== children
# Each runs in its own process: `python bench/ingest.py --child ROLE SPEC.json`.
# SPEC holds the bootstrap, topic, event count and where to write the result.


def _proc_status_kb(field: str, pid: int | str = "self") -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _finish_child(spec: dict, result: dict) -> None:
    """Write the result, then stop the Faust worker the way Ctrl-C would."""
    result["vm_hwm_mb"] = _proc_status_kb("VmHWM") / 1024
    result["vm_rss_mb"] = _proc_status_kb("VmRSS") / 1024
    tmp = spec["result"] + ".tmp"
    Path(tmp).write_text(json.dumps(result))
    os.replace(tmp, spec["result"])
    os.kill(os.getpid(), signal.SIGTERM)


def _hook_first_message(app: Any, clock: dict) -> None:
    """clock["t0"] = when the consumer hands over its first message (one cheap call per
    message, the same in every child). Must run before the app starts: Faust's consumer
    and streams bind ``app.sensors.on_message_in`` when they are created."""
    orig = app.sensors.on_message_in

    def on_message_in(tp: Any, offset: int, message: Any) -> None:
        if "t0" not in clock:
            clock["t0"] = time.perf_counter()
            clock["cpu0"] = time.process_time()
        orig(tp, offset, message)

    app.sensors.on_message_in = on_message_in


def _run_faust(app: Any, spec: dict) -> None:
    import faust

    # As stream.worker.run_worker does. ("no_spinner": an experiment switch; Faust's
    # start-up spinner leaves the root logger at DEBUG, so every debug() call of
    # Faust / aiokafka builds a LogRecord.)
    worker = faust.Worker(app, loglevel="warning", quiet=True)
    if spec.get("no_spinner"):
        worker.spinner = None
    if spec.get("profile"):
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
        try:
            worker.execute_from_commandline()
        finally:
            prof.disable()
            prof.dump_stats(spec["profile"])
    else:
        worker.execute_from_commandline()


def child_faust_loop(spec: dict) -> None:
    """The bare Faust agent loop: json.loads each value, count, stop at N."""
    import faust

    from opengem.stream.broker import faust_timing

    n_target = spec["events"]
    app = faust.App(
        f"bench-loop-{uuid.uuid4().hex[:8]}",
        broker=f"kafka://{spec['bootstrap']}",
        value_serializer="raw", key_serializer="raw", store="memory://",
        topic_disable_leader=True, topic_allow_declare=False,
        consumer_auto_offset_reset="earliest", broker_commit_interval=1.0,
        web_enabled=False, datadir=spec["datadir"], **faust_timing(True),
    )
    topic = app.topic(spec["topic"], key_type=bytes, value_type=bytes)
    clock: dict = {}
    _hook_first_message(app, clock)

    @app.agent(topic, concurrency=1)
    async def loop(stream: Any) -> None:
        n = 0
        loads = json.loads
        async for value in stream:
            loads(value)
            n += 1
            if n == n_target:
                dt = time.perf_counter() - clock["t0"]
                cpu = time.process_time() - clock["cpu0"]
                _finish_child(spec, {"events": n, "seconds": dt, "events_per_s": n / dt,
                                     "cpu_us_per_event": cpu / n * 1e6})

    _run_faust(app, spec)


def child_worker(spec: dict) -> None:
    """opengem's worker (``build_app``), stopping once the shards hold all N events."""
    from opengem.config import Config, KafkaConfig
    from opengem.ops.metrics import enabled as metrics_enabled
    from opengem.stream.ingest import IngestConfig, Ingestor
    from opengem.stream.worker import WorkerConfig, build_app

    n_target = spec["events"]
    kafka = dataclasses.replace(KafkaConfig(), events_topic=spec["topic"], examples_topic=spec["examples_topic"],
                                dlq_topic=spec["dlq_topic"], partitions=PARTITIONS)
    cfg = dataclasses.replace(Config(), data_dir=spec["datadir"], kafka=kafka)
    # The store as the worker ships it (IngestConfig's: sync=False, the WAL fsynced on an interval), then the
    # scenario's overrides.
    store = dataclasses.replace(IngestConfig().store, **spec.get("store", {}))
    wcfg = WorkerConfig(app_id=f"bench-worker-{uuid.uuid4().hex[:8]}", ingest=IngestConfig(store=store),
                        **({"take_max": spec["take_max"]} if spec.get("take_max") else {}))
    clock: dict = {}
    progress: list[tuple[int, float]] = []  # (events stored, VmRSS MB) at each tenth of the stream

    from opengem.stream.joiner import LabelJoiner

    # Where the time goes (perf_counter around the plain steps; the rest is Faust,
    # the take buffer, record building and the DLQ / example sends).
    spent = {"prepare_s": 0.0, "commit_s": 0.0, "joiner_s": 0.0, "examples_s": 0.0, "examples_wait_s": 0.0,
             "batches": 0, "max_batch_events": 0, "max_batch_s": 0.0}
    process = LabelJoiner.process_parts  # what Ingestor.commit calls (process() calls it too)

    def timed_process(self: Any, *a: Any, **kw: Any) -> Any:
        t = time.perf_counter()
        try:
            return process(self, *a, **kw)
        finally:
            spent["joiner_s"] += time.perf_counter() - t

    LabelJoiner.process_parts = timed_process

    class TimedIngestor(Ingestor):
        done_pending: Any = None  # the examples of the last commit, once all N events are stored
        committed_at = prepared_at = 0.0

        def prepare(self, records: Any, now_ms: int | None = None) -> Any:
            t = self.prepared_at = time.perf_counter()
            out = super().prepare(records, now_ms)
            spent["prepare_s"] += time.perf_counter() - t
            return out

        def commit(self, prep: Any) -> list:
            t = time.perf_counter()
            pairs = super().commit(prep)
            self.committed_at = time.perf_counter()
            spent["commit_s"] += self.committed_at - t
            # The event loop is blocked for prepare + commit: the largest batch says for how long.
            spent["batches"] += 1
            if prep.events > spent["max_batch_events"]:
                spent["max_batch_events"] = prep.events
            spent["max_batch_s"] = max(spent["max_batch_s"], self.committed_at - self.prepared_at)
            stored = self.counts["events"]
            while len(progress) < 10 and stored >= n_target * (len(progress) + 1) / 10:
                progress.append((stored, _proc_status_kb("VmRSS") / 1024))
            if stored >= n_target and "t1" not in clock:
                if pairs:
                    self.done_pending = pairs  # done once the worker has produced them
                else:
                    self._done()
            return pairs

        def ack_examples(self, examples: Any) -> None:
            super().ack_examples(examples)
            if examples is self.done_pending and "t1" not in clock:
                self._done()

        def _done(self) -> None:
            clock["t1"] = time.perf_counter()
            spent["examples_s"] = app.opengem_stats["examples_s"]
            spent["examples_wait_s"] = app.opengem_stats["examples_wait_s"]
            dt = clock["t1"] - clock["t0"]
            cpu = time.process_time() - clock["cpu0"]  # every thread of the process
            n = self.counts["events"]
            _finish_child(spec, {"events": n, "seconds": dt, "events_per_s": n / dt,
                                 "cpu_s": cpu, "cpu_us_per_event": cpu / n * 1e6,
                                 "metrics": metrics_enabled(),
                                 "counts": dict(self.counts), "batches": app.opengem_stats["batches"],
                                 "rss_progress": progress, "spent": dict(spent)})

    ing = TimedIngestor(cfg.data_dir, surfaces=cfg.surfaces, cfg=wcfg.ingest, topic=spec["topic"])
    app, ing = build_app(cfg, spec["bootstrap"], True, wcfg, ingestor=ing)
    _hook_first_message(app, clock)
    try:
        _run_faust(app, spec)
    finally:
        ing.close()


def child_aiokafka(spec: dict) -> None:
    """The raw consumer ceiling: getmany over every partition, count, no decoding."""
    import asyncio

    import pyarrow as pa
    from aiokafka import AIOKafkaConsumer, TopicPartition

    arrow = spec["fmt"] == "arrow"

    async def run() -> dict:
        c = AIOKafkaConsumer(bootstrap_servers=spec["bootstrap"], group_id=None, enable_auto_commit=False,
                             auto_offset_reset="earliest")
        await c.start()
        try:
            tps = [TopicPartition(spec["topic"], p) for p in range(PARTITIONS)]
            c.assign(tps)
            await c.seek_to_beginning(*tps)
            n = 0
            # The clock starts before the first fetch (the consumer prefetches in the
            # background: by the first getmany's return much may be fetched already).
            t0, c0 = time.perf_counter(), time.process_time()
            while n < spec["events"]:
                got = await c.getmany(timeout_ms=1000)
                for msgs in got.values():
                    if arrow:
                        for m in msgs:  # row count from the IPC stream's batch metadata
                            n += pa.ipc.open_stream(m.value).read_next_batch().num_rows
                    else:
                        n += len(msgs)
            dt = time.perf_counter() - t0
            return {"events": n, "seconds": dt, "events_per_s": n / dt,
                    "cpu_us_per_event": (time.process_time() - c0) / n * 1e6}
        finally:
            await c.stop()

    result = asyncio.run(run())
    result["vm_hwm_mb"] = _proc_status_kb("VmHWM") / 1024
    Path(spec["result"]).write_text(json.dumps(result))


CHILDREN: dict[str, Callable[[dict], None]] = {
    "faust_loop": child_faust_loop, "worker": child_worker, "aiokafka": child_aiokafka,
}


# =========================================================================== parent


def run_child(role: str, spec: dict, timeout_s: float, during: Callable[[subprocess.Popen, Path], Any] | None = None,
              env: dict[str, str] | None = None) -> tuple[dict, Any]:
    """Run ``role`` in a subprocess with ``spec``; ``during(proc, result_path)`` runs in this
    process meanwhile (e.g. the read sampler); ``env`` is added to the child's environment.
    Returns (the child's result, during's)."""
    work = Path(tempfile.mkdtemp(prefix=f"bench-ingest-{role}-"))
    spec = {**spec, "result": str(work / "result.json")}
    spec.setdefault("datadir", str(work / "data"))
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps(spec))
    log = open(work / "child.log", "wb")
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child", role, str(spec_path)],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            cwd=str(BENCH_DIR.parent), env={**os.environ, **(env or {})})
    side = None
    try:
        if during is not None:
            side = during(proc, Path(spec["result"]))
        deadline = time.monotonic() + timeout_s
        while not Path(spec["result"]).exists() and proc.poll() is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{role} did not finish within {timeout_s:.0f}s:\n"
                                   + (work / "child.log").read_text(errors="replace")[-3000:])
            time.sleep(0.05)
        try:
            proc.wait(30)  # Faust's clean shutdown after the SIGTERM it sent itself
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if not Path(spec["result"]).exists():
            raise RuntimeError(f"{role} exited with {proc.returncode} and no result:\n"
                               + (work / "child.log").read_text()[-3000:])
        return json.loads(Path(spec["result"]).read_text()), side
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
        if not spec.get("keep"):
            shutil.rmtree(work, ignore_errors=True)


# --------------------------------------------------------------------------- data


def produce_json(bootstrap: str, topic: str, n: int, sim_cfg: Any) -> int:
    from opengem.stream.producer import EventProducer
    from opengem.stream.simulator import Simulator

    with EventProducer(bootstrap, topic, fmt="json") as prod:
        for batch in Simulator(sim_cfg).batches(n, batch_size=8192):
            prod.send(batch)
        prod.flush()
        return prod.events_sent


def produce_arrow(bootstrap: str, topic: str, batches: Any) -> tuple[int, int, np.ndarray]:
    """Send RecordBatches through opengem's Arrow producer; (events, records, user ids of all events)."""
    from opengem.stream.producer import EventProducer

    users = []
    with EventProducer(bootstrap, topic, fmt="arrow") as prod:
        for rb in batches:
            prod.send_batch(rb)
            users.append(rb.column(rb.schema.get_field_index("user_id")).to_numpy())
        prod.flush()
        return prod.events_sent, prod.records_sent, np.concatenate(users)


def synth_batches(n_users: int, per_user: int, rows: int = 8192, session: int = 16, seed: int = 0):
    """Synthetic, valid event batches (codec.EVENT_SCHEMA): every user emits sessions of
    ``session`` events, users take turns (round-robin), ts 10 ms apart globally; 22 %
    impressions (unique request ids), the rest organic kinds."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from opengem.stream.codec import EVENT_SCHEMA
    from opengem.stream.events import AD_FORMATS, DEFAULT_SURFACES, DEVICES, KINDS

    rng = np.random.default_rng(seed)
    total = n_users * per_user
    session = max(1, min(session, per_user // 2))  # every user comes back at least once
    uid_of = np.arange(n_users, dtype=np.int64) * 7 + 1
    u_age = rng.integers(0, 8, n_users).astype(np.int8)
    u_dev = rng.integers(0, len(DEVICES), n_users).astype(np.int8)
    u_ctry = rng.integers(0, 3, n_users).astype(np.int16)
    kinds = ("impression", "view", "like", "share", "comment", "follow")
    kp = np.array([0.22, 0.55, 0.11, 0.04, 0.04, 0.04])
    kind_codes = np.array([KINDS.index(k) for k in kinds], np.int8)
    F = EVENT_SCHEMA.field

    def dict_arr(name: str, codes: np.ndarray, values: tuple, mask: np.ndarray | None = None) -> Any:
        t = F(name).type
        return pa.DictionaryArray.from_arrays(pa.array(codes, t.index_type, mask=mask), pa.array(values, t.value_type))

    for a in range(0, total, rows):
        i = np.arange(a, min(a + rows, total), dtype=np.int64)
        block = i // session
        user = block % n_users  # blocks of `session` events per user, users in turn
        uid = uid_of[user]
        ts = T0_MS + i * 10
        k = kind_codes[np.searchsorted(np.cumsum(kp), rng.random(len(i)) * kp.sum())]
        imp = k == KINDS.index("impression")
        item = np.where(imp, 1_000_000_000 + rng.integers(0, 50_000, len(i)), rng.integers(0, 1_000_000, len(i)))
        ids = pc.binary_join_element_wise("m", pc.cast(pa.array(i), pa.string()), "")
        req = pc.binary_join_element_wise("q", pc.cast(pa.array(i, mask=~imp), pa.string()), "")
        cols = {
            "event_id": ids, "user_id": pa.array(uid), "ts": pa.array(ts),
            "surface": dict_arr("surface", rng.integers(0, 4, len(i)).astype(np.int16), DEFAULT_SURFACES),
            "kind": dict_arr("kind", k, KINDS), "item_id": pa.array(item), "is_ad": pa.array(imp),
            "request_id": req, "age_bucket": pa.array(u_age[user]),
            "country": dict_arr("country", u_ctry[user], ("US", "BR", "IN")),
            "device": dict_arr("device", u_dev[user], DEVICES),
            "ad_format": dict_arr("ad_format", (item % 4).astype(np.int8), AD_FORMATS, ~imp),
            "advertiser_id": pa.array(item % 1000, mask=~imp), "category": pa.array((item % 32).astype(np.int32)),
            "hour": pa.array(((ts // 3_600_000) % 24).astype(np.int8)),
            "p_click": pa.nulls(len(i), pa.float64()), "p_conversion": pa.nulls(len(i), pa.float64()),
        }
        yield pa.RecordBatch.from_arrays([cols[n] for n in EVENT_SCHEMA.names], schema=EVENT_SCHEMA)


# --------------------------------------------------------------------------- store


def shard_dir(datadir: str | Path, topic: str, p: int) -> Path:
    return Path(datadir) / "shards" / topic / f"p{p:04d}" / "store"


def store_size(datadir: str | Path, topic: str, users: np.ndarray, store_cfg: dict) -> dict:
    """Compact every shard; SST bytes of the sequence CF per stored event."""
    from opengem.features.store import SequenceStore, StoreConfig

    seq = items = stored = 0
    for p in range(PARTITIONS):
        path = shard_dir(datadir, topic, p)
        if not path.exists():
            continue
        s = SequenceStore(str(path), StoreConfig(**store_cfg))
        try:
            s.compact()
            sizes = s.disk_bytes()
            seq += sizes["sequences"]
            items += sizes["items"]
            stored += int(s.user_features(users).n_stored.sum())  # users of other shards: 0
        finally:
            s.close()
    return {"bytes_per_event": seq / stored, "stored_events": stored, "sequence_bytes": seq, "item_cf_bytes": items}


def read_sampler(datadir: str, topic: str, heavy: np.ndarray, batch_users: np.ndarray,
                 pause_s: float = 0.005, idle_reads: int = 1000,
                 catch_up_s: float | None = None) -> Callable[[subprocess.Popen, Path], dict]:
    """A `during` hook: one secondary reader of partition 0's shard (catch-up thread every
    ``catch_up_s``, the server's default, and its allocator setting) reads while the worker
    ingests, taking turns
    as shipped (decoded-chunk cache on) and with its cache bypassed (what
    ``decoded_cache_bytes=0`` reads: the no-cache baseline, without a second secondary
    instance whose catch-ups would stall this process's reads too); then, once the worker
    has exited and the reader has caught up, the same reads on an idle machine (the
    same-run baseline of the latency)."""

    def during(proc: subprocess.Popen, result: Path) -> dict:
        from opengem.features.store import SequenceStore
        from opengem.runtime import tune_allocator
        from opengem.serving.config import ServeConfig

        serve = ServeConfig()
        tune_allocator(serve.malloc_keep_mb)  # as the server's process runs
        interval = catch_up_s or serve.catch_up_s
        path = shard_dir(datadir, topic, 0)
        while not (path / "CURRENT").exists():
            if proc.poll() is not None or result.exists():
                return {}
            time.sleep(0.01)
        time.sleep(0.2)  # let the writer finish opening the DB (meta key, column families)
        secs = [Path(tempfile.mkdtemp(prefix="bench-ingest-secondary-"))]
        reader = SequenceStore.open_reader(str(path), str(secs[0]), interval_s=interval)
        cached = reader._decoded  # the no-cache turns set it aside (a read takes it once, at its start)
        assert cached is not None, "the shipped StoreConfig has a decoded-chunk cache"
        readers = [reader]
        catch_ups: list[tuple[float, float]] = []  # (start, end) of the follower threads' catch-ups

        skipped: list[float] = []  # start of catch-ups skipped: the shard's writer wrote nothing since (PrimaryWatch)

        def timed(catch_up: Callable[..., bool]) -> Callable[..., bool]:
            def timed_catch_up(*args: Any, **kw: Any) -> bool:
                t, done = time.perf_counter(), True
                try:
                    done = catch_up(*args, **kw)
                    return done
                finally:
                    if done:
                        catch_ups.append((t, time.perf_counter()))
                    else:
                        skipped.append(t)
            return timed_catch_up

        for r in readers:
            r.catch_up = timed(r.catch_up)  # the follower thread calls self.catch_up()

        def fresh() -> dict[str, Any]:
            return {"single_s": [], "spans": [], "cpu_s": [], "batch_s": [], "lens": [], "batch_events": 0,
                    "nocache_single_s": [], "nocache_batch_s": []}

        out = fresh()

        def sample(n: int | None, batch_every: int = 40) -> None:
            i = 0
            while (n is None and not result.exists() and proc.poll() is None) or (n is not None and i < 2 * n):
                nocache = i % 2  # cache on and bypassed take turns, each read after a pause
                r = reader
                r._decoded = None if nocache else cached
                u = int(heavy[(i // 2) % len(heavy)])
                c0 = time.thread_time()  # this thread's CPU: a read waiting for the GIL does not count
                t = time.perf_counter()
                seq = r.read(u, None, 4096)
                t1 = time.perf_counter()
                c1 = time.thread_time()
                if nocache:
                    out["nocache_single_s"].append(t1 - t)
                else:
                    out["single_s"].append(t1 - t)
                    out["spans"].append((t, t1))  # vs the catch-ups' spans, once all are known
                    out["cpu_s"].append(c1 - c0)
                    out["lens"].append(len(seq.ts))
                i += 1
                if batch_every and (i // 2) % batch_every == 0 and i % 2 == 0:
                    for k in range(2):
                        reader._decoded = None if k else cached
                        time.sleep(pause_s)
                        t = time.perf_counter()
                        jb = reader.read_batch(batch_users, None, 4096)
                        out["nocache_batch_s" if k else "batch_s"].append(time.perf_counter() - t)
                    out["batch_events"] = int(jb.lengths.sum())
                time.sleep(pause_s)

        try:
            t_ingest = time.perf_counter()
            sample(None)
            t_ingest = (t_ingest, time.perf_counter())
            proc.wait(60)
            for r in readers:
                r.catch_up()  # everything the worker wrote
            during_ingest = out
            out = fresh()
            sample(idle_reads, batch_every=100)
            idle = out
        finally:
            for r in readers:
                r.close()
            for sec in secs:
                shutil.rmtree(sec, ignore_errors=True)
        during_ingest["catch_up_spans"] = [c for c in catch_ups if c[0] < t_ingest[1]]
        during_ingest["ingest_span"] = t_ingest
        return {**during_ingest, "idle": idle, "catch_ups_skipped": sum(t < t_ingest[1] for t in skipped),
                "catch_up_s": [b - a for a, b in during_ingest["catch_up_spans"]]}

    return during


# --------------------------------------------------------------------------- main


def main() -> None:
    from _common import parser, table, write

    from opengem.stream.broker import EmbeddedBroker, ensure_topics, high_watermarks
    from opengem.stream.producer import partition_of
    from opengem.stream.simulator import SimConfig, Simulator
    from opengem.serving.config import ServeConfig
    from opengem.stream.worker import WorkerConfig

    ap = parser("ingest", __doc__)
    ap.add_argument("--json-events", type=int, default=0, help="per-event path (default 200k, quick 30k)")
    ap.add_argument("--arrow-events", type=int, default=0, help="batched path (default 1M, quick 150k)")
    ap.add_argument("--repeats", type=int, default=0, help="alternating repeats (default 2, quick 1); best is kept")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory scenarios")
    ap.add_argument("--no-metrics", action="store_true",
                    help="every worker run with OPENGEM_METRICS=off (no Prometheus metrics recorded; "
                         "JSON: bench/results/ingest-no-metrics.json)")
    ap.add_argument("--no-metrics-cost", dest="metrics_cost", action="store_false",
                    help="skip the worker runs with metrics off that measure the cost of metrics "
                         "(by default each repeat runs both settings, alternating their order)")
    args = ap.parse_args()
    if args.no_metrics:
        os.environ["OPENGEM_METRICS"] = "off"  # inherited by the child processes
        if args.out == ap.get_default("out"):
            args.out = "bench/results/ingest-no-metrics.json"
    q = args.quick
    n_json = args.json_events or (30_000 if q else 200_000)
    n_arrow = args.arrow_events or (150_000 if q else 1_000_000)
    repeats = args.repeats or (1 if q else 2)
    # Memory scenarios: (name, users, events per user, store overrides, the events per user),
    # scaled down in events per user (and in users with --quick) to fit the time budget.
    scenarios = [
        ("1M_users_x_100", 50_000 if q else 1_000_000, 4 if q else 2, {}, 100),
        ("10k_users_x_16k", 1_000 if q else 10_000, 200 if q else 200, {"max_events": 16384}, 16384),
    ]
    # Each scenario runs with the worker's defaults (take_max 2000 *records*: with ~2k-event
    # Arrow records one batch may hold the whole backlog) and with batches bounded to
    # BOUNDED_TAKE records (≤ ~16k events), which leaves the store's and joiner's own memory.
    bounded_take = 8
    # Both topics' streams span the same event time as the simulator's default rate gives
    # 1M events (~2.8 h): impressions close into examples (click window 30 min) in the same
    # proportion whatever the event count, so --quick and the JSON topic see the same mix.
    span_s = 10_000.0
    sim_json = SimConfig(seed=1, events_per_second=n_json / span_s)
    sim_cfg = SimConfig(seed=1, events_per_second=n_arrow / span_s)
    t_start = time.monotonic()

    with EmbeddedBroker(port=0) as b:
        bs = b.bootstrap
        ensure_topics(bs, ["bench.json", "bench.arrow", "bench.examples", "bench.dlq"], PARTITIONS)
        print(f"producing {n_json:,} JSON events and {n_arrow:,} Arrow-batched events (outside the clock)…",
              flush=True)
        sent_json = produce_json(bs, "bench.json", n_json, sim_json)
        sent_arrow, arrow_records, users = produce_arrow(
            bs, "bench.arrow", Simulator(sim_cfg).record_batches(n_arrow, batch_size=8192))
        hw_json, hw_arrow = high_watermarks(bs, "bench.json"), high_watermarks(bs, "bench.arrow")
        assert sum(hw_json.values()) == sent_json, f"JSON topic holds {sum(hw_json.values())}, sent {sent_json}"
        assert sum(hw_arrow.values()) == arrow_records, f"Arrow topic {sum(hw_arrow.values())} ≠ {arrow_records}"
        print(f"  {sent_json:,} JSON records; {sent_arrow:,} events in {arrow_records:,} Arrow records "
              f"({sent_arrow / arrow_records:,.0f} events/record)", flush=True)

        common = {"bootstrap": bs, "examples_topic": "bench.examples", "dlq_topic": "bench.dlq"}
        json_spec = {**common, "topic": "bench.json", "events": sent_json}
        arrow_spec = {**common, "topic": "bench.arrow", "events": sent_arrow}
        runs: dict[str, list[float]] = {k: [] for k in ("faust_loop", "worker_json", "worker_arrow",
                                                        "aiokafka_json", "aiokafka_arrow")}
        cpu: dict[str, list[float]] = {k: [] for k in runs}  # CPU µs per event of each run (all threads)
        rss: dict[str, float] = {}
        counts: dict[str, Any] = {}
        spent: dict[str, dict] = {}  # the fastest run's time breakdown, per path
        t_json = max(120, sent_json / 2000)
        t_arrow = max(120, sent_arrow / 10000)
        # The cost of metrics: every repeat also runs each worker path with OPENGEM_METRICS=off,
        # right next to the run with metrics on, the order alternating between repeats.
        cost: dict[str, dict[str, list[dict]]] = {p: {"on": [], "off": []} for p in ("json", "arrow")}
        off_env = {"OPENGEM_METRICS": "off"}
        for r in range(repeats):
            res, _ = run_child("faust_loop", json_spec, t_json)
            runs["faust_loop"].append(res["events_per_s"])
            cpu["faust_loop"].append(res["cpu_us_per_event"])
            for path, spec, limit in (("json", json_spec, t_json), ("arrow", arrow_spec, t_arrow)):
                settings = ("on", "off") if r % 2 == 0 else ("off", "on")
                if args.no_metrics or not args.metrics_cost:
                    settings = ("off",) if args.no_metrics else ("on",)
                for setting in settings:
                    res, _ = run_child("worker", spec, limit, env=off_env if setting == "off" else None)
                    assert res["metrics"] == (setting == "on"), "the child's metrics setting"
                    cost[path][setting].append({k: res[k] for k in ("events_per_s", "cpu_us_per_event", "seconds")})
                    if setting == "off" and not args.no_metrics:
                        continue  # the main figures are the daemon as it ships: metrics on
                    if res["events_per_s"] >= max(runs[f"worker_{path}"], default=0):
                        spent[path] = {"seconds": res["seconds"], **res["spent"]}
                    runs[f"worker_{path}"].append(res["events_per_s"])
                    cpu[f"worker_{path}"].append(res["cpu_us_per_event"])
                    rss[path] = max(rss.get(path, 0.0), res["vm_hwm_mb"])
                    counts[path] = res["counts"]
            for fmt, spec, limit in (("json", json_spec, t_json), ("arrow", arrow_spec, t_arrow)):
                res = run_child("aiokafka", {**spec, "fmt": fmt}, limit)[0]
                runs[f"aiokafka_{fmt}"].append(res["events_per_s"])
                cpu[f"aiokafka_{fmt}"].append(res["cpu_us_per_event"])
            print(f"  repeat {r + 1}/{repeats}: " + ", ".join(f"{k} {v[-1]:,.0f}" for k, v in runs.items()),
                  flush=True)

        # The Arrow path once more, with a secondary reader on partition 0's shard; then size the shards.
        print("Arrow run with a concurrent reader, then compaction…", flush=True)
        uniq, cnt = np.unique(users, return_counts=True)
        p0 = np.array([partition_of(int(u), PARTITIONS) == 0 for u in uniq])
        by_count = uniq[p0][np.argsort(-cnt[p0], kind="stable")]
        heavy, batch_users = by_count[:16], by_count[:256]
        work = Path(tempfile.mkdtemp(prefix="bench-ingest-read-"))
        try:
            datadir = str(work / "data")
            res, reads = run_child("worker", {**arrow_spec, "datadir": datadir}, t_arrow,
                                   during=read_sampler(datadir, "bench.arrow", heavy, batch_users))
            reader_run_eps = res["events_per_s"]
            size = store_size(datadir, "bench.arrow", uniq, {})
        finally:
            shutil.rmtree(work, ignore_errors=True)
        if not reads or not reads["single_s"]:
            raise RuntimeError("the reader took no samples during ingest")
        idle = reads["idle"]
        # A read overlaps a catch-up when their spans intersect (rocksdict holds the GIL
        # through try_catch_up_with_primary: such a read waits for it).
        spans = np.asarray(reads["spans"]).reshape(-1, 2)
        cu = np.asarray(reads["catch_up_spans"]).reshape(-1, 2)
        j = np.searchsorted(cu[:, 0], spans[:, 1])  # catch-ups started before each read ended
        flags = (j > 0) & (cu[np.maximum(j - 1, 0), 1] > spans[:, 0]) if len(cu) else np.zeros(len(spans), bool)
        lat = np.asarray(reads["single_s"])
        overlap, clear = lat[flags], lat[~flags]
        ingest_s = reads["ingest_span"][1] - reads["ingest_span"][0]

        # Memory scenarios.
        mem: dict[str, dict] = {}
        if not args.no_memory:
            for name, n_users, per_user, store_over, full_per_user in scenarios:
                topic = f"bench.mem.{name}"
                ensure_topics(bs, [topic], PARTITIONS)
                print(f"memory scenario {name}: producing {n_users:,} users × {per_user:,} events…", flush=True)
                ev, recs, _ = produce_arrow(bs, topic, synth_batches(n_users, per_user, seed=2))
                for variant, take in (("", None), ("_bounded_batches", bounded_take)):
                    res, _ = run_child("worker", {**common, "topic": topic, "events": ev, "store": store_over,
                                                  "take_max": take}, max(300, ev / 5000))
                    mem[name + variant] = {
                        "users": n_users, "events_per_user": per_user, "issue_events_per_user": full_per_user,
                        "events": ev, "records": recs, "store": store_over, "take_max": take or 2000,
                        "peak_rss_mb": res["vm_hwm_mb"], "events_per_s": res["events_per_s"],
                        "max_batch_events": res["spent"]["max_batch_events"],
                        "max_batch_s": res["spent"]["max_batch_s"],
                        "rss_mb_at_tenths": [round(m, 1) for _, m in res["rss_progress"]]}
                    print(f"  take_max {take or 2000}: peak RSS {res['vm_hwm_mb']:,.0f} MB at "
                          f"{res['events_per_s']:,.0f} events/s, largest batch {res['spent']['max_batch_events']:,} "
                          f"events", flush=True)

    best = {k: max(v) for k, v in runs.items()}
    metrics_cost: dict[str, dict] = {}
    for path, by in cost.items():
        if not (by["on"] and by["off"]):
            continue
        on_eps, off_eps = (max(x["events_per_s"] for x in by[s_]) for s_ in ("on", "off"))
        on_cpu, off_cpu = (min(x["cpu_us_per_event"] for x in by[s_]) for s_ in ("on", "off"))
        metrics_cost[path] = {
            "events_per_s_on": on_eps, "events_per_s_off": off_eps,
            # < 1: metrics slow the worker down (best run of each setting).
            "throughput_ratio_on_to_off": on_eps / off_eps,
            "cpu_us_per_event_on": on_cpu, "cpu_us_per_event_off": off_cpu,
            # CPU seconds of the worker process (all threads) per event: less sensitive to
            # other jobs on the machine than wall time. > 0: what metrics add.
            "cpu_overhead": on_cpu / off_cpu - 1.0,
            # Each repeat's on/off pair, for the spread.
            "pair_throughput_ratios": [a["events_per_s"] / b["events_per_s"] for a, b in zip(by["on"], by["off"])],
            "pair_cpu_overheads": [a["cpu_us_per_event"] / b["cpu_us_per_event"] - 1.0
                                   for a, b in zip(by["on"], by["off"])],
            "runs": by,
        }
    ms = lambda xs, p_: float(np.percentile(np.asarray(xs) * 1e3, p_))  # noqa: E731
    figures = {
        "events_per_s": best["worker_json"],
        "faust_loop_events_per_s": best["faust_loop"],
        "ratio_to_faust_loop": best["worker_json"] / best["faust_loop"],
        # The same per repeat (each repeat runs the bare loop, then the worker: neighbours in time),
        # and their median: on a host whose speed drifts between runs, steadier than best / best.
        "ratio_to_faust_loop_per_repeat": [w / f for w, f in zip(runs["worker_json"], runs["faust_loop"])],
        "ratio_to_faust_loop_median": float(np.median([w / f for w, f in zip(runs["worker_json"], runs["faust_loop"])])),
        "batched_events_per_s": best["worker_arrow"],
        "ceiling_events_per_s": best["aiokafka_json"],
        "batched_ratio_to_ceiling": best["worker_arrow"] / best["aiokafka_json"],
        "arrow_ceiling_events_per_s": best["aiokafka_arrow"],
        "batched_ratio_to_arrow_ceiling": best["worker_arrow"] / best["aiokafka_arrow"],
        "batched_speedup_over_per_event": best["worker_arrow"] / best["worker_json"],
        "bytes_per_event": size["bytes_per_event"],
        "raw_bytes_per_event": RAW_BYTES,
        "bytes_ratio_to_raw": size["bytes_per_event"] / RAW_BYTES,
        "stored_events": size["stored_events"],
        "item_cf_bytes": size["item_cf_bytes"],
        "read_last4096_p50_ms": ms(reads["single_s"], 50),
        "read_last4096_p99_ms": ms(reads["single_s"], 99),
        # The same reads with the reader's decoded-chunk cache bypassed (what
        # StoreConfig(decoded_cache_bytes=0) reads): every chunk fetched and decoded (turns
        # with the cached reads, same pauses).
        "read_last4096_nocache_p50_ms": ms(reads["nocache_single_s"], 50),
        "read_last4096_nocache_p99_ms": ms(reads["nocache_single_s"], 99),
        "read_last4096_nocache_idle_p99_ms": ms(idle["nocache_single_s"], 99),
        "read_samples": len(reads["single_s"]),
        "read_mean_events": float(np.mean(reads["lens"])),
        # The same reads after ingest, machine idle: the latency's same-run baseline.
        "read_last4096_idle_p50_ms": ms(idle["single_s"], 50),
        "read_last4096_idle_p99_ms": ms(idle["single_s"], 99),
        "read_p99_ratio_ingest_to_idle": ms(reads["single_s"], 99) / ms(idle["single_s"], 99),
        "read_idle_mean_events": float(np.mean(idle["lens"])),
        # Reads during which the follower thread's catch-up ran, vs the others.
        "read_last4096_p99_ms_overlapping_catch_up": ms(overlap, 99) if len(overlap) else None,
        "read_last4096_p99_ms_not_overlapping": ms(clear, 99) if len(clear) else None,
        "reads_overlapping_catch_up": int(len(overlap)),
        "read_last4096_cpu_p99_ms": ms(reads["cpu_s"], 99),
        # The share of the ingest's wall time in the reader's catch-ups: the share of requests
        # arriving at random (not this closed loop) that would wait for one.
        "catch_up_interval_s": ServeConfig().catch_up_s,
        "catch_up_duty": float(np.sum(reads["catch_up_s"])) / ingest_s,
        "catch_ups_done": len(reads["catch_up_s"]),
        "catch_ups_skipped": reads["catch_ups_skipped"],
        "catch_up_p50_ms": ms(reads["catch_up_s"], 50) if reads["catch_up_s"] else None,
        "catch_up_max_ms": float(np.max(reads["catch_up_s"]) * 1e3) if reads["catch_up_s"] else None,
        "batched_read_256_users_ms": ms(reads["batch_s"], 50) if reads["batch_s"] else None,
        "batched_read_256_users_events": reads["batch_events"],
        "batched_read_samples": len(reads["batch_s"]),
        "batched_read_256_users_idle_ms": ms(idle["batch_s"], 50) if idle["batch_s"] else None,
        "batched_read_256_users_nocache_ms": ms(reads["nocache_batch_s"], 50) if reads["nocache_batch_s"] else None,
        "batched_read_256_users_idle_events": idle["batch_events"],
        "batched_events_per_s_with_reader": reader_run_eps,
        "worker_rss_mb": {"json_run": rss["json"], "arrow_run": rss["arrow"],
                          **{name: m["peak_rss_mb"] for name, m in mem.items()}},
        "memory_scenarios": mem,
        "metrics_cost": metrics_cost,
        # The same comparisons in CPU time (process_time of each child, all its threads, per
        # event; least of the repeats): on a shared machine wall time also measures the other
        # jobs, CPU time much less so. cpu_ratio_to_faust_loop compares as ratio_to_faust_loop
        # does; cpu_batched_events_per_s is what one fully used core would ingest.
        "cpu_us_per_event": {k: min(v) for k, v in cpu.items() if v},
        "cpu_ratio_to_faust_loop": min(cpu["faust_loop"]) / min(cpu["worker_json"]),
        "cpu_batched_events_per_s": 1e6 / min(cpu["worker_arrow"]),
        "cpu_batched_ratio_to_ceiling": min(cpu["aiokafka_json"]) / min(cpu["worker_arrow"]),
        "load_average": os.getloadavg(),
        "worker_counts": counts,
        # Seconds of the fastest run of each path spent in Ingestor.prepare, Ingestor.commit
        # (of which LabelJoiner.process_parts), and in the worker's produce_examples (sends, waits).
        "worker_time_breakdown_s": spent,
        "runs": runs,
        "wall_s": time.monotonic() - t_start,
    }
    goal = lambda ok: "yes" if ok else "NO"  # noqa: E731
    rows = [
        ["bare Faust loop, JSON per event (baseline)", best["faust_loop"], 1.0, ""],
        ["opengem worker, JSON per event", best["worker_json"], figures["ratio_to_faust_loop"],
         f"≥ 0.90: {goal(figures['ratio_to_faust_loop'] >= 0.9)}"],
        ["raw aiokafka getmany, JSON topic (ceiling)", best["aiokafka_json"], 1.0, ""],
        ["opengem worker, Arrow batches", best["worker_arrow"], figures["batched_ratio_to_ceiling"],
         f"≥ 100k/s and ≥ 0.35: {goal(best['worker_arrow'] >= 1e5 and figures['batched_ratio_to_ceiling'] >= 0.35)}"],
        ["raw aiokafka getmany, Arrow topic (context)", best["aiokafka_arrow"],
         figures["batched_ratio_to_arrow_ceiling"], "worker / this"],
        ["  the same per repeat (median)", ", ".join(f"{x:.3f}" for x in figures["ratio_to_faust_loop_per_repeat"]),
         figures["ratio_to_faust_loop_median"], "worker / bare loop of the same repeat"],
        ["CPU µs/event: Faust loop / worker JSON", f"{min(cpu['faust_loop']):.1f} / {min(cpu['worker_json']):.1f}",
         figures["cpu_ratio_to_faust_loop"], "as ratio_to_faust_loop, in CPU time"],
        ["CPU µs/event: getmany JSON / worker Arrow", f"{min(cpu['aiokafka_json']):.2f} / {min(cpu['worker_arrow']):.2f}",
         figures["cpu_batched_ratio_to_ceiling"], f"one core: {figures['cpu_batched_events_per_s']:,.0f} events/s"],
        ["bytes per stored event (compacted) vs raw 18", size["bytes_per_event"], figures["bytes_ratio_to_raw"],
         f"≤ 6: {goal(size['bytes_per_event'] <= 6)}"],
        ["read last 4096 during ingest, p50 ms", figures["read_last4096_p50_ms"], "", ""],
        ["read last 4096 during ingest, p99 ms", figures["read_last4096_p99_ms"],
         figures["read_p99_ratio_ingest_to_idle"], f"≤ 1 ms: {goal(figures['read_last4096_p99_ms'] <= 1)}"],
        ["read last 4096 after ingest (idle), p50 / p99 ms",
         f"{figures['read_last4096_idle_p50_ms']:.3f} / {figures['read_last4096_idle_p99_ms']:.3f}", "", ""],
        ["  decoded cache off: during ingest p50 / p99, idle p99 ms",
         f"{figures['read_last4096_nocache_p50_ms']:.3f} / {figures['read_last4096_nocache_p99_ms']:.3f}, "
         f"{figures['read_last4096_nocache_idle_p99_ms']:.3f}", "", "every chunk decoded"],
        ["read_batch 256 users during ingest, median ms (cache off)",
         f"{figures['batched_read_256_users_ms'] or 0:.1f} ({figures['batched_read_256_users_nocache_ms'] or 0:.1f})", "", ""],
        ["read_batch 256 users after ingest (idle), median ms", figures["batched_read_256_users_idle_ms"] or "",
         "", ""],
        ["worker peak RSS MB, JSON run / Arrow run", f"{rss['json']:,.0f} / {rss['arrow']:,.0f}", "", ""],
    ]
    for path, c in metrics_cost.items():
        rows.append([f"worker {path}, metrics on / off: events/s", f"{c['events_per_s_on']:,.0f} / "
                     f"{c['events_per_s_off']:,.0f}", c["throughput_ratio_on_to_off"], "cost of metrics"])
        rows.append([f"worker {path}, metrics on / off: CPU µs per event", f"{c['cpu_us_per_event_on']:.2f} / "
                     f"{c['cpu_us_per_event_off']:.2f}", 1 + c["cpu_overhead"], "cost of metrics"])
    for name, m in mem.items():
        rows.append([f"worker peak RSS MB, {m['users']:,} users × {m['events_per_user']:,}, take_max {m['take_max']}",
                     m["peak_rss_mb"], "", f"batch ≤ {m['max_batch_events']:,} ev, {m['events_per_s']:,.0f} ev/s"])
    print()
    print(table(rows, ["measure", "value", "ratio", "goal"]))
    print(f"\nreads during ingest overlapping a catch-up: {len(overlap):,}, p99 "
          f"{figures['read_last4096_p99_ms_overlapping_catch_up'] or 0:.3f} ms; others p99 "
          f"{figures['read_last4096_p99_ms_not_overlapping'] or 0:.3f} ms; catch-up p50 "
          f"{figures['catch_up_p50_ms'] or 0:.2f} ms, max {figures['catch_up_max_ms'] or 0:.1f} ms, every "
          f"{figures['catch_up_interval_s']} s: {figures['catch_up_duty']:.1%} of the time (the GIL held); "
          f"the reads' own CPU p99 {figures['read_last4096_cpu_p99_ms']:.3f} ms")
    print(f"read samples {len(reads['single_s']):,} (mean {np.mean(reads['lens']):,.0f} events); "
          f"read_batch returned {reads['batch_events']:,} events; Arrow run with reader "
          f"{reader_run_eps:,.0f} events/s; wall {figures['wall_s']:,.0f} s")
    for name, m in mem.items():
        print(f"{name}: RSS MB at each tenth of the stream: {m['rss_mb_at_tenths']}")
    config = {"json_events": sent_json, "arrow_events": sent_arrow, "arrow_records": arrow_records,
              "arrow_batch_size": 8192, "partitions": PARTITIONS, "repeats": repeats, "sim_seed": sim_cfg.seed,
              "sim_users": sim_cfg.n_users, "sim_span_s": span_s,
              "sim_events_per_second": {"json": sim_json.events_per_second, "arrow": sim_cfg.events_per_second},
              "read_pause_s": 0.005, "read_catch_up_s": ServeConfig().catch_up_s, "quick": q,
              "worker": "stream.worker.build_app, WorkerConfig defaults (take_max {0.take_max}, within "
                        "{0.take_within_s} s, chunk_events {0.chunk_events}, examples_in_flight "
                        "{0.examples_in_flight}), IngestConfig defaults (store and joiner sync=False, "
                        "WAL fsync every {0.wal_sync_interval_s} s)".format(WorkerConfig()),
              "memory_scenarios": {n: {"users": u, "events_per_user": e, "store": s, "issue_events_per_user": f}
                                   for n, u, e, s, f in scenarios},
              "memory_bounded_take_max": bounded_take}
    write(args.out, "ingest", {**config, "metrics": not args.no_metrics, "metrics_cost_runs": args.metrics_cost},
          figures)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        CHILDREN[sys.argv[2]](json.loads(Path(sys.argv[3]).read_text()))
    else:
        main()
