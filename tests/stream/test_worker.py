"""The stream worker against the real embedded broker, as separate processes.

- malformed records mixed into a valid stream all land in the DLQ with reasons,
  every valid event is stored, the worker never stops;
- kill -9 mid-stream, twice, and restart: the stores equal a run without
  crashes (nothing lost, nothing duplicated) and the examples are the same set.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from kafka import KafkaConsumer, KafkaProducer

from opengem.features.store import SequenceStore
from opengem.stream.broker import ensure_topics, high_watermarks
from opengem.stream.ingest import REASON_HEADER, Ingestor, IngestConfig, Record
from opengem.stream.joiner import JoinerConfig, decode_examples
from opengem.stream.producer import EventProducer, partition_of
from opengem.stream.simulator import SimConfig, Simulator

pytestmark = pytest.mark.integration

TOPICS = ("opengem.events", "opengem.examples", "opengem.events.dlq")
WINDOWS = ["--click-window", "60", "--conversion-window", "600"]
JOINER = JoinerConfig(click_window_ms=60_000, conversion_window_ms=600_000)


def _env():
    env = dict(os.environ)
    env.pop("OPENGEM_BOOTSTRAP", None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def start_worker(bootstrap: str, data_dir: Path, log: Path, metrics_port: int = -1) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "opengem.cli", "stream", "--bootstrap", bootstrap,
                             "--data-dir", str(data_dir), "--metrics-port", str(metrics_port), *WINDOWS],
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT, env=_env())


class ShardWatch:
    """Applied offsets of every shard store through secondary instances (the worker may run).

    The secondaries stay open and catch up incrementally: opening one replays
    the writer's whole WAL, far too slow to do on every poll."""

    def __init__(self, data_dir: Path, scratch: Path):
        self.root = data_dir / "shards" / "opengem.events"
        self.scratch = scratch
        self.readers: dict[str, SequenceStore] = {}

    def offsets(self) -> dict[int, int]:
        out: dict[int, int] = {}
        if not self.root.exists():
            return out
        for d in sorted(self.root.glob("p[0-9]*")):
            r = self.readers.get(d.name)
            if r is None:
                if not (d / "store" / "CURRENT").exists():
                    continue
                r = self.readers[d.name] = SequenceStore.open_reader(str(d / "store"), str(self.scratch / d.name))
            r.catch_up()
            out.update(r.applied_offsets())
        return out

    def close(self) -> None:
        for r in self.readers.values():
            r.close()
        self.readers.clear()


def shard_offsets(data_dir: Path, scratch: Path) -> dict[int, int]:
    w = ShardWatch(data_dir, scratch)
    try:
        return w.offsets()
    finally:
        w.close()


def wait_until_applied(bootstrap: str, data_dir: Path, scratch: Path, proc: subprocess.Popen, timeout_s: float):
    hw = high_watermarks(bootstrap, "opengem.events")
    want = {p: h - 1 for p, h in hw.items() if h > 0}
    deadline = time.monotonic() + timeout_s
    watch = ShardWatch(data_dir, scratch)
    try:
        while time.monotonic() < deadline:
            assert proc.poll() is None, "worker died"
            got = watch.offsets()
            if all(got.get(p, -1) >= o for p, o in want.items()):
                return
            time.sleep(0.3)
        raise AssertionError(f"worker did not catch up: want {want}, have {watch.offsets()}")
    finally:
        watch.close()


def scrape(log: Path) -> dict[str, float]:
    """The worker's /metrics (its port is in its log), as {series: value}."""
    import re
    import urllib.request

    m = re.search(rb"metrics at (http://127\.0\.0\.1:\d+/metrics)", log.read_bytes())
    assert m, "the worker did not say where its metrics are"
    text = urllib.request.urlopen(m.group(1).decode(), timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def consume_all(bootstrap: str, topic: str) -> list:
    hw = high_watermarks(bootstrap, topic)
    total = sum(hw.values())
    c = KafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest",
                      enable_auto_commit=False)
    out = []
    deadline = time.monotonic() + 60
    try:
        while len(out) < total and time.monotonic() < deadline:
            for msgs in c.poll(timeout_ms=300).values():
                out.extend(msgs)
    finally:
        c.close()
    assert len(out) == total
    return out


