"""Knowledge transfer: GEM teaching a small per-surface student, technique by technique.

Data: one simulator stream (all signals on; faster interest drift than the
default so that a teacher's staleness matters: ``drift_strength`` 3 / day over
a ~6 h window; and a market drift, ``market_drift_std`` 0.4 with a 30 min
correlation time: one click-logit offset for all traffic that no feature
explains, so a teacher published D ago is miscalibrated by m(t) - m(t - D) --
the case the Student Adapter is for; ``--market-drift-std 0`` turns it off) materialized once by :func:`opengem.model.evaluate.materialize`
-- the stream worker's ingest + joiner, the point-in-time read -- into a train
and a test window in event time.

Protocol (what a new student of an established foundation model sees):

1. **Teacher**: GEM (``--preset``) trains online, predict-then-train, over the
   whole train window. Its *published* version lags the stream by a delay D:
   the teacher output for an example at time t comes from the snapshot of the
   teacher at ``t - D`` (snapshots every ``--snapshot-s`` of event time; D = 0:
   the teacher just before the example, i.e. its progressive prediction).
   For every example and every D the bench records the teacher's
   probabilities and its user-side representation
   (:func:`~opengem.model.student.teacher_user_representation`).
2. **Students** (``--surface``, DLRM-sized, last 32 events) train online on the
   last ``--student-frac`` (25 %) of the train window, on that surface's
   examples only -- a new student of a foundation model that has seen far
   more traffic than it (the regime transfer is for) -- each
   with one technique: alone; + distillation -- standard KD, the
   teacher's probability mixed into the *served* head's target
   (``StudentConfig.soft_mix``), or the auxiliary-head variant (a second head on
   the teacher's targets, never served: the served head learns from the teacher
   through the shared bottom only); + Student Adapter (targets recalibrated on
   fresh labels); + a transfer set (before its window the student distills, no
   label read, on the surface's earlier traffic scored by the teacher published
   at its start: what KD can use that labels cannot); + representations (GEM's
   user-side outputs as inputs: its 512-wide trunk input, its trunk's output, or
   its surface head's logits for the user with the ad blanked); + parameter
   sharing (GEM's tables from the snapshot at the students' start − D,
   fine-tuned or frozen); all together (``TECHNIQUES``; ``--only`` /
   ``--variants`` pick others). Then every model is scored on the surface's test window (NE
   as :mod:`opengem.model.metrics`): by default progressively -- each model,
   the teacher included, predicts every test example and then trains on it,
   the online regime of the daemons (labels count as known at once, for every
   model alike) -- or, with ``--eval frozen``, frozen at the end of the train
   window (under the market drift every frozen model's calibration ages over
   the window, which then dominates the NE). The adapter is fitted on the
   freshest ``--adapter-window`` labelled examples (1024, ~10 min of the
   student's traffic here).
3. ``transfer_ratio`` of a technique = (NE_alone − NE_technique) /
   (NE_alone − NE_teacher), click task (conversion NE reported alongside; too
   few conversions per surface in a short window to carry a ratio);
   ``combined_over_distill`` = the combined ratio / plain distillation's.
   Staleness sweep: distillation without / with the adapter at each D in
   ``--delays``, for both kinds of distillation (``SWEEP``), each student
   trained with ``--student-seeds`` seeds on the same teacher outputs and rows:
   the adapter's gain per seed is a paired difference, reported as the mean,
   its standard error and how many seeds gained; the teacher's
   calibration (weighted sum p / sum y) on the students' window and the test
   window per D says how far staleness moved it.
4. Serving cost: model forward for 500 candidates of one user with a 1k-event
   history, student vs GEM (GEM's user side once, ``encode_user`` +
   ``candidate_logits``), interleaved repeats: p50/p99 ms and their ratio.
   In process, not through the RPC (bench/serve.py measures the RPC).

With ``--work`` the teacher phase's outputs are kept there
(``teacher-<config hash>.pt``; ``--no-teacher-cache`` retrains), so students'
variants rerun without retraining GEM (the cache records the model code's hash
and the JSON both hashes).

JSON keys: per technique ``student_ne``, ``transfer_ratio``; ``teacher_ne``,
``student_alone_ne``, ``combined_over_distill``; ``staleness`` (per D and
kind the distillation and adapter NE, the adapter's gain -- means over the
student seeds -- ``adapter_gain_se``, ``adapter_gain_seeds``); ``serving``
(``student_p99_ms``, ``gem_p99_ms``, ratio).
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    from _common import parser, table, write

    from opengem.model.batch import FeatureConfig, synthetic_batch
    from opengem.model.config import preset
    from opengem.model.distributed import init_distributed
    from opengem.model.evaluate import DatasetConfig, materialize, simulator_source, window_metrics
    from opengem.model.student import StudentAdapter, StudentConfig, StudentInputs, StudentLearner, select_rows
    from opengem.model.train_config import TrainConfig
    from opengem.model.trainer import quiet_torchrec
    from opengem.stream.simulator import SimConfig

    ap = parser("transfer", __doc__)
    ap.add_argument("--preset", default="", help="teacher GEM preset (default base; quick tiny)")
    ap.add_argument("--events", type=int, default=0, help="simulator events (default 600k; quick 150k)")
    ap.add_argument("--surface", default="feed")
    ap.add_argument("--delay", type=float, default=600.0, help="teacher lag D (s of event time) of the main table")
    ap.add_argument("--delays", default="0,600,3600", help="staleness sweep, seconds")
    ap.add_argument("--snapshot-s", type=float, default=300.0, help="teacher snapshot interval (event time)")
    ap.add_argument("--hours", type=float, default=6.0, help="event time the stream spans")
    ap.add_argument("--market-drift-std", type=float, default=0.4,
                    help="SimConfig.market_drift_std: a global click-logit walk no feature explains, what ages a "
                         "teacher's calibration (0: off, the simulator's default)")
    ap.add_argument("--market-drift-tau-s", type=float, default=1800.0, help="its correlation time (s of event time)")
    ap.add_argument("--eval", choices=("progressive", "frozen"), default="progressive",
                    help="test window: every model (teacher included) predicts each example, then trains on it "
                         "(progressive, the online regime the daemons run in), or all frozen at the end of the "
                         "train window (under market drift that measures how fast calibration ages)")
    ap.add_argument("--adapter-window", type=int, default=1024,
                    help="Student Adapter: fitted on the freshest this many labelled examples")
    ap.add_argument("--adapter-refit", type=int, default=256, help="Student Adapter: refitted every this many")
    ap.add_argument("--student-frac", type=float, default=0.25,
                    help="students train on the last this fraction of the train window (the teacher on all of it)")
    ap.add_argument("--student-lr", type=float, default=3e-3,
                    help="students' Adam learning rate (dense part); 3e-3: the best of 1e-3 / 3e-3 / 1e-2 for the "
                         "student alone on the 400k-event stream (docs/transfer-results.md)")
    ap.add_argument("--only", default="", help="run only these techniques (comma-separated names)")
    ap.add_argument("--variants", default="",
                    help='extra techniques, JSON {name: run_student keywords}, e.g. {"soft5": {"soft": 0.5}}')
    ap.add_argument("--no-sweep", action="store_true", help="skip the staleness sweep")
    ap.add_argument("--no-serving", action="store_true", help="skip the serving-latency measurement")
    ap.add_argument("--no-teacher-cache", action="store_true",
                    help="retrain the teacher even if --work holds its outputs for this configuration")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--student-seeds", type=int, default=4,
                    help="the staleness sweep trains every student with this many seeds (seed, seed+1, ...) on the "
                         "same teacher and data: the adapter's gain is a paired difference per seed")
    ap.add_argument("--work", default="", help="where the dataset goes (default: a temp dir, removed)")
    args = ap.parse_args()
    quiet_torchrec()
    q = args.quick
    preset_name = args.preset or ("tiny" if q else "base")
    n_events = args.events or (150_000 if q else 1_500_000)
    delays = sorted({float(x) for x in args.delays.split(",")} | {args.delay})
    t_start = time.monotonic()

    # ---------------------------------------------------------------- data
    features = FeatureConfig()
    gem_cfg = dataclasses.replace(preset(preset_name), features=features)
    sim = SimConfig(seed=args.seed, events_per_second=n_events / (args.hours * 3600), drift_strength=3.0,
                    market_drift_std=args.market_drift_std, market_drift_tau_s=args.market_drift_tau_s)
    dcfg = DatasetConfig(events=n_events, test_events=n_events // 5, sim_seed=args.seed,
                         max_len=max(256, gem_cfg.pyramid.max_len), negative_rate=0.25, batch_size=256)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-transfer-"))
    ds = materialize(simulator_source(dcfg, sim), work / "dataset", dcfg, features)
    surfaces, tasks = tuple(features.surfaces), tuple(features.tasks)
    s_idx = surfaces.index(args.surface)
    train = list(ds.batches("train"))
    test = list(ds.batches("test"))
    t_lo = int(train[0][1]["ts"].min())
    t_hi = int(train[-1][1]["ts"].max())
    t_mid = int(t_hi - args.student_frac * (t_hi - t_lo))  # students start here
    n_train = sum(len(b) for b, _ in train)
    print(f"dataset: {sum(len(b) for b, _ in train):,} train / {sum(len(b) for b, _ in test):,} test examples, "
          f"train window {(t_hi - t_lo) / 3.6e6:.2f} h; students from {(t_mid - t_lo) / 3.6e6:.2f} h on", flush=True)

    # ---------------------------------------------------------------- teacher
    info = init_distributed("cpu")
    tcfg = TrainConfig(preset=preset_name, metrics_port=None)
    progressive = args.eval == "progressive"
    cache_key = {"preset": preset_name, "dataset": ds.fingerprint,
                 "events": n_events, "sim": dataclasses.asdict(sim), "delays": delays, "snapshot_s": args.snapshot_s,
                 "student_frac": args.student_frac, "eval": args.eval, "surface": args.surface, "seed": args.seed,
                 "cache_format": 2}
    key_hash = hashlib.sha1(json.dumps(cache_key, sort_keys=True, default=str).encode()).hexdigest()[:12]
    cache_path = work / f"teacher-{key_hash}.pt"
    code_hash = model_code_hash()
    tc = None
    if args.work and cache_path.exists() and not args.no_teacher_cache:
        tc = load_teacher_cache(cache_path, gem_cfg)
        if tc["code_hash"] != code_hash:
            print(f"note: the teacher cache {cache_path} was made by other model code ({tc['code_hash']} vs "
                  f"{code_hash} now); reused (--no-teacher-cache retrains)", flush=True)
        print(f"teacher outputs from {cache_path} (trained in {tc['teacher_s']:.0f}s)", flush=True)
    if tc is None:
        tc = train_teacher(args, gem_cfg, tcfg, info, train, test, delays, s_idx, t_lo, t_hi, t_mid, progressive)
        tc["code_hash"] = code_hash
        if args.work:
            save_teacher_cache(cache_path, tc)
    out, share_src, final, R = tc["out"], tc["share_src"], tc["final"], tc["R"]
    teacher_s, spent = tc["teacher_s"], tc["spent"]
    print(f"teacher: {n_train:,} examples in {teacher_s:.0f}s ("
          + ", ".join(f"{k} {v:.0f}" for k, v in spent.items()) + f"); R = {R}", flush=True)

    # ---------------------------------------------------------------- students
    def test_rows():
        for bi, (b, ex) in enumerate(test):
            mine = b.surface_idx == s_idx
            yield bi, select_rows(b, mine), ex["weight"][mine]

    test_sel = list(test_rows())
    y_test = np.concatenate([sb.labels.numpy() for _, sb, _ in test_sel])
    w_test = np.concatenate([w.numpy() for _, _, w in test_sel]).astype(np.float64)
    zeros = np.zeros(len(y_test), np.int64)

    def score(p: np.ndarray) -> dict:
        return window_metrics(p, y_test, w_test, zeros, ("s",), tasks)["s"]

    teacher_test = tc["teacher_test"] if progressive else \
        np.concatenate([teacher_outputs(final, sb, R, len(tasks))[0] for _, sb, _ in test_sel])
    teacher_score = score(teacher_test)

    # The students' window: per train batch, the surface's rows from t_mid on (and their weights).
    student_rows = []
    for bi, (b, ex) in enumerate(train):
        mine = (b.surface_idx == s_idx) & (ex["ts"] >= t_mid)
        if bool(mine.any()):
            student_rows.append((bi, select_rows(b, mine), ex["weight"][mine], mine[b.surface_idx == s_idx].numpy()))
    transfer_rows = []  # the transfer set: the surface's rows before t_mid (no label is used)
    for bi, _ in tc["transfer_prog"]:
        b, ex = train[bi]
        rows = (b.surface_idx == s_idx) & (ex["ts"] < t_mid)
        transfer_rows.append((bi, select_rows(b, rows), ex["weight"][rows]))

    def calib(p: np.ndarray, y: np.ndarray, w: np.ndarray) -> list[float]:
        """sum w p / sum w y per task: the teacher's calibration where the adapter is fitted."""
        return [float((w * p[:, t]).sum() / max((w * y[:, t]).sum(), 1e-12)) for t in range(len(tasks))]

    teacher_calibration = {}
    for d in delays:
        by_bi = {bi: rest for bi, *rest in out[d]["train"]}
        p_tr = np.concatenate([by_bi[bi][0][keep] for bi, _, _, keep in student_rows])
        y_tr = np.concatenate([sb.labels.numpy() for _, sb, _, _ in student_rows])
        w_tr = np.concatenate([w.numpy() for _, _, w, _ in student_rows]).astype(np.float64)
        p_te = np.concatenate([p for _, p, *_ in out[d]["test"]])
        sc = score(p_te)
        teacher_calibration[f"{d:.0f}"] = {"students_window": dict(zip(tasks, calib(p_tr, y_tr, w_tr))),
                                           "test": dict(zip(tasks, calib(p_te, y_test, w_test))),
                                           "test_ne": {t: sc[t]["ne"] for t in tasks}}
        print(f"  teacher D={d:>6.0f}s calibration (sum p / sum y, weighted) students' window "
              + ", ".join(f"{t} {v:.3f}" for t, v in teacher_calibration[f'{d:.0f}']['students_window'].items())
              + "; test " + ", ".join(f"{t} {v:.3f}" for t, v in teacher_calibration[f'{d:.0f}']['test'].items())
              + "; its test NE " + ", ".join(f"{t} {sc[t]['ne']:.4f}" for t in tasks),
              flush=True)

    # What teacher_outputs returns: probs, user representation, its trunk output, user logits. "teacher_logit":
    # the teacher's logit of the example itself as an input (standard KD-as-feature: needs GEM at serving).
    REP_INDEX = {"teacher_logit": 0, "full": 1, "trunk": 2, "logits": 3}

    def run_student(name: str, d: float, *, distill=False, soft=0.0, adapter=False, reps="none", repr_width=0,
                    repr_dropout=0.0, share="none", transfer="none", lr=args.student_lr, distill_weight=1.0,
                    seed=args.seed) -> dict:
        """One student through the students' window, then the test window (progressive: predict, then train).

        distill: the auxiliary head; soft: the serving head's soft-target mix; reps: which GEM user-side
        output is an input ("full" trunk input, "trunk" its trunk's output, "logits" its surface head's
        stage logits); transfer: before its window the student distills (no labels) on the surface's
        earlier traffic, scored by the teacher published at its start ("published") or by the teacher's
        progressive predictions ("progressive")."""
        ri = REP_INDEX.get(reps)
        width = 0 if ri is None else out[d]["train"][0][1 + ri].shape[1]
        uses_teacher = distill or soft > 0

        def rep_of(arrs) -> np.ndarray:
            if ri == 0:
                p = np.clip(arrs[0].astype(np.float64), 1e-6, 1 - 1e-6)
                return (np.log(p) - np.log1p(-p)).astype(np.float32)
            return arrs[ri].astype(np.float32)
        scfg = StudentConfig(features=features, surface=args.surface, d=gem_cfg.d, history=32, hidden=(128, 64),
                             distill=distill, distill_weight=distill_weight, soft_mix=soft, repr_dim=width,
                             repr_width=repr_width, repr_dropout=repr_dropout, share_tables=share)
        learner = StudentLearner(scfg, teacher=share_src.get(d) if share != "none" else None,
                                 adapter=StudentAdapter(len(tasks), window=args.adapter_window,
                                                        refit_every=args.adapter_refit) if adapter else None,
                                 lr=lr, seed=seed)

        def inputs(sb, arrs):
            if ri is None:
                return sb
            return StudentInputs(sb, torch.from_numpy(rep_of(arrs)), torch.ones(len(sb), dtype=torch.bool))

        t1 = time.monotonic()
        n_transfer = 0
        if transfer != "none":
            tr_out = {bi: rest for bi, *rest in tc["transfer"][d]}
            prog = dict(tc["transfer_prog"])
            for bi, sb, w in transfer_rows:
                arrs = tr_out[bi]
                tp = arrs[0] if transfer == "published" else prog[bi]
                learner.distill_step(inputs(sb, arrs), w, tp)
                n_transfer += len(sb)
        by_bi = {bi: rest for bi, *rest in out[d]["train"]}
        n = 0
        for bi, sb, w, keep in student_rows:
            arrs = [a[keep] for a in by_bi[bi]]
            learner.step(inputs(sb, arrs), w, arrs[0] if uses_teacher else None)
            n += len(sb)
        by_test = {bi: rest for bi, *rest in out[d]["test"]}
        ps = []
        for bi, sb, w in test_sel:
            x = inputs(sb, by_test[bi])
            ps.append(learner.predict(x).numpy())
            if progressive and len(sb):  # predict, then train on it
                learner.step(x, w, by_test[bi][0] if uses_teacher else None)
        res = score(np.concatenate(ps))
        print(f"  {name:<28} D={d:>6.0f}s  seed {seed}  NE click {res['click']['ne']:.4f}  conversion "
              f"{res['conversion']['ne']:.4f}  calibration click {res['click']['calibration']:.3f}  "
              f"({n:,} examples, {n_transfer:,} transfer, {time.monotonic() - t1:.0f}s)", flush=True)
        return {"ne": {t: res[t]["ne"] for t in tasks}, "auc": {t: res[t]["auc"] for t in tasks},
                "calibration": {t: res[t]["calibration"] for t in tasks}, "train_examples": n,
                "transfer_examples": n_transfer, "delay_s": d, "seed": seed,
                "spec": {"distill": distill, "soft": soft, "adapter": adapter, "reps": reps, "repr_width": repr_width,
                         "repr_dropout": repr_dropout, "share": share, "transfer": transfer, "lr": lr,
                         "distill_weight": distill_weight},
                **({"adapter": learner.adapter.state()} if learner.adapter is not None else {})}

    D = args.delay
    techniques = dict(TECHNIQUES)
    if args.variants:
        techniques.update(json.loads(args.variants))
    if args.only:
        techniques = {k: techniques[k] for k in args.only.split(",")}
    print(f"students on {args.surface}, teacher lag {D:.0f}s:", flush=True)
    res = {name: run_student(name, D, **kw) for name, kw in techniques.items()}
    # The staleness sweep: per D, per technique of SWEEP, one result per student seed (the first seed's run at
    # the main table's D is that table's run). Same teacher outputs and rows for every seed, so the adapter's
    # gain (without - with, same seed) is a paired difference: the seeds' spread is the student's own noise.
    seeds = [args.seed + k for k in range(max(1, args.student_seeds))]
    stale: dict[float, dict[str, list[dict]]] = {}
    sweep_names = [n for pair in SWEEP.values() for n in pair]
    for d in (delays if not args.no_sweep else []):
        stale[d] = {n: [res[n] if d == D and n in res and s == args.seed else
                        run_student(n, d, **techniques.get(n, TECHNIQUES.get(n, {})), seed=s) for s in seeds]
                    for n in sweep_names}

    main_task = "click"
    alone = res["alone"]["ne"][main_task]
    t_ne = teacher_score[main_task]["ne"]
    gap = alone - t_ne

    def ratio(ne: float) -> float:
        return (alone - ne) / gap if gap > 0 else float("nan")

    for name, r in res.items():
        r["student_ne"] = r["ne"][main_task]
        r["transfer_ratio"] = ratio(r["student_ne"])

    # ---------------------------------------------------------------- serving cost
    lat = {} if args.no_serving else serving_latency(
        final, StudentLearner(StudentConfig(features=features, surface=args.surface, d=gem_cfg.d, history=32,
                                            hidden=(128, 64))).model, synthetic_batch, gem_cfg, reps=10 if q else 40)

    figures = {
        "teacher_ne": t_ne, "teacher_ne_by_task": {t: teacher_score[t]["ne"] for t in tasks},
        "teacher_auc_by_task": {t: teacher_score[t]["auc"] for t in tasks},
        "student_alone_ne": alone,
        "techniques": {k: {kk: vv for kk, vv in v.items()} for k, v in res.items()},
        "combined_over_distill": (res["combined"]["transfer_ratio"] / res["distill"]["transfer_ratio"]
                                  if "combined" in res and "distill" in res and res["distill"]["transfer_ratio"] != 0
                                  else float("nan")),
        "teacher_calibration": teacher_calibration,
        # per D, per kind of distillation (SWEEP): NE without / with the adapter and the gain (means over the
        # student seeds), the gain per seed, its standard error, calibrations, the first seed's adapter fit
        "staleness": {f"{d:.0f}": {kind: staleness_entry(v[a], v[b], main_task) for kind, (a, b) in SWEEP.items()}
                      for d, v in stale.items()},
        "student_seeds": seeds,
        "serving": lat,
        "main_task": main_task,
        "teacher_train_s": teacher_s,
        "teacher_time_breakdown_s": spent,
        "teacher_examples_per_s": n_train / teacher_s,
        "wall_s": time.monotonic() - t_start,
    }
    rows = [["teacher (GEM %s, fresh)" % preset_name, t_ne, teacher_score["conversion"]["ne"], "", ""]]
    for name, r in res.items():
        rows.append([f"student: {name}", r["student_ne"], r["ne"]["conversion"], r["transfer_ratio"],
                     f"D={r['delay_s']:.0f}s"])
    print()
    print(table(rows, ["model", f"NE {main_task}", "NE conversion", "transfer ratio", "teacher lag"]))
    print(f"\ncombined transfer / plain distillation's: {figures['combined_over_distill']:.2f} (goal >= 2)")
    srows = [[d, kind, v["distill_ne"], v["adapter_ne"], v["adapter_gain"], v["adapter_gain_se"],
              v["adapter_gain_positive"], v["distill_calibration"], v["adapter_calibration"]]
             for d, kv in sorted(figures["staleness"].items(), key=lambda x: float(x[0])) for kind, v in kv.items()]
    print()
    print(table(srows, ["teacher lag s", "distillation", "NE distill", "NE distill + adapter", "adapter gain",
                        "gain s.e.", "seeds gain > 0", "calibration", "calibration + adapter"]))
    print(f"(means over {len(seeds)} student seeds {seeds}; gain = NE without - NE with the adapter, same seed)")
    if lat:
        print(f"\nserving, 500 candidates x 1k history, model forward: student p50 {lat['student_p50_ms']:.2f} / "
              f"p99 {lat['student_p99_ms']:.2f} ms; GEM p50 {lat['gem_p50_ms']:.2f} / p99 {lat['gem_p99_ms']:.2f} ms "
              f"(GEM / student p99 {lat['gem_over_student_p99']:.1f}x)")
    config = {"preset": preset_name, "events": n_events, "surface": args.surface, "delay_s": D,
              "delays_s": delays, "snapshot_s": args.snapshot_s, "hours": args.hours, "seed": args.seed,
              "student_seeds": seeds,
              "sim": dataclasses.asdict(sim), "dataset": dataclasses.asdict(dcfg), "quick": q,
              "student_frac": args.student_frac, "eval": args.eval, "student_lr": args.student_lr,
              "teacher_code_hash": tc["code_hash"], "model_code_hash": code_hash,
              "adapter": {"window": args.adapter_window, "refit_every": args.adapter_refit},
              "student": {"history": 32, "hidden": [128, 64], "d": gem_cfg.d}}
    write(args.out, "transfer", config, figures)
    if not args.work:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


