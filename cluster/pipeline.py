"""The benchmark pipeline across categories: extraction, sharded coreset and evaluation, overlapped.

Extraction work runs a bounded number of categories ahead on the extractor actors, so while the
driver runs one category's coreset the actors already embed the next categories, and evaluation
actors score finished banks and compute their metrics beside both. Who runs where, with how many
threads, is the resource plan's (``cluster.resources``). Results are keyed by sample index everywhere, so the
numbers do not depend on how many actors there are or which finishes first.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import ray

from anomaly_core import __version__
from anomaly_core.augment import Augmentation, TrainCopies
from anomaly_core.bank import MemoryBank, check_compatible
from anomaly_core.config import RunConfig
from anomaly_core.data import CategorySplit, ImageTransform, Sample, metric_groups
from anomaly_core.extraction import ExtractionSettings
from anomaly_core.feature_cache import FeatureCache, cache_fields, cache_key
from anomaly_core.features import coverage_radius_space
from anomaly_core.metrics import MetricReport
from anomaly_core.padim import GaussianMoments, PadimScoring, PadimStatistics, statistics_from_moments
from anomaly_core.patchcore import (
    anomalydino_preprocess,
    augment_base_seed,
    category_record,
    coreset_seed,
    scoring_params,
    train_copies,
    train_list_sha256,
)
from anomaly_core.scoring import Predictions, merge_predictions
from anomaly_core.thresholds import validation_thresholds
from cluster.cache_writer import write_entry
from cluster.colocated import colocated_actor
from cluster.coreset import HolderPool, distributed_coreset
from cluster.devices import pinned
from cluster.dispatch import Shard, ShardDispatcher
from cluster.evaluator import bank_reference, evaluator_actor
from cluster.extractor import extractor_actor
from cluster.resources import plan_resources
from cluster.scaling import acquire_nodes, withdraw_request
from cluster.sharding import plan_shards, shard_count
from cluster.store_stats import object_bytes
from cluster.system_stats import Samples

log = logging.getLogger("cluster.pipeline")


@dataclass
class CategoryJob:
    dataset: str
    root: str
    split: CategorySplit
    validation: tuple[Sample, ...] = ()  # good training images held out of the bank for thresholds

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
    thresholds: dict[str, Any] | None = None  # from the validation images; None: the test set's F1-optimal
    held_out: Predictions | None = None  # of the validation images (an ensemble member's normalisation)
    object_store: dict[str, int | None] = field(default_factory=dict)  # bytes the category put through the store

    @property
    def test_samples(self) -> tuple[Sample, ...]:
        return self.job.split.test


@dataclass
class PendingEvaluation:
    job: CategoryJob
    bank: MemoryBank
    metrics_ref: ray.ObjectRef
    slot: int  # the evaluator's position in the plan
    threads: int
    submitted: float
    validation_refs: list[ray.ObjectRef] = field(default_factory=list)  # predictions of held-out images
    stored: dict[str, list[ray.ObjectRef]] = field(default_factory=dict)  # the category's objects, by kind


class BenchmarkPipeline:
    """Owns the actor pools for one run; ``run`` yields each category's result as it completes.

    ``resource_wait_s`` > 0 (a run that joined a cluster): first ask the autoscaler for the extractors'
    nodes and wait up to that long for them (``cluster.scaling``); 0: plan on the nodes there are.
    """

    def __init__(self, config: RunConfig, on_event: Callable[[str, dict], None] | None = None,
                 resource_wait_s: float = 0.0) -> None:
        self.config = config
        self.settings = ExtractionSettings.from_config(config)
        self.augmentation = Augmentation(**config.augment.model_dump())
        self.plan = plan_resources(config.cluster, acquire_nodes(config.cluster, resource_wait_s),
                                   coreset=MEMORY_METHODS[config.method].coreset)
        for warning in self.plan.warnings:
            log.warning("resource plan: %s", warning)
        self.on_event = on_event or (lambda kind, info: None)
        restarts = config.cluster.max_restarts
        Extractor = colocated_actor(restarts) if self.plan.colocate else extractor_actor(restarts)
        Evaluator = evaluator_actor(restarts)
        self.extractors = [
            Extractor.options(**pinned(p)).remote(self.settings, self.plan.extractor_threads, self.plan.decode_workers[p.slot])
            for p in self.plan.extractors
        ]
        self.evaluators = [Evaluator.options(**pinned(p)).remote() for p in self.plan.evaluators]
        # Colocated: the extractors hold their own shards (cluster.colocated); else holder actors of their own.
        self.holders = (HolderPool([None] * len(self.extractors), actors=self.extractors) if self.plan.colocate
                        else HolderPool(self.plan.holders))
        # Colocated shards stay in their extractor, except where the feature cache must write them from the host.
        # PaDiM's moments are added on the driver: its shards must reach the object store.
        self.keep_features = (self.plan.colocate and not config.feature_cache.enabled
                              and MEMORY_METHODS[config.method].holds_features)
        # Fails fast (weights file errors, unknown layers) before any data is touched.
        self.description = ray.get(self.extractors[0].describe.remote())
        if resource_wait_s > 0:  # the actors hold their nodes now: let the cluster shrink after the run
            ray.get([actor.__ray_ready__.remote() for actor in (*self.extractors, *self.evaluators)])
            withdraw_request()
        self.dispatch = ShardDispatcher(self.extractors)
        self.transform = ImageTransform(
            resize=self.settings.resize, crop=self.settings.crop,
            mean=tuple(self.description["mean"]), std=tuple(self.description["std"]),
        )
        self._next_evaluator = 0
        self._evaluating: list[PendingEvaluation] = []
        self.stage = "the actors to start"  # what the driver blocks on now (see waiting_for)
        cache = config.feature_cache
        self.cache = FeatureCache(cache.dir) if cache.enabled else None
        self.cache_stats = {"hits": 0, "misses": 0, "failed_writes": 0}
        self._cache_writes: list[ray.ObjectRef] = []
        self._cache_queued: list[tuple[str, dict, list[Shard]]] = []  # written once their shards are submitted
        self._train_bytes: dict[str, int | None] = {}  # object-store bytes of each category's training features

    def _submit(self, samples: Sequence[Sample], copies: TrainCopies | None = None, copy: int = 0,
                seed: int = 0) -> list[Shard]:
        """Queue a sample list's shards for the next free extractor (``cluster.dispatch``).

        ``copy`` >= 1: the list's copy number ``copy`` of ``copies`` (training images only), keyed
        ``copy * len(samples) + index`` and seeded per (``seed``, index, copy), so neither depends on sharding.
        """
        n_shards = shard_count(len(samples), self.settings.batch_size, len(self.extractors))
        shards = []
        for shard in plan_shards(len(samples), self.settings.batch_size, n_shards):
            batch, indices = [samples[i] for i in shard], [copy * len(samples) + i for i in shard]
            augment = (copies, [copies.seed(seed, i, copy) for i in shard]) if copy else (None, None)
            held = (uuid.uuid4().hex,) if self.keep_features else ()  # the token the extractor keeps it under
            shards.append(self.dispatch.put(batch, indices, *augment, *held))
        return shards

    def _extract(self, job: CategoryJob, split: str, samples: Sequence[Sample]) -> list[Shard]:
        """A split's shards from the extractors: the training images with their copies (``_copies``)."""
        shards = self._submit(samples)
        copies = self._copies(job)
        if split == "train" and copies.enabled:
            seed = augment_base_seed(self.config.seed, job.dataset, job.split.category)
            for copy in range(1, copies.copies + 1):
                shards += self._submit(samples, copies, copy, seed)
        return shards

    def _copies(self, job: CategoryJob) -> TrainCopies:
        """The copies of the category's training images that join its bank (the engine's ``train_copies``)."""
        return train_copies(self.config, self.augmentation, job.split.dataset, job.split.category)

    def _features(self, job: CategoryJob, split: str, samples: Sequence[Sample]) -> list[Shard]:
        """A split's feature shards: from the feature cache when it holds them, else queued on the
        extractors (and, with the cache on, written to it once extracted)."""
        if self.cache is None or not samples:
            return self._extract(job, split, samples)
        copies = self._copies(job)
        augmented = copies.to_dict() if split == "train" and copies.enabled else None
        fields = cache_fields(self.description, job.dataset, job.split.category, split, samples, augmented)
        key = cache_key(fields)
        if key in self.cache:
            self.cache_stats["hits"] += 1
            log.info("feature cache hit: %s %s (%d images) from %s", job.key, split, len(samples), self.cache.path(key))
            return [_stored(ray.put(part)) for part in self.cache.load(key)]
        self.cache_stats["misses"] += 1
        log.info("feature cache miss: %s %s (%d images): extracting", job.key, split, len(samples))
        shards = self._extract(job, split, samples)
        self._cache_queued.append((key, fields, shards))
        return shards

    def _refs(self, shards: Sequence[Shard]) -> list[ray.ObjectRef]:
        """The shards' feature refs, once each is on an extractor; queues the cache writes whose shards all are."""
        refs = [shard.refs()[0] for shard in shards]
        ready = [entry for entry in self._cache_queued if all(shard.submitted.is_set() for shard in entry[2])]
        for key, fields, queued in ready:
            self._cache_queued.remove((key, fields, queued))
            self._cache_writes.append(write_entry(str(self.cache.folder), key, fields, self._refs(queued)))
        return refs

    def finish_cache_writes(self) -> None:
        """Wait for queued cache writes (a finished run leaves complete entries); failures are logged."""
        for _, _, shards in list(self._cache_queued):
            self._refs(shards)
        for problem in ray.get(self._cache_writes):
            if problem is not None:
                self.cache_stats["failed_writes"] += 1
                log.warning("feature cache: an entry could not be written (%s); the run is unaffected", problem)
        self._cache_writes = []

    def _extracting_nodes(self) -> set[str]:
        """Nodes whose extractors still have shards queued or running."""
        busy = self.dispatch.busy_slots()
        slots = range(len(self.plan.extractors)) if busy is None else busy
        return {self.plan.extractors[slot].node_id for slot in slots}

    def _active_evaluators(self) -> list[int]:
        """Slots of evaluators with a category still being scored."""
        refs = [entry.metrics_ref for entry in self._evaluating]
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False) if refs else ([], [])
        return [entry.slot for entry in self._evaluating if entry.metrics_ref not in set(done)]

    def _holder_threads(self) -> list[int]:
        """Threads per holder for the coreset about to run (README "Resources"); colocated extractors'
        math uses their own count (on a GPU the host does little of it)."""
        if self.plan.colocate:
            return [self.plan.extractor_threads] * len(self.extractors)
        extracting, busy = self._extracting_nodes(), self._active_evaluators()
        threads = []
        for p in self.plan.holders:
            active = sum(h.node_id == p.node_id for h in self.plan.holders) + sum(
                self.plan.evaluators[slot].node_id == p.node_id for slot in busy)
            threads.append(self.plan.math_threads(p, p.node_id in extracting, active))
        return threads

    def _evaluator_threads(self, slot: int, coreset_follows: bool) -> int:
        """Threads for evaluator ``slot``'s new category: fewer while a coreset or extraction shares its node."""
        p = self.plan.evaluators[slot]
        busy = self._active_evaluators() + [slot]
        active = sum(self.plan.evaluators[s].node_id == p.node_id for s in set(busy))
        if coreset_follows:
            active += sum(h.node_id == p.node_id for h in self.plan.holders)
        return self.plan.math_threads(p, p.node_id in self._extracting_nodes(), active)

    def build_bank(
        self, job: CategoryJob, train_shards: list[Shard] | None = None, test_shards: list[Shard] | None = None,
    ) -> MemoryBank:
        """Extract the training images (unless already queued) and build the configured method's memory from
        them (``MEMORY_METHODS``): PatchCore's bank, PaDiM's Gaussians."""
        train_shards = train_shards if train_shards is not None else self._features(job, "train", job.split.train)
        return MEMORY_METHODS[self.config.method].build(self, job, train_shards, test_shards)

    def _extracted(self, job: CategoryJob, train_shards: list[Shard]) -> tuple[list[ray.ObjectRef], float]:
        """The training shards' refs and the seconds the extractors took for them (cached shards took none),
        once every shard is extracted."""
        self.stage = f"extraction of {job.key} ({len(job.split.train)} train images, {len(self.extractors)} extractors)"
        train_refs = self._refs(train_shards)
        extract_s = sum(times["seconds"] for times in ray.get([shard.timing for shard in train_shards
                                                                if shard.timing is not None]))
        self.on_event("extracted", {"key": job.key, "images": len(job.split.train), "seconds": extract_s})
        self._train_bytes[job.key] = object_bytes(train_refs)
        return train_refs, extract_s

    def _recorded(self, job: CategoryJob) -> dict[str, Any]:
        """What every memory of a category records: the extraction, the category, its training images."""
        copies = self._copies(job)
        return {
            **{key: value for key, value in self.description.items() if key not in ("device", "pid")},
            "dataset": job.dataset,
            "category": job.split.category,
            "n_train_images": len(job.split.train),
            **({"augment": copies.to_dict()} if copies.enabled else {}),
            **category_record(self.config, job.split.dataset, job.split.category),
            "train_list_sha256": train_list_sha256(job.split.train, job.root),
        }

    def _patchcore_bank(self, job: CategoryJob, train_shards: list[Shard], test_shards: list[Shard] | None
                        ) -> MemoryBank:
        """PatchCore's bank by the sharded coreset.

        ``test_shards``: the category's queued test extraction. Where the extractors hold every core of
        a holder's node, the coreset waits for it: running beside it would only slow both (on the
        2-core development machine the pair took 33 s overlapped against ~23 s one after the other).
        """
        train_refs, extract_s = self._extracted(job, train_shards)
        saturated = any(holder.cpus < 1 for holder in self.plan.holders)
        test_refs = self._refs(test_shards) if test_shards and saturated else ()
        coreset = self.config.coreset
        seed = coreset_seed(self.config.seed, job.dataset, job.split.category)
        threads = self._holder_threads()
        self.stage = f"the coreset of {job.key} ({len(self.plan.holders)} holders)"
        features, info = distributed_coreset(
            train_refs,
            pool=self.holders,
            method=coreset.method,
            ratio=coreset.ratio,
            projection_dim=coreset.projection_dim,
            seed=seed,
            mode=coreset.distributed,
            batch=self.config.cluster.coreset_batch,
            threads=threads,
            after=test_refs,
            owners=[shard.slot for shard in train_shards] if self.plan.colocate else (),
        )
        metadata = {
            **self._recorded(job),
            "coreset": {"method": coreset.method, "ratio": coreset.ratio, "projection_dim": coreset.projection_dim,
                        "seed": seed, "distributed": coreset.distributed, **info["coreset"],
                        "coverage_radius_space": coverage_radius_space(coreset.method, coreset.projection_dim)},
            "scoring": self.config.scoring.model_dump(),
            "n_patches": info["n_patches"],
            "grid": info["grid"],
            "package_version": __version__,
            "timings": {"extract_train_s": round(extract_s, 4), "coreset_s": round(info["seconds"], 4),
                        "coreset_threads": threads},
        }
        self.on_event("bank", {"key": job.key, "memory_size": len(features), "seconds": info["seconds"]})
        return MemoryBank(features=features, metadata=metadata)

    def _padim_statistics(self, job: CategoryJob, train_shards: list[Shard], test_shards: list[Shard] | None
                          ) -> PadimStatistics:
        """PaDiM's Gaussians: the driver fetches the training shards one at a time (queued, and cached, in
        sample-index order; ``GaussianMoments`` refuses any other) and adds each image to the moments
        (``anomaly_core.padim``: bit-identical for any number of extractors)."""
        train_refs, extract_s = self._extracted(job, train_shards)
        self.stage = f"the PaDiM statistics of {job.key}"
        started = time.perf_counter()
        moments = GaussianMoments()
        for ref in train_refs:
            moments.add(ray.get(ref))
        padim = self.config.padim
        metadata = {**self._recorded(job), "method": "padim", "covariance_epsilon": padim.epsilon,
                    "scoring": padim_scoring_record(self.config), "package_version": __version__}
        statistics = statistics_from_moments(moments, padim.epsilon, metadata)
        seconds = time.perf_counter() - started
        statistics.metadata["timings"] = {"extract_train_s": round(extract_s, 4), "statistics_s": round(seconds, 4)}
        self.on_event("bank", {"key": job.key, "memory_size": len(statistics.features), "seconds": seconds})
        return statistics

    def submit_evaluation(
        self, job: CategoryJob, bank: MemoryBank, test_shards: list[Shard] | None = None,
        coreset_follows: bool = False, validation_shards: list[Shard] | None = None,
    ) -> "PendingEvaluation":
        """Score the test shards (and held-out validation images) on one evaluator and queue its metrics
        call; returns without waiting.

        ``coreset_follows``: another category's coreset will share the nodes meanwhile (fewer threads).
        """
        check_compatible(bank.metadata, {**self.description, **category_record(self.config, job.split.dataset,
                                                                                 job.split.category)}, f"for {job.key}")
        test_shards = test_shards if test_shards is not None else self._features(job, "test", job.split.test)
        validation_shards = (validation_shards if validation_shards is not None
                             else self._features(job, "validation", job.validation))
        test_refs, validation_refs = self._refs(test_shards), self._refs(validation_shards)
        slot = self._next_evaluator % len(self.evaluators)
        self._next_evaluator += 1
        threads = self._evaluator_threads(slot, coreset_follows)
        bank_ref = bank_reference(bank.scoring_payload())
        params = MEMORY_METHODS[self.config.method].params(self.config, job)
        crop = self.settings.crop
        evaluator = self.evaluators[slot]

        def score(shard: Shard, ref: ray.ObjectRef) -> ray.ObjectRef:
            return self._scorer(evaluator, shard).score.remote(job.key, bank_ref, params, ref, crop, threads)

        prediction_refs = [score(shard, ref) for shard, ref in zip(test_shards, test_refs)]
        # Before finish, which frees the category's scorer on the evaluator.
        validation = [score(shard, ref) for shard, ref in zip(validation_shards, validation_refs)]
        metrics_ref = evaluator.finish.remote(
            job.key, list(job.split.test), self.transform, self.config.metrics.pro_fpr_limit,
            metric_groups(job.split.dataset), *prediction_refs,
        )
        stored = {"test_features": test_refs, "validation_features": validation_refs,
                  "bank": bank_ref, "predictions": [*prediction_refs, *validation]}
        pending = PendingEvaluation(job, bank, metrics_ref, slot, threads, time.perf_counter(), validation, stored)
        self._evaluating.append(pending)
        return pending

    def _scorer(self, evaluator: Any, shard: Shard) -> Any:
        """Who scores a shard: colocated, the extractor that holds it (any, for a feature-cache hit); else the
        category's evaluator."""
        if not self.plan.colocate:
            return evaluator
        slot = shard.slot if shard.slot is not None else self._next_evaluator % len(self.extractors)
        return self.extractors[slot]

    def collect(self, pending: "PendingEvaluation") -> CategoryResult:
        predictions, report, metrics_s = ray.get(pending.metrics_ref)
        self._evaluating.remove(pending)
        timings = {**pending.bank.metadata.get("timings", {}), "evaluate_s": round(time.perf_counter() - pending.submitted, 4),
                   "metrics_s": round(metrics_s, 4), "eval_threads": pending.threads}
        thresholds, held_out = None, None
        if pending.validation_refs:
            held_out = merge_predictions(ray.get(pending.validation_refs))
            thresholds = validation_thresholds(held_out, self.config.thresholds.quantile)
            thresholds["validation_scores"] = [float(score) for score in held_out.scores]
        self.on_event("evaluated", {"key": pending.job.key, "images": len(pending.job.split.test), "report": report})
        stored = {f"{kind}_bytes": object_bytes(refs) for kind, refs in pending.stored.items()}
        stored["train_features_bytes"] = self._train_bytes.pop(pending.job.key, None)
        return CategoryResult(pending.job, pending.bank, predictions, report, timings, thresholds, held_out, stored)

    def run(self, jobs: Sequence[CategoryJob]) -> Iterator[CategoryResult]:
        """All categories, overlapped: extraction runs ``prefetch_categories`` ahead of the coreset,
        evaluation and metrics of finished banks run beside both; results come as they finish."""
        started = time.perf_counter()
        ahead = self.config.cluster.prefetch_categories
        queued = deque(self._queue(job) for job in jobs[:ahead])
        pending: list[PendingEvaluation] = []
        for position in range(len(jobs)):
            job, train, test, validation = queued.popleft()
            if position + ahead < len(jobs):
                queued.append(self._queue(jobs[position + ahead]))
            bank = self.build_bank(job, train, test)
            follows = position + 1 < len(jobs)
            pending.append(self.submit_evaluation(job, bank, test, follows, validation))
            yield from self._finished(pending, wait=False)
        while pending:
            yield from self._finished(pending, wait=True)
        self.finish_cache_writes()
        self.on_event("done", {"seconds": time.perf_counter() - started})

    def waiting_for(self) -> str:
        """What the run waits for, and what the cluster has free (for a stalled run's log line)."""
        free = {key: round(value, 2) for key, value in ray.available_resources().items() if "CPU" in key or "GPU" in key}
        return f"{self.stage}; free in the cluster now: {free or 'nothing'}"

    def _queue(self, job: CategoryJob) -> tuple[CategoryJob, list, list, list]:
        """Queue a category's train, test and validation extraction (in that order)."""
        return (job, self._features(job, "train", job.split.train), self._features(job, "test", job.split.test),
                self._features(job, "validation", job.validation))

    def _finished(self, pending: list["PendingEvaluation"], wait: bool) -> list[CategoryResult]:
        refs = [entry.metrics_ref for entry in pending]
        if wait:
            self.stage = "the evaluation of " + ", ".join(entry.job.key for entry in pending)
        ready, _ = ray.wait(refs, num_returns=1 if wait else len(refs), timeout=None if wait else 0)
        done = [entry for entry in pending if entry.metrics_ref in ready]
        for entry in done:
            pending.remove(entry)
        return [self.collect(entry) for entry in done]

    def close(self) -> None:
        """Stop the run's actors now, so a next pipeline (an ensemble's next member) gets their resources
        at once rather than when Ray gets round to collecting the handles."""
        self.dispatch.close()
        for actor in (*self.extractors, *self.evaluators, *self.holders.actors):
            ray.kill(actor)

    def actor_stats(self) -> dict[str, list[dict]]:
        return {
            "extractors": ray.get([actor.stats.remote() for actor in self.extractors]),
            "evaluators": ray.get([actor.stats.remote() for actor in self.evaluators]),
        }

    def system_samples(self) -> Samples:
        """Each actor's system samples since the last call (``cluster.system_stats``), as ``<role>_<position>``."""
        names = [f"{role}_{position}" for role, actors in (("extractor", self.extractors), ("evaluator", self.evaluators))
                 for position in range(len(actors))]
        return dict(zip(names, ray.get([actor.system_samples.remote() for actor in (*self.extractors, *self.evaluators)])))


