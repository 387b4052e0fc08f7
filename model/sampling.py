"""Negative downsampling with importance weights, and progressive metrics that stay unbiased under it.

Why. The trainer's cost is per example (store reads, batch building, forward,
backward), and on an ads stream almost every example is a negative (a click
rate of a few per cent). Training on every positive and a fraction ``r`` of
the negatives cuts the work about ``1 / (rate + r)``-fold; the negatives that
are kept carry weight ``1 / r``, so the expected weighted loss is the loss of
the full stream and the model's probabilities stay calibrated. (The other
standard fix, correcting an unweighted model's output with
``p / (p + (1 - p) / r)``, would have to be applied per funnel stage of ESMM
and by every consumer of a published model; weights keep the published model
an ordinary, calibrated one.) "Positive" means any task label is 1: with the
click -> conversion funnel every conversion is also a click, so both tasks'
positives are all kept and both stay unbiased.

Determinism. Whether a negative is kept depends only on a keyed hash of its
example id (BLAKE2b keyed with ``seed``; Python's ``hash`` is salted per
process): a replay after a crash, another rank or a second run keeps the same
examples at the same rate, so with a fixed rate resuming from a checkpoint
trains exactly what an uninterrupted run trains. Lowering ``r`` keeps a subset
of what a higher ``r`` kept (an example is kept iff its hash falls below
``r``).

Adaptive rate (``max_delay_s > 0``). While the examples being trained are
older than ``max_delay_s`` (their record's Kafka timestamp to now), ``r`` is
lowered by a factor a second down to ``min_rate``; once they are younger than
half of it, it climbs back towards the configured rate. Each example keeps the
weight of the rate it was sampled at, so calibration holds while ``r`` moves;
what is lost is the bit-exact replay (the rate after a restart follows the
restarted process's lag).

Progressive validation under sampling. The trainer scores only the examples it
keeps (scoring the dropped ones would need their store reads and a forward:
~60 % of the cost of training them, measured, which would cap the speed-up near
1.7x), and computes every windowed metric with the same importance weights
(:func:`weighted_summary`, a Horvitz-Thompson estimate): the weighted label
rate, log loss, NE, AUC and calibration are consistent estimates of the
figures over the full stream. With ``r = 1`` they equal the unweighted
:func:`opengem.model.metrics.summarize`.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import deque
from typing import Any, Hashable

import numpy as np

from opengem.model.metrics import EPS, entropy

_TWO_64 = float(2**64)


def hash_unit(example_id: str, seed: int = 0) -> float:
    """A uniform number in [0, 1) fixed by (seed, example id), the same in every process."""
    key = int(seed).to_bytes(8, "little", signed=True)
    digest = hashlib.blake2b(example_id.encode(), digest_size=8, key=key).digest()
    return int.from_bytes(digest, "little") / _TWO_64


class NegativeSampler:
    """Keeps every positive and a deterministic fraction ``rate`` of the negatives; weights 1/rate.

    ``rate`` = 1.0 keeps everything with weight 1 (sampling off). ``max_delay_s``
    > 0 makes the rate adaptive between ``min_rate`` and ``rate`` (module docstring).
    """

    # Adaptive control: one adjustment a second at most; lower faster than raise, so a
    # growing backlog is cut quickly and the rate creeps back once the trainer keeps up.
    interval_s = 1.0
    down = 0.8
    up = 1.1

    def __init__(self, rate: float = 1.0, *, seed: int = 0, min_rate: float = 0.01, max_delay_s: float = 0.0):
        if not 0.0 < rate <= 1.0:
            raise ValueError(f"negative rate must be in (0, 1], got {rate}")
        if not 0.0 < min_rate <= 1.0:
            raise ValueError(f"minimum negative rate must be in (0, 1], got {min_rate}")
        if max_delay_s < 0:
            raise ValueError(f"max_delay_s must be >= 0, got {max_delay_s}")
        self.max_rate = rate
        self.min_rate = min(min_rate, rate)
        self.max_delay_s = max_delay_s
        self.seed = seed
        self.rate = rate
        self._next_adapt = 0.0

    def weight(self, example_id: str, positive: bool) -> float:
        """Training weight: 1 for a positive, 1/rate for a kept negative, 0 for a dropped one."""
        r = self.rate  # read once: the trainer's read thread calls this while adapt() may move it
        if positive or r >= 1.0:
            return 1.0
        return 1.0 / r if hash_unit(example_id, self.seed) < r else 0.0

    def adapt(self, delay_s: float, now: float | None = None) -> float:
        """One control step from the age (seconds) of the newest example just trained; returns the rate."""
        now = time.monotonic() if now is None else now
        if self.max_delay_s <= 0 or now < self._next_adapt:
            return self.rate
        self._next_adapt = now + self.interval_s
        if delay_s > self.max_delay_s:
            self.rate = max(self.min_rate, self.rate * self.down)
        elif delay_s < 0.5 * self.max_delay_s:
            self.rate = min(self.max_rate, self.rate * self.up)
        return self.rate

    def restore(self, rate: float | None) -> None:
        """The rate a checkpoint recorded, clamped to this configuration's bounds (None: keep)."""
        if rate is not None and self.max_delay_s > 0:
            self.rate = min(self.max_rate, max(self.min_rate, float(rate)))


