"""Weights & Biases tracking of the jobs: one run per job, and tracking can never fail or stall one.

A benchmark is worth its numbers with or without W&B, so every W&B call goes through one guard: the
first failure logs a single warning and turns tracking off for the rest of the job, ``wandb.init`` and
``run.finish`` get short timeouts, and ``online`` without credentials is refused up front instead of
prompting for a key. Mode ``off`` never calls into wandb: no run, no service process, no files.

What a benchmark run holds: per category its metrics as summary values ``<dataset>/<category>/<metric>``
and as history ``category/<metric>`` on the ``category_index`` step axis, stage timings, ROC and PR curves
(W&B's own area-under-curve chart, drawn from tables we compute, which needs no pandas), and the worst and
best scored test images as heat-map overlays with the ground-truth and predicted masks (``examples``, on
the same axis); at the end a results table of one row per category with method, backbone and dataset
columns (the means are in the summary), bar charts over it, throughput per extractor actor, peak memory,
run time and reserved GPU-seconds, the report's figures; and, logged while the run goes, each actor's
(a training's: each training process's) system metrics against time.
Each category's memory bank is an artifact of type ``memory-bank`` (a trained model one of type
``trained-model``); the finished run folder's results (summary, report, CSVs, figures, per-category JSON) are one
``benchmark-results`` artifact, so a run on a cluster without shared storage keeps them.

Every run has an identity (a name saying what ran, the config's name as its group, tags for method,
backbone, datasets and device kind) and declares what it consumed, so W&B's lineage graph is whole: the
bank or model it scored with (a ``wandb:`` reference, or a local folder declared as the very artifact its
files make, which W&B resolves to the version that logged them), each category's images (their list and
root, no image uploaded) and the backbone weights (by sha256).
Values resolved at run time (the actor plan, the layers and weights a backbone resolved to) are added to
the run's config once known.
"""

from __future__ import annotations

import functools
import json
import logging
import netrc
import os
import re
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence, TypeVar
from urllib.parse import urlsplit

import numpy as np
from sklearn.metrics import precision_recall_curve, roc_curve

from anomaly_core.backbones import RANDOM_INIT
from anomaly_core.bank import atomic_write
from anomaly_core.config import RunConfig, WandbConfig
from anomaly_core.data import ImageTransform, load_mask, read_rgb
from anomaly_core.metrics import METRIC_NAMES, THRESHOLD_NAMES, grouped_names
from jobs.compare import method_of
from anomaly_core.patchcore import train_list_sha256
from anomaly_core.training.model_files import METADATA_FILE as MODEL_METADATA_FILE
from anomaly_core.memories import SAVED_MEMORIES
from jobs.report import (
    bank_rows_and_sha256,
    display_image,
    heatmap_overlay,
    metric_rows,
    ranked_examples,
    timing_keys,
    timing_rows,
)

if TYPE_CHECKING:
    from cluster.pipeline import CategoryJob, CategoryResult
    from cluster.system_stats import Samples

log = logging.getLogger("jobs.tracking")

BANK_ARTIFACT_TYPE = "memory-bank"
RUN_FOLDER_ARTIFACT_TYPE = "benchmark-results"
CHECKPOINT_ARTIFACT_TYPE = "model-checkpoint"
MODEL_ARTIFACT_TYPE = "trained-model"
INPUT_ARTIFACT_TYPES = (BANK_ARTIFACT_TYPE, MODEL_ARTIFACT_TYPE)  # what a job can score with
DATASET_ARTIFACT_TYPE = "dataset"
WEIGHTS_ARTIFACT_TYPE = "backbone-weights"
RUN_ID_FILE = "wandb/run_id"  # a resumable run's W&B id, under its run folder: --resume reopens that run
# What of a run folder travels as its results artifact: everything but the banks (each is its own
# artifact already), the anomaly maps (large; re-creatable from the bank) and W&B's own files.
RUN_FOLDER_FILES = ("summary.json", "report.md", "metrics.csv", "timings.csv", "run_config.yaml", "figures/**/*.png",
                    "*/*/metrics.json", "*/*/config.yaml", "*/*/predictions/predictions.json",
                    "*/*/training.json", "*/*/ensemble.json")  # a trained model's history; an ensemble's record
