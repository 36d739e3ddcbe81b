"""FastFlow: 2D normalizing flows on frozen CNN features (Yu et al. 2021; gathierry/FastFlow, anomalib ``Fastflow``).

The authors published no code; gathierry/FastFlow is the reimplementation anomalib's was adapted from, and the
two compute the same model. Each chosen stage of a frozen, pretrained CNN (ResNets' layer1-3) is normalised by
a trainable ``LayerNorm`` over [C, h, w] and mapped by its own flow to a standard normal variable z of the same
shape. Trained by maximum likelihood on normal images, the flow gives normal features a high density; an
anomaly's features land where the density is low.

- The flow (gathierry fastflow.py ``nf_fast_flow``, anomalib fastflow/torch_model.py ``create_fast_flow_block``):
  a FrEIA ``SequenceINN`` of ``flow_steps`` ``AllInOneBlock`` couplings (affine clamping 2.0, a fixed random
  hard channel permutation, the softplus global affine scaling), each coupling's subnet conv-ReLU-conv with
  ``int(channels x hidden_ratio)`` hidden channels, 3x3 kernels, or on odd steps 1x1 unless ``conv3x3_only``.
  anomalib vendors FrEIA's block (models/components/flow/all_in_one_block.py); this module uses the FrEIA
  package itself, as gathierry does. The vendored copy computes the same function; it draws the permutation
  from torch's RNG where FrEIA draws it from numpy's, so equal seeds give different (equally valid) flows.
- The loss (gathierry ``FastFlow.forward``, anomalib fastflow/loss.py): per layer, the mean over the batch of
  0.5 sum(z^2) - log|det J|, summed over layers: the negative log-likelihood up to a constant.
- The anomaly map (the same two files, anomaly_map.py in anomalib): per layer p = exp(-0.5 mean_c z^2),
  upsampled bilinearly (``align_corners=False``) to the image; the map is -mean over layers of p, so it lies in
  [-1, 0] and higher is more anomalous. The image score is its maximum (anomalib; gathierry evaluates only
  pixel AUROC).

ViT extractors (the paper's CaiT and DeiT, flow steps 20, hidden ratio 0.16) are not offered: the project's
ViTs are DINO models, and FastFlow's ViT recipes read CaiT/DeiT blocks that ``FeatureBackbone`` does not build.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from FrEIA.framework import SequenceINN
from FrEIA.modules import AllInOneBlock
from torch import nn
from torch.optim import Adam, Optimizer

from anomaly_core.training.teacher import DistillationModel

CLAMP = 2.0  # AllInOneBlock's affine_clamping: gathierry nf_fast_flow(clamp=2.0), anomalib create_fast_flow_block


@dataclass(frozen=True, kw_only=True)
class FastflowSettings:
    """Everything besides the extractor's weights file that fixes a FastFlow model and its training.

    The training values have no defaults: a recipe (anomaly_core.registry.MODELS) or the caller
    names each one, so no value passes for a reference it is not.
    """

    backbone: str = "resnet18"
    layers: tuple[str, ...] = ()  # () = teacher.default_layers: layer1-3 for ResNets (out_indices [1, 2, 3])
    crop: int = 256
    lr: float  # Adam
    weight_decay: float
    flow_steps: int
    hidden_ratio: float  # the subnets' hidden channels per input channel
    conv3x3_only: bool  # False: odd flow steps use 1x1 subnet convolutions
    init_seed: int  # the flows' initialisation (the run seed): the same on every rank and every rebuild

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))  # JSON gives a list back
        if self.flow_steps < 1:
            raise ValueError(f"flow_steps must be at least 1, got {self.flow_steps}")
        if self.hidden_ratio <= 0:
            raise ValueError(f"hidden_ratio must be positive, got {self.hidden_ratio}")


def subnet_conv(kernel_size: int, hidden_ratio: float) -> Callable[[int, int], nn.Module]:
    """The coupling subnet constructor FrEIA calls with (channels in, channels out): conv-ReLU-conv."""

    def build(in_channels: int, out_channels: int) -> nn.Module:
        hidden = int(in_channels * hidden_ratio)
        if hidden < 1:
            raise ValueError(f"hidden_ratio {hidden_ratio} leaves no hidden channels for a coupling of "
                             f"{in_channels} input channels")
        return nn.Sequential(nn.Conv2d(in_channels, hidden, kernel_size, padding="same"), nn.ReLU(),
                             nn.Conv2d(hidden, out_channels, kernel_size, padding="same"))

    return build


def fast_flow(shape: tuple[int, int, int], settings: FastflowSettings) -> SequenceINN:
    """One layer's flow over [C, h, w] maps (gathierry ``nf_fast_flow``, anomalib ``create_fast_flow_block``)."""
    flow = SequenceINN(*shape)
    for step in range(settings.flow_steps):
        kernel_size = 1 if step % 2 == 1 and not settings.conv3x3_only else 3
        flow.append(AllInOneBlock, subnet_constructor=subnet_conv(kernel_size, settings.hidden_ratio),
                    affine_clamping=CLAMP, permute_soft=False)
    return flow


