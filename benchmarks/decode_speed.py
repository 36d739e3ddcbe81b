"""Throughput of the extraction's host side (decode + resize 256 / crop 224 + ImageNet normalisation) per
image size and number of decode workers, and optionally of a whole extraction at 1 vs 2 decode workers.

Not a test: a script that prints one table (and optionally writes JSON).

* Images, generated deterministically (seeded) into ``--folder`` (default: a temporary folder), ``--count``
  of each kind: ``tire`` 300 x 400 PNG (the bundled tire photographs resized: the tire-shaped categories'
  size), ``mvtec`` 1024 x 1024 PNG (MVTec AD's size) and ``visa`` 1500 x 1000 JPEG (VisA's size, quality
  90). The large ones are tire photographs resized up plus seeded Gaussian noise (sigma 3 grey levels), so
  that files compress like camera images rather than like smooth upsampled ones; the table gives the
  mean file size.
* ``decode`` (on ``--device``: pinned batches on a GPU): the real load path, ``PatchFeatureExtractor.decoded_batches`` (one task per image on the
  decode workers, batches of ``--batch`` decoded ``prefetch`` ahead), consumed by a loop that does
  nothing else, i.e. no backbone: images/s of wall time, and decode CPU ms per image (summed over the
  workers' threads). Each count runs ``--repeats`` times over the same files; the median is kept.
* ``--extraction N``: a tire-shaped category (``benchmarks/shaped_category.py``, N train images) through
  ``PatchFeatureExtractor.extract`` with EfficientNet-Lite0 (the demo's settings, batch 8) at 1 and 2
  decode workers on ``--device``, with the per-stage seconds: the check that more decode threads do not
  slow a CPU-only extractor whose torch threads (``--torch-threads``) already use the cores.

    python benchmarks/decode_speed.py --workers 1 2 --json decode_speed.json
    python benchmarks/decode_speed.py --workers 1 2 4 8 16 --count 96 --extraction 239 --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anomaly_core.data import Sample, load_split  # noqa: E402
from anomaly_core.extraction import STAGES, ExtractionSettings, PatchFeatureExtractor  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shaped_category import make_shaped_category  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
KINDS = {  # name: (width, height, format, noise sigma)
    "tire": (300, 400, "png", 0.0),
    "mvtec": (1024, 1024, "png", 3.0),
    "visa": (1500, 1000, "jpg", 3.0),
}
LITE0 = dict(backbone="tf_efficientnet_lite0", layers=("blocks.2", "blocks.4"), weights="package")


def make_images(folder: Path, count: int, seed: int) -> dict[str, list[Path]]:
    """``count`` images of each kind under ``folder/<kind>/`` (files already there are reused)."""
    sources = load_split("mvtec", REPO / "data" / "tire_small", "tire").train
    made = {}
    for kind, (width, height, suffix, sigma) in KINDS.items():
        paths = []
        for i in range(count):
            path = folder / kind / f"{i:03d}.{suffix}"
            paths.append(path)
            if path.is_file():
                continue
            rng = np.random.default_rng([seed, list(KINDS).index(kind), i])
            with Image.open(sources[i % len(sources)].image_path) as image:
                pixels = np.asarray(image.convert("RGB").resize((width, height), Image.BICUBIC), dtype=np.float32)
            if rng.integers(2):
                pixels = pixels[:, ::-1]
            pixels = pixels * rng.uniform(0.9, 1.1) + rng.normal(0.0, sigma, pixels.shape) if sigma else pixels
            path.parent.mkdir(parents=True, exist_ok=True)
            options = {"quality": 90} if suffix == "jpg" else {}
            Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8)).save(path, **options)
        made[kind] = paths
    return made


def samples_of(paths: list[Path]) -> list[Sample]:
    return [Sample(str(path), 0, None, "bench", "good", "train") for path in paths]


def decode_rate(extractor: PatchFeatureExtractor, samples: list[Sample], repeats: int) -> dict:
    """Median images/s through ``decoded_batches`` with a consumer that only takes the batches."""
    rates, cpu = [], []
    for _ in range(repeats):
        stages = dict.fromkeys(STAGES, 0.0)
        started = time.perf_counter()
        for _ in extractor.decoded_batches(samples, stages=stages):
            pass
        rates.append(len(samples) / (time.perf_counter() - started))
        cpu.append(stages["decode_s"] / len(samples))
    return {"images_per_s": round(statistics.median(rates), 1), "cpu_ms_per_image": round(1e3 * statistics.median(cpu), 2)}


def extraction_run(root: Path, n_train: int, workers: int, device: str, batch: int) -> dict:
    split = load_split("mvtec", root, "tire")
    train = split.train[:n_train]
    extractor = PatchFeatureExtractor(ExtractionSettings(**LITE0, batch_size=batch), device, workers)
    warm = train[:batch]
    extractor.extract(warm, range(len(warm)))  # warm-up: first-call allocations, cuDNN/oneDNN set-up
    features = extractor.extract(train, range(len(train)))
    return {"decode_workers": workers, "images": len(train), "seconds": round(features.seconds, 3),
            "images_per_s": round(len(train) / features.seconds, 2),
            "stages": {stage: round(seconds, 3) for stage, seconds in features.stages.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path, help="where the images are generated (default: a temporary folder)")
    parser.add_argument("--count", type=int, default=48, help="images of each kind")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="decode worker counts to measure")
    parser.add_argument("--batch", type=int, default=16, help="images per batch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--extraction", type=int, default=0, metavar="N",
                        help="also extract N train images of a tire-shaped category at 1 and 2 decode workers")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (pinned batches; the --extraction runs)")
    parser.add_argument("--torch-threads", type=int, default=os.cpu_count() or 1,
                        help="torch threads of the --extraction runs (a CPU extractor's int(cpus_per_actor))")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder or Path(tmp)
        images = make_images(folder / "decode_speed", args.count, args.seed)
        results: dict = {"machine": {"cpus": os.cpu_count(), "torch": torch.__version__}, "count": args.count,
                         "batch": args.batch, "decode": []}
        print(f"{'images':<26} {'MB/file':>8} {'workers':>8} {'images/s':>9} {'CPU ms/img':>11}")
        for workers in args.workers:
            # on a GPU device the batches are pinned, as in extraction; the backbone is not used
            extractor = PatchFeatureExtractor(ExtractionSettings(**LITE0, batch_size=args.batch), args.device, workers)
            for kind, paths in images.items():
                width, height, suffix, _ = KINDS[kind]
                megabytes = sum(path.stat().st_size for path in paths) / len(paths) / 1e6
                row = {"kind": kind, "size": f"{width}x{height} {suffix}", "mb_per_file": round(megabytes, 3),
                       "decode_workers": workers, **decode_rate(extractor, samples_of(paths), args.repeats)}
                results["decode"].append(row)
                print(f"{kind + ' ' + row['size']:<26} {megabytes:>8.2f} {workers:>8} {row['images_per_s']:>9.1f} "
                      f"{row['cpu_ms_per_image']:>11.2f}")
        if args.extraction:
            torch.set_num_threads(args.torch_threads)
            root = make_shaped_category(REPO / "data" / "tire_small", folder / "shaped", "tire", n_train=args.extraction,
                                        n_test=1)
            runs = [extraction_run(root, args.extraction, workers, args.device, 8) for workers in (1, 2)]
            results["extraction"] = {"device": args.device, "torch_threads": args.torch_threads, "runs": runs}
            print(f"\nextraction, Lite0 256->224, {args.extraction} tire-shaped images on {args.device}, "
                  f"{args.torch_threads} torch threads")
            print(f"{'workers':>8} {'seconds':>8} {'images/s':>9}  " + " ".join(f"{s:>13}" for s in STAGES))
            for run in runs:
                print(f"{run['decode_workers']:>8} {run['seconds']:>8.2f} {run['images_per_s']:>9.2f}  "
                      + " ".join(f"{run['stages'][s]:>13.3f}" for s in STAGES))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
