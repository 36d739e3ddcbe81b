"""Parity with anomalib 2.7: the same weights in anomalib's torch models and ours, outputs compared stage by stage.

Users compare our numbers with anomalib's; this harness says how far apart the two implementations are and
why. It runs in the project's environment and drives anomalib in a separate interpreter (``.parity-venv``,
made by ``benchmarks/parity_venv.sh``), exchanging tensors as safetensors files in a temporary folder.
Both sides get the same preprocessed image tensors (ours) and the same weights files, so every difference
below the preprocessing row comes from the models' recipes, not from inputs. Nothing is downloaded:
random-init weights are written to a file first, ``weights: package`` weights come from the installed package.

Sections (``--sections``):
  preprocess   anomalib's reader + PreProcessor (Resize + CenterCrop + Normalize) vs our ImageTransform
  patchcore    backbone maps; a recipe-aligned one-layer embedding through anomalib's whole forward with our
               bank in its ``memory_bank``; anomalib's kNN/score/map on our default two-layer embeddings and
               bank; optionally (``--patchcore-own``) each side's full default recipe, metrics only
  stfpm        same teacher file and same student init in both: maps, scores, loss; then both trained
  rd           same encoder file; OCBE paths and decoder with the same weights (the bottleneck stack differs
               in width, see the table's note); maps, scores and loss from the same features; then both trained
  padim        same backbone file and channel subset (ours, in anomalib's ``idx``): embeddings, Gaussians,
               Mahalanobis distances, maps, scores, and both sides' metrics
  fastflow     same extractor file, the same norms and flows (ours FrEIA's AllInOneBlock, anomalib's its vendored
               copy): maps, scores, loss; then both trained
  dinomaly     same ViT file and bottleneck/decoder weights (our anomalib recipe): maps, scores, loss and its
               hard-mined gradient on one batch; then both trained without dropout on the same batches
  efficient_ad same teacher, student and autoencoder weights (S and M): teacher statistics, map quantiles, maps and
               scores (quantiles given equal), the loss terms on the same penalty and jittered image, dropout off
  draem        our `anomalib` recipe's weights in both: reconstruction, map, score on test and synthetic images; loss
Differences: ``max_abs`` = max |ours - anomalib|, ``rel`` = max_abs / max |anomalib|.

Usage: PYTHONPATH=$PWD python benchmarks/parity_anomalib.py [--sections ...] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torchvision.transforms import functional as TF

from anomaly_core.backbones import IMAGENET_MEAN, IMAGENET_STD, RANDOM_INIT, RANDOM_INIT_SEED, architecture, build_classifier
from anomaly_core.data import ImageTransform, load_split
from anomaly_core.data.synthetic import write_textures
from anomaly_core.extraction import ExtractionSettings, PatchFeatureExtractor
from anomaly_core.features import PatchFeatures
from anomaly_core.padim import PadimScoring, fit_statistics
from anomaly_core.patchcore import build_bank, evaluate
from anomaly_core.registry import MODELS
from anomaly_core.scoring import NearestNeighbourScorer, Predictions, ScoringParams, predict
from anomaly_core.training import (
    Fastflow,
    ReverseDistillation,
    ReverseDistillationSettings,
    Stfpm,
    StfpmSettings,
    Trainer,
    TrainerConfig,
    load_images,
    predict_images,
)
from anomaly_core.training.batches import EpochPlan
from anomaly_core.training.dinomaly import Dinomaly
from anomaly_core.training.efficient_ad import EfficientAd, EfficientAdSettings

REPO = Path(__file__).resolve().parents[1]
SIDE = Path(__file__).with_name("parity_anomalib_side.py")
SECTIONS = ("preprocess", "patchcore", "stfpm", "rd", "padim", "fastflow", "dinomaly", "efficient_ad", "draem")

Runner = Callable[[str, dict, dict[str, torch.Tensor]], dict[str, torch.Tensor]]


@dataclass
class Row:
    section: str
    quantity: str
    max_abs: float | None
    rel: float | None
    note: str = ""


def difference(ours: np.ndarray | torch.Tensor, theirs: np.ndarray | torch.Tensor) -> tuple[float, float]:
    """(max |ours - theirs|, that / max |theirs|) over same-shaped arrays, in float64; NaN anywhere is an error."""
    a = np.asarray(ours, dtype=np.float64)
    b = np.asarray(theirs, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: ours {a.shape}, anomalib {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("non-finite values: a comparison of them would mean nothing")
    max_abs = float(np.abs(a - b).max()) if a.size else 0.0
    scale = float(np.abs(b).max()) if b.size else 0.0
    return max_abs, (max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf")))


def row(section: str, quantity: str, ours, theirs, note: str = "") -> Row:
    return Row(section, quantity, *difference(ours, theirs), note)


def subprocess_runner(venv: Path, threads: int) -> Runner:
    """Runs the anomalib side in ``venv``'s interpreter on files in a fresh temporary folder."""
    python = venv / "bin" / "python"
    if not python.exists():
        raise SystemExit(f"no parity venv at {venv}: run bash benchmarks/parity_venv.sh first")

    def run(task: str, request: dict, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with tempfile.TemporaryDirectory(prefix="parity-") as folder:
            exchange = Path(folder)
            request = {**request, "task": task, "threads": threads, "exchange": str(exchange)}
            (exchange / "request.json").write_text(json.dumps(request))
            if tensors:
                save_file({k: v.contiguous() for k, v in tensors.items()}, str(exchange / "inputs.safetensors"))
            subprocess.run([str(python), str(SIDE), str(exchange)], check=True)
            result = load_file(str(exchange / "anomalib.safetensors"))
            for extra in exchange.glob("*.json"):
                if extra.name != "request.json":
                    result[f"json:{extra.stem}"] = json.loads(extra.read_text())
            return result

    return run


def weights_file(backbone: str, weights: str, folder: Path) -> Path:
    """The whole network's weights as one safetensors file both sides load (random init: seeded, as ours)."""
    path = folder / f"{backbone}-{weights if weights == RANDOM_INIT else 'package'}.safetensors"
    if not path.exists():
        if weights == RANDOM_INIT:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(RANDOM_INIT_SEED)
                model = timm.create_model(architecture(backbone).timm_name, pretrained=False)
        else:
            model = build_classifier(backbone, weights)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@dataclass
class Data:
    """Our preprocessed tire_small images (both sides get these tensors) and the test split."""

    train: torch.Tensor
    test: torch.Tensor
    test_samples: list
    transform: ImageTransform


def load_data(root: Path, category: str, backbone: str, resize: int, crop: int, test_limit: int | None) -> Data:
    split = load_split("mvtec", root, category)
    arch = architecture(backbone)
    transform = ImageTransform(resize, crop, arch.mean, arch.std)
    test = list(split.test)[:test_limit] if test_limit else list(split.test)
    return Data(load_images(split.train, transform), load_images(test, transform), test, transform)


def metrics_row(section: str, name: str, data: Data, ours: Predictions, scores: torch.Tensor, maps: torch.Tensor,
                note: str = "") -> tuple[Row, dict]:
    """Both sides' image/pixel metrics with our metric code; the row carries the largest metric gap."""
    theirs = Predictions(scores.double().numpy(), maps.float().numpy(), np.arange(len(scores)))
    ours_report = evaluate(data.test_samples, ours, data.transform, 0.3).values
    their_report = evaluate(data.test_samples, theirs, data.transform, 0.3).values
    keys = [k for k in ("image_auroc", "pixel_auroc", "aupro") if ours_report.get(k) is not None]
    text = ", ".join(f"{k} {ours_report[k]:.4f} vs {their_report[k]:.4f}" for k in keys)
    gap = max(abs(ours_report[k] - their_report[k]) for k in keys)
    return (Row(section, name, gap, None, f"ours vs anomalib: {text}{'; ' + note if note else ''}"),
            {"ours": ours_report, "anomalib": their_report})


# --- recipe reproductions: anomalib's map post-processing written with torch ops, to show that the listed
# --- recipe differences explain the whole map difference (the reproduction matches anomalib to float rounding)

def torch_reflect_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """[n, H, W] blurred as anomalib's GaussianBlur2d: kernel 2*int(4*sigma+0.5)+1, torch 'reflect' padding."""
    size = 2 * int(4.0 * sigma + 0.5) + 1
    x = torch.arange(size, dtype=torch.float32) - size // 2
    kernel_1d = torch.exp(-(x**2) / (2 * sigma**2))
    kernel_1d = kernel_1d / kernel_1d.sum()
    kernel = torch.outer(kernel_1d, kernel_1d)
    kernel = (kernel / kernel.sum()).view(1, 1, size, size)
    padded = F.pad(maps[:, None].float(), (size // 2,) * 4, mode="reflect")
    return F.conv2d(padded, kernel)[:, 0]


def patchcore_map_as_anomalib(patch_scores: np.ndarray, grid: tuple[int, int], size: int, sigma: float) -> torch.Tensor:
    """Our patch scores through anomalib's PatchCore map recipe: nearest upsampling, then its blur."""
    scores = torch.as_tensor(patch_scores, dtype=torch.float32).reshape(-1, 1, *grid)
    return torch_reflect_blur(F.interpolate(scores, size=(size, size))[:, 0], sigma)


# --- sections


def section_preprocess(args, runner: Runner, folder: Path) -> list[Row]:
    split = load_split("mvtec", args.data, args.category)
    samples = list(split.test)[: args.test_limit] if args.test_limit else list(split.test)
    transform = ImageTransform(args.resize, args.crop)
    ours = load_images(samples, transform)
    out = runner("preprocess", {"paths": [str(s.image_path) for s in samples], "resize": args.resize,
                                "crop": args.crop, "mean": list(transform.mean), "std": list(transform.std)}, {})
    return [row("preprocess", f"normalised image, resize {args.resize} + crop {args.crop}", ours, out["images"],
                "ours: PIL bilinear on uint8, rounded to uint8, then /255; anomalib: float [0,1] tensor, torch "
                "antialiased bilinear (no uint8 rounding). anomalib's default PatchCore pre-processor is "
                "Resize((256, 256)) without a crop: it squashes non-square images")]


def section_patchcore(args, runner: Runner, folder: Path, backbone: str, weights: str) -> tuple[list[Row], dict]:
    tag = f"patchcore/{backbone} ({weights})"
    data = load_data(args.data, args.category, backbone, args.resize, args.crop, args.test_limit)
    path = weights_file(backbone, weights, folder)
    layers = architecture(backbone).default_layers
    default = ExtractionSettings(backbone, layers, str(path), args.resize, args.crop)
    extractor = PatchFeatureExtractor(default)
    channels = extractor.backbone.channels
    # The one embedding both recipes compute alike: one layer, its 3x3 neighbourhood averaged per channel
    # (our pooling of C*9 values to C dims == anomalib's AvgPool2d(3, 1, 1) with zero padding counted).
    aligned = replace(default, layers=layers[:1], pretrain_dim=channels[0], target_dim=channels[0])
    aligned_extractor = PatchFeatureExtractor(aligned)

    def features(ex: PatchFeatureExtractor, images: torch.Tensor) -> PatchFeatures:
        parts = [ex.embed_batch(batch) for batch in images.split(8)]
        return PatchFeatures(np.concatenate([p[0] for p in parts]), parts[0][1], np.arange(len(images)))

    rows, details = [], {}
    banks, tests, predictions = {}, {}, {}
    params = {"max": ScoringParams(), "reweighted": ScoringParams(reweight_neighbours=args.num_neighbors)}
    for name, ex in (("default", extractor), ("aligned", aligned_extractor)):
        train = features(ex, data.train)
        banks[name] = build_bank(train, "approximate", args.coreset_ratio, 128, args.seed, ex.describe())
        tests[name] = features(ex, data.test)
        for score_name, param in params.items():
            predictions[name, score_name] = predict(NearestNeighbourScorer(banks[name].features, param), tests[name],
                                                    args.crop)
    with torch.no_grad():
        our_maps = extractor.backbone(data.test)
    request = {"backbone": backbone, "layers": list(layers), "aligned_layers": list(layers[:1]),
               "weights_file": str(path), "num_neighbors": args.num_neighbors, "seed": args.seed,
               "coreset_ratio": args.coreset_ratio, "own_recipe": args.patchcore_own}
    tensors = {"test_images": data.test, "train_images": data.train,
               "default/bank": torch.from_numpy(banks["default"].features),
               "default/embeddings": torch.from_numpy(tests["default"].embeddings),
               "aligned/bank": torch.from_numpy(banks["aligned"].features)}
    out = runner("patchcore", request, tensors)

    for layer, ours in zip(layers, our_maps):
        rows.append(row(tag, f"backbone map {layer}", ours, out[f"default/features/{layer}"]))
    grid = tests["aligned"].grid
    rows.append(row(tag, f"embedding, aligned recipe ({layers[0]} alone, 3x3 mean, {channels[0]} dims)",
                    tests["aligned"].embeddings, out["aligned/embeddings"]))
    rows.append(row(tag, f"image score, aligned, num_neighbors={args.num_neighbors} (our reweight_neighbours)",
                    predictions["aligned", "reweighted"].scores, out["aligned/pred_score"],
                    "anomalib's forward() with our coreset bank in memory_bank"))
    rows.append(row(tag, "anomaly map, aligned", predictions["aligned", "reweighted"].maps, out["aligned/anomaly_map"],
                    "recipe: ours bilinear upsampling + scipy gaussian (mode 'reflect', i.e. edge repeated); anomalib "
                    "nearest upsampling + GaussianBlur2d sigma 4, kernel 33, torch 'reflect' (edge not repeated)"))
    scorer = NearestNeighbourScorer(banks["aligned"].features, params["reweighted"])
    _, patch_scores = scorer.score_images(tests["aligned"].embeddings)
    rows.append(row(tag, "anomaly map, aligned: ours reproduced with anomalib's map recipe",
                    patchcore_map_as_anomalib(patch_scores, grid, args.crop, 4.0), out["aligned/anomaly_map"],
                    "our patch scores, nearest upsampling + torch-reflect blur: explains the row above"))

    scorer = NearestNeighbourScorer(banks["default"].features, params["max"])
    _, patch_scores = scorer.score_images(tests["default"].embeddings)
    dims = banks["default"].features.shape[1]
    rows.append(row(tag, f"patch scores, default recipe ({'+'.join(layers)}, our {dims}-dim embedding, our bank)",
                    patch_scores, out["default/patch_scores"],
                    "anomalib's nearest_neighbors: |x|^2 - 2xy + |y|^2 in float32; ours: exact row-wise distances"))
    rows.append(row(tag, "image score, default, plain max (num_neighbors=1)", predictions["default", "max"].scores,
                    out["default/pred_score_max"]))
    rows.append(row(tag, f"image score, default, num_neighbors={args.num_neighbors}",
                    predictions["default", "reweighted"].scores, out["default/pred_score"],
                    "anomalib's default (9) re-weights; our default reweight_neighbours=0 is the plain max"))
    rows.append(row(tag, "anomaly map, default", predictions["default", "max"].maps, out["default/anomaly_map"],
                    "same map recipe difference as the aligned row"))
    if args.patchcore_own:
        metric_row, details = metrics_row(
            tag, "own default recipes, metrics", data, predictions["default", "max"], out["own/pred_score"],
            out["own/anomaly_map"],
            f"ours: {dims}-dim pooled embedding, approximate coreset {args.coreset_ratio}, max score; anomalib: "
            f"{sum(channels)}-dim AvgPool2d embedding, KCenterGreedy {args.coreset_ratio} "
            f"({int(out['own/bank_rows'])} rows), num_neighbors {args.num_neighbors}")
        rows.append(metric_row)
    return rows, details


def section_padim(args, runner: Runner, folder: Path, backbone: str, weights: str) -> tuple[list[Row], dict]:
    """Both PaDiM models on the same images, weights file and channel subset; every stage compared."""
    tag = f"padim/{backbone} ({weights})"
    data = load_data(args.data, args.category, backbone, args.resize, args.crop, args.test_limit)
    path = weights_file(backbone, weights, folder)
    layers = PADIM_LAYERS.get(backbone, ("layer1", "layer2", "layer3"))
    settings = ExtractionSettings(backbone, layers, str(path), args.resize, args.crop,
                                  padim_subset=(args.padim_channels, args.padim_seed))
    extractor = PatchFeatureExtractor(settings)

    def features(images: torch.Tensor) -> PatchFeatures:
        parts = [extractor.embed_batch(batch) for batch in images.split(8)]
        return PatchFeatures(np.concatenate([p[0] for p in parts]), parts[0][1], np.arange(len(images)))

    train, test = features(data.train), features(data.test)
    statistics = fit_statistics([train], 0.01, extractor.describe())
    aligned = fit_statistics([train], 0.01 + 1e-5, extractor.describe())  # anomalib's extra 1e-5 I
    scorer = PadimScoring().scorer(statistics.scoring_payload(), "cpu")
    ours = predict(scorer, test, args.crop)
    indices = extractor.describe()["padim"]["channel_indices"]
    out = runner("padim", {"backbone": backbone, "layers": list(layers), "weights_file": str(path),
                           "channel_indices": indices}, {"train_images": data.train, "test_images": data.test})
    n, (h, w) = len(data.test), test.grid
    rows = [
        row(tag, f"embedding ({'+'.join(layers)}, {len(indices)} of {sum(extractor.backbone.channels)} channels)",
            test.embeddings, out["embeddings"].reshape(n, len(indices), h * w).permute(0, 2, 1)),
        row(tag, "per-position mean", statistics.features, out["mean"].T,
            "ours: float64 moments of float32 features, stored float32; anomalib: torch.mean in float32"),
        row(tag, "inverse covariance", statistics.inverse_covariance, out["inverse_covariance"],
            "recipe: ours (authors') cov + 0.01 I; anomalib cov + 0.01 I + 1e-5 I, inverted in float32"),
        row(tag, "Mahalanobis distance per position", scorer.distances(test.embeddings),
            out["distances"].reshape(n, h * w)),
        row(tag, "inverse covariance, ours with anomalib's epsilon (0.01 + 1e-5)", aligned.inverse_covariance,
            out["inverse_covariance"], "what is left: anomalib inverts in float32 (ours float64) a covariance of "
            f"rank <= {len(data.train) - 1} + epsilon I ({len(indices)} dims): ill-conditioned"),
        row(tag, "Mahalanobis distance, ours with anomalib's epsilon",
            PadimScoring().scorer(aligned.scoring_payload(), "cpu").distances(test.embeddings),
            out["distances"].reshape(n, h * w)),
        row(tag, "anomaly map", ours.maps, out["anomaly_map"],
            "recipe: both bilinear upsampling + Gaussian sigma 4 (kernel 33); ours scipy 'reflect' (edge repeated, "
            "the authors'), anomalib kornia-style torch 'reflect' (edge not repeated)"),
        row(tag, "anomaly map: ours reproduced with anomalib's blur",
            torch_reflect_blur(F.interpolate(torch.as_tensor(scorer.distances(test.embeddings)).reshape(n, 1, h, w),
                                             size=(args.crop, args.crop), mode="bilinear", align_corners=False)[:, 0],
                               4.0),
            out["anomaly_map"], "our distances, anomalib's blur: explains the row above"),
        row(tag, "image score (max of the map)", ours.scores, out["pred_score"]),
    ]
    metric_row, details = metrics_row(tag, "metrics", data, ours, out["pred_score"], out["anomaly_map"])
    return [*rows, metric_row], details


# PaDiM's layers where they are not ResNet's layer1-3: lite0's stride 4, 8 and 16 stages.
PADIM_LAYERS = {"tf_efficientnet_lite0": ("blocks.1", "blocks.2", "blocks.4")}


def _stfpm_section(args, runner: Runner, folder: Path, backbone: str, weights: str, train_data: Data | None
                   ) -> tuple[list[Row], dict]:
    tag = f"stfpm/{backbone} ({weights})"
    data = train_data or load_data(args.data, args.category, backbone, args.resize, args.crop, args.test_limit)
    path = weights_file(backbone, weights, folder)
    # Our `anomalib` recipe (anomaly_core.registry.MODELS): anomalib's Stfpm.configure_optimizers (SGD lr
    # 0.4, momentum 0.9, weight_decay 0.001), its half-sum loss and its timm student (zero_init_last).
    recipe = MODELS["stfpm"].recipes["anomalib"].values
    settings = StfpmSettings(backbone=backbone, crop=data.test.shape[-1], init_seed=args.seed,
                             **{key: recipe[key] for key in ("lr", "momentum", "weight_decay", "loss", "zero_init_last")})
    model = Stfpm(settings, str(path))
    student = {k: v.contiguous() for k, v in model.student.state_dict().items()}
    save_file(student, str(folder / "student.safetensors"))
    epochs = args.epochs if train_data is not None else 0
    plan = EpochPlan(len(data.train), args.batch_size, drop_last=False)
    tensors = {"test_images": data.test, "train_images": data.train,
               **{f"order/{e}": _padded(plan.global_batches(args.seed, e)) for e in range(max(epochs, 1))}}
    request = {"backbone": backbone, "layers": list(model.teacher.layers), "weights_file": str(path),
               "student_file": str(folder / "student.safetensors"), "epochs": epochs}
    out = runner("stfpm", request, tensors)
    rows, details = [], {}
    ours = predict_images(model, data.test)
    if train_data is None:
        rows.append(row(tag, "image score", ours.scores, out["pred_score"]))
        rows.append(row(tag, "anomaly map", ours.maps, out["anomaly_map"], "same recipe: bilinear, product, no blur"))
        rows.append(row(tag, "training loss, first batch (train mode)", _first_loss(model, data, plan, args.seed),
                        out["loss"]))
        return rows, details
    return _trained_rows(args, tag, model, data, epochs, out)


def _trained_rows(args, tag: str, model: Stfpm | Fastflow, data: Data, epochs: int, out: dict[str, torch.Tensor]
                  ) -> tuple[list[Row], dict]:
    """Our model trained by the Trainer on the batches anomalib's side trained on: epoch losses, map, metrics."""
    fit = Trainer(TrainerConfig(epochs=epochs, batch_size=args.batch_size, seed=args.seed)).fit(model, data.train)
    trained = predict_images(model, data.test)
    losses = [entry["loss"] for entry in fit.history]
    rows = [row(tag, f"epoch losses after {epochs} epochs of training", np.array(losses), out["trained/epoch_loss"],
                _losses_note(losses, out["trained/epoch_loss"])),
            row(tag, "trained: anomaly map", trained.maps, out["trained/anomaly_map"])]
    metric_row, details = metrics_row(tag, "trained: metrics", data, trained, out["trained/pred_score"],
                                      out["trained/anomaly_map"])
    return rows + [metric_row], details


def _rd_section(args, runner: Runner, folder: Path, train_data: Data | None) -> tuple[list[Row], dict]:
    backbone, weights = "wide_resnet50_2", RANDOM_INIT
    tag = f"rd/{backbone} ({weights})"
    data = train_data or load_data(args.data, args.category, backbone, args.resize, args.crop, args.test_limit)
    path = weights_file(backbone, weights, folder)
    # anomalib's ReverseDistillation.configure_optimizers: Adam lr 0.005, betas (0.5, 0.99), no weight decay,
    # no schedule: the authors' `rd4ad` recipe but for beta2 (0.999 there), which is set to anomalib's here.
    recipe = MODELS["reverse_distillation"].recipes["rd4ad"].values
    settings = ReverseDistillationSettings(
        crop=data.test.shape[-1], init_seed=args.seed, betas=(0.5, 0.99),
        **{key: recipe[key] for key in ("lr", "weight_decay", "warmup_epochs", "decay_at", "decay_factor",
                                        "align_corners")})
    model = ReverseDistillation(settings, str(path)).eval()
    trainable = {anomalib_rd_name(k): v.contiguous() for k, v in model.trainable_state().items()
                 if anomalib_rd_name(k) is not None}
    save_file(trainable, str(folder / "rd_trainable.safetensors"))
    with torch.no_grad():
        teacher = model.teacher_features(data.test)
        captured = {}
        hook = model.bottleneck.stack.register_forward_pre_hook(lambda _, a: captured.update(fused=a[0]))
        code = model.bottleneck(teacher)
        hook.remove()
        decoded = model.decoder(code)
    epochs = args.epochs if train_data is not None else 0
    plan = EpochPlan(len(data.train), args.batch_size, drop_last=False)
    tensors = {"test_images": data.test, "train_images": data.train, "code": code,
               **{f"given/teacher/{i}": t for i, t in enumerate(teacher)},
               **{f"given/decoded/{i}": d for i, d in enumerate(decoded)},
               **{f"order/{e}": _padded(plan.global_batches(args.seed, e)) for e in range(max(epochs, 1))}}
    request = {"backbone": backbone, "layers": list(model.teacher.layers), "weights_file": str(path),
               "trainable_file": str(folder / "rd_trainable.safetensors"), "seed": args.seed, "epochs": epochs}
    out = runner("reverse_distillation", request, tensors)
    rows, details = [], {}
    if train_data is None:
        for i, layer in enumerate(model.teacher.layers):
            rows.append(row(tag, f"encoder map {layer}", teacher[i], out[f"teacher/{i}"]))
        rows.append(row(tag, "OCBE fused input of the residual stack (same path weights)", captured["fused"],
                        out["fused"]))
        for i, layer in enumerate(model.teacher.layers):
            rows.append(row(tag, f"decoder output for {layer} (same weights, same code)", decoded[i],
                            out[f"decoded/{i}"]))
        stack = ", ".join(out["json:rd_unfilled"])
        rows.append(Row(tag, "OCBE residual stack", None, None,
                        f"not comparable: anomalib's get_bottleneck_layer builds OCBE(Bottleneck, 3) without "
                        f"width_per_group, so its blocks are 512 wide; ours (and the official RD4AD, resnet.py "
                        f"wide_resnet50_2 passes width_per_group=128 to BN_layer) are 1024 wide. anomalib keeps "
                        f"its own init for: {stack}"))
        model._teacher_and_decoder = lambda images: (teacher, decoded)  # the same features into both map recipes
        ours = model.predict(data.test)
        loss = model.training_step(data.test)["loss"]
        rows.append(row(tag, "anomaly map from the same features", ours["anomaly_map"], out["given/anomaly_map"],
                        f"recipe: ours bilinear align_corners={settings.align_corners} + scipy gaussian (edge "
                        "repeated); anomalib align_corners=True (as the official RD4AD) + GaussianBlur2d (torch reflect)"))
        reproduced = torch_reflect_blur(sum(
            F.interpolate((1 - F.cosine_similarity(t, d, dim=1))[:, None], size=data.test.shape[-2:],
                          mode="bilinear", align_corners=True)[:, 0] for t, d in zip(teacher, decoded)), 4.0)
        rows.append(row(tag, "anomaly map: anomalib's recipe reproduced on the same features", reproduced,
                        out["given/anomaly_map"], "align_corners=True + torch-reflect blur: explains the row above"))
        rows.append(row(tag, "image score (map max) from the same features", ours["pred_score"],
                        out["given/anomaly_map"].amax(dim=(-2, -1))))
        rows.append(row(tag, "loss from the same features", loss.reshape(1), out["given/loss"]))
        return rows, details
    fit = Trainer(TrainerConfig(epochs=epochs, batch_size=args.batch_size, seed=args.seed)).fit(model, data.train)
    trained = predict_images(model, data.test, batch_size=8)
    losses = [entry["loss"] for entry in fit.history]
    rows.append(row(tag, f"epoch losses after {epochs} epochs of training", np.array(losses),
                    out["trained/epoch_loss"], _losses_note(losses, out["trained/epoch_loss"]) +
                    "; bottleneck stacks differ in width and init, so losses are not expected to agree"))
    metric_row, details = metrics_row(tag, "trained: metrics", data, trained, out["trained/pred_score"],
                                      out["trained/anomaly_map"])
    return rows + [metric_row], details


def _fastflow_sections(args, runner: Runner, folder: Path, details: dict) -> list[Row]:
    """Each of ``--fastflow-backbones`` untrained, then ``--train-fastflow-backbone`` trained on both sides."""
    rows = []
    for backbone, weights in _pairs(args.fastflow_backbones):
        rows += _fastflow_section(args, runner, folder, backbone, weights, None)[0]
    if args.epochs > 0:
        backbone, weights = _pairs(args.train_fastflow_backbone)[0]
        data = load_data(args.data, args.category, backbone, args.train_resize, args.train_crop, None)
        new, details["fastflow/trained"] = _fastflow_section(args, runner, folder, backbone, weights, data)
        rows += new
    return rows


def _fastflow_section(args, runner: Runner, folder: Path, backbone: str, weights: str, train_data: Data | None
                      ) -> tuple[list[Row], dict]:
    tag = f"fastflow/{backbone} ({weights})"
    data = train_data or load_data(args.data, args.category, backbone, args.resize, args.crop, args.test_limit)
    path = weights_file(backbone, weights, folder)
    # Our `anomalib` recipe: anomalib's Fastflow defaults (flow_steps 8, hidden_ratio 1.0, conv3x3_only False) and
    # its Adam (lr 0.001, weight_decay 1e-5); anomalib builds the same flows from the request's values.
    recipe = MODELS["fastflow"].recipes["anomalib"].values
    model = Fastflow(Fastflow.settings_of({**recipe, "backbone": backbone, "crop": data.test.shape[-1],
                                           "init_seed": args.seed}), str(path))
    flows = {anomalib_fastflow_name(k): v.contiguous() for k, v in model.trainable_state().items()}
    save_file(flows, str(folder / "fastflow.safetensors"))
    epochs = args.epochs if train_data is not None else 0
    plan = EpochPlan(len(data.train), args.batch_size, drop_last=False)
    tensors = {"test_images": data.test, "train_images": data.train,
               **{f"order/{e}": _padded(plan.global_batches(args.seed, e)) for e in range(max(epochs, 1))}}
    settings = model.settings
    request = {"backbone": backbone, "weights_file": str(path), "flow_file": str(folder / "fastflow.safetensors"),
               "flow_steps": settings.flow_steps, "conv3x3_only": settings.conv3x3_only,
               "hidden_ratio": settings.hidden_ratio, "epochs": epochs}
    out = runner("fastflow", request, tensors)
    rows, details = [], {}
    if train_data is None:
        ours = predict_images(model, data.test)
        rows.append(row(tag, "image score", ours.scores, out["pred_score"]))
        rows.append(row(tag, "anomaly map", ours.maps, out["anomaly_map"],
                        "same recipe: -mean of upsampled exp(-0.5 mean z^2); FrEIA's AllInOneBlock vs anomalib's copy"))
        rows.append(row(tag, "training loss, first batch", _first_loss(model, data, plan, args.seed), out["loss"]))
        return rows, details
    return _trained_rows(args, tag, model, data, epochs, out)


def anomalib_fastflow_name(name: str) -> str:
    """Our FastFlow parameter name -> anomalib's FastflowModel's: the flows are its ``fast_flow_blocks``."""
    if name.startswith("norms."):
        return name
    if name.startswith("flows."):
        return "fast_flow_blocks." + name.removeprefix("flows.")
    raise KeyError(f"no anomalib counterpart known for FastFlow parameter {name}")
def _efficient_ad_section(args, runner: Runner, folder: Path, backbone: str) -> list[Row]:
    """Our EfficientAD and anomalib's EfficientAdModel with the same (random) teacher, student and autoencoder."""
    tag = f"efficient_ad/{backbone} (random)"
    recipe = MODELS["efficient_ad"].recipes["anomalib"].values
    settings = EfficientAdSettings(
        backbone=backbone, init_seed=args.seed, auxiliary={"imagenette": str(write_textures(folder / "penalty", 1, 64))},
        **{key: recipe[key] for key in ("lr", "weight_decay", "max_steps", "decay_at", "decay_factor",
                                        "held_out_fraction", "map_normalisation")})
    model = EfficientAd(settings, RANDOM_INIT).eval()
    transform = ImageTransform(256, 256, IMAGENET_MEAN, IMAGENET_STD)
    split = load_split("mvtec", args.data, args.category)
    train, held_out = load_images(split.train[:4], transform), load_images(split.train[4:6], transform)
    test = load_images(list(split.test)[: args.efficient_ad_images], transform)
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    raw = lambda images: images * std + mean  # noqa: E731 (anomalib normalises inside its networks)
    with torch.no_grad():
        model.prepare(train)
        model.calibrate(held_out)
        ours = model.predict(test)
        grid = EfficientAd(replace(settings, map_normalisation="grid"), RANDOM_INIT).eval()
        grid.load_trainable_state(model.trainable_state())
        grid.calibrate(held_out)  # its own quantiles: of the maps at the PDN's resolution
        ours_grid = grid.predict(test)
    penalty = model._penalty_batch(1)
    jittered = TF.adjust_brightness(raw(train[:1]), 1.1)
    model.train()
    model.ae.eval()  # dropout off: its masks are drawn differently on each side
    model._penalty_batch = lambda count: penalty
    model._jittered = lambda images: (jittered - mean) / std
    with torch.no_grad():
        losses = model.training_step(train[:1])
    weights = {k: v.contiguous() for k, v in model.state_dict().items() if k.split(".")[0] in ("teacher", "student", "ae")}
    save_file(weights, str(folder / "efficient_ad.safetensors"))
    request = {"size": backbone.removeprefix("pdn_"), "out_channels": model.out_channels,
               "weights_file": str(folder / "efficient_ad.safetensors")}
    tensors = {"train_images": raw(train), "held_out_images": raw(held_out), "test_images": raw(test),
               "given/mean": model.teacher_mean, "given/std": model.teacher_std, "given/quantiles": model.map_quantiles,
               "penalty": raw(penalty), "jittered": jittered}
    out = runner("efficient_ad", request, tensors)
    return [
        row(tag, "teacher channel mean (4 training images)", model.teacher_mean, out["teacher_mean"],
            "ours: efficientad.py's two passes (mean, then std around it); anomalib: one pass of sums and squares"),
        row(tag, "teacher channel std", model.teacher_std, out["teacher_std"],
            "anomalib's sqrt(E[x^2] - E[x]^2) in float32 loses digits where a channel's mean is large against its std"),
        row(tag, "map quantiles qa_st, qb_st, qa_ae, qb_ae (2 held-out images, recipe anomalib: image)",
            model.map_quantiles, out["quantiles"], "the same maps (padded, upsampled); our exact quantile vs torch's"),
        row(tag, "anomaly map, recipe anomalib (quantiles given equal)", ours["anomaly_map"], out["anomaly_map"]),
        row(tag, "image score, recipe anomalib", ours["pred_score"], out["pred_score"]),
        row(tag, "anomaly map, recipe efficientad (grid)", ours_grid["anomaly_map"], out["anomaly_map"],
            "recipe: nelson1425 normalises the 56 x 56 maps and pads the combined map with 0; anomalib pads each "
            "raw map with 0 and normalises after upsampling (its border -0.1 qa/(qb - qa)); each takes its "
            "quantiles of the maps it normalises"),
        row(tag, "image score, recipe efficientad (grid)", ours_grid["pred_score"], out["pred_score"]),
        row(tag, "loss terms st, ae, stae (same penalty and jittered image, dropout off)",
            torch.stack([losses["loss/st"], losses["loss/ae"], losses["loss/stae"]]), out["losses"]),
    ]


_RD_PATH = re.compile(r"^bottleneck\.paths\.(\d)\.(\d)\.([01])\.(.+)$")
_RD_DECODER = re.compile(r"^decoder\.stages\.(\d)\.(\d+)\.(body|shortcut)\.(\d)\.(.+)$")
_BODY = {"0": "conv1", "1": "bn1", "3": "conv2", "4": "bn2", "6": "conv3", "7": "bn3"}


def _dinomaly_section(args, runner: Runner, folder: Path) -> list[Row]:
    """Our ``anomalib`` recipe against anomalib's DinomalyModel, the same weights in both. Loss and gradient rows
    run in train mode with the dropout layers switched off (their draws cannot agree across processes); the
    trained rows train both without dropout (bottleneck_dropout 0), so every step is deterministic."""
    backbone, weights = _pairs(args.dinomaly_backbone)[0]
    tag = f"dinomaly/{backbone} ({weights})"
    data = load_data(args.data, args.category, backbone, args.dinomaly_resize, args.dinomaly_crop, args.test_limit)
    path = weights_file(backbone, weights, folder)
    values = MODELS["dinomaly"].recipes["anomalib"].values
    steps = args.dinomaly_steps

    def build(dropout: float) -> Dinomaly:
        settings = Dinomaly.settings_of({**values, "backbone": backbone, "crop": data.test.shape[-1],
                                         "init_seed": args.seed, "bottleneck_dropout": dropout, "max_steps": steps})
        return Dinomaly(settings, str(path))

    model = build(0.2)
    trainable = {k: v.contiguous() for k, v in model.trainable_state().items() if k != "hard_mining_step"}
    save_file(trainable, str(folder / "dinomaly.safetensors"))
    plan = EpochPlan(len(data.train), args.batch_size, drop_last=False)
    epochs = -(-steps // plan.steps_per_epoch) if steps else 1
    orders = {f"order/{e}": _padded(plan.global_batches(args.seed, e)) for e in range(epochs)}
    first = orders["order/0"][0]
    batch = data.train[first[first >= 0]]
    request = {"backbone": backbone, "target_layers": [int(layer.split(".")[1]) for layer in model.settings.layers],
               "weights_file": str(path), "trainable_file": str(folder / "dinomaly.safetensors"), "steps": steps,
               "mining_steps": [0, model.settings.hard_mining_steps]}
    out = runner("dinomaly", {**request}, {"test_images": data.test, "train_images": data.train, "batch": batch,
                                           **orders})
    unfilled = out.get("json:dinomaly_unfilled", [])
    ours = predict_images(model, data.test)
    rows = [row(tag, "image score", ours.scores, out["pred_score"], f"anomalib's unfilled trainable tensors: {unfilled}"),
            row(tag, "anomaly map", ours.maps, out["anomaly_map"], "anomalib recipe: the raw map at the image size")]
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.eval()
    for step in request["mining_steps"]:
        model.hard_mining_step.fill_(step)
        model.zero_grad()
        loss = model.training_step(batch)["loss"]
        loss.backward()
        rows.append(row(tag, f"loss, one batch (step {step})", loss.detach().reshape(1), out[f"loss/{step}"]))
        rows.append(row(tag, f"gradient of bottleneck fc1 (step {step}: p = {model.hard_mining_share():.1f})",
                        model.bottleneck[0].fc1.weight.grad, out[f"grad/{step}"]))
    if not steps:
        return rows
    model = build(0.0)
    config = TrainerConfig(epochs=epochs, max_steps=steps, batch_size=args.batch_size, seed=args.seed,
                           clip_grad_norm=values["clip_grad_norm"])
    fit = Trainer(config).fit(model, data.train)
    trained = predict_images(model, data.test)
    losses = [entry["loss"] for entry in fit.history]
    rows.append(row(tag, f"epoch losses, {steps} steps without dropout", np.array(losses), out["trained/epoch_loss"],
                    _losses_note(losses, out["trained/epoch_loss"])))
    rows.append(row(tag, "trained: image score", trained.scores, out["trained/pred_score"]))
    rows.append(row(tag, "trained: anomaly map", trained.maps, out["trained/anomaly_map"]))
    return rows


def anomalib_rd_name(name: str) -> str | None:
    """Our RD parameter name -> anomalib's (WRN50, three layers), or None where the modules differ (the stack).

    OCBE paths: path 0 (layer1) = conv1/bn1 then conv2/bn2, path 1 (layer2) = conv3/bn3. Decoder stage i =
    anomalib's decoder.layer{i+1}; a block's body convs/BNs = conv1..3/bn1..3, its shortcut = ``upsample``.
    """
    match = _RD_PATH.match(name)
    if match:
        path, step, part, rest = match.groups()
        index = {("0", "0"): 1, ("0", "1"): 2, ("1", "0"): 3}[path, step]
        return f"bottleneck.{'conv' if part == '0' else 'bn'}{index}.{rest}"
    match = _RD_DECODER.match(name)
    if match:
        stage, block, kind, position, rest = match.groups()
        module = _BODY[position] if kind == "body" else f"upsample.{position}"
        return f"decoder.layer{int(stage) + 1}.{block}.{module}.{rest}"
    if name.startswith("bottleneck.stack."):
        return None
    raise KeyError(f"no anomalib counterpart known for RD parameter {name}")


def _draem_section(args, runner: Runner, folder: Path) -> list[Row]:
    """Our DRAEM with the `anomalib` recipe (anomalib's discriminator input order, map-max score, loss form) and
    anomalib's DraemModel with its weights, on raw [0, 1] tire images and on one batch of our simulated anomalies
    (generated textures as DTD). Training is not compared: the two synthesise different random anomalies."""
    from anomaly_core.training.anomaly_synthesis import image_seeds
    from anomaly_core.training.draem import Draem, draem_loss

    size, width = args.draem_size, args.draem_width
    tag = f"draem ({size} px, random init" + ("" if width == 128 else f", base width {width}") + ")"
    transform = ImageTransform(size, size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    split = load_split("mvtec", args.data, args.category)
    test = load_images(list(split.test)[: args.test_limit or 8], transform)
    train = load_images(list(split.train)[: args.batch_size], transform)
    values = {**MODELS["draem"].recipes["anomalib"].values, "crop": size, "init_seed": args.seed, "base_width": width,
              "auxiliary": {"dtd": str(write_textures(folder / "dtd", 2, size))}}
    model = Draem(Draem.settings_of(values)).eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "draem.safetensors"))
    anomalous, target, masks = model.synthesis(train, image_seeds(args.seed, 0, 0, 0, len(train)))
    tensors = {"test_images": test, "anomalous_images": anomalous, "target_images": target, "masks": masks}
    out = runner("draem", {"weights_file": str(folder / "draem.safetensors"), "base_width": width}, tensors)
    if int(out["unfilled"]):
        raise KeyError(f"our DRAEM weights left {int(out['unfilled'])} of anomalib's DraemModel tensors unfilled")
    rows = []
    with torch.no_grad():
        for name, images in (("test", test), ("anomalous", anomalous)):
            ours = model.predict(images)
            rows.append(row(tag, f"{name}: reconstruction", model.reconstructive_subnetwork(images),
                            out[f"{name}/reconstruction"]))
            rows.append(row(tag, f"{name}: anomaly map", ours["anomaly_map"], out[f"{name}/anomaly_map"]))
            rows.append(row(tag, f"{name}: image score", ours["pred_score"], out[f"{name}/pred_score"],
                            "recipe anomalib: the map's max (the authors': 21 x 21 mean first)"))
        import copy

        reconstruction, logits = copy.deepcopy(model).train().discriminate(anomalous)
        losses = draem_loss(target, reconstruction, masks, logits, "anomalib")
    note = f"train mode, {len(train)} images, {int(masks.flatten(1).amax(1).sum())} with an anomaly"
    rows.append(row(tag, "synthetic batch: anomaly map", torch.softmax(logits, dim=1)[:, 1], out["train/anomaly_map"],
                    note + " (an untrained network's eval-mode maps are nearly flat; batch statistics are not)"))
    for key in ("loss", "loss/l2", "loss/ssim", "loss/focal"):
        rows.append(row(tag, f"synthetic batch: {key}", losses[key].reshape(1), out[key], note))
    return rows


def _padded(batches: Sequence[torch.Tensor]) -> torch.Tensor:
    """Batches of image indices as one rectangular tensor (-1 fills a short last batch)."""
    width = max(len(b) for b in batches)
    return torch.stack([F.pad(b, (0, width - len(b)), value=-1) for b in batches])


def _first_loss(model: Stfpm | Fastflow, data: Data, plan: EpochPlan, seed: int) -> torch.Tensor:
    """The training loss of epoch 0's first batch, in train mode (batch statistics), on a copy of the model
    (train-mode BatchNorm would move the running statistics)."""
    import copy

    clone = copy.deepcopy(model).train()
    with torch.no_grad():
        return clone.training_step(data.train[plan.global_batches(seed, 0)[0]])["loss"].reshape(1)


def _losses_note(ours: Sequence[float], theirs: torch.Tensor) -> str:
    return "ours " + ", ".join(f"{v:.5f}" for v in ours) + "; anomalib " + ", ".join(f"{v:.5f}" for v in theirs.tolist())


def format_table(rows: Sequence[Row]) -> str:
    lines = ["| section | quantity | max abs | rel | note |", "|---|---|---|---|---|"]
    for r in rows:
        cells = ["—" if v is None else f"{v:.2e}" for v in (r.max_abs, r.rel)]
        lines.append(f"| {r.section} | {r.quantity} | {cells[0]} | {cells[1]} | {r.note} |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--data", type=Path, default=REPO / "data" / "tire_small")
    parser.add_argument("--category", default="tire")
    parser.add_argument("--venv", type=Path, default=REPO / ".parity-venv")
    parser.add_argument("--threads", type=int, default=2, help="torch threads, the same on both sides")
    parser.add_argument("--resize", type=int, default=256)
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--test-limit", type=int, default=None, help="first N test images only (default: all)")
    parser.add_argument("--num-neighbors", type=int, default=9, help="anomalib PatchCore's num_neighbors")
    parser.add_argument("--coreset-ratio", type=float, default=0.1)
    parser.add_argument("--patchcore-own", action="store_true", help="also run both full default PatchCore recipes")
    parser.add_argument("--patchcore-backbones", default="wide_resnet50_2:random,tf_efficientnet_lite0:package")
    parser.add_argument("--stfpm-backbones", default="resnet18:random,tf_efficientnet_lite0:package")
    parser.add_argument("--epochs", type=int, default=3, help="training epochs on both sides (0: no training)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--train-resize", type=int, default=128)
    parser.add_argument("--train-crop", type=int, default=128)
    parser.add_argument("--train-stfpm-backbone", default="tf_efficientnet_lite0:package")
    parser.add_argument("--padim-backbones", default="resnet18:random,tf_efficientnet_lite0:package")
    parser.add_argument("--padim-channels", type=int, default=100, help="PaDiM's channel subset (resnet18: 100)")
    parser.add_argument("--padim-seed", type=int, default=1024, help="of the subset (the authors' code: 1024)")
    parser.add_argument("--fastflow-backbones", default="resnet18:random,wide_resnet50_2:random")
    parser.add_argument("--train-fastflow-backbone", default="resnet18:random")
    parser.add_argument("--dinomaly-backbone", default="vit_small_patch14_reg4_dinov2:random")
    parser.add_argument("--dinomaly-resize", type=int, default=128)
    parser.add_argument("--dinomaly-crop", type=int, default=112, help="a multiple of the ViT's patch (14)")
    parser.add_argument("--dinomaly-steps", type=int, default=20, help="optimisation steps on both sides (0: none)")
    parser.add_argument("--efficient-ad-sizes", default="pdn_small,pdn_medium")
    parser.add_argument("--efficient-ad-images", type=int, default=4, help="test images of the efficient_ad section")
    parser.add_argument("--draem-size", type=int, default=256, help="DRAEM's square input (a multiple of 32)")
    parser.add_argument("--draem-width", type=int, default=128, help="DRAEM's base width (the recipes': 128)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write rows and metrics here")
    args = parser.parse_args(argv)
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown --sections {sorted(unknown)}; choose from {SECTIONS}")
    return args


def _pairs(text: str) -> list[tuple[str, str]]:
    return [tuple(item.split(":", 1)) for item in text.split(",") if item]  # type: ignore[misc]


def run(args: argparse.Namespace, runner: Runner) -> tuple[list[Row], dict]:
    torch.set_num_threads(args.threads)
    sections = args.sections.split(",")
    rows: list[Row] = []
    details: dict = {}
    with tempfile.TemporaryDirectory(prefix="parity-weights-") as tmp:
        folder = Path(tmp)
        if "preprocess" in sections:
            rows += section_preprocess(args, runner, folder)
        if "patchcore" in sections:
            for backbone, weights in _pairs(args.patchcore_backbones):
                new, detail = section_patchcore(args, runner, folder, backbone, weights)
                rows += new
                details[f"patchcore/{backbone}"] = detail
        train = args.epochs > 0
        if "stfpm" in sections:
            for backbone, weights in _pairs(args.stfpm_backbones):
                rows += _stfpm_section(args, runner, folder, backbone, weights, None)[0]
            if train:
                backbone, weights = _pairs(args.train_stfpm_backbone)[0]
                data = load_data(args.data, args.category, backbone, args.train_resize, args.train_crop, None)
                new, details["stfpm/trained"] = _stfpm_section(args, runner, folder, backbone, weights, data)
                rows += new
        if "rd" in sections:
            rows += _rd_section(args, runner, folder, None)[0]
            if train:
                data = load_data(args.data, args.category, "wide_resnet50_2", args.train_resize, args.train_crop, None)
                new, details["rd/trained"] = _rd_section(args, runner, folder, data)
                rows += new
        if "padim" in sections:
            for backbone, weights in _pairs(args.padim_backbones):
                new, details[f"padim/{backbone}"] = section_padim(args, runner, folder, backbone, weights)
                rows += new
        if "fastflow" in sections:
            rows += _fastflow_sections(args, runner, folder, details)
        if "dinomaly" in sections:
            rows += _dinomaly_section(args, runner, folder)
        if "efficient_ad" in sections:
            for backbone in args.efficient_ad_sizes.split(","):
                rows += _efficient_ad_section(args, runner, folder, backbone)
        if "draem" in sections:
            rows += _draem_section(args, runner, folder)
    return rows, details


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    rows, details = run(args, subprocess_runner(args.venv, args.threads))
    print(format_table(rows))
    print(f"\n{time.perf_counter() - started:.0f} s, torch {torch.__version__}, {args.threads} threads")
    if args.json:
        args.json.write_text(json.dumps({"rows": [r.__dict__ for r in rows], "metrics": details}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
