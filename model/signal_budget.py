"""How much NE each simulator signal puts at stake, and how much of it a model can reach.

An ablation can only lose what the data rewards its part for. This module
measures that ceiling on a materialized simulator dataset (:mod:`opengem.model.evaluate`):

* The simulator is rerun with its impression trace on (``Simulator.trace``: each
  ad impression's logit terms) and joined to the dataset's test rows on
  (user, ts), checked exactly against the stored oracle probabilities.
* **Oracle budget of a term** (interactions, long-range intent): the test NE of
  the simulator's true probabilities with that term taken out of the logit
  (then scaled so the mean prediction is unchanged) minus the oracle's NE: what
  a model that misses the term entirely loses at most.
* **Observable budget of the long-range intent**: the oracle knows which event
  planted the user's intent; a model sees only the history it reads (up to
  ``max_len`` events). ``intent_posterior`` is the exact P(intent active | the
  history) under the simulator's rule, and ``p_observable`` the oracle with the
  intent replaced by that posterior: the best any model reading that history can
  do. NE(no intent) - NE(observable) is the part of the signal a sequence arch can
  earn; NE(observable) - NE(oracle) is hidden from every model.
* **Capture per model**: on the test rows where the intent is active, bucketed by
  the activation gap to the planting event (the ablations' windows: below 256 the
  no-pyramid branch still sees it, beyond ``max_len`` nobody does), how much of
  the intent each model priced in (:func:`lift`: its conversion log-odds over
  those of the oracle without the intent, relative to rows without an intent).
  The oracle's value there is about +1.4; a model that learned nothing of the
  rule shows ~0. Label-free, so it is not limited by the few conversions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from opengem.stream.events import KIND_INDEX

GAP_BUCKETS = ((200, 256), (256, 1024), (1024, None))


def _expit(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), 1e-9, 1 - 1e-9)
    return np.log(p / (1 - p))


def logloss(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), 1e-9, 1 - 1e-9)
    return -(y * np.log(p) + (1 - y) * np.log(1 - p))


def ne(p: np.ndarray, y: np.ndarray) -> float:
    """Normalized entropy: mean log loss / entropy of the base rate."""
    y = np.asarray(y, np.float64)
    b = float(y.mean())
    if not 0 < b < 1:
        return float("nan")
    return float(logloss(p, y).mean() / -(b * np.log(b) + (1 - b) * np.log(1 - b)))


# ---------------------------------------------------------------------------- trace and join


def impression_trace(sim_cfg: Any, n_events: int, batch_size: int = 65536) -> dict[str, np.ndarray]:
    """The simulator's per-impression logit terms for the first ``n_events`` events (and the rest
    of the generation block they end in)."""
    from opengem.stream.simulator import Simulator

    sim = Simulator(sim_cfg)
    sim.trace = []
    for _ in sim._chunks(n_events, batch_size):
        pass
    if not sim.trace:
        raise ValueError("the simulator generated no impressions")
    return {k: np.concatenate([d[k] for d in sim.trace]) for k in sim.trace[0]}


def join_rows(trace: dict[str, np.ndarray], user: np.ndarray, ts: np.ndarray, p_click: np.ndarray,
              tol: float = 1e-9) -> np.ndarray:
    """Index into ``trace`` of each dataset row, matched on (user, ts); ties (two impressions of a
    user in one millisecond) are resolved by the oracle pCTR. Raises unless every row matches the
    trace's pCTR within ``tol`` -- the check that the trace is the dataset's stream."""
    user, ts = np.asarray(user, np.int64), np.asarray(ts, np.int64)
    t0 = int(min(trace["ts"].min(), ts.min()))
    kt = trace["user"].astype(np.int64) * (1 << 42) + (trace["ts"] - t0)
    kd = user * (1 << 42) + (ts - t0)
    order = np.argsort(kt, kind="stable")
    ks = kt[order]
    lo = np.searchsorted(ks, kd, side="left")
    hi = np.searchsorted(ks, kd, side="right")
    if np.any(hi == lo):
        raise ValueError(f"{int((hi == lo).sum())} dataset rows have no impression in the trace")
    idx = order[lo]
    for r in np.flatnonzero(hi - lo > 1):
        cand = order[lo[r]:hi[r]]
        idx[r] = cand[np.argmin(np.abs(trace["p_click"][cand] - p_click[r]))]
    err = np.abs(trace["p_click"][idx] - p_click)
    if err.max(initial=0.0) > tol:
        raise ValueError(f"trace and dataset disagree: max |pCTR difference| {err.max():.3g}")
    return idx


# ---------------------------------------------------------------------------- observable intent


def intent_posterior(kind: np.ndarray, category: np.ndarray, item: np.ndarray, offsets: np.ndarray,
                     target_category: np.ndarray, *, cause: str, plant_prob: float, min_gap: int) -> np.ndarray:
    """P(the long-range intent is active for the row's ad | the row's history), per row.

    ``kind`` (raw kind codes), ``category`` and ``item`` (any consistent ids, e.g. table rows) are
    the rows' histories concatenated, oldest first, ``offsets`` (B + 1,) their boundaries;
    ``target_category`` (B,) the ad's category in the same ids.

    The simulator's rule: each cause event (an organic follow, or a converted impression for
    ``cause="conversion"``) plants with probability ``plant_prob``; the user's intent is the last
    plant; it is active for an ad of its category once ``min_gap`` activations (organic events and
    impressions; clicks and conversions don't count) have passed. So with cause events f of the
    target's category at least ``min_gap`` activations back, P = sum_f q (1 - q)^(cause events after f).
    A conversion's plant sits at its impression (the latest impression of the same item before
    it, else the conversion itself). Plants older than the history are not seen: this is what a
    model reading this history can know.
    """
    kind = np.asarray(kind, np.int64)
    click, conv, imp = KIND_INDEX["click"], KIND_INDEX["conversion"], KIND_INDEX["impression"]
    cause_kind = {"follow": KIND_INDEX["follow"], "conversion": conv}[cause]
    q = float(plant_prob)
    out = np.zeros(len(offsets) - 1)
    for b in range(len(out)):
        s, e = int(offsets[b]), int(offsets[b + 1])
        if e == s:
            continue
        k, c, it = kind[s:e], category[s:e], item[s:e]
        act = (k != click) & (k != conv)
        # activations after event i, +1: the gap if the row's impression is the next activation
        after = np.cumsum(act[::-1])[::-1] - act + 1
        cz = np.flatnonzero(k == cause_kind)
        if not len(cz):
            continue
        at = cz.copy()  # where each cause event's plant sits
        if cause == "conversion":
            for j, i in enumerate(cz):
                prev = np.flatnonzero((k[:i] == imp) & (it[:i] == it[i]))
                if len(prev):
                    at[j] = prev[-1]
        later = len(cz) - 1 - np.arange(len(cz))  # cause events after each (plant order = event order)
        ok = (c[cz] == target_category[b]) & (after[at] >= min_gap)
        out[b] = float(np.sum(q * (1 - q) ** later[ok]))
    return np.minimum(out, 1.0)


def _no_intent_logits(trace: dict[str, np.ndarray], idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(click, CVR) logits without the long-range intent (a trace without ``click_long_range``
    predates the click term: its click logit has none)."""
    zc = trace["z_click"][idx]
    if "click_long_range" in trace:
        zc = zc - trace["click_long_range"][idx]
    return zc, trace["z_cvr"][idx] - trace["cvr_long_range"][idx]


