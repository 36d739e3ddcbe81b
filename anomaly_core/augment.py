"""Seeded augmentation of training images, so a memory bank also holds the variation expected at test time.

Every random parameter of an image's copy comes from ``np.random.default_rng(augment_seed(base, index, copy))``:
nothing depends on global RNG state, on which actor extracts the image or on how the train list was sharded.
Copy 0 is the original image and is never augmented; copies ``1..copies`` are.

The pixel work is written for bit-identical output on any machine and thread count: the flip, the photometric ops
and the blur are numpy element-wise float64 arithmetic in a fixed order with one explicit rounding each (no
threaded or CPU-dispatched reductions), and the rotation is Pillow's single-threaded bilinear affine. The only
libm values are the blur weights' ``exp`` and the rotation's ``cos``/``sin`` (which Pillow rounds to 15 decimals).
All of it runs on the original-resolution image, before the resize/crop transform.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np
from PIL import Image

from anomaly_core.seeding import derive_seed

MIN_BLUR_SIGMA = 0.1
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, as torchvision's and PIL's grayscale


class TrainCopies(Protocol):
    """Copies of the training images in the bank, made from the decoded pixels: ``Augmentation``, or AnomalyDINO's
    ``data.anomalydino.ReferenceRotations``. Copy ``c`` (1..``copies``) of image ``index`` is
    ``apply(rgb, seed(base, index, c))``, so it depends on neither shard nor actor."""

    copies: int

    @property
    def enabled(self) -> bool: ...

    def to_dict(self) -> dict[str, Any]: ...

    def seed(self, base_seed: int, index: int, copy: int) -> int: ...

    def apply(self, rgb: np.ndarray, seed: int) -> np.ndarray: ...


@dataclass(frozen=True)
class Augmentation:
    """What the augmented copies of a training image may vary; recorded in ``bank.json`` via ``to_dict``.

    ``copies`` augmented copies per training image join the bank beside the original. Each copy draws:
    a horizontal flip with probability 0.5 (``hflip``); a rotation angle uniform in ``±rotation_degrees``;
    brightness and contrast factors uniform in ``[1 - x, 1 + x]``; a Gaussian blur sigma uniform in
    ``[0.1, blur_sigma]`` (``blur_sigma`` 0 = no blur). A transform whose field is 0/False is off.
    """

    copies: int = 0
    rotation_degrees: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0
    blur_sigma: float = 0.0
    hflip: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.copies, int) or isinstance(self.copies, bool) or self.copies < 0:
            raise ValueError(f"augment.copies must be an integer >= 0, got {self.copies!r}")
        if not isinstance(self.hflip, bool):
            raise ValueError(f"augment.hflip must be true or false, got {self.hflip!r}")
        _check_range("rotation_degrees", self.rotation_degrees, 180.0, "a rotation beyond ±180° repeats angles")
        _check_range("brightness", self.brightness, 1.0, "factors in [1 - x, 1 + x] must stay > 0", inclusive=False)
        _check_range("contrast", self.contrast, 1.0, "factors in [1 - x, 1 + x] must stay > 0", inclusive=False)
        _check_range("blur_sigma", self.blur_sigma, math.inf, "")
        if 0 < self.blur_sigma < MIN_BLUR_SIGMA:
            raise ValueError(f"augment.blur_sigma must be 0 (off) or >= {MIN_BLUR_SIGMA} (sigma is drawn from "
                             f"[{MIN_BLUR_SIGMA}, blur_sigma]), got {self.blur_sigma!r}")
        if self.copies > 0 and not self.transforms_on:
            raise ValueError(f"augment.copies={self.copies} but no transform is on (rotation_degrees, brightness, "
                             f"contrast, blur_sigma, hflip): the copies would only duplicate the bank")

    @property
    def transforms_on(self) -> bool:
        return bool(self.rotation_degrees or self.brightness or self.contrast or self.blur_sigma or self.hflip)

    @property
    def enabled(self) -> bool:
        """Whether the bank gets augmented copies at all."""
        return self.copies > 0 and self.transforms_on

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def seed(self, base_seed: int, index: int, copy: int) -> int:
        """Copy ``copy`` of training image ``index``'s seed (``augment_seed``); the extractor passes it to ``apply``."""
        return augment_seed(base_seed, index, copy)

    def apply(self, rgb: np.ndarray, seed: int) -> np.ndarray:
        return augment_image(rgb, self, seed)


@dataclass(frozen=True)
class AugmentParams:
    """The parameters drawn for one copy of one image (identity values where a transform is off)."""

    flip: bool
    angle: float  # degrees, counter-clockwise
    brightness: float
    contrast: float
    sigma: float  # 0 = no blur


def _check_range(field: str, value: Any, upper: float, why: str, inclusive: bool = True) -> None:
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not number or value < 0 or value > upper or (not inclusive and value == upper):
        bound = f"<= {upper:g}" if inclusive else f"< {upper:g}"
        limit = "" if math.isinf(upper) else f" and {bound}"
        reason = f" ({why})" if why else ""
        raise ValueError(f"augment.{field} must be a finite number >= 0{limit}{reason}, got {value!r}")


