"""EfficientAD (anomaly_core/training/efficient_ad.py) through the functions jobs.train runs: a PDN teacher of
the real S layout but 8 channels wide (``pdn_tiny``, registered for these tests: the real widths cost seconds a
step on a CPU), random init, real tire images at the model's smallest size (256), generated penalty images."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import cluster.training
from anomaly_core.config import ConfigError, parse_config
from anomaly_core.data import CategorySplit, load_split
from anomaly_core.data.synthetic import write_textures
from anomaly_core.training import (
    ModelFilesError,
    Trainer,
    TrainerCallbacks,
    held_out_split,
    load_images,
    load_model_files,
    predict_images,
)
from anomaly_core.training.efficient_ad import PDN_SIZES, EfficientAd, PdnSize, quantile
from cluster.pipeline import CategoryJob
from cluster.training import build_model, fit_category, predict_category, trainer_config, transform_of
from jobs.predict import main as predict_main
from jobs.train import preflight

from .conftest import REPO, TIRE_ROOT



@pytest.fixture(scope="module")
def penalty(tmp_path_factory):
    return write_textures(tmp_path_factory.mktemp("imagenette"), per_texture=1, size=64)


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setitem(PDN_SIZES, "pdn_tiny", PdnSize((8, 8, 8), 8))
    monkeypatch.setattr(cluster.training.ray, "get_gpu_ids", lambda: [])  # a plain process: no Ray to ask


def config_of(tmp_path, penalty, backbone=None, preprocess=None, **training):
    return parse_config({
        "name": "efficient_ad", "output_dir": str(tmp_path),
        "datasets": [{"name": "tire_small", "format": "mvtec", "root": str(TIRE_ROOT)}],
        "backbone": {"name": "pdn_tiny", "layers": [], "weights": "random", **(backbone or {})},
        "preprocess": preprocess or {}, "wandb": {"mode": "off"},
        "training": {"model": "efficient_ad", "log_every_n_steps": 1, "auxiliary": {"imagenette": str(penalty)},
                     **training},
    }, "efficient_ad.yaml")


def test_quantile_is_torchs_bit_for_bit_without_its_size_limit():
    generator = torch.Generator().manual_seed(0)
    for n in (2, 7, 1001, 3136, 65537):
        values = torch.randn(n, generator=generator)
        values[: n // 3] = values[0]  # ties
        for q in (0.0, 0.5, 0.9, 0.995, 0.999, 1.0):
            assert torch.equal(quantile(values, q), torch.quantile(values, q)), (n, q)
    assert quantile(torch.arange(2**24 + 10, dtype=torch.float32), 0.5) == 8388612.5  # torch.quantile refuses this


def test_the_student_learns_the_teacher_on_real_images(tiny, penalty, tmp_path):
    """Four steps on two tire images lower the loss of step 0 replayed (its draws come from the step's seed: the
    same penalty image, jitter and dropout); every term is logged; the penalty folder is refused empty."""
    config = config_of(tmp_path, penalty, lr=4e-3)
    split = load_split("mvtec", TIRE_ROOT, "tire")
    images = load_images(split.train[:2], transform_of(config))
    model = build_model(config)
    with torch.no_grad():
        model.prepare(images)

    def step_zero() -> float:
        model.steps_done.zero_()
        with torch.no_grad():
            return float(model.training_step(images[:1])["loss"])

    optimizer, _ = model.configure_optimizers(1, 4)
    model.train()
    before = step_zero()
    for step in range(4):
        losses = model.training_step(images[step % 2 : step % 2 + 1])
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
    assert set(losses) == {"loss", "loss/st", "loss/hard", "loss/penalty", "loss/ae", "loss/stae"}
    assert int(model.steps_done) == 5
    after = step_zero()
    assert after < 0.9 * before, (before, after)
    empty = config_of(tmp_path, tmp_path / "empty")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"training.auxiliary.imagenette: no images \(.*\) under .*empty"):
        build_model(empty).prepare(images)


def test_trains_resumes_exactly_and_predicts_through_the_cluster_functions(tiny, penalty, tmp_path):
    """fit_category stops at max_steps inside the second epoch (6 steps, 4 trained images, 1 held out for the
    quantiles) and writes model files; a run interrupted after its first epoch and resumed from the checkpoint
    ends on the same weights and statistics, bit for bit; predict_category and jobs.predict score from the files."""
    config = config_of(tmp_path, penalty, max_steps=6)
    assert (config.training.recipe, config.training.epochs, config.training.batch_size, config.preprocess.crop) == \
        ("efficientad", 70000, 1, 256)
    split = load_split("mvtec", TIRE_ROOT, "tire")
    job = CategoryJob("tire_small", str(TIRE_ROOT), CategorySplit(split.dataset, split.category, split.train[:5],
                                                                   split.test[::14]))
    torch.set_num_threads(1)
    folder = tmp_path / "model"
    fit_category(config, job, str(folder), None, threads=1)
    record = json.loads((folder / "training.json").read_text())
    assert [entry["step"] for entry in record["steps"]] == list(range(1, 7))
    assert [entry["epoch"] for entry in record["history"]] == [0, 1] and record["summary"]["global_step"] == 6
    metadata = json.loads((folder / "model.json").read_text())
    assert metadata["kind"] == "efficient_ad" and metadata["backbone"] == "pdn_tiny" and metadata["max_steps"] == 6
    assert len(metadata["training"]["held_out_images"]) == 1

    images = load_images(job.split.train, transform_of(config))
    trained, held_out = held_out_split(len(images), 0.1, config.seed)

    class Interrupt(Exception):
        pass

    def crash(path, kind):
        raise Interrupt

    checkpoints = tmp_path / "interrupted"
    with pytest.raises(Interrupt):
        Trainer(trainer_config(config, "cpu"), checkpoints, TrainerCallbacks(on_checkpoint=crash)).fit(
            build_model(config), images[trained], held_out=images[held_out])
    resumed = build_model(config)
    Trainer(trainer_config(config, "cpu"), checkpoints).fit(resumed, images[trained], held_out=images[held_out],
                                                            resume_from=checkpoints / "latest.safetensors")
    exported = load_model_files(folder, "random", {"backbone": "pdn_tiny", "crop": 256, "resize": 256})
    for name, value in exported.trainable_state().items():
        assert torch.equal(value, resumed.trainable_state()[name]), name
    assert int(exported.steps_done) == 6 and exported.map_quantiles.all() and exported.teacher_std.all()

    scored = predict_category(config, job, str(folder), threads=1)
    expected = predict_images(resumed, load_images(job.split.test, transform_of(config)))
    np.testing.assert_array_equal(scored.scores, expected.scores)
    np.testing.assert_array_equal(scored.maps, expected.maps)
    assert scored.maps.shape == (len(job.split.test), 256, 256) and np.ptp(scored.scores) > 0

    out = tmp_path / "predicted"
    assert predict_main(["--bank", str(folder), "--weights", "random", "--input", str(job.split.test[0].image_path),
                         "--out", str(out), "--threshold", "0.5"]) == 0
    written = json.loads((out / "predictions.json").read_text())["predictions"]
    assert written[0]["pred_score"] == pytest.approx(float(scored.scores[0]), rel=1e-5)

    with pytest.raises(ModelFilesError, match=r"crop: model has 256, inference uses 288"):
        load_model_files(folder, "random", {"crop": 288})
    teacher_file = tmp_path / "teacher.pth"
    torch.save({name: value + 1 for name, value in exported.teacher.state_dict().items()}, teacher_file)
    with pytest.raises(ModelFilesError, match=r"teacher weights .*teacher.pth.* are not the ones"):
        load_model_files(folder, str(teacher_file))


def test_teacher_files_load_by_anomalibs_names_or_nelson1425s_positions(tiny, penalty, tmp_path):
    config = config_of(tmp_path, penalty)
    source = build_model(config).teacher.state_dict()
    shifted = {name: value + 1 for name, value in source.items()}
    torch.save(shifted, tmp_path / "anomalib.pth")  # conv1.weight, ...: anomalib's pretrained_teacher_small.pth
    torch.save({f"{i}.{name.split('.')[1]}": value for i, (name, value) in zip((0, 0, 3, 3, 6, 6, 8, 8),
                                                                                shifted.items())}, tmp_path / "nelson.pth")
    for file in ("anomalib.pth", "nelson.pth"):
        model = build_model(config_of(tmp_path, penalty, backbone={"weights": str(tmp_path / file)}))
        assert all(torch.equal(model.teacher.state_dict()[name], value) for name, value in shifted.items())
        assert model.provenance()["weights_sha256"] != "random"
        assert "teacher.conv1.weight" not in model.trainable_state()  # the teacher comes from its file, not ours
    torch.save({"conv1.weight": shifted["conv1.weight"]}, tmp_path / "other.pth")
    with pytest.raises(ConfigError, match=r"weights file .*other.pth lacks parameters the model needs"):
        preflight(config_of(tmp_path, penalty, backbone={"weights": str(tmp_path / "other.pth")}), [])


@pytest.mark.parametrize(("change", "message"), [
    ({"map_normalisation": "pixels"}, r"training.map_normalisation: Input should be 'grid' or 'image'"),
    ({"max_steps": 0}, r"training.max_steps: Input should be greater than or equal to 1"),
    ({"model": "stfpm", "map_normalisation": "grid"}, r"training.map_normalisation applies to efficient_ad, not stfpm"),
])
def test_bad_keys_are_one_line_errors(tiny, penalty, tmp_path, change, message):
    with pytest.raises(ConfigError, match=message):
        config_of(tmp_path, penalty, **change)


@pytest.mark.parametrize(("config", "message"), [
    ({"backbone": {"name": "resnet18"}}, r"backbone 'resnet18' is no EfficientAD teacher; choose pdn_small or "
                                         r"pdn_medium"),
    ({"backbone": {"layers": ["conv4"]}}, r"backbone.layers \['conv4'\]: a PDN teacher has one output map; set \[\]"),
    ({"backbone": {"weights": "package"}}, r"no package ships a PDN teacher"),
    ({"preprocess": {"resize": 224, "crop": 224}}, r"preprocess.crop=224: EfficientAD needs a multiple of 4 of at least"),
    ({"held_out_fraction": 0.0}, r"training.held_out_fraction must be > 0"),
])
def test_what_only_the_model_can_judge_is_refused_before_work(tiny, penalty, tmp_path, config, message):
    """jobs.train's preflight builds the model on the driver: these fail there, one line naming the key."""
    with pytest.raises(ConfigError, match=message):
        preflight(config_of(tmp_path, penalty, **config), [])
