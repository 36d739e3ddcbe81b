"""Trained models on Ray: each category fitted as a Ray task on a GPU share, or on several Ray Train workers.

Both paths run the same function, ``fit_category``: the engine's ``Trainer`` in a plain process, or in each
of Ray Train's ``TorchTrainer`` workers, where it finds the process group Ray Train set up (DDP; gloo on
CPU workers, NCCL on GPU workers, each rank on the device Ray Train assigned it) and rank 0 alone writes
checkpoints and model files. Then a ``predict_category`` task scores the test set from the written model
files, and the run's evaluation actor computes the metrics, as for a memory bank. Step logs, validations
and checkpoints travel to the driver through a Ray queue, so the job can put them on W&B while training runs;
so do every training process's system samples (CPU, memory, GPU: ``cluster.system_stats``).

Resilience: ``fit_category`` always continues from the category's ``checkpoints/latest`` when there is one,
so a fit task whose process or node dies is retried (``cluster.max_restarts`` times, as the actors are
restarted) from its last finished epoch, and Ray Train restarts a DDP worker group the same number of
times (``FailureConfig``). A DDP fit runs ``TorchTrainer.fit`` inside a Ray task of its own (0 CPUs: Ray
Train's workers hold the resources), so the driver waits on it like on any fit task, scoring finished
categories meanwhile, and a lost node under it is retried as well.

Checkpoints, model files and Ray Train's run records (``storage_path``) are written into the run folder,
by whichever node trains: with several nodes, ``output_dir`` must be storage all of them share.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import ray
import torch
from ray.util.queue import Queue

from anomaly_core.bank import write_json
from anomaly_core.config import RunConfig
from anomaly_core.data import ImageTransform
from anomaly_core.extraction import exact_fp32
from anomaly_core.registry import MODELS
from anomaly_core.scoring import Predictions
from anomaly_core.threads import limit_threads
from anomaly_core.training import (
    TrainableModel,
    Trainer,
    TrainerCallbacks,
    TrainerConfig,
    held_out_split,
    load_images,
    load_model_files,
    load_validation_set,
    predict_images,
    save_model_files,
)
from anomaly_core.training.distributed import rank_and_world_size
from cluster.pipeline import CategoryJob
from cluster.resources import Placement
from cluster.scaling import place, wait_for_bundles
from cluster.system_stats import SystemSampler

log = logging.getLogger("cluster.training")

CHECKPOINTS = "checkpoints"  # <category folder>/checkpoints/{latest,best}.safetensors
HISTORY = "training.json"  # <category folder>/training.json: the run's per-epoch loss, metrics and seconds
RAY_TRAIN = "ray_train"  # <run folder>/ray_train: Ray Train's storage_path (its run records, per DDP category)
EVALUATOR_CPUS = 1.0  # the run's one evaluation actor computes every category's metrics (CPU sorts)


def build_model(config: RunConfig) -> TrainableModel:
    """The configured model: ``training.model``'s entry in the registry builds it."""
    return MODELS[config.training.model].build(config)


def trainer_config(config: RunConfig, device: str) -> TrainerConfig:
    training = config.training
    return TrainerConfig(
        epochs=training.epochs, max_steps=training.max_steps, batch_size=training.batch_size, seed=config.seed,
        drop_last=training.drop_last,
        monitor=training.monitor, mode=training.mode, patience=training.patience, min_delta=training.min_delta,
        weights=training.weights, clip_grad_norm=training.clip_grad_norm,
        log_every_n_steps=training.log_every_n_steps, validate_every_n_epochs=training.validate_every_n_epochs,
        fpr_limit=config.metrics.pro_fpr_limit, device=device,
    )


def transform_of(config: RunConfig) -> ImageTransform:
    """The model's input transform (its normalisation, usually its pretrained backbone's) at the configured sizes."""
    mean, std = MODELS[config.training.model].model_class().normalisation(config.backbone.name)
    return ImageTransform(resize=config.preprocess.resize, crop=config.preprocess.crop, mean=mean, std=std)


def pick_device(has_gpu: bool, ray_train_device: Callable[[], torch.device] | None) -> str:
    """The device a training process uses. Without a GPU of its own, the CPU. A plain Ray task sees only
    the GPU Ray gave it, as ``cuda``. Ray Train makes all of a node's worker GPUs visible to each of its
    workers there, so ``cuda`` would put every rank on the node's first GPU: a worker asks Ray Train
    (``ray_train_device``, i.e. ``ray.train.torch.get_device``) for its own."""
    if not has_gpu:
        return "cpu"
    return "cuda" if ray_train_device is None else str(ray_train_device())


def training_device(ray_train_worker: bool = False) -> str:
    """``pick_device`` for this process (in exact fp32 on a GPU)."""
    has_gpu = torch.cuda.is_available() and bool(ray.get_gpu_ids())
    if has_gpu:
        exact_fp32()
    return pick_device(has_gpu, _ray_train_device if ray_train_worker else None)


def _ray_train_device() -> torch.device:
    from ray.train.torch import get_device

    return get_device()


