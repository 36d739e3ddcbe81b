"""The frozen, pretrained teacher that Reverse Distillation and STFPM train a network against.

The teacher is a project ``FeatureBackbone`` (weights from a local file, recorded by sha256), so trained
models carry the same provenance as memory banks. Its weights are not part of checkpoints or model
files: they are rebuilt from the weights file and checked against the recorded digest instead.
"""

from __future__ import annotations

from typing import Any

import timm
import torch

from anomaly_core.backbones import FeatureBackbone, WeightsError, architecture
from anomaly_core.training.model import TrainableModel

_TEACHER = "teacher."
_MIN_STRIDE = 4  # stem-level maps (stride 2) are not distilled; see default_layers


def default_layers(backbone: str, count: int = 3) -> tuple[str, ...]:
    """The first ``count`` feature stages at stride >= 4: ResNets' layer1-3, as both papers distil them.

    For EfficientNet-Lite that is blocks.1, blocks.2, blocks.4 (strides 4, 8, 16): its stride-2 blocks.0
    corresponds to a ResNet's stem (act1), which the methods skip too.
    """
    if architecture(backbone).patch_size is not None:
        raise WeightsError(f"backbone {backbone!r} is a ViT: its maps share one stride, and RD/STFPM need a CNN")
    probe = timm.create_model(architecture(backbone).timm_name, pretrained=False, features_only=True)
    layers = [info["module"] for info in probe.feature_info.get_dicts() if info["reduction"] >= _MIN_STRIDE]
    return tuple(layers[:count])


class FrozenTeacherModel(TrainableModel):
    """A trainable model with a frozen pretrained ``teacher`` module: it stays in eval mode whatever ``train()``
    is asked, and its weights (rebuilt from their file and checked by sha256) stay out of checkpoints and
    model files."""

    teacher: torch.nn.Module

    def train(self, mode: bool = True) -> FrozenTeacherModel:
        super().train(mode)
        self.teacher.eval()  # BatchNorm statistics of the pretrained teacher must not move
        return self

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {name: value for name, value in self.state_dict().items() if not name.startswith(_TEACHER)}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        result = self.load_state_dict(state, strict=False)
        missing = [name for name in result.missing_keys if not name.startswith(_TEACHER)]
        if missing or result.unexpected_keys:
            raise ValueError(f"state does not fit {type(self).__name__}: missing {missing[:5]}, "
                           f"unexpected {result.unexpected_keys[:5]}")


class DistillationModel(FrozenTeacherModel):
    """A trainable model with a frozen CNN teacher (a ``FeatureBackbone``)."""

    def __init__(self, backbone: str, layers: tuple[str, ...], weights: str, crop: int) -> None:
        super().__init__()
        layers = tuple(layers) or default_layers(backbone)
        if architecture(backbone).patch_size is not None:
            raise WeightsError(f"backbone {backbone!r} is a ViT; Reverse Distillation and STFPM need a CNN teacher")
        self.teacher = FeatureBackbone(backbone, layers, weights, crop)
        strides = self.teacher.strides
        if list(strides) != sorted(set(strides)):
            raise WeightsError(f"teacher layers {list(layers)} must be distinct and ordered shallow to deep "
                               f"(strides {list(strides)})")
        self.crop = crop

    def teacher_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Teacher maps as ordinary tensors: ``FeatureBackbone`` runs under inference mode, whose tensors
        autograd refuses to save for backward; a clone made outside it is a normal (constant) tensor."""
        return [feature.clone() for feature in self.teacher(images)]

    def provenance(self) -> dict[str, Any]:
        """The teacher facts model files and checkpoints are checked against (``bank.json``'s names)."""
        return {
            "backbone": self.teacher.name,
            "layers": list(self.teacher.layers),
            "weights_sha256": self.teacher.weights_sha256,
            "crop": self.crop,
            "mean": list(self.teacher.mean),
            "std": list(self.teacher.std),
            "channels": list(self.teacher.channels),
            "strides": list(self.teacher.strides),
        }
