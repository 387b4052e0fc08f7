"""Triton jagged attention, forward and backward (FlashAttention-2 style).

Layout: ``q, k, v, o: (N, H, D)`` with ``N = sum_i L_i`` and ``offsets: (B + 1,)``.
Every program owns one (sequence, head, row block); the grid is
``(cdiv(max_len, BLOCK), B * H)`` and programs past their sequence's end exit
at once, so padding is neither stored nor computed -- work follows
``sum_i L_i^2``. Softmax runs online in the log2 domain; the forward saves the
per-row log-sum-exp, and the backward recomputes the probabilities from it:
one kernel for dK/dV (a key block, looping over query blocks) and one for dQ
(a query block, looping over key blocks), so no atomics and deterministic
gradients. Masks are those of :mod:`opengem.kernels.jagged_attention`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from opengem.kernels.triton._common import block, configs, precision

LOG2E = 1.4426950408889634

_FWD_CONFIGS = configs(
    [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
     for m, n, w, s in [(128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (64, 32, 4, 2), (32, 32, 4, 2)]],
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}),
)
_BWD_CONFIGS = configs(
    [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
     for m, n, w, s in [(64, 64, 4, 2), (32, 64, 4, 2), (64, 32, 4, 2), (32, 32, 4, 1)]],
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}),
)
# Re-tune per head size, mask kind and dtype (the autotuner adds dtypes), not per batch.
_KEY = ["D", "CAUSAL", "HAS_TARGETS"]


@triton.jit
def _allowed(
    offs_m,  # (BLOCK_M,) query positions within the sequence
    offs_n,  # (BLOCK_N,) key positions within the sequence
    L,  # sequence length
    hist,  # history length L - num_targets (== L without targets)
    CAUSAL: tl.constexpr,
    HAS_TARGETS: tl.constexpr,
):
    """(BLOCK_M, BLOCK_N) bool: may query i attend key j."""
    ok = (offs_m[:, None] < L) & (offs_n[None, :] < L)
    if CAUSAL:
        ok = ok & (offs_n[None, :] <= offs_m[:, None])
    if HAS_TARGETS:
        ok = ok & ((offs_n[None, :] < hist) | (offs_n[None, :] == offs_m[:, None]))
    return ok


@triton.jit
def _sequence(
    offsets,  # (B + 1,) int
    num_targets,  # (B,) int, read only if HAS_TARGETS
    b,  # sequence index
    HAS_TARGETS: tl.constexpr,
):
    """(first row as int64, length, history length) of sequence b."""
    start = tl.load(offsets + b).to(tl.int64)
    L = (tl.load(offsets + b + 1) - start).to(tl.int32)
    hist = L
    if HAS_TARGETS:
        nt = tl.load(num_targets + b).to(tl.int32)
        hist = L - tl.minimum(tl.maximum(nt, 0), L)
    return start, L, hist


@triton.jit
def _key_end(m0, L, hist, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr, HAS_TARGETS: tl.constexpr):
    """One past the last key that queries [m0, m0 + BLOCK_M) may attend."""
    hi = L
    if CAUSAL:
        hi = tl.minimum(hi, m0 + BLOCK_M)
    if HAS_TARGETS:
        hi = tl.minimum(hi, tl.maximum(hist, m0 + BLOCK_M))
    return hi


@triton.autotune(configs=_FWD_CONFIGS, key=_KEY)
@triton.jit
def _fwd_kernel(
    Q, K, V,  # (N, H, D) inputs, unit stride on D
    O,  # (N, H, D) output, contiguous
    LSE,  # (N, H) float32 output: log2-sum-exp2 of each row's scaled scores, for the backward
    offsets,  # (B + 1,) int: sequence boundaries
    num_targets,  # (B,) int: targets at the end of each sequence (unused unless HAS_TARGETS)
    stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh,  # row / head strides of Q, K, V
    H,  # heads
    D,  # head size
    qk_scale,  # softmax scale * log2(e)
    CAUSAL: tl.constexpr,
    HAS_TARGETS: tl.constexpr,
    BLOCK_D: tl.constexpr,  # power of two >= D
    PRECISION: tl.constexpr,  # tl.dot input precision
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # key rows per inner step
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    start, L, hist = _sequence(offsets, num_targets, b, HAS_TARGETS)
    m0 = pid_m * BLOCK_M
    if m0 < L:
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        rows_m = (start + offs_m).to(tl.int64)
        d_ok = offs_d[None, :] < D
        q = tl.load(Q + rows_m[:, None] * stride_qn + h * stride_qh + offs_d[None, :],
                    mask=(offs_m[:, None] < L) & d_ok, other=0.0)
        # Finite start: a row masked in a whole tile keeps p = exp2(-inf) = 0, never NaN.
        m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        hi = _key_end(m0, L, hist, BLOCK_M, CAUSAL, HAS_TARGETS)
        for n0 in range(0, hi, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            rows_n = (start + offs_n).to(tl.int64)
            kv_ok = (offs_n[:, None] < L) & d_ok
            k = tl.load(K + rows_n[:, None] * stride_kn + h * stride_kh + offs_d[None, :], mask=kv_ok, other=0.0)
            v = tl.load(V + rows_n[:, None] * stride_vn + h * stride_vh + offs_d[None, :], mask=kv_ok, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
            s = tl.where(_allowed(offs_m, offs_n, L, hist, CAUSAL, HAS_TARGETS), s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        row_ok = offs_m < L
        l_safe = tl.where(row_ok, l_i, 1.0)
        out = acc / l_safe[:, None]
        tl.store(O + rows_m[:, None] * (H * D) + h * D + offs_d[None, :], out.to(O.dtype.element_ty),
                 mask=row_ok[:, None] & d_ok)
        tl.store(LSE + rows_m * H + h, m_i + tl.log2(l_safe), mask=row_ok)


@triton.autotune(configs=_BWD_CONFIGS, key=_KEY)
@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V,  # (N, H, D) forward inputs, unit stride on D
    DO,  # (N, H, D) output gradient, contiguous
    LSE,  # (N, H) float32 from the forward
    DELTA,  # (N, H) float32: rowsum(dO * O)
    DK, DV,  # (N, H, D) outputs, contiguous
    offsets,  # (B + 1,) int
    num_targets,  # (B,) int (unused unless HAS_TARGETS)
    stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh,
    H, D,
    qk_scale,  # softmax scale * log2(e)
    sm_scale,  # softmax scale
    CAUSAL: tl.constexpr,
    HAS_TARGETS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,  # query rows per inner step
    BLOCK_N: tl.constexpr,  # key rows per program
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    start, L, hist = _sequence(offsets, num_targets, b, HAS_TARGETS)
    n0 = pid_n * BLOCK_N
    if n0 < L:
        offs_n = n0 + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        rows_n = (start + offs_n).to(tl.int64)
        d_ok = offs_d[None, :] < D
        kv_ok = (offs_n[:, None] < L) & d_ok
        k = tl.load(K + rows_n[:, None] * stride_kn + h * stride_kh + offs_d[None, :], mask=kv_ok, other=0.0)
        v = tl.load(V + rows_n[:, None] * stride_vn + h * stride_vh + offs_d[None, :], mask=kv_ok, other=0.0)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        # Queries that can see this key block: all (or, causal, those at or after it);
        # a block made only of target keys is seen by those targets alone.
        lo = 0
        if CAUSAL:
            lo = n0
        hi = L
        if HAS_TARGETS:
            only_targets = n0 >= hist
            lo = tl.where(only_targets, n0, lo)
            hi = tl.where(only_targets, tl.minimum(L, n0 + BLOCK_N), hi)
        for m0 in range(lo, hi, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            rows_m = (start + offs_m).to(tl.int64)
            q_ok = (offs_m[:, None] < L) & d_ok
            q = tl.load(Q + rows_m[:, None] * stride_qn + h * stride_qh + offs_d[None, :], mask=q_ok, other=0.0)
            do = tl.load(DO + rows_m[:, None] * (H * D) + h * D + offs_d[None, :], mask=q_ok, other=0.0)
            lse = tl.load(LSE + rows_m * H + h, mask=offs_m < L, other=0.0)
            delta = tl.load(DELTA + rows_m * H + h, mask=offs_m < L, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
            p = tl.where(_allowed(offs_m, offs_n, L, hist, CAUSAL, HAS_TARGETS), tl.exp2(s - lse[:, None]), 0.0)
            dv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # (BLOCK_M, BLOCK_N)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PRECISION)
        out_ok = (offs_n[:, None] < L) & d_ok
        dst = rows_n[:, None] * (H * D) + h * D + offs_d[None, :]
        tl.store(DK + dst, (dk * sm_scale).to(DK.dtype.element_ty), mask=out_ok)
        tl.store(DV + dst, dv.to(DV.dtype.element_ty), mask=out_ok)


@triton.autotune(configs=_BWD_CONFIGS, key=_KEY)
@triton.jit
def _bwd_dq_kernel(
    Q, K, V,  # (N, H, D) forward inputs, unit stride on D
    DO,  # (N, H, D) output gradient, contiguous
    LSE,  # (N, H) float32 from the forward
    DELTA,  # (N, H) float32: rowsum(dO * O)
    DQ,  # (N, H, D) output, contiguous
    offsets,  # (B + 1,) int
    num_targets,  # (B,) int (unused unless HAS_TARGETS)
    stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh,
    H, D,
    qk_scale,  # softmax scale * log2(e)
    sm_scale,  # softmax scale
    CAUSAL: tl.constexpr,
    HAS_TARGETS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # key rows per inner step
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    start, L, hist = _sequence(offsets, num_targets, b, HAS_TARGETS)
    m0 = pid_m * BLOCK_M
    if m0 < L:
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        rows_m = (start + offs_m).to(tl.int64)
        d_ok = offs_d[None, :] < D
        q_ok = (offs_m[:, None] < L) & d_ok
        q = tl.load(Q + rows_m[:, None] * stride_qn + h * stride_qh + offs_d[None, :], mask=q_ok, other=0.0)
        do = tl.load(DO + rows_m[:, None] * (H * D) + h * D + offs_d[None, :], mask=q_ok, other=0.0)
        lse = tl.load(LSE + rows_m * H + h, mask=offs_m < L, other=0.0)
        delta = tl.load(DELTA + rows_m * H + h, mask=offs_m < L, other=0.0)
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        hi = _key_end(m0, L, hist, BLOCK_M, CAUSAL, HAS_TARGETS)
        for n0 in range(0, hi, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            rows_n = (start + offs_n).to(tl.int64)
            kv_ok = (offs_n[:, None] < L) & d_ok
            k = tl.load(K + rows_n[:, None] * stride_kn + h * stride_kh + offs_d[None, :], mask=kv_ok, other=0.0)
            v = tl.load(V + rows_n[:, None] * stride_vn + h * stride_vh + offs_d[None, :], mask=kv_ok, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            p = tl.where(_allowed(offs_m, offs_n, L, hist, CAUSAL, HAS_TARGETS), tl.exp2(s - lse[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
        tl.store(DQ + rows_m[:, None] * (H * D) + h * D + offs_d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty),
                 mask=q_ok)


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    """The kernels take any row/head strides but need unit stride on D."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _fwd(q, k, v, offsets, num_targets, max_len, causal, scale):
    N, H, D = q.shape
    B = offsets.numel() - 1
    o = torch.empty((N, H, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((N, H), dtype=torch.float32, device=q.device)
    if N == 0 or max_len == 0:
        return o, lse
    _fwd_kernel[lambda meta: (triton.cdiv(max_len, meta["BLOCK_M"]), B * H)](
        q, k, v, o, lse, offsets, offsets if num_targets is None else num_targets,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        H, D, scale * LOG2E,
        CAUSAL=causal, HAS_TARGETS=num_targets is not None, BLOCK_D=block(D), PRECISION=precision(q.dtype),
    )
    return o, lse


def _bwd(do, q, k, v, o, lse, offsets, num_targets, max_len, causal, scale):
    N, H, D = q.shape
    B = offsets.numel() - 1
    dq, dk, dv = (torch.empty((N, H, D), dtype=q.dtype, device=q.device) for _ in range(3))
    if N == 0 or max_len == 0:
        return dq, dk, dv
    do = do.contiguous()
    delta = (do.float() * o.float()).sum(-1)  # (N, H): the softmax-backward row term, one memory pass
    common = dict(CAUSAL=causal, HAS_TARGETS=num_targets is not None, BLOCK_D=block(D), PRECISION=precision(q.dtype))
    args = (offsets, offsets if num_targets is None else num_targets,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            H, D, scale * LOG2E, scale)
    _bwd_dkdv_kernel[lambda meta: (triton.cdiv(max_len, meta["BLOCK_N"]), B * H)](
        q, k, v, do, lse, delta, dk, dv, *args, **common)
    _bwd_dq_kernel[lambda meta: (triton.cdiv(max_len, meta["BLOCK_M"]), B * H)](
        q, k, v, do, lse, delta, dq, *args, **common)
    return dq, dk, dv


class _JaggedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, offsets, num_targets, max_len, causal, scale):
        o, lse = _fwd(q, k, v, offsets, num_targets, max_len, causal, scale)
        ctx.save_for_backward(q, k, v, o, lse, offsets, num_targets)
        ctx.cfg = (max_len, causal, scale)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, offsets, num_targets = ctx.saved_tensors
        dq, dk, dv = _bwd(do, q, k, v, o, lse, offsets, num_targets, *ctx.cfg)
        return dq, dk, dv, None, None, None, None, None


def triton_jagged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    offsets: torch.Tensor,
    num_targets: torch.Tensor | None,
    max_len: int,
    causal: bool,
    scale: float,
) -> torch.Tensor:
    """q, k, v: (N, H, D); offsets: (B + 1,); num_targets: (B,) or None -> (N, H, D).

    Inputs are checked by :func:`opengem.kernels.jagged_attention.jagged_attention`.
    """
    if q.shape[-1] > 256:
        raise ValueError(f"head size {q.shape[-1]} > 256: a row block would not fit in registers; "
                         "use more heads or the pytorch backend")
    q, k, v = (_unit_last(t) for t in (q, k, v))
    return _JaggedAttention.apply(q, k, v, offsets.contiguous(),
                                  None if num_targets is None else num_targets.contiguous(), max_len, causal, scale)
