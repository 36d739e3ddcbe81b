"""Trained models on Ray: each category fitted as a Ray task on a GPU share, or on several Ray Train workers.

Both paths run the same function, ``fit_category``: the engine's ``Trainer`` in a plain process, or in each
of Ray Train's ``TorchTrainer`` workers, where it finds the process group Ray Train set up (DDP; gloo on
CPU workers) and rank 0 alone writes checkpoints and model files. Then a ``predict_category`` task scores
the test set from the written model files, and the run's evaluation actors compute the metrics, as for a
memory bank. Step logs, validations and checkpoints travel to the driver through a Ray queue, so the job
can put them on W&B while training runs.

Checkpoints and model files are written into the run folder, by whichever node trains: with several
nodes, ``output_dir`` must be storage all of them share (as Ray Train's own ``storage_path``).
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import ray
import torch
from ray.util.queue import Queue

from anomaly_core.backbones import architecture
from anomaly_core.bank import write_json
from anomaly_core.config import RunConfig
from anomaly_core.data import ImageTransform
from anomaly_core.extraction import exact_fp32
from anomaly_core.scoring import Predictions
from anomaly_core.threads import limit_threads
from anomaly_core.training import (
    ReverseDistillation,
    ReverseDistillationSettings,
    Stfpm,
    StfpmSettings,
    TrainableModel,
    Trainer,
    TrainerCallbacks,
    TrainerConfig,
    load_images,
    load_model_files,
    load_validation_set,
    predict_images,
    save_model_files,
)
from anomaly_core.training.distributed import rank_and_world_size
from cluster.pipeline import CategoryJob

log = logging.getLogger("cluster.training")

CHECKPOINTS = "checkpoints"  # <category folder>/checkpoints/{latest,best}.safetensors
HISTORY = "training.json"  # <category folder>/training.json: the run's per-epoch loss, metrics and seconds


def build_model(config: RunConfig) -> TrainableModel:
    """The configured model with its frozen teacher (``backbone``) at ``preprocess.crop``."""
    training, backbone = config.training, config.backbone
    common = {"backbone": backbone.name, "layers": tuple(backbone.layers), "crop": config.preprocess.crop,
              **({"lr": training.lr} if training.lr is not None else {})}
    if training.model == "reverse_distillation":
        return ReverseDistillation(ReverseDistillationSettings(**common), backbone.weights)
    return Stfpm(StfpmSettings(**common), backbone.weights)


def batch_size(config: RunConfig) -> int:
    model = ReverseDistillation if config.training.model == "reverse_distillation" else Stfpm
    return config.training.batch_size or model.default_batch_size


def trainer_config(config: RunConfig, device: str) -> TrainerConfig:
    training = config.training
    return TrainerConfig(
        epochs=training.epochs, batch_size=batch_size(config), seed=config.seed, monitor=training.monitor,
        mode=training.mode, patience=training.patience, min_delta=training.min_delta,
        log_every_n_steps=training.log_every_n_steps, validate_every_n_epochs=training.validate_every_n_epochs,
        fpr_limit=config.metrics.pro_fpr_limit, device=device,
    )


def transform_of(config: RunConfig) -> ImageTransform:
    """The teacher's input transform (its architecture's normalisation) at the configured sizes."""
    arch = architecture(config.backbone.name)
    return ImageTransform(resize=config.preprocess.resize, crop=config.preprocess.crop, mean=arch.mean, std=arch.std)


def training_device() -> str:
    """CUDA where Ray gave this process a GPU (in exact fp32), else the CPU."""
    if torch.cuda.is_available() and ray.get_gpu_ids():
        exact_fp32()
        return "cuda"
    return "cpu"


def fit_category(config: RunConfig, job: CategoryJob, folder: str, events: Queue | None, threads: int) -> None:
    """Train ``job``'s model and write its model files and ``training.json`` (per-epoch history) into ``folder``
    (rank 0); resumes from the folder's latest checkpoint if there is one."""
    limit_threads(threads)
    device = training_device()
    model = build_model(config)
    transform = transform_of(config)
    train = load_images(job.split.train, transform)
    validation = load_validation_set(job.split.test, transform) if _validates(config) else None
    folder_path = Path(folder)
    latest = folder_path / CHECKPOINTS / "latest.safetensors"
    rank, _ = rank_and_world_size()
    steps: list[dict[str, Any]] = []
    trainer = Trainer(trainer_config(config, device), folder_path / CHECKPOINTS,
                      _callbacks(job.key, events, steps) if rank == 0 else None)
    resumed = latest.is_file()
    earlier = json.loads((folder_path / HISTORY).read_text())["steps"] if resumed and (folder_path / HISTORY).is_file() else []
    result = trainer.fit(model, train, validation, resume_from=latest if resumed else None)
    if rank == 0:
        save_model_files(model, folder_path, config.preprocess.resize, result.summary())
        # After a resume: the steps an earlier attempt recorded up to the checkpoint, then this run's.
        first = steps[0]["step"] if steps else result.global_step + 1
        steps = [entry for entry in earlier if entry["step"] < first] + steps
        write_json(folder_path / HISTORY, {"summary": result.summary(), "history": result.history, "steps": steps})


