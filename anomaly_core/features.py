"""Patch features of a set of images, keyed by sample index, and the points the coreset runs on.

Kept apart from the backbone code (numpy only), so the processes that merely hold or move features —
coreset holders, evaluators — start without importing timm.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from anomaly_core.coreset import random_projection


@dataclass
class PatchFeatures:
    """Patch embeddings of a set of images, keyed by their index in the category's sample list."""

    embeddings: np.ndarray  # [n_images, h * w, D]; a torch tensor on its GPU where kept there (cluster.colocated)
    grid: tuple[int, int]
    sample_indices: np.ndarray  # [n_images] int64
    seconds: float = 0.0  # time spent producing them (for throughput reports)
    stages: dict[str, float] = field(default_factory=dict)  # seconds per extraction stage (extraction.STAGES)

    @property
    def on_host(self) -> bool:
        return isinstance(self.embeddings, np.ndarray)

    def flat(self) -> np.ndarray:
        """[n_images * h * w, D] float32 in sample-index order (the order the coreset sees), where the
        embeddings are (a host array, or a tensor on their device)."""
        if not self.on_host:
            return self.embeddings.reshape(-1, self.embeddings.shape[-1]).float().contiguous()
        return np.ascontiguousarray(self.embeddings.reshape(-1, self.embeddings.shape[-1]), dtype=np.float32)

    def to_host(self) -> "PatchFeatures":
        """These features with their embeddings in host memory (a copy only where they are on a device)."""
        if self.on_host:
            return self
        return PatchFeatures(self.embeddings.cpu().numpy(), self.grid, self.sample_indices, self.seconds, self.stages)


def merge_features(parts: Sequence[PatchFeatures]) -> PatchFeatures:
    """Concatenate shards sorted by sample index: the result is independent of completion order."""
    if not parts:
        raise ValueError("no feature shards to merge")
    grids = {part.grid for part in parts}
    if len(grids) != 1:
        raise ValueError(f"feature shards disagree on the patch grid: {sorted(grids)}")
    indices = np.concatenate([part.sample_indices for part in parts])
    order = np.argsort(indices, kind="stable")
    if len(np.unique(indices)) != len(indices):
        raise ValueError("feature shards overlap: a sample index appears twice")
    embeddings = np.concatenate([part.embeddings for part in parts])[order]
    seconds = sum(part.seconds for part in parts)
    names = dict.fromkeys(stage for part in parts for stage in part.stages)
    stages = {stage: sum(part.stages.get(stage, 0.0) for part in parts) for stage in names}
    return PatchFeatures(embeddings=embeddings, grid=parts[0].grid, sample_indices=indices[order], seconds=seconds,
                         stages=stages)


def coreset_points(features: PatchFeatures, method: str, projection_dim: int, seed: int, threads: int = 1) -> np.ndarray:
    """The points greedy runs on: the patches, or (approximate) their seeded random projection.

    The projection is applied image by image (on ``threads`` one-thread workers) so that every matrix
    product has the same shape wherever an image lives: a coreset holder with a few images and a single
    process with all of them get bit-identical points (BLAS blocking can otherwise change last bits with
    the shape).
    """
    if method != "approximate":
        return features.flat()
    features = features.to_host()  # the seeded projection is numpy's (the same points on every device)
    return random_projection(features.flat(), projection_dim, seed, threads, rows=features.embeddings.shape[1])


def coverage_radius_space(method: str, projection_dim: int) -> str:
    """Where a coreset's recorded coverage radius was measured (it is only comparable within one space)."""
    if method == "approximate":
        return f"random projection to {projection_dim} dims (not comparable with feature-space distances)"
    return "feature space"
