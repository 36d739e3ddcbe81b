"""Dataset readers: exact sample lists for tiny fake trees of each layout, and error messages."""

from __future__ import annotations

import pathlib
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomaly_core.data import (
    DATASET_FORMATS,
    DatasetError,
    ImageTransform,
    Sample,
    list_categories,
    load_split,
    read_mask,
    read_rgb,
)
from anomaly_core.data.checks import check_split
from anomaly_core.data.images import MAX_MASK_LEVELS, mask_values
from anomaly_core.extraction import ExtractionSettings, PatchFeatureExtractor
from anomaly_core.patchcore import build_bank, evaluate
from anomaly_core.scoring import NearestNeighbourScorer, Predictions, ScoringParams, predict
from anomaly_core.data import load_mask

TIRE = Path(__file__).parent.parent / "data/tire_small"


def img(path: Path, value: int = 128) -> Path:
    """A tiny image (format from the extension); masks get value 255 so they are non-empty."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (6, 4), (value, value, value)).save(path)
    return path


def touch(root: Path, *rel: str) -> None:
    for r in rel:
        img(root / r, 255 if "mask" in r or "ground_truth" in r or "/gt/" in r else 128)


def summary(root: Path, samples: tuple[Sample, ...]) -> list[tuple]:
    return [
        (
            Path(s.image_path).relative_to(root).as_posix(),
            s.label,
            s.defect_type,
            s.mask_path and Path(s.mask_path).relative_to(root).as_posix(),
            s.split,
        )
        for s in samples
    ]


@contextmanager
def raises_naming(*parts: Path | str) -> Iterator[None]:
    """Expect a DatasetError whose message contains every part (paths and what is wrong)."""
    with pytest.raises(DatasetError) as info:
        yield
    for part in parts:
        assert str(part) in str(info.value)


@pytest.fixture
def mvtec_root(tmp_path: Path) -> Path:
    # Created in non-sorted order; hidden and non-image files must be skipped.
    touch(
        tmp_path,
        "bottle/train/good/b.png",
        "bottle/train/good/a.png",
        "bottle/train/good/c.PNG",
        "bottle/train/good/._a.png",
        "bottle/test/scratch/000.png",
        "bottle/ground_truth/scratch/000_mask.png",
        "bottle/test/good/x.png",
        "bottle/test/crack/001.png",
        "bottle/test/crack/000.png",
        "bottle/ground_truth/crack/001_mask.png",
        "bottle/ground_truth/crack/000_mask.png",
        "cable/train/good/0.jpg",
    )
    (tmp_path / "bottle/train/good/notes.txt").write_text("not an image")
    (tmp_path / "license.txt").write_text("x")
    (tmp_path / "docs").mkdir()  # no train/: not a category
    return tmp_path


def test_registry_lists_all_formats() -> None:
    assert set(DATASET_FORMATS) == {"mvtec", "mvtec3d", "mvtec_loco", "autovi", "visa", "btad", "folder", "synthetic"}


def test_mvtec_exact_samples(mvtec_root: Path) -> None:
    assert list_categories("mvtec", mvtec_root) == ["bottle", "cable"]
    split = load_split("mvtec", mvtec_root, "bottle")
    assert (split.dataset, split.category) == ("mvtec", "bottle")
    assert summary(mvtec_root, split.train) == [
        ("bottle/train/good/a.png", 0, "good", None, "train"),
        ("bottle/train/good/b.png", 0, "good", None, "train"),
        ("bottle/train/good/c.PNG", 0, "good", None, "train"),
    ]
    gt = "bottle/ground_truth"
    assert summary(mvtec_root, split.test) == [
        ("bottle/test/crack/000.png", 1, "crack", f"{gt}/crack/000_mask.png", "test"),
        ("bottle/test/crack/001.png", 1, "crack", f"{gt}/crack/001_mask.png", "test"),
        ("bottle/test/good/x.png", 0, "good", None, "test"),
        ("bottle/test/scratch/000.png", 1, "scratch", f"{gt}/scratch/000_mask.png", "test"),
    ]
    assert all(Path(s.image_path).is_absolute() and s.category == "bottle" for s in split.test)
    assert split.has_pixel_masks


def test_order_does_not_depend_on_listing_order(mvtec_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    expected = load_split("mvtec", mvtec_root, "bottle")
    original = pathlib.Path.iterdir
    monkeypatch.setattr(pathlib.Path, "iterdir", lambda self: iter(sorted(original(self), reverse=True)))
    assert load_split("mvtec", mvtec_root, "bottle") == expected


def test_relative_root_gives_absolute_paths(mvtec_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(mvtec_root.parent)
    split = load_split("mvtec", mvtec_root.name, "cable")
    assert split.train[0].image_path == str(mvtec_root / "cable/train/good/0.jpg")
    assert split.test == ()  # no test/ directory: empty test set, allowed


def test_unknown_format_and_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"unknown dataset format 'mvtek'.*mvtec"):
        load_split("mvtek", tmp_path, "x")
    missing = tmp_path / "nope"
    for fmt in ("mvtec", "mvtec3d", "visa", "btad", "folder"):
        with raises_naming(missing, "does not exist"):
            list_categories(fmt, missing)
        with raises_naming(missing):
            load_split(fmt, missing, "x")


def test_mvtec_errors(mvtec_root: Path) -> None:
    with pytest.raises(DatasetError, match=r"unknown category 'toothbrush'.*available: bottle, cable"):
        load_split("mvtec", mvtec_root, "toothbrush")
    with raises_naming(mvtec_root / "docs/train/good", "missing image directory"):
        (mvtec_root / "docs/train").mkdir()  # now a category, but without train/good
        load_split("mvtec", mvtec_root, "docs")
    (mvtec_root / "docs/train/good").mkdir()
    with raises_naming(mvtec_root, "empty train set"):
        load_split("mvtec", mvtec_root, "docs")
    (mvtec_root / "bottle/ground_truth/crack/001_mask.png").unlink()
    expected = mvtec_root / "bottle/ground_truth/crack/001_mask.png"
    with raises_naming(mvtec_root / "bottle/test/crack/001.png", str(expected)):
        load_split("mvtec", mvtec_root, "bottle")
    img(mvtec_root / "bottle/ground_truth/crack/001_mask.png")
    img(mvtec_root / "bottle/ground_truth/crack/001_mask.bmp")
    with pytest.raises(DatasetError, match=r"ambiguous masks for image '001'.*001_mask"):
        load_split("mvtec", mvtec_root, "bottle")


def test_empty_root_has_no_categories(tmp_path: Path) -> None:
    with raises_naming(tmp_path, "no category directories"):
        list_categories("mvtec", tmp_path)


def test_mvtec3d_rgb_only(tmp_path: Path) -> None:
    touch(
        tmp_path,
        "bagel/train/good/rgb/001.png",
        "bagel/train/good/rgb/000.png",
        "bagel/train/good/xyz/000.tiff",
        "bagel/validation/good/rgb/000.png",
        "bagel/test/good/rgb/000.png",
        "bagel/test/crack/rgb/000.png",
        "bagel/test/crack/gt/000.png",
        "bagel/test/crack/xyz/000.tiff",
    )
    assert list_categories("mvtec3d", tmp_path) == ["bagel"]
    split = load_split("mvtec3d", tmp_path, "bagel")
    assert summary(tmp_path, split.train + split.test) == [
        ("bagel/train/good/rgb/000.png", 0, "good", None, "train"),
        ("bagel/train/good/rgb/001.png", 0, "good", None, "train"),
        ("bagel/test/crack/rgb/000.png", 1, "crack", "bagel/test/crack/gt/000.png", "test"),
        ("bagel/test/good/rgb/000.png", 0, "good", None, "test"),
    ]
    (tmp_path / "bagel/test/crack/gt/000.png").unlink()
    with raises_naming(tmp_path / "bagel/test/crack/gt/000.png", "missing mask"):
        load_split("mvtec3d", tmp_path, "bagel")


def test_btad_ok_ko_and_mixed_mask_extensions(tmp_path: Path) -> None:
    touch(
        tmp_path,
        "02/train/ok/0000.png",
        "01/train/ok/0001.bmp",
        "01/train/ok/0000.bmp",
        "01/test/ok/0000.bmp",
        "01/test/ko/0000.bmp",
        "01/test/ko/0001.bmp",
        "01/ground_truth/ko/0000.png",
        "01/ground_truth/ko/0001.bmp",
    )
    assert list_categories("btad", tmp_path) == ["01", "02"]
    split = load_split("btad", tmp_path, "01")
    assert summary(tmp_path, split.train + split.test) == [
        ("01/train/ok/0000.bmp", 0, "good", None, "train"),
        ("01/train/ok/0001.bmp", 0, "good", None, "train"),
        ("01/test/ko/0000.bmp", 1, "ko", "01/ground_truth/ko/0000.png", "test"),
        ("01/test/ko/0001.bmp", 1, "ko", "01/ground_truth/ko/0001.bmp", "test"),
        ("01/test/ok/0000.bmp", 0, "good", None, "test"),
    ]
    (tmp_path / "01/ground_truth/ko/0001.bmp").unlink()
    with raises_naming(tmp_path / "01/test/ko/0001.bmp", "missing mask"):
        load_split("btad", tmp_path, "01")


def test_folder_masks_optional(tmp_path: Path) -> None:
    touch(
        tmp_path,
        "parts/train/good/a.jpg",
        "parts/test/good/a.jpg",
        "parts/test/dent/1.png",
        "parts/ground_truth/dent/1_mask.png",
        "parts/test/dent/2.png",
        "parts/ground_truth/dent/2.png",
        "parts/test/dent/3.png",
    )
    split = load_split("folder", tmp_path, "parts")
    assert split.dataset == "folder"
    assert summary(tmp_path, split.test) == [
        ("parts/test/dent/1.png", 1, "dent", "parts/ground_truth/dent/1_mask.png", "test"),
        ("parts/test/dent/2.png", 1, "dent", "parts/ground_truth/dent/2.png", "test"),
        ("parts/test/dent/3.png", 1, "dent", None, "test"),
        ("parts/test/good/a.jpg", 0, "good", None, "test"),
    ]
    assert not split.has_pixel_masks
    # The same tree is not valid MVTec AD: there, masks are required.
    with raises_naming(tmp_path / "parts/test/dent/2.png", "missing mask"):
        load_split("mvtec", tmp_path, "parts")


VISA_HEADER = "object,split,label,image,mask\n"


def visa_tree(root: Path, rows: str) -> Path:
    touch(
        root,
        "candle/Data/Images/Normal/0001.JPG",
        "candle/Data/Images/Normal/0000.JPG",
        "candle/Data/Images/Anomaly/000.JPG",
        "candle/Data/Masks/Anomaly/000.png",
        "pcb1/Data/Images/Normal/0000.JPG",
    )
    (root / "split_csv").mkdir(exist_ok=True)
    (root / "split_csv/1cls.csv").write_text(VISA_HEADER + rows)
    return root / "split_csv/1cls.csv"


VISA_ROWS = (
    "pcb1,train,normal,pcb1/Data/Images/Normal/0000.JPG,\n"
    "candle,train,normal,candle/Data/Images/Normal/0001.JPG,\n"
    "candle,test,anomaly,candle/Data/Images/Anomaly/000.JPG,candle/Data/Masks/Anomaly/000.png\n"
    "candle,train,normal,candle/Data/Images/Normal/0000.JPG,\n"
)


def test_visa_exact_samples(tmp_path: Path) -> None:
    visa_tree(tmp_path, VISA_ROWS)
    assert list_categories("visa", tmp_path) == ["candle", "pcb1"]
    split = load_split("visa", tmp_path, "candle")
    assert summary(tmp_path, split.train + split.test) == [
        ("candle/Data/Images/Normal/0000.JPG", 0, "good", None, "train"),
        ("candle/Data/Images/Normal/0001.JPG", 0, "good", None, "train"),
        ("candle/Data/Images/Anomaly/000.JPG", 1, "anomaly", "candle/Data/Masks/Anomaly/000.png", "test"),
    ]


@pytest.mark.parametrize(
    "row, message",
    [
        ("candle,test,anomaly,candle/Data/Images/Anomaly/000.JPG,\n", "has no mask"),
        ("candle,test,anomaly,candle/Data/Images/Anomaly/000.JPG,candle/nope.png\n", "mask file not found"),
        ("candle,test,normal,candle/missing.JPG,\n", "image file not found"),
        ("candle,test,broken,candle/Data/Images/Normal/0000.JPG,\n", "label must be"),
        ("candle,val,normal,candle/Data/Images/Normal/0000.JPG,\n", "split must be"),
        (
            "candle,train,anomaly,candle/Data/Images/Anomaly/000.JPG,candle/Data/Masks/Anomaly/000.png\n",
            "train split",
        ),
    ],
)
def test_visa_row_errors_name_the_csv_line(tmp_path: Path, row: str, message: str) -> None:
    csv = visa_tree(tmp_path, VISA_ROWS + row)
    with raises_naming(f"{csv}:6", message):  # header is line 1, the bad row line 6
        load_split("visa", tmp_path, "candle")


def test_visa_duplicate_rows(tmp_path: Path) -> None:
    csv = visa_tree(tmp_path, VISA_ROWS + "candle,test,normal,candle/Data/Images/Normal/0000.JPG,\n")
    with raises_naming(csv, "listed more than once", tmp_path / "candle/Data/Images/Normal/0000.JPG"):
        load_split("visa", tmp_path, "candle")


def test_visa_file_errors(tmp_path: Path) -> None:
    with raises_naming(tmp_path / "split_csv/1cls.csv", "missing VisA split file"):
        list_categories("visa", tmp_path)
    csv = visa_tree(tmp_path, VISA_ROWS)
    with pytest.raises(DatasetError, match=r"unknown category 'fryum'.*available: candle, pcb1"):
        load_split("visa", tmp_path, "fryum")
    csv.write_text("object,split,image\ncandle,train,x.png\n")
    with raises_naming(csv, "missing columns ['label', 'mask']"):
        load_split("visa", tmp_path, "candle")


def test_bundled_tire_small() -> None:
    assert list_categories("mvtec", TIRE) == ["tire"]
    split = load_split("mvtec", TIRE, "tire")
    assert len(split.train) == 34 and len(split.test) == 28
    assert [s.label for s in split.train] == [0] * 34
    good = [s for s in split.test if s.label == 0]
    bad = [s for s in split.test if s.label == 1]
    assert len(good) == 8 and all(s.defect_type == "good" and s.mask_path is None for s in good)
    assert len(bad) == 20
    assert sorted({s.defect_type for s in bad}) == ["combined", "contamination", "cut", "hole"]
    for s in bad:
        assert s.mask_path is not None and Path(s.mask_path).is_file()
        mask = read_mask(s.mask_path)
        assert mask.any() and mask.shape == read_rgb(s.image_path).shape[:2]
    assert [s.image_path for s in split.test] == sorted(s.image_path for s in split.test)


def visa_from_tire(root: Path, instance_ids: bool) -> tuple[Path, int]:
    """A VisA-layout tree of tire_small (6 train, 4 good and all 20 anomalous test images), as anomalib reads VisA.

    With ``instance_ids`` each mask numbers its anomalous pixels 1..n in n raster-order runs, n cycling through 4..12
    (VisA numbers each defect region; up to 12 here); without, the same masks are 0/255. Returns the split CSV
    and how many masks hold more than 8 values (the count the old reader refused).
    """
    split = load_split("mvtec", TIRE, "tire")
    rows, many = [], 0
    normal = [("train", s) for s in split.train[:6]] + [("test", s) for s in split.test if s.label == 0][:4]
    for i, (part, sample) in enumerate(normal):
        rel = f"tire/Data/Images/Normal/{i:04d}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(sample.image_path, root / rel)
        rows.append(f"tire,{part},normal,{rel},\n")
    for i, sample in enumerate(s for s in split.test if s.label == 1):
        image, mask_rel = f"tire/Data/Images/Anomaly/{i:03d}.png", f"tire/Data/Masks/Anomaly/{i:03d}.png"
        (root / image).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(sample.image_path, root / image)
        binary = read_mask(sample.mask_path)
        coded = np.zeros(binary.shape, np.uint8)
        if instance_ids:
            n_ids = 4 + i % 9
            coded[binary] = 1 + np.arange(binary.sum()) * n_ids // binary.sum()  # runs of equal length, ids 1..n
            many += n_ids > MAX_MASK_LEVELS
        else:
            coded[binary] = 255
        (root / mask_rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(coded).save(root / mask_rel)
        rows.append(f"tire,test,anomaly,{image},{mask_rel}\n")
    (root / "split_csv").mkdir()
    (root / "split_csv/1cls.csv").write_text(VISA_HEADER + "".join(rows))
    return root / "split_csv/1cls.csv", many


def test_visa_instance_masks_read_as_their_binarised_masks(tmp_path: Path) -> None:
    """VisA's masks number their defect regions (up to 12 values here): every file reads (the old 8-level refusal
    stopped the run on 8 of them), and a PatchCore run scores exactly as on the same tree with 0/255 masks."""
    _, many = visa_from_tire(tmp_path / "ids", instance_ids=True)
    visa_from_tire(tmp_path / "binary", instance_ids=False)
    ids, binary = (load_split("visa", tmp_path / name, "tire") for name in ("ids", "binary"))
    assert [s.mask_rule for s in ids.test] == ["nonzero" if s.label else "levels" for s in ids.test] and len(ids.test) == 24
    values = [np.unique(mask_values(s.mask_path)) for s in ids.test if s.label]
    assert max(len(v) for v in values) == 13 and many == 8  # 0 and ids 1..12; 8 masks hold more than 8 ids
    check_split(ids, str(tmp_path / "ids"), need_test=True)  # decodes every mask: none refused
    as_levels = replace(ids, test=tuple(replace(s, mask_rule="levels") for s in ids.test))
    with pytest.raises(DatasetError, match=f"{many} unusable file"):  # what the reader did before
        check_split(as_levels, str(tmp_path / "ids"), need_test=True)
    for coded, plain in zip(ids.test, binary.test):
        if coded.label:
            assert np.array_equal(read_mask(coded.mask_path, "nonzero"), read_mask(plain.mask_path))

    extractor = PatchFeatureExtractor(ExtractionSettings("tf_efficientnet_lite0", ("blocks.2", "blocks.4"), "package",
                                                         resize=128, crop=112))
    bank = build_bank(extractor.extract(ids.train, range(6)), "approximate", 0.1, 128, seed=0,
                      metadata=extractor.describe())
    predictions = predict(NearestNeighbourScorer(bank.features, ScoringParams()),
                          extractor.extract(ids.test, range(24)), 112)
    on_ids = evaluate(ids.test, predictions, extractor.transform, 0.3)
    on_binary = evaluate(binary.test, predictions, extractor.transform, 0.3)  # byte-identical images
    assert on_ids.values == on_binary.values and on_ids.notes == on_binary.notes
    assert 0.5 < on_ids.values["aupro"] < 1.0 and 0.9 < on_ids.values["pixel_auroc"] < 1.0


# Where each format keeps the tire images: (train, normal test, anomalous test, its mask) as format strings of the
# category folder and the file stem; the MVTec 3D-AD one also has the all-zero gt/ of its good test images.
AUTHOR_LAYOUTS = {
    "btad": ("train/ok/{}.png", "test/ok/{}.png", "test/ko/{}.png", "ground_truth/ko/{}.{}"),
    "mvtec3d": ("train/good/rgb/{}.png", "test/good/rgb/{}.png", "test/cut/rgb/{}.png", "test/cut/gt/{}.{}"),
}


def authors_tree(root: Path, fmt: str, dirty: bool) -> int:
    """tire_small (6 train, 4 good and all 20 anomalous test images) in ``fmt``'s layout; returns how many of its
    masks the old reader refused as not binary.

    Clean masks are the real 0/255 ones. Dirty ones carry what the format's authors read away: BTAD masks a grey
    fringe of values 1..254 around each defect (some masks are BMP, as in BTAD), which anomalib's ``== 255`` drops;
    MVTec 3D-AD masks their defect pixels at 1..255 (many levels), which MVTec's ``> 0`` reads as the same pixels.
    """
    split = load_split("mvtec", TIRE, "tire")
    train, good, bad, mask_name = AUTHOR_LAYOUTS[fmt]
    cat = root / "tire"
    normal = [(train, s) for s in split.train[:6]] + [(good, s) for s in split.test if s.label == 0][:4]
    anomalous = [(bad, s) for s in split.test if s.label == 1]
    refused = 0
    for i, (where, sample) in enumerate(normal + anomalous):
        (cat / where.format(f"{i:03d}")).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(sample.image_path, cat / where.format(f"{i:03d}"))
        if sample.label == 0 and where == good and fmt == "mvtec3d":
            img(cat / f"test/good/gt/{i:03d}.png", 0)
        if sample.label == 0:
            continue
        binary = read_mask(sample.mask_path)
        values = np.where(binary, 255, 0).astype(np.uint8)
        if dirty and fmt == "btad":
            rows, cols = np.indices(binary.shape)
            ring = ~binary
            for dr, dc in ((-2, 0), (2, 0), (0, -2), (0, 2), (-1, -1), (1, 1)):
                ring &= ~np.roll(np.roll(binary, dr, 0), dc, 1)
            fringe = ~binary & ~ring
            values[fringe] = 1 + (rows + 3 * cols)[fringe] % 254
        elif dirty:
            values[binary] = 1 + np.arange(binary.sum()) % 255
        refused += dirty and len(np.unique(values)) - 1 > MAX_MASK_LEVELS
        path = cat / mask_name.format(f"{i:03d}", "bmp" if fmt == "btad" and i % 3 == 0 else "png")
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(values).save(path)
    return refused


@pytest.mark.parametrize("fmt", ["btad", "mvtec3d"])
def test_masks_read_as_their_authors_binarise_them(tmp_path: Path, fmt: str) -> None:
    """BTAD's grey-fringed and MVTec 3D-AD's many-level masks (every one refused before) read as the clean 0/255
    masks, and every metric equals the clean tree's, bit for bit, on the same predictions."""
    refused = authors_tree(tmp_path / "dirty", fmt, dirty=True)
    authors_tree(tmp_path / "clean", fmt, dirty=False)
    dirty, clean = (load_split(fmt, tmp_path / name, "tire") for name in ("dirty", "clean"))
    assert len(dirty.test) == 24 and refused == 20
    check_split(dirty, str(tmp_path / "dirty"), need_test=True)  # decodes every mask: none refused
    as_levels = replace(dirty, test=tuple(replace(s, mask_rule="levels") for s in dirty.test))
    with pytest.raises(DatasetError, match=f"{refused} unusable file"):  # what the reader did before
        check_split(as_levels, str(tmp_path / "dirty"), need_test=True)
    transform = ImageTransform(resize=128, crop=112)
    for a, b in zip(dirty.test, clean.test):
        assert a.label == 0 or not np.array_equal(mask_values(a.mask_path), mask_values(b.mask_path))
        assert np.array_equal(load_mask(a, transform).numpy(), load_mask(b, transform).numpy())
    # Maps that find the clean defects, blurred by seeded noise: metrics between 0.5 and 1, not degenerate.
    rng = np.random.default_rng(0)
    maps = np.stack([load_mask(s, transform).numpy() * 0.5 + rng.random((112, 112)) for s in clean.test])
    predictions = Predictions(maps.max(axis=(1, 2)).astype(np.float64), maps.astype(np.float32), np.arange(24))
    on_dirty = evaluate(dirty.test, predictions, transform, 0.3)
    on_clean = evaluate(clean.test, predictions, transform, 0.3)
    assert on_dirty.values == on_clean.values and on_dirty.notes == on_clean.notes
    assert 0.5 < on_dirty.values["aupro"] < 1.0 and 0.5 < on_dirty.values["pixel_auroc"] < 1.0