class Fastflow(DistillationModel):
    settings_type: ClassVar[type] = FastflowSettings
    kind: ClassVar[str] = "fastflow"

    def __init__(self, settings: FastflowSettings, weights: str) -> None:
        super().__init__(settings.backbone, settings.layers, weights, settings.crop)
        self.settings = replace(settings, layers=self.teacher.layers)
        # The maps' real shapes at this crop (the references' int(crop / stride) where the crop divides evenly).
        shapes = [tuple(feature.shape[1:]) for feature in self.teacher(torch.zeros(1, 3, settings.crop, settings.crop))]
        self.norms = nn.ModuleList(nn.LayerNorm(list(shape), elementwise_affine=True) for shape in shapes)
        # Subnet weights draw from torch's RNG, FrEIA's permutations from numpy's: both seeded, both restored.
        numpy_state = np.random.get_state()
        try:
            np.random.seed(settings.init_seed % 2**32)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(settings.init_seed)
                self.flows = nn.ModuleList(fast_flow(shape, settings) for shape in shapes)
        finally:
            np.random.set_state(numpy_state)

    def _latents(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per layer, z [B, C, h, w] and log|det J| [B]."""
        outputs = [flow(norm(feature)) for norm, flow, feature in
                   zip(self.norms, self.flows, self.teacher_features(images))]
        return [z for z, _ in outputs], [log_jac for _, log_jac in outputs]

    def training_step(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The mean over the batch keeps the global batch's mean under DDP (equal shards, averaged gradients)."""
        latents, log_jacs = self._latents(images)
        terms = {f"loss/{layer}": (0.5 * (z**2).sum(dim=(1, 2, 3)) - log_jac).mean()
                 for layer, z, log_jac in zip(self.teacher.layers, latents, log_jacs)}
        return {"loss": torch.stack(list(terms.values())).sum(), **terms}

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Map: -mean over layers of exp(-0.5 mean_c z^2), upsampled bilinearly; score: its max (module docstring).
        The operations in the references' order, so equal latents give equal maps to the last bit."""
        latents, _ = self._latents(images)
        maps = [F.interpolate(-torch.exp(-torch.mean(z**2, dim=1, keepdim=True) * 0.5), size=images.shape[-2:],
                              mode="bilinear", align_corners=False) for z in latents]
        anomaly_map = torch.stack(maps, dim=-1).mean(dim=-1)[:, 0]
        return {"pred_score": anomaly_map.amax(dim=(1, 2)), "anomaly_map": anomaly_map}

    def configure_optimizers(self, epochs: int, steps_per_epoch: int) -> tuple[Optimizer, None]:
        """Adam on the norms and flows, a constant rate (gathierry main.py ``build_optimizer``, anomalib
        lightning_model.py): the flows' permutations and the extractor take no gradient."""
        trained = [parameter for parameter in self.parameters() if parameter.requires_grad]
        return Adam(trained, lr=self.settings.lr, weight_decay=self.settings.weight_decay), None
