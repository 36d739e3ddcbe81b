"""Full benchmark: every category of every configured dataset, on Ray, with outputs and a summary.

    python -m jobs.benchmark --config configs/demo.yaml [--set key=value ...] [--categories a,b] [--wandb MODE]
    python -m jobs.benchmark --resume outputs/<run>     # continue a run whose driver died

Without RAY_ADDRESS it starts an embedded local Ray on 127.0.0.1; under ``ray job submit`` (or with
RAY_ADDRESS set) it joins that cluster.
"""

from __future__ import annotations

import argparse
import logging
import resource
import sys
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import ray

from anomaly_core.bank import write_json
from anomaly_core.config import ConfigError, RunConfig
from anomaly_core.data import ImageTransform, list_categories, load_split, load_validation
from anomaly_core.ensemble import member_labels
from anomaly_core.thresholds import hold_out
from cluster.ensemble import ENSEMBLE_KEY, MemberRun, ensemble_result
from cluster.pipeline import BenchmarkPipeline, CategoryJob, CategoryResult
from cluster.store_stats import StoreMonitor
from cluster.system_stats import SystemPoll
from jobs.cli import add_config_arguments, check_writable, config_from_args, config_overrides, load_config
from jobs.compare import method_of
from jobs.errors import run_job
from jobs.outputs import format_table, released, run_directory, summary, write_category, write_yaml
from jobs.preflight import preflight
from jobs.progress import Progress
from jobs.ray_runtime import resource_wait_s, start_ray
from jobs.report import figure_paths, write_category_figure, write_report
from jobs.resume import RUN_CONFIG, finished_category, recorded_config, resume_config
from jobs.tracking import Tracker, run_tags

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
        splits = [load_split(dataset.format, dataset.root, category, dataset.mask_threshold) for category in wanted]
        jobs += [with_validation(config, CategoryJob(dataset.name, root, split)) for split in splits]
    unknown = sorted((only or set()) - known)
    if unknown:
        raise ConfigError(f"categories {unknown} not found in the configured datasets (have {sorted(known)})")
    if not jobs:
        raise ConfigError("no categories selected")
    return jobs


def with_validation(config: RunConfig, job: CategoryJob) -> CategoryJob:
    """With ``thresholds.source: validation`` or an ensemble, the dataset's own validation images (MVTec LOCO's
    ``validation/good``), else a seeded part of the good training images that then leaves the bank."""
    if config.thresholds.source != "validation" and not config.ensemble:  # an ensemble normalises on them
        return job
    provided = load_validation(job.split.dataset, job.root, job.split.category)
    if provided:
        return CategoryJob(job.dataset, job.root, job.split, provided)
    try:
        train, validation = hold_out(job.split.train, config.thresholds.validation_split, config.seed, job.dataset,
                                     job.split.category)
    except ValueError as error:
        raise ConfigError(f"thresholds.source=validation: {error}") from None
    return CategoryJob(job.dataset, job.root, replace(job.split, train=train), validation)


def single_job(config: RunConfig, dataset: str | None, category: str) -> CategoryJob:
    """The one category that jobs.build_bank / jobs.evaluate work on."""
    names = [entry.name for entry in config.datasets]
    name = dataset or names[0]
    if name not in names:
        raise ConfigError(f"--dataset {name!r} is not in the config (have {names})")
    chosen = config.datasets[names.index(name)]
    jobs = category_jobs(config.model_copy(update={"datasets": [chosen]}), {category})
    return jobs[0]


def resolved(config: RunConfig, jobs: Sequence[CategoryJob]) -> RunConfig:
    """``config`` with each dataset's categories spelled out: what the run really covers (recorded for --resume)."""
    datasets = [dataset.model_copy(update={"categories": [job.split.category for job in jobs if job.dataset == dataset.name]})
                for dataset in config.datasets]
    return config.model_copy(update={"datasets": [dataset for dataset in datasets if dataset.categories]})


def claim_run_folder(run_dir: Path) -> None:
    """A new run gets a folder of its own: a finished (or failed) run is never modified in place."""
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise ConfigError(f"run folder {run_dir} already exists; continue that run with --resume {run_dir}, "
                          f"or choose another --run-name")
    check_writable(run_dir, "output_dir")


def image_transform(metadata: dict) -> ImageTransform:
    """The transform a bank was built with (for the report's and W&B's pictures of a kept category)."""
    return ImageTransform(resize=metadata["resize"], crop=metadata["crop"], mean=tuple(metadata["mean"]),
                          std=tuple(metadata["std"]))


