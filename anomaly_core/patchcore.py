"""PatchCore as plain stages: images -> patch features -> memory bank -> scores and maps -> metrics.

Each stage is a function or a small class over arrays. The Ray layer calls exactly these from its
actors, and the tests call them directly, so single-process and cluster runs share every number.
Batches are always formed from the category's sorted sample list in fixed chunks of ``batch_size``;
the cluster's shard planner hands out whole chunks, so an image is always processed with the same
neighbours in its batch, whatever the number of actors.
"""

from __future__ import annotations

import hashlib
import time
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from anomaly_core import __version__
from anomaly_core.backbones import FeatureBackbone
from anomaly_core.bank import MemoryBank
from anomaly_core.coreset import greedy_coreset, random_projection
from anomaly_core.data import ImageTransform, Sample, read_mask, read_rgb
from anomaly_core.metrics import MetricReport, compute_metrics
from anomaly_core.patch_features import PatchEmbedder
from anomaly_core.scoring import NearestNeighbourScorer, ScoringParams, anomaly_map
from anomaly_core.seeding import derive_seed


@dataclass(frozen=True)
class ExtractionSettings:
    """Everything that determines a patch embedding; recorded in every bank."""

    backbone: str
    layers: tuple[str, ...]
    weights: str
    resize: int = 256
    crop: int = 224
    patch_size: int = 3
    pretrain_dim: int = 1024
    target_dim: int = 1024
    batch_size: int = 8
    fp16: bool = False  # half-precision backbone on GPU and half-precision feature transfer

    def declared(self) -> dict[str, Any]:
        """The compatibility fields known without building the model, for failing fast on a bank."""
        return {
            "backbone": self.backbone,
            "weights": self.weights,
            "resize": self.resize,
            "crop": self.crop,
            "patch_size": self.patch_size,
            "pretrain_dim": self.pretrain_dim,
            "feature_dim": self.target_dim,
        }

    @classmethod
    def from_config(cls, config: Any) -> "ExtractionSettings":
        return cls(
            backbone=config.backbone.name,
            layers=tuple(config.backbone.layers),
            weights=config.backbone.weights,
            resize=config.preprocess.resize,
            crop=config.preprocess.crop,
            patch_size=config.embedding.patch_size,
            pretrain_dim=config.embedding.pretrain_dim,
            target_dim=config.embedding.target_dim,
            batch_size=config.cluster.batch_size,
            fp16=config.cluster.fp16,
        )


@dataclass
class PatchFeatures:
    """Patch embeddings of a set of images, keyed by their index in the category's sample list."""

    embeddings: np.ndarray  # [n_images, h * w, D]
    grid: tuple[int, int]
    sample_indices: np.ndarray  # [n_images] int64
    seconds: float = 0.0  # time spent producing them (for throughput reports)

    def flat(self) -> np.ndarray:
        """[n_images * h * w, D] float32 in sample-index order (the order the coreset sees)."""
        return np.ascontiguousarray(self.embeddings.reshape(-1, self.embeddings.shape[-1]), dtype=np.float32)


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
    return PatchFeatures(embeddings=embeddings, grid=parts[0].grid, sample_indices=indices[order], seconds=seconds)


class PatchFeatureExtractor:
    """A frozen backbone plus the patch embedder and the image transform that belong to it."""

    def __init__(self, settings: ExtractionSettings, device: str = "cpu") -> None:
        self.settings = settings
        self.device = torch.device(device)
        self.backbone = FeatureBackbone(settings.backbone, settings.layers, settings.weights).to(self.device)
        self.half = settings.fp16 and self.device.type == "cuda"
        if self.half:
            self.backbone.half()
        self.embedder = PatchEmbedder(settings.patch_size, settings.pretrain_dim, settings.target_dim)
        self.transform = ImageTransform(
            resize=settings.resize, crop=settings.crop, mean=self.backbone.mean, std=self.backbone.std
        )

    def describe(self) -> dict[str, Any]:
        """The bank-compatibility fields (see ``bank.COMPATIBILITY_KEYS``)."""
        return {
            **self.settings.declared(),
            "layers": list(self.backbone.layers),
            "weights_sha256": self.backbone.weights_sha256,
            "mean": list(self.backbone.mean),
            "std": list(self.backbone.std),
        }

    def load_batch(self, samples: Sequence[Sample]) -> torch.Tensor:
        """Decode and transform images (CPU work the cluster layer can overlap with the device)."""
        return torch.stack([self.transform.image(read_rgb(sample.image_path)) for sample in samples])

    def embed_batch(self, images: torch.Tensor) -> tuple[np.ndarray, tuple[int, int]]:
        images = images.to(self.device, dtype=torch.float16 if self.half else torch.float32)
        embeddings, grid = self.embedder(self.backbone(images))
        dtype = torch.float16 if self.settings.fp16 else torch.float32
        per_image = embeddings.to(dtype).reshape(len(images), grid[0] * grid[1], -1)
        return per_image.cpu().numpy(), grid

    def extract(
        self, samples: Sequence[Sample], indices: Sequence[int], decoder: Executor | None = None
    ) -> PatchFeatures:
        """Patch features for ``samples`` (whose category-list positions are ``indices``).

        With a ``decoder`` pool, batch i+1 is decoded while batch i runs on the device (PIL and the
        resize release the GIL), so decoding does not starve the accelerator.
        """
        if len(samples) != len(indices) or not samples:
            raise ValueError(f"need equally many samples and indices (> 0), got {len(samples)} and {len(indices)}")
        started = time.perf_counter()
        size = self.settings.batch_size
        batches = [samples[start : start + size] for start in range(0, len(samples), size)]
        decode = decoder.submit if decoder is not None else _run_now
        pending = decode(self.load_batch, batches[0])
        chunks, grid = [], None
        for position in range(len(batches)):
            images = pending.result()
            if position + 1 < len(batches):
                pending = decode(self.load_batch, batches[position + 1])
            embeddings, grid = self.embed_batch(images)
            chunks.append(embeddings)
        seconds = time.perf_counter() - started
        return PatchFeatures(np.concatenate(chunks), grid, np.asarray(indices, dtype=np.int64), seconds)


