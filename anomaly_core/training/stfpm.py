"""STFPM: Student-Teacher Feature Pyramid Matching (Wang et al. 2021; gdwang08/STFPM, anomalib ``Stfpm``).

A student of the teacher's architecture, randomly initialised, learns to reproduce the frozen teacher's
channel-normalised feature pyramid on normal images. It never learns what anomalies look like to the
teacher, so their features disagree there.

The authors' code and anomalib train it differently; each form is a setting, and the recipes of
``anomaly_core.registry.MODELS`` (``stfpm``, the authors', and ``anomalib``) choose them:

- ``loss``: per layer, the squared distance d = ||t/|t| - s/|s|||^2 summed over channels, averaged over
  pixels, then ``"mean"`` over the images (gdwang08/STFPM main.py ``train_val``:
  ``torch.sum((t - s) ** 2, 1).mean()``) or ``"half_sum"``, 0.5 x summed over the images (anomalib
  ``stfpm/loss.py``: ``0.5 / (h w) x MSELoss(reduction="sum")``): B/2 times the mean, so at
  batch 32 and the same SGD rate of 0.4 anomalib's gradients are 16 times the authors'. Under DDP each rank
  takes an equal share of the batch and DDP averages the ranks' gradients: the mean is then the global
  batch's mean, and the sum is multiplied by the world size to be the global batch's sum.
- ``zero_init_last``: the student is timm's network, whose ResNets zero the last BatchNorm weight of every
  residual block (anomalib's student, ``stfpm/torch_model.py``); the authors' student is torchvision's
  ``resnet18(pretrained=False)``, which does not. Off, timm's ResNet initialises as torchvision's does
  (Kaiming-normal convolutions, BatchNorm weight 1, bias 0), though not with the same random draws.
- ``held_out_loss``: the authors keep the epoch whose mean anomaly map over 20 % of train/good held out is
  lowest (main.py ``train_val`` / ``test``); the Trainer's ``held_out_loss`` monitor calls it.

The anomaly map is anomalib's (``stfpm/anomaly_map.py``): the product over layers of 0.5 d, each upsampled
bilinearly to the image. The authors' (main.py ``test``) multiplies d without the 0.5 at 64 x 64 and resizes
that: a constant factor 8 for three layers, which no ranking metric sees, and another interpolation.
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

LOSSES = ("mean", "half_sum")


@dataclass(frozen=True, kw_only=True)
class StfpmSettings:
    """Everything besides the teacher weights file that fixes an STFPM model and its training.

    The training values have no defaults: a recipe (anomaly_core.registry.MODELS) or the caller
    names each one, so no value passes for a reference it is not.
    """

    backbone: str = "resnet18"
    layers: tuple[str, ...] = ()  # () = teacher.default_layers: layer1-3 for ResNets
    crop: int = 256
    lr: float  # SGD
    momentum: float
    weight_decay: float
    loss: str  # "mean" or "half_sum", see the module docstring
    zero_init_last: bool  # timm's zero-initialised last BatchNorm of each residual block
    init_seed: int  # student initialisation (the run seed): the same on every rank and every rebuild

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))  # JSON gives a list back
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")


def _squared_distance(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """||t/|t| - s/|s|||^2 over channels, per pixel: [B, h, w]."""
    difference = F.normalize(teacher, dim=1) - F.normalize(student, dim=1)
    return (difference * difference).sum(dim=1)


class Stfpm(DistillationModel):
    settings_type: ClassVar[type] = StfpmSettings
    kind: ClassVar[str] = "stfpm"

    def __init__(self, settings: StfpmSettings, weights: str) -> None:
        super().__init__(settings.backbone, settings.layers, weights, settings.crop)
        self.settings = replace(settings, layers=self.teacher.layers)
        self.student = trainable_feature_model(settings.backbone, self.teacher.layers, settings.init_seed,
                                               zero_init_last=settings.zero_init_last)

    def training_step(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        teacher, student = self.teacher_features(images), self.student(images)
        terms = {}
        for layer, t, s in zip(self.teacher.layers, teacher, student):
            per_image = _squared_distance(t, s).mean(dim=(1, 2))
            if self.settings.loss == "mean":
                terms[f"loss/{layer}"] = per_image.mean()
            else:  # see the module docstring for the world size
                terms[f"loss/{layer}"] = 0.5 * per_image.sum() * world_size()
        return {"loss": torch.stack(list(terms.values())).sum(), **terms}

    def held_out_loss(self, images: torch.Tensor) -> torch.Tensor:
        """Per image, the mean of the product over layers of d at the shallowest layer's resolution (64 x 64
        at 256 px): the authors' selection criterion, main.py ``test`` (bilinear, ``align_corners=False``)."""
        teacher, student = self.teacher_features(images), self.student(images)
        size = teacher[0].shape[-2:]
        product = torch.ones(len(images), 1, *size, device=images.device)
        for t, s in zip(teacher, student):
            product = product * F.interpolate(_squared_distance(t, s).unsqueeze(1), size=size, mode="bilinear",
                                              align_corners=False)
        return product.mean(dim=(1, 2, 3))

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Map: the product over layers of 0.5 d, upsampled bilinearly (anomalib); no blur, as anomalib;
        score: the map's max."""
        teacher, student = self.teacher_features(images), self.student(images)
        maps = torch.ones(len(images), *images.shape[-2:], device=images.device)
        for t, s in zip(teacher, student):
            layer_map = 0.5 * _squared_distance(t, s).unsqueeze(1)
            maps = maps * F.interpolate(layer_map, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        return {"pred_score": maps.amax(dim=(1, 2)), "anomaly_map": maps}

    def configure_optimizers(self, epochs: int, steps_per_epoch: int) -> tuple[Optimizer, None]:
        """SGD on the student, constant rate (no scheduler): the authors' main.py and anomalib alike."""
        settings = self.settings
        return SGD(self.student.parameters(), lr=settings.lr, momentum=settings.momentum,
                   weight_decay=settings.weight_decay), None
