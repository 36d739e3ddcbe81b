"""The Ray layer on a simulated multi-node cluster: same banks and metrics for any actor count,
identical to the single-process engine, and unchanged when actors are killed mid-work.

A head plus two worker nodes, each worker advertising one GPU (Ray only schedules on the count; torch
sees no CUDA here, so the extractors run on CPU). Images are 128 -> 112 to keep the suite fast.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
import yaml
from ray.cluster_utils import Cluster
from ray.util.queue import Queue
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from anomaly_core.augment import Augmentation, augment_seed
from anomaly_core.bank import load_bank
from anomaly_core.config import AugmentConfig, FeatureCacheConfig, RunConfig, ThresholdConfig, WandbConfig, parse_config
from anomaly_core.coreset import greedy_coreset, greedy_select, start_index_for
from anomaly_core.data import CategorySplit, load_split
from anomaly_core.ensemble import Normalisation, combine
from anomaly_core.extraction import ExtractionSettings, PatchFeatureExtractor
from anomaly_core.features import merge_features
from anomaly_core.data.anomalydino import ReferenceRotations
from anomaly_core.patchcore import (
    anomalydino_preprocess,
    augment_base_seed,
    build_bank,
    coreset_seed,
    evaluate,
    scoring_params,
)
from anomaly_core.padim import PadimScoring, fit_statistics, load_statistics
from anomaly_core.scoring import NearestNeighbourScorer, predict
from anomaly_core.thresholds import hold_out
from anomaly_core.training import Trainer, TrainerCallbacks, load_images, load_model_files, predict_images
from cluster import system_stats
from cluster.colocated import colocated_actor
from cluster.coreset import CoresetHolder, HolderPool, HolderProxy
from cluster.evaluator import bank_reference, evaluator_actor
from cluster.extractor import extractor_actor
from cluster.pipeline import BenchmarkPipeline, CategoryJob
from cluster.training import build_model, fit_category, submit_fit, task_options, trainer_config, transform_of
from jobs import benchmark
from jobs import build_bank as build_bank_job
from jobs import compare as compare_job
from jobs import evaluate as evaluate_job
from jobs import predict as predict_job
from jobs import train as train_job
from jobs.outputs import write_category
from jobs.resume import finished_category
from jobs.tracking import BANK_ARTIFACT_TYPE

from .conftest import REPO, TIRE_ROOT
from .test_tracking import read_offline_run, wandb_env  # noqa: F401 - wandb_env is a fixture


def tire_config(**cluster):
    return parse_config(
        {
            "name": "cluster-test",
            "datasets": [{"name": "tire_small", "format": "mvtec", "root": str(TIRE_ROOT)}],
            "backbone": {"name": "tf_efficientnet_lite0", "layers": ["blocks.2", "blocks.4"], "weights": "package"},
            "preprocess": {"resize": 128, "crop": 112},
            "coreset": {"method": "approximate", "ratio": 0.1},
            "cluster": {"batch_size": 4, "gpus_per_extractor": 1, "cpus_per_actor": 0.5, **cluster},
            "wandb": {"mode": "off"},
        },
        "test",
    )


@pytest.fixture(scope="module")
def ray_cluster():
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": False},
    )
    for _ in range(2):
        cluster.add_node(num_cpus=1, num_gpus=1, node_ip_address="127.0.0.1")
    ray.init(address=cluster.address)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def tire_job():
    """A slice of tire (12 train, 10 test images of both labels) keeps each cluster run to seconds."""
    split = load_split("mvtec", TIRE_ROOT, "tire")
    small = CategorySplit(split.dataset, split.category, split.train[:12], split.test[::3])
    assert {sample.label for sample in small.test} == {0, 1}
    return CategoryJob("tire_small", str(TIRE_ROOT), small)


@pytest.fixture(scope="module")
def pipeline(ray_cluster):
    """One pipeline (2 extractors) shared by the fault tests, which come last in this module: its actors
    hold the cluster's GPUs until the module ends, so no later test could place its own extractors."""
    return BenchmarkPipeline(tire_config(num_extractors=2))


@pytest.fixture(scope="module")
def reference(tire_job):
    """The single-process engine, no Ray: the numbers every cluster run must reproduce bit for bit."""
    config = tire_config()
    torch.set_num_threads(1)  # what the extractors use (cluster.cpus_per_actor < 2)
    settings = ExtractionSettings.from_config(config)
    extractor = PatchFeatureExtractor(settings)
    split = tire_job.split
    train = extractor.extract(split.train, range(len(split.train)))
    seed = coreset_seed(config.seed, "tire_small", "tire")
    bank = build_bank(train, "approximate", 0.1, 128, seed, extractor.describe())
    test = extractor.extract(split.test, range(len(split.test)))
    predictions = predict(NearestNeighbourScorer(bank.features, scoring_params(config)), test, settings.crop)
    report = evaluate(split.test, predictions, extractor.transform, 0.3)
    return {"bank": bank, "predictions": predictions, "report": report, "train": train}


@pytest.mark.parametrize("n_extractors,gpus,n_holders,decode_workers,colocate",
                         [(1, 1, 1, 1, True), (2, 1, 3, 3, False), (4, 0.5, 2, 2, True)])
def test_cluster_run_equals_single_process_engine(ray_cluster, tire_job, reference, n_extractors, gpus, n_holders,
                                                  decode_workers, colocate):
    """Colocated (the default where extractors have a GPU share: each keeps its shards for the coreset and scores
    them) or with holder and evaluator actors of their own: the engine's bank, scores and maps, bit for bit."""
    config = tire_config(num_extractors=n_extractors, gpus_per_extractor=gpus, coreset_shards=n_holders,
                         decode_workers=decode_workers, colocate=colocate)
    pipeline = BenchmarkPipeline(config)
    assert pipeline.plan.colocate is colocate and len(pipeline.holders.actors) == (n_extractors if colocate else n_holders)
    assert [stats["decode_workers"] for stats in pipeline.actor_stats()["extractors"]] == [decode_workers] * n_extractors
    placed = ray.get([actor.where.remote() for actor in pipeline.extractors])
    assert len({where["node"] for where in placed}) == min(n_extractors, 2)  # spread over both GPU nodes
    assert all(len(where["gpu_ids"]) == 1 for where in placed)  # each holds (a share of) one GPU
    (result,) = list(pipeline.run([tire_job]))
    assert result.bank.sha256 == reference["bank"].sha256
    samples = pipeline.system_samples()  # each actor sampled itself on its own thread while it worked
    assert list(samples) == [*(f"extractor_{i}" for i in range(n_extractors)),
                             *(f"evaluator_{i}" for i in range(len(pipeline.evaluators)))]
    assert all(max(sample["cpu_percent"] for sample in samples[f"extractor_{i}"]) > 0 and
               min(sample["rss_mib"] for sample in samples[f"extractor_{i}"]) > 100 for i in range(n_extractors))
    assert np.array_equal(result.predictions.scores, reference["predictions"].scores)
    assert np.array_equal(result.predictions.maps, reference["predictions"].maps)
    assert result.report.values == reference["report"].values
    assert result.report.values["pixel_auroc"] > 0.9
    stored = result.object_store
    features_bytes = 12 * 14 * 14 * 1024 * 4  # 12 train images x 14 x 14 patches x 1024 float32 values
    if colocate:  # only receipts (image lists) travel: the features stayed in the extractors, none is left held
        assert stored["train_features_bytes"] < 16 * 1024 and stored["test_features_bytes"] < 16 * 1024
        assert ray.get([actor.held_bytes.remote() for actor in pipeline.extractors]) == [0] * n_extractors
    else:
        assert stored["train_features_bytes"] >= features_bytes and stored["test_features_bytes"] > 0
    assert stored["bank_bytes"] >= result.bank.features.nbytes and stored["predictions_bytes"] > 0
    pipeline.close()


