"""Training and inference speed of one category on one device, for every trained model — no Ray needed.

    python benchmarks/train_speed.py --device cuda --epochs 10     # on a GPU machine (benchmarks/gpu_check.sh)
    python benchmarks/train_speed.py --device cpu --epochs 1       # the same code path on the CPU

Each model is built by its registry entry from a config (``ModelEntry.build``: its default recipe, the
authors' values) and trained with the engine's ``Trainer`` (what a ``jobs.train`` fit task runs) on
tire_small's good training images (34, less a recipe's held-out share, as a fit task), at its recipe's image size and with its example config's backbone
(``configs/<model>.yaml``: the authors' WRN50 / ResNet18 / DINOv2 ViT-B) at random init, which costs what the
pretrained weights cost, unless ``--backbone``/``--weights``/``--crop`` say otherwise (``--backbone
tf_efficientnet_lite0 --weights package``: the real Lite0 teacher). A model that trains with an auxiliary folder (DTD, Imagenette) gets
``--auxiliary NAME=DIR``, else tire_small's training images stand in (same cost per image; printed).
Prints, per model, the first epoch's training images/s (it includes CUDA's warm-up), the median of the later
epochs', and inference images/s (``predict`` in batches of ``--predict-batch``, the median of three passes
after one warm-up); ``--json`` also writes them. Losses and scores are read back to the host, so every
figure includes all its GPU work.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from anomaly_core.config import parse_config  # noqa: E402
from anomaly_core.data import ImageTransform, load_split  # noqa: E402
from anomaly_core.extraction import exact_fp32  # noqa: E402
from anomaly_core.registry import MODELS  # noqa: E402
from anomaly_core.training import Trainer, TrainerConfig, held_out_split, load_images  # noqa: E402
from jobs.cli import read_yaml  # noqa: E402


def model_config(model_name: str, args: argparse.Namespace):
    """The model's config: tire_small, the chosen (or its example config's) backbone, its default recipe."""
    entry = MODELS[model_name]
    stand_in = str(args.data / args.category / "train" / "good")
    auxiliary = {name: args.auxiliary.get(name, stand_in) for name in entry.auxiliary}
    example = read_yaml(REPO / entry.config).get("backbone")  # none for a model trained from scratch (DRAEM)
    backbone = {} if example is None else {"name": example["name"], "layers": example.get("layers", [])}
    if args.backbone:
        backbone = {"name": args.backbone, "layers": []}
    if backbone:
        backbone["weights"] = args.weights or "random"
    crop = args.crop or entry.recipes[entry.default_recipe].values["crop"]
    return parse_config({
        "datasets": [{"name": "tire_small", "format": "mvtec", "root": str(args.data)}],
        **({"backbone": backbone} if backbone else {}),
        "preprocess": {"resize": crop, "crop": crop},
        "training": {"model": model_name, "auxiliary": auxiliary,
                     **({"batch_size": args.batch_size} if args.batch_size else {})},
    }, f"train_speed {model_name}")


def images_per_s(seconds: list[float], count: int) -> float:
    return round(count / statistics.median(seconds), 2)


def train_speed(model_name: str, args: argparse.Namespace) -> dict:
    """Fit ``model_name`` for ``args.epochs`` epochs, then time its inference on the same images."""
    config = model_config(model_name, args)
    model = MODELS[model_name].build(config)
    backbone, crop = config.backbone.name, config.preprocess.crop
    mean, std = type(model).normalisation(backbone)
    transform = ImageTransform(resize=crop, crop=crop, mean=mean, std=std)
    images = load_images(load_split("mvtec", args.data, args.category).train, transform)
    training = config.training
    trainer = TrainerConfig(epochs=args.epochs, batch_size=training.batch_size, log_every_n_steps=10**9,
                            device=args.device)
    trained, held_out = held_out_split(len(images), training.held_out_fraction or 0.0, config.seed)  # as a fit task
    result = Trainer(trainer).fit(model, images[trained], held_out=images[held_out] if held_out else None)
    images = images[trained]
    rates = [len(images) / epoch["seconds"] for epoch in result.history]
    model.eval()
    passes = []
    for _ in range(4):  # the first pass warms up (CUDA kernels, allocator) and is not counted
        begin = time.perf_counter()
        for start in range(0, len(images), args.predict_batch):
            batch = images[start : start + args.predict_batch].to(args.device)
            model.predict(batch)["pred_score"].cpu()
        passes.append(time.perf_counter() - begin)
    return {"model": model_name, "device": args.device, "images": len(images), "batch_size": training.batch_size,
            "crop": crop, "backbone": backbone if MODELS[model_name].uses_backbone else None,
            "auxiliary": training.auxiliary, "epochs": args.epochs,
            "first_epoch_images_per_s": round(rates[0], 2),
            "later_epochs_images_per_s": round(statistics.median(rates[1:]), 2) if len(rates) > 1 else None,
            "inference_images_per_s": images_per_s(passes[1:], len(images)), "predict_batch": args.predict_batch,
            "loss_first_epoch": result.history[0]["loss"], "loss_last_epoch": result.history[-1]["loss"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated (default: every trained model)")
    parser.add_argument("--backbone", help="the frozen teacher/encoder (default: the model's example config's)")
    parser.add_argument("--weights", help="package, random or a weights file (default: random)")
    parser.add_argument("--crop", type=int, help="image side, resize = crop (default: the recipe's)")
    parser.add_argument("--batch-size", type=int, help="training batch; default: the default recipe's")
    parser.add_argument("--predict-batch", type=int, default=16, help="images per inference forward pass")
    parser.add_argument("--auxiliary", action="append", default=[], metavar="NAME=DIR",
                        help="an auxiliary image folder (dtd, imagenette); default: tire_small's training images")
    parser.add_argument("--threads", type=int, help="torch threads (CPU runs)")
    parser.add_argument("--data", type=Path, default=REPO / "data" / "tire_small")
    parser.add_argument("--category", default="tire")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.epochs < 1:
        parser.error("--epochs must be >= 1")
    unknown = set(args.models.split(",")) - set(MODELS)
    if unknown:
        parser.error(f"--models: unknown {sorted(unknown)}; choose from {sorted(MODELS)}")
    if args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            parser.error("--device cuda: torch sees no CUDA device here")
        exact_fp32()
    if args.threads:
        torch.set_num_threads(args.threads)
    pairs = [item.partition("=") for item in args.auxiliary]
    if any(not name or not folder for name, _, folder in pairs):
        parser.error("--auxiliary takes NAME=DIR")
    args.auxiliary = {name: folder for name, _, folder in pairs}
    results = []
    for name in args.models.split(","):
        result = train_speed(name, args)
        later = result["later_epochs_images_per_s"]
        print(f"train_speed {name} on {args.device} ({args.category}: {result['images']} images, batch "
              f"{result['batch_size']}, {result['crop']} px, teacher {result['backbone']}): training first epoch "
              f"{result['first_epoch_images_per_s']} images/s" + ("" if later is None else f", epochs 2-{args.epochs} "
              f"median {later} images/s") + f"; inference {result['inference_images_per_s']} images/s (batch "
              f"{args.predict_batch}); loss {result['loss_first_epoch']:.4f} -> {result['loss_last_epoch']:.4f}"
              + (f"; auxiliary {result['auxiliary']}" if result["auxiliary"] else ""), flush=True)
        results.append(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"torch": torch.__version__, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