WANDB_REF_PREFIX = "wandb:"
DEFAULT_HOST = "https://api.wandb.ai"
INIT_TIMEOUT_S = 30.0
FINISH_TIMEOUT_S = 120.0
MASK_CLASSES = {0: "normal", 1: "anomalous"}
CATEGORY_STEP = "category_index"  # a benchmark's per-category history: one step per finished category
SYSTEM_STEP = "system/time_s"  # the actors' system samples: seconds since the run started

T = TypeVar("T")


class TrackingError(RuntimeError):
    """A W&B resource the job cannot do without (a bank given as ``wandb:...``) is unavailable."""


def api_key_configured(environ: dict[str, str] | None = None) -> bool:
    """True when W&B credentials are set up locally (env or netrc); never touches the network."""
    environ = os.environ if environ is None else environ
    if environ.get("WANDB_API_KEY") or environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlsplit(environ.get("WANDB_BASE_URL") or DEFAULT_HOST).netloc
    path = Path(environ.get("NETRC") or "~/.netrc").expanduser()
    try:
        return bool(host) and netrc.netrc(str(path)).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_mode(mode: str, environ: dict[str, str] | None = None) -> str:
    """``auto`` follows W&B's own ``WANDB_MODE`` (offline, disabled) where a node sets it; otherwise it
    becomes ``online`` when credentials are configured, else ``offline``."""
    if mode not in ("auto", "online", "offline", "off"):
        raise ValueError(f"W&B mode must be auto, online, offline or off; got {mode!r}")
    if mode == "auto":
        environ = os.environ if environ is None else environ
        forced = {"offline": "offline", "dryrun": "offline", "disabled": "off"}.get(environ.get("WANDB_MODE", ""))
        return forced or ("online" if api_key_configured(environ) else "offline")
    return mode


def artifact_name(*parts: str) -> str:
    """W&B artifact names and aliases allow letters, digits, '-', '_' and '.' only."""
    return "-".join(re.sub(r"[^A-Za-z0-9_.-]+", "-", part) for part in parts)


def is_wandb_ref(ref: str) -> bool:
    return str(ref).startswith(WANDB_REF_PREFIX)


def parse_wandb_ref(ref: str) -> tuple[str, str, str]:
    """``wandb:<entity>/<project>/<name>:<alias>`` -> (entity, project, "<name>:<alias>")."""
    parts = str(ref).removeprefix(WANDB_REF_PREFIX).split("/")
    if not is_wandb_ref(ref) or len(parts) != 3 or not all(parts) or ":" not in parts[2]:
        raise TrackingError(f"W&B bank reference {ref!r} must look like {WANDB_REF_PREFIX}<entity>/<project>/<name>:<alias>")
    entity, project, version = parts
    return entity, project, version


def run_tags(config: RunConfig) -> list[str]:
    """The tags every run of ``config`` gets: method, backbone(s), datasets and device kind (cpu / gpu)."""
    method = config.training.model if config.training is not None else "patchcore"
    backbones = [backbone.name for backbone in config.ensemble] or [config.backbone.name]
    gpu = config.cluster.gpus_per_extractor > 0 or (config.training is not None and config.training.gpus_per_worker > 0)
    return [method, *(["ensemble"] if config.ensemble else []), *backbones,
            *(dataset.name for dataset in config.datasets), "gpu" if gpu else "cpu"]


def _guarded(method: Callable[..., T]) -> Callable[..., T | None]:
    """Run a tracking method only while tracking is on; any error turns tracking off with one warning."""

    @functools.wraps(method)
    def wrapper(self: "Tracker", *args: Any, **kwargs: Any) -> T | None:
        with self._lock:  # the driver's event and system-sample threads log beside the main thread
            if self.run is None:
                return None
            try:
                return method(self, *args, **kwargs)
            except Exception as error:  # W&B raises many types; none of them may stop the job
                self._disable(f"{method.__name__} failed: {error}")
                return None

    return wrapper


