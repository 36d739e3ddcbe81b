"""MVTec AD reader, and the per-category tree walker the MVTec-like formats share.

MVTec AD, MVTec 3D-AD, MVTec LOCO AD, AutoVI, BTAD and the plain folder format differ only in where
the normal images, the test images and the masks sit inside ``<root>/<category>/`` (and whether a mask
is a file or a folder of files), so each is a ``TreeLayout`` value rather than its own directory walker.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .sample import (
    CategorySplit,
    DatasetError,
    MaskRule,
    Sample,
    check_orphan_masks,
    dataset_root,
    find_mask,
    list_images,
    make_split,
    masks_by_stem,
    subdirs,
)


@dataclass(frozen=True)
class TreeLayout:
    """Paths relative to ``<root>/<category>``; ``{defect}`` is a subdirectory name of ``test/``."""

    fmt: str
    train_dir: str = "train/good"
    normal: str = "good"  # the test/ subdirectory holding normal images
    test_images: str = "test/{defect}"
    mask_dir: str = "ground_truth/{defect}"
    mask_suffixes: tuple[str, ...] = ("_mask",)  # mask file stem = image stem + suffix
    masks_required: bool = True
    mask_folders: bool = False  # a mask is a folder (named like a mask file's stem) of files to unite
    mask_rule: MaskRule = "levels"  # how the format's authors binarise its masks (images.read_mask)

    def list_categories(self, root: str | Path) -> list[str]:
        """Subdirectories of the root that hold a ``train/`` directory, sorted."""
        path = dataset_root(root)
        found = [name for name in subdirs(path) if (path / name / "train").is_dir()]
        if not found:
            raise DatasetError(f"no category directories (with a train/ subdirectory) under {path}")
        return found

    def load_split(self, root: str | Path, category: str) -> CategorySplit:
        base = dataset_root(root)
        cat = base / category
        if not category or not cat.is_dir():
            available = ", ".join(self.list_categories(base))
            raise DatasetError(f"unknown category '{category}': no directory {cat} (available: {available})")
        train = [
            Sample(str(p), 0, None, category, "good", "train") for p in list_images(cat / self.train_dir)
        ]
        test: list[Sample] = []
        # A missing test/ directory means an empty test set (see make_split).
        for defect in subdirs(cat / "test") if (cat / "test").is_dir() else []:
            images = list_images(cat / self.test_images.format(defect=defect))
            if defect == self.normal:
                test += [Sample(str(p), 0, None, category, "good", "test") for p in images]
                continue
            mask_dir = cat / self.mask_dir.format(defect=defect)
            masks = masks_by_stem(mask_dir, self.mask_folders)
            for path in images:
                mask = find_mask(masks, path.stem, self.mask_suffixes)
                if mask is None and self.masks_required:
                    name = f"{path.stem}{self.mask_suffixes[0]}"
                    expected = f"a folder {mask_dir / name} of masks" if self.mask_folders else mask_dir / f"{name}.png"
                    raise DatasetError(f"missing mask for anomalous image {path}: expected {expected}")
                test.append(Sample(str(path), 1, str(mask) if mask else None, category, defect, "test",
                                   mask_rule=self.mask_rule))
            check_orphan_masks(masks, [path.stem for path in images], self.mask_suffixes, cat / self.test_images.format(defect=defect))
        return make_split(self.fmt, base, category, train, test)


LAYOUT = TreeLayout("mvtec", mask_rule="nonzero")  # as MVTec's evaluation code reads them (images.read_mask)
list_categories = LAYOUT.list_categories
load_split = LAYOUT.load_split