def p_observable(trace: dict[str, np.ndarray], idx: np.ndarray, posterior: np.ndarray,
                 strength: float, cdf: float, click_strength: float = 0.0, task: str = "conversion") -> np.ndarray:
    """The oracle of ``task`` with the intent replaced by its posterior: the windowed conversion
    (default), or the click. The intent moves the CVR logit by ``strength`` and the click logit by
    ``click_strength`` (``SimConfig.long_range_click_strength``); one hidden state drives both, so
    the conversion mixes the two products, not the two marginals."""
    zc0, z0 = _no_intent_logits(trace, idx)
    if task == "click":
        return posterior * _expit(zc0 + click_strength) + (1 - posterior) * _expit(zc0)
    if task != "conversion":
        raise ValueError(f"task {task!r}: click or conversion")
    on = _expit(zc0 + click_strength) * _expit(z0 + strength)
    return (posterior * on + (1 - posterior) * _expit(zc0) * _expit(z0)) * cdf


def without_intent(trace: dict[str, np.ndarray], idx: np.ndarray, task: str, cdf: float) -> np.ndarray:
    """The oracle of ``task`` with the long-range intent taken out of both logits, scaled to the
    oracle's mean (what :func:`without_term` does for one term)."""
    zc, zv = _no_intent_logits(trace, idx)
    if task == "click":
        full, cut = trace["p_click"][idx], _expit(zc)
    else:
        full, cut = trace["p_click"][idx] * trace["p_cvr"][idx] * cdf, _expit(zc) * _expit(zv) * cdf
    return np.clip(cut * (full.mean() / max(cut.mean(), 1e-12)), 0, 1)