def test_killed_coreset_holder_is_rebuilt_and_picks_unchanged(ray_cluster, reference):
    train = reference["train"]
    parts = [ray.put(train)]
    seed = 7
    pool = HolderPool([None])
    proxy = HolderProxy(pool, 0, (parts, "exact", 128, seed, 1), batch=16)

    class KillOnce:
        """Kills the holder after its third update, mid-greedy."""

        calls = 0

        def fetch_rows(self, indices):
            return proxy.fetch_rows(indices)

        def add_centers(self, rows, indices):
            proxy.add_centers(rows, indices)
            KillOnce.calls += 1
            if KillOnce.calls == 3:
                ray.get(proxy.prefetched)
                ray.kill(proxy.actor, no_restart=True)

        def top_candidates(self, b):
            return proxy.top_candidates(b)

    flat = train.flat()
    expected = greedy_coreset(flat, n_select=120, method="exact", seed=seed).indices
    got = greedy_select([KillOnce()], 120, start_index_for(len(flat), seed), batch=16).indices
    assert proxy.restarts == 1 and pool.actors[0] is proxy.actor  # the pool keeps the replacement
    assert np.array_equal(got, expected)


def test_colocated_extractor_restarted_after_a_crash_extracts_its_lost_shard_again(ray_cluster, reference, tire_job):
    """A colocated extractor keeps a shard it embedded and returns a receipt; killed and restarted by Ray, it has
    lost the shard, and a holder call extracts it again from the receipt: the same rows, the same picks."""
    settings = ExtractionSettings.from_config(tire_config())
    actor = colocated_actor(1).options(num_cpus=0.5).remote(settings, 1, 1)
    try:
        train = tire_job.split.train  # the reference's 12 images, in one batch-aligned shard
        receipt, _ = actor.extract.remote(list(train), list(range(len(train))), None, None, "shard-0")
        assert ray.get(receipt).token == "shard-0"
        assert ray.get(actor.held_bytes.remote()) == reference["train"].embeddings.nbytes
        ray.kill(actor, no_restart=False)
        deadline = time.monotonic() + 60
        while ray.get(actor.held_bytes.remote()) and time.monotonic() < deadline:  # calls retry on the restarted one
            time.sleep(0.2)
        assert ray.get(actor.held_bytes.remote()) == 0  # restarted: the shard is gone
        pool = HolderPool([None], actors=[actor])
        proxy = HolderProxy(pool, 0, ([receipt], "exact", 128, 7, 1), batch=16)
        assert proxy.shard_info()[0] == len(reference["train"].flat())  # loaded: extracted again in place
        expected = greedy_coreset(reference["train"].flat(), n_select=60, method="exact", seed=7).indices
        got = greedy_select([proxy], 60, start_index_for(len(reference["train"].flat()), 7), batch=16).indices
        assert np.array_equal(got, expected)
        indices, rows = ray.get(actor.original_rows.remote(expected))
        assert np.array_equal(rows, reference["train"].flat()[indices])
        ray.get(actor.unload.remote())
        assert ray.get(actor.held_bytes.remote()) == 0  # the coreset's end frees the shard
    finally:
        ray.kill(actor)


class HalfUpdatingShard:
    """A GreedyShard whose third update lands half-way and raises, as a CUDA out-of-memory would."""

    def __init__(self, shard):
        self.shard, self.updates = shard, 0

    def add_centers(self, rows, indices):
        self.updates += 1
        if self.updates == 3:
            self.shard.add_centers(rows[:1], indices[:1])
            raise MemoryError("CUDA out of memory (simulated)")
        self.shard.add_centers(rows, indices)

    def __getattr__(self, name):
        return getattr(self.shard, name)


class FlakyHolder(CoresetHolder):
    """Its first shard fails an update part-way; a reloaded shard does not."""

    loads = 0

    def load(self, *args):
        super().load(*args)
        self.loads += 1
        if self.loads == 1:
            self.shard = HalfUpdatingShard(self.shard)


def test_holder_update_that_raises_leaves_no_stale_shard_and_picks_unchanged(ray_cluster, reference):
    """Updates are acknowledged: the failed one drops its half-updated shard, the proxy reloads it on the same
    actor and replays every centre, and greedy picks exactly what the engine picks."""
    train, seed = reference["train"], 11
    pool = HolderPool([None])
    pool.remote_class = ray.remote(max_restarts=0)(FlakyHolder)
    pool.actors = [pool.replace(0)]
    proxy = HolderProxy(pool, 0, ([ray.put(train)], "exact", 128, seed, 1), batch=16)
    flat = train.flat()
    expected = greedy_coreset(flat, n_select=120, method="exact", seed=seed).indices
    got = greedy_select([proxy], 120, start_index_for(len(flat), seed), batch=16).indices
    assert proxy.restarts == 1 and pool.actors[0] is proxy.actor  # reloaded in place, not replaced
    assert ray.get(proxy.actor.__ray_call__.remote(lambda holder: holder.loads)) == 2
    assert np.array_equal(got, expected)


def test_two_round_mode_reports_radius(ray_cluster, tire_job):
    pipeline = BenchmarkPipeline(tire_config(num_extractors=1, coreset_shards=2).model_copy(
        update={"coreset": tire_config().coreset.model_copy(update={"distributed": "two_round"})}))
    bank = pipeline.build_bank(tire_job)
    info = bank.metadata["coreset"]
    assert info["distributed"] == "two_round" and info["rounds"] == 2
    assert info["coverage_radius"] > 0
    assert len(bank.features) == int(0.1 * bank.metadata["n_patches"])


def test_every_actor_role_runs_its_planned_thread_counts(ray_cluster, tire_job, reference):
    """Ray gives an actor's libraries its reservation rounded down (1 for these 0- and 0.5-CPU actors); every
    role runs each BLAS and OpenMP pool and torch at the count the pipeline passes it from the plan instead."""
    def uniform(counts: dict) -> set:
        return {count for api, found in counts.items() if api != "torch" for count in found}

    extractor = extractor_actor(0).options(num_cpus=0.5).remote(ExtractionSettings.from_config(tire_config()), 2, 1)
    holders = HolderPool([None])
    evaluator = evaluator_actor(0).options(num_cpus=0).remote()
    try:
        counts = ray.get(extractor.thread_counts.remote())
        assert uniform(counts) == {2} and counts["torch"] == 2
        parts = [ray.put(reference["train"])]
        for threads in (2, 1):  # the count of each category's coreset
            holders.actors[0].load.remote(parts, "approximate", 128, 0, threads)
            counts = ray.get(holders.actors[0].thread_counts.remote())
            assert uniform(counts) == {threads} and counts["torch"] is None  # a CPU holder never loads torch
        bank = bank_reference(reference["bank"].features)
        params = scoring_params(tire_config())
        ray.get(evaluator.score.remote("tire", bank, params, reference["train"], 112, 2))
        counts = ray.get(evaluator.thread_counts.remote())
        assert uniform(counts) == {2} and counts["torch"] == 2
    finally:
        for actor in (extractor, evaluator, *holders.actors):
            ray.kill(actor)


