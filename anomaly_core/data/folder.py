"""Plain folder reader for user datasets laid out like MVTec AD, with optional masks.

``<cat>/train/good/*``, ``<cat>/test/good/*`` normal, ``<cat>/test/<defect>/*`` anomalous, masks
``<cat>/ground_truth/<defect>/<stem>_mask.*`` or ``<stem>.*``. An anomalous image without a mask
gets ``mask_path=None``: image-level metrics still work, pixel-level ones are undefined
(``CategorySplit.has_pixel_masks``).
"""

from .mvtec import TreeLayout

LAYOUT = TreeLayout("folder", mask_suffixes=("_mask", ""), masks_required=False)
list_categories = LAYOUT.list_categories
load_split = LAYOUT.load_split
