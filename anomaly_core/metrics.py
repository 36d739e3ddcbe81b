"""Anomaly-detection metrics as reported by MVTec AD / anomalib, per category.

Image level (one score per image) and pixel level (anomaly maps against ground-truth masks,
all test pixels pooled). A metric that a test split cannot define (e.g. AUROC without any
anomalous image) is reported as ``None`` with a note saying why, so a benchmark over many
categories never crashes or prints warnings because one split is degenerate.

AUPRO follows MVTec's official ``compute_pro``: one sort of all pixels gives the exact PRO/FPR
curve over every distinct threshold, instead of sampling a fixed grid of thresholds. That same sort
gives the ROC and PR curves (scikit-learn's definitions, checked against it in the tests) and
MVTec LOCO's sPRO curve: a test split's millions of pixels are sorted once, not four times.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np
from scipy import ndimage

if TYPE_CHECKING:  # annotations only: importing the data package would pull in torch
    from anomaly_core.data import Sample

METRIC_NAMES: tuple[str, ...] = (
    "image_auroc",
    "pixel_auroc",
    "aupro",
    "spro",
    "image_ap",
    "pixel_ap",
    "image_f1_max",
    "pixel_f1_max",
    "pixel_iou",
)
# Operating points for downstream use (binary decisions, mask rendering); not averaged over
# categories because each category's scores live on their own scale.
THRESHOLD_NAMES: tuple[str, ...] = ("image_threshold", "pixel_threshold")

_IMAGE_KEYS = ("image_auroc", "image_ap", "image_f1_max", "image_threshold")
_PIXEL_KEYS = ("pixel_auroc", "pixel_ap", "pixel_f1_max", "pixel_iou", "aupro", "spro", "pixel_threshold")
# The integration limit of MVTec LOCO's official evaluation script (its default; it also prints 0.01, 0.1, 0.3, 1).
SPRO_FPR_LIMIT = 0.05
Regions = tuple[np.ndarray, np.ndarray]  # one image's defects: masks bool [R, H, W], saturation areas [R] (pixels)
NO_REGIONS = "no defect regions with saturation areas (MVTec LOCO's defects_config.json) were given"

# Same 8-connectivity as MVTec's scipy.ndimage.label(mask, np.ones((3, 3))), applied to every
# image of an [N, H, W] stack in one call: the empty outer slices keep images apart.
_REGION_STRUCTURE = np.zeros((3, 3, 3), dtype=bool)
_REGION_STRUCTURE[1] = True


@dataclass
class MetricReport:
    """Metric values of one category (or a mean), with the reason behind every missing value.

    ``notes`` explains each ``None`` in ``values``; for a mean it also says how many categories
    a defined value left out.
    """

    values: dict[str, float | None]
    notes: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"values": dict(self.values), "notes": dict(self.notes)}


def image_metrics(labels: np.ndarray, scores: np.ndarray) -> dict[str, float | None]:
    """AUROC, AP, max F1 and the F1-optimal threshold of image scores against 0/1 labels."""
    return _image_metrics(labels, scores)[0]


def pixel_metrics(
    masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3, regions: Sequence[Regions] | None = None,
) -> dict[str, float | None]:
    """Pixel AUROC, AP, max F1, IoU at the F1-optimal threshold, AUPRO, sPRO (with ``regions``) and that threshold."""
    return _pixel_metrics(masks, maps, fpr_limit, regions)[0]


def aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Normalized area under the PRO curve up to ``fpr_limit`` (1.0 = perfect).

    Unlike pixel AUROC, every ground-truth region weighs the same however many pixels it has,
    so small defects are not drowned out by large ones.
    """
    masks, maps = _check_pixels(masks, maps)
    _check_fpr_limit(fpr_limit)
    reason = _pixel_degeneracy(masks)
    if reason is not None:
        raise ValueError(f"{reason}: aupro is undefined")
    return _aupro(masks, maps, fpr_limit)


