"""Multi-domain, multi-task output: shared trunk -> a tower per surface -> one logit per task.

Tasks form a funnel (ESMM, Ma et al. 2018): a tower emits *stage* logits
``raw[:, t]`` = logit P(stage t | stage t-1) (click | impression, conversion |
click, ...), and the impression-level probability of task t is the product
``prod_{j<=t} sigmoid(raw[:, j])``. So pCVR over impressions = pCTR x
pCVR-given-click <= pCTR by construction, and both are trained with BCE over
*impressions* (conversions are only observed after clicks, so the
click-conditional rate is never fitted on a biased sample directly).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from opengem.model.config import HeadConfig

_LOG_HALF = -math.log(2.0)

# Prior rate of each funnel stage, by position: P(click | impression), P(conversion | click).
# A fresh tower's output bias is logit(prior), so an untrained model predicts the base
# rates instead of 0.5 (which costs an NE of ~3.5 at a 5 % CTR and makes the first
# thousands of steps unlearn it). The values are the simulator's defaults with the
# joiner's default windows (docs/simulator.md: CTR 5.4 %, P(conversion | click)
# 13.7 %); real traffic has rates of the same order, and any stage beyond these
# starts at 0.5. Only the starting point: training moves the bias like any other.
STAGE_PRIORS = (0.05, 0.14)


def mlp(sizes: tuple[int, ...] | list[int], last_act: bool = False) -> nn.Sequential:
    """Linear layers with ReLU between; (sizes[0]) -> (sizes[-1])."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if last_act or i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -log 2.

    Each branch gets an input that is safe for it, so the branch torch.where
    discards has a finite gradient (else 0 * inf = NaN in backward).
    """
    near = x > _LOG_HALF
    a = torch.log(-torch.expm1(torch.where(near, x, _LOG_HALF)))
    b = torch.log1p(-torch.exp(torch.where(near, _LOG_HALF, x)))
    return torch.where(near, a, b)


def funnel_logits(raw: torch.Tensor) -> torch.Tensor:
    """Stage logits (B, T) -> impression-level logits (B, T) of prod_{j<=t} sigmoid(raw_j).

    logit p = log p - log(1 - p) with log p = sum_j logsigmoid(raw_j); log p is
    clamped to <= -1e-30 so p = 1 (both stages saturated) stays finite.
    """
    logp = torch.cumsum(F.logsigmoid(raw), dim=1).clamp(max=-1e-30)
    return logp - log1mexp(logp)


def funnel_probs(raw: torch.Tensor) -> torch.Tensor:
    """Stage logits (B, T) -> impression-level probabilities (B, T), non-increasing in t."""
    return torch.cumprod(torch.sigmoid(raw), dim=1)


def funnel_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean BCE over impressions and tasks. logits: impression-level (B, T), labels (B, T)."""
    return F.binary_cross_entropy_with_logits(logits, labels)


def prior_logits(priors: tuple[float, ...], n_tasks: int) -> torch.Tensor:
    """(n_tasks,) stage logits logit(priors[t]); 0 (p = 0.5) for stages without a prior."""
    if any(not 0.0 < p < 1.0 for p in priors):
        raise ValueError(f"stage priors must lie in (0, 1), got {priors}")
    p = torch.full((n_tasks,), 0.5, dtype=torch.float64)
    k = min(n_tasks, len(priors))
    p[:k] = torch.tensor(priors[:k], dtype=torch.float64)
    return torch.logit(p).float()


class FunnelRanker(nn.Module):
    """The ranking API every model shares: subclasses give ``raw_logits(batch)``,
    the funnel stage logits (B, T) (click | impression, conversion | click)."""

    def raw_logits(self, batch) -> torch.Tensor:  # noqa: ANN001 - a GemBatch
        raise NotImplementedError

    def forward(self, batch) -> torch.Tensor:  # noqa: ANN001
        """Impression-level logits (B, T)."""
        return funnel_logits(self.raw_logits(batch))

    def predict(self, batch) -> torch.Tensor:  # noqa: ANN001
        """Probabilities (B, T): pCTR, pCVR over impressions."""
        return funnel_probs(self.raw_logits(batch))

    def loss(self, batch) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
        """(scalar BCE over impressions, logits)."""
        logits = self(batch)
        return funnel_loss(logits, batch.labels), logits


