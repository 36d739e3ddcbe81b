"""A plain-PyTorch training loop for ``TrainableModel``s: seeded batches, early stopping, checkpoints, DDP.

It replaces Lightning with the part of it these models use, and stays free of Ray and W&B: a job passes
callbacks that forward step records and metrics to its tracker, and a directory for checkpoints.

Under torch.distributed (Ray Train's ``TorchTrainer`` initialises the process group before the training
function runs) the Trainer, on every rank, takes a disjoint equal slice of each global batch
(``batches.EpochPlan``), switches BatchNorm to global statistics (``sync_batchnorm``) and wraps the model
in DistributedDataParallel, so 2 ranks x B/2 images train like 1 rank x B. Rank 0 alone validates, logs
and writes checkpoints; its early-stopping decision reaches the other ranks by broadcast. Every rank
reads ``resume_from`` itself, so the checkpoint must be on storage all ranks can read.

The monitored value (the training loss, the loss on held-out normal images, or a test-set metric) picks
the best epoch; with ``weights="best"`` the model ends on that epoch's weights (kept in memory, and as the
``best`` checkpoint for a resumed run), so what is exported is what ``FitResult.weights_epoch`` names.
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
from anomaly_core.seeding import derive_seed
from anomaly_core.training.batches import EpochPlan
from anomaly_core.training.checkpoint import CheckpointError, TrainingCheckpoint, load_checkpoint, save_checkpoint
from anomaly_core.training.distributed import from_rank_zero, mean_over_ranks, rank_and_world_size
from anomaly_core.training.early_stopping import EarlyStopping
from anomaly_core.training.model import TrainableModel
from anomaly_core.training.predict import evaluating
from anomaly_core.training.sync_batchnorm import use_global_batchnorm
from anomaly_core.training.validation import ValidationSet, evaluate, held_out_loss

LOSS = "loss"  # the monitor name of the epoch's mean training loss
HELD_OUT_LOSS = "held_out_loss"  # the model's held_out_loss, averaged over fit's held_out images
LATEST, BEST = "latest", "best"  # checkpoint names
LAST = "last"  # LAST and BEST: TrainerConfig.weights, which epoch's weights fit() ends on


@dataclass(frozen=True)
class TrainerConfig:
    epochs: int
    batch_size: int  # global: split equally across DDP ranks
    # Optimisation steps after which training ends even within an epoch (Lightning's max_steps: a recipe counted
    # in steps, as EfficientAD's 70 000, Dinomaly's 5000); None: epochs alone. The last, partial epoch is checkpointed and validated.
    max_steps: int | None = None
    seed: int = 0  # batch order: epoch e is shuffled by (seed, e) alone
    drop_last: bool = False
    monitor: str = LOSS  # "loss", "held_out_loss" or a metric name of anomaly_core.metrics, e.g. "image_auroc"
    mode: str = "min"  # "max" for metrics such as image_auroc
    patience: int | None = None  # checks of the monitor without improvement before stopping; None: never stop
    min_delta: float = 0.0
    weights: str = LAST  # the weights fit() ends on: the "last" epoch's, or the "best" epoch's of the monitor
    clip_grad_norm: float = 0.0  # the largest total norm of the gradients (clip_grad_norm_); 0: no clipping
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
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or None, got {self.max_steps}")
        if self.weights not in (LAST, BEST):
            raise ValueError(f"weights must be {LAST} or {BEST}, got {self.weights!r}")
        if self.clip_grad_norm < 0:
            raise ValueError(f"clip_grad_norm must be >= 0, got {self.clip_grad_norm}")

    def epochs_for(self, steps_per_epoch: int) -> int:
        """The epochs a run takes: ``epochs``, or fewer when ``max_steps`` ends it first (the last one partial)."""
        if self.max_steps is None:
            return self.epochs
        return min(self.epochs, math.ceil(self.max_steps / steps_per_epoch))

    def resume_key(self) -> dict[str, Any]:
        """Settings a resumed run must share with the checkpoint's run to continue it exactly (patience,
        min_delta and weights may change: they are judged again on the recorded history)."""
        keys = ("epochs", "batch_size", "seed", "drop_last", "monitor", "mode", "clip_grad_norm")
        # max_steps only where set: checkpoints of runs without it, written before it existed, stay resumable
        keys += ("max_steps",) if self.max_steps is not None else ()
        return {key: getattr(self, key) for key in keys}


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
    weights_epoch: int  # the epoch whose weights the model holds: the last, or with weights="best" the best
    history: list[dict[str, Any]]  # per epoch: epoch, step, loss, held_out_loss, metrics (None: not computed), seconds

    def summary(self) -> dict[str, Any]:
        """What model files record about the training that produced them."""
        return {key: value for key, value in asdict(self).items() if key != "history"}


@dataclass
class _Progress:
    """Where a run stands after an epoch: what a checkpoint's progress records and a resume restores."""

    stopper: EarlyStopping
    next_epoch: int = 0
    global_step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self, config: TrainerConfig, n_images: int, n_held_out: int) -> dict[str, Any]:
        return {"trainer": config.resume_key(), "n_images": n_images, "n_held_out": n_held_out,
                "next_epoch": self.next_epoch, "global_step": self.global_step, "history": self.history}

    @classmethod
    def from_json(cls, recorded: dict[str, Any], config: TrainerConfig, n_images: int, n_held_out: int,
                  source: Path) -> _Progress:
        """The recorded progress, early stopping judged again on the recorded history with this run's patience
        and min_delta (not the recorded run's decision): a run stopped early continues if a larger patience
        lets it, and one whose checks since its best epoch already reach a smaller patience stops at once."""
        expected = {"trainer": config.resume_key(), "n_images": n_images, "n_held_out": n_held_out}
        for key, value in expected.items():
            if recorded.get(key) != value:
                raise CheckpointError(f"cannot resume from {source}: its run had {key}={recorded.get(key)!r}, "
                                      f"this one has {value!r}")
        stopper = EarlyStopping(config.mode, config.patience, config.min_delta)
        for record in recorded["history"]:
            value = _recorded_value(record, config.monitor)
            if value is not None:
                stopper.update(value, record["epoch"])
        return cls(stopper, recorded["next_epoch"], recorded["global_step"], recorded["history"])


