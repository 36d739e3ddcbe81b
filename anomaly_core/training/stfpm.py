"""STFPM: Student-Teacher Feature Pyramid Matching (Wang et al. 2021; anomalib ``Stfpm``).

A student of the teacher's architecture, randomly initialised, learns to reproduce the frozen teacher's
channel-normalised feature pyramid on normal images. It never learns what anomalies look like to the
teacher, so their features disagree there.

The loss is the official one: per layer 0.5 x the squared distance between the normalised maps, summed
over channels, averaged over pixels and *summed* over the images of the batch (``MSELoss(reduction="sum")``
/ (h w) in the official code and anomalib), which is what the published SGD rate of 0.4 is tuned for.
Under DDP, each rank sums its share and multiplies by the world size: DDP averages the ranks' gradients,
so the result is the gradient of the sum over the global batch, as one process would compute it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch.optim import SGD, Optimizer

from anomaly_core.backbones import trainable_feature_model
from anomaly_core.training.distributed import world_size
from anomaly_core.training.teacher import DistillationModel


@dataclass(frozen=True)
class StfpmSettings:
    """Everything besides the teacher weights file that fixes an STFPM model and its training."""

    backbone: str = "resnet18"
    layers: tuple[str, ...] = ()  # () = teacher.default_layers: layer1-3 for ResNets
    crop: int = 256
    lr: float = 0.4
    momentum: float = 0.9
    weight_decay: float = 1e-4
    init_seed: int = 0  # student initialisation: the same on every rank and every rebuild

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))  # JSON gives a list back


def _normalised_distance(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """0.5 x ||t/|t| - s/|s|||^2 over channels, per pixel: [B, h, w]."""
    difference = F.normalize(teacher, dim=1) - F.normalize(student, dim=1)
    return 0.5 * (difference * difference).sum(dim=1)


class Stfpm(DistillationModel):
    settings_type: ClassVar[type] = StfpmSettings
    kind: ClassVar[str] = "stfpm"
    default_batch_size: ClassVar[int] = 32

    def __init__(self, settings: StfpmSettings, weights: str) -> None:
        super().__init__(settings.backbone, settings.layers, weights, settings.crop)
        self.settings = replace(settings, layers=self.teacher.layers)
        self.student = trainable_feature_model(settings.backbone, self.teacher.layers, settings.init_seed)

    def training_step(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        teacher, student = self.teacher_features(images), self.student(images)
        scale = world_size()  # see the module docstring
        terms = {
            f"loss/{layer}": _normalised_distance(t, s).mean(dim=(1, 2)).sum() * scale
            for layer, t, s in zip(self.teacher.layers, teacher, student)
        }
        return {"loss": torch.stack(list(terms.values())).sum(), **terms}

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Map: the product over layers of the per-pixel distance, upsampled bilinearly (official, anomalib);
        no blur, as anomalib; score: the map's max."""
        teacher, student = self.teacher_features(images), self.student(images)
        maps = torch.ones(len(images), *images.shape[-2:], device=images.device)
        for t, s in zip(teacher, student):
            layer_map = _normalised_distance(t, s).unsqueeze(1)
            maps = maps * F.interpolate(layer_map, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        return {"pred_score": maps.amax(dim=(1, 2)), "anomaly_map": maps}

    def configure_optimizers(self, epochs: int, steps_per_epoch: int) -> tuple[Optimizer, None]:
        """SGD on the student, constant rate (no scheduler), as the paper and anomalib."""
        settings = self.settings
        return SGD(self.student.parameters(), lr=settings.lr, momentum=settings.momentum,
                   weight_decay=settings.weight_decay), None