def test_benchmark_job_writes_outputs(ray_cluster, tmp_path, capsys):
    """jobs.benchmark on the whole tire category: files agree with each other and with the summary."""
    config = tire_config(num_extractors=2).model_copy(update={"output_dir": str(tmp_path)})
    run_dir = benchmark.run(config, run_name="r1")
    summary = json.loads((run_dir / "summary.json").read_text())
    (category,) = summary["categories"]
    folder = run_dir / "tire_small" / "tire"
    for name in ("bank.safetensors", "bank.json", "metrics.json", "config.yaml", "predictions/predictions.json"):
        assert (folder / name).is_file(), name
    bank_meta = json.loads((folder / "bank.json").read_text())
    metrics = json.loads((folder / "metrics.json").read_text())["values"]
    assert category["bank_sha256"] == bank_meta["bank_sha256"] == load_bank(folder).sha256
    assert category["metrics"] == metrics and summary["mean"]["metrics"]["aupro"] == metrics["aupro"]
    assert (category["n_train"], category["n_test"]) == (34, 28)
    assert (category["n_patches"], category["feature_dim"]) == (34 * 14 * 14, 1024)  # the per-object summary
    assert summary["cluster"]["feature_cache"] == {"hits": 0, "misses": 0, "failed_writes": 0}  # off by default
    assert bank_meta["crop"] == 112 and bank_meta["weights"] == "package"
    assert bank_meta["memory_size"] == int(0.1 * bank_meta["n_patches"]) == int(0.1 * 34 * 14 * 14)
    assert bank_meta["thresholds"]["image"] == metrics["image_threshold"]
    predictions = json.loads((folder / "predictions" / "predictions.json").read_text())
    assert len(predictions) == 28 and all(p["pred_label"] == int(p["pred_score"] >= metrics["image_threshold"])
                                          for p in predictions)
    # tire at 112 px: well above chance (measured 0.79 / 0.97 on this machine)
    assert metrics["image_auroc"] > 0.65 and metrics["pixel_auroc"] > 0.93
    assert summary["timings"]["images_per_s"] > 0
    assert "tire_small" in capsys.readouterr().out
    # The resource plan and the threads each stage used are part of the record.
    plan = summary["cluster"]["plan"]
    # Extractors with a GPU share are colocated: they hold and score their own features, no holder actors.
    assert plan["colocate"] is True
    assert sorted(a["role"] for a in plan["actors"]) == ["evaluator"] * 2 + ["extractor"] * 2
    for node in plan["nodes"]:
        placed = [a for a in plan["actors"] if a["node_id"] == node["node_id"]]
        assert sum(a["cpus"] for a in placed) <= node["cpus"] + 1e-9
        assert sum(a["gpus"] for a in placed) <= node["gpus"] + 1e-9
    assert len(category["timings"]["coreset_threads"]) == 2 and category["timings"]["eval_threads"] >= 1
    assert sum(e["scoring"]["images"] for e in summary["cluster"]["extractors"]) == 28  # scored where extracted
    assert sum(e["images"] for e in summary["cluster"]["evaluators"]) == 0  # evaluators: metrics only
    # Each extractor's decode threads (auto: 1, as cpus_per_actor < 1) and seconds per extraction stage.
    extractors = summary["cluster"]["extractors"]
    assert plan["decode_workers"] == [1, 1] and [e["decode_workers"] for e in extractors] == [1, 1]
    assert sum(e["images"] for e in extractors) == 34 + 28
    for stats in extractors:
        stages = stats["stages"]
        assert set(stages) == {"decode_s", "wait_decode_s", "h2d_s", "forward_s", "embed_s", "d2h_s"}
        assert stages["decode_s"] > 0 and stages["forward_s"] > 0 and stages["embed_s"] > 0
        assert sum(stages[name] for name in stages if name != "decode_s") <= stats["busy_s"] + 0.01  # parts of it
        assert stats["decode_images_per_s"] == pytest.approx(stats["images"] / stages["decode_s"], rel=0.05)
    # The features (float32) stay in the extractors: the store carries receipts, the bank and the predictions
    # (28 maps of 112 x 112 float32), and what it held is sampled while the run goes.
    features = (34 + 28) * 14 * 14 * 1024 * 4
    store = summary["cluster"]["object_store"]
    assert store["created_bytes"] < features / 2 and store["failed_samples"] == 0
    stored = category["object_store"]
    assert stored["train_features_bytes"] < 16 * 1024 and stored["test_features_bytes"] < 16 * 1024
    assert stored["bank_bytes"] >= bank_meta["memory_size"] * 1024 * 4 and stored["predictions_bytes"] >= 28 * 112 * 112 * 4
    assert 0 < store["peak_used_bytes"] <= store["capacity_bytes"] and store["samples"] >= 2


def test_infeasible_plan_fails_before_any_work(ray_cluster, tmp_path, capsys):
    config_path = tmp_path / "tire.yaml"
    config_path.write_text(json.dumps(tire_config(num_extractors=5).model_dump(mode="json")))
    code = benchmark.main(["--config", str(config_path), "--set", f"output_dir={tmp_path}", "--run-name", "r"])
    assert code == 2
    err = capsys.readouterr().err
    assert "cluster.num_extractors=5 cannot be placed" in err and "room for 2" in err
    assert not (tmp_path / "r" / "summary.json").exists()


def test_build_bank_then_evaluate_jobs(ray_cluster, wandb_env, tmp_path, capsys):
    """jobs.build_bank writes a bank that jobs.evaluate scores; a bank built at another size is refused.

    Evaluated with another scoring than it was built with, the bank written beside the metrics records
    that scoring: the thresholds it carries are on that scoring's scale, and jobs.predict scores with it.
    Tracked offline, the evaluate run declares as its input the very bank version the build_bank run logged,
    and both runs' configs hold the actor plan they ran with.
    """
    config_path = tmp_path / "tire.yaml"
    config_path.write_text(json.dumps(tire_config(num_extractors=1).model_dump(mode="json")))  # JSON is YAML
    common = ["--config", str(config_path), "--category", "tire", "--set", f"output_dir={tmp_path}"]
    assert build_bank_job.main(common + ["--out", str(tmp_path / "bank"), "--wandb", "offline"]) == 0
    bank = load_bank(tmp_path / "bank")
    assert bank.metadata["category"] == "tire" and bank.metadata["scoring"]["reweight_neighbours"] == 0
    reweighted = common + ["--bank", str(tmp_path / "bank"), "--out", str(tmp_path / "eval"),
                           "--set", "scoring.reweight_neighbours=3", "--wandb", "offline"]
    assert evaluate_job.main(reweighted) == 0
    built, evaluated = read_offline_run(tmp_path / "bank"), read_offline_run(tmp_path / "eval")
    assert (built["run"].display_name, evaluated["run"].display_name) == (
        "build_bank tire_small/tire tf_efficientnet_lite0", "evaluate tire_small/tire tf_efficientnet_lite0")
    assert built["run"].run_group == evaluated["run"].run_group == "cluster-test"
    assert list(built["run"].tags) == ["patchcore", "tf_efficientnet_lite0", "tire_small", "gpu"]
    [logged] = [artifact for artifact in built["artifacts"] if artifact.type == BANK_ARTIFACT_TYPE]
    [used] = [artifact for artifact in evaluated["artifacts"] if artifact.type == BANK_ARTIFACT_TYPE]
    assert (used.name, used.digest, used.use_after_commit) == (logged.name, logged.digest, True)
    assert evaluated["config"]["resolved_bank"] == {"source": str(tmp_path / "bank"), "bank_sha256": bank.sha256}
    for recorded in (built, evaluated):
        plan = recorded["config"]["resolved_plan"]
        assert [actor["role"] for actor in plan["actors"]].count("extractor") == 1 and "colocate" in plan
        assert recorded["config"]["resolved_backbones"]["tf_efficientnet_lite0"]["layers"] == ["blocks.2", "blocks.4"]
    folder = tmp_path / "eval" / "tire_small" / "tire"
    metrics = json.loads((folder / "metrics.json").read_text())["values"]
    assert metrics["image_auroc"] > 0.65 and metrics["pixel_auroc"] > 0.93
    recorded = json.loads((folder / "bank.json").read_text())
    assert recorded["scoring"]["reweight_neighbours"] == 3 and recorded["bank_sha256"] == bank.sha256
    assert recorded["thresholds"]["image"] == metrics["image_threshold"]
    assert "F1-optimal on this evaluation's labelled test set" in recorded["thresholds"]["source"]
    capsys.readouterr()
    mismatched = common + ["--bank", str(tmp_path / "bank"), "--set", "preprocess.crop=96"]
    assert evaluate_job.main(mismatched) == 2
    assert "crop: bank has 112, inference uses 96" in capsys.readouterr().err


