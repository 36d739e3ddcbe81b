"""The frozen, pretrained teacher that Reverse Distillation and STFPM train a network against (FastFlow's
frozen feature extractor).

The teacher is a project ``FeatureBackbone`` (weights from a local file, recorded by sha256), so trained
models carry the same provenance as memory banks. Its weights are not part of checkpoints or model
files: they are rebuilt from the weights file and checked against the recorded digest instead.
"""

from __future__ import annotations

from typing import Any, ClassVar

import timm
import torch

from anomaly_core.backbones import FeatureBackbone, WeightsError, architecture
from anomaly_core.training.model import TrainableModel

_MIN_STRIDE = 4  # stem-level maps (stride 2) are not distilled; see default_layers


def default_layers(backbone: str, count: int = 3) -> tuple[str, ...]:
    """The first ``count`` feature stages at stride >= 4: ResNets' layer1-3, as both papers distil them.

    For EfficientNet-Lite that is blocks.1, blocks.2, blocks.4 (strides 4, 8, 16): its stride-2 blocks.0
    corresponds to a ResNet's stem (act1), which the methods skip too.
    """
    if architecture(backbone).patch_size is not None:
        raise WeightsError(f"backbone {backbone!r} is a ViT: its maps share one stride, and RD/STFPM/FastFlow need a CNN")
    probe = timm.create_model(architecture(backbone).timm_name, pretrained=False, features_only=True)
    layers = [info["module"] for info in probe.feature_info.get_dicts() if info["reduction"] >= _MIN_STRIDE]
    return tuple(layers[:count])


class DistillationModel(TrainableModel):
    """A trainable model with a frozen CNN teacher (``frozen``: in eval mode whatever ``train()`` is asked, out of
    checkpoints)."""

    frozen: ClassVar[tuple[str, ...]] = ("teacher",)

    def __init__(self, backbone: str, layers: tuple[str, ...], weights: str, crop: int) -> None:
        super().__init__()
        layers = tuple(layers) or default_layers(backbone)
        if architecture(backbone).patch_size is not None:
            raise WeightsError(f"backbone {backbone!r} is a ViT; {type(self).__name__} needs a CNN backbone")
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
