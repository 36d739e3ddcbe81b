"""A deterministic, MVTec-AD-shaped synthetic dataset, for tests and cluster smoke runs.

Each category is a procedural texture (woven cloth, wood grain, floor tiles). Normal images
differ by random shifts, noise fields, brightness and pixel noise, so the model must learn a
distribution, not one picture. Test defects (scratch, hole, stain, color spot; about 0.5-5% of
the image, random size, colour and position) are pasted on fresh normal images, and each mask
is exactly the set of pixels the defect changed.

Every image draws from its own generator seeded by (seed, category, part, index), so the
bytes do not depend on generation order or on the other arguments' counts. Output is
byte-identical for the same arguments with the same numpy/Pillow build (float rounding in
``np.sin`` may differ across CPU/numpy builds, so compare checksums on one platform only).
"""

from __future__ import annotations

import argparse
import colorsys
import json
import os
import shutil
import tempfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from . import mvtec
from .sample import CategorySplit, DatasetError

VERSION = 1
MANIFEST = ".synthetic.json"
DEFECT_TYPES = ("scratch", "hole", "stain", "color_spot")

Texture = Callable[[np.random.Generator, int], np.ndarray]
Defect = Callable[[np.random.Generator, np.ndarray], tuple[np.ndarray, np.ndarray]]


def _rng(seed: int, category: str, part: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(category.encode()), zlib.crc32(part.encode()), index])


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:size, 0:size]
    return y.astype(np.float64), x.astype(np.float64)


def _smooth_noise(rng: np.random.Generator, size: int, cells_y: int, cells_x: int) -> np.ndarray:
    """Value noise: a random lattice, smoothstep-interpolated to ``[size, size]``, about N(0, 1)."""
    lattice = rng.standard_normal((cells_y + 1, cells_x + 1))

    def axis(cells: int) -> tuple[np.ndarray, np.ndarray]:
        t = np.arange(size) * (cells / size)
        i = t.astype(np.int64)
        f = t - i
        return i, f * f * (3 - 2 * f)

    (iy, fy), (ix, fx) = axis(cells_y), axis(cells_x)
    rows = lattice[iy] * (1 - fy)[:, None] + lattice[iy + 1] * fy[:, None]
    return rows[:, ix] * (1 - fx) + rows[:, ix + 1] * fx


def _ellipse(size: int, rng: np.random.Generator, radius: float, min_aspect: float) -> np.ndarray:
    """Squared normalised radius of a randomly placed and rotated ellipse (< 1 inside).

    Centres stay in the middle 55% so a 224/256 center crop never cuts a defect off.
    """
    y, x = _grid(size)
    cy, cx = rng.uniform(0.225, 0.775, 2) * size
    ry, rx = radius * rng.uniform(min_aspect, 1.0), radius
    angle = rng.uniform(0, np.pi)
    u = (x - cx) * np.cos(angle) + (y - cy) * np.sin(angle)
    v = -(x - cx) * np.sin(angle) + (y - cy) * np.cos(angle)
    return (u / rx) ** 2 + (v / ry) ** 2


# Textures: (rng, size) -> float RGB [size, size, 3], roughly within [50, 215].


def _weave(rng: np.random.Generator, size: int) -> np.ndarray:
    """Plain weave: threads alternate over/under in a checkerboard of thread crossings."""
    period = size / 16
    y, x = _grid(size)
    y, x = y + rng.uniform(0, 2 * period), x + rng.uniform(0, 2 * period)
    cell_y, cell_x = np.floor(y / period), np.floor(x / period)
    horizontal = (cell_y + cell_x) % 2 == 0
    across = np.where(horizontal, y / period - cell_y, x / period - cell_x)
    fibres = 0.05 * np.sin(2 * np.pi * 4 * across) + 0.04 * _smooth_noise(rng, size, 32, 32)
    shade = 0.5 + 0.42 * np.sin(np.pi * across) ** 0.6 + fibres
    return shade[..., None] * np.array([180.0, 162.0, 130.0])


def _grain(rng: np.random.Generator, size: int) -> np.ndarray:
    """Wood: noise-warped growth rings plus fine streaks along the grain."""
    y, _ = _grid(size)
    warp = size * (0.06 * _smooth_noise(rng, size, 3, 3) + 0.01 * _smooth_noise(rng, size, 8, 8))
    rings = (0.5 + 0.5 * np.sin(2 * np.pi * (y + warp) / (size / 12) + rng.uniform(0, 2 * np.pi))) ** 2
    streaks = _smooth_noise(rng, size, 48, 3)
    shade = 0.95 - 0.3 * rings + 0.05 * streaks
    return shade[..., None] * np.array([176.0, 122.0, 76.0])


