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
impressions, ``base``). ``--quick``: tiny preset, 600k events, GEM + the two baselines (their untrained output
bias still shows in their NE at that size).
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
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
    ap.add_argument("--sim", default="", help="simulator overrides KEY=VALUE[,KEY=VALUE] of SimConfig fields (e.g. "
                    "long_range_cause=conversion,long_range_plant_prob=1); recorded in the dataset's fingerprint")
    ap.add_argument("--models", default=None, help="comma-separated (default: GEM, the baselines and the five "
                    "ablations; with --quick gem,dlrm,dcn); 'none' for no main comparison")
    ap.add_argument("--no-scaling", action="store_true")
    ap.add_argument("--jobs", type=int, default=1, help="models trained at a time (subprocesses)")
    ap.add_argument("--work", default=None, help="dataset + per-model results (default data/model_quality-<preset>)")
    ap.add_argument("--plot", default=None, help="PNG of the learning curves (default next to --out)")
    ap.add_argument("--reuse", action="store_true", help="use the dataset already in --work as it is, without "
                    "checking that it matches these flags and the current simulator (its dataset.json says what it holds)")
    ap.add_argument("--label", default="", help="free text recorded in the JSON (e.g. 'reduced-scale run')")
    ap.add_argument("--render", default=None, help="only write this Markdown report from --out (and --kuairand)")
    ap.add_argument("--kuairand", default="", help="comma-separated `opengem evaluate` JSONs of replayed logs "
                    "for --render")
    ap.add_argument("--seed-jsons", default="", help="--render: comma-separated results of other model seeds")
    ap.add_argument("--note", default="", help="--render: one more caveat, verbatim")
    ap.add_argument("--signal-budget", default="", help="--render: comma-separated bench/signal_budget.py JSONs "
                    "(a section on what the data rewards)")
    ap.add_argument("--signal-runs", default="", help="--render: comma-separated model_quality JSONs of runs on "
                    "the signal-budget datasets other than --out (their NE next to the budget)")
    ap.add_argument("--ablation-runs", default="", help="--render: comma-separated model_quality JSONs of one "
                    "other dataset (model seeds), checked ablation by ablation in their own section")
    ap.add_argument("--scaling-json", default=None, help="--render: take the scaling section from this run's JSON")
    ap.add_argument("--merge", default="", help="only merge these comma-separated results (one dataset, one model "
                    "seed, the same GEM predictions: e.g. a later run that trained more models) into --out")
    ap.add_argument("--_one", default=None, help=argparse_hidden())
    args = ap.parse_args()
    if args.merge:
        inputs = [Path(p) for p in args.merge.split(",") if p]
        if args.out == ap.get_default("out") or Path(args.out).resolve() in {p.resolve() for p in inputs}:
            raise SystemExit("--merge needs an --out of its own (not the default results file, not one of the inputs)")
        doc = merge_runs(inputs)
        Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
        print(f"merged {', '.join(doc['config']['models'])} into {args.out}")
        return
    if args.render:
        doc_dir = Path(args.render).parent
        sb_jsons = [k for k in args.signal_budget.split(",") if k]
        for j in [args.out, args.scaling_json, *[k for k in args.kuairand.split(",") if k], *sb_jsons]:
            if j:  # the PNGs (bench/results/*.png are not committed) go next to the report
                jc = json.loads(Path(j).read_text()).get("config", {})
                for plot in (jc.get("plot") or str(Path(j).with_suffix(".png")), jc.get("plot_click")):
                    if plot and Path(plot).exists():
                        (doc_dir / "model-results").mkdir(parents=True, exist_ok=True)
                        shutil.copyfile(plot, doc_dir / "model-results" / Path(plot).name)
        Path(args.render).write_text(render(args.out, [k for k in args.kuairand.split(",") if k], args.scaling_json,
                                             args.note, [k for k in args.seed_jsons.split(",") if k],
                                             sb_jsons, [k for k in args.signal_runs.split(",") if k],
                                             [k for k in args.ablation_runs.split(",") if k]))
        print(f"wrote {args.render}")
        return
    preset = args.preset or ("tiny" if args.quick else "base")
    events = args.events or (600_000 if args.quick else 13_000_000)
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
        ds = ev.materialize(ev.simulator_source(dcfg, sim_config(args.sim, args.sim_seed, features.surfaces)),
                            work / "dataset", dcfg, features,
                            echo=lambda s: print(s, flush=True))
    specs = ev.standard_models(preset, features)
    scaling = ev.scaling_models(preset, features, max_len)
    for name, s in scaling.items():
        if name not in specs:
            specs[name] = s
    if args.no_scaling or args.quick:
        scaling = {}
    if args._one:  # a worker subprocess of --jobs
        ev.train_and_evaluate(specs[args._one], ds, seed=args.seed, results_dir=work / "models",
                              echo=lambda s: print(s, flush=True))
        return
    models_arg = args.models or ("gem,dlrm,dcn" if args.quick else ",".join(MAIN))
    main_names = [] if models_arg == "none" else [m for m in models_arg.split(",") if m]
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
                                "fingerprint": r["fingerprint"], "code": r.get("code"),
                                "train_progressive_ne": {t: (r.get("train_progressive") or {}).get(t, {}).get("ne")
                                                         for t in tasks}}
                            for n, r in results.items()}
    ci_names = [n for n in order if n != "gem"]
    figures["ne_delta_vs_gem_ci"] = ev.compare_to("gem", ci_names, work / "models", surfaces, tasks)
    figures["dataset"] = {k: ds.meta[k] for k in ("fingerprint", "stats", "joiner", "conversion_window_cdf",
                                                   "events_ingested", "build_s")}
    figures["missing_models"] = [n for n in order if n not in results]
    png = Path(args.plot or Path(args.out).with_suffix(".png"))
    ev.plot(main_res or results, png, tasks, title=f"model_quality: {preset}, {events:,} events (test {test_events:,}), "
            f"r={args.negative_rate:g} {args.label}")
    print(f"learning curves: {png}")
    _common.write(args.out, "model_quality", {
        "preset": preset, "events": events, "test_events": test_events, "negative_rate": args.negative_rate,
        "test_negative_rate": args.test_negative_rate, "max_len": max_len, "seed": args.seed,
        "sim_seed": args.sim_seed, "quick": args.quick, "jobs": args.jobs, "label": args.label,
        "dataset": ds.meta["dataset"], "models": order, "wall_s": round(wall, 1), "plot": str(png),
        "command": shlex.join(sys.argv)}, figures)


