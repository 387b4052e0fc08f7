"""Baselines in GemModel's batch and API (forward -> impression logits, predict, loss).

* :class:`DLRMBaseline` -- TorchRec's ``DLRM`` (dense MLP, pairwise dot
  interaction, over arch) on the non-sequence ids and dense features.
* :class:`DCNBaseline` -- TorchRec's ``DLRM_DCN``: the same with a DCNv2
  low-rank cross network instead of the dot interaction.
* GEM on the last 50 events is a config: ``GemModel(gem_last_n(cfg, 50))``.

Both emit funnel stage logits (click | impression, conversion | click) and
share the ESMM composition of :mod:`opengem.model.heads`, so every model is
scored the same way. Neither reads the history nor the surface (no
per-surface heads: a single multi-task output, as in the papers).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.models.dlrm import DLRM, DLRM_DCN
from torchrec.modules.embedding_configs import PoolingType

from opengem.model.batch import N_DENSE, NONSEQ_KEYS, TABLE_OF, FeatureConfig, GemBatch
from opengem.model.heads import FunnelRanker


@dataclass(frozen=True)
class BaselineConfig:
    features: FeatureConfig = FeatureConfig()
    # Embedding dim = last dense-arch layer (DLRM's dot interaction needs equal dims).
    d: int = 32
    dense_arch: tuple[int, ...] = (64,)
    over_arch: tuple[int, ...] = (128, 64)
    # DCNv2 cross layers and the rank of their low-rank weights.
    dcn_layers: int = 3
    dcn_rank: int = 16


def _ebc(cfg: BaselineConfig, device: torch.device | None) -> EmbeddingBagCollection:
    fc = cfg.features
    return EmbeddingBagCollection(tables=[
        EmbeddingBagConfig(name=TABLE_OF[k], embedding_dim=cfg.d, num_embeddings=fc.rows(TABLE_OF[k]),
                           feature_names=[k], pooling=PoolingType.SUM) for k in NONSEQ_KEYS
    ], device=device or torch.device("cpu"))


class _Ranker(FunnelRanker):
    """The funnel API on top of ``self.net(dense, kjt) -> stage logits (B, T)``."""

    net: nn.Module

    def raw_logits(self, batch: GemBatch) -> torch.Tensor:
        return self.net(batch.dense, batch.sparse)


class DLRMBaseline(_Ranker):
    def __init__(self, cfg: BaselineConfig = BaselineConfig(), device: torch.device | None = None):
        super().__init__()
        self.cfg = cfg
        n_tasks = len(cfg.features.tasks)
        self.net = DLRM(
            embedding_bag_collection=_ebc(cfg, device), dense_in_features=N_DENSE,
            dense_arch_layer_sizes=list(cfg.dense_arch) + [cfg.d],
            over_arch_layer_sizes=list(cfg.over_arch) + [n_tasks],
        )


class DCNBaseline(_Ranker):
    def __init__(self, cfg: BaselineConfig = BaselineConfig(), device: torch.device | None = None):
        super().__init__()
        self.cfg = cfg
        n_tasks = len(cfg.features.tasks)
        self.net = DLRM_DCN(
            embedding_bag_collection=_ebc(cfg, device), dense_in_features=N_DENSE,
            dense_arch_layer_sizes=list(cfg.dense_arch) + [cfg.d],
            over_arch_layer_sizes=list(cfg.over_arch) + [n_tasks],
            dcn_num_layers=cfg.dcn_layers, dcn_low_rank_dim=cfg.dcn_rank,
        )
