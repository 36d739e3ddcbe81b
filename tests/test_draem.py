"""DRAEM (anomaly_core/training/draem.py) and its simulated anomalies (anomaly_synthesis.py), on real tire images
at 32 px with generated textures standing in for DTD.

At the authors' widths DRAEM's ~97 M parameters make a step (and a 1 GB checkpoint) cost seconds on this CPU
whatever the image size: the tests that train use base width 8, the same code at 1/256 of the parameters.
"""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import cluster.training
from anomaly_core.config import ConfigError, parse_config
from anomaly_core.data import CategorySplit, DatasetError, ImageTransform, load_split
from anomaly_core.data.synthetic import write_textures
from anomaly_core.registry import MODELS
from anomaly_core.training import (
    ModelFilesError,
    Trainer,
    TrainerCallbacks,
    load_images,
    load_model_files,
    predict_images,
)
from anomaly_core.training.anomaly_synthesis import (
    AnomalySynthesis,
    SynthesisSettings,
    gradient_noise,
    image_seeds,
    texture_files,
)
from anomaly_core.training.draem import Draem
from cluster.pipeline import CategoryJob
from cluster.training import build_model, fit_category, predict_category, trainer_config, transform_of
from jobs import predict as predict_job
from jobs.cli import load_config

from .conftest import TIRE_ROOT
from .test_training import one_thread  # noqa: F401  (autouse: one intra-op thread, as there)

SIZE = 32
WIDTH = 8  # the authors' 128 (discriminator 64) where a test checks their recipe's arithmetic, 8 where it trains


@pytest.fixture(scope="module")
def textures(tmp_path_factory):
    return write_textures(tmp_path_factory.mktemp("dtd"), per_texture=2, size=48)


@pytest.fixture(scope="module")
def tire_images():
    split = load_split("mvtec", TIRE_ROOT, "tire")
    return load_images(split.train[:4], ImageTransform(SIZE, SIZE, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)))


def draem_config(tmp_path, textures, **training):
    return parse_config({
        "name": "draem", "output_dir": str(tmp_path), "seed": 3,
        "datasets": [{"name": "tire_small", "format": "mvtec", "root": str(TIRE_ROOT)}],
        "preprocess": {"resize": 36, "crop": SIZE}, "wandb": {"mode": "off"},
        "training": {"model": "draem", "auxiliary": {"dtd": str(textures)}, "log_every_n_steps": 1,
                     "base_width": WIDTH, **training},
    }, "draem.yaml")


@pytest.mark.parametrize("synthesis", ["draem", "anomalib"])
def test_simulated_anomalies_are_seeded_and_blend_a_texture_inside_the_mask_only(synthesis, textures, tire_images):
    settings = SynthesisSettings(synthesis, probability=0.5, opacity=(0.2, 1.0), image_rotation=0.0)
    make = AnomalySynthesis(settings, sorted(textures.rglob("*.png")), seed=0)
    seeds = image_seeds(0, 0, 0, 0, 16)
    images = tire_images[torch.arange(16) % 4]
    anomalous, target, masks = make(images, seeds)
    again, _, again_masks = AnomalySynthesis(settings, sorted(textures.rglob("*.png")), seed=0)(images, seeds)
    assert torch.equal(anomalous, again) and torch.equal(masks, again_masks)  # the seeds alone decide
    assert torch.equal(target, images)  # no image rotation: the target is the normal image
    assert set(masks.unique().tolist()) == {0.0, 1.0}
    outside = (masks == 0).expand_as(images)
    assert torch.equal(anomalous[outside], images[outside])
    changed = (anomalous - images).abs().amax(dim=1, keepdim=True) > 1e-6
    assert changed.sum() > 0 and not (changed & (masks == 0)).any()
    with_anomaly = masks.flatten(1).amax(dim=1)
    assert 0 < with_anomaly.sum() < 16  # probability 0.5 over 16 images
    shifted, _, _ = make(images, image_seeds(0, 0, 1, 0, 16))  # the next step draws other anomalies
    assert not torch.equal(shifted, anomalous)
    # The authors' rotation of the normal image: the target is the rotated image (black corners), and always so at 1.
    rotating = AnomalySynthesis(SynthesisSettings(synthesis, 0.0, (0.2, 1.0), 1.0), sorted(textures.rglob("*.png")), 0)
    _, rotated, none = rotating(images[:2], seeds[:2])
    assert not torch.equal(rotated, images[:2]) and none.sum() == 0


