"""The interface a trained anomaly model offers the ``Trainer``: Lightning's module contract, minus Lightning.

The engine stays free of Lightning (and of Ray and W&B): a model says how to compute its losses, how to
predict, and which optimizer it wants; the ``Trainer`` owns the loop, seeding, DDP and checkpoints.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict
from typing import Any, ClassVar

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from anomaly_core.backbones import architecture


class TrainableModel(torch.nn.Module, ABC):
    """A model the ``Trainer`` can fit, checkpoint and export.

    ``forward`` is the training step: DistributedDataParallel synchronises gradients only for work that
    went through its own ``forward``, so the Trainer calls the step through the (possibly wrapped) module.
    """

    kind: ClassVar[str]  # the name model files record, e.g. "reverse_distillation"
    # Submodules built from a weights file and never trained (a teacher, an encoder): kept in eval mode, left out of
    # checkpoints and model files (rebuilt from the file, checked by the sha256 that provenance() records instead).
    frozen: ClassVar[tuple[str, ...]] = ()
    settings_type: ClassVar[type]  # the model's settings dataclass: its fields are what model.json records
    settings: Any

    @classmethod
    def settings_of(cls, values: dict[str, Any]) -> Any:
        """The model's settings from the entries of ``values`` that name its fields (a resolved training config,
        a ``describe()`` record); the settings type refuses any missing training value."""
        names = cls.settings_type.__dataclass_fields__
        return cls.settings_type(**{key: value for key, value in values.items() if key in names})

    @classmethod
    def from_description(cls, description: dict[str, Any], weights: str) -> TrainableModel:
        """The model a ``describe()`` record (model.json, a checkpoint) describes, its pretrained part (if it
        has one) from ``weights``."""
        return cls(cls.settings_of(description), weights)

    @classmethod
    def normalisation(cls, backbone: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """The (mean, std) its input images are normalised with: the pretrained backbone's by default; a model
        that works on raw [0, 1] pixels (DRAEM) returns zeros and ones."""
        arch = architecture(backbone)
        return tuple(arch.mean), tuple(arch.std)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.training_step(images)

    @abstractmethod
    def training_step(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Scalar losses of one (per-rank) batch: ``"loss"`` is optimised, other terms are logged."""

    @abstractmethod
    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``"pred_score"`` [B] and ``"anomaly_map"`` [B, H, W] at the input size, for images [B, 3, H, W]."""

    def held_out_loss(self, images: torch.Tensor) -> torch.Tensor:
        """Per image [B], how badly the model fits normal images it never trained on (lower is better): what
        the Trainer's ``held_out_loss`` monitor averages. Called in eval mode, without gradients."""
        raise NotImplementedError(f"{self.kind} defines no held-out loss")

    @abstractmethod
    def configure_optimizers(self, epochs: int, steps_per_epoch: int) -> tuple[Optimizer, LRScheduler | None]:
        """The optimizer and an optional scheduler, which the Trainer steps after every optimisation step."""

    def describe(self) -> dict[str, Any]:
        """JSON description of everything that fixes the weights' meaning: kind, settings, and ``provenance``.

        Checkpoints and model files record it, and refuse to load into a model that describes itself otherwise.
        """
        return {"kind": self.kind, **asdict(self.settings), **self.provenance()}

    @abstractmethod
    def provenance(self) -> dict[str, Any]:
        """The facts model files are checked against on load, with ``bank.json``'s names: ``backbone``,
        ``layers`` and ``weights_sha256`` of its pretrained part (None for a model without one), ``crop``,
        and the input normalisation's ``mean`` and ``std``."""

    def train(self, mode: bool = True) -> TrainableModel:
        super().train(mode)
        for name in self.frozen:  # BatchNorm statistics, dropout of the pretrained part must not move
            getattr(self, name).eval()
        return self

    def _is_frozen(self, key: str) -> bool:
        return key.split(".", 1)[0] in self.frozen

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The tensors a checkpoint must hold: all but the ``frozen`` submodules'."""
        return {name: value for name, value in self.state_dict().items() if not self._is_frozen(name)}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        result = self.load_state_dict(state, strict=False)
        missing = [name for name in result.missing_keys if not self._is_frozen(name)]
        if missing or result.unexpected_keys:
            raise ValueError(f"state does not fit {type(self).__name__}: missing {missing[:5]}, "
                             f"unexpected {result.unexpected_keys[:5]}")

    def prepare(self, train_images: torch.Tensor) -> None:
        """Statistics of the training images (on the host; the model moves its batches) that the training step
        needs (EfficientAD's teacher channel mean and std), computed in eval mode without gradients before the
        first step of a fresh run; a resumed run restores them from its checkpoint, so they must be part of
        ``trainable_state``."""

    def calibrate(self, held_out: torch.Tensor | None) -> None:
        """Statistics that predictions need from normal images never trained on (EfficientAD's map normalisation
        quantiles), with the current weights: called in eval mode without gradients before each validation and
        once on the final weights; ``held_out`` (on the host) is None where the run holds no images out."""

    def on_fit_start(self) -> None:
        """Called once, after optimizers are configured and a checkpoint (if any) restored."""

    def on_train_epoch_start(self, epoch: int) -> None:
        """Called on every rank before the first batch of ``epoch`` (0-based)."""

    def on_train_epoch_end(self, epoch: int) -> None:
        """Called on every rank after the last optimisation step of ``epoch``."""

    def on_validation_epoch_end(self, epoch: int, metrics: dict[str, float | None]) -> None:
        """Called on rank 0 (the rank that validates) with the metrics of ``epoch``'s validation."""