# ---------------------------------------------------------------------------------------------
def malformed_corpus(n: int, rng: random.Random) -> list[tuple[bytes, str]]:
    """(record value, expected reason) of many shapes of bad input."""
    good = {"event_id": "x", "user_id": 1, "ts": 1767225600000, "surface": "feed", "kind": "view",
            "item_id": 5, "is_ad": False}
    makers = [
        (lambda: bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 40))).replace(b"{", b"(")
         .replace(b"[", b"(").replace(b"\xff", b"\x00") + b"#", "bad_format"),
        (lambda: json.dumps({k: v for k, v in good.items() if k != "user_id"}).encode(), "missing_field"),
        (lambda: json.dumps({**good, "user_id": "seven"}).encode(), "bad_type"),
        (lambda: json.dumps({**good, "item_id": 2**70}).encode(), "out_of_range"),
        (lambda: json.dumps({**good, "surface": "billboard"}).encode(), "unknown_value"),
        (lambda: json.dumps({**good, "ts": 4102444800000}).encode(), "future_ts"),
        (lambda: b'{"event_id": "x", "user_id": ', "bad_json"),
    ]
    out = []
    for i in range(n):
        make, reason = makers[i % len(makers)]
        v = make()
        out.append((v, reason))
    return out


def test_malformed_records_go_to_the_dlq_and_valid_events_are_all_stored(tmp_path):
    # A broker of its own topics: this test owns opengem.* on a fresh data dir.
    from opengem.stream.broker import EmbeddedBroker

    with EmbeddedBroker(port=0, topics=TOPICS, partitions=4) as b:
        rng = random.Random(3)
        valid = [e for batch in Simulator(SimConfig(seed=21)).batches(20_000) for e in batch]
        bad = malformed_corpus(10_000, rng)
        p = KafkaProducer(bootstrap_servers=b.bootstrap, linger_ms=20, batch_size=262_144)
        mixed = [("ok", e) for e in valid] + [("bad", x) for x in bad]
        rng.shuffle(mixed)
        for tag, x in mixed:
            if tag == "ok":
                p.send("opengem.events", key=str(x.user_id).encode(), value=x.to_json())
            else:
                p.send("opengem.events", key=str(rng.randrange(1000)).encode(), value=x[0])
        p.send("opengem.events", key=b"1", value=None)  # a null record (tombstone) is bad input too
        bad.append((b"", "bad_format"))
        p.flush()
        p.close()

        w = start_worker(b.bootstrap, tmp_path / "d", tmp_path / "worker.log", metrics_port=0)
        try:
            wait_until_applied(b.bootstrap, tmp_path / "d", tmp_path / "scratch", w, timeout_s=180)
            assert w.poll() is None, "worker stopped"
            scraped = scrape(tmp_path / "worker.log")
        finally:
            stop(w)
        assert w.returncode == 0, (tmp_path / "worker.log").read_text()[-3000:]

        dlq = consume_all(b.bootstrap, "opengem.events.dlq")
        assert len(dlq) == len(bad)
        got = Counter(dict(m.headers)[REASON_HEADER].decode() for m in dlq)
        assert got == Counter(r for _, r in bad)
        assert {m.value for m in dlq} == {v for v, _ in bad}
        # The same counts, scraped over HTTP from the worker's Prometheus endpoint.
        for reason, n in Counter(r for _, r in bad).items():
            assert scraped[f'opengem_stream_dlq_records_total{{reason="{reason}"}}'] == n
        assert sum(v for k, v in scraped.items() if k.startswith("opengem_stream_events_total{")) == len(valid)

        # Every valid event is in its user's stored sequence (no user passes the 4096 cap here).
        per_user = Counter(e.user_id for e in valid)
        assert max(per_user.values()) < 4096
        # Each user read from every shard (its events must be in its own partition's only),
        # in one batched read per shard.
        stored = Counter()
        root = tmp_path / "d" / "shards" / "opengem.events"
        users = np.array(sorted(per_user), np.int64)
        for d in sorted(root.glob("p[0-9]*")):
            s = SequenceStore(str(d / "store"))
            try:
                lens = s.read_batch(users, max_len=4096).lengths.tolist()
                for u, k in zip(users.tolist(), lens):
                    if k:
                        assert partition_of(u, 4) == int(d.name[1:]), f"user {u} stored in {d.name}"
                        stored[u] += k
            finally:
                s.close()
        assert stored == per_user


