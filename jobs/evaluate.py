"""Evaluate one category with an existing memory bank; writes metrics.json and predictions/.

    python -m jobs.evaluate --config configs/demo.yaml --dataset tire_small --category tire \
        --bank outputs/banks/tire_small/tire        # or --bank wandb:<entity>/<project>/<name>:<alias>
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from anomaly_core.bank import BankError, check_compatible, load_bank
from anomaly_core.config import ConfigError
from anomaly_core.data import DatasetError
from anomaly_core.extraction import ExtractionSettings
from cluster.pipeline import BenchmarkPipeline
from jobs.benchmark import single_job
from jobs.cli import category_parser, config_from_args
from jobs.outputs import format_table, write_category
from jobs.ray_runtime import start_ray
from jobs.tracking import Tracker, TrackingError, is_wandb_ref


def main(argv: list[str] | None = None) -> int:
    parser = category_parser("python -m jobs.evaluate", __doc__)
    parser.add_argument("--bank", required=True, help="bank folder, bank.safetensors or wandb:<entity>/<project>/<name>:<alias>")
    parser.add_argument("--out", type=Path, help="output folder (default: <output_dir>/evaluate)")
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
        job = single_job(config, args.dataset, args.category)
        out = args.out or Path(config.output_dir) / "evaluate"
        with Tracker(config.wandb, "evaluate", out, config.model_dump(mode="json")) as tracker:
            bank = load_bank(tracker.use_bank(args.bank) if is_wandb_ref(args.bank) else Path(args.bank))
            # Settings mismatches fail here, before any actor starts; weights and normalisation are
            # checked against the loaded model once the pipeline is up.
            check_compatible(bank.metadata, ExtractionSettings.from_config(config).declared(), args.bank)
            start_ray()
            pipeline = BenchmarkPipeline(config)
            result = pipeline.collect(pipeline.submit_evaluation(job, bank))
            folder = write_category(out, result, config)
            tracker.log_category(result, pipeline.transform)
    except (ConfigError, DatasetError, BankError, TrackingError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_table([result]))
    print(f"-> {folder}")
    print(json.dumps(result.report.values))
    return 0


if __name__ == "__main__":
    sys.exit(main())