def _validates(config: RunConfig) -> bool:
    return config.training.monitor != "loss" or config.training.validate_every_n_epochs <= config.training.epochs


def _callbacks(key: str, events: Queue | None, steps: list[dict[str, Any]]) -> TrainerCallbacks:
    """Step records kept for the local report and, with ``events``, every event sent to the driver (W&B)."""
    def on_log(record: dict[str, Any]) -> None:
        steps.append(record)
        if events is not None:
            events.put({"kind": "step", "key": key, **record})

    if events is None:
        return TrainerCallbacks(on_log=on_log)
    return TrainerCallbacks(
        on_log=on_log,
        on_validation=lambda record: events.put({"kind": "validation", "key": key, **record}),
        on_epoch_end=lambda record: events.put({"kind": "epoch", "key": key, **_plain(record)}),
    )


def _plain(record: dict[str, Any]) -> dict[str, Any]:
    return {name: str(value) if isinstance(value, Path) else value for name, value in record.items()}


def predict_category(config: RunConfig, job: CategoryJob, folder: str, threads: int) -> Predictions:
    """The test set's scores and maps from the model files in ``folder`` (refused if they do not fit ``config``)."""
    limit_threads(threads)
    expected = {"resize": config.preprocess.resize, "crop": config.preprocess.crop, "backbone": config.backbone.name}
    model = load_model_files(Path(folder), config.backbone.weights, expected).to(training_device())
    return predict_images(model, load_images(job.split.test, transform_of(config)))


def task_options(config: RunConfig) -> dict[str, Any]:
    training = config.training
    return {"num_cpus": training.cpus_per_worker, "num_gpus": training.gpus_per_worker, "max_retries": 0}


def threads_of(config: RunConfig) -> int:
    return max(1, int(config.training.cpus_per_worker))


def fit_with_ray_train(config: RunConfig, job: CategoryJob, folder: str, events: Queue | None) -> None:
    """``fit_category`` on ``training.ddp_workers`` Ray Train workers (DDP; blocks until training ends)."""
    from ray.train import RunConfig as TrainRunConfig
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    training = config.training
    use_gpu = training.gpus_per_worker > 0

    def loop(_: dict) -> None:
        fit_category(config, job, folder, events, threads_of(config))

    resources = {"CPU": training.cpus_per_worker, **({"GPU": training.gpus_per_worker} if use_gpu else {})}
    scaling = ScalingConfig(num_workers=training.ddp_workers, use_gpu=use_gpu, resources_per_worker=resources)
    # Ray Train keeps its own run records here; the model's checkpoints are the Trainer's, in the category folder.
    storage = tempfile.mkdtemp(prefix="ray-train-")
    TorchTrainer(loop, scaling_config=scaling,
                 run_config=TrainRunConfig(name=job.key.replace("/", "-"), storage_path=storage)).fit()


def ddp_selected(config: RunConfig, job: CategoryJob) -> bool:
    chosen = set(config.training.ddp_categories)
    return job.split.category in chosen or job.key in chosen
