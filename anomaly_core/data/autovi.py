"""AutoVI reader (Renault): engine_wiring, pipe_clip, pipe_staple, tank_screw, underbody_pipes, underbody_screw.

The MVTec LOCO layout without validation/: ``<cat>/train/good/*.png``, ``<cat>/test/good/*.png``,
``<cat>/test/<defect>/NNNN.png``, and the mask of each anomalous image is the folder
``<cat>/ground_truth/<defect>/NNNN/`` of one file per defect region (``0000.png``, ...), read as their union,
each file 0 and one value (``mask_rule="one_value"``, as AutoVI's evaluation code requires: images.read_mask).
``defects_config.json`` (pixel value -> defect name and sPRO saturation) is not used. Defect folders are
named after the defect, not after structural/logical, so no metric groups are reported.
"""

from .mvtec import TreeLayout

LAYOUT = TreeLayout("autovi", mask_suffixes=("",), mask_folders=True, mask_rule="one_value")
list_categories = LAYOUT.list_categories
load_split = LAYOUT.load_split
