"""MVTec LOCO AD and AutoVI readers: mask folders read as unions, their errors, LOCO's metric groups and its sPRO.

Each test builds a small tree of the real layout (64x64 PNGs): the mask of ``test/<type>/<stem>.png`` is the
folder ``ground_truth/<type>/<stem>/`` holding one file per defect, and a LOCO category has its
``defects_config.json`` (pixel value -> defect type and saturation).
"""

from __future__ import annotations

import json
import pathlib
from bisect import bisect
from pathlib import Path

import numpy as np
import pytest
import torchvision.transforms.functional as TF
from PIL import Image

from anomaly_core.data import (
    DATASET_FORMATS,
    DatasetError,
    ImageTransform,
    Sample,
    list_categories,
    load_mask,
    load_split,
    load_validation,
    metric_groups,
    read_mask,
)
from anomaly_core.data.checks import check_split
from anomaly_core.data.defects import defect_regions, load_defects, load_defects_config, read_defects
from anomaly_core.metrics import compute_metrics, group_indices, group_metrics

from .test_data_readers import raises_naming

SIZE = 64
# As the real files: absolute thresholds in pixels, relative ones a fraction of the defect's area. Each 8x8 defect
# (64 px) saturates at 30 px, at 19 px (0.3 of it, truncated) and at 64 px (its area: the threshold exceeds it).
LOCO_DEFECTS = [
    {"defect_name": "missing_juice", "pixel_value": 255, "saturation_threshold": 30, "relative_saturation": False},
    {"defect_name": "wrong_label", "pixel_value": 77, "saturation_threshold": 0.3, "relative_saturation": True},
    {"defect_name": "contamination", "pixel_value": 200, "saturation_threshold": 100, "relative_saturation": False},
]


def png(path: Path, array: np.ndarray | None = None, mode: str = "RGB") -> Path:
    """A 64x64 image: grey noise-free RGB by default, or ``array`` (a mask) saved as is."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new(mode, (SIZE, SIZE), (120, 120, 120)) if array is None else Image.fromarray(array)
    image.save(path)
    return path


def region(top: int, left: int, value: int, size: int = 8, shape: tuple[int, ...] = (SIZE, SIZE)) -> np.ndarray:
    """A mask of one square region of ``value`` (LOCO and AutoVI give each region file one constant value)."""
    mask = np.zeros(shape, np.uint8)
    mask[top : top + size, left : left + size] = value
    return mask


def rel(root: Path, path: str | None) -> str | None:
    return path and Path(path).relative_to(root).as_posix()


def summary(root: Path, samples: tuple[Sample, ...]) -> list[tuple]:
    return [(rel(root, s.image_path), s.label, s.defect_type, rel(root, s.mask_path), s.split) for s in samples]


@pytest.fixture
def loco(tmp_path: Path) -> Path:
    """juice_bottle with both anomaly kinds (one image with two regions), pushpins with train only."""
    cat = tmp_path / "juice_bottle"
    for name in ("train/good/001.png", "train/good/000.png", "validation/good/001.png", "validation/good/000.png",
                 "test/good/001.png", "test/good/000.png", "test/logical_anomalies/001.png",
                 "test/logical_anomalies/000.png", "test/structural_anomalies/000.png"):
        png(cat / name)
    gt = cat / "ground_truth"
    png(gt / "logical_anomalies/000/000.png", region(0, 0, 255))
    png(gt / "logical_anomalies/001/000.png", region(10, 10, 255))
    png(gt / "logical_anomalies/001/001.png", region(14, 14, 77))  # overlaps the first region
    png(gt / "structural_anomalies/000/000.png", region(40, 40, 200))
    (cat / "defects_config.json").write_text(json.dumps(LOCO_DEFECTS))
    png(tmp_path / "pushpins/train/good/000.png")
    (tmp_path / "license.txt").write_text("CC BY-NC-SA 4.0")
    return tmp_path


@pytest.fixture
def autovi(tmp_path: Path) -> Path:
    """pipe_clip with two defect types, AutoVI's four-digit names and RGB masks; tank_screw with train only."""
    cat = tmp_path / "pipe_clip"
    for name in ("train/good/0001.png", "train/good/0000.png", "test/good/0000.png",
                 "test/operator_wrong/0089.png", "test/unclipped/0003.png", "test/unclipped/0002.png"):
        png(cat / name)
    rgb = (SIZE, SIZE, 3)
    png(cat / "ground_truth/operator_wrong/0089/0000.png", region(0, 0, 255, shape=rgb))
    png(cat / "ground_truth/unclipped/0002/0000.png", region(8, 8, 255, shape=rgb))
    png(cat / "ground_truth/unclipped/0003/0000.png", region(30, 30, 255, shape=rgb))
    png(cat / "ground_truth/unclipped/0003/0001.png", region(50, 50, 128, shape=rgb))
    (cat / "defects_config.json").write_text("[]")
    png(tmp_path / "tank_screw/train/good/0000.png")
    return tmp_path



