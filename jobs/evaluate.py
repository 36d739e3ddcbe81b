"""Evaluate one category with an existing memory bank; writes metrics.json and predictions/.

    python -m jobs.evaluate --config configs/demo.yaml --dataset tire_small --category tire \
        --bank outputs/banks/tire_small/tire        # or --bank wandb:<entity>/<project>/<name>:<alias>
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from anomaly_core.bank import BankError, check_compatible, load_bank
from anomaly_core.config import ConfigError
from anomaly_core.extraction import ExtractionSettings
from anomaly_core.patchcore import train_list_sha256
from cluster.pipeline import BenchmarkPipeline
from jobs.benchmark import single_job
from jobs.cli import category_parser, check_writable, config_from_args, single_backbone
from jobs.errors import run_job
from jobs.preflight import preflight
from jobs.outputs import format_table, write_category
from jobs.ray_runtime import resource_wait_s, start_ray
from jobs.tracking import Tracker, TrackingError, run_tags


def main(argv: list[str] | None = None) -> int:
    parser = category_parser("python -m jobs.evaluate", __doc__)
    parser.add_argument("--bank", required=True, help="bank folder, bank.safetensors or wandb:<entity>/<project>/<name>:<alias>")
    parser.add_argument("--out", type=Path, help="output folder (default: <output_dir>/evaluate)")
    args = parser.parse_args(argv)
    return run_job(lambda: evaluate(args), args.debug, (TrackingError,))


def evaluate(args: argparse.Namespace) -> Path:
    config = single_backbone(config_from_args(args), "jobs.evaluate")
    job = single_job(config, args.dataset, args.category)
    out = args.out or Path(config.output_dir) / "evaluate"
    check_writable(out, "--out" if args.out else "output_dir")
    with Tracker(config.wandb, "evaluate", out, config.model_dump(mode="json"), name=f"evaluate {job.key} "
                 f"{config.backbone.name}", group=config.name, tags=run_tags(config)) as tracker:
        bank = load_bank(tracker.use_input(args.bank))
        # Settings mismatches fail here, before any actor starts; weights and normalisation are
        # checked against the loaded model once the pipeline is up.
        check_compatible(bank.metadata, ExtractionSettings.from_config(config).declared(), args.bank)
        grid = preflight(config, [job], need_test=True)
        if job.validation and bank.metadata.get("train_list_sha256") != train_list_sha256(job.split.train, job.root):
            raise ConfigError(f"thresholds.source=validation: {args.bank} was not built from the training images this "
                              f"config's validation split leaves ({len(job.split.train)} of "
                              f"{len(job.split.train) + len(job.validation)}); its held-out images would not be held out")
        if config.scoring.k > len(bank.features):
            raise ConfigError(f"scoring.k={config.scoring.k} exceeds the bank {args.bank}: {len(bank.features)} rows")
        if tuple(bank.metadata.get("grid", grid)) != tuple(grid):
            raise BankError(f"{args.bank} was built on a {bank.metadata['grid']} patch grid; this config gives {list(grid)}")
        tracker.use_dataset(job)
        tracker.use_backbone(bank.metadata)
        tracker.log_resolved({"bank": {"source": str(args.bank), "bank_sha256": bank.sha256}})
        start_ray()
        pipeline = BenchmarkPipeline(config, resource_wait_s=resource_wait_s(config.cluster))
        tracker.log_resolved({"plan": pipeline.plan.summary()})
        result = pipeline.collect(pipeline.submit_evaluation(job, bank))
        pipeline.finish_cache_writes()
        folder = write_category(out, result, config)
        tracker.log_category(result, pipeline.transform)
    print(format_table([result]))
    print(f"-> {folder}")
    print(json.dumps(result.report.values))
    return folder


if __name__ == "__main__":
    sys.exit(main())
