"""Full-size benchmark data made from the bundled real tire subset (MVTec AD layout).

The speed targets are stated for a category the size of MVTec 3D-AD *tire* (239 train / 112 test
images, about 300 x 400 px) and for the whole of MVTec AD (15 categories, 3,629 train / 1,725 test
images, 700-1024 px), but only a 34 / 28-image tire subset ships with the project. Both shapes are
grown from it with deterministic, label-preserving variations of the real images:

* a train copy comes from source image ``i % 34``; each copy after the first 34 gets its own seeded
  crop (85-100 % of the side), flips and a brightness factor, so no two train images are identical
  and patch statistics stay those of real tire photographs;
* a test copy comes from a source test image of the same label (and, for a defect, its mask) with
  flips and brightness only (no crop, so a defect is never cut away), and its mask gets exactly the
  same flips.

``make_shaped_category`` writes one tire-shaped category; ``make_mvtec_shaped`` writes the 15 MVTec AD
categories with their real names, per-category counts, defect folders and image sides (square, as in
MVTec AD; grid, screw and zipper single-channel as there). Every image draws from a generator seeded
by ``(seed, [category,] part, index)``, so the output does not depend on ``workers``; a folder is
written under a temporary name and renamed when complete, and a manifest lets a second call reuse it.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps

from anomaly_core.data import Sample, load_split

MANIFEST = ".shaped.json"
MVTEC_MANIFEST = ".mvtec_shaped.json"
IDENTITY = [None, False, False, 1.0]

# Per category: train images, good test images, defective test images per defect type, image side (px).
# Bergmann et al., "MVTec AD", CVPR 2019, Table 1 (3,629 train / 467 good + 1,258 defective test images),
# and the released folders' defect types.
MVTEC_AD: dict[str, tuple[int, int, dict[str, int], int]] = {
    "bottle": (209, 20, {"broken_large": 20, "broken_small": 22, "contamination": 21}, 900),
    "cable": (224, 58, {"bent_wire": 13, "cable_swap": 12, "combined": 11, "cut_inner_insulation": 14,
                        "cut_outer_insulation": 10, "missing_cable": 12, "missing_wire": 10,
                        "poke_insulation": 10}, 1024),
    "capsule": (219, 23, {"crack": 23, "faulty_imprint": 22, "poke": 21, "scratch": 23, "squeeze": 20}, 1000),
    "carpet": (280, 28, {"color": 19, "cut": 17, "hole": 17, "metal_contamination": 17, "thread": 19}, 1024),
    "grid": (264, 21, {"bent": 12, "broken": 12, "glue": 11, "metal_contamination": 11, "thread": 11}, 1024),
    "hazelnut": (391, 40, {"crack": 18, "cut": 17, "hole": 18, "print": 17}, 1024),
    "leather": (245, 32, {"color": 19, "cut": 19, "fold": 17, "glue": 19, "poke": 18}, 1024),
    "metal_nut": (220, 22, {"bent": 25, "color": 22, "flip": 23, "scratch": 23}, 700),
    "pill": (267, 26, {"color": 25, "combined": 17, "contamination": 21, "crack": 26, "faulty_imprint": 19,
                       "pill_type": 9, "scratch": 24}, 800),
    "screw": (320, 41, {"manipulated_front": 24, "scratch_head": 24, "scratch_neck": 25, "thread_side": 23,
                        "thread_top": 23}, 1024),
    "tile": (230, 33, {"crack": 17, "glue_strip": 18, "gray_stroke": 16, "oil": 18, "rough": 15}, 840),
    "toothbrush": (60, 12, {"defective": 30}, 1024),
    "transistor": (213, 60, {"bent_lead": 10, "cut_lead": 10, "damaged_case": 10, "misplaced": 10}, 1024),
    "wood": (247, 19, {"color": 8, "combined": 11, "hole": 10, "liquid": 10, "scratch": 21}, 1024),
    "zipper": (240, 32, {"broken_teeth": 19, "combined": 16, "fabric_border": 17, "fabric_interior": 16,
                         "rough": 17, "split_teeth": 18, "squeezed_teeth": 16}, 1024),
}
MVTEC_AD_GRAY = frozenset({"grid", "screw", "zipper"})


def _variant(image: Image.Image, rng: np.random.Generator, crop: bool) -> list:
    """The steps for one copy: (crop box or None, flip lr, flip tb, brightness factor)."""
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


@dataclass(frozen=True)
class _Copy:
    """One derived image: its source, generator key, whether it varies (and may be cropped), and targets."""

    source: Sample
    key: tuple[int, ...]
    vary: bool
    crop: bool
    size: tuple[int, int]  # (width, height)
    target: Path
    mask_target: Path | None = None
    gray: bool = False
    compress_level: int = 6  # PIL's default; 1 writes large images ~3x faster, decodes alike


def _write(copy: _Copy) -> None:
    """Write one copy (and its mask, with the same geometric steps)."""
    rng = np.random.default_rng(list(copy.key))
    with Image.open(copy.source.image_path) as image:
        image = image.convert("RGB")
        steps = _variant(image, rng, copy.crop) if copy.vary else IDENTITY
        out = _apply(image, steps, copy.size, Image.BICUBIC, brightness=True)
    copy.target.parent.mkdir(parents=True, exist_ok=True)
    (out.convert("L") if copy.gray else out).save(copy.target, compress_level=copy.compress_level)
    if copy.mask_target is not None:
        with Image.open(copy.source.mask_path) as mask:
            copy.mask_target.parent.mkdir(parents=True, exist_ok=True)
            _apply(mask.convert("L"), steps, copy.size, Image.NEAREST, brightness=False).save(
                copy.mask_target, compress_level=copy.compress_level)


def _write_all(copies: Sequence[_Copy], workers: int) -> None:
    """Every copy, in ``workers`` processes (spawned: the caller may hold threads that fork would copy)."""
    if workers <= 1:
        for copy in copies:
            _write(copy)
        return
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(_write, copies, chunksize=max(1, len(copies) // (8 * workers))))


def _staged(final: Path, write) -> None:
    """Run ``write(staging)`` in a temporary folder beside ``final``, then put it in place of ``final``."""
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    staging.chmod(0o755)  # mkdtemp's 0700 would hide the data from other users once in place
    try:
        write(staging)
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _copy_licence(source_root: str | Path, folder: Path) -> None:
    licence = Path(source_root) / "LICENSE.txt"
    if licence.is_file():  # derived images keep the source's licence beside them
        shutil.copy(licence, folder / "LICENSE.txt")


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

    def write(staging: Path) -> None:
        copies = [_Copy(split.train[i % len(split.train)], (seed, 0, i), i >= len(split.train),
                        i >= len(split.train), size, staging / "train" / "good" / f"{i:03d}.png")
                  for i in range(n_train)]
        for i in range(n_test):
            source = split.test[i % len(split.test)]
            masks = staging / "ground_truth" / source.defect_type / f"{i:03d}_mask.png"
            copies.append(_Copy(source, (seed, 1, i), i >= len(split.test), False, size,
                                staging / "test" / source.defect_type / f"{i:03d}.png",
                                masks if source.mask_path is not None else None))
        _write_all(copies, workers=1)
        _copy_licence(source_root, staging)
        (staging / MANIFEST).write_text(json.dumps(wanted, indent=1))

    _staged(out_root / category, write)
    return out_root


def mvtec_counts(scale: float = 1.0, categories: Sequence[str] | None = None) -> dict[str, tuple[int, dict[str, int]]]:
    """Per category: (train images, test images per folder: ``good`` and each defect type) at ``scale``.

    Scale 1 gives MVTec AD's counts. A smaller scale keeps at least 2 train images, 1 good and 1 defective
    test image per category (so image AUROC is defined); the defective count is shared among the
    defect types by largest remainder, and a type whose share is 0 gets no folder.
    """
    if not 0 < scale <= 1:
        raise ValueError(f"scale must be in (0, 1], got {scale}")
    unknown = sorted(set(categories or ()) - set(MVTEC_AD))
    if unknown:
        raise ValueError(f"unknown MVTec AD categories {unknown} (have {sorted(MVTEC_AD)})")
    counts = {}
    for name in categories or MVTEC_AD:
        n_train, n_good, defects, _ = MVTEC_AD[name]
        total = max(1, round(sum(defects.values()) * scale))
        exact = {defect: n * total / sum(defects.values()) for defect, n in defects.items()}
        shares = {defect: math.floor(value) for defect, value in exact.items()}
        by_remainder = sorted(defects, key=lambda defect: shares[defect] - exact[defect])  # stable: table order
        for defect in by_remainder[: total - sum(shares.values())]:
            shares[defect] += 1
        counts[name] = (max(2, round(n_train * scale)),
                        {"good": max(1, round(n_good * scale)), **{d: n for d, n in shares.items() if n}})
    return counts


def make_mvtec_shaped(
    source_root: str | Path,
    out_root: str | Path,
    scale: float = 1.0,
    workers: int = 1,
    categories: Sequence[str] | None = None,
    seed: int = 0,
) -> Path:
    """Write an MVTec-AD-shaped dataset to ``out_root`` (reused if already made with these arguments).

    Category ``c`` (its position in ``MVTEC_AD``) draws its train copies from the source's train
    images, its good test copies from the source's good test images and its defective ones, with their
    masks, from the source's defective test images, each in turn; files are numbered per folder as in
    MVTec AD. PNGs are written at zlib level 1: ~3x faster for 1024 px images, decoded at the same speed.
    """
    out_root = Path(out_root)
    counts = mvtec_counts(scale, categories)
    wanted = {"source": str(Path(source_root).resolve()), "scale": scale, "categories": list(counts), "seed": seed,
              "version": 1}
    manifest = out_root / MVTEC_MANIFEST
    if manifest.is_file() and json.loads(manifest.read_text()) == wanted:
        return out_root
    split = load_split("mvtec", source_root, "tire")
    sources = {"good": [s for s in split.test if s.label == 0], "defect": [s for s in split.test if s.label == 1]}

    def write(staging: Path) -> None:
        copies = []
        for name, (n_train, folders) in counts.items():
            number, side = list(MVTEC_AD).index(name), MVTEC_AD[name][3]
            common = {"size": (side, side), "gray": name in MVTEC_AD_GRAY, "compress_level": 1}
            folder = staging / name
            copies += [_Copy(split.train[i % len(split.train)], (seed, number, 0, i), i >= len(split.train),
                             i >= len(split.train), target=folder / "train" / "good" / f"{i:03d}.png", **common)
                       for i in range(n_train)]
            drawn = {"good": 0, "defect": 0}  # test copies so far of each label: the next source in turn
            for defect, n in folders.items():
                kind = "good" if defect == "good" else "defect"
                for i in range(n):
                    k = drawn[kind]
                    source = sources[kind][k % len(sources[kind])]
                    mask = None if kind == "good" else folder / "ground_truth" / defect / f"{i:03d}_mask.png"
                    copies.append(_Copy(source, (seed, number, 1 if kind == "good" else 2, k),
                                        k >= len(sources[kind]), False, target=folder / "test" / defect / f"{i:03d}.png",
                                        mask_target=mask, **common))
                    drawn[kind] += 1
        _write_all(copies, workers)
        _copy_licence(source_root, staging)
        (staging / MVTEC_MANIFEST).write_text(json.dumps(wanted, indent=1))

    _staged(out_root, write)
    return out_root
