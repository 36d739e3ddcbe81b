"""Security: nothing unpickles data from disk or the network, and the embedded Ray listens on 127.0.0.1 only.

(Token auth on ``ray job submit`` and W&B keys kept out of logs and outputs: tests/test_ray_job_submit.py.)
"""

from __future__ import annotations

import re

import ray

from jobs import ray_runtime

from .conftest import REPO

# Ways to turn bytes into arbitrary objects: pickle and its relatives, and torch.load without weights_only.
UNPICKLING = re.compile(
    r"\bimport (c?pickle|dill|joblib|cloudpickle)\b|\bfrom (c?pickle|dill|joblib|cloudpickle) import\b"
    r"|allow_pickle\s*=\s*True|torch\.load\((?![^)]*weights_only\s*=\s*True)[^)]*\)|\.loads?\(.*pickle"
)


def test_no_code_unpickles_data():
    sources = [path for folder in ("anomaly_core", "cluster", "jobs", "benchmarks") for path in (REPO / folder).rglob("*.py")]
    assert len(sources) > 30
    found = [f"{path.relative_to(REPO)}:{number}: {line.strip()}" for path in sources
             for number, line in enumerate(path.read_text().splitlines(), 1) if UNPICKLING.search(line)]
    assert found == []
    assert UNPICKLING.search("state = torch.load(path, map_location='cpu')")  # the pattern does catch it
    assert not UNPICKLING.search("torch.load(path, map_location='cpu', weights_only=True)")


def test_embedded_ray_is_new_and_bound_to_localhost(monkeypatch):
    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert ray_runtime.start_ray(num_cpus=2) == "embedded local Ray on 127.0.0.1"
    (kwargs,) = calls
    assert kwargs["address"] == "local"  # never joins a cluster left running on the machine by accident
    assert kwargs["_node_ip_address"] == "127.0.0.1" and kwargs["include_dashboard"] is False