def without_term(trace: dict[str, np.ndarray], idx: np.ndarray, term: str, task: str, cdf: float) -> np.ndarray:
    """The oracle of ``task`` with one trace term taken out of its logit, scaled to the oracle's mean."""
    pc, zc, zv = trace["p_click"][idx], trace["z_click"][idx], trace["z_cvr"][idx]
    t = trace[term][idx]
    if task == "click":
        full, cut = pc, _expit(zc - t) if term.startswith("click") else pc
    else:
        full = pc * trace["p_cvr"][idx] * cdf
        cut = _expit(zc - t) * _expit(zv) * cdf if term.startswith("click") else pc * _expit(zv - t) * cdf
    return np.clip(cut * (full.mean() / max(cut.mean(), 1e-12)), 0, 1)


# ---------------------------------------------------------------------------- per-model capture


def gap_masks(gap: np.ndarray, min_gap: int, buckets: Sequence[tuple[int, int | None]] = GAP_BUCKETS
              ) -> dict[str, np.ndarray]:
    """Row masks: ``none`` (no intent in the ad's category), ``pre`` (intent in the ad's category, gap
    below ``min_gap``: not active yet) and one per active gap bucket."""
    out = {"none": gap < 0, "pre": (gap >= 0) & (gap < min_gap)}
    for lo, hi in buckets:
        out[f"{lo}-{hi if hi is not None else 'inf'}"] = (gap >= lo) & ((gap < hi) if hi is not None else True)
    return out


def lift(p_conv: np.ndarray, p_no_intent: np.ndarray, masks: dict[str, np.ndarray]) -> dict[str, float]:
    """The intent a model priced in, per bucket: its conversion log-odds minus those of the oracle
    without the intent term (which already holds everything else: affinity, surface, ...), averaged
    over the bucket, minus the same average over the ``none`` rows. The oracle's own value is the
    intent's effect (~ +1.4 on active rows, 0 on ``pre``); a model that learned nothing of the
    intent has ~0 everywhere."""
    r = _logit(p_conv) - _logit(p_no_intent)
    base = float(r[masks["none"]].mean()) if masks["none"].any() else float("nan")
    return {k: float(r[m].mean()) - base for k, m in masks.items() if k != "none" and m.any()}


def model_predictions(work_dirs: Sequence[str | Path], dataset_fp: str | None = None) -> list[dict[str, Any]]:
    """Every ``<work>/models/<name>.json`` + ``.test.npz`` pair: name, seed, test predictions (same
    row order as the dataset's test split). Results of another dataset (fingerprint) are skipped."""
    out = []
    for w in work_dirs:
        for js in sorted(Path(w, "models").glob("*.json")):
            npz = js.with_suffix(".test.npz")
            if not npz.exists():
                continue
            meta = json.loads(js.read_text())
            if dataset_fp is not None and meta.get("dataset") != dataset_fp:
                continue
            out.append({"model": meta["model"], "seed": meta.get("seed", 0), "work": str(w),
                        "p": np.load(npz)["p"].astype(np.float64)})
    return out
