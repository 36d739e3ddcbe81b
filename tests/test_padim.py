"""PaDiM's engine without Ray: its Gaussians and Mahalanobis maps against a direct numpy computation, their
independence of how images are grouped into shards, its files and their refusals, and its config errors."""

from __future__ import annotations

import json
import random
import typing

import numpy as np
import pytest
import torch

from anomaly_core.bank import BankError, check_compatible
from anomaly_core.config import ConfigError, RunConfig, parse_config
from anomaly_core.features import PatchFeatures
from anomaly_core.padim import (
    GaussianMoments,
    MahalanobisScorer,
    PadimError,
    PadimScoring,
    channel_subset,
    fit_statistics,
    load_statistics,
    save_statistics,
)
from anomaly_core.patch_features import ConcatEmbedder
from anomaly_core.scoring import predict
from cluster.pipeline import MEMORY_METHODS


GRID = (3, 4)


def random_shards(seed: int = 0, n: int = 9, dim: int = 5, groups: tuple[int, ...] = (9,)) -> list[PatchFeatures]:
    """Embeddings far from zero with correlated channels (a one-pass covariance would lose digits in float32)."""
    rng = np.random.default_rng(seed)
    positions = GRID[0] * GRID[1]
    mixing = rng.normal(size=(dim, dim))
    embeddings = (rng.normal(size=(n, positions, dim)) @ mixing + 300.0).astype(np.float32)
    bounds = np.cumsum((0, *groups))
    return [PatchFeatures(embeddings[lo:hi], GRID, np.arange(lo, hi)) for lo, hi in zip(bounds, bounds[1:])]


def numpy_reference(embeddings: np.ndarray, epsilon: float) -> tuple[np.ndarray, np.ndarray]:
    """The authors' per-position ``np.cov(x, rowvar=False) + 0.01 * I`` and its float64 inverse."""
    x = embeddings.astype(np.float64)
    covariances = [np.cov(x[:, p, :], rowvar=False) + epsilon * np.eye(x.shape[2]) for p in range(x.shape[1])]
    return x.mean(axis=0), np.linalg.inv(np.stack(covariances))


def test_gaussians_and_mahalanobis_map_equal_a_direct_numpy_computation():
    shards = random_shards()
    train = np.concatenate([shard.embeddings for shard in shards])
    statistics = fit_statistics(shards, 0.01, {})
    mean, inverse = numpy_reference(train, 0.01)
    assert np.allclose(statistics.features, mean, rtol=1e-6, atol=0)
    assert np.allclose(statistics.inverse_covariance, inverse, rtol=2e-5, atol=1e-7 * np.abs(inverse).max())
    assert statistics.metadata["statistics_bytes"] == 12 * 5 * 5 * 4 + 12 * 5 * 4 == statistics.nbytes
    # Test images: normal ones and one far off in a single position.
    test = random_shards(seed=1, n=3)[0]
    test.embeddings[2, 7] += 40.0
    delta = test.embeddings.astype(np.float64) - mean
    expected = np.sqrt(np.einsum("npd,pde,npe->np", delta, inverse, delta))
    found = MahalanobisScorer(*statistics.scoring_payload(), params=PadimScoring()).distances(test.embeddings)
    assert np.allclose(found, expected, rtol=1e-4, atol=0)
    assert found[2].argmax() == 7 and found[2, 7] > 3 * np.delete(found[2], 7).max()
    predictions = predict(PadimScoring(blur_sigma=1.0).scorer(statistics.scoring_payload(), "cpu"), test, 16)
    # The image score is the blurred map's maximum (both references), not the largest patch distance.
    assert np.array_equal(predictions.scores, predictions.maps.reshape(3, -1).max(axis=1).astype(np.float64))
    assert predictions.scores[2] > 2 * predictions.scores[:2].max()


def test_statistics_do_not_depend_on_how_images_are_grouped_into_shards():
    whole = fit_statistics(random_shards(groups=(9,)), 0.01, {})
    for groups in ((1, 8), (4, 4, 1), (2, 3, 4)):
        parts = random_shards(groups=groups)
        assert fit_statistics(parts[::-1], 0.01, {}).sha256 == whole.sha256  # any order in, sorted by index
    moments = GaussianMoments()
    later, earlier = random_shards(groups=(4, 5))[::-1]
    moments.add(later)
    with pytest.raises(ValueError, match="sample-index order: image 0 after image 8"):
        moments.add(earlier)
    with pytest.raises(PadimError, match="at least 2 training images"):
        fit_statistics(random_shards(n=1, groups=(1,)), 0.01, {})


def test_channel_subset_is_the_authors_draw_and_out_of_range_is_refused():
    random.seed(1024)
    authors = random.sample(range(0, 448), 100)  # xiahaifeng1995 main.py, resnet18
    assert channel_subset(448, 100, 1024) == tuple(authors)
    assert channel_subset(448, 100, 1) != tuple(authors)
    with pytest.raises(PadimError, match="padim.channels=449 must be between 1 and 448"):
        channel_subset(448, 449, 1024)


def test_concat_embedder_upsamples_by_nearest_and_keeps_the_chosen_channels_in_order():
    shallow = torch.arange(2 * 2 * 4 * 4, dtype=torch.float32).reshape(2, 2, 4, 4)
    deep = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2) + 1000
    embeddings, grid = ConcatEmbedder((4, 0, 2))([shallow, deep])
    assert grid == (4, 4) and embeddings.shape == (2 * 16, 3)
    per_image = embeddings.reshape(2, 4, 4, 3)
    assert torch.equal(per_image[..., 1], shallow[:, 0])  # channel 0: the first layer's first
    assert torch.equal(per_image[1, 3, 2, 0], deep[1, 2, 1, 1])  # channel 4: the deep layer's third, nearest cell
    assert torch.equal(per_image[..., 2], deep[:, 0].repeat_interleave(2, 1).repeat_interleave(2, 2))


