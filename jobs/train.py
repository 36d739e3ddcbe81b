"""Trained models for every category of every configured dataset, on Ray: Reverse Distillation or STFPM.

    python -m jobs.train --config configs/reverse_distillation.yaml [--set key=value ...] [--categories a,b] [--wandb MODE]
    python -m jobs.train --resume outputs/<run>     # finished categories kept, the others continue from their latest checkpoint

Categories train in parallel as Ray tasks (``training.gpus_per_worker`` each); those in ``training.ddp_categories``
on ``training.ddp_workers`` Ray Train workers. Each trained model is scored on the test set and its metrics
computed by the evaluation actor, as a memory bank's; the run folder has PatchCore's layout with
``model.safetensors`` + ``model.json`` (and ``checkpoints/``) in place of the bank. What no node can hold is
refused before any task starts (after a bounded wait for the autoscaler on a joined cluster); a task lost
with its node is retried from the category's latest checkpoint (``cluster/training.py``).
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import ray
from ray.util.queue import Empty, Queue
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from anomaly_core.config import ConfigError, RunConfig
from anomaly_core.data import ImageTransform, metric_groups
from cluster.devices import pinned
from cluster.evaluator import evaluator_actor
from cluster.pipeline import CategoryJob, CategoryResult
from cluster.scaling import withdraw_request
from cluster.system_stats import SystemPoll
from cluster.training import (
    HISTORY,
    build_model,
    evaluator_placement,
    submit_fit,
    task_options,
    threads_of,
    timed_predict,
    transform_of,
)
from jobs.benchmark import print_done, run_main, start_run, tracked_run, write_run
from jobs.cli import single_backbone
from jobs.compare import method_of
from jobs.outputs import category_folder, released, write_category
from jobs.preflight import check_jobs
from jobs.ray_runtime import resource_wait_s, start_ray
from jobs.report import figure_paths, training_figure, write_category_figure
from jobs.resume import model_record
from jobs.tracking import Tracker

log = logging.getLogger("jobs.train")


def check_training(config: RunConfig) -> RunConfig:
    """What a training run needs beyond a valid config; errors name the key."""
    if config.training is None:
        raise ConfigError("training: missing; jobs.train needs a training section (see configs/reverse_distillation.yaml)")
    single_backbone(config, "jobs.train")
    if config.thresholds.source == "validation":
        raise ConfigError("thresholds.source=validation: jobs.train keeps every good training image for training; "
                          "use test_f1")
    if config.preprocess.gpu_jpeg_decode:
        raise ConfigError("preprocess.gpu_jpeg_decode: jobs.train decodes and resizes with PIL; set it to false")
    return config


def preflight(config: RunConfig, jobs: list[CategoryJob]) -> None:
    """The model (teacher weights, layers, crop) is built once on the driver's CPU, the data checked, before Ray."""
    try:
        build_model(config)
    except ValueError as error:
        raise ConfigError(f"training ({config.training.model}, teacher {config.backbone.name} {config.backbone.layers}, "
                          f"weights {config.backbone.weights}): {error}") from None
    check_jobs(config, jobs, need_test=True)


class EventLog:
    """Drains the training events queue on a thread: W&B gets every event (the training processes' system
    samples among them), the log a line per epoch."""

    def __init__(self, events: Queue, tracker: Tracker, epochs: int, max_steps: int | None) -> None:
        # A recipe counted in steps (max_steps) ends long before its epochs bound: its progress is in steps.
        self.events, self.tracker, self.epochs, self.max_steps = events, tracker, epochs, max_steps
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._drain, name="training-events", daemon=True)
        self.thread.start()

    def _drain(self) -> None:
        while not (self.stop.is_set() and self.events.empty()):
            try:
                event = self.events.get(timeout=0.5)
            except Empty:
                continue
            if event["kind"] == "system":
                self.tracker.log_system({event["process"]: event["samples"]})
                continue
            if event["kind"] == "epoch":
                metrics = event.get("metrics") or {}
                auroc = metrics.get("image_auroc")
                where = (f"epoch {event['epoch'] + 1}/{self.epochs}" if self.max_steps is None
                         else f"epoch {event['epoch'] + 1}, step {event['step']}/{self.max_steps}")
                log.info("%s %s: loss %.5f%s", event["key"], where, event["loss"],
                         "" if auroc is None else f", image AUROC {auroc:.4f}")
            if self.tracker.active:
                self.tracker.log_training(event)

    def close(self) -> None:
        self.stop.set()
        self.thread.join()


def run(config: RunConfig, run_name: str | None = None, only: set[str] | None = None, resume: Path | None = None) -> Path:
    config, jobs, run_dir, kept = start_run(check_training(config), run_name, only, resume, preflight)
    todo = [job for job in jobs if job.key not in kept]
    started = time.perf_counter()
    transform = transform_of(config)
    results: list[CategoryResult] = []
    categories = ",".join(job.key for job in jobs) if len(jobs) <= 3 else f"{len(jobs)} categories"
    with tracked_run(config, "train", run_dir, f"train {config.training.model} {categories}", jobs) as tracker:
        tracker.define_metrics(method_of({"config": config.model_dump(mode="json"), "job": "train"}), [job.key for job in todo])
        for result in kept.values():
            tracker.use_backbone(result.bank.metadata)
            tracker.log_category(result, transform)
            results.append(released(result))
        gpu_s = 0.0
        if todo:
            log.info("Ray: %s; resources %s", start_ray(), ray.cluster_resources())
            trained, gpu_s = train_and_evaluate(config, run_dir, todo, tracker, transform)
            results += trained
        seconds = time.perf_counter() - started
        extra: dict[str, Any] = {"job": "train", "cluster": {"resources": ray.cluster_resources() if todo else {},
                                                             "gpu_s": round(gpu_s, 3)}}
        if resume is not None:
            extra["resumed"] = sorted(kept)
        report = write_run(config, run_dir, jobs, results, seconds, extra, tracker)
    print_done(results, seconds, run_dir, report)
    return run_dir


