"""Evaluate one category with an existing memory bank or trained model; writes metrics.json and predictions/.

    python -m jobs.evaluate --config configs/demo.yaml --dataset tire_small --category tire \
        --bank outputs/banks/tire_small/tire        # or --bank wandb:<entity>/<project>/<name>:<alias>

A PaDiM category folder (``padim.safetensors`` + ``padim.json``) is evaluated as a bank, with a config of
``method: padim`` (``anomaly_core.memories`` tells the two apart by their files).

A trained model's folder (jobs.train: ``model.safetensors`` + ``model.json``, or a ``trained-model``
artifact) is scored in this process, as jobs.train scores it, and its metrics computed the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from anomaly_core.bank import BankError, check_compatible
from anomaly_core.config import ConfigError, RunConfig
from anomaly_core.extraction import ExtractionSettings
from anomaly_core.memories import load_memory
from anomaly_core.data import metric_groups
from anomaly_core.patchcore import evaluate as compute_report
from anomaly_core.patchcore import category_record, train_list_sha256
from anomaly_core.training.model_files import METADATA_FILE, TENSORS_FILE, ModelFilesError
from cluster.pipeline import BenchmarkPipeline, CategoryJob, CategoryResult
from cluster.training import predict_category, transform_of
from jobs.benchmark import single_job
from jobs.cli import category_parser, check_writable, config_from_args, single_backbone
from jobs.compare import method_of
from jobs.errors import run_job
from jobs.preflight import preflight
from jobs.outputs import category_folder, format_table, write_category
from jobs.resume import model_record
from jobs.ray_runtime import resource_wait_s, start_ray
from jobs.tracking import Tracker, TrackingError, run_tags


def main(argv: list[str] | None = None) -> int:
    parser = category_parser("python -m jobs.evaluate", __doc__)
    parser.add_argument("--bank", required=True, help="bank folder, bank.safetensors or wandb:<entity>/<project>/<name>:<alias>")
    parser.add_argument("--out", type=Path, help="output folder (default: <output_dir>/evaluate)")
    args = parser.parse_args(argv)
    return run_job(lambda: evaluate(args), args.debug, (TrackingError, ModelFilesError))


def evaluate(args: argparse.Namespace) -> Path:
    config = single_backbone(config_from_args(args), "jobs.evaluate")
    job = single_job(config, args.dataset, args.category)
    out = args.out or Path(config.output_dir) / "evaluate"
    check_writable(out, "--out" if args.out else "output_dir")
    with Tracker(config.wandb, "evaluate", out, config.model_dump(mode="json"), name=f"evaluate {job.key} "
                 f"{config.backbone.name}", group=config.name, tags=run_tags(config)) as tracker:
        path = tracker.use_input(args.bank)
        tracker.use_dataset(job)
        if (path / METADATA_FILE).is_file():
            result = evaluate_model(config, job, path, category_folder(out, job))
            model = result.bank.metadata
            tracker.define_metrics(method_of({"config": {"training": {"model": model["kind"]},
                                                         "backbone": {"name": model["backbone"]}}, "job": "train"}))
            tracker.use_backbone(model)
            tracker.log_resolved({"model": {"source": str(args.bank), "tensors_sha256": result.bank.sha256}})
            folder = write_category(out, result, config)
            tracker.log_category(result, transform_of(config))
            return finished(result, folder)
        memory, bank = load_memory(path)  # a PatchCore bank or PaDiM's statistics, by the files there
        if memory.method != config.method:
            raise ConfigError(f"{args.bank} holds a {memory.method} memory ({memory.record}); this config's method "
                              f"is {config.method}: evaluate it with a config of method: {memory.method}")
        # Settings mismatches fail here, before the model is built; its layers, weights, normalisation and
        # PaDiM channel subset in preflight, which builds it, before any actor starts.
        check_compatible(bank.metadata, {**ExtractionSettings.from_config(config).declared(),
                                         **category_record(config, job.split.dataset, job.split.category)}, args.bank)
        grid = preflight(config, [job], need_test=True, saved=(bank.metadata, str(args.bank)))
        if job.validation and bank.metadata.get("train_list_sha256") != train_list_sha256(job.split.train, job.root):
            raise ConfigError(f"thresholds.source=validation: {args.bank} was not built from the training images this "
                              f"config's validation split leaves ({len(job.split.train)} of "
                              f"{len(job.split.train) + len(job.validation)}); its held-out images would not be held out")
        if config.scoring.k > len(bank.features):
            raise ConfigError(f"scoring.k={config.scoring.k} exceeds the bank {args.bank}: {len(bank.features)} rows")
        if tuple(bank.metadata.get("grid", grid)) != tuple(grid):
            raise BankError(f"{args.bank} was built on a {bank.metadata['grid']} patch grid; this config gives {list(grid)}")
        tracker.define_metrics(method_of({"config": config.model_dump(mode="json")}))
        tracker.use_backbone(bank.metadata)
        tracker.log_resolved({"bank": {"source": str(args.bank), "bank_sha256": bank.sha256}})
        start_ray()
        pipeline = BenchmarkPipeline(config, resource_wait_s=resource_wait_s(config.cluster))
        tracker.log_resolved({"plan": pipeline.plan.summary()})
        result = pipeline.collect(pipeline.submit_evaluation(job, bank))
        pipeline.finish_cache_writes()
        folder = write_category(out, result, config)
        tracker.log_category(result, pipeline.transform)
    return finished(result, folder)


def evaluate_model(config: RunConfig, job: CategoryJob, source: Path, folder: Path) -> CategoryResult:
    """A trained model's test-set predictions and metrics (refused if its files do not fit ``config``), its files
    copied to ``folder``, where the thresholds found here are recorded (as a bank's copy gets them)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in (TENSORS_FILE, METADATA_FILE):
        if not (folder / name).exists() or not (folder / name).samefile(source / name):
            shutil.copyfile(source / name, folder / name)
    started = time.perf_counter()
    predictions = predict_category(config, job, str(folder), os.cpu_count() or 1)
    scored = time.perf_counter()
    report = compute_report(job.split.test, predictions, transform_of(config), config.metrics.pro_fpr_limit,
                            metric_groups(job.split.dataset))
    timings = {"evaluate_s": round(scored - started, 4), "metrics_s": round(time.perf_counter() - scored, 4)}
    return CategoryResult(job, model_record(folder), predictions, report, timings)


def finished(result: CategoryResult, folder: Path) -> Path:
    print(format_table([result]))
    print(f"-> {folder}")
    print(json.dumps(result.report.values))
    return folder


if __name__ == "__main__":
    sys.exit(main())
