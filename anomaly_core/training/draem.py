"""DRAEM: a discriminatively trained reconstruction embedding (Zavrtanik, Kristan & Skočaj, ICCV 2021;
VitjanZ/DRAEM, anomalib ``Draem``).

Trained from scratch on raw [0, 1] pixels, with no pretrained part: a reconstructive UNet-like autoencoder
learns to turn images with simulated anomalies (``anomaly_synthesis``) back into the normal image, and a
discriminative UNet, given the image and its reconstruction, learns to segment the simulated anomaly. At test
time the discriminator's softmax probability of "anomalous" is the map.

The two sub-networks are the authors' model_unet.py (``ReconstructiveSubNetwork`` base width 128,
``DiscriminativeSubNetwork`` base width 64; ``base_width`` scales both, for small CPU runs and tests), with
anomalib torch_model.py's parameter names (``reconstructive_subnetwork.encoder.block1.0.weight`` ...), so either
side's weights load into the other.
Where the authors and anomalib differ, a setting chooses (the recipes of ``anomaly_core.registry.MODELS``):

- ``loss_form``: ``"draem"`` (loss.py, train_DRAEM.py): MSE + (1 - SSIM), SSIM with an 11-pixel Gaussian
  window over zero padding and a dynamic range taken from the reconstruction (2 when it goes below -0.5, as
  their ``ssim`` does), + the focal loss (gamma 2) on the softmax with labels smoothed to [1e-5, 1 - 1e-5],
  averaged over all pixels; ``"anomalib"`` (draem/loss.py): MSE + 2 x kornia's ``SSIMLoss`` (reflect padding,
  clamped) + kornia's ``FocalLoss(alpha=1)``, which weights class 0 (normal pixels) by 1 - alpha = 0: only
  anomalous pixels count, their sum divided by 2 x the pixel count.
- ``discriminator_input``: the discriminator sees ``[reconstruction, image]`` (the authors) or
  ``[image, reconstruction]`` (anomalib): a permutation of its first layer's input channels.
- ``score_pool``: the image score is the max of the map average-pooled over 21 x 21 (test_DRAEM.py, zero
  padding counted) or, at 1, the map's max (anomalib).
- ``init_normal``: the authors' ``weights_init`` (convolution weights N(0, 0.02), BatchNorm weights
  N(1, 0.02) and biases 0; convolution biases keep PyTorch's init); anomalib keeps PyTorch's defaults.
- The synthesis (``synthesis``, ``opacity``, ``image_rotation``), see ``anomaly_synthesis``; the schedule,
  Adam at ``lr`` times ``decay_factor`` at each of ``milestones`` (``schedules.MultiStepDecay``).

The simulated anomalies of image i of optimisation step s of epoch e come from seed (run seed, e, s, i), i its
position in the global batch: a resumed run, and a DDP rank's share, synthesise what one uninterrupted process
would.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim import Adam, Optimizer
from torch.optim.lr_scheduler import LambdaLR

from anomaly_core.seeding import derive_seed
from anomaly_core.training.anomaly_synthesis import AnomalySynthesis, SynthesisSettings, image_seeds, texture_files
from anomaly_core.training.distributed import rank_and_world_size
from anomaly_core.training.model import TrainableModel
from anomaly_core.training.schedules import MultiStepDecay

LOSS_FORMS = ("draem", "anomalib")
DISCRIMINATOR_INPUTS = ("reconstruction_first", "image_first")


@dataclass(frozen=True, kw_only=True)
class DraemSettings:
    """Everything that fixes a DRAEM model and its training; the training values have no defaults (a recipe
    names each one)."""

    crop: int = 256  # the square input size (a multiple of 32: five 2x poolings in the discriminator)
    base_width: int  # the reconstructive network's first width (128); the discriminative network's is half
    lr: float  # Adam
    milestones: tuple[float, ...]  # fractions of the epochs where the rate is multiplied by decay_factor
    decay_factor: float
    synthesis: str
    anomaly_probability: float
    opacity: tuple[float, float]
    image_rotation: float
    loss_form: str
    discriminator_input: str
    score_pool: int
    init_normal: bool
    init_seed: int  # weights' initialisation and the synthesis (the run seed)
    auxiliary: dict[str, str] = field(default_factory=dict)  # {"dtd": folder of anomaly textures}

    def __post_init__(self) -> None:
        for name in ("milestones", "opacity"):  # JSON gives lists back
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.base_width < 2 or self.base_width % 2:
            raise ValueError(f"base_width must be an even number >= 2, got {self.base_width}")
        if self.crop % 32:
            raise ValueError(f"DRAEM needs an input size divisible by 32 (preprocess.crop), got {self.crop}")
        if self.loss_form not in LOSS_FORMS:
            raise ValueError(f"loss_form must be one of {', '.join(LOSS_FORMS)}, got {self.loss_form!r}")
        if self.discriminator_input not in DISCRIMINATOR_INPUTS:
            raise ValueError(f"discriminator_input must be one of {', '.join(DISCRIMINATOR_INPUTS)}, "
                             f"got {self.discriminator_input!r}")
        if self.score_pool < 1 or self.score_pool % 2 == 0:
            raise ValueError(f"score_pool must be an odd number >= 1, got {self.score_pool}")


def _conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1), nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True)]


def _double(in_channels: int, middle: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(*_conv_bn_relu(in_channels, middle), *_conv_bn_relu(middle, out_channels))


def _up(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
                         *_conv_bn_relu(in_channels, out_channels))


class _Encoder(nn.Module):
    """model_unet.py ``EncoderReconstructive`` (5 blocks) / ``EncoderDiscriminative`` (6): double convolutions,
    2x max-pooling between them; returns every block's activation."""

    def __init__(self, in_channels: int, width: int, blocks: int) -> None:
        super().__init__()
        widths = [in_channels, width, 2 * width, 4 * width] + [8 * width] * (blocks - 3)
        for i in range(blocks):
            self.add_module(f"block{i + 1}", _double(widths[i], widths[i + 1], widths[i + 1]))
        self.blocks = blocks

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        activations = [getattr(self, "block1")(x)]
        for i in range(2, self.blocks + 1):
            activations.append(getattr(self, f"block{i}")(F.max_pool2d(activations[-1], 2)))
        return activations


