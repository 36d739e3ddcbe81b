"""A small deterministic stand-in for Imagenette, for EfficientAD's penalty images where the real folder is absent.

    python benchmarks/penalty_images.py /tmp/imagenette [--count 24]

Writes ``count`` RGB images (smooth random colour fields with stripes, 160 x 120, two class folders as
Imagenette's train/<wnid>/ layout) from a fixed seed: the same files on every machine. They exercise the code
path (listing, resize to twice the crop, grey draws, crop); a real run's penalty needs real natural images.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image


def write_penalty_images(folder: Path, count: int = 24, seed: int = 0) -> Path:
    """``count`` PNGs under ``folder``/n0000000{0,1}/; returns ``folder``."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:120, 0:160] / 40.0
    for index in range(count):
        phases = rng.uniform(0, 2 * np.pi, size=(3, 2))
        freq = rng.uniform(0.5, 3.0, size=3)
        channels = [np.sin(freq[c] * x + phases[c, 0]) * np.cos(freq[c] * y + phases[c, 1]) for c in range(3)]
        pixels = ((np.stack(channels, axis=-1) + 1) * 127.5).astype(np.uint8)
        target = Path(folder) / f"n0000000{index % 2}" / f"{index:04d}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(target)
    return Path(folder)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--count", type=int, default=24)
    args = parser.parse_args()
    if args.count < 1:
        parser.error("--count must be >= 1")
    print(write_penalty_images(args.folder, args.count))
    return 0


if __name__ == "__main__":
    sys.exit(main())
