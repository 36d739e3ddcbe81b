"""The run's local report: report.md, metrics.csv, timings.csv and PNG figures in ``outputs/<run>/``.

It is what someone reads after a run without opening W&B (or when tracking is off), so it holds the
same numbers as summary.json in tables, and the pictures that say more than a number: AUROC per
category, image-level ROC curves and, per category, the best- and worst-scored test images with
their ground truth and anomaly map. The W&B tracker and ``jobs.predict`` draw their images with the
helpers here, so every view of a prediction looks the same.

Figures are drawn on ``matplotlib.figure.Figure`` with the Agg canvas, never through pyplot: no
global state and no display needed on a cluster node.
"""

from __future__ import annotations

import csv
import io
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from PIL import Image
from scipy import ndimage
from sklearn.metrics import roc_auc_score, roc_curve

from anomaly_core.bank import atomic_write
from anomaly_core.data import ImageTransform, load_mask, read_rgb
from anomaly_core.metrics import (
    GROUP_SEPARATOR,
    METRIC_NAMES,
    THRESHOLD_NAMES,
    grouped_name,
    grouped_names,
    mean_metrics,
)

if TYPE_CHECKING:  # the pipeline module imports ray, which predict and the report do not need
    from cluster.pipeline import CategoryResult

TIMING_KEYS: tuple[str, ...] = ("extract_train_s", "coreset_s", "train_s", "evaluate_s", "metrics_s")


def timing_keys(results: Sequence[CategoryResult]) -> list[str]:
    """The stages the results have: a bank's extraction and coreset, or a trained model's training."""
    return [key for key in TIMING_KEYS if any(key in result.timings for result in results)]
FIGURES = "figures"
HEATMAP = "jet"
DPI = 110


# --- tables -------------------------------------------------------------------------------------


def bank_rows_and_sha256(result: CategoryResult) -> tuple[int, str]:
    """The bank's size and digest, from its saved record once ``released`` has dropped its rows."""
    bank = result.bank
    if len(bank.features) == 0 and "bank_sha256" in bank.metadata:
        return int(bank.metadata["memory_size"]), str(bank.metadata["bank_sha256"])
    return int(bank.features.shape[0]), bank.sha256


def metric_rows(results: Sequence[CategoryResult]) -> list[dict[str, Any]]:
    """One row per category and a last ``mean`` row (thresholds and sizes are per category only)."""
    rows = []
    for result in results:
        values = result.report.values
        rows.append({
            "dataset": result.job.dataset,
            "category": result.job.split.category,
            **{name: values.get(name) for name in (*METRIC_NAMES, *THRESHOLD_NAMES)},
            "memory_size": bank_rows_and_sha256(result)[0],
            "n_train": len(result.job.split.train),
            "n_test": len(result.test_samples),
        })
    if results:
        mean = mean_metrics([result.report for result in results]).values
        rows.append({"dataset": "mean", "category": "", **{name: mean.get(name) for name in METRIC_NAMES}})
    return rows


def group_rows(results: Sequence[CategoryResult]) -> list[dict[str, Any]]:
    """One row per category and metric group (``<group>/<metric>`` values, e.g. MVTec LOCO's logical and
    structural anomalies); empty when no dataset reports groups."""
    rows = []
    for result in results:
        values = result.report.values
        for group in sorted({name.split(GROUP_SEPARATOR, 1)[0] for name in grouped_names(values)}):
            rows.append({"dataset": result.job.dataset, "category": result.job.split.category, "group": group,
                         **{name: values.get(grouped_name(group, name)) for name in METRIC_NAMES}})
    return rows


