"""Jagged multi-head softmax attention over variable-length user sequences.

``jagged_attention(q, k, v, offsets)`` attends within each sequence of a
jagged batch -- ``q, k, v: (sum_i L_i, H, D)``, ``offsets: (B + 1,)`` -- and
returns ``(sum_i L_i, H, D)``. The Triton kernel never materializes padding:
its cost follows ``sum_i L_i^2``, where padded SDPA pays ``B * max_i L_i^2``,
which is what a heavy-tailed length distribution (mean 500, max 4096) makes
expensive.

Masks, as sequence models need them (query position i, key position j, both
inside one sequence of length L with ``n_t = num_targets[b]`` targets at its
end and ``L - n_t`` history events before them):

* always: j < L (no attention across sequences);
* ``causal``: j <= i;
* ``num_targets``: j < L - n_t or j == i -- history never sees targets, and
  each target (a candidate ad appended to the history) sees the history and
  itself but not the other candidates, so one pass scores many candidates
  independently. ``n_t`` is clamped to [0, L].

Every query sees at least itself, so no row is empty and no NaN can appear.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from opengem.kernels._backend import Backend, autocast_inputs, resolve
from opengem.kernels.jagged import check_offsets, from_padded, lengths_of, max_length, to_padded


def jagged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    offsets: torch.Tensor,
    *,
    causal: bool = False,
    num_targets: torch.Tensor | None = None,
    scale: float | None = None,
    max_len: int | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Softmax attention within each sequence.

    q, k, v: (N, H, D) float, N = sum_i L_i; offsets: (B + 1,) int;
    num_targets: (B,) int or None; scale: default 1 / sqrt(D);
    max_len: the longest L_i if the caller knows it (saves a device sync; it
    is trusted, not checked) -> (N, H, D) in q's dtype.
    """
    use_triton = resolve(backend, q, k, v) == "triton"
    if use_triton:
        q, k, v = autocast_inputs(q, k, v)
    _check(q, k, v, offsets, num_targets)
    if max_len is None:
        max_len = max_length(offsets, q.shape[0])
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if use_triton:
        from opengem.kernels.triton.jagged_attention import triton_jagged_attention

        return triton_jagged_attention(q, k, v, offsets, num_targets, max_len, causal, scale)
    return reference_jagged_attention(q, k, v, offsets, causal=causal, num_targets=num_targets, scale=scale,
                                      max_len=max_len)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offsets: torch.Tensor,
           num_targets: torch.Tensor | None) -> None:
    if q.dim() != 3 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must all be (N, H, D), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise TypeError(f"q, k, v must share one float dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    check_offsets(offsets, q.shape[0])
    if num_targets is not None and (num_targets.shape != (offsets.numel() - 1,) or num_targets.is_floating_point()):
        raise ValueError(f"num_targets must be (B,) int, got {tuple(num_targets.shape)} {num_targets.dtype}")


def attention_mask(offsets: torch.Tensor, max_len: int, causal: bool,
                   num_targets: torch.Tensor | None) -> torch.Tensor:
    """(B, 1, max_len, max_len) bool, True = may attend; the masks of the module docstring.

    Padded query rows (i >= L) may attend everywhere: their outputs are
    discarded, and a fully masked row would make SDPA produce NaN, whose
    gradient (0 * NaN) would poison the real rows.
    """
    lengths = lengths_of(offsets)[:, None, None]  # (B, 1, 1)
    i = torch.arange(max_len, device=offsets.device)[:, None]  # (L, 1) query positions
    j = torch.arange(max_len, device=offsets.device)[None, :]  # (1, L) key positions
    ok = j < lengths
    if causal:
        ok = ok & (j <= i)
    if num_targets is not None:
        hist = lengths - num_targets.long().clamp(min=0)[:, None, None].minimum(lengths)
        ok = ok & ((j < hist) | (j == i))
    ok = ok | (i >= lengths)
    return ok[:, None]


def reference_jagged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    offsets: torch.Tensor,
    *,
    causal: bool = False,
    num_targets: torch.Tensor | None = None,
    scale: float | None = None,
    max_len: int | None = None,
) -> torch.Tensor:
    """The definition: pad to (B, H, max_len, D), masked SDPA, unpad. Same shapes as the op."""
    n = q.shape[0]
    if max_len is None:
        max_len = max_length(offsets, n)
    pad = [to_padded(t, offsets, max_len).transpose(1, 2) for t in (q, k, v)]  # (B, H, L, D)
    mask = attention_mask(offsets, max_len, causal, num_targets)
    out = F.scaled_dot_product_attention(*pad, attn_mask=mask, scale=scale)  # (B, H, L, D)
    return from_padded(out.transpose(1, 2), offsets, n)
