"""Bank files: exact round trip, refusal of mismatched settings, corrupt files, atomic writes."""

import json
import os
import stat

import numpy as np
import pytest
from safetensors.numpy import save_file

from anomaly_core.bank import BankError, MemoryBank, check_compatible, features_sha256, load_bank, save_bank, write_json

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


def _tamper(tmp_path, features=None, **metadata_changes):
    """Rewrite the bank as an editor would: new tensor and/or bank.json keys, with a fresh valid digest."""
    features = _bank(tmp_path) if features is None else features
    save_file({"features": features}, str(tmp_path / "bank.safetensors"))
    meta = json.loads((tmp_path / "bank.json").read_text())
    meta.update(bank_sha256=features_sha256(features), **metadata_changes)
    (tmp_path / "bank.json").write_text(json.dumps(meta))


def test_truncated_and_bit_flipped_banks(tmp_path):
    _bank(tmp_path)
    data = (tmp_path / "bank.safetensors").read_bytes()
    (tmp_path / "bank.safetensors").write_bytes(data[: len(data) - 40])
    with pytest.raises(BankError, match="cannot read memory bank"):
        load_bank(tmp_path)
    flipped = bytearray(data)
    flipped[-7] ^= 0x10
    (tmp_path / "bank.safetensors").write_bytes(bytes(flipped))
    with pytest.raises(BankError, match="does not match the bank_sha256 .* damaged"):
        load_bank(tmp_path)


def test_nan_rows_empty_banks_and_edited_shapes_are_refused(tmp_path):
    features = _bank(tmp_path)
    features[[3, 7]] = np.nan
    _tamper(tmp_path, features)
    with pytest.raises(BankError, match="2 of 50 bank rows hold NaN or infinite values \\(first: row 3\\)"):
        load_bank(tmp_path)
    _tamper(tmp_path, np.zeros((0, 8), np.float32), memory_size=0)
    with pytest.raises(BankError, match="empty memory bank"):
        load_bank(tmp_path)
    _tamper(tmp_path, feature_dim=1024)
    with pytest.raises(BankError, match="feature_dim is 1024 but .* holds 8"):
        load_bank(tmp_path)
    _tamper(tmp_path, np.zeros((4, 8), np.float64).astype(np.float16), memory_size=4)
    with pytest.raises(BankError, match="must hold a float32"):
        load_bank(tmp_path)


def test_bank_json_that_is_not_an_object_or_missing(tmp_path):
    _bank(tmp_path)
    (tmp_path / "bank.json").write_text("[1, 2]")
    with pytest.raises(BankError, match="must be a JSON object, got a list"):
        load_bank(tmp_path)
    (tmp_path / "bank.json").unlink()
    with pytest.raises(BankError, match="memory bank file not found: .*bank.json"):
        load_bank(tmp_path)


def test_fp16_banks_and_fp32_inference_do_not_mix(tmp_path):
    _bank(tmp_path)
    metadata = load_bank(tmp_path).metadata
    check_compatible(metadata, {**SETTINGS, "fp16": False}, "old bank")  # a bank without the key was fp32
    with pytest.raises(BankError, match="fp16: bank has False, inference uses True"):
        check_compatible(metadata, {**SETTINGS, "fp16": True}, "old bank")


def test_outputs_get_the_umask_mode_and_leave_no_temporary_files(tmp_path):
    previous = os.umask(0o022)
    try:
        _bank(tmp_path / "shared")
        write_json(tmp_path / "shared" / "metrics.json", {"a": 1})
    finally:
        os.umask(previous)
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in (tmp_path / "shared").iterdir()}
    assert modes == {"bank.safetensors": 0o644, "bank.json": 0o644, "metrics.json": 0o644}
