"""Multi-process training with torch DistributedDataParallel (launched by ``torchrun``).

``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; without them
everything here is a no-op and training runs in one process. Every rank loads the (small) model-grid volumes,
takes its own share of each epoch's batches, and DDP averages the gradients; validation runs identically on
every rank so that early stopping agrees; only rank 0 writes files. The backend is NCCL on CUDA and gloo on
CPU (used by the tests: two CPU processes).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in a distributed run.

    Examples:
        >>> ctx = DistContext()
        >>> ctx.is_main, ctx.is_distributed
        (True, False)
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def env_world_size() -> int:
    """``WORLD_SIZE`` set by torchrun (1 without it)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def init_distributed(device: str = "cpu") -> tuple[DistContext, torch.device]:
    """Join the process group started by torchrun (if any) and pick this rank's device.

    Args:
        device: the run's ``--device`` (``cpu``, ``cuda`` or ``cuda:N``); under torchrun with CUDA each rank
            uses ``cuda:LOCAL_RANK``.

    Returns:
        ``(context, torch device)``.
    """
    world = env_world_size()
    use_cuda = str(device).startswith("cuda") and torch.cuda.is_available()
    if world <= 1:
        return DistContext(), torch.device(device)
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    ctx = DistContext(rank=rank, world_size=world, local_rank=local_rank, backend=backend)
    return ctx, torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")


def wrap_model(model: nn.Module, ctx: DistContext, device: torch.device) -> nn.Module:
    """The model on ``device``, wrapped in DDP when distributed (batch norm synchronised across GPUs)."""
    model = model.to(device)
    if not ctx.is_distributed:
        return model
    if device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return nn.parallel.DistributedDataParallel(model, device_ids=[device.index])
    return nn.parallel.DistributedDataParallel(model)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside its training wrappers (DDP; a wrapper that sets ``unwrap_to_module``, such as the
    ``torch.compile`` fallback of :mod:`bids_siamese.train.loop`), or the model itself."""
    while isinstance(model, nn.parallel.DistributedDataParallel) or getattr(model, "unwrap_to_module", False):
        model = model.module
    return model


def shard(items: Sequence[T], ctx: DistContext) -> list[T]:
    """This rank's share of an epoch's batches; every rank gets the same number (DDP needs lockstep).

    Examples:
        >>> shard(list("abcde"), DistContext(rank=1, world_size=2))
        ['b', 'd']
        >>> shard(["a"], DistContext(rank=1, world_size=2))
        ['a']
    """
    items = list(items)
    if not ctx.is_distributed or not items:
        return items
    if len(items) < ctx.world_size:
        return [items[ctx.rank % len(items)]]
    per_rank = len(items) // ctx.world_size
    return items[ctx.rank::ctx.world_size][:per_rank]


def all_reduce_mean(value: float, ctx: DistContext) -> float:
    """Mean of a scalar over ranks (the value itself when not distributed)."""
    if not ctx.is_distributed:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64)
    if ctx.backend == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item()) / ctx.world_size


def broadcast_object(obj: Any, ctx: DistContext) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not ctx.is_distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(ctx: DistContext) -> None:
    """Wait for all ranks."""
    if ctx.is_distributed:
        dist.barrier()


def cleanup(ctx: DistContext) -> None:
    """Leave the process group."""
    if ctx.is_distributed and dist.is_initialized():
        dist.destroy_process_group()
