"""jobs.train's configuration and what it asks of the cluster: refused before any work, each error naming its key.

The cluster side runs on fake nodes here; tests/test_cluster.py refuses the shipped config on a real Ray.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import ray
import torch

from anomaly_core.config import ConfigError, parse_config
from anomaly_core.data import CategorySplit, load_split
from anomaly_core.registry import MODELS
from anomaly_core.training import held_out_split, load_checkpoint, load_model_files, read_model_metadata
from cluster import training
from cluster.pipeline import CategoryJob
from cluster.resources import Node
from cluster.scaling import place, wait_for_bundles
from cluster.training import build_model, fit_category, pick_device, training_bundles, training_device
from jobs.resume import resume_config
from jobs.train import check_training, preflight

RAW = {"datasets": [{"name": "d", "format": "mvtec", "root": "/tmp/x"}],
       "backbone": {"name": "tf_efficientnet_lite0", "layers": [], "weights": "package"},
       "training": {"model": "reverse_distillation"}}


def test_training_section_and_its_values_are_checked():
    with pytest.raises(ConfigError, match="training: missing"):
        check_training(parse_config({**RAW, "training": None}, "c.yaml"))
    with pytest.raises(ConfigError, match=r"training.monitor: Value error, must be loss, held_out_loss or one of image_"):
        parse_config({**RAW, "training": {"model": "stfpm", "monitor": "auroc"}}, "c.yaml")
    with pytest.raises(ConfigError, match="training: .*monitor image_auroc is only judged with mode max, got mode min"):
        parse_config({**RAW, "training": {"model": "stfpm", "monitor": "image_auroc", "mode": "min"}}, "c.yaml")
    with pytest.raises(ConfigError, match=r"training.model: Value error, unknown model 'padim'; known: "
                                          + re.escape(", ".join(MODELS)) + "$"):
        parse_config({**RAW, "training": {"model": "padim"}}, "c.yaml")
    with pytest.raises(ConfigError, match="thresholds.source=validation: jobs.train keeps every good training image"):
        check_training(parse_config({**RAW, "thresholds": {"source": "validation"}}, "c.yaml"))
    ensemble = {**RAW, "ensemble": [RAW["backbone"], {**RAW["backbone"], "name": "tf_efficientnet_lite1"}]}
    del ensemble["backbone"]
    with pytest.raises(ConfigError, match="jobs.train works with one backbone"):
        check_training(parse_config(ensemble, "c.yaml"))
    assert check_training(parse_config(RAW, "c.yaml")).training.epochs == 200


def test_a_teacher_that_cannot_be_distilled_is_refused_before_ray(tire_root):
    vit = {**RAW, "datasets": [{"name": "t", "format": "mvtec", "root": str(tire_root)}],
           "backbone": {"name": "vit_small_patch14_dinov2", "layers": [], "weights": "random"},
           "preprocess": {"resize": 224, "crop": 224}}
    with pytest.raises(ConfigError, match=r"training \(reverse_distillation, teacher vit_small_patch14_dinov2.*ViT"):
        preflight(parse_config(vit, "c.yaml"), [])


def trained(**values):
    return parse_config({**RAW, "training": {"model": "reverse_distillation", **values}}, "c.yaml")


JOBS = [CategoryJob("d", "/tmp/x", CategorySplit("mvtec", category, [], [])) for category in ("tire", "bottle")]


def refused(config, nodes) -> str:
    with pytest.raises(ConfigError) as error:
        wait_for_bundles(*training_bundles(config, JOBS), 0, nodes_now=lambda: nodes)
    return str(error.value)


def test_training_that_no_node_can_hold_is_refused_at_once_naming_the_keys():
    """An embedded Ray never gains a node: what it cannot hold would wait forever, so it is refused before
    any task, in one line naming the keys and what the nodes offer. The evaluator holds a CPU for the whole
    run, so a fit task must fit beside it; it goes where the packing put it."""
    laptop = [Node("laptop", 2, 0)]
    message = refused(trained(gpus_per_worker=1, cpus_per_worker=4), laptop)  # configs/reverse_distillation.yaml's
    assert message == ("no node of this Ray can hold 1 x {CPU: 4, GPU: 1} + 1 x {CPU: 1} (a category's fit task and "
                       "the evaluator): it has 2 CPU/0 GPU; lower training.cpus_per_worker, training.gpus_per_worker "
                       "(training.gpus_per_worker=0 trains on CPUs)")
    assert "\n" not in message
    assert "can hold 1 x {CPU: 2} + 1 x {CPU: 1} (a category's fit task and the evaluator)" in refused(
        trained(cpus_per_worker=2), laptop)
    assert wait_for_bundles(*training_bundles(trained(cpus_per_worker=1), JOBS), 0, nodes_now=lambda: laptop) == laptop
    gpu, cpu = Node("g", 4, 1), Node("c", 8, 0)  # the GPU node has no CPU to spare: the evaluator goes to the other
    bundles, _, _ = training_bundles(trained(gpus_per_worker=1, cpus_per_worker=4), JOBS)
    assert place(bundles, [cpu, gpu]) == ["g", "c"] and place(bundles, [gpu]) is None
    assert place(training_bundles(trained(cpus_per_worker=1), JOBS)[0], laptop) == ["laptop", "laptop"]
    gpu_node = [Node("g", 8, 2)]
    ddp = trained(gpus_per_worker=1, cpus_per_worker=2, ddp_workers=3, ddp_categories=["bottle"])
    assert ("can hold 3 x {CPU: 2, GPU: 1} + 1 x {CPU: 1} (the 3 Ray Train workers of a DDP category and the "
            "evaluator)") in refused(ddp, gpu_node)
    assert "training.ddp_workers" in refused(ddp, gpu_node)
    two = ddp.model_copy(update={"training": ddp.training.model_copy(update={"ddp_workers": 2})})
    assert wait_for_bundles(*training_bundles(two, JOBS), 0, nodes_now=lambda: gpu_node) == gpu_node
    other = ddp.model_copy(update={"training": ddp.training.model_copy(update={"ddp_categories": ["cable"]})})
    assert wait_for_bundles(*training_bundles(other, JOBS), 0, nodes_now=lambda: gpu_node) == gpu_node  # no DDP here


def test_a_joined_cluster_is_asked_for_the_training_bundles_and_waited_for():
    """On a cluster with an autoscaler (cluster.resource_wait_s > 0) the bundles are requested, and the run goes
    on once a node that holds them joins; the same wait the extractors use (cluster/scaling.py)."""
    now, requests = [0.0], []
    head, worker = [Node("head", 0, 0)], [Node("w", 8, 1)]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    bundles, what, keys = training_bundles(trained(gpus_per_worker=1, cpus_per_worker=4), JOBS)
    nodes = wait_for_bundles(bundles, what, keys, 60, nodes_now=lambda: head + (worker if now[0] >= 20 else []),
                             request=lambda bundles: requests.append(bundles), clock=lambda: now[0], sleep=sleep)
    assert nodes == head + worker and requests == [[{"CPU": 4.0, "GPU": 1.0}, {"CPU": 1.0}]] and now[0] == 20


def test_each_ray_train_worker_trains_on_its_own_device(monkeypatch):
    """Ray Train shows every worker on a node all of their GPUs: a worker takes the device Ray Train assigned
    it (ray.train.torch.get_device), where plain ``cuda`` would be the node's first GPU for every rank; a plain
    task sees only its own GPU, as ``cuda``; no GPU of its own: the CPU."""
    assert pick_device(False, lambda: torch.device("cuda", 1)) == "cpu"
    assert pick_device(True, None) == "cuda"
    assert pick_device(True, lambda: torch.device("cuda", 1)) == "cuda:1"
    assert training_device(ray_train_worker=True) == "cpu"  # this machine: no CUDA
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [3])
    monkeypatch.setattr(training, "exact_fp32", lambda: None)
    monkeypatch.setattr("ray.train.torch.get_device", lambda: torch.device("cuda", 1))
    assert training_device(ray_train_worker=True) == "cuda:1" and training_device() == "cuda"
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [])  # CUDA on the node, but Ray gave this process no GPU
    assert training_device(ray_train_worker=True) == "cpu"


def test_each_model_defaults_to_its_authors_recipe_and_offers_the_other_by_name():
    """The recipe fills every training value and the image size; the authors' code is the default."""
    rd, ader = trained(), trained(recipe="ader")
    assert (rd.training.recipe, ader.training.recipe) == ("rd4ad", "ader")
    assert (rd.preprocess.resize, rd.preprocess.crop) == (256, 256)  # not PatchCore's 256 -> 224
    # hq-deng/RD4AD main.py: batch 16, Adam 0.005 betas (0.5, 0.999), no weight decay, constant, 200 epochs.
    assert rd.training.model_dump(include={"epochs", "batch_size", "lr", "betas", "weight_decay", "warmup_epochs",
                                           "decay_factor", "clip_grad_norm", "align_corners", "weights"}) == {
        "epochs": 200, "batch_size": 16, "lr": 0.005, "betas": (0.5, 0.999), "weight_decay": 0.0,
        "warmup_epochs": 0, "decay_factor": 1.0, "clip_grad_norm": 0.0, "align_corners": True, "weights": "last"}
    # ADer rd_256_100e.py: x0.1 at 80 % of 100 epochs, gradient norm clipped at 5, incomplete batches dropped.
    assert (ader.training.epochs, ader.training.decay_at, ader.training.decay_factor, ader.training.clip_grad_norm,
            ader.training.drop_last) == (100, 0.8, 0.1, 5.0, True)
    stfpm = parse_config({**RAW, "training": {"model": "stfpm"}}, "c.yaml").training
    anomalib = parse_config({**RAW, "training": {"model": "stfpm", "recipe": "anomalib"}}, "c.yaml").training
    assert (stfpm.recipe, stfpm.loss, stfpm.zero_init_last, stfpm.held_out_fraction, stfpm.monitor, stfpm.weights,
            stfpm.weight_decay) == ("stfpm", "mean", False, 0.2, "held_out_loss", "best", 1e-4)
    assert (anomalib.loss, anomalib.zero_init_last, anomalib.held_out_fraction, anomalib.monitor, anomalib.weights,
            anomalib.weight_decay) == ("half_sum", True, 0.0, "loss", "last", 1e-3)
    assert (stfpm.betas, stfpm.align_corners, rd.training.momentum, rd.training.loss) == (None, None, None, None)


