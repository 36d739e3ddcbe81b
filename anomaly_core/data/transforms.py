"""The image/mask geometry every PatchCore run applies: resize shorter side, center-crop.

Resizing and cropping go through torchvision's functional ops on PIL images, i.e. exactly
``Resize(int)`` + ``CenterCrop`` of the reference PatchCore pipelines (PIL bilinear, which is
antialiased and deterministic on any CPU). Masks follow the same geometry with nearest
interpolation, so mask pixel (y, x) is the image's pixel (y, x).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from .images import image_size, read_mask, read_rgb
from .sample import DatasetError, Sample, mask_files

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ImageTransform:
    resize: int = 256
    crop: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.crop <= 0:
            raise ValueError(f"crop must be positive, got crop={self.crop}")
        if self.resize < self.crop:
            raise ValueError(f"resize={self.resize} must be >= crop={self.crop}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean and std need 3 values, std > 0; got mean={self.mean}, std={self.std}")

    def _geometry(self, im: Image.Image, interpolation: InterpolationMode) -> Image.Image:
        return TF.center_crop(TF.resize(im, self.resize, interpolation), [self.crop, self.crop])

    def image(self, rgb: np.ndarray) -> torch.Tensor:
        """``uint8 [H, W, 3]`` -> normalized ``float32 [3, crop, crop]``."""
        return torch.from_numpy(self.array(rgb))

    def array(self, rgb: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """``image`` as numpy, written into ``out`` (``float32 [3, crop, crop]``) when given.

        Numpy, not torch, so that decode threads run it in parallel: numpy releases the GIL and runs
        single-threaded, while a torch op called from a decode thread opens its own OpenMP team of the
        extractor's thread count. Each step is one IEEE-rounded float32 operation per element, as
        torchvision's ``ToTensor`` + ``Normalize``: the values are bit-identical to theirs.
        """
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f"expected uint8 [H, W, 3], got {rgb.dtype} {list(rgb.shape)}")
        pixels = np.asarray(self._geometry(Image.fromarray(rgb), InterpolationMode.BILINEAR))
        out = np.empty((3, self.crop, self.crop), np.float32) if out is None else out
        for channel in range(3):
            plane = out[channel]
            np.divide(pixels[:, :, channel], np.float32(255), out=plane, dtype=np.float32)
            plane -= np.float32(self.mean[channel])
            plane /= np.float32(self.std[channel])
        return out

    def area_scale(self, height: int, width: int) -> float:
        """Pixels of the resized image per pixel of a ``height`` x ``width`` original (the crop cuts, it does not
        scale): what a pixel count of the original, such as an sPRO saturation area, becomes at the maps' geometry.

        The resized size follows torchvision's ``Resize(int)`` rule (``_compute_resized_output_size``): the
        shorter side becomes ``resize``, the longer ``int(resize * long / short)``.
        """
        short, long = sorted((height, width))
        return self.resize * int(self.resize * long / short) / (height * width)

    def mask(self, mask: np.ndarray) -> torch.Tensor:
        """``bool [H, W]`` -> ``bool [crop, crop]``, aligned with ``image`` of the same size."""
        if mask.ndim != 2:
            raise ValueError(f"expected a 2-D mask, got shape {list(mask.shape)}")
        im = Image.fromarray(np.where(mask, 255, 0).astype(np.uint8))
        out = np.asarray(self._geometry(im, InterpolationMode.NEAREST))
        return torch.from_numpy(out > 127)


def load_image(sample: Sample, transform: ImageTransform) -> torch.Tensor:
    return transform.image(read_rgb(sample.image_path))


def load_mask(sample: Sample, transform: ImageTransform) -> torch.Tensor | None:
    """The sample's mask at crop size: all False for a normal image, None for an unmasked anomaly.

    A mask whose size differs from its image would be silently misaligned after resizing, so
    it is rejected (sizes come from the file headers, before anything is decoded).
    """
    if sample.mask_path is None:
        return None if sample.label == 1 else torch.zeros(transform.crop, transform.crop, dtype=torch.bool)
    problem = mask_size_problem(sample, image_size(sample.image_path))
    if problem:
        raise DatasetError(problem)
    return transform.mask(read_mask(sample.mask_path, sample.mask_rule))


def mask_size_problem(sample: Sample, size: tuple[int, int]) -> str | None:
    """Why the sample's mask cannot be aligned with its image of ``size`` (None if it can).

    Every mask file (the one file, or each file of a mask folder) must have the image's size; the
    problem names the first file that has not. Headers only: nothing is decoded.
    """
    for path in mask_files(sample.mask_path):
        height, width = image_size(path)
        if (height, width) != tuple(size):
            return f"mask {path} is {height}x{width} (HxW) but its image {sample.image_path} is {size[0]}x{size[1]}"
    return None
