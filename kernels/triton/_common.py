"""Small helpers shared by the Triton kernel files."""

from __future__ import annotations

import torch
import triton

from opengem.kernels._backend import interpreting


def block(n: int, lo: int = 16) -> int:
    """Power-of-two tile edge covering n, at least ``lo`` (tl.dot needs 16 on GPUs)."""
    return max(lo, triton.next_power_of_2(max(n, 1)))


def configs(gpu: list[triton.Config], interp: triton.Config) -> list[triton.Config]:
    """Autotune candidates: the GPU list, or one small config under the interpreter,
    where autotuning would only multiply the (slow) interpreted runs."""
    return [interp] if interpreting() else gpu


def precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: exact IEEE for float32 inputs (so fp32 results match the
    reference to fp32 tolerances), the tensor-core default for 16-bit inputs."""
    return "ieee" if dtype == torch.float32 else "tf32"