def test_explicit_keys_override_the_recipe_and_the_record_says_which():
    config = parse_config({**RAW, "preprocess": {"resize": 256, "crop": 224},
                           "training": {"model": "reverse_distillation", "recipe": "ader", "epochs": 3,
                                        "weight_decay": 1e-4, "lr": 0.005}}, "c.yaml")
    assert (config.training.epochs, config.training.weight_decay, config.training.batch_size) == (3, 1e-4, 16)
    record = config.training.recipe_record(config.preprocess)
    assert record["name"] == "ader" and "zhangzjn/ADer configs/benchmark/rd/rd_256_100e.py" in record["source"]
    assert record["changed"] == {"epochs": {"config": 3, "recipe": 100}, "weight_decay": {"config": 1e-4, "recipe": 0.0},
                                 "crop": {"config": 224, "recipe": 256}}  # lr equals the recipe's: not a change
    assert record["values"]["batch_size"] == 16 and record["values"]["resize"] == 256
    recorded = parse_config(config.model_dump(mode="json"), "run_config.yaml")  # --resume reads it back
    assert recorded == config and recorded.training.recipe_record(recorded.preprocess) == record
    assert trained(patience=3).training.weights == "best"  # early stopping exports the epoch it judged best
    assert trained(patience=3, weights="last").training.weights == "last"
    assert trained(monitor="image_auroc").training.mode == "max"
    # --resume may change patience (the Trainer judges the recorded history again), not what the weights were trained by.
    dump = config.model_dump(mode="json")
    for change, allowed in (({"patience": 2}, True), ({"min_delta": 0.1}, True), ({"epochs": 4}, False)):
        requested = parse_config({**dump, "training": {**dump["training"], **change}}, "c.yaml")
        if allowed:
            assert resume_config(config, requested, Path("run")) == requested
        else:
            with pytest.raises(ConfigError, match="training.epochs: run has 3, now 4"):
                resume_config(config, requested, Path("run"))