def _tiles(rng: np.random.Generator, size: int) -> np.ndarray:
    """Square tiles with grout lines, bevelled edges and a per-tile shade."""
    tile, grout = size / 4, max(2.0, size / 64)
    y, x = _grid(size)
    y, x = y + rng.uniform(0, tile), x + rng.uniform(0, tile)
    iy, ix = (y // tile).astype(np.int64), (x // tile).astype(np.int64)
    fy, fx = y - iy * tile, x - ix * tile
    edge = np.minimum(np.minimum(fy, fx) - grout, np.minimum(tile - fy, tile - fx))
    bevel = 1 - 0.15 * np.clip(1 - edge / (2 * grout), 0, 1)
    per_tile = 1 + 0.04 * rng.standard_normal((iy.max() + 1, ix.max() + 1))
    surface = 1 + 0.03 * _smooth_noise(rng, size, 8, 8)
    tiles = (per_tile[iy, ix] * surface * bevel)[..., None] * np.array([160.0, 172.0, 186.0])
    grout_rgb = (1 + 0.05 * _smooth_noise(rng, size, 16, 16))[..., None] * np.array([92.0, 90.0, 88.0])
    return np.where((edge < 0)[..., None], grout_rgb, tiles)


TEXTURES: dict[str, Texture] = {"weave": _weave, "grain": _grain, "tiles": _tiles}


# Defects: (rng, clean float RGB) -> (shape bool [H, W], new float RGB values).


def _scratch(rng: np.random.Generator, clean: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A thin, slightly curved stroke (quadratic Bezier), either dark or bright."""
    size = clean.shape[0]
    length, width = rng.uniform(0.35, 0.6) * size, rng.uniform(0.016, 0.028) * size
    angle = rng.uniform(0, np.pi)
    centre = rng.uniform(0.3, 0.7, 2) * size
    along = np.array([np.sin(angle), np.cos(angle)])  # (dy, dx)
    across = np.array([along[1], -along[0]])
    p0, p2 = centre - along * length / 2, centre + along * length / 2
    p1 = centre + across * rng.uniform(-0.15, 0.15) * length
    y, x = _grid(size)
    nearest = np.full((size, size), np.inf)
    for t in np.linspace(0, 1, int(length) * 2):
        py, px = (1 - t) ** 2 * p0 + 2 * t * (1 - t) * p1 + t**2 * p2
        np.minimum(nearest, (y - py) ** 2 + (x - px) ** 2, out=nearest)
    shape = nearest <= (width / 2) ** 2
    values = clean * 0.3 + rng.uniform(150, 185) if rng.random() < 0.5 else clean * rng.uniform(0.3, 0.55)
    return shape, values


def _hole(rng: np.random.Generator, clean: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A dark elliptical hole, darkest in the middle."""
    r2 = _ellipse(clean.shape[0], rng, rng.uniform(0.045, 0.085) * clean.shape[0], 0.7)
    values = 14 + 26 * np.sqrt(np.minimum(r2, 1))[..., None] + 0.1 * clean
    return r2 < 1, values


def _stain(rng: np.random.Generator, clean: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A semi-transparent dark blob with a noise-ragged outline."""
    size = clean.shape[0]
    r2 = _ellipse(size, rng, rng.uniform(0.075, 0.125) * size, 0.6)
    shape = r2 + 0.3 * _smooth_noise(rng, size, 10, 10) < 1
    alpha = rng.uniform(0.35, 0.7)
    return shape, clean * (1 - alpha) + rng.uniform(25, 95, 3) * alpha


def _color_spot(rng: np.random.Generator, clean: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A small spot of a saturated random colour."""
    r2 = _ellipse(clean.shape[0], rng, rng.uniform(0.055, 0.085) * clean.shape[0], 0.7)
    rgb = 255 * np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.6, 1), rng.uniform(0.8, 1)))
    alpha = rng.uniform(0.55, 0.9)
    return r2 < 1, clean * (1 - alpha) + rgb * alpha


DEFECTS: dict[str, Defect] = {
    "scratch": _scratch,
    "hole": _hole,
    "stain": _stain,
    "color_spot": _color_spot,
}