def test_saved_statistics_load_equal_and_damaged_or_mismatched_ones_are_refused(tmp_path):
    record = {"backbone": "resnet18", "grid": list(GRID), "padim": {"channels": 5, "seed": 1024,
                                                                   "channel_indices": [3, 1, 4, 0, 2]}}
    statistics = fit_statistics(random_shards(), 0.01, record)
    save_statistics(statistics, tmp_path)
    loaded = load_statistics(tmp_path)
    assert loaded.sha256 == statistics.sha256 == loaded.metadata["bank_sha256"]
    assert np.array_equal(loaded.inverse_covariance, statistics.inverse_covariance)
    check_compatible(loaded.metadata, {"backbone": "resnet18", "padim": record["padim"]}, "here")
    other = {**record["padim"], "channel_indices": [3, 1, 4, 2, 0]}
    with pytest.raises(BankError, match=r"padim: bank has .*channel_indices.*inference uses"):
        check_compatible(loaded.metadata, {"padim": other}, "here")
    with pytest.raises(BankError, match="padim: bank has None"):  # a PatchCore bank is no PaDiM model
        check_compatible({"backbone": "resnet18"}, {"padim": record["padim"]}, "here")
    tensors = tmp_path / "padim.safetensors"
    data = bytearray(tensors.read_bytes())
    data[-3] ^= 0xFF
    tensors.write_bytes(bytes(data))
    with pytest.raises(BankError, match="does not match the bank_sha256"):
        load_statistics(tmp_path)
    save_statistics(statistics, tmp_path)
    meta = json.loads((tmp_path / "padim.json").read_text())
    (tmp_path / "padim.json").write_text(json.dumps({**meta, "grid": [4, 4]}))
    with pytest.raises(BankError, match=r"grid \[4, 4\] and 5 channel indices do not describe the \[12, 5\]"):
        load_statistics(tmp_path)


BASE = {"datasets": [{"name": "d", "format": "mvtec", "root": "x"}]}


@pytest.mark.parametrize("section,message", [
    ({"method": "padim", "padim": {"channels": 0}}, "padim.channels: Input should be greater than or equal to 1"),
    ({"method": "padim", "padim": {"channels": 1.5}}, "padim.channels: Input should be a valid integer"),
    ({"method": "padim", "padim": {"epsilon": 0}}, "padim.epsilon: Input should be greater than 0"),
    ({"method": "padim", "padim": {"blur_sigma": -1}}, "padim.blur_sigma: Input should be greater than or equal to 0"),
    ({"method": "padim", "padim": {"chanels": 100}}, "padim.chanels: Extra inputs are not permitted"),
    ({"method": "padim_v2"}, "method: Input should be 'patchcore' or 'padim'"),
    ({"padim": {"channels": 550}}, "padim: settings apply to method: padim only"),
    ({"method": "padim", "ensemble": [{"name": "a"}, {"name": "b"}]}, "method padim does not combine with ensemble"),
    ({"method": "padim", "anomalydino": {"masking": False, "rotation": False}},
     "method padim does not combine with an anomalydino section"),
])
def test_bad_padim_settings_are_one_error_naming_the_key(section, message):
    with pytest.raises(ConfigError, match=message):
        parse_config({**BASE, **section}, "test.yaml")


def test_every_configurable_method_has_one_memory_method_entry():
    assert set(MEMORY_METHODS) == set(typing.get_args(RunConfig.model_fields["method"].annotation))


def test_too_many_channels_or_one_training_image_fail_in_preflight_before_any_work(tire_root):
    from anomaly_core.data import CategorySplit, load_split
    from cluster.pipeline import CategoryJob
    from jobs.preflight import check_k, check_model

    lite0 = {"name": "tf_efficientnet_lite0", "layers": ["blocks.1", "blocks.2", "blocks.4"], "weights": "package"}
    config = parse_config({**BASE, "backbone": lite0, "method": "padim", "padim": {"channels": 177},
                           "preprocess": {"resize": 64, "crop": 64}}, "test.yaml")
    with pytest.raises(ConfigError, match=r"^backbone \(tf_efficientnet_lite0, .*\): padim.channels=177 must be "
                                          r"between 1 and 176, the channels of the chosen layers together$"):
        check_model(config)
    split = load_split("mvtec", tire_root, "tire")
    job = CategoryJob("tire_small", str(tire_root), CategorySplit(split.dataset, split.category, split.train[:1], split.test))
    with pytest.raises(ConfigError, match="^method padim needs at least 2 training images per category; "
                                          "tire_small/tire has 1$"):
        check_k(config, [job], (16, 16), "backbone")
    check_k(config.model_copy(update={"method": "patchcore", "padim": RunConfig.model_fields["padim"].default}),
            [job], (16, 16), "backbone")  # PatchCore's bank of one image is fine


def test_a_padim_folder_is_a_memory_bank_artifact_of_its_own_files(tmp_path):
    from jobs.compare import method_of
    from jobs.tracking import folder_artifact

    save_statistics(fit_statistics(random_shards(), 0.01, {"backbone": "resnet18"}), tmp_path)
    artifact = folder_artifact(tmp_path, "tire_small", "tire")
    assert artifact.type == "memory-bank" and sorted(artifact.manifest.entries) == ["padim.json", "padim.safetensors"]
    assert artifact.metadata["backbone"] == "resnet18" and artifact.metadata["format"] == "anomaly-bench-padim/1"
    assert method_of({"config": {"method": "padim", "backbone": {"name": "resnet18"}}}) == "padim (resnet18)"