def staleness_entry(without: list[dict], with_: list[dict], task: str) -> dict:
    """One (D, kind) cell of the staleness sweep from its runs per student seed, paired by seed."""
    a = np.array([r["ne"][task] for r in without])
    b = np.array([r["ne"][task] for r in with_])
    gains = a - b
    se = float(gains.std(ddof=1) / np.sqrt(len(gains))) if len(gains) > 1 else float("nan")
    return {"distill_ne": float(a.mean()), "adapter_ne": float(b.mean()), "adapter_gain": float(gains.mean()),
            "adapter_gain_se": se, "adapter_gain_seeds": gains.tolist(),
            "adapter_gain_positive": f"{int((gains > 0).sum())}/{len(gains)}",
            "distill_ne_seeds": a.tolist(), "adapter_ne_seeds": b.tolist(),
            "distill_calibration": float(np.mean([r["calibration"][task] for r in without])),
            "adapter_calibration": float(np.mean([r["calibration"][task] for r in with_])),
            "adapter_fit": with_[0].get("adapter")}


# The techniques measured (run_student keywords); --only / --variants pick or add others.
TECHNIQUES: dict[str, dict] = {
    "alone": {},
    # plain distillation: soft targets mixed into the served head's loss (standard KD), raw teacher targets
    "distill": {"soft": 0.6},
    "distill_adapter": {"soft": 0.6, "adapter": True},
    # the auxiliary-head variant (the served head learns from the teacher through the shared bottom only)
    "distill_aux": {"distill": True},
    "distill_aux_adapter": {"distill": True, "adapter": True},
    # KD on more traffic than the labels: the surface's earlier impressions, teacher targets only
    "distill_transfer": {"soft": 0.6, "transfer": "published"},
    # GEM's 512-wide user vector through a narrow (8), dropped-out projection; the old 32-wide one
    "representations": {"reps": "full", "repr_width": 8, "repr_dropout": 0.5},
    "representations_wide": {"reps": "full"},
    "shared_tables": {"share": "finetune"},
    "shared_tables_frozen": {"share": "frozen"},
    "combined": {"soft": 0.6, "adapter": True, "transfer": "published", "reps": "full", "repr_width": 8,
                 "repr_dropout": 0.5, "share": "finetune"},
}

