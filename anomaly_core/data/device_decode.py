"""``preprocess.gpu_jpeg_decode``: JPEG files decoded by torchvision's ``decode_jpeg`` on the extraction device
(nvJPEG on a GPU), and every image resized, cropped and normalised there with torch.

Opt-in because it changes the features: nvJPEG's pixels differ from libjpeg's (PIL), and torch's antialiased
bilinear resize differs from PIL's, so a bank built this way records it and is only used with it. The
geometry is the same as ``ImageTransform`` (shorter side to ``resize``, centre crop, mean/std), and other
formats (PNG, BMP, TIFF) are still decoded by PIL on the host, then resized on the device like the JPEGs.
The functions take any device, so the CPU (libjpeg-turbo) runs the same code in the tests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torchvision.transforms.functional as TF
from torchvision.io import ImageReadMode, decode_jpeg, read_file
from torchvision.transforms import InterpolationMode

from .images import read_rgb
from .sample import DatasetError
from .transforms import ImageTransform

JPEG_SUFFIXES = (".jpg", ".jpeg")


def read_for_device(path: str | Path) -> torch.Tensor:
    """A JPEG file's bytes (``uint8 [n]``, for ``decode_batch``), any other image's pixels (``uint8 [H, W, 3]``)."""
    if Path(path).suffix.lower() not in JPEG_SUFFIXES:
        return torch.from_numpy(read_rgb(path))
    try:
        return read_file(str(path))
    except RuntimeError as error:
        raise DatasetError(f"cannot read image file {path}: {error}") from error


def decode_batch(raws: Sequence[tuple[str, torch.Tensor]], transform: ImageTransform, device: torch.device
                 ) -> torch.Tensor:
    """``(path, read_for_device(path))`` pairs -> the normalised ``float32 [B, 3, crop, crop]`` batch on ``device``.

    The JPEGs are decoded in one batched call; a file it cannot decode is named (found by decoding one by one).
    """
    jpegs = [position for position, (_, raw) in enumerate(raws) if raw.ndim == 1]
    decoded = dict(zip(jpegs, _decode_jpegs([raws[position] for position in jpegs], device)))
    crops = []
    for position, (_, raw) in enumerate(raws):
        image = decoded[position] if position in decoded else raw.permute(2, 0, 1).to(device, non_blocking=True)
        resized = TF.resize(image, [transform.resize], InterpolationMode.BILINEAR, antialias=True)
        crops.append(TF.center_crop(resized, [transform.crop, transform.crop]))
    batch = torch.stack(crops).float().div_(255)
    mean = torch.tensor(transform.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    std = torch.tensor(transform.std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    return (batch - mean) / std


def _decode_jpegs(raws: Sequence[tuple[str, torch.Tensor]], device: torch.device) -> list[torch.Tensor]:
    if not raws:
        return []
    try:
        return decode_jpeg([raw for _, raw in raws], mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        for path, raw in raws:
            try:
                decode_jpeg(raw, mode=ImageReadMode.RGB, device=device)
            except RuntimeError as error:
                raise DatasetError(f"cannot decode JPEG file {path}: {error}") from error
        raise
