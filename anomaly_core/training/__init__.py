"""Trained anomaly models (anomaly_core.registry.MODELS) and the plain-PyTorch engine that trains them.

Pure PyTorch: no Lightning, Ray or W&B. The job layer runs ``Trainer.fit`` (in Ray Train workers for DDP),
forwards the Trainer's callbacks to its tracker, and exports the result with ``save_model_files``;
``predict_images`` gives ``scoring.Predictions``, so evaluation and reports treat trained models like banks.
"""

from anomaly_core.training.batches import EpochPlan
from anomaly_core.training.checkpoint import (
    CheckpointError,
    TrainingCheckpoint,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from anomaly_core.training.dinomaly import Dinomaly, DinomalySettings
from anomaly_core.training.early_stopping import EarlyStopping
from anomaly_core.training.fastflow import Fastflow, FastflowSettings
from anomaly_core.training.images import held_out_split, load_images, load_validation_set
from anomaly_core.training.model import TrainableModel
from anomaly_core.training.model_files import (
    ModelFilesError,
    check_model_compatible,
    load_model_files,
    read_model_metadata,
    save_model_files,
)
from anomaly_core.training.predict import predict_images
from anomaly_core.training.reverse_distillation import ReverseDistillation, ReverseDistillationSettings
from anomaly_core.training.schedules import WarmCosine, WarmupStepDecay
from anomaly_core.training.stfpm import Stfpm, StfpmSettings
from anomaly_core.training.sync_batchnorm import use_global_batchnorm
from anomaly_core.training.teacher import DistillationModel, default_layers
from anomaly_core.training.trainer import HELD_OUT_LOSS, FitResult, Trainer, TrainerCallbacks, TrainerConfig
from anomaly_core.training.validation import ValidationSet, evaluate, held_out_loss

__all__ = [
    "HELD_OUT_LOSS",
    "CheckpointError",
    "Dinomaly",
    "DinomalySettings",
    "DistillationModel",
    "EarlyStopping",
    "EpochPlan",
    "Fastflow",
    "FastflowSettings",
    "FitResult",
    "ModelFilesError",
    "ReverseDistillation",
    "ReverseDistillationSettings",
    "Stfpm",
    "StfpmSettings",
    "TrainableModel",
    "Trainer",
    "TrainerCallbacks",
    "TrainerConfig",
    "TrainingCheckpoint",
    "ValidationSet",
    "WarmCosine",
    "WarmupStepDecay",
    "capture_rng_state",
    "check_model_compatible",
    "default_layers",
    "evaluate",
    "held_out_loss",
    "held_out_split",
    "load_checkpoint",
    "load_images",
    "load_model_files",
    "load_validation_set",
    "predict_images",
    "read_model_metadata",
    "restore_rng_state",
    "save_checkpoint",
    "save_model_files",
    "use_global_batchnorm",
]
