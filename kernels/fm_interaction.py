"""Wukong's optimized FM interaction, ``X (Xᵀ Y)`` flattened.

For each row b, ``x[b]: (n, d)`` holds n embeddings and ``y: (n, k)`` is the
learned projection; the op returns ``(x[b] @ (x[b]ᵀ @ y)).flatten()``, i.e.
``(B, n * k)`` -- every embedding's dot products with k learned mixtures of
all embeddings, which is what Wukong's FM block feeds its LayerNorm + MLP.
The Triton kernel keeps ``x[b]`` and the (d, k) intermediate in registers:
one read of X, one write of Z, no (B, d, k) tensor in memory, and in the
backward one pass that produces dX and a per-program partial dY.
"""

from __future__ import annotations

import torch

from opengem.kernels._backend import Backend, autocast_inputs, resolve


def fm_interaction(x: torch.Tensor, y: torch.Tensor, *, backend: Backend = "auto") -> torch.Tensor:
    """x: (B, n, d) float, y: (n, k) float, same dtype -> (B, n * k)."""
    if x.dim() != 3 or y.dim() != 2 or y.shape[0] != x.shape[1]:
        raise ValueError(f"need x (B, n, d) and y (n, k), got {tuple(x.shape)} and {tuple(y.shape)}")
    if resolve(backend, x, y) == "triton":
        from opengem.kernels.triton.fm_interaction import triton_fm_interaction

        x, y = autocast_inputs(x, y)
        _check_dtypes(x, y)
        return triton_fm_interaction(x, y)
    if not torch.is_autocast_enabled(x.device.type):
        _check_dtypes(x, y)
    return reference_fm_interaction(x, y)


def _check_dtypes(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.dtype != y.dtype or not x.is_floating_point():
        raise TypeError(f"x and y must share one float dtype, got {x.dtype} and {y.dtype}")


def reference_fm_interaction(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The definition in two batched matmuls (the order that costs O(n k d), not O(n^2 d))."""
    ytx = torch.matmul(y.t(), x)  # (B, k, d) = (Xᵀ Y)ᵀ; y broadcast over B, no copy of x
    return torch.bmm(x, ytx.transpose(1, 2)).flatten(1)  # (B, n * k)
