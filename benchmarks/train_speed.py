"""Training speed of one category on one device: images/s of Reverse Distillation and STFPM — no Ray needed.

    python benchmarks/train_speed.py --device cuda --epochs 10     # on a GPU machine (benchmarks/gpu_check.sh)
    python benchmarks/train_speed.py --device cpu --epochs 1       # the same code path on the CPU (a dry run)

Trains each model with the engine's ``Trainer`` (what a ``jobs.train`` fit task runs) on tire_small's good
training images (34), at the configs' 256 px by default, with the real Lite0 package teacher unless
``--backbone``/``--weights`` say otherwise (``--backbone wide_resnet50_2 --weights random`` costs what the
authors' RD teacher, RD4AD's wide_resnet50_2, costs). Prints, per model, the first epoch's images/s (it includes CUDA's warm-up) and
the median of the later epochs'; ``--json`` also writes them to a file. The loss of every step is read back
to the host, so each epoch's seconds include all its GPU work. As in a fit task, a recipe's ``held_out_fraction``
of the images is held out (images/s counts the trained ones). EfficientAD, S at its 256 px, on generated penalty
images (``benchmarks/penalty_images.py``):

    python benchmarks/train_speed.py --models efficient_ad --backbone pdn_small --weights random \
        --auxiliary imagenette=/tmp/imagenette --device cuda --epochs 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from anomaly_core.data import ImageTransform, load_split  # noqa: E402
from anomaly_core.extraction import exact_fp32  # noqa: E402
from anomaly_core.registry import MODELS  # noqa: E402
from anomaly_core.training import Trainer, TrainerConfig, held_out_split, load_images  # noqa: E402


def train_speed(model_name: str, images: torch.Tensor, args: argparse.Namespace) -> dict:
    """Fit ``model_name`` for ``args.epochs`` epochs on ``images``; its per-epoch images/s and losses."""
    model_class = MODELS[model_name].model_class()
    recipe = MODELS[model_name].recipes[MODELS[model_name].default_recipe].values  # the authors' values
    auxiliary = dict(item.split("=", 1) for item in args.auxiliary)
    model = model_class(model_class.settings_of({**recipe, "backbone": args.backbone, "layers": (), "crop": args.crop,
                                                  "init_seed": 0, "auxiliary": auxiliary}), args.weights)
    batch = args.batch_size or recipe["batch_size"]
    config = TrainerConfig(epochs=args.epochs, batch_size=batch, log_every_n_steps=10**9, device=args.device)
    trained, held_out = held_out_split(len(images), recipe.get("held_out_fraction") or 0.0, 0)
    result = Trainer(config).fit(model, images[trained], held_out=images[held_out] if held_out else None)
    rates = [len(trained) / epoch["seconds"] for epoch in result.history]
    return {"model": model_name, "device": args.device, "images": len(trained), "batch_size": batch, "crop": args.crop,
            "backbone": args.backbone, "epochs": args.epochs, "first_epoch_images_per_s": round(rates[0], 2),
            "later_epochs_images_per_s": round(statistics.median(rates[1:]), 2) if len(rates) > 1 else None,
            "loss_first_epoch": result.history[0]["loss"], "loss_last_epoch": result.history[-1]["loss"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--models", default="reverse_distillation,stfpm")
    parser.add_argument("--backbone", default="tf_efficientnet_lite0", help="the frozen teacher")
    parser.add_argument("--weights", default="package", help="package, random or a weights file")
    parser.add_argument("--crop", type=int, default=256, help="image side (resize = crop)")
    parser.add_argument("--batch-size", type=int, help="default: the authors' recipe's (RD 16, STFPM 32)")
    parser.add_argument("--threads", type=int, help="torch threads (CPU runs)")
    parser.add_argument("--auxiliary", action="append", default=[], metavar="NAME=DIR",
                        help="an auxiliary image folder a model trains with (efficient_ad: imagenette=DIR)")
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
    missing = [f"{aux}=DIR" for name in args.models.split(",") for aux in MODELS[name].auxiliary
               if not any(item.startswith(f"{aux}=") for item in args.auxiliary)]
    if missing:
        parser.error(f"--auxiliary {missing[0]}: the model trains with that folder")
    samples = load_split("mvtec", args.data, args.category).train
    results = []
    for name in args.models.split(","):
        mean, std = MODELS[name].model_class().normalisation(args.backbone)
        images = load_images(samples, ImageTransform(resize=args.crop, crop=args.crop, mean=mean, std=std))
        result = train_speed(name, images, args)
        later = result["later_epochs_images_per_s"]
        print(f"train_speed {name} on {args.device} ({args.category}: {result['images']} images, batch "
              f"{result['batch_size']}, {args.crop} px, teacher {args.backbone}): first epoch "
              f"{result['first_epoch_images_per_s']} images/s" + ("" if later is None else f", epochs 2-{args.epochs} "
              f"median {later} images/s") + f"; loss {result['loss_first_epoch']:.4f} -> {result['loss_last_epoch']:.4f}",
              flush=True)
        results.append(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"torch": torch.__version__, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
