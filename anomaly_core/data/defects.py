"""MVTec LOCO's ``defects_config.json``, and each anomalous image's defects read with it for sPRO (``metrics.spro``).

The file (one per category) lists the defect types: ``[{"defect_name": str, "pixel_value": 1..255,
"saturation_threshold": number, "relative_saturation": bool}, ...]``. Each file of an anomalous image's mask
folder (``ground_truth/<type>/<stem>/NNN.png``) is one defect: 0 and one pixel value, which names its type.
A defect's saturation area is ``saturation_threshold`` pixels at the dataset's resolution, capped at the defect's
area, or with ``relative_saturation`` that fraction (0, 1] of its area truncated to whole pixels, as the official
MVTec LOCO evaluation code computes it (``src/image.py``: ``DefectConfig``, ``GroundTruthChannel.get_saturation_area``,
``GroundTruthMap.read_from_png_dir``); a truncation to 0 there divides by zero, here it is 1 pixel.

Metrics run at the maps' geometry (resize, center crop: ``transforms``), so a defect is its file's mask carried
there (nearest, as ``load_mask`` carries their union), an absolute saturation area is scaled by the resize's area
factor (``ImageTransform.area_scale``), relative ones apply to the carried area, and a defect the crop removes
entirely drops out, as a region the crop removes drops out of AUPRO. With resize = crop = the image's (square)
size nothing changes, and the numbers are the official ones (tests/test_loco_autovi.py checks this).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from .images import image_size, mask_values
from .sample import DatasetError, Sample, mask_files
from .transforms import ImageTransform, mask_size_problem

CONFIG_NAME = "defects_config.json"
_KEYS = ("defect_name", "pixel_value", "saturation_threshold", "relative_saturation")


@dataclass(frozen=True)
class DefectType:
    name: str
    pixel_value: int
    saturation_threshold: float
    relative: bool

    def saturation_area(self, area: int, area_scale: float = 1.0) -> float:
        """Pixels of overlap at which a defect of ``area`` pixels counts as found; ``area_scale``: pixels per
        pixel of the dataset's resolution, where absolute thresholds are counted."""
        if self.relative:
            return float(max(int(self.saturation_threshold * area), 1))
        return min(self.saturation_threshold * area_scale, float(area))


def load_defects_config(path: str | Path) -> dict[int, DefectType]:
    """The defect types of ``path`` by pixel value; a missing or malformed file is one error naming it."""
    try:
        status = os.stat(path)
    except OSError as error:
        raise DatasetError(f"missing {path}: MVTec LOCO's sPRO needs the category's defect types and saturation "
                           f"areas ({error.strerror})") from error
    return _parsed(str(path), status.st_mtime_ns, status.st_size)


@lru_cache(maxsize=32)
def _parsed(path: str, _mtime_ns: int, _size: int) -> dict[int, DefectType]:
    """Parsed once per file version: every anomalous image of a category names the same file."""
    try:
        entries = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise DatasetError(f"{path}: not readable as JSON ({error})") from error
    if not isinstance(entries, list) or not entries:
        raise DatasetError(f"{path}: must be a non-empty JSON list of defect types, each with {list(_KEYS)}")
    types: dict[int, DefectType] = {}
    for index, entry in enumerate(entries):
        where = f"{path}: entry {index}"
        if not isinstance(entry, dict) or any(key not in entry for key in _KEYS):
            raise DatasetError(f"{where} must be an object with {list(_KEYS)}, got {entry!r}")
        name, value, threshold, relative = (entry[key] for key in _KEYS)
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 255:
            raise DatasetError(f"{where} ({name!r}): pixel_value must be an integer in 1..255, got {value!r}")
        if not isinstance(relative, bool):
            raise DatasetError(f"{where} ({name!r}): relative_saturation must be true or false, got {relative!r}")
        number = isinstance(threshold, (int, float)) and not isinstance(threshold, bool)
        if relative and not (number and 0 < threshold <= 1):
            raise DatasetError(f"{where} ({name!r}): a relative saturation_threshold must be in (0, 1], got {threshold!r}")
        if not relative and not (isinstance(threshold, int) and not isinstance(threshold, bool) and threshold > 0):
            raise DatasetError(f"{where} ({name!r}): an absolute saturation_threshold must be a whole number of pixels "
                               f"> 0, got {threshold!r}")
        if value in types:
            raise DatasetError(f"{where} ({name!r}): pixel_value {value} is already {types[value].name!r}")
        types[value] = DefectType(str(name), value, float(threshold), relative)
    return types


def read_defects(sample: Sample) -> list[tuple[np.ndarray, DefectType]]:
    """Each file of the sample's mask folder as (bool mask at the file's size, its defect type)."""
    types = load_defects_config(sample.defects_config)
    found = []
    for file in mask_files(sample.mask_path):
        values = mask_values(file)
        levels = np.unique(values[values > 0])
        if len(levels) != 1:
            raise DatasetError(f"mask {file} holds {len(levels)} non-zero values {levels[:5].tolist()}; a file of a "
                               f"MVTec LOCO mask folder is one defect: 0 and one pixel value listed in {sample.defects_config}")
        value = levels[0].item()
        if value not in types:
            raise DatasetError(f"mask {file} has pixel value {value}, which {sample.defects_config} does not list "
                               f"(it lists {sorted(types)})")
        found.append((values > 0, types[value]))
    return found


def load_defects(sample: Sample, transform: ImageTransform) -> tuple[np.ndarray, np.ndarray]:
    """The sample's defects at the maps' geometry: masks bool [R, crop, crop] and saturation areas [R] (pixels)."""
    height, width = image_size(sample.image_path)
    problem = mask_size_problem(sample, (height, width))
    if problem:
        raise DatasetError(problem)
    scale = transform.area_scale(height, width)
    masks, areas = [], []
    for mask, defect in read_defects(sample):
        carried = transform.mask(mask).numpy()
        area = int(np.count_nonzero(carried))
        if area:  # else the crop removed it
            masks.append(carried)
            areas.append(defect.saturation_area(area, scale))
    return np.array(masks, dtype=bool).reshape(-1, transform.crop, transform.crop), np.array(areas, dtype=np.float64)


def defect_regions(samples: Sequence[Sample], transform: ImageTransform) -> list[tuple[np.ndarray, np.ndarray]] | None:
    """``load_defects`` of every sample (none for normal ones), the ``regions`` of ``metrics.compute_metrics``;
    None unless every anomalous sample has a mask and a defects config (sPRO is then undefined)."""
    anomalous = [sample for sample in samples if sample.label == 1]
    if not anomalous or any(s.mask_path is None or s.defects_config is None for s in anomalous):
        return None
    none = (np.zeros((0, transform.crop, transform.crop), dtype=bool), np.zeros(0))
    return [load_defects(sample, transform) if sample.label == 1 else none for sample in samples]
