"""Triton segment pooling for the pyramid, forward and backward.

One program per segment (and the whole feature row, D <= a few hundred):
it walks its contiguous rows BLOCK_T at a time, reads each value once and
writes one pooled row, plus the segment's weight total for the backward.
Every row belongs to exactly one segment, so the backward (again one program
per segment) writes each row's gradient exactly once -- no atomics:

    mean: dx_i = w_i g / W,   dw_i = <g, x_i - out> / W      (0 when W == 0)
    sum:  dx_i = w_i g,       dw_i = <g, x_i>
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from opengem.kernels.triton._common import block, configs

_CONFIGS = configs([triton.Config({}, num_warps=w) for w in (1, 2, 4, 8)], triton.Config({}))
_KEY = ["D", "BLOCK_T"]


@triton.autotune(configs=_CONFIGS, key=_KEY)
@triton.jit
def _fwd_kernel(
    X,  # (N, D) values, unit stride on D
    W,  # (N,) weights (unused unless HAS_W)
    bounds,  # (S + 1,) int: segment s is rows bounds[s]:bounds[s + 1]
    OUT,  # (S, D) output, contiguous
    TOTAL,  # (S,) float32 output: sum of the segment's weights
    stride_x,  # row stride of X
    D,  # features
    HAS_W: tl.constexpr,
    MEAN: tl.constexpr,  # divide by the weight total (else a weighted sum)
    BLOCK_T: tl.constexpr,  # rows per step
    BLOCK_D: tl.constexpr,  # power of two >= D
):
    s = tl.program_id(0).to(tl.int64)
    lo = tl.load(bounds + s).to(tl.int64)
    hi = tl.load(bounds + s + 1).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_D], tl.float32)
    tot = tl.zeros([BLOCK_T], tl.float32)
    for t0 in range(lo, hi, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        ok = rows < hi
        x = tl.load(X + rows[:, None] * stride_x + offs_d[None, :], mask=ok[:, None] & (offs_d[None, :] < D),
                    other=0.0).to(tl.float32)
        if HAS_W:
            w = tl.load(W + rows, mask=ok, other=0.0).to(tl.float32)
        else:
            w = ok.to(tl.float32)
        acc += tl.sum(x * w[:, None], 0)
        tot += w
    total = tl.sum(tot, 0)
    if MEAN:
        acc = acc * (total != 0) / tl.where(total != 0, total, 1.0)
    tl.store(OUT + s * D + offs_d, acc.to(OUT.dtype.element_ty), mask=offs_d < D)
    tl.store(TOTAL + s, total)


@triton.autotune(configs=_CONFIGS, key=_KEY)
@triton.jit
def _bwd_kernel(
    X,  # (N, D) forward values, unit stride on D
    W,  # (N,) weights (unused unless HAS_W)
    bounds,  # (S + 1,) int
    OUT,  # (S, D) forward output, contiguous
    TOTAL,  # (S,) float32 weight totals from the forward
    G,  # (S, D) output gradient, contiguous
    DX,  # (N, D) output, contiguous
    DW,  # (N,) output (unused unless HAS_W)
    stride_x,
    D,
    HAS_W: tl.constexpr,
    MEAN: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    s = tl.program_id(0).to(tl.int64)
    lo = tl.load(bounds + s).to(tl.int64)
    hi = tl.load(bounds + s + 1).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    g = tl.load(G + s * D + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    if MEAN:
        total = tl.load(TOTAL + s)
        inv = (total != 0) / tl.where(total != 0, total, 1.0)
    else:
        inv = 1.0
    gs = g * inv  # (BLOCK_D,) gradient per unit weight
    if HAS_W and MEAN:
        out = tl.load(OUT + s * D + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    for t0 in range(lo, hi, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        ok = rows < hi
        tile_ok = ok[:, None] & d_ok[None, :]
        if HAS_W:
            w = tl.load(W + rows, mask=ok, other=0.0).to(tl.float32)
        else:
            w = ok.to(tl.float32)
        dx = w[:, None] * gs[None, :]
        tl.store(DX + rows[:, None] * D + offs_d[None, :], dx.to(DX.dtype.element_ty), mask=tile_ok)
        if HAS_W:
            x = tl.load(X + rows[:, None] * stride_x + offs_d[None, :], mask=tile_ok, other=0.0).to(tl.float32)
            if MEAN:
                x = x - out[None, :]
            tl.store(DW + rows, tl.sum(x * gs[None, :], 1).to(DW.dtype.element_ty), mask=ok)


def _block_t(n: int, s: int) -> int:
    """Rows per step from the mean segment length: short count-based segments get a
    small tile (no masked waste), long time windows a large one."""
    return min(64, max(4, triton.next_power_of_2(-(-n // max(s, 1)))))


class _PyramidPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, bounds, mean):
        n, D = x.shape
        S = bounds.numel() - 1
        out = torch.empty((S, D), dtype=x.dtype, device=x.device)
        total = torch.empty((S,), dtype=torch.float32, device=x.device)
        meta = dict(HAS_W=w is not None, MEAN=mean, BLOCK_T=_block_t(n, S), BLOCK_D=block(D, lo=1))
        if S and D:
            _fwd_kernel[(S,)](x, x if w is None else w, bounds, out, total, x.stride(0), D, **meta)
        elif S:
            out.zero_()
        ctx.save_for_backward(x, w, bounds, out, total)
        ctx.meta = meta
        return out

    @staticmethod
    def backward(ctx, g):
        x, w, bounds, out, total = ctx.saved_tensors
        n, D = x.shape
        S = bounds.numel() - 1
        dx = torch.zeros_like(x, memory_format=torch.contiguous_format)
        dw = None if w is None else torch.zeros_like(w)
        if S and D:
            _bwd_kernel[(S,)](x, x if w is None else w, bounds, out, total, g.contiguous(), dx,
                              dx if dw is None else dw, x.stride(0), D, **ctx.meta)
        return dx, dw, None, None


def triton_pyramid_pool(values: torch.Tensor, bounds: torch.Tensor, weights: torch.Tensor | None,
                        mean: bool) -> torch.Tensor:
    """values: (N, D), bounds: (S + 1,), weights: (N,) or None -> (S, D); inputs checked by
    :func:`opengem.kernels.pyramid_pool.pyramid_pool`."""
    if values.stride(-1) != 1:
        values = values.contiguous()
    return _PyramidPool.apply(values, None if weights is None else weights.contiguous(), bounds.contiguous(), mean)
