"""Kernel tests run the Triton kernels natively on a GPU, else in Triton's CPU interpreter.

TRITON_INTERPRET is read when a kernel is *decorated*, i.e. when
``opengem.kernels.triton.*`` is first imported -- which only these tests and a
Triton-backend call do, so setting it here, at conftest import, is early
enough and changes nothing for tests that never touch Triton.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
