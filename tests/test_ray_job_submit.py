"""`ray job submit --working-dir . -- python -m jobs.benchmark ...` against a local `ray start --head`.

Token authentication stays on: the head writes the token to ~/.ray/auth_token and the CLI sends it
when RAY_AUTH_MODE=token. Everything binds 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from .conftest import REPO, TIRE_ROOT

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def ray_head():
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    gcs, dashboard = _free_port(), _free_port()
    short_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # Ray's socket paths must stay under 107 chars
    start = [str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
             f"--port={gcs}", f"--dashboard-port={dashboard}", "--num-cpus=2", "--disable-usage-stats",
             f"--temp-dir={short_dir}"]
    subprocess.run(start, env=env, check=True, capture_output=True, timeout=180)
    try:
        yield env, f"http://127.0.0.1:{dashboard}"
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(short_dir, ignore_errors=True)


def test_ray_job_submit_runs_the_benchmark(ray_head, tmp_path):
    env, address = ray_head
    config = {
        "name": "submitted",
        "output_dir": str(tmp_path / "out"),
        "datasets": [{"name": "tire_small", "format": "mvtec", "root": str(TIRE_ROOT)}],
        "backbone": {"name": "tf_efficientnet_lite0", "layers": ["blocks.2", "blocks.4"], "weights": "package"},
        "preprocess": {"resize": 128, "crop": 112},
        "cluster": {"num_extractors": 1, "cpus_per_actor": 1, "batch_size": 8},
        "wandb": {"mode": "off"},
    }
    config_path = tmp_path / "job.yaml"
    config_path.write_text(yaml.safe_dump(config))
    submit = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO), "--",
              "python", "-m", "jobs.benchmark", "--config", str(config_path), "--run-name", "via-jobs-api"]
    done = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "succeeded" in done.stdout + done.stderr
    assert "tire_small  tire" in done.stdout  # the per-category table, streamed back from the job
    summary = json.loads((tmp_path / "out" / "via-jobs-api" / "summary.json").read_text())
    assert summary["categories"][0]["metrics"]["image_auroc"] > 0.65
    assert any(key == "node:127.0.0.1" for key in summary["cluster"]["resources"])
