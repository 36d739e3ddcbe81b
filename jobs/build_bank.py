"""Build one category's memory bank on Ray and write bank.safetensors + bank.json (+ a W&B artifact).

    python -m jobs.build_bank --config configs/demo.yaml --dataset tire_small --category tire [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cluster.pipeline import BenchmarkPipeline
from jobs.benchmark import single_job
from jobs.cli import category_parser, check_writable, config_from_args, single_backbone
from jobs.errors import run_job
from jobs.preflight import preflight
from jobs.ray_runtime import resource_wait_s, start_ray
from jobs.tracking import Tracker, run_tags


def main(argv: list[str] | None = None) -> int:
    parser = category_parser("python -m jobs.build_bank", __doc__)
    parser.add_argument("--out", type=Path, help="folder for the bank files (default: <output_dir>/banks/<dataset>/<category>)")
    args = parser.parse_args(argv)
    return run_job(lambda: build(args), args.debug)


def build(args: argparse.Namespace) -> Path:
    config = single_backbone(config_from_args(args), "jobs.build_bank")
    job = single_job(config, args.dataset, args.category)
    out = args.out or Path(config.output_dir) / "banks" / job.dataset / job.split.category
    check_writable(out, "--out" if args.out else "output_dir")
    preflight(config, [job], need_test=False)
    start_ray()
    with Tracker(config.wandb, "build_bank", out, config.model_dump(mode="json"), name=f"build_bank {job.key} "
                 f"{config.backbone.name}", group=config.name, tags=run_tags(config)) as tracker:
        tracker.use_dataset(job)
        pipeline = BenchmarkPipeline(config, resource_wait_s=resource_wait_s(config.cluster))
        tracker.log_resolved({"plan": pipeline.plan.summary()})
        bank = pipeline.build_bank(job)
        pipeline.finish_cache_writes()
        tensors, _ = bank.save(out)  # a bank, or PaDiM statistics
        tracker.use_backbone(bank.metadata)
        tracker.log_bank(job, out)
    print(f"{job.key}: {len(bank.features)} x {bank.features.shape[1]} bank -> {tensors} (sha256 {bank.sha256[:12]})")
    return tensors


if __name__ == "__main__":
    sys.exit(main())
