"""jobs.predict on tire images with a real (small) bank: outputs, labels at the threshold, refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from anomaly_core.bank import load_bank, save_bank, write_json
from anomaly_core.data import load_split
from anomaly_core.extraction import ExtractionSettings, PatchFeatureExtractor
from anomaly_core.patchcore import build_bank
from anomaly_core.scoring import NearestNeighbourScorer, ScoringParams, predict
from jobs.predict import main

SETTINGS = ExtractionSettings("tf_efficientnet_lite0", ("blocks.2", "blocks.4"), "package", pretrain_dim=256,
                              target_dim=256)


@pytest.fixture(scope="module")
def split(tire_root):
    return load_split("mvtec", tire_root, "tire")


@pytest.fixture(scope="module")
def bank_dir(split, tmp_path_factory):
    """A bank from 6 train images whose image threshold splits a few test images' scores."""
    extractor = PatchFeatureExtractor(SETTINGS)
    features = extractor.extract(split.train[:6], range(6))
    bank = build_bank(features, "approximate", 0.1, 128, seed=0,
                      metadata={**extractor.describe(), "weights": "package", "dataset": "mvtec", "category": "tire"})
    scorer = NearestNeighbourScorer(bank.features, ScoringParams())
    test = [split.test[i] for i in (0, 5, 10, 25)]
    scores = predict(scorer, extractor.extract(test, range(len(test))), SETTINGS.crop).scores
    bank.metadata["thresholds"] = {"image": float(np.median(scores)), "pixel": float(np.median(scores))}
    folder = tmp_path_factory.mktemp("bank")
    save_bank(bank, folder)
    return folder


@pytest.fixture
def inputs(split, tmp_path):
    """Two anomalous and two normal test images, in subfolders named by defect type."""
    folder = tmp_path / "input"
    for sample in [split.test[i] for i in (0, 5, 25, 26)]:
        target = folder / sample.defect_type / (sample.defect_type + "_" + sample.image_path.rsplit("/", 1)[1])
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(open(sample.image_path, "rb").read())
    return folder


def test_predict_writes_json_maps_masks_and_overlays(bank_dir, inputs, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["--bank", str(bank_dir), "--input", str(inputs), "--out", str(out), "--wandb", "off"]) == 0
    payload = json.loads((out / "predictions.json").read_text())
    thresholds = load_bank(bank_dir).metadata["thresholds"]
    assert payload["thresholds"]["image"] == thresholds["image"] and payload["thresholds"]["source"] == "bank.json"
    records = payload["predictions"]
    assert len(records) == 4
    assert sorted(record["image_path"] for record in records) == sorted(str(p) for p in inputs.rglob("*.png"))
    labels = [record["pred_label"] for record in records]
    assert labels == [int(record["pred_score"] >= thresholds["image"]) for record in records]
    assert 0 < sum(labels) < 4, "the median threshold must split the images"
    for record in records:
        amap = np.load(out / record["anomaly_map"])
        assert amap.shape == (224, 224) and amap.dtype == np.float32
        assert record["pred_score"] > 0 and amap.max() <= record["pred_score"] + 1e-4  # blur never exceeds the max patch
        with Image.open(out / record["pred_mask"]) as mask:
            mask_pixels = np.asarray(mask)
        assert mask.size == (224, 224) and set(np.unique(mask_pixels)) <= {0, 255}
        assert np.array_equal(mask_pixels == 255, amap >= thresholds["pixel"])
        with Image.open(out / record["overlay"]) as overlay:
            assert overlay.size == (448, 224) and overlay.mode == "RGB"
    assert not (out / "wandb").exists()
    assert "4 images" in capsys.readouterr().out


def test_threshold_flag_overrides_the_bank(bank_dir, split, tmp_path):
    out = tmp_path / "out"
    image = split.test[0].image_path
    assert main(["--bank", str(bank_dir / "bank.safetensors"), "--input", image, "--out", str(out),
                 "--threshold", "1e9"]) == 0
    payload = json.loads((out / "predictions.json").read_text())
    assert payload["thresholds"] == {"image": 1e9, "pixel": 1e9, "source": "--threshold"}
    [record] = payload["predictions"]
    assert record["pred_label"] == 0 and record["overlay"] == "overlays/000.png"
    assert not np.asarray(Image.open(out / record["pred_mask"])).any()


def _edit_metadata(bank_dir, folder, **changes):
    """A copy of the bank with bank.json keys changed (None removes one); bank_sha256 stays valid."""
    folder.mkdir()
    (folder / "bank.safetensors").write_bytes((bank_dir / "bank.safetensors").read_bytes())
    metadata = json.loads((bank_dir / "bank.json").read_text())
    for key, value in changes.items():
        if value is None:
            metadata.pop(key)
        else:
            metadata[key] = value
    write_json(folder / "bank.json", metadata)
    return folder