def test_truncated_image_found_by_an_actor_is_one_clear_error(ray_cluster, tmp_path, capsys):
    """A file whose header reads but whose pixels do not passes preflight; the extractor's error is unwrapped."""
    root = tmp_path / "data"
    split = load_split("mvtec", TIRE_ROOT, "tire")
    for sample in (*split.train[:4], *split.test[:2]):
        for source in filter(None, (sample.image_path, sample.mask_path)):
            target = root / Path(source).relative_to(TIRE_ROOT)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, target)
    broken = root / Path(split.train[2].image_path).relative_to(TIRE_ROOT)
    broken.write_bytes(broken.read_bytes()[:2000])
    config = tire_config(num_extractors=1).model_dump(mode="json")
    config["datasets"][0]["root"] = str(root)
    config_path = tmp_path / "broken.yaml"
    config_path.write_text(json.dumps(config))
    assert benchmark.main(["--config", str(config_path), "--set", f"output_dir={tmp_path}/out"]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: cannot read image file {broken}") and "Traceback" not in error


def test_categories_stream_through_a_bounded_lookahead(ray_cluster, tire_job, reference):
    """Two categories with extraction one category ahead: each bank equals the engine's for its seed."""
    config = tire_config(num_extractors=2, prefetch_categories=1)
    second = CategoryJob("tire_copy", tire_job.root, tire_job.split)
    results = {result.job.key: result for result in BenchmarkPipeline(config).run([tire_job, second])}
    assert sorted(results) == ["tire_copy/tire", "tire_small/tire"]
    first = results["tire_small/tire"]
    assert first.bank.sha256 == reference["bank"].sha256
    assert np.array_equal(first.predictions.scores, reference["predictions"].scores)
    # the coreset seed derives from (dataset, category), so the copy has its own bank
    copy_seed = coreset_seed(config.seed, "tire_copy", "tire")
    expected = build_bank(reference["train"], "approximate", 0.1, 128, copy_seed, {})
    assert results["tire_copy/tire"].bank.sha256 == expected.sha256 != reference["bank"].sha256


def copy_slice(job: CategoryJob, root: Path) -> Path:
    """The slice's images and masks as a dataset of its own, for the jobs that read a whole category."""
    for sample in (*job.split.train, *job.split.test):
        for source in filter(None, (sample.image_path, sample.mask_path)):
            target = root / Path(source).relative_to(TIRE_ROOT)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, target)
    return root