def test_registered() -> None:
    assert {"mvtec_loco", "autovi"} <= set(DATASET_FORMATS)


def test_loco_exact_samples(loco: Path) -> None:
    assert list_categories("mvtec_loco", loco) == ["juice_bottle", "pushpins"]
    split = load_split("mvtec_loco", loco, "juice_bottle")
    assert (split.dataset, split.category) == ("mvtec_loco", "juice_bottle")
    assert summary(loco, split.train) == [  # validation/good stays out of train
        ("juice_bottle/train/good/000.png", 0, "good", None, "train"),
        ("juice_bottle/train/good/001.png", 0, "good", None, "train"),
    ]
    gt = "juice_bottle/ground_truth"
    assert summary(loco, split.test) == [
        ("juice_bottle/test/good/000.png", 0, "good", None, "test"),
        ("juice_bottle/test/good/001.png", 0, "good", None, "test"),
        ("juice_bottle/test/logical_anomalies/000.png", 1, "logical_anomalies", f"{gt}/logical_anomalies/000", "test"),
        ("juice_bottle/test/logical_anomalies/001.png", 1, "logical_anomalies", f"{gt}/logical_anomalies/001", "test"),
        ("juice_bottle/test/structural_anomalies/000.png", 1, "structural_anomalies",
         f"{gt}/structural_anomalies/000", "test"),
    ]
    assert split.has_pixel_masks and all(Path(s.mask_path).is_dir() for s in split.test if s.label)
    assert load_split("mvtec_loco", loco, "pushpins").test == ()


