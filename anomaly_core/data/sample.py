"""Sample records, and the filesystem helpers every reader builds them with.

A sample's index is its position in ``CategorySplit.train`` / ``.test``; scores, banks and
metrics are keyed by that index across machines, so readers never rely on directory listing
order: every listing here is sorted, and ``make_split`` sorts the final tuples by the image
path relative to the dataset root.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})


# How a mask file's pixels become anomalous or not, as each dataset's authors read their masks (images.read_mask):
# "levels" > 0 with at most a few non-zero levels (MVTec AD, a user's folder), "nonzero" > 0 whatever the levels
# (VisA's region ids, MVTec 3D-AD), "white" grey == 255 (BTAD, as anomalib reads it), "one_value" > 0 with one
# non-zero value per file (MVTec LOCO's and AutoVI's region files), an int t: > t (a user's folder, mask_threshold).
MaskRule = Literal["levels", "nonzero", "white", "one_value"] | int


class DatasetError(ValueError):
    """A dataset on disk is missing, malformed or unreadable; the message names the path."""


@dataclass(frozen=True)
class Sample:
    image_path: str  # absolute
    label: int  # 0 normal, 1 anomalous
    mask_path: str | None  # None for normal images (and unmasked anomalies of the folder format)
    category: str
    defect_type: str  # "good" for normal images
    split: str  # "train" | "test" | "validation" (a format's own held-out normal images: MVTec LOCO)
    # The format's reading of its masks (see MaskRule), set by its reader.
    mask_rule: MaskRule = "levels"
    # MVTec LOCO: the category's defects_config.json, which gives each mask file's pixel value a defect
    # type and the saturation area of its sPRO (data.defects); None where the format has none.
    defects_config: str | None = None


@dataclass(frozen=True)
class CategorySplit:
    dataset: str  # format name
    category: str
    train: tuple[Sample, ...]
    test: tuple[Sample, ...]

    @property
    def has_pixel_masks(self) -> bool:
        """True when every anomalous test image has a mask, i.e. pixel metrics are defined."""
        return all(s.mask_path is not None for s in self.test if s.label == 1)


def dataset_root(root: str | Path) -> Path:
    """Absolute, normalised root (so sample paths are stable strings), checked to exist."""
    path = Path(os.path.abspath(root))
    if not path.is_dir():
        raise DatasetError(f"dataset root does not exist or is not a directory: {path}")
    return path


def subdirs(directory: Path) -> list[str]:
    """Sorted names of the visible subdirectories of ``directory``."""
    return sorted(p.name for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))


def list_images(directory: Path) -> list[Path]:
    """Sorted image files directly in ``directory``.

    Hidden files (e.g. macOS ``._x.png`` resource forks) and non-image files are skipped; a
    symlink with an image name that leads nowhere is an error.
    """
    if not directory.is_dir():
        raise DatasetError(f"missing image directory: {directory}")
    images = [p for p in directory.iterdir() if not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS]
    for path in images:
        # A dangling or looping symlink is not a file; skipping it would silently shrink the split.
        if path.is_symlink() and not path.is_file():
            raise DatasetError(f"image link {path} points to nothing readable (broken or looping symbolic link)")
    return sorted(p for p in images if p.is_file())


def masks_by_stem(mask_dir: Path, folders: bool = False) -> dict[str, list[Path]]:
    """Image files of ``mask_dir`` grouped by stem (listed once per directory, not per image).

    With ``folders``, its subdirectories by name instead: layouts with one mask folder per image (MVTec LOCO,
    AutoVI). An empty one is an error here, before any work, as its image would have no ground truth.
    """
    found: dict[str, list[Path]] = {}
    if not mask_dir.is_dir():
        return found
    if folders:
        for name in subdirs(mask_dir):
            mask_files(mask_dir / name)  # raises for a folder without a mask image
            found[name] = [mask_dir / name]
        return found
    for path in list_images(mask_dir):
        found.setdefault(path.stem, []).append(path)
    return found


def mask_files(mask_path: str | Path) -> list[Path]:
    """The files of one image's mask: the file itself, or the sorted images of a mask folder.

    MVTec LOCO and AutoVI store one file per defect region in a folder per image; the image's mask
    is their union.
    """
    path = Path(mask_path)
    if not path.is_dir():
        return [path]
    files = list_images(path)
    if not files:
        raise DatasetError(f"mask folder {path} holds no mask images")
    return files


def find_mask(masks: dict[str, list[Path]], stem: str, suffixes: tuple[str, ...]) -> Path | None:
    """The mask named ``<stem><suffix>.<any image ext>`` for the first suffix that has one.

    Any extension is accepted because datasets mix them (BTAD has .png and .bmp masks); two
    candidates for one name are ambiguous and rejected rather than picked silently.
    """
    for suffix in suffixes:
        found = masks.get(stem + suffix, [])
        if len(found) > 1:
            raise DatasetError(f"ambiguous masks for image '{stem}': {', '.join(map(str, found))}")
        if found:
            return found[0]
    return None


def check_orphan_masks(masks: dict[str, list[Path]], stems: list[str], suffixes: tuple[str, ...], image_dir: Path) -> None:
    """A mask whose image is missing means an incomplete copy of the data: the test set would shrink silently."""
    used = {stem + suffix for stem in stems for suffix in suffixes}
    for stem, paths in sorted(masks.items()):
        if stem not in used:
            image = next((stem[: -len(suffix)] for suffix in suffixes if suffix and stem.endswith(suffix)), stem)
            raise DatasetError(f"mask {paths[0]} has no image (expected {image_dir / image}.<png|jpg|...>)")


def make_split(fmt: str, root: Path, category: str, train: list[Sample], test: list[Sample]) -> CategorySplit:
    """Sort both parts by root-relative path (the index contract) and reject an empty train set.

    An empty test set is allowed: building a memory bank needs only the train images.
    """
    if not train:
        raise DatasetError(f"empty train set for category '{category}' under {root}")

    def key(sample: Sample) -> str:
        return os.path.relpath(sample.image_path, root).replace(os.sep, "/")

    return CategorySplit(fmt, category, tuple(sorted(train, key=key)), tuple(sorted(test, key=key)))
