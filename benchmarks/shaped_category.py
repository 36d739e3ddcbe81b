"""A full-size benchmark category made from the bundled real tire subset (MVTec AD layout).

The speed targets are stated for a category the size of MVTec 3D-AD *tire* (239 train / 112 test
images, about 300 x 400 px), but only a 34 / 28-image subset ships with the project. This grows that
subset to the full shape with deterministic, label-preserving variations of the real images:

* train image i comes from source image ``i % 34``; each copy after the first gets its own seeded
  crop (85-100 % of the side), flips and a brightness factor, so no two train images are identical
  and patch statistics stay those of real tire photographs;
* test image i comes from source test image ``i % 28`` with flips and brightness only (no crop, so a
  defect is never cut away), and its mask gets exactly the same flips.

Every image draws from a generator seeded by ``(seed, part, index)``; the folder is written to a
temporary name and renamed when complete, and a manifest lets a second call reuse it.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from anomaly_core.data import load_split

MANIFEST = ".shaped.json"


def _variant(image: Image.Image, rng: np.random.Generator, crop: bool, size: tuple[int, int]) -> list:
    """The geometric steps for one copy: (crop box or None, flip lr, flip tb), plus brightness."""
    box = None
    if crop:
        scale = rng.uniform(0.85, 1.0)
        w, h = image.size
        cw, ch = int(round(w * scale)), int(round(h * scale))
        left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        box = (left, top, left + cw, top + ch)
    return [box, bool(rng.integers(2)), bool(rng.integers(2)), float(rng.uniform(0.9, 1.1))]


def _apply(image: Image.Image, steps: list, size: tuple[int, int], resample: int, brightness: bool) -> Image.Image:
    box, flip_lr, flip_tb, factor = steps
    if box is not None:
        image = image.crop(box)
    image = image.resize(size, resample)
    if flip_lr:
        image = ImageOps.mirror(image)
    if flip_tb:
        image = ImageOps.flip(image)
    if brightness:
        pixels = np.asarray(image, dtype=np.float32) * factor
        image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
    return image


def make_shaped_category(
    source_root: str | Path,
    out_root: str | Path,
    category: str = "tire",
    n_train: int = 239,
    n_test: int = 112,
    size: tuple[int, int] = (300, 400),
    seed: int = 0,
) -> Path:
    """Write ``<out_root>/<category>`` in MVTec AD layout (reused if already made with these arguments)."""
    out_root = Path(out_root)
    wanted = {"source": str(Path(source_root).resolve()), "category": category, "n_train": n_train,
              "n_test": n_test, "size": list(size), "seed": seed, "version": 1}
    manifest = out_root / category / MANIFEST
    if manifest.is_file() and json.loads(manifest.read_text()) == wanted:
        return out_root
    split = load_split("mvtec", source_root, category)
    out_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{category}-", dir=out_root))
    try:
        for i in range(n_train):
            source = split.train[i % len(split.train)]
            rng = np.random.default_rng([seed, 0, i])
            with Image.open(source.image_path) as image:
                image = image.convert("RGB")
                steps = _variant(image, rng, crop=i >= len(split.train), size=size)
                if i < len(split.train):
                    steps = [None, False, False, 1.0]  # the real images themselves come first
                target = staging / "train" / "good" / f"{i:03d}.png"
                target.parent.mkdir(parents=True, exist_ok=True)
                _apply(image, steps, size, Image.BICUBIC, brightness=True).save(target)
        for i in range(n_test):
            source = split.test[i % len(split.test)]
            rng = np.random.default_rng([seed, 1, i])
            with Image.open(source.image_path) as image:
                image = image.convert("RGB")
                steps = _variant(image, rng, crop=False, size=size)
                if i < len(split.test):
                    steps = [None, False, False, 1.0]
                target = staging / "test" / source.defect_type / f"{i:03d}.png"
                target.parent.mkdir(parents=True, exist_ok=True)
                _apply(image, steps, size, Image.BICUBIC, brightness=True).save(target)
            if source.mask_path is not None:
                with Image.open(source.mask_path) as mask:
                    mask_target = staging / "ground_truth" / source.defect_type / f"{i:03d}_mask.png"
                    mask_target.parent.mkdir(parents=True, exist_ok=True)
                    _apply(mask.convert("L"), steps, size, Image.NEAREST, brightness=False).save(mask_target)
        licence = Path(source_root) / "LICENSE.txt"
        if licence.is_file():  # derived images keep the source's licence beside them
            shutil.copy(licence, staging / "LICENSE.txt")
        (staging / MANIFEST).write_text(json.dumps(wanted, indent=1))
        final = out_root / category
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_root
