"""The `opengem` command: one console script, one subcommand per daemon or tool."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from typing import Any, Sequence

from opengem import config as cfgmod


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML configuration file (unknown keys are errors)")
    p.add_argument("--bootstrap", help="Kafka bootstrap servers host:port[,host:port]; "
                   "default: the embedded broker (env OPENGEM_BOOTSTRAP)")
    p.add_argument("--data-dir", help="state directory (default ./data, env OPENGEM_DATA_DIR)")
    p.add_argument("-v", "--verbose", action="store_true")


def _load(args: argparse.Namespace, **extra) -> cfgmod.Config:
    return cfgmod.load(args.config, **{"kafka.bootstrap": args.bootstrap, "data_dir": args.data_dir}, **extra)


class Stop:
    """Ctrl-C / SIGTERM → a flag long loops check, so every command stops cleanly."""

    def __init__(self) -> None:
        self.event = threading.Event()
        signal.signal(signal.SIGINT, self._handle)
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        if self.event.is_set():  # second Ctrl-C: leave now
            raise KeyboardInterrupt
        print("\nstopping… (Ctrl-C again to force)", file=sys.stderr, flush=True)
        self.event.set()

    def __bool__(self) -> bool:
        return self.event.is_set()

    def sleep(self, s: float) -> bool:
        return self.event.wait(s)


def cmd_broker(args: argparse.Namespace) -> int:
    from opengem.stream.broker import EmbeddedBroker

    cfg = _load(args)
    k = cfg.kafka
    stop = Stop()
    port = args.port if args.port is not None else k.embedded_port
    with EmbeddedBroker(port=port, topics=(k.events_topic, k.examples_topic, k.dlq_topic),
                        partitions=k.partitions, state_dir=cfg.data_dir,
                        log_path=f"{cfg.data_dir}/logs/broker.log") as b:
        print(f"embedded Kafka broker (Tansu, memory only) at {b.bootstrap}; topics "
              f"{k.events_topic}, {k.examples_topic}, {k.dlq_topic} × {k.partitions} partitions", flush=True)
        print("other opengem commands with the same --data-dir use it; Ctrl-C stops it "
              "(its topics are kept in memory only and are lost)", flush=True)
        while not stop.sleep(0.5):
            if b.proc is None or b.proc.poll() is not None:
                print("embedded broker exited unexpectedly", file=sys.stderr)
                return 1
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    import dataclasses

    from opengem.stream.simulator import Simulator

    cfg = _load(args)
    sim_cfg = cfg.sim
    if args.seed is not None:
        sim_cfg = dataclasses.replace(sim_cfg, seed=args.seed)
    sim = Simulator(sim_cfg)
    if args.parquet:
        n = sim.to_parquet(args.parquet, args.events or 100_000)
        print(f"wrote {n} events to {args.parquet}")
        return 0
    from opengem.stream.broker import resolve_bootstrap
    from opengem.stream.producer import EventProducer, RateLimiter

    bootstrap, _ = resolve_bootstrap(cfg.kafka.bootstrap, cfg.data_dir)
    stop = Stop()
    limiter = RateLimiter(args.rate)
    t0 = time.monotonic()
    last = t0
    with EventProducer(bootstrap, cfg.kafka.events_topic, fmt=args.format) as prod:
        if args.format == "arrow":  # columnar all the way: no Python object per event
            source = sim.record_batches(args.events or None, batch_size=args.batch)
            send = prod.send_batch
        else:
            source = sim.batches(args.events or None, batch_size=args.batch)
            send = prod.send
        for batch in source:
            send(batch)
            limiter.wait(len(batch))
            now = time.monotonic()
            if now - last >= 2:
                last = now
                print(f"  {prod.events_sent:>12,} events  {prod.events_sent / (now - t0):>10,.0f} ev/s", flush=True)
            if stop:
                break
        prod.flush()
    dt = time.monotonic() - t0
    print(f"sent {prod.events_sent:,} events in {prod.records_sent:,} records to {cfg.kafka.events_topic} "
          f"at {bootstrap} in {dt:.1f}s ({prod.events_sent / max(dt, 1e-9):,.0f} ev/s)")
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from opengem.stream.broker import resolve_bootstrap
    from opengem.stream.producer import EventProducer
    from opengem.stream.replay import parse_mapping, replay_file

    cfg = _load(args)
    mapping = parse_mapping(args.mapping)
    if args.dry_run:
        sent = [0]

        def send(evs):
            sent[0] += len(evs)
        prod = None
    else:
        bootstrap, _ = resolve_bootstrap(cfg.kafka.bootstrap, cfg.data_dir)
        prod = EventProducer(bootstrap, cfg.kafka.events_topic, fmt=args.format)
        send = prod.send

    def progress(rep) -> None:
        print(f"  rows {rep.rows:,}  events {rep.events:,}  bad rows {rep.bad_rows:,}", flush=True)

    try:
        report = replay_file(args.file, mapping, send, progress=progress, surfaces=cfg.surfaces)
    finally:
        if prod is not None:
            prod.close()
    print(f"replayed {args.file}: {report.rows:,} rows → {report.events:,} events; "
          f"{report.bad_rows:,} bad rows skipped")
    if report.bad_rows:
        print("  reasons: " + ", ".join(f"{r}={n}" for r, n in report.reasons.most_common()))
        for row, msg in report.first_errors:
            print(f"  row {row}: {msg}")
    return 0


def cmd_stream(args: argparse.Namespace) -> int:
    import dataclasses

    from opengem.stream.broker import ensure_topics, resolve_bootstrap, topic_id
    from opengem.stream.ingest import bind_topic, wipe
    from opengem.stream.joiner import JoinerConfig
    from opengem.stream.worker import WorkerConfig, run_worker

    cfg = _load(args)
    k = cfg.kafka
    bootstrap, embedded = resolve_bootstrap(k.bootstrap, cfg.data_dir)
    ensure_topics(bootstrap, (k.events_topic, k.examples_topic, k.dlq_topic), k.partitions, k.replication)
    wcfg = WorkerConfig(metrics_port=None if args.metrics_port < 0 else args.metrics_port,
                        examples_format=args.examples_format)
    if args.click_window or args.conversion_window:
        j = wcfg.ingest.joiner
        j = dataclasses.replace(j, click_window_ms=int((args.click_window or j.click_window_ms / 1000) * 1000),
                                conversion_window_ms=int((args.conversion_window or j.conversion_window_ms / 1000) * 1000))
        wcfg = dataclasses.replace(wcfg, ingest=dataclasses.replace(wcfg.ingest, joiner=j))
    if args.rebuild:
        wipe(cfg.data_dir, k.events_topic)
    bind_topic(cfg.data_dir, k.events_topic, topic_id(bootstrap, k.events_topic))
    print(f"opengem stream worker: {k.events_topic} at {bootstrap} → shards in {cfg.data_dir}/shards", flush=True)
    run_worker(cfg, bootstrap, embedded, wcfg, loglevel="info" if args.verbose else "warning")
    return 0


def cmd_compact(args: argparse.Namespace) -> int:
    """Offline maintenance of the worker's shards: merge tails, pack short ones, rewrite the bottom level."""
    import dataclasses
    from pathlib import Path

    from opengem.features.store import SequenceStore
    from opengem.stream.ingest import IngestConfig

    cfg = _load(args)
    root = Path(cfg.data_dir) / "shards" / cfg.kafka.events_topic
    paths = sorted(root.glob("p[0-9]*/store"))
    if not paths:
        print(f"no shards under {root}: nothing to compact (is --data-dir the stream worker's?)", file=sys.stderr)
        return 2
    store_cfg = dataclasses.replace(IngestConfig().store, surfaces=tuple(cfg.surfaces))
    total_events = total_before = total_after = 0
    for path in paths:
        t0 = time.monotonic()
        try:
            s = SequenceStore(str(path), store_cfg)
        except Exception as e:  # rocksdict raises a bare Exception for a held LOCK
            if "lock" in str(e).lower():
                print(f"{path}: held by a running process (its RocksDB LOCK): stop the stream worker of "
                      f"this shard first; compaction rewrites the store and needs to be its only writer",
                      file=sys.stderr)
                return 2
            raise
        try:
            before = s.disk_bytes()["sequences"]
            s.compact()
            after = s.disk_bytes()["sequences"]
            n = int(s.user_features(s.user_ids()).n_stored.sum())
        finally:
            s.close()
        total_events += n
        total_before += before
        total_after += after
        per = f"{after / n:.2f} bytes/event" if n else "empty"
        print(f"{path.parent.name}: {n:,} events, SST {before / 1e6:.2f} -> {after / 1e6:.2f} MB ({per}) "
              f"in {time.monotonic() - t0:.1f}s", flush=True)
    if total_events:
        print(f"total: {total_events:,} events in {len(paths)} shards, {total_after / total_events:.2f} bytes/event "
              f"(SST before {total_before / 1e6:.2f} MB, not counting what was still in memtables/WAL)")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    import dataclasses

    from opengem.model.trainer import run_trainer
    from opengem.stream.broker import resolve_bootstrap

    cfg = _load(args)
    flags = {"preset": args.preset, "model": args.model, "batch_size": args.batch_size,
             "checkpoint_every_s": args.checkpoint_every, "checkpoint_every_steps": args.checkpoint_every_steps,
             "publish_every_s": args.publish_every, "publish_every_steps": args.publish_every_steps,
             "metrics_port": args.metrics_port, "device": args.device, "negative_rate": args.negative_rate,
             "max_delay_s": args.max_delay}
    changed = {k: v for k, v in flags.items() if v is not None}
    if args.metrics_port is not None and args.metrics_port < 0:
        changed["metrics_port"] = None
    tcfg = dataclasses.replace(cfg.train, **changed)
    if args.student is not None and args.student not in cfg.surfaces:
        raise ValueError(f"--student {args.student!r}: not a surface of this deployment {list(cfg.surfaces)}")
    bootstrap, _ = resolve_bootstrap(cfg.kafka.bootstrap, cfg.data_dir)
    stop = Stop()
    stats = run_trainer(cfg, tcfg, bootstrap, stop=lambda: bool(stop), fresh=args.fresh,
                        max_examples=args.max_examples, idle_exit_s=args.idle_exit, student=args.student)
    sampled = f" (+{stats.sampled_out:,} negatives sampled out)" if stats.sampled_out else ""
    print(f"trainer stopped: {stats.steps:,} steps, {stats.examples:,} examples{sampled}, version "
          f"{stats.published or '-'}, checkpoint {stats.checkpoint or '-'}", flush=True)
    return 0


