"""DRAEM's simulated anomalies: a Perlin-noise mask filled with an augmented texture (DTD), blended into a
normal image (VitjanZ/DRAEM data_loader.py ``MVTecDRAEMTrainDataset``; anomalib ``PerlinAnomalyGenerator``).

Every random draw of an image's anomaly comes from one ``torch.Generator`` seeded by (run seed, epoch, step,
position in the global batch), never from global state: training is reproducible, a resumed run synthesises
exactly what an uninterrupted one would, and a DDP rank's share of a batch gets the anomalies that one process
would give those positions. Synthesis runs on the CPU (the same pixels whatever device trains).

Two forms, each a setting (``synthesis``):

- ``"draem"``, the authors' code. Their ten imgaug augmenters of the texture (three drawn without
  replacement, in drawn order) are written here with torch / torchvision functionals, since imgaug is
  unmaintained. The same as imgaug up to uint8 rounding: ``GammaContrast((0.5, 2), per_channel)``,
  ``MultiplyAndAddToBrightness(mul=(0.8, 1.2), add=(-30, 30))`` (the change of BT.601 luma added to every
  channel, which is imgaug's change of Y in YCrCb), ``pillike.EnhanceSharpness()`` (factor in [0, 2),
  torchvision's sharpness is PIL's), ``Solarize(0.5, threshold=(32, 128))``, ``Posterize()`` (1-8 bits),
  ``Invert()``, ``pillike.Equalize()``, ``Affine(rotate=(-45, 45))`` (bilinear, black corners). Different:
  ``AddToHueAndSaturation((-50, 50), per_channel=True)`` shifts the hue by v/255 of the circle with torchvision's
  ``adjust_hue`` (imgaug truncates it to OpenCV's 2-degree hue steps) and adds s/255 to the HSV saturation,
  keeping the value; ``pillike.Autocontrast()`` (cutoff 0-20 %) clips each channel at its cutoff quantiles as PIL's
  histogram cut does, up to the quantiles' interpolation. The texture is resized bilinearly without
  antialiasing (cv2.resize). Images are RGB here; the authors' cv2 pipeline runs on BGR, which changes only
  which way a hue shift turns.
- ``"anomalib"``: anomalib 2.7's generator: its torchvision list (``v2.ColorJitter`` contrast,
  ``RandomPhotometricDistort`` brightness, sharpness 2, hue/saturation jitter, solarize at one threshold drawn
  per generator, posterize 4 bits, invert, ``AutoAugment``, equalize, rotation) applied under a seeded fork of
  torch's global RNG (torchvision draws from it); the texture resized with antialiasing; a mask redrawn up to
  ten times while empty, and a noise without any value above 0.5 stretched to [-1, 1] first.

Shared by both: the Perlin noise (2^[0, 6) cells per axis, computed on the next power-of-two grid and cropped,
as anomalib, which equals the authors' ``rand_perlin_2d_np`` on power-of-two sizes and also serves others),
rotated by [-90, 90) degrees and thresholded at 0.5; the blend ``image (1 - m) + o texture m + (1 - o) image m``
with the texture's opacity ``o`` uniform in ``opacity`` (the authors' ``1 - beta``, beta in [0, 0.8): (0.2, 1];
anomalib's ``beta`` in [0.1, 1)); an anomaly with probability ``probability`` (both 0.5); and, with
probability ``image_rotation`` (the authors' 0.3, anomalib none), the normal image itself rotated by
[-90, 90) degrees before anything (the training target is the rotated image).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torchvision.transforms.v2 as v2
import torchvision.transforms.v2.functional as TF

from anomaly_core.data import IMAGE_EXTENSIONS, DatasetError
from anomaly_core.data.images import read_rgb
from anomaly_core.seeding import derive_seed

SYNTHESES = ("draem", "anomalib")
_LUMA = torch.tensor([0.299, 0.587, 0.114])  # BT.601, imgaug's YCrCb


def texture_files(folder: str | Path) -> list[Path]:
    """Every image under ``folder`` (DTD's images/<class>/*.jpg, or any tree), in a fixed order."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise DatasetError(f"training.auxiliary.dtd: folder not found: {root}")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                   and not p.name.startswith("."))
    if not files:
        raise DatasetError(f"training.auxiliary.dtd: no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {root}")
    return files


def perlin_noise(height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """[height, width] gradient noise with 2^[0, 6) cells per axis (the authors' perlin.py / anomalib's)."""
    scale_y, scale_x = (2 ** int(torch.randint(0, 6, (1,), generator=generator)) for _ in range(2))
    angles = 2 * math.pi * torch.rand(scale_y + 1, scale_x + 1, generator=generator, dtype=torch.float64)
    return gradient_noise(height, width, angles).float()


def gradient_noise(height: int, width: int, angles: torch.Tensor) -> torch.Tensor:
    """Perlin noise of the lattice whose gradient directions are ``angles`` [cells_y + 1, cells_x + 1] (radians),
    on the next power-of-two grid, cropped: float64 [height, width]."""
    scale_y, scale_x = angles.shape[0] - 1, angles.shape[1] - 1
    pad_h, pad_w = (2 ** math.ceil(math.log2(size)) for size in (height, width))
    ys = torch.arange(pad_h, dtype=torch.float64) * scale_y / pad_h
    xs = torch.arange(pad_w, dtype=torch.float64) * scale_x / pad_w
    grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1) % 1
    gradients = torch.stack((torch.cos(angles), torch.sin(angles)), dim=-1)
    cells = (pad_h // scale_y, pad_w // scale_x)

    def corner(dy: int, dx: int) -> torch.Tensor:
        grads = gradients[dy:dy + scale_y, dx:dx + scale_x]
        grads = grads.repeat_interleave(cells[0], 0).repeat_interleave(cells[1], 1)
        return ((grid - torch.tensor([dy, dx], dtype=torch.float64)) * grads).sum(dim=-1)

    t = 6 * grid**5 - 15 * grid**4 + 10 * grid**3
    top = torch.lerp(corner(0, 0), corner(1, 0), t[..., 0])
    bottom = torch.lerp(corner(0, 1), corner(1, 1), t[..., 0])
    return (math.sqrt(2) * torch.lerp(top, bottom, t[..., 1]))[:height, :width]


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator, dtype=torch.float64))


