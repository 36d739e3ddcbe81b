"""A plain-PyTorch training loop for ``TrainableModel``s: seeded batches, early stopping, checkpoints, DDP.

It replaces Lightning with the part of it these models use, and stays free of Ray and W&B: a job passes
callbacks that forward step records and metrics to its tracker, and a directory for checkpoints.

Under torch.distributed (Ray Train's ``TorchTrainer`` initialises the process group before the training
function runs) the Trainer, on every rank, takes a disjoint equal slice of each global batch
(``batches.EpochPlan``), switches BatchNorm to global statistics (``sync_batchnorm``) and wraps the model
in DistributedDataParallel, so 2 ranks x B/2 images train like 1 rank x B. Rank 0 alone validates, logs
and writes checkpoints; its early-stopping decision reaches the other ranks by broadcast. Every rank
reads ``resume_from`` itself, so the checkpoint must be on storage all ranks can read.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from anomaly_core.metrics import MetricReport
from anomaly_core.training.batches import EpochPlan
from anomaly_core.training.checkpoint import CheckpointError, TrainingCheckpoint, load_checkpoint, save_checkpoint
from anomaly_core.training.distributed import from_rank_zero, mean_over_ranks, rank_and_world_size
from anomaly_core.training.early_stopping import EarlyStopping
from anomaly_core.training.model import TrainableModel
from anomaly_core.training.sync_batchnorm import use_global_batchnorm
from anomaly_core.training.validation import ValidationSet, evaluate

LOSS = "loss"  # the monitor name of the epoch's mean training loss; any other monitor is a validation metric
LATEST, BEST = "latest", "best"


@dataclass(frozen=True)
class TrainerConfig:
    epochs: int
    batch_size: int  # global: split equally across DDP ranks
    seed: int = 0  # batch order: epoch e is shuffled by (seed, e) alone
    drop_last: bool = False
    monitor: str = LOSS  # "loss" or a metric name of anomaly_core.metrics, e.g. "image_auroc"
    mode: str = "min"  # "max" for metrics such as image_auroc
    patience: int | None = None  # checks of the monitor without improvement before stopping; None: never stop
    min_delta: float = 0.0
    log_every_n_steps: int = 10
    validate_every_n_epochs: int = 1  # the last epoch is always validated (when a validation set is given)
    predict_batch_size: int = 16
    fpr_limit: float = 0.3  # AUPRO's false-positive-rate limit
    device: str = "cpu"  # this rank's own device (e.g. cuda:1); under NCCL its collectives travel there too

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "log_every_n_steps", "validate_every_n_epochs", "predict_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        EarlyStopping(self.mode, self.patience, self.min_delta)  # validates mode, patience, min_delta

    def resume_key(self) -> dict[str, Any]:
        """Settings a resumed run must share with the checkpoint's run to continue it exactly."""
        return {key: getattr(self, key) for key in ("epochs", "batch_size", "seed", "drop_last", "monitor", "mode")}


@dataclass
class TrainerCallbacks:
    """Hooks for the job layer (W&B, Ray Train reports); the engine itself imports neither."""

    on_log: Callable[[dict[str, Any]], None] | None = None  # rank 0, every log_every_n_steps steps
    on_validation: Callable[[dict[str, Any]], None] | None = None  # rank 0, after each validation
    on_checkpoint: Callable[[Path, str], None] | None = None  # rank 0, after writing "latest" or "best"
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None  # every rank (Ray Train reports from all)


@dataclass
class FitResult:
    epochs_completed: int
    global_step: int
    stopped_early: bool
    monitor: str
    best: float | None
    best_epoch: int | None
    history: list[dict[str, Any]]  # per epoch: epoch, step, loss, seconds, metrics (None when not validated)

    def summary(self) -> dict[str, Any]:
        """What model files record about the training that produced them."""
        return {key: value for key, value in asdict(self).items() if key != "history"}


@dataclass
class _Progress:
    """Where a run stands after an epoch: what a checkpoint's progress records and a resume restores."""

    stopper: EarlyStopping
    next_epoch: int = 0
    global_step: int = 0
    stopped: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self, config: TrainerConfig, n_images: int) -> dict[str, Any]:
        return {"trainer": config.resume_key(), "n_images": n_images, "next_epoch": self.next_epoch,
                "global_step": self.global_step, "stopped": self.stopped, "history": self.history,
                "early_stopping": {k: v for k, v in self.stopper.state().items() if k in _STOPPER_PROGRESS}}

    @classmethod
    def from_json(cls, recorded: dict[str, Any], config: TrainerConfig, n_images: int, source: Path) -> _Progress:
        expected = {"trainer": config.resume_key(), "n_images": n_images}
        for key, value in expected.items():
            if recorded.get(key) != value:
                raise CheckpointError(f"cannot resume from {source}: its run had {key}={recorded.get(key)!r}, "
                                      f"this one has {value!r}")
        stopper = EarlyStopping(config.mode, config.patience, config.min_delta, **recorded["early_stopping"])
        return cls(stopper, recorded["next_epoch"], recorded["global_step"], recorded["stopped"], recorded["history"])