def _secret(path: str | None, env: str) -> str | None:
    """A secret from a file (never from the command line, which `ps` shows) or the environment."""
    import os

    if path:
        with open(path) as f:
            return f.read().strip() or None
    return os.environ.get(env) or None


def cmd_serve(args: argparse.Namespace) -> int:
    from opengem.serving.server import Service

    cfg = _load(args, **{"serve.host": args.host, "serve.port": args.port, "serve.http_port": args.http_port,
                         "serve.models_dir": args.models_dir})
    if args.student:
        import dataclasses

        models = {**cfg.serve.models, **{s: "student" for s in args.student}}
        cfg = dataclasses.replace(cfg, serve=dataclasses.replace(cfg.serve, models=models))
    tls = None
    if args.tls_cert or args.tls_key:
        if not (args.tls_cert and args.tls_key):
            raise ValueError("--tls-cert and --tls-key go together")
        with open(args.tls_key, "rb") as k, open(args.tls_cert, "rb") as c:
            tls = (k.read(), c.read())
    if args.processes is not None:
        import dataclasses

        cfg = dataclasses.replace(cfg, serve=dataclasses.replace(cfg.serve, processes=args.processes))
    mport = args.metrics_port if args.metrics_port is not None else cfg.serve.metrics_port
    from opengem.serving.processes import CHILD_ENV

    child = bool(os.environ.get(CHILD_ENV))
    if cfg.serve.processes > 1 and not child:
        return _serve_processes(cfg, mport, args.argv[args.argv.index("serve") + 1:])
    stop = Stop()
    parent = os.getppid()
    svc = Service(cfg, token=_secret(args.token_file, "OPENGEM_SERVE_TOKEN"), tls=tls, reuse_port=child)
    ends = svc.start(metrics_port=None if mport < 0 else mport)
    cur = svc.models.current
    print(f"opengem serve: gRPC {'(TLS) ' if tls else ''}on {cfg.serve.host}:{ends.grpc_port}"
          + (f", JSON on http://{cfg.serve.host}:{ends.http_port}/v1/rank" if ends.http_port else "")
          + (f", metrics on :{svc.metrics_port}" if svc.metrics_port else "")
          + f"; model {cur.loaded.version + ' (' + cur.loaded.kind + ')' if cur else 'none yet'} "
          f"from {svc.models.models_dir}"
          + "".join(f"; {s}: student {m.current.loaded.version if m.current else 'none yet'} from {m.models_dir}"
                    for s, m in svc.students.items()), flush=True)
    try:
        while not stop.sleep(0.5):
            if child and os.getppid() != parent:  # the supervisor is gone (killed): do not serve on alone
                break
    finally:
        svc.stop()
    return 0


