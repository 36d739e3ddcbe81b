"""Ensembles on the cluster: each member backbone's pipeline over the categories, then each category combined.

Members run one after another, each as an ordinary ``BenchmarkPipeline`` with the whole cluster: its
extractors hold one backbone, and its extraction, coreset and evaluation overlap across categories as
in any run. Side by side, members would only split every GPU and core between them. A member's
results are written as they come (``jobs.outputs``, ``members/<label>/``), so the driver holds no
member's maps and a resumed run keeps finished members; the combination reads them back.
"""

from __future__ import annotations

import hashlib
import logging
import time
from contextlib import nullcontext
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from anomaly_core.bank import MemoryBank
from anomaly_core.config import RunConfig
from anomaly_core.data import ImageTransform, metric_groups
from anomaly_core.ensemble import Normalisation, combine
from anomaly_core.metrics import METRIC_NAMES, grouped_name, grouped_names
from anomaly_core.patchcore import evaluate
from anomaly_core.thresholds import validation_thresholds
from cluster.pipeline import BenchmarkPipeline, CategoryJob, CategoryResult
from cluster.system_stats import Samples, SystemPoll

log = logging.getLogger("cluster.ensemble")

ENSEMBLE_KEY = "ensemble"  # an ensemble category's record (in place of a bank's metadata) lists its members here
# What each member contributes to the ensemble record, from its bank's metadata.
MEMBER_FIELDS = ("backbone", "layers", "weights_sha256", "memory_size", "feature_dim", "n_patches", "bank_sha256")
NORMALISATION = ("z-score per member: image scores by the mean and standard deviation of its held-out good "
                 "images' scores, maps by those of every pixel of their maps; the ensemble averages the members")


class MemberRun:
    """One member's pipeline over the categories it has still to do; its actors stop when it is done. With
    ``on_system``, their system samples go there while it runs (``cluster.system_stats.SystemPoll``)."""

    def __init__(self, config: RunConfig, label: str, on_event: Callable[[str, dict], None],
                 resource_wait_s: float = 0.0, on_system: Callable[[Samples], object] | None = None) -> None:
        self.config, self.label, self.on_event, self.resource_wait_s = config, label, on_event, resource_wait_s
        self.on_system = on_system
        self.stats: dict[str, Any] = {}

    def _event(self, kind: str, info: dict) -> None:
        if kind != "done":  # the ensemble's progress ends after its last member, not after each
            self.on_event(kind, {**info, "key": f"{info.get('key', '?')} [{self.label}]"})

    def run(self, jobs: Sequence[CategoryJob]) -> Iterator[CategoryResult]:
        pipeline = BenchmarkPipeline(self.config, on_event=self._event, resource_wait_s=self.resource_wait_s)
        polled = SystemPoll(pipeline.system_samples, self.on_system) if self.on_system is not None else nullcontext()
        try:
            with polled:
                yield from pipeline.run(jobs)
            self.stats = {"plan": pipeline.plan.summary(), **pipeline.actor_stats(), "feature_cache": pipeline.cache_stats}
        finally:
            pipeline.close()


def ensemble_result(job: CategoryJob, labels: Sequence[str], members: Sequence[CategoryResult],
                    config: RunConfig) -> CategoryResult:
    """A category's ensemble result from its members' (each with the predictions of its held-out images).

    Its metrics are the ensemble's, with each member's beside them as ``<label>/<metric>``; its "bank" is
    a record of the members (no rows of its own), digested from the members' bank digests.
    """
    started = time.perf_counter()
    missing = [label for label, member in zip(labels, members) if member.held_out is None]
    if missing:
        raise ValueError(f"{job.key}: ensemble members {missing} have no held-out predictions to normalise with")
    norms = [Normalisation.fit(member.held_out, f"{label} ({job.key})") for label, member in zip(labels, members)]
    predictions = combine([member.predictions for member in members], norms)
    held_out = combine([member.held_out for member in members], norms)
    first = members[0].bank.metadata
    transform = ImageTransform(resize=first["resize"], crop=first["crop"], mean=tuple(first["mean"]),
                               std=tuple(first["std"]))
    report = evaluate(job.split.test, predictions, transform, config.metrics.pro_fpr_limit,
                      metric_groups(job.split.dataset))
    for label, member in zip(labels, members):
        names = [*METRIC_NAMES, *grouped_names(member.report.values)]
        report.values.update({grouped_name(label, name): member.report.values.get(name) for name in names})
        report.notes.update({grouped_name(label, name): note for name, note in member.report.notes.items()})
    records = [{"label": label, **{key: member.bank.metadata.get(key) for key in MEMBER_FIELDS},
                "normalisation": norm.to_dict()} for label, member, norm in zip(labels, members, norms)]
    digest = hashlib.sha256("\n".join(record["bank_sha256"] for record in records).encode()).hexdigest()
    metadata = {
        ENSEMBLE_KEY: records,
        "normalisation": NORMALISATION,
        "n_held_out": len(held_out.scores),
        "dataset": job.dataset,
        "category": job.split.category,
        **{key: first[key] for key in ("resize", "crop", "mean", "std")},  # the first member's, for pictures
        "memory_size": sum(record["memory_size"] for record in records),
        "bank_sha256": digest,
    }
    timings = _summed([member.timings for member in members])
    timings["ensemble_s"] = round(time.perf_counter() - started, 4)
    thresholds = None
    if config.thresholds.source == "validation":
        thresholds = validation_thresholds(held_out, config.thresholds.quantile)
        thresholds["validation_scores"] = [float(score) for score in held_out.scores]
    features = np.empty((0, sum(record["feature_dim"] for record in records)), np.float32)
    return CategoryResult(job, MemoryBank(features, metadata), predictions, report, timings, thresholds, held_out)


def _summed(timings: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stage seconds added over the members (they ran one after another); thread counts left out."""
    keys = [key for key in timings[0] if key.endswith("_s")]
    return {key: round(sum(float(entry.get(key) or 0.0) for entry in timings), 4) for key in keys}
