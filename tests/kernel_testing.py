"""Shared helpers of tests/kernels (the device they run on, jagged inputs)."""

from __future__ import annotations

import pytest
import torch

# A GPU runs the Triton kernels natively; without one tests/kernels/conftest.py
# has set TRITON_INTERPRET=1 and the kernels run in the CPU interpreter.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def offsets_of(lengths: list[int] | torch.Tensor) -> torch.Tensor:
    """(B,) lengths -> (B + 1,) int64 offsets on DEVICE."""
    lengths = torch.as_tensor(lengths, dtype=torch.int64)
    return torch.cat([lengths.new_zeros(1), torch.cumsum(lengths, 0)]).to(DEVICE)


def leaves(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Fresh leaf copies that require grad, so kernel and reference get separate graphs."""
    return [t.detach().clone().requires_grad_(True) for t in tensors]