def run(config: RunConfig, run_name: str | None = None, only: set[str] | None = None,
        resume: Path | None = None) -> Path:
    """Benchmark every selected category; with ``resume`` (a run folder) keep its finished categories."""
    config, jobs, run_dir, kept = start_run(config, run_name, only, resume,
                                            lambda config, jobs: preflight(config, jobs, need_test=True))
    todo = [job for job in jobs if job.key not in kept]
    if resume is not None:
        log.info("resuming %s: %d categories kept (%s), %d to compute", run_dir, len(kept), ", ".join(kept) or "none",
                 len(todo))
    started = time.perf_counter()
    results: list[CategoryResult] = []
    tracker = tracked_run(config, "benchmark", run_dir, f"benchmark {config.name}", jobs)
    tracker.define_metrics(method_of({"config": config.model_dump(mode="json")}))
    cluster: dict[str, Any] = {}
    passes = len(config.members())  # an ensemble's categories pass through one pipeline per member
    with tracker, Progress(todo, stall_s=config.cluster.stall_warning_s, passes=passes) as progress:
        for result in kept.values():
            use_backbones(tracker, result)
            kept_transform = image_transform(result.bank.metadata)
            tracker.log_category(result, kept_transform)
            if not figure_paths(run_dir, [result])[f"samples/{result.job.key}"].is_file():
                write_category_figure(run_dir, result, kept_transform)
            results.append(released(result))
        if todo:
            log.info("Ray: %s; resources %s", start_ray(), ray.cluster_resources())
            with StoreMonitor() as store:
                polled: SystemPoll | nullcontext = nullcontext()
                if config.ensemble:
                    computed = run_ensemble(config, run_dir, todo, tracker, progress, cluster)
                else:
                    pipeline = BenchmarkPipeline(config, on_event=progress,
                                                 resource_wait_s=resource_wait_s(config.cluster))
                    progress.waiting = pipeline.waiting_for
                    tracker.log_resolved({"plan": pipeline.plan.summary()})
                    computed = pipeline.run(todo)
                    if tracker.active:  # the actors' system samples into W&B as the run goes (no calls where it is off)
                        polled = SystemPoll(pipeline.system_samples, tracker.log_system)
                with polled:
                    for result in computed:
                        transform = image_transform(result.bank.metadata)
                        write_category_figure(run_dir, result, transform)
                        folder = write_category(run_dir, result, config)
                        tracker.log_category(result, transform)
                        use_backbones(tracker, result)
                        if not config.ensemble:  # an ensemble's members logged their banks as they finished
                            tracker.log_bank(result.job, folder)
                        log.info("%s done: %s -> %s", result.job.key, _headline(result), folder)
                        results.append(released(result))
            cluster["object_store"] = store.summary()
            if not config.ensemble:
                cluster.update({"plan": pipeline.plan.summary(), **pipeline.actor_stats(),
                                "feature_cache": pipeline.cache_stats})
            peak_rss_mb = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux
            cluster.update({"resources": ray.cluster_resources(), "driver_peak_rss_mb": peak_rss_mb})
        seconds = time.perf_counter() - started
        extra = {"cluster": cluster, "resumed": sorted(kept)} if resume is not None else {"cluster": cluster}
        report = write_run(config, run_dir, jobs, results, seconds, extra, tracker)
    print_done(results, seconds, run_dir, report)
    return run_dir


def start_run(config: RunConfig, run_name: str | None, only: set[str] | None, resume: Path | None,
              check: Callable[[RunConfig, list[CategoryJob]], object],
              ) -> tuple[RunConfig, list[CategoryJob], Path, dict[str, CategoryResult]]:
    """What a whole-run job does before any work: its categories, its folder (a new one, or the resumed one),
    the job's ``check`` of config and data, the recorded config; returns those and the finished categories."""
    jobs = category_jobs(config, only)
    config = resolved(config, jobs)
    run_dir = resume if resume is not None else run_directory(config, run_name)
    if resume is None:
        claim_run_folder(run_dir)
    else:
        check_writable(run_dir, "--resume")
    check(config, jobs)
    if resume is None:
        write_yaml(run_dir / RUN_CONFIG, config.model_dump(mode="json"))
    kept = {job.key: result for job in jobs if resume is not None and (result := finished_category(run_dir, job))}
    return config, jobs, run_dir, kept


def tracked_run(config: RunConfig, job_type: str, run_dir: Path, name: str, jobs: Sequence[CategoryJob]) -> Tracker:
    """The W&B run of a whole-run job: grouped by the config's name, tagged with what ran, its images declared
    as inputs; the run folder keeps its id, so a ``--resume`` continues the same W&B run."""
    tracker = Tracker(config.wandb, job_type, run_dir, config.model_dump(mode="json"), name=name, group=config.name,
                      tags=run_tags(config), keep_id=True)
    for job in jobs:
        tracker.use_dataset(job)
    return tracker


