"""Memory-bank files: features in safetensors, provenance in JSON, and a refusal of mismatched use.

A bank only means something together with the exact preprocessing and backbone that produced it,
so the metadata records them and ``check_compatible`` refuses to score with anything else (a bank
built at 224 px scored at 256 px gives plausible-looking but wrong numbers).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

BANK_FORMAT = "anomaly-bench-bank/1"
FEATURES_KEY = "features"

# Keys of the metadata that must equal the inference configuration's for a bank to be usable.
COMPATIBILITY_KEYS = (
    "backbone",
    "layers",
    "weights_sha256",
    "resize",
    "crop",
    "mean",
    "std",
    "patch_size",
    "pretrain_dim",
    "feature_dim",
)


class BankError(ValueError):
    """A bank file is missing, corrupt, or does not fit the configuration it is used with."""


def features_sha256(features: np.ndarray) -> str:
    """Digest of the bank's values and shape: equal digests mean bit-identical banks."""
    array = np.ascontiguousarray(features, dtype=np.float32)
    digest = hashlib.sha256(repr(array.shape).encode())
    digest.update(array.tobytes())
    return digest.hexdigest()


@dataclass
class MemoryBank:
    features: np.ndarray  # [M, D] float32
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def sha256(self) -> str:
        return features_sha256(self.features)


def atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder, so a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_json(path: Path, payload: Any) -> None:
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n"))


def save_bank(bank: MemoryBank, directory: Path) -> tuple[Path, Path]:
    """Write ``bank.safetensors`` and ``bank.json`` into ``directory``; returns both paths."""
    directory = Path(directory)
    features = np.ascontiguousarray(bank.features, dtype=np.float32)
    metadata = {**bank.metadata, "format": BANK_FORMAT, "memory_size": int(features.shape[0]),
                "feature_dim": int(features.shape[1]), "bank_sha256": features_sha256(features)}
    tensors_path, json_path = directory / "bank.safetensors", directory / "bank.json"
    atomic_write(tensors_path, lambda tmp: save_file({FEATURES_KEY: features}, tmp, metadata={"format": BANK_FORMAT}))
    write_json(json_path, metadata)
    bank.metadata = metadata
    return tensors_path, json_path


def load_bank(path: Path) -> MemoryBank:
    """Load a bank from its folder or its ``.safetensors`` file (``bank.json`` must sit beside it)."""
    path = Path(path)
    tensors_path = path / "bank.safetensors" if path.is_dir() else path
    json_path = tensors_path.with_suffix(".json")
    for required in (tensors_path, json_path):
        if not required.is_file():
            raise BankError(f"memory bank file not found: {required}")
    try:
        metadata = json.loads(json_path.read_text())
    except json.JSONDecodeError as error:
        raise BankError(f"bank metadata {json_path} is not valid JSON: {error}") from error
    try:
        features = load_file(str(tensors_path))[FEATURES_KEY]
    except Exception as error:  # safetensors raises its own error types for corrupt headers
        raise BankError(f"cannot read memory bank {tensors_path}: {error}") from error
    if metadata.get("format") != BANK_FORMAT:
        raise BankError(f"{json_path}: format {metadata.get('format')!r} is not {BANK_FORMAT!r}")
    if features_sha256(features) != metadata.get("bank_sha256"):
        raise BankError(f"{tensors_path} does not match the bank_sha256 recorded in {json_path}")
    return MemoryBank(features=features, metadata=metadata)


def check_compatible(metadata: dict[str, Any], expected: dict[str, Any], source: str) -> None:
    """Refuse a bank whose recorded extraction settings differ from the ones about to be used."""
    mismatches = []
    for key in COMPATIBILITY_KEYS:
        if key not in expected:
            continue
        recorded, wanted = metadata.get(key), expected[key]
        if _normalise(recorded) != _normalise(wanted):
            mismatches.append(f"{key}: bank has {recorded!r}, inference uses {wanted!r}")
    if mismatches:
        raise BankError(f"memory bank {source} does not match the inference configuration: " + "; ".join(mismatches))


def _normalise(value: Any) -> Any:
    """Tuples and lists compare equal (JSON has no tuples)."""
    if isinstance(value, (list, tuple)):
        return [_normalise(item) for item in value]
    return value
