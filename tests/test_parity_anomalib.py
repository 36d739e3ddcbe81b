"""benchmarks/parity_anomalib.py's own logic, without anomalib: the differences it reports, its mapping of our
Reverse Distillation names onto anomalib's, its reproduction of anomalib's blur, and a section run end to end
against a stubbed anomalib side whose outputs are ours with a known error planted in them."""

from __future__ import annotations

import copy
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from anomaly_core.registry import MODELS
from anomaly_core.training import Fastflow, Stfpm, StfpmSettings, predict_images

from .conftest import REPO, TIRE_ROOT
from .test_training import one_thread  # noqa: F401 (one torch thread: 2 on a loaded 2-core machine crawl)

sys.path.insert(0, str(REPO / "benchmarks"))
import parity_anomalib as parity  # noqa: E402


def test_difference_is_the_largest_gap_and_that_gap_over_anomalibs_largest_magnitude():
    assert parity.difference([1.0, 2.0, -4.0], [1.0, 2.5, -3.0]) == (1.0, pytest.approx(1 / 3))
    assert parity.difference(np.zeros((2, 2)), np.zeros((2, 2))) == (0.0, 0.0)
    assert parity.difference([1e-3], [0.0]) == (1e-3, float("inf"))  # a gap against all-zero output is not hidden
    with pytest.raises(ValueError, match="shapes differ"):
        parity.difference(np.zeros(4), np.zeros((4, 1)))
    with pytest.raises(ValueError, match="non-finite"):
        parity.difference([np.nan], [1.0])


def test_rd_names_map_the_ocbe_paths_and_decoder_and_leave_the_differing_stack_out():
    assert parity.anomalib_rd_name("bottleneck.paths.0.0.0.weight") == "bottleneck.conv1.weight"
    assert parity.anomalib_rd_name("bottleneck.paths.0.1.1.running_var") == "bottleneck.bn2.running_var"
    assert parity.anomalib_rd_name("bottleneck.paths.1.0.1.bias") == "bottleneck.bn3.bias"
    assert parity.anomalib_rd_name("decoder.stages.0.0.body.3.weight") == "decoder.layer1.0.conv2.weight"
    assert parity.anomalib_rd_name("decoder.stages.2.5.body.7.weight") == "decoder.layer3.5.bn3.weight"
    assert parity.anomalib_rd_name("decoder.stages.1.0.shortcut.1.bias") == "decoder.layer2.0.upsample.1.bias"
    assert parity.anomalib_rd_name("bottleneck.stack.0.body.0.weight") is None
    with pytest.raises(KeyError, match="teacher.model"):
        parity.anomalib_rd_name("teacher.model.conv1.weight")


def test_reproduced_anomalib_blur_is_scipys_mirror_mode_not_our_reflect_mode():
    """anomalib pads with torch's 'reflect' (the edge pixel not repeated) = scipy's 'mirror'; our maps use scipy's
    'reflect' (edge repeated). On a map with an edge peak the two differ, inside they agree."""
    maps = torch.zeros(1, 40, 40)
    maps[0, 0, 5], maps[0, 20, 20] = 1.0, 0.5
    reproduced = parity.torch_reflect_blur(maps, 4.0)[0].numpy()
    np.testing.assert_allclose(reproduced, gaussian_filter(maps[0].numpy(), 4.0, mode="mirror"), atol=1e-7)
    ours = gaussian_filter(maps[0].numpy(), 4.0, mode="reflect")
    assert np.abs(reproduced - ours).max() > 1e-3


