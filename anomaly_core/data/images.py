"""Decoding image and mask files into plain numpy arrays, whatever their PIL mode.

Datasets mix 8-bit gray, palette, RGBA, CMYK and 16-bit files; every one becomes uint8 RGB
(images) or bool (masks) here, so nothing downstream looks at PIL modes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

from .sample import DatasetError, MaskRule, mask_files

MAX_MASK_LEVELS = 8
_WIDE_GRAY = ("I", "I;16", "I;16B", "I;16L", "I;16N")


@contextmanager
def _opened(path: str | Path, decode: bool = True) -> Iterator[Image.Image]:
    """Open (and decode) ``path``; any failure becomes a DatasetError naming the file."""
    try:
        with Image.open(path) as im:
            if decode:
                im.load()
            yield im
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DatasetError(f"cannot read image file {path}: {e}") from e


def read_rgb(path: str | Path) -> np.ndarray:
    """``uint8 [H, W, 3]``.

    16-bit gray (``I;16*``, and ``I``, taken to hold 16-bit values as PNG decoders produce)
    keeps its top 8 bits. Alpha is dropped, not composited: anomaly datasets store opaque
    images, so the colour channels are the image. Palette images go through RGBA so their
    transparency entry does not trigger PIL's warning.
    """
    with _opened(path) as im:
        if im.mode in _WIDE_GRAY:
            gray = (np.clip(np.asarray(im, dtype=np.int64), 0, 65535) >> 8).astype(np.uint8)
            return np.repeat(gray[:, :, None], 3, axis=2)
        if im.mode in ("P", "PA"):
            return np.asarray(im.convert("RGBA"))[:, :, :3].copy()
        return np.asarray(im.convert("RGB")).copy()


def image_size(path: str | Path) -> tuple[int, int]:
    """``(height, width)`` from the file header, without decoding the pixels."""
    with _opened(path, decode=False) as im:
        return im.height, im.width


def read_mask(path: str | Path, rule: MaskRule = "levels") -> np.ndarray:
    """``bool [H, W]`` by the format's ``rule`` (``Sample.mask_rule``), each as its dataset's authors read their masks.

    ``"levels"`` (a user's folder, a plain ``read_mask``): anomalous where any channel is > 0 (alpha
    ignored). Masks are 0 for normal pixels and one value (or, in class-coded masks, a few values) for anomalous
    ones; a grey gradient (a soft or resampled mask, or a photo saved as a mask) has no single meaning of
    "anomalous", and reading it as ``> 0`` would silently inflate the defect area, so a mask with more than
    ``MAX_MASK_LEVELS`` non-zero levels is refused.
    An int ``t`` (the folder format's ``mask_threshold``): ``> t``, a binarisation the user chose.

    ``"nonzero"``: ``> 0`` whatever the levels. VisA numbers its defect regions 1, 2, ..., and the VisA authors' and
    anomalib's preparation scripts binarise it as ``mask[mask != 0] = 255``. MVTec AD's evaluation code (Bergmann and
    Sattlegger, 2021, read through a third-party copy: ``eval_segmentation`` takes ``ground_truth > 0`` for the pixel
    AUROC, ``compute_pro`` the connected components of the non-zero pixels, ``np.any(x > 0)`` the image label) and
    MVTec 3D-AD's official evaluation code
    (``evaluate_experiment.py``: ``np.any(x > 0)`` for the label, ``pro_curve_util.compute_pro`` takes the connected
    components of the non-zero pixels) reads its ``gt/*.png`` the same way.

    ``"white"`` (BTAD): anomalous where the file, converted to 8-bit grey, is 255. Its authors' code (VT-ADL,
    ``BT_dataset.py``) never reads the masks; anomalib's ``read_mask`` (``data/utils/image.py``:
    ``Mask(to_image(image.convert("L")) / 255, dtype=uint8)``, which truncates) keeps only 255, so the grey
    compression fringe some BTAD masks carry stays normal. A mask with non-zero pixels but none at 255 is refused.

    ``"one_value"`` (AutoVI, MVTec LOCO): ``> 0``, each file of a mask folder 0 and one value: AutoVI's evaluation
    code, MVTec LOCO's adapted (``src/image.py`` ``GroundTruthChannel.create_from_integer_array``), asserts exactly
    that, then reads the file as bool. (LOCO's files are also checked against its defects_config.json: data.defects.)

    A mask folder (MVTec LOCO, AutoVI: one file per defect region) is the union of its files, each read and checked
    as above; they must all have one size.
    """
    files = mask_files(path)
    union = _read_mask_file(files[0], rule)
    for file in files[1:]:
        mask = _read_mask_file(file, rule)
        if mask.shape != union.shape:
            raise DatasetError(f"mask {file} is {mask.shape[0]}x{mask.shape[1]} (HxW) but {files[0]} in the same "
                               f"mask folder is {union.shape[0]}x{union.shape[1]}")
        union |= mask
    return union


def mask_values(path: str | Path) -> np.ndarray:
    """The pixel values of one mask file, ``[H, W]``: grey as stored, colour as its largest channel."""
    with _opened(path) as im:
        if im.mode in ("1", "L", "F", *_WIDE_GRAY):
            return np.asarray(im)
        return np.asarray(im.convert("RGB")).max(axis=2)


def _read_mask_file(path: Path, rule: MaskRule) -> np.ndarray:
    if rule == "white":
        with _opened(path) as im:
            grey = np.asarray(im.convert("L"))
        if grey.any() and not (grey == 255).any():
            raise DatasetError(f"mask {path} has non-zero pixels but none at 255; a BTAD mask is anomalous where it is "
                               f"255 (as anomalib reads it), so this one would mark nothing")
        return grey == 255
    values = mask_values(path)
    if not isinstance(rule, str):
        return values > rule
    levels = np.unique(values)
    levels = levels[levels > 0]
    if rule == "levels" and len(levels) > MAX_MASK_LEVELS:
        raise DatasetError(
            f"mask {path} is not binary: it holds {len(levels)} non-zero levels ({levels.min()}..{levels.max()}); "
            f"a mask must be 0 for normal pixels and one value (at most {MAX_MASK_LEVELS}) for anomalous ones; "
            f"binarise it (e.g. anomalous where >= 128), or for the folder format set the dataset's mask_threshold, "
            f"rather than let every faint pixel count as a defect"
        )
    if rule == "one_value" and len(levels) > 1:
        raise DatasetError(f"mask {path} holds {len(levels)} non-zero values ({levels.min()}..{levels.max()}); a file "
                           f"of a MVTec LOCO or AutoVI mask folder is one defect region: 0 and one value")
    return values > 0
