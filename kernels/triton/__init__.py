"""Triton kernels behind :mod:`opengem.kernels`; importing a module here imports triton.

Reach them through the entry points in :mod:`opengem.kernels`, which check
inputs, pick the backend and keep the PyTorch reference next to each op.
"""
