"""Colocated extractors: the process that embeds a shard also holds it for the coreset and scores it.

On a GPU node the features an extractor makes are already where the coreset's screen and the kNN search
run best. Sent to separate holder and evaluator actors they would go GPU -> host -> object store -> host
-> GPU, twice per category. A colocated extractor keeps each shard it embeds (on its GPU: a torch tensor
that never leaves it) under a token the driver chose, and returns only a receipt; the driver then hands
each holder and scoring call to the extractor that holds the shard (``cluster.coreset`` picks by owner),
so only picks, bank rows and predictions travel. With one GPU, one holder holds every point and runs the
whole greedy itself (``CoresetHolder.select``): no driver round trips either.

Why one process rather than Ray's GPU-object transport (``@ray.method(tensor_transport=...)``, alpha in
Ray 2.60): its NCCL transport needs one GPU per rank, so it cannot link actors that share a GPU, which is
the case here; CUDA IPC keeps the producer's memory alive for as long as any consumer holds it; and none of
it runs on the CPU machines where CI checks the pipeline. A process keeps tensors where they are, on any
device, and the same code runs under test on the CPU.

Recovery: a receipt carries its shard's images, indices and augmentation seeds. A shard that is not held
(the actor was restarted after a crash, or another one got the call) is extracted again in place; a
shard's features depend only on its images and batch composition, so they are the same bits.

Threads: extraction runs on one thread of the actor (``extract`` group), holder and scoring calls on two
others (``math`` group; two categories can be in flight: one's coreset beside the previous one's scoring).
The math calls never change this process's library thread counts (the backbone's CPU convolutions round
differently with other counts); they use their own one-thread block workers.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Sequence

import ray

from anomaly_core.augment import TrainCopies
from anomaly_core.data import Sample
from anomaly_core.features import PatchFeatures
from anomaly_core.scoring import Predictions, ScoringParams
from anomaly_core.threads import thread_limit
from cluster.coreset import CoresetHolder
from cluster.devices import math_device
from cluster.evaluator import Scoring
from cluster.extractor import Extractor

MATH_METHODS = ("load", "unload", "shard_info", "fetch_rows", "add_centers", "advance", "top_candidates",
                "original_rows", "select", "local_greedy", "score", "release")


@dataclass(frozen=True)
class HeldShard:
    """What a colocated extractor returns for a shard it keeps: its token, and what makes it again."""

    token: str
    args: tuple  # (samples, indices, augmentation, seeds), as given to extract


class ColocatedExtractor(Extractor, CoresetHolder):
    """An extractor that is also the coreset holder and the scorer of the shards it embedded."""

    def __init__(self, settings: Any, threads: int, decode_workers: int) -> None:
        Extractor.__init__(self, settings, threads, decode_workers)
        CoresetHolder.__init__(self)
        self.scoring = Scoring(math_device(), keep=2)
        self.held: dict[str, PatchFeatures] = {}
        self._held_lock = threading.Lock()
        self._extract_lock = threading.Lock()  # one extraction at a time: the backbone and its thread count
        self._tokens: list[str] = []  # of the shard loaded for the coreset

    @ray.method(num_returns=2, concurrency_group="extract")
    def extract(
        self, samples: Sequence[Sample], indices: Sequence[int], augmentation: TrainCopies | None = None,
        seeds: Sequence[int] | None = None, token: str | None = None,
    ) -> tuple[PatchFeatures | HeldShard, dict[str, Any]]:
        """As ``Extractor.extract``; with a ``token``, the features stay here and a ``HeldShard`` is returned."""
        features = self._embed_shard((samples, indices, augmentation, seeds), keep=token is not None)
        timing = {"seconds": features.seconds, "stages": features.stages}
        if token is None:
            return features, timing
        with self._held_lock:
            self.held[token] = features
        return HeldShard(token, (samples, indices, augmentation, seeds)), timing

    def _embed_shard(self, args: tuple, keep: bool) -> PatchFeatures:
        """Extraction at the extractor's own thread count, whichever of the actor's threads runs it."""
        with self._extract_lock, thread_limit(self.torch_threads):
            return self._extract(*args, keep_on_device=keep)

    def _resolve(self, part: PatchFeatures | HeldShard) -> PatchFeatures:
        """A shard's features: as sent, held here, or extracted again from its receipt."""
        if isinstance(part, PatchFeatures):
            return part
        with self._held_lock:
            features = self.held.get(part.token)
        if features is None:
            features = self._embed_shard(part.args, keep=True)
            with self._held_lock:
                self.held[part.token] = features
        return features

    def _features(self, parts: list[ray.ObjectRef]) -> list[PatchFeatures]:
        parts = ray.get(parts)
        self._tokens = [part.token for part in parts if isinstance(part, HeldShard)]
        return [self._resolve(part) for part in parts]

    def _use_threads(self, threads: int) -> None:
        """Holder calls keep the process's counts (see the module docstring)."""

    def unload(self) -> None:
        """Free the finished category's shard and the features it was made of."""
        CoresetHolder.unload(self)
        self.release(self._tokens)
        self._tokens = []

    def release(self, tokens: Sequence[str]) -> None:
        with self._held_lock:
            for token in tokens:
                self.held.pop(token, None)

    def score(self, key: str, bank: list[ray.ObjectRef], params: ScoringParams, part: PatchFeatures | HeldShard,
              crop: int, threads: int) -> Predictions:
        """Score a test shard here (its last use: a held one is freed after)."""
        predictions = self.scoring.score(key, bank, params, self._resolve(part), crop, threads)
        if isinstance(part, HeldShard):
            self.release([part.token])
        return predictions

    def held_bytes(self) -> int:
        """Bytes of the features held now (for tests and the run summary)."""
        with self._held_lock:
            return sum(int(features.embeddings.nbytes) for features in self.held.values())

    def stats(self) -> dict:
        return {**Extractor.stats(self), "scoring": self.scoring.stats()}


for _name in MATH_METHODS:  # each holder/scoring method into the math group, under its own name
    def _in_math_group(self: ColocatedExtractor, *args: Any, _method: Any = getattr(ColocatedExtractor, _name),
                       **kwargs: Any) -> Any:
        return _method(self, *args, **kwargs)

    _in_math_group.__name__ = _in_math_group.__qualname__ = _name
    _in_math_group.__doc__ = getattr(ColocatedExtractor, _name).__doc__
    setattr(ColocatedExtractor, _name, ray.method(concurrency_group="math")(_in_math_group))


def colocated_actor(max_restarts: int):
    """The remote class: restarted and retried as extractors are (``cluster.extractor.extractor_actor``)."""
    return ray.remote(max_restarts=max_restarts, max_task_retries=-1,
                      concurrency_groups={"extract": 1, "math": 2})(ColocatedExtractor)
