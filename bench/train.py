"""Continuous trainer throughput, model FLOPs and freshness.

Data: simulated events (Arrow records, as in the demo) through the embedded
broker and the real `opengem stream` worker (its own process), which writes
the shards and the labelled examples; all of it is in place before a clock
starts.

* ``examples_per_s``: the daemon (:class:`opengem.model.trainer.Trainer`, in
  this process, one rank) on that backlog: Kafka fetch + JSON decode + dedup,
  secondary catch-up, point-in-time history reads, batch building, the
  predict-then-train step, progressive metrics, and its default checkpoint /
  publication intervals -- timed like the offline loop: from the end of its
  2 warm-up steps to the end of the step that reaches M examples.
  ``examples_per_s_whole_run`` / ``ratio_to_offline_whole_run``: from its first
  poll to the end of ``run()``, warm-up and the final checkpoint + publication
  of this short run included (what the figure before this split measured).
  The daemon reads batch k+1 (Kafka, store, batch building) on a thread while
  batch k trains (:class:`~opengem.model.trainer.Trainer` ``prefetch``);
  ``examples_per_s_serial`` / ``ratio_to_offline_serial``: the same daemon with
  the reads inline (``prefetch=False``), measured alternately in the same run.
* ``cpu_ratio_to_offline`` (``_serial``): the same ratio in examples per CPU-second
  of this process (all its threads): the work the streaming adds, which a loaded
  machine does not blur as it does wall time (a read thread saves wall time, not work).
* ``per_batch_ms``: where a batch's time goes, each part timed alone on the
  same examples (Kafka take, secondary catch-up, history reads, ``make_batch``,
  the step).
* ``offline_examples_per_s``: the same model and the same step
  (:class:`~opengem.model.trainer.OnlineLearner`) on the same M examples as
  batches built beforehand and held in memory: the ceiling.
  ``ratio_to_offline`` = examples_per_s / offline_examples_per_s (goal: the
  streaming and feature reads cost <= 20 %, i.e. >= 0.8). Alternated
  ``--repeats`` times, best of each.
* ``dlrm_examples_per_s``: a plain loop over TorchRec's DLRM
  (:class:`~opengem.model.baselines.DLRMBaseline`, unsharded, torch Adam) on the
  same in-memory batches: context for what the GEM architecture costs.
* ``per_preset``: offline examples/s and ``flops_per_example`` (forward +
  backward, ``torch.utils.flop_counter``) per GEM preset and DLRM, on batches of
  these examples (so the FLOPs reflect the simulator's real history lengths,
  capped at each preset's ``max_len``). Lookups have no FLOPs, so ``large`` is
  counted with its tables shrunk to 4k rows (dense parts identical); its
  throughput is measured with full tables only without ``--quick``.
* ``freshness_s``: the demo configuration live (simulator at ``--rate`` events/s,
  worker, `opengem train` as its own process with the demo's preset and
  settings, :data:`opengem.demo.TRAIN_FLAGS`: a 5 s publication interval and
  negative downsampling): probe impressions with known ids are sent every few
  seconds; for each, the seconds from its Kafka ack to the first published
  version whose cursors cover its example (versions watched every 0.2 s).
  Median (``freshness_s``; null when under half the probes made it into a
  version) and max; goal < 60 s. ``freshness_baseline``: the same run without
  downsampling (``--negative-rate 1``), measured in the same session.
  ``--freshness-only`` skips everything else.

CPU threads: ``TrainConfig.threads`` (1, the daemon's default) everywhere.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402
from _pipeline import Pipeline, produce  # noqa: E402


def chunks(xs: list, n: int) -> list[list]:
    return [xs[i:i + n] for i in range(0, len(xs), n)]


def time_steps(step, batches: list, warmup: int = 2, cpu: dict | None = None) -> float:
    """Examples/s of ``step(batch)`` over ``batches`` after ``warmup`` untimed steps; with ``cpu``,
    also examples per CPU-second of this process (``cpu["examples_per_cpu_s"]``)."""
    for b in batches[:warmup]:
        step(b)
    t0, c0 = time.perf_counter(), time.process_time()
    n = 0
    for b in batches[warmup:]:
        step(b)
        n += len(b)
    if cpu is not None:
        cpu["examples_per_cpu_s"] = n / (time.process_time() - c0)
    return n / (time.perf_counter() - t0)


def flops_per_example(model, batch) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        loss, _ = model.loss(batch)
        loss.backward()
    return fc.get_total_flops() / len(batch)


def offline(examples: list, reader: Any, kind: str, mcfg: Any, tcfg: Any, info: Any, n_batches: int,
            speed: bool = True) -> dict:
    cpu: dict = {}
    """Offline examples/s (the learner step on in-memory batches) and FLOPs/example of one model."""
    import torch

    from opengem.model.data import examples_batch
    from opengem.model.registry import build_model
    from opengem.model.trainer import OnlineLearner

    batches = [examples_batch(c, reader, mcfg) for c in chunks(examples, tcfg.batch_size)[:n_batches]]
    eps = None
    if speed:
        learner = OnlineLearner(kind, mcfg, tcfg, info)
        w = torch.ones(tcfg.batch_size)
        eps = time_steps(lambda b: learner.step(b, w[: len(b)]), batches, cpu=cpu)
        del learner
    small = dataclasses.replace(mcfg, features=dataclasses.replace(
        mcfg.features, **{f"{t}_rows": min(getattr(mcfg.features, f"{t}_rows"), 4096)
                          for t in ("user", "item", "advertiser", "category")}))
    flops_batch = examples_batch(examples[: tcfg.batch_size], reader, small)  # ids hashed into the small tables
    return {"offline_examples_per_s": eps, "offline_examples_per_cpu_s": cpu.get("examples_per_cpu_s"),
            "flops_per_example": flops_per_example(build_model(kind, small), flops_batch),
            "batches": len(batches), "batch_size": tcfg.batch_size}


def daemon(cfg: Any, tcfg: Any, info: Any, work: Path, m: int, tag: str, prefetch: bool = True,
           warmup: int = 2) -> dict:
    from opengem.model.trainer import Trainer

    t = dataclasses.replace(tcfg, checkpoint_dir=str(work / f"ckpt-{tag}"), models_dir=str(work / f"models-{tag}"),
                            metrics_port=None, group_id=f"bench-{tag}")
    tr = Trainer(cfg, t, cfg.kafka.bootstrap, info, fresh=True, echo=lambda s: None, prefetch=prefetch)
    ends: list[tuple[float, float, int]] = []  # (time, CPU time, examples) at the end of every step
    train = tr._train

    def timed(unit, t_in):
        train(unit, t_in)
        ends.append((time.perf_counter(), time.process_time(), tr.stats.examples))

    tr._train = timed
    t0 = time.perf_counter()
    stats = tr.run(max_examples=m)
    whole = stats.examples / (time.perf_counter() - t0)
    # Steady state, like time_steps: from the end of the warm-up steps to the last step (the
    # default checkpoint / publication intervals included when they fall inside; the final
    # checkpoint + publication of this short run, which a running daemon spreads over
    # checkpoint_every_s / publish_every_s, is in ``whole``).
    (ta, ca, na), (tb, cb, nb) = ends[warmup - 1], ends[-1]
    return {"steady": (nb - na) / (tb - ta), "cpu": (nb - na) / (cb - ca), "whole": whole}


def per_batch_ms(cfg: Any, tcfg: Any, info: Any, reader: Any, m: int) -> dict:
    """Where a daemon batch's time goes, each part timed alone (ms per batch of ``batch_size``):
    Kafka fetch + decode + dedup (:class:`~opengem.model.source.ExampleSource`), the secondary's
    catch-up, the point-in-time history reads (``read_batch``), batch building (``make_batch``)
    and the learner's step."""
    import numpy as np
    import torch

    from opengem.model.batch import make_batch
    from opengem.model.data import history_len
    from opengem.model.source import ExampleSource
    from opengem.model.trainer import OnlineLearner, model_config

    mcfg = model_config(tcfg, cfg.surfaces)
    src = ExampleSource(cfg.kafka.bootstrap, cfg.kafka.examples_topic, list(range(cfg.kafka.partitions)),
                        group_id=None, client_id="bench-profile")
    parts = {"kafka_take": 0.0, "catch_up": 0.0, "store_read": 0.0, "make_batch": 0.0, "step": 0.0}
    learner = OnlineLearner("gem", mcfg, tcfg, info)
    max_len = max(history_len(mcfg), 256)
    n = done = 0
    try:
        while done < m:
            t0 = time.perf_counter()
            items = src.take(tcfg.batch_size, tcfg.fill_timeout_s)
            t1 = time.perf_counter()
            if not items:
                break
            reader.catch_up()
            t2 = time.perf_counter()
            exs = [it.example for it in items]
            seqs = reader.read_batch(np.array([e.user_id for e in exs], np.int64),
                                     before_ts=np.array([e.ts for e in exs], np.int64), max_len=max_len)
            t3 = time.perf_counter()
            batch = make_batch(exs, seqs, mcfg)
            t4 = time.perf_counter()
            learner.step(batch, torch.ones(len(exs)))
            t5 = time.perf_counter()
            if n >= 2:  # warm-up batches untimed, as in time_steps
                for k, dt in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
                    parts[k] += dt
            n += 1
            done += len(items)
    finally:
        src.close()
    timed = max(n - 2, 1)
    return {k: 1000 * v / timed for k, v in parts.items()} | {"batches": timed}


