"""Bank files: exact round trip, refusal of mismatched settings, corrupt files, atomic writes."""

import json

import numpy as np
import pytest

from anomaly_core.bank import BankError, MemoryBank, check_compatible, load_bank, save_bank

SETTINGS = {"backbone": "tf_efficientnet_lite0", "layers": ["blocks.2", "blocks.4"], "weights_sha256": "ab" * 32,
            "resize": 256, "crop": 224, "mean": [0.5] * 3, "std": [0.5] * 3, "patch_size": 3, "pretrain_dim": 1024}


def _bank(tmp_path):
    features = np.random.default_rng(0).normal(size=(50, 8)).astype(np.float32)
    save_bank(MemoryBank(features, {**SETTINGS, "category": "tire"}), tmp_path)
    return features


def test_round_trip_is_bit_identical(tmp_path):
    features = _bank(tmp_path)
    loaded = load_bank(tmp_path)
    assert np.array_equal(loaded.features, features)
    assert loaded.metadata["memory_size"] == 50 and loaded.metadata["feature_dim"] == 8
    assert loaded.metadata["category"] == "tire"
    assert load_bank(tmp_path / "bank.safetensors").sha256 == loaded.sha256
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bank.json", "bank.safetensors"]  # no temp files


def test_mismatched_inference_settings_are_refused(tmp_path):
    _bank(tmp_path)
    metadata = load_bank(tmp_path).metadata
    check_compatible(metadata, {**SETTINGS, "feature_dim": 8}, str(tmp_path))
    with pytest.raises(BankError, match="crop: bank has 224, inference uses 256"):
        check_compatible(metadata, {**SETTINGS, "crop": 256}, str(tmp_path))
    with pytest.raises(BankError, match="backbone: bank has 'tf_efficientnet_lite0'"):
        check_compatible(metadata, {**SETTINGS, "backbone": "wide_resnet50_2"}, str(tmp_path))


def test_missing_and_tampered_files(tmp_path):
    with pytest.raises(BankError, match="memory bank file not found"):
        load_bank(tmp_path / "absent")
    _bank(tmp_path)
    meta = json.loads((tmp_path / "bank.json").read_text())
    meta["bank_sha256"] = "0" * 64
    (tmp_path / "bank.json").write_text(json.dumps(meta))
    with pytest.raises(BankError, match="does not match the bank_sha256"):
        load_bank(tmp_path)
    (tmp_path / "bank.safetensors").write_bytes(b"garbage")
    with pytest.raises(BankError, match="cannot read memory bank"):
        load_bank(tmp_path)
