"""``--resume RUN_DIR``: a run whose driver died continues; its finished categories are kept, verified.

A category counts as finished when its ``metrics.json`` (written last) exists, names the bank beside
it by sha256, and that bank loads and matches its own recorded digest; its predictions are read back
for the run's report. Anything else is recomputed from scratch. The run's resolved configuration is
recorded at its start (``run_config.yaml``), so a resume needs no ``--config``, and one given anyway
must equal it: numbers of two configurations never mix in one summary.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from safetensors.numpy import load_file

from anomaly_core.backbones import file_sha256
from anomaly_core.bank import BankError, MemoryBank, load_bank
from anomaly_core.config import ConfigError, RunConfig, parse_config
from anomaly_core.metrics import MetricReport
from anomaly_core.memories import load_memory
from anomaly_core.scoring import Predictions
from anomaly_core.training.model_files import METADATA_FILE, TENSORS_FILE, read_model_metadata
from cluster.ensemble import ENSEMBLE_KEY
from cluster.pipeline import CategoryJob, CategoryResult
from jobs.outputs import ENSEMBLE_RECORD, HELD_OUT_FILE, MEMBERS, category_folder

log = logging.getLogger("jobs.resume")

RUN_CONFIG = "run_config.yaml"
# Keys a resume may change: they decide where results are reported or whether features are
# cached, never what the results are (the cache key covers everything features depend on).
# jobs.train judges the recorded history again with a changed patience / min_delta (anomaly_core/training/trainer.py).
RESUMABLE_CHANGES = ("wandb.mode", "feature_cache.enabled", "feature_cache.dir", "training.patience", "training.min_delta")


def recorded_config(run_dir: Path) -> RunConfig:
    path = run_dir / RUN_CONFIG
    if not path.is_file():
        raise ConfigError(f"--resume {run_dir}: no {RUN_CONFIG} there; it is not a run folder of jobs.benchmark")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    return parse_config(raw, str(path))


def differences(recorded: Any, requested: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two plain config dumps, with both values."""
    if isinstance(recorded, dict) and isinstance(requested, dict):
        found = []
        for key in sorted(set(recorded) | set(requested)):
            found += differences(recorded.get(key), requested.get(key), f"{prefix}{key}.")
        return found
    if recorded != requested:
        return [f"{prefix.rstrip('.')}: run has {recorded!r}, now {requested!r}"]
    return []


def resume_config(recorded: RunConfig, requested: RunConfig, run_dir: Path) -> RunConfig:
    """``requested`` when it differs from the run's ``recorded`` config in resumable keys only."""
    changed = [line for line in differences(recorded.model_dump(mode="json"), requested.model_dump(mode="json"))
               if line.split(":")[0] not in RESUMABLE_CHANGES]
    if changed:
        raise ConfigError(f"--resume {run_dir}: the configuration differs from the run's ({RUN_CONFIG}):\n  "
                          + "\n  ".join(changed) + "\nresume without --config, or start a new run")
    return requested


def finished_category(run_dir: Path, job: CategoryJob, member: str | None = None) -> CategoryResult | None:
    """The category's recorded result (or its ensemble ``member``'s, with its held-out predictions), if it is
    complete and consistent; else None (recompute it)."""
    folder = category_folder(run_dir, job, member)
    metrics_path = folder / "metrics.json"
    if not metrics_path.is_file():
        return None
    try:
        record = json.loads(metrics_path.read_text())
        if (folder / ENSEMBLE_RECORD).is_file():
            bank = _ensemble_record(folder, job)
        elif (folder / METADATA_FILE).is_file():
            bank = model_record(folder)
        else:  # a bank or PaDiM's statistics, by the files there
            _, bank = load_memory(folder)
        if record.get("bank_sha256") != bank.metadata["bank_sha256"]:
            raise BankError(f"{metrics_path} names bank {record.get('bank_sha256')}, the folder holds "
                            f"{bank.metadata['bank_sha256']}")
        predictions = _predictions(folder / "predictions", job)
        held_out = _held_out(folder / "predictions") if member else None
        report = MetricReport(record["values"], record["notes"])
        timings = record["timings"]
    except (BankError, OSError, ValueError, KeyError, TypeError) as error:
        where = f"{job.key} member {member}" if member else job.key
        log.warning("%s: the recorded result cannot be used (%s); computing it again", where, error)
        return None
    return CategoryResult(job, bank, predictions, report, timings, held_out=held_out)


def _ensemble_record(folder: Path, job: CategoryJob) -> MemoryBank:
    """An ensemble category's record, as a bank without rows; each member's bank must still be the one it names."""
    metadata = json.loads((folder / ENSEMBLE_RECORD).read_text())
    for entry in metadata[ENSEMBLE_KEY]:
        member = load_bank(folder / MEMBERS / entry["label"])
        if member.sha256 != entry["bank_sha256"]:
            raise BankError(f"{folder / ENSEMBLE_RECORD} names member bank {entry['bank_sha256']} for "
                            f"{entry['label']}, its folder holds {member.sha256}")
    return MemoryBank(np.empty((0, sum(entry["feature_dim"] for entry in metadata[ENSEMBLE_KEY])), np.float32), metadata)


def model_record(folder: Path) -> MemoryBank:
    """A trained model's model.json as a bank without rows, its tensors file checked against it."""
    metadata = read_model_metadata(folder)
    if file_sha256(folder / TENSORS_FILE) != metadata["tensors_sha256"]:
        raise BankError(f"{folder / TENSORS_FILE} does not match the tensors_sha256 of {folder / METADATA_FILE}")
    return MemoryBank(np.empty((0, 0), np.float32), {**metadata, "bank_sha256": metadata["tensors_sha256"],
                                                     "memory_size": 0})


def _predictions(folder: Path, job: CategoryJob) -> Predictions:
    records = json.loads((folder / "predictions.json").read_text())
    paths = [record["image_path"] for record in records]
    if paths != [sample.image_path for sample in job.split.test]:
        raise ValueError(f"{folder / 'predictions.json'} lists other test images than the dataset now holds")
    maps = load_file(str(folder / "anomaly_maps.safetensors"))["anomaly_maps"].astype(np.float32)
    if len(maps) != len(records):
        raise ValueError(f"{folder / 'anomaly_maps.safetensors'} holds {len(maps)} maps for {len(records)} images")
    scores = np.asarray([record["pred_score"] for record in records], dtype=np.float64)
    return Predictions(scores, maps, np.arange(len(records), dtype=np.int64))


def _held_out(folder: Path) -> Predictions:
    tensors = load_file(str(folder / HELD_OUT_FILE))
    scores, maps = tensors["scores"], tensors["maps"]
    if len(scores) != len(maps):
        raise ValueError(f"{folder / HELD_OUT_FILE} holds {len(scores)} scores for {len(maps)} maps")
    return Predictions(scores, maps, np.arange(len(scores), dtype=np.int64))