def freshness(pipe: Pipeline, sim: Any, work: Path, *, rate: float, seconds: float, preset: str,
              flags: tuple[str, ...], tag: str, probe_every_s: float = 4.0) -> dict:
    """Probes through the live pipeline into a trainer process (``flags`` on its command line);
    seconds to the first covering version."""
    from opengem.stream.events import Event
    from opengem.stream.producer import EventProducer
    from opengem.stream.simulator import AD_ID_BASE

    models = work / f"fresh-models-{tag}"
    conf = work / f"fresh-{tag}.toml"
    k = pipe.cfg.kafka
    conf.write_text("\n".join([
        f'data_dir = "{pipe.data_dir}"', "[kafka]", f"partitions = {pipe.partitions}", "[train]",
        f'preset = "{preset}"', 'start = "latest"', "keep_versions = 100000", f'models_dir = "{models}"',
        f'checkpoint_dir = "{work / f"fresh-ckpt-{tag}"}"', "report_every_s = 5.0"]) + "\n")
    log = work / f"fresh-train-{tag}.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "opengem.cli", "train", "--config", str(conf), "--bootstrap",
                             pipe.bootstrap, "--metrics-port", "-1", "--fresh", *flags],
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT, env=env)
    seen: dict[str, float] = {}  # version -> wall time first seen
    stop_watch = threading.Event()

    def watch() -> None:
        from opengem.model.registry import list_versions

        while not stop_watch.wait(0.2):
            for v in list_versions(models):
                seen.setdefault(v, time.time())

    probes: dict[str, float] = {}  # request id -> wall time acked by Kafka
    try:
        deadline = time.monotonic() + 120
        while "training" not in (log.read_text() if log.exists() else ""):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"trainer did not start; see {log}")
            time.sleep(0.2)
        threading.Thread(target=watch, daemon=True).start()
        prod = EventProducer(pipe.bootstrap, k.events_topic, fmt="json")
        t_start = time.monotonic()
        last_probe = [t_start + 8.0 - probe_every_s]  # first probe after 8 s of traffic

        def on_batch(max_ts: int) -> None:
            now = time.monotonic()
            if now - last_probe[0] < probe_every_s:
                return
            last_probe[0] = now
            rid = f"probe-{tag}-{len(probes)}"
            prod.send([Event(event_id=rid, user_id=len(probes) % 1000, ts=max_ts, surface="feed", kind="impression",
                             item_id=AD_ID_BASE, is_ad=True, request_id=rid, ad_format="image", advertiser_id=0,
                             category=0)])
            prod.flush()
            probes[rid] = time.time()

        produce(pipe.bootstrap, sim, None, rate=rate, on_batch=on_batch,
                stop=lambda: time.monotonic() - t_start >= seconds)
        prod.close()
        time.sleep(15.0)  # the last probes' windows close, the trainer catches up, publishes
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
        stop_watch.set()
    from opengem.model.registry import read_meta

    covered: dict[str, float] = {}
    metas = {v: read_meta(models, v) for v in sorted(seen)}
    where = {ex.request_id: (p, o, i) for p, o, i, ex in pipe.iter_examples() if ex.request_id in probes}
    for rid, (p, o, i) in where.items():
        for v, meta in metas.items():
            off, idx = meta["cursors"].get(str(p), [0, 0])
            if o < off or (o == off and i < idx):
                covered[rid] = seen[v] - probes[rid]
                break
    # Probes no version covered before the end count as infinitely stale: the median is only
    # finite when most probes made it into a published model.
    vals = sorted(covered.get(rid, float("inf")) for rid in where)
    med = vals[len(vals) // 2] if vals else float("inf")
    done = [v for v in vals if v != float("inf")]
    text = log.read_text()
    rates = re.findall(r"r=([\d.e-]+)\)", text)
    stopped = re.findall(r"trainer stopped: [\d,]+ steps, ([\d,]+) examples(?: \(\+([\d,]+) negatives)?", text)
    trained, sampled_out = (int(v.replace(",", "") or 0) for v in stopped[-1]) if stopped else (None, None)
    return {"freshness_s": med if med != float("inf") else None, "freshness_max_s": max(done) if done else None,
            "freshness_covered_median_s": done[len(done) // 2] if done else None,
            "probes_sent": len(probes), "probes_as_examples": len(where), "probes_in_a_version": len(covered),
            "versions_published": len(seen), "trainer_flags": list(flags),
            "negative_rate_last": float(rates[-1]) if rates else 1.0,
            "trained_examples": trained, "sampled_out_examples": sampled_out, "trainer_log": str(log)}


def throughput(pipe: Pipeline, sim: Any, work: Path, tcfg: Any, args: Any, n_events: int) -> dict:
    """The daemon vs the offline ceiling vs DLRM, and FLOPs per preset, on a backlog of ``n_events``."""
    from opengem.features.sharded import ShardedReader
    from opengem.model.distributed import init_distributed
    from opengem.model.trainer import model_config

    n_batches = 16 if args.quick else 24
    t0 = time.monotonic()
    produce(pipe.bootstrap, sim, n_events)
    records = pipe.wait_settled()
    examples = pipe.read_examples()
    print(f"{n_events:,} events -> {len(examples):,} examples in {records:,} records "
          f"({time.monotonic() - t0:.0f}s, worker included)", flush=True)
    m = min(len(examples), n_batches * tcfg.batch_size)
    info = init_distributed("cpu")
    surfaces = pipe.cfg.surfaces
    reader = ShardedReader(pipe.data_dir, pipe.partitions, secondary_root=work / "bench-reader")
    reader.catch_up()

    best = {"offline": 0.0, "daemon": 0.0, "serial": 0.0, "whole": 0.0, "serial_whole": 0.0,
            "offline_cpu": 0.0, "daemon_cpu": 0.0, "serial_cpu": 0.0}
    mcfg = model_config(tcfg, surfaces)
    for r in range(args.repeats):
        off = offline(examples[:m], reader, "gem", mcfg, tcfg, info, n_batches)
        best["offline"] = max(best["offline"], off["offline_examples_per_s"])
        best["offline_cpu"] = max(best["offline_cpu"], off["offline_examples_per_cpu_s"])
        d = daemon(pipe.cfg, tcfg, info, work, m, f"{r}")
        d0 = daemon(pipe.cfg, tcfg, info, work, m, f"{r}-serial", prefetch=False)
        for k, v in (("daemon", d["steady"]), ("whole", d["whole"]), ("serial", d0["steady"]),
                     ("serial_whole", d0["whole"]), ("daemon_cpu", d["cpu"]), ("serial_cpu", d0["cpu"])):
            best[k] = max(best[k], v)
        print(f"repeat {r}: offline {off['offline_examples_per_s']:,.0f} ex/s; daemon {d['steady']:,.0f} ex/s "
              f"(reads on a thread; {d['whole']:,.0f} over the whole run), {d0['steady']:,.0f} ex/s (reads inline; "
              f"{d0['whole']:,.0f})", flush=True)
    parts = per_batch_ms(pipe.cfg, tcfg, info, reader, m)
    print("per batch (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in parts.items() if k != "batches"), flush=True)

    per_preset: dict[str, dict] = {}
    for name in ("tiny", "base", "large"):
        pc = dataclasses.replace(tcfg, preset=name, batch_size=32 if name == "large" else tcfg.batch_size)
        nb = 4 if name == "large" else n_batches
        per_preset[name] = offline(examples[: nb * pc.batch_size], reader, "gem", model_config(pc, surfaces),
                                   pc, info, nb, speed=not (name == "large" and args.quick))
        print(f"{name}: {per_preset[name]}", flush=True)
    dl = offline(examples[:m], reader, "dlrm", model_config(dataclasses.replace(tcfg, model="dlrm"), surfaces),
                 dataclasses.replace(tcfg, model="dlrm"), info, n_batches)
    per_preset["dlrm"] = dl
    dlrm_plain = plain_dlrm(examples[:m], reader, surfaces, tcfg.batch_size)
    reader.close()
    return {
        "examples_per_s": best["daemon"],
        "offline_examples_per_s": best["offline"],
        "ratio_to_offline": best["daemon"] / best["offline"],
        "examples_per_s_serial": best["serial"],
        "ratio_to_offline_serial": best["serial"] / best["offline"],
        "examples_per_s_whole_run": best["whole"],
        "ratio_to_offline_whole_run": best["whole"] / best["offline"],
        "ratio_to_offline_whole_run_serial": best["serial_whole"] / best["offline"],
        "cpu_ratio_to_offline": best["daemon_cpu"] / best["offline_cpu"],
        "cpu_ratio_to_offline_serial": best["serial_cpu"] / best["offline_cpu"],
        "per_batch_ms": parts,
        "dlrm_examples_per_s": dlrm_plain,
        "flops_per_example": per_preset[args.preset]["flops_per_example"],
        "per_preset": per_preset,
        "examples_measured": m,
    }


def main() -> None:
    ap = _common.parser("train", __doc__)
    ap.add_argument("--preset", default="base", help="GEM preset of the daemon / offline comparison")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--rate", type=float, default=20_000, help="events/s of the live freshness run (demo default)")
    ap.add_argument("--fresh-preset", default="tiny", help="trainer preset of the live freshness run (the demo's)")
    ap.add_argument("--no-freshness", action="store_true")
    ap.add_argument("--freshness-only", action="store_true", help="only the live freshness runs")
    args = ap.parse_args()
    import torch

    from opengem.demo import TRAIN_FLAGS
    from opengem.model.train_config import TrainConfig
    from opengem.model.trainer import quiet_torchrec
    from opengem.stream.simulator import SimConfig, Simulator

    quiet_torchrec()
    n_events = 60_000 if args.quick else 200_000
    tcfg = TrainConfig(preset=args.preset)
    torch.set_num_threads(tcfg.threads)
    work = Path(tempfile.mkdtemp(prefix="opengem-bench-train-"))
    pipe = Pipeline(work / "data", click_window_s=60, conversion_window_s=600).start()
    results: dict[str, Any] = {}
    try:
        sim = Simulator(SimConfig())
        if not args.freshness_only:
            results.update(throughput(pipe, sim, work, tcfg, args, n_events))
        if not args.no_freshness:
            live = dict(rate=args.rate, seconds=45 if args.quick else 90, preset=args.fresh_preset)
            results.update(freshness(pipe, sim, work, flags=TRAIN_FLAGS, tag="demo", **live))
            print(f"demo settings {' '.join(TRAIN_FLAGS)}: {results['probes_in_a_version']} of "
                  f"{results['probes_as_examples']} probes in a version, median {results['freshness_s']} s", flush=True)
            results["freshness_baseline"] = freshness(
                pipe, sim, work, flags=(*TRAIN_FLAGS, "--negative-rate", "1", "--max-delay", "0"), tag="baseline",
                **live)
    finally:
        pipe.stop()
    rows = []
    if "examples_per_s" in results:
        rows += [
            ["daemon (Kafka → store reads → batches → steps)", results["examples_per_s"], ""],
            ["offline, batches in memory (ceiling)", results["offline_examples_per_s"], ""],
            ["ratio daemon / offline", results["ratio_to_offline"], "goal >= 0.80"],
            ["daemon, reads inline (no read thread)", results["examples_per_s_serial"], ""],
            ["ratio inline daemon / offline", results["ratio_to_offline_serial"], "before the read thread"],
            ["ratio over the whole run (thread | inline)",
             f"{results['ratio_to_offline_whole_run']:.3f} | {results['ratio_to_offline_whole_run_serial']:.3f}",
             "+ warm-up, final ckpt + publish"],
            ["examples per CPU-second, daemon / offline (thread | inline)",
             f"{results['cpu_ratio_to_offline']:.3f} | {results['cpu_ratio_to_offline_serial']:.3f}",
             "the work, whatever the load"],
            ["per batch ms: kafka | catch-up | store read | make_batch | step",
             " | ".join(f"{results['per_batch_ms'][k]:.1f}" for k in
                        ("kafka_take", "catch_up", "store_read", "make_batch", "step")), "each timed alone"],
            ["plain TorchRec DLRM loop", results["dlrm_examples_per_s"], "context"],
        ]
        for name, p in results["per_preset"].items():
            rows.append([f"{name}: offline ex/s | GFLOP/example (fwd+bwd)",
                         f"{p['offline_examples_per_s'] or 0:,.0f} | {p['flops_per_example'] / 1e9:.4f}", ""])
    for label, f in (("demo settings", results), ("no downsampling", results.get("freshness_baseline"))):
        if f and "freshness_s" in f:
            rows.append([f"freshness median / max (s), {label}",
                         f"{_fmt(f['freshness_s'])} / {_fmt(f['freshness_max_s'])} "
                         f"({f['probes_in_a_version']} of {f['probes_as_examples']} probes; "
                         f"r at the end {f['negative_rate_last']:g})", "goal < 60"])
    print(_common.table(rows, ["measurement", "value", "note"]))
    _common.write(args.out, "train", {"preset": args.preset, "events": n_events, "quick": args.quick,
                                      "repeats": args.repeats, "rate": args.rate, "fresh_preset": args.fresh_preset,
                                      "freshness_only": args.freshness_only, "threads": tcfg.threads,
                                      "batch_size": tcfg.batch_size}, results)
    shutil.rmtree(work, ignore_errors=True)


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1f}"


def plain_dlrm(examples: list, reader: Any, surfaces: tuple, batch_size: int) -> float:
    """TorchRec's DLRM, unsharded, Adam over everything: the textbook loop."""
    import torch

    from opengem.model.baselines import BaselineConfig, DLRMBaseline
    from opengem.model.data import examples_batch

    cfg = BaselineConfig(features=dataclasses.replace(BaselineConfig().features, surfaces=tuple(surfaces)))
    model = DLRMBaseline(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    batches = [examples_batch(c, reader, cfg) for c in chunks(examples, batch_size)]

    def step(b):
        loss, _ = model.loss(b)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return time_steps(step, batches)


if __name__ == "__main__":
    main()