def _integer(generator: torch.Generator, low: int, high: int) -> int:
    """Uniform in [low, high], both included."""
    return int(torch.randint(low, high + 1, (), generator=generator))


def _as_uint8(image: torch.Tensor) -> torch.Tensor:
    return (image * 255).round().clamp(0, 255).to(torch.uint8)


def _gamma(image: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    gammas = torch.tensor([_uniform(g, 0.5, 2.0) for _ in range(3)]).view(3, 1, 1)
    return image.clamp(0, 1) ** gammas


def _brightness(image: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    mul, add = _uniform(g, 0.8, 1.2), _uniform(g, -30, 30) / 255
    luma = (image * _LUMA.view(3, 1, 1)).sum(dim=0, keepdim=True)
    return (image + luma * (mul - 1) + add).clamp(0, 1)


def _sharpness(image: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return TF.adjust_sharpness(image, _uniform(g, 0.0, 2.0))


def _hue_saturation(image: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    hue, saturation = _integer(g, -50, 50) / 255, _integer(g, -50, 50) / 255
    image = TF.adjust_hue(image, hue)
    value, lowest = image.amax(dim=0, keepdim=True), image.amin(dim=0, keepdim=True)
    current = torch.where(value > 0, (value - lowest) / value.clamp_min(1e-12), torch.zeros_like(value))
    target = (current + saturation).clamp(0, 1)
    ratio = torch.where(current > 0, target / current.clamp_min(1e-12), torch.ones_like(current))
    return (value - (value - image) * ratio).clamp(0, 1)  # each channel's distance below the max scales with S


def _solarize(image: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    threshold = _uniform(g, 32, 128) / 255
    return TF.solarize(image, threshold) if _uniform(g, 0, 1) < 0.5 else image


def _posterize(image: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return TF.posterize(_as_uint8(image), _integer(g, 1, 8)).float() / 255


def _invert(image: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return 1 - image


def _autocontrast(image: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    cutoff = _integer(g, 0, 20) / 100
    flat = image.reshape(3, -1)
    low = torch.quantile(flat, cutoff, dim=1).view(3, 1, 1)
    high = torch.quantile(flat, 1 - cutoff, dim=1).view(3, 1, 1)
    stretched = ((image - low) / (high - low).clamp_min(1e-12)).clamp(0, 1)
    return torch.where(high > low, stretched, image)


def _equalize(image: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return TF.equalize(_as_uint8(image)).float() / 255


def _rotate(image: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return TF.rotate(image, _uniform(g, -45, 45), interpolation=v2.InterpolationMode.BILINEAR, fill=0.0)


AUTHORS_AUGMENTERS: tuple[Callable[[torch.Tensor, torch.Generator], torch.Tensor], ...] = (
    _gamma, _brightness, _sharpness, _hue_saturation, _solarize, _posterize, _invert, _autocontrast, _equalize,
    _rotate)


def _anomalib_augmenters(solarize_threshold: float) -> list[v2.Transform]:
    """anomalib 2.7 data/utils/generators/perlin.py ``PerlinAnomalyGenerator.augmenters``, verbatim."""
    return [
        v2.ColorJitter(contrast=(0.5, 2.0)),
        v2.RandomPhotometricDistort(brightness=(0.8, 1.2), contrast=(1.0, 1.0), saturation=(1.0, 1.0),
                                    hue=(0.0, 0.0), p=1.0),
        v2.RandomAdjustSharpness(sharpness_factor=2.0, p=1.0),
        v2.ColorJitter(hue=[-50 / 360, 50 / 360], saturation=[0.5, 1.5]),
        v2.RandomSolarize(threshold=solarize_threshold, p=1.0),
        v2.RandomPosterize(bits=4, p=1.0),
        v2.RandomInvert(p=1.0),
        v2.AutoAugment(),
        v2.RandomEqualize(p=1.0),
        v2.RandomAffine(degrees=(-45, 45), interpolation=v2.InterpolationMode.BILINEAR, fill=0),
    ]


def _rotated(image: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """[C, H, W] rotated by [-90, 90) degrees about its centre, bilinear, black outside (imgaug Affine)."""
    return TF.rotate(image, _uniform(g, -90, 90), interpolation=v2.InterpolationMode.BILINEAR, fill=0.0)


@dataclass(frozen=True)
class SynthesisSettings:
    synthesis: str  # "draem" or "anomalib", see the module docstring
    probability: float  # of an image getting an anomaly
    opacity: tuple[float, float]  # the texture's blend weight is uniform in [low, high)
    image_rotation: float  # probability of rotating the normal image itself first

    def __post_init__(self) -> None:
        if self.synthesis not in SYNTHESES:
            raise ValueError(f"synthesis must be one of {', '.join(SYNTHESES)}, got {self.synthesis!r}")


class AnomalySynthesis:
    """Images [B, 3, H, W] in [0, 1] -> (images with simulated anomalies, target images, masks [B, 1, H, W])."""

    def __init__(self, settings: SynthesisSettings, textures: Sequence[Path], seed: int) -> None:
        self.settings, self.textures = settings, list(textures)
        threshold = torch.empty(1).uniform_(32 / 255, 128 / 255,
                                            generator=torch.Generator().manual_seed(derive_seed(seed, "solarize")))
        self.anomalib_augmenters = _anomalib_augmenters(float(threshold))

    def __call__(self, images: torch.Tensor, seeds: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One seed per image; the results are on ``images``' device."""
        results = [self.one(image, seed) for image, seed in zip(images.detach().cpu().float(), seeds)]
        return tuple(torch.stack(parts).to(images.device) for parts in zip(*results))

    def one(self, image: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        settings, g = self.settings, torch.Generator().manual_seed(seed)
        if settings.image_rotation and _uniform(g, 0, 1) < settings.image_rotation:
            image = _rotated(image, g)
        height, width = image.shape[-2:]
        if _uniform(g, 0, 1) >= settings.probability:
            return image, image, torch.zeros(1, height, width)
        texture = self._texture(_integer(g, 0, len(self.textures) - 1), height, width)
        mask = self._mask(height, width, g)
        if settings.synthesis == "anomalib":
            for _ in range(10):
                if mask.any():
                    break
                mask = self._mask(height, width, g)
        texture = self._augmented(texture, g)
        opacity = _uniform(g, *settings.opacity)
        anomalous = image * (1 - mask) + opacity * texture * mask + (1 - opacity) * image * mask
        return anomalous, image, mask

    def _texture(self, index: int, height: int, width: int) -> torch.Tensor:
        rgb = torch.from_numpy(np.ascontiguousarray(read_rgb(self.textures[index]).transpose(2, 0, 1)))
        antialias = self.settings.synthesis == "anomalib"
        if antialias:  # anomalib resizes the float image
            return TF.resize(rgb.float() / 255, [height, width], antialias=True)
        return TF.resize(rgb, [height, width], antialias=False).float() / 255

    def _mask(self, height: int, width: int, g: torch.Generator) -> torch.Tensor:
        noise = perlin_noise(height, width, g)
        if self.settings.synthesis == "anomalib" and not (noise > 0.5).any():
            spread = noise.max() - noise.min()
            noise = (noise - noise.min()) / spread * 2 - 1 if spread > 0 else torch.full_like(noise, -1.0)
        return (_rotated(noise[None], g) > 0.5).float()

    def _augmented(self, texture: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        if self.settings.synthesis == "draem":
            for index in torch.randperm(len(AUTHORS_AUGMENTERS), generator=g)[:3].tolist():
                texture = AUTHORS_AUGMENTERS[index](texture, g)
            return texture
        with torch.random.fork_rng(devices=[]):  # torchvision's transforms draw from the global RNG
            torch.manual_seed(int(torch.randint(0, 2**62, (), generator=g)))
            chosen = torch.multinomial(torch.ones(len(self.anomalib_augmenters)), 3).tolist()
            return v2.Compose([self.anomalib_augmenters[i] for i in chosen])(texture)


def image_seeds(seed: int, epoch: int, step: int, first: int, count: int) -> list[int]:
    """Seeds of the images at global-batch positions first .. first + count - 1 of (epoch, step)."""
    return [derive_seed(seed, "draem-synthesis", str(epoch), str(step), str(first + i)) for i in range(count)]
