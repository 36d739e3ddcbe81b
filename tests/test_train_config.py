"""jobs.train's configuration and what it asks of the cluster: refused before any work, each error naming its key.

The cluster side runs on fake nodes here; tests/test_cluster.py refuses the shipped config on a real Ray.
"""

from __future__ import annotations

import pytest
import ray
import torch

from anomaly_core.config import ConfigError, parse_config
from anomaly_core.data import CategorySplit
from cluster import training
from cluster.pipeline import CategoryJob
from cluster.resources import Node
from cluster.scaling import place, wait_for_bundles
from cluster.training import pick_device, training_bundles, training_device
from jobs.train import check_training, preflight

RAW = {"datasets": [{"name": "d", "format": "mvtec", "root": "/tmp/x"}],
       "backbone": {"name": "tf_efficientnet_lite0", "layers": [], "weights": "package"},
       "training": {"model": "reverse_distillation"}}


def test_training_section_and_its_values_are_checked():
    with pytest.raises(ConfigError, match="training: missing"):
        check_training(parse_config({**RAW, "training": None}, "c.yaml"))
    with pytest.raises(ConfigError, match=r"training.monitor: Value error, must be loss or one of image_auroc"):
        parse_config({**RAW, "training": {"model": "stfpm", "monitor": "auroc"}}, "c.yaml")
    with pytest.raises(ConfigError, match="training: .*monitor image_auroc is only judged with mode max, got mode min"):
        parse_config({**RAW, "training": {"model": "stfpm", "monitor": "image_auroc"}}, "c.yaml")
    with pytest.raises(ConfigError, match=r"training.model: Input should be 'reverse_distillation' or 'stfpm'"):
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
