"""The few torch.distributed facts the Trainer needs, all answering sensibly in a single process.

Ray Train's ``TorchTrainer`` initialises the process group (gloo on CPU workers, NCCL on GPU workers)
before the training function runs; the engine only asks whether one exists, and never starts one itself.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def rank_and_world_size() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def world_size() -> int:
    return rank_and_world_size()[1]


def collective_device(backend: str, device: torch.device | str) -> torch.device:
    """Where a collective's tensors must be: NCCL reduces CUDA tensors only (the rank's own ``device``);
    gloo and the others take CPU tensors."""
    return torch.device(device) if backend == "nccl" else torch.device("cpu")


def mean_over_ranks(values: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """The element-wise mean of ``values`` over all ranks (the values themselves in a single process),
    reduced on ``collective_device`` (``device`` is the rank's training device) and returned where
    ``values`` were."""
    size = world_size()
    if size == 1:
        return values
    total = values.detach().to(collective_device(dist.get_backend(), device), copy=True)
    dist.all_reduce(total)
    return (total / size).to(values.device)


def from_rank_zero(values: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """Rank 0's ``values`` on every rank: decisions only rank 0 can take (it alone validates) reach all.
    Sent as in ``mean_over_ranks``."""
    if world_size() == 1:
        return values
    shared = values.detach().to(collective_device(dist.get_backend(), device), copy=True)
    dist.broadcast(shared, src=0)
    return shared.to(values.device)