def test_perlin_noise_is_the_authors_rand_perlin_2d_np():
    """perlin.py ``rand_perlin_2d_np`` transcribed with numpy for given gradient angles, at a power-of-two size
    (where anomalib's padding changes nothing); our noise is zero at lattice points, as gradient noise is."""
    angles = torch.rand(5, 9, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 * np.pi
    shape, res = (64, 64), (4, 8)
    delta, d = (res[0] / shape[0], res[1] / shape[1]), (shape[0] // res[0], shape[1] // res[1])
    grid = np.mgrid[0:res[0]:delta[0], 0:res[1]:delta[1]].transpose(1, 2, 0) % 1
    gradients = np.stack((np.cos(angles.numpy()), np.sin(angles.numpy())), axis=-1)

    def tile(s1, s2):
        return np.repeat(np.repeat(gradients[s1[0]:s1[1], s2[0]:s2[1]], d[0], axis=0), d[1], axis=1)

    def dot(grad, shift):
        return (np.stack((grid[..., 0] + shift[0], grid[..., 1] + shift[1]), axis=-1) * grad).sum(axis=-1)

    t = 6 * grid**5 - 15 * grid**4 + 10 * grid**3
    lerp = lambda x, y, w: (y - x) * w + x  # noqa: E731
    expected = np.sqrt(2) * lerp(lerp(dot(tile([0, -1], [0, -1]), [0, 0]), dot(tile([1, None], [0, -1]), [-1, 0]),
                                      t[..., 0]),
                                 lerp(dot(tile([0, -1], [1, None]), [0, -1]), dot(tile([1, None], [1, None]), [-1, -1]),
                                      t[..., 0]), t[..., 1])
    ours = gradient_noise(64, 64, angles).numpy()
    np.testing.assert_allclose(ours, expected, rtol=1e-12, atol=1e-12)
    assert np.abs(ours[::16, ::8]).max() < 1e-12 and np.abs(ours).max() > 0.3
    assert gradient_noise(48, 40, angles).shape == (48, 40)  # any size: computed on 64 x 64 and cropped


def test_bad_draem_values_are_one_line_errors_naming_the_key(tmp_path, textures):
    cases = {
        "training.opacity": {"opacity": [0.9, 0.1]},
        "training.score_pool": {"score_pool": 4},
        "training.milestones": {"milestones": [0.5, 1.5]},
        "training.synthesis": {"synthesis": "imgaug"},
        "training.anomaly_probability": {"anomaly_probability": 1.5},
        "training.image_rotation": {"image_rotation": -0.1},
        "training.loss_form": {"loss_form": "l1"},
        "training.discriminator_input": {"discriminator_input": "stacked"},
        "training.base_width": {"base_width": 1},
    }
    for key, values in cases.items():
        with pytest.raises(ConfigError, match=rf"(?m)^  {key}: "):
            draem_config(tmp_path, textures, **values)
    with pytest.raises(ConfigError, match=r"preprocess.crop: draem needs a multiple of 32, got 48"):
        parse_config({"datasets": [{"name": "t", "format": "mvtec", "root": "x"}], "preprocess": {"crop": 48},
                      "training": {"model": "draem", "auxiliary": {"dtd": str(textures)}}}, "draem.yaml")
    with pytest.raises(ConfigError, match=r"training.momentum applies to stfpm, not draem"):
        draem_config(tmp_path, textures, momentum=0.9)
    with pytest.raises(DatasetError, match=r"training.auxiliary.dtd: no images .* under"):
        texture_files(tmp_path)  # what the first training step lists
    (tmp_path / "empty").mkdir()
    config_file = tmp_path / "draem.yaml"
    config_file.write_text(json.dumps({"datasets": [{"name": "tire_small", "format": "mvtec", "root": str(TIRE_ROOT)}],
                                       "training": {"model": "draem", "auxiliary": {"dtd": str(tmp_path / "empty")}}}))
    with pytest.raises(ConfigError, match=r"draem.yaml: training.auxiliary.dtd: no images \(.*\) under .*empty$"):
        load_config(config_file, [], None)  # before any work, as jobs.train reads it


def test_three_steps_lower_the_loss_on_their_synthetic_batch(textures, tire_images):
    """Adam at the authors' rate on real tire images: the loss of the same batch with the same simulated anomalies
    (same epoch and step) falls step by step (measured at width 8: 1.001, 0.972, 0.943, then 0.911)."""
    values = {**MODELS["draem"].recipes["draem"].values, "crop": SIZE, "init_seed": 0, "base_width": WIDTH,
              "auxiliary": {"dtd": str(textures)}}
    model = Draem(Draem.settings_of(values)).train()
    optimizer, _ = model.configure_optimizers(epochs=1, steps_per_epoch=1)
    losses = []
    for _ in range(4):
        model.on_train_epoch_start(0)
        loss = model.training_step(tire_images)["loss"]
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert losses == sorted(losses, reverse=True) and losses[-1] < 0.95 * losses[0]


def test_draem_trains_resumes_and_predicts_through_the_cluster_functions(monkeypatch, tmp_path, textures):
    """fit_category writes model files without a backbone; predict_category and jobs.predict score the test images
    exactly as the model rebuilt from them; a run interrupted after epoch 0 and resumed ends on the same weights
    (the simulated anomalies are seeded by epoch and step); another crop is refused."""
    monkeypatch.setattr(cluster.training.ray, "get_gpu_ids", lambda: [])
    # PyTorch's default init: after 2 steps the authors' N(0, 0.02) weights still scale eval-mode activations down
    # through every layer (the running variances have barely moved), so every map would be the last bias alone.
    config = draem_config(tmp_path, textures, epochs=2, batch_size=2, init_normal=False)
    assert (config.training.recipe, config.training.score_pool, config.training.milestones) == ("draem", 21, (0.8, 0.9))
    split = load_split("mvtec", TIRE_ROOT, "tire")
    job = CategoryJob("tire_small", str(TIRE_ROOT), CategorySplit(split.dataset, split.category, split.train[:8],
                                                                   split.test[::10]))
    fit_category(config, job, str(tmp_path / "model"), None, threads=1)
    metadata = json.loads((tmp_path / "model" / "model.json").read_text())
    assert (metadata["kind"], metadata["backbone"], metadata["weights_sha256"], metadata["mean"], metadata["std"]) == \
        ("draem", None, None, [0.0] * 3, [1.0] * 3)
    assert metadata["auxiliary"] == {"dtd": str(textures)} and metadata["init_seed"] == 3
    steps = json.loads((tmp_path / "model" / "training.json").read_text())["steps"]
    assert len(steps) == 8 and {"loss/l2", "loss/ssim", "loss/focal"} <= set(steps[0])

    scored = predict_category(config, job, str(tmp_path / "model"), threads=1)
    rebuilt = load_model_files(tmp_path / "model", "")
    expected = predict_images(rebuilt, load_images(job.split.test, transform_of(config)))
    np.testing.assert_array_equal(scored.scores, expected.scores)
    np.testing.assert_array_equal(scored.maps, expected.maps)
    assert np.ptp(scored.scores) > 0 and scored.maps.shape[1:] == (SIZE, SIZE)

    images = load_images(job.split.train, transform_of(config))
    with pytest.raises(RuntimeError, match="interrupted"):
        Trainer(trainer_config(config, "cpu"), tmp_path / "crashed", TrainerCallbacks(on_epoch_end=_interrupt)).fit(
            build_model(config), images)
    resumed = build_model(config)
    Trainer(trainer_config(config, "cpu"), tmp_path / "resumed").fit(
        resumed, images, resume_from=tmp_path / "crashed" / "latest.safetensors")
    saved = load_file(str(tmp_path / "model" / "model.safetensors"))
    for name, value in resumed.trainable_state().items():
        assert torch.equal(value, saved[name]), name

    folder = tmp_path / "input"
    folder.mkdir()
    for sample in job.split.test[:2]:
        shutil.copy(sample.image_path, folder / f"{len(list(folder.iterdir()))}.png")
    assert predict_job.main(["--bank", str(tmp_path / "model"), "--input", str(folder), "--out", str(tmp_path / "out"),
                             "--threshold", "0.5", "--wandb", "off", "--device", "cpu"]) == 0
    written = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert [r["pred_score"] for r in written["predictions"]] == pytest.approx(expected.scores[:2].tolist(), rel=1e-6)
    with pytest.raises(ModelFilesError, match="crop: model has 32, inference uses 64"):
        load_model_files(tmp_path / "model", "", {"crop": 64})


def _interrupt(record: dict) -> None:
    if record["epoch"] == 0:
        raise RuntimeError("interrupted")


def test_the_recipes_differ_where_the_authors_and_anomalib_do(textures, tire_images, monkeypatch):
    """The same weights, the two recipes' inference: the discriminator input order is a permutation of its first
    layer's channels, so swapping those weights makes anomalib's order give the authors' maps (compared in train
    mode, where BatchNorm's batch statistics keep an untrained network's maps from being flat). The authors' score
    is the max of the 21 x 21 mean with zero padding counted, anomalib's the map's max: one hot pixel shows both."""
    recipes = MODELS["draem"].recipes
    base = {"crop": SIZE, "init_seed": 0, "base_width": WIDTH, "auxiliary": {"dtd": str(textures)}}
    authors = Draem(Draem.settings_of({**recipes["draem"].values, **base})).train()
    library = Draem(Draem.settings_of({**recipes["anomalib"].values, **base})).train()
    state = copy.deepcopy(authors.state_dict())
    first = "discriminative_subnetwork.encoder_segment.block1.0.weight"
    state[first] = torch.cat((state[first][:, 3:], state[first][:, :3]), dim=1)
    library.load_state_dict(state)
    ours, theirs = authors.predict(tire_images), library.predict(tire_images)
    assert ours["anomaly_map"].std() > 1e-3
    torch.testing.assert_close(theirs["anomaly_map"], ours["anomaly_map"], rtol=1e-5, atol=1e-6)

    logits = torch.zeros(1, 2, SIZE, SIZE)
    logits[0, 1, 0, 5] = 4.0  # p = 0.982 at (0, 5) near the border, 0.5 elsewhere
    for model in (authors, library):
        monkeypatch.setattr(model, "discriminate", lambda images: (images, logits))
    hot = torch.sigmoid(torch.tensor(4.0)).item()
    assert library.predict(tire_images[:1])["pred_score"].item() == pytest.approx(hot)
    # The window centred at (10, 10) holds the hot pixel and 21 x 21 - 1 others, none of them padding.
    assert authors.predict(tire_images[:1])["pred_score"].item() == pytest.approx((hot + 440 * 0.5) / 441, rel=1e-6)


def test_a_ranks_share_of_a_batch_gets_the_anomalies_one_process_gives_those_positions(monkeypatch, textures):
    """Rank 1 of 2 with images 2-3 of a global batch of 4 draws with the seeds of positions 2-3 of (epoch, step):
    the seeds one process uses for the same images, so DDP and one process synthesise alike."""
    import anomaly_core.training.draem as draem_module

    values = {**MODELS["draem"].recipes["draem"].values, "crop": SIZE, "init_seed": 5, "base_width": 2,
              "auxiliary": {"dtd": str(textures)}}
    model = Draem(Draem.settings_of(values))
    drawn = []

    def record(images, seeds):
        drawn.append(list(seeds))
        raise StopIteration

    monkeypatch.setattr(Draem, "synthesis", property(lambda self: record))
    for rank, world in ((0, 1), (1, 2)):
        monkeypatch.setattr(draem_module, "rank_and_world_size", lambda rank=rank, world=world: (rank, world))
        model.on_train_epoch_start(3)
        with pytest.raises(StopIteration):
            model.training_step(torch.zeros(4 // world, 3, SIZE, SIZE))
    assert drawn[1] == drawn[0][2:] == image_seeds(5, 3, 0, 2, 2)
    assert len(set(drawn[0])) == 4


def test_jobs_compare_names_draem_without_the_backbone_it_ignores():
    """DRAEM trains from scratch: a run's config still holds a backbone section, which its column must not claim."""
    from jobs.compare import method_of

    config = {"training": {"model": "draem"}, "backbone": {"name": "wide_resnet50_2"}}
    assert method_of({"job": "train", "config": config}) == "draem"
    assert method_of({"job": "train", "config": {**config, "training": {"model": "stfpm"}}}) == "stfpm (wide_resnet50_2)"