def timing_rows(results: Sequence[CategoryResult]) -> list[dict[str, Any]]:
    """Stage seconds per category, train-extraction throughput, and a last ``mean`` row."""
    rows = []
    for result in results:
        timings = {key: result.timings.get(key) for key in timing_keys(results)}
        extract = timings.get("extract_train_s")
        rows.append({
            "dataset": result.job.dataset,
            "category": result.job.split.category,
            **timings,
            "total_s": round(sum(value or 0.0 for value in timings.values()), 4),
            "extract_images_per_s": round(len(result.job.split.train) / extract, 3) if extract else None,
        })
    if rows:
        keys = [*timing_keys(results), "total_s", "extract_images_per_s"]
        rows.append({"dataset": "mean", "category": "", **{key: _mean([row[key] for row in rows]) for key in keys}})
    return rows


def _mean(values: Sequence[float | None]) -> float | None:
    defined = [value for value in values if value is not None]
    return round(float(np.mean(defined)), 4) if defined else None


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Rows as CSV with the first row's keys as columns; a missing or None value is an empty cell."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows([{key: "" if value is None else value for key, value in row.items()} for row in rows])
    atomic_write(path, lambda tmp: Path(tmp).write_text(buffer.getvalue()))


# --- pictures -----------------------------------------------------------------------------------


