"""Fused FM interaction: Triton kernel == reference (outputs and gradients) on awkward sizes."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import DEVICE, gpu, leaves

from opengem.kernels import fm_interaction, reference_fm_interaction


def _compare(B, n, d, k, dtype=torch.float32, tol=1e-5):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, n, d, generator=g).to(DEVICE, dtype)
    y = (torch.randn(n, k, generator=g) / n**0.5).to(DEVICE, dtype)
    res = []
    for backend in ("triton", "pytorch"):
        ins = leaves(x, y)
        z = fm_interaction(*ins, backend=backend)
        assert z.shape == (B, n * k)
        gz = torch.randn(z.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
        res.append((z, torch.autograd.grad(z, ins, gz)))
    torch.testing.assert_close(res[0][0], res[1][0], atol=tol, rtol=tol)
    for a, b in zip(res[0][1], res[1][1]):
        # dY sums B rows: its rounding error grows with the batch.
        torch.testing.assert_close(a, b, atol=tol * max(B, 1) ** 0.5 * 4, rtol=tol)


@pytest.mark.parametrize("B,n,d,k", [(1, 1, 1, 1), (5, 7, 6, 5), (9, 33, 20, 3), (17, 26, 16, 8), (0, 4, 4, 4),
                                     (3, 4, 0, 2)])
def test_kernel_matches_reference(B, n, d, k):
    _compare(B, n, d, k)


def test_reference_is_the_definition():
    """The reference's O(n k d) order equals the plain (X Xᵀ) Y, flattened row-major."""
    x, y = torch.randn(3, 5, 4, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    torch.testing.assert_close(reference_fm_interaction(x, y), ((x @ x.transpose(1, 2)) @ y).reshape(3, 10))


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match=r"\(B, n, d\)"):
        fm_interaction(torch.randn(2, 3, 4), torch.randn(4, 2))
    with pytest.raises(TypeError):
        fm_interaction(torch.randn(2, 3, 4), torch.randn(3, 2, dtype=torch.float64))


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
def test_full_size_on_gpu(dtype, tol):
    _compare(4099, 41, 96, 16, dtype, tol)


@gpu
@pytest.mark.gpu
def test_autocast_matches_reference_on_gpu():
    """Under bf16 autocast, fp32 activations and an fp32 projection (the model's FMBlock)
    take the kernel in bf16, as autocast would run the reference's matmuls."""
    x = torch.randn(300, 21, 40, device=DEVICE)
    y = torch.randn(21, 8, device=DEVICE) / 21**0.5
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = fm_interaction(x, y, backend="triton")
        want = fm_interaction(x, y, backend="pytorch")
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, atol=5e-2, rtol=5e-2)