@dataclass(frozen=True)
class MemoryMethod:
    """A memory-based method of jobs.benchmark (``config.method``), so the pipeline and the jobs look its
    parts up here and never ask for a method by name: how a category's memory is built from its training
    shards, the scoring parameters its evaluators build their scorer from (``params.scorer``), what the saved
    memory records of that scoring, and whether colocated extractors may keep the shards they embed."""

    build: Callable[["BenchmarkPipeline", CategoryJob, list[Shard], list[Shard] | None], MemoryBank]
    params: Callable[[RunConfig, CategoryJob], Any]
    scoring_record: Callable[[RunConfig], dict[str, Any]]
    holds_features: bool
    min_train_images: int  # preflight refuses a category with fewer
    coreset: bool  # selects a coreset: the plan starts coreset holders for it


def _patchcore_params(config: RunConfig, job: CategoryJob) -> Any:
    return scoring_params(config, anomalydino_preprocess(config, job.split.dataset, job.split.category))


def padim_scoring_record(config: RunConfig) -> dict[str, Any]:
    return {"blur_sigma": config.padim.blur_sigma, "image_score": "map_max"}


MEMORY_METHODS: dict[str, MemoryMethod] = {
    "patchcore": MemoryMethod(BenchmarkPipeline._patchcore_bank, _patchcore_params,
                              lambda config: config.scoring.model_dump(), holds_features=True, min_train_images=1,
                              coreset=True),
    "padim": MemoryMethod(BenchmarkPipeline._padim_statistics,
                          lambda config, job: PadimScoring(**padim_scoring_record(config)),
                          padim_scoring_record, holds_features=False, min_train_images=2, coreset=False),
}


def _stored(ref: ray.ObjectRef) -> Shard:
    """A shard already in the object store (a feature-cache hit): nothing to extract, no extraction time."""
    shard = Shard(args=(), features=ref)
    shard.submitted.set()
    return shard
