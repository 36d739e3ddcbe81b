"""A fresh autoscaling cluster gets its GPU worker: the job asks for it and its actors land there; what no node
type can hold ends the wait with the keys named.

Ray's fake multi-node provider (the one ``ray.cluster_utils.AutoscalingCluster`` configures) runs the real
autoscaler against "nodes" that are local raylets. Its helper first runs ``ray stop --force``, which would end
every Ray process on the machine, so the head is started here, in its own process group, and stopped by
killing that group. The cluster starts as ``ray_cluster.yaml`` does: a head with no CPUs for actors and a GPU
worker type with ``min_workers: 0``. ``jobs.benchmark`` joins it by RAY_ADDRESS, as under ``ray job submit``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import yaml

from anomaly_core.config import parse_config
from anomaly_core.data import load_split
from anomaly_core.extraction import ExtractionSettings, PatchFeatureExtractor
from anomaly_core.patchcore import build_bank, coreset_seed

from .conftest import REPO, TIRE_ROOT

BIN = Path(sys.executable).parent
WORKER = {"CPU": 2, "GPU": 1}
SETTINGS = ["preprocess.resize=128", "preprocess.crop=112", "cluster.batch_size=4", "cluster.gpus_per_extractor=1",
            "cluster.cpus_per_actor=1", "cluster.coreset_shards=1", "cluster.num_evaluators=1", "wandb.mode=off"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def fake_cluster_config(port: int) -> dict:
    """ray_cluster.yaml's shape on the fake provider: its head's resources, GPU workers from its min_workers."""
    shipped = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())["available_node_types"]
    assert shipped["head"]["resources"] == {"CPU": 0} and shipped["gpu_worker"]["min_workers"] == 0
    return {
        "cluster_name": "fake-autoscaling-test",
        "max_workers": 1,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": f"127.0.0.1:{port}"},
        "available_node_types": {
            "ray.head.default": {"resources": shipped["head"]["resources"], "node_config": {}, "max_workers": 0},
            "gpu_worker": {"resources": WORKER, "node_config": {}, "min_workers": shipped["gpu_worker"]["min_workers"],
                           "max_workers": 1},
        },
        "head_node_type": "ray.head.default",
        "auth": {}, "upscaling_speed": 1.0, "idle_timeout_minutes": 5, "docker": {},
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
        "head_start_ray_commands": [], "worker_start_ray_commands": [], "file_mounts": {}, "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
    }


@pytest.fixture(scope="module")
def autoscaling_head(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")  # the head's token (token auth stays on) is this test's own
    port = free_port()
    config = home / "autoscaling.json"
    config.write_text(json.dumps(fake_cluster_config(port)))
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    env.update(HOME=str(home), RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1",
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    sessions = tempfile.mkdtemp(prefix="ray-as-", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    command = [str(BIN / "ray"), "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=0",
               "--include-dashboard=false", "--disable-usage-stats", f"--autoscaling-config={config}",
               f"--temp-dir={sessions}"]
    head = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        output, _ = head.communicate(timeout=120)
        assert head.returncode == 0, output[-3000:]
        yield f"127.0.0.1:{port}", env
    finally:
        try:  # the head's daemons and the fake workers its autoscaler started share the group
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        shutil.rmtree(sessions, ignore_errors=True)


def test_a_cluster_with_only_its_head_scales_up_its_gpu_worker_for_the_job(autoscaling_head, tmp_path):
    address, env = autoscaling_head
    run = subprocess.run(
        [sys.executable, "-m", "jobs.benchmark", "--config", "configs/demo.yaml", "--categories", "tire",
         "--run-name", "scaled", "--set", f"output_dir={tmp_path}", "--set", "cluster.resource_wait_s=180",
         *[arg for setting in SETTINGS for arg in ("--set", setting)]],
        env={**env, "RAY_ADDRESS": address, "PYTHONPATH": str(REPO)}, cwd=REPO, capture_output=True, text=True,
        timeout=400,
    )
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-4000:]
    assert "asked the autoscaler for 1 x {CPU: 1, GPU: 1}" in log and "0 CPU/0 GPU" in log  # only the head at first
    summary = json.loads((tmp_path / "scaled" / "summary.json").read_text())
    plan = summary["cluster"]["plan"]
    (worker,) = [node for node in plan["nodes"] if node["gpus"] == 1]
    assert worker["cpus"] == WORKER["CPU"]  # the worker type the autoscaler launched
    assert {actor["node_id"] for actor in plan["actors"]} == {worker["node_id"]}  # the head runs no actor
    assert [actor["gpus"] for actor in plan["actors"] if actor["role"] == "extractor"] == [1.0]

    # The bank is the single-process engine's, bit for bit.
    config = parse_config(json.loads((tmp_path / "scaled" / "summary.json").read_text())["config"], "summary")
    split = load_split("mvtec", TIRE_ROOT, "tire")
    torch.set_num_threads(1)  # cluster.cpus_per_actor=1
    extractor = PatchFeatureExtractor(ExtractionSettings.from_config(config))
    train = extractor.extract(split.train, range(len(split.train)))
    bank = build_bank(train, config.coreset.method, config.coreset.ratio, config.coreset.projection_dim,
                      coreset_seed(config.seed, "tire_small", "tire"), extractor.describe())
    (category,) = summary["categories"]
    assert category["bank_sha256"] == bank.sha256


def test_training_that_no_node_type_can_hold_ends_its_wait_naming_the_keys(autoscaling_head, tmp_path):
    """jobs.train, joined to the autoscaling cluster, as configs/reverse_distillation.yaml ships: each category's
    fit task wants 4 CPUs and a GPU, and no node type has 4 CPUs. Ray's autoscaler would call the demand
    infeasible every 35 s forever; the job asks for the bundles, waits ``cluster.resource_wait_s``, withdraws
    its request and stops with one line naming the keys, before any task."""
    address, env = autoscaling_head
    run = subprocess.run(
        [sys.executable, "-m", "jobs.train", "--config", "configs/reverse_distillation.yaml", "--wandb", "off",
         "--run-name", "too-big", "--set", f"output_dir={tmp_path}", "--set", "cluster.resource_wait_s=5",
         "--set", f"datasets=[{{name: tire_small, format: mvtec, root: {TIRE_ROOT}}}]",
         "--set", "backbone.name=tf_efficientnet_lite0", "--set", "backbone.layers=[]", "--set", "backbone.weights=package"],
        env={**env, "RAY_ADDRESS": address, "PYTHONPATH": str(REPO)}, cwd=REPO, capture_output=True, text=True,
        timeout=300,
    )
    log = run.stdout + run.stderr
    assert run.returncode == 2, log[-4000:]
    assert "asked the autoscaler for 1 x {CPU: 4, GPU: 1} + 1 x {CPU: 1} (a category's fit task and the evaluator)" in log
    (error,) = [line for line in log.splitlines() if line.startswith("error:")]
    assert error.startswith("error: the cluster did not offer 1 x {CPU: 4, GPU: 1} + 1 x {CPU: 1} within "
                            "cluster.resource_wait_s=5 s: it has ")
    assert error.endswith("or lower training.cpus_per_worker, training.gpus_per_worker (training.gpus_per_worker=0 "
                          "trains on CPUs)")
    assert not (tmp_path / "too-big" / "tire_small").exists()  # no task ran