class Tracker:
    """One W&B run for one job; every method is a no-op once tracking is off."""

    _categories_logged = 0  # the next category's ``category_index``

    def __init__(
        self,
        settings: WandbConfig,
        job_type: str,
        run_dir: Path,
        config: dict[str, Any] | None = None,
        *,
        name: str | None = None,
        group: str | None = None,
        tags: Sequence[str] = (),
        keep_id: bool = False,
        init_timeout: float = INIT_TIMEOUT_S,
        finish_timeout: float = FINISH_TIMEOUT_S,
    ) -> None:
        """``name`` (default: the run folder's), ``group`` (``wandb.group`` wins) and ``tags`` (added to
        ``wandb.tags``) say what ran. With ``keep_id`` the run's id is kept in ``<run_dir>/wandb/run_id``, and
        a run folder that has one reopens that W&B run (``resume="allow"``): a resumed job continues its run."""
        self.settings = settings
        self.run_dir = Path(run_dir)
        self.mode = resolve_mode(settings.mode)
        self.run: Any = None
        self._lock = threading.RLock()
        self._training_axes: set[str] = set()  # categories whose training metrics have their own step axis
        self._validations: dict[str, dict[str, float]] = {}  # each category's latest validation metrics
        self._declared: set[str] = set()  # input artifacts already declared, as name@digest
        if self.mode == "off":
            return
        if self.mode == "online" and not api_key_configured():
            log.warning("W&B tracking disabled: mode is online but no API key is configured "
                        "(set WANDB_API_KEY or run `wandb login`); the job goes on without it")
            self.mode = "off"
            return
        try:
            import wandb

            self.run_dir.mkdir(parents=True, exist_ok=True)
            id_file = self.run_dir / RUN_ID_FILE
            run_id = id_file.read_text().strip() if keep_id and id_file.is_file() else None
            self.run = wandb.init(
                project=settings.project,
                entity=settings.entity,
                group=settings.group or group,
                tags=list(dict.fromkeys([*settings.tags, *tags])) or None,
                job_type=job_type,
                name=name or self.run_dir.name,
                config=config,
                dir=str(self.run_dir),
                mode=self.mode,
                id=run_id,
                resume="allow" if run_id else None,
                settings=wandb.Settings(init_timeout=init_timeout, finish_timeout=finish_timeout),
            )
            if keep_id and run_id is None:
                atomic_write(id_file, lambda tmp: Path(tmp).write_text(self.run.id + "\n"))
        except Exception as error:
            self._disable(f"wandb.init failed: {error}")

    @property
    def active(self) -> bool:
        return self.run is not None

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, traceback: Any) -> None:
        self.finish(exit_code=0 if kind is None else 1)

    def _disable(self, reason: str) -> None:
        key = os.environ.get("WANDB_API_KEY")
        message = reason.replace(key, "***") if key else reason
        log.warning("W&B tracking disabled (%s); the job goes on without it", message.splitlines()[0])
        run, self.run, self.mode = self.run, None, "off"
        if run is not None:
            try:
                _finish(run, exit_code=1)
            except Exception:  # already failing: the warning above is the one message the user gets
                pass

    @_guarded
    def define_metrics(self, method: str, trained_keys: Sequence[str] = ()) -> None:
        """Step axes and summaries for dashboards, and the run's ``method`` in its config (runs are grouped
        by it): a benchmark's per-category values and heat maps on the ``category_index`` axis (the summary
        keeps the worst and best category: min and max); each trained category's validation metrics and
        epoch losses on its epoch axis, the summary keeping the best (max for AUROC-like metrics, min for
        losses); the actors' system metrics against the seconds since the run started."""
        self.run.config.update({"method": method}, allow_val_change=True)
        self.run.define_metric(CATEGORY_STEP, hidden=True)
        self.run.define_metric("category", step_metric=CATEGORY_STEP, summary="none")
        self.run.define_metric("examples", step_metric=CATEGORY_STEP)
        for name in METRIC_NAMES:
            self.run.define_metric(f"category/{name}", step_metric=CATEGORY_STEP, summary="min,max")
        for key in trained_keys:
            # Exact names win over the category's ``<key>/*`` axis that ``log_training`` defines.
            epoch, step = f"{key}/train/epoch", f"{key}/train/step"
            for name in METRIC_NAMES:
                self.run.define_metric(f"{key}/val/{name}", step_metric=epoch, summary="max")
            self.run.define_metric(f"{key}/train/epoch_loss", step_metric=epoch, summary="min")
            self.run.define_metric(f"{key}/train/loss", step_metric=step, summary="min")
        self.run.define_metric(SYSTEM_STEP, hidden=True)
        self.run.define_metric("system/*", step_metric=SYSTEM_STEP)

    @_guarded
    def log_category(self, result: "CategoryResult", transform: ImageTransform) -> None:
        """Metrics, timings, ROC/PR curves and example overlays of one finished category."""
        key = result.job.key
        values = result.report.values
        names = (*METRIC_NAMES, *THRESHOLD_NAMES, *grouped_names(values))
        summary = {f"{key}/{name}": values[name] for name in names if values.get(name) is not None}
        summary.update({f"{key}/time/{name}": seconds for name, seconds in result.timings.items()})
        summary[f"{key}/memory_size"] = bank_rows_and_sha256(result)[0]
        self.run.summary.update(summary)
        labels = np.asarray([sample.label for sample in result.test_samples])
        logged: dict[str, Any] = {CATEGORY_STEP: self._categories_logged, "category": key,
                                  **{f"category/{name}": values[name] for name in METRIC_NAMES
                                     if values.get(name) is not None}}
        self._categories_logged += 1
        if labels.min() != labels.max():
            logged[f"{key}/roc"] = _curve_chart(key, *roc_curve(labels, result.predictions.scores)[:2],
                                                ("fpr", "tpr"), f"{key}: image ROC")
            precision, recall, _ = precision_recall_curve(labels, result.predictions.scores)
            logged[f"{key}/pr"] = _curve_chart(key, recall, precision, ("recall", "precision"), f"{key}: image PR")
        if self.settings.log_images:
            logged["examples"] = self._examples(result, transform)
        self.run.log(logged)

    def _examples(self, result: "CategoryResult", transform: ImageTransform) -> list[Any]:
        import wandb

        worst, best = ranked_examples(result, self.settings.log_images)
        maps = result.predictions.maps
        vmin, vmax = float(maps.min()), float(maps.max())
        pixel_threshold = result.report.values.get("pixel_threshold")
        images = []
        for kind, index in [("worst", i) for i in worst] + [("best", i) for i in best]:
            sample = result.test_samples[index]
            predicted = maps[index] >= pixel_threshold if pixel_threshold is not None else None
            masks = {}
            truth = load_mask(sample, transform)
            if truth is not None:
                masks["ground_truth"] = {"mask_data": truth.numpy().astype(np.uint8), "class_labels": MASK_CLASSES}
            if predicted is not None:
                masks["prediction"] = {"mask_data": predicted.astype(np.uint8), "class_labels": MASK_CLASSES}
            overlay = heatmap_overlay(display_image(read_rgb(sample.image_path), transform), maps[index], vmin, vmax)
            caption = (f"{result.job.key} {kind}: {sample.defect_type}/{Path(sample.image_path).name} "
                       f"label {sample.label} score {result.predictions.scores[index]:.4f}")
            images.append(wandb.Image(overlay, caption=caption, masks=masks or None))
        return images

    @_guarded
    def log_bank(self, job: "CategoryJob", folder: Path, member: str | None = None) -> None:
        """The category's bank.safetensors + bank.json as a ``memory-bank`` artifact (an ensemble ``member``'s:
        one artifact per member), aliased by dataset, category and backbone, and by this run's name."""
        artifact = folder_artifact(folder, job.dataset, job.split.category, member)
        backbone = str(artifact.metadata.get("backbone", "unknown"))
        aliases = [artifact_name(job.dataset, job.split.category, backbone), "latest", self._run_alias()]
        self.run.log_artifact(artifact, aliases=aliases)

    @_guarded
    def log_training(self, event: dict[str, Any]) -> None:
        """One event of a category's training (``cluster.training``): a step record (loss terms, learning rate,
        batch / data / optimisation time), a validation (all metrics, the best so far, the mean over the
        categories' latest validations), or an epoch's end (its loss; after a validation also its checkpoint,
        as an artifact aliased ``latest``, and ``best`` when the monitored value improved)."""
        key, kind = event["key"], event["kind"]
        if key not in self._training_axes:
            self._training_axes.add(key)
            self.run.define_metric(f"{key}/train/step")
            self.run.define_metric(f"{key}/*", step_metric=f"{key}/train/step")  # each category its own x axis
        if kind == "step":
            values = {f"{key}/train/{name}": value for name, value in event.items() if name not in ("kind", "key")}
            self.run.log(values)
        elif kind == "validation":
            metrics = {name: value for name, value in event["metrics"].items() if value is not None}
            self._validations[key] = metrics
            logged = {f"{key}/val/{name}": value for name, value in metrics.items()}
            self.run.log({**logged, f"{key}/train/step": event["step"], f"{key}/train/epoch": event["epoch"]})
            names = sorted({name for values in self._validations.values() for name in values})
            means = {f"mean/val/{name}": float(np.mean([v[name] for v in self._validations.values() if name in v]))
                     for name in names}
            self.run.summary.update({**means, f"{key}/val/best_{event['monitor']}": event["best"],
                                     f"{key}/val/best_epoch": event["best_epoch"]})
        elif kind == "epoch":
            self.run.log({f"{key}/train/epoch_loss": event["loss"], f"{key}/train/epoch": event["epoch"],
                          f"{key}/train/step": event["step"]})
            if event.get("metrics") is not None and event.get("latest_checkpoint"):
                self._log_checkpoint(event)

    def _log_checkpoint(self, event: dict[str, Any]) -> None:
        import wandb

        dataset, category = event["key"].split("/", 1)
        metrics = event["metrics"]
        metadata = {"epoch": event["epoch"], "step": event["step"], "loss": event["loss"],
                    **{name: metrics.get(name) for name in ("image_auroc", "pixel_auroc", "aupro")}}
        artifact = wandb.Artifact(artifact_name("checkpoint", dataset, category), type=CHECKPOINT_ARTIFACT_TYPE,
                                  metadata=metadata)
        # Staged copy (the next epoch replaces the file; atomically, so the copy is of one checkpoint).
        artifact.add_file(event["latest_checkpoint"], name="checkpoint.safetensors")
        self.run.log_artifact(artifact, aliases=["latest", *(["best"] if event.get("best_checkpoint") else [])])

    @_guarded
    def log_model(self, job: "CategoryJob", folder: Path) -> None:
        """A trained category's model.safetensors + model.json as a ``trained-model`` artifact; aliased ``best``
        when its weights are the best validated epoch's."""
        artifact = folder_artifact(folder, job.dataset, job.split.category)
        training = artifact.metadata.get("training") or {}
        best = training.get("best_epoch") is not None and training.get("best_epoch") == training.get("weights_epoch")
        self.run.log_artifact(artifact, aliases=["latest", self._run_alias(), *(["best"] if best else [])])

    def _run_alias(self) -> str:
        return artifact_name(self.run.name or self.run_dir.name)

    @_guarded
    def log_run(self, results: Sequence["CategoryResult"], summary: dict[str, Any], figures: dict[str, Path]) -> None:
        """End of a benchmark or training: a results table of one row per category (method, backbone, dataset,
        metrics, timings), bar charts over it, throughput, memory, figures; the means, the run's time and its
        GPU-seconds in the summary: a benchmark's GPUs the plan reserved x run time, a training's as its
        summary records them (``cluster.gpu_s``: GPUs x the seconds its fit and predict tasks held them)."""
        import wandb

        method = method_of(summary)
        rows = [{**metrics, **timings} for metrics, timings in zip(metric_rows(results), timing_rows(results))]
        mean = rows.pop() if rows else {}  # the last row is the mean: a summary value, not a category
        columns = ["method", "backbone", "dataset", "category", *METRIC_NAMES, "memory_size", *timing_keys(results)]
        for row, result in zip(rows, results):
            row.update(method=method, backbone=result.bank.metadata.get("backbone"))
        table = wandb.Table(columns=columns, data=[[row.get(column) for column in columns] for row in rows])
        logged: dict[str, Any] = {"results": table}
        for name in ("image_auroc", "pixel_auroc"):
            bars = [[f"{row['dataset']}/{row['category']}", row[name]] for row in rows if row[name] is not None]
            if bars:
                bar_table = wandb.Table(columns=["category", name], data=bars)
                logged[f"charts/{name}"] = wandb.plot.bar(bar_table, "category", name, title=f"{name} per category")
        cluster = summary.get("cluster", {})
        extractors = cluster.get("extractors", [])
        if extractors:
            fields = sorted({name for stats in extractors for name in stats})
            actor_rows = [[position, *(stats.get(name) for name in fields)] for position, stats in enumerate(extractors)]
            logged["actors"] = wandb.Table(columns=["actor", *fields], data=actor_rows)
        logged.update({f"figures/{name}": wandb.Image(str(path)) for name, path in figures.items() if Path(path).is_file()})
        self.run.log(logged)
        totals: dict[str, Any] = {"method": method}
        totals.update({f"mean/{name}": mean[name] for name in METRIC_NAMES if mean.get(name) is not None})
        totals.update({f"timings/{name}": value for name, value in summary.get("timings", {}).items()})
        seconds = summary.get("timings", {}).get("total_s")
        if seconds is not None:
            totals["run/time_s"] = seconds
            gpus = reserved_gpus(cluster)
            gpu_s = cluster.get("gpu_s", None if gpus is None else round(seconds * gpus, 3))  # a training's: its tasks'
            if gpu_s is not None:
                totals["run/gpu_s"] = gpu_s
        totals.update({f"actors/{position}/images_per_s": stats.get("images_per_s")
                       for position, stats in enumerate(extractors)})
        if cluster.get("driver_peak_rss_mb") is not None:
            totals["memory/driver_peak_rss_mb"] = cluster["driver_peak_rss_mb"]
        self.run.summary.update(totals)

    @_guarded
    def log_system(self, samples: "Samples") -> None:
        """System samples by process (``extractor_0``, ``fit_1``: ``cluster.system_stats``) as
        ``system/<process>/<name>`` against ``system/time_s``, the seconds since the run started. Called
        while the run goes, with the samples that came since the last call."""
        started = self.run.start_time
        timeline = sorted(((sample["time"], f"system/{process}", sample)
                           for process, taken in samples.items() for sample in taken), key=lambda entry: entry[:2])
        for moment, prefix, sample in timeline:
            values = {f"{prefix}/{name}": value for name, value in sample.items() if name != "time"}
            self.run.log({SYSTEM_STEP: round(moment - started, 3), **values})

    @_guarded
    def log_run_folder(self, run_dir: Path) -> None:
        """The finished run folder's results as a ``benchmark-results`` artifact, so they outlive the
        cluster's disks (``wandb.log_run_folder``); paths inside it are the folder's own."""
        import wandb

        if not self.settings.log_run_folder:
            return
        run_dir = Path(run_dir)
        artifact = wandb.Artifact(artifact_name("results", run_dir.name), type=RUN_FOLDER_ARTIFACT_TYPE,
                                  metadata=json.loads((run_dir / "summary.json").read_text())["mean"])
        for path in sorted({path for pattern in RUN_FOLDER_FILES for path in run_dir.glob(pattern)}):
            artifact.add_file(str(path), name=path.relative_to(run_dir).as_posix(), policy="immutable")
        self.run.log_artifact(artifact, aliases=["latest"])

    @_guarded
    def log_predictions(self, records: Sequence[dict[str, Any]], out_dir: Path) -> None:
        """A predict job's scores and labels, with its overlay images, as one table."""
        import wandb

        columns = ["image_path", "pred_score", "pred_label", "overlay"]
        data = [[record["image_path"], record["pred_score"], record["pred_label"],
                 wandb.Image(str(Path(out_dir) / record["overlay"]))] for record in records]
        self.run.log({"predictions": wandb.Table(columns=columns, data=data)})
        self.run.summary.update({"images": len(records), "anomalous": sum(r["pred_label"] for r in records)})

    def use_input(self, source: str | Path) -> Path:
        """The bank or trained model a job scores with, declared as this run's input; returns its local path.

        A ``wandb:<entity>/<project>/<name>:<alias>`` reference is downloaded into the run folder (either
        type); unlike logging, that cannot degrade gracefully: without it there is nothing to score with. A
        local folder (or its bank.safetensors) is declared as the artifact its files make: the same name and
        digest as when a job logged it, so W&B links this run to that version.
        """
        if not is_wandb_ref(source):
            path = Path(source)
            self._use_folder(path if path.is_dir() else path.parent)
            return path
        entity, project, version = parse_wandb_ref(source)
        if self.run is None or self.mode != "online":
            raise TrackingError(f"resolving {source} needs an online W&B run (--wandb online or auto with an API key); "
                                f"tracking here is {self.mode}")
        try:
            artifact = self.run.use_artifact(f"{entity}/{project}/{version}")
        except Exception as error:
            raise TrackingError(f"cannot find W&B artifact {source}: {error}") from error
        if artifact.type not in INPUT_ARTIFACT_TYPES:
            raise TrackingError(f"W&B artifact {source} is of type {artifact.type!r}; a job scores with "
                                f"{' or '.join(INPUT_ARTIFACT_TYPES)}")
        try:
            folder = artifact.download(root=str(self.run_dir / "artifacts" / artifact_name(version)))
        except Exception as error:
            raise TrackingError(f"cannot download W&B {artifact.type} {source}: {error}") from error
        return Path(folder)

    @_guarded
    def _use_folder(self, folder: Path) -> None:
        if not any((folder / kind[0]).is_file() for kind in FOLDER_KINDS):
            return  # not a bank or model folder: the job's own loading says so, tracking stays on
        metadata = _folder_metadata(folder)
        self._use(folder_artifact(folder, metadata.get("dataset") or folder.parent.name,
                                  metadata.get("category") or folder.name))

    @_guarded
    def use_dataset(self, job: "CategoryJob") -> None:
        """A category's images as an input: an artifact of the image list (paths relative to the root, per
        split), the root's path in its metadata. No image is uploaded or read (a ``file://`` reference to the
        root would make W&B hash every file under it); a changed list is a new version."""
        import wandb

        splits = {"train": job.split.train, "test": job.split.test, "validation": job.validation or []}
        images = {split: [_relative(sample.image_path, job.root) for sample in samples] for split, samples in splits.items()}
        metadata = {"root": job.root, "dataset": job.dataset, "category": job.split.category,
                    **{f"n_{split}": len(paths) for split, paths in images.items()},
                    "train_list_sha256": train_list_sha256(job.split.train, job.root)}
        artifact = wandb.Artifact(artifact_name("dataset", job.dataset, job.split.category), type=DATASET_ARTIFACT_TYPE,
                                  metadata=metadata)
        with artifact.new_file("images.json") as handle:
            json.dump(images, handle)
        self._use(artifact)

    @_guarded
    def use_backbone(self, metadata: dict[str, Any]) -> None:
        """The backbone a bank or model was built with: its weights as an input (an artifact holding their sha256;
        none for random initialisation) and, in the run config's ``resolved_backbones``, the layers and weights
        it resolved to (``layers: []`` means the architecture's default)."""
        import wandb

        name, digest = str(metadata["backbone"]), str(metadata["weights_sha256"])
        backbones = dict(self.run.config.get("resolved_backbones") or {})
        backbones[name] = {"layers": list(metadata["layers"]), "weights": metadata.get("weights"), "weights_sha256": digest}
        self.run.config.update({"resolved_backbones": backbones}, allow_val_change=True)
        if digest == RANDOM_INIT:
            return
        artifact = wandb.Artifact(artifact_name("weights", name), type=WEIGHTS_ARTIFACT_TYPE,
                                  metadata={"backbone": name, "weights": metadata.get("weights"), "sha256": digest})
        with artifact.new_file("sha256.txt") as handle:
            handle.write(digest + "\n")
        self._use(artifact)

    @_guarded
    def log_resolved(self, values: dict[str, Any]) -> None:
        """Values resolved at run time (the actor plan, threads, devices) into the run's config, as ``resolved_<key>``."""
        self.run.config.update({f"resolved_{key}": value for key, value in values.items()}, allow_val_change=True)

    def _use(self, artifact: Any) -> None:
        """Declare ``artifact`` as an input of this run, once per name and content.

        Online this is ``use_artifact``. Offline W&B refuses ``use_artifact``, so the artifact is recorded the
        way ``use_artifact`` records a new artifact (logged, then used once committed): ``wandb sync`` then
        creates the same input edge.
        """
        artifact.finalize()
        key = f"{artifact.name}@{artifact.digest}"
        if key in self._declared:
            return
        self._declared.add(key)
        if self.mode == "online":
            self.run.use_artifact(artifact)
        else:
            self.run._log_artifact(artifact, use_after_commit=True)

    def finish(self, exit_code: int = 0) -> None:
        """Close the run (bounded by the finish timeout); safe to call twice."""
        with self._lock:
            run, self.run = self.run, None
        if run is None:
            return
        try:
            _finish(run, exit_code)
        except Exception as error:
            log.warning("W&B run did not finish cleanly (%s); its files stay under %s for `wandb sync`",
                        str(error).splitlines()[0] if str(error) else type(error).__name__, self.run_dir)