@pytest.mark.parametrize(("training", "message"), [
    ({"model": "reverse_distillation", "recipe": "anomalib"},
     "training.recipe: Value error, unknown recipe 'anomalib' for reverse_distillation; choose rd4ad (the authors' "
     "code, the default) or ader"),
    ({"model": "stfpm", "recipe": "rd4ad"}, "training.recipe: Value error, unknown recipe 'rd4ad' for stfpm; choose "
                                            "stfpm (the authors' code, the default) or anomalib"),
    ({"model": "reverse_distillation", "momentum": 0.5},
     "training: Value error, training.momentum applies to stfpm, not reverse_distillation"),
    ({"model": "stfpm", "betas": [0.5, 0.9]}, "training: Value error, training.betas applies to reverse_distillation, "
                                              "not stfpm"),
    ({"model": "stfpm", "recipe": "anomalib", "monitor": "held_out_loss"},
     "training: Value error, training.monitor held_out_loss needs training.held_out_fraction > 0 (stfpm)"),
    ({"model": "stfpm", "loss": "sum"}, "training.loss: Input should be 'mean' or 'half_sum'"),
])
def test_a_bad_recipe_key_is_one_line_naming_it(training, message):
    with pytest.raises(ConfigError) as error:
        parse_config({**RAW, "training": training}, "c.yaml")
    lines = str(error.value).splitlines()
    assert lines[0] == "c.yaml: invalid configuration" and len(lines) == 2 and lines[1].strip() == message


