"""Build one category's memory bank on Ray and write bank.safetensors + bank.json (+ a W&B artifact).

    python -m jobs.build_bank --config configs/demo.yaml --dataset tire_small --category tire [--out DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

from anomaly_core.bank import BankError, save_bank
from anomaly_core.config import ConfigError
from anomaly_core.data import DatasetError
from cluster.pipeline import BenchmarkPipeline
from jobs.benchmark import single_job
from jobs.cli import category_parser, config_from_args
from jobs.ray_runtime import start_ray
from jobs.tracking import Tracker


def main(argv: list[str] | None = None) -> int:
    parser = category_parser("python -m jobs.build_bank", __doc__)
    parser.add_argument("--out", type=Path, help="folder for the bank files (default: <output_dir>/banks/<dataset>/<category>)")
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
        job = single_job(config, args.dataset, args.category)
        out = args.out or Path(config.output_dir) / "banks" / job.dataset / job.split.category
        start_ray()
        with Tracker(config.wandb, "build_bank", out, config.model_dump(mode="json")) as tracker:
            bank = BenchmarkPipeline(config).build_bank(job)
            tensors, _ = save_bank(bank, out)
            tracker.log_bank(job, out)
    except (ConfigError, DatasetError, BankError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{job.key}: {len(bank.features)} x {bank.features.shape[1]} bank -> {tensors} (sha256 {bank.sha256[:12]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