def folder_artifact(folder: Path, dataset: str, category: str, member: str | None = None) -> Any:
    """The artifact of a bank folder (``bank-<dataset>-<category>[-<member>]``, type ``memory-bank``) or of a
    trained model's (``model-<dataset>-<category>``, type ``trained-model``), its JSON as metadata. Logging a
    folder and declaring it as an input build the same artifact, so both name the same version."""
    import wandb

    folder = Path(folder)
    metadata = _folder_metadata(folder)
    record, tensors, kind, prefix = _folder_kind(folder)
    artifact = wandb.Artifact(artifact_name(prefix, dataset, category, *([member] if member else [])), type=kind,
                              metadata=metadata)
    for file in (tensors, record):
        # The files are written atomically and never changed afterwards: no staging copy needed.
        artifact.add_file(str(folder / file), name=file, policy="immutable")
    return artifact


# What a category folder saves: (JSON record, tensors file, artifact type, name prefix), the first whose record
# exists; else a bank's. Every saved memory (a bank, PaDiM's statistics: anomaly_core.memories) is a bank artifact.
FOLDER_KINDS = ((MODEL_METADATA_FILE, "model.safetensors", MODEL_ARTIFACT_TYPE, "model"),
                *((memory.record, memory.tensors, BANK_ARTIFACT_TYPE, "bank") for memory in SAVED_MEMORIES))


