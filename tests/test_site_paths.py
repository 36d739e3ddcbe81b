"""An offline site's paths.yaml and backbones/ folder: set once, found by name, overridden by --set."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from anomaly_core.config import ConfigError
from anomaly_core.weight_files import find_weights
from jobs.cli import load_config

from .conftest import REPO, TIRE_ROOT

BASE = {
    "name": "site",
    "datasets": [{"name": "mvtec_ad", "format": "mvtec", "root": "/not/here"}],
    "backbone": {"name": "wide_resnet50_2", "layers": ["layer2", "layer3"], "weights": "search"},
}


def write(path: Path, payload: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(payload))
    return path


@pytest.fixture
def site(tmp_path, monkeypatch):
    """configs/ with a run config and paths.yaml beside it, and a backbones folder with torchvision's file name."""
    monkeypatch.delenv("ANOMALY_BENCH_PATHS", raising=False)
    backbones = tmp_path / "models" / "backbones"
    weights = backbones / "wide_resnet50_2-95faca4d.pth"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"weights")
    write(tmp_path / "configs" / "paths.yaml", {"datasets": {"mvtec_ad": str(TIRE_ROOT)}, "backbones": str(backbones)})
    return {"config": write(tmp_path / "configs" / "run.yaml", BASE), "weights": weights, "backbones": backbones}


def test_paths_beside_the_config_set_roots_and_find_weights(site):
    config = load_config(site["config"], [])
    assert config.datasets[0].root == str(TIRE_ROOT)
    assert config.backbone.weights == str(site["weights"])  # recorded as the concrete file


def test_set_overrides_the_paths_file(site, tmp_path):
    other = tmp_path / "elsewhere"
    other.mkdir()
    config = load_config(site["config"], [f"datasets.0.root={other}"])
    assert config.datasets[0].root == str(other)


def test_paths_file_from_the_environment_or_the_command_line(site, tmp_path, monkeypatch):
    lone = write(tmp_path / "lone" / "run.yaml", BASE)  # no paths.yaml beside it
    with pytest.raises(ConfigError, match="backbone.weights=search needs a backbones folder"):
        load_config(lone, [])
    monkeypatch.setenv("ANOMALY_BENCH_PATHS", str(site["config"].parent / "paths.yaml"))
    assert load_config(lone, []).datasets[0].root == str(TIRE_ROOT)
    monkeypatch.delenv("ANOMALY_BENCH_PATHS")
    assert load_config(lone, [], site["config"].parent / "paths.yaml").backbone.weights == str(site["weights"])
    with pytest.raises(ConfigError, match="paths file not found"):
        load_config(lone, [], tmp_path / "absent.yaml")


def test_bad_paths_files_name_the_file_and_key(site):
    paths = site["config"].parent / "paths.yaml"
    write(paths, {"datasets": {"mvtec_ad": str(TIRE_ROOT)}, "backbone": "/models"})
    with pytest.raises(ConfigError, match=r"paths.yaml: unknown keys \['backbone'\]"):
        load_config(site["config"], [])
    write(paths, {"datasets": ["mvtec_ad"]})
    with pytest.raises(ConfigError, match="paths.yaml: datasets must map dataset names to folder paths"):
        load_config(site["config"], [])


def test_weight_search_finds_each_publishers_name_and_refuses_ambiguity(tmp_path):
    folder = tmp_path / "backbones"
    (folder / "vit_base_patch14_dinov2").mkdir(parents=True)
    (folder / "dinov2_vits14_pretrain.pth").write_bytes(b"x")
    (folder / "vit_base_patch14_dinov2" / "model.safetensors").write_bytes(b"x")
    (folder / "dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth").write_bytes(b"x")
    assert find_weights("vit_small_patch14_dinov2", folder).name == "dinov2_vits14_pretrain.pth"
    assert find_weights("vit_base_patch14_dinov2", folder) == folder / "vit_base_patch14_dinov2" / "model.safetensors"
    assert find_weights("vit_base_patch16_dinov3", folder).name.startswith("dinov3_vitb16_pretrain")
    with pytest.raises(ValueError, match=r"no weights for 'resnet18' in .*resnet18-f37072fd.pth"):
        find_weights("resnet18", folder)
    (folder / "resnet18-f37072fd.pth").write_bytes(b"x")
    (folder / "resnet18.safetensors").write_bytes(b"x")
    with pytest.raises(ValueError, match="several weights files for 'resnet18'"):
        find_weights("resnet18", folder)


def test_the_shipped_paths_file_changes_nothing():
    demo = load_config(REPO / "configs" / "demo.yaml", [])
    assert demo.datasets[0].root == yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())["datasets"][0]["root"]
