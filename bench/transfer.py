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
   with one technique: alone; + distillation (auxiliary head, raw teacher
   targets); + Student Adapter (targets recalibrated on fresh labels);
   + representations (GEM's user vectors as inputs); + parameter sharing
   (GEM's tables from the snapshot at the students' start − D, fine-tuned);
   all together. Then every model is scored on the surface's test window (NE
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
   Staleness sweep: plain distillation vs + adapter at each D in ``--delays``.
4. Serving cost: model forward for 500 candidates of one user with a 1k-event
   history, student vs GEM (GEM's user side once, ``encode_user`` +
   ``candidate_logits``), interleaved repeats: p50/p99 ms and their ratio.
   In process, not through the RPC (bench/serve.py measures the RPC).

JSON keys: per technique ``student_ne``, ``transfer_ratio``; ``teacher_ne``,
``student_alone_ne``, ``combined_over_distill``; ``staleness`` (per D the
distillation and adapter NE and the adapter's gain); ``serving``
(``student_p99_ms``, ``gem_p99_ms``, ratio).
"""

from __future__ import annotations

import bisect
import dataclasses
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
    from opengem.model.student import (StudentAdapter, StudentConfig, StudentInputs, StudentLearner, copy_teacher,
                                       representation_dim, select_rows, teacher_user_representation)
    from opengem.model.train_config import TrainConfig
    from opengem.model.trainer import OnlineLearner, quiet_torchrec
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
    ap.add_argument("--seed", type=int, default=0)
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
    print(f"dataset: {sum(len(b) for b, _ in train):,} train / {sum(len(b) for b, _ in test):,} test examples, "
          f"train window {(t_hi - t_lo) / 3.6e6:.2f} h; students from {(t_mid - t_lo) / 3.6e6:.2f} h on", flush=True)

    # ---------------------------------------------------------------- teacher
    info = init_distributed("cpu")
    tcfg = TrainConfig(preset=preset_name, metrics_port=None)
    teacher = OnlineLearner("gem", gem_cfg, tcfg, info, seed=args.seed)
    R = representation_dim(teacher.unsharded())
    # The model inside DistributedModelParallel (sharded tables, same forward): the live teacher.
    live = getattr(teacher.model, "module", teacher.model)
    snaps: list[tuple[int, torch.nn.Module]] = []  # (event time, frozen copy), kept while some D still needs it
    snap_every = int(args.snapshot_s * 1000)
    next_snap = t_lo
    max_d = int(max(delays) * 1000)
    # per D: per train / test batch, teacher probs (B, T) and user reps (B, R) -- students' rows only
    out = {d: {"train": [], "test": []} for d in delays}
    share_src: dict[float, torch.nn.Module] = {}

    def snapshot_at(ts: int) -> torch.nn.Module | None:
        i = bisect.bisect_right([t for t, _ in snaps], ts) - 1
        return snaps[i][1] if i >= 0 else None

    def snapshot_index(ts: torch.Tensor, d: float) -> list[int]:
        """Per row, the index of the newest snapshot taken at or before ts - d (-1: none)."""
        times = [t for t, _ in snaps]
        return [bisect.bisect_right(times, int(t) - int(d * 1000)) - 1 for t in ts.tolist()]

    def teacher_outputs(model: torch.nn.Module, b) -> tuple[np.ndarray, np.ndarray]:
        if not len(b):
            return np.zeros((0, len(tasks)), np.float32), np.zeros((0, R), np.float16)
        with torch.no_grad():
            return model.predict(b).numpy(), teacher_user_representation(model, b).numpy().astype(np.float16)

    def stale_outputs(b, ts: torch.Tensor, d: float) -> tuple[np.ndarray, np.ndarray]:
        """Each row from the snapshot at ts - d (rows grouped by snapshot)."""
        keys = snapshot_index(ts, d)
        P = np.zeros((len(b), len(tasks)), np.float32)
        Rp = np.zeros((len(b), R), np.float16)
        fallback = snaps[0][1]  # ts - d before every snapshot: the oldest (at the start: untrained)
        for k in sorted(set(keys)):
            rows = torch.tensor([i for i, kk in enumerate(keys) if kk == k], dtype=torch.int64)
            m = snaps[k][1] if k >= 0 else fallback
            p, r = teacher_outputs(m, select_rows(b, rows))
            P[rows.numpy()], Rp[rows.numpy()] = p, r
        return P, Rp

    spent = {"snapshots_s": 0.0, "teacher_outputs_s": 0.0, "teacher_steps_s": 0.0}
    t0 = time.monotonic()
    last = t0
    n_done = 0
    n_train = sum(len(b) for b, _ in train)
    progressive = args.eval == "progressive"
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
            now_p, now_r = teacher_outputs(live, sb)
            teacher_test_parts.append(now_p)
            for d in delays:
                out[d]["test"].append((bi - len(train), *((now_p, now_r) if d == 0 else stale_outputs(sb, sts, d))))
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
                out[0.0]["train"].append((bi, *teacher_outputs(live, sb)))
        spent["teacher_outputs_s"] += time.monotonic() - tt
        tt = time.monotonic()
        teacher.step(b, ex["weight"])
        spent["teacher_steps_s"] += time.monotonic() - tt
        n_done += len(b)
        if time.monotonic() - last > 15:
            last = time.monotonic()
            print(f"  teacher {n_done:,}/{n_train:,} ({n_done / (last - t0):,.0f} ex/s)", flush=True)
    final = copy_teacher(teacher.unsharded())
    snaps.append((t_hi + 1, final))
    teacher_s = time.monotonic() - t0
    if not progressive:
        # Test window: teacher outputs from its snapshot at ts - D (the final one, mostly: it stops at the
        # end of the train window like every model here).
        for bi, (b, ex) in enumerate(test):
            mine = b.surface_idx == s_idx
            sb, sts = select_rows(b, mine), ex["ts"][mine]
            for d in delays:
                out[d]["test"].append((bi, *stale_outputs(sb, sts, d)))
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

    teacher_test = np.concatenate(teacher_test_parts) if progressive else \
        np.concatenate([teacher_outputs(final, sb)[0] for _, sb, _ in test_sel])
    teacher_score = score(teacher_test)

    def run_student(name: str, d: float, *, distill=False, adapter=False, reps=False, share="none") -> dict:
        scfg = StudentConfig(features=features, surface=args.surface, d=gem_cfg.d, history=32, hidden=(128, 64),
                             distill=distill, repr_dim=R if reps else 0, share_tables=share)
        lr = StudentLearner(scfg, teacher=share_src.get(d) if share != "none" else None,
                            adapter=StudentAdapter(len(tasks), window=args.adapter_window,
                                                   refit_every=args.adapter_refit) if adapter else None,
                            seed=args.seed)
        by_bi = {bi: (p, r) for bi, p, r in out[d]["train"]}
        t1 = time.monotonic()
        n = 0
        for bi, (b, ex) in enumerate(train):
            if bi not in by_bi:
                continue
            mine = (b.surface_idx == s_idx) & (ex["ts"] >= t_mid)
            if not bool(mine.any()):
                continue
            keep = mine[b.surface_idx == s_idx]  # within the surface's rows: the students' window
            sb = select_rows(b, mine)
            tp, tr = by_bi[bi][0][keep.numpy()], by_bi[bi][1][keep.numpy()]
            x = StudentInputs(sb, torch.from_numpy(tr.astype(np.float32)), torch.ones(len(sb), dtype=torch.bool)) \
                if reps else sb
            lr.step(x, ex["weight"][mine], tp if distill else None)
            n += len(sb)
        by_test = {bi: (p, r) for bi, p, r in out[d]["test"]}
        ps = []
        for bi, sb, w in test_sel:
            x = StudentInputs(sb, torch.from_numpy(by_test[bi][1].astype(np.float32)),
                              torch.ones(len(sb), dtype=torch.bool)) if reps else sb
            ps.append(lr.predict(x).numpy())
            if progressive and len(sb):  # predict, then train on it
                lr.step(x, w, by_test[bi][0] if distill else None)
        res = score(np.concatenate(ps))
        print(f"  {name:<24} D={d:>6.0f}s  NE click {res['click']['ne']:.4f}  conversion "
              f"{res['conversion']['ne']:.4f}  ({n:,} examples, {time.monotonic() - t1:.0f}s)", flush=True)
        return {"ne": {t: res[t]["ne"] for t in tasks}, "auc": {t: res[t]["auc"] for t in tasks},
                "calibration": {t: res[t]["calibration"] for t in tasks}, "train_examples": n, "delay_s": d,
                **({"adapter": lr.adapter.state()} if lr.adapter is not None else {})}

    D = args.delay
    techniques = {
        "alone": {},
        "distill": {"distill": True},
        "distill_adapter": {"distill": True, "adapter": True},
        "representations": {"reps": True},
        "shared_tables": {"share": "finetune"},
        "shared_tables_frozen": {"share": "frozen"},
        "combined": {"distill": True, "adapter": True, "reps": True, "share": "finetune"},
    }
    print(f"students on {args.surface}, teacher lag {D:.0f}s:", flush=True)
    res = {name: run_student(name, D, **kw) for name, kw in techniques.items()}
    stale = {}
    for d in delays:
        if d == D:
            stale[d] = {"distill": res["distill"], "distill_adapter": res["distill_adapter"]}
        else:
            stale[d] = {"distill": run_student("distill", d, distill=True),
                        "distill_adapter": run_student("distill_adapter", d, distill=True, adapter=True)}

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
    lat = serving_latency(final, StudentLearner(StudentConfig(features=features, surface=args.surface, d=gem_cfg.d,
                                                              history=32, hidden=(128, 64))).model,
                          synthetic_batch, gem_cfg, reps=10 if q else 40)

    figures = {
        "teacher_ne": t_ne, "teacher_ne_by_task": {t: teacher_score[t]["ne"] for t in tasks},
        "teacher_auc_by_task": {t: teacher_score[t]["auc"] for t in tasks},
        "student_alone_ne": alone,
        "techniques": {k: {kk: vv for kk, vv in v.items()} for k, v in res.items()},
        "combined_over_distill": (res["combined"]["transfer_ratio"] / res["distill"]["transfer_ratio"]
                                  if res["distill"]["transfer_ratio"] != 0 else float("nan")),
        "staleness": {f"{d:.0f}": {"distill_ne": v["distill"]["ne"][main_task],
                                   "adapter_ne": v["distill_adapter"]["ne"][main_task],
                                   "adapter_gain": v["distill"]["ne"][main_task] - v["distill_adapter"]["ne"][main_task]}
                      for d, v in stale.items()},
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
    srows = [[d, v["distill_ne"], v["adapter_ne"], v["adapter_gain"]] for d, v in
             sorted(figures["staleness"].items(), key=lambda kv: float(kv[0]))]
    print()
    print(table(srows, ["teacher lag s", "NE distill", "NE distill + adapter", "adapter gain"]))
    print(f"\nserving, 500 candidates x 1k history, model forward: student p50 {lat['student_p50_ms']:.2f} / "
          f"p99 {lat['student_p99_ms']:.2f} ms; GEM p50 {lat['gem_p50_ms']:.2f} / p99 {lat['gem_p99_ms']:.2f} ms "
          f"(GEM / student p99 {lat['gem_over_student_p99']:.1f}x)")
    config = {"preset": preset_name, "events": n_events, "surface": args.surface, "delay_s": D,
              "delays_s": delays, "snapshot_s": args.snapshot_s, "hours": args.hours, "seed": args.seed,
              "sim": dataclasses.asdict(sim), "dataset": dataclasses.asdict(dcfg), "quick": q,
              "student_frac": args.student_frac, "eval": args.eval,
              "adapter": {"window": args.adapter_window, "refit_every": args.adapter_refit},
              "student": {"history": 32, "hidden": [128, 64], "d": gem_cfg.d}}
    write(args.out, "transfer", config, figures)
    if not args.work:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


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
