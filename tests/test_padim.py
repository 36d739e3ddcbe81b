"""PaDiM's engine without Ray: its Gaussians and Mahalanobis maps against a direct numpy computation, their
independence of how images are grouped into shards, its files and their refusals, and its config errors."""

from __future__ import annotations

import json
import random
import re
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


# jobs.evaluate and jobs.predict with a PaDiM category folder, statistics fitted in this process.

def padim_raw(root) -> dict:
    """PaDiM on lite0's stride 4, 8 and 16 stages at 128 -> 112 (100 of 176 channels), tracking off."""
    return {"name": "padim-test", "datasets": [{"name": "tire_small", "format": "mvtec", "root": str(root)}],
            "backbone": {"name": "tf_efficientnet_lite0", "layers": ["blocks.1", "blocks.2", "blocks.4"],
                         "weights": "package"},
            "preprocess": {"resize": 128, "crop": 112}, "method": "padim", "cluster": {"batch_size": 4},
            "wandb": {"mode": "off"}}


def save_padim_folder(folder, extractor, train, test=()) -> tuple[typing.Any, typing.Any]:
    """Statistics of ``train`` saved as jobs.benchmark saves a category's (its record, its scoring), and the
    engine's predictions for ``test`` (PadimScoring's defaults), whose median score is the recorded threshold."""
    from anomaly_core.padim import PadimScoring

    record = {**extractor.describe(), "dataset": "tire_small", "category": "tire", "method": "padim",
              "scoring": {"blur_sigma": 4.0, "image_score": "map_max"}}
    statistics = fit_statistics([extractor.extract(train, range(len(train)))], 0.01, record)
    predictions = None
    if test:
        scorer = PadimScoring().scorer(statistics.scoring_payload(), "cpu")
        predictions = predict(scorer, extractor.extract(test, range(len(test))), extractor.settings.crop)
        median = float(np.median(predictions.scores))
        statistics.metadata["thresholds"] = {"image": median, "pixel": median}
    save_statistics(statistics, folder)
    return statistics, predictions


@pytest.fixture(scope="module")
def padim_folder(tire_root, tmp_path_factory):
    """A PaDiM folder from 6 training images and the engine's predictions of 4 test images (2 good, 2 not)."""
    from anomaly_core.data import load_split
    from anomaly_core.extraction import ExtractionSettings, PatchFeatureExtractor

    config = parse_config(padim_raw(tire_root), "test.yaml")
    extractor = PatchFeatureExtractor(ExtractionSettings.from_config(config))
    split = load_split("mvtec", tire_root, "tire")
    test = [split.test[i] for i in (0, 15, 16, 25)]
    assert sorted(sample.label for sample in test) == [0, 0, 1, 1]
    folder = tmp_path_factory.mktemp("padim") / "tire_small" / "tire"
    statistics, predictions = save_padim_folder(folder, extractor, split.train[:6], test)
    return folder, test, statistics, predictions


def test_predict_scores_a_padim_folder_as_the_engine_does_and_declares_it(padim_folder, tmp_path, monkeypatch):
    """jobs.predict with a PaDiM folder: the engine's scores and maps bit for bit (the extractor rebuilt with
    the recorded channel subset), labels at padim.json's threshold, and the folder declared as the bank
    artifact its files make."""
    from jobs.predict import main
    from jobs.tracking import BANK_ARTIFACT_TYPE, folder_artifact
    from tests.test_tracking import read_offline_run

    folder, test, statistics, expected = padim_folder
    inputs = tmp_path / "input"
    inputs.mkdir()
    for position, sample in enumerate(test):  # named so that their sorted order is the engine's
        (inputs / f"{position}.png").write_bytes(open(sample.image_path, "rb").read())
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_home"))
    out = tmp_path / "out"
    assert main(["--bank", str(folder), "--input", str(inputs), "--out", str(out), "--wandb", "offline"]) == 0
    payload = json.loads((out / "predictions.json").read_text())
    assert payload["bank"]["bank_sha256"] == statistics.sha256
    assert payload["thresholds"]["source"] == "padim.json" and payload["thresholds"]["image"] == float(
        np.median(expected.scores))
    records = payload["predictions"]
    assert [record["pred_score"] for record in records] == expected.scores.tolist()
    for record, amap in zip(records, expected.maps):
        assert np.array_equal(np.load(out / record["anomaly_map"]), amap)
    assert [record["pred_label"] for record in records] == [int(s >= np.median(expected.scores)) for s in expected.scores]
    assert sum(record["pred_label"] for record in records) == 2
    [used] = [artifact for artifact in read_offline_run(out)["artifacts"] if artifact.type == BANK_ARTIFACT_TYPE]
    artifact = folder_artifact(folder, "tire_small", "tire")
    artifact.finalize()
    assert (used.name, used.digest, used.use_after_commit) == ("bank-tire_small-tire", artifact.digest, True)


