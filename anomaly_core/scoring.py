"""kNN patch scoring against a memory bank, image scores and anomaly maps.

faiss finds the neighbours; the distances that become scores are then recomputed row by row in
numpy, so a patch's score depends only on the patch and the bank — not on how many other patches
were searched with it, on BLAS blocking or on thread counts. That keeps predictions bit-identical
however the test set is sharded across evaluation actors.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter


def row_distances(queries: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Euclidean distances between queries [n, D] and rows [n, k, D] (or [n, D]) in a fixed order."""
    diff = queries[:, None, :] - rows if rows.ndim == 3 else queries - rows
    return np.sqrt(np.einsum("...d,...d->...", diff, diff, dtype=np.float64))


@dataclass(frozen=True)
class ScoringParams:
    k: int = 1  # neighbours averaged into a patch score (PatchCore: 1)
    reweight_neighbours: int = 0  # b of the paper's eq. 7; 0 = image score is the plain max
    blur_sigma: float = 4.0

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"scoring.k must be >= 1, got {self.k}")
        if self.reweight_neighbours < 0 or self.reweight_neighbours == 1:
            raise ValueError(f"scoring.reweight_neighbours must be 0 or >= 2, got {self.reweight_neighbours}")
        if self.blur_sigma < 0:
            raise ValueError(f"scoring.blur_sigma must be >= 0, got {self.blur_sigma}")


class NearestNeighbourScorer:
    """Holds a faiss index over one memory bank and scores patch embeddings against it."""

    def __init__(self, bank: np.ndarray, params: ScoringParams) -> None:
        if bank.ndim != 2 or len(bank) == 0:
            raise ValueError(f"memory bank must be a non-empty [M, D] array, got shape {bank.shape}")
        if params.k > len(bank):
            raise ValueError(f"scoring.k={params.k} exceeds the memory bank size {len(bank)}")
        self.bank = np.ascontiguousarray(bank, dtype=np.float32)
        self.params = params
        self.index = faiss.IndexFlatL2(self.bank.shape[1])
        self.index.add(self.bank)

    def nearest(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(distances [n, k] float64, bank indices [n, k]) of each query's k nearest bank rows."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        _, indices = self.index.search(queries, k)
        return row_distances(queries, self.bank[indices]), indices

    def patch_scores(self, embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-patch anomaly scores (mean distance to the k nearest bank rows) and nearest indices."""
        distances, indices = self.nearest(embeddings, self.params.k)
        return distances.mean(axis=1), indices[:, 0]

    def image_score(self, embeddings: np.ndarray, scores: np.ndarray, nearest: np.ndarray) -> float:
        """Max patch score, optionally re-weighted by how isolated its neighbour is (paper eq. 7)."""
        top = int(np.argmax(scores))
        score = float(scores[top])
        b = self.params.reweight_neighbours
        if b == 0:
            return score
        anchor = self.bank[nearest[top]][None]
        _, support = self.index.search(anchor, min(b, len(self.bank)))
        distances = row_distances(embeddings[top][None], self.bank[support])[0]
        weights = np.exp(distances - distances.max())
        return float((1.0 - weights[0] / weights.sum()) * score)


def anomaly_map(patch_scores: np.ndarray, grid: tuple[int, int], size: int, sigma: float) -> np.ndarray:
    """Patch-score grid -> [size, size] float32 map: bilinear upsampling, then gaussian blur."""
    scores = torch.from_numpy(np.ascontiguousarray(patch_scores, dtype=np.float32)).reshape(1, 1, *grid)
    upsampled = F.interpolate(scores, size=(size, size), mode="bilinear", align_corners=False)[0, 0].numpy()
    return gaussian_filter(upsampled, sigma=sigma).astype(np.float32) if sigma > 0 else upsampled
