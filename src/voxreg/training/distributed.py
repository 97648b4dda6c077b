"""DistributedDataParallel plumbing of the training loop: join/leave the ``torchrun``
process group (gloo on CPU, NCCL on CUDA), make every rank agree on stopping, and gather
every rank's data-sampling RNG state for the checkpoint."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from voxreg.core.runtime import resolve_device

__all__ = ["Dist", "any_rank", "barrier", "gather_rng", "init_distributed", "teardown"]


@dataclass
class Dist:
    """Where this process stands in a ``torchrun`` job (rank 0 of 1 without one)."""

    rank: int = 0
    world: int = 1
    owner: bool = False  # this call initialised the process group (and tears it down)

    @property
    def main(self) -> bool:
        """Rank 0 writes checkpoints, metrics and validates."""
        return self.rank == 0


def init_distributed(device_name: str) -> tuple[Dist, torch.device]:
    """Join the process group when launched by ``torchrun`` (WORLD_SIZE > 1): gloo on CPU,
    NCCL on CUDA (one GPU per local rank). Returns the rank info and this rank's device."""
    device = resolve_device(device_name)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), device
    import torch.distributed as dist

    rank = int(os.environ.get("RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
        torch.cuda.set_device(device)
    owner = not dist.is_initialized()
    if owner:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    return Dist(rank, world, owner), device


def any_rank(flag: bool, ctx: Dist, device: torch.device) -> bool:
    """True when ``flag`` is set on any rank (so that every rank stops at the same step)."""
    if ctx.world == 1:
        return flag
    import torch.distributed as dist

    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def gather_rng(generator: torch.Generator, ctx: Dist) -> list[Tensor]:
    """Every rank's data-sampling RNG state (collective call under DDP)."""
    state = generator.get_state()
    if ctx.world == 1:
        return [state]
    import torch.distributed as dist

    states: list[Any] = [None] * ctx.world
    dist.all_gather_object(states, state)
    return states


def barrier(ctx: Dist) -> None:
    """Wait until every rank gets here (no-op in a single process)."""
    if ctx.world > 1:
        import torch.distributed as dist

        dist.barrier()


def teardown(ctx: Dist) -> None:
    """Destroy the process group when this process created it."""
    if ctx.owner:
        import torch.distributed as dist

        dist.destroy_process_group()
