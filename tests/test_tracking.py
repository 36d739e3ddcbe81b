"""W&B tracking: what an offline run records (read back from its files), mode off, a broken W&B.

The offline run is read back from its transaction log (``run-<id>.wandb``: LevelDB-style blocks of
protobuf ``Record``s, the file ``wandb sync`` uploads) and its media files, so the tests check what
W&B would show, not merely that a folder appeared.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import socket
import struct
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomaly_core.bank import save_bank, write_json
from anomaly_core.config import WandbConfig
from anomaly_core.metrics import METRIC_NAMES, mean_metrics
from cluster.pipeline import CategoryJob
from jobs.report import figure_paths, write_category_figure, write_report
from jobs.tracking import (BANK_ARTIFACT_TYPE, DATASET_ARTIFACT_TYPE, MODEL_ARTIFACT_TYPE, RUN_FOLDER_ARTIFACT_TYPE,
                           RUN_ID_FILE, WEIGHTS_ARTIFACT_TYPE, Tracker, TrackingError, api_key_configured, artifact_name,
                           reserved_gpus, resolve_mode, run_tags)
from tests.test_report import TRANSFORM, fake_results

REPO = Path(__file__).resolve().parent.parent
FAKE_KEY = "0123456789abcdef" * 3  # 48 characters, never valid anywhere
BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path):
    """Protobuf records of a ``.wandb`` transaction log (7-byte file header, then 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    position, pending = 7, b""
    while position + 7 <= len(data):
        if BLOCK - position % BLOCK < 7:  # a block's tail too short for a header is padding
            position += BLOCK - position % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record
        elif kind not in (FIRST, MIDDLE):
            break


def read_offline_run(run_dir: Path, log_file: Path | None = None) -> dict:
    """The run record, final config, summary, history rows, artifacts and metric definitions of the one
    offline run under ``run_dir`` (or of the transaction log ``log_file``)."""
    if log_file is None:
        [log_file] = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    run, summary, history, artifacts, metrics, config = None, {}, [], [], [], {}
    for record in read_records(log_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            config.update({item.key: json.loads(item.value_json) for item in run.config.update})
        elif kind == "summary":
            for item in record.summary.update:
                summary[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        elif kind == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item})
        elif kind == "artifact":
            artifacts.append(record.artifact)
        elif kind == "metric":
            metrics.append(record.metric)
        elif kind == "config":  # a change of the config after init
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
    return {"run": run, "summary": summary, "history": history, "artifacts": artifacts, "metrics": metrics,
            "config": config, "files": log_file.parent / "files"}


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """Every W&B folder under tmp_path, no credentials anywhere, offline unless a test says otherwise."""
    for name in ("WANDB_DIR", "WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
        folder = tmp_path / "wandb_home" / name.lower()
        folder.mkdir(parents=True)
        monkeypatch.setenv(name, str(folder))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path / "wandb_home"


@pytest.fixture(scope="module")
def results(tire_root):
    return fake_results(tire_root)


SYSTEM_SAMPLES = {  # what BenchmarkPipeline.system_samples returns: by process
    "extractor_0": [{"time": 5.0, "cpu_percent": 180.0, "rss_mib": 900.0, "gpu_memory_mib": 512.0, "gpu_percent": 71.0},
                    {"time": 7.0, "cpu_percent": 95.5, "rss_mib": 910.0, "gpu_memory_mib": 640.0, "gpu_percent": 88.0}],
    "evaluator_0": [{"time": 6.0, "cpu_percent": 40.0, "rss_mib": 300.0}],
    "evaluator_1": [{"time": 4.0, "cpu_percent": 12.5, "rss_mib": 280.0}],
}


def _track_benchmark(tracker: Tracker, results, run_dir: Path) -> dict:
    summary = {"timings": {"total_s": 9.5, "images_per_s": 3.2},
               "cluster": {"extractors": [{"images": 30, "busy_s": 6.0, "images_per_s": 5.0},
                                          {"images": 24, "busy_s": 8.0, "images_per_s": 3.0}],
                           "plan": {"actors": [{"role": "extractor", "gpus": 0.5}, {"role": "extractor", "gpus": 0.5},
                                               {"role": "evaluator", "gpus": 0.25}]},
                           "driver_peak_rss_mb": 812.5},
               "config": {"backbone": {"name": "tf_efficientnet_lite0"}}}
    tracker.define_metrics("patchcore (tf_efficientnet_lite0)")
    if tracker.active:
        started = tracker.run.start_time  # the samples' wall times, as seconds after the run's start
        tracker.log_system({process: [{**sample, "time": started + sample["time"]} for sample in samples]
                            for process, samples in SYSTEM_SAMPLES.items()})
    for result in results:
        folder = run_dir / result.job.dataset / result.job.split.category
        result.bank.metadata["thresholds"] = {"image": result.report.values["image_threshold"],
                                              "pixel": result.report.values["pixel_threshold"]}
        save_bank(result.bank, folder)
        tracker.log_category(result, TRANSFORM)
        tracker.log_bank(result.job, folder)
        write_category_figure(run_dir, result, TRANSFORM)
        write_json(folder / "metrics.json", result.report.to_dict())
    summary["mean"] = {"metrics": mean_metrics([result.report for result in results]).values}
    write_json(run_dir / "summary.json", summary)
    write_report(run_dir, results, summary)
    tracker.log_run(results, summary, figure_paths(run_dir, results))
    tracker.log_run_folder(run_dir)
    return summary


def test_offline_run_holds_metrics_table_images_and_bank_artifacts(wandb_env, results, tmp_path):
    run_dir = tmp_path / "outputs" / "bench-1"
    settings = WandbConfig(mode="offline", project="anomaly-test", group="nightly", tags=["ci", "tire"], log_images=2)
    with Tracker(settings, "benchmark", run_dir, config={"name": "bench", "seed": 7}) as tracker:
        assert tracker.active and tracker.mode == "offline"
        _track_benchmark(tracker, results, run_dir)
    assert not tracker.active
    recorded = read_offline_run(run_dir)

    run = recorded["run"]
    assert (run.project, run.job_type, run.run_group, list(run.tags)) == ("anomaly-test", "benchmark", "nightly", ["ci", "tire"])
    assert run.display_name == "bench-1"
    config = recorded["config"]
    assert config["name"] == "bench" and config["seed"] == 7
    assert config["method"] == "patchcore (tf_efficientnet_lite0)"  # what the workspace groups runs by

    summary = recorded["summary"]
    for result in results:
        for name in METRIC_NAMES:  # an undefined metric (spro: no LOCO defects here) is left out of the summary
            value = result.report.values[name]
            assert summary[f"{result.job.key}/{name}"] == pytest.approx(value) if value is not None else (
                f"{result.job.key}/{name}" not in summary)
        assert summary[f"{result.job.key}/memory_size"] == len(result.bank.features)
        assert summary[f"{result.job.key}/time/coreset_s"] == 0.5
    mean = mean_metrics([result.report for result in results]).values
    assert summary["mean/image_auroc"] == pytest.approx(mean["image_auroc"])
    assert summary["timings/total_s"] == 9.5
    assert summary["actors/0/images_per_s"] == 5.0 and summary["actors/1/images_per_s"] == 3.0
    assert summary["memory/driver_peak_rss_mb"] == 812.5
    assert summary["method"] == "patchcore (tf_efficientnet_lite0)"
    assert summary["run/time_s"] == 9.5 and summary["run/gpu_s"] == pytest.approx(9.5 * 1.25)  # 1.25 GPUs reserved
    aurocs = [result.report.values["image_auroc"] for result in results]
    assert summary["category/image_auroc"] == {"min": pytest.approx(min(aurocs)), "max": pytest.approx(max(aurocs))}

    # One history row per category on the category_index axis: its metrics and its heat maps
    categories = [row for row in recorded["history"] if "category_index" in row]
    assert [(row["category_index"], row["category"]) for row in categories] == list(enumerate(r.job.key for r in results))
    assert [row["category/image_auroc"] for row in categories] == pytest.approx(aurocs)
    assert all(("category/spro" in row) == (result.report.values["spro"] is not None)
               for row, result in zip(categories, results))
    axes = {item.name or item.glob_name: item for item in recorded["metrics"] if not item.expanded_from_glob}
    assert axes["category/image_auroc"].step_metric == axes["examples"].step_metric == "category_index"
    assert (axes["category/aupro"].summary.min, axes["category/aupro"].summary.max) == (True, True)
    assert axes["system/*"].step_metric == "system/time_s"

    # The actors' system samples, merged in time order, against seconds since the run started
    system = [row for row in recorded["history"] if "system/time_s" in row]
    assert [row["system/time_s"] for row in system] == pytest.approx([4.0, 5.0, 6.0, 7.0], abs=1e-3)
    assert system[0] == {"system/time_s": pytest.approx(4.0, abs=1e-3), "system/evaluator_1/cpu_percent": 12.5,
                         "system/evaluator_1/rss_mib": 280.0, **{k: v for k, v in system[0].items() if k.startswith("_")}}
    assert system[3]["system/extractor_0/gpu_percent"] == 88.0 and system[3]["system/extractor_0/gpu_memory_mib"] == 640.0
    assert system[2]["system/evaluator_0/cpu_percent"] == 40.0 and "system/evaluator_0/gpu_percent" not in system[2]

    files = recorded["files"]
    [table_file] = (files / "media" / "table").glob("results_*.table.json")
    table = json.loads(table_file.read_text())
    assert table["columns"][:4 + len(METRIC_NAMES)] == ["method", "backbone", "dataset", "category", *METRIC_NAMES]
    assert {"memory_size", "extract_train_s", "coreset_s", "evaluate_s", "metrics_s"} <= set(table["columns"])
    rows = {(row[2], row[3]): dict(zip(table["columns"], row)) for row in table["data"]}
    assert list(rows) == [(r.job.dataset, r.job.split.category) for r in results]  # no mean row: it is in the summary
    assert {(row["method"], row["backbone"]) for row in rows.values()} == {("patchcore (tf_efficientnet_lite0)",
                                                                             "tf_efficientnet_lite0")}
    assert rows[("visa", "tire")]["aupro"] == pytest.approx(results[2].report.values["aupro"])
    [actors_file] = (files / "media" / "table").glob("actors_*.table.json")
    actors = json.loads(actors_file.read_text())
    assert actors["columns"] == ["actor", "busy_s", "images", "images_per_s"]  # each field once
    bars = json.loads(next((files / "media" / "table" / "charts").glob("image_auroc_table_*.json")).read_text())
    assert [row[0] for row in bars["data"]] == [r.job.key for r in results]
    for result in results:
        roc = json.loads(next((files / "media" / "table" / result.job.key).glob("roc_table_*.json")).read_text())
        assert roc["columns"] == ["class", "fpr", "tpr"] and roc["data"][-1][1:] == [1.0, 1.0]

    row = categories[1]
    filenames = row["examples/filenames"]
    assert len(filenames) == 4  # two worst and two best
    assert all(caption.startswith(f"{results[1].job.key} ") for caption in row["examples/captions"])
    for name in filenames:
        with Image.open(files / name) as image:
            assert image.size == (112, 112) and image.mode == "RGB"
    masks = row["examples/all_masks"]
    assert all({"ground_truth", "prediction"} <= set(entry) for entry in masks)
    assert all((files / entry["prediction"]["path"]).is_file() for entry in masks)
    figures = sorted(p.name.split("_")[0] for p in (files / "media" / "images" / "figures").glob("*.png"))
    assert figures == ["auroc", "roc"]

    banks = [artifact for artifact in recorded["artifacts"] if artifact.type == BANK_ARTIFACT_TYPE]
    assert [artifact.name for artifact in banks] == ["bank-mvtec_ad-tire", "bank-mvtec_ad-tire_hard", "bank-visa-tire"]
    for artifact, result in zip(banks, results):
        folder = run_dir / result.job.dataset / result.job.split.category
        assert set(artifact.aliases) == {"latest", "bench-1",  # the run's name
                                         f"{result.job.dataset}-{result.job.split.category}-tf_efficientnet_lite0"}
        assert json.loads(artifact.metadata) == json.loads((folder / "bank.json").read_text())
        contents = {entry.path: entry for entry in artifact.manifest.contents}
        assert set(contents) == {"bank.safetensors", "bank.json"}
        for name, entry in contents.items():
            data = (folder / name).read_bytes()
            assert entry.size == len(data)
            assert entry.digest == base64.b64encode(hashlib.md5(data).digest()).decode()

    [folder_artifact] = [artifact for artifact in recorded["artifacts"] if artifact.type == RUN_FOLDER_ARTIFACT_TYPE]
    assert folder_artifact.name == "results-bench-1" and list(folder_artifact.aliases) == ["latest"]
    assert json.loads(folder_artifact.metadata) == json.loads((run_dir / "summary.json").read_text())["mean"]
    contents = {entry.path: entry for entry in folder_artifact.manifest.contents}
    expected = {"summary.json", "report.md", "metrics.csv", "timings.csv", "figures/auroc.png", "figures/roc.png",
                *(f"figures/samples/{r.job.dataset}__{r.job.split.category}.png" for r in results),
                *(f"{r.job.dataset}/{r.job.split.category}/metrics.json" for r in results)}
    assert set(contents) == expected  # no bank (own artifact), no W&B files
    for name, entry in contents.items():
        data = (run_dir / name).read_bytes()
        assert entry.digest == base64.b64encode(hashlib.md5(data).digest()).decode()


def test_mode_off_imports_nothing_and_creates_nothing(tmp_path, tmp_path_factory):
    """In a fresh interpreter: no W&B run or service, no run folder, no W&B folders anywhere.

    (wandb may still be imported: timm imports it when installed; importing it writes nothing.)
    """
    home = tmp_path_factory.mktemp("home")  # matplotlib may cache fonts there; W&B must not write
    script = f"""
import os, sys
for name in ("WANDB_DIR", "WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
    os.environ[name] = {str(tmp_path)!r} + "/" + name.lower()
from pathlib import Path
from anomaly_core.config import WandbConfig
from jobs.tracking import Tracker
from tests.test_report import TRANSFORM, fake_results
results = fake_results(Path({str(REPO / "data" / "tire_small")!r}), n_test=4)
with Tracker(WandbConfig(mode="off"), "benchmark", Path({str(tmp_path / "run")!r}), config={{"a": 1}}) as tracker:
    tracker.log_category(results[0], TRANSFORM)
    tracker.log_bank(results[0].job, Path({str(tmp_path / "missing")!r}))
    tracker.log_run(results, {{}}, {{}})
wandb = sys.modules.get("wandb")
print("active", tracker.active, "wandb run", None if wandb is None else wandb.run)
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "HOME": str(home)})
    assert done.returncode == 0, done.stderr
    assert "active False wandb run None" in done.stdout
    assert list(tmp_path.iterdir()) == [], sorted(p.name for p in tmp_path.rglob("*"))
    assert not [p for p in home.rglob("*") if "wandb" in p.name.lower()]


def test_every_job_imports_where_wandb_is_not_installed():
    """The offline GPU image has no wandb (benchmarks/gpu_check.sh runs the jobs there with --wandb off):
    no job or cluster module may import it when loaded, only when tracking starts."""
    script = ("import sys; sys.modules['wandb'] = None  # import wandb now raises ImportError\n"
              "import jobs.benchmark, jobs.build_bank, jobs.compare, jobs.evaluate, jobs.predict, jobs.train, jobs.workspace\n"
              "import cluster.training\nprint('imported')")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)})
    assert done.returncode == 0 and "imported" in done.stdout, done.stderr


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_unreachable_wandb_disables_tracking_quickly_without_raising(wandb_env, results, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.delenv("WANDB_MODE")
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="jobs.tracking"):
        with Tracker(WandbConfig(mode="online"), "benchmark", tmp_path / "run", init_timeout=3) as tracker:
            assert not tracker.active
            _track_benchmark(tracker, results, tmp_path / "run")
    assert time.monotonic() - started < 60
    warnings = [record.getMessage() for record in caplog.records if record.name == "jobs.tracking"]
    assert len(warnings) == 1 and "W&B tracking disabled" in warnings[0] and "wandb.init failed" in warnings[0]
    assert FAKE_KEY not in caplog.text
    assert (tmp_path / "run" / "report.md").is_file()  # the job itself went on


def test_online_without_credentials_is_refused_up_front(wandb_env, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="jobs.tracking"):
        tracker = Tracker(WandbConfig(mode="online"), "predict", tmp_path / "run")
    assert not tracker.active and tracker.mode == "off"
    assert "no API key is configured" in caplog.text
    assert not (tmp_path / "run").exists()


def test_a_failing_call_turns_tracking_off_with_one_warning(wandb_env, results, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="jobs.tracking"):
        with Tracker(WandbConfig(mode="offline", log_images=0), "evaluate", tmp_path / "run") as tracker:
            tracker.log_category(results[0], TRANSFORM)
            tracker.log_bank(results[0].job, tmp_path / "no-such-bank")  # bank.json missing: raises inside
            assert not tracker.active
            tracker.log_category(results[1], TRANSFORM)
    messages = [record.getMessage() for record in caplog.records if record.name == "jobs.tracking"]
    assert len(messages) == 1 and "log_bank failed" in messages[0]
    summary = read_offline_run(tmp_path / "run")["summary"]
    assert f"{results[0].job.key}/image_auroc" in summary and f"{results[1].job.key}/image_auroc" not in summary


def test_auto_mode_goes_online_only_with_local_credentials(tmp_path):
    netrc = tmp_path / "netrc"
    assert resolve_mode("auto", {"NETRC": str(netrc)}) == "offline"
    assert resolve_mode("auto", {"NETRC": str(netrc), "WANDB_API_KEY": FAKE_KEY}) == "online"
    netrc.write_text(f"machine api.wandb.ai\n  login user\n  password {FAKE_KEY}\n")
    assert api_key_configured({"NETRC": str(netrc)})
    assert not api_key_configured({"NETRC": str(netrc), "WANDB_BASE_URL": "https://wandb.example.com"})
    assert resolve_mode("offline", {"WANDB_API_KEY": FAKE_KEY}) == "offline"
    # W&B's own switch, where a cluster node sets it, wins over credentials in auto mode
    assert resolve_mode("auto", {"WANDB_API_KEY": FAKE_KEY, "WANDB_MODE": "offline"}) == "offline"
    assert resolve_mode("auto", {"WANDB_API_KEY": FAKE_KEY, "WANDB_MODE": "disabled"}) == "off"
    with pytest.raises(ValueError, match="auto, online, offline or off"):
        resolve_mode("disabled")


def test_use_input_needs_a_wellformed_reference_and_online_tracking(wandb_env, tmp_path):
    with Tracker(WandbConfig(mode="offline"), "predict", tmp_path / "run") as tracker:
        with pytest.raises(TrackingError, match="must look like"):
            tracker.use_input("wandb:bank-mvtec-tire:latest")
        with pytest.raises(TrackingError, match="needs an online W&B run"):
            tracker.use_input("wandb:me/proj/bank-mvtec-tire:latest")
    assert artifact_name("bank", "my data", "cat/1") == "bank-my-data-cat-1"
    assert np.all([c.isalnum() or c in "-_." for c in artifact_name("x:y", "a b")])


class EventList(list):
    """What ``cluster.training`` puts its events on (a Ray queue there), as a list."""

    put = list.append


def test_training_events_become_step_curves_validations_and_checkpoint_artifacts(wandb_env, tire_root, tmp_path):
    """A real 2-epoch Reverse Distillation fit (Lite0 teacher, 64 px, 4 images) through the job's callbacks:
    every step's loss terms and learning rate on the category's own step axis, each validation's metrics and
    their mean, and a checkpoint artifact per validated epoch with latest / best aliases and its epoch."""
    from anomaly_core.config import parse_config
    from anomaly_core.data import load_split
    from anomaly_core.training import Trainer, load_images, load_validation_set
    from cluster.training import _callbacks, build_model, trainer_config, transform_of
    from jobs.tracking import CHECKPOINT_ARTIFACT_TYPE

    config = parse_config({"datasets": [{"name": "tire_small", "format": "mvtec", "root": str(tire_root)}],
                           "backbone": {"name": "tf_efficientnet_lite0", "layers": [], "weights": "package"},
                           "preprocess": {"resize": 64, "crop": 64},
                           "training": {"model": "reverse_distillation", "epochs": 2, "batch_size": 2,
                                        "validate_every_n_epochs": 1, "log_every_n_steps": 1}}, "t")
    split = load_split("mvtec", tire_root, "tire")
    model = build_model(config)
    transform = transform_of(config)
    events = EventList()
    steps: list[dict] = []
    checkpoints: list[int] = []
    trainer = Trainer(trainer_config(config, "cpu"), tmp_path / "checkpoints",
                      _callbacks("tire_small/tire", events, steps, lambda: checkpoints.append(len(steps))))
    trainer.fit(model, load_images(split.train[:4], transform), load_validation_set(split.test[::5], transform))
    assert [event["kind"] for event in events].count("step") == 4 and len(steps) == 4  # also kept for the report
    assert checkpoints == [2, 4]  # after each epoch's latest checkpoint (2 steps an epoch), the step log is saved
    run_dir = tmp_path / "train-run"
    with Tracker(WandbConfig(mode="offline", project="anomaly-test"), "train", run_dir) as tracker:
        tracker.define_metrics("reverse_distillation (tf_efficientnet_lite0)", ["tire_small/tire"])
        for event in events:
            tracker.log_training(event)
    recorded = read_offline_run(run_dir)
    steps = [row for row in recorded["history"] if "tire_small/tire/train/loss" in row]
    assert [row["tire_small/tire/train/step"] for row in steps] == [1, 2, 3, 4]
    expected = [event["loss"] for event in events if event["kind"] == "step"]
    assert [row["tire_small/tire/train/loss"] for row in steps] == pytest.approx(expected)
    assert all({"tire_small/tire/train/lr", "tire_small/tire/train/batch_time", "tire_small/tire/train/data_time",
                "tire_small/tire/train/optim_time"} <= set(row) for row in steps)
    validations = [event for event in events if event["kind"] == "validation"]
    summary = recorded["summary"]
    assert summary["mean/val/image_auroc"] == pytest.approx(validations[-1]["metrics"]["image_auroc"])
    assert summary["tire_small/tire/val/best_loss"] == pytest.approx(validations[-1]["best"])
    # W&B's own summaries: the best validation (max for AUROC-like metrics, min for losses) and the lowest loss
    aurocs = [event["metrics"]["image_auroc"] for event in validations]
    assert summary["tire_small/tire/val/image_auroc"] == {"max": pytest.approx(max(aurocs))}
    epoch_losses = [event["loss"] for event in events if event["kind"] == "epoch"]
    assert summary["tire_small/tire/train/epoch_loss"] == {"min": pytest.approx(min(epoch_losses))}
    assert summary["tire_small/tire/train/loss"] == {"min": pytest.approx(min(expected))}
    axes = {item.name or item.glob_name: item for item in recorded["metrics"] if not item.expanded_from_glob}
    assert axes["tire_small/tire/val/image_auroc"].step_metric == "tire_small/tire/train/epoch"
    assert axes["tire_small/tire/train/loss"].step_metric == "tire_small/tire/train/step"
    checkpoints = [artifact for artifact in recorded["artifacts"] if artifact.type == CHECKPOINT_ARTIFACT_TYPE]
    assert len(checkpoints) == 2 and all(artifact.name == "checkpoint-tire_small-tire" for artifact in checkpoints)
    assert [json.loads(artifact.metadata)["epoch"] for artifact in checkpoints] == [0, 1]
    assert all({"latest", "best"} <= set(artifact.aliases) for artifact in checkpoints)  # the loss fell both epochs
    assert json.loads(checkpoints[1].metadata)["image_auroc"] == pytest.approx(validations[1]["metrics"]["image_auroc"])


def test_reserved_gpus_come_from_the_resource_plan_only():
    plan = lambda *gpus: {"actors": [{"gpus": share} for share in gpus]}  # noqa: E731
    assert reserved_gpus({"plan": plan(0.5, 0.5, 0.25)}) == 1.25
    assert reserved_gpus({"members": {"a": {"plan": plan(1, 1)}, "b": {"plan": plan(0.5)}}}) == 2  # one after another
    assert reserved_gpus({"plan": plan()}) == 0  # a CPU-only run costs no GPU time
    assert reserved_gpus({"resources": {"GPU": 8.0}}) is None  # a training run: no plan, no claim


def test_runs_have_an_identity_and_a_resumed_run_reopens_its_wandb_run(wandb_env, tmp_path):
    """Name, default group (the config's name; wandb.group wins), automatic tags after the user's, and with
    ``keep_id`` the run id kept in the run folder: a second job on that folder continues the same W&B run."""
    from anomaly_core.config import parse_config

    config = parse_config({"name": "nightly", "datasets": [{"name": "tire_small", "format": "mvtec", "root": "data/x"},
                                                             {"name": "visa", "format": "visa", "root": "data/y"}],
                           "backbone": {"name": "wide_resnet50_2", "weights": "random"},
                           "cluster": {"gpus_per_extractor": 1}}, "t")
    assert run_tags(config) == ["patchcore", "wide_resnet50_2", "tire_small", "visa", "gpu"]
    run_dir = tmp_path / "bench"
    settings = WandbConfig(mode="offline", project="anomaly-test", tags=["ci", "gpu"])
    with Tracker(settings, "benchmark", run_dir, name="benchmark nightly", group=config.name, tags=run_tags(config),
                 keep_id=True) as tracker:
        first_id = tracker.run.id
    run = read_offline_run(run_dir)["run"]
    assert (run.display_name, run.run_group, run.run_id) == ("benchmark nightly", "nightly", first_id)
    assert list(run.tags) == ["ci", "gpu", "patchcore", "wide_resnet50_2", "tire_small", "visa"]  # no duplicate
    assert (run_dir / RUN_ID_FILE).read_text().strip() == first_id
    with Tracker(settings, "benchmark", run_dir, name="benchmark nightly", keep_id=True) as tracker:
        assert tracker.run.id == first_id
    logs = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(logs) == 2 and {log.name for log in logs} == {f"run-{first_id}.wandb"}  # `wandb sync` appends
    with Tracker(WandbConfig(mode="offline", group="mine"), "evaluate", tmp_path / "eval", group="nightly") as tracker:
        assert tracker.run.group == "mine" and tracker.run.id != first_id  # no keep_id: a new run
    assert not (tmp_path / "eval" / RUN_ID_FILE).exists()


def _model_folder(folder: Path, best_epoch: int) -> Path:
    """A trained model's files as jobs.train writes them (their contents do not matter to W&B)."""
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"tensors" * 100)
    write_json(folder / "model.json", {"kind": "reverse_distillation", "backbone": "tf_efficientnet_lite0",
                                       "layers": ["blocks.1"], "weights": "package", "weights_sha256": "ab" * 32,
                                       "training": {"best_epoch": best_epoch, "weights_epoch": 4}})
    return folder


def test_local_inputs_are_declared_as_the_versions_that_logged_them(wandb_env, results, tmp_path):
    """A bank and a trained model logged by one offline run, then consumed from their local folders by another:
    the second run records them as inputs with the same name, type and digest (the same W&B version), its
    category's images as a reference artifact, the weights by sha256, and the resolved values in its config.
    (Offline W&B cannot look an artifact up by name; ``wandb:`` references are covered below.)"""
    job = results[0].job
    bank_folder = tmp_path / "outputs" / job.dataset / job.split.category
    result = results[0]
    result.bank.metadata.update(layers=["blocks.2"], weights="package", weights_sha256="cd" * 32)
    save_bank(result.bank, bank_folder)
    model_folder = _model_folder(tmp_path / "train-run" / job.dataset / job.split.category, best_epoch=4)
    with Tracker(WandbConfig(mode="offline", project="anomaly-test"), "train", tmp_path / "producer",
                 name="train rd tire") as tracker:
        tracker.log_bank(job, bank_folder)
        tracker.log_model(job, model_folder)
    logged = {artifact.type: artifact for artifact in read_offline_run(tmp_path / "producer")["artifacts"]}
    assert set(logged[MODEL_ARTIFACT_TYPE].aliases) == {"latest", "best", "train-rd-tire"}

    fewer = CategoryJob(job.dataset, job.root, replace(job.split, train=job.split.train[:3]))
    with Tracker(WandbConfig(mode="offline", project="anomaly-test"), "evaluate", tmp_path / "consumer") as tracker:
        assert tracker.use_input(bank_folder / "bank.safetensors") == bank_folder / "bank.safetensors"
        assert tracker.use_input(str(model_folder)) == model_folder
        tracker.use_dataset(job)
        tracker.use_dataset(job)  # declared once
        tracker.use_dataset(fewer)  # another image list: another version
        tracker.use_backbone(result.bank.metadata)
        tracker.use_backbone(json.loads((model_folder / "model.json").read_text()))
        tracker.use_backbone({"backbone": "wide_resnet50_2", "layers": [], "weights_sha256": "random"})
        tracker.log_resolved({"plan": {"extractor_threads": 2, "decode_workers": [1, 1], "colocate": False}})
        assert tracker.active
    recorded = read_offline_run(tmp_path / "consumer")
    used = recorded["artifacts"]
    assert all(artifact.use_after_commit for artifact in used)
    for kind in (BANK_ARTIFACT_TYPE, MODEL_ARTIFACT_TYPE):
        [artifact] = [artifact for artifact in used if artifact.type == kind]
        assert (artifact.name, artifact.digest) == (logged[kind].name, logged[kind].digest)
        assert artifact.digest  # a content digest, so W&B resolves it to the logged version

    datasets = [artifact for artifact in used if artifact.type == DATASET_ARTIFACT_TYPE]
    assert [artifact.name for artifact in datasets] == [f"dataset-{job.dataset}-{job.split.category}"] * 2
    assert datasets[0].digest != datasets[1].digest
    entries = {entry.path: entry for entry in datasets[0].manifest.contents}
    assert set(entries) == {"images.json"}  # no image
    images = json.loads(Path(entries["images.json"].local_path).read_text())
    assert images["train"] == [str(Path(s.image_path).relative_to(job.root)) for s in job.split.train]
    assert len(images["test"]) == len(job.split.test) and images["validation"] == []
    metadata = json.loads(datasets[0].metadata)
    assert (metadata["n_train"], metadata["root"]) == (len(job.split.train), job.root)

    weights = [artifact for artifact in used if artifact.type == WEIGHTS_ARTIFACT_TYPE]
    assert [json.loads(artifact.metadata)["sha256"] for artifact in weights] == ["cd" * 32, "ab" * 32]  # none for random
    assert len({artifact.digest for artifact in weights}) == 2
    config = {item.key: json.loads(item.value_json) for item in recorded["run"].config.update}
    final = recorded["config"]
    assert final["resolved_backbones"] == {
        "tf_efficientnet_lite0": {"layers": ["blocks.1"], "weights": "package", "weights_sha256": "ab" * 32},
        "wide_resnet50_2": {"layers": [], "weights": None, "weights_sha256": "random"}}
    assert final["resolved_plan"] == {"extractor_threads": 2, "decode_workers": [1, 1], "colocate": False}
    assert "resolved_plan" not in config  # added after the start, as a job resolves it


class FakeArtifact:
    def __init__(self, kind: str, files: Path) -> None:
        self.type, self.files = kind, files

    def download(self, root: str) -> str:
        return str(self.files)


def test_a_wandb_reference_is_accepted_by_what_it_is(wandb_env, tmp_path):
    """``use_artifact`` by name needs the W&B server (offline it is refused), so the run is a stand-in here:
    a trained model and a bank are both accepted, anything else is refused naming its type."""
    model = _model_folder(tmp_path / "model", best_epoch=1)
    requested = []

    class OnlineRun:
        def use_artifact(self, name: str) -> FakeArtifact:
            requested.append(name)
            kind = name.split("/")[-1].split("-")[0]
            return FakeArtifact({"model": MODEL_ARTIFACT_TYPE, "bank": BANK_ARTIFACT_TYPE}.get(kind, kind), model)

    tracker = Tracker(WandbConfig(mode="off"), "predict", tmp_path / "run")
    tracker.run, tracker.mode = OnlineRun(), "online"
    assert tracker.use_input("wandb:me/proj/model-mvtec-tire:best") == model
    assert tracker.use_input("wandb:me/proj/bank-mvtec-tire:v3") == model
    with pytest.raises(TrackingError, match="of type 'dataset'; a job scores with memory-bank or trained-model"):
        tracker.use_input("wandb:me/proj/dataset-mvtec-tire:latest")
    assert requested == ["me/proj/model-mvtec-tire:best", "me/proj/bank-mvtec-tire:v3", "me/proj/dataset-mvtec-tire:latest"]


def test_evaluate_scores_a_trained_model_and_declares_it(wandb_env, tire_root, tmp_path):
    """jobs.evaluate with a trained model's folder (an untrained Reverse Distillation at 64 px: the numbers only
    have to be the model's): metrics from its predictions, its files copied and annotated there, not in place,
    and a W&B run named for what ran that declares the model as the version its files make."""
    import yaml
    from sklearn.metrics import roc_auc_score

    from anomaly_core.config import parse_config
    from anomaly_core.training import save_model_files
    from cluster.training import build_model
    from jobs.evaluate import main
    from jobs.tracking import folder_artifact

    raw = {"name": "rd-eval", "datasets": [{"name": "tire_small", "format": "mvtec", "root": str(tire_root)}],
           "backbone": {"name": "tf_efficientnet_lite0", "layers": [], "weights": "package"},
           "preprocess": {"resize": 64, "crop": 64}, "training": {"model": "reverse_distillation", "epochs": 1}}
    (tmp_path / "rd.yaml").write_text(yaml.safe_dump(raw))
    source = tmp_path / "train-run" / "tire_small" / "tire"
    save_model_files(build_model(parse_config(raw, "t")), source, 64, {"best_epoch": None, "weights_epoch": 0})
    before = (source / "model.json").read_text()
    out = tmp_path / "eval"
    assert main(["--config", str(tmp_path / "rd.yaml"), "--category", "tire", "--bank", str(source), "--out", str(out),
                 "--wandb", "offline"]) == 0
    folder = out / "tire_small" / "tire"
    metrics = json.loads((folder / "metrics.json").read_text())
    records = json.loads((folder / "predictions" / "predictions.json").read_text())
    labels = [int("/good/" not in record["image_path"]) for record in records]
    assert metrics["values"]["image_auroc"] == pytest.approx(roc_auc_score(labels, [r["pred_score"] for r in records]))
    assert metrics["bank_sha256"] == json.loads(before)["tensors_sha256"]
    assert (source / "model.json").read_text() == before  # the source is left as it was
    assert "thresholds" in json.loads((folder / "model.json").read_text())

    recorded = read_offline_run(out)
    run = recorded["run"]
    assert (run.display_name, run.run_group) == ("evaluate tire_small/tire tf_efficientnet_lite0", "rd-eval")
    assert list(run.tags) == ["reverse_distillation", "tf_efficientnet_lite0", "tire_small", "cpu"]
    [model] = [artifact for artifact in recorded["artifacts"] if artifact.type == MODEL_ARTIFACT_TYPE]
    expected = folder_artifact(source, "tire_small", "tire")
    expected.finalize()
    assert (model.name, model.digest) == ("model-tire_small-tire", expected.digest)
    inputs = {artifact.type for artifact in recorded["artifacts"] if artifact.use_after_commit}
    assert inputs == {MODEL_ARTIFACT_TYPE, DATASET_ARTIFACT_TYPE, WEIGHTS_ARTIFACT_TYPE}
    summary = recorded["summary"]
    auroc = pytest.approx(metrics["values"]["image_auroc"])
    assert summary["tire_small/tire/image_auroc"] == auroc
    # The benchmark's metric definitions: its category on the category_index axis, W&B's min / max summary
    axes = {item.name or item.glob_name: item for item in recorded["metrics"] if not item.expanded_from_glob}
    assert axes["category/image_auroc"].step_metric == axes["examples"].step_metric == "category_index"
    assert summary["category/image_auroc"] == {"min": auroc, "max": auroc}
    assert recorded["config"]["method"] == "reverse_distillation (tf_efficientnet_lite0)"  # runs are grouped by it


def test_a_folder_that_is_no_bank_leaves_tracking_on(wandb_env, tmp_path, caplog):
    """The job's own loading reports a wrong --bank; declaring it must not turn tracking off first."""
    with caplog.at_level(logging.WARNING, logger="jobs.tracking"):
        with Tracker(WandbConfig(mode="offline"), "evaluate", tmp_path / "run") as tracker:
            assert tracker.use_input(tmp_path / "nothing-here") == tmp_path / "nothing-here"
            assert tracker.active
    assert not caplog.records
    assert read_offline_run(tmp_path / "run")["artifacts"] == []