def merge_runs(paths: list[Path]) -> dict:
    """One result from several runs of the same dataset, preset, scale and model seed (e.g. a second
    run that trained the models the first did not). GEM's figures must be identical in every run --
    training is deterministic under a seed, so a GEM that differs means the runs are not comparable
    -- and a model that two runs both trained must agree too. The first run's config and command
    are kept; ``merged_from`` lists every run (path, command, time, wall)."""
    import copy

    if len(paths) < 2:
        raise SystemExit("--merge needs at least two results")
    runs = []
    for p in paths:
        try:
            runs.append(json.loads(p.read_text()))
        except (OSError, ValueError) as e:
            raise SystemExit(f"{p}: not a readable results file ({e})") from None
    if "gem" not in runs[0].get("models", {}):
        raise SystemExit(f"{paths[0]}: no gem, its deltas have no common reference")
    same = ("preset", "events", "test_events", "negative_rate", "test_negative_rate", "max_len", "seed", "sim_seed")
    out = copy.deepcopy(runs[0])
    for p, r in zip(paths[1:], runs[1:]):
        diff = [k for k in same if r["config"].get(k) != out["config"].get(k)]
        if r["dataset"]["fingerprint"] != out["dataset"]["fingerprint"]:
            diff.append("dataset fingerprint")
        if diff:
            raise SystemExit(f"{p}: not the same run setting as {paths[0]} ({', '.join(diff)})")
        for m in set(r["models"]) & set(out["models"]):
            if r["models"][m] != out["models"][m]:
                raise SystemExit(f"{p}: {m} differs from {paths[0]}'s: not the same training, not merged")
        if "gem" not in r["models"]:
            raise SystemExit(f"{p}: no gem, its deltas have no common reference")
        for m in r["models"]:
            if m in out["models"]:
                continue
            out["models"][m] = r["models"][m]
            out["config"]["models"].append(m)
            for key in ("per_model", "ne_delta_vs_gem", "ne_delta_vs_gem_ci"):
                if m in (r.get(key) or {}):
                    out.setdefault(key, {})[m] = r[key][m]
    out["missing_models"] = sorted({m for r in runs for m in r.get("missing_models", [])} - set(out["models"]))
    out["merged_from"] = [{"path": str(p), "command": r["config"].get("command"), "time": r.get("time"),
                           "wall_s": r["config"].get("wall_s"), "models": list(r["models"])}
                          for p, r in zip(paths, runs)]
    return out


# ------------------------------------------------------------------------------------ Markdown report

ABLATIONS = {"gem_no_sequence": "no sequence arch", "gem_short_history": "short history only (last 50 events)",
             "gem_no_pyramid": "no pyramid (one full-resolution branch, last 256)",
             "gem_no_interleave": "no interleaving", "gem_shared_head": "one shared head",
             "gem_no_strong": "no strong-kind search slots"}

# Not ablations (nothing is removed): other designs of a part, read against GEM the same way.
VARIANTS = {"gem_mmoe": "gated experts shared by the surfaces (MMoE) instead of a hidden layer per surface tower",
            "gem_shared_conversion": "per-surface click towers, one conversion tower shared by the surfaces"}


def _ci_all(run: dict, m: str, t: str) -> dict | None:
    """``run``'s paired-bootstrap NE − GEM of model ``m`` on task ``t``, all surfaces (None if absent)."""
    return (((run.get("ne_delta_vs_gem_ci") or {}).get(m) or {}).get(t) or {}).get("all")


def _f(v, nd: int = 4) -> str:
    return "n/a" if v is None else f"{v:.{nd}f}"


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:+.2f} %"


