"""Data-parallel training through PyTorch's own engine (torchrun + DistributedDataParallel).

``torchrun --nproc_per_node=N -m pipelines.distill ...`` sets RANK/WORLD_SIZE/LOCAL_RANK;
:func:`init_distributed` then joins the group (gloo on CPU, NCCL on CUDA). Each rank
takes its shard of the batch index stream (per-rank batch = global batch / N), metrics
are summed across ranks, and rank 0 alone logs to MLflow and writes checkpoints.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from asib_core.config.errors import ConfigError


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return tensor
        out = tensor.clone().to(torch.float64)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def average_gradients(self, params) -> None:
        """Replace each parameter's gradient by its mean over the ranks (what DDP does for
        the modules it wraps; used for modules trained outside the DDP module, such as ASIB's
        A-step). A parameter without a gradient on this rank contributes zeros, so every rank
        makes the same collective calls."""
        if not self.enabled:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(self.world_size)

    def broadcast_states(self, modules, buffers_only: bool = False) -> None:
        """Copy rank 0's parameters and buffers (only buffers with ``buffers_only``) of
        ``modules`` to every rank."""
        if not self.enabled:
            return
        for module in modules:
            tensors = [] if buffers_only else [p.data for p in module.parameters()]
            for tensor in tensors + list(module.buffers()):
                dist.broadcast(tensor, src=0)

    def broadcast_object(self, obj):
        if not self.enabled:
            return obj
        holder = [obj]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]


def init_distributed() -> DistContext:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistContext(rank=rank, world_size=world, local_rank=local)


def per_rank_batch(global_batch: int, ctx: DistContext) -> int:
    if global_batch % ctx.world_size:
        raise ConfigError(
            f"dataset.batch_size={global_batch} is not divisible by the {ctx.world_size} "
            "processes; choose a global batch size that is a multiple of nproc."
        )
    return global_batch // ctx.world_size


def shutdown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()
