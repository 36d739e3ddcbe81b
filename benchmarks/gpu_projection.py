"""Where the GPU time of a full benchmark would go: per-stage seconds from measured rates, on 1 and 8 GPUs.

Not a measurement: arithmetic over rates, each labelled with where it comes from, printed as the Markdown
table docs/BENCHMARKS.md carries. Measured rates come from this project's runs (``--decode-json`` from
``benchmarks/decode_speed.py``; the H200 engine-stage figures of docs/BENCHMARKS.md); projected ones from a
device's peak and a stated efficiency. A stage's time is its work divided by its rate; stages overlap across
categories in the pipeline, so a run takes at least its slowest stage ("bound") and at most their sum.

    python benchmarks/gpu_projection.py --decode-json decode_speed_cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.shaped_category import MVTEC_AD  # noqa: E402  (the real per-category counts)

# VisA's 1cls split (amazon-science/spot-diff split_csv/1cls.csv): train, test per category; ~1500 x 1000 JPEG.
VISA = {"candle": (900, 200), "capsules": (542, 160), "cashew": (450, 150), "chewinggum": (453, 150),
        "fryum": (450, 150), "macaroni1": (900, 200), "macaroni2": (900, 200), "pcb1": (904, 200),
        "pcb2": (901, 200), "pcb3": (905, 201), "pcb4": (904, 201), "pipe_fryum": (450, 150)}
# BTAD: 2,830 images in 3 products (VT-ADL, Mishra et al. 2021); the per-product split is an assumption
# (two thirds train), as are the sizes (600-1600 px PNG/BMP, decoded at the 1024 x 1024 PNG rate).
BTAD = {"01": (300, 150), "02": (900, 450), "03": (687, 343)}

PATCHES = 28 * 28  # WRN50 layer2 at 224 px
DIM, PROJECTED = 1024, 128  # embedding, approximate coreset's projection
FLOP_PER_IMAGE = 18.37e9  # WRN50 to layer3 at 224 (torch FlopCounterMode, counted here)
H100_FP32_PEAK = 67e12  # dense fp32 without TF32 (TF32 is off: fp32 means fp32)
EFFICIENCY = 0.6  # assumed share of that peak for cuDNN convolutions and large GEMMs
HOST_LINK = 20e9  # bytes/s assumed for device <-> host copies (PCIe 5 x16 in practice)
METRICS_S_PER_IMAGE = 1.3 / 112  # measured: 1.3 s for a 112-image category on the H200 host, one core
H200_SCREEN_TFLOPS = 0.29e12  # measured on the H200 (2026-11-30), coreset screen as the code then ran it
PICKS_PER_ROUND = 18_737 / 98  # measured: tire-shaped category, 2 holders, coreset_batch 128 (BENCHMARKS)
ROUND_TRIP_S = 3.47e-3  # measured here: one round (centres put once, a call to each of 2 holders), no compute
H200_KNN_IMAGES_S = 42.0  # measured there too, kNN scoring (tire-shaped: 784 patches x 18,737 rows; applied to all)


def stages(counts: dict, decode_rate: float, gpus: int, cores_per_gpu: int, math_rate: float,
           knn_images_s: float | None) -> dict[str, float]:
    """Seconds per stage for one dataset (``counts``: category -> (train, test))."""
    train = sum(n for n, _ in counts.values())
    test = sum(t for _, t in counts.values())
    images = train + test
    decode_cores = gpus * (cores_per_gpu - 2)  # a holder and an evaluator keep one core each per GPU
    coreset_flop = sum(2 * (n * PATCHES) * (0.1 * n * PATCHES) * PROJECTED for n, _ in counts.values())
    knn_flop = sum(2 * (t * PATCHES) * (0.1 * n * PATCHES) * DIM for n, t in counts.values())
    return {
        "decode (CPU)": images / (decode_rate * decode_cores),
        "forward": images * FLOP_PER_IMAGE / (EFFICIENCY * H100_FP32_PEAK * gpus),
        "features to host": images * PATCHES * DIM * 4 / (HOST_LINK * gpus),
        "coreset": coreset_flop / (math_rate * gpus),
        # the driver runs one category's greedy at a time: its round trips do not shrink with more GPUs
        "coreset round trips": sum(0.1 * n * PATCHES for n, _ in counts.values()) / PICKS_PER_ROUND * ROUND_TRIP_S,
        "kNN scoring": (test / (knn_images_s * gpus)) if knn_images_s else knn_flop / (math_rate * gpus),
        "metrics (CPU)": test * METRICS_S_PER_IMAGE / min(8 * gpus, decode_cores),
    }


def table(decode: dict[str, float], cores_per_gpu: int) -> str:
    datasets = [("MVTec AD", MVTEC_AD_COUNTS, decode["mvtec"]), ("VisA", VISA, decode["visa"]),
                ("BTAD", BTAD, decode["mvtec"])]
    rows = ["| dataset | GPUs | math at | " + " | ".join(stages(VISA, 1, 1, cores_per_gpu, 1, None)) +
            " | bound (slowest) | sum |", "|" + "---|" * 11]
    for name, counts, rate in datasets:
        for gpus in (1, 8):
            for label, math_rate, knn in (("measured H200 rates", H200_SCREEN_TFLOPS, H200_KNN_IMAGES_S),
                                          ("60 % of fp32 peak", EFFICIENCY * H100_FP32_PEAK, None)):
                times = stages(counts, rate, gpus, cores_per_gpu, math_rate, knn)
                cells = " | ".join(f"{value:.1f}" for value in times.values())
                rows.append(f"| {name} | {gpus} | {label} | {cells} | {max(times.values()):.1f} | "
                            f"{sum(times.values()):.1f} |")
    return "\n".join(rows)


MVTEC_AD_COUNTS = {name: (train, good + sum(defects.values())) for name, (train, good, defects, _) in MVTEC_AD.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--decode-json", type=Path, required=True, help="benchmarks/decode_speed.py --json output")
    parser.add_argument("--cores-per-gpu", type=int, default=16)
    args = parser.parse_args()
    measured = json.loads(args.decode_json.read_text())
    one_thread = {row["kind"]: row["images_per_s"] for row in measured["decode"] if row["decode_workers"] == 1}
    print(table(one_thread, args.cores_per_gpu))


if __name__ == "__main__":
    main()
