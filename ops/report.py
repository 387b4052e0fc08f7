"""`opengem report`: a PNG of a run's conversion and quality metrics.

Input: a *timeline* -- headline snapshots (:mod:`opengem.ops.headline`) at
successive times -- read from Prometheus's HTTP API (``query_range``) or from
a run's JSON (``opengem demo`` writes ``<data_dir>/logs/demo-metrics.json``,
scraping the daemons' endpoints every few seconds). Both carry the same
aggregated series, so the plots do not depend on where they came from. Rates
(events/s) and the serving p99 are computed here from counter and bucket
deltas between consecutive snapshots.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from opengem.ops.headline import Snapshot, bucket_delta, quantile_from_buckets

Timeline = list[tuple[float, Snapshot]]
FORMAT = 1


def save_run(path: str | Path, timeline: Timeline, meta: dict[str, Any] | None = None) -> Path:
    """Write a timeline as the run's JSON (atomically: a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps({"format": FORMAT, "meta": meta or {}, "timeline": timeline}))
    tmp.replace(path)
    return path


def load_run(path: str | Path) -> Timeline:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read run metrics {path}: {e}") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("timeline"), list):
        raise ValueError(f"{path}: not an opengem run metrics file (format {FORMAT})")
    return [(float(t), snap) for t, snap in data["timeline"]]


def _series(timeline: Timeline, key: str) -> dict[str, tuple[list[float], list[float]]]:
    """label -> (seconds since the first snapshot, values) of one headline key."""
    t0 = timeline[0][0]
    out: dict[str, tuple[list[float], list[float]]] = {}
    for t, snap in timeline:
        for label, v in snap.get(key, {}).items():
            xs, ys = out.setdefault(label, ([], []))
            xs.append(t - t0)
            ys.append(v)
    return out


def _rates(timeline: Timeline, key: str) -> dict[str, tuple[list[float], list[float]]]:
    """Per-second increase of a counter key between consecutive snapshots (resets skipped)."""
    out: dict[str, tuple[list[float], list[float]]] = {}
    for label, (xs, ys) in _series(timeline, key).items():
        pts = [(x1, (y1 - y0) / (x1 - x0)) for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:]))
               if x1 > x0 and y1 >= y0]
        out[label] = ([p[0] for p in pts], [p[1] for p in pts])
    return out


def _p99(timeline: Timeline) -> tuple[list[float], list[float]]:
    t0 = timeline[0][0]
    xs, ys, prev = [], [], None
    for t, snap in timeline:
        buckets = snap.get("serve_latency_bucket", {})
        if prev is not None and buckets:
            q = quantile_from_buckets(bucket_delta(buckets, prev), 0.99)
            if not math.isnan(q):
                xs.append(t - t0)
                ys.append(q * 1000)
        prev = buckets or prev
    return xs, ys


def render(timeline: Timeline, out: str | Path, title: str = "opengem run") -> Path:
    """Plot the timeline into ``out`` (PNG). Panels without data say so instead of vanishing."""
    if len(timeline) < 2:
        raise ValueError(f"a report needs at least 2 snapshots, got {len(timeline)}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 3, figsize=(18, 13))
    now = timeline[-1][0]

    def draw(ax: Any, title_: str, curves: dict[str, tuple[list[float], list[float]]], ylabel: str = "",
             style: str = "-", ref: float | None = None) -> None:
        ax.set_title(title_, fontsize=10)
        drawn = False
        for label, (xs, ys) in sorted(curves.items()):
            if xs:
                ax.plot(xs, ys, style, label=label or "all", linewidth=1.2)
                drawn = True
        if ref is not None:
            ax.axhline(ref, color="grey", linewidth=0.8, linestyle=":")  # label "_child…": not data
        if drawn:
            ax.legend(fontsize=7, loc="best")
        elif not any(not line.get_label().startswith("_") for line in ax.lines):
            ax.text(0.5, 0.5, "no data in this run", ha="center", va="center", transform=ax.transAxes, color="grey")
        ax.set_xlabel("seconds")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)

    draw(axes[0, 0], "labelled impressions per second, by surface", _rates(timeline, "impressions"), "impressions/s")
    draw(axes[0, 1], "CTR by surface (monitor's sliding window)", _series(timeline, "ctr"), "clicks / impressions")
    draw(axes[0, 2], "post-click CVR by surface (sliding window)", _series(timeline, "cvr"), "conversions / clicks")
    live_ne = {f"live {k}": v for k, v in _series(timeline, "live_ne").items()}
    draw(axes[1, 0], "NE: served model on live outcomes (—), trainer progressive (- -)", live_ne, "NE", ref=1.0)
    draw(axes[1, 0], axes[1, 0].get_title(), {f"train {k}": v for k, v in _series(timeline, "train_ne").items()},
         "NE", style="--")
    draw(axes[1, 1], "calibration of the served model (predicted / observed)", _series(timeline, "live_calibration"),
         "ratio", ref=1.0)
    draw(axes[1, 2], "AUC of the served model", _series(timeline, "live_auc"), "AUC", ref=0.5)
    pub = _series(timeline, "model_published").get("")
    t0 = timeline[0][0]
    # 0 = no served version yet: no age to plot
    age = {"served version": ([x for x, p in zip(*pub) if p > 0], [t0 + x - p for x, p in zip(*pub) if p > 0])} \
        if pub else {}
    draw(axes[2, 0], "model age (seconds since the served version's publication)", age, "s")
    draw(axes[2, 1], "consumer lag by group/topic", _series(timeline, "lag"), "records")
    draw(axes[2, 2], "Rank p99 latency between snapshots", {"p99": _p99(timeline)}, "ms")
    last = timeline[-1][1]
    imps = sum(last.get("impressions", {}).values())
    fig.suptitle(f"{title} — {now - t0:,.0f} s, {len(timeline)} snapshots, {imps:,.0f} labelled impressions",
                 fontsize=13)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out
