"""A/B of GEM's two sequence encoders on one simulator stream: progressive NE, same batches.

``seq_conditioning="user"`` (the candidate-independent pyramid a server runs once
per request, the presets' choice) against ``"target"`` (the pyramid conditioned
on the target ad, InterFormer-style; the ablation). The simulator's events go
through the stream worker's ingest path (real RocksDB shards, the joiner's
labelled examples); then both models train with the trainer's own step
(:class:`opengem.model.trainer.OnlineLearner`, predict-then-train) on *the
same* point-in-time batches in impression-time order, from the same seed.

Figures per variant and task: progressive NE over every example after the
first ``--warmup`` fraction (``ne_<task>``) and over the last quarter
(``ne_<task>_last_quarter``), AUC of the same examples, and the oracle NE of
the simulator's true click probabilities (the floor). The claim is the ratio
``ne_click`` user / target (< 1: the candidate-independent encoder is better).

    .venv/bin/python bench/encoder_ab.py [--quick] [--preset tiny] [--events N]
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

P = 2


def main() -> None:
    ap = _common.parser("encoder_ab", __doc__)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--events", type=int, default=0, help="simulator events (default 150k quick / 600k full)")
    ap.add_argument("--batch", type=int, default=0, help="examples per step (default: the trainer's)")
    ap.add_argument("--warmup", type=float, default=0.2, help="fraction of examples left out of the NE")
    args = ap.parse_args()
    import torch

    from opengem.features.sharded import ShardedReader
    from opengem.model.data import examples_batch
    from opengem.model.distributed import init_distributed
    from opengem.model.metrics import auc, ne
    from opengem.model.train_config import TrainConfig
    from opengem.model.trainer import OnlineLearner, model_config, quiet_torchrec
    from opengem.stream.codec import encode_json
    from opengem.stream.ingest import IngestConfig, Ingestor, Record
    from opengem.stream.joiner import JoinerConfig
    from opengem.stream.producer import partition_of
    from opengem.stream.simulator import SimConfig, Simulator

    quiet_torchrec()
    n_events = args.events or (150_000 if args.quick else 600_000)
    tcfg = TrainConfig(preset=args.preset, **({"batch_size": args.batch} if args.batch else {}))
    torch.set_num_threads(tcfg.threads)
    work = Path(tempfile.mkdtemp(prefix="opengem-bench-ab-"))
    try:
        t0 = time.monotonic()
        sim_cfg = SimConfig(seed=7, n_users=2_000)
        joiner = JoinerConfig(click_window_ms=60_000, conversion_window_ms=600_000, sync=False)
        ing = Ingestor(work / "data", cfg=IngestConfig(joiner=joiner))
        offsets: Counter[int] = Counter()
        examples = []
        chunk_ev: list = []
        for b in Simulator(sim_cfg).batches(n_events):
            chunk_ev += b
            if len(chunk_ev) >= 20_000:
                examples += _ingest(ing, chunk_ev, offsets, Record, encode_json, partition_of)
                chunk_ev = []
        examples += _ingest(ing, chunk_ev, offsets, Record, encode_json, partition_of)
        ing.close()
        examples.sort(key=lambda e: e.ts)
        # The stream's last conversion window holds only the impressions that closed without a
        # click (clicked ones still wait): drop it, or the last examples have almost no positives.
        examples = [e for e in examples if e.ts <= examples[-1].ts - joiner.conversion_window_ms]
        print(f"{n_events:,} events -> {len(examples):,} examples ({time.monotonic() - t0:.0f}s)", flush=True)

        info = init_distributed("cpu")
        base = model_config(tcfg, sim_cfg.surfaces)
        variants = {m: dataclasses.replace(base, seq_conditioning=m) for m in ("user", "target")}
        learners = {m: OnlineLearner("gem", c, tcfg, info, seed=0) for m, c in variants.items()}
        reader = ShardedReader(work / "data", P, secondary_root=work / "reader")
        reader.catch_up()
        B = tcfg.batch_size
        probs: dict[str, list[np.ndarray]] = {m: [] for m in variants}
        secs = {m: 0.0 for m in variants}
        ys, truth = [], []
        t1 = time.monotonic()
        for i in range(0, len(examples), B):
            chunk = examples[i:i + B]
            batch = examples_batch(chunk, reader, base)  # one batch, both variants
            for m, lr in learners.items():
                ts = time.perf_counter()
                probs[m].append(lr.step(batch, torch.ones(len(chunk))).numpy())
                secs[m] += time.perf_counter() - ts
            ys.append(batch.labels.numpy())
            truth.append(np.array([e.p_click for e in chunk], np.float64))
            if (i // B) % 100 == 0:
                print(f"  step {i // B}: {i + len(chunk):,}/{len(examples):,} examples "
                      f"({(i + len(chunk)) / (time.monotonic() - t1):,.0f}/s, both variants)", flush=True)
        reader.close()
        steps = (len(examples) + B - 1) // B
    finally:
        shutil.rmtree(work, ignore_errors=True)
    y, tr = np.concatenate(ys), np.concatenate(truth)
    n = len(y)
    s0, s3 = int(args.warmup * n), n - n // 4
    figures: dict = {"examples": n, "steps": steps, "batch_size": B,
                     "oracle_ne_click": ne(tr[s0:], y[s0:, 0]), "oracle_ne_click_last_quarter": ne(tr[s3:], y[s3:, 0])}
    rows = []
    for m in variants:
        p = np.concatenate(probs[m])
        f = {"train_s": secs[m]}
        for t, task in enumerate(tcfg_tasks(base)):
            f[f"ne_{task}"] = ne(p[s0:, t], y[s0:, t])
            f[f"ne_{task}_last_quarter"] = ne(p[s3:, t], y[s3:, t])
            f[f"auc_{task}"] = auc(p[s0:, t], y[s0:, t])
        figures[m] = f
        rows.append([m, f["ne_click"], f["ne_click_last_quarter"], f["auc_click"], f.get("ne_conversion"),
                     f["train_s"]])
    figures["ne_click_ratio_user_to_target"] = figures["user"]["ne_click"] / figures["target"]["ne_click"]
    figures["ne_conversion_ratio_user_to_target"] = (figures["user"]["ne_conversion"]
                                                     / figures["target"]["ne_conversion"])
    figures["train_time_ratio_user_to_target"] = figures["user"]["train_s"] / figures["target"]["train_s"]
    print(_common.table(rows, ["seq_conditioning", "NE click", "NE click (last 1/4)", "AUC click", "NE conv",
                               "train s"]))
    print(f"oracle NE click {figures['oracle_ne_click']:.4f}; NE click user/target "
          f"{figures['ne_click_ratio_user_to_target']:.4f}, conversion {figures['ne_conversion_ratio_user_to_target']:.4f}")
    _common.write(args.out, "encoder_ab", {"preset": args.preset, "events": n_events, "warmup": args.warmup,
                                           "sim": {"seed": sim_cfg.seed, "n_users": sim_cfg.n_users},
                                           "threads": tcfg.threads}, figures)


def _ingest(ing, events, offsets, Record, encode_json, partition_of) -> list:  # noqa: ANN001, N803
    """Events through the stream worker's ingest path (one JSON event per record) -> closed examples."""
    records = []
    for e in events:
        p = partition_of(e.user_id, P)
        records.append(Record(p, offsets[p], encode_json([e])))
        offsets[p] += 1
    return [ex for _, ex in ing.process(records, now_ms=2**62)[1]] if records else []


def tcfg_tasks(cfg) -> tuple[str, ...]:  # noqa: ANN001
    return tuple(cfg.features.tasks)


if __name__ == "__main__":
    main()
