"""MVTec LOCO AD reader: categories breakfast_box, juice_bottle, pushpins, screw_bag, splicing_connectors.

``<cat>/train/good/*.png``, ``<cat>/validation/good/*.png``, ``<cat>/test/good/*.png``, anomalies in
``<cat>/test/{logical,structural}_anomalies/NNN.png``; the mask of ``test/<type>/NNN.png`` is the folder
``<cat>/ground_truth/<type>/NNN/`` of one file per defect (``000.png``, ``001.png``, ..., each 0 and one
pixel value, ``mask_rule="one_value"``), read as their union for every pixel metric.
``<cat>/defects_config.json`` gives each pixel value a defect type and the saturation area of the dataset's own
pixel metric, sPRO (``data.defects``, ``metrics.spro``): a category with anomalous test images must have it, and
their samples name it (``Sample.defects_config``).

The validation/ images are extra normal images; they stay out of the train set, so the bank is built
from train/good as in the dataset's own protocol and anomalib's loader. ``load_validation`` returns them
for a caller that wants held-out normal images (e.g. for thresholds) without taking any from train.

Results are reported for structural and logical anomalies apart (``METRIC_GROUPS``): each group is
scored on all normal test images plus its own anomalies, as in the dataset paper and the official evaluation
script. That script's headline AU-sPRO is the mean of the two groups' values; the category's own ``spro``
pools all test images instead, as every other metric here does.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from .defects import CONFIG_NAME, load_defects_config
from .mvtec import TreeLayout
from .sample import CategorySplit, Sample, dataset_root, list_images

LAYOUT = TreeLayout("mvtec_loco", mask_suffixes=("",), mask_folders=True, mask_rule="one_value")
list_categories = LAYOUT.list_categories

METRIC_GROUPS: dict[str, tuple[str, ...]] = {
    "structural": ("structural_anomalies",),
    "logical": ("logical_anomalies",),
}


def load_split(root: str | Path, category: str) -> CategorySplit:
    """The tree's split, its anomalous samples naming the category's defects_config.json (read and checked now)."""
    split = LAYOUT.load_split(root, category)
    if not any(sample.label for sample in split.test):
        return split  # a bank needs no defect types
    config = dataset_root(root) / category / CONFIG_NAME
    load_defects_config(config)
    test = tuple(replace(s, defects_config=str(config)) if s.label else s for s in split.test)
    return replace(split, test=test)


def load_validation(root: str | Path, category: str) -> tuple[Sample, ...]:
    """The category's ``validation/good`` images (normal, ``split="validation"``), sorted by path."""
    images = list_images(dataset_root(root) / category / "validation" / "good")
    return tuple(Sample(str(path), 0, None, category, "good", "validation") for path in images)
