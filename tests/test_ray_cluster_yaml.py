"""ray_cluster.yaml passes Ray's own cluster-launcher validation, and a broken copy does not."""

import copy

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from .conftest import REPO


def _load():
    return yaml.safe_load((REPO / "ray_cluster.yaml").read_text())


def test_cluster_config_is_valid_for_ray():
    config = _load()
    validate_config(prepare_config(copy.deepcopy(config)))
    workers = config["available_node_types"]["gpu_worker"]
    assert workers["max_workers"] >= 1 and config["head_node_type"] == "head"
    assert any("pip install" in command and "-e ." in command for command in config["setup_commands"])


@pytest.mark.parametrize(
    "mutate",
    [
        lambda c: c["available_node_types"]["gpu_worker"].__setitem__("min_workers", "many"),
        lambda c: c.__setitem__("head_node_type", "missing"),
    ],
)
def test_broken_copies_are_rejected(mutate):
    config = _load()
    mutate(config)
    with pytest.raises(Exception):
        validate_config(prepare_config(config))
