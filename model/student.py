"""Knowledge transfer: GEM as the teacher of small per-surface students.

A *student* is a latency-cheap ranker for one surface (DLRM-sized: one
embedding per id, the last ``history`` events mean-pooled plus the most recent
one, an MLP) that serves where GEM is too expensive. GEM reaches it through
four channels, each switchable (:class:`StudentConfig`), so their effects can
be measured one by one (``bench/transfer.py``):

* **Distillation through an auxiliary head.** The student's bottom MLP feeds
  two heads: the *serving head*, trained only on the true labels and the only
  one ever served, and the *distillation head*, trained on the teacher's
  predictions (soft BCE). The shared bottom learns from both; the teacher's
  bias (it may be stale, trained on older traffic, or miscalibrated for this
  surface) stays in the distillation head instead of the served scores.
* **Student Adapter** (:class:`StudentAdapter`): before a teacher prediction
  becomes a distillation target it is mapped through a small per-task
  calibration model, ``sigmoid(a_t · logit(p_teacher) + b_t)``, refitted
  (weighted Newton steps, L2 toward the identity) on the freshest labelled
  examples of the stream. A teacher that lags the traffic (its published
  version is minutes to hours old) is re-calibrated on today's labels before
  the student learns from it. The adapter is fitted predict-then-update: a
  batch is adapted with the fit of the examples *before* it, so a label never
  reaches its own target.
* **Representation transfer**: GEM's user-side representation
  (:func:`teacher_user_representation`: GEM's trunk input with the target ad
  blanked) is written to a :class:`~opengem.features.representations.RepresentationStore`
  on a refresh interval and read, point in time, as an input feature of the
  student -- GEM's knowledge at no extra serving cost.
* **Parameter sharing**: a student uses the same :class:`~opengem.model.gem.SparseArch`
  as GEM (same tables, same names, same hashing), so it can start from GEM's
  tables (:meth:`StudentModel.share_tables`), frozen or fine-tuned.

Hierarchical transfer is the same mechanism twice: GEM teaches a per-domain
intermediate model (a bigger student, or a small GEM, on one surface) and
that one teaches the final students (:class:`StudentLearner` accepts any
teacher probabilities).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from opengem.model.batch import DENSE_FEATURES, N_DENSE, NONSEQ_KEYS, FeatureConfig, GemBatch, make_kjt
from opengem.model.heads import STAGE_PRIORS, FunnelRanker, funnel_logits, mlp, prior_logits

from opengem.model.train_config import SHARE_MODES  # noqa: E402 - one list for the config and the model
# The target ad's ids, blanked (row 0 = missing) for a user-side representation.
AD_KEYS = ("item_id", "advertiser_id", "category", "ad_format")
_AD_DENSE = [i for i, n in enumerate(DENSE_FEATURES) if n.startswith("hist_log_same_")]


@dataclass(frozen=True)
class StudentConfig:
    features: FeatureConfig = field(default_factory=FeatureConfig)
    # The surface the student serves (it trains on that surface's examples only); None: all.
    surface: str | None = None
    # Embedding dim; must equal the teacher's to share its tables.
    d: int = 16
    # The last `history` events: mean-pooled + the most recent one (0: no history at all).
    history: int = 32
    # Bottom MLP shared by the serving and distillation heads.
    hidden: tuple[int, ...] = (128, 64)
    # Auxiliary distillation head (trained on teacher targets; never served).
    distill: bool = False
    # Weight of the distillation loss next to the label loss.
    distill_weight: float = 1.0
    # Soft-target mix on the *serving* head: its loss is BCE against (1 - soft_mix) * label +
    # soft_mix * (adapted) teacher probability -- standard KD on the served scores (0: labels only;
    # the teacher then reaches the served scores through the shared bottom alone).
    soft_mix: float = 0.0
    # Width of the teacher's user representation read as an input (0: none).
    repr_dim: int = 0
    # The representation's path in: LayerNorm -> dropout(repr_dropout) -> Linear(repr_dim, repr_width)
    # (0: 2 * d).
    repr_width: int = 0
    repr_dropout: float = 0.0
    # Tables: own (none), GEM's kept fixed (frozen), GEM's as the starting point (finetune).
    share_tables: str = "none"
    # As GemConfig.emb_init: every own table starts U(±emb_init).
    emb_init: float = 0.1

    def __post_init__(self) -> None:
        if self.share_tables not in SHARE_MODES:
            raise ValueError(f"share_tables must be one of {SHARE_MODES}, got {self.share_tables!r}")
        if self.surface is not None and self.surface not in self.features.surfaces:
            raise ValueError(f"unknown surface {self.surface!r}; known: {self.features.surfaces}")
        if self.history < 0 or self.repr_dim < 0 or self.distill_weight < 0 or self.repr_width < 0:
            raise ValueError("history, repr_dim, repr_width and distill_weight must be >= 0")
        if not (0.0 <= self.soft_mix <= 1.0 and 0.0 <= self.repr_dropout < 1.0):
            raise ValueError("soft_mix must be in [0, 1] and repr_dropout in [0, 1)")


@dataclass
class StudentInputs:
    """A GemBatch plus what only students read: the teacher's user representation.

    reps: (B, R) float32 (zeros where absent); has_reps: (B,) bool.
    """

    batch: GemBatch
    reps: torch.Tensor | None = None
    has_reps: torch.Tensor | None = None

    @property
    def labels(self) -> torch.Tensor:
        return self.batch.labels

    def __len__(self) -> int:
        return len(self.batch)


def _inputs(x: GemBatch | StudentInputs) -> StudentInputs:
    return x if isinstance(x, StudentInputs) else StudentInputs(x)


class StudentModel(FunnelRanker):
    """``raw_logits(x)`` -> the serving head's funnel stage logits (B, T) (what is served);
    ``distill_raw_logits(x)`` -> the distillation head's; x: GemBatch or StudentInputs."""

    def __init__(self, cfg: StudentConfig, device: torch.device | None = None):
        super().__init__()
        from opengem.model.gem import SparseArch

        self.cfg = cfg
        fc, d = cfg.features, cfg.d
        self.sparse = SparseArch(d, fc, cfg.history > 0, device, init=cfg.emb_init)
        self.dense_proj = nn.Linear(N_DENSE, d)
        n_in = len(NONSEQ_KEYS) * d + d + (2 * d if cfg.history else 0)
        if cfg.repr_dim:
            width = cfg.repr_width or 2 * d
            self.repr_norm = nn.LayerNorm(cfg.repr_dim)
            self.repr_drop = nn.Dropout(cfg.repr_dropout)
            self.repr_proj = nn.Linear(cfg.repr_dim, width)
            n_in += width + 1
        self.bottom = mlp((n_in,) + tuple(cfg.hidden), last_act=True)
        T = len(fc.tasks)
        self.serve_head = nn.Linear(cfg.hidden[-1], T)
        self.distill_head = nn.Linear(cfg.hidden[-1], T) if cfg.distill else None
        with torch.no_grad():
            for h in (self.serve_head, self.distill_head):
                if h is not None:
                    h.bias.copy_(prior_logits(STAGE_PRIORS, T))
        self._frozen_tables = False

    # -- parameter sharing -----------------------------------------------------------

    def share_tables(self, teacher: nn.Module, mode: str | None = None) -> "StudentModel":
        """Copy GEM's embedding tables into this student (same SparseArch layout).

        ``mode``: "frozen" keeps them fixed (no gradient), "finetune" trains them
        from there; default: ``cfg.share_tables``. A copy, so training the student
        never moves the teacher's tables.
        """
        mode = mode or self.cfg.share_tables
        if mode == "none":
            return self
        t_d = getattr(getattr(teacher, "cfg", None), "d", None)
        if t_d != self.cfg.d:
            raise ValueError(f"sharing tables needs the teacher's embedding dim ({t_d}) = the student's ({self.cfg.d})")
        if teacher.cfg.features != self.cfg.features:
            raise ValueError("sharing tables needs the teacher's FeatureConfig (same tables and hashing)")
        src = teacher.sparse.state_dict()
        own = self.sparse.state_dict()
        missing = [k for k in own if k not in src]
        if missing:  # a teacher without a sequence arch has no sequence-only tables
            raise ValueError(f"the teacher has no table(s) {missing}")
        self.sparse.load_state_dict({k: src[k].detach().clone() for k in own})
        self._frozen_tables = mode == "frozen"
        for p in self.sparse.parameters():
            p.requires_grad_(not self._frozen_tables)
        return self

    @property
    def tables_frozen(self) -> bool:
        return self._frozen_tables

    # -- forward ---------------------------------------------------------------------

    def _sparse(self, b: GemBatch, max_len: int) -> tuple[torch.Tensor, Any, Any]:
        if self._frozen_tables:
            with torch.no_grad():
                return self.sparse(b, max_len)
        return self.sparse(b, max_len)

    def _pool_history(self, nonseq: torch.Tensor, events: torch.Tensor | None, mask: torch.Tensor | None
                      ) -> torch.Tensor:
        """(B, 2d): the mean of each row's last ``history`` events and the most recent one (zeros if none)."""
        B = nonseq.shape[0]
        if events is None or events.shape[1] == 0:  # no event in the whole batch
            return nonseq.new_zeros(B, 2 * self.cfg.d)
        m = mask.unsqueeze(-1).to(events.dtype)  # (B, L, 1)
        mean = (events * m).sum(1) / m.sum(1).clamp(min=1.0)  # (B, d)
        return torch.cat([mean, events[:, -1]], 1)  # right-aligned: the most recent event (zeros if none)

    def _bottom(self, si: StudentInputs, nonseq: torch.Tensor, hist: torch.Tensor | None) -> torch.Tensor:
        """The shared bottom MLP over [non-seq ids, dense, pooled history (B, 2d), representation]."""
        b = si.batch
        B = len(b)
        parts = [nonseq.reshape(B, -1), self.dense_proj(b.dense)]
        if self.cfg.history:
            parts.append(hist)
        if self.cfg.repr_dim:
            if si.reps is None:
                reps, has = nonseq.new_zeros(B, self.cfg.repr_dim), torch.zeros(B, dtype=torch.bool)
            else:
                reps, has = si.reps.to(nonseq.dtype), si.has_reps
            if reps.shape != (B, self.cfg.repr_dim):
                raise ValueError(f"reps: expected ({B}, {self.cfg.repr_dim}), got {tuple(reps.shape)}")
            hf = has.to(nonseq.dtype).unsqueeze(1)
            parts += [self.repr_proj(self.repr_drop(self.repr_norm(reps))) * hf, hf]
        return self.bottom(torch.cat(parts, dim=1))

    def _hidden(self, x: GemBatch | StudentInputs) -> torch.Tensor:
        si = _inputs(x)
        nonseq, events, mask = self._sparse(si.batch, self.cfg.history)
        return self._bottom(si, nonseq, self._pool_history(nonseq, events, mask) if self.cfg.history else None)

    # -- serving split: the history is the user's, the same for every candidate ---------

    def encode_user(self, user: GemBatch) -> torch.Tensor:
        """(1, 2d) the pooled history of a one-row user batch ((1, 0) for a student without history)."""
        if not self.cfg.history:
            return user.dense.new_zeros(len(user), 0)
        nonseq, events, mask = self._sparse(user, self.cfg.history)
        return self._pool_history(nonseq, events, mask)

    def candidate_raw_logits(self, user: torch.Tensor, cands: GemBatch | StudentInputs) -> torch.Tensor:
        """Serving-head stage logits (B, T) of B candidates (their rows carry no history) against
        one user's :meth:`encode_user`; equal to ``raw_logits`` of the rows with the history replicated."""
        si = _inputs(cands)
        nonseq, _, _ = self._sparse(si.batch, 0)
        return self.serve_head(self._bottom(si, nonseq, user.expand(len(si.batch), -1) if self.cfg.history else None))

    def raw_logits(self, x: GemBatch | StudentInputs) -> torch.Tensor:  # noqa: D102 - FunnelRanker
        return self.serve_head(self._hidden(x))

    def heads(self, x: GemBatch | StudentInputs) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(serving stage logits (B, T), distillation stage logits (B, T) or None): one bottom pass."""
        h = self._hidden(x)
        return self.serve_head(h), (self.distill_head(h) if self.distill_head is not None else None)


# --------------------------------------------------------------------------- adapter


class StudentAdapter:
    """Maps teacher probabilities to calibrated distillation targets, per task.

    ``p' = sigmoid(a_t · logit(p) + b_t)`` with (a_t, b_t) fitted by weighted
    Newton steps (L2 ``l2`` toward the identity a = 1, b = 0, so a window with
    few positives stays near it) on the freshest ``window`` labelled examples,
    refitted every ``refit_every`` examples. Untouched until the first fit: the
    identity. Two parameters per task because what a stale teacher gets wrong
    first is the level and the sharpness of its scores, not their order.
    """

    A_RANGE = (0.2, 5.0)  # sharpness: a recalibration, not a new model
    B_MAX = 5.0  # level shift, in logits

    def __init__(self, n_tasks: int, window: int = 20_000, refit_every: int = 1024, l2: float = 1.0,
                 iters: int = 20, min_labels: int = 20):
        self.n_tasks, self.window, self.refit_every, self.l2, self.iters = n_tasks, window, refit_every, l2, iters
        # A task is refitted only when its window holds >= min_labels positives and as many
        # negatives: a short window of a rare label (conversions) is often (nearly) separable,
        # and the Newton steps then run off to a step function (measured: a = 5898, b = -1020
        # for conversions with a 1024-example window). The fit is also kept within A_RANGE / B_MAX.
        self.min_labels = min_labels
        self.a = np.ones(n_tasks)
        self.b = np.zeros(n_tasks)
        self._z = np.zeros((0, n_tasks))
        self._y = np.zeros((0, n_tasks))
        self._w = np.zeros(0)
        self._since = 0
        self.fits = 0

    @staticmethod
    def _logit(p: np.ndarray) -> np.ndarray:
        p = np.clip(np.asarray(p, np.float64), 1e-6, 1 - 1e-6)
        return np.log(p) - np.log1p(-p)

    def transform(self, p_teacher: np.ndarray | torch.Tensor) -> np.ndarray:
        """(B, T) teacher probabilities -> (B, T) adapted probabilities (float64)."""
        z = self._logit(np.asarray(p_teacher))
        return 1.0 / (1.0 + np.exp(-(self.a * z + self.b)))

    def update(self, p_teacher: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor,
               weight: np.ndarray | torch.Tensor | None = None) -> None:
        """Add labelled examples (B, T); refit once ``refit_every`` new ones arrived."""
        z = self._logit(np.asarray(p_teacher))
        y = np.asarray(labels, np.float64)
        w = np.ones(len(z)) if weight is None else np.asarray(weight, np.float64)
        self._z = np.concatenate([self._z, z])[-self.window:]
        self._y = np.concatenate([self._y, y])[-self.window:]
        self._w = np.concatenate([self._w, w])[-self.window:]
        self._since += len(z)
        if self._since >= self.refit_every:
            self._since = 0
            self.fit()

    def fit(self) -> None:
        """Weighted logistic regression of each task's label on [logit p, 1], Newton steps."""
        if not len(self._w):
            return
        w = self._w
        for t in range(self.n_tasks):
            z, y = self._z[:, t], self._y[:, t]
            if min(int((y > 0.5).sum()), int((y <= 0.5).sum())) < self.min_labels:
                continue  # too few of one class to say anything: keep the last fit
            theta = np.array([self.a[t], self.b[t]])
            prior = np.array([1.0, 0.0])
            X = np.stack([z, np.ones_like(z)], 1)  # (N, 2)
            # start at the right level (Newton from far away overshoots on a logistic loss)
            ybar = float(np.clip(w @ y / w.sum(), 1e-6, 1 - 1e-6))
            pbar = float(np.clip(w @ (1.0 / (1.0 + np.exp(-(X @ theta)))) / w.sum(), 1e-6, 1 - 1e-6))
            theta[1] += math.log(ybar / (1 - ybar)) - math.log(pbar / (1 - pbar))
            for _ in range(self.iters):
                p = 1.0 / (1.0 + np.exp(-(X @ theta)))
                g = X.T @ (w * (p - y)) + self.l2 * (theta - prior)
                H = (X * (w * p * (1 - p))[:, None]).T @ X + self.l2 * np.eye(2)
                step = np.linalg.solve(H, g)
                step *= min(1.0, 1.0 / max(float(np.abs(step).max()), 1e-12))  # damped: at most 1 a step
                theta = theta - step
                if np.abs(step).max() < 1e-8:
                    break
            a = float(np.clip(theta[0], *self.A_RANGE))
            b = float(theta[1])
            if a != theta[0]:  # the sharpness at its bound: refit the level for it (1-D Newton)
                for _ in range(self.iters):
                    p = 1.0 / (1.0 + np.exp(-(a * z + b)))
                    step = (float(w @ (p - y)) + self.l2 * b) / (float(w @ (p * (1 - p))) + self.l2)
                    b -= step
                    if abs(step) < 1e-8:
                        break
            self.a[t], self.b[t] = a, float(np.clip(b, -self.B_MAX, self.B_MAX))
        self.fits += 1

    def state(self) -> dict[str, Any]:
        """The fit, as plain JSON (bench results, version metadata)."""
        return {"a": self.a.tolist(), "b": self.b.tolist(), "fits": self.fits}

    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs (the fit and its window), as tensors and ints (weights_only)."""
        return {"a": torch.from_numpy(self.a.copy()), "b": torch.from_numpy(self.b.copy()),
                "z": torch.from_numpy(self._z.copy()), "y": torch.from_numpy(self._y.copy()),
                "w": torch.from_numpy(self._w.copy()), "since": self._since, "fits": self.fits}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        a, z = state["a"].numpy(), state["z"].numpy()
        if a.shape != (self.n_tasks,) or z.ndim != 2 or z.shape[1] != self.n_tasks:
            raise ValueError(f"adapter state for {a.shape[0]} tasks, this adapter has {self.n_tasks}")
        self.a, self.b = a.astype(np.float64), state["b"].numpy().astype(np.float64)
        self._z, self._y = z.astype(np.float64), state["y"].numpy().astype(np.float64)
        self._w = state["w"].numpy().astype(np.float64)
        self._since, self.fits = int(state["since"]), int(state["fits"])


# --------------------------------------------------------------------------- teacher side


def blank_target(batch: GemBatch) -> GemBatch:
    """The same rows with the target ad removed: its ids -> row 0 (missing), its
    history-match counters -> 0. What GEM sees of a user before any ad is chosen."""
    cols = {k: batch.sparse[k].values() for k in NONSEQ_KEYS}
    lens = {k: batch.sparse[k].lengths() for k in NONSEQ_KEYS}
    if any(bool((lens[k] != 1).any()) for k in NONSEQ_KEYS):
        raise ValueError("blank_target needs one id per key and row (make_batch's layout)")
    for k in AD_KEYS:
        cols[k] = torch.zeros_like(cols[k])
    dense = batch.dense.clone()
    dense[:, _AD_DENSE] = 0.0
    return GemBatch(sparse=make_kjt(cols), dense=dense, seq_lengths=batch.seq_lengths, seq=batch.seq,
                    surface_idx=batch.surface_idx, labels=batch.labels)


def select_rows(batch: GemBatch, rows: torch.Tensor) -> GemBatch:
    """The batch's rows ``rows`` ((B,) bool or (n,) int64 indices), histories included."""
    idx = rows.nonzero().flatten() if rows.dtype == torch.bool else rows.to(torch.int64)
    lens = batch.seq_lengths[idx]
    starts = batch.seq_offsets[:-1][idx]
    n = int(lens.sum())
    pos = torch.arange(n) - torch.repeat_interleave(torch.cumsum(lens, 0) - lens, lens, output_size=n)
    vidx = torch.repeat_interleave(starts, lens, output_size=n) + pos
    cols = {k: batch.sparse[k].values()[idx] for k in NONSEQ_KEYS}
    return GemBatch(sparse=make_kjt(cols), dense=batch.dense[idx], seq_lengths=lens,
                    seq={k: v[vidx] for k, v in batch.seq.items()}, surface_idx=batch.surface_idx[idx],
                    labels=batch.labels[idx])


