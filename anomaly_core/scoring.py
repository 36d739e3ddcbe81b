"""kNN patch scoring against a memory bank, image scores and anomaly maps.

Neighbours come from :class:`ExactKnn`: a matrix-product screen on the scorer's device, then the
exact formula, so a patch's score depends only on the patch and the bank — not on how many other
patches were searched with it, on BLAS blocking, thread counts, the device or the screen's precision.
That keeps predictions bit-identical however the test set is sharded across evaluation actors. Patch
embeddings may be tensors on the scorer's device (extracted there): the search, the cosine
normalisation and the re-weighting's neighbours stay there, and only [n, P] patch scores (and per-image
values) come to the host, where the anomaly maps are made. AnomalyDINO's background mask
(``ScoringParams.background_mask``) needs each image's own patches on the host: they come down one image
at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from anomaly_core.data.anomalydino import AnomalyDinoPreprocess, background_mask, mask_patch_scores
from anomaly_core.distances import MatrixDevice, array_ops, distances, sq_distances
from anomaly_core.features import PatchFeatures
from anomaly_core.knn import ExactKnn
from anomaly_core.threads import run_blocks


@dataclass(frozen=True)
class ScoringParams:
    k: int = 1  # neighbours averaged into a patch score (PatchCore: 1)
    reweight_neighbours: int = 0  # b of the paper's eq. 7; 0 = image score is the plain max
    blur_sigma: float = 4.0
    # euclidean: PatchCore's L2 distance. cosine: AnomalyDINO's 1 - cos(q, m), computed as ||q̂ - m̂||² / 2
    # on unit-length rows, so the same exact kNN serves both.
    distance: str = "euclidean"
    # max: PatchCore's image score. mean_top_percent: mean of the top ``top_percent`` % patch scores
    # (AnomalyDINO: 1 %), at least one patch.
    image_score: str = "max"
    top_percent: float = 1.0
    # AnomalyDINO's PCA background mask (its ``masking`` on): test patches off the object score 0 before the
    # image score and the maps. None: every patch counts.
    background_mask: AnomalyDinoPreprocess | None = None

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"scoring.k must be >= 1, got {self.k}")
        if self.reweight_neighbours < 0 or self.reweight_neighbours == 1:
            raise ValueError(f"scoring.reweight_neighbours must be 0 or >= 2, got {self.reweight_neighbours}")
        if self.blur_sigma < 0:
            raise ValueError(f"scoring.blur_sigma must be >= 0, got {self.blur_sigma}")
        if self.distance not in ("euclidean", "cosine"):
            raise ValueError(f"scoring.distance must be euclidean or cosine, got {self.distance!r}")
        if self.image_score not in ("max", "mean_top_percent"):
            raise ValueError(f"scoring.image_score must be max or mean_top_percent, got {self.image_score!r}")
        if not 0 < self.top_percent <= 100:
            raise ValueError(f"scoring.top_percent must be in (0, 100], got {self.top_percent}")
        if self.reweight_neighbours and self.image_score != "max":
            raise ValueError("scoring.reweight_neighbours re-weights the max patch score: it needs image_score=max")
        if self.background_mask is not None and not self.background_mask.masking:
            raise ValueError("ScoringParams.background_mask is for categories with anomalydino masking on")

    def scorer(self, bank: Any, device: MatrixDevice | None = None, threads: int = 1) -> "NearestNeighbourScorer":
        """The scorer of a bank's rows (``MemoryBank.scoring_payload``) with these parameters; PaDiM's scoring
        builds its own (``padim.PadimScoring``), so evaluation actors never ask which method they score."""
        return NearestNeighbourScorer(bank, self, device, threads)


def unit_rows(rows: Any) -> Any:
    """Rows (numpy or a tensor, kept on its device) scaled to unit length in float32; zero rows stay zero.

    Each row from its own values only (shard-independent) and the same bits on every device: its norm by
    the exact formula (:func:`sq_distances`; the square root on the host, correctly rounded), then one IEEE
    float64 division and one rounding to float32.
    """
    ops = array_ops(rows)
    rows = ops.cast(rows, ops.float32)
    norms = np.maximum(np.sqrt(ops.to_numpy(sq_distances(rows))), 1e-12)
    return ops.cast(ops.cast(rows, ops.float64) / ops.asarray(norms, ops.float64)[:, None], ops.float32)


class NearestNeighbourScorer:
    """Holds one memory bank (on its device) and scores patch embeddings against it."""

    def __init__(
        self, bank: Any, params: ScoringParams, device: MatrixDevice | None = None, threads: int = 1,
    ) -> None:
        """``bank``: numpy or a tensor. ``threads``: one-thread workers that build the bank's screen."""
        if bank.ndim != 2 or len(bank) == 0:
            raise ValueError(f"memory bank must be a non-empty [M, D] array, got shape {tuple(bank.shape)}")
        if params.k > len(bank):
            raise ValueError(f"scoring.k={params.k} exceeds the memory bank size {len(bank)}")
        self.cosine = params.distance == "cosine"
        self.knn = ExactKnn(unit_rows(bank) if self.cosine else bank, device, threads=threads)
        self.bank = self.knn.bank  # on the device
        self.params = params

    def patch_scores(self, embeddings: Any, threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Per-patch anomaly scores (mean distance to the k nearest bank rows) and nearest indices (numpy)."""
        embeddings = self.knn.device.put(embeddings)
        if self.cosine:
            embeddings = unit_rows(embeddings)
        found, indices = self.knn.search(embeddings, self.params.k, threads)
        if self.cosine:
            found = found ** 2 / 2  # 1 - cos for unit rows
        return found.mean(axis=1), indices[:, 0]

    def score_images(self, embeddings: Any, threads: int = 1, grid: tuple[int, int] | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
        """Image scores [n] and patch scores [n, P] (numpy) of images' patches [n, P, D] (numpy or a tensor),
        in one search. ``grid``: the patches' (h, w), needed by the background mask."""
        n, patches, dim = embeddings.shape
        settings = self.params.background_mask
        if settings is not None and grid is None:
            raise ValueError("the background mask needs the images' patch grid: pass grid")
        embeddings = self.knn.device.put(embeddings)
        scores, nearest = self.patch_scores(embeddings.reshape(n * patches, dim), threads)
        scores, nearest = scores.reshape(n, patches), nearest.reshape(n, patches)
        if settings is not None:
            ops = self.knn.device.ops
            masks = np.stack([background_mask(ops.to_numpy(ops.cast(embeddings[i], ops.float32)), grid, settings)
                              for i in range(n)])
            scores = mask_patch_scores(scores, masks)
        if self.params.image_score == "mean_top_percent":
            count = max(1, int(patches * self.params.top_percent / 100))
            return np.sort(scores, axis=1)[:, patches - count:].mean(axis=1), scores
        top = scores.argmax(axis=1)
        image_scores = scores[np.arange(n), top]
        b = self.params.reweight_neighbours
        if b:
            # Paper eq. 7: damp the max by how isolated its nearest bank row m* is among m*'s own b
            # nearest rows (m* itself first), judged by distances from the anomalous patch.
            ops = self.knn.device.ops
            anchors = ops.asarray(nearest[np.arange(n), top], ops.int64)
            b = min(b, len(self.bank))
            _, support = self.knn.search(self.bank[anchors], b, threads)
            patch = embeddings.reshape(n * patches, dim)[ops.asarray(np.arange(n) * patches + top, ops.int64)]
            patch = unit_rows(patch) if self.cosine else patch
            found = distances(patch, self.bank, ops.repeat(ops.arange(n), b),
                              ops.asarray(support.reshape(-1), ops.int64)).reshape(n, b)
            weights = np.exp(found - found.max(axis=1, keepdims=True))
            image_scores = (1.0 - weights[:, 0] / weights.sum(axis=1)) * image_scores
        return image_scores, scores


def anomaly_map(patch_scores: np.ndarray, grid: tuple[int, int], size: int, sigma: float) -> np.ndarray:
    """Patch-score grid -> [size, size] float32 map: bilinear upsampling, then gaussian blur."""
    scores = torch.from_numpy(np.ascontiguousarray(patch_scores, dtype=np.float32)).reshape(1, 1, *grid)
    upsampled = F.interpolate(scores, size=(size, size), mode="bilinear", align_corners=False)[0, 0].numpy()
    return gaussian_filter(upsampled, sigma=sigma).astype(np.float32) if sigma > 0 else upsampled


@dataclass
class Predictions:
    """Scores of a set of test images, keyed like ``PatchFeatures``."""

    scores: np.ndarray  # [n] float64 image scores
    maps: np.ndarray  # [n, crop, crop] float32 anomaly maps
    sample_indices: np.ndarray  # [n] int64


def predict(scorer: Any, features: PatchFeatures, crop: int, threads: int = 1) -> Predictions:
    """Image scores and blurred anomaly maps of every image, searched together (shard-independent); the
    search and the maps on ``threads`` one-thread workers (a map depends only on its image's scores)."""
    scores, patch_scores = scorer.score_images(features.embeddings, threads, features.grid)
    maps = np.stack(run_blocks(threads, lambda image: anomaly_map(image, features.grid, crop, scorer.params.blur_sigma),
                               list(patch_scores)))
    if scorer.params.image_score == "map_max":  # PaDiM's: the blurred map's maximum
        scores = maps.reshape(len(maps), -1).max(axis=1)
    return Predictions(scores.astype(np.float64), maps, features.sample_indices.copy())


def merge_predictions(parts: Sequence[Predictions]) -> Predictions:
    """Concatenate prediction shards sorted by sample index."""
    indices = np.concatenate([part.sample_indices for part in parts])
    order = np.argsort(indices, kind="stable")
    return Predictions(
        np.concatenate([part.scores for part in parts])[order],
        np.concatenate([part.maps for part in parts])[order],
        indices[order],
    )
