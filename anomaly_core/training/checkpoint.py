"""Training checkpoints without pickle: tensors in one ``.safetensors`` file, everything else as JSON in its header.

A checkpoint may come from shared storage another user can write to, so nothing in it is ever unpickled
(``torch.load`` is not used): tensors are raw safetensors data and the rest is JSON. One file, written
atomically, means a crash leaves the old checkpoint or the new one, never a tensor file and a description
of some other state. Tensors keep their dtype and bytes, so a round trip is bit-exact, and restoring
model, optimizer, scheduler and RNG states resumes training on exactly the uninterrupted run's weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from anomaly_core.bank import atomic_write
from anomaly_core.training.model import TrainableModel

CHECKPOINT_FORMAT = "anomaly-bench-checkpoint/1"
_HEADER_KEY = "checkpoint"  # safetensors metadata entry holding the JSON part
_MODEL, _OPTIMIZER, _RNG = "model/", "optimizer/", "rng/"


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or does not belong to the run that tries to resume from it."""


@dataclass
class TrainingCheckpoint:
    model_state: dict[str, torch.Tensor]  # the model's trainable_state()
    optimizer_state: dict[str, Any]  # torch's Optimizer.state_dict()
    scheduler_state: dict[str, Any] | None
    rng_state: dict[str, Any]  # see capture_rng_state
    progress: dict[str, Any]  # JSON: epoch, step, early stopping, history: whatever the trainer resumes from
    architecture: dict[str, Any]  # the model's describe()

    @classmethod
    def capture(
        cls,
        model: TrainableModel,
        optimizer: Optimizer,
        scheduler: LRScheduler | None,
        progress: dict[str, Any],
    ) -> TrainingCheckpoint:
        return cls(
            model_state=model.trainable_state(),
            optimizer_state=optimizer.state_dict(),
            scheduler_state=None if scheduler is None else scheduler.state_dict(),
            rng_state=capture_rng_state(),
            progress=progress,
            architecture=model.describe(),
        )

    def restore(self, model: TrainableModel, optimizer: Optimizer, scheduler: LRScheduler | None) -> None:
        """Put model, optimizer, scheduler and the global RNGs in the captured state (the model must match)."""
        check_architecture(self.architecture, model.describe(), "checkpoint")
        if (scheduler is None) != (self.scheduler_state is None):
            raise CheckpointError("the checkpoint and the model disagree on whether a learning-rate scheduler is used")
        model.load_trainable_state(self.model_state)
        optimizer.load_state_dict(self.optimizer_state)
        if scheduler is not None:
            scheduler.load_state_dict(self.scheduler_state)
        restore_rng_state(self.rng_state)


def capture_rng_state() -> dict[str, Any]:
    """torch's CPU generator and numpy's legacy global generator (the ones augmentation code may draw from)."""
    algorithm, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"algorithm": algorithm, "keys": np.asarray(keys, dtype=np.uint32), "pos": int(position),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    numpy = state["numpy"]
    np.random.set_state((numpy["algorithm"], numpy["keys"], numpy["pos"], numpy["has_gauss"], numpy["cached_gaussian"]))


def check_architecture(recorded: dict[str, Any], current: dict[str, Any], source: str) -> None:
    """Refuse weights recorded for another model description (compared as JSON: tuples equal lists)."""
    recorded, current = _as_json(recorded), _as_json(current)
    if recorded != current:
        differences = [f"{key}: {source} has {recorded.get(key)!r}, the model has {current.get(key)!r}"
                       for key in sorted(set(recorded) | set(current)) if recorded.get(key) != current.get(key)]
        raise CheckpointError(f"{source} was written for another model: " + "; ".join(differences))


def save_checkpoint(checkpoint: TrainingCheckpoint, path: Path) -> Path:
    """Write ``checkpoint`` to ``path`` (a ``.safetensors`` file) atomically; returns the path."""
    path = Path(path)
    tensors = {_MODEL + name: value for name, value in checkpoint.model_state.items()}
    optimizer_tensors, optimizer_json = _split_optimizer_state(checkpoint.optimizer_state)
    tensors.update(optimizer_tensors)
    numpy_state = dict(checkpoint.rng_state["numpy"])
    tensors[_RNG + "torch"] = checkpoint.rng_state["torch"]
    tensors[_RNG + "numpy_keys"] = torch.from_numpy(numpy_state.pop("keys").view(np.uint8))
    header = {
        "format": CHECKPOINT_FORMAT,
        "architecture": checkpoint.architecture,
        "progress": checkpoint.progress,
        "optimizer": optimizer_json,
        "scheduler": checkpoint.scheduler_state,
        "rng": {"numpy": numpy_state},
    }
    try:
        encoded = json.dumps(header, sort_keys=True)
    except TypeError as error:
        raise CheckpointError(f"checkpoint state for {path} holds a value JSON cannot store: {error}") from error
    # Copies: safetensors refuses views sharing storage, and the live tensors keep changing.
    tensors = {name: value.detach().cpu().contiguous().clone() for name, value in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={_HEADER_KEY: encoded}))
    return path


def load_checkpoint(path: Path) -> TrainingCheckpoint:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = json.loads((handle.metadata() or {})[_HEADER_KEY])
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as error:  # safetensors and json raise many types for damaged files
        raise CheckpointError(f"cannot read checkpoint {path}: {error}") from error
    if header.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: format {header.get('format')!r} is not {CHECKPOINT_FORMAT!r}")
    numpy_state = dict(header["rng"]["numpy"], keys=tensors.pop(_RNG + "numpy_keys").numpy().view(np.uint32))
    return TrainingCheckpoint(
        model_state={name.removeprefix(_MODEL): value for name, value in tensors.items() if name.startswith(_MODEL)},
        optimizer_state=_join_optimizer_state(tensors, header["optimizer"]),
        scheduler_state=header["scheduler"],
        rng_state={"torch": tensors[_RNG + "torch"], "numpy": numpy_state},
        progress=header["progress"],
        architecture=header["architecture"],
    )


def _split_optimizer_state(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Per-parameter tensors (moments, step counts) as named tensors; hyper-parameters and scalars as JSON."""
    tensors, scalars = {}, {}
    for index, values in state_dict["state"].items():
        scalars[str(index)] = {}
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{_OPTIMIZER}{index}/{name}"] = value
            else:
                scalars[str(index)][name] = value
    return tensors, {"param_groups": state_dict["param_groups"], "state": scalars}


def _join_optimizer_state(tensors: dict[str, torch.Tensor], recorded: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {int(index): dict(values) for index, values in recorded["state"].items()}
    for name, value in tensors.items():
        if name.startswith(_OPTIMIZER):
            index, key = name.removeprefix(_OPTIMIZER).split("/", 1)
            state[int(index)][key] = value
    # JSON turned tuples (Adam's betas) into lists; "params" is the one list torch keeps as a list.
    groups = [{key: value if key == "params" or not isinstance(value, list) else tuple(value)
               for key, value in group.items()} for group in recorded["param_groups"]]
    return {"state": dict(sorted(state.items())), "param_groups": groups}


def _as_json(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True))
