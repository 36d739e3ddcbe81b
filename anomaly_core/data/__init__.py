"""Dataset readers, image/mask decoding, transforms and the synthetic dataset generator.

Every format module exposes ``list_categories(root)`` and ``load_split(root, category)``, and may
define ``METRIC_GROUPS`` (defect types reported apart) and ``load_validation(root, category)``;
``DATASET_FORMATS`` maps a format name to its module, imported on first use so that
``python -m anomaly_core.data.synthetic`` does not find its own module already imported.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

from .images import image_size, read_mask, read_rgb
from .sample import IMAGE_EXTENSIONS, CategorySplit, DatasetError, Sample
from .transforms import IMAGENET_MEAN, IMAGENET_STD, ImageTransform, load_image, load_mask

DATASET_FORMATS: dict[str, str] = {
    name: f"{__name__}.{name}"
    for name in ("mvtec", "mvtec3d", "mvtec_loco", "autovi", "visa", "btad", "folder", "synthetic")
}


def _reader(fmt: str) -> ModuleType:
    if fmt not in DATASET_FORMATS:
        raise DatasetError(f"unknown dataset format '{fmt}' (known: {', '.join(DATASET_FORMATS)})")
    return importlib.import_module(DATASET_FORMATS[fmt])


def list_categories(fmt: str, root: str | Path) -> list[str]:
    """Category names of the dataset at ``root``, sorted."""
    return _reader(fmt).list_categories(root)


def load_split(fmt: str, root: str | Path, category: str, mask_threshold: int | None = None) -> CategorySplit:
    """Train and test samples of one category, each sorted by path relative to ``root``.

    ``mask_threshold`` (folder format only: the other formats read masks as their authors define them) reads
    its masks as anomalous where ``> mask_threshold``.
    """
    if mask_threshold is None:
        return _reader(fmt).load_split(root, category)
    if fmt != "folder":
        raise DatasetError(f"mask_threshold is for the folder format only; {fmt} masks are read as its authors "
                           f"define them")
    return _reader(fmt).load_split(root, category, mask_threshold)


def load_validation(fmt: str, root: str | Path, category: str) -> tuple[Sample, ...]:
    """The format's own held-out normal images (MVTec LOCO's ``validation/good``); () for formats without any."""
    reader = _reader(fmt)
    return reader.load_validation(root, category) if hasattr(reader, "load_validation") else ()


def metric_groups(fmt: str) -> dict[str, tuple[str, ...]]:
    """Groups of defect types the format reports on their own, e.g. MVTec LOCO's structural and logical
    anomalies; {} for most formats. ``metrics.group_indices`` turns them into test-set index subsets."""
    return dict(getattr(_reader(fmt), "METRIC_GROUPS", {}))


def __getattr__(name: str) -> object:
    """Lazy re-export of ``generate_synthetic`` (PEP 562), for the reason given above."""
    if name == "generate_synthetic":
        return _reader("synthetic").generate_synthetic
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DATASET_FORMATS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "CategorySplit",
    "DatasetError",
    "ImageTransform",
    "Sample",
    "generate_synthetic",
    "image_size",
    "list_categories",
    "load_image",
    "load_mask",
    "load_split",
    "load_validation",
    "metric_groups",
    "read_mask",
    "read_rgb",
]