def test_the_run_seed_initialises_the_trained_weights():
    """Two seeds give two initialisations, one seed the same one twice; model.json records it (describe)."""
    for model in ("reverse_distillation", "stfpm"):
        configs = [parse_config({**RAW, "seed": seed, "preprocess": {"resize": 64, "crop": 64},
                                 "training": {"model": model}}, "c.yaml") for seed in (1, 1, 2)]
        first, again, other = (build_model(config) for config in configs)
        assert first.describe()["init_seed"] == 1 and other.describe()["init_seed"] == 2
        states = [model.trainable_state() for model in (first, again, other)]
        floats = [name for name, value in states[0].items() if value.is_floating_point() and value.std() > 0]
        assert floats and all(torch.equal(states[0][name], states[1][name]) for name in states[0])
        assert not any(torch.equal(states[0][name], states[2][name]) for name in floats), model


def test_a_fit_with_the_authors_stfpm_recipe_holds_out_trains_and_exports_the_chosen_epoch(tire_root, tmp_path):
    """fit_category, no Ray: 20 % of the 10 training images held out by the run seed (never trained on), the held-
    out loss each epoch, lowest at epoch 1 of 3 (measured 7.18, 5.72, 6.22), and model files whose weights are
    that epoch's checkpoint, not the last one's, as model.json says, with the recipe and every resolved value."""
    split = load_split("mvtec", tire_root, "tire")
    job = CategoryJob("tire_small", str(tire_root), CategorySplit("mvtec", "tire", split.train[:10], split.test[:2]))
    config = parse_config({**RAW, "seed": 3, "datasets": [{"name": "tire_small", "format": "mvtec", "root": str(tire_root)}],
                           "preprocess": {"resize": 64, "crop": 64},
                           "training": {"model": "stfpm", "epochs": 3, "batch_size": 4, "validate_every_n_epochs": 10}},
                          "c.yaml")
    fit_category(config, job, str(tmp_path), None, threads=1)
    metadata = read_model_metadata(tmp_path)
    record = metadata["training"]
    history = json.loads((tmp_path / "training.json").read_text())["history"]
    losses = [entry["held_out_loss"] for entry in history]
    assert record["best_epoch"] == record["weights_epoch"] == losses.index(min(losses)) == 1
    best, latest = (load_checkpoint(tmp_path / "checkpoints" / f"{kind}.safetensors") for kind in ("best", "latest"))
    assert (best.progress["next_epoch"], latest.progress["next_epoch"]) == (2, 3)
    exported = load_model_files(tmp_path, "package").trainable_state()
    assert all(torch.equal(exported[name], value) for name, value in best.model_state.items())
    assert not all(torch.equal(exported[name], value) for name, value in latest.model_state.items())
    held_out = held_out_split(10, 0.2, 3)[1]
    assert record["held_out_images"] == [f"tire/train/good/{Path(split.train[i].image_path).name}" for i in held_out]
    assert len(held_out) == 2 and best.progress["n_images"] == 8 and best.progress["n_held_out"] == 2
    assert record["recipe"]["name"] == "stfpm" and record["recipe"]["values"]["loss"] == "mean"
    assert record["recipe"]["changed"] == {"epochs": {"config": 3, "recipe": 100}, "batch_size": {"config": 4, "recipe": 32},
                                           "resize": {"config": 64, "recipe": 256}, "crop": {"config": 64, "recipe": 256}}
    assert (metadata["init_seed"], metadata["zero_init_last"], metadata["loss"]) == (3, False, "mean")