def test_driver_killed_then_resumed_equals_the_undisturbed_run(ray_cluster, reference, tire_job, tmp_path, wandb_env,
                                                               monkeypatch):
    """SIGKILL the driver after its first category; --resume keeps that one and computes the other, and
    continues the killed run's offline W&B run, its actors' system samples logged while it goes.

    Both datasets hold the ``tire_job`` slice; the undisturbed numbers are the single-process
    engine's (the cluster equals them, tested above), so no second full run is needed.
    """
    root = copy_slice(tire_job, tmp_path / "slice")
    config = tire_config(num_extractors=1, prefetch_categories=1).model_dump(mode="json")
    config["datasets"] = [{"name": name, "format": "mvtec", "root": str(root)} for name in ("tire_small", "tire_copy")]
    config["output_dir"] = str(tmp_path)
    config["wandb"] = {"mode": "offline", "project": "anomaly-test"}
    config_path = tmp_path / "two.yaml"
    config_path.write_text(json.dumps(config))
    run_dir = tmp_path / "killed"
    driver = subprocess.Popen([sys.executable, "-m", "jobs.benchmark", "--config", str(config_path), "--run-name",
                               "killed"], cwd=REPO, env={**os.environ, "RAY_ADDRESS": ray_cluster.address},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = run_dir / "tire_small" / "tire" / "metrics.json"
    deadline = time.monotonic() + 300
    while not first.exists() and driver.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    assert first.exists() and not (run_dir / "tire_copy" / "tire" / "metrics.json").exists()
    kept_bank = run_dir / "tire_small" / "tire" / "bank.safetensors"
    kept_mtime = kept_bank.stat().st_mtime_ns

    assert benchmark.main(["--resume", str(run_dir), "--set", "scoring.k=3"]) == 2  # never two configs in one run
    monkeypatch.setattr(system_stats, "POLL_EVERY_S", 0.2)  # the actors' samples asked for while the category runs
    assert benchmark.main(["--resume", str(run_dir)]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed"] == ["tire_small/tire"] and kept_bank.stat().st_mtime_ns == kept_mtime
    kept, computed = summary["categories"]
    assert kept["bank_sha256"] == reference["bank"].sha256 and kept["metrics"] == reference["report"].values
    copy_bank = build_bank(reference["train"], "approximate", 0.1, 128, coreset_seed(0, "tire_copy", "tire"), {})
    assert computed["bank_sha256"] == copy_bank.sha256

    # One W&B run: the killed driver's offline run and the resumed one carry the id kept in the run folder
    run_id = (run_dir / "wandb" / "run_id").read_text().strip()
    killed, resumed = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    # (wandb names the file by the run's id when it starts; what a SIGKILLed driver's file holds beyond that
    # depends on how far wandb's writer had flushed: nothing more is asked of it)
    assert killed.name == resumed.name == f"run-{run_id}.wandb"
    recorded = read_offline_run(run_dir, resumed)
    assert recorded["run"].run_id == run_id
    history = recorded["history"]
    [copy_row] = [row for row in history if row.get("category") == "tire_copy/tire"]
    extractor = [row for row in history if "system/extractor_0/rss_mib" in row]
    assert extractor and all(row["system/extractor_0/rss_mib"] > 100 for row in extractor)
    assert extractor[0]["_step"] < copy_row["_step"]  # logged while the category ran, not only at the end
    times = [row["system/time_s"] for row in extractor]
    assert all(a < b for a, b in zip(times, times[1:]))  # and each sample once


def test_anomalydino_vit_bank_on_the_cluster_equals_the_single_process_engine(ray_cluster, tire_job):
    """configs/anomalydino.yaml's method (DINOv2 ViT-S/14 tokens, cosine kNN, mean of the top 1 %) on the real
    architecture with random weights, its masking and rotations on (tire is not in the authors' table; random
    tokens need a lower threshold for a mask that keeps some patches): 2 extractors give the engine's bank
    (the originals and 7 rotations of each training image), scores and maps bit for bit."""
    raw = yaml.safe_load((REPO / "configs" / "anomalydino.yaml").read_text())
    raw.update(datasets=[{"name": "tire_small", "format": "mvtec", "root": str(TIRE_ROOT)}],
               preprocess={"resize": 112, "crop": 112}, wandb={"mode": "off"},
               cluster={"batch_size": 4, "gpus_per_extractor": 1, "cpus_per_actor": 0.5, "num_extractors": 2})
    raw["backbone"]["weights"] = "random"
    raw["anomalydino"].update(masking=True, rotation=True, threshold=1.0)
    config = parse_config(raw, "anomalydino-test")
    # 4 training images: with their 7 rotations each, 32 extractions on each side (the bank's size is 8x theirs)
    tire_job = CategoryJob(tire_job.dataset, tire_job.root, CategorySplit(
        tire_job.split.dataset, tire_job.split.category, tire_job.split.train[:4], tire_job.split.test))
    (result,) = BenchmarkPipeline(config).run([tire_job])
    settings_dino = anomalydino_preprocess(config, "mvtec", "tire")
    assert result.bank.metadata["anomalydino"] == settings_dino.to_dict()
    assert result.bank.metadata["augment"] == {"reference_angles": [0, 45, 90, 135, 180, 225, 270, 315]}
    torch.set_num_threads(1)
    settings = ExtractionSettings.from_config(config)
    extractor = PatchFeatureExtractor(settings)
    split, n = tire_job.split, len(tire_job.split.train)
    originals = extractor.extract(split.train, range(n))
    assert originals.grid == (8, 8) and originals.embeddings.shape[-1] == 384  # raw ViT-S tokens, 112 / 14 = 8
    rotations = ReferenceRotations()
    copies = [extractor.extract(split.train, [c * n + i for i in range(n)], augmentation=rotations, seeds=[c] * n)
              for c in range(1, 8)]
    bank = build_bank(merge_features([originals, *copies]), "none", 0.1, 128, coreset_seed(0, "tire_small", "tire"),
                      extractor.describe())
    assert result.bank.sha256 == bank.sha256 and len(bank.features) == 8 * n * 64  # the full bank, 8x the originals
    params = scoring_params(config, settings_dino)
    assert (params.distance, params.image_score, params.top_percent) == ("cosine", "mean_top_percent", 1.0)
    test = extractor.extract(split.test, range(len(split.test)))
    predictions = predict(NearestNeighbourScorer(bank.features, params), test, settings.crop)
    assert np.array_equal(result.predictions.scores, predictions.scores)
    assert np.array_equal(result.predictions.maps, predictions.maps)
    assert result.report.values == evaluate(split.test, predictions, extractor.transform, 0.3).values
    # the mask kept some patches of some images and dropped others: the scores are not the unmasked ones
    _, patch_scores = NearestNeighbourScorer(bank.features, params).score_images(test.embeddings, grid=test.grid)
    assert 0 < (patch_scores > 0).sum() < patch_scores.size / 2
    unmasked = predict(NearestNeighbourScorer(bank.features, scoring_params(config)), test, settings.crop)
    assert not np.array_equal(unmasked.scores, predictions.scores)


def test_augmented_bank_on_the_cluster_equals_the_engine_and_is_recorded(ray_cluster, tire_job, reference):
    """augment: one seeded copy of each training image (rotation, brightness, blur, flip) joins the bank; the
    cluster's bank equals the single-process engine's bit for bit, differs from the plain one, and says so."""
    augment = {"copies": 1, "rotation_degrees": 5.0, "brightness": 0.1, "blur_sigma": 1.0, "hflip": True}
    config = tire_config(num_extractors=2).model_copy(update={"augment": AugmentConfig(**augment)})
    (result,) = BenchmarkPipeline(config).run([tire_job])
    assert result.bank.metadata["augment"] == {**augment, "contrast": 0.0}
    torch.set_num_threads(1)
    extractor = PatchFeatureExtractor(ExtractionSettings.from_config(config))
    train, n = tire_job.split.train, len(tire_job.split.train)
    base = augment_base_seed(0, "tire_small", "tire")
    copies = extractor.extract(train, [n + i for i in range(n)], augmentation=Augmentation(**augment),
                               seeds=[augment_seed(base, i, 1) for i in range(n)])
    assert not np.array_equal(copies.embeddings, reference["train"].embeddings)
    features = merge_features([reference["train"], copies])
    bank = build_bank(features, "approximate", 0.1, 128, coreset_seed(0, "tire_small", "tire"), {})
    assert result.bank.sha256 == bank.sha256 != reference["bank"].sha256
    assert len(result.bank.features) == len(bank.features) > len(reference["bank"].features)


def test_ensemble_of_lite0_and_lite1_equals_the_engine_and_resumes_by_member(ray_cluster, tire_job, tmp_path):
    """ensemble: Lite0 + Lite1 (real weights), 2 extractors each. Every member's bank and predictions equal the
    single-process engine's bit for bit; the ensemble's scores are the mean of the members' z-scores on the
    held-out images; a resume recomputes only the member whose result is gone."""
    root = copy_slice(tire_job, tmp_path / "slice")
    job = CategoryJob("tire_small", str(root), load_split("mvtec", root, "tire"))
    config = parse_config({
        # 2 extractors, 1 holder, 1 evaluator: each member is an ordinary pipeline, and fewer actors per member
        # keep the three pipeline starts (two members, one resumed member) short.
        **tire_config(num_extractors=2, num_evaluators=1, coreset_shards=1).model_dump(mode="json", exclude={"backbone"}),
        "datasets": [{"name": "tire_small", "format": "mvtec", "root": str(root)}],
        "ensemble": [{"name": name, "layers": ["blocks.2", "blocks.4"], "weights": "package"}
                     for name in ("tf_efficientnet_lite0", "tf_efficientnet_lite1")],
        "thresholds": {"validation_split": 0.25}, "output_dir": str(tmp_path),
    }, "ensemble-test")
    run_dir = benchmark.run(config, run_name="ensemble")
    folder = run_dir / "tire_small" / "tire"
    train, held = hold_out(job.split.train, 0.25, 0, "tire_small", "tire")
    assert len(held) == 3
    torch.set_num_threads(1)
    members, norms = [], []
    for label, member in zip(("tf_efficientnet_lite0", "tf_efficientnet_lite1"), config.members()):
        extractor = PatchFeatureExtractor(ExtractionSettings.from_config(member))
        bank = build_bank(extractor.extract(train, range(len(train))), "approximate", 0.1, 128,
                          coreset_seed(0, "tire_small", "tire"), {})
        scorer = NearestNeighbourScorer(bank.features, scoring_params(member))
        test = predict(scorer, extractor.extract(job.split.test, range(10)), 112)
        held_out = predict(scorer, extractor.extract(held, range(3)), 112)
        recorded = finished_category(run_dir, job, label)
        assert recorded.bank.sha256 == bank.sha256
        assert np.array_equal(recorded.predictions.scores, test.scores)
        assert np.array_equal(recorded.predictions.maps, test.maps)  # full precision on disk
        assert np.array_equal(recorded.held_out.maps, held_out.maps)
        members.append(test)
        norms.append(Normalisation.fit(held_out, label))
        assert norms[-1].image_mean == pytest.approx(float(np.mean(held_out.scores)))
    expected = combine(members, norms)
    assert np.allclose(expected.scores, np.mean([(m.scores - n.image_mean) / n.image_std
                                                 for m, n in zip(members, norms)], axis=0))
    metrics = json.loads((folder / "metrics.json").read_text())["values"]
    report = evaluate(job.split.test, expected, extractor.transform, 0.3)
    assert {name: metrics[name] for name in report.values} == report.values
    assert metrics["tf_efficientnet_lite1/image_auroc"] == recorded.report.values["image_auroc"]
    scores = [record["pred_score"] for record in json.loads((folder / "predictions" / "predictions.json").read_text())]
    assert scores == expected.scores.tolist()
    summary = json.loads((run_dir / "summary.json").read_text())
    (category,) = summary["categories"]
    assert [m["label"] for m in category["members"]] == ["tf_efficientnet_lite0", "tf_efficientnet_lite1"]
    assert category["memory_size"] == sum(m["memory_size"] for m in category["members"])

    kept = folder / "members" / "tf_efficientnet_lite0" / "bank.safetensors"
    kept_mtime = kept.stat().st_mtime_ns
    (folder / "metrics.json").unlink()
    (folder / "members" / "tf_efficientnet_lite1" / "metrics.json").unlink()
    assert benchmark.main(["--resume", str(run_dir)]) == 0
    assert kept.stat().st_mtime_ns == kept_mtime  # the finished member was kept, not recomputed
    again = json.loads((run_dir / "summary.json").read_text())["categories"][0]
    assert again["metrics"] == category["metrics"] and again["bank_sha256"] == category["bank_sha256"]


def train_config(root: Path, tmp_path: Path, **training) -> RunConfig:
    """Reverse Distillation with the real Lite0 teacher on a tire slice at 64 px: seconds per epoch."""
    return parse_config({
        "name": "train-test", "output_dir": str(tmp_path),
        "datasets": [{"name": "tire_small", "format": "mvtec", "root": str(root)}],
        "backbone": {"name": "tf_efficientnet_lite0", "layers": [], "weights": "package"},
        "preprocess": {"resize": 64, "crop": 64}, "wandb": {"mode": "off"},
        "training": {"model": "reverse_distillation", "epochs": 2, "batch_size": 4, "validate_every_n_epochs": 1,
                     "log_every_n_steps": 1, "cpus_per_worker": 1, **training},
    }, "train-test")


def test_ray_train_two_workers_give_the_one_process_loss_curve(ray_cluster, tire_job, tmp_path):
    """One category on 2 Ray Train workers (TorchTrainer, DDP over gloo on CPU, 2 images each) follows the loss
    curve of one plain process with the same global batch of 4. The first step's loss agrees to float32 rounding
    (the ranks' float32 means over 2 images, averaged in float64, against one float32 mean over 4); later
    ones agree to 1 % relative: in float32 the all-reduced gradients round differently, and Adam's first steps
    turn rounding-level differences into full-size ones (tests/test_training.py shows the two equal to 1e-9 in
    float64; with per-rank BatchNorm statistics they would differ by 2-4 %).

    ``submit_fit`` hands back an object reference while the workers train (the driver meanwhile scores
    finished categories), and Ray Train keeps its run records under the run folder, not in /tmp."""
    config = train_config(tmp_path, tmp_path, ddp_workers=2, ddp_categories=["tire"])
    job = CategoryJob("tire_small", str(TIRE_ROOT), CategorySplit("mvtec", "tire", tire_job.split.train[:8], tire_job.split.test))
    events = Queue()
    ref = submit_fit(config, job, str(tmp_path / "ddp"), events, tmp_path)
    assert not ray.wait([ref], timeout=0)[0]  # not blocked on the training
    ray.get(ref)
    logged = [events.get() for _ in range(events.qsize())]
    ddp = [event["loss"] for event in logged if event["kind"] == "step"]
    torch.set_num_threads(1)
    model = build_model(config)
    steps: list[float] = []
    Trainer(trainer_config(config, "cpu"), callbacks=TrainerCallbacks(on_log=lambda r: steps.append(r["loss"]))).fit(
        model, load_images(job.split.train, transform_of(config)))
    assert len(ddp) == len(steps) == 4  # 2 epochs x 8 images / 4
    assert ddp[0] == pytest.approx(steps[0], rel=1e-6, abs=0) and np.allclose(ddp, steps, rtol=1e-2, atol=0)
    assert steps[-1] < steps[0]
    assert (tmp_path / "ddp" / "model.safetensors").is_file()  # rank 0 wrote the model files
    assert sum(event["kind"] == "validation" for event in logged) == 2
    assert (tmp_path / "ray_train" / "tire_small-tire").is_dir()  # Ray Train's storage_path
    system = [event for event in logged if event["kind"] == "system"]  # every worker's own samples, not rank 0's only
    assert {event["process"] for event in system} == {"fit_0_rank_0", "fit_0_rank_1"}
    assert all(sample["rss_mib"] > 100 for event in system for sample in event["samples"])


def test_fit_task_whose_node_dies_is_retried_from_its_latest_checkpoint(ray_cluster, tire_job, tmp_path):
    """A category's fit task runs on a node that crashes after its first epoch's checkpoint: Ray runs the
    task again on another node (``task_options``: max_retries = cluster.max_restarts), where it continues from
    ``checkpoints/latest``, training no epoch twice, and ends on the uninterrupted run's weights, losses and
    step log."""
    config = train_config(tmp_path, tmp_path, epochs=6, validate_every_n_epochs=10)  # no validation
    victim = ray_cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    ray_cluster.wait_for_nodes()
    head = ray.get_runtime_context().get_node_id()  # the driver's: the events outlive the victim
    events = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": NodeAffinitySchedulingStrategy(head, soft=False)})
    folder = tmp_path / "fit"
    ref = ray.remote(fit_category).options(
        **task_options(config), scheduling_strategy=NodeAffinitySchedulingStrategy(victim.node_id, soft=True),
    ).remote(config, tire_job, str(folder), events, 1)
    logged = [events.get(timeout=300)]
    while logged[-1]["kind"] != "epoch":
        logged.append(events.get(timeout=300))
    assert logged[-1]["epoch"] == 0 and not ray.wait([ref], timeout=0)[0]
    ray_cluster.remove_node(victim, allow_graceful=False)  # a crash mid-training
    ray.get(ref, timeout=600)
    logged += [events.get() for _ in range(events.qsize())]
    epochs = [event["epoch"] for event in logged if event["kind"] == "epoch"]
    assert epochs[0] == 0 and epochs[-1] == 5 and len(set(epochs)) == len(epochs)  # continued, not restarted

    torch.set_num_threads(1)  # the task's threads
    reference = build_model(config)
    steps: list[dict] = []
    Trainer(trainer_config(config, "cpu"), callbacks=TrainerCallbacks(on_log=steps.append)).fit(
        reference, load_images(tire_job.split.train, transform_of(config)))
    recorded = json.loads((folder / "training.json").read_text())["steps"]
    assert [(entry["step"], entry["loss"]) for entry in recorded] == [(entry["step"], entry["loss"]) for entry in steps]
    assert len(steps) == 18  # 6 epochs x 12 images / 4
    trained = load_model_files(folder, "package", {"crop": 64}).trainable_state()
    assert all(torch.equal(trained[name], value) for name, value in reference.trainable_state().items())


def test_train_job_refuses_at_once_what_no_node_can_hold(ray_cluster, tmp_path, capsys):
    """The shipped configs/reverse_distillation.yaml asks each category for 1 GPU and 4 CPUs; no node of the
    test cluster has 4 CPUs: one line naming the keys and the nodes, before any task (it would wait forever)."""
    started = time.perf_counter()
    code = train_job.main([
        "--config", str(REPO / "configs" / "reverse_distillation.yaml"), "--wandb", "off", "--run-name", "r",
        "--set", f"datasets=[{{name: tire_small, format: mvtec, root: {TIRE_ROOT}}}]", "--set", f"output_dir={tmp_path}",
        "--set", "backbone.name=tf_efficientnet_lite0", "--set", "backbone.layers=[]", "--set", "backbone.weights=package",
    ])
    assert code == 2 and time.perf_counter() - started < 60
    err = capsys.readouterr().err
    assert "no node of this Ray can hold 1 x {CPU: 4, GPU: 1} + 1 x {CPU: 1} (a category's fit task and the evaluator)" in err
    assert err.count("1 CPU/1 GPU") == 2 and err.count("1 CPU/0 GPU") == 1  # what the nodes offer
    assert "lower training.cpus_per_worker, training.gpus_per_worker" in err
    assert not (tmp_path / "r" / "summary.json").exists() and not (tmp_path / "r" / "tire_small").exists()


def test_train_job_trains_evaluates_like_a_bank_resumes_and_compares_with_patchcore(ray_cluster, tire_job, tmp_path,
                                                                                   capsys, wandb_env):
    """jobs.train on a tire slice (a GPU share per task: the nodes advertise one, torch sees none): model files,
    the evaluators' metrics of the model's own predictions, the training process's system samples and the tasks'
    GPU-seconds in its offline W&B run, a resume that keeps the trained model and continues that W&B run, and
    jobs.compare putting it beside jobs.benchmark's PatchCore."""
    root = copy_slice(tire_job, tmp_path / "slice")
    config = train_config(root, tmp_path, gpus_per_worker=1).model_copy(
        update={"wandb": WandbConfig(mode="offline", project="anomaly-test")})
    run_dir = train_job.run(config, run_name="rd")
    folder = run_dir / "tire_small" / "tire"
    model_json = json.loads((folder / "model.json").read_text())
    assert model_json["kind"] == "reverse_distillation" and model_json["training"]["epochs_completed"] == 2
    assert model_json["backbone"] == "tf_efficientnet_lite0" and model_json["crop"] == 64
    assert (folder / "checkpoints" / "latest.safetensors").is_file()
    job = CategoryJob("tire_small", str(root), load_split("mvtec", root, "tire"))
    model = load_model_files(folder, "package", {"crop": 64})
    torch.set_num_threads(1)  # the tasks' threads (training.cpus_per_worker): conv sums depend on the thread count
    predictions = predict_images(model, load_images(job.split.test, transform_of(config)))
    recorded = finished_category(run_dir, job)
    assert np.array_equal(recorded.predictions.scores, predictions.scores)
    values = json.loads((folder / "metrics.json").read_text())["values"]
    assert values == evaluate(job.split.test, predictions, transform_of(config), 0.3).values
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["job"] == "train" and summary["categories"][0]["timings"]["train_s"] > 0
    # The recipe and every value it resolved to, in the summary (the run's config) and model.json.
    assert summary["config"]["training"]["recipe"] == model_json["training"]["recipe"]["name"] == "rd4ad"
    assert summary["config"]["training"]["lr"] == model_json["training"]["recipe"]["values"]["lr"] == model_json["lr"]
    recorded = read_offline_run(run_dir)
    history, timings = recorded["history"], summary["categories"][0]["timings"]
    assert recorded["config"]["resolved_fit_processes"] == {"fit_0": "tire_small/tire"}
    fit = [row for row in history if "system/fit_0/rss_mib" in row]  # sampled in the fit task, sent with its events
    assert fit and all(row["system/fit_0/rss_mib"] > 100 and row["system/fit_0/cpu_percent"] >= 0 for row in fit)
    assert max(row["system/fit_0/cpu_percent"] for row in fit) > 5  # it trained
    assert all(0 < row["system/time_s"] < summary["timings"]["total_s"] for row in fit)  # since the run started
    for process in ("fit_0", "evaluator_0"):  # each sample logged once: its times strictly increase
        times = [row["system/time_s"] for row in history if f"system/{process}/rss_mib" in row]
        assert times and all(a < b for a, b in zip(times, times[1:]))
    # Logged as they came, not at the end: the fit's samples before the category's scores (seconds later)
    [category_row] = [row for row in history if "category_index" in row]
    assert fit[-1]["_step"] < category_row["_step"]
    # One GPU x the seconds the fit and predict tasks ran, each within the driver's view of that stage
    gpu_s = recorded["summary"]["run/gpu_s"]
    assert gpu_s == summary["cluster"]["gpu_s"] and 0 < gpu_s < timings["train_s"] + timings["evaluate_s"]
    assert recorded["summary"]["run/time_s"] == summary["timings"]["total_s"]
    first_id = (run_dir / "wandb" / "run_id").read_text().strip()

    (folder / "metrics.json").unlink()  # the category is unfinished; its checkpoint says training is done
    tensors_mtime = (folder / "model.safetensors").stat().st_mtime_ns
    steps = json.loads((folder / "training.json").read_text())["steps"]
    assert [entry["step"] for entry in steps] == list(range(1, 7))  # 2 epochs x 12 images / 4, every step logged
    assert train_job.main(["--resume", str(run_dir)]) == 0
    assert json.loads((folder / "training.json").read_text())["steps"] == steps  # kept through the resume
    again = json.loads((run_dir / "summary.json").read_text())["categories"][0]
    assert again["metrics"] == summary["categories"][0]["metrics"]
    assert again["bank_sha256"] == summary["categories"][0]["bank_sha256"]  # the same weights, rewritten
    assert (folder / "model.safetensors").stat().st_mtime_ns != tensors_mtime
    logs = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))  # the resume continued the same W&B run
    assert [log.name for log in logs] == [f"run-{first_id}.wandb"] * 2
    assert read_offline_run(run_dir, logs[1])["run"].run_id == first_id

    predicted = tmp_path / "predicted"  # jobs.predict takes the trained model's folder like a bank's
    assert predict_job.main(["--bank", str(folder), "--input", str(root / "tire" / "test"), "--out", str(predicted)]) == 0
    written = json.loads((predicted / "predictions.json").read_text())
    assert "F1-optimal" in written["thresholds"]["source"] and written["bank"]["bank_sha256"] == model_json["tensors_sha256"]
    by_path = {record["image_path"]: record["pred_score"] for record in written["predictions"]}
    assert [by_path[sample.image_path] for sample in job.split.test] == pytest.approx(predictions.scores.tolist(), rel=1e-5)

    patchcore = benchmark.run(tire_config(num_extractors=1).model_copy(update={
        "output_dir": str(tmp_path), "datasets": config.datasets}), run_name="patchcore")
    comparison = compare_job.compare([patchcore, run_dir], tmp_path)
    text = comparison.read_text()
    assert "patchcore [patchcore (tf_efficientnet_lite0)]" in text and "rd [reverse_distillation (tf_efficientnet_lite0)]" in text
    row = next(line for line in text.splitlines() if line.startswith("| tire_small | tire |"))
    pc_auroc = json.loads((patchcore / "summary.json").read_text())["categories"][0]["metrics"]["image_auroc"]
    assert row == f"| tire_small | tire | {pc_auroc:.4f} | {values['image_auroc']:.4f} |"


