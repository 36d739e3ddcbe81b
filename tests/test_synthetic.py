"""Synthetic dataset: byte-identical, idempotent, atomic, exact masks, readable as a format."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from anomaly_core.data import DatasetError, list_categories, load_split, read_mask, synthetic
from anomaly_core.data.synthetic import DEFECT_TYPES, MANIFEST, generate_synthetic

SMALL = dict(n_train=2, n_test_good=1, n_test_defect_per_type=1, size=96)


def digests(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def default_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One default-sized dataset shared by the read-only tests (generation takes seconds)."""
    return generate_synthetic(tmp_path_factory.mktemp("syn") / "data")


def test_same_args_give_identical_bytes(tmp_path: Path) -> None:
    a = digests(generate_synthetic(tmp_path / "a", seed=3, **SMALL))
    b = digests(generate_synthetic(tmp_path / "b", seed=3, **SMALL))
    assert a == b and len(a) == 1 + 3 * (2 + 1 + 4 + 4)  # manifest + per category images and masks
    c = digests(generate_synthetic(tmp_path / "c", seed=4, **SMALL))
    assert set(c) == set(a) and c != a


def test_default_layout_and_masks(default_root: Path) -> None:
    assert json.loads((default_root / MANIFEST).read_text())["seed"] == 0
    assert list_categories("synthetic", default_root) == ["grain", "tiles", "weave"]
    for category in ("grain", "tiles", "weave"):
        split = load_split("synthetic", default_root, category)
        assert split.dataset == "synthetic" and len(split.train) == 24 and len(split.test) == 6 + 4 * 4
        assert [s.image_path for s in split.train][:2] == [
            str(default_root / category / "train/good/000.png"),
            str(default_root / category / "train/good/001.png"),
        ]
        assert sorted({s.defect_type for s in split.test}) == sorted((*DEFECT_TYPES, "good"))
        for s in split.test:
            assert (s.label == 1) == (s.mask_path is not None)
            if s.mask_path:
                fraction = read_mask(s.mask_path).mean()
                assert 0.004 < fraction < 0.06, (s.mask_path, fraction)


@pytest.mark.parametrize("category", ["weave", "grain", "tiles"])
@pytest.mark.parametrize("defect", DEFECT_TYPES)
def test_mask_is_exactly_the_changed_pixels(category: str, defect: str) -> None:
    image, mask = synthetic._defect_image(synthetic._rng(0, category, defect, 0), category, defect, 128)
    clean = synthetic._normal_image(synthetic._rng(0, category, defect, 0), category, 128)
    assert mask.any() and np.array_equal(mask, (image != clean).any(axis=2))


def test_second_call_is_a_no_op(default_root: Path) -> None:
    before = {p: p.stat().st_mtime_ns for p in default_root.rglob("*")}
    assert generate_synthetic(default_root) == default_root
    load_split("synthetic", default_root, "weave")
    assert {p: p.stat().st_mtime_ns for p in default_root.rglob("*")} == before


def test_synthetic_format_keeps_existing_args(tmp_path: Path) -> None:
    root = generate_synthetic(tmp_path / "d", seed=5, categories=("tiles",), **SMALL)
    before = digests(root)
    assert list_categories("synthetic", root) == ["tiles"]  # not regenerated with defaults
    assert len(load_split("synthetic", root, "tiles").train) == 2
    assert digests(root) == before


def test_other_args_replace_an_older_synthetic_dataset(tmp_path: Path) -> None:
    root = generate_synthetic(tmp_path / "d", categories=("weave", "grain"), **SMALL)
    generate_synthetic(root, categories=("tiles",), **SMALL)
    assert sorted(p.name for p in root.iterdir()) == [MANIFEST, "tiles"]
    assert [p.name for p in tmp_path.iterdir()] == ["d"]  # no temp or trash directories left


def test_killed_generation_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def dies_on_second_category(dest: Path, *args: object) -> None:
        calls.append(dest)
        if len(calls) == 2:
            raise KeyboardInterrupt
        original(dest, *args)

    original = synthetic._write_category
    monkeypatch.setattr(synthetic, "_write_category", dies_on_second_category)
    with pytest.raises(KeyboardInterrupt):
        generate_synthetic(tmp_path / "d", **SMALL)
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite_other_data(tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("precious")
    with pytest.raises(DatasetError, match="refusing") as info:
        generate_synthetic(tmp_path, **SMALL)
    assert str(tmp_path) in str(info.value) and (tmp_path / "mine.txt").read_text() == "precious"
    (tmp_path / "empty").mkdir()
    assert (generate_synthetic(tmp_path / "empty", **SMALL) / MANIFEST).is_file()


def test_invalid_args() -> None:
    with pytest.raises(ValueError, match="marble"):
        generate_synthetic("/nonexistent/x", categories=("marble",))
    with pytest.raises(ValueError, match="n_train=0"):
        generate_synthetic("/nonexistent/x", n_train=0)


def test_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    seen = {}
    monkeypatch.setattr(
        synthetic, "generate_synthetic", lambda out, seed: seen.update(out=out, seed=seed) or out
    )
    synthetic.main(["--out", "some/dir", "--seed", "7"])
    assert seen == {"out": "some/dir", "seed": 7} and capsys.readouterr().out.strip() == "some/dir"
