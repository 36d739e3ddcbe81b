"""Trained models' predictions in the project's ``Predictions`` form, so evaluation, metrics and reports
treat them exactly like PatchCore's."""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from anomaly_core.scoring import Predictions
from anomaly_core.training.model import TrainableModel


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
    module = model.module if isinstance(model, DistributedDataParallel) else model
    batches = images.split(batch_size) if isinstance(images, torch.Tensor) else images
    device = next(module.parameters()).device
    was_training = module.training
    module.eval()
    scores, maps = [], []
    try:
        with torch.no_grad():
            for batch in batches:
                output = module.predict(batch.to(device))
                scores.append(output["pred_score"].double().cpu().numpy())
                maps.append(output["anomaly_map"].float().cpu().numpy())
    finally:
        module.train(was_training)
    if not scores:
        raise ValueError("no images to predict")
    scores_array, maps_array = np.concatenate(scores), np.concatenate(maps)
    indices = np.arange(len(scores_array)) if sample_indices is None else np.asarray(sample_indices, dtype=np.int64)
    if indices.shape != scores_array.shape:
        raise ValueError(f"{len(indices)} sample indices for {len(scores_array)} images")
    return Predictions(scores_array, maps_array, indices.astype(np.int64))
