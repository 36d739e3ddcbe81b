"""Which images form each mini-batch, and which share of a batch each DDP rank trains on.

The order of an epoch is drawn from a generator seeded with (seed, epoch) alone, never from the global
RNG, so a run resumed at epoch e sees exactly the batches an uninterrupted run would. Ranks split every
global batch into equal, disjoint, contiguous slices: the global batch size, not the per-rank one, is
the hyper-parameter, and the mean of the ranks' batch losses is the global batch's loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from anomaly_core.seeding import derive_seed


@dataclass(frozen=True)
class EpochPlan:
    n_images: int
    batch_size: int  # global: across all ranks
    drop_last: bool
    world_size: int = 1

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.world_size < 1:
            raise ValueError(f"batch_size and world_size must be >= 1, got {self.batch_size} and {self.world_size}")
        if self.batch_size % self.world_size:
            raise ValueError(f"batch_size={self.batch_size} does not split equally across {self.world_size} ranks; "
                             f"use a multiple of {self.world_size}")
        if self.steps_per_epoch == 0:
            raise ValueError(f"{self.n_images} training images make no batch of {self.batch_size} "
                             f"(drop_last={self.drop_last})")
        last = self.n_images % self.batch_size
        if last and not self.drop_last and last % self.world_size:
            raise ValueError(f"the last batch of each epoch holds {last} images ({self.n_images} % {self.batch_size}), "
                             f"which {self.world_size} ranks cannot share equally; set drop_last or change batch_size")

    @property
    def steps_per_epoch(self) -> int:
        full, rest = divmod(self.n_images, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def global_batches(self, seed: int, epoch: int) -> list[torch.Tensor]:
        """Image indices of each global batch of ``epoch``, shuffled by (seed, epoch)."""
        generator = torch.Generator().manual_seed(derive_seed(seed, "batch-order", str(epoch)))
        order = torch.randperm(self.n_images, generator=generator)
        return list(order.split(self.batch_size))[: self.steps_per_epoch]

    def rank_batches(self, seed: int, epoch: int, rank: int) -> list[torch.Tensor]:
        """``rank``'s slice of every global batch of ``epoch``."""
        slices = []
        for batch in self.global_batches(seed, epoch):
            share = len(batch) // self.world_size
            slices.append(batch[rank * share : (rank + 1) * share])
        return slices
