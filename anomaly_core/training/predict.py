"""Trained models' predictions in the project's ``Predictions`` form, so evaluation, metrics and reports
treat them exactly like PatchCore's."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from anomaly_core.scoring import Predictions
from anomaly_core.training.model import TrainableModel


@contextmanager
def evaluating(model: TrainableModel | DistributedDataParallel) -> Iterator[tuple[TrainableModel, torch.device]]:
    """The model itself (unwrapped from DDP) in eval mode without gradients, and its device; its previous
    mode is restored afterwards."""
    module = model.module if isinstance(model, DistributedDataParallel) else model
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield module, next(module.parameters()).device
    finally:
        module.train(was_training)


def predict_images(
    model: TrainableModel | DistributedDataParallel,
    images: torch.Tensor | Iterable[torch.Tensor],
    sample_indices: Sequence[int] | None = None,
    batch_size: int = 16,
) -> Predictions:
    """Scores and maps of ``images`` ([n, 3, H, W], cut into ``batch_size`` batches, or an iterable of batches).

    ``sample_indices`` key the rows like PatchCore's (their positions in the split; 0..n-1 by default).
    The model predicts in eval mode, without gradients, and returns to its previous mode afterwards.
    """
    batches = images.split(batch_size) if isinstance(images, torch.Tensor) else images
    scores, maps = [], []
    with evaluating(model) as (module, device):
        for batch in batches:
            output = module.predict(batch.to(device))
            scores.append(output["pred_score"].double().cpu().numpy())
            maps.append(output["anomaly_map"].float().cpu().numpy())
    if not scores:
        raise ValueError("no images to predict")
    scores_array, maps_array = np.concatenate(scores), np.concatenate(maps)
    indices = np.arange(len(scores_array)) if sample_indices is None else np.asarray(sample_indices, dtype=np.int64)
    if indices.shape != scores_array.shape:
        raise ValueError(f"{len(indices)} sample indices for {len(scores_array)} images")
    return Predictions(scores_array, maps_array, indices.astype(np.int64))
