"""The live front half of opengem for trainer benchmarks: embedded broker + `opengem stream`.

Simulated events go to ``opengem.events`` (Arrow records, as the demo sends
them), the real stream worker (its own process) writes the shards and
produces the labelled examples; the benchmark then reads them back or points
a trainer at them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from opengem.config import Config, KafkaConfig


class Pipeline:
    def __init__(self, data_dir: Path, *, partitions: int = 2, click_window_s: float = 300,
                 conversion_window_s: float = 7200):
        self.data_dir = Path(data_dir)
        self.partitions = partitions
        self.windows = (click_window_s, conversion_window_s)
        self.broker: Any = None
        self.worker: subprocess.Popen | None = None
        self.cfg: Config | None = None

    def start(self) -> "Pipeline":
        from opengem.stream.broker import EmbeddedBroker

        k = KafkaConfig(partitions=self.partitions)
        self.broker = EmbeddedBroker(port=0, topics=(k.events_topic, k.examples_topic, k.dlq_topic),
                                     partitions=self.partitions).start()
        self.cfg = Config(data_dir=str(self.data_dir), kafka=KafkaConfig(bootstrap=self.broker.bootstrap,
                                                                         partitions=self.partitions))
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("OPENGEM_BOOTSTRAP", None)
        log = open(self.data_dir / "stream.log", "ab")
        self.worker = subprocess.Popen(
            [sys.executable, "-m", "opengem.cli", "stream", "--bootstrap", self.broker.bootstrap,
             "--data-dir", str(self.data_dir), "--click-window", str(self.windows[0]),
             "--conversion-window", str(self.windows[1]), "--metrics-port", "-1", "--rebuild"],
            stdout=log, stderr=subprocess.STDOUT, env=env)
        return self

    @property
    def bootstrap(self) -> str:
        return self.broker.bootstrap

    def examples_end(self) -> int:
        from opengem.stream.broker import high_watermarks

        return sum(high_watermarks(self.bootstrap, self.cfg.kafka.examples_topic).values())

    def wait_settled(self, quiet_s: float = 4.0, timeout_s: float = 300.0) -> int:
        """Wait until the examples topic stopped growing for ``quiet_s``; returns its record count."""
        deadline = time.monotonic() + timeout_s
        last, since = -1, time.monotonic()
        while time.monotonic() < deadline:
            if self.worker.poll() is not None:
                raise RuntimeError(f"stream worker exited: see {self.data_dir / 'stream.log'}")
            n = self.examples_end()
            if n != last:
                last, since = n, time.monotonic()
            elif n and time.monotonic() - since >= quiet_s:
                return n
            time.sleep(0.5)
        raise TimeoutError("the examples topic did not settle")

    def iter_examples(self):
        """(partition, offset, index in record, example) of every record in the topic, re-sends included."""
        from kafka import KafkaConsumer, TopicPartition

        from opengem.stream.broker import high_watermarks
        from opengem.stream.joiner import decode_examples

        topic = self.cfg.kafka.examples_topic
        hw = high_watermarks(self.bootstrap, topic)
        c = KafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False, group_id=None)
        tps = [TopicPartition(topic, p) for p in sorted(hw)]
        c.assign(tps)
        c.seek_to_beginning(*tps)
        pos = {p: 0 for p in hw}
        try:
            while any(pos[p] < hw[p] for p in hw):
                for tp, msgs in c.poll(timeout_ms=500).items():
                    for m in msgs:
                        pos[tp.partition] = m.offset + 1
                        for i, ex in enumerate(decode_examples(m.value)):
                            yield tp.partition, m.offset, i, ex
        finally:
            c.close()

    def read_examples(self) -> list:
        """Every distinct example in the topic."""
        seen: set[str] = set()
        out = []
        for _, _, _, ex in self.iter_examples():
            if ex.example_id not in seen:
                seen.add(ex.example_id)
                out.append(ex)
        return out

    def stop(self) -> None:
        import signal

        if self.worker is not None and self.worker.poll() is None:
            self.worker.send_signal(signal.SIGINT)
            try:
                self.worker.wait(30)
            except subprocess.TimeoutExpired:
                self.worker.kill()
        if self.broker is not None:
            self.broker.stop()


def produce(bootstrap: str, sim: Any, n_events: int | None, *, rate: float = 0, stop: Any = None,
            on_batch: Any = None) -> int:
    """Simulator -> opengem.events as Arrow records (the demo's format); returns the max event ts sent.

    ``on_batch(max_ts)`` runs after each batch (probes); ``stop()`` ends an infinite stream.
    """
    import pyarrow.compute as pc

    from opengem.stream.producer import EventProducer, RateLimiter

    limiter = RateLimiter(rate)
    max_ts = 0
    with EventProducer(bootstrap, fmt="arrow") as prod:
        for rb in sim.record_batches(n_events, batch_size=2048 if rate == 0 or rate > 8192 else max(64, int(rate / 8))):
            prod.send_batch(rb)
            max_ts = max(max_ts, int(pc.max(rb.column("ts")).as_py()))
            if on_batch is not None:
                on_batch(max_ts)
            limiter.wait(rb.num_rows)
            if stop is not None and stop():
                break
        prod.flush()
    return max_ts