def display_image(rgb: np.ndarray, transform: ImageTransform) -> np.ndarray:
    """An image as the model saw it (resized, cropped, not normalised): uint8 [crop, crop, 3], aligned with the maps."""
    plain = replace(transform, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    return np.round(np.clip(plain.image(rgb).permute(1, 2, 0).numpy(), 0.0, 1.0) * 255).astype(np.uint8)


def heatmap_overlay(
    image: np.ndarray, amap: np.ndarray, vmin: float, vmax: float, outline: np.ndarray | None = None, alpha: float = 0.5
) -> np.ndarray:
    """Blend the anomaly map (coloured on [vmin, vmax]) over the image; white outline around ``outline``."""
    scaled = np.clip((amap - vmin) / max(vmax - vmin, 1e-12), 0.0, 1.0)
    colours = colormaps[HEATMAP](scaled)[..., :3] * 255
    blended = (1 - alpha) * image.astype(np.float64) + alpha * colours
    if outline is not None and outline.any():
        blended[outline & ~ndimage.binary_erosion(outline, iterations=2)] = 255
    return np.round(blended).astype(np.uint8)


def write_png(path: Path, rgb: np.ndarray) -> None:
    atomic_write(path, lambda tmp: Image.fromarray(rgb).save(tmp, format="PNG"))


def ranked_examples(result: CategoryResult, n: int) -> tuple[list[int], list[int]]:
    """Indices of the ``n`` worst and ``n`` best test images, worst first and best first.

    An image is good when its score is on the right side of the image threshold: high for an
    anomaly, low for a normal image. Without a threshold (a split with one class only) the raw
    score plays that role, which orders single-class splits the same way.
    """
    scores = result.predictions.scores
    labels = np.asarray([sample.label for sample in result.test_samples])
    threshold = result.report.values.get("image_threshold") or 0.0
    margin = np.where(labels == 1, 1.0, -1.0) * (scores - threshold)
    order = np.argsort(margin, kind="stable")
    n = min(n, len(order) // 2)
    return [int(i) for i in order[:n]], [int(i) for i in order[::-1][:n]]


def _save(figure: Figure, path: Path) -> Path:
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight"))
    return path


def _label(result: CategoryResult, several_datasets: bool) -> str:
    return result.job.key if several_datasets else result.job.split.category


def auroc_figure(results: Sequence[CategoryResult], path: Path) -> Path:
    """Grouped bars of image and pixel AUROC per category, with the means as dashed lines."""
    several = len({result.job.dataset for result in results}) > 1
    labels = [_label(result, several) for result in results]
    positions = np.arange(len(results))
    figure = Figure(figsize=(max(6.0, 0.75 * len(results) + 2.5), 4.5))
    axes = figure.add_subplot()
    for offset, (name, title, colour) in zip((-0.2, 0.2), (("image_auroc", "image AUROC", "tab:blue"),
                                                           ("pixel_auroc", "pixel AUROC", "tab:orange"))):
        values = [result.report.values.get(name) for result in results]
        bars = axes.bar(positions + offset, [value or 0.0 for value in values], width=0.4, color=colour, label=title)
        # Inside the bars, so the labels never collide with the mean lines above them.
        axes.bar_label(bars, labels=["" if v is None else f"{v:.3f}" for v in values], label_type="center",
                       rotation=90, fontsize=8, color="white")
        for x, value in zip(positions + offset, values):
            if value is None:
                axes.text(x, 0.02, "n/a", rotation=90, ha="center", va="bottom", fontsize=8)
        defined = [value for value in values if value is not None]
        if defined:
            axes.axhline(float(np.mean(defined)), color=colour, linestyle="--", linewidth=1,
                         label=f"mean {title} {np.mean(defined):.3f}")
    axes.set_xticks(positions, labels, rotation=45 if len(results) > 4 else 0, ha="right" if len(results) > 4 else "center")
    axes.set_ylim(0.0, 1.25)  # the band above 1.0 holds the legend
    axes.set_yticks(np.linspace(0.0, 1.0, 6))
    axes.set_ylabel("AUROC")
    axes.set_title("AUROC per category")
    axes.legend(loc="upper center", ncol=4 if len(results) > 5 else 2, fontsize=8, frameon=False)
    return _save(figure, path)


def roc_figure(results: Sequence[CategoryResult], path: Path) -> Path:
    """Image-level ROC curve of every category that has both normal and anomalous test images."""
    several = len({result.job.dataset for result in results}) > 1
    figure = Figure(figsize=(6.5, 5.5))
    axes = figure.add_subplot()
    palette = colormaps["tab20" if len(results) > 10 else "tab10"]
    for position, result in enumerate(results):
        labels = np.asarray([sample.label for sample in result.test_samples])
        if labels.min() == labels.max():
            continue
        fpr, tpr, _ = roc_curve(labels, result.predictions.scores)
        auc = roc_auc_score(labels, result.predictions.scores)
        axes.plot(fpr, tpr, color=palette(position % palette.N), linewidth=1.5,
                  label=f"{_label(result, several)} (AUROC {auc:.3f})")
    axes.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    axes.set_xlim(-0.01, 1.01)
    axes.set_ylim(-0.01, 1.01)
    axes.set_aspect("equal")
    axes.set_xlabel("false positive rate")
    axes.set_ylabel("true positive rate")
    axes.set_title("Image-level ROC")
    if axes.get_lines()[:-1]:
        axes.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8, frameon=False)
    return _save(figure, path)


def samples_figure(result: CategoryResult, transform: ImageTransform, path: Path, n: int = 2) -> Path:
    """Rows of the worst and best test images: image, ground-truth mask, anomaly map over the image.

    All maps share the category's colour scale, so colours compare across rows; the white outline
    is the predicted mask at the pixel threshold.
    """
    worst, best = ranked_examples(result, n)
    rows = [("worst", i) for i in worst] + [("best", i) for i in best]
    maps = result.predictions.maps
    vmin, vmax = float(maps.min()), float(maps.max())
    pixel_threshold = result.report.values.get("pixel_threshold")
    image_threshold = result.report.values.get("image_threshold")
    figure = Figure(figsize=(10.5, 3.3 * max(len(rows), 1)), layout="constrained")
    figure.suptitle(f"{result.job.key}: worst and best scored test images", fontsize=12)
    grid = figure.subplots(max(len(rows), 1), 3, squeeze=False)
    for (kind, index), axes in zip(rows, grid):
        sample = result.test_samples[index]
        score = float(result.predictions.scores[index])
        mask = load_mask(sample, transform)
        outline = maps[index] >= pixel_threshold if pixel_threshold is not None else None
        verdict = "" if image_threshold is None else f", predicted {'anomalous' if score >= image_threshold else 'normal'}"
        image = display_image(read_rgb(sample.image_path), transform)
        axes[0].imshow(image)
        axes[0].set_title(f"{kind}: {sample.defect_type}/{Path(sample.image_path).name}", fontsize=9)
        if mask is None:
            axes[1].text(0.5, 0.5, "no mask", ha="center", va="center", transform=axes[1].transAxes)
        else:
            axes[1].imshow(mask.numpy(), cmap="gray", vmin=0, vmax=1)
        axes[1].set_title("ground truth" + (" (anomalous)" if sample.label else " (normal)"), fontsize=9)
        axes[2].imshow(image)
        heat = axes[2].imshow(maps[index], cmap=HEATMAP, vmin=vmin, vmax=vmax, alpha=0.5)
        if outline is not None and outline.any():
            axes[2].contour(outline, levels=[0.5], colors="white", linewidths=1)
        axes[2].set_title(f"score {score:.3f}{verdict}", fontsize=9)
        figure.colorbar(heat, ax=axes[2], fraction=0.046, pad=0.02, label="anomaly score")
        for ax in axes:
            ax.set_xticks([])
            ax.set_yticks([])
    return _save(figure, path)


def training_figure(history: Sequence[dict[str, Any]], steps: Sequence[dict[str, Any]], title: str, path: Path) -> Path:
    """A trained category's training: loss per logged step and per epoch with, where it was validated, the test
    set's image and pixel AUROC (top); the learning rate per logged step (bottom)."""
    figure = Figure(figsize=(6.5, 5.5))
    axes, rate = figure.subplots(2, 1, sharex=False, height_ratios=(3, 1))
    axes.plot([entry["epoch"] + 1 for entry in history], [entry["loss"] for entry in history], color="tab:blue",
              marker=".", label="epoch mean loss")
    if steps:
        per_epoch = max(1, max(entry["step"] for entry in history) // max(len(history), 1)) if history else 1
        axes.plot([entry["step"] / per_epoch for entry in steps], [entry["loss"] for entry in steps],
                  color="tab:blue", alpha=0.3, linewidth=0.8, label="logged step loss")
        rate.plot([entry["step"] for entry in steps], [entry["lr"] for entry in steps], color="tab:green")
    rate.set_xlabel("optimisation step")
    rate.set_ylabel("learning rate")
    axes.set_xlabel("epoch")
    axes.set_ylabel("loss")
    validated = [entry for entry in history if entry.get("metrics")]
    if validated:
        right = axes.twinx()
        for name, colour in (("image_auroc", "tab:red"), ("pixel_auroc", "tab:orange")):
            points = [(entry["epoch"] + 1, entry["metrics"][name]) for entry in validated
                      if entry["metrics"].get(name) is not None]
            if points:
                right.plot(*zip(*points), marker="o", color=colour, label=name.replace("_", " "))
        right.set_ylim(0.0, 1.0)
        right.set_ylabel("AUROC (test set)")
        right.legend(loc="lower right", fontsize=8, frameon=False)
    axes.legend(loc="upper center", fontsize=8, frameon=False)
    axes.set_title(title)
    figure.tight_layout()
    return _save(figure, path)


# --- the report ---------------------------------------------------------------------------------


def figure_paths(run_dir: Path, results: Sequence[CategoryResult]) -> dict[str, Path]:
    """Where ``write_report`` puts each figure, by a short name (used for links and W&B uploads)."""
    figures = Path(run_dir) / FIGURES
    paths = {"auroc": figures / "auroc.png", "roc": figures / "roc.png"}
    for result in results:
        name = f"{result.job.dataset}__{result.job.split.category}.png"
        paths[f"samples/{result.job.key}"] = figures / "samples" / name
        if "train_s" in result.timings:  # a trained model's (jobs.train): its training curve
            paths[f"training/{result.job.key}"] = figures / "training" / name
    return paths


def write_category_figure(run_dir: Path, result: CategoryResult, transform: ImageTransform, examples: int = 2) -> Path:
    """The category's worst/best images, drawn when it finishes: its anomaly maps need not outlive it
    (a run of hundreds of categories would otherwise hold every category's maps for the report)."""
    return samples_figure(result, transform, figure_paths(run_dir, [result])[f"samples/{result.job.key}"], examples)


def write_report(run_dir: Path, results: Sequence[CategoryResult], summary: dict[str, Any] | None = None) -> Path:
    """Write report.md, metrics.csv, timings.csv and the run's figures into ``run_dir``; returns report.md.

    Needs each category's scores, not its maps: the per-category figures are already drawn
    (``write_category_figure``) and only linked here.
    """
    if not results:
        raise ValueError("no category results to report")
    run_dir = Path(run_dir)
    metrics, timings = metric_rows(results), timing_rows(results)
    write_csv(run_dir / "metrics.csv", metrics)
    write_csv(run_dir / "timings.csv", timings)
    paths = figure_paths(run_dir, results)
    missing = [str(paths[f"samples/{result.job.key}"]) for result in results
               if not paths[f"samples/{result.job.key}"].is_file()]
    if missing:
        raise FileNotFoundError(f"category figures not drawn: {missing}")
    auroc_figure(results, paths["auroc"])
    roc_figure(results, paths["roc"])
    report = run_dir / "report.md"
    text = _markdown(run_dir, results, metrics, timings, paths, summary or {})
    atomic_write(report, lambda tmp: Path(tmp).write_text(text))
    return report


def _markdown(
    run_dir: Path,
    results: Sequence[CategoryResult],
    metrics: list[dict[str, Any]],
    timings: list[dict[str, Any]],
    paths: dict[str, Path],
    summary: dict[str, Any],
) -> str:
    def link(name: str) -> str:
        return paths[name].relative_to(run_dir).as_posix()

    run_timings = summary.get("timings", {})
    lines = [f"# Benchmark report: {summary.get('run', run_dir.name)}", ""]
    if summary:
        lines.append(
            f"{len(results)} categories, created {summary.get('created', '?')}; wall time "
            f"{run_timings.get('total_s', '?')} s, {run_timings.get('images_per_s', '?')} images/s overall."
        )
        lines.append("")
    metric_columns = ["dataset", "category", *METRIC_NAMES, "memory_size"]
    lines += ["## Metrics", "", *_table(metric_columns, metrics), ""]
    undefined = [
        f"- {result.job.key}: {note}" for result in results for note in sorted(set(result.report.notes.values()))
    ]
    if undefined:
        lines += ["Undefined values (n/a):", "", *undefined, ""]
    groups = group_rows(results)
    if groups:
        lines += ["### Metric groups", "", "Each group is scored on all normal test images plus its own anomalies; an ensemble member (named by its backbone) on the whole test set.", "",
                  *_table(["dataset", "category", "group", *METRIC_NAMES], groups), ""]
    lines += ["## Timings (seconds)", "",
              "extract_train_s is actor time embedding the train images; evaluate_s runs from the bank's "
              "submission to its scored test set (test extraction included).", "",
              *_table(["dataset", "category", *timing_keys(results), "total_s", "extract_images_per_s"], timings), ""]
    trained = [result for result in results if f"training/{result.job.key}" in paths]
    if trained:
        lines += ["## Training", "", "Training loss per epoch and, where validated, the test set's AUROC.", ""]
        lines += [f"![{result.job.key} training]({link(f'training/{result.job.key}')})" for result in trained] + [""]
    lines += ["## Figures", "", f"![AUROC per category]({link('auroc')})", "", f"![Image-level ROC]({link('roc')})", "",
              "### Worst and best scored test images", ""]
    for result in results:
        lines += [f"#### {result.job.key}", "", f"![{result.job.key}]({link(f'samples/{result.job.key}')})", ""]
    return "\n".join(lines)


def _table(columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> list[str]:
    """A Markdown table; the mean row is bold so it stands apart from the categories."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        cells = [_cell(row[column]) if column in row else "" for column in columns]
        if row["dataset"] == "mean":
            cells = [f"**{cell}**" if cell else cell for cell in cells]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _cell(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)