@torch.no_grad()
def teacher_user_representation(teacher: nn.Module, batch: GemBatch) -> torch.Tensor:
    """(B, R) GEM's user-side representation: its trunk input (``represent``) on the
    user's point-in-time history and request context with the target ad blanked."""
    was = teacher.training
    teacher.eval()
    try:
        return teacher.represent(blank_target(batch)).float()
    finally:
        teacher.train(was)


def representation_dim(teacher: nn.Module) -> int:
    """R of :func:`teacher_user_representation` for this teacher."""
    return int(teacher.heads.trunk[0].in_features)


# --------------------------------------------------------------------------- training


class StudentLearner:
    """Predict-then-train for one student: label loss on the serving head, distillation
    loss (adapted teacher targets) on the auxiliary head. Plain torch optimizers
    (students are small): Adagrad on the tables, Adam on the rest, as the trainer.

    ``step(x, weight, teacher_probs)`` -> the serving head's probabilities (B, T)
    before the update. Rows of other surfaces than ``cfg.surface`` must be filtered
    by the caller (:meth:`surface_mask`).
    """

    def __init__(self, cfg: StudentConfig, *, teacher: nn.Module | None = None, adapter: StudentAdapter | None = None,
                 lr: float = 1e-3, emb_lr: float = 0.05, seed: int = 0):
        torch.manual_seed(seed)
        self.cfg = cfg
        self.model = StudentModel(cfg)
        if cfg.share_tables != "none":
            if teacher is None:
                raise ValueError("share_tables needs the teacher")
            self.model.share_tables(teacher)
        self.adapter = adapter
        tables = [p for p in self.model.sparse.parameters() if p.requires_grad]
        table_ids = {id(p) for p in self.model.sparse.parameters()}
        dense = [p for p in self.model.parameters() if id(p) not in table_ids]
        self.opt_dense = torch.optim.Adam(dense, lr=lr)
        self.opt_tables = torch.optim.Adagrad(tables, lr=emb_lr) if tables else None
        self.steps = 0

    def surface_mask(self, batch: GemBatch) -> torch.Tensor | None:
        """(B,) bool rows of the student's surface (None: it serves every surface)."""
        if self.cfg.surface is None:
            return None
        return batch.surface_idx == self.cfg.features.surfaces.index(self.cfg.surface)

    def targets(self, teacher_probs: np.ndarray | torch.Tensor, labels: torch.Tensor,
                weight: torch.Tensor) -> torch.Tensor:
        """Distillation targets for this batch (adapted when there is an adapter); then the
        adapter learns this batch's labels (predict-then-update)."""
        tp = np.asarray(teacher_probs, np.float64)
        if self.adapter is None:
            return torch.as_tensor(tp, dtype=torch.float32)
        out = torch.as_tensor(self.adapter.transform(tp), dtype=torch.float32)
        self.adapter.update(tp, labels.numpy(), weight.numpy())
        return out

    def step(self, x: GemBatch | StudentInputs, weight: torch.Tensor,
             teacher_probs: np.ndarray | torch.Tensor | None = None) -> torch.Tensor:
        si = _inputs(x)
        labels = si.labels
        self.model.train()
        serve_raw, distill_raw = self.model.heads(si)
        logits = funnel_logits(serve_raw)
        tgt = None
        if teacher_probs is not None and (self.cfg.soft_mix > 0 or (
                distill_raw is not None and self.cfg.distill_weight > 0)):
            tgt = self.targets(teacher_probs, labels, weight)
        serve_tgt = labels if tgt is None or self.cfg.soft_mix == 0 else \
            (1.0 - self.cfg.soft_mix) * labels + self.cfg.soft_mix * tgt  # BCE is linear in its target
        self._update(logits, serve_tgt, distill_raw, tgt, weight)
        return torch.sigmoid(logits.detach())

    def distill_step(self, x: GemBatch | StudentInputs, weight: torch.Tensor,
                     teacher_probs: np.ndarray | torch.Tensor) -> None:
        """Train on rows the student has no labels for (a transfer set): the serving head on the
        teacher's (adapted, not updated: no label) targets, as the distillation head."""
        si = _inputs(x)
        self.model.train()
        serve_raw, distill_raw = self.model.heads(si)
        tp = np.asarray(teacher_probs, np.float64)
        tgt = torch.as_tensor(self.adapter.transform(tp) if self.adapter is not None else tp, dtype=torch.float32)
        self._update(funnel_logits(serve_raw), tgt, distill_raw, tgt, weight)

    def _update(self, logits: torch.Tensor, serve_tgt: torch.Tensor, distill_raw: torch.Tensor | None,
                tgt: torch.Tensor | None, weight: torch.Tensor) -> None:
        """One optimizer step on the weighted BCE of the serving head (against ``serve_tgt``) plus
        ``distill_weight`` x the distillation head's (against ``tgt``, when both are there)."""
        wsum = weight.sum().clamp(min=1.0)
        loss = (F.binary_cross_entropy_with_logits(logits, serve_tgt, reduction="none").mean(1) * weight).sum() / wsum
        if distill_raw is not None and tgt is not None and self.cfg.distill_weight > 0:
            dl = F.binary_cross_entropy_with_logits(funnel_logits(distill_raw), tgt, reduction="none").mean(1)
            loss = loss + self.cfg.distill_weight * (dl * weight).sum() / wsum
        self.opt_dense.zero_grad(set_to_none=True)
        if self.opt_tables is not None:
            self.opt_tables.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_dense.step()
        if self.opt_tables is not None:
            self.opt_tables.step()
        self.steps += 1

    @torch.no_grad()
    def predict(self, x: GemBatch | StudentInputs) -> torch.Tensor:
        self.model.eval()
        return self.model.predict(x)

    # -- what the trainer daemon checkpoints and publishes (model/student_daemon.py) --------

    def state(self) -> dict[str, Any]:
        """Model, both optimizers, the adapter and the step count (tensors and plain data)."""
        return {"model": self.model.state_dict(), "opt_dense": self.opt_dense.state_dict(),
                "opt_tables": self.opt_tables.state_dict() if self.opt_tables is not None else None,
                "adapter": self.adapter.state_dict() if self.adapter is not None else None, "steps": self.steps}

    def load_state(self, state: dict[str, Any]) -> None:
        if (state["opt_tables"] is None) != (self.opt_tables is None) or \
                (state["adapter"] is None) != (self.adapter is None):
            raise ValueError("the saved student has another table mode or adapter setting")
        self.model.load_state_dict(state["model"], strict=True)
        self.opt_dense.load_state_dict(state["opt_dense"])
        if self.opt_tables is not None:
            self.opt_tables.load_state_dict(state["opt_tables"])
        if self.adapter is not None:
            self.adapter.load_state_dict(state["adapter"])
        self.steps = int(state["steps"])

    def unsharded(self) -> StudentModel:
        """The model as the registry publishes it (kind "student"; the serving head is what is served)."""
        return self.model