def augment_seed(base_seed: int, index: int, copy: int) -> int:
    """The seed of ``copy`` (>= 1) of the image at ``index`` in the category's train list.

    It depends on nothing else, so a copy is the same whichever shard, actor or batch it is extracted in.
    """
    if copy < 1:
        raise ValueError(f"augmented copies are numbered from 1 (copy 0 is the original), got copy={copy}")
    return derive_seed(base_seed, "augment", str(index), str(copy))


def draw_params(augmentation: Augmentation, seed: int) -> AugmentParams:
    """Draw one copy's parameters. Five uniforms are always drawn in one fixed order, so switching one
    transform on or off does not change what the others draw for the same seed."""
    flip_u, angle_u, brightness_u, contrast_u, sigma_u = np.random.default_rng(seed).random(5).tolist()
    return AugmentParams(
        flip=augmentation.hflip and flip_u < 0.5,
        angle=augmentation.rotation_degrees * (2.0 * angle_u - 1.0),
        brightness=1.0 + augmentation.brightness * (2.0 * brightness_u - 1.0),
        contrast=1.0 + augmentation.contrast * (2.0 * contrast_u - 1.0),
        sigma=MIN_BLUR_SIGMA + (augmentation.blur_sigma - MIN_BLUR_SIGMA) * sigma_u if augmentation.blur_sigma else 0.0,
    )


def augment_image(rgb: np.ndarray, augmentation: Augmentation, seed: int) -> np.ndarray:
    """``uint8 [H, W, 3]`` -> one augmented copy of the same shape, drawn from ``seed`` (see ``augment_seed``)."""
    return apply_params(rgb, draw_params(augmentation, seed))


def apply_params(rgb: np.ndarray, params: AugmentParams) -> np.ndarray:
    """Flip, rotate, brightness, contrast, blur, in that order; each off-valued step is skipped (exact identity)."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected uint8 [H, W, 3], got {rgb.dtype} {list(rgb.shape)}")
    out = rgb
    if params.flip:
        out = out[:, ::-1]
    if params.angle:
        out = rotate_reflect(out, params.angle)
    if params.brightness != 1.0:
        out = _to_uint8(out * params.brightness)
    if params.contrast != 1.0:
        mean = _gray_mean(out)
        out = _to_uint8(mean + params.contrast * (out - mean))
    if params.sigma:
        out = gaussian_blur(out, params.sigma)
    return np.ascontiguousarray(out)


def rotate_reflect(rgb: np.ndarray, angle: float) -> np.ndarray:
    """Rotate counter-clockwise by ``angle`` degrees about the image centre, bilinear, same size.

    The corners the rotation uncovers are filled by reflecting the image at its borders (the image is
    reflect-padded, rotated, and its centre cut out), not with black: black corners would put patches into the
    bank that no test image has, and a dark defect could then find a close "normal" neighbour among them.
    """
    height, width = rgb.shape[:2]
    cos, sin = abs(math.cos(math.radians(angle))), abs(math.sin(math.radians(angle)))
    # a source point of an output corner lies at most this far outside the image (+1 for the bilinear neighbour)
    pad_x = max(0, math.ceil((width * cos + height * sin - width) / 2)) + 1
    pad_y = max(0, math.ceil((width * sin + height * cos - height) / 2)) + 1
    padded = np.pad(rgb, ((pad_y, pad_y), (pad_x, pad_x), (0, 0)), mode="reflect")
    rotated = np.asarray(Image.fromarray(padded).rotate(angle, resample=Image.Resampling.BILINEAR))
    return rotated[pad_y : pad_y + height, pad_x : pad_x + width]


def gaussian_blur(rgb: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur: kernel radius ``ceil(3 * sigma)`` (size ``2 * radius + 1``), weights normalised to
    sum 1, borders reflected (as torchvision's ``gaussian_blur``); float64, summed tap by tap, rounded once."""
    radius = math.ceil(3.0 * sigma)
    # math.exp, not np.exp: numpy picks its exp by CPU (AVX-512 or not), which could move a weight's last bit
    gauss = [math.exp(-0.5 * (tap / sigma) ** 2) for tap in range(-radius, radius + 1)]
    weights = np.array(gauss) / math.fsum(gauss)
    height, width = rgb.shape[:2]
    padded = np.pad(rgb.astype(np.float64), ((radius, radius), (radius, radius), (0, 0)), mode="reflect")
    rows = sum(weight * padded[:, tap : tap + width] for tap, weight in enumerate(weights))
    blurred = sum(weight * rows[tap : tap + height] for tap, weight in enumerate(weights))
    return _to_uint8(blurred)


def _gray_mean(rgb: np.ndarray) -> float:
    """Mean luma of the image, from exact integer channel sums (no order-dependent float reduction)."""
    sums = rgb.reshape(-1, 3).sum(axis=0, dtype=np.int64)
    return float(sum(weight * float(total) for weight, total in zip(_LUMA, sums))) / (rgb.shape[0] * rgb.shape[1])


def _to_uint8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)
