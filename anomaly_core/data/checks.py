"""Checks of a category's files that are cheap enough to run before any work starts.

Image headers only (no pixel decoding; masks, which are few, are decoded), so a full benchmark's
thousands of images are checked in seconds: unreadable files (zero bytes, text with an image name), images too small to mean
anything after resizing, masks whose size differs from their image, and MVTec LOCO mask files whose pixel
value its defects_config.json does not list. A truncated file whose header is intact is caught when it is
decoded, with the same kind of error naming it.
"""

from __future__ import annotations

from typing import Sequence

from .defects import read_defects
from .images import image_size, read_mask
from .transforms import mask_size_problem
from .sample import CategorySplit, DatasetError, Sample

MIN_IMAGE_SIDE = 32  # px; below this a resize to the backbone's input invents the image
SHOWN_PROBLEMS = 10


def check_split(split: CategorySplit, root: str, need_test: bool, extra: Sequence[Sample] = ()) -> None:
    """Raise one DatasetError listing every unusable file of ``split`` and ``extra`` (the first ten by name)."""
    where = f"category {split.category!r} under {root}"
    if need_test and not split.test:
        raise DatasetError(f"{where}: no test images (is the test/ folder missing or empty?); a benchmark or "
                           f"evaluation needs them — use jobs.build_bank to build a bank from train images alone")
    problems = []
    for sample in (*split.train, *split.test, *extra):
        try:
            height, width = image_size(sample.image_path)
        except DatasetError as error:
            problems.append(str(error))
            continue
        if min(height, width) < MIN_IMAGE_SIDE:
            problems.append(f"image {sample.image_path} is {height}x{width} px, smaller than {MIN_IMAGE_SIDE} px")
        if sample.mask_path is not None:
            try:
                problem = mask_size_problem(sample, (height, width))
                if problem:
                    problems.append(problem)
                elif sample.defects_config:
                    read_defects(sample)  # one defect type per file, listed in the config: sPRO needs each
                else:
                    read_mask(sample.mask_path, sample.mask_rule)  # masks are few and small: decoded now, so a bad one costs no run
            except DatasetError as error:
                problems.append(str(error))
    if problems:
        more = f"\n  ... and {len(problems) - SHOWN_PROBLEMS} more" if len(problems) > SHOWN_PROBLEMS else ""
        raise DatasetError(f"{where}: {len(problems)} unusable file(s):\n  " + "\n  ".join(problems[:SHOWN_PROBLEMS]) + more)