def copy_teacher(teacher: nn.Module) -> nn.Module:
    """A frozen snapshot of a teacher (what a published, possibly stale, version is)."""
    t = copy.deepcopy(teacher)
    t.eval()
    for p in t.parameters():
        p.requires_grad_(False)
    return t


# --------------------------------------------------------------------------- representation transfer


def refresh_representations(teacher: nn.Module, examples: Sequence[Any], reader: Any, store: Any, now_ms: int,
                            version: int, batch_size: int = 512) -> int:
    """One refresh: GEM's user-side representation of every user of ``examples`` (their
    latest example gives the request context), as of ``now_ms``, into ``store``
    (a :class:`~opengem.features.representations.RepresentationStore`). The history is
    read through the trainer's and the server's own read (:func:`~opengem.model.data.examples_batch`)
    strictly before ``now_ms``. Returns the number of users written."""
    from opengem.model.data import examples_batch

    latest: dict[int, Any] = {}
    for e in examples:
        if e.ts < now_ms and (e.user_id not in latest or e.ts >= latest[e.user_id].ts):
            latest[e.user_id] = e
    users = sorted(latest)
    for i in range(0, len(users), batch_size):
        chunk = [dataclasses.replace(latest[u], ts=now_ms) for u in users[i:i + batch_size]]
        b = examples_batch(chunk, reader, teacher.cfg)
        reps = teacher_user_representation(teacher, b).numpy()
        store.put([e.user_id for e in chunk], reps, now_ms, version)
    return len(users)


def student_inputs(batch: GemBatch, user_ids: Sequence[int] | np.ndarray, ts: Sequence[int] | np.ndarray,
                   store: Any) -> StudentInputs:
    """The batch plus each row's user representation as of its impression (point in time)."""
    reps, present = store.get(user_ids, ts)
    return StudentInputs(batch, torch.from_numpy(reps), torch.from_numpy(present))