def _serve_processes(cfg: Any, metrics_port: int, argv: list[str]) -> int:
    """``[serve] processes`` > 1: supervise that many `opengem serve` children on one port;
    ``argv``: this command's arguments after ``serve``, which the children get too."""
    from opengem.serving.processes import Supervisor

    sc = cfg.serve
    stop = Stop()
    lock = threading.Lock()

    def echo(line: str) -> None:  # whole lines: the children's relays write from their own threads
        with lock:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    sup = Supervisor(argv, sc.processes, sc.host, sc.port, sc.http_port, metrics_port, echo=echo)
    try:
        sup.start()
        echo(f"opengem serve: {sc.processes} processes, gRPC on {sc.host}:{sup.port}"
             + (f", JSON on http://{sc.host}:{sup.http_port}/v1/rank" if sup.http_port >= 0 else "")
             + (f", metrics (all processes) on :{sup.metrics_port}" if sup.metrics_port else ""))
        while not stop.sleep(0.5):
            sup.check()
    finally:
        sup.stop()
    return 0


def cmd_rank(args: argparse.Namespace) -> int:
    import json

    import grpc

    from opengem.serving.client import RankClient, format_response, response_dict

    cands: list = [int(a) for a in args.ads.split(",") if a.strip()] if args.ads else []
    if args.candidates:
        with open(args.candidates) as f:
            cands += json.load(f)
    ctx = {k: v for k, v in (("hour", args.hour), ("device", args.device), ("country", args.country),
                             ("ts_ms", args.ts_ms)) if v is not None}
    ca = None
    if args.tls_ca:
        with open(args.tls_ca, "rb") as f:
            ca = f.read()
    with RankClient(args.target, token=_secret(args.token_file, "OPENGEM_SERVE_TOKEN"), root_certificates=ca,
                    timeout_s=args.timeout) as client:
        try:
            resp = client.rank(args.user, args.surface, cands, context=ctx, value_task=args.value_task or "")
        except grpc.RpcError as e:
            print(f"opengem rank: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    print(json.dumps(response_dict(resp), indent=1) if args.json else format_response(resp))
    return 0


def cmd_monitor(args: argparse.Namespace) -> int:
    from opengem.ops.live import run_monitor
    from opengem.stream.broker import resolve_bootstrap

    cfg = _load(args, **{"monitor.score_fraction": args.score_fraction})
    bootstrap, _ = resolve_bootstrap(cfg.kafka.bootstrap, cfg.data_dir)
    stop = Stop()
    mon = run_monitor(cfg, bootstrap, stop=lambda: bool(stop), start=args.start, idle_exit_s=args.idle_exit,
                      metrics_port=args.metrics_port, echo=lambda s: print(s, flush=True))
    print(f"monitor stopped: {mon.counts['examples']:,} examples, {mon.counts['scored']:,} scored", flush=True)
    return 0


def cmd_metrics(args: argparse.Namespace) -> int:
    from opengem.ops import headline

    if args.prometheus:
        snap, down = headline.from_prometheus(args.prometheus), []
        where = args.prometheus
    else:
        targets = args.targets.split(",") if args.targets else list(headline.DEFAULT_TARGETS)
        snap, down = headline.scrape(targets)
        where = ", ".join(targets)
    print(f"opengem headline metrics from {where}:")
    print(headline.format_headline(snap, down=down))
    return 0 if snap else 1


def cmd_report(args: argparse.Namespace) -> int:
    import time

    from opengem.ops import headline, report

    if bool(args.run) == bool(args.prometheus):
        raise ValueError("give exactly one of --run FILE or --prometheus URL")
    if args.run:
        timeline, title = report.load_run(args.run), f"opengem run {args.run}"
    else:
        end = time.time()
        timeline = headline.timeline_from_prometheus(args.prometheus, end - args.since, end, args.step)
        title = f"opengem, last {args.since:,.0f} s from {args.prometheus}"
    out = report.render(timeline, args.out, title)
    print(f"wrote {out} ({len(timeline)} snapshots)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from opengem.demo import run_demo

    cfg = _load(args)
    return run_demo(cfg, duration_s=args.duration, rate=args.rate, fmt=args.format, stop=Stop(),
                    click_window_s=args.click_window, conversion_window_s=args.conversion_window,
                    train_preset=args.train_preset)


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Train models on one window of a stream, score them on the next (model/evaluate.py)."""
    import dataclasses

    import torch

    from opengem.model import evaluate as ev
    from opengem.model.config import preset
    from opengem.model.trainer import quiet_torchrec

    quiet_torchrec()
    torch.set_num_threads(args.threads)
    cfg = _load(args)
    features = dataclasses.replace(preset(args.preset).features, surfaces=tuple(cfg.surfaces))
    max_len = args.max_len or preset(args.preset).pyramid.max_len
    sources = sum(x is not None for x in (args.parquet, args.replay))
    if sources > 1:
        raise ValueError("give at most one of --parquet / --replay (default: the simulator)")
    if args.replay is not None and not args.mapping:
        raise ValueError("--replay needs --mapping (as for opengem replay)")
    n_events = args.events or 600_000
    dcfg = ev.DatasetConfig(
        events=n_events, test_events=args.test_events or max(1, n_events // 4), sim_seed=args.sim_seed,
        click_window_s=args.click_window, conversion_window_s=args.conversion_window, max_len=max_len,
        negative_rate=args.negative_rate, test_negative_rate=args.test_negative_rate, sample_seed=args.sample_seed,
        batch_size=args.batch_size)
    if args.replay is not None:
        source = ev.replay_source(args.replay, args.mapping, args.test_fraction, features.surfaces)
    elif args.parquet is not None:
        source = ev.parquet_source(args.parquet, args.test_fraction)
    else:
        source = ev.simulator_source(dcfg, surfaces=features.surfaces)
    known = ev.standard_models(args.preset, features) | ev.scaling_models(args.preset, features, max_len)
    names = [m for m in args.models.split(",") if m]
    unknown = [m for m in names if m not in known]
    if unknown:
        raise ValueError(f"unknown models {unknown}; known: {', '.join(sorted(known))}")
    work = args.work or f"{cfg.data_dir}/evaluate"
    ev.run_evaluation(source, dcfg, [known[m] for m in names], work, seed=args.seed,
                      json_out=args.json or f"{work}/results.json", plot_out=args.plot or f"{work}/curves.png",
                      baseline=names[1] if len(names) > 1 and known[names[1]].kind != "gem" else "dlrm",
                      label=args.label, force=args.force, echo=lambda s: print(s, flush=True))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="opengem", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("broker", help="run the embedded Kafka broker (Tansu) on 127.0.0.1")
    _common(p)
    p.add_argument("--port", type=int, help="listen port (default: a free one)")
    p.set_defaults(func=cmd_broker)

    p = sub.add_parser("simulate", help="produce simulated events to Kafka, or to Parquet")
    _common(p)
    p.add_argument("--events", type=int, default=0, help="number of events (0: until Ctrl-C)")
    p.add_argument("--rate", type=float, default=0, help="events/s (0: as fast as possible)")
    p.add_argument("--format", choices=("json", "arrow"), default="json",
                   help="json: one event per record; arrow: one columnar batch per record and partition")
    p.add_argument("--batch", type=int, default=4096, help="events per simulator batch")
    p.add_argument("--seed", type=int)
    p.add_argument("--parquet", help="write the stream to this Parquet file instead of Kafka")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("replay", help="push a Parquet/CSV interaction log into opengem.events")
    _common(p)
    p.add_argument("file")
    p.add_argument("--mapping", required=True,
                   help='column mapping, e.g. "user=uid,item=ad_id,time=ts,time_unit=s,click=clicked,'
                        'surface=placement,attr.country=geo"')
    p.add_argument("--format", choices=("json", "arrow"), default="arrow")
    p.add_argument("--dry-run", action="store_true", help="parse and validate only")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("stream", help="run the Faust stream worker: store, DLQ, label joiner")
    _common(p)
    p.add_argument("--click-window", type=float, help="click attribution window in seconds of event time (default 1800)")
    p.add_argument("--conversion-window", type=float,
                   help="conversion window after the click, seconds of event time (default 86400)")
    p.add_argument("--metrics-port", type=int, default=9101,
                   help="Prometheus metrics on 127.0.0.1:PORT/metrics (a free port if taken; -1: off)")
    p.add_argument("--rebuild", action="store_true",
                   help="delete this worker's shards first; they are rebuilt from the topic")
    p.add_argument("--examples-format", choices=("arrow", "json"), default="arrow",
                   help="records sent to the examples topic: Arrow IPC batches (default) or JSON arrays")
    p.set_defaults(func=cmd_stream)

    p = sub.add_parser("compact", help="compact the stream worker's shards offline (worker stopped): merge and "
                                       "pack tails, recompress; prints bytes per stored event")
    _common(p)
    p.set_defaults(func=cmd_compact)

    p = sub.add_parser("train", help="run the continuous trainer (also under torchrun --nproc_per_node=N)")
    _common(p)
    p.add_argument("--model", choices=("gem", "dlrm", "dcn"), help="model kind (default gem)")
    p.add_argument("--preset", choices=("tiny", "base", "large"), help="GEM preset (default base)")
    p.add_argument("--batch-size", type=int, help="examples per step and rank (default 256)")
    p.add_argument("--checkpoint-every", type=float, help="seconds between checkpoints (default 60; 0: off)")
    p.add_argument("--checkpoint-every-steps", type=int, help="steps between checkpoints (0: off)")
    p.add_argument("--publish-every", type=float, help="seconds between published versions (default 10; 0: off)")
    p.add_argument("--publish-every-steps", type=int, help="steps between published versions (0: off)")
    p.add_argument("--metrics-port", type=int,
                   help="Prometheus on 127.0.0.1:PORT+rank (default 9102; a free port if taken; -1: off)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--negative-rate", type=float,
                   help="train every positive and this fraction of the negatives, weighted 1/rate so predictions "
                        "stay calibrated (default 1: all)")
    p.add_argument("--max-delay", type=float,
                   help="adaptive rate: lower it while trained examples are older than this many seconds "
                        "(default 0: fixed rate)")
    p.add_argument("--fresh", action="store_true",
                   help="discard the checkpoints and start a new model (needed after the examples topic was "
                        "created again, e.g. a restarted embedded broker)")
    p.add_argument("--max-examples", type=int, help="stop after this many examples (per rank)")
    p.add_argument("--idle-exit", type=float, help="stop once no example came for this many seconds")
    p.add_argument("--student", metavar="SURFACE",
                   help="student mode: train the small per-surface model of SURFACE from the published GEM "
                        "(distillation, adapter, representations, shared tables: [train.student]); versions go "
                        "to <data-dir>/students/SURFACE")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("serve", help="run the gRPC ranking server (127.0.0.1 by default)")
    _common(p)
    p.add_argument("--host", help="bind address (default 127.0.0.1; others need a bearer token)")
    p.add_argument("--port", type=int, help="gRPC port (default 50051; 0: a free one)")
    p.add_argument("--http-port", type=int, help="also serve JSON on POST /v1/rank (default off; 0: a free port)")
    p.add_argument("--metrics-port", type=int, help="Prometheus port (default 9103; -1: off)")
    p.add_argument("--models-dir", help="published model versions (default <data-dir>/models)")
    p.add_argument("--token-file", help="file holding the bearer token clients must send "
                   "(default: env OPENGEM_SERVE_TOKEN; none: no token)")
    p.add_argument("--tls-cert", help="PEM certificate chain: serve TLS")
    p.add_argument("--tls-key", help="PEM private key of --tls-cert")
    p.add_argument("--student", action="append", metavar="SURFACE",
                   help="serve SURFACE with its student (<data-dir>/students/SURFACE) instead of GEM; repeatable "
                        "(as [serve] models = {SURFACE = \"student\"})")
    p.add_argument("--processes", type=int,
                   help="server processes on the one port (SO_REUSEPORT, supervised; default [serve] processes, 1): "
                        "one runs about one request at a time, and a client channel stays on one process")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("rank", help="send one Rank request to a server and print the ranking")
    p.add_argument("--target", default="127.0.0.1:50051", help="server host:port")
    p.add_argument("--user", type=int, required=True, help="user id")
    p.add_argument("--surface", required=True)
    p.add_argument("--ads", help="comma-separated ad ids")
    p.add_argument("--candidates", help='JSON file: a list of ids or {"ad_id": …, "bid": …, "ad_format": …}')
    p.add_argument("--hour", type=int)
    p.add_argument("--device")
    p.add_argument("--country")
    p.add_argument("--ts-ms", type=int, help="request time (default: the server's clock)")
    p.add_argument("--value-task", help="value = bid x P(task) (default: the server's)")
    p.add_argument("--token-file", help="bearer token file (default: env OPENGEM_SERVE_TOKEN)")
    p.add_argument("--tls-ca", help="PEM root certificate: connect with TLS")
    p.add_argument("--timeout", type=float, default=5.0, help="deadline in seconds")
    p.add_argument("--json", action="store_true", help="print the response as JSON")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=cmd_rank)

    p = sub.add_parser("monitor", help="conversion funnel + live quality of the served model + consumer lag "
                       "(Prometheus on 127.0.0.1:9104)")
    _common(p)
    p.add_argument("--metrics-port", type=int, help="Prometheus port (default 9104; a free port if taken; -1: off)")
    p.add_argument("--start", choices=("latest", "earliest"),
                   help="where to start without committed offsets (default [monitor] start: latest)")
    p.add_argument("--score-fraction", type=float,
                   help="fraction of the examples scored with the served model (default 1; the funnel counts all)")
    p.add_argument("--idle-exit", type=float, help="stop once no example came for this many seconds")
    p.set_defaults(func=cmd_monitor)

    p = sub.add_parser("metrics", help="print the headline metrics of the running daemons")
    p.add_argument("--targets", help="comma-separated host:port metrics endpoints "
                   "(default 127.0.0.1:9101,9102,9103,9104: stream, train, serve, monitor)")
    p.add_argument("--prometheus", help="query this Prometheus server instead, e.g. http://127.0.0.1:9090")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=cmd_metrics)

    p = sub.add_parser("report", help="render a run's conversion and quality metrics as a PNG")
    p.add_argument("--run", help="a run's metrics JSON (opengem demo writes <data-dir>/logs/demo-metrics.json)")
    p.add_argument("--prometheus", help="or a Prometheus server's URL, e.g. http://127.0.0.1:9090")
    p.add_argument("--since", type=float, default=3600, help="with --prometheus: seconds back from now (default 3600)")
    p.add_argument("--step", type=float, default=15, help="with --prometheus: seconds between points (default 15)")
    p.add_argument("-o", "--out", default="opengem-report.png", help="PNG file to write")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("demo", help="start the whole system on the embedded broker and show it working")
    _common(p)
    p.add_argument("--duration", type=float, default=60, help="seconds to run (0: until Ctrl-C)")
    p.add_argument("--rate", type=float, default=20_000, help="simulated events/s (0: as fast as possible)")
    p.add_argument("--format", choices=("json", "arrow"), default="arrow")
    p.add_argument("--click-window", type=float, default=300,
                   help="click attribution window, seconds of event time (demo default 300: the simulated "
                        "clock runs ~200x faster than the wall clock at 20k events/s)")
    p.add_argument("--conversion-window", type=float, default=7200,
                   help="conversion window after the click, seconds of event time (demo default 7200)")
    p.add_argument("--train-preset", choices=("tiny", "base", "large"), default="tiny",
                   help="GEM preset of the demo's trainer (tiny: keeps up with the demo's stream on 2 CPU cores)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("evaluate", help="train models on one window of a stream, score them on the next: NE, "
                                        "AUC, calibration per surface and task (+ oracle NE on simulator data)")
    _common(p)
    p.add_argument("--models", default="gem,dlrm,dcn",
                   help="comma-separated: gem, dlrm, dcn, gem_no_sequence, gem_short_history, gem_no_pyramid, "
                        "gem_no_interleave, gem_shared_head, gem_size_s, gem_size_l, gem_hist_500, gem_hist_<max-len>")
    p.add_argument("--preset", choices=("tiny", "base", "large"), default="base", help="GEM preset (and tables)")
    p.add_argument("--events", type=int, help="simulator events in the train + test windows (default 600k)")
    p.add_argument("--test-events", type=int, help="the last of them form the test window (default a quarter)")
    p.add_argument("--sim-seed", type=int, default=0)
    p.add_argument("--parquet", help="an event-schema Parquet file (opengem simulate --parquet) instead")
    p.add_argument("--replay", help="a logged interaction file (Parquet/CSV/TSV) replayed with --mapping instead")
    p.add_argument("--mapping", help="column mapping of --replay (as for opengem replay)")
    p.add_argument("--test-fraction", type=float, default=0.25,
                   help="--parquet / --replay: the last fraction of the events (by time) is the test window")
    p.add_argument("--click-window", type=float, default=300, help="click window, seconds")
    p.add_argument("--conversion-window", type=float, default=3600, help="post-click conversion window, seconds")
    p.add_argument("--max-len", type=int, help="history events read per example (default: the preset's window)")
    p.add_argument("--negative-rate", type=float, default=0.1, help="train-window negative downsampling (1/r weights)")
    p.add_argument("--test-negative-rate", type=float, default=1.0)
    p.add_argument("--sample-seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0, help="model seed (initial weights)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--work", help="dataset + per-model results (default <data-dir>/evaluate); reruns reuse them")
    p.add_argument("--json", help="results JSON (default <work>/results.json)")
    p.add_argument("--plot", help="learning-curve PNG (default <work>/curves.png)")
    p.add_argument("--label", default="", help="free text for the JSON and the plot title")
    p.add_argument("--force", action="store_true", help="retrain models whose results exist")
    p.set_defaults(func=cmd_evaluate)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # (what `opengem serve --processes` hands its children)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose:  # kafka-python warns about its own event loop timing under load
        logging.getLogger("kafka").setLevel(logging.ERROR)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        return 130
    except (cfgmod.ConfigError, OSError, RuntimeError, ValueError) as e:
        print(f"opengem {args.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
