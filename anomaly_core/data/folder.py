"""Plain folder reader for user datasets laid out like MVTec AD, with optional masks.

``<cat>/train/good/*``, ``<cat>/test/good/*`` normal, ``<cat>/test/<defect>/*`` anomalous, masks
``<cat>/ground_truth/<defect>/<stem>_mask.*`` or ``<stem>.*``. An anomalous image without a mask
gets ``mask_path=None``: image-level metrics still work, pixel-level ones are undefined
(``CategorySplit.has_pixel_masks``).

Masks are the user's own, with no authors' convention to follow: a grey one is refused (images.read_mask,
``"levels"``) unless the dataset's ``mask_threshold`` says how to binarise it (anomalous where ``> mask_threshold``).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from .mvtec import TreeLayout
from .sample import CategorySplit

LAYOUT = TreeLayout("folder", mask_suffixes=("_mask", ""), masks_required=False)
list_categories = LAYOUT.list_categories


def load_split(root: str | Path, category: str, mask_threshold: int | None = None) -> CategorySplit:
    layout = LAYOUT if mask_threshold is None else replace(LAYOUT, mask_rule=mask_threshold)
    return layout.load_split(root, category)