def spro(masks: np.ndarray, maps: np.ndarray, regions: Sequence[Regions], fpr_limit: float = SPRO_FPR_LIMIT) -> float:
    """MVTec LOCO's AU-sPRO: normalized area under the saturated-PRO curve up to ``fpr_limit`` (1.0 = perfect).

    ``regions[i]`` are image i's ground-truth defects (one per LOCO mask file, not per connected component:
    a defect such as a missing object may be several blobs) with their saturation areas, and their union
    must be ``masks[i]`` (none for a normal image). At a threshold t, a defect's sPRO is
    ``min(TP area / saturation area, 1)``: a defect larger than its saturation area counts fully once that
    many of its pixels score >= t, so finding enough of a large logical anomaly is enough. The curve is the
    mean sPRO over all defects of all images against the FPR over every pixel outside them, integrated
    exactly (every distinct threshold) and divided by ``fpr_limit``.

    This follows the semantics of MVTec's official evaluation code for MVTec LOCO AD (``mvtec_loco_ad_evaluation``:
    ``src/metrics.py`` ``get_spros_for_thresholds``, ``get_fp_tn_areas_per_image``, ``get_fp_rates``;
    ``src/aggregation.py`` ``ThresholdMetrics.get_mean_spros``; ``src/util.py`` ``get_auc_for_max_fpr``,
    ``trapz``; ``evaluate_experiment.py`` ``MAX_FPRS``), re-implemented, not copied. It differs only where
    that code approximates or is undefined: the official script samples thresholds by binary refinement up
    to ``curve_max_distance`` (this curve is its limit), and a saturation area of 0 (a relative threshold
    truncated on a tiny region) divides by zero there; ``data.defects`` makes it at least 1 pixel.
    anomalib's ``SPRO`` (src/anomalib/metrics/spro.py, anomalib 1.x) is the same per-defect ratio at one
    fixed threshold, with no curve.
    """
    masks, maps = _check_pixels(masks, maps)
    _check_fpr_limit(fpr_limit)
    _check_regions(regions, masks)
    reason = _pixel_degeneracy(masks)
    if reason is not None:
        raise ValueError(f"{reason}: spro is undefined")
    return _spro(masks, maps, regions, fpr_limit)


def compute_metrics(
    labels: np.ndarray,
    scores: np.ndarray,
    masks: np.ndarray | None = None,
    maps: np.ndarray | None = None,
    fpr_limit: float = 0.3,
    regions: Sequence[Regions] | None = None,
) -> MetricReport:
    """All metrics of one category; pixel metrics are ``None`` (with a note) without masks, sPRO without
    ``regions`` (see ``spro``; MVTec LOCO's defects with their saturation areas, one entry per image)."""
    values, notes = _image_metrics(labels, scores)
    if masks is None:
        pixel_values = dict.fromkeys(_PIXEL_KEYS)
        pixel_notes = _undefined_notes(_PIXEL_KEYS, "dataset has no ground-truth masks")
    else:
        if maps is None:
            raise ValueError("maps is required when masks are given")
        if np.shape(masks)[:1] != np.shape(labels)[:1]:
            raise ValueError(
                f"masks has shape {np.shape(masks)} but labels has shape {np.shape(labels)}; "
                "they must have one entry per image"
            )
        pixel_values, pixel_notes = _pixel_metrics(masks, maps, fpr_limit, regions)
    values.update(pixel_values)
    notes.update(pixel_notes)
    return MetricReport(values=values, notes=notes)


GROUP_SEPARATOR = "/"  # a metric group's values sit beside the category's as <group>/<metric>


def grouped_name(group: str, metric: str) -> str:
    """The key of ``group``'s ``metric`` in a report's values, e.g. ``logical/image_auroc``."""
    return f"{group}{GROUP_SEPARATOR}{metric}"


def grouped_names(values: Mapping[str, object]) -> list[str]:
    """The metric-group keys among ``values``, sorted (none for most datasets)."""
    return sorted(name for name in values if GROUP_SEPARATOR in name)


def group_indices(samples: Sequence[Sample], groups: Mapping[str, Sequence[str]]) -> dict[str, list[int]]:
    """Per group (name -> defect types, e.g. ``data.metric_groups(fmt)``), the sorted indices of the ``samples``
    it is scored on: every normal image plus the anomalies of its defect types.

    Sharing the normal images is how MVTec LOCO scores structural and logical anomalies apart.
    """
    normal = [index for index, sample in enumerate(samples) if sample.label == 0]
    return {
        name: sorted(normal + [i for i, s in enumerate(samples) if s.label == 1 and s.defect_type in types])
        for name, types in groups.items()
    }


def group_metrics(
    groups: Mapping[str, Sequence[int]],
    labels: np.ndarray,
    scores: np.ndarray,
    masks: np.ndarray | None = None,
    maps: np.ndarray | None = None,
    fpr_limit: float = 0.3,
    regions: Sequence[Regions] | None = None,
) -> dict[str, MetricReport]:
    """``compute_metrics`` of each group's index subset (``group_indices``) of one category's test arrays."""
    reports = {}
    for name, indices in groups.items():
        take = np.asarray(indices, dtype=np.int64)
        reports[name] = compute_metrics(
            np.asarray(labels)[take],
            np.asarray(scores)[take],
            None if masks is None else np.asarray(masks)[take],
            None if maps is None else np.asarray(maps)[take],
            fpr_limit,
            None if regions is None else [regions[i] for i in take],
        )
    return reports


