"""Evaluation actors: hold a category's bank on their math device, score its test shards, then its metrics.

The bank travels as an object reference inside a list (so Ray does not resolve it for every call) and
is cached by key: a restarted actor simply rebuilds its scorer from the same object on its next call,
which is why ``score`` is safe to retry; ``finish`` takes the shards' predictions as object references,
so it is safe to retry too. Each ``score`` call gets its thread count from the resource plan (more once
no extraction is queued) and sets every library of the actor to it, for the category's metrics too;
scores do not depend on it.

Metrics run here rather than as Ray tasks: the actor has its imports (torchvision, scikit-learn: ~9 s
of CPU) from the start of the run, where a task would pay them in a fresh worker when the first
category's metrics are due (Ray ships a task's function by value, so a warm-up task does not warm the
worker that later runs it).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import ray

from anomaly_core.data import ImageTransform, Sample
from anomaly_core.features import PatchFeatures
from anomaly_core.metrics import MetricReport
from anomaly_core.patchcore import evaluate
from anomaly_core.scoring import Predictions, ScoringParams, merge_predictions, predict
from anomaly_core.threads import limit_threads
from anomaly_core.distances import MatrixDevice
from cluster.devices import ReportsThreads, math_device
from cluster.system_stats import SamplesSystem


class Scoring:
    """The scorers of the categories an actor scores (bank on its math device, built on the first shard),
    and its throughput."""

    def __init__(self, device: MatrixDevice, keep: int | None = None) -> None:
        """``keep``: at most that many categories' scorers (the oldest dropped first: one only costs a
        rebuild), for actors that never see a category's ``finish``."""
        self.device, self.keep = device, keep
        self.scorers: dict[tuple[str, str], Any] = {}  # by (category, bank object); kNN or PaDiM scorers
        self.busy_seconds = 0.0
        self.images_done = 0
        self._lock = threading.Lock()  # a colocated extractor scores on two threads

    def score(self, key: str, bank: list[ray.ObjectRef], params: ScoringParams, features: PatchFeatures, crop: int,
              threads: int) -> Predictions:
        started = time.perf_counter()
        # By bank object too: a category is scored again with another bank (an ensemble's next member, a
        # pipeline's next run), and a scorer kept from the last one must not answer for it.
        held = (key, bank[0].hex())
        with self._lock:
            scorer = self.scorers.get(held)
        if scorer is None:
            scorer = params.scorer(ray.get(bank[0]), self.device, threads)
            with self._lock:
                self.scorers[held] = scorer
                while self.keep is not None and len(self.scorers) > self.keep:
                    self.scorers.pop(next(iter(self.scorers)))
        predictions = predict(scorer, features, crop, threads)
        with self._lock:
            self.busy_seconds += time.perf_counter() - started
            self.images_done += len(predictions.scores)
        return predictions

    def drop(self, key: str) -> None:
        """Free a category's scorers."""
        with self._lock:
            for held in [held for held in self.scorers if held[0] == key]:
                del self.scorers[held]

    def stats(self) -> dict:
        return {
            "device": self.device.device,
            "images": self.images_done,
            "busy_s": round(self.busy_seconds, 3),
            "images_per_s": round(self.images_done / self.busy_seconds, 3) if self.busy_seconds else None,
            "banks_held": len(self.scorers),
        }


class Evaluator(ReportsThreads, SamplesSystem):
    def __init__(self) -> None:
        self.scoring = Scoring(math_device())
        self.start_sampling()

    def score(
        self, key: str, bank: list[ray.ObjectRef], params: ScoringParams, features: PatchFeatures, crop: int,
        threads: int,
    ) -> Predictions:
        # Every library at the plan's count from here on, the category's metrics included (Ray's default:
        # the reservation rounded down).
        limit_threads(threads)
        return self.scoring.score(key, bank, params, features, crop, threads)

    def finish(
        self, key: str, samples: list[Sample], transform: ImageTransform, fpr_limit: float,
        groups: dict[str, tuple[str, ...]], *parts: Predictions,
    ) -> tuple[Predictions, MetricReport, float]:
        """Free the category's scorer, merge its prediction shards and compute its metrics from the full maps
        (and per metric group, e.g. MVTec LOCO's structural and logical anomalies)."""
        self.scoring.drop(key)
        started = time.perf_counter()
        predictions = merge_predictions(parts)
        report = evaluate(samples, predictions, transform, fpr_limit, groups)
        return predictions, report, time.perf_counter() - started

    def stats(self) -> dict:
        # banks_held: 0 between categories, as finish frees each category's scorer
        return self.scoring.stats()


# Each search runs on a fresh thread pool; glibc gives new threads their own malloc arenas, and what a
# category frees there is not reused by the next: an evaluator's private memory grew ~30 MiB per category
# (docs/RELIABILITY.md, "Load"). Two arenas keep it flat, at no measurable cost to the search.
ARENA_ENV = {"MALLOC_ARENA_MAX": "2"}


def evaluator_actor(max_restarts: int):
    # Retried while the actor can restart, as the extractors' (cluster.extractor.extractor_actor).
    return ray.remote(max_restarts=max_restarts, max_task_retries=-1,
                      runtime_env={"env_vars": ARENA_ENV})(Evaluator)


def bank_reference(features: np.ndarray) -> list[ray.ObjectRef]:
    return [ray.put(features)]