def _recorded_value(record: dict[str, Any], monitor: str) -> float | None:
    """The monitored value of a history record; None where that epoch did not compute it."""
    if monitor in (LOSS, HELD_OUT_LOSS):
        return record.get(monitor)
    return (record.get("metrics") or {}).get(monitor)


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
        held_out: torch.Tensor | None = None,
    ) -> FitResult:
        """Train ``model`` in place on ``train_images`` [n, 3, H, W] (normal images, transformed).

        ``held_out`` (normal images never trained on) gives every epoch a ``held_out_loss``, the monitor of
        that name. With ``resume_from`` (a checkpoint of a run with the same settings and images), training
        continues after the checkpoint's epoch and ends on exactly the weights an uninterrupted run reaches (on
        the same device type and thread count: those change float rounding). Under DDP the model's BatchNorm
        layers are switched to global statistics in place; a model the caller wrapped in
        DistributedDataParallel is used as is (``use_global_batchnorm`` before wrapping keeps its ranks
        equivalent to one process). The model's own random draws (dropout) come from torch's global generator,
        seeded here by (seed, rank) in a forked state, so a run depends on its seed alone and the caller's
        generator is left as it was (checkpoints record and restore that state).
        """
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.config.seed, "training-draws", str(rank_and_world_size()[0])))
            return self._fit(model, train_images, validation, resume_from, held_out)

    def _fit(
        self,
        model: TrainableModel | DistributedDataParallel,
        train_images: torch.Tensor,
        validation: ValidationSet | None,
        resume_from: Path | None,
        held_out: torch.Tensor | None,
    ) -> FitResult:
        config = self.config
        if config.monitor not in (LOSS, HELD_OUT_LOSS) and validation is None:
            raise ValueError(f"monitor={config.monitor!r} is a validation metric, but no validation set was given")
        if config.monitor == HELD_OUT_LOSS and held_out is None:
            raise ValueError(f"monitor={HELD_OUT_LOSS!r} needs held_out images")
        rank, world_size = rank_and_world_size()
        module, step = self._prepare(model, world_size)
        plan = EpochPlan(len(train_images), config.batch_size, config.drop_last, world_size)
        epochs = config.epochs_for(plan.steps_per_epoch)
        optimizer, scheduler = module.configure_optimizers(epochs, plan.steps_per_epoch)
        n_held_out = 0 if held_out is None else len(held_out)
        progress = _Progress(EarlyStopping(config.mode, config.patience, config.min_delta))
        best_state = None
        if resume_from is None:
            with evaluating(module) as (model_in_eval, _):
                model_in_eval.prepare(train_images)
        else:
            checkpoint = load_checkpoint(resume_from)
            progress = _Progress.from_json(checkpoint.progress, config, len(train_images), n_held_out, Path(resume_from))
            checkpoint.restore(module, optimizer, scheduler)
            best_state = self._best_state_so_far(module, progress)
        module.on_fit_start()
        while progress.next_epoch < epochs and not progress.stopper.should_stop:
            epoch, started = progress.next_epoch, time.perf_counter()
            loss = self._train_epoch(module, step, optimizer, scheduler, train_images, plan, epoch, progress, rank)
            held_out_value = None if held_out is None else self._held_out_loss(module, held_out, rank)
            validated = validation is not None and (
                (epoch + 1) % config.validate_every_n_epochs == 0 or epoch + 1 == epochs)
            if validated:
                self._calibrate(module, held_out)
            report = self._validate(module, validation, epoch) if validated and rank == 0 else None
            improved = self._check_monitor(progress.stopper, epoch, loss, held_out_value, report, validated, rank)
            if improved and config.weights == BEST:
                best_state = _copied(module.trainable_state())
            metrics = None if report is None else report.values
            record = {"epoch": epoch, "step": progress.global_step, LOSS: loss, HELD_OUT_LOSS: held_out_value,
                      "metrics": metrics, "seconds": time.perf_counter() - started}
            progress.history.append(record)
            progress.next_epoch = epoch + 1
            if metrics is not None and self.callbacks.on_validation is not None:
                self.callbacks.on_validation({"epoch": epoch, "step": progress.global_step, "metrics": metrics,
                                              "monitor": config.monitor, "best": progress.stopper.best,
                                              "best_epoch": progress.stopper.best_epoch})
            paths = self._save(module, optimizer, scheduler, progress, len(train_images), n_held_out,
                               improved) if rank == 0 else {}
            if self.callbacks.on_epoch_end is not None:
                checkpoints = {"latest_checkpoint": paths.get(LATEST), "best_checkpoint": paths.get(BEST)}
                self.callbacks.on_epoch_end({**record, "stopped": progress.stopper.should_stop, **checkpoints})
        stopper = progress.stopper
        weights_epoch = progress.next_epoch - 1
        if config.weights == BEST and stopper.best_epoch is not None and stopper.best_epoch != weights_epoch:
            module.load_trainable_state(best_state)
            weights_epoch = stopper.best_epoch
        self._calibrate(module, held_out)
        return FitResult(progress.next_epoch, progress.global_step, stopper.should_stop, config.monitor, stopper.best,
                         stopper.best_epoch, weights_epoch, progress.history)

    def _calibrate(self, module: TrainableModel, held_out: torch.Tensor | None) -> None:
        """The model's ``calibrate`` on every rank (their weights are the same), in eval mode, without gradients."""
        with evaluating(module) as (model, _):
            model.calibrate(held_out)

    def _best_state_so_far(self, module: TrainableModel, progress: _Progress) -> dict[str, torch.Tensor] | None:
        """For ``weights="best"`` on resume: the best epoch's weights, the restored ones if it is the checkpoint's
        own epoch, else the ``best`` checkpoint's, which must hold that epoch."""
        best_epoch = progress.stopper.best_epoch
        if self.config.weights != BEST or best_epoch is None:
            return None
        if best_epoch == progress.next_epoch - 1:
            return _copied(module.trainable_state())
        path = None if self.checkpoint_dir is None else self.checkpoint_dir / f"{BEST}.safetensors"
        if path is None or not path.is_file():
            raise CheckpointError(f"weights={BEST}: the best epoch so far is {best_epoch}, and its checkpoint "
                                  f"{path or f'{BEST}.safetensors (no checkpoint_dir)'} is missing")
        best = load_checkpoint(path)
        if best.progress["next_epoch"] != best_epoch + 1:
            raise CheckpointError(f"weights={BEST}: with this patience/min_delta the best epoch is {best_epoch}, but "
                                  f"{path} holds epoch {best.progress['next_epoch'] - 1}; resume with the run's min_delta")
        return best.model_state

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
        """One epoch of optimisation steps (up to ``max_steps`` in all); returns the mean loss over its steps
        (and over ranks)."""
        config, device = self.config, torch.device(self.config.device)
        module.train()
        module.on_train_epoch_start(epoch)
        batches = plan.rank_batches(config.seed, epoch, rank)
        if config.max_steps is not None:  # every rank has done the same number of steps
            batches = batches[: config.max_steps - progress.global_step]
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
            if config.clip_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]],
                                               config.clip_grad_norm)
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

    def _held_out_loss(self, module: TrainableModel, images: torch.Tensor, rank: int) -> float:
        """Rank 0's held-out loss on every rank (the ranks' weights are the same; one computes, as it validates)."""
        value = held_out_loss(module, images, self.config.predict_batch_size) if rank == 0 else math.nan
        return float(from_rank_zero(torch.tensor([value], dtype=torch.float64), self.config.device))

    def _validate(self, module: TrainableModel, validation: ValidationSet, epoch: int) -> MetricReport:
        report = evaluate(module, validation, self.config.predict_batch_size, self.config.fpr_limit)
        module.on_validation_epoch_end(epoch, report.values)
        return report

    def _check_monitor(
        self,
        stopper: EarlyStopping,
        epoch: int,
        loss: float,
        held_out_value: float | None,
        report: MetricReport | None,
        validated: bool,
        rank: int,
    ) -> bool:
        """Feed this epoch's monitored value (if it has one) to early stopping, the same on every rank.

        The losses are already the same on all ranks; a metric exists on rank 0 only and is broadcast, an
        undefined one as NaN, so that every rank raises rather than some waiting forever for the others.
        """
        monitor = self.config.monitor
        if monitor == LOSS:
            return stopper.update(loss, epoch)
        if monitor == HELD_OUT_LOSS:
            return stopper.update(held_out_value, epoch)
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
        n_held_out: int,
        improved: bool,
    ) -> dict[str, Path]:
        """Write "latest" (every epoch) and, when the monitor improved, "best"; returns what was written."""
        if self.checkpoint_dir is None:
            return {}
        checkpoint = TrainingCheckpoint.capture(module, optimizer, scheduler,
                                                progress.to_json(self.config, n_images, n_held_out))
        paths = {}
        for kind in (LATEST, BEST) if improved else (LATEST,):
            paths[kind] = save_checkpoint(checkpoint, self.checkpoint_dir / f"{kind}.safetensors")
            if self.callbacks.on_checkpoint is not None:
                self.callbacks.on_checkpoint(paths[kind], kind)
        return paths


def _copied(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A copy in host memory: the live tensors keep training."""
    return {name: value.detach().to("cpu", copy=True) for name, value in state.items()}


def _checked_losses(losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if LOSS not in losses:
        raise KeyError(f"training_step must return a {LOSS!r} entry; it returned {sorted(losses)}")
    for name, value in losses.items():
        if not isinstance(value, torch.Tensor) or value.ndim != 0:
            raise TypeError(f"training_step's {name!r} must be a scalar tensor, got {type(value).__name__} "
                            f"{getattr(value, 'shape', '')}")
    return losses