def _run_now(function: Callable[..., Any], *args: Any) -> Future:
    """``Executor.submit`` without an executor: run in the caller's thread."""
    future: Future = Future()
    future.set_result(function(*args))
    return future


def train_list_sha256(samples: Sequence[Sample], root: str) -> str:
    """Digest of the training image list (paths relative to the dataset root, in order)."""
    digest = hashlib.sha256()
    for sample in samples:
        digest.update(str(sample.image_path).removeprefix(str(root)).lstrip("/").encode() + b"\n")
    return digest.hexdigest()


def coreset_seed(seed: int, dataset: str, category: str) -> int:
    return derive_seed(seed, dataset, category, "coreset")


def coreset_points(features: PatchFeatures, method: str, projection_dim: int, seed: int) -> np.ndarray:
    """The points greedy runs on: the patches, or (approximate) their seeded random projection.

    The projection is applied image by image so that every matrix product has the same shape
    wherever an image lives: a coreset holder with a few images and a single process with all of
    them get bit-identical points (BLAS blocking can otherwise change last bits with the shape).
    """
    if method != "approximate":
        return features.flat()
    return np.concatenate([
        random_projection(np.ascontiguousarray(image, dtype=np.float32), projection_dim, seed)
        for image in features.embeddings
    ])


def build_bank(
    features: PatchFeatures,
    method: str,
    ratio: float,
    projection_dim: int,
    seed: int,
    metadata: dict[str, Any],
) -> MemoryBank:
    """Subsample the training patches with greedy k-center (or keep all with method 'none')."""
    flat = features.flat()
    started = time.perf_counter()
    if method == "none":
        selected, radius_sq = np.arange(len(flat)), 0.0
    else:
        points = coreset_points(features, method, projection_dim, seed)
        with threadpool_limits(limits=1, user_api="blas"):  # small products: faster on one thread
            result = greedy_coreset(points, ratio=ratio, method="exact", seed=seed)
        selected, radius_sq = np.asarray(result.indices), float(result.coverage_radius_sq)
    coreset_seconds = time.perf_counter() - started
    return MemoryBank(
        features=np.ascontiguousarray(flat[selected]),
        metadata={
            **metadata,
            "coreset": {"method": method, "ratio": ratio, "projection_dim": projection_dim, "seed": seed,
                        "coverage_radius": float(np.sqrt(radius_sq))},
            "n_patches": int(len(flat)),
            "grid": list(features.grid),
            "package_version": __version__,
            "timings": {**metadata.get("timings", {}), "coreset_s": round(coreset_seconds, 4)},
        },
    )


@dataclass
class Predictions:
    """Scores of a set of test images, keyed like ``PatchFeatures``."""

    scores: np.ndarray  # [n] float64 image scores
    maps: np.ndarray  # [n, crop, crop] float32 anomaly maps
    sample_indices: np.ndarray  # [n] int64


def predict(scorer: NearestNeighbourScorer, features: PatchFeatures, crop: int) -> Predictions:
    """Image scores and blurred anomaly maps of every image, searched together (shard-independent)."""
    scores, patch_scores = scorer.score_images(features.embeddings)
    maps = [anomaly_map(image, features.grid, crop, scorer.params.blur_sigma) for image in patch_scores]
    return Predictions(scores.astype(np.float64), np.stack(maps), features.sample_indices.copy())


def merge_predictions(parts: Sequence[Predictions]) -> Predictions:
    """Concatenate prediction shards sorted by sample index."""
    indices = np.concatenate([part.sample_indices for part in parts])
    order = np.argsort(indices, kind="stable")
    return Predictions(
        np.concatenate([part.scores for part in parts])[order],
        np.concatenate([part.maps for part in parts])[order],
        indices[order],
    )


def ground_truth(samples: Sequence[Sample], transform: ImageTransform) -> tuple[np.ndarray, np.ndarray | None]:
    """Labels [n] and masks [n, crop, crop] at the maps' geometry (None if any anomaly lacks a mask)."""
    labels = np.asarray([sample.label for sample in samples], dtype=np.int64)
    if any(sample.label == 1 and sample.mask_path is None for sample in samples):
        return labels, None
    crop = transform.crop
    masks = np.zeros((len(samples), crop, crop), dtype=bool)
    for row, sample in enumerate(samples):
        if sample.mask_path is not None:
            masks[row] = transform.mask(read_mask(sample.mask_path)).numpy()
    return labels, masks


def evaluate(
    samples: Sequence[Sample], predictions: Predictions, transform: ImageTransform, fpr_limit: float
) -> MetricReport:
    """Metrics of one category from its full set of predictions (in sample-index order)."""
    if not np.array_equal(predictions.sample_indices, np.arange(len(samples))):
        raise ValueError("predictions must cover every test sample exactly once, in index order")
    labels, masks = ground_truth(samples, transform)
    return compute_metrics(labels, predictions.scores, masks, predictions.maps if masks is not None else None, fpr_limit)


def scoring_params(config: Any) -> ScoringParams:
    return ScoringParams(
        k=config.scoring.k, reweight_neighbours=config.scoring.reweight_neighbours, blur_sigma=config.scoring.blur_sigma
    )
