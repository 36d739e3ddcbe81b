"""Training and inference speed of one category on one device: images/s of the trained models — no Ray needed.

    python benchmarks/train_speed.py --device cuda --epochs 10     # on a GPU machine (benchmarks/gpu_check.sh)
    python benchmarks/train_speed.py --device cpu --epochs 1       # the same code path on the CPU (a dry run)

Trains each model with the engine's ``Trainer`` (what a ``jobs.train`` fit task runs) on tire_small's good
training images (34), at the configs' 256 px by default, with the real Lite0 package teacher unless
``--backbone``/``--weights`` say otherwise (``--backbone wide_resnet50_2 --weights random`` costs what the
authors' RD teacher, RD4AD's wide_resnet50_2, costs). Prints, per model, the first epoch's images/s (it includes CUDA's warm-up) and
the median of the later epochs', then the trained model's inference images/s over the same images (the second of
two passes); ``--json`` also writes them to a file. The loss of every step is read back to the host, so each
epoch's seconds include all its GPU work. A model that trains with auxiliary folders (DRAEM's dtd) gets
``--auxiliary name=DIR``, else generated textures (``anomaly_core.data.synthetic.write_textures``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from anomaly_core.data import ImageTransform, load_split  # noqa: E402
from anomaly_core.data.synthetic import write_textures  # noqa: E402
from anomaly_core.extraction import exact_fp32  # noqa: E402
from anomaly_core.registry import MODELS  # noqa: E402
from anomaly_core.training import Trainer, TrainerConfig, load_images, predict_images  # noqa: E402


def train_speed(model_name: str, args: argparse.Namespace, scratch: Path) -> dict:
    """Fit ``model_name`` for ``args.epochs`` epochs on the category's training images; its per-epoch images/s and
    losses, and its inference images/s."""
    entry = MODELS[model_name]
    model_class = entry.model_class()
    mean, std = model_class.normalisation(args.backbone)
    transform = ImageTransform(resize=args.crop, crop=args.crop, mean=mean, std=std)
    images = load_images(load_split("mvtec", args.data, args.category).train, transform)
    given = dict(item.split("=", 1) for item in args.auxiliary)
    auxiliary = {name: given.get(name) or str(write_textures(scratch / name, 8, args.crop)) for name in entry.auxiliary}
    recipe = entry.recipes[entry.default_recipe].values  # the authors' values
    model = model_class(model_class.settings_of({**recipe, "backbone": args.backbone, "layers": (), "crop": args.crop,
                                                  "init_seed": 0, "auxiliary": auxiliary}), args.weights)
    batch = args.batch_size or recipe["batch_size"]
    config = TrainerConfig(epochs=args.epochs, batch_size=batch, log_every_n_steps=10**9, device=args.device)
    result = Trainer(config).fit(model, images)
    rates = [len(images) / epoch["seconds"] for epoch in result.history]
    model.eval()
    for _ in range(2):  # the first pass warms up (CUDA kernels, allocator)
        started = time.perf_counter()
        predict_images(model, images, batch_size=config.predict_batch_size)
        seconds = time.perf_counter() - started
    return {"model": model_name, "device": args.device, "images": len(images), "batch_size": batch, "crop": args.crop,
            "backbone": args.backbone, "epochs": args.epochs, "first_epoch_images_per_s": round(rates[0], 2),
            "later_epochs_images_per_s": round(statistics.median(rates[1:]), 2) if len(rates) > 1 else None,
            "loss_first_epoch": result.history[0]["loss"], "loss_last_epoch": result.history[-1]["loss"],
            "inference_images_per_s": round(len(images) / seconds, 2)}


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
    parser.add_argument("--data", type=Path, default=REPO / "data" / "tire_small")
    parser.add_argument("--category", default="tire")
    parser.add_argument("--auxiliary", action="append", default=[], metavar="NAME=DIR",
                        help="an auxiliary image folder (dtd=/data/dtd/images); default: generated textures")
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
    results = []
    for name in args.models.split(","):
        with tempfile.TemporaryDirectory(prefix="train-speed-") as scratch:
            result = train_speed(name, args, Path(scratch))
        later = result["later_epochs_images_per_s"]
        print(f"train_speed {name} on {args.device} ({args.category}: {result['images']} images, batch "
              f"{result['batch_size']}, {args.crop} px, teacher {args.backbone}): first epoch "
              f"{result['first_epoch_images_per_s']} images/s" + ("" if later is None else f", epochs 2-{args.epochs} "
              f"median {later} images/s") + f"; loss {result['loss_first_epoch']:.4f} -> {result['loss_last_epoch']:.4f}"
              f"; inference {result['inference_images_per_s']} images/s", flush=True)
        results.append(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"torch": torch.__version__, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
