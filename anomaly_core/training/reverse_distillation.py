"""Reverse Distillation (Deng & Li, CVPR 2022; hq-deng/RD4AD, anomalib ``ReverseDistillation``).

A frozen teacher encodes the image; a trainable one-class bottleneck (OCBE) fuses the teacher's maps into
one compact code, and a decoder rebuilds the teacher's maps from it in reverse order (deepest first).
Trained on normal images only, the decoder reproduces normal features; where the teacher sees something
the compact code cannot carry, the cosine distance between teacher and decoder maps marks the anomaly.

The bottleneck and decoder mirror the chosen teacher layers: their channels and strides are read from the
teacher, so the same code serves wide_resnet50_2's layer1-3 (the authors' setting, block for block as
RD4AD resnet.py ``BN_layer`` and de_resnet.py ``de_wide_resnet50_2``) and EfficientNet-Lite's stages. The
loss is RD4AD main.py ``loss_fucntion``, the map test.py ``cal_anomaly_map`` with ``amap_mode="a"`` and
``gaussian_filter(sigma=4)``. The optimiser's values come from a recipe (its entry in
``anomaly_core.registry.MODELS``: ``rd4ad``, the authors' main.py, or ``ader``, ADer's rd_256_100e.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import ClassVar, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter
from torch import nn
from torch.optim import Adam, Optimizer
from torch.optim.lr_scheduler import LambdaLR

from anomaly_core.training.schedules import WarmupStepDecay
from anomaly_core.training.teacher import DistillationModel


@dataclass(frozen=True, kw_only=True)
class ReverseDistillationSettings:
    """Everything besides the teacher weights file that fixes a Reverse Distillation model and its training.

    The training values have no defaults: a recipe (anomaly_core.registry.MODELS) or the caller
    names each one, so no value passes for a reference it is not.
    """

    backbone: str = "wide_resnet50_2"
    layers: tuple[str, ...] = ()  # () = teacher.default_layers: layer1-3 for ResNets
    crop: int = 256
    bottleneck_blocks: int = 3  # residual blocks of the OCBE (RD4AD: 3)
    decoder_blocks: tuple[int, ...] = (3, 4, 6)  # per decoder stage, deepest first (RD4AD, WRN50: 3, 4, 6)
    blur_sigma: float = 4.0  # RD4AD test.py and anomalib: gaussian sigma 4
    lr: float  # Adam
    betas: tuple[float, float]
    weight_decay: float
    warmup_epochs: int  # WarmupStepDecay: linear warm-up epochs, then x decay_factor from decay_at of the epochs
    decay_at: float
    decay_factor: float  # 1: no decay
    align_corners: bool  # of the maps' bilinear upsampling to the image (RD4AD test.py, ADer, anomalib: True)
    init_seed: int  # bottleneck/decoder initialisation (the run seed): the same on every rank and every rebuild

    def __post_init__(self) -> None:
        for name in ("layers", "decoder_blocks", "betas"):  # JSON gives lists back
            object.__setattr__(self, name, tuple(getattr(self, name)))


def _conv_bn_relu(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class _Bottleneck(nn.Module):
    """A wide ResNet bottleneck (1x1 reduce to half the output width, 3x3, 1x1 expand) with a residual.

    ``upsample`` > 1 makes it the decoder's mirror block: the 3x3 (and the shortcut) become transposed
    convolutions with kernel = stride = ``upsample`` (RD4AD de_resnet.py ``deconv2x2``).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, upsample: int = 1) -> None:
        super().__init__()
        width = max(out_channels // 2, 1)
        if upsample > 1:
            middle: nn.Module = nn.ConvTranspose2d(width, width, upsample, upsample, bias=False)
            shortcut: nn.Module = nn.ConvTranspose2d(in_channels, out_channels, upsample, upsample, bias=False)
        else:
            middle = nn.Conv2d(width, width, 3, stride, padding=1, bias=False)
            shortcut = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            middle, nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels),
        )
        changes_shape = stride > 1 or upsample > 1 or in_channels != out_channels
        self.shortcut = nn.Sequential(shortcut, nn.BatchNorm2d(out_channels)) if changes_shape else nn.Identity()
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.body(x) + self.shortcut(x))


