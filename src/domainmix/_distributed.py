"""Rank and world size resolution and the few collectives the library needs."""

from __future__ import annotations

import os
from collections.abc import Callable
from numbers import Integral

import torch
import torch.distributed as dist

from domainmix._validation import param_error


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def resolve_rank_world(caller: str, rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Explicit arguments first, then an initialised process group, then RANK/WORLD_SIZE, then (0, 1)."""
    origin = {"world_size": "", "rank": ""}  # where a value came from, for the error message
    if world_size is None:
        if is_distributed():
            world_size = dist.get_world_size()
        else:
            world_size, origin["world_size"] = _from_environment(caller, "world_size", "WORLD_SIZE", 1)
    if rank is None:
        if is_distributed():
            rank = dist.get_rank()
        else:
            rank, origin["rank"] = _from_environment(caller, "rank", "RANK", 0)
    if isinstance(world_size, bool) or not isinstance(world_size, Integral) or world_size < 1:
        raise param_error(
            caller, "world_size", "an int in the range [1, inf)" + origin["world_size"], world_size
        )
    if isinstance(rank, bool) or not isinstance(rank, Integral) or not 0 <= rank < world_size:
        wanted = f"an int in the range [0, {int(world_size) - 1}]{origin['rank']}{origin['world_size']}"
        raise param_error(caller, "rank", wanted, rank)
    return int(rank), int(world_size)  # numpy ints too, as plain ints (they go into JSON states)


def _from_environment(caller: str, name: str, variable: str, default: int) -> tuple[int, str]:
    """An environment variable's int (``default`` when unset) and a note naming it, for messages."""
    raw = os.environ.get(variable)
    if raw is None:
        return default, f" ({variable} unset: {default})"
    try:
        return int(raw), f" (read from the environment: {variable}={raw})"
    except ValueError:
        raise param_error(
            caller, name, f"an int (read from the environment variable {variable})", raw
        ) from None


def collective_device(tensor_device: torch.device, backend_config: str) -> torch.device | None:
    """Where a collective on a tensor of ``tensor_device`` must run, or None when it can run in place.

    ``backend_config`` is ``torch.distributed.get_backend_config()``, e.g. ``"cpu:gloo,cuda:nccl"``. A
    group started with ``"nccl"`` serves CUDA tensors only (``"cuda:nccl"``), while the statistics and
    the weights are small CPU tensors: they go through the current CUDA device.
    """
    served = [part.split(":")[0].strip() for part in backend_config.split(",") if ":" in part]
    if not served or tensor_device.type in served:
        return None
    # No index: .to("cuda") means the current device, the one this rank's process group uses.
    return torch.device("cuda" if "cuda" in served else served[0])


def _in_place(tensor: torch.Tensor, collective: Callable[[torch.Tensor], object]) -> None:
    """Run ``collective`` on ``tensor`` in place, through a copy where the group does not serve its device."""
    device = collective_device(tensor.device, dist.get_backend_config())
    if device is None:
        collective(tensor)
        return
    moved = tensor.to(device)
    collective(moved)
    tensor.copy_(moved)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` across ranks in place when a process group is up; a no-op otherwise."""
    if is_distributed() and dist.get_world_size() > 1:
        # gloo has no float64 reduce on every build path; reduce in the tensor's own dtype on its device.
        _in_place(tensor, lambda t: dist.all_reduce(t, op=dist.ReduceOp.SUM))
    return tensor


def broadcast_from_zero(tensor: torch.Tensor) -> torch.Tensor:
    """Overwrite ``tensor`` in place with rank 0's copy when a process group is up; a no-op otherwise."""
    if is_distributed() and dist.get_world_size() > 1:
        _in_place(tensor, lambda t: dist.broadcast(t, src=0))
    return tensor


def assert_same_on_all_ranks(name: str, tensor: torch.Tensor, atol: float = 0.0) -> None:
    """Debug check: raise if ``tensor`` differs between ranks (compares against rank 0's copy)."""
    if not (is_distributed() and dist.get_world_size() > 1):
        return
    reference = broadcast_from_zero(tensor.detach().clone())
    if not torch.allclose(reference, tensor.detach(), atol=atol, rtol=0.0):
        raise RuntimeError(
            f"{name} differs across ranks: rank {dist.get_rank()} has {tensor.tolist()}, "
            f"rank 0 has {reference.tolist()}. Every rank must see the same statistics and strategy state."
        )
