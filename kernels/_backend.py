"""Backend choice shared by every kernel entry point.

Each op in :mod:`opengem.kernels` has two implementations: a PyTorch reference
(runs anywhere, the CPU default) and a Triton kernel (the CUDA default). The
choice is an argument of every op; ``"auto"`` defers to the environment
variable ``OPENGEM_KERNEL_BACKEND`` (``auto`` | ``pytorch`` | ``triton``) and
then to the device of the inputs. Triton is imported only when a Triton
kernel actually runs, so ``import opengem.kernels`` never needs it.
"""

from __future__ import annotations

import os
from typing import Literal

import torch

Backend = Literal["auto", "pytorch", "triton"]
BACKENDS: tuple[str, ...] = ("auto", "pytorch", "triton")
ENV_VAR = "OPENGEM_KERNEL_BACKEND"


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve(backend: str, *tensors: torch.Tensor) -> Literal["pytorch", "triton"]:
    """The backend that runs an op on ``tensors``.

    ``auto``: the ``OPENGEM_KERNEL_BACKEND`` setting if it names one, else
    Triton on CUDA tensors and PyTorch elsewhere. Asking for Triton on CPU
    tensors outside the interpreter is an error rather than a silent fallback,
    so a benchmark or test never measures the wrong thing.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        env = os.environ.get(ENV_VAR, "auto")
        if env not in BACKENDS:
            raise ValueError(f"{ENV_VAR} must be one of {BACKENDS}, got {env!r}")
        backend = env
    on_cuda = all(t.is_cuda for t in tensors)
    if backend == "auto":
        return "triton" if on_cuda else "pytorch"
    if backend == "triton" and not (on_cuda or interpreting()):
        raise ValueError("the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 set before import)")
    return backend  # type: ignore[return-value]


def autocast_inputs(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Cast float inputs to the autocast dtype when autocast is on for their device.

    A custom ``autograd.Function`` is invisible to autocast, so the Triton path
    does by hand what autocast does for the reference's matmuls (bf16 / fp16
    activations meeting fp32 parameters); outside autocast it is a no-op.
    """
    dev = tensors[0].device.type
    if not torch.is_autocast_enabled(dev):
        return tensors
    dt = torch.get_autocast_dtype(dev)
    return tuple(t.to(dt) if t.is_floating_point() else t for t in tensors)
