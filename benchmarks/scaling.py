"""Scaling of extraction, coreset and scoring with 1, 2 and 4 actors on a simulated multi-node cluster.

    python benchmarks/scaling.py [--actors 1 2 4] [--nodes 4] [--n-train 239] [--n-test 112]

A ``ray.cluster_utils.Cluster`` with ``--nodes`` worker nodes of ``--cpus-per-node`` CPUs (default 4
x 1, plus a head that runs only the driver) holds the actors where the resource plan places them: one
per node by default, so features, banks and test shards cross nodes through Ray's object transfer as
on a real cluster (on one machine that transfer costs the same cores the actors compute on). For each actor
count it times, on the tire-shaped category of ``benchmarks/shaped_category.py`` (demo settings):

* extraction: n extractors embed the training images (one torch thread each, as ``cpus_per_actor: 1``);
* coreset: n holders run the sharded exact greedy (10 %, approximate mode) on those features;
* scoring: n evaluators score the test images' shards against the resulting bank.

Speed-up is t(1) / t(n) and efficiency speed-up / n, each measured in this run. Every count must give
bit-identical features, bank and scores (checked; a mismatch aborts). The nodes are simulated on one
machine, so the speed-up can never exceed the machine's core count: on the 2-core development
machine the 4-actor column measures the cost of oversubscription, not of distribution.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import numpy as np  # noqa: E402
import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from anomaly_core.config import parse_config  # noqa: E402
from anomaly_core.data import load_split  # noqa: E402
from anomaly_core.features import merge_features  # noqa: E402
from anomaly_core.scoring import ScoringParams, merge_predictions  # noqa: E402
from cluster.evaluator import bank_reference  # noqa: E402
from cluster.pipeline import BenchmarkPipeline, CategoryJob  # noqa: E402
from shaped_category import make_shaped_category  # noqa: E402


def config(n: int):
    return parse_config({
        "datasets": [{"name": "bench", "format": "mvtec", "root": "."}],
        "backbone": {"name": "tf_efficientnet_lite0", "layers": ["blocks.2", "blocks.4"], "weights": "package"},
        "coreset": {"method": "approximate", "ratio": 0.1},
        "cluster": {"num_extractors": n, "num_evaluators": n, "coreset_shards": n, "cpus_per_actor": 1,
                    "coreset_threads": 1, "eval_threads": 1, "batch_size": 8},
        "wandb": {"mode": "off"},
    }, "scaling")


def digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for array in arrays:
        h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()[:12]


def measure(n: int, job: CategoryJob) -> dict:
    pipeline = BenchmarkPipeline(config(n))
    ray.get([a.__ray_ready__.remote() for a in pipeline.extractors + pipeline.evaluators + pipeline.holders.actors])
    started = time.perf_counter()
    train = pipeline._submit(job.split.train)
    train_refs = [shard.refs()[0] for shard in train]
    ray.wait(train_refs, num_returns=len(train_refs), fetch_local=False)  # not copied to the driver yet
    extract_s = time.perf_counter() - started
    features = merge_features(ray.get(train_refs))
    test_refs = [shard.refs()[0] for shard in pipeline._submit(job.split.test)]
    ray.get(test_refs)
    bank = pipeline.build_bank(job, train)
    coreset_s = bank.metadata["timings"]["coreset_s"]
    bank_ref = bank_reference(bank.features)
    started = time.perf_counter()
    parts = ray.get([
        pipeline.evaluators[i % n].score.remote("bench", bank_ref, ScoringParams(), ref, 224, 1)
        for i, ref in enumerate(test_refs)
    ])
    scoring_s = time.perf_counter() - started
    predictions = merge_predictions(parts)
    for actor in pipeline.extractors + pipeline.evaluators + pipeline.holders.actors:
        ray.kill(actor)
    return {
        "extract_s": extract_s, "coreset_s": coreset_s, "scoring_s": scoring_s,
        "images": (len(job.split.train), len(job.split.test)),
        "features": digest(features.embeddings), "bank": bank.sha256[:12],
        "scores": digest(predictions.scores, predictions.maps),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--cpus-per-node", type=int, default=1)
    parser.add_argument("--n-train", type=int, default=239)
    parser.add_argument("--n-test", type=int, default=112)
    parser.add_argument("--work", type=Path, default=Path("/tmp/anomaly-bench-scaling"))
    args = parser.parse_args()
    root = make_shaped_category(REPO / "data" / "tire_small", args.work, "tire", args.n_train, args.n_test)
    split = load_split("mvtec", root, "tire")
    job = CategoryJob("bench", str(root), split)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "node_ip_address": "127.0.0.1",
                                                            "include_dashboard": False})
    for _ in range(args.nodes):
        cluster.add_node(num_cpus=args.cpus_per_node, node_ip_address="127.0.0.1")
    ray.init(address=cluster.address)
    try:
        results = {n: measure(n, job) for n in args.actors}
    finally:
        ray.shutdown()
        cluster.shutdown()
    base = results[args.actors[0]]
    identical = {key: len({r[key] for r in results.values()}) == 1 for key in ("features", "bank", "scores")}
    print(f"Machine: {os.cpu_count()} CPUs, {platform.platform()}, Ray {ray.__version__}; simulated cluster: "
          f"{args.nodes} nodes x {args.cpus_per_node} CPU; category {len(split.train)} train / {len(split.test)} test images\n")
    print("| actors | extraction s | speed-up | eff. | coreset s | speed-up | eff. | scoring s | speed-up | eff. |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n, r in results.items():
        cells = []
        for stage in ("extract_s", "coreset_s", "scoring_s"):
            speedup = base[stage] / r[stage]
            cells += [f"{r[stage]:.1f}", f"{speedup:.2f}x", f"{speedup / n * args.actors[0]:.0%}"]
        print(f"| {n} | " + " | ".join(cells) + " |")
    print(f"\nbit-identical across actor counts: {identical} "
          f"(features {base['features']}, bank {base['bank']}, scores {base['scores']})")
    if not all(identical.values()):
        sys.exit("results differ between actor counts")


if __name__ == "__main__":
    main()
