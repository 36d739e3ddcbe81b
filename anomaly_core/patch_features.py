"""Locally aware patch embeddings, as in PatchCore (Roth et al. 2022) and patchcore-inspection.

Each feature-map position is described by its 3x3 neighbourhood (so a patch sees a little context),
deeper layers are bilinearly upsampled to the grid of the first (shallowest) layer, every layer is
pooled to ``pretrain_dim`` and the concatenation pooled to ``target_dim``. Pooling (not a learned or
random projection) keeps the embedding deterministic and free of parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class PatchEmbedder:
    patch_size: int = 3
    pretrain_dim: int = 1024
    target_dim: int = 1024
    stride: int = 1  # between neighbourhood centres, as patchcore-inspection's PatchMaker

    def __post_init__(self) -> None:
        if self.patch_size < 1 or self.patch_size % 2 == 0:
            raise ValueError(f"patch_size must be a positive odd number, got {self.patch_size}")
        if self.stride < 1:
            raise ValueError(f"patch stride must be >= 1, got {self.stride}")
        if self.pretrain_dim < 1 or self.target_dim < 1:
            raise ValueError(f"pretrain_dim and target_dim must be positive, got {self.pretrain_dim}, {self.target_dim}")

    def _neighbourhoods(self, feature_map: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, H', W', C, p, p]: every ``stride``-th position with its p x p neighbourhood."""
        batch, channels, height, width = feature_map.shape
        pad = self.patch_size // 2
        unfolded = F.unfold(feature_map, kernel_size=self.patch_size, padding=pad, stride=self.stride)
        height, width = ((side + 2 * pad - self.patch_size) // self.stride + 1 for side in (height, width))
        unfolded = unfolded.reshape(batch, channels, self.patch_size, self.patch_size, height, width)
        return unfolded.permute(0, 4, 5, 1, 2, 3)

    def _resize_neighbourhoods(self, patches: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Bilinearly upsample a deeper layer's neighbourhood grid onto the reference grid."""
        batch, height, width = patches.shape[:3]
        if (height, width) == grid:
            return patches
        tail = patches.shape[3:]
        planes = patches.permute(0, 3, 4, 5, 1, 2).reshape(-1, 1, height, width)
        planes = F.interpolate(planes, size=grid, mode="bilinear", align_corners=False)
        planes = planes.reshape(batch, *tail, *grid)
        return planes.permute(0, 4, 5, 1, 2, 3)

    @torch.inference_mode()
    def __call__(self, feature_maps: list[torch.Tensor]) -> tuple[torch.Tensor, tuple[int, int]]:
        """Feature maps of one batch -> ([B * H * W, target_dim] float32 embeddings, (H, W) grid)."""
        reference = self._neighbourhoods(feature_maps[0].float())
        grid = tuple(reference.shape[1:3])
        per_layer = []
        for position, feature_map in enumerate(feature_maps):
            patches = reference if position == 0 else self._neighbourhoods(feature_map.float())
            patches = self._resize_neighbourhoods(patches, grid)
            flat = patches.reshape(-1, 1, patches[0, 0, 0].numel())
            per_layer.append(F.adaptive_avg_pool1d(flat, self.pretrain_dim).squeeze(1))
        stacked = torch.stack(per_layer, dim=1).reshape(per_layer[0].shape[0], 1, -1)
        embeddings = F.adaptive_avg_pool1d(stacked, self.target_dim).squeeze(1)
        return embeddings.contiguous(), grid


@dataclass(frozen=True)
class ConcatEmbedder:
    """PaDiM's embedding (xiahaifeng1995 ``embedding_concat``; anomalib ``PadimModel.generate_embedding``): the
    deeper layers' maps brought to the first layer's grid by nearest-neighbour upsampling, all concatenated
    along the channels, then the channels ``indices`` kept in that order (``padim.channel_subset``). No
    neighbourhood, no pooling: PaDiM models each position's raw CNN features."""

    indices: tuple[int, ...]

    @torch.inference_mode()
    def __call__(self, feature_maps: list[torch.Tensor]) -> tuple[torch.Tensor, tuple[int, int]]:
        """Feature maps of one batch -> ([B * H * W, len(indices)] float32 embeddings, (H, W) grid)."""
        reference = feature_maps[0].float()
        grid = tuple(reference.shape[-2:])
        layers = [reference, *(F.interpolate(m.float(), size=grid, mode="nearest") for m in feature_maps[1:])]
        chosen = torch.cat(layers, dim=1).index_select(1, torch.as_tensor(self.indices, device=reference.device))
        return chosen.permute(0, 2, 3, 1).reshape(-1, len(self.indices)).contiguous(), grid
