"""`opengem demo`: the whole system on one machine, with sane defaults.

Starts the embedded broker (or uses the configured cluster), then the parts as
components, shows a progress display and stops everything cleanly on Ctrl-C or
after ``--duration``. Each later part (stream worker, trainer, server) plugs in
as one more :class:`Component`.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter, deque
from typing import Protocol

from opengem.config import Config


class Component(Protocol):
    name: str

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def status(self) -> str: ...
    def failed(self) -> BaseException | None: ...


class _Thread:
    """A component that runs ``loop`` in a thread until stopped; errors are kept, not lost."""

    name = "thread"

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._err: BaseException | None = None
        self._t = threading.Thread(target=self._run, name=self.name, daemon=True)

    def _run(self) -> None:
        try:
            self.loop()
        except BaseException as e:  # noqa: BLE001 - surfaced by failed()
            self._err = e

    def loop(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        self._t.start()

    def stop(self) -> None:
        self._stop.set()
        self._t.join(timeout=30)

    def failed(self) -> BaseException | None:
        return self._err


class SimulatorSource(_Thread):
    """Simulator → opengem.events at ``rate`` events/s."""

    name = "simulator"

    def __init__(self, cfg: Config, bootstrap: str, rate: float, fmt: str):
        super().__init__()
        self.cfg, self.bootstrap, self.rate, self.fmt = cfg, bootstrap, rate, fmt
        self.sent = 0
        self.t0 = time.monotonic()

    def loop(self) -> None:
        from opengem.stream.producer import EventProducer, RateLimiter
        from opengem.stream.simulator import Simulator

        sim = Simulator(self.cfg.sim)
        limiter = RateLimiter(self.rate)
        batch = 2048 if self.rate == 0 or self.rate > 8192 else max(64, int(self.rate / 8))
        with EventProducer(self.bootstrap, self.cfg.kafka.events_topic, fmt=self.fmt) as prod:
            self.t0 = time.monotonic()
            if self.fmt == "arrow":
                source, send = sim.record_batches(None, batch_size=batch), prod.send_batch
            else:
                source, send = sim.batches(None, batch_size=batch), prod.send
            for evs in source:
                if self._stop.is_set():
                    break
                send(evs)
                self.sent = prod.events_sent
                limiter.wait(len(evs))

    def status(self) -> str:
        dt = max(time.monotonic() - self.t0, 1e-9)
        return f"simulator sent {self.sent:,} ({self.sent / dt:,.0f} ev/s)"


class WorkerProcess:
    """`opengem stream` as its own process, as it runs in production."""

    name = "stream worker"

    def __init__(self, cfg: Config, bootstrap: str, click_window_s: float, conversion_window_s: float,
                 rebuild: bool):
        import subprocess

        self._subprocess = subprocess
        self.cmd = [sys.executable, "-m", "opengem.cli", "stream", "--bootstrap", bootstrap,
                    "--data-dir", cfg.data_dir, "--click-window", str(click_window_s),
                    "--conversion-window", str(conversion_window_s)] + (["--rebuild"] if rebuild else [])
        self.log_path = f"{cfg.data_dir}/logs/stream.log"
        self.proc = None

    def start(self) -> None:
        import os

        os.makedirs(os.path.dirname(self.log_path), exist_ok=True)
        self._log = open(self.log_path, "ab")
        # Own process group: Ctrl-C reaches the demo, which stops the worker in order.
        self.proc = self._subprocess.Popen(self.cmd, stdout=self._log, stderr=self._log,
                                           stdin=self._subprocess.DEVNULL, start_new_session=True)

    def stop(self) -> None:
        import signal

        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except self._subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def failed(self) -> BaseException | None:
        if self.proc is not None and self.proc.poll() not in (None, 0):
            return RuntimeError(f"exited with code {self.proc.returncode}; see {self.log_path}")
        return None

    def status(self) -> str:
        return "worker up" if self.proc is not None and self.proc.poll() is None else "worker down"


# The demo's trainer settings (bench/train.py's freshness run uses the same): a version every
# 5 s, and negative downsampling -- every click, 10 % of the other examples weighted 10 (the
# model stays calibrated), lowered down to 1 % while the examples being trained are more than
# 10 s old -- so the tiny preset keeps up with the ~3-4k examples/s of 20k events/s on 2 cores.
TRAIN_FLAGS = ("--publish-every", "5", "--negative-rate", "0.1", "--max-delay", "10")


class TrainerProcess(WorkerProcess):
    """`opengem train` as its own process: learns from opengem.examples, publishes to <data>/models."""

    name = "trainer"

    def __init__(self, cfg: Config, bootstrap: str, preset: str, fresh: bool):
        import subprocess

        self._subprocess = subprocess
        self.cmd = [sys.executable, "-m", "opengem.cli", "train", "--bootstrap", bootstrap, "--data-dir",
                    cfg.data_dir, "--preset", preset, *TRAIN_FLAGS] + (["--fresh"] if fresh else [])
        self.log_path = f"{cfg.data_dir}/logs/train.log"
        self.models_dir = cfg.serve.models_path(cfg.data_dir)
        self.proc = None

    def published(self) -> dict | None:
        """meta.json of the version LATEST names (the registry's format), or None."""
        import json

        try:
            version = (self.models_dir / "LATEST").read_text().strip()
            return json.loads((self.models_dir / version / "meta.json").read_text())
        except (OSError, ValueError):
            return None

    def status(self) -> str:
        if self.proc is None or self.proc.poll() is not None:
            return "trainer down"
        meta = self.published()
        if meta is None:
            return "trainer up, no version yet"
        ne = (meta.get("progressive") or {}).get("click", {}).get("ne")
        return f"model v{meta['version']}" + (f" NE(click) {ne:.3f}" if isinstance(ne, float) and ne == ne else "")


class RankingServer:
    """`opengem serve` in the demo's process: gRPC on a free 127.0.0.1 port over the worker's shards."""

    name = "ranking server"

    def __init__(self, cfg: Config):
        import dataclasses

        self.cfg = dataclasses.replace(cfg, serve=dataclasses.replace(cfg.serve, port=0, metrics_port=-1))
        self.svc = None
        self.port = 0

    def start(self) -> None:
        from opengem.serving.server import Service

        self.svc = Service(self.cfg)
        self.port = self.svc.start().grpc_port

    def stop(self) -> None:
        if self.svc is not None:
            self.svc.stop()
            self.svc = None

    def failed(self) -> BaseException | None:
        return None

    def status(self) -> str:
        cur = self.svc.models.current if self.svc else None
        return f"serving {cur.loaded.version}" if cur else "server: no model yet"


def _rank_some(server: RankingServer, recent: list, n_requests: int = 3, n_ads: int = 8) -> None:
    """End of the demo: rank a few requests of recently seen users and print them."""
    import grpc

    from opengem.serving.client import RankClient, format_response
    from opengem.serving.models import ensure_model

    models_dir = server.cfg.serve.models_path(server.cfg.data_dir)
    published = ensure_model(models_dir, "base")
    if published:
        print(f"\nno model version was published yet: published an initial, UNTRAINED GEM (base preset) as "
              f"version {published} in {models_dir} so that serving has one; its scores are not meaningful")
    if server.svc.models.wait(60) is None:
        print("ranking server: no model could be loaded; see the log", file=sys.stderr)
        return
    ads = list(dict.fromkeys(ex.item_id for ex in reversed(recent)))[:n_ads] or list(range(1, n_ads + 1))
    users = list(dict.fromkeys((ex.user_id, ex.surface, ex.hour, ex.device) for ex in reversed(recent)))
    users = users[:n_requests] or [(1, server.cfg.surfaces[0], None, None)]
    now_ms = max((ex.ts for ex in recent), default=None)
    now_ms = now_ms + 1 if now_ms is not None else None
    with RankClient(f"127.0.0.1:{server.port}", timeout_s=30) as client:
        for user, surface, hour, device in users:
            # the simulated clock runs ahead of the wall clock: ask as of the latest event time seen
            ctx = {k: v for k, v in (("hour", hour), ("device", device), ("ts_ms", now_ms)) if v is not None}
            try:
                resp = client.rank(user, surface, ads, context=ctx)
            except grpc.RpcError as e:
                print(f"\nRank(user {user}) failed: {e.code().name}: {e.details()}", file=sys.stderr)
                continue
            print(f"\nRank(user {user}, {surface}, {len(ads)} ads seen in recent examples):")
            print(format_response(resp))


class EventMonitor(_Thread):
    """A consumer group on opengem.events that counts what flows, per surface and kind."""

    name = "monitor"

    def __init__(self, cfg: Config, bootstrap: str, embedded: bool):
        super().__init__()
        self.cfg, self.bootstrap, self.embedded = cfg, bootstrap, embedded
        self.by_surface: Counter[str] = Counter()
        self.by_kind: Counter[str] = Counter()
        self.records = 0
        self.events = 0
        self.bad = 0
        self.first_at: float | None = None
        self.t0 = time.monotonic()
        self.examples = 0
        self.example_ids: set[str] = set()
        self.labels: Counter[str] = Counter()  # examples by surface, clicks, conversions
        self.clicks_by_surface: Counter[str] = Counter()
        self.conversions_by_surface: Counter[str] = Counter()
        self.dlq: Counter[str] = Counter()
        self.recent: deque = deque(maxlen=256)  # last examples: the demo ranks for their users and ads

    def loop(self) -> None:
        from kafka import KafkaConsumer

        from opengem.stream.broker import consumer_timing
        from opengem.stream.events import EventError

        k = self.cfg.kafka
        c = KafkaConsumer(k.events_topic, k.examples_topic, k.dlq_topic, bootstrap_servers=self.bootstrap,
                          group_id="opengem-demo-monitor",
                          # a fresh embedded broker: read it all; a real cluster: from now on
                          auto_offset_reset="earliest" if self.embedded else "latest",
                          enable_auto_commit=True, client_id="opengem-demo-monitor",
                          **consumer_timing(self.embedded))
        try:
            while not self._stop.is_set():
                polled = c.poll(timeout_ms=200, max_records=2000)
                for tp, msgs in polled.items():
                    if tp.topic == k.examples_topic:
                        self._examples(msgs)
                        continue
                    if tp.topic == k.dlq_topic:
                        for m in msgs:
                            self.dlq[dict(m.headers).get("opengem-reason", b"?").decode()] += 1
                        continue
                    for m in msgs:
                        self.records += 1
                        try:
                            counts = self._count(m.value)
                        except EventError:
                            self.bad += 1
                            continue
                        if self.first_at is None:
                            self.first_at = time.monotonic() - self.t0
                        for (surface, kind), n in counts.items():
                            self.events += n
                            self.by_surface[surface] += n
                            self.by_kind[kind] += n
        finally:
            c.close()

    def _count(self, raw: bytes) -> Counter:
        """(surface, kind) -> events in one record; Arrow batches are counted column-wise."""
        from opengem.stream.codec import decode_arrow_columns, sniff
        from opengem.stream.events import parse_json

        if sniff(raw) == "json":
            return Counter((e.surface, e.kind) for e in parse_json(raw, surfaces=self.cfg.surfaces))
        batch, _ = decode_arrow_columns(raw, surfaces=self.cfg.surfaces)
        pairs = zip(batch.column("surface").to_pylist(), batch.column("kind").to_pylist())
        return Counter(pairs)

    def _examples(self, msgs) -> None:
        from opengem.stream.joiner import decode_examples

        for ex in (x for m in msgs for x in decode_examples(m.value)):
            if ex.example_id in self.example_ids:  # re-sent after a worker restart
                continue
            self.example_ids.add(ex.example_id)
            self.recent.append(ex)
            self.examples += 1
            self.labels[ex.surface] += 1
            self.clicks_by_surface[ex.surface] += ex.click
            self.conversions_by_surface[ex.surface] += ex.conversion

    def drain(self, target: int, timeout_s: float) -> None:
        """Wait until ``target`` events were consumed (or the timeout), so the summary is complete."""
        deadline = time.monotonic() + timeout_s
        while self.events < target and time.monotonic() < deadline and self._err is None:
            time.sleep(0.05)

    def status(self) -> str:
        dt = max(time.monotonic() - self.t0, 1e-9)
        return (f"consumed {self.events:,} ({self.events / dt:,.0f} ev/s) | examples {self.examples:,}"
                + (f" | dlq {sum(self.dlq.values()):,}" if self.dlq else ""))


class LiveMonitorProcess(WorkerProcess):
    """`opengem monitor` as its own process: funnel, live quality of the served version, lag."""

    name = "live monitor"

    def __init__(self, cfg: Config, bootstrap: str, metrics_port: int, score_fraction: float):
        import subprocess

        self._subprocess = subprocess
        self.cmd = [sys.executable, "-m", "opengem.cli", "monitor", "--bootstrap", bootstrap, "--data-dir",
                    cfg.data_dir, "--start", "earliest", "--metrics-port", str(metrics_port),
                    "--score-fraction", str(score_fraction)]
        self.log_path = f"{cfg.data_dir}/logs/monitor.log"
        self.proc = None

    def status(self) -> str:
        return "monitor up" if self.proc is not None and self.proc.poll() is None else "monitor down"


def _port(preferred: int) -> int:
    """``preferred`` if it is free on 127.0.0.1, else a free one (a second demo on one machine)."""
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
        except OSError:
            s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MetricsRecorder(_Thread):
    """Scrapes every daemon's /metrics every ``interval_s`` into the run's JSON timeline
    (``opengem report --run`` plots it; :mod:`opengem.ops.headline` defines what is kept)."""

    name = "metrics recorder"

    def __init__(self, targets: dict[str, str], path: str, interval_s: float = 2.0):
        super().__init__()
        self.targets, self.path, self.interval_s = targets, path, interval_s
        self.timeline: list = []

    def snapshot(self) -> None:
        from opengem.ops import headline

        snap, _ = headline.scrape(self.targets.values(), timeout_s=2.0)
        if snap:
            self.timeline.append((time.time(), snap))

    def loop(self) -> None:
        from opengem.ops.report import save_run

        while not self._stop.wait(self.interval_s):
            self.snapshot()
            save_run(self.path, self.timeline, {"targets": self.targets})

    def status(self) -> str:
        return f"{len(self.timeline)} metric snapshots"


def _ops_summary(recorder: MetricsRecorder, data_dir: str, conversion_window_s: float | None = None) -> None:
    """The headline metrics of the last snapshot, the run's JSON and its PNG report."""
    from opengem.ops import headline, report

    if not recorder.timeline:
        return
    report.save_run(recorder.path, recorder.timeline, {"targets": recorder.targets})
    print("\nheadline metrics (scraped from " + ", ".join(f"{k} :{v.rsplit(':', 1)[1]}"
                                                        for k, v in recorder.targets.items()) + "):")
    print(headline.format_headline(recorder.timeline[-1][1], now=recorder.timeline[-1][0]))
    if conversion_window_s:
        print(f"  (CTR and CVR of the examples closed so far: a clicked impression without a conversion closes "
              f"only when its {conversion_window_s:,.0f} s conversion window of event time has passed, a converted "
              "one at once: until a run has covered that much event time, CVR reads high)")
    if len(recorder.timeline) >= 2:
        png = report.render(recorder.timeline, f"{data_dir}/logs/demo-report.png", "opengem demo")
        print(f"metrics timeline: {recorder.path}; plots: {png} (opengem report --run {recorder.path})")


def _table(title: str, counts: Counter[str], total: int) -> str:
    lines = [f"  {title:<12}{'events':>12}{'share':>9}"]
    for k, n in counts.most_common():
        lines.append(f"  {k:<12}{n:>12,}{n / max(total, 1):>9.1%}")
    return "\n".join(lines)


def run_demo(cfg: Config, *, duration_s: float, rate: float, fmt: str, stop,
             click_window_s: float = 300, conversion_window_s: float = 7200, train_preset: str = "tiny") -> int:
    from opengem.stream.broker import EmbeddedBroker, ensure_topics, is_embedded, wait_for_kafka

    k = cfg.kafka
    topics = (k.events_topic, k.examples_topic, k.dlq_topic)
    broker = None
    tty = sys.stdout.isatty()
    t_start = time.monotonic()
    if k.bootstrap:
        wait_for_kafka(k.bootstrap)
        bootstrap, embedded = k.bootstrap, is_embedded(k.bootstrap)
        ensure_topics(bootstrap, topics, k.partitions, k.replication)
        print(f"opengem demo on Kafka cluster {bootstrap}")
    else:
        broker = EmbeddedBroker(port=k.embedded_port, topics=topics, partitions=k.partitions,
                                log_path=f"{cfg.data_dir}/logs/broker.log").start()
        bootstrap, embedded = broker.bootstrap, True
        print(f"opengem demo: embedded Kafka broker at {bootstrap} "
              f"(memory only; started in {time.monotonic() - t_start:.1f}s)")
    monitor = EventMonitor(cfg, bootstrap, embedded)
    # A fresh embedded broker is a new incarnation of the topics: its shards start over.
    worker = WorkerProcess(cfg, bootstrap, click_window_s, conversion_window_s, rebuild=embedded and broker is not None)
    source = SimulatorSource(cfg, bootstrap, rate, fmt)
    trainer = TrainerProcess(cfg, bootstrap, train_preset, fresh=embedded and broker is not None)
    server = RankingServer(cfg)
    # Metrics: every daemon on its default port when free; the demo process serves the server's.
    from opengem.ops import metrics as ops_metrics
    from opengem.ops.promserver import prepare as prepare_prometheus

    ports = {job: _port(p) for job, p in (("stream", 9101), ("train", 9102), ("monitor", 9104))}
    worker.cmd += ["--metrics-port", str(ports["stream"])]
    trainer.cmd += ["--metrics-port", str(ports["train"])]
    ports["serve"] = ops_metrics.serve(cfg.serve.metrics_port)
    live = LiveMonitorProcess(cfg, bootstrap, ports["monitor"], score_fraction=0.25)
    targets = {job: f"127.0.0.1:{ports[job]}" for job in ("stream", "train", "serve", "monitor")}
    recorder = MetricsRecorder(targets, f"{cfg.data_dir}/logs/demo-metrics.json")
    prom_cfg = prepare_prometheus(f"{cfg.data_dir}/prometheus", {f"opengem-{j}": [t] for j, t in targets.items()})
    print("metrics: " + ", ".join(f"{j} http://{t}/metrics" for j, t in targets.items())
          + f"; Prometheus config for this run: {prom_cfg}")
    components: list = [worker, trainer, live, monitor, source, server, recorder]
    rc = 0
    try:
        worker.start()
        trainer.start()
        live.start()
        # The one slow start-up step (torch + the model code, while the daemons load theirs): say so.
        t_srv = time.monotonic()
        print("starting the ranking server in this process (loading torch and the model code; "
              "the daemons load theirs meanwhile)…", flush=True)
        server.start()
        print(f"ranking server up on 127.0.0.1:{server.port} in {time.monotonic() - t_srv:.1f}s", flush=True)
        monitor.start()
        recorder.start()
        source.start()
        print(f"simulating {'as fast as possible' if rate == 0 else f'{rate:,.0f} events/s'} "
              f"({fmt} records) — {'Ctrl-C to stop' if duration_s == 0 else f'{duration_s:.0f}s, Ctrl-C to stop early'}")
        t0 = time.monotonic()
        last = 0.0
        while not stop:
            now = time.monotonic() - t0
            if duration_s and now >= duration_s:
                break
            for c in components:
                if c.failed() is not None:
                    raise RuntimeError(f"{c.name} failed: {c.failed()!r}") from c.failed()
            if now - last >= (0.5 if tty else 5.0):
                last = now
                line = f"[{now:6.1f}s] " + " | ".join(c.status() for c in components)
                print(("\r" + line) if tty else line, end="" if tty else "\n", flush=True)
            stop.sleep(0.1)
        if tty:
            print()
    except RuntimeError as e:
        print(f"\ndemo error: {e}", file=sys.stderr)
        rc = 1
    finally:
        # Stop in data-flow order: no new events, everything read back, the worker
        # finishes its batch and flushes its examples, the monitor sees them.
        source.stop()
        monitor.drain(source.sent, timeout_s=5.0)
        recorder.stop()
        recorder.snapshot()  # the last one, while every daemon still answers
        worker.stop()
        trainer.stop()  # trains what is left, checkpoints and publishes once more
        live.stop()
        time.sleep(1.0)
        monitor.stop()
        if broker is not None:
            broker.stop()
    total = monitor.events
    print(f"\nsummary: {source.sent:,} events produced, {total:,} consumed back through Kafka"
          + (f", first after {monitor.first_at:.1f}s" if monitor.first_at is not None else "")
          + (f", {monitor.bad} undecodable records" if monitor.bad else ""))
    if total:
        print(_table("surface", monitor.by_surface, total))
        print(_table("kind", monitor.by_kind, total))
    print(f"\nlabelled examples from the stream worker's joiner (click window {click_window_s:.0f}s, "
          f"conversion window {conversion_window_s:.0f}s of event time): {monitor.examples:,}")
    if monitor.examples:
        open_ = monitor.by_kind.get("impression", 0) - monitor.examples
        print(f"  (impressions still inside their window: {max(open_, 0):,}; clicked ones wait for the whole "
              "conversion window, so early figures under-count clicks and over-count conversions)")
        print(f"  {'surface':<12}{'examples':>10}{'CTR':>8}{'CVR':>8}")
        for surf, n in monitor.labels.most_common():
            c, v = monitor.clicks_by_surface[surf], monitor.conversions_by_surface[surf]
            print(f"  {surf:<12}{n:>10,}{c / n:>8.2%}{(v / c if c else 0):>8.2%}")
    if monitor.dlq:
        print("dead-lettered records: " + ", ".join(f"{r}={n}" for r, n in monitor.dlq.most_common()))
    meta = trainer.published()
    if meta is None:
        print(f"\ntrainer ({train_preset} preset): no model version published yet; see {trainer.log_path}")
    else:
        prog = meta.get("progressive") or {}
        figs = ", ".join(f"{t} NE {s_['ne']:.3f} AUC {s_['auc']:.3f} over the last {s_['n']:,}"
                         for t, s_ in prog.items() if s_.get("ne") == s_.get("ne"))
        newest = meta.get("trained_until_record_ts_ms") or 0
        age = (f" (its newest example entered Kafka {meta['created_at'] - newest / 1000:.1f} s before it was written)"
               if newest and "created_at" in meta else "")
        print(f"\ntrainer ({train_preset} preset): published version {meta['version']} after {meta['step']:,} steps "
              f"in {trainer.models_dir}{age}; progressive validation (scored before training): {figs or 'n/a'}")
    _ops_summary(recorder, cfg.data_dir, conversion_window_s)
    try:
        if rc == 0 and server.svc is not None:
            _rank_some(server, list(monitor.recent))
    finally:
        server.stop()
    print(f"stores: {cfg.data_dir}/shards  logs: {cfg.data_dir}/logs")
    return rc
