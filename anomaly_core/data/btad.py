"""BTAD (beanTech) reader: categories ``01``, ``02``, ``03``.

``<cat>/train/ok/*``, ``<cat>/test/ok/*`` normal, ``<cat>/test/ko/*`` anomalous (defect type
``ko``), masks ``<cat>/ground_truth/ko/<stem>.<png|bmp>``.
"""

from .mvtec import TreeLayout

LAYOUT = TreeLayout("btad", train_dir="train/ok", normal="ok", mask_suffixes=("",))
list_categories = LAYOUT.list_categories
load_split = LAYOUT.load_split