def test_a_padim_folder_of_other_extraction_settings_is_refused_in_one_line(padim_folder, tire_root, tmp_path,
                                                                            capsys):
    """jobs.evaluate refuses statistics built with another channel subset or other layers before any actor
    starts (preflight builds the model and checks its record), and a PatchCore config; jobs.predict refuses
    other backbone weights than the recorded ones."""
    from jobs.evaluate import main as evaluate
    from jobs.predict import main as predict_job

    folder, test, _, _ = padim_folder
    config = tmp_path / "padim.yaml"
    config.write_text(json.dumps(padim_raw(tire_root)))  # JSON is YAML
    common = ["--config", str(config), "--category", "tire", "--bank", str(folder), "--set", f"output_dir={tmp_path}"]
    for change, message in (
        ("padim.seed=7", rf"^error: memory bank {folder} does not match the inference configuration: padim: bank has "
                         r"\{'channel_indices': \[4, 123, .*\], 'channels': 100, 'seed': 1024\}, inference uses "
                         r"\{'channels': 100, 'seed': 7, 'channel_indices': \[82, 38, .*\]\}$"),
        ("backbone.layers=[blocks.1,blocks.2,blocks.6]", r"layers: bank has \['blocks.1', 'blocks.2', 'blocks.4'\], "
                                                         r"inference uses \['blocks.1', 'blocks.2', 'blocks.6'\]"),
        ("method=patchcore", rf"error: {folder} holds a padim memory \(padim.json\); this config's method is "
                             r"patchcore: evaluate it with a config of method: padim$"),
    ):
        assert evaluate([*common, "--set", change]) == 2
        error = capsys.readouterr().err.strip()
        assert len(error.splitlines()) == 1 and re.search(message, error), error
    assert not any(tmp_path.rglob("metrics.json"))
    assert predict_job(["--bank", str(folder), "--input", test[0].image_path, "--out", str(tmp_path / "p"),
                        "--weights", "random"]) == 2
    error = capsys.readouterr().err
    assert "does not match the inference configuration" in error and "weights_sha256" in error


def test_saved_memories_are_told_apart_by_their_files(padim_folder, tmp_path):
    """A PaDiM folder, or its padim.safetensors, loads as PaDiM's statistics with their recorded scoring; a folder
    holding neither kind's files is read as a bank, whose loader names the file that is missing."""
    from anomaly_core.bank import MemoryBank
    from anomaly_core.memories import load_memory, saved_memory
    from anomaly_core.padim import PadimStatistics

    folder, _, statistics, _ = padim_folder
    for path in (folder, folder / "padim.safetensors"):
        memory, loaded = load_memory(path)
        assert memory.method == "padim" and isinstance(loaded, PadimStatistics) and loaded.sha256 == statistics.sha256
        assert memory.scoring(loaded.metadata) == PadimScoring(blur_sigma=4.0, image_score="map_max")
    bank = MemoryBank(np.ones((3, 2), np.float32), {"scoring": {"k": 1}})
    bank.save(tmp_path / "bank")
    assert load_memory(tmp_path / "bank" / "bank.safetensors")[0].method == "patchcore"
    assert saved_memory(tmp_path).method == "patchcore"
    with pytest.raises(BankError, match=f"^memory bank file not found: {tmp_path}/bank.safetensors$"):
        load_memory(tmp_path)
