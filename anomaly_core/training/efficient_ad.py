"""EfficientAD (Batzner, Heckler & König, WACV 2024), sizes S and M.

The authors published no code; the default recipe follows the paper's Algorithm 1 as nelson1425/EfficientAD
reimplements it (efficientad.py, common.py; the widely used reference, which reproduces the paper's MVTec AD
numbers), and anomalib's ``efficient_ad`` (torch_model.py, lightning_model.py) is offered by name.

A frozen teacher, a patch description network (PDN) distilled from an ImageNet backbone beforehand, maps each
33 x 33 patch to 384 channels. A student PDN with twice the output channels learns two things on normal
images: its first half imitates the teacher (the loss kept to the hardest 0.1 % of the distances, plus a
penalty on its outputs for ImageNet images, so it does not generalise beyond the normal images); its second
half imitates an autoencoder that reconstructs the teacher's features of colour-jittered images through a
64-channel bottleneck. Student-teacher differences mark structural anomalies, student-autoencoder differences
logical ones; each map is normalised by quantiles (0.9 -> 0, 0.995 -> 0.1) of its values on normal images
held out of training, and the anomaly map is their mean.

Design, here:
- The size is the teacher: ``backbone.name`` is ``pdn_small`` (EfficientAD-S) or ``pdn_medium``
  (EfficientAD-M); the student and autoencoder follow from it. ``backbone.weights`` is the teacher's file:
  anomalib's ``pretrained_teacher_{small,medium}.pth`` (its key names are ours) or nelson1425's
  ``models/teacher_{small,medium}.pth`` (``nn.Sequential`` names, mapped by position), a path or ``search``
  (``weight_files.PUBLISHED_NAMES``); ``random`` for tests. Model files record its sha256, as for any teacher.
- The ImageNet penalty images come from ``training.auxiliary.imagenette`` (every image under the folder, at any
  depth: Imagenette's train/<class>/ and val/<class>/ alike): resized to twice the crop, grey with probability
  0.3, centre-cropped.
- 70 000 steps at batch 1 are ``training.max_steps`` (the Trainer stops mid-epoch there; ``epochs`` is only an
  upper bound); the rate drops x ``decay_factor`` (0.1) at ``decay_at`` (0.95) of the steps, StepLR per step.
- The teacher's channel mean and std are computed from the training images before the first step
  (``prepare``); the map quantiles from ``training.held_out_fraction`` of train/good (nelson1425: 10 %,
  ``random_split``), with the current weights, before each validation and on the final weights
  (``calibrate``). Both are buffers, so checkpoints and model files carry them.
- Randomness (penalty image and grey draw, the jitter, dropout) comes from torch's generators seeded by
  (run seed, step, rank) inside each step: a run is the same whatever ran before it in the process, and a
  resumed run continues exactly (``steps_done`` is a buffer). Under DDP each rank draws its own and takes the
  hard-feature quantile over its own share of the batch (the references train at batch 1, without DDP).
- Inputs are normalised by the transform (ImageNet mean/std, ``normalisation``); anomalib normalises inside
  its networks, nelson1425 in its transform: the same values.

Recipes differ in where the maps are normalised (``map_normalisation``): ``grid`` (nelson1425 ``predict`` /
``map_normalization``: quantiles of the maps at the PDN's resolution, normalised there, the combined map then
zero-padded by 4 and upsampled) or ``image`` (anomalib ``compute_maps``: each map zero-padded by 4 and upsampled
to the image first, quantiles and normalisation on those, so the padded border is -0.1 qa / (qb - qa), not 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.optim import Adam, Optimizer
from torch.optim.lr_scheduler import StepLR
from torchvision.transforms import functional as TF

from anomaly_core.backbones import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PACKAGE_WEIGHTS,
    RANDOM_INIT,
    RANDOM_INIT_SEED,
    WeightsError,
    file_sha256,
    match_to_model,
    read_state_dict,
    resolve_weights_path,
)
from anomaly_core.data import IMAGE_EXTENSIONS
from anomaly_core.seeding import derive_seed
from anomaly_core.training.distributed import rank_and_world_size
from anomaly_core.training.model import TrainableModel

MAP_NORMALISATIONS = ("grid", "image")
AUXILIARY = "imagenette"


@dataclass(frozen=True)
class PdnSize:
    """A patch description network: the widths of its hidden convolutions (three: the S layout, four: M) and
    of its output (anomalib's ``teacher_out_channels``)."""

    widths: tuple[int, ...]
    out_channels: int = 384


# common.py get_pdn_small / get_pdn_medium, anomalib Small/MediumPatchDescriptionNetwork
PDN_SIZES: dict[str, PdnSize] = {"pdn_small": PdnSize((128, 256, 256)), "pdn_medium": PdnSize((256, 512, 512, 512))}


def _pdn_size(name: str) -> PdnSize:
    if name not in PDN_SIZES:
        raise WeightsError(f"backbone {name!r} is no EfficientAD teacher; choose {' or '.join(PDN_SIZES)} "
                           f"(EfficientAD-S or -M)")
    return PDN_SIZES[name]


class PatchDescriptionNetwork(nn.Module):
    """The PDN without padding (both references' default): 33 x 33 receptive field, an image of side s gives a
    map of side s / 4 - 8. Module names are anomalib's, so its teacher files load as they are."""

    def __init__(self, size: PdnSize, out_channels: int) -> None:
        super().__init__()
        w = size.widths
        self.conv1 = nn.Conv2d(3, w[0], kernel_size=4)
        self.conv2 = nn.Conv2d(w[0], w[1], kernel_size=4)
        if len(w) == 3:  # S
            self.conv3 = nn.Conv2d(w[1], w[2], kernel_size=3)
            self.conv4 = nn.Conv2d(w[2], out_channels, kernel_size=4)
        else:  # M
            self.conv3 = nn.Conv2d(w[1], w[2], kernel_size=1)
            self.conv4 = nn.Conv2d(w[2], w[3], kernel_size=3)
            self.conv5 = nn.Conv2d(w[3], out_channels, kernel_size=4)
            self.conv6 = nn.Conv2d(out_channels, out_channels, kernel_size=1)
        self.avgpool1 = nn.AvgPool2d(kernel_size=2, stride=2)
        self.avgpool2 = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool1(F.relu(self.conv1(x)))
        x = self.avgpool2(F.relu(self.conv2(x)))
        x = F.relu(self.conv3(x))
        if not hasattr(self, "conv5"):
            return self.conv4(x)
        x = F.relu(self.conv5(F.relu(self.conv4(x))))
        return self.conv6(x)


class Encoder(nn.Module):
    """Six convolutions down to a 64-channel code (1 x 1 at 256 px): common.py get_autoencoder's encoder."""

    def __init__(self) -> None:
        super().__init__()
        widths = (3, 32, 32, 64, 64, 64)
        for index, (a, b) in enumerate(zip(widths, widths[1:] + (64,)), start=1):
            setattr(self, f"enconv{index}", nn.Conv2d(a, b, kernel_size=8 if index == 6 else 4,
                                                     stride=1 if index == 6 else 2, padding=0 if index == 6 else 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for index in range(1, 6):
            x = F.relu(getattr(self, f"enconv{index}")(x))
        return self.enconv6(x)


class Decoder(nn.Module):
    """Bilinear upsampling and convolutions back to the teacher's map: nelson1425 upsamples to 3, 8, 15, 32, 63,
    127 and 56 (256 px); anomalib's formula, used here, gives those sizes at 256 px and follows other sizes."""

    def __init__(self, out_channels: int) -> None:
        super().__init__()
        for index in range(1, 7):
            setattr(self, f"deconv{index}", nn.Conv2d(64, 64, kernel_size=4, stride=1, padding=2))
            setattr(self, f"dropout{index}", nn.Dropout(p=0.2))
        self.deconv7 = nn.Conv2d(64, 64, kernel_size=3, stride=1, padding=1)
        self.deconv8 = nn.Conv2d(64, out_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        h, w = size
        sizes = [(h // 64 - 1, w // 64 - 1), (h // 32, w // 32), (h // 16 - 1, w // 16 - 1), (h // 8, w // 8),
                 (h // 4 - 1, w // 4 - 1), (h // 2 - 1, w // 2 - 1)]
        for index, step_size in enumerate(sizes, start=1):
            x = F.interpolate(x, size=step_size, mode="bilinear")
            x = getattr(self, f"dropout{index}")(F.relu(getattr(self, f"deconv{index}")(x)))
        x = F.interpolate(x, size=(-(-h // 4) - 8, -(-w // 4) - 8), mode="bilinear")
        return self.deconv8(F.relu(self.deconv7(x)))


class AutoEncoder(nn.Module):
    def __init__(self, out_channels: int) -> None:
        super().__init__()
        self.encoder = Encoder()
        self.decoder = Decoder(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x), tuple(x.shape[-2:]))


def quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """``torch.quantile(values, q)`` bit for bit (linear interpolation; q rounded to the values' dtype, its rank
    in float64, as torch computes them), without torch's limit of 2^24 elements and without sorting: two
    ``kthvalue`` selections."""
    flat = values.detach().flatten()
    rank = float(torch.tensor(q, dtype=flat.dtype)) * (flat.numel() - 1)
    below, above = int(rank), math.ceil(rank)
    low = flat.kthvalue(below + 1).values
    high = flat.kthvalue(above + 1).values if above != below else low
    return torch.lerp(low, high, torch.tensor(rank - below, dtype=flat.dtype, device=flat.device))


@dataclass(frozen=True, kw_only=True)
class EfficientAdSettings:
    """Everything besides the teacher weights file that fixes an EfficientAD model and its training.

    The training values have no defaults: a recipe (anomaly_core.registry.MODELS) or the caller names each one.
    """

    backbone: str = "pdn_small"  # the teacher PDN, i.e. the size: pdn_small (S) or pdn_medium (M)
    layers: tuple[str, ...] = ()  # a PDN has one output
    crop: int = 256
    lr: float  # Adam
    weight_decay: float
    max_steps: int | None  # the training's steps (the Trainer's max_steps), for the decay step
    decay_at: float  # StepLR: x decay_factor from int(decay_at x the run's steps) on
    decay_factor: float
    held_out_fraction: float  # of train/good, for the map quantiles
    map_normalisation: str  # "grid" (nelson1425) or "image" (anomalib), see the module docstring
    auxiliary: dict[str, str] = field(default_factory=dict)  # {"imagenette": folder}: the penalty images
    init_seed: int  # student/autoencoder initialisation and the per-step draws (the run seed)
    hard_quantile: float = 0.999  # the paper's p_hard; both references
    penalty_grey: float = 0.3  # RandomGrayscale(0.3) of the penalty images; both references
    quantiles: tuple[float, float] = (0.9, 0.995)  # q_a, q_b of the map normalisation; both references

    def __post_init__(self) -> None:
        for name in ("layers", "quantiles"):  # JSON gives lists back
            object.__setattr__(self, name, tuple(getattr(self, name)))
        _pdn_size(self.backbone)
        if self.layers:
            raise WeightsError(f"backbone.layers {list(self.layers)}: a PDN teacher has one output map; set []")
        if self.crop < 256 or self.crop % 4:
            raise ValueError(f"preprocess.crop={self.crop}: EfficientAD needs a multiple of 4 of at least 256 (its "
                             f"autoencoder's 8 x 8 code convolution takes crop / 32 >= 8)")
        if self.map_normalisation not in MAP_NORMALISATIONS:
            raise ValueError(f"map_normalisation must be one of {', '.join(MAP_NORMALISATIONS)}, "
                             f"got {self.map_normalisation!r}")
        if not self.held_out_fraction > 0:
            raise ValueError("training.held_out_fraction must be > 0: EfficientAD normalises its maps by quantiles "
                             "on train/good images held out of training (the recipes hold out 0.1)")
        if AUXILIARY not in self.auxiliary:
            raise ValueError(f"training.auxiliary.{AUXILIARY}: EfficientAD's penalty images are missing")


class EfficientAd(TrainableModel):
    settings_type: ClassVar[type] = EfficientAdSettings
    kind: ClassVar[str] = "efficient_ad"
    frozen: ClassVar[tuple[str, ...]] = ("teacher",)  # the pretrained PDN: rebuilt from its file, checked by sha256

    def __init__(self, settings: EfficientAdSettings, weights: str) -> None:
        super().__init__()
        self.settings = settings
        size = _pdn_size(settings.backbone)
        self.out_channels = size.out_channels
        if weights == PACKAGE_WEIGHTS:
            raise WeightsError(f"backbone.weights=package: no package ships a PDN teacher; set a file (anomalib's "
                               f"pretrained_teacher_{settings.backbone.removeprefix('pdn_')}.pth) or search")
        path = resolve_weights_path(settings.backbone, weights)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            self.teacher = PatchDescriptionNetwork(size, size.out_channels)
        if path is not None:
            self.teacher.load_state_dict(match_to_model(read_state_dict(path), self.teacher, path))
        self.weights_sha256 = RANDOM_INIT if path is None else file_sha256(path)
        self.teacher.requires_grad_(False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(settings.init_seed)
            self.student = PatchDescriptionNetwork(size, 2 * size.out_channels)
            self.ae = AutoEncoder(size.out_channels)
        channels = (1, size.out_channels, 1, 1)
        self.register_buffer("teacher_mean", torch.zeros(channels))
        self.register_buffer("teacher_std", torch.zeros(channels))  # zero: not computed yet
        self.register_buffer("map_quantiles", torch.zeros(4))  # qa_st, qb_st, qa_ae, qb_ae; zero: not calibrated
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.int64))

    @classmethod
    def normalisation(cls, backbone: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """ImageNet's: the PDN teacher was distilled from an ImageNet network on images normalised so."""
        return IMAGENET_MEAN, IMAGENET_STD

    def provenance(self) -> dict[str, Any]:
        return {"backbone": self.settings.backbone, "layers": [], "weights_sha256": self.weights_sha256,
                "crop": self.settings.crop, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}

    # --- statistics

    def prepare(self, train_images: torch.Tensor) -> None:
        """The teacher's channel mean, then std around it, over the training images: two passes, each the mean
        of per-image means (efficientad.py ``teacher_normalization``; anomalib's one pass of sums and sums of
        squares gives the same values up to rounding)."""
        device = self.teacher_mean.device
        outputs = [self.teacher(batch.to(device)) for batch in train_images.split(16)]
        mean = torch.cat([output.mean(dim=(2, 3)) for output in outputs]).mean(dim=0)[None, :, None, None]
        var = torch.cat([((output - mean) ** 2).mean(dim=(2, 3)) for output in outputs]).mean(dim=0)
        self.teacher_mean.copy_(mean)
        self.teacher_std.copy_(var.sqrt()[None, :, None, None])
        self._penalty_files  # noqa: B018 (listed now: an empty penalty folder is refused before the first step)

    def calibrate(self, held_out: torch.Tensor | None) -> None:
        """q_a and q_b of the student-teacher and the student-autoencoder maps on the held-out images."""
        if held_out is None:
            raise ValueError("EfficientAD calibrates its maps on held-out train/good images; the run holds none out "
                             "(training.held_out_fraction)")
        device = self.teacher_mean.device
        maps = [self._maps(batch.to(device)) for batch in held_out.split(16)]
        if self.settings.map_normalisation == "image":
            maps = [tuple(self._to_image(m, held_out.shape[-2:]) for m in pair) for pair in maps]
        q_a, q_b = self.settings.quantiles
        values = []
        for part in (0, 1):
            stacked = torch.cat([pair[part] for pair in maps])
            values += [quantile(stacked, q_a), quantile(stacked, q_b)]
        self.map_quantiles.copy_(torch.stack(values))

    # --- training

    def _teacher_features(self, images: torch.Tensor) -> torch.Tensor:
        if not self.teacher_std.any():
            raise RuntimeError("EfficientAD's teacher statistics are not computed: prepare() on the training images")
        with torch.no_grad():
            return (self.teacher(images) - self.teacher_mean) / self.teacher_std

    def training_step(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """efficientad.py's loop body (anomalib ``compute_losses``): hard-feature and penalty loss of the
        student's first half, autoencoder and student-autoencoder losses on a jittered copy of the images."""
        rank, _ = rank_and_world_size()
        seed = derive_seed(self.settings.init_seed, "efficient_ad", str(int(self.steps_done)), str(rank))
        self.steps_done += 1
        devices = [images.device] if images.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            penalty = self._penalty_batch(len(images)).to(images.device)
            jittered = self._jittered(images)
            c = self.out_channels
            distance_st = (self._teacher_features(images) - self.student(images)[:, :c]) ** 2
            hard = distance_st[distance_st >= quantile(distance_st, self.settings.hard_quantile)]
            loss_hard = hard.mean()
            loss_penalty = (self.student(penalty)[:, :c] ** 2).mean()
            ae_output = self.ae(jittered)
            loss_ae = ((self._teacher_features(jittered) - ae_output) ** 2).mean()
            loss_stae = ((ae_output - self.student(jittered)[:, c:]) ** 2).mean()
        loss_st = loss_hard + loss_penalty
        return {"loss": loss_st + loss_ae + loss_stae, "loss/st": loss_st, "loss/hard": loss_hard,
                "loss/penalty": loss_penalty, "loss/ae": loss_ae, "loss/stae": loss_stae}

    def _jittered(self, images: torch.Tensor) -> torch.Tensor:
        """Each image's brightness, contrast or saturation scaled by U(0.8, 1.2) (anomalib
        ``choose_random_aug_image``; efficientad.py's ``transform_ae`` ColorJitter choice), on [0, 1] pixels."""
        mean = torch.tensor(IMAGENET_MEAN, device=images.device)[:, None, None]
        std = torch.tensor(IMAGENET_STD, device=images.device)[:, None, None]
        adjust = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)
        jittered = []
        for image in images:
            coefficient = torch.empty(1).uniform_(0.8, 1.2).item()
            choice = int(torch.randint(0, len(adjust), (1,)).item())
            jittered.append((adjust[choice](image * std + mean, coefficient) - mean) / std)
        return torch.stack(jittered)

    @cached_property
    def _penalty_files(self) -> list[Path]:
        folder = Path(self.settings.auxiliary[AUXILIARY]).expanduser()
        files = sorted(path for path in folder.rglob("*") if path.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            kinds = ", ".join(sorted(IMAGE_EXTENSIONS))
            raise ValueError(f"training.auxiliary.{AUXILIARY}: no images ({kinds}) under {folder}")
        return files

    def _penalty_batch(self, count: int) -> torch.Tensor:
        """``count`` random penalty images: Resize(2 crop), RandomGrayscale(0.3), CenterCrop(crop), normalised
        (efficientad.py ``penalty_transform``, anomalib ``prepare_imagenette_data``)."""
        crop, files = self.settings.crop, self._penalty_files
        mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
        std = torch.tensor(IMAGENET_STD)[:, None, None]
        batch = []
        for _ in range(count):
            path = files[int(torch.randint(0, len(files), (1,)).item())]
            with Image.open(path) as opened:
                image = opened.convert("RGB").resize((2 * crop, 2 * crop), Image.BILINEAR)
            if torch.rand(1).item() < self.settings.penalty_grey:
                image = image.convert("L").convert("RGB")
            image = image.crop((crop // 2, crop // 2, crop // 2 + crop, crop // 2 + crop))
            batch.append((TF.pil_to_tensor(image).float() / 255 - mean) / std)
        return torch.stack(batch)

    def configure_optimizers(self, epochs: int, steps_per_epoch: int) -> tuple[Optimizer, StepLR]:
        """Adam on student + autoencoder; StepLR at ``decay_at`` of the run's steps (anomalib: of min(max_steps,
        max_epochs x steps per epoch); efficientad.py: of train_steps)."""
        settings = self.settings
        optimizer = Adam([*self.student.parameters(), *self.ae.parameters()], lr=settings.lr,
                         weight_decay=settings.weight_decay)
        steps = min(epochs * steps_per_epoch, settings.max_steps or epochs * steps_per_epoch)
        return optimizer, StepLR(optimizer, step_size=max(1, int(settings.decay_at * steps)),
                                 gamma=settings.decay_factor)

    # --- inference

    def _maps(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The student-teacher and student-autoencoder maps [B, 1, h, w] at the PDN's resolution, unnormalised."""
        c = self.out_channels
        student = self.student(images)
        map_st = ((self._teacher_features(images) - student[:, :c]) ** 2).mean(dim=1, keepdim=True)
        map_ae = ((self.ae(images) - student[:, c:]) ** 2).mean(dim=1, keepdim=True)
        return map_st, map_ae

    @staticmethod
    def _to_image(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Zero-padded by 4 (the PDN's lost border, at its stride 4) and upsampled bilinearly to the image."""
        return F.interpolate(F.pad(maps, (4, 4, 4, 4)), size=tuple(size), mode="bilinear")

    def held_out_loss(self, images: torch.Tensor) -> torch.Tensor:
        """Per image, the mean of both unnormalised maps: how far the student is from teacher and autoencoder
        on normal images it never trained on."""
        map_st, map_ae = self._maps(images)
        return (map_st + map_ae).mean(dim=(1, 2, 3))

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Map: 0.5 x each quantile-normalised map, combined (see the module docstring for where); score: its max."""
        if not self.map_quantiles.any():
            raise RuntimeError("EfficientAD's map quantiles are not computed: calibrate() on held-out images")
        qa_st, qb_st, qa_ae, qb_ae = self.map_quantiles
        map_st, map_ae = self._maps(images)
        size = tuple(images.shape[-2:])
        if self.settings.map_normalisation == "image":
            map_st, map_ae = self._to_image(map_st, size), self._to_image(map_ae, size)
        map_st = 0.1 * (map_st - qa_st) / (qb_st - qa_st)
        map_ae = 0.1 * (map_ae - qa_ae) / (qb_ae - qa_ae)
        combined = 0.5 * map_st + 0.5 * map_ae
        if self.settings.map_normalisation == "grid":
            combined = self._to_image(combined, size)
        maps = combined[:, 0]
        return {"pred_score": maps.amax(dim=(1, 2)), "anomaly_map": maps}