def _ablation_lines(seed_runs: list[dict], tasks: tuple[str, ...]) -> list[str]:
    """Checklist lines: does each ablation lose NE (all surfaces) outside the paired bootstrap
    interval, in every model seed of ``seed_runs`` (runs on one dataset; the first is the main one)?"""
    L: list[str] = []
    w = L.append
    doc, others = seed_runs[0], seed_runs[1:]
    dl = doc.get("ne_delta_vs_gem") or {}
    for m, what in ABLATIONS.items():
        if not any(m in r["models"] for r in seed_runs):
            w(f"* Ablation {what}: not run.")
            continue
        per_seed = [(r["config"]["seed"], [_ci_all(r, m, t)
                                           for t in tasks]) for r in seed_runs if m in r["models"]]
        if all(v and v.get("lo") is not None for _, x in per_seed for v in x):
            ok = all(v["lo"] > 0 for _, x in per_seed for v in x)
            w(f"* Ablation {what} loses NE by a measured margin"
              + ((" in every seed" if len(per_seed) == len(seed_runs) else " in every seed it ran in") if others else "")
              + f": **{'yes' if ok else 'no'}** ("
              + "; ".join((f"seed {sd}: " if others else "")
                          + ", ".join(f"{t} {v['delta']:+.4f} [{v['lo']:+.4f}, {v['hi']:+.4f}]"
                                      for t, v in zip(tasks, x)) for sd, x in per_seed) + ").")
        else:
            d = [((dl.get(m) or {}).get(t) or {}).get("all") for t in tasks]
            w(f"* Ablation {what}: NE deltas " + ", ".join(f"{t} {_f(v)}" for t, v in zip(tasks, d))
              + " (no interval).")
    return L


def _variant_lines(seed_runs: list[dict], tasks: tuple[str, ...]) -> list[str]:
    """One line per variant run in ``seed_runs``: its NE − GEM per task and seed, read against the
    paired interval (better / worse / no measurable difference)."""
    L: list[str] = []
    for m, what in VARIANTS.items():
        cells = []
        for r in seed_runs:
            if m not in r["models"]:
                continue
            parts = []
            for t in tasks:
                v = _ci_all(r, m, t)
                if not v or v.get("lo") is None:
                    parts.append(f"{t} n/a")
                    continue
                verdict = "worse" if v["lo"] > 0 else "better" if v["hi"] < 0 else "no measurable difference"
                parts.append(f"{t} {v['delta']:+.4f} [{v['lo']:+.4f}, {v['hi']:+.4f}] ({verdict})")
            cells.append(f"seed {r['config']['seed']}: " + ", ".join(parts))
        if cells:
            L.append(f"* Variant {what} (`{m}`), NE − GEM: " + "; ".join(cells) + ".")
    return L


def _ablation_section(runs: list[dict], paths: list[str], tasks: tuple[str, ...]) -> list[str]:
    """The ablations, seed by seed, on one dataset other than the main run's."""
    L: list[str] = []
    w = L.append
    c0 = runs[0]["config"]
    st = runs[0]["dataset"]["stats"]
    fps = {r.get("dataset", {}).get("fingerprint") for r in runs}
    w("## Ablations on a dataset where every signal can be learned\n")
    sim = re.search(r"--sim (\S+)", c0.get("command", ""))
    w(f"Simulator overrides `{sim.group(1) if sim else '-'}` (dataset {', '.join(sorted(str(f) for f in fps))}; "
      f"{c0['events']:,} events, {st['train']['examples'] + st['test']['examples']:,} impressions, "
      f"{st['train']['kept']:,} train examples, preset `{c0['preset']}`, histories up to {c0['max_len']:,}), model seeds "
      + ", ".join(str(r["config"]["seed"]) for r in runs) + " (" + ", ".join(f"`{p}`" for p in paths) + "). "
      "What the overrides add and why is under 'What the data rewards' below; each run's `gem` is the preset "
      "the run recorded.\n")
    w(f"* Label: {c0.get('label', '')}.")
    L.extend(_ablation_lines(runs, tasks))
    L.extend(_variant_lines(runs, tasks))
    w("")
    w("NE (all surfaces) per seed, and NE − GEM of the same seed with its paired 95 % interval:\n")
    w("| model | seed | NE click | NE conversion | click NE − gem [95 %] | conversion NE − gem [95 %] |")
    w("| --- | --- | --- | --- | --- | --- |")
    for r in runs:
        for m, by in r["models"].items():
            cells = []
            for t in tasks:
                x = _ci_all(r, m, t)
                cells.append(f"{x['delta']:+.4f} [{x['lo']:+.4f}, {x['hi']:+.4f}]" if x and x.get("lo") is not None
                             else "")
            w(f"| {m} | {r['config']['seed']} | {_f(by['all']['click']['ne'])} | {_f(by['all']['conversion']['ne'])} | "
              + " | ".join(cells) + " |")
    w("")
    surfaces = [s for s in next(iter(runs[0]["models"].values())) if s != "all"]
    w("Per surface, NE − GEM (mean over the seeds that ran the model; positive = worse than GEM):\n")
    w("| model | task | " + " | ".join(surfaces) + " |")
    w("| --- | --- | " + " | ".join("---" for _ in surfaces) + " |")
    names = [m for m in dict.fromkeys(m for r in runs for m in r["models"]) if m != "gem"]
    for m in names:
        for t in tasks:
            cells = []
            for sname in surfaces:
                ds = [r["models"][m][sname][t]["ne"] - r["models"]["gem"][sname][t]["ne"] for r in runs
                      if m in r["models"] and "gem" in r["models"]
                      and r["models"][m][sname][t]["ne"] is not None and r["models"]["gem"][sname][t]["ne"] is not None]
                cells.append(f"{sum(ds) / len(ds):+.4f}" if ds else "n/a")
            w(f"| {m} | {t} | " + " | ".join(cells) + " |")
    w("")
    return L


