"""What serving GEM's FM MLPs in bfloat16 costs in quality: NE of one trained model, fp32 vs bf16.

``[serve] precision = "bf16"`` (docs/serving.md, ninth pass) runs the FM blocks' MLPs of a
served model in bfloat16; bench/serve.py measures what that saves per request and how far
it moves the scores of an untrained model. Here the model is trained: a simulator dataset is
materialized (the `opengem evaluate` pipeline: broker-free ingest into the store, the
joiner's labels, point-in-time batches), GEM (``--preset``, default base) is trained on its
train window, and its test window is scored twice by the same weights -- the fp32 forward
(the baseline: what the trainer computes and the server serves by default) and the bf16 one
(``wukong.mlp_precision``). Reported per task: NE of each, the paired difference with a 95 %
bootstrap interval over the test rows, AUC, the largest |p_bf16 - p_fp32|, and the CPU time
each forward took over the whole test window (one thread; B = 256 rows per batch, each row
with its own history: the trainer's batches, not a server's one-user requests).

    .venv/bin/python bench/precision.py [--quick] [--events N] [--preset base]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import parser, table, write  # noqa: E402


def main() -> None:
    ap = parser("precision", __doc__)
    ap.add_argument("--preset", default="base", help="GEM preset (default base)")
    ap.add_argument("--events", type=int, default=0, help="simulator events (default 4M: ~100k training examples; quick 120k)")
    ap.add_argument("--work", default="", help="dataset / work directory (default data/bench-precision-PRESET-EVENTS)")
    ap.add_argument("--seed", type=int, default=0, help="model seed")
    args = ap.parse_args()

    import dataclasses

    import torch

    from opengem.model import evaluate as ev
    from opengem.model.config import preset
    from opengem.model.distributed import init_distributed
    from opengem.model.metrics import auc
    from opengem.model.trainer import OnlineLearner, TrainConfig, quiet_torchrec
    from opengem.model.wukong import freeze_derived, mlp_precision
    from opengem.serving.scoring import amx_bf16

    quiet_torchrec()
    torch.set_num_threads(1)
    cfg = preset(args.preset)
    n_events = args.events or (120_000 if args.quick else 4_000_000)
    dcfg = ev.DatasetConfig(events=n_events, test_events=max(1, n_events // 4), max_len=cfg.pyramid.max_len)
    work = Path(args.work or f"data/bench-precision-{args.preset}-{n_events}")
    t0 = time.monotonic()
    ds = ev.materialize(ev.simulator_source(dcfg, surfaces=cfg.features.surfaces), work / "dataset", dcfg,
                        cfg.features, echo=lambda s: print(s, flush=True))
    tasks = tuple(ds.features.tasks)
    cfg = dataclasses.replace(cfg, features=ds.features)
    print(f"dataset {ds.fingerprint}: {ds.meta['stats']['train']['kept']:,} train / "
          f"{ds.meta['stats']['test']['kept']:,} test examples ({time.monotonic() - t0:.0f}s)", flush=True)

    learner = OnlineLearner("gem", cfg, TrainConfig(), init_distributed("cpu"), seed=args.seed)
    t0, n, last = time.monotonic(), 0, time.monotonic()
    total = ds.meta["stats"]["train"]["kept"]
    for batch, ex in ds.batches("train"):
        learner.step(batch, ex["weight"])
        n += len(batch)
        if time.monotonic() - last > 15:
            last = time.monotonic()
            print(f"  train {n:,}/{total:,} ({n / (last - t0):,.0f} ex/s)", flush=True)
    train_s = time.monotonic() - t0
    print(f"trained on {n:,} examples in {train_s:.0f}s", flush=True)

    model = learner.model
    model.eval()
    freeze_derived(model)  # as the server holds a version
    test = list(ds.batches("test"))
    y = np.concatenate([b.labels.numpy() for b, _ in test])
    w = np.concatenate([ex["weight"].numpy().astype(np.float64) for _, ex in test])
    preds, secs = {}, {}
    for prec in ("fp32", "bf16"):
        mlp_precision(model, prec)
        t = time.process_time()
        preds[prec] = np.concatenate([learner.predict(b).numpy() for b, _ in test])  # (autograd off)
        secs[prec] = time.process_time() - t
    mlp_precision(model, "fp32")
    rows, per_task = [], {}
    for ti, t in enumerate(tasks):
        a, b = preds["fp32"][:, ti], preds["bf16"][:, ti]
        ne_a, ne_b = ev.ne_rows(a, y[:, ti], w), ev.ne_rows(b, y[:, ti], w)
        d = ev.paired_bootstrap(a, b, y[:, ti], w, n_boot=300, seed=1)
        per_task[t] = {"ne_fp32": ne_a, "ne_bf16": ne_b, "ne_delta": d["delta"], "ne_delta_lo": d["lo"],
                       "ne_delta_hi": d["hi"], "auc_fp32": auc(a, y[:, ti]), "auc_bf16": auc(b, y[:, ti]),
                       "max_abs_prob_diff": float(np.abs(a - b).max()),
                       "mean_abs_prob_diff": float(np.abs(a - b).mean())}
        rows.append([t, f"{ne_a:.5f}", f"{ne_b:.5f}", f"{d['delta']:+.6f}", f"[{d['lo']:+.6f}, {d['hi']:+.6f}]",
                     f"{per_task[t]['max_abs_prob_diff']:.2e}"])
    print()
    print(table(rows, ["task", "NE fp32", "NE bf16", "bf16 - fp32", "95% interval", "max |dp|"]))
    cpu = {"cpu_s_fp32": secs["fp32"], "cpu_s_bf16": secs["bf16"], "cpu_ratio_bf16_to_fp32": secs["bf16"] / secs["fp32"]}
    print(f"\nforward over the test window, one thread, B = {len(test[0][0])} rows per batch: fp32 "
          f"{secs['fp32']:.1f} s, bf16 {secs['bf16']:.1f} s ({cpu['cpu_ratio_bf16_to_fp32']:.3f}); "
          f"AMX-BF16 {'yes' if amx_bf16() else 'no'}")
    write(args.out, "precision", {"preset": args.preset, "events": n_events, "seed": args.seed, "quick": args.quick},
          {"dataset": ds.fingerprint, "train_examples": n, "test_examples": int(len(y)), "train_s": train_s,
           "amx_bf16": amx_bf16(), "by_task": per_task, **cpu})


if __name__ == "__main__":
    main()
