"""Optimizers for an unsharded model (evaluation harness, tests, notebooks).

The same split as the trainer's sharded path (:mod:`opengem.model.distributed`):
embedding tables get Adagrad -- rows are touched sparsely, and a per-element
accumulator gives a rarely seen id a large first step -- at a higher rate
(``emb_lr``), everything else Adam. The trainer fuses the table update into
the backward with fbgemm's row-wise Adagrad; here it is plain
``torch.optim.Adagrad`` (element-wise), close enough for offline comparison.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingCollection


def table_params(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of every TorchRec embedding table in ``model``."""
    tables = [m for m in model.modules() if isinstance(m, (EmbeddingBagCollection, EmbeddingCollection))]
    return [p for m in tables for p in m.parameters()]


class SplitOptimizer:
    """Adam on the dense parameters, Adagrad on the tables; one ``step`` / ``zero_grad``."""

    def __init__(self, model: nn.Module, lr: float = 1e-3, emb_lr: float = 0.05):
        tables = table_params(model)
        ids = {id(p) for p in tables}
        dense = [p for p in model.parameters() if id(p) not in ids]
        self.optimizers: list[torch.optim.Optimizer] = [torch.optim.Adam(dense, lr=lr)]
        if tables:
            self.optimizers.append(torch.optim.Adagrad(tables, lr=emb_lr))

    def zero_grad(self) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=True)

    def step(self) -> None:
        for o in self.optimizers:
            o.step()