class OneClassBottleneck(nn.Module):
    """OCBE: each shallower teacher map is brought to the deepest map's resolution by stride-2 3x3 convs
    (channels growing geometrically to the deepest map's), all are concatenated, and a residual stack halves
    the resolution again into ``2 x deepest channels``: the compact code the decoder must rebuild from."""

    def __init__(self, channels: Sequence[int], strides: Sequence[int], blocks: int) -> None:
        super().__init__()
        deepest_channels, deepest_stride = channels[-1], strides[-1]
        self.paths = nn.ModuleList()
        for channel, stride in zip(channels[:-1], strides[:-1]):
            steps = int(math.log2(deepest_stride // stride))
            widths = [round(channel * (deepest_channels / channel) ** (k / steps)) for k in range(steps + 1)]
            self.paths.append(nn.Sequential(*[_conv_bn_relu(a, b, 2) for a, b in zip(widths, widths[1:])]))
        self.out_channels = 2 * deepest_channels
        fused = deepest_channels * len(channels)
        self.stack = nn.Sequential(
            _Bottleneck(fused, self.out_channels, stride=2),
            *[_Bottleneck(self.out_channels, self.out_channels) for _ in range(blocks - 1)],
        )

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        fused = [path(feature) for path, feature in zip(self.paths, features[:-1])] + [features[-1]]
        return self.stack(torch.cat(fused, dim=1))


class ReverseDecoder(nn.Module):
    """The teacher's chosen layers in reverse: stage i upsamples by the stride ratio to teacher layer
    L-i and gives its channel count, so each output can be compared with that teacher map."""

    def __init__(
        self, channels: Sequence[int], strides: Sequence[int], in_channels: int, blocks: Sequence[int]
    ) -> None:
        super().__init__()
        self.stages = nn.ModuleList()
        current_channels, current_stride = in_channels, 2 * strides[-1]
        for channel, stride, count in zip(reversed(channels), reversed(strides), blocks):
            self.stages.append(nn.Sequential(
                _Bottleneck(current_channels, channel, upsample=current_stride // stride),
                *[_Bottleneck(channel, channel) for _ in range(count - 1)],
            ))
            current_channels, current_stride = channel, stride

    def forward(self, code: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        for stage in self.stages:
            code = stage(code)
            outputs.append(code)
        return outputs[::-1]  # shallow to deep, as the teacher's


class ReverseDistillation(DistillationModel):
    settings_type: ClassVar[type] = ReverseDistillationSettings
    kind: ClassVar[str] = "reverse_distillation"

    def __init__(self, settings: ReverseDistillationSettings, weights: str) -> None:
        super().__init__(settings.backbone, settings.layers, weights, settings.crop)
        self.settings = replace(settings, layers=self.teacher.layers)
        channels, strides = self.teacher.channels, self.teacher.strides
        if len(settings.decoder_blocks) != len(channels) or min(settings.decoder_blocks) < 1:
            raise ValueError(f"decoder_blocks needs one count >= 1 per teacher layer ({len(channels)}), "
                             f"got {list(settings.decoder_blocks)}")
        if settings.bottleneck_blocks < 1:
            raise ValueError(f"bottleneck_blocks must be >= 1, got {settings.bottleneck_blocks}")
        code_stride = 2 * strides[-1]
        if settings.crop % code_stride:
            raise ValueError(f"crop={settings.crop} must be a multiple of {code_stride} (twice the deepest teacher "
                             f"stride) for the decoder to rebuild the teacher's map sizes exactly")
        if any(strides[-1] % stride or (strides[-1] // stride) & (strides[-1] // stride - 1) for stride in strides):
            raise ValueError(f"teacher strides {list(strides)} must differ by powers of two")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(settings.init_seed)
            self.bottleneck = OneClassBottleneck(channels, strides, settings.bottleneck_blocks)
            self.decoder = ReverseDecoder(channels, strides, self.bottleneck.out_channels, settings.decoder_blocks)
            for module in [*self.bottleneck.modules(), *self.decoder.modules()]:
                if isinstance(module, nn.Conv2d):  # RD4AD's init (transposed convs keep torch's there too)
                    nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def _teacher_and_decoder(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        teacher = self.teacher_features(images)
        return teacher, self.decoder(self.bottleneck(teacher))

    def training_step(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per layer, the batch mean of 1 - cos between an image's flattened teacher and decoder maps."""
        teacher, decoded = self._teacher_and_decoder(images)
        terms = {
            f"loss/{layer}": (1 - F.cosine_similarity(t.flatten(1), d.flatten(1), dim=1)).mean()
            for layer, t, d in zip(self.teacher.layers, teacher, decoded)
        }
        return {"loss": torch.stack(list(terms.values())).sum(), **terms}

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Map: per layer 1 - cos over channels per pixel, upsampled bilinearly, summed, blurred; score: its max."""
        teacher, decoded = self._teacher_and_decoder(images)
        size = images.shape[-2:]
        maps = sum(
            F.interpolate((1 - F.cosine_similarity(t, d, dim=1)).unsqueeze(1), size=size, mode="bilinear",
                          align_corners=self.settings.align_corners)[:, 0]
            for t, d in zip(teacher, decoded)
        )
        sigma = self.settings.blur_sigma
        if sigma > 0:  # scipy's filter, as scoring.anomaly_map blurs PatchCore's maps
            blurred = gaussian_filter(maps.cpu().numpy(), sigma=(0, sigma, sigma)).astype(np.float32)
            maps = torch.from_numpy(blurred).to(images.device)
        return {"pred_score": maps.amax(dim=(1, 2)), "anomaly_map": maps}

    def configure_optimizers(self, epochs: int, steps_per_epoch: int) -> tuple[Optimizer, LambdaLR]:
        """Adam on bottleneck + decoder; linear warm-up, then a step decay (``WarmupStepDecay``), per step."""
        settings = self.settings
        optimizer = Adam([*self.bottleneck.parameters(), *self.decoder.parameters()], lr=settings.lr,
                         betas=settings.betas, weight_decay=settings.weight_decay)
        schedule = WarmupStepDecay(steps_per_epoch, epochs, settings.warmup_epochs, settings.decay_at,
                                   settings.decay_factor)
        return optimizer, LambdaLR(optimizer, schedule)
