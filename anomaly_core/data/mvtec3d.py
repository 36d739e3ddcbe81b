"""MVTec 3D-AD reader, RGB only: the xyz point clouds and the validation/ split are ignored.

``<cat>/train/good/rgb/*.png``, ``<cat>/test/<type>/rgb/*.png``, masks ``<cat>/test/<type>/gt/<stem>.png``.
"""

from .mvtec import TreeLayout

LAYOUT = TreeLayout(
    "mvtec3d",
    train_dir="train/good/rgb",
    test_images="test/{defect}/rgb",
    mask_dir="test/{defect}/gt",
    mask_suffixes=("",),
)
list_categories = LAYOUT.list_categories
load_split = LAYOUT.load_split
