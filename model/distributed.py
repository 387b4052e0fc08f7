"""TorchRec model parallelism for the trainer: one code path for 1 and N processes.

The trainer always wraps its model in TorchRec's ``DistributedModelParallel``
(DMP) -- with a process group of one when it is not launched by ``torchrun``
(an in-memory ``HashStore``) -- so the single-process daemon and the
``torchrun --nproc_per_node=N`` one run the same code and write the same
checkpoints:

* every embedding table is sharded **row-wise** or **table-wise** with TorchRec's
  *fused* kernel (fbgemm's table-batched embeddings, which also exist on CPU),
  never ``data_parallel``: the planner would otherwise replicate small tables;
  the tables are updated by a fused **row-wise Adagrad** inside the backward
  (``apply_optimizer_in_backward``), so no dense gradient of a table is ever
  materialized;
* everything else is data parallel (DMP wraps it in DDP) and trained by Adam.

Checkpoints hold only what a rank owns (:func:`local_state`): a sharded table
becomes its local shards keyed by their offsets, and :func:`load_local_state`
copies them back into a model sharded the same way (same world size).
Publication needs the whole model on one rank: :func:`full_state_dict`
gathers every shard on rank 0 into the state dict of the unsharded model.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    device: torch.device
    # True when this process created the group (single process) and must destroy it.
    owns_group: bool


def init_distributed(device: str | None = None) -> DistInfo:
    """Join torchrun's process group (env RANK / WORLD_SIZE), else make a group of one.

    Backend: NCCL on CUDA, gloo on CPU. ``device``: "cpu" | "cuda" | None (CUDA if available).
    """
    dev_type = device or ("cuda" if torch.cuda.is_available() else "cpu")
    backend = "nccl" if dev_type == "cuda" else "gloo"
    if dist.is_initialized():
        rank, ws, owns = dist.get_rank(), dist.get_world_size(), False
    elif "WORLD_SIZE" in os.environ and "RANK" in os.environ:
        dist.init_process_group(backend)
        rank, ws, owns = dist.get_rank(), dist.get_world_size(), True
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        rank, ws, owns = 0, 1, True
    if dev_type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    return DistInfo(rank=rank, world_size=ws, device=dev, owns_group=owns)


def shutdown_distributed(info: DistInfo) -> None:
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def _embedding_modules(model: nn.Module) -> list[nn.Module]:
    from torchrec import EmbeddingBagCollection, EmbeddingCollection

    return [m for m in model.modules() if isinstance(m, (EmbeddingBagCollection, EmbeddingCollection))]


def shard_model(model: nn.Module, info: DistInfo, *, emb_lr: float, emb_eps: float = 1e-8) -> nn.Module:
    """Wrap ``model`` (built on CPU or meta) in DMP with fused row-wise Adagrad on every table."""
    from torchrec.distributed import DistributedModelParallel
    from torchrec.distributed.model_parallel import DefaultDataParallelWrapper
    from torchrec.distributed.model_parallel import DefaultDataParallelWrapper
    from torchrec.distributed.embedding import EmbeddingCollectionSharder
    from torchrec.distributed.embedding_types import EmbeddingComputeKernel
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints
    from torchrec.distributed.planner.types import KernelConfig, TopologyFactory, TrainerConfig
    from torchrec.distributed.types import ShardingEnv, ShardingType
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
    from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

    tables = _embedding_modules(model)
    if not tables:
        raise ValueError(f"{type(model).__name__} has no TorchRec embedding collections to shard")
    apply_optimizer_in_backward(RowWiseAdagrad, [p for m in tables for p in m.parameters()],
                                {"lr": emb_lr, "eps": emb_eps})
    names = [c.name for m in tables
             for c in (m.embedding_bag_configs() if hasattr(m, "embedding_bag_configs") else m.embedding_configs())]
    constraints = {n: ParameterConstraints(
        sharding_types=[ShardingType.ROW_WISE.value, ShardingType.TABLE_WISE.value],
        compute_kernels=[EmbeddingComputeKernel.FUSED.value]) for n in names}
    topology = TopologyFactory.create_topology(
        trainer_config=TrainerConfig(world_size=info.world_size, local_world_size=info.world_size),
        kernel_config=KernelConfig(compute_device=info.device.type))
    sharders: list[Any] = [EmbeddingBagCollectionSharder(), EmbeddingCollectionSharder()]
    planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints)
    pg = dist.GroupMember.WORLD
    plan = planner.collective_plan(model, sharders, pg)
    # Not a static graph: a batch whose histories are all short leaves the pyramid's older
    # levels unused, so DDP must look for unused parameters every step.
    wrapper = DefaultDataParallelWrapper(static_graph=False, find_unused_parameters=True)
    return DistributedModelParallel(model, device=info.device, sharders=sharders, plan=plan,
                                    env=ShardingEnv.from_process_group(pg), data_parallel_wrapper=wrapper)


def make_optimizer(dmp: nn.Module, lr: float) -> Any:
    """The fused table optimizer combined with Adam over the dense (non-table) parameters."""
    from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    dense = dict(in_backward_optimizer_filter(dmp.named_parameters()))
    adam = KeyedOptimizerWrapper(dense, lambda ps: torch.optim.Adam(ps, lr=lr))
    return CombinedOptimizer([("fused", dmp.fused_optimizer), ("dense", adam)])  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- state


def _is_sharded(v: Any) -> bool:
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    return isinstance(v, ShardedTensor)


def _to_local(v: Any) -> Any:
    """Nested state -> the same with every ShardedTensor replaced by its local shards.

    A shard becomes ``{"shard_offsets": [...], "tensor": T}`` in a ``{"local_shards": [...]}``
    wrapper; everything stays loadable with ``torch.load(..., weights_only=True)``.
    """
    if _is_sharded(v):
        return {"local_shards": [{"shard_offsets": list(s.metadata.shard_offsets),
                                  "tensor": s.tensor.detach().cpu().clone()} for s in v.local_shards()]}
    if isinstance(v, torch.Tensor):
        return v.detach().cpu().clone()
    if isinstance(v, dict):
        return {k: _to_local(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return type(v)(_to_local(x) for x in v)
    return v


def _into(current: Any, saved: Any, where: str) -> Any:
    """Copy ``saved`` (from :func:`_to_local`) into ``current``'s tensors in place; returns the merged value."""
    if _is_sharded(current):
        if not (isinstance(saved, dict) and "local_shards" in saved):
            raise ValueError(f"{where}: checkpoint holds no shards for a sharded tensor")
        by_off = {tuple(s["shard_offsets"]): s["tensor"] for s in saved["local_shards"]}
        for s in current.local_shards():
            off = tuple(s.metadata.shard_offsets)
            if off not in by_off or by_off[off].shape != s.tensor.shape:
                raise ValueError(f"{where}: shard at {list(off)} {tuple(s.tensor.shape)} not in the checkpoint "
                                 "(was it written with another world size?)")
            s.tensor.detach().copy_(by_off[off])
        return current
    if isinstance(current, torch.Tensor):
        if not isinstance(saved, torch.Tensor) or saved.shape != current.shape:
            raise ValueError(f"{where}: shape {tuple(current.shape)} vs checkpoint "
                             f"{tuple(getattr(saved, 'shape', ()))}")
        current.detach().copy_(saved)
        return current
    if isinstance(current, dict):
        if not isinstance(saved, dict) or set(current) != set(saved):
            missing = set(current) ^ set(saved) if isinstance(saved, dict) else "all"
            raise ValueError(f"{where}: keys differ from the checkpoint: {sorted(map(str, missing))[:8]}")
        return {k: _into(current[k], saved[k], f"{where}.{k}") for k in current}
    return saved


