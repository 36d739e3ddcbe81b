"""FastFlow (anomaly_core/training/fastflow.py) on real tire images: the reference's computation, its recipes, its
seeded flows, and the cluster functions jobs.train and jobs.predict run.

Small crops (64 px), the real EfficientNet-Lite0 extractor from its weights package, a handful of images.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from FrEIA.framework import SequenceINN
from FrEIA.modules import AllInOneBlock
from torch import nn

import cluster.training
from anomaly_core.config import BackboneConfig, ConfigError, parse_config
from anomaly_core.data import CategorySplit, load_split
from anomaly_core.registry import MODELS
from anomaly_core.training import (
    Fastflow,
    ModelFilesError,
    Trainer,
    TrainerCallbacks,
    TrainerConfig,
    load_checkpoint,
    load_images,
    load_model_files,
    predict_images,
)
from cluster.pipeline import CategoryJob
from cluster.training import fit_category, predict_category
from jobs import predict as predict_job
from jobs.train import preflight

from .conftest import TIRE_ROOT
# Fixtures shared with the other trained models: one torch thread; 8 tire images at 64 px for the Lite0 teacher.
from .test_training import CROP, TEACHER, one_thread, train_images  # noqa: F401



def make_model(recipe: str = "fastflow", weights: str = "package", **settings) -> Fastflow:
    values = MODELS["fastflow"].recipes[recipe].values
    return Fastflow(Fastflow.settings_of({**values, "backbone": TEACHER, "crop": CROP, "init_seed": 0, **settings}),
                    weights)


@pytest.fixture(scope="module")
def split():
    return load_split("mvtec", TIRE_ROOT, "tire")


# --- gathierry/FastFlow fastflow.py (2cf1f2f), its CNN path transcribed: the subnet, the flow and FastFlow.forward.

def _reference_subnet(kernel_size, hidden_ratio):
    def subnet_conv(in_channels, out_channels):
        hidden_channels = int(in_channels * hidden_ratio)
        return nn.Sequential(nn.Conv2d(in_channels, hidden_channels, kernel_size, padding="same"), nn.ReLU(),
                             nn.Conv2d(hidden_channels, out_channels, kernel_size, padding="same"))
    return subnet_conv


def _reference_flow(input_chw, conv3x3_only, hidden_ratio, flow_steps, clamp=2.0):
    nodes = SequenceINN(*input_chw)
    for i in range(flow_steps):
        kernel_size = 1 if i % 2 == 1 and not conv3x3_only else 3
        nodes.append(AllInOneBlock, subnet_constructor=_reference_subnet(kernel_size, hidden_ratio),
                     affine_clamping=clamp, permute_soft=False)
    return nodes


def _reference_forward(feature_extractor, norms, nf_flows, x, training, input_size):
    features = [norms[i](feature) for i, feature in enumerate(feature_extractor(x))]
    loss = 0
    outputs = []
    for i, feature in enumerate(features):
        output, log_jac_dets = nf_flows[i](feature)
        loss += torch.mean(0.5 * torch.sum(output**2, dim=(1, 2, 3)) - log_jac_dets)
        outputs.append(output)
    ret = {"loss": loss}
    if not training:
        anomaly_map_list = []
        for output in outputs:
            log_prob = -torch.mean(output**2, dim=1, keepdim=True) * 0.5
            prob = torch.exp(log_prob)
            a_map = F.interpolate(-prob, size=[input_size, input_size], mode="bilinear", align_corners=False)
            anomaly_map_list.append(a_map)
        ret["anomaly_map"] = torch.mean(torch.stack(anomaly_map_list, dim=-1), dim=-1)
    return ret


@pytest.mark.parametrize("recipe", ["fastflow", "anomalib"])
def test_loss_and_map_are_the_references_on_the_same_weights(recipe, train_images):
    """Our norms and flows after one Adam step (every norm and coupling weight off its init) loaded into the
    transcribed reference (gathierry's, whose loss and map anomalib's loss.py and anomaly_map.py repeat): equal
    loss, equal maps to the last bit, scores their maxima; strict loading proves the same architecture. The subnet
    kernels: 3x3 throughout (fastflow, gathierry's resnet18.yaml) or 1x1 on odd steps (anomalib's default)."""
    model = make_model(recipe).train()
    optimizer, _ = model.configure_optimizers(epochs=1, steps_per_epoch=1)
    model.training_step(train_images[:4])["loss"].backward()
    optimizer.step()
    settings = model.settings
    norms = nn.ModuleList(nn.LayerNorm(list(norm.normalized_shape)) for norm in model.norms)
    flows = nn.ModuleList(_reference_flow(norm.normalized_shape, settings.conv3x3_only, settings.hidden_ratio,
                                          settings.flow_steps) for norm in model.norms)
    norms.load_state_dict(model.norms.state_dict())
    flows.load_state_dict(model.flows.state_dict())
    extractor = model.teacher.model
    batch = train_images[4:]
    with torch.no_grad():
        reference = _reference_forward(extractor, norms, flows, batch, training=False, input_size=CROP)
        ours = model.eval().predict(batch)
        loss = model.training_step(batch)["loss"]
    assert torch.equal(ours["anomaly_map"], reference["anomaly_map"][:, 0])
    assert torch.equal(ours["pred_score"], reference["anomaly_map"].amax(dim=(-2, -1))[:, 0])
    assert loss.item() == pytest.approx(reference["loss"].item(), rel=1e-6)
    assert (ours["anomaly_map"] <= 0).all() and (ours["anomaly_map"] >= -1).all()
    assert ours["anomaly_map"].std(dim=(1, 2)).min() > 0 and len(set(ours["pred_score"].tolist())) == len(batch)
    kernels = [block.subnet[0].kernel_size for block in model.flows[0]]
    assert kernels == ([(3, 3)] * 8 if recipe == "fastflow" else [(3, 3), (1, 1)] * 4)


def test_one_training_step_lowers_the_loss_and_moves_only_norms_and_couplings(train_images):
    """Adam at the recipe's 1e-3 on real tire features; the extractor and the flows' fixed permutations stay."""
    model = make_model().train()
    optimizer, scheduler = model.configure_optimizers(epochs=10, steps_per_epoch=2)
    assert scheduler is None and (optimizer.defaults["lr"], optimizer.defaults["weight_decay"]) == (1e-3, 1e-5)
    before_state = {name: value.clone() for name, value in model.state_dict().items()}
    batch = train_images[:4]
    before = model.training_step(batch)
    before["loss"].backward()
    optimizer.step()
    with torch.no_grad():
        after = model.training_step(batch)["loss"].item()
    assert sorted(before) == sorted(["loss", *(f"loss/{layer}" for layer in model.teacher.layers)])
    assert after < 0.97 * before["loss"].item(), f"loss {before['loss'].item():.1f} -> {after:.1f}"
    moved = {name for name, value in model.state_dict().items() if not torch.equal(value, before_state[name])}
    fixed = {name for name in before_state if name.startswith("teacher.") or name.endswith(("w_perm", "w_perm_inv"))}
    assert moved == set(before_state) - fixed
    assert not model.teacher.training


def test_the_flows_are_seeded_by_the_run_seed_and_leave_the_global_generators_alone():
    """FrEIA draws each block's channel permutation from numpy's global generator and the subnets from torch's:
    the same seed builds the same model on every rank and rebuild, another seed another one, and building a
    model draws nothing from the caller's generators. (Layers named: the default-layer probe is not ours.)"""
    layers = ("blocks.1", "blocks.2", "blocks.4")
    np.random.seed(3)
    torch.manual_seed(3)
    numpy_next, torch_next = np.random.get_state()[1].copy(), torch.get_rng_state().clone()
    first, again, other = make_model(layers=layers), make_model(layers=layers), make_model(layers=layers, init_seed=1)
    assert np.array_equal(np.random.get_state()[1], numpy_next) and torch.equal(torch.get_rng_state(), torch_next)
    state = first.trainable_state()
    assert all(torch.equal(value, again.trainable_state()[name]) for name, value in state.items())
    permutations = [name for name in state if name.endswith(".w_perm")]
    assert len(permutations) == 3 * 8
    assert any(not torch.equal(state[name], other.trainable_state()[name]) for name in permutations)
    block = first.flows[2][0]  # 112 channels: the coupling's subnet maps 56 channels to 2 x 56, hidden 56
    assert [block.subnet[0].in_channels, block.subnet[0].out_channels, block.subnet[2].out_channels] == [56, 56, 112]
    assert block.clamp == 2.0
    with pytest.raises(ValueError, match="hidden_ratio 0.01 leaves no hidden channels for a coupling of 12 input"):
        make_model(hidden_ratio=0.01)