def big(path: Path, array: np.ndarray | None = None) -> Path:
    """A 32x32 image (the smallest the pre-work check accepts), or ``array`` (a mask) saved as is."""
    path.parent.mkdir(parents=True, exist_ok=True)
    (Image.new("RGB", (32, 32), (128, 128, 128)) if array is None else Image.fromarray(array)).save(path)
    return path


def test_btad_mask_without_any_255_is_refused(tmp_path: Path) -> None:
    """A BTAD mask whose defect is 1 (a 0/1 mask) would mark nothing as anomalib reads it: one line naming it."""
    big(tmp_path / "01/train/ok/000.png")
    big(tmp_path / "01/test/ko/000.png")
    mask = big(tmp_path / "01/ground_truth/ko/000.png", np.tile(np.array([0, 1], np.uint8), (32, 16)))
    split = load_split("btad", tmp_path, "01")
    with raises_naming(mask, "none at 255"):
        read_mask(mask, "white")
    with pytest.raises(DatasetError, match="1 unusable file"):
        check_split(split, str(tmp_path), need_test=True)
    row = np.resize(np.array([0, 254, 255, 1, 255, 0, 17, 200], np.uint8), 32)
    big(mask, np.tile(row, (32, 1)))
    check_split(split, str(tmp_path), need_test=True)
    assert read_mask(mask, "white").tolist() == [[v == 255 for v in row]] * 32
    assert read_mask(mask).tolist() == [[v > 0 for v in row]] * 32  # "levels": every non-zero pixel


FOLDER_GREY = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (32, 2))  # 15 non-zero levels 16..240, 32x32


def test_folder_refuses_grey_masks_unless_a_mask_threshold_binarises_them(tmp_path: Path) -> None:
    big(tmp_path / "c/train/good/0.png")
    big(tmp_path / "c/test/cut/0.png")
    mask = big(tmp_path / "c/ground_truth/cut/0_mask.png", FOLDER_GREY)
    split = load_split("folder", tmp_path, "c")
    with pytest.raises(DatasetError, match="is not binary.*mask_threshold"):
        check_split(split, str(tmp_path), need_test=True)
    for threshold in (0, 127, 240, 255):
        chosen = load_split("folder", tmp_path, "c", mask_threshold=threshold)
        assert [s.mask_rule for s in chosen.test] == [threshold]
        check_split(chosen, str(tmp_path), need_test=True)
        assert np.array_equal(read_mask(mask, threshold), FOLDER_GREY > threshold)
    assert read_mask(mask, 127).sum() == 32 * 2 * 8  # the 8 levels 128, 144, ..., 240, twice in each row
    with raises_naming("mask_threshold is for the folder format only; btad"):
        load_split("btad", tmp_path, "c", mask_threshold=127)
