"""Feature cache: entries round-trip bit-exactly and any change of what features depend on is another key."""

from __future__ import annotations

import os

import numpy as np
import pytest

from anomaly_core.data import load_split
from anomaly_core.feature_cache import FeatureCache, cache_fields, cache_key
from anomaly_core.features import PatchFeatures

from .conftest import TIRE_ROOT

DESCRIPTION = {"backbone": "tf_efficientnet_lite0", "weights": "/w/lite0.pth", "weights_sha256": "ab" * 32,
               "layers": ["blocks.2", "blocks.4"], "resize": 128, "crop": 112, "patch_size": 3, "patch_stride": 1,
               "pretrain_dim": 1024, "feature_dim": 1024, "fp16": False, "batch_size": 4,
               "mean": [0.5] * 3, "std": [0.5] * 3}


@pytest.fixture(scope="module")
def samples():
    return load_split("mvtec", TIRE_ROOT, "tire").train[:6]


def key(samples, description=DESCRIPTION, **changes):
    arguments = {"dataset": "tire_small", "category": "tire", "split": "train", "samples": samples,
                 "augmentation": None, **changes}
    return cache_key(cache_fields(description, **arguments))


@pytest.mark.parametrize("field,value", [("weights_sha256", "cd" * 32), ("layers", ["blocks.2"]), ("resize", 256),
                                         ("crop", 224), ("patch_size", 5), ("patch_stride", 2), ("feature_dim", 512),
                                         ("fp16", True), ("batch_size", 8), ("backbone", "tf_efficientnet_lite1"),
                                         ("mean", [0.485, 0.456, 0.406])])
def test_any_extraction_setting_is_another_key(samples, field, value):
    assert key(samples, {**DESCRIPTION, field: value}) != key(samples)


def test_dataset_category_split_images_and_augmentation_are_keyed(samples):
    base = key(samples)
    assert key(samples) == base  # stable
    assert key(samples, {**DESCRIPTION, "weights": "/moved/lite0.pth"}) == base  # the file's digest counts, not its path
    assert len({base, key(samples, dataset="tire_copy"), key(samples, category="tyre"), key(samples, split="test"),
                key(samples[:5]), key(samples, augmentation={"rotation": 5})}) == 6


def test_an_edited_image_misses(samples, tmp_path):
    copies = []
    for sample in samples[:2]:
        target = tmp_path / os.path.basename(sample.image_path)
        target.write_bytes(open(sample.image_path, "rb").read())
        copies.append(type(sample)(str(target), 0, None, "tire", "good", "train"))
    before = key(copies)
    stat = os.stat(copies[0].image_path)
    os.utime(copies[0].image_path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # re-saved image
    assert key(copies) != before


def test_entries_round_trip_shard_by_shard(tmp_path):
    rng = np.random.default_rng(0)
    parts = [PatchFeatures(rng.normal(size=(n, 49, 16)).astype(np.float32), (7, 7), np.arange(start, start + n))
             for start, n in ((0, 4), (4, 3))]
    cache = FeatureCache(tmp_path / "cache")
    assert "k" * 64 not in cache
    path = cache.save("k" * 64, parts, {"split": "train"})
    assert path == tmp_path / "cache" / "kk" / f"{'k' * 64}.safetensors" and "k" * 64 in cache
    loaded = cache.load("k" * 64)
    assert [part.grid for part in loaded] == [(7, 7), (7, 7)]
    for got, want in zip(loaded, parts):
        assert np.array_equal(got.embeddings, want.embeddings) and np.array_equal(got.sample_indices, want.sample_indices)
    assert not list(path.parent.glob("*.tmp*"))  # written atomically, nothing left beside it