def train_and_evaluate(config: RunConfig, run_dir: Path, todo: list[CategoryJob], tracker: Tracker,
                       transform: ImageTransform) -> tuple[list[CategoryResult], float]:
    """Fit every category at once (fit tasks, and DDP categories' Ray Train runs in tasks of their own), then
    score each model as it finishes and compute its metrics on the evaluation actor; results written as they
    come. Nothing is submitted before the cluster is known to hold what the training needs. The evaluator
    (a CPU of its own) starts with the fits, so its imports are done when the first model is.

    Returns the results and the GPU-seconds the fit and predict tasks held (``training.gpus_per_worker`` x
    the seconds each task ran, per Ray Train worker). System samples reach W&B while the run goes: each
    training process's as ``fit_<n>`` (``n``: the category's place in the run; ``resolved_fit_processes``
    in the run config), the evaluator's as ``evaluator_0``."""
    wait_s = resource_wait_s(config.cluster)
    placement = evaluator_placement(config, todo, wait_s)
    # On the driver's node: a queue on a node that dies would take every later fit attempt's events with it.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    events = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
    drain = EventLog(events, tracker, config.training.epochs, config.training.max_steps)
    predict_task = ray.remote(timed_predict)
    options, threads = task_options(config), threads_of(config)
    keys = [f"{dataset.name}/{category}" for dataset in config.datasets for category in dataset.categories or []]
    processes = {key: f"fit_{position}" for position, key in enumerate(keys)}  # stable across a --resume
    tracker.log_resolved({"task_options": options, "threads": threads,
                          "fit_processes": {processes[job.key]: job.key for job in todo}})
    folders = {job.key: str(category_folder(run_dir, job)) for job in todo}
    started = {job.key: time.perf_counter() for job in todo}
    evaluator = evaluator_actor(config.cluster.max_restarts).options(**pinned(placement)).remote()
    fits = {submit_fit(config, job, folders[job.key], events, run_dir, processes[job.key]): job for job in todo}
    if wait_s > 0:  # the queued fits are the autoscaler's demand now: let the cluster shrink after the run
        withdraw_request()
    results, worker_s = [], 0.0
    polled = (SystemPoll(lambda: {"evaluator_0": ray.get(evaluator.system_samples.remote())}, tracker.log_system)
              if tracker.active else nullcontext())
    try:
        with polled:
            scoring: dict[ray.ObjectRef, tuple[CategoryJob, float, float, ray.ObjectRef]] = {}
            while fits or scoring:
                ready, _ = ray.wait(list(fits) + list(scoring), num_returns=1)
                ref = ready[0]
                if ref in fits:
                    job = fits.pop(ref)
                    worker_s += ray.get(ref)  # raises the category's training error
                    train_s = time.perf_counter() - started[job.key]
                    metrics, predict_s = _score(config, job, folders, predict_task, evaluator, threads, options)
                    scoring[metrics] = (job, train_s, time.perf_counter(), predict_s)
                    continue
                job, train_s, submitted, predict_s = scoring.pop(ref)
                predictions, report, metrics_s = ray.get(ref)
                worker_s += ray.get(predict_s)
                folder = Path(folders[job.key])
                timings = {"train_s": round(train_s, 4), "evaluate_s": round(time.perf_counter() - submitted, 4),
                           "metrics_s": round(metrics_s, 4)}
                result = CategoryResult(job, model_record(folder), predictions, report, timings)
                write_category_figure(run_dir, result, transform)
                record = json.loads((folder / HISTORY).read_text())
                training_figure(record["history"], record["steps"], f"{job.key}: {config.training.model}",
                                figure_paths(run_dir, [result])[f"training/{job.key}"])
                write_category(run_dir, result, config)
                tracker.log_category(result, transform)
                tracker.use_backbone(result.bank.metadata)
                tracker.log_model(job, folder)
                log.info("%s done: %s -> %s", job.key, ", ".join(f"{name}={report.values[name]:.3f}" for name in
                                                               ("image_auroc", "pixel_auroc", "aupro")
                                                               if report.values.get(name) is not None), folder)
                results.append(released(result))
    finally:
        drain.close()
        ray.kill(evaluator)
    return results, worker_s * config.training.gpus_per_worker


def _score(config: RunConfig, job: CategoryJob, folders: dict[str, str], predict_task: Any, evaluator: Any,
           threads: int, options: dict) -> tuple[ray.ObjectRef, ray.ObjectRef]:
    """The test set's predictions from the written model (a task on the training resources), then metrics; and
    the seconds the prediction task ran."""
    predictions, seconds = predict_task.options(**options, num_returns=2).remote(config, job, folders[job.key], threads)
    return evaluator.finish.remote(job.key, list(job.split.test), transform_of(config), config.metrics.pro_fpr_limit,
                                   metric_groups(job.split.dataset), predictions), seconds


def main(argv: list[str] | None = None) -> int:
    return run_main(argv, "python -m jobs.train", __doc__, run, "continue the run in RUN_DIR with its recorded config: "
                    "finished categories are kept, the others continue from their latest checkpoint")


if __name__ == "__main__":
    sys.exit(main())
