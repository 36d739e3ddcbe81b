"""Ensembles of memory banks: each member's scores normalised on held-out good images, then averaged.

patchcore-inspection averages its members after min-max scaling each member's *test* scores, so an
image's ensemble score depends on which other test images were scored with it. Here each member's
scale comes from good training images that stayed out of its bank (the held-out images of
``thresholds.hold_out``, or the dataset's own validation images): a z-score per member, separately
for image scores (mean and standard deviation of the held-out images' scores) and for anomaly maps
(of every pixel of their maps). The ensemble score is the mean of the members' z-scores, so a test
image's score depends only on that image and the banks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from anomaly_core.scoring import Predictions


@dataclass(frozen=True)
class Normalisation:
    """One member's scale: scores map to ``(score - mean) / std`` (image scores and map values apart)."""

    image_mean: float
    image_std: float
    pixel_mean: float
    pixel_std: float

    @classmethod
    def fit(cls, held_out: Predictions, member: str) -> "Normalisation":
        """The member's statistics on the predictions of its held-out good images."""
        n = len(held_out.scores)
        if n < 2:
            raise ValueError(f"ensemble member {member}: {n} held-out image(s); normalising image scores needs at "
                             f"least 2 (raise thresholds.validation_split)")
        scores = np.asarray(held_out.scores, dtype=np.float64)
        pixels = np.asarray(held_out.maps, dtype=np.float64)
        norm = cls(float(scores.mean()), float(scores.std()), float(pixels.mean()), float(pixels.std()))
        if not (norm.image_std > 0 and norm.pixel_std > 0):
            raise ValueError(f"ensemble member {member}: its held-out images all score alike (image std "
                             f"{norm.image_std}, pixel std {norm.pixel_std}); its scale cannot be normalised")
        return norm

    def apply(self, predictions: Predictions) -> tuple[np.ndarray, np.ndarray]:
        """(image z-scores [n] float64, map z-scores [n, h, w] float64)."""
        scores = (np.asarray(predictions.scores, dtype=np.float64) - self.image_mean) / self.image_std
        maps = (np.asarray(predictions.maps, dtype=np.float64) - self.pixel_mean) / self.pixel_std
        return scores, maps

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def combine(members: Sequence[Predictions], norms: Sequence[Normalisation]) -> Predictions:
    """The ensemble's predictions: the mean of the members' normalised scores and maps, summed in member
    order (so the result does not depend on which member finished first)."""
    if not members or len(members) != len(norms):
        raise ValueError(f"need one normalisation per member, got {len(members)} members and {len(norms)}")
    indices = members[0].sample_indices
    for member in members[1:]:
        if not np.array_equal(member.sample_indices, indices) or member.maps.shape != members[0].maps.shape:
            raise ValueError("ensemble members scored different images or at different map sizes")
    scores = np.zeros(len(indices), dtype=np.float64)
    maps = np.zeros(members[0].maps.shape, dtype=np.float64)
    for member, norm in zip(members, norms):
        member_scores, member_maps = norm.apply(member)
        scores += member_scores
        maps += member_maps
    return Predictions(scores / len(members), (maps / len(members)).astype(np.float32), indices.copy())


def member_labels(names: Sequence[str]) -> list[str]:
    """Readable, unique member labels: the backbone names, numbered where a backbone appears twice."""
    labels = []
    for position, name in enumerate(names):
        labels.append(f"{name}-{names[:position + 1].count(name)}" if names.count(name) > 1 else name)
    return labels