_STOPPER_PROGRESS = ("best", "best_epoch", "checks_without_improvement")  # patience/min_delta may change on resume


class Trainer:
    def __init__(
        self,
        config: TrainerConfig,
        checkpoint_dir: Path | None = None,
        callbacks: TrainerCallbacks | None = None,
    ) -> None:
        self.config = config
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        self.callbacks = callbacks or TrainerCallbacks()
        if self.callbacks.on_checkpoint is not None and self.checkpoint_dir is None:
            raise ValueError("on_checkpoint needs a checkpoint_dir to write checkpoints into")

    def fit(
        self,
        model: TrainableModel | DistributedDataParallel,
        train_images: torch.Tensor,
        validation: ValidationSet | None = None,
        resume_from: Path | None = None,
    ) -> FitResult:
        """Train ``model`` in place on ``train_images`` [n, 3, H, W] (normal images, transformed).

        With ``resume_from`` (a checkpoint of a run with the same settings and images), training continues
        after the checkpoint's epoch and ends on exactly the weights an uninterrupted run reaches (on the same
        device type and thread count: those change float rounding). Under DDP the model's BatchNorm layers are
        switched to global statistics in place; a model the caller wrapped in DistributedDataParallel is used
        as is (``use_global_batchnorm`` before wrapping keeps its ranks equivalent to one process).
        """
        config = self.config
        if config.monitor != LOSS and validation is None:
            raise ValueError(f"monitor={config.monitor!r} is a validation metric, but no validation set was given")
        rank, world_size = rank_and_world_size()
        module, step = self._prepare(model, world_size)
        plan = EpochPlan(len(train_images), config.batch_size, config.drop_last, world_size)
        optimizer, scheduler = module.configure_optimizers(config.epochs, plan.steps_per_epoch)
        progress = _Progress(EarlyStopping(config.mode, config.patience, config.min_delta))
        if resume_from is not None:
            checkpoint = load_checkpoint(resume_from)
            progress = _Progress.from_json(checkpoint.progress, config, len(train_images), Path(resume_from))
            checkpoint.restore(module, optimizer, scheduler)
        module.on_fit_start()
        while progress.next_epoch < config.epochs and not progress.stopped:
            epoch, started = progress.next_epoch, time.perf_counter()
            loss = self._train_epoch(module, step, optimizer, scheduler, train_images, plan, epoch, progress, rank)
            validated = validation is not None and (
                (epoch + 1) % config.validate_every_n_epochs == 0 or epoch + 1 == config.epochs)
            report = self._validate(module, validation, epoch) if validated and rank == 0 else None
            improved = self._check_monitor(progress.stopper, epoch, loss, report, validated, rank)
            metrics = None if report is None else report.values
            record = {"epoch": epoch, "step": progress.global_step, LOSS: loss, "metrics": metrics,
                      "seconds": time.perf_counter() - started}
            progress.history.append(record)
            progress.next_epoch, progress.stopped = epoch + 1, progress.stopper.should_stop
            if metrics is not None and self.callbacks.on_validation is not None:
                self.callbacks.on_validation({"epoch": epoch, "step": progress.global_step, "metrics": metrics,
                                              "monitor": config.monitor, "best": progress.stopper.best,
                                              "best_epoch": progress.stopper.best_epoch})
            paths = self._save(module, optimizer, scheduler, progress, len(train_images), improved) if rank == 0 else {}
            if self.callbacks.on_epoch_end is not None:
                checkpoints = {"latest_checkpoint": paths.get(LATEST), "best_checkpoint": paths.get(BEST)}
                self.callbacks.on_epoch_end({**record, "stopped": progress.stopped, **checkpoints})
        stopper = progress.stopper
        return FitResult(progress.next_epoch, progress.global_step, progress.stopped, config.monitor, stopper.best,
                         stopper.best_epoch, progress.history)

    def _prepare(self, model: TrainableModel | DistributedDataParallel, world_size: int
                 ) -> tuple[TrainableModel, torch.nn.Module]:
        """The model itself and what a training step runs through: the model, or its DDP wrapper."""
        if isinstance(model, DistributedDataParallel):
            return model.module, model
        device = torch.device(self.config.device)
        model.to(device)
        if world_size == 1:
            return model, model
        use_global_batchnorm(model)
        return model, DistributedDataParallel(model, device_ids=None if device.type == "cpu" else [device])

    def _train_epoch(
        self,
        module: TrainableModel,
        step: torch.nn.Module,
        optimizer: Optimizer,
        scheduler: LRScheduler | None,
        images: torch.Tensor,
        plan: EpochPlan,
        epoch: int,
        progress: _Progress,
        rank: int,
    ) -> float:
        """One epoch of optimisation steps; returns the mean loss over its steps (and over ranks)."""
        config, device = self.config, torch.device(self.config.device)
        module.train()
        module.on_train_epoch_start(epoch)
        batches = plan.rank_batches(config.seed, epoch, rank)
        total = torch.zeros((), dtype=torch.float64)
        previous_end = time.perf_counter()
        for indices in batches:
            started = time.perf_counter()
            batch = images[indices].to(device)
            loaded = time.perf_counter()
            learning_rate = optimizer.param_groups[0]["lr"]
            optimizer.zero_grad(set_to_none=True)
            losses = _checked_losses(step(batch))
            losses[LOSS].backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            finished = time.perf_counter()
            progress.global_step += 1
            total += losses[LOSS].detach().double().cpu()
            if progress.global_step % config.log_every_n_steps == 0:
                names = list(losses)
                values = mean_over_ranks(torch.stack([losses[name].detach().double().cpu() for name in names]), device)
                if rank == 0 and self.callbacks.on_log is not None:
                    self.callbacks.on_log({
                        "epoch": epoch, "step": progress.global_step, "lr": learning_rate,
                        **dict(zip(names, values.tolist())),
                        "batch_time": finished - previous_end, "data_time": loaded - started,
                        "optim_time": finished - loaded,
                    })
            previous_end = finished
        module.on_train_epoch_end(epoch)
        loss = float(mean_over_ranks(total / len(batches), device))
        if not math.isfinite(loss):
            raise FloatingPointError(f"training diverged: the mean loss of epoch {epoch} is {loss}")
        return loss

    def _validate(self, module: TrainableModel, validation: ValidationSet, epoch: int) -> MetricReport:
        report = evaluate(module, validation, self.config.predict_batch_size, self.config.fpr_limit)
        module.on_validation_epoch_end(epoch, report.values)
        return report

    def _check_monitor(
        self,
        stopper: EarlyStopping,
        epoch: int,
        loss: float,
        report: MetricReport | None,
        validated: bool,
        rank: int,
    ) -> bool:
        """Feed this epoch's monitored value (if it has one) to early stopping, the same on every rank.

        The loss is already the same on all ranks; a metric exists on rank 0 only and is broadcast, an
        undefined one as NaN, so that every rank raises rather than some waiting forever for the others.
        """
        monitor = self.config.monitor
        if monitor == LOSS:
            return stopper.update(loss, epoch)
        if not validated:
            return False
        recorded = report.values.get(monitor) if report is not None else None
        value = float(from_rank_zero(torch.tensor([math.nan if recorded is None else recorded], dtype=torch.float64),
                                     self.config.device))
        if math.isnan(value):
            known = "" if report is None else f"known metrics: {', '.join(report.values)}"
            note = "" if report is None else ": " + report.notes.get(monitor, known)
            raise ValueError(f"monitored metric {monitor!r} is undefined on the validation set{note}")
        return stopper.update(value, epoch)

    def _save(
        self,
        module: TrainableModel,
        optimizer: Optimizer,
        scheduler: LRScheduler | None,
        progress: _Progress,
        n_images: int,
        improved: bool,
    ) -> dict[str, Path]:
        """Write "latest" (every epoch) and, when the monitor improved, "best"; returns what was written."""
        if self.checkpoint_dir is None:
            return {}
        checkpoint = TrainingCheckpoint.capture(module, optimizer, scheduler, progress.to_json(self.config, n_images))
        paths = {}
        for kind in (LATEST, BEST) if improved else (LATEST,):
            paths[kind] = save_checkpoint(checkpoint, self.checkpoint_dir / f"{kind}.safetensors")
            if self.callbacks.on_checkpoint is not None:
                self.callbacks.on_checkpoint(paths[kind], kind)
        return paths


def _checked_losses(losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if LOSS not in losses:
        raise KeyError(f"training_step must return a {LOSS!r} entry; it returned {sorted(losses)}")
    for name, value in losses.items():
        if not isinstance(value, torch.Tensor) or value.ndim != 0:
            raise TypeError(f"training_step's {name!r} must be a scalar tensor, got {type(value).__name__} "
                            f"{getattr(value, 'shape', '')}")
    return losses
