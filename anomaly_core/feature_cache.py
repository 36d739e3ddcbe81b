"""Extracted patch features kept on disk, so a run that changes only coreset or scoring knobs skips extraction.

An entry is one category split's features (``[n_images, h * w, D]`` in sample-index order) in a
safetensors file named by the sha256 of everything that determines them: the extractor's description
(backbone, layers, weights sha256, image size, embedding, fp16, GPU JPEG decoding, batch size,
normalisation), the dataset, category and split, the image list (path, size and modification time of every image, so an edited
image misses), the augmentation and the package version. Any change of those is another key: an entry
is never reused across one. Files are written atomically, so a reader never sees half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from anomaly_core import __version__
from anomaly_core.bank import atomic_write
from anomaly_core.data import Sample
from anomaly_core.features import PatchFeatures


def image_list_digest(samples: Sequence[Sample]) -> str:
    """sha256 over each image's path, size and mtime (cheap: no image is read)."""
    digest = hashlib.sha256()
    for sample in samples:
        status = os.stat(sample.image_path)
        digest.update(f"{sample.image_path}\0{status.st_size}\0{status.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def cache_fields(description: dict[str, Any], dataset: str, category: str, split: str,
                 samples: Sequence[Sample], augmentation: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything an entry's features depend on; ``cache_key`` hashes it and the entry records it."""
    model = {key: value for key, value in description.items() if key not in ("weights", "device", "pid")}
    return {"extractor": model, "dataset": dataset, "category": category, "split": split,
            "n_images": len(samples), "images_sha256": image_list_digest(samples),
            "augmentation": augmentation or None, "package_version": __version__}


def cache_key(fields: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


class FeatureCache:
    """A folder of entries ``<key[:2]>/<key>.safetensors``; safe to share between runs and nodes."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder).expanduser()

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.safetensors"

    def __contains__(self, key: str) -> bool:
        return self.path(key).is_file()

    def save(self, key: str, parts: Sequence[PatchFeatures], fields: dict[str, Any]) -> Path:
        """Store the split's shards as they are (one tensor pair each): no merged copy of a whole category."""
        if not parts or len({part.grid for part in parts}) != 1:
            raise ValueError("a cache entry needs one or more feature shards on one patch grid")
        tensors = {}
        for position, part in enumerate(parts):
            tensors[f"embeddings.{position}"] = np.ascontiguousarray(part.embeddings)
            tensors[f"sample_indices.{position}"] = np.ascontiguousarray(part.sample_indices, dtype=np.int64)
        metadata = {"fields": json.dumps(fields, sort_keys=True, default=str), "grid": json.dumps(list(parts[0].grid)),
                    "shards": str(len(parts))}
        path = self.path(key)
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
        return path

    def load(self, key: str) -> list[PatchFeatures]:
        """The entry's shards, each read on its own (a category never needs to fit in memory at once)."""
        with safe_open(str(self.path(key)), framework="numpy") as handle:
            metadata = handle.metadata()
            grid = tuple(json.loads(metadata["grid"]))
            return [PatchFeatures(handle.get_tensor(f"embeddings.{i}"), grid, handle.get_tensor(f"sample_indices.{i}"))
                    for i in range(int(metadata["shards"]))]
