"""Rank and world size resolution and the few collectives the library needs."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from domainmix._validation import param_error


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def resolve_rank_world(caller: str, rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Explicit arguments first, then an initialised process group, then RANK/WORLD_SIZE, then (0, 1)."""
    if world_size is None:
        if is_distributed():
            world_size = dist.get_world_size()
        else:
            world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if rank is None:
        if is_distributed():
            rank = dist.get_rank()
        else:
            rank = int(os.environ.get("RANK", "0"))
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise param_error(caller, "world_size", "an int in the range [1, inf)", world_size)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise param_error(caller, "rank", f"an int in the range [0, {world_size - 1}]", rank)
    return rank, world_size


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` across ranks in place when a process group is up; a no-op otherwise."""
    if is_distributed() and dist.get_world_size() > 1:
        # gloo has no float64 reduce on every build path; reduce in the tensor's own dtype on its device.
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_from_zero(tensor: torch.Tensor) -> torch.Tensor:
    """Overwrite ``tensor`` in place with rank 0's copy when a process group is up; a no-op otherwise."""
    if is_distributed() and dist.get_world_size() > 1:
        dist.broadcast(tensor, src=0)
    return tensor


def assert_same_on_all_ranks(name: str, tensor: torch.Tensor, atol: float = 0.0) -> None:
    """Debug check: raise if ``tensor`` differs between ranks (compares against rank 0's copy)."""
    if not (is_distributed() and dist.get_world_size() > 1):
        return
    reference = tensor.detach().clone()
    dist.broadcast(reference, src=0)
    if not torch.allclose(reference, tensor.detach(), atol=atol, rtol=0.0):
        raise RuntimeError(
            f"{name} differs across ranks: rank {dist.get_rank()} has {tensor.tolist()}, "
            f"rank 0 has {reference.tolist()}. Every rank must see the same statistics and strategy state."
        )
