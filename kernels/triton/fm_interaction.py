"""Triton fused FM interaction ``Z[b] = X[b] (X[b]ᵀ Y)``, forward and backward.

Each program takes ROWS consecutive batch rows, loads Y once, and per row
keeps X[b] (n, d) and T = X[b]ᵀ Y (d, k) on chip. Backward, with G = dZ[b]:

    dX[b] = G Tᵀ + Y (X[b]ᵀ G)ᵀ,        dY = sum_b X[b] (X[b]ᵀ G)

dY is summed over a program's rows in registers and written as one partial
per program (summed afterwards), so there are no atomics and the result is
deterministic. Tiles are padded to powers of two >= 16 (tl.dot's minimum).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from opengem.kernels.triton._common import block, configs, precision

_CONFIGS = configs(
    [triton.Config({"ROWS": r}, num_warps=w) for r, w in [(1, 2), (4, 4), (16, 4), (64, 4)]],
    triton.Config({"ROWS": 4}),
)
_KEY = ["n", "d", "k"]


@triton.jit
def _tile(ptr, rows, cols, stride, R: tl.constexpr, C: tl.constexpr):
    """Load a (R, C) zero-padded tile of a (rows, cols) row-major matrix."""
    r = tl.arange(0, R)
    c = tl.arange(0, C)
    return tl.load(ptr + r[:, None] * stride + c[None, :], mask=(r[:, None] < rows) & (c[None, :] < cols), other=0.0)


@triton.autotune(configs=_CONFIGS, key=_KEY)
@triton.jit
def _fwd_kernel(
    X,  # (B, n, d) contiguous
    Y,  # (n, k) contiguous
    Z,  # (B, n * k) output, contiguous
    B, n, d, k,  # sizes
    BN: tl.constexpr, BD: tl.constexpr, BK: tl.constexpr,  # padded tile edges of n, d, k
    PRECISION: tl.constexpr,  # tl.dot input precision
    ROWS: tl.constexpr,  # batch rows per program
):
    y = _tile(Y, n, k, k, BN, BK)  # (BN, BK)
    rn = tl.arange(0, BN)
    rk = tl.arange(0, BK)
    z_ok = (rn[:, None] < n) & (rk[None, :] < k)
    for r in range(ROWS):
        b = tl.program_id(0) * ROWS + r
        if b < B:
            x = _tile(X + b.to(tl.int64) * n * d, n, d, d, BN, BD)  # (BN, BD)
            t = tl.dot(tl.trans(x), y, input_precision=PRECISION)  # (BD, BK) = Xᵀ Y
            z = tl.dot(x, t.to(x.dtype), input_precision=PRECISION)  # (BN, BK)
            tl.store(Z + b.to(tl.int64) * n * k + rn[:, None] * k + rk[None, :], z.to(Z.dtype.element_ty), mask=z_ok)


# DY_PART is zeroed before each tuning run: configs with more ROWS write fewer partials.
@triton.autotune(configs=_CONFIGS, key=_KEY, reset_to_zero=["DY_PART"])
@triton.jit
def _bwd_kernel(
    X,  # (B, n, d) contiguous
    Y,  # (n, k) contiguous
    G,  # (B, n * k) output gradient, contiguous
    DX,  # (B, n, d) output, contiguous
    DY_PART,  # (programs, n, k) float32 output: this program's share of dY
    B, n, d, k,
    BN: tl.constexpr, BD: tl.constexpr, BK: tl.constexpr,
    PRECISION: tl.constexpr,
    ROWS: tl.constexpr,
):
    y = _tile(Y, n, k, k, BN, BK)  # (BN, BK)
    rn = tl.arange(0, BN)
    rd = tl.arange(0, BD)
    rk = tl.arange(0, BK)
    dy = tl.zeros([BN, BK], tl.float32)
    for r in range(ROWS):
        b = tl.program_id(0) * ROWS + r
        if b < B:
            x = _tile(X + b.to(tl.int64) * n * d, n, d, d, BN, BD)  # (BN, BD)
            g = _tile(G + b.to(tl.int64) * n * k, n, k, k, BN, BK)  # (BN, BK)
            t = tl.dot(tl.trans(x), y, input_precision=PRECISION)  # (BD, BK) = Xᵀ Y
            dt = tl.dot(tl.trans(x), g, input_precision=PRECISION)  # (BD, BK) = Xᵀ G
            dx = tl.dot(g, tl.trans(t).to(g.dtype), input_precision=PRECISION)  # (BN, BD) = G Tᵀ
            dx += tl.dot(y, tl.trans(dt).to(y.dtype), input_precision=PRECISION)  # + Y dTᵀ
            dy += tl.dot(x, dt.to(x.dtype), input_precision=PRECISION)  # (BN, BK) = X dT
            tl.store(DX + b.to(tl.int64) * n * d + rn[:, None] * d + rd[None, :], dx.to(DX.dtype.element_ty),
                     mask=(rn[:, None] < n) & (rd[None, :] < d))
    tl.store(DY_PART + tl.program_id(0).to(tl.int64) * n * k + rn[:, None] * k + rk[None, :], dy,
             mask=(rn[:, None] < n) & (rk[None, :] < k))


def _meta(x: torch.Tensor, y: torch.Tensor) -> dict:
    return dict(BN=block(x.shape[1]), BD=block(x.shape[2]), BK=block(y.shape[1]), PRECISION=precision(x.dtype))


class _FMInteraction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y):
        B, n, d = x.shape
        k = y.shape[1]
        z = torch.empty((B, n * k), dtype=x.dtype, device=x.device)
        if z.numel() and d:
            _fwd_kernel[lambda meta: (triton.cdiv(B, meta["ROWS"]),)](x, y, z, B, n, d, k, **_meta(x, y))
        elif z.numel():
            z.zero_()
        ctx.save_for_backward(x, y)
        return z

    @staticmethod
    def backward(ctx, g):
        x, y = ctx.saved_tensors
        B, n, d = x.shape
        k = y.shape[1]
        if not (B and n and d and k):
            return torch.zeros_like(x), torch.zeros_like(y)
        g = g.contiguous()
        dx = torch.empty_like(x)
        # Sized for the smallest ROWS candidate so any autotuned config fits; rows past
        # the grid stay zero and the sum ignores them.
        dy_part = torch.zeros((B, n, k), dtype=torch.float32, device=x.device)
        _bwd_kernel[lambda meta: (triton.cdiv(B, meta["ROWS"]),)](x, y, g, dx, dy_part, B, n, d, k, **_meta(x, y))
        return dx, dy_part.sum(0).to(y.dtype)


def triton_fm_interaction(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x: (B, n, d), y: (n, k) -> (B, n * k); inputs checked by
    :func:`opengem.kernels.fm_interaction.fm_interaction`."""
    return _FMInteraction.apply(x.contiguous(), y.contiguous())