# ---------------------------------------------------------------------------------------------
def test_kill_9_twice_then_restart_equals_a_run_without_crashes(tmp_path):
    from opengem.stream.broker import EmbeddedBroker

    with EmbeddedBroker(port=0, topics=TOPICS, partitions=4) as b:
        with EventProducer(b.bootstrap, "opengem.events", fmt="json") as prod:
            for batch in Simulator(SimConfig(seed=5)).batches(60_000):
                prod.send(batch)
        data, scratch, log = tmp_path / "d", tmp_path / "scratch", tmp_path / "worker.log"
        t0 = time.monotonic()

        def t_phase(what: str) -> None:
            print(f"  [{time.monotonic() - t0:6.1f}s] {what}", flush=True)

        total = sum(high_watermarks(b.bootstrap, "opengem.events").values())
        progress = []
        for fraction in (0.25, 0.6):
            # Kill -9 once the shards hold about `fraction` of the stream: mid-stream for sure.
            w = start_worker(b.bootstrap, data, log)
            watch = ShardWatch(data, scratch / f"k{fraction}")
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                assert w.poll() is None, "worker died on its own"
                done = sum(o + 1 for o in watch.offsets().values())
                if done >= fraction * total:
                    break
                time.sleep(0.1)
            w.send_signal(signal.SIGKILL)
            w.wait()
            done = sum(o + 1 for o in watch.offsets().values())
            watch.close()
            assert done < total, "the worker finished before it was killed: not a mid-stream crash"
            progress.append(done)
            t_phase(f"killed at {done} records")
        partial = progress
        w = start_worker(b.bootstrap, data, log)
        try:
            wait_until_applied(b.bootstrap, data, scratch / "final", w, timeout_s=240)
            t_phase("caught up")
            # Let the outbox drain to Kafka before stopping.
            time.sleep(2.0)
        finally:
            stop(w)
        t_phase("stopped")

        # The reference: the same records through the same ingest code, no broker, no crash.
        records = [Record(m.partition, m.offset, m.value, m.key) for m in consume_all(b.bootstrap, "opengem.events")]
        records.sort(key=lambda r: (r.partition, r.offset))
        ref = Ingestor(tmp_path / "ref", cfg=IngestConfig(joiner=JOINER))
        ref_examples = []
        for i in range(0, len(records), 500):
            _, ex = ref.process(records[i:i + 500])
            ref_examples.extend(e for _, e in ex)
        users_of: dict[int, set[int]] = {}
        for r in records:
            users_of.setdefault(r.partition, set()).add(json.loads(r.value)["user_id"])
        t_phase("reference built")

        for p in range(4):
            s_ref = ref.shard(p).store
            s = SequenceStore(str(data / "shards" / "opengem.events" / f"p{p:04d}" / "store"))
            try:
                assert s.applied_offsets() == s_ref.applied_offsets()
                for u in sorted(users_of.get(p, ())):
                    assert s.read(u).equals(s_ref.read(u)), f"user {u} differs in partition {p}"
            finally:
                s.close()
        ref.close()

        t_phase("stores compared")
        got = {}
        msgs = consume_all(b.bootstrap, "opengem.examples")
        # The worker's default: Arrow IPC records, labelled so for other tools.
        assert msgs and all(m.value[:4] == b"\xff\xff\xff\xff" for m in msgs)
        assert all(dict(m.headers)["content-type"] == b"application/vnd.apache.arrow.stream" for m in msgs)
        for m in msgs:
            for ex in decode_examples(m.value):
                got[ex.example_id] = ex  # duplicates (re-sent outbox) collapse on example_id
        want = {ex.example_id: ex for ex in ref_examples}
        assert got.keys() == want.keys()
        assert all(got[k] == want[k] for k in want)
        print(f"records applied at the two kill -9s: {partial} of {total}; examples: {len(got)}")


# ---------------------------------------------------------------------------------------------
def held_shards(pid: int, data_dir: Path) -> set[str]:
    """Shards under ``data_dir`` whose RocksDB LOCK process ``pid`` holds open (RocksDB keeps the fd)."""
    root = str(data_dir.resolve()) + "/"
    out = set()
    for fd in Path(f"/proc/{pid}/fd").glob("*"):
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith(root) and target.endswith("/store/LOCK"):
            out.add(Path(target).parent.parent.name)
    return out


class Trickle:
    """Simulated events of the users of ``partitions`` produced in the background, a small batch
    every ``every_s``, until stopped (records flow while the group rebalances)."""

    def __init__(self, bootstrap: str, sim: SimConfig, partitions: set[int], batch: int = 400, every_s: float = 0.25):
        import threading

        from opengem.stream.producer import partition_of

        self.stop_flag = threading.Event()
        self.sent = 0
        self.error: BaseException | None = None

        def run() -> None:
            try:
                with EventProducer(bootstrap, "opengem.events", fmt="json") as prod:
                    for events in Simulator(sim).batches(None, batch_size=batch):
                        if self.stop_flag.is_set():
                            break
                        events = [e for e in events if partition_of(e.user_id, 4) in partitions]
                        prod.send(events)
                        self.sent += len(events)
                        self.stop_flag.wait(every_s)
            except BaseException as e:  # noqa: BLE001 - reported by stop()
                self.error = e

        self.thread = threading.Thread(target=run, name="trickle", daemon=True)
        self.thread.start()

    def stop(self) -> int:
        self.stop_flag.set()
        self.thread.join(60)
        assert not self.thread.is_alive(), "the background producer did not stop"
        if self.error is not None:
            raise self.error
        return self.sent