def _to_uint8(rgb: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def _normal_image(rng: np.random.Generator, category: str, size: int) -> np.ndarray:
    """A texture sample with global brightness jitter and pixel noise, as a camera would add."""
    rgb = TEXTURES[category](rng, size) * rng.normal(1.0, 0.03)
    return _to_uint8(rgb + rng.normal(0.0, 2.5, rgb.shape))


def _defect_image(
    rng: np.random.Generator, category: str, defect: str, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """(image, mask) where the mask is exactly the pixels that differ from the clean image."""
    clean = _normal_image(rng, category, size)
    shape, values = DEFECTS[defect](rng, clean.astype(np.float64))
    values = values + rng.normal(0.0, 3.0, values.shape)  # defects are not flat paint
    image = np.where(shape[..., None], _to_uint8(values), clean)
    return image, (image != clean).any(axis=2)


def _save_png(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG", compress_level=1)  # noise barely compresses


def _write_category(
    dest: Path, seed: int, category: str, n_train: int, n_test_good: int, n_defect: int, size: int
) -> None:
    width = max(3, len(str(max(n_train, n_test_good, n_defect) - 1)))  # names must sort as numbers
    for part, count in (("train/good", n_train), ("test/good", n_test_good)):
        for i in range(count):
            _save_png(
                _normal_image(_rng(seed, category, part, i), category, size),
                dest / part / f"{i:0{width}d}.png",
            )
    for defect in DEFECT_TYPES:
        for i in range(n_defect):
            image, mask = _defect_image(_rng(seed, category, f"test/{defect}", i), category, defect, size)
            _save_png(image, dest / "test" / defect / f"{i:0{width}d}.png")
            _save_png(mask.astype(np.uint8) * 255, dest / "ground_truth" / defect / f"{i:0{width}d}_mask.png")


def write_textures(folder: str | Path, per_texture: int = 4, size: int = 96, seed: int = 0) -> Path:
    """A small stand-in for DTD (DRAEM's anomaly textures, training.auxiliary.dtd): ``per_texture`` images of
    each procedural texture in ``folder/<texture>/NNN.png``, DTD's layout; the same bytes on every call."""
    folder = Path(folder)
    for category in TEXTURES:
        for i in range(per_texture):
            image = _normal_image(_rng(seed, category, "texture", i), category, size)
            _save_png(image, folder / category / f"{i:03d}.png")
    return folder


def _read_manifest(root: Path) -> dict | None:
    try:
        return json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def generate_synthetic(
    root: str | Path,
    seed: int = 0,
    categories: Sequence[str] = ("weave", "grain", "tiles"),
    n_train: int = 24,
    n_test_good: int = 6,
    n_test_defect_per_type: int = 4,
    size: int = 256,
) -> Path:
    """Write the dataset under ``root`` (MVTec AD layout) unless it is already there; return root.

    The tree is built in a sibling temp directory, manifest last, then renamed into place, so
    ``root`` either holds a complete dataset or nothing: a killed run leaves only a hidden
    ``.<name>.tmp-*`` sibling. Concurrent calls with the same arguments are safe: the losers of
    the final rename find the winner's identical manifest. A ``root`` holding anything other
    than a synthetic dataset is never replaced.
    """
    path = Path(os.path.abspath(root))
    unknown = [c for c in categories if c not in TEXTURES]
    if unknown or not categories:
        raise ValueError(
            f"categories must be a non-empty subset of {sorted(TEXTURES)}, got {list(categories)}"
        )
    if seed < 0 or n_train < 1 or n_test_good < 0 or n_test_defect_per_type < 0 or size < 32:
        raise ValueError(
            f"need seed >= 0, n_train >= 1, n_test_good >= 0, n_test_defect_per_type >= 0, size >= 32; got "
            f"seed={seed}, n_train={n_train}, n_test_good={n_test_good}, "
            f"n_test_defect_per_type={n_test_defect_per_type}, size={size}"
        )
    manifest = {
        "version": VERSION,
        "seed": seed,
        "categories": list(categories),
        "n_train": n_train,
        "n_test_good": n_test_good,
        "n_test_defect_per_type": n_test_defect_per_type,
        "size": size,
    }
    existing = _read_manifest(path)
    if existing == manifest:
        return path
    if existing is None and path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise DatasetError(
            f"refusing to write a synthetic dataset into {path}: it exists and has no {MANIFEST}"
        )

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would make the published dataset private
        for category in categories:
            _write_category(
                tmp / category, seed, category, n_train, n_test_good, n_test_defect_per_type, size
            )
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if existing is not None:  # stale synthetic data (other args or version): swap it out
            trash = tmp.with_name(tmp.name + "-old")
            os.rename(path, trash)
            os.rename(tmp, path)
            shutil.rmtree(trash)
        else:
            try:
                os.rename(tmp, path)  # atomic; also replaces an empty directory
            except OSError:
                if _read_manifest(path) != manifest:
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def ensure_synthetic(root: str | Path) -> Path:
    """The dataset at ``root``: kept with whatever arguments made it, else generated with defaults."""
    manifest = _read_manifest(Path(root))
    args = {k: v for k, v in (manifest or {}).items() if k != "version"}
    return generate_synthetic(root, **args)


def list_categories(root: str | Path) -> list[str]:
    return mvtec.list_categories(ensure_synthetic(root))


def load_split(root: str | Path, category: str) -> CategorySplit:
    return replace(mvtec.load_split(ensure_synthetic(root), category), dataset="synthetic")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="dataset root to create")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(generate_synthetic(args.out, seed=args.seed))


if __name__ == "__main__":
    main()
