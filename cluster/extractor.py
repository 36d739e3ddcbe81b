"""Extractor actor: one frozen backbone per GPU (or CPU slot) turning shards of images into patch features.

Why actors and not Ray Data: a benchmark runs dozens of small categories whose shards must keep a fixed
batch composition (bit-identical banks for any actor count) and be tagged with sample indices; an actor
that loads the model once and is handed whole-batch shards gives that directly, while decoding overlaps
the forward pass on ``decode_workers`` threads inside the actor, one task per image (PIL and numpy release
the GIL), a bounded number of batches ahead (``PatchFeatureExtractor``).
Ray restarts a killed actor and retries its in-flight shard (``max_restarts``/``max_task_retries``);
a shard's result depends only on its images, so the retry reproduces it exactly.
"""

from __future__ import annotations

import os
import resource
from typing import Any, Sequence

import ray
import torch

from anomaly_core.augment import TrainCopies
from anomaly_core.data import Sample
from anomaly_core.extraction import STAGES, ExtractionSettings, PatchFeatureExtractor
from anomaly_core.features import PatchFeatures
from anomaly_core.threads import limit_threads
from cluster.devices import ReportsThreads
from cluster.system_stats import SamplesSystem


class Extractor(ReportsThreads, SamplesSystem):
    """Holds the model; ``extract`` embeds a shard, decoding the next batches while one runs."""

    def __init__(self, settings: ExtractionSettings, threads: int, decode_workers: int) -> None:
        self.torch_threads = max(1, threads)
        limit_threads(self.torch_threads)  # torch and every BLAS/OpenMP pool (Ray's default: the reservation, rounded down)
        torch.backends.cudnn.benchmark = False  # autotuned kernels differ run to run
        torch.backends.cudnn.deterministic = True
        device = "cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu"
        self.extractor = PatchFeatureExtractor(settings, device=device, decode_workers=decode_workers)
        self.images_done = 0
        self.busy_seconds = 0.0
        self.stages = dict.fromkeys(STAGES, 0.0)
        self.start_sampling()

    def describe(self) -> dict:
        return {**self.extractor.describe(), "device": str(self.extractor.device), "pid": os.getpid()}

    def where(self) -> dict:
        """The node and GPUs this actor was placed on (placement checks, summary)."""
        return {"node": ray.get_runtime_context().get_node_id(), "gpu_ids": ray.get_gpu_ids()}

    @ray.method(num_returns=2)
    def extract(
        self, samples: Sequence[Sample], indices: Sequence[int], augmentation: TrainCopies | None = None,
        seeds: Sequence[int] | None = None,
    ) -> tuple[PatchFeatures, dict[str, Any]]:
        """The shard's features (of augmented copies when ``augmentation`` and per-image ``seeds`` are
        given), and (a separate object, so the driver can read it without fetching the features) the
        times they took: ``{"seconds": total, "stages": {stage: seconds}}`` (``extraction.STAGES``)."""
        features = self._extract(samples, indices, augmentation, seeds)
        return features, {"seconds": features.seconds, "stages": features.stages}

    def _extract(self, samples: Sequence[Sample], indices: Sequence[int], augmentation: TrainCopies | None,
                 seeds: Sequence[int] | None, keep_on_device: bool = False) -> PatchFeatures:
        """A shard's features, counted in this actor's throughput and stage times."""
        features = self.extractor.extract(samples, indices, augmentation=augmentation, seeds=seeds,
                                          keep_on_device=keep_on_device)
        self.images_done += len(samples)
        self.busy_seconds += features.seconds
        for stage, seconds in features.stages.items():
            self.stages[stage] += seconds
        return features

    def stats(self) -> dict:
        """Throughput, seconds per extraction stage and peak resident memory (MiB) of this actor, for the
        run summary. ``decode_images_per_s`` is images per CPU-second of decoding: one decode thread's rate,
        so ``decode_workers`` times it bounds what the decoders can feed the device."""
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        decode_s = self.stages["decode_s"]
        return {
            "pid": os.getpid(),
            "images": self.images_done,
            "busy_s": round(self.busy_seconds, 3),
            "images_per_s": round(self.images_done / self.busy_seconds, 3) if self.busy_seconds else None,
            "decode_workers": self.extractor.decode_workers,
            "decode_images_per_s": round(self.images_done / decode_s, 3) if decode_s else None,
            "stages": {stage: round(seconds, 3) for stage, seconds in self.stages.items()},
            "peak_rss_mib": round(peak_mib, 1),
        }


def extractor_actor(max_restarts: int):
    """The remote class; restarts and retries make a killed actor cost a shard, not the run.

    Tasks are retried for as long as the actor can be restarted (``max_task_retries=-1``; exceptions
    raised by the task itself are never retried): while a crashed node is not yet declared dead, calls
    fail fast as "temporarily unavailable", and a fixed retry count ran out within seconds.
    Resources and node come per actor from the plan (``cluster.devices.pinned``)."""
    return ray.remote(max_restarts=max_restarts, max_task_retries=-1)(Extractor)
