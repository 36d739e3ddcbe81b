"""Cluster-side timings: extractor throughput for 1, 2, 4 actors, distributed-greedy overhead, demo end to end.

    python benchmarks/cluster_throughput.py [--actors 1 2 4] [--skip-demo]

Prints a markdown report (paste into docs/BENCHMARKS.md with the machine it ran on). Not a test.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import numpy as np  # noqa: E402
import ray  # noqa: E402

from anomaly_core.config import parse_config  # noqa: E402
from anomaly_core.coreset import greedy_coreset  # noqa: E402
from anomaly_core.data import load_split  # noqa: E402
from cluster.coreset import HolderPool, distributed_coreset  # noqa: E402
from cluster.pipeline import BenchmarkPipeline  # noqa: E402
from jobs import benchmark  # noqa: E402
from jobs.cli import load_config  # noqa: E402
from jobs.ray_runtime import start_ray  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TIRE = REPO / "data" / "tire_small"


def config(n_extractors: int, holders: int = 2):
    return parse_config({
        "datasets": [{"name": "tire_small", "format": "mvtec", "root": str(TIRE)}],
        "backbone": {"name": "tf_efficientnet_lite0", "layers": ["blocks.2", "blocks.4"], "weights": "package"},
        "cluster": {"num_extractors": n_extractors, "cpus_per_actor": 0.5, "batch_size": 8, "coreset_shards": holders},
        "wandb": {"mode": "off"},
    }, "benchmark")


def extraction_throughput(actors: list[int]) -> list[str]:
    split = load_split("mvtec", TIRE, "tire")
    samples = list(split.train) + list(split.test)
    rows = ["| extractor actors | images | wall s | images/s |", "|---|---|---|---|"]
    for n in actors:
        pipeline = BenchmarkPipeline(config(n))
        started = time.perf_counter()
        ray.get(pipeline._submit(samples))
        seconds = time.perf_counter() - started
        rows.append(f"| {n} | {len(samples)} | {seconds:.1f} | {len(samples) / seconds:.2f} |")
        for actor in pipeline.extractors + pipeline.evaluators:
            ray.kill(actor)
    return rows


def greedy_overhead() -> list[str]:
    split = load_split("mvtec", TIRE, "tire")
    pipeline = BenchmarkPipeline(config(1))
    refs = pipeline._submit(split.train)
    flat = np.concatenate([part.flat() for part in ray.get(refs)])
    rows = ["| mode | holders | patches | picks | rounds | seconds | ms per round |", "|---|---|---|---|---|---|---|"]
    started = time.perf_counter()
    local = greedy_coreset(flat, ratio=0.1, method="exact", seed=0)
    seconds = time.perf_counter() - started
    rows.append(f"| single process | 1 | {len(flat)} | {len(local.indices)} | {local.n_rounds} | {seconds:.2f} | "
                f"{1000 * seconds / max(local.n_rounds, 1):.1f} |")
    for holders in (1, 2):
        pool = HolderPool(holders)
        ray.get([actor.__ray_ready__.remote() for actor in pool.actors])  # started, as in a pipeline
        started = time.perf_counter()
        _, info = distributed_coreset(refs, pool, "exact", 0.1, 128, seed=0)
        seconds = time.perf_counter() - started
        rounds = info["coreset"]["rounds"]
        rows.append(f"| sharded (Ray actors) | {info['coreset']['holders']} | {len(flat)} | {int(0.1 * len(flat))} | "
                    f"{rounds} | {seconds:.2f} | {1000 * seconds / max(rounds, 1):.1f} |")
    return rows


def demo_end_to_end() -> list[str]:
    demo = load_config(REPO / "configs" / "demo.yaml", ["wandb.mode=off", "output_dir=/tmp/anomaly-bench-bench"])
    started = time.perf_counter()
    run_dir = benchmark.run(demo, run_name=f"bench-{int(time.time())}")
    seconds = time.perf_counter() - started
    return [f"Demo benchmark (`configs/demo.yaml`, {len(demo.datasets)} datasets): **{seconds:.1f} s** end to end "
            f"including actor start-up; outputs in `{run_dir}`."]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--skip-demo", action="store_true")
    args = parser.parse_args()
    start_ray()
    print(f"Machine: {platform.platform()}, {os.cpu_count()} CPUs, Ray {ray.__version__}\n")
    print("### Extraction throughput (tire_small, 62 images, EfficientNet-Lite0 224 px)\n")
    print("\n".join(extraction_throughput(args.actors)) + "\n")
    print("### Distributed greedy coreset overhead (tire_small train patches, exact, 10 %)\n")
    print("\n".join(greedy_overhead()) + "\n")
    if not args.skip_demo:
        print("### End to end\n")
        print("\n".join(demo_end_to_end()))


if __name__ == "__main__":
    main()