def test_stfpm_section_reports_zero_against_itself_and_exactly_a_planted_error(tmp_path):
    """The section's whole path (weights file, student file, batch order, exchange, rows) with a stub for anomalib
    that answers with our own model's outputs, except one map pixel moved by 0.25 and the loss by 1e-3."""
    args = parity.parse_args(["--resize", "64", "--crop", "64", "--test-limit", "3", "--epochs", "0"])
    args.data = TIRE_ROOT
    seen = {}

    def stub(task: str, request: dict, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        seen.update(task=task, request=request, tensors=tensors)
        recipe = MODELS["stfpm"].recipes["anomalib"].values  # what the section gives our side
        model = Stfpm(StfpmSettings(backbone=request["backbone"], crop=64, init_seed=0, **{
            key: recipe[key] for key in ("lr", "momentum", "weight_decay", "loss", "zero_init_last")}),
            request["weights_file"])
        predictions = predict_images(model, tensors["test_images"])
        first = tensors["order/0"][0]
        loss = copy.deepcopy(model).train().training_step(tensors["train_images"][first[first >= 0]])["loss"]
        maps = torch.from_numpy(predictions.maps).clone()
        maps[1, 10, 20] += 0.25
        return {"pred_score": torch.from_numpy(predictions.scores), "anomaly_map": maps,
                "loss": loss.detach().reshape(1) + 1e-3}

    rows, _ = parity._stfpm_section(args, stub, tmp_path, "resnet18", "random", None)
    by_name = {r.quantity: r for r in rows}
    assert seen["task"] == "stfpm" and seen["request"]["layers"] == ["layer1", "layer2", "layer3"]
    assert seen["tensors"]["test_images"].shape == (3, 3, 64, 64) and seen["tensors"]["train_images"].shape[0] == 34
    assert by_name["image score"].max_abs == 0.0
    assert by_name["anomaly map"].max_abs == pytest.approx(0.25, abs=1e-6)
    assert by_name["training loss, first batch (train mode)"].max_abs == pytest.approx(1e-3, rel=1e-3)


def test_padim_section_reports_zero_against_itself_and_exactly_a_planted_error(tmp_path):
    """The PaDiM section's path (weights file, channel subset in the request, layouts of anomalib's [n, d, H, W]
    embeddings, [d, P] mean and [n, H, W] distances) with a stub answering our engine's own numbers in anomalib's
    layouts, except one distance moved by 0.5 and one map pixel by 0.25."""
    from anomaly_core.extraction import ExtractionSettings, PatchFeatureExtractor
    from anomaly_core.features import PatchFeatures
    from anomaly_core.padim import PadimScoring, fit_statistics
    from anomaly_core.scoring import predict

    args = parity.parse_args(["--resize", "64", "--crop", "64", "--test-limit", "3", "--sections", "padim"])
    args.data = TIRE_ROOT

    def stub(task: str, request: dict, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        assert task == "padim" and request["layers"] == ["layer1", "layer2", "layer3"]
        assert len(request["channel_indices"]) == 100 and max(request["channel_indices"]) < 448
        settings = ExtractionSettings("resnet18", tuple(request["layers"]), request["weights_file"], 64, 64,
                                      padim_subset=(100, 1024))
        extractor = PatchFeatureExtractor(settings)
        train, grid = extractor.embed_batch(tensors["train_images"])
        test, _ = extractor.embed_batch(tensors["test_images"])
        statistics = fit_statistics([PatchFeatures(train, grid, np.arange(len(train)))], 0.01, {})
        scorer = PadimScoring().scorer(statistics.scoring_payload(), "cpu")
        predictions = predict(scorer, PatchFeatures(test, grid, np.arange(len(test))), 64)
        distances = torch.from_numpy(scorer.distances(test)).reshape(len(test), *grid)
        distances[2, 3, 4] += 0.5
        maps = torch.from_numpy(predictions.maps).clone()
        maps[1, 10, 20] += 0.25
        n = len(test)
        return {"embeddings": torch.from_numpy(test).permute(0, 2, 1).reshape(n, 100, *grid),
                "mean": torch.from_numpy(statistics.features).T, "inverse_covariance":
                torch.from_numpy(statistics.inverse_covariance), "distances": distances,
                "pred_score": torch.from_numpy(predictions.scores), "anomaly_map": maps}

    rows, _ = parity.section_padim(args, stub, tmp_path, "resnet18", "random")
    by_name = {r.quantity.split(" (")[0]: r for r in rows}
    assert by_name["embedding"].max_abs == 0.0 and by_name["per-position mean"].max_abs == 0.0
    assert by_name["inverse covariance"].max_abs == 0.0 and by_name["image score"].max_abs == 0.0
    assert by_name["Mahalanobis distance per position"].max_abs == pytest.approx(0.5, rel=1e-5)
    assert by_name["anomaly map"].max_abs == pytest.approx(0.25, abs=1e-6)
def test_fastflow_section_hands_anomalib_our_flows_under_its_names_and_reports_a_planted_error(tmp_path):
    """The section's whole path with a stub for anomalib that rebuilds our model from the request alone (the
    extractor file, the flow file under anomalib's names mapped back, the flow settings) and answers with its
    outputs, one score moved by 1e-3: every other row is exactly zero, so the files carry the whole model."""
    args = parity.parse_args(["--resize", "64", "--crop", "64", "--test-limit", "3", "--epochs", "0"])
    args.data = TIRE_ROOT
    seen = {}

    def stub(task: str, request: dict, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        seen.update(task=task, request=request)
        flows = load_file(request["flow_file"])
        assert sorted({key.split(".")[0] for key in flows}) == ["fast_flow_blocks", "norms"]
        model = Fastflow(Fastflow.settings_of({**request, "lr": 1.0, "weight_decay": 0.0, "crop": 64,
                                               "init_seed": 1}), request["weights_file"])  # another seed's flows
        model.load_trainable_state({key.replace("fast_flow_blocks.", "flows."): value for key, value in flows.items()})
        predictions = predict_images(model, tensors["test_images"])
        first = tensors["order/0"][0]
        loss = copy.deepcopy(model).train().training_step(tensors["train_images"][first[first >= 0]])["loss"]
        scores = torch.from_numpy(predictions.scores).clone()
        scores[2] += 1e-3
        return {"pred_score": scores, "anomaly_map": torch.from_numpy(predictions.maps),
                "loss": loss.detach().reshape(1)}

    rows, _ = parity._fastflow_section(args, stub, tmp_path, "resnet18", "random", None)
    by_name = {r.quantity: r for r in rows}
    assert seen["task"] == "fastflow" and (seen["request"]["flow_steps"], seen["request"]["conv3x3_only"]) == (8, False)
    assert by_name["image score"].max_abs == pytest.approx(1e-3, rel=1e-3)
    assert by_name["anomaly map"].max_abs == 0.0 and by_name["training loss, first batch"].max_abs == 0.0
    with pytest.raises(KeyError, match="teacher.model"):
        parity.anomalib_fastflow_name("teacher.model.conv1.weight")
def test_efficient_ad_section_reports_zero_against_itself_and_exactly_a_planted_error(tmp_path, monkeypatch):
    """The section's path (weights file of teacher, student and autoencoder, raw [0, 1] images, the statistics it
    gives anomalib) with a stub that answers with our own model rebuilt from that file, except the teacher mean
    moved by 1e-3 and one map pixel by 0.25; a PDN 8 channels wide keeps it fast."""
    from anomaly_core.backbones import IMAGENET_MEAN, IMAGENET_STD
    from anomaly_core.training.efficient_ad import PDN_SIZES, EfficientAd, EfficientAdSettings, PdnSize

    monkeypatch.setitem(PDN_SIZES, "pdn_tiny", PdnSize((8, 8, 8), 8))
    args = parity.parse_args(["--efficient-ad-images", "2"])
    args.data = TIRE_ROOT
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    recipe = MODELS["efficient_ad"].recipes["anomalib"].values

    def stub(task: str, request: dict, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        assert task == "efficient_ad" and request["size"] == "tiny" and request["out_channels"] == 8
        weights = load_file(request["weights_file"])
        assert {key.split(".")[0] for key in weights} == {"teacher", "student", "ae"}
        settings = EfficientAdSettings(backbone="pdn_tiny", init_seed=1, auxiliary={"imagenette": str(tmp_path)}, **{
            key: recipe[key] for key in ("lr", "weight_decay", "max_steps", "decay_at", "decay_factor",
                                         "held_out_fraction", "map_normalisation")})
        model = EfficientAd(settings, "random").eval()  # another init: every weight must come from the file
        model.load_state_dict({**model.state_dict(), **weights})
        model.teacher_mean.copy_(tensors["given/mean"])
        model.teacher_std.copy_(tensors["given/std"])
        model.map_quantiles.copy_(tensors["given/quantiles"])
        result = model.predict((tensors["test_images"] - mean) / std)
        maps = result["anomaly_map"].clone()
        maps[1, 5, 7] += 0.25
        return {"teacher_mean": tensors["given/mean"] + 1e-3, "teacher_std": tensors["given/std"],
                "quantiles": tensors["given/quantiles"], "anomaly_map": maps, "pred_score": result["pred_score"],
                "losses": torch.zeros(3)}

    rows = {r.quantity: r for r in parity._efficient_ad_section(args, stub, tmp_path, "pdn_tiny")}
    assert rows["teacher channel mean (4 training images)"].max_abs == pytest.approx(1e-3, rel=1e-3)
    assert rows["teacher channel std"].max_abs == 0.0
    assert rows["anomaly map, recipe anomalib (quantiles given equal)"].max_abs == pytest.approx(0.25, abs=1e-5)
    assert rows["image score, recipe anomalib"].max_abs < 1e-6
    assert rows["loss terms st, ae, stae (same penalty and jittered image, dropout off)"].max_abs > 0.1
def _authors_draem_loss(target, reconstruction, mask, logits):
    """VitjanZ/DRAEM loss.py transcribed (``FocalLoss()`` on the softmax, ``ssim`` with val_range None and its
    zero-padded 11 x 11 window) with train_DRAEM.py's sum: the reference our ``loss_form="draem"`` must equal."""
    probabilities = torch.softmax(logits, dim=1)
    flat = probabilities.permute(0, 2, 3, 1).reshape(-1, 2)
    one_hot = torch.zeros(len(flat), 2).scatter_(1, mask.reshape(-1, 1).long(), 1).clamp(1e-5 / 1, 1.0 - 1e-5)
    pt = (one_hot * flat).sum(1) + 1e-5
    focal = (-1 * torch.ones(len(flat)) * torch.pow(1 - pt, 2) * pt.log()).mean()
    g = torch.tensor([np.exp(-(x - 5) ** 2 / (2 * 1.5**2)) for x in range(11)], dtype=torch.float32)
    g = (g / g.sum()).unsqueeze(1)
    window = g.mm(g.t()).expand(3, 1, 11, 11).contiguous()
    img1, img2 = reconstruction, target
    value_range = (255 if img1.max() > 128 else 1) - (-1 if img1.min() < -0.5 else 0)
    mu1, mu2 = (F.conv2d(x, window, padding=5, groups=3) for x in (img1, img2))
    s1 = F.conv2d(img1 * img1, window, padding=5, groups=3) - mu1.pow(2)
    s2 = F.conv2d(img2 * img2, window, padding=5, groups=3) - mu2.pow(2)
    s12 = F.conv2d(img1 * img2, window, padding=5, groups=3) - mu1 * mu2
    c1, c2 = (0.01 * value_range) ** 2, (0.03 * value_range) ** 2
    ssim = (((2 * mu1 * mu2 + c1) * (2.0 * s12 + c2)) / ((mu1.pow(2) + mu2.pow(2) + c1) * (s1 + s2 + c2))).mean()
    return torch.nn.MSELoss()(reconstruction, target) + (1.0 - ssim) + focal


@pytest.mark.parametrize("low", [0.0, -0.7])  # -0.7: the authors' ssim switches to a dynamic range of 2
def test_draem_loss_is_the_authors_loss_py(low):
    from anomaly_core.training.draem import draem_loss

    g = torch.Generator().manual_seed(0)
    target = torch.rand(2, 3, 32, 32, generator=g)
    reconstruction = low + (1 - low) * torch.rand(2, 3, 32, 32, generator=g)
    mask = (torch.rand(2, 1, 32, 32, generator=g) > 0.8).float()
    logits = 3 * torch.randn(2, 2, 32, 32, generator=g)
    ours = draem_loss(target, reconstruction, mask, logits, "draem")["loss"]
    torch.testing.assert_close(ours, _authors_draem_loss(target, reconstruction, mask, logits), rtol=1e-6, atol=1e-6)
    assert not torch.isclose(ours, draem_loss(target, reconstruction, mask, logits, "anomalib")["loss"])


def test_draem_section_reports_zero_against_itself_and_exactly_a_planted_error(tmp_path):
    """The DRAEM section's path (weights file, generated textures, synthetic batch, exchange, rows) with a stub for
    anomalib that answers with our own model (anomalib's recipe, the weights it was sent) and errors planted."""
    from safetensors.torch import load_file

    from anomaly_core.training.draem import Draem, draem_loss

    args = parity.parse_args(["--draem-size", "32", "--draem-width", "4", "--test-limit", "2", "--batch-size", "4"])
    args.data = TIRE_ROOT

    def stub(task: str, request: dict, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        assert task == "draem" and request["base_width"] == 4
        values = {**MODELS["draem"].recipes["anomalib"].values, "crop": 32, "init_seed": 99, "base_width": 4}
        model = Draem(Draem.settings_of(values)).eval()
        model.load_state_dict(load_file(request["weights_file"]))
        out = {"unfilled": torch.tensor(0)}
        with torch.no_grad():
            for name in ("test", "anomalous"):
                images = tensors[f"{name}_images"]
                predicted = model.predict(images)
                out[f"{name}/reconstruction"] = model.reconstructive_subnetwork(images)
                out[f"{name}/pred_score"], out[f"{name}/anomaly_map"] = predicted["pred_score"], predicted["anomaly_map"]
            reconstruction, logits = copy.deepcopy(model).train().discriminate(tensors["anomalous_images"])
            out["train/anomaly_map"] = torch.softmax(logits, dim=1)[:, 1]
            losses = draem_loss(tensors["target_images"], reconstruction, tensors["masks"], logits, "anomalib")
        out.update({key: value.reshape(1) for key, value in losses.items()})
        out["anomalous/anomaly_map"][1, 3, 4] += 0.25
        out["loss/ssim"] = out["loss/ssim"] + 1e-3
        return out

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a loaded 2-core machine OpenMP's threads make these small convolutions crawl
    try:
        rows = {r.quantity: r for r in parity._draem_section(args, stub, tmp_path)}
    finally:
        torch.set_num_threads(threads)
    assert rows["test: anomaly map"].max_abs == rows["test: image score"].max_abs == 0.0
    assert rows["synthetic batch: anomaly map"].max_abs == rows["synthetic batch: loss"].max_abs == 0.0
    assert rows["anomalous: anomaly map"].max_abs == pytest.approx(0.25, abs=1e-6)
    assert rows["synthetic batch: loss/ssim"].max_abs == pytest.approx(1e-3, rel=1e-3)
    assert rows["test: reconstruction"].section == "draem (32 px, random init, base width 4)"
