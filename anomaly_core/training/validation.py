"""Validation: the project's metrics of a trained model on labelled images, or its loss on held-out normal
images, for early stopping and selection."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from anomaly_core.metrics import MetricReport, compute_metrics
from anomaly_core.training.model import TrainableModel
from anomaly_core.training.predict import evaluating, predict_images


@dataclass(frozen=True)
class ValidationSet:
    images: torch.Tensor  # [n, 3, crop, crop], transformed
    labels: np.ndarray  # [n] 0 normal / 1 anomalous
    masks: np.ndarray | None  # [n, crop, crop] bool; None when some anomaly has no mask (no pixel metrics)

    def __post_init__(self) -> None:
        if len(self.images) != len(self.labels) or (self.masks is not None and len(self.masks) != len(self.labels)):
            raise ValueError(f"validation set: {len(self.images)} images, {len(self.labels)} labels and "
                             f"{None if self.masks is None else len(self.masks)} masks must agree")


def evaluate(model: TrainableModel, validation: ValidationSet, batch_size: int, fpr_limit: float = 0.3) -> MetricReport:
    predictions = predict_images(model, validation.images, batch_size=batch_size)
    return compute_metrics(validation.labels, predictions.scores, validation.masks, predictions.maps, fpr_limit)


def held_out_loss(model: TrainableModel, images: torch.Tensor, batch_size: int) -> float:
    """The model's ``held_out_loss`` averaged over ``images`` (normal images held out of training)."""
    with evaluating(model) as (module, device):
        values = [module.held_out_loss(batch.to(device)).double().cpu() for batch in images.split(batch_size)]
    return float(torch.cat(values).mean())