# The staleness sweep: per kind of distillation, (without the adapter, with it), technique names.
SWEEP: dict[str, tuple[str, str]] = {"aux": ("distill_aux", "distill_aux_adapter"), "soft": ("distill", "distill_adapter")}


def train_teacher(args, gem_cfg, tcfg, info, train, test, delays, s_idx, t_lo, t_hi, t_mid, progressive) -> dict:
    """The teacher phase: GEM trained online over the train window (and, progressive, the test window);
    per D, per batch of the students' rows, the outputs of the teacher published D ago: probabilities
    (n, T), user representation (n, R) float16, its trunk's output on it (n, H) float16 and its
    surface head's stage logits on it (n, T) (what GEM predicts for the user before the ad is known).
    Also the *transfer set*: the surface's train-window rows before the students start, scored by the
    teacher published at the students' start minus D (``transfer[d]``), and the teacher's progressive
    probabilities on them (``transfer_prog``: predicted before it trained on each)."""
    from opengem.model.student import copy_teacher, representation_dim, select_rows, teacher_user_representation
    from opengem.model.trainer import OnlineLearner

    tasks = tuple(gem_cfg.features.tasks)
    teacher = OnlineLearner("gem", gem_cfg, tcfg, info, seed=args.seed)
    R = representation_dim(teacher.unsharded())
    # The model inside DistributedModelParallel (sharded tables, same forward): the live teacher.
    live = getattr(teacher.model, "module", teacher.model)
    snaps: list[tuple[int, torch.nn.Module]] = []  # (event time, frozen copy), kept while some D still needs it
    snap_every = int(args.snapshot_s * 1000)
    next_snap = t_lo
    max_d = int(max(delays) * 1000)
    # per D: per train / test batch, (bi, probs, reps, trunk, user logits) -- students' rows only
    out = {d: {"train": [], "test": []} for d in delays}
    share_src: dict[float, torch.nn.Module] = {}
    transfer_prog: list[tuple[int, np.ndarray]] = []

    def snapshot_at(ts: int) -> torch.nn.Module | None:
        i = bisect.bisect_right([t for t, _ in snaps], ts) - 1
        return snaps[i][1] if i >= 0 else None

    def snapshot_index(ts: torch.Tensor, d: float) -> list[int]:
        """Per row, the index of the newest snapshot taken at or before ts - d (-1: none)."""
        times = [t for t, _ in snaps]
        return [bisect.bisect_right(times, int(t) - int(d * 1000)) - 1 for t in ts.tolist()]

    def stale_outputs(b, ts: torch.Tensor, d: float) -> tuple:
        """Each row from the snapshot at ts - d (rows grouped by snapshot)."""
        keys = snapshot_index(ts, d)
        parts = [None] * 4
        fallback = snaps[0][1]  # ts - d before every snapshot: the oldest (at the start: untrained)
        for k in sorted(set(keys)):
            rows = torch.tensor([i for i, kk in enumerate(keys) if kk == k], dtype=torch.int64)
            m = snaps[k][1] if k >= 0 else fallback
            got = teacher_outputs(m, select_rows(b, rows), R, len(tasks))
            for j, g in enumerate(got):
                if parts[j] is None:
                    parts[j] = np.zeros((len(b),) + g.shape[1:], g.dtype)
                parts[j][rows.numpy()] = g
        return tuple(parts) if len(b) else teacher_outputs(fallback, b, R, len(tasks))

    spent = {"snapshots_s": 0.0, "teacher_outputs_s": 0.0, "teacher_steps_s": 0.0}
    t0 = time.monotonic()
    last = t0
    n_done = 0
    n_train = sum(len(b) for b, _ in train)
    teacher_test_parts: list[np.ndarray] = []  # progressive: the live teacher's test predictions
    for bi, (b, ex) in enumerate(train + (test if progressive else [])):
        ts = ex["ts"]
        bt = int(ts.min())
        tt = time.monotonic()
        while bt >= next_snap:
            snaps.append((next_snap, copy_teacher(teacher.unsharded())))
            next_snap += snap_every
            while len(snaps) > 2 and snaps[1][0] < bt - max_d - snap_every:
                snaps.pop(0)  # no delay reaches back this far any more
        spent["snapshots_s"] += time.monotonic() - tt
        tt = time.monotonic()
        mine = b.surface_idx == s_idx
        in_students = bool((ts >= t_mid).any())
        if bi >= len(train):  # progressive test window: outputs before the teacher trains on it
            sb, sts = select_rows(b, mine), ts[mine]
            now = teacher_outputs(live, sb, R, len(tasks))
            teacher_test_parts.append(now[0])
            for d in delays:
                out[d]["test"].append((bi - len(train), *(now if d == 0 else stale_outputs(sb, sts, d))))
        elif in_students:
            sb, sts = select_rows(b, mine), ts[mine]
            for d in delays:
                if d == 0:
                    continue
                out[d]["train"].append((bi, *stale_outputs(sb, sts, d)))
                if d not in share_src and bt >= t_mid:
                    share_src[d] = snapshot_at(t_mid - int(d * 1000)) or snaps[0][1]
            if 0.0 in delays:  # the teacher as of now: its outputs just before this step
                if 0.0 not in share_src and bt >= t_mid:
                    share_src[0.0] = copy_teacher(teacher.unsharded())
                out[0.0]["train"].append((bi, *teacher_outputs(live, sb, R, len(tasks))))
        spent["teacher_outputs_s"] += time.monotonic() - tt
        tt = time.monotonic()
        probs = teacher.step(b, ex["weight"])
        spent["teacher_steps_s"] += time.monotonic() - tt
        if bi < len(train):
            early = (mine & (ts < t_mid))[mine]  # the transfer set: the surface's rows before the students
            if bool(early.any()):
                transfer_prog.append((bi, probs[mine][early].numpy()))
        n_done += len(b)
        if time.monotonic() - last > 15:
            last = time.monotonic()
            print(f"  teacher {n_done:,}/{n_train:,} ({n_done / (last - t0):,.0f} ex/s)", flush=True)
    final = copy_teacher(teacher.unsharded())
    snaps.append((t_hi + 1, final))
    teacher_s = time.monotonic() - t0
    tt = time.monotonic()
    transfer = {d: [] for d in delays}
    for bi, _ in transfer_prog:  # the transfer set, scored by the teacher published at the students' start
        b, ex = train[bi]
        rows = (b.surface_idx == s_idx) & (ex["ts"] < t_mid)
        sb = select_rows(b, rows)
        for d in delays:
            transfer[d].append((bi, *teacher_outputs(share_src.get(d, final), sb, R, len(tasks))))
    spent["transfer_set_s"] = time.monotonic() - tt
    if not progressive:
        # Test window: teacher outputs from its snapshot at ts - D (the final one, mostly: it stops at the
        # end of the train window like every model here).
        for bi, (b, ex) in enumerate(test):
            mine = b.surface_idx == s_idx
            sb, sts = select_rows(b, mine), ex["ts"][mine]
            for d in delays:
                out[d]["test"].append((bi, *stale_outputs(sb, sts, d)))
    teacher_test = np.concatenate(teacher_test_parts) if progressive else None
    return {"out": out, "share_src": share_src, "final": final, "R": R, "teacher_s": teacher_s, "spent": spent,
            "transfer": transfer, "transfer_prog": transfer_prog, "teacher_test": teacher_test}


