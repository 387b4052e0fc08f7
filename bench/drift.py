"""Online learning under an abrupt interest shift: progressive NE recovers; a frozen model does not.

The simulator shifts interests once, at time T halfway through the stream
(``SimConfig.interest_shift_at_s``, strength ``interest_shift_strength`` = 1:
every user's interests and the categories' click effects are drawn anew;
docs/simulator.md). The categories' click effects are given a std of
``--category-std`` (1.5; the simulator's default is 0.3) so that the
population-level interests are a signal a model learns within the run -- and
loses at T. Events go through the embedded broker and the real stream worker
(shards + labelled examples); then, in this process, the trainer's own step
(:class:`opengem.model.trainer.OnlineLearner`, predict-then-train on
point-in-time batches from the shards) runs over the examples in
impression-time order. At T a copy of the model is frozen and scores every
later batch without training.

Figures (click task; NE = log loss / entropy of the window's CTR; a window is
the last ``--window`` examples, evaluated after every batch):

* ``pre_drift_ne``: the online model's progressive NE over the last window before T;
* ``recovered_after_examples``: examples after T until the online model's
  trailing-window NE is within 2 % of ``pre_drift_ne`` *and stays within 2 %
  for another window's worth of examples* (None: not within the run);
  ``first_within_2pct_after_examples``: the first time it is within 2 %;
* ``frozen_within_2pct``: whether the frozen model's trailing window is within
  2 % of ``pre_drift_ne`` at any point after T; ``frozen_ne_after_mean`` and
  ``frozen_degradation`` (its mean over the post-T windows / pre_drift_ne - 1);
* ``online_ne_after`` / ``frozen_ne_after`` / ``oracle_ne_after``: per disjoint
  window after T;
* ``oracle_ne_pre`` / ``oracle_ne_after``: NE of the simulator's true
  probabilities on the same windows (the attainable floor; the shift changes it too);
* a PNG (``--plot``, default next to ``--out``) of the trailing-window NE over
  examples for online, frozen and oracle.

The frozen model also misses the ads created after T (the simulator keeps
creating ads), so a small part of its gap is cold start, not the shift.
"""

from __future__ import annotations

import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402
from _pipeline import Pipeline, produce  # noqa: E402

TOLERANCE = 0.02  # "within 2 % of the pre-drift NE"


def trailing_ne(p: np.ndarray, y: np.ndarray, window: int, at: np.ndarray) -> np.ndarray:
    """NE of the ``window`` examples ending at each position in ``at`` (exclusive end; nan if < window)."""
    from opengem.model.metrics import EPS

    pc = np.clip(p.astype(np.float64), EPS, 1 - EPS)
    ll = -(y * np.log(pc) + (1 - y) * np.log1p(-pc))
    cl = np.concatenate([[0.0], np.cumsum(ll)])
    cy = np.concatenate([[0.0], np.cumsum(y)])
    out = np.full(len(at), np.nan)
    ok = at >= window
    e = at[ok]
    b = (cy[e] - cy[e - window]) / window
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -(b * np.log(b) + (1 - b) * np.log1p(-b))
        out[ok] = (cl[e] - cl[e - window]) / window / h
    return out


def recovery(ne_at: np.ndarray, at: np.ndarray, target: float, window: int) -> tuple[int | None, int | None]:
    """(first position within ``target``, first position from which it stays within it for ``window`` more)."""
    ok = ne_at <= target
    first = int(at[np.argmax(ok)]) if ok.any() else None
    for i in np.flatnonzero(ok):
        hold = (at >= at[i]) & (at <= at[i] + window)
        if at[-1] >= at[i] + window and ok[hold].all():
            return first, int(at[i])
    return first, None


