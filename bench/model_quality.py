"""Model quality on the simulator: GEM vs DLRM vs DCNv2, GEM's ablations, scaling, gap to the oracle.

One materialized dataset (:mod:`opengem.model.evaluate`): simulator events
(every signal on) through the stream worker's ingest step (RocksDB store +
label joiner), point-in-time batches from the store's read, the train window's
negatives downsampled (r, weights 1/r), the test window complete. Every model
then trains with the trainer's own step (:class:`~opengem.model.trainer.OnlineLearner`)
on the identical batches in the identical order under the same seed, and is
scored frozen on the test window.

Figures (JSON): ``models[<model>][<surface>][<task>]`` = ``ne``, ``auc``,
``calibration``, ``oracle_ne`` (the simulator's true probabilities on the same
examples), ``n``; ``ne_gap_to_oracle`` = mean over surfaces of (ne - oracle_ne)
/ oracle_ne of GEM, ``gem_vs_dlrm_ne_gain`` = mean over surfaces of (ne_dlrm -
ne_gem) / ne_dlrm (and ``gem_vs_dcn_ne_gain``) -- each also ``_by_task``, the
headline being the mean over the two tasks; ``ne_delta_vs_gem`` per ablation;
``scaling`` (NE vs parameters and vs history length).

Resumable: each model's result is its own JSON under ``--work`` named by a
fingerprint of (dataset, model config, seed); a rerun skips what is done, so
the full-size run can be spread across sessions. ``--jobs N`` trains N models
at a time (one thread each).

Full acceptance size: ``--events 13000000 --test-events 1000000`` (>= 2M
impressions, ``base``). ``--quick``: tiny preset, 150k events.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

MAIN = ["gem", "dlrm", "dcn", "gem_no_sequence", "gem_short_history", "gem_no_pyramid", "gem_no_interleave",
        "gem_shared_head"]


def main() -> None:
    ap = _common.parser("model_quality", __doc__)
    ap.add_argument("--preset", default=None, help="GEM preset (default base; tiny with --quick)")
    ap.add_argument("--events", type=int, default=None, help="simulator events in the train + test windows")
    ap.add_argument("--test-events", type=int, default=None, help="the last of them: the test window")
    ap.add_argument("--negative-rate", type=float, default=0.1, help="train-window negative downsampling r")
    ap.add_argument("--test-negative-rate", type=float, default=1.0)
    ap.add_argument("--max-len", type=int, default=None, help="history read per example (default 4096: the "
                    "longest scaling window)")
    ap.add_argument("--seed", type=int, default=0, help="model seed (simulator seed: --sim-seed)")
    ap.add_argument("--sim-seed", type=int, default=0)
    ap.add_argument("--models", default=",".join(MAIN), help="comma-separated; 'none' for no main comparison")
    ap.add_argument("--no-scaling", action="store_true")
    ap.add_argument("--jobs", type=int, default=1, help="models trained at a time (subprocesses)")
    ap.add_argument("--work", default=None, help="dataset + per-model results (default data/model_quality-<preset>)")
    ap.add_argument("--plot", default=None, help="PNG of the learning curves (default next to --out)")
    ap.add_argument("--reuse", action="store_true", help="use the dataset already in --work as it is, without "
                    "checking that it matches these flags and the current simulator (its dataset.json says what it holds)")
    ap.add_argument("--label", default="", help="free text recorded in the JSON (e.g. 'reduced-scale run')")
    ap.add_argument("--_one", default=None, help=argparse_hidden())
    args = ap.parse_args()
    preset = args.preset or ("tiny" if args.quick else "base")
    events = args.events or (150_000 if args.quick else 13_000_000)
    test_events = args.test_events or max(1, events // 5 if args.quick else 1_000_000)
    max_len = args.max_len or (256 if preset == "tiny" else 4096)
    work = Path(args.work or f"data/model_quality-{preset}")

    import torch

    from opengem.model import evaluate as ev
    from opengem.model.config import preset as get_preset
    from opengem.model.trainer import quiet_torchrec

    quiet_torchrec()
    torch.set_num_threads(1)
    features = get_preset(preset).features
    dcfg = ev.DatasetConfig(events=events, test_events=test_events, sim_seed=args.sim_seed, max_len=max_len,
                            negative_rate=args.negative_rate, test_negative_rate=args.test_negative_rate)
    if args._one or (args.reuse and (work / "dataset" / "dataset.json").exists()):
        ds = ev.Dataset(work / "dataset")  # as built (dataset.json records its sources and configs)
        if ds.features != features:
            raise SystemExit(f"{work / 'dataset'} was built for other tables / surfaces")
    else:
        ds = ev.materialize(ev.simulator_source(dcfg), work / "dataset", dcfg, features,
                            echo=lambda s: print(s, flush=True))
    specs = ev.standard_models(preset, features)
    scaling = {} if args.no_scaling else ev.scaling_models(preset, features, max_len)
    for name, s in scaling.items():
        if name not in specs:
            specs[name] = s
    if args._one:  # a worker subprocess of --jobs
        ev.train_and_evaluate(specs[args._one], ds, seed=args.seed, results_dir=work / "models",
                              echo=lambda s: print(s, flush=True))
        return
    main_names = [] if args.models == "none" else [m for m in args.models.split(",") if m]
    order = main_names + [n for n in scaling if n not in main_names]
    unknown = [n for n in order if n not in specs]
    if unknown:
        raise SystemExit(f"unknown models {unknown}; known: {sorted(specs)}")
    t0 = time.monotonic()
    if args.jobs <= 1:
        for n in order:
            ev.train_and_evaluate(specs[n], ds, seed=args.seed, results_dir=work / "models",
                                  echo=lambda s: print(s, flush=True))
    else:
        def one(n: str) -> int:
            cmd = [sys.executable, __file__, "--_one", n, "--preset", preset, "--events", str(events),
                   "--test-events", str(test_events), "--negative-rate", str(args.negative_rate),
                   "--test-negative-rate", str(args.test_negative_rate), "--max-len", str(max_len),
                   "--seed", str(args.seed), "--sim-seed", str(args.sim_seed), "--work", str(work), "--out", args.out]
            with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as p:
                for line in p.stdout:
                    if "Warning" not in line and "is_fx_tracing" not in line:
                        print(f"[{n}] {line}", end="", flush=True)
                return p.wait()

        with ThreadPoolExecutor(args.jobs) as pool:
            rcs = dict(zip(order, pool.map(one, order)))
        bad = {n: rc for n, rc in rcs.items() if rc}
        if bad:
            print(f"failed: {bad}", flush=True)
    wall = time.monotonic() - t0
    results = ev.load_results(work / "models", order, ds.fingerprint)
    surfaces, tasks = tuple(features.surfaces), tuple(features.tasks)
    main_res = {n: results[n] for n in main_names if n in results}
    print()
    print(ev.fmt_table(ev.table_rows(main_res, surfaces, tasks), ev.table_header(tasks, ds.has_oracle)))
    figures = ev.summary(main_res, surfaces, tasks)
    if "dcn" in main_res and "gem" in main_res:
        dcn = ev.summary({"gem": main_res["gem"], "dcn": main_res["dcn"]}, surfaces, tasks, baseline="dcn")
        figures["gem_vs_dcn_ne_gain"] = dcn.get("gem_vs_dcn_ne_gain")
        figures["gem_vs_dcn_ne_gain_by_task"] = dcn.get("gem_vs_dcn_ne_gain_by_task")
    if scaling:
        figures["scaling"] = {n: {"params": results[n]["params"]["total"],
                                  "dense_params": results[n]["params"]["dense"],
                                  "history_len": _hist(results[n]["config"]),
                                  "ne": {t: results[n]["test"]["all"][t]["ne"] for t in tasks}}
                              for n in scaling if n in results}
        rows = [[n, v["params"], v["dense_params"], v["history_len"], *(v["ne"][t] for t in tasks)]
                for n, v in figures["scaling"].items()]
        print("\nscaling (test NE, all surfaces)")
        print(_common.table(rows, ["model", "params", "dense params", "history", *(f"NE {t}" for t in tasks)]))
    print()
    for k in ("ne_gap_to_oracle", "gem_vs_dlrm_ne_gain", "gem_vs_dcn_ne_gain"):
        if figures.get(k) is not None:
            print(f"{k}: {figures[k]:+.4f}  by task {figures.get(k + '_by_task')}")
    figures["per_model"] = {n: {"train_examples": r["train_examples"], "train_s": r["train_s"],
                                "test_s": r["test_s"], "params": r["params"], "note": r["note"],
                                "fingerprint": r["fingerprint"],
                                "train_progressive_ne": {t: (r.get("train_progressive") or {}).get(t, {}).get("ne")
                                                         for t in tasks}}
                            for n, r in results.items()}
    figures["dataset"] = {k: ds.meta[k] for k in ("fingerprint", "stats", "joiner", "conversion_window_cdf",
                                                   "events_ingested", "build_s")}
    figures["missing_models"] = [n for n in order if n not in results]
    png = Path(args.plot or Path(args.out).with_suffix(".png"))
    ev.plot(main_res, png, tasks, title=f"model_quality: {preset}, {events:,} events (test {test_events:,}), "
            f"r={args.negative_rate:g} {args.label}")
    print(f"learning curves: {png}")
    _common.write(args.out, "model_quality", {
        "preset": preset, "events": events, "test_events": test_events, "negative_rate": args.negative_rate,
        "test_negative_rate": args.test_negative_rate, "max_len": max_len, "seed": args.seed,
        "sim_seed": args.sim_seed, "quick": args.quick, "jobs": args.jobs, "label": args.label,
        "dataset": ds.meta["dataset"], "models": order, "wall_s": round(wall, 1), "plot": str(png),
        "command": " ".join(sys.argv)}, figures)


def _hist(cfg: dict) -> int:
    return int(cfg["pyramid"]["max_len"]) if cfg.get("use_sequence") else 0


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