def test_a_resumed_run_ends_on_the_uninterrupted_runs_weights(train_images, tmp_path):
    class Interrupted(Exception):
        pass

    def interrupt(record):
        if record["epoch"] == 0:
            raise Interrupted

    config = TrainerConfig(epochs=2, batch_size=4, seed=7, drop_last=True)
    full = make_model()
    Trainer(config, tmp_path / "full").fit(full, train_images[:6])
    with pytest.raises(Interrupted):
        Trainer(config, tmp_path / "crashed", TrainerCallbacks(on_epoch_end=interrupt)).fit(make_model(),
                                                                                              train_images[:6])
    assert load_checkpoint(tmp_path / "crashed" / "latest.safetensors").progress["next_epoch"] == 1
    resumed = make_model()
    result = Trainer(config, tmp_path / "crashed").fit(resumed, train_images[:6],
                                                       resume_from=tmp_path / "crashed" / "latest.safetensors")
    assert result.global_step == 2  # one batch of 4 per epoch: the short batch of 2 dropped (gathierry's drop_last)
    for name, value in full.trainable_state().items():
        assert torch.equal(resumed.trainable_state()[name], value), name


def fastflow_config(tmp_path, **training):
    return parse_config({
        "name": "ff", "output_dir": str(tmp_path),
        "datasets": [{"name": "tire_small", "format": "mvtec", "root": str(TIRE_ROOT)}],
        "backbone": {"name": TEACHER, "layers": [], "weights": "package"},
        "preprocess": {"resize": 72, "crop": CROP},
        "wandb": {"mode": "off"},
        "training": {"model": "fastflow", "epochs": 2, "batch_size": 4, "log_every_n_steps": 1, **training},
    }, "ff.yaml")


