"""Samples -> tensors for training: the project's readers and transform, loaded once into memory.

Anomaly-detection training sets are small (tens to a few hundred images per category), and every epoch
revisits all of them, so decoding once beats decoding per epoch; the Trainer then indexes the tensor.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from sklearn.model_selection import train_test_split

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


def held_out_split(n_images: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(trained, held out) positions of ``n_images`` training images, each ascending, with ``fraction`` of them
    (rounded up) held out; ``fraction`` 0 holds none out.

    The split is gdwang08/STFPM main.py's, ``train_test_split(test_size=0.2, random_state=0)`` over the sorted
    train/good files, with the run's ``seed`` (modulo 2^32, numpy's seed range) as random_state: seed 0 holds
    out the images the authors' code does.
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"held_out_fraction must be in [0, 1), got {fraction}")
    if fraction == 0:
        return list(range(n_images)), []
    trained, held_out = train_test_split(np.arange(n_images), test_size=fraction, random_state=seed % 2**32)
    return sorted(trained.tolist()), sorted(held_out.tolist())
