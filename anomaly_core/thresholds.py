"""Deployment thresholds that are not tuned on the test labels: quantiles over held-out good images.

The metrics' F1-optimal thresholds are chosen on the very test images they are then judged on, which
flatters them as deployment thresholds. The alternative (patchcore-inspection's ``train_val_split``,
anomalib's validation split) holds a seeded fraction of the good training images out of the bank;
their scores are what a normal part looks like to the bank, and a high quantile of them is a
threshold that never saw a defect or a test label.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from anomaly_core.data import Sample
from anomaly_core.scoring import Predictions
from anomaly_core.seeding import derive_seed


def hold_out(samples: Sequence[Sample], fraction: float, seed: int, dataset: str, category: str
             ) -> tuple[tuple[Sample, ...], tuple[Sample, ...]]:
    """(train, validation): a seeded ``fraction`` of ``samples`` (at least one, never all), order kept."""
    if len(samples) < 2:
        raise ValueError(f"{dataset}/{category}: {len(samples)} training image(s) cannot be split into train and validation")
    n_validation = min(max(1, round(fraction * len(samples))), len(samples) - 1)
    rng = np.random.default_rng(derive_seed(seed, dataset, category, "validation"))
    chosen = set(rng.choice(len(samples), size=n_validation, replace=False).tolist())
    train = tuple(sample for index, sample in enumerate(samples) if index not in chosen)
    return train, tuple(samples[index] for index in sorted(chosen))


def validation_thresholds(predictions: Predictions, quantile: float) -> dict[str, float | str]:
    """Image and pixel thresholds at ``quantile`` of the held-out images' scores and map values."""
    n = len(predictions.scores)
    return {
        "image": float(np.quantile(predictions.scores, quantile)),
        "pixel": float(np.quantile(predictions.maps, quantile)),
        "source": f"quantile {quantile} of the scores of {n} held-out good images (the dataset's validation "
                  f"images, else training images kept out of the bank; thresholds.source: validation); "
                  f"no test image or label was used",
    }