def teacher_outputs(model: torch.nn.Module, b, R: int, T: int) -> tuple[np.ndarray, ...]:
    """(probs (B, T) float32, user representation (B, R) float16, its trunk output (B, H) float16,
    the surface head's stage logits on it (B, T) float32) of ``model`` on batch ``b``."""
    from opengem.model.student import teacher_user_representation

    H = model.heads.trunk[-2].out_features if len(model.heads.trunk) > 1 else R
    if not len(b):
        return (np.zeros((0, T), np.float32), np.zeros((0, R), np.float16), np.zeros((0, H), np.float16),
                np.zeros((0, T), np.float32))
    with torch.no_grad():
        rep = teacher_user_representation(model, b)
        h = model.heads.trunk(rep)
        u = model.heads(rep, b.surface_idx)
        return (model.predict(b).numpy(), rep.numpy().astype(np.float16), h.numpy().astype(np.float16),
                u.numpy().astype(np.float32))


def model_code_hash() -> str:
    """What the teacher's outputs depend on besides the data: the model package's source (students' excluded)."""
    root = Path(__file__).resolve().parent.parent / "model"
    h = hashlib.sha1()
    for f in sorted(root.glob("*.py")):
        if not f.name.startswith("student"):
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:12]


def _t(x):
    return torch.from_numpy(np.ascontiguousarray(x))


