"""Dinomaly (anomaly_core/training/dinomaly.py) on real tire images: a random-init ViT-S/14 with 4 registers at
56 px (4 x 4 patches), blocks 1-4 (a 4-block decoder: half the authors' 2-9, twice as fast), one intra-op thread.
Every number comes from real passes."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import cluster.training
from anomaly_core.backbones import IMAGENET_MEAN, IMAGENET_STD, WeightsError
from anomaly_core.config import ConfigError, parse_config
from anomaly_core.data import CategorySplit, ImageTransform, load_split
from anomaly_core.registry import MODELS
from anomaly_core.training import (
    CheckpointError,
    Dinomaly,
    ModelFilesError,
    Trainer,
    TrainerCallbacks,
    TrainerConfig,
    WarmCosine,
    load_checkpoint,
    load_images,
    load_model_files,
    predict_images,
    save_model_files,
)
from anomaly_core.training.stable_adamw import StableAdamW
from cluster.pipeline import CategoryJob
from cluster.training import build_model, fit_category, predict_category, trainer_config, transform_of
from jobs.predict import main as predict_main

from .conftest import TIRE_ROOT
from .test_training import one_thread  # noqa: F401 - autouse: one intra-op thread

ENCODER = "vit_small_patch14_reg4_dinov2"
CROP = 56
LAYERS = ("blocks.1", "blocks.2", "blocks.3", "blocks.4")


def make_model(recipe: str = "dinomaly", **settings) -> Dinomaly:
    values = MODELS["dinomaly"].recipes[recipe].values
    return Dinomaly(Dinomaly.settings_of({**values, "backbone": ENCODER, "layers": LAYERS, "crop": CROP,
                                          "init_seed": 0, **settings}), "random")


@pytest.fixture(scope="module")
def split():
    return load_split("mvtec", TIRE_ROOT, "tire")


@pytest.fixture(scope="module")
def train_images(split) -> torch.Tensor:
    return load_images(split.train[:6], ImageTransform(resize=64, crop=CROP, mean=IMAGENET_MEAN, std=IMAGENET_STD))


def config_of(tmp_path, **training):
    return parse_config({
        "name": "dinomaly", "output_dir": str(tmp_path), "preprocess": {"resize": 64, "crop": CROP},
        "datasets": [{"name": "tire_small", "format": "mvtec", "root": str(TIRE_ROOT)}],
        "backbone": {"name": ENCODER, "layers": list(LAYERS), "weights": "random"},
        "wandb": {"mode": "off"}, "training": {"model": "dinomaly", "log_every_n_steps": 1, "batch_size": 2,
                                                "max_steps": 4, **training},
    }, "dinomaly.yaml")


def test_dinomaly_trains_and_predicts_through_the_cluster_functions_and_jobs_predict(split, tmp_path, monkeypatch,
                                                                                   capsys):
    """max_steps ends training inside an epoch (6 images, batch 2: 3 steps an epoch; 4 steps = 2 epochs), the loss
    falls on real images; predict_category rebuilds the model from its files and scores exactly as the Trainer's
    model in this process does; jobs.predict scores the folder."""
    monkeypatch.setattr(cluster.training.ray, "get_gpu_ids", lambda: [])
    config = config_of(tmp_path)
    assert (config.training.recipe, config.training.epochs, config.training.eps) == ("dinomaly", 5000, 1e-8)
    job = CategoryJob("tire_small", str(TIRE_ROOT), CategorySplit(split.dataset, split.category, split.train[:6],
                                                                   split.test[::9]))
    fit_category(config, job, str(tmp_path / "model"), None, threads=1)
    metadata = json.loads((tmp_path / "model" / "model.json").read_text())
    assert metadata["kind"] == "dinomaly" and metadata["layers"] == list(LAYERS)
    steps = json.loads((tmp_path / "model" / "training.json").read_text())["steps"]
    losses = [step["loss"] for step in steps]
    assert [step["step"] for step in steps] == [1, 2, 3, 4] and losses[-1] < 0.9 * losses[0], losses

    scored = predict_category(config, job, str(tmp_path / "model"), threads=1)
    model = build_model(config)
    result = Trainer(trainer_config(config, "cpu")).fit(model, load_images(job.split.train, transform_of(config)))
    assert (result.global_step, result.epochs_completed, int(model.hard_mining_step)) == (4, 2, 4)
    expected = predict_images(model.eval(), load_images(job.split.test, transform_of(config)))
    np.testing.assert_array_equal(scored.scores, expected.scores)
    np.testing.assert_array_equal(scored.maps, expected.maps)
    assert np.ptp(scored.scores) > 0

    out = tmp_path / "predictions"
    assert predict_main(["--bank", str(tmp_path / "model"), "--input", split.test[0].image_path, "--out", str(out),
                         "--threshold", "0.5", "--weights", "random", "--wandb", "off"]) == 0, capsys.readouterr().err
    record = json.loads((out / "predictions.json").read_text())
    assert len(record["predictions"]) == 1
    assert record["predictions"][0]["pred_score"] == pytest.approx(float(expected.scores[0]), rel=1e-6)


class _Interrupted(Exception):
    pass


def _interrupt(record):
    if record["epoch"] == 0:
        raise _Interrupted


def test_a_resumed_run_continues_the_hard_mining_ramp_and_the_schedule_identically(train_images, tmp_path):
    """5 steps at 2 per epoch: epochs of 2, 2 and 1 step; the run interrupted after epoch 0 and resumed ends on
    the uninterrupted run's weights, step counter (p's ramp), dropout draws and losses."""
    config = TrainerConfig(epochs=50, max_steps=5, batch_size=2, seed=5, log_every_n_steps=1)
    settings = {"hard_mining_steps": 3, "warmup_steps": 2, "max_steps": 5}  # p reaches 0.9 inside the run, the warm-up ends
    logged = []
    full_model = make_model(**settings)
    images = train_images[:4]
    full = Trainer(config, callbacks=TrainerCallbacks(on_log=logged.append)).fit(full_model, images)
    assert (full.global_step, full.epochs_completed, [r["step"] for r in full.history]) == (5, 3, [2, 4, 5])
    schedule = WarmCosine(base_lr=2e-3, final_lr=2e-4, total_steps=5, warmup_steps=2)
    assert [record["lr"] for record in logged] == pytest.approx([2e-3 * schedule(step) for step in range(5)])
    assert [record["lr"] for record in logged][:3] == pytest.approx([0.0, 2e-3, 2e-3])
    with pytest.raises(_Interrupted):
        Trainer(config, tmp_path / "crashed", TrainerCallbacks(on_epoch_end=_interrupt)).fit(make_model(**settings),
                                                                                            images)
    checkpoint = tmp_path / "crashed" / "latest.safetensors"
    assert int(load_checkpoint(checkpoint).model_state["hard_mining_step"]) == 2
    resumed_model = make_model(**settings)
    resumed = Trainer(config).fit(resumed_model, images, resume_from=checkpoint)  # no checkpoints: 140 MB each
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in full.history]
    assert int(resumed_model.hard_mining_step) == 5
    with pytest.raises(CheckpointError, match="its run had trainer=.*'max_steps': 5"):  # another schedule length
        Trainer(replace(config, max_steps=6)).fit(make_model(**settings), images, resume_from=checkpoint)
    for name, value in full_model.state_dict().items():
        assert torch.equal(resumed_model.state_dict()[name], value), name


def test_easy_points_pass_a_tenth_of_their_gradient_once_the_ramp_has_risen(train_images):
    """The hook form (the authors') against an independent one: d x w + d.detach() x (1 - w) has d's value and
    w times its gradient. At step 0 (p = 0) no point is easy and the gradient is the plain cosine loss's; at step
    1000 (p = 0.9) 90 % of the points are easy and it is not."""
    model = make_model().eval()  # no dropout: every pass sees the same network
    images = train_images[:2]

    def bottleneck_grad(loss: torch.Tensor) -> torch.Tensor:
        model.zero_grad()
        loss.backward(retain_graph=True)
        return model.bottleneck[0].fc1.weight.grad.clone()

    for step, easy_share in ((0, 0.0), (1000, 0.9)):
        model.hard_mining_step.fill_(step)
        hooked = bottleneck_grad(model.training_step(images)["loss"])
        encoded, decoded = model.encoder_and_decoder(images)
        scaled_terms, plain_terms = [], []
        for e, d in zip(encoded, decoded):
            distance = (1 - F.cosine_similarity(e, d)).unsqueeze(1).detach()
            k = max(1, int(distance.numel() * (1 - easy_share)))
            weight = torch.where(distance < distance.flatten().sort(descending=True).values[k - 1], 0.1, 1.0)
            assert (weight < 1).float().mean().item() == pytest.approx(easy_share, abs=1 / distance.numel())
            scaled = d * weight + d.detach() * (1 - weight)
            scaled_terms.append((1 - F.cosine_similarity(e.flatten(1), scaled.flatten(1))).mean())
            plain_terms.append((1 - F.cosine_similarity(e.flatten(1), d.flatten(1))).mean())
        independent = bottleneck_grad(torch.stack(scaled_terms).mean())
        scale = hooked.abs().max().item()
        torch.testing.assert_close(hooked, independent, rtol=1e-4, atol=1e-5 * scale)
        plain = bottleneck_grad(torch.stack(plain_terms).mean()) if step == 1000 else independent
        assert torch.allclose(hooked, plain, rtol=1e-4, atol=1e-5 * scale) == (step == 0)


def test_stable_adamw_is_amsgrad_adamw_whose_step_shrinks_by_the_update_rms():
    """With a constant gradient RMS(g / denominator) < 1: torch's AdamW(amsgrad=True) exactly. A gradient 10 times
    the ones before makes that RMS ~ 3: the step is AdamW's divided by it (the authors' clip), weight decay not."""
    torch.manual_seed(0)
    start, direction = torch.randn(50), torch.randn(50)
    ours, theirs = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    stable = StableAdamW([ours], lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, amsgrad=True)
    adamw = torch.optim.AdamW([theirs], lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, amsgrad=True)
    for scale in (1.0, 1.0, 1.0, 10.0):
        before = ours.detach().clone()
        for parameter, optimizer in ((ours, stable), (theirs, adamw)):
            parameter.grad = direction * scale
            optimizer.step()
        if scale == 1.0:
            torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    state = stable.state[ours]
    denominator = (state["max_exp_avg_sq"].sqrt() / (1 - 0.999**4) ** 0.5) + 1e-8
    rms = ((direction * 10 / denominator) ** 2).mean().sqrt()
    assert rms > 1.5  # the clip is active
    decayed = before * (1 - 0.01 * 0.1)
    expected_step = (0.01 / (1 - 0.9**4)) * state["exp_avg"] / denominator / rms
    torch.testing.assert_close(decayed - ours.detach(), expected_step, rtol=1e-4, atol=1e-8)


def test_model_files_round_trip_and_refuse_another_crop_or_decoder(train_images, tmp_path):
    model = make_model(recipe="anomalib")
    optimizer, _ = model.configure_optimizers(epochs=1, steps_per_epoch=2)
    model.train().training_step(train_images[:2])["loss"].backward()
    optimizer.step()
    save_model_files(model, tmp_path, resize=64, training={"epochs_completed": 1})
    loaded = load_model_files(tmp_path, "random", {"backbone": ENCODER, "crop": CROP})
    assert loaded.settings == model.settings and not loaded.settings.mlp_bias
    np.testing.assert_array_equal(predict_images(loaded, train_images[2:4]).maps,
                                  predict_images(model.eval(), train_images[2:4]).maps)
    with pytest.raises(ModelFilesError, match="crop: model has 56, inference uses 112"):
        load_model_files(tmp_path, "random", {"crop": 112})
    other = make_model(recipe="anomalib", init_seed=1)
    save_file({k: v.contiguous() for k, v in other.trainable_state().items()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelFilesError, match="tensors_sha256"):
        load_model_files(tmp_path, "random")


def test_the_recipes_maps_blurred_or_raw_and_their_padding():
    """anomalib's map is the raw one; the authors' the blurred 256 map upsampled, whose zero padding darkens the
    border (by ~4 % here: a 5 x 5 kernel of sigma 4 is nearly flat, so 2 of its 5 columns fall on zeros); with
    anomalib's reflection the border keeps the raw map's level."""
    images = torch.randn(2, 3, CROP, CROP)
    authors = make_model()
    anomalib, reflected = make_model(recipe="anomalib", mlp_bias=True), make_model(mlp_bias=True, blur_padding="reflect")
    anomalib.load_trainable_state(authors.trainable_state())
    reflected.load_trainable_state(authors.trainable_state())
    raw = authors.eval().anomaly_maps(images)[:, 0]
    torch.testing.assert_close(anomalib.eval().predict(images)["anomaly_map"], raw)

    def border_drop(maps: torch.Tensor) -> float:  # the first column against the fourth, relative
        return ((maps[..., 3] - maps[..., 0]) / maps[..., 3]).mean().item()

    assert abs(border_drop(raw)) < 0.01
    assert border_drop(authors.predict(images)["anomaly_map"]) > 0.03
    assert abs(border_drop(reflected.eval().predict(images)["anomaly_map"])) < 0.01


@pytest.mark.parametrize(("key", "value", "message"), [
    ("blur_padding", "mirror", r"training.blur_padding: Input should be 'zeros' or 'reflect'"),
    ("max_steps", 0, r"training.max_steps: Input should be greater than or equal to 1"),
    ("eps", 0, r"training.eps: Input should be greater than 0"),
    ("momentum", 0.9, r"training.momentum applies to stfpm, not dinomaly"),
])
def test_bad_dinomaly_keys_are_refused_naming_the_key(tmp_path, key, value, message):
    with pytest.raises(ConfigError, match=message):
        config_of(tmp_path, **{key: value})


def test_the_default_blocks_are_the_authors_and_a_cnn_or_an_odd_block_count_is_refused():
    authors = make_model(layers=())
    assert authors.settings.layers == tuple(f"blocks.{index}" for index in range(2, 10)) and len(authors.decoder) == 8
    with pytest.raises(WeightsError, match="'resnet18' is a CNN; Dinomaly needs a ViT encoder"):
        make_model(backbone="resnet18")
    with pytest.raises(WeightsError, match="even number .* of encoder blocks"):
        make_model(layers=("blocks.2", "blocks.3", "blocks.4"))


def test_position_embeddings_resample_without_antialiasing_as_the_references(tmp_path):
    """A file's 6 x 6 grid of position embeddings loaded into a 4 x 4 model: bicubic with antialiasing by default
    (timm's converter), without it for Dinomaly (DINOv2's and anomalib's): the two differ, each equals its own
    torch interpolation."""
    from timm.models.vision_transformer import VisionTransformer

    from anomaly_core.backbones import load_vit_weights

    def vit(side: int) -> VisionTransformer:
        return VisionTransformer(img_size=side * 14, patch_size=14, embed_dim=24, depth=1, num_heads=2, reg_tokens=4,
                                 no_embed_class=True, num_classes=0)

    torch.manual_seed(0)
    source = vit(6)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "vit.safetensors"))
    grid = source.pos_embed.detach().reshape(1, 6, 6, 24).permute(0, 3, 1, 2)
    loaded = {}
    for antialias in (True, False):
        target = vit(4)
        load_vit_weights(target, tmp_path / "vit.safetensors", antialias=antialias)
        expected = F.interpolate(grid, size=(4, 4), mode="bicubic", antialias=antialias).permute(0, 2, 3, 1)
        torch.testing.assert_close(target.pos_embed.detach(), expected.reshape(1, 16, 24))
        loaded[antialias] = target.pos_embed.detach()
    assert (loaded[True] - loaded[False]).abs().max() > 1e-3
    assert not make_model().settings.pos_embed_antialias
