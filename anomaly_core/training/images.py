"""Samples -> tensors for training: the project's readers and transform, loaded once into memory.

Anomaly-detection training sets are small (tens to a few hundred images per category), and every epoch
revisits all of them, so decoding once beats decoding per epoch; the Trainer then indexes the tensor.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from anomaly_core.data import ImageTransform, Sample, load_image, load_mask
from anomaly_core.training.validation import ValidationSet


def load_images(samples: Sequence[Sample], transform: ImageTransform) -> torch.Tensor:
    """[n, 3, crop, crop] normalised images, in the order of ``samples``."""
    if not samples:
        raise ValueError("no samples to load")
    return torch.stack([load_image(sample, transform) for sample in samples])


def load_validation_set(samples: Sequence[Sample], transform: ImageTransform) -> ValidationSet:
    """Images, labels and (when every anomaly has one) masks of labelled samples, e.g. a test split."""
    masks = [load_mask(sample, transform) for sample in samples]
    return ValidationSet(
        images=load_images(samples, transform),
        labels=np.array([sample.label for sample in samples], dtype=np.int64),
        masks=None if any(mask is None for mask in masks) else torch.stack(masks).numpy(),
    )
