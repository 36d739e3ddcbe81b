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
    "patch_stride",
    "pretrain_dim",
    "feature_dim",
    "fp16",
    "gpu_jpeg_decode",
    "anomalydino",  # AnomalyDINO's per-category masking and rotation (None: off)
    "padim",  # PaDiM's channel subset (None: PatchCore's embedding)
)
# What a bank that predates a key recorded implicitly (fp16 was always off, the patch stride 1, JPEGs decoded
# by PIL, no AnomalyDINO preprocessing, before each was recorded).
IMPLICIT_METADATA = {"fp16": False, "patch_stride": 1, "gpu_jpeg_decode": False, "anomalydino": None, "padim": None}


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

    def save(self, directory: Path) -> tuple[Path, Path]:
        """Write the memory's files into ``directory`` (a PaDiM statistics' own files: ``anomaly_core.padim``)."""
        return save_bank(self, directory)

    def scoring_payload(self) -> np.ndarray:
        """What an evaluation actor's scorer is built from (``ScoringParams.scorer``)."""
        return self.features


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (setting it races other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync(path: Path, flags: int) -> None:
    descriptor = os.open(path, flags)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder, so a crash never leaves half a file.

    ``mkstemp`` creates the file with mode 0600; it gets the mode a plain ``open`` would give (0666
    less the umask), so teammates and a W&B sync user on shared storage can read the outputs. The
    data is fsynced before the rename and the folder after it: a node that crashes right after a
    write leaves the old file or the new one, never an empty one that a later run would trust.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(temporary)
        os.chmod(temporary, 0o666 & ~_umask())
        _fsync(Path(temporary), os.O_RDONLY)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    _fsync(path.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))


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


def read_saved(tensors_path: Path, json_path: Path, what: str, fmt: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """A saved memory's JSON record, of format ``fmt``, and its tensors (``what``: a memory bank, PaDiM
    statistics); each file missing or unreadable is refused by name."""
    for required in (tensors_path, json_path):
        if not required.is_file():
            raise BankError(f"{what} file not found: {required}")
    try:
        metadata = json.loads(json_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BankError(f"{what} metadata {json_path} is not valid JSON: {error}") from error
    if not isinstance(metadata, dict):
        raise BankError(f"{what} metadata {json_path} must be a JSON object, got a {type(metadata).__name__}")
    if metadata.get("format") != fmt:
        raise BankError(f"{json_path}: format {metadata.get('format')!r} is not {fmt!r}")
    try:
        return metadata, load_file(str(tensors_path))
    except Exception as error:  # safetensors raises its own error types for corrupt headers
        raise BankError(f"cannot read {what} {tensors_path}: {error}") from error


def load_bank(path: Path) -> MemoryBank:
    """Load a bank from its folder or its ``.safetensors`` file (``bank.json`` must sit beside it)."""
    path = Path(path)
    tensors_path = path / "bank.safetensors" if path.is_dir() else path
    json_path = tensors_path.with_suffix(".json")
    metadata, tensors = read_saved(tensors_path, json_path, "memory bank", BANK_FORMAT)
    features = tensors.get(FEATURES_KEY)
    if features is None or features.ndim != 2 or features.dtype != np.float32:
        found = "no" if features is None else f"a {features.dtype} {list(features.shape)}"
        raise BankError(f"{tensors_path} must hold a float32 [M, D] tensor {FEATURES_KEY!r}; it holds {found} one")
    check_features(features, metadata, tensors_path, json_path)
    return MemoryBank(features=features, metadata=metadata)


def check_features(features: np.ndarray, metadata: dict[str, Any], tensors_path: Path, json_path: Path) -> None:
    """The recorded digest and shape must describe the tensor, and every value must be finite.

    The digest catches a truncated or bit-flipped file; the shape and finiteness checks catch a bank
    whose ``bank.json`` was edited (or rewritten with a fresh digest) to disagree with it: a NaN row
    would shift every score without an error, a wrong ``feature_dim`` would fail deep in the search.
    """
    if features_sha256(features) != metadata.get("bank_sha256"):
        raise BankError(f"{tensors_path} does not match the bank_sha256 recorded in {json_path} "
                        f"(the file is damaged, or not the bank this bank.json describes)")
    if len(features) == 0:
        raise BankError(f"{tensors_path} holds an empty memory bank (0 rows)")
    for key, actual in (("memory_size", features.shape[0]), ("feature_dim", features.shape[1])):
        if metadata.get(key) != actual:
            raise BankError(f"{json_path}: {key} is {metadata.get(key)!r} but {tensors_path} holds {actual}")
    bad = ~np.isfinite(features).all(axis=1)
    if bad.any():
        raise BankError(f"{tensors_path}: {int(bad.sum())} of {len(features)} bank rows hold NaN or infinite "
                        f"values (first: row {int(np.flatnonzero(bad)[0])})")


def check_compatible(metadata: dict[str, Any], expected: dict[str, Any], source: str) -> None:
    """Refuse a bank whose recorded extraction settings differ from the ones about to be used."""
    mismatches = []
    for key in COMPATIBILITY_KEYS:
        if key not in expected:
            continue
        recorded, wanted = metadata.get(key, IMPLICIT_METADATA.get(key)), expected[key]
        if _normalise(recorded) != _normalise(wanted):
            mismatches.append(f"{key}: bank has {recorded!r}, inference uses {wanted!r}")
    if mismatches:
        raise BankError(f"memory bank {source} does not match the inference configuration: " + "; ".join(mismatches))


def _normalise(value: Any) -> Any:
    """Tuples and lists compare equal (JSON has no tuples)."""
    if isinstance(value, (list, tuple)):
        return [_normalise(item) for item in value]
    return value
