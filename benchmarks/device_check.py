"""The engine's stages on one device, timed: extraction, coreset, scoring, metrics — no Ray needed.

    python benchmarks/device_check.py --device cuda            # on a GPU machine (benchmarks/gpu_check.sh)
    python benchmarks/device_check.py --device cpu --threads 2  # the same code path on the CPU

On the tire-shaped category (``benchmarks/shaped_category.py``, demo settings) it prints, per stage,
seconds and images/s, the backbone's pure-forward limit (batches already on the device, no decoding),
the coreset's and the search's matrix-product rate, and the metrics; ``--expect image_auroc=0.9008
pixel_auroc=0.9865`` fails the run if a metric differs by more than 0.005 from a CPU run's. With
``--json`` the numbers are also written to a file.

Then the exact math on the device (``exact_math``), with the category's own bank, points and test
patches already on the device: the torch path's kNN neighbours and coreset picks against numpy's, bit
for bit, in bf16 and fp32 screens (a difference fails the run); the largest observed |screened - exact| /
bound of each screen (>= 1 fails the run); kNN images/s and coreset seconds in each precision; the
fraction of queries the screen's candidates could not settle. On ``--device cpu`` the same code runs the
torch path on the CPU (a dry run: ``--n-train 4 --n-test 2``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from anomaly_core.coreset import GreedyShard, coreset_size, greedy_select, start_index_for  # noqa: E402
from anomaly_core.data import load_split  # noqa: E402
from anomaly_core.distances import MatrixDevice, sq_distances  # noqa: E402
from anomaly_core.extraction import ExtractionSettings, PatchFeatureExtractor  # noqa: E402
from anomaly_core.features import coreset_points  # noqa: E402
from anomaly_core.patchcore import coreset_seed, evaluate  # noqa: E402
from anomaly_core.knn import ExactKnn  # noqa: E402
from anomaly_core.scoring import NearestNeighbourScorer, ScoringParams, predict  # noqa: E402
from shaped_category import make_shaped_category  # noqa: E402


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def pure_forward(extractor: PatchFeatureExtractor, batch: int, repeats: int) -> float:
    """Images/s of backbone + patch embedding on batches already on the device (no decode, no copy back)."""
    images = torch.randn(batch, 3, extractor.settings.crop, extractor.settings.crop, device=extractor.device)
    if extractor.half:
        images = images.half()
    with torch.inference_mode():
        for _ in range(2):
            extractor.embedder(extractor.backbone(images))
        synchronize(str(extractor.device))
        started = time.perf_counter()
        for _ in range(repeats):
            extractor.embedder(extractor.backbone(images))
        synchronize(str(extractor.device))
    return batch * repeats / (time.perf_counter() - started)


def bound_ratio(knn: ExactKnn, queries: torch.Tensor) -> float:
    """The largest |screened - exact| / bound over every (query, bank row) pair, exact values on the device."""
    screen, device = knn._screen, knn.device
    products, q_norms = knn._screened(queries, screen)
    restored = products.double() + q_norms[:, None] + screen.margin * screen.sq_norms[None, :]
    bound = screen.margin * (q_norms[:, None] + screen.sq_norms[None, :])
    n, m = products.shape
    exact = sq_distances(queries, knn.bank, torch.arange(n, device=queries.device).repeat_interleave(m),
                         torch.arange(m, device=queries.device).repeat(n)).reshape(n, m)
    return float(((restored - exact).abs() / bound).max())


def exact_math(device: str, points: np.ndarray, bank: np.ndarray, queries: np.ndarray, n_images: int,
               threads: int, seed: int, every: int) -> tuple[dict, list[str]]:
    """The torch path on ``device`` against numpy: identical results, the bf16 bound's use, speed, unproven
    queries. Returns the numbers and the failures."""
    out: dict = {"numpy_reference": {}}
    failures: list[str] = []
    host = MatrixDevice("cpu")
    n_select = coreset_size(len(points), None, 0.1)
    start = start_index_for(len(points), seed)
    started = time.perf_counter()
    reference_picks = greedy_select([GreedyShard(points, np.arange(len(points)), host, threads=threads)], n_select,
                                    start, batch=128).indices
    out["numpy_reference"]["coreset_s"] = time.perf_counter() - started
    sample = queries[::every]
    started = time.perf_counter()
    reference = ExactKnn(bank, host, threads=threads).search(sample, 1, threads)
    out["numpy_reference"]["knn_s"] = time.perf_counter() - started
    on_device = torch.device(device)
    points_t, bank_t, queries_t = (torch.from_numpy(a).to(on_device) for a in (points, bank, queries))
    for precision in ("bf16", "fp32"):
        math = MatrixDevice(device, use_torch=True, precision=precision)
        synchronize(device)
        started = time.perf_counter()
        picks = greedy_select([GreedyShard(points_t, np.arange(len(points)), math)], n_select, start, batch=128).indices
        synchronize(device)
        incremental_s = time.perf_counter() - started
        # As a colocated holder runs it (CoresetHolder.select): the candidates' distances to each other on the
        # device, and more candidates per round (cluster.coreset_batch=512 in gpu_check's GPU settings).
        started = time.perf_counter()
        together = greedy_select([GreedyShard(points_t, np.arange(len(points)), math)], n_select, start, batch=512,
                                 pairwise=True)
        synchronize(device)
        coreset_s = time.perf_counter() - started
        if not np.array_equal(together.indices, reference_picks):
            failures.append(f"{precision} coreset picks with the pairwise replay differ from numpy's")
        knn = ExactKnn(bank_t, math)
        knn.search(queries_t[:1024], 1)  # warm-up (kernels, workspaces)
        knn.unproven_queries = knn.survivors = 0
        synchronize(device)
        started = time.perf_counter()
        distances, indices = knn.search(queries_t, 1)
        synchronize(device)
        search_s = time.perf_counter() - started
        ratio = bound_ratio(knn, queries_t[:: max(1, len(queries) // 256)][:256])
        same_picks = bool(np.array_equal(picks, reference_picks))
        same_knn = bool(np.array_equal(distances[::every], reference[0]) and np.array_equal(indices[::every],
                                                                                              reference[1]))
        out[precision] = {"coreset_s": coreset_s, "coreset_rounds": together.n_rounds,
                          "coreset_incremental_batch128_s": incremental_s, "knn_search_s": search_s, "knn_images_per_s": n_images / search_s,
                          "max_error_over_bound": ratio, "unproven_fraction": knn.unproven_queries / len(queries),
                          "survivors_per_query": knn.survivors / len(queries), "extra_candidates": knn.extra,
                          "coreset_picks_equal_numpy": same_picks, "knn_equal_numpy": same_knn}
        if not same_picks:
            failures.append(f"{precision} coreset picks differ from numpy's")
        if not same_knn:
            failures.append(f"{precision} kNN neighbours or distances differ from numpy's")
        if not ratio < 1:
            failures.append(f"{precision} screen error reached {ratio:.3f} of its bound")
    return out, failures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads (torch, BLAS)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--fp16", action="store_true", help="half-precision backbone (CUDA)")
    parser.add_argument("--n-train", type=int, default=239)
    parser.add_argument("--n-test", type=int, default=112)
    parser.add_argument("--work", type=Path, default=Path("/tmp/anomaly-bench-device"))
    parser.add_argument("--expect", nargs="*", default=[], metavar="METRIC=VALUE")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--every", type=int, default=8, help="exact math: numpy's kNN reference on every n-th query")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    root = make_shaped_category(REPO / "data" / "tire_small", args.work, "tire", args.n_train, args.n_test)
    split = load_split("mvtec", root, "tire")
    settings = ExtractionSettings("tf_efficientnet_lite0", ("blocks.2", "blocks.4"), "package",
                                  batch_size=args.batch_size, fp16=args.fp16)
    extractor = PatchFeatureExtractor(settings, device=args.device)
    math = MatrixDevice(args.device if args.device.startswith("cuda") else "cpu")
    math_threads = args.threads if math.on_cpu else 1  # one-thread workers for the CPU's products
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.machine()) if Path("/proc/cpuinfo").exists() else platform.machine()
    out: dict = {"device": args.device, "name": torch.cuda.get_device_name() if args.device.startswith("cuda")
                 else f"{os.cpu_count()} x {cpu}", "threads": args.threads, "batch_size": args.batch_size,
                 "fp16": args.fp16}

    out["pure_forward_images_per_s"] = pure_forward(extractor, args.batch_size, 10)
    with torch.inference_mode():
        started = time.perf_counter()
        train = extractor.extract(split.train, range(len(split.train)))
        test = extractor.extract(split.test, range(len(split.test)))
        extract_s = time.perf_counter() - started
    images = len(split.train) + len(split.test)
    out["extract"] = {"seconds": extract_s, "images_per_s": images / extract_s}

    seed = coreset_seed(0, "bench", "tire")
    started = time.perf_counter()
    points = coreset_points(train, "approximate", 128, seed, math_threads)
    shard = GreedyShard(points, np.arange(len(points)), math, threads=math_threads)
    n_select = coreset_size(len(points), None, 0.1)
    result = greedy_select([shard], n_select, start_index_for(len(points), seed), batch=128)
    synchronize(args.device)
    coreset_s = time.perf_counter() - started
    flops = 2.0 * len(points) * n_select * (points.shape[1] + 2)
    out["coreset"] = {"seconds": coreset_s, "points": len(points), "picks": n_select, "rounds": result.n_rounds,
                      "screen_tflops": flops / coreset_s / 1e12}
    bank = train.flat()[result.indices]

    started = time.perf_counter()
    scorer = NearestNeighbourScorer(bank, ScoringParams(), math, math_threads)
    predictions = predict(scorer, test, settings.crop, math_threads)
    synchronize(args.device)
    scoring_s = time.perf_counter() - started
    out["scoring"] = {"seconds": scoring_s, "images_per_s": len(split.test) / scoring_s, "screen": scorer.knn.screen,
                      "unproven_queries": scorer.knn.unproven_queries}

    started = time.perf_counter()
    report = evaluate(split.test, predictions, extractor.transform, 0.3)
    out["metrics_s"] = time.perf_counter() - started
    out["metrics"] = {name: report.values.get(name) for name in ("image_auroc", "pixel_auroc", "aupro")}
    out["total_s"] = extract_s + coreset_s + scoring_s + out["metrics_s"]

    print(f"device {out['device']} ({out['name']}), {images} images ({len(split.train)} train / {len(split.test)} test)")
    print(f"extraction  {extract_s:7.2f} s  {images / extract_s:8.1f} img/s   pure forward limit "
          f"{out['pure_forward_images_per_s']:.1f} img/s (batch {args.batch_size})")
    print(f"coreset     {coreset_s:7.2f} s  {len(points)} -> {n_select} picks, {result.n_rounds} rounds, "
          f"screen {out['coreset']['screen_tflops']:.2f} TFLOP/s")
    print(f"scoring     {scoring_s:7.2f} s  {len(split.test) / scoring_s:8.1f} img/s ({scorer.knn.screen} screen)")
    print(f"metrics     {out['metrics_s']:7.2f} s  " + ", ".join(
        f"{k}={v:.4f}" if v is not None else f"{k}=n/a" for k, v in out["metrics"].items()))  # n/a: too few test images
    print(f"total       {out['total_s']:7.2f} s")
    started = time.perf_counter()
    out["exact_math"], failed = exact_math(args.device, points, bank, test.flat(), len(split.test), args.threads,
                                           seed, args.every)
    out["exact_math"]["seconds"] = time.perf_counter() - started
    for precision in ("bf16", "fp32"):
        row = out["exact_math"][precision]
        print(f"exact math {precision}: kNN {row['knn_images_per_s']:8.1f} img/s, coreset {row['coreset_s']:.3f} s, "
              f"max error/bound {row['max_error_over_bound']:.3f}, unproven {100 * row['unproven_fraction']:.3f} % "
              f"(+{row['extra_candidates']} candidates), equal to numpy: picks {row['coreset_picks_equal_numpy']}, "
              f"kNN {row['knn_equal_numpy']}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    for item in args.expect:
        name, value = item.split("=")
        if abs(out["metrics"][name] - float(value)) > 0.005:
            failed.append(f"{name}: {out['metrics'][name]:.4f} vs expected {float(value):.4f}")
    if failed:
        sys.exit("device check failed (metrics: more than 0.005 from the CPU run's): " + "; ".join(failed))


if __name__ == "__main__":
    main()