def render(out_json: str, kuairand: list[str], scaling_json: str | None = None, note: str = "",
           seed_jsons: list[str] = (), signal_jsons: list[str] = (), signal_runs: list[str] = (),
           ablation_runs: list[str] = ()) -> str:
    doc = json.loads(Path(out_json).read_text())
    sdoc = json.loads(Path(scaling_json).read_text()) if scaling_json else doc
    c, models = doc["config"], doc["models"]
    tasks = ("click", "conversion")
    surfaces = [s for s in next(iter(models.values())) if s != "all"]
    st = doc["dataset"]["stats"]
    others = [json.loads(Path(f).read_text()) for f in seed_jsons]
    seed_runs = [doc] + others  # every model seed; the checklist asks each of them
    seeds = ", ".join(str(r["config"]["seed"]) for r in seed_runs)
    L: list[str] = []
    w = L.append
    w("# Model quality: GEM vs DLRM / DCNv2, ablations, scaling, gap to the oracle\n")
    w("Produced by `bench/model_quality.py` (harness: `opengem/model/evaluate.py`); every figure below is "
      f"rendered from `{out_json}` by `--render`, nothing typed by hand.\n")
    if c.get("label"):
        w(f"> **{c['label']}.** This run used {c['events']:,} simulator events ({st['train']['examples']:,} train + "
          f"{st['test']['examples']:,} test impressions; the train window's negatives downsampled to "
          f"r = {c['negative_rate']:g}, i.e. {st['train']['kept']:,} train examples per model), the `{c['preset']}` "
          f"preset, " + (f"one model seed ({c['seed']})" if not others else
                         f"model seeds {seeds} (the same data; the checklist asks every seed)")
          + f", histories read up to {c['max_len']:,} events, on a 2-core CPU. "
          "The acceptance run asks for >= 2M impressions (`--events 13000000 --test-events 1000000`, ~2.2M "
          "impressions); " + ("this is that size.\n" if st['train']['examples'] + st['test']['examples'] >= 2_000_000
                               else "this is not that run, and its margins are for this scale only.\n"))
    ci = doc.get("ne_delta_vs_gem_ci") or {}
    dl = doc.get("ne_delta_vs_gem") or {}
    w("## Acceptance checklist (issue 4), as measured by this run\n")
    beats = {}
    for b in ("dlrm", "dcn"):
        if b in models and "gem" in models:
            beats[b] = [(s, t) + ((f"seed {r['config']['seed']}",) if others else ())
                        for r in seed_runs if b in r["models"] and "gem" in r["models"]
                        for s in surfaces for t in tasks
                        if (r["models"]["gem"][s][t]["ne"] or 9) >= (r["models"][b][s][t]["ne"] or 9)]
    full = c["events"] >= 13_000_000 and c["preset"] == "base"
    w(f"* Scale >= 2M impressions, `base`: **{'met' if full else 'not met'}** ({st['train']['examples'] + st['test']['examples']:,} "
      f"impressions, preset `{c['preset']}`).")
    for b, lost in beats.items():
        w(f"* GEM's NE beats {b.upper()} on every surface and task" + (" in every seed" if others else "")
          + f": **{'yes' if not lost else 'no'}**"
          + ("" if not lost else f" (not on: {', '.join('/'.join(x) for x in lost)})") + ".")
    L.extend(_ablation_lines(seed_runs, tasks))
    w(f"* Gap to oracle reported: yes ({_pct(doc.get('ne_gap_to_oracle'))} mean over surfaces and tasks).")
    sc = sdoc.get("scaling") or {}
    ref_len = _hist(next((r for n, r in _configs(sdoc).items() if n == "gem"), {})) if sc else 0
    sizes = sorted({v["params"] for v in sc.values() if v["history_len"] == ref_len}) if sc else []
    hists = sorted({v["history_len"] for v in sc.values()}) if sc else []
    w(f"* Scaling (preset `{sdoc['config']['preset']}`, {sdoc['config']['events']:,} events): {len(sizes)} sizes at "
      f"history {ref_len}, history windows {hists} (wanted >= 3 sizes and 50 / 500 / 4096).")
    w(f"* Real logs (KuaiRand, temporal split): {'done, ' + str(len(kuairand)) + ' label pair(s)' if kuairand else 'not run'}.")
    w("* Tests: `tests/model/test_evaluate.py` (temporal split, point-in-time history lengths checked against the raw "
      "stream, sampling weights, determinism of the data and of training under a seed, resume, metric definitions, "
      "the CLI on the KuaiRand fixture); determinism of the model and 'all parts off = the plain non-sequence "
      "path' are `tests/model/test_gem.py`.\n")
    ci = doc.get("ne_delta_vs_gem_ci") or {}
    dl = doc.get("ne_delta_vs_gem") or {}
    w("## Rerun\n")
    w("```bash")
    w(f".venv/bin/python {c['command'].replace(' --reuse', '')}")
    if c["events"] < 13_000_000:
        w("# the acceptance size (resumable across sessions: per-model JSON under <work>/models):")
        w(".venv/bin/python bench/model_quality.py --events 13000000 --test-events 1000000 --max-len 1024 --jobs 2 "
          "--no-scaling --work data/model_quality-base-full --label 'acceptance-scale run' "
          "--out bench/results/model_quality_full.json")
    if sdoc is not doc:
        w("# the scaling run (its own dataset):")
        w(f".venv/bin/python {sdoc['config']['command'].replace(' --reuse', '')}")
    for f in seed_jsons:
        w("# another model seed (same data; builds its own copy of the dataset under its --work):")
        w(f".venv/bin/python {json.loads(Path(f).read_text())['config']['command'].replace(' --reuse', '')}")
    for f in signal_runs:
        w("# a run on another simulator setting (its own dataset):")
        w(f".venv/bin/python {json.loads(Path(f).read_text())['config']['command'].replace(' --reuse', '')}")
    for f in ablation_runs:
        w("# the ablations on the dataset where every signal can be learned (one model seed each):")
        adoc = json.loads(Path(f).read_text())
        merged = adoc.get("merged_from")
        for cmd in ([m["command"] for m in merged] if merged else [adoc["config"]["command"]]):
            w(f".venv/bin/python {cmd.replace(' --reuse', '')}")
        if merged:
            w(f".venv/bin/python bench/model_quality.py --merge {','.join(m['path'] for m in merged)} --out {f}")
    for f in signal_jsons:
        w("# the signal budget of a dataset (no training):")
        sc = json.loads(Path(f).read_text())["config"]
        w(f".venv/bin/python bench/signal_budget.py --work {','.join(sc['work'])} --out {f}")
    w("# this report:")
    w(".venv/bin/python bench/model_quality.py --out " + out_json + " --render docs/model-results.md"
      + (" --kuairand " + ",".join(kuairand) if kuairand else "")
      + (f" --scaling-json {scaling_json}" if scaling_json else "")
      + (f" --seed-jsons {','.join(seed_jsons)}" if seed_jsons else "")
      + (f" --signal-budget {','.join(signal_jsons)}" if signal_jsons else "")
      + (f" --signal-runs {','.join(signal_runs)}" if signal_runs else "")
      + (f" --ablation-runs {','.join(ablation_runs)}" if ablation_runs else "")
      + (f" --note {shlex.quote(note)}" if note else ""))
    w("```\n")
    w("## Protocol\n")
    d = c["dataset"]
    w(f"* Data: the simulator (`SimConfig(seed={c['sim_seed']})`, every signal on: drift, cross-domain, long-range "
      "intent, interactions, delayed conversions, cold start, heavy-tailed activity), materialized **once** "
      "through the stream worker's own ingest step (`stream/ingest.Ingestor`: the RocksDB sequence store and the "
      f"label joiner; click window {d['click_window_s']:g} s, post-click conversion window {d['conversion_window_s']:g} s), "
      "and each example's history read from the store *as of the impression* by `model/data.examples_batch` "
      f"(the trainer's and the server's read; up to {d['max_len']:,} events; `make_batch` drops anything at or "
      "after the impression). Every model trains on the identical batches in the identical order.")
    w(f"* Temporal split: the train window is the impressions among the first {c['events'] - c['test_events']:,} "
      f"events, the test window those among the next {c['test_events']:,}; labels complete (the simulator runs "
      "past the test window until every window closed).")
    w(f"* Training: the trainer's own step (`OnlineLearner`: DMP, fused row-wise Adagrad on the tables, Adam on the "
      f"rest, batch {d['batch_size']}), predict-then-train over the train window once; kept negatives weigh "
      f"1/r = {1 / c['negative_rate']:g}. Then frozen and scored on the whole test window "
      f"(r = {c['test_negative_rate']:g}: NE / AUC / calibration exactly as `model/metrics.py` computes them).")
    w("* Oracle: the simulator's true probabilities of the same labels on the same test examples "
      f"(`p_click`; `p_conversion x conversion_delay_cdf(W)` = {doc['dataset']['conversion_window_cdf']:.3f} x p_conversion "
      "for the windowed conversion label).")
    w(f"* Seeds: simulator {c['sim_seed']}, sampling 0, model {c['seed']} (same for every model).\n")
    w("## Headline\n")
    w("| figure | all tasks | click | conversion |")
    w("| --- | --- | --- | --- |")
    for k, label in (("ne_gap_to_oracle", "GEM NE gap to oracle, (ne - oracle) / oracle, mean over surfaces"),
                     ("gem_vs_dlrm_ne_gain", "GEM vs DLRM NE gain, (dlrm - gem) / dlrm, mean over surfaces"),
                     ("gem_vs_dcn_ne_gain", "GEM vs DCNv2 NE gain, (dcn - gem) / dcn, mean over surfaces")):
        bt = doc.get(k + "_by_task") or {}
        w(f"| {label} | {_pct(doc.get(k))} | {_pct(bt.get('click'))} | {_pct(bt.get('conversion'))} |")
    w("")
    w("## Every model, every surface (test window)\n")
    w("| model | surface | n | NE click | AUC click | cal click | NE conv | AUC conv | cal conv | oracle NE click | oracle NE conv |")
    w("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for m, per in models.items():
        for s in ["all", *surfaces]:
            if s not in per:
                continue
            ck, cv = per[s]["click"], per[s]["conversion"]
            w(f"| {m} | {s} | {ck['n']:,} | {_f(ck['ne'])} | {_f(ck['auc'])} | {_f(ck['calibration'], 3)} | "
              f"{_f(cv['ne'])} | {_f(cv['auc'])} | {_f(cv['calibration'], 3)} | {_f(ck.get('oracle_ne'))} | "
              f"{_f(cv.get('oracle_ne'))} |")
    w("")
    w("Positives in the test window: " + ", ".join(
        f"{s} {int(models['gem'][s]['click']['positives_weighted'] or 0):,} clicks / "
        f"{int(models['gem'][s]['conversion']['positives_weighted'] or 0):,} conversions"
        for s in ["all", *surfaces] if "gem" in models and s in models["gem"]) + ".\n")
    w("## GEM vs baselines and ablations: NE(model) - NE(GEM)\n")
    w("Positive = the model is worse than GEM. In brackets a 95 % paired bootstrap interval over the test "
      "examples (both models scored on each resample; it covers the test sample's noise, not the training "
      "seed's -- one seed per model here).\n")
    ci = doc.get("ne_delta_vs_gem_ci") or {}
    dl = doc.get("ne_delta_vs_gem") or {}
    for t in tasks:
        w(f"**{t}**\n")
        w("| model | " + " | ".join(["all", *surfaces]) + " |")
        w("| --- |" + " --- |" * (1 + len(surfaces)))
        for m in models:
            if m == "gem":
                continue
            cells = []
            for s in ["all", *surfaces]:
                x = (ci.get(m) or {}).get(t, {}).get(s)
                if x and x.get("delta") is not None:
                    cells.append(f"{x['delta']:+.4f} [{_f(x.get('lo'))}, {_f(x.get('hi'))}]")
                else:
                    v = (dl.get(m) or {}).get(t, {}).get(s)
                    cells.append("n/a" if v is None else f"{v:+.4f}")
            w(f"| {m} | " + " | ".join(cells) + " |")
        w("")
    w("### Verdicts\n")
    for m in [*("dlrm", "dcn"), *ABLATIONS]:
        if m not in models or "gem" not in models:
            continue
        lines = []
        for t in tasks:
            x = (ci.get(m) or {}).get(t, {}).get("all")
            v = (dl.get(m) or {}).get(t, {}).get("all")
            worse_surf = [s for s in surfaces if ((dl.get(m) or {}).get(t, {}).get(s) or 0) > 0]
            if x and x.get("lo") is not None:
                sig = ("loses (interval above 0)" if x["lo"] > 0 else "wins (interval below 0)" if x["hi"] < 0
                       else "no measurable difference (interval spans 0)")
                lines.append(f"{t}: {x['delta']:+.4f} NE, {sig}; worse than GEM on {len(worse_surf)}/{len(surfaces)} surfaces")
            elif v is not None:
                lines.append(f"{t}: {v:+.4f} NE (no interval: predictions not saved); worse than GEM on "
                             f"{len(worse_surf)}/{len(surfaces)} surfaces")
        w(f"* **{m}** ({ABLATIONS.get(m, 'baseline')}): " + "; ".join(lines) + ".")
    w("")
    if seed_jsons:
        w("## Seed-to-seed variation\n")
        w("The same dataset, other model seeds (initial weights; the data, its order and the sampling are fixed). "
          "The spread between seeds is the yardstick for the ablation deltas above.\n")
        w("| model | seed | NE click | NE conversion | AUC click | AUC conversion |")
        w("| --- | --- | --- | --- | --- | --- |")
        for m in models:
            runs = [(c["seed"], models[m])] + [(o["config"]["seed"], o["models"][m]) for o in others if m in o["models"]]
            if len(runs) < 2:
                continue
            for sd, per in runs:
                a = per["all"]
                w(f"| {m} | {sd} | {_f(a['click']['ne'])} | {_f(a['conversion']['ne'])} | {_f(a['click']['auc'])} | "
                  f"{_f(a['conversion']['auc'])} |")
            for t in tasks:
                v = [per["all"][t]["ne"] for _, per in runs if per["all"][t]["ne"] is not None]
                w(f"| {m} | spread ({t}) | max - min = {max(v) - min(v):.4f} | | | |")
        w("")
        w("NE minus GEM's NE of the same seed (all surfaces), per seed and the mean over seeds; "
          "[95 %] is the paired bootstrap over test examples of that seed (it does not contain "
          "the seed-to-seed variation, which the per-seed columns show):\n")
        w("| model | " + " | ".join(f"{t}: seed {r['config']['seed']} [95 %]" for t in tasks for r in seed_runs)
          + " | " + " | ".join(f"{t}: mean" for t in tasks) + " |")
        w("|---" * (len(tasks) * (len(seed_runs) + 1) + 1) + "|")
        for m in models:
            if m == "gem":
                continue
            cells, means = [], []
            for t in tasks:
                ds = []
                for r in seed_runs:
                    x = _ci_all(r, m, t)
                    cells.append("n/a" if not x or x.get("lo") is None else f"{x['delta']:+.4f} [{x['lo']:+.4f}, {x['hi']:+.4f}]")
                    if x:
                        ds.append(x["delta"])
                means.append(f"{sum(ds) / len(ds):+.4f}" if len(ds) == len(seed_runs) else "n/a")
            w(f"| {m} | " + " | ".join(cells) + " | " + " | ".join(means) + " |")
        w("")
    if ablation_runs:
        L.extend(_ablation_section([json.loads(Path(f).read_text()) for f in ablation_runs], list(ablation_runs),
                                   tasks))
    if signal_jsons:
        import signal_budget

        L.extend(signal_budget.render_md(list(signal_jsons), [out_json, *signal_runs]))
    if sdoc.get("scaling"):
        scc = sdoc["config"]
        sst = sdoc["dataset"]["stats"]
        w("## Scaling (test NE, all surfaces)\n")
        if sdoc is not doc:
            w(f"A separate run: preset `{scc['preset']}` (its own tables, so its own dataset), {scc['events']:,} "
              f"simulator events (test window {scc['test_events']:,}), {sst['train']['kept']:,} train examples "
              f"(r = {scc['negative_rate']:g}), {sst['test']['examples']:,} test examples, histories read up to "
              f"{scc['max_len']:,} events; same protocol, seeds and simulator. Command: "
              f"`.venv/bin/python {scc['command'].replace(' --reuse', '')}`.\n")
        sci = sdoc.get("ne_delta_vs_gem_ci") or {}
        w("| model | parameters (dense) | history window | NE click | NE conversion | click NE - gem [95 %] | "
          "conversion NE - gem [95 %] |")
        w("| --- | --- | --- | --- | --- | --- | --- |")
        for m, v in sdoc["scaling"].items():
            d = []
            for t in tasks:
                x = ((sci.get(m) or {}).get(t) or {}).get("all")
                d.append("(reference)" if m == "gem" else "n/a" if not x else
                         f"{x['delta']:+.4f} [{_f(x.get('lo'))}, {_f(x.get('hi'))}]")
            w(f"| {m} | {v['params']:,} ({v['dense_params']:,}) | {v['history_len']} | {_f(v['ne'].get('click'))} | "
              f"{_f(v['ne'].get('conversion'))} | {d[0]} | {d[1]} |")
        if sdoc is not doc and sdoc["config"].get("plot"):
            w(f"\n![scaling run: learning curves](model-results/{Path(sdoc['config']['plot']).name})")
        missing = [m for m in sdoc.get("missing_models", [])]
        if missing:
            w(f"\nNot run in this session: {', '.join(missing)}.")
        w("")
    w(f"![learning curves](model-results/{Path(c.get('plot') or 'model_quality.png').name})\n")
    if kuairand:
        w("## Real logs: the KuaiRand extract\n")
        w("KuaiRand (Gao et al., CIKM 2022, CC BY-SA 4.0), the 41,828-row development extract "
          "(664 users, 9,359 videos; rows are logged impressions with their labels), replayed through "
          "`opengem replay`'s mapping into the same harness: events sorted by time, the last 25 % of events the "
          "test window, no negative downsampling (the extract is mostly positives), preset `base`, seed 0. "
          "The second task is the named label *after a click* (the joiner attributes conversions to clicks). "
          "Small and selected (only users with likes / hates, k-core 15): a realism check, not a leaderboard.\n")
        w("| label pair | model | train ex. | test ex. | NE click | AUC click | cal click | NE 2nd | AUC 2nd | cal 2nd |")
        w("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for f in kuairand:
            k = json.loads(Path(f).read_text())
            mapping = k["dataset"]["source"].get("mapping", "")
            second = mapping.split("conversion=")[-1].split(",")[0] if "conversion=" in mapping else "conversion"
            for m, per in k["models"].items():
                a = per["all"]
                w(f"| click, {second} | {m} | {k['per_model'][m]['train_examples']:,} | {a['click']['n']:,} | "
                  f"{_f(a['click']['ne'])} | {_f(a['click']['auc'])} | {_f(a['click']['calibration'], 3)} | "
                  f"{_f(a['conversion']['ne'])} | {_f(a['conversion']['auc'])} | {_f(a['conversion']['calibration'], 3)} |")
        w("")
        for f in kuairand:
            w(f"![{Path(f).stem}](model-results/{Path(f).with_suffix('.png').name})")
        w("")
        w("Commands (the data path is an argument; nothing reads it at test time -- the test uses "
          "`tests/fixtures/kuairand_sample.tsv`):\n")
        w("```bash")
        for f in kuairand:
            k = json.loads(Path(f).read_text())
            mp = k["dataset"]["source"].get("mapping", "")
            name = Path(f).stem.replace("model_quality_", "")
            w(f".venv/bin/opengem evaluate --replay <kuairand-27k-extract>/interactions.tsv --mapping \"{mp}\" "
              f"--models gem,dlrm,dcn --preset base --negative-rate 1 --test-fraction 0.25 "
              f"--work data/evaluate-{name.replace('_', '-')} --json {f}")
        w("```\n")
    codes = {m: (v.get("code") or {}) for m, v in doc.get("per_model", {}).items()}
    shas = {v.get("sources_sha") for v in codes.values()}
    if len(shas) == 1 and None not in shas:
        v = next(iter(codes.values()))
        w(f"Code: every model ran the same model/features/stream sources (sha {v['sources_sha']}, on commit "
          f"{v['commit'][:8]}).\n")
    else:
        w("Code: the working tree changed between models (other engineers' commits during the session); sources "
          "per model: " + ", ".join(f"{m} {v.get('sources_sha', '?')} @ {str(v.get('commit', '?'))[:8]}"
                                    for m, v in codes.items()) + ".\n")
    w("## Caveats\n")
    steps = f"{st['train']['kept']:,} examples (~{st['train']['kept'] // c['dataset']['batch_size']:,} optimizer steps)"
    if others:
        def _delta(r, m, t):
            return ((((r.get("ne_delta_vs_gem") or {}).get(m) or {}).get(t) or {}).get("all"))
        flips = [m for m in ABLATIONS if all(m in r["models"] for r in seed_runs) and any(
            len({(d or 0) > 0 for d in (_delta(r, m, t) for r in seed_runs)}) > 1 for t in tasks)]
        w(f"* {len(seed_runs)} model seeds ({seeds}): the bootstrap intervals cover the test sample's noise only; "
          f"the seed-to-seed variation of training on {steps} is measured above"
          + (f", and where an ablation's delta changes sign between seeds ({', '.join(flips)}) it is as large as "
             "the part's effect" if flips else "") + ". More seeds (`--seed N` with its own `--work`) would "
          "narrow it.")
    else:
        w(f"* One model seed per model: the bootstrap intervals cover the test sample's noise, not the seed-to-seed "
          f"variation of training, which on {steps} can be as large as the differences between ablations. Repeat "
          "with `--seed 1,2,...` (separate `--work` results) before trusting a small margin.")
    w("* Models are not converged at this scale: the progressive NE is still falling at the end of the train window "
      "(plot), and which parts pay off can change with more data -- the long-range and cross-domain signals need "
      "users with long histories, and most of the sequence arch's parameters are trained by few steps.")
    w("* Every model gets the dense history counters (per kind, length, recency, matches with the target ad) over the "
      "same read window; an ablation that shortens the sequence only shortens what the sequence arch attends to. "
      "DLRM / DCNv2 read neither the sequence nor the surface (their papers' form), so 'GEM vs DLRM' measures the "
      "sequence arch, the per-surface heads and Wukong together.")
    if note:
        w(f"* {note}")
    w("* 'No pyramid' is one full-resolution branch over the last 256 events (config.with_pyramid(pyramid=False, "
      "max_len=256), as the config documents): full-resolution attention over 1024 events costs 16x the 256 one.")
    w("")
    w("## Machine\n")
    mc = doc["machine"]
    w(f"{mc.get('cpu')} ({mc.get('cpu_count')} cores, shared with other jobs during the run), torch {mc.get('torch')}; "
      f"models trained {sum(v['train_s'] + v['test_s'] for v in doc.get('per_model', {}).values()):,.0f} s in all "
      "(several at a time). Per model, train + test seconds: "
      + ", ".join(f"{m} {v['train_s']:.0f}+{v['test_s']:.0f} s" for m, v in doc.get("per_model", {}).items()) + ".\n")
    return "\n".join(L) + "\n"


def _configs(doc: dict) -> dict:
    """{model: its config dict} from a results JSON (per_model does not carry configs: use history_len)."""
    return {n: {"use_sequence": v["history_len"] > 0, "pyramid": {"max_len": v["history_len"]}}
            for n, v in (doc.get("scaling") or {}).items()}


def _hist(cfg: dict) -> int:
    return int(cfg["pyramid"]["max_len"]) if cfg.get("use_sequence") else 0


def sim_config(overrides: str, seed: int, surfaces: Sequence[str]):
    """SimConfig(seed, surfaces) with ``KEY=VALUE,...`` overrides (values read as JSON, else as strings);
    unknown keys and wrong types raise SystemExit."""
    from opengem.config import ConfigError, from_dict
    from opengem.stream.simulator import SimConfig

    d: dict = {"seed": seed, "surfaces": list(surfaces)}
    for item in (x for x in overrides.split(",") if x.strip()):
        k, sep, v = item.partition("=")
        if not sep:
            raise SystemExit(f"--sim: {item!r} is not KEY=VALUE")
        try:
            d[k.strip()] = json.loads(v)
        except ValueError:
            d[k.strip()] = v.strip()
    try:
        return from_dict(SimConfig, d, "sim")
    except (ConfigError, ValueError) as e:
        raise SystemExit(f"--sim: {e}") from None


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
