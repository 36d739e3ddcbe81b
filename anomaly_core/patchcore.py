"""PatchCore as plain stages: patch features -> memory bank -> scores and maps -> metrics.

Each stage is a function or a small class over arrays. The Ray layer calls exactly these from its
actors, and the tests call them directly, so single-process and cluster runs share every number.
Features come from ``anomaly_core.extraction``; their container lives in ``anomaly_core.features``.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from anomaly_core import __version__
from anomaly_core.augment import TrainCopies
from anomaly_core.bank import MemoryBank
from anomaly_core.coreset import greedy_coreset
from anomaly_core.data import ImageTransform, Sample, load_mask
from anomaly_core.data.anomalydino import AnomalyDinoPreprocess, ReferenceRotations, resolve
from anomaly_core.data.defects import defect_regions
from anomaly_core.features import PatchFeatures, coreset_points, coverage_radius_space
from anomaly_core.metrics import (
    METRIC_NAMES,
    MetricReport,
    compute_metrics,
    group_indices,
    group_metrics,
    grouped_name,
)
from anomaly_core.scoring import Predictions, ScoringParams
from anomaly_core.seeding import derive_seed


def train_list_sha256(samples: Sequence[Sample], root: str) -> str:
    """Digest of the training image list (paths relative to the dataset root, in order)."""
    digest = hashlib.sha256()
    for sample in samples:
        digest.update(str(sample.image_path).removeprefix(str(root)).lstrip("/").encode() + b"\n")
    return digest.hexdigest()


def coreset_seed(seed: int, dataset: str, category: str) -> int:
    return derive_seed(seed, dataset, category, "coreset")


def augment_base_seed(seed: int, dataset: str, category: str) -> int:
    """The base of every augmented copy's seed in a category (``augment.augment_seed`` adds image and copy)."""
    return derive_seed(seed, dataset, category, "augment")


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
        result = greedy_coreset(points, ratio=ratio, method="exact", seed=seed)
        selected, radius_sq = np.asarray(result.indices), float(result.coverage_radius_sq)
    coreset_seconds = time.perf_counter() - started
    return MemoryBank(
        features=np.ascontiguousarray(flat[selected]),
        metadata={
            **metadata,
            "coreset": {"method": method, "ratio": ratio, "projection_dim": projection_dim, "seed": seed,
                        "coverage_radius": float(np.sqrt(radius_sq)),
                        "coverage_radius_space": coverage_radius_space(method, projection_dim)},
            "n_patches": int(len(flat)),
            "grid": list(features.grid),
            "package_version": __version__,
            "timings": {**metadata.get("timings", {}), "coreset_s": round(coreset_seconds, 4)},
        },
    )


def ground_truth(samples: Sequence[Sample], transform: ImageTransform) -> tuple[np.ndarray, np.ndarray | None]:
    """Labels [n] and masks [n, crop, crop] at the maps' geometry (None if any anomaly lacks a mask)."""
    labels = np.asarray([sample.label for sample in samples], dtype=np.int64)
    if any(sample.label == 1 and sample.mask_path is None for sample in samples):
        return labels, None
    # load_mask refuses a mask whose size differs from its image's: resized, it would be misaligned.
    return labels, np.stack([load_mask(sample, transform).numpy() for sample in samples])


def evaluate(
    samples: Sequence[Sample], predictions: Predictions, transform: ImageTransform, fpr_limit: float,
    groups: Mapping[str, Sequence[str]] | None = None,
) -> MetricReport:
    """Metrics of one category from its full set of predictions (in sample-index order).

    ``groups`` (``data.metric_groups``: MVTec LOCO's structural and logical anomalies) adds each
    group's metrics as ``<group>/<metric>``, scored on all normal images plus the group's anomalies.
    Samples that name a defects config (MVTec LOCO) add their defects, for sPRO.
    """
    if not np.array_equal(predictions.sample_indices, np.arange(len(samples))):
        raise ValueError("predictions must cover every test sample exactly once, in index order")
    labels, masks = ground_truth(samples, transform)
    maps = predictions.maps if masks is not None else None
    regions = defect_regions(samples, transform) if masks is not None else None
    report = compute_metrics(labels, predictions.scores, masks, maps, fpr_limit, regions)
    subsets = group_metrics(group_indices(samples, groups or {}), labels, predictions.scores, masks, maps, fpr_limit,
                            regions)
    for group, sub in subsets.items():
        report.values.update({grouped_name(group, name): sub.values.get(name) for name in METRIC_NAMES})
        report.notes.update({grouped_name(group, name): note for name, note in sub.notes.items() if name in METRIC_NAMES})
    return report


def anomalydino_preprocess(config: Any, dataset_format: str, category: str) -> AnomalyDinoPreprocess | None:
    """A category's AnomalyDINO preprocessing from the config's ``anomalydino`` section; None where it is absent."""
    section = config.anomalydino
    if section is None:
        return None
    return resolve(section.preset, section.masking, section.rotation, dataset_format, category, section.threshold)


def category_record(config: Any, dataset_format: str, category: str) -> dict[str, Any]:
    """The per-category settings a bank records and inference must match (``bank.COMPATIBILITY_KEYS``)."""
    settings = anomalydino_preprocess(config, dataset_format, category)
    return {"anomalydino": settings.to_dict() if settings is not None else None}


def train_copies(config: Any, augmentation: TrainCopies, dataset_format: str, category: str) -> TrainCopies:
    """The copies of a category's training images in its bank: AnomalyDINO's reference rotations where they are
    on (the config refuses them together with ``augment``), else ``augmentation``."""
    settings = anomalydino_preprocess(config, dataset_format, category)
    return ReferenceRotations() if settings is not None and settings.rotation else augmentation


def scoring_params(config: Any, settings: AnomalyDinoPreprocess | None = None) -> ScoringParams:
    """The config's scoring, with a category's background mask where ``settings`` has masking on."""
    return ScoringParams(**config.scoring.model_dump(), background_mask=_masking(settings))


def bank_scoring_params(metadata: dict[str, Any]) -> ScoringParams:
    """The scoring a saved bank records (``scoring``, and its ``anomalydino`` settings' mask)."""
    recorded = metadata.get("anomalydino")
    settings = AnomalyDinoPreprocess(**recorded) if recorded else None
    return ScoringParams(**metadata.get("scoring", {}), background_mask=_masking(settings))


def _masking(settings: AnomalyDinoPreprocess | None) -> AnomalyDinoPreprocess | None:
    return settings if settings is not None and settings.masking else None
