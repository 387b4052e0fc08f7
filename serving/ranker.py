"""Ranker: one request through the fixed lifecycle, independent of the transport.

take the served version → validate → featurize (store read) → wait for an
inference slot → score → value and order. gRPC (:mod:`opengem.serving.server`),
the JSON endpoint and tests all call :meth:`Ranker.rank`.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from opengem.serving.config import ServeConfig
from opengem.serving.models import ModelManager
from opengem.serving.scoring import ItemAttributeCache, RankQuery, featurize, validate


class NoModel(RuntimeError):
    """No version published (or none passed validation) yet: UNAVAILABLE."""


class DeadlineExceeded(RuntimeError):
    """The request's budget ran out before it was scored: DEADLINE_EXCEEDED."""


@dataclass(frozen=True, eq=False)
class RankResult:
    model_version: str
    model_kind: str
    tasks: tuple[str, ...]  # columns of ``scores``
    value_task: str
    ad_ids: np.ndarray  # (B,) int64, request order
    scores: np.ndarray  # (B, len(tasks)) float64 probabilities
    values: np.ndarray  # (B,) float64: bid x P(value_task)
    order: np.ndarray  # (B,) int64 candidate indexes, highest value first
    history_events: int
    request_id: str


class Ranker:
    """``reader``: the store read API (ShardedReader in production); ``slots``: the semaphore that
    bounds forward passes at once (rankers of one server share one; default: its own of
    ``cfg.inference_slots``)."""

    def __init__(self, reader: Any, models: ModelManager, cfg: ServeConfig = ServeConfig(),
                 slots: threading.BoundedSemaphore | None = None):
        self.reader, self.models, self.cfg = reader, models, cfg
        self._slots = slots if slots is not None else threading.BoundedSemaphore(cfg.inference_slots)
        self.items = ItemAttributeCache(reader)  # the ads' attributes, until the store changes

    def rank(self, q: RankQuery, deadline: float | None = None) -> RankResult:
        """``deadline``: time.monotonic() by which to answer (None: now + cfg.timeout_s)."""
        budget_end = time.monotonic() + self.cfg.timeout_s
        deadline = budget_end if deadline is None else min(deadline, budget_end)
        scorer = self.models.current  # this request's version, whatever is published meanwhile
        if scorer is None:
            raise NoModel(f"no model version served yet (watching {self.models.models_dir})")
        tasks = scorer.tasks
        validate(q, surfaces=scorer.surfaces, tasks=tasks, max_candidates=self.cfg.max_candidates)
        value_task = q.value_task or (self.cfg.value_task if self.cfg.value_task in tasks else tasks[-1])
        rb = featurize(q, self.reader, scorer.cfg, items=self.items)
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not self._slots.acquire(timeout=remaining):
            raise DeadlineExceeded("deadline exceeded waiting for the model")
        try:
            probs = scorer.probs(rb).double().numpy()
        finally:
            self._slots.release()
        bids = q.columns.bid
        values = bids * probs[:, tasks.index(value_task)]
        cols = [tasks.index(t) for t in q.tasks] if q.tasks else list(range(len(tasks)))
        return RankResult(
            model_version=scorer.loaded.version, model_kind=scorer.loaded.kind,
            tasks=tuple(tasks[i] for i in cols), value_task=value_task,
            ad_ids=q.columns.ad_id,
            scores=probs[:, cols], values=values, order=np.argsort(-values, kind="stable"),
            history_events=rb.history_events, request_id=q.request_id,
        )
