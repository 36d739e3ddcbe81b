"""Where the GPU time of a full benchmark would go, and the tire-shaped category's targets on one H100.

Not a measurement: arithmetic over work and rates, each labelled with where it comes from, printed as the
Markdown tables docs/BENCHMARKS.md carries. The work is what the code does, counted on the CPU where it runs
the same code path (``benchmarks/device_check.py --json``: greedy rounds of the lone colocated holder at 512
candidates, unproven kNN queries under the bf16 screen, extra candidates); measured rates come from this
project's runs (``--decode-json`` from ``benchmarks/decode_speed.py``, maps and the replay timed on this CPU);
projected ones from the H100's peaks and a stated efficiency. It models the colocated design (features stay on
the GPU that made them: no copies to the host, one holder per GPU running the whole greedy itself). Stages
overlap across categories, so a run takes at least its slowest stage ("bound") and at most their sum.

    python benchmarks/gpu_projection.py --decode-json decode_speed_cpu.json --work-json device_check_cpu.json
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
TIRE = {"tire": (239, 112)}  # the tire-shaped category of the end-to-end harness and the GPU check

PATCHES = 28 * 28  # WRN50 layer2 / Lite0 blocks.2 at 224 px
DIM, PROJECTED = 1024, 128  # embedding, approximate coreset's projection
RATIO = 0.1  # coreset
FLOP_PER_IMAGE = 18.37e9  # WRN50 to layer3 at 224 (torch FlopCounterMode, counted here)
H100_FP32_PEAK = 67e12  # dense fp32 without TF32 (the backbone runs fp32: fp32 means fp32)
H100_BF16_PEAK = 989e12  # dense bf16 tensor cores (the screens' products)
H100_HBM = 3.35e12  # bytes/s
EFFICIENCY = 0.6  # assumed share of the fp32 peak for cuDNN convolutions
SCREEN_EFFICIENCY = 0.3  # assumed share of the bf16 peak for the screens' products (skinny per-round ones too)
BANDWIDTH_EFFICIENCY = 0.5  # assumed share of HBM bandwidth for elementwise work (exact formula, top-k passes)
EXACT_BYTES = 30  # bytes moved per (pair, dimension) by the exact formula: gather, difference, float64 square, tree
ROUND_OVERHEAD_S = 1.5e-3  # assumed per greedy round: ~25 kernel launches and 3 host syncs
HOST_GEMM_PER_CORE = 60e9  # measured here: sgemm 119 GFLOP/s on 2 cores (approximate's projection runs on the host)
EXTRACTOR_THREADS = 4  # gpu_check's cluster.cpus_per_actor on a GPU node
EVALUATORS_PER_NODE = 4  # auto: one CPU each for metrics; the extractor decodes on the rest
# Measured on this CPU (2-core Xeon, while other work shared it: upper bounds): the pairwise replay's host work
# per pick and one 224 map (bilinear upsampling + scipy blur); metrics per test image: 1.3 s for 112 images on
# the H200's host, one core.
REPLAY_S_PER_PICK = 2.7e-6
# Counted here on the real tire_small features (Lite0, 26,656 x 1024, 2,665 picks, 512 candidates, bf16 model):
# the share of candidate pairs the lone holder's screen leaves for the exact formula (GreedyShard._between).
PAIR_FRACTION = 0.14
MAP_S = 15.6e-3
METRICS_S_PER_IMAGE = 1.3 / 112


def stages(counts: dict, decode_rate: float, gpus: int, cores_per_gpu: int, work: dict, method: str) -> dict[str, float]:
    """Seconds per stage for one dataset (``counts``: category -> (train, test)) with the coreset ``method``."""
    train = sum(n for n, _ in counts.values())
    test = sum(t for _, t in counts.values())
    images = train + test
    host_cores = gpus * (cores_per_gpu - EVALUATORS_PER_NODE)
    dim = PROJECTED if method == "approximate" else DIM
    points = [n * PATCHES for n, _ in counts.values()]
    picks = sum(RATIO * n for n in points)
    rounds = picks / work["picks_per_round"]
    screen = SCREEN_EFFICIENCY * H100_BF16_PEAK * gpus
    bandwidth = BANDWIDTH_EFFICIENCY * H100_HBM * gpus
    queries = [t * PATCHES for _, t in counts.values()]
    banks = [RATIO * n for n in points]
    candidates = 1 + work["extra_candidates"]
    knn = (sum(2 * q * m * DIM for q, m in zip(queries, banks)) / screen  # the bf16 screen
           + sum(3 * 4 * q * m for q, m in zip(queries, banks)) / bandwidth  # products written, top-k and proof read
           + sum(q * candidates * DIM * EXACT_BYTES for q in queries) / bandwidth)  # the exact candidates
    return {
        "decode (CPU)": images / (decode_rate * host_cores),
        "forward": images * FLOP_PER_IMAGE / (EFFICIENCY * H100_FP32_PEAK * gpus),
        "projection (host)": (sum(2 * n * DIM * PROJECTED for n in points) / (HOST_GEMM_PER_CORE * EXTRACTOR_THREADS * gpus)
                              if method == "approximate" else 0.0),
        "coreset screen": sum(2 * n * RATIO * n * dim for n in points) / screen,
        # one greedy at a time per GPU: rounds, their pairwise candidate distances and the host's replay
        "coreset rounds": (rounds * ROUND_OVERHEAD_S
                           + rounds * PAIR_FRACTION * work["batch"] ** 2 * dim * EXACT_BYTES / (bandwidth / gpus)
                           + picks * REPLAY_S_PER_PICK) / min(gpus, len(counts)),
        "kNN scoring": knn,
        "maps (CPU)": test * MAP_S / (EXTRACTOR_THREADS * gpus),  # on the colocated extractor's own threads
        "metrics (CPU)": test * METRICS_S_PER_IMAGE / (EVALUATORS_PER_NODE * gpus),
    }


def table(decode: dict[str, float], cores_per_gpu: int, work: dict) -> str:
    datasets = [("MVTec AD", MVTEC_AD_COUNTS, decode["mvtec"]), ("VisA", VISA, decode["visa"]),
                ("BTAD", BTAD, decode["mvtec"])]
    names = list(stages(VISA, 1, 1, cores_per_gpu, work, "approximate"))
    rows = ["| dataset | GPUs | " + " | ".join(names) + " | bound (slowest) | sum |", "|" + "---|" * (len(names) + 4)]
    for name, counts, rate in datasets:
        for gpus in (1, 8):
            times = stages(counts, rate, gpus, cores_per_gpu, work, "approximate")
            cells = " | ".join(f"{value:.2f}" for value in times.values())
            rows.append(f"| {name} | {gpus} | {cells} | {max(times.values()):.2f} | {sum(times.values()):.2f} |")
    return "\n".join(rows)


def tire_targets(decode: dict[str, float], cores_per_gpu: int, work: dict) -> str:
    """The tire-shaped category on one H100 against issue 19's targets."""
    rows = ["| coreset method | coreset s (target <= 0.5) | kNN images/s (target >= 2,000) | category s (target <= 3) |",
            "|---|---|---|---|"]
    for method in ("approximate", "exact"):
        times = stages(TIRE, decode["tire"], 1, cores_per_gpu, work, method)
        coreset = times["projection (host)"] + times["coreset screen"] + times["coreset rounds"]
        category = sum(times.values())  # one category: little overlap, so the sum
        rows.append(f"| {method} | {coreset:.2f} | {TIRE['tire'][1] / times['kNN scoring']:,.0f} | {category:.2f} |")
    return "\n".join(rows)


