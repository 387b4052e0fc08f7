"""Jagged attention: Triton kernel == padded-SDPA reference (outputs and gradients),
and the reference == a per-sequence loop written from the mask definitions."""

from __future__ import annotations

import math

import pytest
import torch
from kernel_testing import DEVICE, gpu, leaves, offsets_of

from opengem.kernels import jagged_attention, reference_jagged_attention
from opengem.kernels.jagged import heavy_tailed_lengths

# Awkward batches: empty, length 1, all-empty, lengths straddling the 32-row
# tiles, and a small heavy tail (mostly short, one long).
LENGTHS = {
    "one": [1],
    "empty_rows": [0, 1, 0, 2, 0],
    "all_empty": [0, 0],
    "straddle": [31, 33, 64, 65, 1],
    "heavy_tail": [3, 1, 7, 2, 100, 0, 12],
}
MASKS = [(False, False), (True, False), (False, True), (True, True)]  # (causal, targets)


def _inputs(lengths, H, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    offsets = offsets_of(lengths)
    N = int(sum(lengths))
    q, k, v = (torch.randn(N, H, D, generator=g, dtype=torch.float32).to(DEVICE, dtype) for _ in range(3))
    nt = torch.randint(0, 4, (len(lengths),), generator=g).to(DEVICE)  # some exceed short lengths: clamped
    return q, k, v, offsets, nt


def _compare(lengths, H, D, causal, targets, dtype=torch.float32, atol=2e-5, rtol=2e-5):
    q, k, v, offsets, nt = _inputs(lengths, H, D, dtype)
    nt = nt if targets else None
    out, grads = [], []
    for backend in ("triton", "pytorch"):
        qkv = leaves(q, k, v)
        o = jagged_attention(*qkv, offsets, causal=causal, num_targets=nt, backend=backend)
        go = torch.randn(o.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
        out.append(o)
        grads.append(torch.autograd.grad(o, qkv, go) if o.numel() else [torch.zeros_like(t) for t in qkv])
    torch.testing.assert_close(out[0], out[1], atol=atol, rtol=rtol)
    for a, b in zip(grads[0], grads[1]):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


@pytest.mark.parametrize("name", LENGTHS)
@pytest.mark.parametrize("causal,targets", MASKS)
def test_kernel_matches_reference(name, causal, targets):
    H, D = (3, 12) if name == "heavy_tail" else (2, 8)  # non-power-of-two heads and head size
    _compare(LENGTHS[name], H, D, causal, targets)


def test_head_size_one_and_strided_inputs():
    """D=1, and q/k/v as strided views of one packed (N, 3, H, D) projection, as models produce."""
    lengths = [5, 0, 40]
    offsets = offsets_of(lengths)
    qkv = torch.randn(45, 3, 2, 1, device=DEVICE, requires_grad=True)
    for causal in (False, True):
        a = jagged_attention(qkv[:, 0], qkv[:, 1], qkv[:, 2], offsets, causal=causal, backend="triton")
        b = reference_jagged_attention(qkv[:, 0], qkv[:, 1], qkv[:, 2], offsets, causal=causal)
        torch.testing.assert_close(a, b)
        ga, = torch.autograd.grad(a.sum(), qkv)
        gb, = torch.autograd.grad(b.sum(), qkv)
        torch.testing.assert_close(ga, gb)


def _loop_reference(q, k, v, lengths, causal, nt, scale):
    """Per sequence, per query: softmax over the allowed keys, from the docstring's rules."""
    out, start = torch.zeros_like(q), 0
    for b, L in enumerate(lengths):
        hist = L - min(max(int(nt[b]), 0), L) if nt is not None else L
        for i in range(L):
            keys = [j for j in range(L) if (not causal or j <= i) and (j < hist or j == i)]
            rows = [start + j for j in keys]
            s = torch.einsum("hd,jhd->hj", q[start + i], k[rows]) * scale  # (H, |keys|)
            out[start + i] = torch.einsum("hj,jhd->hd", s.softmax(-1), v[rows])
        start += L
    return out


@pytest.mark.parametrize("causal,targets", MASKS)
def test_reference_follows_mask_definition(causal, targets):
    lengths = [0, 1, 6, 3]
    q, k, v, offsets, nt = _inputs(lengths, 2, 4)
    nt = torch.tensor([0, 1, 2, 5], device=DEVICE) if targets else None  # 5 > 3: clamped to all-targets
    got = reference_jagged_attention(q, k, v, offsets, causal=causal, num_targets=nt, scale=0.7)
    want = _loop_reference(q, k, v, lengths, causal, nt, 0.7)
    torch.testing.assert_close(got, want)


def test_bad_inputs_raise():
    q = torch.randn(5, 2, 4)
    with pytest.raises(ValueError, match="end at 5"):
        jagged_attention(q, q, q, torch.tensor([0, 2, 4]), backend="pytorch")
    with pytest.raises(ValueError, match="non-decreasing"):
        jagged_attention(q, q, q, torch.tensor([0, 3, 2, 5]), backend="pytorch")
    with pytest.raises(ValueError, match=r"\(N, H, D\)"):
        jagged_attention(q, q[:4], q, torch.tensor([0, 5]), backend="pytorch")
    with pytest.raises(TypeError):
        jagged_attention(q, q, q, torch.tensor([0.0, 5.0]), backend="pytorch")
    with pytest.raises(ValueError, match="num_targets"):
        jagged_attention(q, q, q, torch.tensor([0, 5]), num_targets=torch.tensor([1, 2]), backend="pytorch")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("causal,targets", MASKS)
def test_full_size_heavy_tail_on_gpu(dtype, tol, causal, targets):
    """Lengths 1..16k, heavy-tailed, plus empty and length-1 rows; compared sequence by
    sequence so the reference's (L, L) mask stays within memory."""
    lengths = heavy_tailed_lengths(30, 1500, 16384, torch.Generator().manual_seed(0)).tolist() + [0, 1]
    H, D = 2, 96
    q, k, v, offsets, nt = _inputs(lengths, H, D, dtype)
    nt = nt if targets else None
    qkv = leaves(q, k, v)
    o = jagged_attention(*qkv, offsets, causal=causal, num_targets=nt, backend="triton")
    go = torch.randn_like(o)
    grads = torch.autograd.grad(o, qkv, go)
    for b, (s, e) in enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist())):
        ref_in = leaves(q[s:e], k[s:e], v[s:e])
        r = reference_jagged_attention(*ref_in, offsets_of([e - s]), causal=causal,
                                       num_targets=None if nt is None else nt[b:b + 1])
        torch.testing.assert_close(o[s:e], r, atol=tol, rtol=tol)
        if e > s:
            for a, rb in zip(grads, torch.autograd.grad(r, ref_in, go[s:e])):
                torch.testing.assert_close(a[s:e], rb, atol=tol * math.sqrt(max(e - s, 1) / 64), rtol=tol)