def mean_metrics(reports: Sequence[MetricReport]) -> MetricReport:
    """Per-metric mean over the categories where the metric is defined.

    Skipping rather than failing keeps one degenerate category from hiding the others; the
    notes say how many were skipped so a mean over fewer categories is not mistaken for a full one.
    Thresholds are left out: each category's scores live on their own scale.
    """
    if not reports:
        raise ValueError("reports is empty: nothing to average")
    values: dict[str, float | None] = {}
    notes: dict[str, str] = {}
    grouped = sorted({name for r in reports for name in grouped_names(r.values)})
    for name in [*METRIC_NAMES, *grouped]:
        defined = [r.values[name] for r in reports if r.values.get(name) is not None]
        skipped = len(reports) - len(defined)
        values[name] = float(np.mean(defined)) if defined else None
        if not defined:
            notes[name] = f"undefined in all {len(reports)} categories"
        elif skipped:
            notes[name] = (
                f"mean over {len(defined)} of {len(reports)} categories; "
                f"{skipped} skipped where it is undefined"
            )
    return MetricReport(values=values, notes=notes)


def _image_metrics(labels: np.ndarray, scores: np.ndarray) -> tuple[dict, dict[str, str]]:
    labels = _as_binary("labels", labels, ndim=1)
    scores = _as_finite("scores", scores, ndim=1)
    _check_same_shape("labels", labels, "scores", scores)
    n_anomalous = int(labels.sum())
    if n_anomalous == 0:
        return _undefined(_IMAGE_KEYS, "test split has no anomalous images")
    if n_anomalous == labels.size:
        return _undefined(_IMAGE_KEYS, "test split has only anomalous images")
    auroc, ap, f1_max, threshold = _ranking_metrics(_curve(labels, scores, _descending(scores)))
    values = {"image_auroc": auroc, "image_ap": ap, "image_f1_max": f1_max, "image_threshold": threshold}
    return values, {}


def _pixel_metrics(
    masks: np.ndarray, maps: np.ndarray, fpr_limit: float, regions: Sequence[Regions] | None,
) -> tuple[dict, dict[str, str]]:
    masks, maps = _check_pixels(masks, maps)
    _check_fpr_limit(fpr_limit)
    if regions is not None:
        _check_regions(regions, masks)
    reason = _pixel_degeneracy(masks)
    if reason is not None:
        return _undefined(_PIXEL_KEYS, reason)
    flat_masks, flat_maps = masks.ravel(), maps.ravel()
    order = _descending(flat_maps)
    auroc, ap, f1_max, threshold = _ranking_metrics(_curve(flat_masks, flat_maps, order))
    predicted = flat_maps >= threshold
    iou = np.count_nonzero(predicted & flat_masks) / np.count_nonzero(predicted | flat_masks)
    values = {
        "pixel_auroc": auroc,
        "pixel_ap": ap,
        "pixel_f1_max": f1_max,
        "pixel_iou": float(iou),
        "aupro": _aupro(masks, maps, fpr_limit, order),
        "spro": None if regions is None else _spro(masks, maps, regions, SPRO_FPR_LIMIT, order),
        "pixel_threshold": threshold,
    }
    return values, {} if regions is not None else _undefined_notes(("spro",), NO_REGIONS)


def _descending(scores: np.ndarray) -> np.ndarray:
    """The order that sorts scores from high to low (ties in any order: curves read tie-group ends)."""
    return np.argsort(scores)[::-1]


