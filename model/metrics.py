"""Ranking-quality metrics used by the evaluator, the trainer and the ops layer.

* **NE** (normalized entropy, He et al. 2014): the mean log loss divided by
  the entropy of the base rate ``p̄`` of the same labels. 1.0 = no better than
  predicting the base rate everywhere; lower is better. Unlike raw log loss it
  compares across surfaces and tasks with different rates.
* **AUC**: probability that a random positive is ranked above a random
  negative (ties count half), from ranks -- O(n log n), exact.
* **Calibration**: mean prediction / observed rate (1.0 = calibrated).

All functions take NumPy-compatible arrays of probabilities and 0/1 labels,
and return NaN where a metric is undefined (no positives or no negatives),
never raise on an empty window. :class:`WindowedMetrics` keeps the last N
(prediction, label) pairs per (surface, task) key for sliding-window figures.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any, Hashable, Iterable

import numpy as np

EPS = 1e-7


def log_loss(p: Any, y: Any) -> float:
    p = np.clip(np.asarray(p, np.float64), EPS, 1 - EPS)
    y = np.asarray(y, np.float64)
    if p.size == 0:
        return math.nan
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))


def entropy(rate: float) -> float:
    if not 0.0 < rate < 1.0:
        return math.nan
    return -(rate * math.log(rate) + (1 - rate) * math.log1p(-rate))


def ne(p: Any, y: Any) -> float:
    """Normalized entropy: log loss / entropy of the labels' base rate."""
    y = np.asarray(y, np.float64)
    if y.size == 0:
        return math.nan
    h = entropy(float(y.mean()))
    return log_loss(p, y) / h if h == h and h > 0 else math.nan


def auc(p: Any, y: Any) -> float:
    """ROC AUC via the Mann-Whitney U statistic with average ranks for ties."""
    p = np.asarray(p, np.float64)
    y = np.asarray(y) > 0.5
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = np.argsort(p, kind="mergesort")
    ps = p[order]
    ranks = np.empty(p.size, np.float64)
    # Average rank over runs of equal scores.
    starts = np.r_[0, np.flatnonzero(np.diff(ps)) + 1]
    ends = np.r_[starts[1:], ps.size]
    avg = (starts + ends + 1) / 2.0  # 1-based average rank of each run
    ranks[order] = np.repeat(avg, ends - starts)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def calibration(p: Any, y: Any) -> float:
    """Mean prediction / observed rate; NaN when nothing was observed."""
    y = np.asarray(y, np.float64)
    if y.size == 0 or y.sum() == 0:
        return math.nan
    return float(np.mean(np.asarray(p, np.float64)) / y.mean())


def summarize(p: Any, y: Any) -> dict[str, float]:
    """Every metric of one (surface, task) cell as a dict (JSON- and table-ready)."""
    y = np.asarray(y, np.float64)
    return {
        "n": int(y.size),
        "rate": float(y.mean()) if y.size else math.nan,
        "mean_pred": float(np.mean(p)) if y.size else math.nan,
        "log_loss": log_loss(p, y),
        "ne": ne(p, y),
        "auc": auc(p, y),
        "calibration": calibration(p, y),
    }


class WindowedMetrics:
    """The last ``window`` (prediction, label) pairs per key, e.g. (surface, task).

    Appends are O(batch); :meth:`summary` costs O(window log window) per key,
    so callers compute it on a reporting interval, not per batch.
    """

    def __init__(self, window: int = 100_000):
        if window <= 0:
            raise ValueError("window must be positive")
        self.window = window
        self._p: dict[Hashable, deque[np.ndarray]] = {}
        self._y: dict[Hashable, deque[np.ndarray]] = {}
        self._n: dict[Hashable, int] = {}

    def add(self, key: Hashable, p: Any, y: Any) -> None:
        p = np.asarray(p, np.float32).ravel()
        y = np.asarray(y, np.float32).ravel()
        if p.shape != y.shape:
            raise ValueError(f"{p.shape} predictions but {y.shape} labels")
        if p.size == 0:
            return
        dp, dy = self._p.setdefault(key, deque()), self._y.setdefault(key, deque())
        dp.append(p)
        dy.append(y)
        n = self._n.get(key, 0) + p.size
        while n - dp[0].size >= self.window:  # drop whole old chunks while the rest still fills the window
            n -= dp.popleft().size
            dy.popleft()
        self._n[key] = n

    def keys(self) -> Iterable[Hashable]:
        return self._p.keys()

    def arrays(self, key: Hashable) -> tuple[np.ndarray, np.ndarray]:
        p = np.concatenate(self._p[key])[-self.window:]
        y = np.concatenate(self._y[key])[-self.window:]
        return p, y

    def summary(self) -> dict[Hashable, dict[str, float]]:
        return {k: summarize(*self.arrays(k)) for k in self._p}
