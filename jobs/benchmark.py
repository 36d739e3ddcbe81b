"""Full benchmark: every category of every configured dataset, on Ray, with outputs and a summary.

    python -m jobs.benchmark --config configs/demo.yaml [--set key=value ...] [--categories a,b] [--wandb MODE]

Without RAY_ADDRESS it starts an embedded local Ray on 127.0.0.1; under ``ray job submit`` (or with
RAY_ADDRESS set) it joins that cluster.
"""

from __future__ import annotations

import argparse
import logging
import resource
import sys
import time
from pathlib import Path

import ray

from anomaly_core.config import ConfigError, RunConfig
from anomaly_core.data import DatasetError, list_categories, load_split
from anomaly_core.bank import write_json
from cluster.pipeline import BenchmarkPipeline, CategoryJob, CategoryResult
from jobs.cli import add_config_arguments, config_from_args
from jobs.outputs import format_table, run_directory, summary, write_category
from jobs.progress import Progress
from jobs.ray_runtime import start_ray
from jobs.report import figure_paths, write_report
from jobs.tracking import Tracker

log = logging.getLogger("jobs.benchmark")


def category_jobs(config: RunConfig, only: set[str] | None) -> list[CategoryJob]:
    """Resolve the configured datasets into category splits; unknown categories are errors.

    ``only`` (from --categories) holds plain category names or ``dataset/category`` keys.
    """
    jobs, known = [], set()
    for position, dataset in enumerate(config.datasets):
        available = list_categories(dataset.format, dataset.root)
        known |= set(available) | {f"{dataset.name}/{category}" for category in available}
        missing = sorted(set(dataset.categories or []) - set(available))
        if missing:
            raise ConfigError(
                f"datasets.{position}.categories: {missing} not found under {dataset.root} (have {available})"
            )
        wanted = dataset.categories or available
        if only:
            wanted = [category for category in wanted if category in only or f"{dataset.name}/{category}" in only]
        root = str(Path(dataset.root).resolve())
        jobs += [CategoryJob(dataset.name, root, load_split(dataset.format, dataset.root, category)) for category in wanted]
    unknown = sorted((only or set()) - known)
    if unknown:
        raise ConfigError(f"categories {unknown} not found in the configured datasets (have {sorted(known)})")
    if not jobs:
        raise ConfigError("no categories selected")
    return jobs


def single_job(config: RunConfig, dataset: str | None, category: str) -> CategoryJob:
    """The one category that jobs.build_bank / jobs.evaluate work on."""
    names = [entry.name for entry in config.datasets]
    name = dataset or names[0]
    if name not in names:
        raise ConfigError(f"--dataset {name!r} is not in the config (have {names})")
    chosen = config.datasets[names.index(name)]
    jobs = category_jobs(config.model_copy(update={"datasets": [chosen]}), {category})
    return jobs[0]


def run(config: RunConfig, run_name: str | None = None, only: set[str] | None = None) -> Path:
    jobs = category_jobs(config, only)
    how = start_ray()
    log.info("Ray: %s; resources %s", how, ray.cluster_resources())
    run_dir = run_directory(config, run_name)
    started = time.perf_counter()
    results: list[CategoryResult] = []
    tracker = Tracker(config.wandb, "benchmark", run_dir, config.model_dump(mode="json"))
    with tracker, Progress(jobs) as progress:
        pipeline = BenchmarkPipeline(config, on_event=progress)
        for result in pipeline.run(jobs):
            folder = write_category(run_dir, result, config)
            tracker.log_category(result, pipeline.transform)
            tracker.log_bank(result.job, folder)
            log.info("%s done: %s -> %s", result.job.key, _headline(result), folder)
            results.append(result)
        seconds = time.perf_counter() - started
        order = {job.key: position for position, job in enumerate(jobs)}
        results.sort(key=lambda result: order[result.job.key])
        stats = pipeline.actor_stats()
        peak_rss_mb = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # ru_maxrss is KiB on Linux
        extra = {
            "cluster": {"plan": pipeline.plan.summary(), **stats, "resources": ray.cluster_resources(),
                        "driver_peak_rss_mb": peak_rss_mb},
        }
        payload = summary(config, results, seconds, extra)
        write_json(run_dir / "summary.json", payload)
        report = write_report(run_dir, results, pipeline.transform, payload)
        tracker.log_run(results, payload, figure_paths(run_dir, results))
    print(format_table(results))
    print(f"\n{len(results)} categories in {seconds:.1f} s -> {run_dir} (report: {report})")
    return run_dir


def _headline(result: CategoryResult) -> str:
    values = result.report.values
    return ", ".join(
        f"{name}={values[name]:.3f}" for name in ("image_auroc", "pixel_auroc", "aupro") if values.get(name) is not None
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.benchmark", description=__doc__.split("\n")[0])
    add_config_arguments(parser)
    parser.add_argument("--run-name", help="output folder name under output_dir (default: <name>-<UTC time>)")
    parser.add_argument("--categories", help="comma-separated subset, e.g. bottle,cable or mvtec_ad/bottle")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        config = config_from_args(args)
        only = set(args.categories.split(",")) if args.categories else None
        run(config, args.run_name, only)
    except (ConfigError, DatasetError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
