"""Wukong interaction arch: stacked Factorization-Machine and Linear-Compress blocks.

Each :class:`WukongLayer` maps n_in embeddings (B, n_in, d) to n_out = n_fm +
n_lcb embeddings (Zhang et al., "Wukong: Towards a Scaling Law for Large-Scale
Recommendation", 2024):

* FMB -- optimized FM: with a learned projection Y (n_in, k),
  ``X (Xᵀ Y)`` is (B, n_in, k): every embedding's dot products with k learned
  mixtures of all embeddings (rank-k instead of the full n_in x n_in
  interaction matrix), flattened, layer-normed, then an MLP to n_fm embeddings;
* LCB -- a linear recombination W (n_lcb, n_in) of the n_in embeddings;
* ``LN(FMB(X) ‖ LCB(X) + residual(X))``; the residual is the identity when
  n_in == n_out, else a learned linear map over the embedding axis.

Stacking l layers captures interactions of order up to 2^l.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from opengem.kernels import fm_interaction
from opengem.kernels._backend import resolve


@dataclass(frozen=True)
class WukongConfig:
    # Layers; Wukong's scaling knob #1 (interaction order grows 2^l).
    n_layers: int = 2
    # Embeddings produced by the FM block; scaling knob #2 (width).
    n_fm: int = 8
    # Embeddings produced by the linear compress block; keeps low-order signal.
    n_lcb: int = 8
    # Rank k of the FM projection: cost O(n k d) instead of O(n^2 d).
    rank: int = 8
    # Hidden width of the FM block's MLP, as a multiple of n_fm * d.
    mlp_mult: int = 1

    @property
    def n_out(self) -> int:
        return self.n_fm + self.n_lcb


class FMBlock(nn.Module):
    """x: (B, n_in, d) -> (B, n_fm, d), through ``X (Xᵀ Y)`` with Y (n_in, k)."""

    def __init__(self, n_in: int, d: int, cfg: WukongConfig):
        super().__init__()
        self.n_fm, self.d = cfg.n_fm, d
        self.proj = nn.Parameter(torch.randn(n_in, cfg.rank) / n_in**0.5)  # Y: (n_in, k)
        self.norm = nn.LayerNorm(n_in * cfg.rank)
        hidden = cfg.mlp_mult * cfg.n_fm * d
        self.mlp = nn.Sequential(nn.Linear(n_in * cfg.rank, hidden), nn.GELU(), nn.Linear(hidden, cfg.n_fm * d))
        # finish_t's input order (j * n_in + i) -> finish's (i * k + j): where its norm / first
        # linear read each feature (a buffer, not in the state dict).
        j, i = torch.meshgrid(torch.arange(cfg.rank), torch.arange(n_in), indexing="ij")
        self.register_buffer("_t_order", (i * cfg.rank + j).flatten(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.finish(fm_interaction(x, self.proj))  # fused Triton kernel on CUDA, two matmuls on CPU

    def finish(self, z: torch.Tensor) -> torch.Tensor:
        """The interaction z (B, n_in * k) -> (B, n_fm, d): LayerNorm, then the MLP."""
        return self.mlp(self.norm(z)).view(z.shape[0], self.n_fm, self.d)

    def finish_t(self, zt: torch.Tensor) -> torch.Tensor:
        """:meth:`finish` of the interaction in transposed order: ``zt`` (B, k, n_in) = zᵀ per
        row, flattened as it lies. The norm's and the first linear's weights are read in that
        order (permuted once for a served model, :func:`freeze_derived`) instead of copying zt
        into z's (the norm's statistics do not depend on the order)."""
        B = zt.shape[0]
        n, lin, act, out = self.norm, self.mlp[0], self.mlp[1], self.mlp[2]
        nw, nb, lw = _derived(self, (n.weight, n.bias, lin.weight), self._permuted)
        h = nn.functional.layer_norm(zt.reshape(B, -1), n.normalized_shape, nw, nb, n.eps)
        if self.__dict__.get("_mlp_bf16", False) and not torch.is_grad_enabled():
            # mlp_precision(model, "bf16"), a served model: the MLP's two matmuls in bfloat16
            # (with AMX-BF16 a 500 x 256 x 256 addmm ran ~4x faster), fp32 in and out
            w1, b1, w2, b2 = _derived(self, (lin.weight, lin.bias, out.weight, out.bias), self._bf16_mlp,
                                      slot="_bf16_cache")
            h = nn.functional.linear(act(nn.functional.linear(h.to(torch.bfloat16), w1, b1)), w2, b2).float()
            return h.view(B, self.n_fm, self.d)
        h = out(act(nn.functional.linear(h, lw, lin.bias)))
        return h.view(B, self.n_fm, self.d)

    def _permuted(self) -> tuple[torch.Tensor, ...]:
        o = self._t_order
        return self.norm.weight[o], self.norm.bias[o], self.mlp[0].weight[:, o].contiguous()

    def _bf16_mlp(self) -> tuple[torch.Tensor, ...]:
        """The MLP's weights in bfloat16, the first linear's permuted as :meth:`finish_t` reads it."""
        lin, out = self.mlp[0], self.mlp[2]
        bf = torch.bfloat16
        return (lin.weight[:, self._t_order].to(bf).contiguous(), lin.bias.to(bf), out.weight.to(bf).contiguous(),
                out.bias.to(bf))


def _derived(owner: nn.Module, params: tuple[torch.Tensor, ...], make, slot: str = "_derived_cache"
             ) -> tuple[torch.Tensor, ...]:
    """``make()`` -- inference-only tensors derived from ``params`` (permuted or summed weights).

    Computed every call unless ``owner`` was marked by :func:`freeze_derived` (a served
    version, whose weights no longer change) and autograd is off: then computed once and kept
    on ``owner`` (not in its state dict), again only if a parameter was replaced or changed in
    place through autograd's view of it (``data_ptr``, ``_version``; a load_state_dict). Version
    counters alone would not do for a model in training: a fused Adam step and writes through
    ``.data`` change weights without bumping them."""
    if torch.is_grad_enabled() or not owner.__dict__.get("_derived_frozen", False):
        return make()
    key = tuple((p.data_ptr(), -1 if p.is_inference() else p._version) for p in params)
    cached = owner.__dict__.get(slot)
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = (key, make())
        owner.__dict__[slot] = cached
    return cached[1]


def freeze_derived(model: nn.Module, frozen: bool = True) -> nn.Module:
    """Mark ``model``'s Wukong layers as serving-only (``frozen``) or not: a frozen layer's
    inference form keeps the weights it derives (the LCB folded into the residual, the FM MLP's
    permuted weights) instead of deriving them every call (re-indexing the FM weights read
    0.17-0.29 ms per base layer of a 500-candidate request under the torch profiler). Only for
    weights that no longer change -- the server calls it on every version it loads; a model
    that trains again must be unfrozen first. Returns ``model``."""
    for m in model.modules():
        if isinstance(m, (FMBlock, WukongLayer)):
            m.__dict__["_derived_frozen"] = frozen
            m.__dict__.pop("_derived_cache", None)
            m.__dict__.pop("_bf16_cache", None)
    return model


MLP_PRECISIONS = ("fp32", "bf16")


def mlp_precision(model: nn.Module, precision: str) -> str:
    """Run the FM blocks' MLPs of ``model`` in ``precision`` ("fp32" | "bf16") when autograd is
    off (a served model; training never takes the bfloat16 path); returns the precision it had
    (``"fp32"`` unless set before), so a caller can put it back.

    "bf16": the MLP's input is rounded to bfloat16 after the block's layer norm, the two linear
    layers and the GELU run in bfloat16 (with their weights kept in bfloat16 once for a frozen
    model, :func:`freeze_derived`), the output is fp32 again. These MLPs are most of a served
    request's matrix work (at ``base``, 500 candidates: 3 layers x 49-58M multiply-adds); on a
    CPU with AMX-BF16 a bfloat16 matmul of that size ran ~4x faster (not measured on CPUs
    without it, where ``[serve] precision = "auto"`` keeps fp32). Scores move by bfloat16's
    rounding (8 bits of mantissa): measured in docs/serving.md."""
    if precision not in MLP_PRECISIONS:
        raise ValueError(f"precision {precision!r}: one of {MLP_PRECISIONS}")
    before = "fp32"
    for m in model.modules():
        if isinstance(m, FMBlock):
            before = "bf16" if m.__dict__.get("_mlp_bf16", False) else "fp32"
            m.__dict__["_mlp_bf16"] = precision == "bf16"
    return before


class LCBlock(nn.Module):
    """x: (B, n_in, d) -> (B, n_lcb, d), a linear recombination of the embeddings."""

    def __init__(self, n_in: int, cfg: WukongConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cfg.n_lcb, n_in) / n_in**0.5)  # (n_lcb, n_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(self.weight, x)  # (n_lcb, n_in) broadcast over B: no copy of x


class WukongLayer(nn.Module):
    """x: (B, n_in, d) -> (B, n_fm + n_lcb, d)."""

    def __init__(self, n_in: int, d: int, cfg: WukongConfig):
        super().__init__()
        self.fmb = FMBlock(n_in, d, cfg)
        self.lcb = LCBlock(n_in, cfg)
        n_out = cfg.n_out
        # Residual over the embedding axis: identity when the count is unchanged.
        self.res = None if n_in == n_out else nn.Parameter(torch.randn(n_out, n_in) / n_in**0.5)
        self.norm = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if resolve("auto", x) == "pytorch":
            return self._forward_fused(x)
        y = torch.cat([self.fmb(x), self.lcb(x)], dim=1)  # (B, n_out, d)
        r = x if self.res is None else torch.matmul(self.res, x)
        return self.norm(y + r)

    def _forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        """The same layer with its three mixes over the embedding axis -- the FM projection
        Yᵀ X, the LCB's W X, the residual's R X -- as one matmul: one pass over x
        instead of three (what the PyTorch path costs most on many rows)."""
        if not torch.is_grad_enabled():
            return self._forward_inference(x)
        k, m = self.fmb.proj.shape[1], self.lcb.weight.shape[0]
        mixes = [self.fmb.proj.t(), self.lcb.weight] + ([] if self.res is None else [self.res])
        mixed = torch.matmul(torch.cat(mixes), x)  # (B, k + n_lcb [+ n_out], d)
        z = torch.bmm(x, mixed[:, :k].transpose(1, 2)).flatten(1)  # (B, n_in * k) = fm_interaction(x, Y)
        y = torch.cat([self.fmb.finish(z), mixed[:, k:k + m]], dim=1)  # (B, n_out, d)
        r = x if self.res is None else mixed[:, k + m:]
        return self.norm(y + r)

    def _forward_inference(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`_forward_fused` without autograd (the server), in fewer passes over x:

        * the LCB folded into the residual: ``FMB ‖ LCB + R X`` = ``(FMB + R_fm X) ‖ (W + R_lcb) X``
          (rows n_fm: of R; with the identity residual, W plus the rows of the identity that
          select x's last n_lcb tokens), so x is mixed by k + n_out rows (24 at base, was 32) and
          only the FM's n_fm tokens take an add; the folded matrix is kept for a served model
          (:func:`freeze_derived`);
        * the FM interaction transposed, (B, k, n_in): bmm with the small k x d operand first
          ran ~1.7x faster on CPU (500 x 25 x 32, k = 8: ~390 -> ~220 us, one thread), and
          :meth:`FMBlock.finish_t` reads it in that order. Not in training: there the permuted
          weights' backward (a scatter-add per step) made a base step slower (523 / 436 / 445
          -> 575 / 537 / 469 ms).
        """
        k, nf = self.fmb.proj.shape[1], self.fmb.n_fm
        mix = _derived(self, (self.fmb.proj, self.lcb.weight) + (() if self.res is None else (self.res,)),
                       self._inference_mix)[0]
        mixed = torch.matmul(mix, x)  # (B, k + [n_fm +] n_lcb, d)
        fm = self.fmb.finish_t(torch.bmm(mixed[:, :k], x.transpose(1, 2)))  # (B, n_fm, d)
        if self.res is None:
            y = torch.cat([fm + x[:, :nf], mixed[:, k:]], dim=1)
        else:
            y = torch.cat([fm + mixed[:, k:k + nf], mixed[:, k + nf:]], dim=1)
        return self.norm(y)  # (B, n_out, d)

    def _inference_mix(self) -> tuple[torch.Tensor]:
        """[Yᵀ ‖ R_fm ‖ W + R_lcb] (k + n_out, n_in), or [Yᵀ ‖ W + I_lcb] with the identity residual."""
        nf, w = self.fmb.n_fm, self.lcb.weight
        if self.res is None:
            eye = torch.eye(w.shape[1], dtype=w.dtype, device=w.device)[nf:]  # selects x[:, n_fm:]
            return (torch.cat([self.fmb.proj.t(), w + eye]),)
        return (torch.cat([self.fmb.proj.t(), self.res[:nf], w + self.res[nf:]]),)


class WukongArch(nn.Module):
    """A stack of WukongLayers. ``extra[i]`` embeddings are appended to layer i's input
    (the sequence summaries InterFormer feeds in); ``forward`` alone runs the plain stack.

    x: (B, n_in, d) -> (B, n_out, d)
    """

    def __init__(self, n_in: int, d: int, cfg: WukongConfig, extra: tuple[int, ...] = ()):
        super().__init__()
        self.cfg = cfg
        self.extra = tuple(extra) + (0,) * (cfg.n_layers - len(extra))
        ins = [n_in] + [cfg.n_out] * (cfg.n_layers - 1)
        self.n_in = tuple(n + e for n, e in zip(ins, self.extra))  # layer i's input count
        self.layers = nn.ModuleList(WukongLayer(n, d, cfg) for n in self.n_in)
        self.n_out = cfg.n_out if cfg.n_layers else n_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x