def plot(path: Path, at: np.ndarray, series: dict[str, np.ndarray], n_pre: int, pre_ne: float, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.8), dpi=110)
    style = {"online (predict, then train)": ("C0", "-"), "frozen at T": ("C3", "-"), "oracle (true p)": ("k", ":")}
    for name, v in series.items():
        c, ls = style.get(name, (None, "-"))
        ax.plot(at, v, color=c, ls=ls, lw=1.4, label=name)
    ax.axvline(n_pre, color="grey", lw=1)
    ax.text(n_pre, ax.get_ylim()[1], " T: interests shift", va="top", fontsize=9, color="grey")
    ax.axhspan(pre_ne, pre_ne * (1 + TOLERANCE), color="C0", alpha=0.12, label="within 2 % of pre-drift NE")
    finite = np.concatenate([v[np.isfinite(v)] for v in series.values()])
    if finite.size:
        ax.set_ylim(max(0.0, finite.min() - 0.03), min(finite.max() + 0.03, 1.4))
    ax.set_xlabel("examples (impression-time order)")
    ax.set_ylabel("progressive NE, click (trailing window)")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower left", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    ap = _common.parser("drift", __doc__)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--window", type=int, default=0, help="examples per NE window (default 5k quick / 10k full)")
    ap.add_argument("--events", type=int, default=0, help="simulated events (default 300k quick / 900k full)")
    ap.add_argument("--strength", type=float, default=1.0, help="SimConfig.interest_shift_strength")
    ap.add_argument("--category-std", type=float, default=1.5, help="SimConfig.category_effect_std")
    ap.add_argument("--plot", default="", help="PNG path (default: --out with .png)")
    args = ap.parse_args()
    import torch

    from opengem.features.sharded import ShardedReader
    from opengem.model.data import examples_batch
    from opengem.model.distributed import init_distributed
    from opengem.model.metrics import ne
    from opengem.model.train_config import TrainConfig
    from opengem.model.trainer import OnlineLearner, model_config, quiet_torchrec
    from opengem.stream.simulator import SimConfig, Simulator

    quiet_torchrec()
    n_events = args.events or (300_000 if args.quick else 900_000)
    window = args.window or (5_000 if args.quick else 10_000)
    eps = 100.0
    shift_s = n_events / eps / 2
    sim_cfg = SimConfig(n_users=5_000, events_per_second=eps, interest_shift_at_s=shift_s,
                        interest_shift_strength=args.strength, category_effect_std=args.category_std)
    tcfg = TrainConfig(preset=args.preset)
    torch.set_num_threads(tcfg.threads)
    work = Path(tempfile.mkdtemp(prefix="opengem-bench-drift-"))
    pipe = Pipeline(work / "data", click_window_s=60, conversion_window_s=600).start()
    try:
        sim = Simulator(sim_cfg)
        t0 = time.monotonic()
        produce(pipe.bootstrap, sim, n_events)
        pipe.wait_settled()
        examples = sorted(pipe.read_examples(), key=lambda e: e.ts)
        # The stream's last conversion window (600 s) holds only the impressions that closed without
        # a click (clicked ones still wait): drop it, or the last windows have no positives.
        examples = [e for e in examples if e.ts <= examples[-1].ts - 600_000]
        print(f"{n_events:,} events -> {len(examples):,} examples ({time.monotonic() - t0:.0f}s); "
              f"interests shifted at event time +{(sim.shifted_at_ms - sim_cfg.start_ts_ms) / 1000:.0f}s", flush=True)
        T = sim.shifted_at_ms
        info = init_distributed("cpu")
        mcfg = model_config(tcfg, pipe.cfg.surfaces)
        online = OnlineLearner("gem", mcfg, tcfg, info)
        frozen = None
        reader = ShardedReader(pipe.data_dir, pipe.partitions, secondary_root=work / "reader")
        reader.catch_up()
        B = tcfg.batch_size
        p_on, p_fr, ys, truth = [], [], [], []
        before = [e for e in examples if e.ts < T]
        after = [e for e in examples if e.ts >= T]
        t1 = time.monotonic()
        for phase in (before, after):
            if phase is after:  # freeze a copy at T: it scores everything later, never trains
                frozen = OnlineLearner("gem", mcfg, tcfg, info)
                frozen.load_state(online.state())
            for i in range(0, len(phase), B):
                chunk = phase[i:i + B]
                batch = examples_batch(chunk, reader, mcfg)
                if frozen is not None:
                    p_fr.append(frozen.predict(batch)[:, 0].numpy())
                p_on.append(online.step(batch, torch.ones(len(chunk)))[:, 0].numpy())
                ys.append(batch.labels[:, 0].numpy())
                truth.append(np.array([e.p_click for e in chunk], np.float64))
                done = sum(len(x) for x in ys)
                if (done // B) % 50 == 0:
                    print(f"  {done:,}/{len(examples):,} examples ({done / (time.monotonic() - t1):,.0f}/s)",
                          flush=True)
        reader.close()
    finally:
        pipe.stop()
        shutil.rmtree(work, ignore_errors=True)
    p_on_a, y, tr = map(np.concatenate, (p_on, ys, truth))
    n_pre = len(before)
    pre_ne = ne(p_on_a[:n_pre][-window:], y[:n_pre][-window:])
    oracle_pre = ne(tr[:n_pre][-window:], y[:n_pre][-window:])
    p_fr_a = np.concatenate(p_fr)
    post_on, post_y, post_tr = p_on_a[n_pre:], y[n_pre:], tr[n_pre:]
    target = (1 + TOLERANCE) * pre_ne

    # Trailing windows after every batch; after T only post-T examples count (the first after a window).
    at_post = np.arange(B, len(post_y) + 1, B)
    on_post = trailing_ne(post_on, post_y, window, at_post)
    fr_post = trailing_ne(p_fr_a, post_y, window, at_post)
    first, recovered = recovery(on_post, at_post, target, window)
    frozen_ok = bool(np.nanmin(fr_post) <= target) if np.isfinite(fr_post).any() else False

    rows, online_after, frozen_after, oracle_after = [], [], [], []
    for k in range(0, len(post_y) - window + 1, window):
        s = slice(k, k + window)
        a, f, o = ne(post_on[s], post_y[s]), ne(p_fr_a[s], post_y[s]), ne(post_tr[s], post_y[s])
        online_after.append(a)
        frozen_after.append(f)
        oracle_after.append(o)
        rows.append([f"after T: examples {k:,}-{k + window:,}", a, f, o])
    frozen_mean = float(np.mean(frozen_after)) if frozen_after else math.nan
    table = [["before T (last window)", pre_ne, pre_ne, oracle_pre]] + rows
    print(_common.table(table, ["window", "online NE", "frozen NE", "oracle NE"]))
    print(f"online: within 2% of pre-drift NE {target / (1 + TOLERANCE):.4f} first after {first} examples, "
          f"for good (a further window) after {recovered}; frozen ever within 2%: {frozen_ok}, "
          f"mean NE after T {frozen_mean:.4f} ({frozen_mean / pre_ne - 1:+.1%})")

    # The plot: trailing windows over the whole run (the online and oracle curves across T).
    at_all = np.arange(B, len(y) + 1, B)
    fr_full = np.full(len(at_all), np.nan)
    sel = at_all > n_pre
    fr_full[sel] = trailing_ne(np.concatenate([p_on_a[:n_pre], p_fr_a]), y, window, at_all[sel])
    fr_full[sel & (at_all - window < n_pre)] = np.nan  # frozen curve only once its window lies after T
    series = {"online (predict, then train)": trailing_ne(p_on_a, y, window, at_all), "frozen at T": fr_full,
              "oracle (true p)": trailing_ne(tr, y, window, at_all)}
    png = Path(args.plot) if args.plot else Path(args.out).with_suffix(".png")
    png.parent.mkdir(parents=True, exist_ok=True)
    plot(png, at_all, series, n_pre, pre_ne,
         f"{args.preset} preset, {len(y):,} examples, trailing {window:,}-example windows; "
         f"interest shift strength {args.strength:g}, category std {args.category_std:g}")
    print(f"plot: {png}")
    _common.write(args.out, "drift", {"preset": args.preset, "events": n_events, "window": window, "quick": args.quick,
                                      "tolerance": TOLERANCE,
                                      "sim": {"n_users": sim_cfg.n_users, "events_per_second": eps,
                                              "interest_shift_at_s": shift_s,
                                              "interest_shift_strength": args.strength,
                                              "category_effect_std": args.category_std},
                                      "batch_size": tcfg.batch_size, "threads": tcfg.threads, "lr": tcfg.lr,
                                      "emb_lr": tcfg.emb_lr},
                  {"pre_drift_ne": pre_ne, "oracle_ne_pre": oracle_pre,
                   "recovered_after_examples": recovered, "first_within_2pct_after_examples": first,
                   "frozen_within_2pct": frozen_ok, "frozen_ne_after_mean": frozen_mean,
                   "frozen_degradation": frozen_mean / pre_ne - 1,
                   "online_ne_after": online_after, "frozen_ne_after": frozen_after, "oracle_ne_after": oracle_after,
                   "oracle_ne_after_mean": float(np.mean(oracle_after)) if oracle_after else math.nan,
                   "examples_before": n_pre, "examples_after": int(len(post_y)), "plot": str(png)})


if __name__ == "__main__":
    main()
