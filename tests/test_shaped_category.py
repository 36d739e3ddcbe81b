"""The MVTec-AD-shaped benchmark data (benchmarks/shaped_category.py): MVTec AD's counts, sizes and
layout, readable by the mvtec reader, and the same bytes for any number of worker processes."""

from __future__ import annotations

import sys

import pytest
from PIL import Image

from anomaly_core.data import list_categories, load_split, read_mask

from .conftest import REPO, TIRE_ROOT

sys.path.insert(0, str(REPO / "benchmarks"))
from shaped_category import make_mvtec_shaped, mvtec_counts  # noqa: E402

# (train, test) images per category as the released MVTec AD folders hold them.
RELEASED = {"bottle": (209, 83), "cable": (224, 150), "capsule": (219, 132), "carpet": (280, 117), "grid": (264, 78),
            "hazelnut": (391, 110), "leather": (245, 124), "metal_nut": (220, 115), "pill": (267, 167),
            "screw": (320, 160), "tile": (230, 117), "toothbrush": (60, 42), "transistor": (213, 100),
            "wood": (247, 79), "zipper": (240, 151)}


def test_counts_are_mvtec_ads_and_a_small_scale_keeps_both_labels():
    full = mvtec_counts()
    assert {name: (train, sum(folders.values())) for name, (train, folders) in full.items()} == RELEASED
    assert sum(train for train, _ in full.values()) == 3629 and sum(sum(f.values()) for _, f in full.values()) == 1725
    assert sum(folders["good"] for _, folders in full.values()) == 467
    assert len({d for _, folders in full.values() for d in folders} - {"good"}) > 40 and len(full["cable"][1]) == 9
    tiny = mvtec_counts(0.001)
    for train, folders in tiny.values():
        assert train == 2 and folders["good"] == 1 and sum(folders.values()) == 2  # one defect image, one folder
    assert mvtec_counts(0.02, ["metal_nut"]) == {"metal_nut": (4, {"good": 1, "bent": 1, "flip": 1})}  # largest remainders
    with pytest.raises(ValueError, match="scale"):
        mvtec_counts(0)
    with pytest.raises(ValueError, match="'bottel'"):
        mvtec_counts(0.1, ["bottel"])


def _tree(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_tiny_mvtec_shaped_layout_sizes_and_same_bytes_for_any_worker_count(tmp_path):
    one = make_mvtec_shaped(TIRE_ROOT, tmp_path / "one", scale=0.02, workers=1, categories=["metal_nut", "grid"])
    assert list_categories("mvtec", one) == ["grid", "metal_nut"]
    counts = mvtec_counts(0.02, ["metal_nut", "grid"])
    for name, side, mode in (("metal_nut", 700, "RGB"), ("grid", 1024, "L")):  # grid is single-channel in MVTec AD
        split = load_split("mvtec", one, name)
        train, folders = counts[name]
        assert len(split.train) == train
        assert {d: sum(s.defect_type == d for s in split.test) for d in folders} == folders
        for sample in split.train + split.test:
            with Image.open(sample.image_path) as image:
                assert (image.size, image.mode) == ((side, side), mode)
        for sample in split.test:
            if sample.label:
                mask = read_mask(sample.mask_path)
                assert mask.shape == (side, side) and 0 < mask.mean() < 0.5  # the tire defect, resized
    first = one / "metal_nut" / "train" / "good" / "000.png"
    stamp = first.stat().st_mtime_ns
    assert make_mvtec_shaped(TIRE_ROOT, one, scale=0.02, categories=["metal_nut", "grid"]) == one  # reused
    assert first.stat().st_mtime_ns == stamp
    two = make_mvtec_shaped(TIRE_ROOT, tmp_path / "two", scale=0.02, workers=2, categories=["metal_nut", "grid"])
    assert _tree(one) == _tree(two)
