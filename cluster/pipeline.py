"""The benchmark pipeline across categories: extraction, sharded coreset and evaluation, overlapped.

Extraction work for every category is queued on the extractor actors up front, so while the driver
runs one category's coreset the actors already embed the next categories, and evaluation actors and
metric tasks of finished banks run beside both. Results are keyed by sample index everywhere, so the
numbers do not depend on how many actors there are or which finishes first.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import ray

from anomaly_core import __version__
from anomaly_core.bank import MemoryBank, check_compatible
from anomaly_core.config import RunConfig
from anomaly_core.data import CategorySplit, ImageTransform, Sample
from anomaly_core.metrics import MetricReport
from anomaly_core.patchcore import ExtractionSettings, Predictions, coreset_seed, scoring_params, train_list_sha256
from cluster.coreset import HolderPool, distributed_coreset
from cluster.evaluator import bank_reference, category_metrics, evaluator_actor
from cluster.extractor import extractor_actor
from cluster.sharding import plan_shards

# Coreset holders, evaluators and metric tasks reserve no logical CPU, so they are scheduled beside
# the extractors even on a small machine (they mostly wait on the driver); SPREAD places them across
# nodes, which spreads the memory of the coreset shards.
LIGHT_CPUS = 0.0


@dataclass(frozen=True)
class ClusterPlan:
    n_extractors: int
    extractor_cpus: float
    extractor_gpus: float
    extractor_threads: int
    n_evaluators: int


def plan_cluster(cluster: Any, resources: dict[str, float]) -> ClusterPlan:
    """Size the actor pools from the config and what the cluster offers."""
    cpus, gpus = resources.get("CPU", 1.0), resources.get("GPU", 0.0)
    use_gpu = cluster.gpus_per_extractor > 0 and gpus > 0
    if cluster.num_extractors == "auto":
        n = int(gpus // cluster.gpus_per_extractor) if use_gpu else int(cpus // max(cluster.cpus_per_actor, 2.0))
    else:
        n = cluster.num_extractors
    n = max(1, n)
    # Fixed by the config, never by the actor count: CPU conv kernels round differently with
    # different thread counts, and banks must be bit-identical for 1 or N extractors.
    threads = max(1, int(cluster.cpus_per_actor))
    n_eval = cluster.num_evaluators if cluster.num_evaluators != "auto" else max(1, min(4, n))
    return ClusterPlan(n, cluster.cpus_per_actor, cluster.gpus_per_extractor if use_gpu else 0.0, threads, n_eval)


@dataclass
class CategoryJob:
    dataset: str
    root: str
    split: CategorySplit

    @property
    def key(self) -> str:
        return f"{self.dataset}/{self.split.category}"


@dataclass
class CategoryResult:
    job: CategoryJob
    bank: MemoryBank
    predictions: Predictions
    report: MetricReport
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def test_samples(self) -> tuple[Sample, ...]:
        return self.job.split.test


@dataclass
class PendingEvaluation:
    job: CategoryJob
    bank: MemoryBank
    metrics_ref: ray.ObjectRef
    evaluator: Any
    submitted: float


class BenchmarkPipeline:
    """Owns the actor pools for one run; ``run`` yields each category's result as it completes."""

    def __init__(self, config: RunConfig, on_event: Callable[[str, dict], None] | None = None) -> None:
        self.config = config
        self.settings = ExtractionSettings.from_config(config)
        self.plan = plan_cluster(config.cluster, ray.cluster_resources())
        self.on_event = on_event or (lambda kind, info: None)
        restarts = config.cluster.max_restarts
        Extractor = extractor_actor(self.plan.extractor_cpus, self.plan.extractor_gpus, restarts)
        Evaluator = evaluator_actor(LIGHT_CPUS, restarts)
        self.extractors = [Extractor.remote(self.settings, self.plan.extractor_threads) for _ in range(self.plan.n_extractors)]
        self.evaluators = [Evaluator.remote(1) for _ in range(self.plan.n_evaluators)]
        self.holders = HolderPool(config.cluster.coreset_shards, LIGHT_CPUS)
        # Fails fast (weights file errors, unknown layers) before any data is touched.
        self.description = ray.get(self.extractors[0].describe.remote())
        self.transform = ImageTransform(
            resize=self.settings.resize, crop=self.settings.crop,
            mean=tuple(self.description["mean"]), std=tuple(self.description["std"]),
        )
        self._next_extractor = 0
        self._next_evaluator = 0

    def _submit(self, samples: Sequence[Sample]) -> list[ray.ObjectRef]:
        """Queue a sample list's shards on the extractors, round robin; returns one ref per shard."""
        n_shards = max(len(self.extractors), 1) * 2
        refs = []
        for shard in plan_shards(len(samples), self.settings.batch_size, n_shards):
            actor = self.extractors[self._next_extractor % len(self.extractors)]
            self._next_extractor += 1
            refs.append(actor.extract.remote([samples[i] for i in shard], list(shard)))
        return refs

    def build_bank(self, job: CategoryJob, train_refs: list[ray.ObjectRef] | None = None) -> MemoryBank:
        """Extract the training images (unless already queued) and select the bank with the sharded coreset."""
        train_refs = train_refs if train_refs is not None else self._submit(job.split.train)
        extract_s = sum(part.seconds for part in ray.get(train_refs))
        self.on_event("extracted", {"key": job.key, "images": len(job.split.train), "seconds": extract_s})
        coreset = self.config.coreset
        seed = coreset_seed(self.config.seed, job.dataset, job.split.category)
        features, info = distributed_coreset(
            train_refs,
            pool=self.holders,
            method=coreset.method,
            ratio=coreset.ratio,
            projection_dim=coreset.projection_dim,
            seed=seed,
            mode=coreset.distributed,
            batch=self.config.cluster.coreset_batch,
        )
        metadata = {
            **{key: value for key, value in self.description.items() if key not in ("device", "pid")},
            "dataset": job.dataset,
            "category": job.split.category,
            "n_train_images": len(job.split.train),
            "train_list_sha256": train_list_sha256(job.split.train, job.root),
            "coreset": {"method": coreset.method, "ratio": coreset.ratio, "projection_dim": coreset.projection_dim,
                        "seed": seed, "distributed": coreset.distributed, **info["coreset"]},
            "scoring": self.config.scoring.model_dump(),
            "n_patches": info["n_patches"],
            "grid": info["grid"],
            "package_version": __version__,
            "timings": {"extract_train_s": round(extract_s, 4), "coreset_s": round(info["seconds"], 4)},
        }
        self.on_event("bank", {"key": job.key, "memory_size": len(features), "seconds": info["seconds"]})
        return MemoryBank(features=features, metadata=metadata)

    def submit_evaluation(
        self, job: CategoryJob, bank: MemoryBank, test_refs: list[ray.ObjectRef] | None = None
    ) -> "PendingEvaluation":
        """Score the test shards on one evaluator and queue the metrics task; returns without waiting."""
        check_compatible(bank.metadata, self.description, f"for {job.key}")
        test_refs = test_refs if test_refs is not None else self._submit(job.split.test)
        evaluator = self.evaluators[self._next_evaluator % len(self.evaluators)]
        self._next_evaluator += 1
        bank_ref = bank_reference(bank.features)
        params, crop = scoring_params(self.config), self.settings.crop
        prediction_refs = [evaluator.score.remote(job.key, bank_ref, params, ref, crop) for ref in test_refs]
        metrics_ref = category_metrics.options(num_cpus=LIGHT_CPUS).remote(
            list(job.split.test), self.transform, self.config.metrics.pro_fpr_limit, *prediction_refs
        )
        return PendingEvaluation(job, bank, metrics_ref, evaluator, time.perf_counter())

    def collect(self, pending: "PendingEvaluation") -> CategoryResult:
        predictions, report, metrics_s = ray.get(pending.metrics_ref)
        pending.evaluator.release.remote(pending.job.key)
        timings = {**pending.bank.metadata.get("timings", {}),
                   "evaluate_s": round(time.perf_counter() - pending.submitted, 4), "metrics_s": round(metrics_s, 4)}
        self.on_event("evaluated", {"key": pending.job.key, "images": len(pending.job.split.test), "report": report})
        return CategoryResult(pending.job, pending.bank, predictions, report, timings)

    def run(self, jobs: Sequence[CategoryJob]) -> Iterator[CategoryResult]:
        """All categories, overlapped: extraction runs ``prefetch_categories`` ahead of the coreset,
        evaluation and metrics of finished banks run beside both; results come as they finish."""
        started = time.perf_counter()
        ahead = self.config.cluster.prefetch_categories
        queued = deque((job, self._submit(job.split.train), self._submit(job.split.test)) for job in jobs[:ahead])
        pending: list[PendingEvaluation] = []
        for position in range(len(jobs)):
            job, train_refs, test_refs = queued.popleft()
            if position + ahead < len(jobs):
                later = jobs[position + ahead]
                queued.append((later, self._submit(later.split.train), self._submit(later.split.test)))
            pending.append(self.submit_evaluation(job, self.build_bank(job, train_refs), test_refs))
            yield from self._finished(pending, wait=False)
        while pending:
            yield from self._finished(pending, wait=True)
        self.on_event("done", {"seconds": time.perf_counter() - started})

    def _finished(self, pending: list["PendingEvaluation"], wait: bool) -> list[CategoryResult]:
        refs = [entry.metrics_ref for entry in pending]
        ready, _ = ray.wait(refs, num_returns=1 if wait else len(refs), timeout=None if wait else 0)
        done = [entry for entry in pending if entry.metrics_ref in ready]
        for entry in done:
            pending.remove(entry)
        return [self.collect(entry) for entry in done]

    def actor_stats(self) -> list[dict]:
        return ray.get([actor.stats.remote() for actor in self.extractors])
