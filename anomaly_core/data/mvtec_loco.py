"""MVTec LOCO AD reader: categories breakfast_box, juice_bottle, pushpins, screw_bag, splicing_connectors.

``<cat>/train/good/*.png``, ``<cat>/validation/good/*.png``, ``<cat>/test/good/*.png``, anomalies in
``<cat>/test/{logical,structural}_anomalies/NNN.png``; the mask of ``test/<type>/NNN.png`` is the folder
``<cat>/ground_truth/<type>/NNN/`` of one file per defect region (``000.png``, ``001.png``, ..., each 0 and
one non-zero value), read as their union. ``defects_config.json`` (pixel value -> defect name and sPRO
saturation) is not used: no metric here needs it.

The validation/ images are extra normal images; they stay out of the train set, so the bank is built
from train/good as in the dataset's own protocol and anomalib's loader. ``load_validation`` returns them
for a caller that wants held-out normal images (e.g. for thresholds) without taking any from train.

Results are reported for structural and logical anomalies apart (``METRIC_GROUPS``): each group is
scored on all normal test images plus its own anomalies, as in the dataset paper.
"""

from __future__ import annotations

from pathlib import Path

from .mvtec import TreeLayout
from .sample import Sample, dataset_root, list_images

LAYOUT = TreeLayout("mvtec_loco", mask_suffixes=("",), mask_folders=True)
list_categories = LAYOUT.list_categories
load_split = LAYOUT.load_split

METRIC_GROUPS: dict[str, tuple[str, ...]] = {
    "structural": ("structural_anomalies",),
    "logical": ("logical_anomalies",),
}


def load_validation(root: str | Path, category: str) -> tuple[Sample, ...]:
    """The category's ``validation/good`` images (normal, ``split="validation"``), sorted by path."""
    images = list_images(dataset_root(root) / category / "validation" / "good")
    return tuple(Sample(str(path), 0, None, category, "good", "validation") for path in images)