class MultiDomainHeads(nn.Module):
    """h: (B, n_in), surface_idx: (B,) -> stage logits (B, n_tasks) from each row's surface tower.

    Optional MMoE: n_experts shared expert MLPs, mixed per surface by a softmax gate.
    Optional ``shared_stages``: those stages' logits come from one tower for every surface
    (its own hidden layers), the others from the surface towers.
    In training all towers run on all rows and the row's own is gathered (towers are
    small; a gather beats B tiny matmuls); in eval, rows of one surface (a ranking
    request) run that surface's tower only. Each tower's output bias starts at the logit of
    ``priors`` (:data:`STAGE_PRIORS` by default; 0.5 for stages beyond them).
    """

    def __init__(self, n_in: int, n_surfaces: int, n_tasks: int, cfg: HeadConfig,
                 priors: tuple[float, ...] = STAGE_PRIORS):
        super().__init__()
        self.n_towers = n_surfaces if cfg.per_surface else 1
        shared = sorted(set(cfg.shared_stages))
        if shared and (shared[0] < 0 or shared[-1] >= n_tasks or len(shared) == n_tasks):
            raise ValueError(f"shared_stages {cfg.shared_stages} must name some, not all, of stages 0..{n_tasks - 1}")
        if shared and (cfg.n_experts or not cfg.per_surface):
            raise ValueError("shared_stages needs per-surface towers without experts")
        self.trunk = mlp((n_in,) + cfg.trunk, last_act=True)
        t_in = cfg.trunk[-1] if cfg.trunk else n_in
        own = [t for t in range(n_tasks) if t not in shared]
        self.shared = mlp((t_in,) + cfg.tower + (len(shared),)) if shared else None
        # output column t of the towers' concatenation [own stages, shared stages]
        self.register_buffer("_order", torch.tensor([(own + shared).index(t) for t in range(n_tasks)]),
                             persistent=False)
        self.experts = nn.ModuleList(mlp((t_in,) + cfg.tower, last_act=True) for _ in range(cfg.n_experts))
        self.gates = nn.Linear(t_in, self.n_towers * cfg.n_experts) if cfg.n_experts else None
        x_in = cfg.tower[-1] if cfg.n_experts and cfg.tower else t_in
        tower = cfg.tower if not cfg.n_experts else ()
        self.towers = nn.ModuleList(mlp((x_in,) + tower + (len(own),)) for _ in range(self.n_towers))
        bias = prior_logits(priors, n_tasks)
        with torch.no_grad():
            for t in self.towers:
                t[-1].bias.copy_(bias[own])
            if self.shared is not None:
                self.shared[-1].bias.copy_(bias[shared])

    def forward(self, h: torch.Tensor, surface_idx: torch.Tensor) -> torch.Tensor:
        B = h.shape[0]
        h = self.trunk(h)  # (B, t_in)
        if self.gates is not None:
            e = torch.stack([ex(h) for ex in self.experts], dim=1)  # (B, E, H)
            g = self.gates(h).view(B, self.n_towers, -1).softmax(-1)  # (B, S, E)
            xs = torch.einsum("bse,beh->bsh", g, e)  # (B, S, H)
        else:
            xs = h.unsqueeze(1).expand(B, self.n_towers, -1)  # (B, S, t_in)
        return self._with_shared(self._towers(xs, surface_idx), h)

    def _towers(self, xs: torch.Tensor, surface_idx: torch.Tensor) -> torch.Tensor:
        B = xs.shape[0]
        if self.n_towers == 1:
            return self.towers[0](xs[:, 0])
        if B and not self.training:
            lo, hi = int(surface_idx.min()), int(surface_idx.max())
            if lo == hi:  # one surface (a ranking request): its tower alone
                return self.towers[lo](xs[:, lo])
        raw = torch.stack([t(xs[:, s]) for s, t in enumerate(self.towers)], dim=1)  # (B, S, T_own)
        return raw[torch.arange(B, device=xs.device), surface_idx]  # (B, T_own)

    def _with_shared(self, own: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        if self.shared is None:
            return own
        return torch.cat([own, self.shared(h)], dim=1)[:, self._order]  # (B, T)
