"""Signal budget of a model_quality dataset: the NE each simulator signal puts at stake, the part a
model reading the history can reach, and how much of the long-range intent each trained model caught.

Reads a dataset built by ``bench/model_quality.py`` (``--work``) and the models trained on it
(every ``--work`` given: other seeds' directories hold the same dataset), reruns the simulator with
its impression trace and joins it to the test rows exactly (see :mod:`opengem.model.signal_budget`).
No training; about a minute for the 13M-event acceptance dataset.

Figures (JSON): ``oracle_ne``; ``budget[<term>][<task>]`` = NE without the term - oracle NE;
``long_range``: ``ne_no_intent``, ``ne_observable``, ``observable_budget`` (NE no intent - NE
observable: what a sequence arch can earn), ``hidden`` (NE observable - oracle NE), rows and
conversions per gap bucket; ``capture[<model>][seed]`` = the intent priced in per gap bucket (:func:`opengem.model.signal_budget.lift`;
``oracle`` and ``observable`` rows for reference).

    .venv/bin/python bench/signal_budget.py --work data/model_quality-base-full,data/model_quality-base-full-seed1
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402


def main() -> None:
    ap = _common.parser("signal_budget", __doc__)
    ap.add_argument("--work", required=True, help="comma-separated model_quality --work directories (the first "
                    "one's dataset is read; models of the same dataset are read from all)")
    ap.add_argument("--plot", default=None, help="PNG of the per-model capture (default next to --out)")
    args = ap.parse_args()
    import torch

    from opengem.config import from_dict
    from opengem.model import signal_budget as sb
    from opengem.model.batch import NONSEQ_KEYS
    from opengem.stream.simulator import SimConfig

    works = [w for w in args.work.split(",") if w]
    ds_dir = Path(works[0]) / "dataset"
    meta = json.loads((ds_dir / "dataset.json").read_text())
    src = meta["source"]
    if src.get("kind") != "simulator":
        raise SystemExit(f"{ds_dir}: not a simulator dataset")
    sim = from_dict(SimConfig, src["sim"], "sim")
    dcfg = meta["dataset"]
    cdf = float(meta["conversion_window_cdf"])
    t0 = time.monotonic()

    cols: dict[str, list] = {k: [] for k in ("ts", "user", "oracle", "labels", "surface_idx", "seq_lengths",
                                             "seq_kind", "seq_category", "seq_item", "target_category")}
    ci = NONSEQ_KEYS.index("category")
    for name in meta["files"]["test"]:
        for d in torch.load(ds_dir / name, weights_only=True):
            for k in cols:
                v = d["sparse"][ci] if k == "target_category" else d[k]
                cols[k].append(v.numpy())
    T = {k: np.concatenate(v) for k, v in cols.items()}
    n_rows = len(T["ts"])
    print(f"test rows: {n_rows:,} ({time.monotonic() - t0:.0f}s)", flush=True)

    trace = sb.impression_trace(sim, int(dcfg["events"]))
    idx = sb.join_rows(trace, T["user"], T["ts"], T["oracle"][:, 0])
    err_v = np.abs(trace["p_click"][idx] * trace["p_cvr"][idx] * cdf - T["oracle"][:, 1]).max()
    if err_v > 1e-9:
        raise SystemExit(f"trace and dataset disagree on the conversion oracle ({err_v:.3g})")
    print(f"trace joined: {len(trace['req']):,} impressions ({time.monotonic() - t0:.0f}s)", flush=True)

    y = T["labels"].astype(np.float64)
    tasks = ("click", "conversion")
    oracle_ne = {t: sb.ne(T["oracle"][:, i], y[:, i]) for i, t in enumerate(tasks)}
    budget: dict[str, dict[str, float]] = {}
    terms = [("click_interactions", ("click", "conversion")), ("cvr_interactions", ("conversion",)),
             ("cvr_long_range", ("conversion",))]
    lc = float(getattr(sim, "long_range_click_strength", 0.0))
    if lc:
        terms.append(("click_long_range", ("click", "conversion")))
    if float(getattr(sim, "surface_affinity_spread", 0.0)):  # what a shared head has to model per surface
        terms.append(("click_surface_affinity", ("click", "conversion")))
    for term, task_list in terms:
        budget[term] = {}
        for t in task_list:
            i = tasks.index(t)
            budget[term][t] = sb.ne(sb.without_term(trace, idx, term, t, cdf), y[:, i]) - oracle_ne[t]

    # long-range intent: what the history shows
    offs = np.concatenate([[0], np.cumsum(T["seq_lengths"].astype(np.int64))])
    kind_codes = T["seq_kind"].astype(np.int64) - 1  # kind rows are codes + 1
    post = sb.intent_posterior(kind_codes, T["seq_category"], T["seq_item"], offs, T["target_category"],
                               cause=sim.long_range_cause, plant_prob=sim.long_range_plant_prob,
                               min_gap=sim.long_range_min_gap)
    print(f"intent posterior ({time.monotonic() - t0:.0f}s)", flush=True)
    gap = trace["long_range_gap"][idx]
    active = gap >= sim.long_range_min_gap
    p_obs = sb.p_observable(trace, idx, post, sim.long_range_strength, cdf, lc)
    p_none = sb.without_intent(trace, idx, "conversion", cdf)
    p_none_raw = sb.p_observable(trace, idx, np.zeros(len(idx)), sim.long_range_strength, cdf, lc)  # no intent
    yv = y[:, 1]
    masks = sb.gap_masks(gap, sim.long_range_min_gap)
    lr = {
        "cause": sim.long_range_cause, "plant_prob": sim.long_range_plant_prob, "min_gap": sim.long_range_min_gap,
        "strength": sim.long_range_strength, "history_max_len": int(dcfg["max_len"]),
        "active_rows": int(active.sum()), "active_conversions": int(yv[active].sum()),
        "ne_oracle": oracle_ne["conversion"], "ne_no_intent": sb.ne(p_none, yv), "ne_observable": sb.ne(p_obs, yv),
        "posterior_mean_active": float(post[active].mean()) if active.any() else None,
        "posterior_mean_inactive": float(post[~active].mean()),
        "buckets": {k: {"rows": int(m.sum()), "conversions": int(yv[m].sum())} for k, m in masks.items()},
    }
    lr["observable_budget"] = lr["ne_no_intent"] - lr["ne_observable"]
    lr["hidden"] = lr["ne_observable"] - lr["ne_oracle"]
    capture_click: dict[str, dict[str, dict[str, float]]] = {}
    if lc:  # the intent on the click logit too: the same figures for the click label
        yc = y[:, 0]
        pc_obs = sb.p_observable(trace, idx, post, sim.long_range_strength, cdf, lc, task="click")
        pc_none_raw = sb.p_observable(trace, idx, np.zeros(len(idx)), sim.long_range_strength, cdf, lc, task="click")
        ck = {"strength": lc, "active_clicks": int(yc[active].sum()), "ne_oracle": oracle_ne["click"],
              "ne_no_intent": sb.ne(sb.without_intent(trace, idx, "click", cdf), yc), "ne_observable": sb.ne(pc_obs, yc)}
        ck["observable_budget"] = ck["ne_no_intent"] - ck["ne_observable"]
        ck["hidden"] = ck["ne_observable"] - ck["ne_oracle"]
        lr["click"] = ck
        capture_click = {"oracle": {"-": sb.lift(T["oracle"][:, 0], pc_none_raw, masks)},
                         "observable": {"-": sb.lift(pc_obs, pc_none_raw, masks)}}

    capture: dict[str, dict[str, dict[str, float]]] = {
        "oracle": {"-": sb.lift(T["oracle"][:, 1], p_none_raw, masks)},
        "observable": {"-": sb.lift(p_obs, p_none_raw, masks)}}
    preds = sb.model_predictions(works, meta["fingerprint"])
    for m in preds:
        if len(m["p"]) != n_rows:
            continue
        capture.setdefault(m["model"], {})[str(m["seed"])] = sb.lift(m["p"][:, 1], p_none_raw, masks)
        if capture_click:
            capture_click.setdefault(m["model"], {})[str(m["seed"])] = sb.lift(m["p"][:, 0], pc_none_raw, masks)

    # ----- report
    print(f"\nsimulator: long-range cause {sim.long_range_cause}, plant prob {sim.long_range_plant_prob}, "
          f"min gap {sim.long_range_min_gap}; histories read up to {dcfg['max_len']} events")
    rows = [[term, t, oracle_ne[t], oracle_ne[t] + v, v] for term, d in budget.items() for t, v in d.items()]
    print(_common.table(rows, ["term taken out", "task", "oracle NE", "NE without", "budget"]))
    print(f"\nlong-range intent (conversion NE): oracle {lr['ne_oracle']:.4f}, best reading the history "
          f"{lr['ne_observable']:.4f}, without the intent {lr['ne_no_intent']:.4f} -> observable budget "
          f"{lr['observable_budget']:+.4f}, hidden {lr['hidden']:+.4f}; {lr['active_rows']:,} active rows, "
          f"{lr['active_conversions']} conversions")
    if lc:
        ck = lr["click"]
        print(f"long-range intent (click NE, click strength {lc:g}): oracle {ck['ne_oracle']:.4f}, best reading the "
              f"history {ck['ne_observable']:.4f}, without the intent {ck['ne_no_intent']:.4f} -> observable budget "
              f"{ck['observable_budget']:+.4f}, hidden {ck['hidden']:+.4f}; {ck['active_clicks']:,} clicks on active rows")
    keys = [k for k in masks if k != "none"]
    for label, cap in (("conversion", capture), ("click", capture_click)):
        if not cap:
            continue
        rows = [[name, seed] + [d.get(k) for k in keys] for name, by in cap.items() for seed, d in sorted(by.items())]
        print(f"\nintent priced in ({label} log-odds over the no-intent oracle, relative to rows without an intent),"
              "\nby activation gap to the planting event (pre: not active yet):")
        print(_common.table(rows, ["model", "seed"] + [f"gap {k}" for k in keys]))

    plot = Path(args.plot or Path(args.out).with_suffix(".png"))
    _plot(capture, keys, plot, f"long-range intent ({sim.long_range_cause} cause): lift caught per model")
    plot_click = plot.with_name(plot.stem + "_click.png")
    if capture_click:
        _plot(capture_click, keys, plot_click, f"long-range intent on clicks ({sim.long_range_cause} cause): "
              "click lift caught per model")
    _common.write(args.out, "signal_budget", {"work": works, "dataset": meta["fingerprint"], "sim": src["sim"],
                                              "plot": str(plot),
                                              **({"plot_click": str(plot_click)} if capture_click else {})},
                  {"oracle_ne": oracle_ne, "budget": budget, "long_range": lr, "capture": capture,
                   **({"capture_click": capture_click} if capture_click else {}),
                   "test_rows": n_rows, "elapsed_s": round(time.monotonic() - t0, 1)})


def render_md(paths: list[str], experiments: list[str] = ()) -> list[str]:
    """The report section (docs/model-results.md) from signal_budget JSONs; ``experiments``:
    model_quality JSONs of the runs on those datasets (for their NE), matched by dataset."""
    docs = [json.loads(Path(p).read_text()) for p in paths]
    runs: dict[str, list[tuple[str, dict]]] = {}  # dataset fingerprint -> the runs on it, in the order given
    for e in experiments:
        d = json.loads(Path(e).read_text())
        runs.setdefault(d.get("dataset", {}).get("fingerprint"), []).append((e, d))
    L: list[str] = []
    w = L.append
    w("## What the data rewards: the signal budget\n")
    w("An ablation can only lose what the data pays its part for. `bench/signal_budget.py` reruns the simulator "
      "with its impression trace, joins it exactly to the test rows (checked against the stored oracle) and "
      "measures, per signal, the test NE the oracle loses without that term (*budget*); for the long-range "
      "intent also the exact P(intent active | the history the models read) and the best predictor built on it "
      "(*observable*: what any model reading up to `max_len` events can reach; the rest is *hidden* from every "
      "model), and how much of the intent each trained model priced in (its conversion log-odds over the "
      "no-intent oracle's, on active rows, relative to rows without an intent; the oracle's value is the "
      "effect itself, ~+1.4; 0 = nothing learned). No training; ~1.5 min per dataset. "
      "Code: `opengem/model/signal_budget.py`; the posterior is checked against the simulator's hidden state in "
      "`tests/model/test_signal_budget.py`.\n")
    for p, d in zip(paths, docs):
        lr, c = d["long_range"], d["config"]
        w(f"**Dataset {c['dataset']}** (`{c['work'][0]}`; long-range cause `{lr['cause']}`, plant probability "
          f"{lr['plant_prob']:g}, min gap {lr['min_gap']}, histories of {lr['history_max_len']:,}; `{p}`):\n")
        w("| term taken out of the oracle | task | oracle NE | NE without | budget |")
        w("| --- | --- | --- | --- | --- |")
        for term, by in d["budget"].items():
            for t, v in by.items():
                w(f"| {term} | {t} | {d['oracle_ne'][t]:.4f} | {d['oracle_ne'][t] + v:.4f} | {v:+.4f} |")
        w("")
        w(f"Long-range intent, conversion NE: oracle {lr['ne_oracle']:.4f}, best reading the history "
          f"{lr['ne_observable']:.4f}, without the intent {lr['ne_no_intent']:.4f}: **observable budget "
          f"{lr['observable_budget']:+.4f}**, hidden {lr['hidden']:+.4f}; {lr['active_rows']:,} active test rows "
          f"({lr['active_conversions']} conversions).\n")
        ck = lr.get("click")
        if ck:
            w(f"The intent also moves the click logit here (+{ck['strength']:g} on active rows). Long-range intent, "
              f"click NE: oracle {ck['ne_oracle']:.4f}, best reading the history {ck['ne_observable']:.4f}, "
              f"without the intent {ck['ne_no_intent']:.4f}: **observable budget {ck['observable_budget']:+.4f}**, "
              f"hidden {ck['hidden']:+.4f}; {ck['active_clicks']:,} clicks on active test rows.\n")
        keys = [k for k in next(iter(d["capture"].values()))["-"]] if "oracle" in d["capture"] else []
        for label, cap in (("conversion", d["capture"]), ("click", d.get("capture_click") or {})):
            if not cap:
                continue
            if label == "click":
                w("The same capture for the click label (click log-odds over the no-intent click oracle):\n")
            w("| model | seed | " + " | ".join(f"gap {k}" for k in keys) + " |")
            w("| --- | --- | " + " | ".join("---" for _ in keys) + " |")
            for m, by in cap.items():
                for seed, v in sorted(by.items()):
                    w(f"| {m} | {seed} | " + " | ".join(f"{v[k]:+.3f}" if k in v else "n/a" for k in keys) + " |")
            w("")
        k_in = next((k for k in keys if k.startswith("256-")), None)
        if k_in and "pre" in keys:
            def gain(v: dict) -> float:
                return v[k_in] - v["pre"]
            for label, cap in (("conversion", d["capture"]), ("click", d.get("capture_click") or {})):
                if not cap:
                    continue
                parts = [f"{m} {np.mean([gain(v) for v in by.values()]):+.2f}" for m, by in cap.items()]
                w(f"Intent priced in ({label}) on active rows with gap {k_in} (the pyramid's reach beyond the "
                  f"no-pyramid branch's 256) minus that on not-yet-active rows of the same intent (the same users and "
                  f"categories; mean over seeds): " + ", ".join(parts) + ".\n")
        on_it = runs.get(c["dataset"], [])
        if on_it:
            names = ", ".join(f"`{e}`" for e, _ in on_it)
            w(f"Test NE of the models trained on this dataset ({names}; NE − gem with its bootstrap 95 % "
              "interval where the run has GEM's result to compare with):\n")
            w("| model | NE click | NE conversion | AUC conversion | click NE − gem [95 %] | conversion NE − gem [95 %] | run |")
            w("| --- | --- | --- | --- | --- | --- | --- |")
            for e, rd in on_it:
                for m, r in rd["models"].items():
                    a = r["all"]
                    ci = rd.get("ne_delta_vs_gem_ci", {}).get(m, {})

                    def delta(task: str) -> str:
                        x = ci.get(task, {}).get("all")
                        return f"{x['delta']:+.4f} [{x['lo']:+.4f}, {x['hi']:+.4f}]" if x else ""
                    w(f"| {m} | {a['click']['ne']:.4f} | {a['conversion']['ne']:.4f} | "
                      f"{a['conversion']['auc']:.4f} | {delta('click')} | {delta('conversion')} | `{Path(e).name}` |")
            w("")
        for key in ("plot", "plot_click"):
            png = Path(c.get(key, ""))
            if png.name:
                w(f"![{png.stem}](model-results/{png.name})\n")
    return L


def _plot(capture: dict, keys: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(capture)
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(names)), 3.8))
    w = 0.8 / len(keys)
    for j, k in enumerate(keys):
        for i, n in enumerate(names):
            vals = [d.get(k) for d in capture[n].values() if d.get(k) is not None]
            if vals:
                ax.bar(i + j * w, float(np.mean(vals)), w, color=f"C{j}", label=f"gap {k}" if i == 0 else None)
                ax.plot([i + j * w] * len(vals), vals, "k.", ms=3)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xticks(np.arange(len(names)) + 0.4 - w / 2, names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("intent priced in (log-odds)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
