"""Local run report: every category and the mean in report.md and the CSVs, figures are real PNGs.

``fake_results`` builds CategoryResults from the bundled tire images with synthetic maps (no Ray,
no backbone); the tracking tests reuse it.
"""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomaly_core.bank import MemoryBank
from anomaly_core.data import ImageTransform, load_mask, load_split
from anomaly_core.metrics import METRIC_NAMES, compute_metrics, mean_metrics
from anomaly_core.scoring import Predictions
from cluster.pipeline import CategoryJob, CategoryResult
from jobs.outputs import released
from jobs.report import metric_rows, ranked_examples, write_category_figure, write_report

TRANSFORM = ImageTransform(resize=128, crop=112, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
# (dataset, category, how well the fake maps separate anomalies: higher is better)
CATEGORIES = (("mvtec_ad", "tire", 3.0), ("mvtec_ad", "tire_hard", 0.7), ("visa", "tire", 1.5))
TIMINGS = {"extract_train_s": 1.5, "coreset_s": 0.5, "evaluate_s": 2.0, "metrics_s": 0.25}


def fake_results(root: Path, n_test: int = 12) -> list[CategoryResult]:
    """Three categories over a subset of the tire test images, with maps that light up on the masks."""
    split = load_split("mvtec", root, "tire")
    chosen = split.test[:: max(1, len(split.test) // n_test)][:n_test]
    masks = np.stack([load_mask(sample, TRANSFORM).numpy() for sample in chosen])
    labels = np.asarray([sample.label for sample in chosen])
    results = []
    for position, (dataset, category, strength) in enumerate(CATEGORIES):
        rng = np.random.default_rng(position)
        maps = (rng.random(masks.shape) + strength * masks * rng.random((len(chosen), 1, 1))).astype(np.float32)
        scores = maps.reshape(len(chosen), -1).max(axis=1).astype(np.float64)
        report = compute_metrics(labels, scores, masks, maps)
        job = CategoryJob(dataset, str(root), replace(split, category=category, test=chosen, train=split.train[:6]))
        bank = MemoryBank(rng.normal(size=(40 + position, 16)).astype(np.float32),
                          {"backbone": "tf_efficientnet_lite0", "dataset": dataset, "category": category})
        predictions = Predictions(scores, maps, np.arange(len(chosen)))
        results.append(CategoryResult(job, bank, predictions, report, dict(TIMINGS)))
    return results


@pytest.fixture(scope="module")
def results(tire_root):
    return fake_results(tire_root)


@pytest.fixture(scope="module")
def report_dir(results, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    summary = {"run": "fake-run", "created": "2026-01-01T00:00:00+00:00", "timings": {"total_s": 12.5, "images_per_s": 4.2}}
    for result in results:
        write_category_figure(run_dir, result, TRANSFORM)
    # as jobs.benchmark does: the report is written from released results (scores, no maps, no bank rows)
    write_report(run_dir, [released(result) for result in results], summary)
    return run_dir


def test_markdown_lists_every_category_mean_timings_and_figures(report_dir, results):
    text = (report_dir / "report.md").read_text()
    assert text.startswith("# Benchmark report: fake-run")
    metrics_section = text.split("## Metrics")[1].split("## Timings")[0]
    timings_section = text.split("## Timings")[1].split("## Figures")[0]
    for result in results:
        row = f"| {result.job.dataset} | {result.job.split.category} | {result.report.values['image_auroc']:.4f} |"
        assert row in metrics_section
        assert f"| {result.job.dataset} | {result.job.split.category} | 1.5000 | 0.5000 | 2.0000 | 0.2500 | 4.2500 |" in timings_section
    mean = mean_metrics([result.report for result in results]).values
    assert f"| **mean** |  | **{mean['image_auroc']:.4f}** | **{mean['pixel_auroc']:.4f}** |" in metrics_section
    for link in ("figures/auroc.png", "figures/roc.png", "figures/samples/mvtec_ad__tire_hard.png",
                 "figures/samples/visa__tire.png"):
        assert f"]({link})" in text
        assert (report_dir / link).is_file()


def test_metrics_csv_holds_the_numbers(report_dir, results):
    with open(report_dir / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["dataset"], row["category"]) for row in rows] == [
        *[(result.job.dataset, result.job.split.category) for result in results], ("mean", "")]
    for row, result in zip(rows, results):
        for name in METRIC_NAMES:
            value = result.report.values[name]  # None (an empty cell) only for spro: no LOCO defects here
            assert row[name] == "" if value is None else float(row[name]) == pytest.approx(value, rel=1e-12)
        assert row["spro"] == "" and row["aupro"] != ""
        assert int(row["memory_size"]) == len(result.bank.features)
        assert int(row["n_test"]) == len(result.test_samples)
    mean = mean_metrics([result.report for result in results]).values
    assert float(rows[-1]["aupro"]) == pytest.approx(mean["aupro"], rel=1e-12)
    assert rows[-1]["memory_size"] == "" and rows[-1]["image_threshold"] == ""


def test_timings_csv(report_dir, results):
    with open(report_dir / "timings.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(results) + 1 and rows[-1]["dataset"] == "mean"
    assert float(rows[0]["total_s"]) == pytest.approx(4.25)
    assert float(rows[0]["extract_images_per_s"]) == pytest.approx(6 / 1.5)


def test_figures_are_valid_pngs_of_sensible_size(report_dir, results):
    figures = sorted((report_dir / "figures").rglob("*.png"))
    assert len(figures) == 2 + len(results)
    for path in figures:
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            width, height = image.size
            pixels = np.asarray(image.convert("RGB"))
        assert 400 <= width <= 4000 and 300 <= height <= 4000, (path.name, image.size)
        assert pixels.std() > 10, f"{path.name} looks blank"
    with Image.open(report_dir / "figures/samples/mvtec_ad__tire.png") as image:
        width, height = image.size
    assert height > width * 0.8  # four example rows of three panels


def test_ranked_examples_orders_by_margin_to_the_threshold(results):
    result = results[1]
    worst, best = ranked_examples(result, 2)
    threshold = result.report.values["image_threshold"]
    labels = np.asarray([sample.label for sample in result.test_samples])
    margin = np.where(labels == 1, 1, -1) * (result.predictions.scores - threshold)
    assert list(margin[worst]) == sorted(margin)[:2]
    assert list(margin[best]) == sorted(margin, reverse=True)[:2]
    assert not set(worst) & set(best)


def test_mean_row_comes_last_and_leaves_per_category_fields_empty(results):
    rows = metric_rows(results)
    assert rows[-1]["dataset"] == "mean" and "memory_size" not in rows[-1]
    assert len(rows) == len(results) + 1


def test_empty_results_are_refused(tmp_path):
    with pytest.raises(ValueError, match="no category results"):
        write_report(tmp_path, [])


def test_report_needs_each_category_figure_drawn_first(results, tmp_path):
    write_category_figure(tmp_path, results[0], TRANSFORM)
    with pytest.raises(FileNotFoundError, match="visa__tire.png"):
        write_report(tmp_path, [released(result) for result in results])


def test_released_result_keeps_scores_but_neither_maps_nor_bank_rows(results):
    result = results[0]
    light = released(result)
    assert light.predictions.maps.shape == (0, *result.predictions.maps.shape[1:])
    assert np.array_equal(light.predictions.scores, result.predictions.scores)
    assert len(light.bank.features) == 0 and light.bank.metadata["memory_size"] == len(result.bank.features)
    assert metric_rows([light]) == metric_rows([result])
