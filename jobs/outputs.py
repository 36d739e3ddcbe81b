"""Run folders: per-category bank, metrics, predictions and config; the run's summary.json.

Layout: ``outputs/<run>/<dataset>/<category>/{bank.safetensors, bank.json, metrics.json, config.yaml,
predictions/{predictions.json, anomaly_maps.safetensors}}`` and ``outputs/<run>/summary.json``.
Every file is written atomically, so an interrupted run never leaves a half-written file.
"""

from __future__ import annotations

import platform
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from safetensors.numpy import save_file

from anomaly_core.bank import MemoryBank, atomic_write, write_json
from anomaly_core.config import RunConfig
from anomaly_core.metrics import METRIC_NAMES, MetricReport, mean_metrics
from anomaly_core.training.model_files import MODEL_FORMAT, annotate_model_files
from cluster.ensemble import ENSEMBLE_KEY
from cluster.pipeline import MEMORY_METHODS, CategoryJob, CategoryResult
from jobs.report import bank_rows_and_sha256


def run_directory(config: RunConfig, run_name: str | None) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return Path(config.output_dir) / (run_name or f"{config.name}-{stamp}")


def write_yaml(path: Path, payload: Any) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(yaml.safe_dump(payload, sort_keys=False)))


def deployment_thresholds(result: CategoryResult) -> dict[str, Any]:
    """The thresholds bank.json carries for jobs.predict: the validation quantiles, else the test set's F1-optimal."""
    if result.thresholds is not None:
        return result.thresholds
    values = result.report.values
    return {"image": values.get("image_threshold"), "pixel": values.get("pixel_threshold"), "source": THRESHOLD_SOURCE}


def prediction_records(result: CategoryResult) -> list[dict[str, Any]]:
    """anomalib-style per-image records: pred_score, pred_label (at the deployment image threshold)."""
    threshold = deployment_thresholds(result)["image"]
    records = []
    for sample, score in zip(result.test_samples, result.predictions.scores):
        records.append({
            "image_path": sample.image_path,
            "label": sample.label,
            "defect_type": sample.defect_type,
            "mask_path": sample.mask_path,
            "pred_score": float(score),
            "pred_label": None if threshold is None else int(score >= threshold),
        })
    return records


# Where the thresholds written into bank.json come from; jobs.predict shows it with every prediction.
THRESHOLD_SOURCE = ("F1-optimal on this evaluation's labelled test set: optimistic as a deployment threshold, "
                    "since it was tuned on the images it is judged on")


MEMBERS = "members"  # an ensemble category's folder holds each member's results under members/<label>/
ENSEMBLE_RECORD = "ensemble.json"  # what an ensemble category has in place of bank.json


def category_folder(run_dir: Path, job: CategoryJob, member: str | None = None) -> Path:
    folder = Path(run_dir) / job.dataset / job.split.category
    return folder / MEMBERS / member if member else folder


def write_category(run_dir: Path, result: CategoryResult, config: RunConfig, member: str | None = None) -> Path:
    """Bank, predictions and config of one category; ``metrics.json`` last, as the mark of a finished category.

    ``--resume`` keeps a category only when its ``metrics.json`` exists and names the bank beside it.
    A trained model's category (jobs.train) has its model files in place of the bank. An ensemble ``member``'s results go to ``members/<label>/`` with full-precision maps and the
    predictions of its held-out images, the inputs of the ensemble's normalisation (``--resume`` keeps
    finished members). An ensemble's own category folder has ``ensemble.json`` in place of a bank.
    """
    folder = category_folder(run_dir, result.job, member)
    # The thresholds travel with the bank, together with the scoring that produced the scores they
    # apply to: jobs.predict scores with the bank's recorded scoring, so thresholds from one scoring
    # must never meet scores of another.
    result.bank.metadata["thresholds"] = deployment_thresholds(result)
    result.bank.metadata["scoring"] = MEMORY_METHODS[config.method].scoring_record(config)
    if ENSEMBLE_KEY in result.bank.metadata:
        write_json(folder / ENSEMBLE_RECORD, result.bank.metadata)
    elif result.bank.metadata.get("format") == MODEL_FORMAT:  # a trained model's files are the trainer's
        annotate_model_files(folder, thresholds=result.bank.metadata["thresholds"], weights=config.backbone.weights)
    else:
        result.bank.save(folder)  # a bank, or PaDiM's statistics (anomaly_core.padim)
    write_yaml(folder / "config.yaml", config.model_dump(mode="json"))
    predictions = folder / "predictions"
    write_json(predictions / "predictions.json", prediction_records(result))
    maps_dtype = np.float32 if member else np.float16
    maps = {"anomaly_maps": np.ascontiguousarray(result.predictions.maps, dtype=maps_dtype)}
    atomic_write(predictions / "anomaly_maps.safetensors", lambda tmp: save_file(maps, tmp))
    if member and result.held_out is not None:
        held_out = {"scores": result.held_out.scores, "maps": np.ascontiguousarray(result.held_out.maps, np.float32)}
        atomic_write(predictions / HELD_OUT_FILE, lambda tmp: save_file(held_out, tmp))
    write_json(folder / "metrics.json", {**result.report.to_dict(), "timings": result.timings,
                                         "bank_sha256": result.bank.metadata["bank_sha256"]})
    return folder


