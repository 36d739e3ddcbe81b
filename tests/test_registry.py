"""The trained-model registry (anomaly_core/registry.py): a new model is a module plus one table entry.

A toy model defined here, registered in ``MODELS`` for one test, is validated, trained and scored by the very
functions jobs.train runs on Ray (cluster.training.fit_category / predict_category), with no change to
cluster/ or jobs/.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from typing import ClassVar

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim import Adam, Optimizer

import cluster.training
from anomaly_core.config import ConfigError, parse_config
from anomaly_core.data import CategorySplit, load_split
from anomaly_core.data.synthetic import write_textures
from anomaly_core.registry import MODELS, ModelEntry, Recipe
from anomaly_core.training import DistillationModel, Trainer, load_images, predict_images
from cluster.pipeline import CategoryJob
from cluster.training import build_model, fit_category, predict_category, trainer_config, transform_of
from jobs.cli import read_yaml

from .conftest import REPO, TIRE_ROOT


@dataclass(frozen=True, kw_only=True)
class ToySettings:
    backbone: str
    layers: tuple[str, ...] = ()
    crop: int
    lr: float
    weight_decay: float
    init_seed: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))  # JSON gives a list back


class ToyModel(DistillationModel):
    """A 1x1 convolution per teacher layer learns to reproduce the teacher's features; map: its squared error."""

    settings_type: ClassVar[type] = ToySettings
    kind: ClassVar[str] = "toy"

    def __init__(self, settings: ToySettings, weights: str) -> None:
        super().__init__(settings.backbone, settings.layers, weights, settings.crop)
        self.settings = replace(settings, layers=self.teacher.layers)
        with torch.random.fork_rng():
            torch.manual_seed(settings.init_seed)
            self.student = nn.ModuleList(nn.Conv2d(c, c, 1) for c in self.teacher.channels)

    def _errors(self, images: torch.Tensor) -> list[torch.Tensor]:
        return [((conv(t) - t) ** 2).mean(dim=1) for conv, t in zip(self.student, self.teacher_features(images))]

    def training_step(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": torch.stack([error.mean() for error in self._errors(images)]).sum()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        maps = sum(F.interpolate(error.unsqueeze(1), size=images.shape[-2:], mode="bilinear")[:, 0]
                   for error in self._errors(images))
        return {"pred_score": maps.amax(dim=(1, 2)), "anomaly_map": maps}

    def configure_optimizers(self, epochs: int, steps_per_epoch: int) -> tuple[Optimizer, None]:
        return Adam(self.student.parameters(), lr=self.settings.lr, weight_decay=self.settings.weight_decay), None


TOY_RECIPE = {"epochs": 2, "batch_size": 4, "drop_last": False, "lr": 0.01, "weight_decay": 0.0,
              "clip_grad_norm": 0.0, "monitor": "loss", "weights": "last", "resize": 72, "crop": 64}
TOY = ModelEntry(ToyModel, {"toy": Recipe("this test", TOY_RECIPE)}, reference="none", code="tests/test_registry.py",
                 config="configs/none.yaml")


def toy_config(tmp_path, **training):
    return parse_config({
        "name": "toy", "output_dir": str(tmp_path),
        "datasets": [{"name": "tire_small", "format": "mvtec", "root": str(TIRE_ROOT)}],
        "backbone": {"name": "tf_efficientnet_lite0", "layers": [], "weights": "package"},
        "wandb": {"mode": "off"}, "training": {"model": "toy", "log_every_n_steps": 1, **training},
    }, "toy.yaml")


@pytest.fixture
def toy_registered(monkeypatch):
    monkeypatch.setitem(MODELS, "toy", TOY)
    monkeypatch.setattr(cluster.training.ray, "get_gpu_ids", lambda: [])  # a plain process: no Ray to ask


def test_a_model_in_the_table_trains_and_predicts_through_the_cluster_functions(toy_registered, tmp_path):
    """The toy recipe fills the config (image size included); fit_category writes model files whose kind is the
    table's name; predict_category rebuilds the model from them through the table and scores the test images
    exactly as the Trainer's model in this process does."""
    config = toy_config(tmp_path)
    assert (config.training.recipe, config.training.epochs, config.preprocess.resize, config.preprocess.crop) == \
        ("toy", 2, 72, 64)
    split = load_split("mvtec", TIRE_ROOT, "tire")
    job = CategoryJob("tire_small", str(TIRE_ROOT), CategorySplit(split.dataset, split.category, split.train[:8],
                                                                   split.test[::7]))
    torch.set_num_threads(1)
    fit_category(config, job, str(tmp_path / "toy"), None, threads=1)
    metadata = json.loads((tmp_path / "toy" / "model.json").read_text())
    assert metadata["kind"] == "toy" and metadata["training"]["recipe"]["name"] == "toy"
    losses = [step["loss"] for step in json.loads((tmp_path / "toy" / "training.json").read_text())["steps"]]
    assert len(losses) == 4 and losses[-1] < losses[0]  # 2 epochs x 8 images / 4

    scored = predict_category(config, job, str(tmp_path / "toy"), threads=1)
    model = build_model(config)
    Trainer(trainer_config(config, "cpu")).fit(model, load_images(job.split.train, transform_of(config)))
    expected = predict_images(model.eval(), load_images(job.split.test, transform_of(config)))
    np.testing.assert_array_equal(scored.scores, expected.scores)
    np.testing.assert_array_equal(scored.maps, expected.maps)
    assert np.ptp(scored.scores) > 0