def local_state(dmp: nn.Module, optimizer: Any) -> dict[str, Any]:
    """This rank's model and optimizer state, plain tensors only."""
    return {"model": _to_local(dmp.state_dict()), "optimizer": _to_local(optimizer.state_dict())}


def load_local_state(dmp: nn.Module, optimizer: Any, state: dict[str, Any]) -> None:
    """Inverse of :func:`local_state` on a model sharded with the same plan."""
    from torchrec.optim.keyed import CombinedOptimizer

    _into(dmp.state_dict(), state["model"], "model")
    # Adam's state is lazy: materialize it (a zero-gradient step leaves the weights
    # unchanged) so the checkpoint can be copied into it -- except for parameters that
    # had no gradient yet when it was written (a pyramid level only long histories
    # reach): those stay lazy, as in the run that wrote it.
    saved = state["optimizer"].get("state", {})
    for name, opt in optimizer.optimizers:
        if not opt.state:
            opt.init_state()
        for key, param in opt.params.items():
            if CombinedOptimizer.prepend_opt_key(key, name) not in saved:
                opt.state.pop(param, None)
    for p in dmp.parameters():
        p.grad = None
    current = optimizer.state_dict()
    optimizer.load_state_dict(_into(current, state["optimizer"], "optimizer"))


def full_state_dict(dmp: nn.Module, info: DistInfo) -> dict[str, torch.Tensor] | None:
    """The unsharded model's state dict on rank 0 (None elsewhere); a collective call."""
    out: dict[str, torch.Tensor] = {}
    for k, v in dmp.state_dict().items():
        if _is_sharded(v):
            if info.world_size == 1:
                full = torch.empty(v.size(), dtype=v.dtype)
                for s in v.local_shards():
                    idx = tuple(slice(o, o + n) for o, n in zip(s.metadata.shard_offsets, s.metadata.shard_sizes))
                    full[idx] = s.tensor.detach().cpu()
            else:
                full = torch.empty(v.size(), dtype=v.dtype, device=info.device) if info.rank == 0 else None
                v.gather(dst=0, out=full)
            if info.rank == 0:
                out[k] = full.cpu()  # type: ignore[union-attr]
        elif isinstance(v, torch.Tensor) and info.rank == 0:
            out[k] = v.detach().cpu().clone()
    return out if info.rank == 0 else None