def padim_config(**cluster) -> RunConfig:
    """PaDiM on lite0's stride 4, 8 and 16 stages (the analogue of ResNet's layer1-3): 100 of 176 channels."""
    raw = tire_config(**cluster).model_dump(mode="json")
    raw["backbone"]["layers"] = ["blocks.1", "blocks.2", "blocks.4"]
    return parse_config({**raw, "method": "padim"}, "test")


def test_padim_statistics_of_three_extractors_equal_the_single_process_engine(ray_cluster, tire_job):
    """Three extractors (colocated, a GPU share each) with their own evaluators: the single-process engine's
    statistics (sha256), scores and maps, bit for bit (one extractor is the engine's own order); the evaluators
    score with the statistics."""
    config = padim_config()
    torch.set_num_threads(1)  # what the extractors use (cluster.cpus_per_actor < 2)
    extractor = PatchFeatureExtractor(ExtractionSettings.from_config(config))
    split = tire_job.split
    train = extractor.extract(split.train, range(len(split.train)))
    engine = fit_statistics([train], 0.01, {})
    test = extractor.extract(split.test, range(len(split.test)))
    expected = predict(PadimScoring().scorer(engine.scoring_payload(), "cpu"), test, 112)
    pipeline = BenchmarkPipeline(padim_config(num_extractors=3, gpus_per_extractor=0.5))
    (result,) = pipeline.run([tire_job])
    assert result.bank.sha256 == engine.sha256
    assert result.bank.metadata["padim"] == extractor.describe()["padim"]
    assert np.array_equal(result.predictions.scores, expected.scores)
    assert np.array_equal(result.predictions.maps, expected.maps)
    assert result.report.values["pixel_auroc"] > 0.9
    pipeline.close()