def fit_category(config: RunConfig, job: CategoryJob, folder: str, events: Queue | None, threads: int,
                 ray_train_worker: bool = False, process: str = "fit_0") -> float:
    """Train ``job``'s model and write its model files and ``training.json`` (per-epoch history) into ``folder``
    (rank 0); continues from the folder's latest checkpoint if there is one (a resumed run, a retried task
    or a restarted Ray Train worker group), keeping the step log recorded up to that checkpoint. A recipe's
    ``held_out_fraction`` of the training images (split by the run seed) is never trained on.

    With ``events``, this process's system samples go to the driver with the training's events while it
    trains, named ``process`` (a Ray Train worker's ``<process>_rank_<rank>``). Returns the seconds it ran."""
    started = time.perf_counter()
    rank, world = rank_and_world_size()
    name = process if world == 1 else f"{process}_rank_{rank}"
    sampled = nullcontext() if events is None else SystemSampler(
        send=lambda samples: events.put({"kind": "system", "process": name, "samples": samples}))
    with sampled:
        _fit(config, job, folder, events, threads, ray_train_worker)
    return time.perf_counter() - started


def _fit(config: RunConfig, job: CategoryJob, folder: str, events: Queue | None, threads: int,
         ray_train_worker: bool) -> None:
    limit_threads(threads)
    device = training_device(ray_train_worker)
    model = build_model(config)
    transform = transform_of(config)
    images = load_images(job.split.train, transform)
    trained, held_out = held_out_split(len(images), config.training.held_out_fraction or 0.0, config.seed)
    train = images[trained]
    validation = load_validation_set(job.split.test, transform) if _validates(config) else None
    folder_path = Path(folder)
    latest = folder_path / CHECKPOINTS / "latest.safetensors"
    rank, _ = rank_and_world_size()
    resumed = latest.is_file()
    earlier = json.loads((folder_path / HISTORY).read_text())["steps"] if resumed and (folder_path / HISTORY).is_file() else []
    steps: list[dict[str, Any]] = []

    def recorded_steps() -> list[dict[str, Any]]:
        """The steps an earlier attempt recorded before this attempt's first, then this attempt's."""
        first = steps[0]["step"] if steps else math.inf
        return [entry for entry in earlier if entry["step"] < first] + steps

    def on_checkpoint() -> None:  # the step log as far as the latest checkpoint: what a retry from it keeps
        write_json(folder_path / HISTORY, {"steps": recorded_steps()})

    trainer = Trainer(trainer_config(config, device), folder_path / CHECKPOINTS,
                      _callbacks(job.key, events, steps, on_checkpoint) if rank == 0 else None)
    result = trainer.fit(model, train, validation, resume_from=latest if resumed else None,
                         held_out=images[held_out] if held_out else None)
    if rank == 0:
        record = {**result.summary(), "recipe": config.training.recipe_record(config.preprocess),
                  "held_out_images": [os.path.relpath(job.split.train[i].image_path, job.root) for i in held_out]}
        save_model_files(model, folder_path, config.preprocess.resize, record)
        write_json(folder_path / HISTORY, {"summary": result.summary(), "history": result.history,
                                           "steps": recorded_steps()})


def _validates(config: RunConfig) -> bool:
    training = config.training
    return training.monitor not in ("loss", "held_out_loss") or training.validate_every_n_epochs <= training.epochs


def _callbacks(key: str, events: Queue | None, steps: list[dict[str, Any]],
               on_checkpoint: Callable[[], None]) -> TrainerCallbacks:
    """Step records kept for the local report, ``on_checkpoint`` after each epoch's latest checkpoint, and,
    with ``events``, every event sent to the driver (W&B)."""
    def on_log(record: dict[str, Any]) -> None:
        steps.append(record)
        if events is not None:
            events.put({"kind": "step", "key": key, **record})

    def on_epoch_end(record: dict[str, Any]) -> None:
        if record["latest_checkpoint"] is not None:
            on_checkpoint()
        if events is not None:
            events.put({"kind": "epoch", "key": key, **_plain(record)})

    on_validation = None if events is None else (lambda record: events.put({"kind": "validation", "key": key, **record}))
    return TrainerCallbacks(on_log=on_log, on_validation=on_validation, on_epoch_end=on_epoch_end)


def _plain(record: dict[str, Any]) -> dict[str, Any]:
    return {name: str(value) if isinstance(value, Path) else value for name, value in record.items()}


def predict_category(config: RunConfig, job: CategoryJob, folder: str, threads: int) -> Predictions:
    """The test set's scores and maps from the model files in ``folder`` (refused if they do not fit ``config``)."""
    limit_threads(threads)
    expected = {"resize": config.preprocess.resize, "crop": config.preprocess.crop}
    if MODELS[config.training.model].uses_backbone:
        expected["backbone"] = config.backbone.name
    model = load_model_files(Path(folder), config.backbone.weights, expected).to(training_device())
    return predict_images(model, load_images(job.split.test, transform_of(config)))


def timed_predict(config: RunConfig, job: CategoryJob, folder: str, threads: int) -> tuple[Predictions, float]:
    """``predict_category`` and the seconds it ran (a task's share of the run's GPU-seconds)."""
    started = time.perf_counter()
    return predict_category(config, job, folder, threads), time.perf_counter() - started