def test_a_second_worker_takes_partitions_over_and_the_first_one_dies(tmp_path):
    """Two workers of one group on one data dir (the shared-disk way of moving shards):
    B joins while A runs (a rebalance hands some shards from A to B), then A is killed -9
    and more events arrive (B takes A's shards over after the session timeout). The
    stores equal a run of one worker without any of this, and the examples are the same set.

    A has applied the whole first stream before B joins, and while the group rebalances new
    events arrive in partition 0 only: a worker takes a partition's shard (opens it, holding
    its RocksDB LOCK) when the partition is assigned, not on the partition's next record, so
    the worker without partition 0 holds its shards all the same. (The shards used to be
    opened on a first record: on a quiet machine A had consumed everything before B joined,
    no record came after the rebalance, and the test looked like a group that never settled.)"""
    from opengem.stream.broker import EmbeddedBroker

    with EmbeddedBroker(port=0, topics=TOPICS, partitions=4) as b:
        with EventProducer(b.bootstrap, "opengem.events", fmt="json") as prod:
            for batch in Simulator(SimConfig(seed=8)).batches(40_000):
                prod.send(batch)
        data, scratch = tmp_path / "d", tmp_path / "scratch"
        t0 = SimConfig().start_ts_ms
        a = start_worker(b.bootstrap, data, tmp_path / "a.log")
        wb = None
        trickle = None
        try:
            wait_until_applied(b.bootstrap, data, scratch / "a", a, timeout_s=180)
            assert held_shards(a.pid, data), "A holds no shard"
            trickle = Trickle(b.bootstrap, SimConfig(seed=9, start_ts_ms=t0 + 1_800_000), partitions={0})
            wb = start_worker(b.bootstrap, data, tmp_path / "b.log")
            # The rebalance: both workers hold shards (their RocksDB LOCK files) at once.
            deadline = time.monotonic() + 90
            while not (held_shards(a.pid, data) and held_shards(wb.pid, data)) and time.monotonic() < deadline:
                assert a.poll() is None, (tmp_path / "a.log").read_text()[-3000:]
                assert wb.poll() is None, (tmp_path / "b.log").read_text()[-3000:]
                time.sleep(0.1)
            shared = (held_shards(a.pid, data), held_shards(wb.pid, data))
            assert all(shared) and not shared[0] & shared[1], f"no rebalance seen: A, B hold {shared}"
            trickled = trickle.stop()
            trickle = None
            a.send_signal(signal.SIGKILL)
            a.wait()
            # More events after A's death, in every partition: only B is alive to store them,
            # so wait_until_applied below proves B took A's shards over.
            with EventProducer(b.bootstrap, "opengem.events", fmt="json") as prod:
                for batch in Simulator(SimConfig(seed=8, start_ts_ms=t0 + 3_600_000)).batches(10_000):
                    prod.send(batch)
            wait_until_applied(b.bootstrap, data, scratch / "final", wb, timeout_s=240)
            assert held_shards(wb.pid, data) == {f"p{p:04d}" for p in range(4)}
            time.sleep(2.0)  # let B's outbox drain
        finally:
            if trickle is not None:
                trickle.stop_flag.set()
            if wb is not None:
                stop(wb)
            if a.poll() is None:
                a.kill()
                a.wait()
        print(f"events trickled into partition 0 while B joined: {trickled}")

        records = [Record(m.partition, m.offset, m.value, m.key) for m in consume_all(b.bootstrap, "opengem.events")]
        records.sort(key=lambda r: (r.partition, r.offset))
        ref = Ingestor(tmp_path / "ref", cfg=IngestConfig(joiner=JOINER))
        ref_examples = []
        for i in range(0, len(records), 1000):
            ref_examples.extend(e for _, e in ref.process(records[i:i + 1000])[1])
        users_of: dict[int, set[int]] = {}
        for r in records:
            users_of.setdefault(r.partition, set()).add(json.loads(r.value)["user_id"])
        for p in range(4):
            s = SequenceStore(str(data / "shards" / "opengem.events" / f"p{p:04d}" / "store"))
            try:
                assert s.applied_offsets() == ref.shard(p).store.applied_offsets()
                for u in sorted(users_of.get(p, ())):
                    assert s.read(u).equals(ref.shard(p).store.read(u)), f"user {u} differs in partition {p}"
            finally:
                s.close()
        ref.close()
        got = {ex.example_id: ex for m in consume_all(b.bootstrap, "opengem.examples") for ex in decode_examples(m.value)}
        want = {ex.example_id: ex for ex in ref_examples}
        assert got.keys() == want.keys() and all(got[k] == want[k] for k in want)