def test_benchmark_job_with_padim_writes_its_statistics_and_resumes_them(ray_cluster, tire_job, tmp_path):
    """jobs.benchmark with method padim on the whole tire category, scored by evaluator actors (not colocated):
    padim.safetensors + padim.json, their memory in the summary, a sensible AUROC, and a resumed run keeps the
    category."""
    config = padim_config(num_extractors=2, colocate=False).model_copy(update={"output_dir": str(tmp_path)})
    run_dir = benchmark.run(config, run_name="padim")
    summary = json.loads((run_dir / "summary.json").read_text())
    (category,) = summary["categories"]
    folder = run_dir / "tire_small" / "tire"
    assert not (folder / "bank.safetensors").exists()
    statistics = load_statistics(folder)
    assert category["bank_sha256"] == statistics.sha256 == json.loads((folder / "metrics.json").read_text())["bank_sha256"]
    assert category["statistics_bytes"] == 28 * 28 * (100 * 100 + 100) * 4  # d²·H·W + d·H·W float32
    assert (category["memory_size"], category["feature_dim"]) == (28 * 28, 100)
    assert statistics.metadata["scoring"] == {"blur_sigma": 4.0, "image_score": "map_max"}
    assert statistics.metadata["padim"]["seed"] == 1024 and len(statistics.metadata["padim"]["channel_indices"]) == 100
    metrics = category["metrics"]
    # tire at 112 px, 34 train images: measured 0.906 image / 0.961 pixel AUROC on this machine (engine, one process)
    assert metrics["image_auroc"] > 0.85 and metrics["pixel_auroc"] > 0.94
    assert sum(e["images"] for e in summary["cluster"]["evaluators"]) == 28  # the evaluators scored every test image
    assert [actor["role"] for actor in summary["cluster"]["plan"]["actors"]].count("holder") == 0  # no coreset
    job = benchmark.category_jobs(config, None)[0]
    kept = finished_category(run_dir, job)
    assert kept is not None and kept.bank.sha256 == statistics.sha256