def weighted_auc(p: np.ndarray, y: np.ndarray, w: np.ndarray) -> float:
    """ROC AUC where each row counts ``w`` times: P(score of a positive > score of a negative), ties half."""
    pos_w, neg_w = w * y, w * (1.0 - y)
    total_pos, total_neg = pos_w.sum(), neg_w.sum()
    if total_pos <= 0 or total_neg <= 0:
        return math.nan
    _, run = np.unique(p, return_inverse=True)  # rows of equal score share a run, runs in score order
    pos_run = np.bincount(run, pos_w)
    neg_run = np.bincount(run, neg_w)
    neg_below = np.cumsum(neg_run) - neg_run
    return float((pos_run * (neg_below + 0.5 * neg_run)).sum() / (total_pos * total_neg))


def weighted_summary(p: Any, y: Any, w: Any) -> dict[str, float]:
    """:func:`opengem.model.metrics.summarize` with row weights (importance weights of a sample).

    Keys as there, plus ``weight`` (the examples the rows stand for); ``n`` is the row count.
    """
    p = np.asarray(p, np.float64)
    y = np.asarray(y, np.float64)
    w = np.asarray(w, np.float64)
    total = float(w.sum())
    out = {"n": int(y.size), "weight": total}
    if y.size == 0 or total <= 0:
        return out | {k: math.nan for k in ("rate", "mean_pred", "log_loss", "ne", "auc", "calibration")}
    pc = np.clip(p, EPS, 1 - EPS)
    rate = float((w * y).sum() / total)
    loss = float(-(w * (y * np.log(pc) + (1 - y) * np.log1p(-pc))).sum() / total)
    h = entropy(rate)
    mean_pred = float((w * p).sum() / total)
    return out | {
        "rate": rate,
        "mean_pred": mean_pred,
        "log_loss": loss,
        "ne": loss / h if h == h and h > 0 else math.nan,
        "auc": weighted_auc(p, y, w),
        "calibration": mean_pred / rate if rate > 0 else math.nan,
    }


class WeightedWindow:
    """The last ``window`` (prediction, label, weight) rows per key, e.g. (surface, task).

    ``window`` counts rows (kept examples), not the examples they stand for.
    Appends are O(batch); :meth:`summary` costs O(window log window) per key.
    """

    def __init__(self, window: int = 100_000):
        if window <= 0:
            raise ValueError("window must be positive")
        self.window = window
        self._chunks: dict[Hashable, deque[np.ndarray]] = {}
        self._n: dict[Hashable, int] = {}

    def add(self, key: Hashable, p: Any, y: Any, w: Any) -> None:
        """p, y, w: (n,) predictions, 0/1 labels, weights."""
        rows = np.stack([np.asarray(a, np.float64).ravel() for a in (p, y, w)], 1)  # (n, 3)
        if rows.size == 0:
            return
        chunks = self._chunks.setdefault(key, deque())
        chunks.append(rows)
        n = self._n.get(key, 0) + len(rows)
        while n - len(chunks[0]) >= self.window:  # drop whole old chunks while the rest still fills the window
            n -= len(chunks.popleft())
        self._n[key] = n

    def summary(self) -> dict[Hashable, dict[str, float]]:
        out = {}
        for key, chunks in self._chunks.items():
            rows = np.concatenate(chunks)[-self.window:]
            out[key] = weighted_summary(rows[:, 0], rows[:, 1], rows[:, 2])
        return out
