"""BTAD (beanTech) reader: categories ``01``, ``02``, ``03``.

``<cat>/train/ok/*``, ``<cat>/test/ok/*`` normal, ``<cat>/test/ko/*`` anomalous (defect type
``ko``), masks ``<cat>/ground_truth/ko/<stem>.<png|bmp>``, anomalous where they are 255 (``mask_rule="white"``,
as anomalib reads them: images.read_mask), so the grey fringe of some masks is no defect and no reason to stop.
"""

from .mvtec import TreeLayout

LAYOUT = TreeLayout("btad", train_dir="train/ok", normal="ok", mask_suffixes=("",), mask_rule="white")
list_categories = LAYOUT.list_categories
load_split = LAYOUT.load_split