def task_options(config: RunConfig) -> dict[str, Any]:
    """A fit or predict task's resources and retries: a task whose process or node dies is run again
    (``cluster.max_restarts`` times, the budget the run's actors have), and a fit continues from its
    latest checkpoint. An error the training itself raises is not retried: it would only repeat."""
    training = config.training
    return {"num_cpus": training.cpus_per_worker, "num_gpus": training.gpus_per_worker,
            "max_retries": config.cluster.max_restarts}


def threads_of(config: RunConfig) -> int:
    return max(1, int(config.training.cpus_per_worker))


def worker_bundle(config: RunConfig) -> dict[str, float]:
    """What one category's fit task, or one of its Ray Train workers, reserves."""
    training = config.training
    return {"CPU": training.cpus_per_worker, **({"GPU": training.gpus_per_worker} if training.gpus_per_worker else {})}


def fit_with_ray_train(config: RunConfig, job: CategoryJob, folder: str, events: Queue | None, storage: str,
                       process: str = "fit_0") -> float:
    """``fit_category`` on ``training.ddp_workers`` Ray Train workers (DDP; blocks until training ends); returns
    the worker-seconds they were held (workers x seconds), as ``fit_category`` returns its one process's.

    ``storage`` (Ray Train's ``storage_path``, where it keeps its run records) must be readable from every
    node, like the category folder. A worker group that loses a worker is restarted ``cluster.max_restarts``
    times; its ranks continue from the category's latest checkpoint.
    """
    from ray.train import FailureConfig, ScalingConfig
    from ray.train import RunConfig as TrainRunConfig
    from ray.train.torch import TorchTrainer

    def loop(_: dict) -> None:
        fit_category(config, job, folder, events, threads_of(config), ray_train_worker=True, process=process)

    scaling = ScalingConfig(num_workers=config.training.ddp_workers, use_gpu=config.training.gpus_per_worker > 0,
                            resources_per_worker=worker_bundle(config))
    run = TrainRunConfig(name=job.key.replace("/", "-"), storage_path=storage,
                         failure_config=FailureConfig(max_failures=config.cluster.max_restarts))
    started = time.perf_counter()
    TorchTrainer(loop, scaling_config=scaling, run_config=run).fit()
    return (time.perf_counter() - started) * config.training.ddp_workers


def submit_fit(config: RunConfig, job: CategoryJob, folder: str, events: Queue | None, run_dir: Path,
               process: str = "fit_0") -> ray.ObjectRef:
    """Start training ``job``: a fit task, or for a DDP category a task (0 CPUs) that runs Ray Train's
    ``TorchTrainer.fit``; either way an object reference the driver waits on among the others, of the
    worker-seconds the training held. ``process`` names its system samples."""
    if ddp_selected(config, job):
        return ray.remote(fit_with_ray_train).options(num_cpus=0, max_retries=config.cluster.max_restarts).remote(
            config, job, folder, events, str((run_dir / RAY_TRAIN).resolve()), process)
    return ray.remote(fit_category).options(**task_options(config)).remote(config, job, folder, events,
                                                                           threads_of(config), process=process)


def ddp_selected(config: RunConfig, job: CategoryJob) -> bool:
    chosen = set(config.training.ddp_categories)
    return job.split.category in chosen or job.key in chosen


def training_bundles(config: RunConfig, jobs: list[CategoryJob]) -> tuple[list[dict[str, float]], str, str]:
    """The bundles the run cannot progress without, what they are, and the keys asking for them: one fit task
    (or the Ray Train workers when a category trains with DDP: the same shape, so they cover a fit or
    predict task too), then the evaluator, which keeps its CPU for the whole run."""
    training = config.training
    ddp = any(ddp_selected(config, job) for job in jobs)
    workers = training.ddp_workers if ddp else 1
    what = (f"the {workers} Ray Train workers of a DDP category" if ddp else "a category's fit task") + " and the evaluator"
    keys = "training.cpus_per_worker, training.gpus_per_worker" + (", training.ddp_workers" if ddp else "")
    if training.gpus_per_worker:
        keys += " (training.gpus_per_worker=0 trains on CPUs)"
    return [worker_bundle(config)] * workers + [{"CPU": EVALUATOR_CPUS}], what, keys


def evaluator_placement(config: RunConfig, jobs: list[CategoryJob], wait_s: float) -> Placement:
    """Where the evaluator goes, once the alive nodes can hold ``training_bundles`` (asked of the autoscaler
    and waited for up to ``wait_s`` on a joined cluster; refused at once, naming the keys, where they never
    can): the node the packing gave it, so that a fit task always fits beside it (placed by Ray alone it
    could take the one CPU a GPU node's fit task needs, and every task would wait forever)."""
    bundles, what, keys = training_bundles(config, jobs)
    nodes = wait_for_bundles(bundles, what, keys, wait_s)
    return Placement("evaluator", 0, place(bundles, nodes)[-1], EVALUATOR_CPUS, 0.0)