def save_teacher_cache(path: Path, tc: dict) -> None:
    """The teacher phase's outputs as tensors (weights_only loadable): the students' runs reuse them."""
    blob = {"R": tc["R"], "teacher_s": tc["teacher_s"], "spent": tc["spent"], "code_hash": tc["code_hash"],
            "out": {str(d): {k: [(bi, *map(_t, arrs)) for bi, *arrs in v] for k, v in o.items()}
                    for d, o in tc["out"].items()},
            "transfer": {str(d): [(bi, *map(_t, arrs)) for bi, *arrs in v] for d, v in tc["transfer"].items()},
            "transfer_prog": [(bi, _t(p)) for bi, p in tc["transfer_prog"]],
            "teacher_test": None if tc["teacher_test"] is None else _t(tc["teacher_test"]),
            "share_src": {str(d): m.state_dict() for d, m in tc["share_src"].items()},
            "final": tc["final"].state_dict()}
    tmp = path.with_suffix(".tmp")
    torch.save(blob, tmp)
    tmp.rename(path)


def load_teacher_cache(path: Path, gem_cfg) -> dict:
    from opengem.model import registry
    from opengem.model.student import copy_teacher

    blob = torch.load(path, weights_only=True)

    def model(sd):
        m = registry.build_model("gem", gem_cfg, device=torch.device("meta"))
        m.load_state_dict(sd, strict=True, assign=True)
        return copy_teacher(m)

    np_ = lambda xs: tuple(x.numpy() for x in xs)  # noqa: E731
    return {"R": blob["R"], "teacher_s": blob["teacher_s"], "spent": blob["spent"], "code_hash": blob["code_hash"],
            "out": {float(d): {k: [(bi, *np_(arrs)) for bi, *arrs in v] for k, v in o.items()}
                    for d, o in blob["out"].items()},
            "transfer": {float(d): [(bi, *np_(arrs)) for bi, *arrs in v] for d, v in blob["transfer"].items()},
            "transfer_prog": [(bi, p.numpy()) for bi, p in blob["transfer_prog"]],
            "teacher_test": None if blob["teacher_test"] is None else blob["teacher_test"].numpy(),
            "share_src": {float(d): model(sd) for d, sd in blob["share_src"].items()},
            "final": model(blob["final"])}


