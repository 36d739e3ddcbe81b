"""Evaluation actors: hold one faiss index per category's bank and score that category's test shards.

The bank travels as an object reference inside a list (so Ray does not resolve it for every call) and
is cached by key: a restarted actor simply rebuilds the index from the same object on its next call,
which is why ``score`` is safe to retry.
"""

from __future__ import annotations

import time

import numpy as np
import ray
import torch

from anomaly_core.data import ImageTransform, Sample
from anomaly_core.metrics import MetricReport
from anomaly_core.patchcore import PatchFeatures, Predictions, evaluate, merge_predictions, predict
from anomaly_core.scoring import NearestNeighbourScorer, ScoringParams


class Evaluator:
    def __init__(self, threads: int) -> None:
        torch.set_num_threads(max(1, threads))
        self.scorers: dict[str, NearestNeighbourScorer] = {}

    def score(
        self, key: str, bank: list[ray.ObjectRef], params: ScoringParams, features: PatchFeatures, crop: int
    ) -> Predictions:
        if key not in self.scorers:
            self.scorers[key] = NearestNeighbourScorer(ray.get(bank[0]), params)
        return predict(self.scorers[key], features, crop)

    def release(self, key: str) -> None:
        """Free a finished category's index (the actor serves many categories over a run)."""
        self.scorers.pop(key, None)


def evaluator_actor(num_cpus: float, max_restarts: int):
    return ray.remote(
        num_cpus=num_cpus, max_restarts=max_restarts, max_task_retries=max_restarts, scheduling_strategy="SPREAD"
    )(Evaluator)


@ray.remote
def category_metrics(
    samples: list[Sample], transform: ImageTransform, fpr_limit: float, *parts: Predictions
) -> tuple[Predictions, MetricReport, float]:
    """Merge a category's prediction shards and compute its metrics from the full maps."""
    started = time.perf_counter()
    predictions = merge_predictions(parts)
    report = evaluate(samples, predictions, transform, fpr_limit)
    return predictions, report, time.perf_counter() - started


def bank_reference(features: np.ndarray) -> list[ray.ObjectRef]:
    return [ray.put(features)]