class _ReconstructiveDecoder(nn.Module):
    """model_unet.py ``DecoderReconstructive``: four 2x upsamplings without skip connections."""

    def __init__(self, width: int, out_channels: int) -> None:
        super().__init__()
        self.up1, self.db1 = _up(8 * width, 8 * width), _double(8 * width, 8 * width, 4 * width)
        self.up2, self.db2 = _up(4 * width, 4 * width), _double(4 * width, 4 * width, 2 * width)
        self.up3, self.db3 = _up(2 * width, 2 * width), _double(2 * width, 2 * width, width)
        self.up4, self.db4 = _up(width, width), _double(width, width, width)
        self.fin_out = nn.Sequential(nn.Conv2d(width, out_channels, kernel_size=3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(1, 5):
            x = getattr(self, f"db{i}")(getattr(self, f"up{i}")(x))
        return self.fin_out(x)


class _DiscriminativeDecoder(nn.Module):
    """model_unet.py ``DecoderDiscriminative``: five 2x upsamplings, each concatenated with the encoder's
    activation of that size."""

    def __init__(self, width: int, out_channels: int) -> None:
        super().__init__()
        self.up_b, self.db_b = _up(8 * width, 8 * width), _double(16 * width, 8 * width, 8 * width)
        self.up1, self.db1 = _up(8 * width, 4 * width), _double(12 * width, 4 * width, 4 * width)
        self.up2, self.db2 = _up(4 * width, 2 * width), _double(6 * width, 2 * width, 2 * width)
        self.up3, self.db3 = _up(2 * width, width), _double(3 * width, width, width)
        self.up4, self.db4 = _up(width, width), _double(2 * width, width, width)
        self.fin_out = nn.Sequential(nn.Conv2d(width, out_channels, kernel_size=3, padding=1))

    def forward(self, activations: list[torch.Tensor]) -> torch.Tensor:
        x = activations[-1]
        for name, skip in zip(("_b", "1", "2", "3", "4"), reversed(activations[:-1])):
            x = getattr(self, f"db{name}")(torch.cat((getattr(self, f"up{name}")(x), skip), dim=1))
        return self.fin_out(x)


class ReconstructiveSubNetwork(nn.Module):
    def __init__(self, in_channels: int = 3, out_channels: int = 3, base_width: int = 128) -> None:
        super().__init__()
        self.encoder = _Encoder(in_channels, base_width, blocks=5)
        self.decoder = _ReconstructiveDecoder(base_width, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x)[-1])


class DiscriminativeSubNetwork(nn.Module):
    def __init__(self, in_channels: int = 6, out_channels: int = 2, base_width: int = 64) -> None:
        super().__init__()
        self.encoder_segment = _Encoder(in_channels, base_width, blocks=6)
        self.decoder_segment = _DiscriminativeDecoder(base_width, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder_segment(self.encoder_segment(x))


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - size // 2
    g = torch.exp(-x**2 / (2 * sigma**2))
    return g / g.sum()


def ssim_map(img1: torch.Tensor, img2: torch.Tensor, form: str) -> torch.Tensor:
    """Per-pixel SSIM with an 11-pixel Gaussian window (sigma 1.5): the authors' loss.py ``ssim`` (zero padding,
    dynamic range from ``img1``) or kornia's ``ssim`` (reflect padding, range 1, eps 1e-12 in the division)."""
    channels = img1.shape[1]
    g = _gaussian_window().to(img1)
    window = (g[:, None] * g[None, :]).expand(channels, 1, -1, -1).contiguous()
    if form == "draem":
        value_range = (255 if img1.max() > 128 else 1) - (-1 if img1.min() < -0.5 else 0)
        filtered = lambda x: F.conv2d(x, window, padding=5, groups=channels)  # noqa: E731
        eps = 0.0
    else:
        value_range, eps = 1.0, 1e-12
        filtered = lambda x: F.conv2d(F.pad(x, (5, 5, 5, 5), mode="reflect"), window, groups=channels)  # noqa: E731
    c1, c2 = (0.01 * value_range) ** 2, (0.03 * value_range) ** 2
    mu1, mu2 = filtered(img1), filtered(img2)
    sigma1 = filtered(img1 * img1) - mu1 * mu1
    sigma2 = filtered(img2 * img2) - mu2 * mu2
    sigma12 = filtered(img1 * img2) - mu1 * mu2
    numerator = (2 * mu1 * mu2 + c1) * (2 * sigma12 + c2)
    return numerator / ((mu1 * mu1 + mu2 * mu2 + c1) * (sigma1 + sigma2 + c2) + eps)


def draem_loss(target: torch.Tensor, reconstruction: torch.Tensor, mask: torch.Tensor, logits: torch.Tensor,
               form: str) -> dict[str, torch.Tensor]:
    """The three terms and their sum (see the module docstring for the two forms)."""
    l2 = F.mse_loss(reconstruction, target)
    similarity = ssim_map(reconstruction, target, form)
    labels = mask[:, 0].long()
    if form == "draem":
        ssim = 1 - similarity.mean()
        probabilities = torch.softmax(logits, dim=1)
        one_hot = F.one_hot(labels, 2).permute(0, 3, 1, 2).to(probabilities).clamp(1e-5, 1 - 1e-5)
        pt = (one_hot * probabilities).sum(dim=1) + 1e-5
        focal = (-((1 - pt) ** 2) * pt.log()).mean()
    else:
        ssim = 2 * ((1 - similarity) / 2).clamp(0, 1).mean()
        log_p = torch.log_softmax(logits, dim=1)[:, 1]
        focal = (-((1 - log_p.exp()) ** 2) * log_p * (labels == 1)).sum() / logits.numel()
    return {"loss": l2 + ssim + focal, "loss/l2": l2, "loss/ssim": ssim, "loss/focal": focal}


class Draem(TrainableModel):
    settings_type: ClassVar[type] = DraemSettings
    kind: ClassVar[str] = "draem"

    def __init__(self, settings: DraemSettings, weights: str = "") -> None:
        """``weights`` is ignored: DRAEM has no pretrained part."""
        super().__init__()
        self.settings = settings
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(settings.init_seed, "draem-init"))
            self.reconstructive_subnetwork = ReconstructiveSubNetwork(base_width=settings.base_width)
            self.discriminative_subnetwork = DiscriminativeSubNetwork(base_width=settings.base_width // 2)
            if settings.init_normal:
                self.apply(_weights_init)
        self._synthesis: AnomalySynthesis | None = None  # textures are listed on the first training step
        self._epoch, self._step = 0, 0

    @classmethod
    def normalisation(cls, backbone: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Raw [0, 1] pixels (train_DRAEM.py; anomalib refuses a Normalize transform)."""
        return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)

    def provenance(self) -> dict[str, Any]:
        mean, std = self.normalisation("")
        return {"backbone": None, "layers": None, "weights_sha256": None, "crop": self.settings.crop,
                "mean": list(mean), "std": list(std)}

    @property
    def synthesis(self) -> AnomalySynthesis:
        if self._synthesis is None:
            folder = self.settings.auxiliary.get("dtd")
            if not folder:
                raise ValueError("training.auxiliary.dtd: DRAEM trains with anomaly textures; set datasets.dtd in "
                                 "configs/paths.yaml")
            settings = self.settings
            self._synthesis = AnomalySynthesis(
                SynthesisSettings(settings.synthesis, settings.anomaly_probability, settings.opacity,
                                  settings.image_rotation), texture_files(folder), settings.init_seed)
        return self._synthesis

    def on_train_epoch_start(self, epoch: int) -> None:
        self._epoch, self._step = epoch, 0

    def discriminate(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction, the discriminator's logits [B, 2, H, W])."""
        reconstruction = self.reconstructive_subnetwork(images)
        pair = (reconstruction, images) if self.settings.discriminator_input == "reconstruction_first" else (
            images, reconstruction)
        return reconstruction, self.discriminative_subnetwork(torch.cat(pair, dim=1))

    def training_step(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        rank, _ = rank_and_world_size()
        seeds = image_seeds(self.settings.init_seed, self._epoch, self._step, rank * len(images), len(images))
        self._step += 1
        anomalous, target, mask = self.synthesis(images, seeds)
        reconstruction, logits = self.discriminate(anomalous)
        return draem_loss(target, reconstruction, mask, logits, self.settings.loss_form)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Map: the softmax probability of "anomalous"; score: the max of the map average-pooled over
        ``score_pool`` pixels (test_DRAEM.py: 21, zero padding counted; anomalib: 1, the map's max)."""
        _, logits = self.discriminate(images)
        maps = torch.softmax(logits, dim=1)[:, 1]
        pool = self.settings.score_pool
        pooled = F.avg_pool2d(maps[:, None], pool, stride=1, padding=pool // 2) if pool > 1 else maps[:, None]
        return {"pred_score": pooled.amax(dim=(1, 2, 3)), "anomaly_map": maps}

    def configure_optimizers(self, epochs: int, steps_per_epoch: int) -> tuple[Optimizer, LambdaLR]:
        """Adam on both sub-networks (train_DRAEM.py: two groups at the same rate; anomalib: one), the rate
        multiplied by decay_factor at each milestone, per epoch."""
        settings = self.settings
        optimizer = Adam(self.parameters(), lr=settings.lr)
        return optimizer, LambdaLR(optimizer, MultiStepDecay(steps_per_epoch, epochs, settings.milestones,
                                                             settings.decay_factor))


def _weights_init(module: nn.Module) -> None:
    """train_DRAEM.py ``weights_init`` (convolution biases keep their default init, as there)."""
    if isinstance(module, nn.Conv2d):
        module.weight.data.normal_(0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        module.weight.data.normal_(1.0, 0.02)
        module.bias.data.fill_(0)