def serving_latency(gem, student, synthetic_batch, gem_cfg, n_cand: int = 500, hist: int = 1000,
                    reps: int = 40) -> dict:
    """Model-forward latency for n_cand candidates of one user with a hist-event history,
    student vs GEM, interleaved. GEM scores through its split (user side once)."""
    cands = synthetic_batch(gem_cfg, [hist] * n_cand, seed=1)  # the student reads the last 32 of each
    user = synthetic_batch(gem_cfg, [hist], seed=2)
    gem.eval()
    student.eval()
    ts = {"student": [], "gem": []}
    with torch.inference_mode():
        for i in range(reps + 3):
            for name in ("student", "gem") if i % 2 == 0 else ("gem", "student"):
                t = time.perf_counter()
                if name == "gem":
                    if hasattr(gem, "encode_user"):
                        gem.candidate_logits(gem.encode_user(user), cands)
                    else:
                        gem.predict(cands)
                else:
                    student.predict(cands)
                if i >= 3:  # warm-up
                    ts[name].append(time.perf_counter() - t)
    out = {}
    for name, v in ts.items():
        out[f"{name}_p50_ms"] = float(np.percentile(v, 50) * 1e3)
        out[f"{name}_p99_ms"] = float(np.percentile(v, 99) * 1e3)
    out["gem_over_student_p99"] = out["gem_p99_ms"] / out["student_p99_ms"]
    out.update({"candidates": n_cand, "history": hist, "repeats": reps})
    return out


if __name__ == "__main__":
    main()