def test_loco_order_does_not_depend_on_listing_order(loco: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    expected = load_split("mvtec_loco", loco, "juice_bottle")
    original = pathlib.Path.iterdir
    monkeypatch.setattr(pathlib.Path, "iterdir", lambda self: iter(sorted(original(self), reverse=True)))
    assert load_split("mvtec_loco", loco, "juice_bottle") == expected


def test_loco_validation_images(loco: Path) -> None:
    assert summary(loco, load_validation("mvtec_loco", loco, "juice_bottle")) == [
        ("juice_bottle/validation/good/000.png", 0, "good", None, "validation"),
        ("juice_bottle/validation/good/001.png", 0, "good", None, "validation"),
    ]
    with raises_naming(loco / "pushpins/validation/good", "missing image directory"):
        load_validation("mvtec_loco", loco, "pushpins")
    assert load_validation("autovi", loco, "juice_bottle") == ()  # formats without their own validation images


def test_autovi_exact_samples(autovi: Path) -> None:
    assert list_categories("autovi", autovi) == ["pipe_clip", "tank_screw"]
    split = load_split("autovi", autovi, "pipe_clip")
    gt = "pipe_clip/ground_truth"
    assert summary(autovi, split.train + split.test) == [
        ("pipe_clip/train/good/0000.png", 0, "good", None, "train"),
        ("pipe_clip/train/good/0001.png", 0, "good", None, "train"),
        ("pipe_clip/test/good/0000.png", 0, "good", None, "test"),
        ("pipe_clip/test/operator_wrong/0089.png", 1, "operator_wrong", f"{gt}/operator_wrong/0089", "test"),
        ("pipe_clip/test/unclipped/0002.png", 1, "unclipped", f"{gt}/unclipped/0002", "test"),
        ("pipe_clip/test/unclipped/0003.png", 1, "unclipped", f"{gt}/unclipped/0003", "test"),
    ]
    assert metric_groups("autovi") == {} and metric_groups("mvtec") == {}
    union = read_mask(autovi / gt / "unclipped/0003")  # two RGB region files
    assert union.sum() == 2 * 64 and union[30, 30] and union[57, 57] and not union[45, 45]


def test_mask_folder_is_the_union_of_its_files(loco: Path) -> None:
    folder = loco / "juice_bottle/ground_truth/logical_anomalies/001"
    expected = (region(10, 10, 255) > 0) | (region(14, 14, 77) > 0)
    union = read_mask(folder)
    assert union.dtype == bool and np.array_equal(union, expected) and union.sum() == 64 + 64 - 16
    sample = next(s for s in load_split("mvtec_loco", loco, "juice_bottle").test if s.mask_path == str(folder))
    transform = ImageTransform(resize=SIZE, crop=SIZE)
    assert np.array_equal(load_mask(sample, transform).numpy(), expected)
    assert np.array_equal(read_mask(folder / "000.png"), region(10, 10, 255) > 0)  # one file: unchanged


def test_wrong_size_mask_file_is_named(loco: Path) -> None:
    split = load_split("mvtec_loco", loco, "juice_bottle")
    folder = loco / "juice_bottle/ground_truth/logical_anomalies/001"
    sample = next(s for s in split.test if s.mask_path == str(folder))
    image = loco / "juice_bottle/test/logical_anomalies/001.png"
    transform = ImageTransform(resize=SIZE, crop=SIZE)
    for wrong in ("001.png", "000.png"):  # the bad file is named, whichever it is
        Image.fromarray(region(0, 0, 255, shape=(32, SIZE))).save(folder / wrong)
        message = f"mask {folder / wrong} is 32x64 (HxW) but its image {image} is 64x64"
        with pytest.raises(DatasetError) as info:
            load_mask(sample, transform)
        assert str(info.value) == message
        with pytest.raises(DatasetError) as info:
            check_split(split, str(loco), need_test=True)
        assert message in str(info.value) and "1 unusable file(s)" in str(info.value)
        with pytest.raises(DatasetError, match="in the same mask folder") as info:
            read_mask(folder)  # on its own: the files disagree, both named
        assert str(folder / "000.png") in str(info.value) and str(folder / "001.png") in str(info.value)
        png(folder / wrong, region(0, 0, 255))  # restored: the next round breaks the other file
    check_split(split, str(loco), need_test=True)


def test_grey_gradient_file_in_a_mask_folder_is_refused(loco: Path) -> None:
    folder = loco / "juice_bottle/ground_truth/logical_anomalies/001"
    Image.fromarray(np.tile(np.arange(SIZE, dtype=np.uint8), (SIZE, 1))).save(folder / "001.png")
    with raises_naming(folder / "001.png", "is not binary"):
        read_mask(folder)


@pytest.mark.parametrize("fmt, fixture", [("mvtec_loco", "loco"), ("autovi", "autovi")])
def test_check_split_accepts_valid_trees(fmt: str, fixture: str, request: pytest.FixtureRequest) -> None:
    root = request.getfixturevalue(fixture)
    category = list_categories(fmt, root)[0]
    check_split(load_split(fmt, root, category), str(root), need_test=True,
                extra=load_validation(fmt, root, category))


def test_missing_empty_and_orphan_mask_folders(loco: Path) -> None:
    gt = loco / "juice_bottle/ground_truth/logical_anomalies"
    image = loco / "juice_bottle/test/logical_anomalies/001.png"
    for file in (gt / "001").iterdir():
        file.unlink()
    (gt / "001/notes.txt").write_text("not a mask")
    with raises_naming(gt / "001", "holds no mask images"):
        load_split("mvtec_loco", loco, "juice_bottle")
    (gt / "001/notes.txt").unlink()
    (gt / "001").rmdir()
    with raises_naming("missing mask for anomalous image", image, f"a folder {gt / '001'} of masks"):
        load_split("mvtec_loco", loco, "juice_bottle")
    png(gt / "001/000.png", region(0, 0, 255))
    image.unlink()
    with raises_naming(f"mask {gt / '001'} has no image", loco / "juice_bottle/test/logical_anomalies/001"):
        load_split("mvtec_loco", loco, "juice_bottle")


def test_autovi_missing_mask_folder_and_unknown_category(autovi: Path) -> None:
    with pytest.raises(DatasetError, match=r"unknown category 'engine_wiring'.*available: pipe_clip, tank_screw"):
        load_split("autovi", autovi, "engine_wiring")
    gt = autovi / "pipe_clip/ground_truth/operator_wrong"
    for file in (gt / "0089").iterdir():
        file.unlink()
    (gt / "0089").rmdir()
    with raises_naming(autovi / "pipe_clip/test/operator_wrong/0089.png", gt / "0089"):
        load_split("autovi", autovi, "pipe_clip")


def test_autovi_region_file_is_one_value(autovi: Path) -> None:
    """AutoVI's evaluation code asserts each region file is 0 and one value: whichever value, it reads as its region
    (as the 255 one), and a file of two values is refused, naming it, where the other formats would accept it."""
    split = load_split("autovi", autovi, "pipe_clip")
    assert [s.mask_rule for s in split.test if s.label] == ["one_value"] * 3
    transform = ImageTransform(resize=SIZE, crop=SIZE)
    sample = next(s for s in split.test if s.mask_path and s.mask_path.endswith("0003"))
    file = autovi / "pipe_clip/ground_truth/unclipped/0003/0001.png"
    expected = (region(30, 30, 255) > 0) | (region(50, 50, 255) > 0)
    for value in (128, 1, 77):  # 128: the fixture's own
        png(file, region(50, 50, value, shape=(SIZE, SIZE, 3)))
        assert np.array_equal(load_mask(sample, transform).numpy(), expected)
    png(file, np.maximum(region(50, 50, 128, shape=(SIZE, SIZE, 3)), region(40, 10, 255, shape=(SIZE, SIZE, 3))))
    assert read_mask(file).sum() == 128  # two levels: the "levels" rule of MVTec AD accepts it
    message = f"mask {file} holds 2 non-zero values (128..255); a file of a MVTec LOCO or AutoVI mask folder is one defect region"
    with raises_naming(message):
        load_mask(sample, transform)
    with pytest.raises(DatasetError, match="1 unusable file") as info:
        check_split(split, str(autovi), need_test=True)
    assert message in str(info.value)


def test_missing_root(tmp_path: Path) -> None:
    for fmt in ("mvtec_loco", "autovi"):
        with raises_naming(tmp_path / "nope", "does not exist"):
            list_categories(fmt, tmp_path / "nope")


def test_loco_metric_groups_and_their_metrics(loco: Path) -> None:
    split = load_split("mvtec_loco", loco, "juice_bottle")
    groups = metric_groups("mvtec_loco")
    assert groups == {"structural": ("structural_anomalies",), "logical": ("logical_anomalies",)}
    # test order: good/000, good/001, logical/000, logical/001, structural/000
    indices = group_indices(split.test, groups)
    assert indices == {"structural": [0, 1, 4], "logical": [0, 1, 2, 3]}

    labels = np.array([s.label for s in split.test])
    scores = np.array([0.1, 0.5, 0.3, 0.9, 0.7])
    transform = ImageTransform(resize=SIZE, crop=SIZE)
    masks = np.stack([load_mask(s, transform).numpy() for s in split.test])
    regions = defect_regions(split.test, transform)
    maps = np.random.default_rng(0).random(masks.shape) + 0.5 * masks  # anomalous pixels score higher, overlapping
    reports = group_metrics(indices, labels, scores, masks, maps, 0.3, regions)
    assert sorted(reports) == ["logical", "structural"]
    assert reports["structural"].values["image_auroc"] == 1.0  # 0.7 beats both normal scores
    assert reports["logical"].values["image_auroc"] == 0.75  # 0.3 beats 0.1 but not 0.5; 0.9 beats both
    assert compute_metrics(labels, scores).values["image_auroc"] == pytest.approx(5 / 6)  # "all": the usual report
    for name, hand_taken in (("structural", [0, 1, 4]), ("logical", [0, 1, 2, 3])):
        expected = compute_metrics(labels[hand_taken], scores[hand_taken], masks[hand_taken], maps[hand_taken], 0.3,
                                   [regions[i] for i in hand_taken])
        assert reports[name].values == expected.values and reports[name].notes == expected.notes == {}
        assert 0.5 < reports[name].values["pixel_auroc"] < 1.0 and 0.0 < reports[name].values["aupro"] < 1.0
        assert 0.0 < reports[name].values["spro"] < 1.0

    image_only = group_metrics(indices, labels, scores)
    assert image_only["logical"].values["image_auroc"] == 0.75 and image_only["logical"].values["pixel_auroc"] is None
    no_logical = group_metrics(group_indices(split.test[:2] + split.test[4:], groups), labels[[0, 1, 4]],
                               scores[[0, 1, 4]])
    assert no_logical["logical"].values["image_auroc"] is None
    assert "no anomalous images" in no_logical["logical"].notes["image_auroc"]


def test_evaluate_reports_groups_beside_all_and_the_report_lists_them(loco: Path, tmp_path: Path) -> None:
    """The engine's evaluate adds <group>/<metric> values; mean_metrics averages them; report.md has a groups table."""
    from anomaly_core.metrics import METRIC_NAMES, mean_metrics
    from anomaly_core.patchcore import evaluate
    from anomaly_core.scoring import Predictions
    from anomaly_core.bank import MemoryBank
    from cluster.pipeline import CategoryJob, CategoryResult
    from jobs.report import group_rows

    split = load_split("mvtec_loco", loco, "juice_bottle")
    transform = ImageTransform(resize=SIZE, crop=SIZE)
    masks = np.stack([load_mask(s, transform).numpy() for s in split.test])
    maps = (np.random.default_rng(1).random(masks.shape) + 0.5 * masks).astype(np.float32)
    scores = np.array([0.1, 0.5, 0.3, 0.9, 0.7])
    report = evaluate(split.test, Predictions(scores, maps, np.arange(5)), transform, 0.3, metric_groups("mvtec_loco"))
    assert report.values["image_auroc"] == pytest.approx(5 / 6)
    assert report.values["logical/image_auroc"] == 0.75 and report.values["structural/image_auroc"] == 1.0
    labels = np.array([s.label for s in split.test])
    logical = [0, 1, 2, 3]
    hand = compute_metrics(labels[logical], scores[logical], masks[logical], maps[logical], 0.3,
                           [defect_regions(split.test, transform)[i] for i in logical])
    assert hand.values["spro"] is not None
    assert {name: report.values[f"logical/{name}"] for name in METRIC_NAMES} == {n: hand.values[n] for n in METRIC_NAMES}
    assert evaluate(split.test, Predictions(scores, maps, np.arange(5)), transform, 0.3).values.keys().isdisjoint(
        {"logical/image_auroc"})  # no groups asked, none computed
    mean = mean_metrics([report, report])
    assert mean.values["logical/pixel_auroc"] == pytest.approx(report.values["logical/pixel_auroc"])

    predictions = Predictions(scores, maps, np.arange(5))
    result = CategoryResult(CategoryJob("loco", str(loco), split), MemoryBank(np.zeros((1, 4), np.float32), {}),
                            predictions, report)
    rows = group_rows([result])
    assert [(row["group"], row["image_auroc"]) for row in rows] == [("logical", 0.75), ("structural", 1.0)]


def test_validation_thresholds_use_locos_own_validation_images(loco: Path) -> None:
    """thresholds.source=validation takes LOCO's validation/good and leaves the whole train set in the bank."""
    from anomaly_core.config import parse_config
    from jobs.benchmark import category_jobs

    config = parse_config({"datasets": [{"name": "loco", "format": "mvtec_loco", "root": str(loco),
                                         "categories": ["juice_bottle"]}],
                           "thresholds": {"source": "validation"}}, "test")
    (job,) = category_jobs(config, None)
    assert job.split.train == load_split("mvtec_loco", loco, "juice_bottle").train
    assert [Path(s.image_path).relative_to(loco).as_posix() for s in job.validation] == [
        "juice_bottle/validation/good/000.png", "juice_bottle/validation/good/001.png"]


# --- MVTec LOCO's defects and sPRO ---------------------------------------------------------


def test_loco_defects_and_their_saturation_areas(loco: Path) -> None:
    """Anomalous samples name the config; each mask file is one defect with its type; saturation areas follow it,
    at the dataset's size and scaled to the maps' geometry."""
    split = load_split("mvtec_loco", loco, "juice_bottle")
    config = str(loco / "juice_bottle/defects_config.json")
    assert [s.defects_config for s in split.test] == [None, None, config, config, config]
    assert load_split("mvtec_loco", loco, "pushpins").test == ()  # no anomalies, no config needed
    two = split.test[3]  # logical_anomalies/001: a 255 defect and an overlapping 77 defect
    assert [(mask.sum(), kind.name) for mask, kind in read_defects(two)] == [(64, "missing_juice"), (64, "wrong_label")]
    same = ImageTransform(resize=SIZE, crop=SIZE)
    masks, areas = load_defects(two, same)
    assert np.array_equal(masks, [region(10, 10, 1) > 0, region(14, 14, 1) > 0]) and areas.tolist() == [30.0, 19.0]
    assert load_defects(split.test[4], same)[1].tolist() == [64.0]  # 100 px exceeds the defect: its area
    # 64 -> 32 -> center 24: a quarter of the pixels; the 255 defect at (10, 10) becomes rows/cols 1..4 of the crop.
    half = ImageTransform(resize=32, crop=24)
    masks, areas = load_defects(two, half)
    assert masks.shape == (2, 24, 24) and masks.sum(axis=(1, 2)).tolist() == [16, 16]
    assert areas.tolist() == [30 / 4, 4.0]  # absolute: scaled by the area factor; relative: int(0.3 * 16)
    assert np.array_equal(masks.any(axis=0), load_mask(two, half).numpy())  # the defects unite to the mask
    corner = load_defects(split.test[2], half)  # the defect at (0, 0) lies in the cropped-off border: it drops out
    assert corner[0].shape == (0, 24, 24) and not load_mask(split.test[2], half).numpy().any()
    regions = defect_regions(split.test, same)
    assert [len(areas) for _, areas in regions] == [0, 0, 1, 2, 1]
    assert defect_regions(load_split("autovi", loco, "juice_bottle").test, same) is None  # no config named: no sPRO


@pytest.mark.parametrize(("height", "width", "resize"), [(64, 64, 32), (1000, 1600, 256), (1600, 1000, 256),
                                                         (768, 1024, 320)])
def test_area_scale_is_the_resize_torchvision_does(height: int, width: int, resize: int) -> None:
    resized = ImageTransform(resize=resize, crop=resize)._geometry(Image.new("L", (width, height)), 0)
    before_crop = TF.resize(Image.new("L", (width, height)), resize)
    assert resized.size == (resize, resize)
    assert ImageTransform(resize=resize, crop=resize).area_scale(height, width) == pytest.approx(
        before_crop.width * before_crop.height / (width * height), abs=1e-15)


def test_loco_without_defects_config_is_one_error_naming_it(loco: Path) -> None:
    config = loco / "juice_bottle/defects_config.json"
    config.unlink()
    with pytest.raises(DatasetError) as info:
        load_split("mvtec_loco", loco, "juice_bottle")
    assert str(info.value).startswith(f"missing {config}: MVTec LOCO's sPRO") and "\n" not in str(info.value)


@pytest.mark.parametrize(("content", "message"), [
    ("[{", "not readable as JSON"),
    ("{}", "must be a non-empty JSON list"),
    ('[{"defect_name": "a", "pixel_value": 1}]', "entry 0 must be an object with"),
    ('[{"defect_name": "a", "pixel_value": 0, "saturation_threshold": 5, "relative_saturation": false}]',
     "pixel_value must be an integer in 1..255, got 0"),
    ('[{"defect_name": "a", "pixel_value": 3, "saturation_threshold": 1.5, "relative_saturation": true}]',
     "a relative saturation_threshold must be in (0, 1], got 1.5"),
    ('[{"defect_name": "a", "pixel_value": 3, "saturation_threshold": 0.5, "relative_saturation": false}]',
     "an absolute saturation_threshold must be a whole number of pixels > 0, got 0.5"),
    ('[{"defect_name": "a", "pixel_value": 3, "saturation_threshold": 5, "relative_saturation": "no"}]',
     "relative_saturation must be true or false"),
    ('[{"defect_name": "a", "pixel_value": 3, "saturation_threshold": 5, "relative_saturation": false},'
     ' {"defect_name": "b", "pixel_value": 3, "saturation_threshold": 5, "relative_saturation": false}]',
     "entry 1 ('b'): pixel_value 3 is already 'a'"),
])
def test_malformed_defects_config_is_one_error_naming_it(loco: Path, content: str, message: str) -> None:
    config = loco / "juice_bottle/defects_config.json"
    config.write_text(content)
    with pytest.raises(DatasetError) as info:
        load_split("mvtec_loco", loco, "juice_bottle")
    assert str(config) in str(info.value) and message in str(info.value) and "\n" not in str(info.value)


def test_mask_value_not_in_defects_config_is_named(loco: Path) -> None:
    split = load_split("mvtec_loco", loco, "juice_bottle")
    bad = loco / "juice_bottle/ground_truth/logical_anomalies/001/001.png"
    png(bad, region(14, 14, 78))
    config = loco / "juice_bottle/defects_config.json"
    message = f"mask {bad} has pixel value 78, which {config} does not list (it lists [77, 200, 255])"
    with pytest.raises(DatasetError) as info:
        check_split(split, str(loco), need_test=True)  # before any work starts
    assert str(info.value).endswith(f"1 unusable file(s):\n  {message}")  # the check's list: one line for the file
    with pytest.raises(DatasetError, match="does not list"):
        load_defects(split.test[3], ImageTransform(resize=SIZE, crop=SIZE))
    png(bad, region(14, 14, 77) | region(0, 0, 255))  # two defect types in one file
    with raises_naming(bad, "holds 2 non-zero values [77, 255]", "one defect"):
        read_defects(split.test[3])
    assert load_defects_config(config)[77].relative


def official_auc_spros(gt_dirs: list[Path | None], maps: np.ndarray, config: Path) -> dict[float, float]:
    """MVTec's official LOCO evaluation (mvtec_loco_ad_evaluation) re-stated from its semantics, independent of
    metrics.spro: png folders read as np.array(Image.open(...)), saturation int(t * area) or min(t, area), binary maps
    ``map > t`` at every threshold (the limit of its refinement), FP/TN pooled outside each image's defects,
    mean sPRO over all defects, trapz cut at max_fpr by interpolation, / max_fpr."""
    types = {entry["pixel_value"]: entry for entry in json.loads(config.read_text())}
    channels = []  # (image, bool array, saturation area)
    for image, gt_dir in enumerate(gt_dirs):
        for png_path in sorted(gt_dir.glob("*.png")) if gt_dir else []:
            array = np.array(Image.open(png_path))
            _, defect_id = sorted(np.unique(array))
            kind, area = types[int(defect_id)], int(array.astype(bool).sum())
            saturation = (int(kind["saturation_threshold"] * area) if kind["relative_saturation"]
                          else min(kind["saturation_threshold"], area))
            channels.append((image, array.astype(bool), saturation))
    union = np.zeros(maps.shape, bool)
    for image, array, _ in channels:
        union[image] |= array
    thresholds = np.concatenate([np.unique(maps)[::-1], [maps.min() - 1]])  # max: nothing above; below min: all
    fprs, spros = [], []
    for threshold in thresholds:
        binary = np.greater(maps, threshold)
        fp = np.sum(binary & ~union)
        fprs.append(fp / np.sum(~union))
        spros.append(np.mean([min(np.sum(binary[i] & a) / s, 1.0) for i, a, s in channels]))
    x, y = np.array(fprs), np.array(spros)
    assert x[0] == 0 and x[-1] == 1
    aucs = {}
    for max_fpr in (0.01, 0.05, 0.1, 0.3, 1.0):
        correction = 0.0
        if max_fpr not in x:
            ins = bisect(x, max_fpr)
            y_interp = y[ins - 1] + (y[ins] - y[ins - 1]) * (max_fpr - x[ins - 1]) / (x[ins] - x[ins - 1])
            correction = 0.5 * (y_interp + y[ins - 1]) * (max_fpr - x[ins - 1])
        keep = x <= max_fpr
        aucs[max_fpr] = (np.sum(0.5 * (y[keep][1:] + y[keep][:-1]) * (x[keep][1:] - x[keep][:-1])) + correction) / max_fpr
    return aucs


def test_loco_spro_matches_the_official_evaluation(loco: Path) -> None:
    """At the dataset's own geometry (64 px, resize = crop = 64) evaluate's sPRO, for all test images and each group
    (with the good images, as the official script's subdirectories), equals the official semantics at every limit
    that script prints; saturated, relative and capped defects and two overlapping types in one image included."""
    from anomaly_core.metrics import SPRO_FPR_LIMIT, spro
    from anomaly_core.patchcore import evaluate
    from anomaly_core.scoring import Predictions

    split = load_split("mvtec_loco", loco, "juice_bottle")
    transform = ImageTransform(resize=SIZE, crop=SIZE)
    masks = np.stack([load_mask(s, transform).numpy() for s in split.test])
    rng = np.random.default_rng(3)
    maps = np.round(rng.random(masks.shape) + 0.15 * masks, 2).astype(np.float32)  # ties included
    report = evaluate(split.test, Predictions(np.zeros(5), maps, np.arange(5)), transform, 0.3,
                      metric_groups("mvtec_loco"))
    regions = defect_regions(split.test, transform)
    for group, take in (("", [0, 1, 2, 3, 4]), ("structural/", [0, 1, 4]), ("logical/", [0, 1, 2, 3])):
        gt_dirs = [Path(split.test[i].mask_path) if split.test[i].mask_path else None for i in take]
        official = official_auc_spros(gt_dirs, maps[take].astype(np.float64), loco / "juice_bottle/defects_config.json")
        assert report.values[f"{group}spro"] == pytest.approx(official[SPRO_FPR_LIMIT], abs=1e-12)
        for max_fpr, expected in official.items():
            ours = spro(masks[take], maps[take], [regions[i] for i in take], max_fpr)
            assert ours == pytest.approx(expected, abs=1e-12)
    assert 0.1 < report.values["spro"] < 0.95 and report.values["spro"] != report.values["aupro"]