def test_bank_whose_metadata_does_not_fit_is_refused(bank_dir, split, tmp_path, capsys):
    edited = _edit_metadata(bank_dir, tmp_path / "edited", crop=256)
    out = tmp_path / "out"
    assert main(["--bank", str(edited), "--input", split.test[0].image_path, "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert "28x28 patch grid" in error and "crop 256" in error and "gives 32x32" in error
    assert not (out / "predictions.json").exists()


def test_other_weights_than_the_banks_are_refused(bank_dir, split, tmp_path, capsys):
    assert main(["--bank", str(bank_dir), "--input", split.test[0].image_path, "--out", str(tmp_path / "out"),
                 "--weights", "random"]) == 2
    error = capsys.readouterr().err
    assert "does not match the inference configuration" in error and "weights_sha256" in error


def test_missing_threshold_and_weights_ask_for_the_flag(bank_dir, split, tmp_path, capsys):
    no_thresholds = _edit_metadata(bank_dir, tmp_path / "no-thresholds", thresholds=None)
    assert main(["--bank", str(no_thresholds), "--input", split.test[0].image_path, "--out", str(tmp_path / "a")]) == 2
    assert "pass --threshold" in capsys.readouterr().err
    no_weights = _edit_metadata(bank_dir, tmp_path / "no-weights", weights=None)
    assert main(["--bank", str(no_weights), "--input", split.test[0].image_path, "--out", str(tmp_path / "b")]) == 2
    assert "pass --weights" in capsys.readouterr().err
    assert main(["--bank", str(no_weights), "--input", split.test[0].image_path, "--out", str(tmp_path / "c"),
                 "--weights", "package"]) == 0


def test_wandb_bank_reference_needs_online_tracking(split, tmp_path, capsys):
    assert main(["--bank", "wandb:me/proj/bank-mvtec-tire:latest", "--input", split.test[0].image_path,
                 "--out", str(tmp_path / "out"), "--wandb", "off"]) == 2
    assert "needs an online W&B run" in capsys.readouterr().err


def test_nan_or_text_thresholds_are_refused(bank_dir, split, tmp_path, capsys):
    image = split.test[0].image_path
    with pytest.raises(SystemExit) as exited:
        main(["--bank", str(bank_dir), "--input", image, "--threshold", "nan"])
    assert exited.value.code == 2 and "'nan' is not a finite number" in capsys.readouterr().err
    texty = _edit_metadata(bank_dir, tmp_path / "texty", thresholds={"image": "high", "pixel": 1.0})
    out = tmp_path / "out"
    assert main(["--bank", str(texty), "--input", image, "--out", str(out)]) == 2
    assert "thresholds.image is 'high', not a finite number" in capsys.readouterr().err
    assert not out.exists() or not any(out.rglob("*.*"))


def test_unreadable_input_or_output_fails_before_any_output(bank_dir, inputs, tmp_path, capsys):
    fake = inputs / "zz notes.png"
    fake.write_text("not an image")
    out = tmp_path / "out"
    assert main(["--bank", str(bank_dir), "--input", str(inputs), "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert f"cannot read image file {fake}" in error and "Traceback" not in error
    assert not out.exists() or not any(out.rglob("*.*"))
    fake.unlink()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["--bank", str(bank_dir), "--input", str(inputs), "--out", str(blocker / "out")]) == 2
    assert "--out: cannot write to" in capsys.readouterr().err


def test_names_with_spaces_and_non_ascii(bank_dir, split, tmp_path):
    folder = tmp_path / "eingang ü"
    folder.mkdir()
    (folder / "bild 1 é.png").write_bytes(open(split.test[0].image_path, "rb").read())
    out = tmp_path / "aus gabe"
    assert main(["--bank", str(bank_dir), "--input", str(folder), "--out", str(out)]) == 0
    record = json.loads((out / "predictions.json").read_text())["predictions"][0]
    assert record["image_path"] == str(folder / "bild 1 é.png") and (out / record["overlay"]).is_file()


def test_tracked_prediction_declares_the_bank_it_used(bank_dir, split, tmp_path, monkeypatch):
    """With --wandb offline the run is named for the bank and input, and declares the bank as the version its
    files make (the one jobs.build_bank logged) and the weights by sha256."""
    from jobs.tracking import BANK_ARTIFACT_TYPE, WEIGHTS_ARTIFACT_TYPE, folder_artifact
    from tests.test_tracking import read_offline_run

    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_home"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "out"
    image = split.test[0].image_path
    assert main(["--bank", str(bank_dir), "--input", image, "--out", str(out), "--wandb", "offline"]) == 0
    recorded = read_offline_run(out)
    assert recorded["run"].display_name == f"predict {bank_dir.name} {image.rsplit('/', 1)[1]}"
    [bank] = [artifact for artifact in recorded["artifacts"] if artifact.type == BANK_ARTIFACT_TYPE]
    expected = folder_artifact(bank_dir, "mvtec", "tire")
    expected.finalize()
    assert (bank.name, bank.digest, bank.use_after_commit) == ("bank-mvtec-tire", expected.digest, True)
    [weights] = [artifact for artifact in recorded["artifacts"] if artifact.type == WEIGHTS_ARTIFACT_TYPE]
    assert json.loads(weights.metadata)["sha256"] == load_bank(bank_dir).metadata["weights_sha256"]
    assert recorded["summary"]["images"] == 1