HELD_OUT_FILE = "held_out.safetensors"


def released(result: CategoryResult) -> CategoryResult:
    """The result without its bank's rows and anomaly maps (both are on disk, its figure is drawn): a
    run holds every category's result for its summary and report, and banks (~100 MB each at full
    size) and maps (n_test x crop² floats) would grow the driver with every category. Scores stay."""
    rows, digest = bank_rows_and_sha256(result)
    metadata = {**result.bank.metadata, "memory_size": rows, "bank_sha256": digest}
    empty = np.empty((0, result.bank.features.shape[1]), np.float32)
    predictions = replace(result.predictions, maps=result.predictions.maps[:0].copy())
    return replace(result, bank=MemoryBank(empty, metadata), predictions=predictions, held_out=None)


def summary(config: RunConfig, results: list[CategoryResult], run_seconds: float, extra: dict[str, Any]) -> dict[str, Any]:
    categories = []
    for result in results:
        images = len(result.job.split.train) + len(result.test_samples)
        rows, digest = bank_rows_and_sha256(result)
        categories.append({
            "dataset": result.job.dataset,
            "category": result.job.split.category,
            "metrics": result.report.values,
            "notes": result.report.notes,
            "timings": result.timings,
            # Bytes the category put through Ray's object store (colocated extractors keep features out of it).
            **({"object_store": result.object_store} if result.object_store else {}),
            "n_train": len(result.job.split.train),
            "n_test": len(result.test_samples),
            "images": images,
            "memory_size": rows,
            "n_patches": result.bank.metadata.get("n_patches"),  # before the coreset
            "feature_dim": int(result.bank.features.shape[1]),  # an ensemble's: its members' added up
            "bank_sha256": digest,
            # PaDiM's statistics in memory: d²·H·W inverse covariances and the means, float32 (anomaly_core.padim)
            **({"statistics_bytes": result.bank.metadata["statistics_bytes"]}
               if "statistics_bytes" in result.bank.metadata else {}),
            **({"members": result.bank.metadata[ENSEMBLE_KEY]} if ENSEMBLE_KEY in result.bank.metadata else {}),
        })
    mean = mean_metrics([result.report for result in results]) if results else MetricReport({}, {})
    total_images = sum(entry["images"] for entry in categories)
    return {
        "run": config.name,
        "job": extra.get("job", "benchmark"),  # or "train": what jobs.compare names the method by
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "categories": categories,
        "mean": {"metrics": mean.values, "notes": mean.notes},
        "timings": {"total_s": round(run_seconds, 3), "images_per_s": round(total_images / max(run_seconds, 1e-9), 3),
                    **extra.get("timings", {})},
        "cluster": extra.get("cluster", {}),
        **({"resumed": extra["resumed"]} if "resumed" in extra else {}),
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "config": config.model_dump(mode="json"),
    }


def format_table(results: list[CategoryResult]) -> str:
    """The per-category table printed at the end of a run (mean last)."""
    columns = ["dataset", "category", *METRIC_NAMES, "time_s"]
    rows = []
    for result in results:
        values = [result.report.values.get(name) for name in METRIC_NAMES]
        seconds = sum(result.timings.get(key, 0.0) for key in ("extract_train_s", "coreset_s", "train_s", "evaluate_s"))
        rows.append([result.job.dataset, result.job.split.category, *_cells(values), f"{seconds:.1f}"])
    if results:
        mean = mean_metrics([result.report for result in results])
        rows.append(["mean", "", *_cells([mean.values.get(name) for name in METRIC_NAMES]), ""])
    widths = [max(len(column), *(len(row[i]) for row in rows)) for i, column in enumerate(columns)]
    lines = ["  ".join(column.ljust(width) for column, width in zip(columns, widths))]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def _cells(values: list[float | None]) -> list[str]:
    return ["n/a" if value is None else f"{value:.4f}" for value in values]