def _curve(labels: np.ndarray, scores: np.ndarray, order: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """True and false positives when predicting anomalous at ``score >= t``, for every distinct t (descending).

    scikit-learn's ``_binary_clf_curve``, on a sort the caller shares with AUPRO.
    """
    sorted_scores = scores[order]
    ends = np.append(np.flatnonzero(sorted_scores[1:] != sorted_scores[:-1]), len(order) - 1)
    tps = np.cumsum(labels[order], dtype=np.int64)[ends]
    return tps, ends + 1 - tps, sorted_scores[ends]


def _ranking_metrics(curve: tuple[np.ndarray, np.ndarray, np.ndarray]) -> tuple[float, float, float, float]:
    """AUROC, AP, max F1 and its threshold (predict anomalous where score >= threshold).

    AUROC is the trapezoid area under (FPR, TPR) from (0, 0); AP is ``sum (R_n - R_{n-1}) P_n``; the
    F1 maximum is taken over the thresholds down to the first that reaches full recall, ties going to
    the lowest threshold — all as scikit-learn's ``roc_auc_score``, ``average_precision_score`` and
    ``precision_recall_curve`` define them.
    """
    tps, fps, thresholds = curve
    positives, negatives = tps[-1], fps[-1]
    tpr = np.concatenate(([0.0], tps / positives))
    fpr = np.concatenate(([0.0], fps / negatives))
    auroc = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    last = int(np.searchsorted(tps, positives)) + 1  # thresholds below full recall add nothing
    tps, fps, thresholds = tps[:last], fps[:last], thresholds[:last]
    precision = tps / (tps + fps)
    recall = tps / positives
    ap = float(np.sum(np.diff(np.concatenate(([0.0], recall))) * precision))
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(denominator), where=denominator > 0)
    best = last - 1 - int(np.argmax(f1[::-1]))  # the lowest threshold among equal maxima
    return auroc, ap, float(f1[best]), float(thresholds[best])


def _aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float, order: np.ndarray | None = None) -> float:
    """Exact AUPRO of validated, non-degenerate inputs (see ``aupro``); ``order``: a shared descending sort."""
    regions, n_regions = ndimage.label(masks, structure=_REGION_STRUCTURE)
    regions = regions.ravel()
    sizes = np.bincount(regions)  # sizes[0]: normal pixels
    # Lowering the threshold past a pixel raises the overlap of its region by 1/size, and the
    # PRO (mean overlap over regions) by 1/(size * n_regions); a normal pixel adds one FP.
    pro_step = np.zeros(len(sizes))
    pro_step[1:] = 1.0 / (sizes[1:] * n_regions)
    flat_maps = maps.ravel()
    order = _descending(flat_maps) if order is None else order
    sorted_regions = regions[order]
    return _overlap_curve_area(flat_maps[order], sorted_regions == 0, pro_step[sorted_regions], fpr_limit)


def _spro(masks: np.ndarray, maps: np.ndarray, regions: Sequence[Regions], fpr_limit: float,
          order: np.ndarray | None = None) -> float:
    """Exact AU-sPRO of validated, non-degenerate inputs (see ``spro``); ``order``: a shared descending sort.

    A defect of saturation area s gains 1/s per pixel for its first floor(s) pixels in score order, and the
    rest of the way to 1 on the next (s need not be whole); its later pixels add nothing. The gains go to
    each pixel's position in the sort, so defects that overlap (LOCO's files may) each count the pixel.
    """
    flat_maps = maps.ravel()
    order = _descending(flat_maps) if order is None else order
    position = np.empty(order.size, dtype=np.int64)
    position[order] = np.arange(order.size)
    image_pixels = masks[0].size
    positions, gains = [], []
    for image, (defects, saturation) in enumerate(regions):
        for defect, area in zip(defects, saturation):
            ranked = np.sort(position[np.flatnonzero(defect) + image * image_pixels])
            whole = int(np.floor(area))  # area <= the defect's pixel count: checked
            positions += [ranked[:whole], ranked[whole : whole + 1]]
            gains += [np.full(whole, 1.0 / area), np.full(min(1, len(ranked) - whole), 1.0 - whole / area)]
    n_defects = sum(len(saturation) for _, saturation in regions)
    gain = np.bincount(np.concatenate(positions), np.concatenate(gains), minlength=order.size) / n_defects
    return _overlap_curve_area(flat_maps[order], ~masks.ravel()[order], gain, fpr_limit)


def _overlap_curve_area(
    sorted_scores: np.ndarray, sorted_normal: np.ndarray, overlap_gain: np.ndarray, fpr_limit: float,
) -> float:
    """Normalized area up to ``fpr_limit`` under (FPR, mean overlap) read after each tie group of the descending
    sort: ``sorted_normal`` marks the normal pixels, ``overlap_gain`` what each pixel adds to the mean overlap."""
    fpr = np.cumsum(sorted_normal) / np.count_nonzero(sorted_normal)
    overlap = np.minimum(np.cumsum(overlap_gain), 1.0)  # sums of 1/size may overshoot 1 by a rounding
    # A threshold admits all pixels scoring >= it: read the curve at the end of each tie group.
    group_end = np.append(sorted_scores[1:] != sorted_scores[:-1], True)
    fpr = np.concatenate(([0.0], fpr[group_end]))
    overlap = np.concatenate(([0.0], overlap[group_end]))
    return _area_up_to(fpr, overlap, fpr_limit) / fpr_limit


