"""MVTec 3D-AD reader, RGB only: the xyz point clouds and the validation/ split are ignored.

``<cat>/train/good/rgb/*.png``, ``<cat>/test/<type>/rgb/*.png``, masks ``<cat>/test/<type>/gt/<stem>.png``,
anomalous wherever non-zero (``mask_rule="nonzero"``, as MVTec's evaluation code reads them: images.read_mask).
"""

from .mvtec import TreeLayout

LAYOUT = TreeLayout(
    "mvtec3d",
    train_dir="train/good/rgb",
    test_images="test/{defect}/rgb",
    mask_dir="test/{defect}/gt",
    mask_suffixes=("",),
    mask_rule="nonzero",
)
list_categories = LAYOUT.list_categories
load_split = LAYOUT.load_split
