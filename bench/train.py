"""Continuous trainer throughput, model FLOPs and freshness.

Data: simulated events (Arrow records, as in the demo) through the embedded
broker and the real `opengem stream` worker (its own process), which writes
the shards and the labelled examples; all of it is in place before a clock
starts.

* ``examples_per_s``: the daemon (:class:`opengem.model.trainer.Trainer`, in
  this process, one rank) on that backlog: Kafka fetch + JSON decode + dedup,
  secondary catch-up, point-in-time history reads, batch building, the
  predict-then-train step, progressive metrics, and its default checkpoint /
  publication intervals -- timed from its first poll to its M-th example.
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


def time_steps(step, batches: list, warmup: int = 2) -> float:
    """Examples/s of ``step(batch)`` over ``batches`` after ``warmup`` untimed steps."""
    for b in batches[:warmup]:
        step(b)
    t0 = time.perf_counter()
    n = 0
    for b in batches[warmup:]:
        step(b)
        n += len(b)
    return n / (time.perf_counter() - t0)


def flops_per_example(model, batch) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        loss, _ = model.loss(batch)
        loss.backward()
    return fc.get_total_flops() / len(batch)


def offline(examples: list, reader: Any, kind: str, mcfg: Any, tcfg: Any, info: Any, n_batches: int,
            speed: bool = True) -> dict:
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
        eps = time_steps(lambda b: learner.step(b, w[: len(b)]), batches)
        del learner
    small = dataclasses.replace(mcfg, features=dataclasses.replace(
        mcfg.features, **{f"{t}_rows": min(getattr(mcfg.features, f"{t}_rows"), 4096)
                          for t in ("user", "item", "advertiser", "category")}))
    flops_batch = examples_batch(examples[: tcfg.batch_size], reader, small)  # ids hashed into the small tables
    return {"offline_examples_per_s": eps,
            "flops_per_example": flops_per_example(build_model(kind, small), flops_batch),
            "batches": len(batches), "batch_size": tcfg.batch_size}


def daemon(cfg: Any, tcfg: Any, info: Any, work: Path, m: int, tag: str) -> float:
    from opengem.model.trainer import Trainer

    t = dataclasses.replace(tcfg, checkpoint_dir=str(work / f"ckpt-{tag}"), models_dir=str(work / f"models-{tag}"),
                            metrics_port=None, group_id=f"bench-{tag}")
    tr = Trainer(cfg, t, cfg.kafka.bootstrap, info, fresh=True, echo=lambda s: None)
    t0 = time.perf_counter()
    stats = tr.run(max_examples=m)
    return stats.examples / (time.perf_counter() - t0)


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

    n_batches = 8 if args.quick else 24
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

    best = {"offline": 0.0, "daemon": 0.0}
    mcfg = model_config(tcfg, surfaces)
    for r in range(args.repeats):
        off = offline(examples[:m], reader, "gem", mcfg, tcfg, info, n_batches)
        best["offline"] = max(best["offline"], off["offline_examples_per_s"])
        d = daemon(pipe.cfg, tcfg, info, work, m, f"{r}")
        best["daemon"] = max(best["daemon"], d)
        print(f"repeat {r}: offline {off['offline_examples_per_s']:,.0f} ex/s, daemon {d:,.0f} ex/s", flush=True)

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
