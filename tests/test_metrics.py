"""Metrics against scikit-learn, hand-derived values and slow reference AUPRO and sPRO."""

from __future__ import annotations

import json
import time
import warnings

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, f1_score, precision_recall_curve, roc_auc_score

from anomaly_core.metrics import (
    METRIC_NAMES,
    MetricReport,
    aupro,
    compute_metrics,
    group_metrics,
    image_metrics,
    mean_metrics,
    pixel_metrics,
    spro,
)


def random_blobs(rng: np.random.Generator, n: int, size: int, max_blobs: int = 3) -> np.ndarray:
    """Masks with a few random discs in about half the images, like a real test split."""
    yy, xx = np.mgrid[:size, :size]
    masks = np.zeros((n, size, size), dtype=bool)
    for i in range(n // 2):
        for _ in range(rng.integers(1, max_blobs + 1)):
            cy, cx = rng.integers(0, size, 2)
            radius = rng.integers(1, max(2, size // 6))
            masks[i] |= (yy - cy) ** 2 + (xx - cx) ** 2 < radius**2
    return masks


def reference_aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float) -> float:
    """The definition, literally: one thresholded mask per distinct score, per-region overlaps."""
    regions = []  # (image index, region mask)
    for i, mask in enumerate(masks):
        labeled, n = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [(i, labeled == k) for k in range(1, n + 1)]
    curve = [(0.0, 0.0)]
    for threshold in np.unique(maps)[::-1]:
        predicted = maps >= threshold
        fpr = predicted[~masks].mean()
        pro = np.mean([predicted[i][region].mean() for i, region in regions])
        curve.append((fpr, pro))
    return reference_area(curve, fpr_limit)


def reference_spro(masks: np.ndarray, maps: np.ndarray, regions: list, fpr_limit: float) -> float:
    """The sPRO definition, literally: per threshold, each defect's min(TP area / saturation area, 1), averaged."""
    curve = [(0.0, 0.0)]
    for threshold in np.unique(maps)[::-1]:
        predicted = maps >= threshold
        overlaps = [min(np.count_nonzero(predicted[i] & defect) / area, 1.0)
                    for i, (defects, areas) in enumerate(regions) for defect, area in zip(defects, areas)]
        curve.append((predicted[~masks].mean(), np.mean(overlaps)))
    return reference_area(curve, fpr_limit)


def reference_area(curve: list[tuple[float, float]], fpr_limit: float) -> float:
    """Trapezoids of (FPR, overlap) points up to fpr_limit, the last one cut there by interpolation, / fpr_limit."""
    area = 0.0
    for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
        if x0 >= fpr_limit:
            break
        if x1 <= fpr_limit:
            area += (x1 - x0) * (y0 + y1) / 2
        else:
            y_limit = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            area += (fpr_limit - x0) * (y0 + y_limit) / 2
    return area / fpr_limit


# --- image level -----------------------------------------------------------------------------


def test_image_metrics_hand_computed():
    # Sorted by score: 0.9(A) 0.8(A) 0.4(N) 0.35(A) 0.2(N) 0.1(N); 3 anomalous, 3 normal.
    # AUROC: 0.9 and 0.8 beat all 3 normals, 0.35 beats 2 -> (3 + 3 + 2) / 9 = 8/9.
    # AP: precision at each anomaly's rank: 1/1, 2/2, 3/4 -> (1 + 1 + 0.75) / 3 = 11/12.
    # F1 per threshold: 0.9: P1 R1/3 -> 1/2; 0.8: P1 R2/3 -> 4/5; 0.4: P2/3 R2/3 -> 2/3;
    #   0.35: P3/4 R1 -> 6/7; 0.2: P3/5 R1 -> 3/4; 0.1: P1/2 R1 -> 2/3. Max 6/7 at 0.35.
    labels = np.array([0, 0, 1, 1, 0, 1])
    scores = np.array([0.1, 0.4, 0.35, 0.8, 0.2, 0.9])
    values = image_metrics(labels, scores)
    assert values["image_auroc"] == pytest.approx(8 / 9, abs=1e-12)
    assert values["image_ap"] == pytest.approx(11 / 12, abs=1e-12)
    assert values["image_f1_max"] == pytest.approx(6 / 7, abs=1e-12)
    assert values["image_threshold"] == 0.35
    assert all(type(v) is float for v in values.values())


def test_image_metrics_agree_with_sklearn_on_random_data():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    scores = rng.normal(size=300) + labels * 0.8
    values = image_metrics(labels, scores)
    assert values["image_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert values["image_ap"] == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    # F1 max by brute force over every distinct threshold, independent of the PR curve.
    f1s = {t: f1_score(labels, scores >= t) for t in np.unique(scores)}
    best = max(f1s, key=f1s.get)
    assert values["image_f1_max"] == pytest.approx(f1s[best], abs=1e-12)
    assert f1_score(labels, scores >= values["image_threshold"]) == pytest.approx(f1s[best], abs=1e-12)


@pytest.mark.parametrize(
    ("labels", "expected"), [([0, 0, 0], "no anomalous images"), ([1, 1, 1], "only anomalous images")]
)
def test_single_class_image_split_is_none_with_note_and_no_warnings(labels, expected):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = compute_metrics(np.array(labels), np.array([0.1, 0.5, 0.9]))
    for name in ("image_auroc", "image_ap", "image_f1_max", "image_threshold"):
        assert report.values[name] is None
        assert expected in report.notes[name] and name in report.notes[name]


# --- pixel level -----------------------------------------------------------------------------


def test_pixel_metrics_agree_with_sklearn_on_random_data():
    rng = np.random.default_rng(1)
    masks = random_blobs(rng, 8, 16)
    maps = rng.random(masks.shape).astype(np.float32) + 0.4 * masks
    values = pixel_metrics(masks, maps)
    y, s = masks.ravel(), maps.ravel().astype(np.float64)
    assert values["pixel_auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert values["pixel_ap"] == pytest.approx(average_precision_score(y, s), abs=1e-12)
    precision, recall, _ = precision_recall_curve(y, s)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-300)
    assert values["pixel_f1_max"] == pytest.approx(f1.max(), abs=1e-12)
    # At any threshold IoU = TP / (TP + FP + FN) = F1 / (2 - F1): a consistency check.
    assert values["pixel_iou"] == pytest.approx(f1.max() / (2 - f1.max()), abs=1e-12)


def test_pixel_iou_hand_computed():
    # Anomalous pixels score 0.9, 0.6, 0.2; normal ones 0.7, 0.3, 0.1. F1 per threshold:
    # 0.9: 1/2; 0.7: 2/5; 0.6: 2/3; 0.3: 4/7; 0.2: TP3 FP2 -> P3/5 R1 -> 3/4; 0.1: 2/3.
    # At 0.2 the prediction is every pixel but the 0.1 one: intersection 3, union 5 -> IoU 3/5.
    masks = np.array([[[1, 1, 1], [0, 0, 0]]], dtype=bool)
    maps = np.array([[[0.9, 0.6, 0.2], [0.7, 0.1, 0.3]]])
    values = pixel_metrics(masks, maps)
    assert values["pixel_threshold"] == 0.2
    assert values["pixel_f1_max"] == pytest.approx(3 / 4, abs=1e-12)
    assert values["pixel_iou"] == pytest.approx(3 / 5, abs=1e-12)


def tiny_pro_example() -> tuple[np.ndarray, np.ndarray]:
    """Two 4x4 images: region R1 (8 px, rows 0-1 of image 0), region R2 (2x2 in image 1).

    20 normal pixels in all. Scores: R1 top row 0.9, second row 0.5; R2 0.7; normal pixels:
    2 at 0.8, 4 at 0.6, 4 at 0.5 (tied with half of R1), 10 at 0.0.
    """
    masks = np.zeros((2, 4, 4), dtype=bool)
    masks[0, :2] = True
    masks[1, 1:3, 1:3] = True
    maps = np.zeros((2, 4, 4))
    maps[0, 0], maps[0, 1] = 0.9, 0.5
    maps[1, 1:3, 1:3] = 0.7
    maps[0, 2, :2] = 0.8
    maps[0, 2, 2:], maps[0, 3, :2] = 0.6, 0.6
    maps[0, 3, 2:], maps[1, 0, :2] = 0.5, 0.5
    return masks, maps


@pytest.mark.parametrize(
    ("fpr_limit", "expected"),
    [
        # Curve (FPR, PRO) as the threshold drops: start (0, 0); 0.9: R1 half -> (0, 0.25);
        # 0.8: 2 FP -> (0.1, 0.25); 0.7: R2 whole -> (0.1, 0.75); 0.6: 6 FP -> (0.3, 0.75);
        # 0.5: 10 FP and R1 whole -> (0.5, 1.0); 0.0: (1, 1).
        # Up to 0.3: 0.1 * 0.25 + 0.2 * 0.75 = 0.175 -> / 0.3 = 7/12.
        (0.3, 7 / 12),
        # Up to 0.4 the sloped segment (0.3, 0.75)-(0.5, 1.0) is cut at PRO 0.875:
        # 0.175 + 0.1 * (0.75 + 0.875) / 2 = 0.25625 -> / 0.4 = 0.640625
        # (0.4375 if the partial segment were dropped, 0.6875 if taken whole).
        (0.4, 0.640625),
        # Whole curve: 0.175 + 0.2 * (0.75 + 1) / 2 + 0.5 * 1 = 0.85.
        (1.0, 0.85),
    ],
)
def test_aupro_hand_computed(fpr_limit, expected):
    masks, maps = tiny_pro_example()
    assert aupro(masks, maps, fpr_limit) == pytest.approx(expected, abs=1e-12)
    assert reference_aupro(masks, maps, fpr_limit) == pytest.approx(expected, abs=1e-12)


def test_aupro_perfect_and_inverted_maps():
    masks = random_blobs(np.random.default_rng(2), 6, 20)
    assert aupro(masks, masks.astype(float)) == pytest.approx(1.0, abs=1e-12)
    assert aupro(masks, -masks.astype(float)) == pytest.approx(0.0, abs=1e-12)


def test_aupro_weighs_small_and_large_regions_equally():
    # 5x5 image: a 10-pixel region (rows 0-1) and a 1-pixel region at (4, 4); 14 normal pixels.
    # Detecting either region alone (score 1, everything else 0) gives the curve
    # (0, 0) -> (0, 0.5) -> (1, 1); PRO at FPR 0.3 is 0.65, so AUPRO = 0.3 * (0.5 + 0.65) / 2 / 0.3
    # = 0.575 both ways, while pixel AUROC strongly favours finding the big region.
    masks = np.zeros((1, 5, 5), dtype=bool)
    masks[0, :2] = True
    masks[0, 4, 4] = True
    big_found = masks.copy()
    big_found[0, 4, 4] = False
    small_found = masks & ~big_found
    big = pixel_metrics(masks, big_found.astype(float))
    small = pixel_metrics(masks, small_found.astype(float))
    assert big["aupro"] == pytest.approx(0.575, abs=1e-12)
    assert small["aupro"] == pytest.approx(0.575, abs=1e-12)
    assert big["pixel_auroc"] > small["pixel_auroc"] + 0.3


def test_aupro_regions_are_8_connected():
    # Diagonal pair (0,0)-(1,1) is one region under 8-connectivity, plus a lone pixel at (3,3).
    # Only (0,0) scores 1: PRO = (1/2 + 0) / 2 = 0.25 (4-connectivity would give 1/3), so the
    # curve is (0, 0) -> (0, 0.25) -> (1, 1) and the full-range area is (0.25 + 1) / 2 = 0.625.
    masks = np.zeros((1, 4, 4), dtype=bool)
    masks[0, 0, 0] = masks[0, 1, 1] = masks[0, 3, 3] = True
    maps = np.zeros((1, 4, 4))
    maps[0, 0, 0] = 1.0
    assert aupro(masks, maps, fpr_limit=1.0) == pytest.approx(0.625, abs=1e-12)


@pytest.mark.parametrize("seed", [3, 4, 5])
@pytest.mark.parametrize("fpr_limit", [0.05, 0.3, 1.0])
def test_aupro_matches_slow_reference(seed, fpr_limit):
    rng = np.random.default_rng(seed)
    masks = random_blobs(rng, 6, 24, max_blobs=4)
    # Rounded scores create many ties, which the fast curve must group exactly like thresholds do.
    maps = np.round(rng.random(masks.shape) * 0.7 + 0.3 * masks, 2)
    assert aupro(masks, maps, fpr_limit) == pytest.approx(reference_aupro(masks, maps, fpr_limit), abs=1e-9)


def test_pixel_metrics_without_anomalous_pixels_or_masks():
    labels, scores = np.array([0, 1]), np.array([0.2, 0.8])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        empty = compute_metrics(labels, scores, np.zeros((2, 4, 4), bool), np.zeros((2, 4, 4)))
        unmasked = compute_metrics(labels, scores)
    for report, reason in [(empty, "no anomalous pixels"), (unmasked, "no ground-truth masks")]:
        assert report.values["image_auroc"] == 1.0
        for name in ("pixel_auroc", "pixel_ap", "pixel_f1_max", "pixel_iou", "aupro", "pixel_threshold"):
            assert report.values[name] is None
            assert reason in report.notes[name]
        assert "image_auroc" not in report.notes
    with pytest.raises(ValueError, match="no anomalous pixels"):
        aupro(np.zeros((2, 4, 4), bool), np.zeros((2, 4, 4)))
    all_anomalous = pixel_metrics(np.ones((2, 4, 4), bool), np.zeros((2, 4, 4)))
    assert all(value is None for value in all_anomalous.values())


def one_defect_example() -> tuple[np.ndarray, np.ndarray]:
    """One 3x4 image: defect A in row 0, defect B in row 1 (4 px each), 4 normal pixels in row 2.

    Scores, high to low: A 0.9, A 0.8, N 0.7, N 0.6, N 0.5, B 0.45, A 0.3, A 0.2, B 0.15, B 0.12, B 0.11, N 0.1.
    """
    maps = np.array([[[0.9, 0.8, 0.3, 0.2], [0.45, 0.15, 0.12, 0.11], [0.7, 0.6, 0.5, 0.1]]])
    masks = np.zeros((1, 3, 4), bool)
    masks[0, :2] = True
    return masks, maps


def defects(masks: np.ndarray, rows: tuple[int, ...], areas: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The defects of image 0 of ``masks``: one per row in ``rows``, with saturation ``areas``."""
    found = np.zeros((len(rows), *masks.shape[1:]), bool)
    for k, row in enumerate(rows):
        found[k, row] = True
    return found, np.array(areas, dtype=float)


@pytest.mark.parametrize(
    ("area", "expected"),
    [
        # A alone: row 1 counts as normal (8 normal pixels). Curve (FPR, sPRO): 0.9 -> (0, 1/s), 0.8 -> (0, 2/s),
        # 0.7, 0.6, 0.5, 0.45 -> FPR 0.5, A's last two pixels (0.3, 0.2) at FPR 0.5, then on to (1, 1).
        # Area: 0.5 * min(2/s, 1) + 0.5 * 1.
        (2.0, 1.0),  # saturated after two pixels: the whole curve at 1
        (2.5, 0.5 * 0.8 + 0.5),  # 0.8 until the third pixel (any part of a pixel past 2.5 saturates)
        (3.0, 0.5 * 2 / 3 + 0.5),
        (4.0, 0.5 * 0.5 + 0.5),  # saturation area = defect area: the PRO, as aupro gives it
    ],
)
def test_spro_hand_computed_saturation(area, expected):
    masks, maps = one_defect_example()
    masks[0, 1] = False  # A only
    regions = [defects(masks, (0,), (area,))]
    assert spro(masks, maps, regions, fpr_limit=1.0) == pytest.approx(expected, abs=1e-12)
    assert reference_spro(masks, maps, regions, 1.0) == pytest.approx(expected, abs=1e-12)
    if area == 4.0:
        assert spro(masks, maps, regions, 1.0) == pytest.approx(aupro(masks, maps, 1.0), abs=1e-12)


def test_spro_two_defect_types_in_one_image():
    """A saturates at 2 px, B (one defect of another type) at 1 px: mean of the two defects' sPRO.

    Curve: 0.9 -> (0, 1/4); 0.8 -> (0, 1/2); 0.7, 0.6, 0.5 -> FPR 0.25, 0.5, 0.75 at 1/2; 0.45 (B's first pixel) ->
    (0.75, 1); 0.1 -> (1, 1). Up to 0.05: 1/2. Up to 1: 0.75 * 1/2 + 0.25 * 1 = 0.625.
    """
    masks, maps = one_defect_example()
    regions = [defects(masks, (0, 1), (2.0, 1.0))]
    assert spro(masks, maps, regions) == pytest.approx(0.5, abs=1e-12)  # default limit 0.05
    assert spro(masks, maps, regions, 1.0) == pytest.approx(0.625, abs=1e-12)
    assert reference_spro(masks, maps, regions, 1.0) == pytest.approx(0.625, abs=1e-12)
    swapped = [defects(masks, (0, 1), (4.0, 4.0))]  # both unsaturated: B's pixels come late
    assert spro(masks, maps, swapped, 1.0) == pytest.approx(reference_spro(masks, maps, swapped, 1.0), abs=1e-12)
    assert spro(masks, maps, swapped, 1.0) < 0.625


def random_defects(rng: np.random.Generator, masks: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per image: its connected components, one split in two overlapping defects, random saturation areas
    (whole and fractional, some at the full area) — defects as LOCO files make them."""
    regions = []
    for mask in masks:
        labeled, n = ndimage.label(mask, structure=np.ones((3, 3)))
        found = [labeled == k for k in range(1, n + 1)]
        if found and found[0].sum() > 4:  # a second defect over part of the first: LOCO files may overlap
            rows = np.flatnonzero(found[0].any(axis=1))
            part = found[0].copy()
            part[rows[len(rows) // 2 + 1 :]] = False
            found.append(part)
        areas = [rng.choice([a.sum(), max(1, a.sum() // 3), rng.uniform(0.5, a.sum())]) for a in found]
        regions.append((np.array(found, bool).reshape(-1, *mask.shape), np.array(areas, float)))
    return regions


@pytest.mark.parametrize("seed", [3, 4, 5])
@pytest.mark.parametrize("fpr_limit", [0.01, 0.05, 0.3, 1.0])
def test_spro_matches_slow_reference(seed, fpr_limit):
    rng = np.random.default_rng(seed)
    masks = random_blobs(rng, 6, 24, max_blobs=4)
    regions = random_defects(rng, masks)
    maps = np.round(rng.random(masks.shape) * 0.7 + 0.3 * masks, 2)  # ties, grouped as thresholds group them
    expected = reference_spro(masks, maps, regions, fpr_limit)
    assert spro(masks, maps, regions, fpr_limit) == pytest.approx(expected, abs=1e-9)
    full = [(found, found.sum(axis=(1, 2)).astype(float)) for found, _ in regions]
    assert spro(masks, maps, full, fpr_limit) == pytest.approx(reference_spro(masks, maps, full, fpr_limit), abs=1e-9)


def test_spro_of_unsaturated_components_is_aupro():
    """With every connected component a defect saturating at its full area, sPRO is the PRO, at any limit."""
    rng = np.random.default_rng(7)
    masks = random_blobs(rng, 8, 32, max_blobs=4)
    maps = rng.random(masks.shape) + 0.4 * masks
    regions = []
    for mask in masks:
        labeled, n = ndimage.label(mask, structure=np.ones((3, 3)))
        found = np.array([labeled == k for k in range(1, n + 1)], bool).reshape(-1, *mask.shape)
        regions.append((found, found.sum(axis=(1, 2)).astype(float)))
    for fpr_limit in (0.05, 0.3):
        assert spro(masks, maps, regions, fpr_limit) == pytest.approx(aupro(masks, maps, fpr_limit), abs=1e-12)


def test_spro_in_reports_and_groups():
    """compute_metrics reports sPRO (at the official limit 0.05) only given regions; groups take their images' own."""
    rng = np.random.default_rng(8)
    masks = random_blobs(rng, 6, 16)
    regions = random_defects(rng, masks)
    maps = rng.random(masks.shape) + 0.5 * masks
    labels, scores = masks.any(axis=(1, 2)).astype(int), maps.max(axis=(1, 2))
    report = compute_metrics(labels, scores, masks, maps, 0.3, regions)
    assert report.values["spro"] == pytest.approx(reference_spro(masks, maps, regions, 0.05), abs=1e-12)
    assert report.values["aupro"] == aupro(masks, maps, 0.3) and "spro" not in report.notes
    plain = compute_metrics(labels, scores, masks, maps)
    assert plain.values["spro"] is None and "defects_config.json" in plain.notes["spro"]
    assert {k: v for k, v in plain.values.items() if k != "spro"} == {
        k: v for k, v in report.values.items() if k != "spro"}
    take = [0, 1, 4, 5]  # anomalies 0 and 1 (random_blobs marks the first half), normal 4 and 5
    (sub,) = group_metrics({"g": take}, labels, scores, masks, maps, 0.3, regions).values()
    assert sub.values["spro"] == pytest.approx(
        reference_spro(masks[take], maps[take], [regions[i] for i in take], 0.05), abs=1e-12)


def test_spro_input_validation():
    masks, maps = one_defect_example()
    good = defects(masks, (0, 1), (2.0, 1.0))
    for regions, match in [
        ([good, good], "regions has 2 entries but masks has 1"),
        ([defects(masks, (0,), (2.0,))], "union differs from masks"),  # row 1 anomalous in masks, in no defect
        ([defects(masks, (0, 1), (5.0, 1.0))], "exceed the defect areas"),
        ([defects(masks, (0, 1), (0.0, 1.0))], "saturation area > 0"),
        ([(good[0].astype(np.uint8), good[1])], "must be bool"),
    ]:
        with pytest.raises(ValueError, match=match):
            spro(masks, maps, regions)
        with pytest.raises(ValueError, match=match):
            compute_metrics(np.array([1]), np.array([0.9]), masks, maps, 0.3, regions)
    with pytest.raises(ValueError, match="no normal pixels"):
        spro(np.ones((1, 1, 2), bool), np.zeros((1, 1, 2)), [(np.ones((1, 1, 2), bool), np.array([1.0]))])


# --- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((np.array([0, 1, 1]), np.array([0.1, 0.2])), r"labels has shape \(3,\) but scores has shape \(2,\)"),
        ((np.array([0, 2]), np.array([0.1, 0.2])), "labels .* must be binary"),
        ((np.array([0, 1]), np.array([0.1, np.nan])), "scores .* NaN or inf"),
        ((np.array([0, 1]), np.array([0.1, np.inf])), "scores .* NaN or inf"),
        ((np.array([0, 1]), np.array([[0.1, 0.2]])), r"scores must have shape \[N\]"),
    ],
)
def test_image_input_validation(args, match):
    with pytest.raises(ValueError, match=match):
        image_metrics(*args)


def test_pixel_input_validation():
    masks = np.zeros((2, 4, 4), bool)
    masks[0, 0, 0] = True
    with pytest.raises(ValueError, match=r"masks has shape \(2, 4, 4\) but maps has shape \(2, 4, 5\)"):
        pixel_metrics(masks, np.zeros((2, 4, 5)))
    nan_maps = np.zeros((2, 4, 4))
    nan_maps[1, 2, 3] = np.nan
    with pytest.raises(ValueError, match="maps .* NaN"):
        aupro(masks, nan_maps)
    with pytest.raises(ValueError, match="masks .* binary"):
        pixel_metrics(masks * 255, np.zeros((2, 4, 4)))
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(masks, np.zeros((2, 4, 4)), fpr_limit=0.0)
    with pytest.raises(ValueError, match=r"masks has shape \(2, 4, 4\) but labels has shape \(3,\)"):
        compute_metrics(np.array([0, 1, 1]), np.zeros(3), masks, np.zeros((2, 4, 4)))
    with pytest.raises(ValueError, match="maps is required"):
        compute_metrics(np.array([0, 1]), np.zeros(2), masks)


# --- reports ---------------------------------------------------------------------------------


def test_compute_metrics_report_is_json_serializable():
    masks, maps = tiny_pro_example()
    report = compute_metrics(np.array([1, 1]), maps.max(axis=(1, 2)), masks, maps)
    payload = json.loads(json.dumps(report.to_dict()))
    assert payload["values"]["aupro"] == pytest.approx(7 / 12)
    assert payload["values"]["image_auroc"] is None
    assert set(payload["notes"]) == {"image_auroc", "image_ap", "image_f1_max", "image_threshold", "spro"}
    assert set(METRIC_NAMES) <= set(payload["values"])


def test_mean_metrics_skips_undefined_and_says_so():
    full = dict.fromkeys(METRIC_NAMES, 0.5)
    reports = [
        MetricReport(values={**full, "image_auroc": 0.8, "pixel_iou": None}, notes={"pixel_iou": "x"}),
        MetricReport(values={**full, "image_auroc": 0.6, "pixel_iou": None}, notes={"pixel_iou": "x"}),
        MetricReport(values={**full, "image_auroc": None, "pixel_iou": None}, notes={}),
    ]
    mean = mean_metrics(reports)
    assert mean.values["image_auroc"] == pytest.approx(0.7)
    assert "2 of 3" in mean.notes["image_auroc"] and "1 skipped" in mean.notes["image_auroc"]
    assert mean.values["pixel_iou"] is None and "all 3" in mean.notes["pixel_iou"]
    assert mean.values["aupro"] == 0.5 and "aupro" not in mean.notes
    assert list(mean.values) == list(METRIC_NAMES)
    with pytest.raises(ValueError, match="empty"):
        mean_metrics([])


def test_full_size_category_is_fast():
    rng = np.random.default_rng(6)
    masks = random_blobs(rng, 150, 224)
    maps = rng.random(masks.shape, dtype=np.float32) + 0.5 * masks
    labels, scores = masks.any(axis=(1, 2)), maps.max(axis=(1, 2))
    regions = random_defects(rng, masks)
    start = time.perf_counter()
    aupro(masks, maps)
    aupro_seconds = time.perf_counter() - start
    start = time.perf_counter()
    report = compute_metrics(labels, scores, masks, maps, 0.3, regions)
    total_seconds = time.perf_counter() - start
    print(f"150x224x224: aupro {aupro_seconds:.2f} s, compute_metrics with sPRO {total_seconds:.2f} s")
    assert all(report.values[name] is not None for name in METRIC_NAMES)
    assert aupro_seconds < 5
    assert total_seconds < 15
