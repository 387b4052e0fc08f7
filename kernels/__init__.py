"""Kernels for what PyTorch does badly here: jagged attention over user
sequences, fused pyramid pooling, fused FM interaction.

Every op has one entry point that picks its backend (``backend="auto"``:
Triton on CUDA, the PyTorch reference elsewhere; see :mod:`._backend`) and
exports its reference for tests and CPU use. Importing this package does not
import triton; the Triton modules load on the first Triton call.
"""

from opengem.kernels._backend import Backend
from opengem.kernels.fm_interaction import fm_interaction, reference_fm_interaction
from opengem.kernels.jagged_attention import jagged_attention, reference_jagged_attention
from opengem.kernels.pyramid_pool import (
    Segments,
    pyramid_pool,
    reference_pyramid_pool,
    segments_by_count,
    segments_by_time,
)

__all__ = [
    "Backend",
    "Segments",
    "fm_interaction",
    "jagged_attention",
    "pyramid_pool",
    "reference_fm_interaction",
    "reference_jagged_attention",
    "reference_pyramid_pool",
    "segments_by_count",
    "segments_by_time",
]