def _area_up_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under a curve with nondecreasing x from x[0] up to x_max.

    The curve is interpolated exactly at x_max, so the result does not depend on whether
    some threshold happens to land on the limit.
    """
    end = int(np.searchsorted(x, x_max, side="right"))
    xs, ys = x[:end], y[:end]
    if end < len(x) and xs[-1] < x_max:
        y_max = ys[-1] + (y[end] - ys[-1]) * (x_max - xs[-1]) / (x[end] - xs[-1])
        xs, ys = np.append(xs, x_max), np.append(ys, y_max)
    return float(np.sum(np.diff(xs) * (ys[1:] + ys[:-1]) / 2))


def _pixel_degeneracy(masks: np.ndarray) -> str | None:
    """Why pixel metrics are undefined for these masks, or None if both classes are present."""
    n_anomalous = np.count_nonzero(masks)
    if n_anomalous == 0:
        return "ground-truth masks have no anomalous pixels"
    if n_anomalous == masks.size:
        return "ground-truth masks have no normal pixels"
    return None


def _undefined(keys: Sequence[str], reason: str) -> tuple[dict, dict[str, str]]:
    return dict.fromkeys(keys), _undefined_notes(keys, reason)


def _undefined_notes(keys: Sequence[str], reason: str) -> dict[str, str]:
    return {key: f"{reason}: {key} is undefined" for key in keys}


def _check_pixels(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    masks = _as_binary("masks", masks, ndim=3)
    maps = _as_finite("maps", maps, ndim=3)
    _check_same_shape("masks", masks, "maps", maps)
    return masks, maps


def _check_regions(regions: Sequence[Regions], masks: np.ndarray) -> None:
    """Each image's defects: bool [R, H, W] with positive saturation areas no larger than the defect, uniting
    to exactly the image's mask (else the sPRO and its FPR would describe different ground truths)."""
    if len(regions) != len(masks):
        raise ValueError(f"regions has {len(regions)} entries but masks has {len(masks)} images; one per image")
    for image, (defects, saturation) in enumerate(regions):
        defects, saturation = np.asarray(defects), np.asarray(saturation, dtype=np.float64)
        where = f"regions[{image}]"
        if defects.dtype != bool or defects.ndim != 3 or defects.shape[1:] != masks.shape[1:]:
            raise ValueError(f"{where}: defect masks must be bool [R, {masks.shape[1]}, {masks.shape[2]}], "
                             f"got {defects.dtype} {list(defects.shape)}")
        areas = np.count_nonzero(defects, axis=(1, 2))
        if saturation.shape != areas.shape or not (np.isfinite(saturation) & (saturation > 0)).all():
            raise ValueError(f"{where}: need one finite saturation area > 0 per defect, got {saturation.tolist()}")
        if (saturation > areas).any():
            raise ValueError(f"{where}: saturation areas {saturation.tolist()} exceed the defect areas {areas.tolist()}")
        if not np.array_equal(defects.any(axis=0), masks[image]):
            raise ValueError(f"{where}: the defects' union differs from masks[{image}]")


def _check_fpr_limit(fpr_limit: float) -> None:
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit!r}")


def _check_same_shape(name_a: str, a: np.ndarray, name_b: str, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_a} has shape {a.shape} but {name_b} has shape {b.shape}; they must match")


def _as_finite(name: str, array: np.ndarray, ndim: int) -> np.ndarray:
    """As float64 (no copy if it already is): one precision for thresholds and sums, whatever the input."""
    array = np.asarray(array, dtype=np.float64)
    _check_ndim(name, array, ndim)
    if not np.isfinite(array).all():
        raise ValueError(f"{name} (shape {array.shape}) contains NaN or inf")
    return array


def _as_binary(name: str, array: np.ndarray, ndim: int) -> np.ndarray:
    array = np.asarray(array)
    _check_ndim(name, array, ndim)
    if array.dtype != bool:
        if not ((array == 0) | (array == 1)).all():
            raise ValueError(f"{name} (shape {array.shape}) must be binary: only 0/1 or bool values")
        array = array.astype(bool)
    return array


def _check_ndim(name: str, array: np.ndarray, ndim: int) -> None:
    if array.ndim != ndim:
        expected = "[N]" if ndim == 1 else "[N, H, W]"
        raise ValueError(f"{name} must have shape {expected}, got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{name} is empty (shape {array.shape})")
