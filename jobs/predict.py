"""Score new images with a saved memory bank, writing anomalib-style predictions.

    python -m jobs.predict --bank <folder|bank.safetensors|wandb:entity/project/name:alias> --input <image|folder>
                           [--out DIR] [--weights PATH] [--threshold X] [--wandb off|offline|online|auto]

The extractor is rebuilt from the bank's own metadata (backbone, layers, weights, preprocessing, PaDiM's
channel subset), and the scoring too (AnomalyDINO's background mask where the bank records masking), and
the extractor is then checked against it, so a bank is never scored with features it was not built from.
A PaDiM category folder (``padim.safetensors`` + ``padim.json``) is read as a bank: which one a folder holds,
and so how it loads and scores, is ``anomaly_core.memories``' lookup. A trained model's folder (jobs.train:
``model.safetensors`` + ``model.json``) works the same way. Single
process, no Ray: the engine functions of ``anomaly_core.patchcore`` do the work, as in a benchmark.

Output in ``--out``: ``predictions.json`` (per image ``pred_score``, ``pred_label``, and the paths,
relative to that file, of ``anomaly_map`` (.npy, float32 at the crop size), ``pred_mask`` (PNG) and
``overlay`` (PNG: image | heat map with the predicted mask outlined in white)). The heat map's colour
scale is fixed relative to the pixel threshold (``COLOUR_RANGE``): blue at half of it, red at 1.25
times it, the threshold itself yellow — so colours mean the same in every overlay of a bank.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from datetime import datetime, timezone
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from anomaly_core.bank import BankError, MemoryBank, atomic_write, check_compatible, write_json
from anomaly_core.config import WandbConfig
from anomaly_core.data import IMAGE_EXTENSIONS, ImageTransform, image_size, read_rgb
from anomaly_core.distances import MatrixDevice
from anomaly_core.extraction import ExtractionSettings, PatchFeatureExtractor
from anomaly_core.features import PatchFeatures
from anomaly_core.memories import SavedMemory, load_memory
from anomaly_core.scoring import Predictions, predict
from anomaly_core.training import load_model_files, read_model_metadata
from anomaly_core.training import predict_images as predict_model
from anomaly_core.training.model_files import METADATA_FILE
from jobs.cli import check_writable
from jobs.errors import run_job
from jobs.report import display_image, heatmap_overlay, write_png
from jobs.tracking import Tracker, TrackingError, is_wandb_ref, parse_wandb_ref

COLOUR_RANGE = (0.5, 1.25)  # heat-map scale, as multiples of the pixel threshold


class PredictError(ValueError):
    """The inputs or the bank do not allow a prediction; the message says what to pass instead."""


def input_images(path: Path) -> tuple[Path, list[Path]]:
    """(root, images): the image itself, or every image under a folder (recursively, sorted)."""
    path = Path(path)
    if path.is_file():
        return path.parent, [path]
    if not path.is_dir():
        raise PredictError(f"input not found: {path}")
    images = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                    and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not images:
        raise PredictError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {path}")
    return path, images


def rebuild_extractor(metadata: dict[str, Any], weights: str | None, source: str, device: str) -> PatchFeatureExtractor:
    """The extractor the bank was built with; ``weights`` overrides the recorded weights location."""
    weights = weights or metadata.get("weights")
    if not weights:
        raise PredictError(f"{source} does not record the backbone weights it was built with; pass --weights PATH")
    padim = metadata.get("padim")  # PaDiM's channel subset, None for a PatchCore bank
    if metadata.get("gpu_jpeg_decode"):
        raise PredictError(f"{source} was built with preprocess.gpu_jpeg_decode (JPEGs decoded and images resized on "
                           "the GPU); jobs.predict decodes and resizes with PIL, whose pixels differ")
    try:
        settings = ExtractionSettings(
            backbone=metadata["backbone"],
            layers=tuple(metadata["layers"]),
            weights=weights,
            resize=metadata["resize"],
            crop=metadata["crop"],
            patch_size=metadata["patch_size"],
            patch_stride=metadata.get("patch_stride", 1),
            pretrain_dim=metadata["pretrain_dim"],
            target_dim=metadata["feature_dim"],
            batch_size=metadata.get("batch_size", ExtractionSettings.batch_size),
            fp16=metadata.get("fp16", False),
            padim_subset=(padim["channels"], padim["seed"]) if padim else None,
        )
    except KeyError as missing:
        raise BankError(f"{source}: bank metadata lacks {missing}, so its extractor cannot be rebuilt") from None
    extractor = PatchFeatureExtractor(settings, device=device)
    check_compatible(metadata, extractor.describe(), source)
    return extractor


def thresholds(metadata: dict[str, Any], override: float | None, source: str, record: str) -> dict[str, Any]:
    """Image and pixel thresholds, and where they come from (``record``: the JSON file holding ``metadata``).

    Image scores and map values share a unit (a patch's distance to the nearest bank patch, or PaDiM's
    Mahalanobis distance to its position's Gaussian), so a single ``--threshold`` serves both; a bank
    without a pixel threshold (no masks at evaluation) uses its image threshold for the masks. Recorded thresholds must be finite numbers: a NaN labels nothing
    anomalous, and a string would fail half-way through writing the outputs.
    """
    if override is not None:
        return {"image": override, "pixel": override, "source": "--threshold"}
    recorded = metadata.get("thresholds") or {}
    if not isinstance(recorded, dict) or recorded.get("image") is None:
        raise PredictError(f"{source} records no image threshold (its evaluation had no anomalous images, or it "
                           f"predates thresholds in {record}); pass --threshold X")
    for key in ("image", "pixel"):
        value = recorded.get(key)
        if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool)
                                      and math.isfinite(value)):
            raise BankError(f"{source}: {record} thresholds.{key} is {value!r}, not a finite number; pass --threshold X")
    pixel = recorded.get("pixel")
    origin = record + ("" if pixel is not None else " (image threshold used for masks)")
    if recorded.get("source"):
        origin += f": {recorded['source']}"
    return {"image": recorded["image"], "pixel": pixel if pixel is not None else recorded["image"], "source": origin}


def finite_float(text: str) -> float:
    """argparse type of ``--threshold``: a finite number (NaN or inf would label every image alike)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def check_grid(metadata: dict[str, Any], grid: tuple[int, int], source: str) -> None:
    """The recorded patch grid must be the one the recorded preprocessing produces (else bank.json lies)."""
    recorded = metadata.get("grid")
    if recorded is not None and tuple(recorded) != tuple(grid):
        raise BankError(
            f"{source}: bank was built on a {recorded[0]}x{recorded[1]} patch grid, but its recorded preprocessing "
            f"(resize {metadata.get('resize')}, crop {metadata.get('crop')}) gives {grid[0]}x{grid[1]}: "
            f"bank.json does not describe this bank"
        )


def save_npy(path: Path, array: np.ndarray) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            np.save(handle, array)

    atomic_write(path, write)


@dataclass(frozen=True)
class ImageScorer:
    """What turns decoded images into scores and maps: a bank with its extractor, or a trained model."""

    transform: ImageTransform
    batch_size: int
    score: Callable[[torch.Tensor, int], Predictions]  # (transformed batch, index of its first image)


def memory_scorer(memory: SavedMemory, bank: MemoryBank, extractor: PatchFeatureExtractor, source: str) -> ImageScorer:
    """A saved memory (a bank, PaDiM's statistics) scored on the CPU with the scoring its record describes."""
    # A single process with the machine to itself: the search and the maps get every core it may use.
    threads = len(os.sched_getaffinity(0))
    scorer = memory.scoring(bank.metadata).scorer(bank.scoring_payload(), MatrixDevice(), threads)

    def score(images: torch.Tensor, start: int) -> Predictions:
        embeddings, grid = extractor.embed_batch(images)
        check_grid(bank.metadata, grid, source)
        features = PatchFeatures(embeddings, grid, np.arange(start, start + len(images), dtype=np.int64))
        return predict(scorer, features, extractor.settings.crop, threads)

    return ImageScorer(extractor.transform, extractor.settings.batch_size, score)


def model_scorer(folder: Path, weights: str | None, device: str) -> tuple[ImageScorer, dict[str, Any]]:
    """A trained model (jobs.train's ``model.safetensors`` + ``model.json``), its teacher (if it has one) rebuilt
    from ``weights`` (default: the recorded location) and checked by sha256."""
    metadata = read_model_metadata(folder)
    weights = weights or metadata.get("weights") or ""
    if not weights and metadata.get("weights_sha256") is not None:
        raise PredictError(f"{folder} does not record the teacher weights it was trained with; pass --weights PATH")
    model = load_model_files(folder, weights).to(device)
    transform = ImageTransform(resize=metadata["resize"], crop=metadata["crop"], mean=tuple(metadata["mean"]),
                               std=tuple(metadata["std"]))

    def score(images: torch.Tensor, start: int) -> Predictions:
        return predict_model(model, images, np.arange(start, start + len(images)))

    return ImageScorer(transform, TRAINED_BATCH, score), metadata


TRAINED_BATCH = 16  # images per forward pass of a trained model


def predict_images(
    scorer: ImageScorer, root: Path, images: Sequence[Path], limits: dict[str, Any], out_dir: Path,
) -> list[dict[str, Any]]:
    """Score ``images`` batch by batch and write their maps, masks and overlays; returns the records."""
    vmin, vmax = (factor * limits["pixel"] for factor in COLOUR_RANGE)
    records = []
    for start in range(0, len(images), scorer.batch_size):
        batch = images[start : start + scorer.batch_size]
        rgbs = [read_rgb(path) for path in batch]
        predictions = scorer.score(torch.stack([scorer.transform.image(rgb) for rgb in rgbs]), start)
        for path, rgb, score, amap in zip(batch, rgbs, predictions.scores, predictions.maps):
            relative = path.relative_to(root).with_suffix("")
            mask = amap >= limits["pixel"]
            shown = display_image(rgb, scorer.transform)
            files = {"anomaly_map": f"anomaly_maps/{relative.as_posix()}.npy",
                     "pred_mask": f"masks/{relative.as_posix()}.png",
                     "overlay": f"overlays/{relative.as_posix()}.png"}
            save_npy(out_dir / files["anomaly_map"], amap.astype(np.float32))
            write_png(out_dir / files["pred_mask"], mask.astype(np.uint8) * 255)
            write_png(out_dir / files["overlay"],
                      np.concatenate([shown, heatmap_overlay(shown, amap, vmin, vmax, outline=mask)], axis=1))
            records.append({"image_path": str(path), "pred_score": float(score),
                            "pred_label": int(score >= limits["image"]), **files})
    return records


def run(args: argparse.Namespace) -> Path:
    out_dir = Path(args.out or Path("outputs") / f"predict-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}")
    root, images = input_images(args.input)
    for path in images:
        image_size(path)  # an unreadable file fails here, before any output is written
    check_writable(out_dir, "--out")
    if is_wandb_ref(args.bank):
        # The predict run joins the bank's project, so the bank's lineage shows it there.
        entity, project, _ = parse_wandb_ref(args.bank)
        settings = WandbConfig(mode=args.wandb or "auto", entity=entity, project=project)
    else:
        settings = WandbConfig(mode=args.wandb or "off")
    config = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
    name = f"predict {str(args.bank).rstrip('/').rsplit('/', 1)[-1]} {Path(args.input).name}"
    with Tracker(settings, job_type="predict", run_dir=out_dir, config=config, name=name) as tracker:
        bank_path = tracker.use_input(args.bank)
        source = str(args.bank)
        if (bank_path / METADATA_FILE).is_file():  # a trained model's folder (jobs.train)
            scorer, metadata = model_scorer(bank_path, args.weights, args.device)
            digest, record = metadata["tensors_sha256"], METADATA_FILE
        else:  # a bank or PaDiM's statistics (anomaly_core.memories)
            memory, bank = load_memory(bank_path)
            metadata, digest, record = bank.metadata, bank.metadata.get("bank_sha256"), memory.record
            scorer = memory_scorer(memory, bank, rebuild_extractor(metadata, args.weights, source, args.device), source)
        tracker.use_backbone(metadata)
        limits = thresholds(metadata, args.threshold, source, record)
        records = predict_images(scorer, root, images, limits, out_dir)
        write_json(out_dir / "predictions.json", {
            "bank": {"source": source, "bank_sha256": digest,
                     "dataset": metadata.get("dataset"), "category": metadata.get("category")},
            "thresholds": limits,
            "predictions": records,
        })
        tracker.log_predictions(records, out_dir)
    anomalous = sum(record["pred_label"] for record in records)
    print(f"{len(records)} images, {anomalous} predicted anomalous -> {out_dir / 'predictions.json'}")
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.predict", description=__doc__.split("\n")[0])
    parser.add_argument("--bank", required=True, help="bank folder, its bank.safetensors, or wandb:entity/project/name:alias")
    parser.add_argument("--input", required=True, type=Path, help="an image, or a folder of images (searched recursively)")
    parser.add_argument("--out", type=Path, help="output folder (default: outputs/predict-<UTC time>)")
    parser.add_argument("--weights", help="backbone weights (path or 'package'), overriding the bank's record")
    parser.add_argument("--threshold", type=finite_float, help="anomaly threshold for scores and maps (default: the bank's)")
    parser.add_argument("--wandb", choices=("auto", "online", "offline", "off"),
                        help="W&B tracking of this prediction (default: auto for a wandb: bank, else off)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error as well")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    return run_job(lambda: run(args), args.debug, (PredictError, TrackingError))


if __name__ == "__main__":
    sys.exit(main())