def _folder_kind(folder: Path) -> tuple[str, str, str, str]:
    return next((kind for kind in FOLDER_KINDS if (Path(folder) / kind[0]).is_file()), FOLDER_KINDS[-1])


def _folder_metadata(folder: Path) -> dict[str, Any]:
    return json.loads((Path(folder) / _folder_kind(folder)[0]).read_text())


def _relative(path: str | Path, root: str) -> str:
    return str(path).removeprefix(str(root)).lstrip("/")


def _finish(run: Any, exit_code: int) -> None:
    """Finish the run and shut the W&B service down, so the run's files are complete on return.

    wandb-core writes the run's transaction log after ``finish`` returns; a process that exits right
    then (the end of every job) can lose it. ``teardown`` waits for the service, within finish_timeout.
    """
    import wandb

    run.finish(exit_code=exit_code)
    wandb.teardown()


def _curve_chart(key: str, x: np.ndarray, y: np.ndarray, names: tuple[str, str], title: str) -> Any:
    """The chart ``wandb.plot.roc_curve`` draws, built from our own points (that helper needs pandas)."""
    import wandb

    table = wandb.Table(columns=["class", *names], data=[[key, float(a), float(b)] for a, b in zip(x, y)])
    return wandb.plot_table(
        "wandb/area-under-curve/v0",
        table,
        {"x": names[0], "y": names[1], "class": "class"},
        {"title": title, "x-axis-title": names[0], "y-axis-title": names[1]},
    )


def reserved_gpus(cluster: dict[str, Any]) -> float | None:
    """GPUs the run's resource plan reserved (an ensemble's members run one after another: the most any did);
    None without a plan (a training run has none: its summary records ``gpu_s``, its tasks' GPU-seconds)."""
    plans = [cluster["plan"]] if "plan" in cluster else [member["plan"] for member in cluster.get("members", {}).values()
                                                         if "plan" in member]
    return max((sum(actor.get("gpus", 0.0) for actor in plan.get("actors", [])) for plan in plans), default=None)