def test_the_table_decides_which_keys_and_models_a_config_may_name(toy_registered, tmp_path):
    with pytest.raises(ConfigError, match=r"training.model: Value error, unknown model 'padim'; known: "
                                          + re.escape(", ".join(MODELS)) + "$"):
        toy_config(tmp_path, model="padim")
    with pytest.raises(ConfigError, match="training.betas applies to reverse_distillation, not toy"):
        toy_config(tmp_path, betas=[0.5, 0.9])
    with pytest.raises(ConfigError, match="unknown recipe 'rd4ad' for toy; choose toy"):
        toy_config(tmp_path, recipe="rd4ad")


def test_a_recipe_that_leaves_out_a_value_is_refused_when_registered():
    short = {key: value for key, value in TOY_RECIPE.items() if key not in ("monitor", "weights")}
    with pytest.raises(ValueError, match="recipe 'short' of .* leaves out monitor, weights"):
        ModelEntry(ToyModel, {"toy": Recipe("x", TOY_RECIPE), "short": Recipe("y", short)},
                   reference="none", code="none", config="none")


@pytest.mark.parametrize("name", sorted(MODELS))
def test_each_entry_has_its_class_config_and_readme_row(name):
    """The class records the table's name in model files; the example config trains that model by its default
    recipe; the README's method table lists the reference, the code followed, the recipes and the config."""
    entry = MODELS[name]
    assert entry.model_class().kind == name
    config = parse_config(read_yaml(REPO / entry.config), entry.config)
    assert config.training.model == name and config.training.recipe == entry.default_recipe
    rows = [line for line in (REPO / "README.md").read_text().splitlines() if line.startswith(f"| `{name}` (trained")]
    assert len(rows) == 1, f"README.md lists {name} {len(rows)} times"
    cells = [cell.strip() for cell in rows[0].strip("|").split("|")]
    assert entry.reference in cells[1] and entry.code in cells[1]
    assert re.findall(r"`([^`]+)`", cells[2]) == list(entry.recipes)
    assert cells[3] == f"`{entry.config}`"


def test_an_entrys_auxiliary_folders_come_from_the_paths_file_and_are_checked(monkeypatch, tmp_path):
    """A model that trains with an auxiliary folder (DTD for DRAEM) is refused without one, naming the key and
    where to set it; the site's paths file fills it by name; a missing folder and a folder for a model that
    uses none are refused before any work starts."""
    from jobs.cli import load_config

    monkeypatch.setitem(MODELS, "toy", replace(TOY, auxiliary=("dtd",)))
    with pytest.raises(ConfigError, match=r"training.auxiliary.dtd: toy trains with the dtd image folder; set "
                                          r"datasets.dtd in configs/paths.yaml"):
        toy_config(tmp_path)
    with pytest.raises(ConfigError, match=r"training.auxiliary.imagenette: toy uses no imagenette folder \(it uses dtd\)"):
        toy_config(tmp_path, auxiliary={"dtd": str(tmp_path), "imagenette": str(tmp_path)})
    write_textures(tmp_path / "dtd", per_texture=1, size=8)  # a folder must hold images
    config_file = tmp_path / "toy.yaml"
    config_file.write_text(json.dumps({
        "datasets": [{"name": "tire_small", "format": "mvtec", "root": str(TIRE_ROOT)}],
        "backbone": {"name": "tf_efficientnet_lite0", "weights": "package"}, "training": {"model": "toy"}}))
    paths = tmp_path / "paths.yaml"
    paths.write_text(f"datasets:\n  dtd: {tmp_path / 'dtd'}\n  imagenette: {tmp_path / 'nowhere'}\n")
    assert load_config(config_file, [], paths).training.auxiliary == {"dtd": str(tmp_path / "dtd")}
    with pytest.raises(ConfigError, match=rf"toy.yaml: training.auxiliary.dtd: folder not found: {tmp_path}/gone$"):
        load_config(config_file, [f"training.auxiliary.dtd={tmp_path}/gone"], paths)