def test_trains_and_predicts_through_the_cluster_functions_and_jobs_predict(split, tmp_path, monkeypatch):
    """fit_category writes model files whose loss fell over 2 epochs; predict_category and jobs.predict rebuild
    the model from them (the flows from the file, not from a seed) and score the test images alike; model files
    refuse another crop and another extractor file."""
    monkeypatch.setattr(cluster.training.ray, "get_gpu_ids", lambda: [])  # a plain process: no Ray to ask
    config = fastflow_config(tmp_path, recipe="anomalib")
    assert (config.training.flow_steps, config.training.conv3x3_only, config.training.drop_last) == (8, False, False)
    job = CategoryJob("tire_small", str(TIRE_ROOT), CategorySplit(split.dataset, split.category, split.train[:8],
                                                                   split.test[::7]))
    folder = tmp_path / "model"
    fit_category(config, job, str(folder), None, threads=1)
    metadata = json.loads((folder / "model.json").read_text())
    assert metadata["kind"] == "fastflow" and metadata["training"]["recipe"]["name"] == "anomalib"
    assert (metadata["flow_steps"], metadata["conv3x3_only"], metadata["layers"]) == (
        8, False, ["blocks.1", "blocks.2", "blocks.4"])
    losses = [step["loss"] for step in json.loads((folder / "training.json").read_text())["steps"]]
    assert len(losses) == 4 and losses[-1] < losses[0]

    scored = predict_category(config, job, str(folder), threads=1)
    loaded = load_model_files(folder, "package", {"crop": CROP})
    transform = cluster.training.transform_of(config)
    expected = predict_images(loaded, load_images(job.split.test, transform))
    np.testing.assert_array_equal(scored.scores, expected.scores)
    assert np.ptp(scored.scores) > 0
    with pytest.raises(ModelFilesError, match="crop: model has 64, inference uses 96"):
        load_model_files(folder, "package", {"crop": 96})
    with pytest.raises(ModelFilesError, match="are not the ones"):
        load_model_files(folder, "random")

    inputs = tmp_path / "input"
    inputs.mkdir()
    for sample in job.split.test[:2]:
        (inputs / f"{sample.defect_type}.png").write_bytes(open(sample.image_path, "rb").read())
    out = tmp_path / "predicted"
    assert predict_job.main(["--bank", str(folder), "--input", str(inputs), "--out", str(out), "--threshold", "-0.5",
                             "--weights", "package", "--wandb", "off", "--device", "cpu"]) == 0
    written = {record["image_path"].rsplit("/", 1)[1]: record["pred_score"]
               for record in json.loads((out / "predictions.json").read_text())["predictions"]}
    assert [written[f"{s.defect_type}.png"] for s in job.split.test[:2]] == pytest.approx(
        expected.scores[:2].tolist(), rel=1e-5)


def test_bad_fastflow_keys_are_refused_naming_the_key(tmp_path):
    for key, value, message in (("flow_steps", 0, "training.flow_steps: Input should be greater than or equal to 1"),
                                ("hidden_ratio", 0, "training.hidden_ratio: Input should be greater than 0"),
                                ("conv3x3_only", "sometimes", "training.conv3x3_only: Input should be a valid boolean"),
                                ("recipe", "cait", "unknown recipe 'cait' for fastflow; choose fastflow .* or "
                                                   "fastflow_wrn50, anomalib")):
        with pytest.raises(ConfigError, match=message):
            fastflow_config(tmp_path, **{key: value})
    with pytest.raises(ConfigError, match="training.flow_steps applies to fastflow, not stfpm"):
        fastflow_config(tmp_path, model="stfpm", flow_steps=8)
    with pytest.raises(ConfigError, match="training.momentum applies to stfpm, not fastflow"):
        fastflow_config(tmp_path, momentum=0.9)
    wrn50 = fastflow_config(tmp_path, recipe="fastflow_wrn50").training
    assert (wrn50.conv3x3_only, wrn50.drop_last, wrn50.epochs) == (False, True, 2)
    # Refused by jobs.train's build on the driver, before Ray: a ratio that leaves a coupling no hidden channel, a ViT.
    with pytest.raises(ConfigError, match=r"training \(fastflow, teacher tf_efficientnet_lite0 \[\], weights "
                                          r"package\): hidden_ratio 0.01 leaves no hidden channels for a coupling of 12"):
        preflight(fastflow_config(tmp_path, hidden_ratio=0.01), [])
    vit = fastflow_config(tmp_path).model_copy(update={"backbone": BackboneConfig(
        name="vit_small_patch14_dinov2", layers=[], weights="random")})
    with pytest.raises(ConfigError, match="is a ViT: its maps share one stride, and RD/STFPM/FastFlow need a CNN"):
        preflight(vit, [])