MVTEC_AD_COUNTS = {name: (train, good + sum(defects.values())) for name, (train, good, defects, _) in MVTEC_AD.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--decode-json", type=Path, required=True, help="benchmarks/decode_speed.py --json output")
    parser.add_argument("--work-json", type=Path, required=True, help="benchmarks/device_check.py --json output (CPU)")
    parser.add_argument("--cores-per-gpu", type=int, default=16)
    args = parser.parse_args()
    measured = json.loads(args.decode_json.read_text())
    one_thread = {row["kind"]: row["images_per_s"] for row in measured["decode"] if row["decode_workers"] == 1}
    counted = json.loads(args.work_json.read_text())["exact_math"]["bf16"]
    points = json.loads(args.work_json.read_text())["coreset"]["points"]
    work = {"picks_per_round": RATIO * points / counted["coreset_rounds"], "batch": 512,
            "extra_candidates": counted["extra_candidates"]}
    print(f"work counted on the CPU: {work['picks_per_round']:.0f} picks per round at 512 candidates, "
          f"+{work['extra_candidates']} candidates, {counted['unproven_fraction']:.2%} unproven queries (bf16)\n")
    print(table(one_thread, args.cores_per_gpu, work))
    print()
    print(tire_targets(one_thread, args.cores_per_gpu, work))


if __name__ == "__main__":
    main()