def use_backbones(tracker: Tracker, result: CategoryResult) -> None:
    """The backbone of a category's bank (each member's, for an ensemble's record) into the W&B run."""
    for metadata in result.bank.metadata.get(ENSEMBLE_KEY) or [result.bank.metadata]:
        tracker.use_backbone(metadata)


def write_run(config: RunConfig, run_dir: Path, jobs: Sequence[CategoryJob], results: list[CategoryResult],
              seconds: float, extra: dict[str, Any], tracker: Tracker) -> Path:
    """A finished run's summary.json, report and W&B summary, categories in the configured order; returns report.md."""
    order = {job.key: position for position, job in enumerate(jobs)}
    results.sort(key=lambda result: order[result.job.key])
    payload = summary(config, results, seconds, extra)
    write_json(run_dir / "summary.json", payload)
    report = write_report(run_dir, results, payload)
    tracker.log_run(results, payload, figure_paths(run_dir, results))
    tracker.log_run_folder(run_dir)
    return report


def print_done(results: Sequence[CategoryResult], seconds: float, run_dir: Path, report: Path) -> None:
    print(format_table(list(results)))
    print(f"\n{len(results)} categories in {seconds:.1f} s -> {run_dir.resolve()} (report: {report.resolve()})")


def run_ensemble(config: RunConfig, run_dir: Path, todo: Sequence[CategoryJob], tracker: Tracker, progress: Progress,
                 cluster: dict) -> Iterator[CategoryResult]:
    """Each member's pipeline over the categories it has not finished (results written as they come, banks
    logged), then each category's ensemble; ``cluster`` gets each member's actor statistics."""
    labels = member_labels([backbone.name for backbone in config.ensemble])
    cluster["members"] = {}
    for label, member in zip(labels, config.members()):
        remaining = [job for job in todo if finished_category(run_dir, job, label) is None]
        log.info("ensemble member %s (%s): %d categories to compute", label, member.backbone.name, len(remaining))
        if not remaining:
            continue
        run = MemberRun(member, label, progress, resource_wait_s(config.cluster),
                        tracker.log_system if tracker.active else None)
        for result in run.run(remaining):
            folder = write_category(run_dir, result, member, member=label)
            tracker.log_bank(result.job, folder, member=label)
            log.info("%s member %s done: %s", result.job.key, label, _headline(result))
        cluster["members"][label] = run.stats
        tracker.log_resolved({f"plan_{label}": run.stats["plan"]})
    progress("done", {})
    for job in todo:
        members = [finished_category(run_dir, job, label) for label in labels]
        lost = [label for label, member in zip(labels, members) if member is None]
        if lost:
            raise RuntimeError(f"{job.key}: the results of ensemble members {lost} are missing or unreadable")
        yield ensemble_result(job, labels, members, config)


def _headline(result: CategoryResult) -> str:
    values = result.report.values
    return ", ".join(
        f"{name}={values[name]:.3f}" for name in ("image_auroc", "pixel_auroc", "aupro") if values.get(name) is not None
    )


def run_main(argv: list[str] | None, prog: str, doc: str, run_job_body: Callable[..., Path], resume_help: str) -> int:
    """The command line of a whole-run job (jobs.benchmark, jobs.train): a new run from --config, or --resume."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n")[0])
    add_config_arguments(parser, required=False)
    parser.add_argument("--run-name", help="output folder name under output_dir (default: <name>-<UTC time>)")
    parser.add_argument("--categories", help="comma-separated subset, e.g. bottle,cable or mvtec_ad/bottle")
    parser.add_argument("--resume", type=Path, metavar="RUN_DIR", help=resume_help)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    return run_job(lambda: _run_from_args(args, run_job_body), args.debug)


def _run_from_args(args: argparse.Namespace, run_job_body: Callable[..., Path]) -> Path:
    if args.resume is None:
        if args.config is None:
            raise ConfigError("--config is required (or --resume RUN_DIR to continue a run)")
        config = config_from_args(args)
        return run_job_body(config, args.run_name, set(args.categories.split(",")) if args.categories else None)
    if args.run_name or args.categories:
        raise ConfigError("--resume continues a run as it was started: --run-name and --categories cannot change it")
    recorded = recorded_config(args.resume)
    requested = load_config(args.config or args.resume / RUN_CONFIG, config_overrides(args), args.paths)
    return run_job_body(resume_config(recorded, resolved(requested, category_jobs(requested, None)), args.resume),
                        resume=args.resume)


def main(argv: list[str] | None = None) -> int:
    return run_main(argv, "python -m jobs.benchmark", __doc__, run,
                    "continue the run in RUN_DIR with its recorded config: finished categories are kept")


if __name__ == "__main__":
    sys.exit(main())
