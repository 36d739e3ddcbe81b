"""Trained models for inference: ``model.safetensors`` (trainable weights) + ``model.json`` (what they mean).

Like a memory bank, a trained model only means something with the exact teacher weights and preprocessing
it was trained with, so ``model.json`` records them and loading refuses any other (a model trained at
224 px and run at 256 px gives plausible-looking but wrong maps). The teacher's weights are not copied:
they are rebuilt from the caller's weights file, whose sha256 must be the recorded one. The tensors file's
digest is recorded too, so a ``model.json`` beside another model's tensors is refused, not trusted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from anomaly_core.backbones import file_sha256
from anomaly_core.bank import atomic_write, write_json
from anomaly_core.registry import MODELS
from anomaly_core.training.model import TrainableModel

MODEL_FORMAT = "anomaly-bench-trained-model/2"  # 2: recipes (every training value recorded)
TENSORS_FILE, METADATA_FILE = "model.safetensors", "model.json"
# Keys the caller's inference configuration is compared on (bank.json's names where they exist).
COMPATIBILITY_KEYS = ("kind", "backbone", "layers", "weights_sha256", "resize", "crop", "mean", "std")


class ModelFilesError(ValueError):
    """Model files are missing, damaged, or do not fit the configuration they are used with."""


def save_model_files(
    model: TrainableModel, directory: Path, resize: int, training: dict[str, Any]
) -> tuple[Path, Path]:
    """Write ``model.safetensors`` and ``model.json`` into ``directory``; returns both paths.

    ``resize`` is the transform's shorter-side size (the crop is the model's own); ``training`` summarises
    the run, e.g. ``FitResult.summary()`` (epochs, best metric, ``weights_epoch``: the epoch the weights are
    from) and the recipe that set its values.
    """
    directory = Path(directory)
    tensors_path, json_path = directory / TENSORS_FILE, directory / METADATA_FILE
    state = {name: value.detach().cpu().contiguous().clone() for name, value in model.trainable_state().items()}
    atomic_write(tensors_path, lambda tmp: save_file(state, tmp, metadata={"format": MODEL_FORMAT}))
    metadata = {**model.describe(), "format": MODEL_FORMAT, "resize": resize, "training": training,
                "tensors_sha256": file_sha256(tensors_path)}
    write_json(json_path, metadata)
    return tensors_path, json_path


def read_model_metadata(directory: Path) -> dict[str, Any]:
    """``model.json`` of a model folder, checked to be one: for refusing a mismatch before building anything."""
    json_path = Path(directory) / METADATA_FILE
    if not json_path.is_file():
        raise ModelFilesError(f"model file not found: {json_path}")
    try:
        metadata = json.loads(json_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelFilesError(f"model metadata {json_path} is not valid JSON: {error}") from error
    if not isinstance(metadata, dict) or metadata.get("format") != MODEL_FORMAT:
        found = metadata.get("format") if isinstance(metadata, dict) else type(metadata).__name__
        raise ModelFilesError(f"{json_path}: format {found!r} is not {MODEL_FORMAT!r}")
    if metadata.get("kind") not in MODELS:
        raise ModelFilesError(f"{json_path}: unknown model kind {metadata.get('kind')!r}; "
                              f"known: {', '.join(MODELS)}")
    return metadata


def annotate_model_files(directory: Path, **fields: Any) -> None:
    """Add facts learnt after training to ``model.json`` (deployment thresholds, the teacher's weights location
    for jobs.predict); the weights and what they mean stay as written."""
    metadata = read_model_metadata(directory)
    fixed = sorted(set(fields) & (set(COMPATIBILITY_KEYS) | {"format", "tensors_sha256", "training"}))
    if fixed:
        raise ValueError(f"model.json fields {fixed} describe the weights and cannot be changed after training")
    write_json(Path(directory) / METADATA_FILE, {**metadata, **fields})


def check_model_compatible(metadata: dict[str, Any], expected: dict[str, Any], source: str) -> None:
    """Refuse a model whose teacher or preprocessing differs from the inference configuration's."""
    unknown = sorted(set(expected) - set(COMPATIBILITY_KEYS))
    if unknown:
        raise ValueError(f"cannot compare model files on {unknown}; comparable: {', '.join(COMPATIBILITY_KEYS)}")
    mismatches = [f"{key}: model has {metadata.get(key)!r}, inference uses {expected[key]!r}"
                  for key in COMPATIBILITY_KEYS if key in expected and _json(metadata.get(key)) != _json(expected[key])]
    if mismatches:
        raise ModelFilesError(f"trained model {source} does not match the inference configuration: "
                              + "; ".join(mismatches))


def load_model_files(directory: Path, teacher_weights: str, expected: dict[str, Any] | None = None) -> TrainableModel:
    """Rebuild a trained model from its folder, refusing one that differs from ``expected``.

    ``teacher_weights`` is the pretrained part's weights file (or "package"), as ``backbone.weights`` in a
    config; it must be the file the model was trained with (its sha256 is compared; a model without a pretrained
    part ignores it). ``expected`` holds
    ``COMPATIBILITY_KEYS`` values of the inference configuration, e.g. crop and resize.
    """
    directory = Path(directory)
    metadata = read_model_metadata(directory)
    check_model_compatible(metadata, expected or {}, str(directory))
    tensors_path = directory / TENSORS_FILE
    if not tensors_path.is_file():
        raise ModelFilesError(f"model file not found: {tensors_path}")
    if file_sha256(tensors_path) != metadata.get("tensors_sha256"):
        raise ModelFilesError(f"{tensors_path} does not match the tensors_sha256 recorded in {METADATA_FILE} "
                              f"(the file is damaged, or not the model this {METADATA_FILE} describes)")
    model = MODELS[metadata["kind"]].model_class().from_description(metadata, teacher_weights)
    weights_sha256 = model.provenance()["weights_sha256"]
    if weights_sha256 != metadata["weights_sha256"]:
        raise ModelFilesError(f"teacher weights {teacher_weights!r} (sha256 {weights_sha256}) are "
                              f"not the ones {directory} was trained with (sha256 {metadata['weights_sha256']})")
    model.load_trainable_state(load_file(str(tensors_path)))
    return model.eval()


def _json(value: Any) -> Any:
    return json.loads(json.dumps(value))