def test_evaluate_job_scores_a_padim_folder_as_the_engine_does(ray_cluster, tmp_path):
    """jobs.evaluate with a PaDiM category folder (statistics fitted in this process from 6 training images):
    the engine's scores and metrics of the whole test set, bit for bit, and the statistics beside them with
    the thresholds found."""
    from anomaly_core.data import metric_groups

    from .test_padim import save_padim_folder

    config = padim_config(num_extractors=1)
    torch.set_num_threads(1)  # what the extractors use (cluster.cpus_per_actor < 2)
    extractor = PatchFeatureExtractor(ExtractionSettings.from_config(config))
    split = load_split("mvtec", TIRE_ROOT, "tire")
    statistics, expected = save_padim_folder(tmp_path / "padim", extractor, split.train[:6], split.test)
    report = evaluate(split.test, expected, extractor.transform, 0.3, metric_groups(split.dataset))
    config_path = tmp_path / "padim.yaml"
    config_path.write_text(json.dumps(config.model_dump(mode="json")))  # JSON is YAML
    assert evaluate_job.main(["--config", str(config_path), "--category", "tire", "--bank", str(tmp_path / "padim"),
                              "--out", str(tmp_path / "eval")]) == 0
    folder = tmp_path / "eval" / "tire_small" / "tire"
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["values"] == report.values and metrics["bank_sha256"] == statistics.sha256
    records = json.loads((folder / "predictions" / "predictions.json").read_text())
    assert [record["pred_score"] for record in records] == expected.scores.tolist()
    saved = load_statistics(folder)
    assert saved.sha256 == statistics.sha256 and saved.metadata["thresholds"]["image"] == metrics["values"]["image_threshold"]


def test_feature_cache_skips_extraction_with_identical_results(ray_cluster, tire_job, reference, tmp_path):
    """With the cache on, a category's second run reads train and test features from disk (no extractor
    work) and gives the same bank and scores. (That any keyed setting misses: tests/test_feature_cache.py.)"""
    cached = FeatureCacheConfig(enabled=True, dir=str(tmp_path / "cache"))
    pipeline = BenchmarkPipeline(tire_config(num_extractors=1).model_copy(update={"feature_cache": cached}))
    extracted = lambda: sum(stats["images"] for stats in pipeline.actor_stats()["extractors"])  # noqa: E731
    (result,) = pipeline.run([tire_job])
    assert pipeline.cache_stats == {"hits": 0, "misses": 2, "failed_writes": 0} and extracted() == 22  # train, test
    assert len(list((tmp_path / "cache").glob("*/*.safetensors"))) == 2
    (again,) = pipeline.run([tire_job])
    assert pipeline.cache_stats["hits"] == 2 and pipeline.cache_stats["misses"] == 2 and extracted() == 22
    assert again.bank.metadata["timings"]["extract_train_s"] == 0.0  # read, not extracted
    assert again.bank.sha256 == result.bank.sha256 == reference["bank"].sha256
    assert np.array_equal(again.predictions.scores, reference["predictions"].scores)
    assert again.report.values == reference["report"].values


def test_killed_extractor_is_replaced_and_result_unchanged(pipeline, tire_job, reference):
    shards = pipeline._submit(tire_job.split.train)
    shards[0].refs()  # on an extractor
    ray.kill(pipeline.extractors[shards[0].slot], no_restart=False)  # dies with its shards queued or running
    bank = pipeline.build_bank(tire_job, shards)
    assert bank.sha256 == reference["bank"].sha256


def test_killed_evaluator_is_replaced_and_scores_unchanged(pipeline, tire_job, reference):
    pending = pipeline.submit_evaluation(tire_job, reference["bank"])
    ray.kill(pipeline.evaluators[pending.slot], no_restart=False)  # dies with its scoring queued or running
    result = pipeline.collect(pending)
    assert np.array_equal(result.predictions.scores, reference["predictions"].scores)
    assert result.report.values == reference["report"].values


def test_validation_thresholds_come_from_held_out_good_images(pipeline, tire_job, tmp_path):
    """thresholds.source=validation: a seeded quarter of the good training images leaves the bank and
    sets bank.json's thresholds (a quantile of their scores); the test labels set nothing."""
    config = tire_config(num_extractors=2).model_copy(update={
        "thresholds": ThresholdConfig(source="validation", validation_split=0.25), "output_dir": str(tmp_path)})
    job = benchmark.with_validation(config, tire_job)
    assert len(job.split.train) == 9 and len(job.validation) == 3
    assert not set(job.validation) & set(job.split.train) and set(job.validation) <= set(tire_job.split.train)
    (result,) = pipeline.run([job])
    assert result.bank.metadata["n_train_images"] == 9
    settings = ExtractionSettings.from_config(config)
    torch.set_num_threads(1)
    extractor = PatchFeatureExtractor(settings)
    held_out = predict(NearestNeighbourScorer(result.bank.features, scoring_params(config)),
                       extractor.extract(job.validation, range(3)), settings.crop)
    assert result.thresholds["validation_scores"] == [float(score) for score in held_out.scores]
    assert result.thresholds["image"] == float(np.quantile(held_out.scores, 0.99)) > 0
    assert result.thresholds["pixel"] == float(np.quantile(held_out.maps, 0.99))
    assert result.thresholds["image"] != result.report.values["image_threshold"]
    folder = write_category(tmp_path, result, config)
    recorded = json.loads((folder / "bank.json").read_text())["thresholds"]
    assert recorded["image"] == result.thresholds["image"] and "no test image or label was used" in recorded["source"]
    labels = [record["pred_label"] for record in json.loads((folder / "predictions" / "predictions.json").read_text())]
    assert labels == [int(score >= result.thresholds["image"]) for score in result.predictions.scores]
    # the held-out images are scored before finish frees the category's bank on the evaluator
    assert [stats["banks_held"] for stats in pipeline.actor_stats()["evaluators"]] == [0, 0]


def test_worker_node_lost_mid_shard_and_replaced(ray_cluster, pipeline, tire_job, reference):
    """A worker node crashes while its extractor is mid-shard (with finished features, holders and an
    evaluator on it too) and a fresh node joins: actors restart there, the running shard is retried,
    lost features are rebuilt from lineage, and bank and scores are unchanged.

    Last in this module: it leaves the cluster with a replaced node.
    """
    train, test = pipeline._submit(tire_job.split.train), pipeline._submit(tire_job.split.test)
    ray.wait([train[0].refs()[0]], fetch_local=False)  # some features exist, most shards still queued or running
    unfinished = pipeline.dispatch.busy_slots() or set(range(len(pipeline.extractors)))
    assert unfinished, "every shard finished before the crash: the test would not cover a mid-shard loss"
    victim_id = pipeline.plan.extractors[max(unfinished)].node_id
    victim = next(node for node in ray_cluster.worker_nodes if node.node_id == victim_id)
    ray_cluster.remove_node(victim, allow_graceful=False)  # a crash, not a drain
    ray_cluster.add_node(num_cpus=1, num_gpus=1, node_ip_address="127.0.0.1")
    bank = pipeline.build_bank(tire_job, train, test)
    assert bank.sha256 == reference["bank"].sha256
    result = pipeline.collect(pipeline.submit_evaluation(tire_job, bank, test))
    assert np.array_equal(result.predictions.scores, reference["predictions"].scores)
    assert np.array_equal(result.predictions.maps, reference["predictions"].maps)
