"""VisA reader: the split is defined by ``<root>/split_csv/1cls.csv``, not by directories.

Columns ``object,split,label,image,mask``; ``label`` is ``normal`` or ``anomaly``; ``image`` and
``mask`` are relative to the root, ``mask`` empty for normal rows. The CSV carries no defect
type, so anomalous samples get ``defect_type="anomaly"``.

A VisA mask numbers the image's defect regions 1, 2, ... (one value per region, as many as there are);
its samples carry ``mask_rule="nonzero"`` so it reads as ``> 0`` however many values it holds, as the VisA
authors' and anomalib's preparation scripts binarise it (``mask[mask != 0] = 255``: amazon-science/spot-diff
utils/prepare_data.py, anomalib src/anomalib/data/datamodules/image/visa.py ``apply_cls1_split``). Neither
uses the ids afterwards: anomalib's PRO takes the connected components of the binarised mask as its
regions, and so does AUPRO here (metrics.aupro).
"""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

from .sample import CategorySplit, DatasetError, Sample, dataset_root, make_split

SPLIT_CSV = "split_csv/1cls.csv"
COLUMNS = ("object", "split", "label", "image", "mask")
LABELS = {"normal": 0, "anomaly": 1}


def _rows(root: Path) -> list[tuple[str, dict[str, str]]]:
    """(``file:line`` for error messages, row) for every CSV row, fields stripped."""
    path = root / SPLIT_CSV
    if not path.is_file():
        raise DatasetError(f"missing VisA split file {path}")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DatasetError(f"{path}: missing columns {missing} (need {list(COLUMNS)})")
        return [(f"{path}:{reader.line_num}", {k: (row[k] or "").strip() for k in COLUMNS}) for row in reader]


def list_categories(root: str | Path) -> list[str]:
    """Distinct ``object`` values of the split CSV, sorted."""
    base = dataset_root(root)
    found = sorted({row["object"] for _, row in _rows(base)})
    if not found:
        raise DatasetError(f"no rows in {base / SPLIT_CSV}")
    return found


def _sample(base: Path, where: str, row: dict[str, str]) -> Sample:
    split, label = row["split"], row["label"]
    if split not in ("train", "test"):
        raise DatasetError(f"{where}: split must be 'train' or 'test', got '{split}'")
    if label not in LABELS:
        raise DatasetError(f"{where}: label must be 'normal' or 'anomaly', got '{label}'")
    image = base / row["image"]
    if not row["image"] or not image.is_file():
        raise DatasetError(f"{where}: image file not found: {image}")
    if label == "normal":
        return Sample(str(image), 0, None, row["object"], "good", split)
    if split == "train":
        raise DatasetError(f"{where}: anomalous image {image} in the train split")
    if not row["mask"]:
        raise DatasetError(f"{where}: anomalous image {image} has no mask")
    mask = base / row["mask"]
    if not mask.is_file():
        raise DatasetError(f"{where}: mask file not found: {mask}")
    return Sample(str(image), 1, str(mask), row["object"], "anomaly", split, mask_rule="nonzero")


def load_split(root: str | Path, category: str) -> CategorySplit:
    base = dataset_root(root)
    rows = _rows(base)
    samples = [_sample(base, where, row) for where, row in rows if row["object"] == category]
    if not samples:
        available = ", ".join(sorted({row["object"] for _, row in rows}))
        raise DatasetError(f"unknown category '{category}' in {base / SPLIT_CSV} (available: {available})")
    counts = Counter(s.image_path for s in samples)
    dupes = sorted(p for p, n in counts.items() if n > 1)
    if dupes:
        raise DatasetError(f"{base / SPLIT_CSV}: image listed more than once: {dupes[0]}")
    train = [s for s in samples if s.split == "train"]
    test = [s for s in samples if s.split == "test"]
    return make_split("visa", base, category, train, test)
