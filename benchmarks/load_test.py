"""Load: many synthetic categories through ``jobs.benchmark``, with memory sampled the whole time.

    python benchmarks/load_test.py [--categories 20] [--images 300] [--size 128] [--json out.json]

Generates the synthetic textures with ``--images`` images per category (80 % train, the rest test,
two thirds of them defective) and lists the three texture categories under as many dataset names as
needed for ``--categories`` categories (each name gets its own coreset seed, so each category is its
own run of the pipeline). Runs the benchmark in this process with an embedded local Ray and samples,
every 2 s: the object store's used bytes (Ray's memory summary), the RSS of every process of the
machine's Ray session (largest one and the sum; shared object-store pages count once per process
that maps them, so the sum over-states), and the driver's RSS. Bounded memory means the object
store's peak stays at about ``cluster.prefetch_categories`` + 1 categories' features however many
categories run, and no process grows with the category count (printed per category).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import psutil  # noqa: E402
import ray  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from anomaly_core.config import parse_config  # noqa: E402
from anomaly_core.data.synthetic import generate_synthetic  # noqa: E402
from jobs import benchmark  # noqa: E402

TEXTURES = ("weave", "grain", "tiles")


class MemorySampler:
    """Peaks of object-store use and process RSS, sampled in a thread, with a trace per sample."""

    def __init__(self, every: float = 2.0) -> None:
        self.every, self.trace = every, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _object_store_mib(self) -> float | None:
        if not ray.is_initialized():
            return None
        from ray._private.internal_api import memory_summary  # the data behind `ray memory --stats-only`

        text = memory_summary(stats_only=True)
        found = re.search(r"Plasma memory usage (\d+) MiB", text)
        return float(found.group(1)) if found else None

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.wait(self.every):
            rss, roles, private = {}, {}, {}
            for process in psutil.process_iter(["name", "cmdline"]):
                try:
                    line = " ".join(process.info["cmdline"] or [])
                    if process.pid == me.pid or "ray::" in line or "raylet" in line or "gcs_server" in line:
                        memory = process.memory_info()
                        rss[process.pid] = memory.rss / 2**20
                        role = _role(line, process.pid == me.pid)
                        roles[role] = max(roles.get(role, 0.0), rss[process.pid])
                        # RSS counts the object store's shared pages a process has touched, which grows as
                        # the store's arena is reused at new offsets without any leak; anonymous memory
                        # (RSS minus shared pages) is what a process really holds.
                        private[role] = max(private.get(role, 0.0), (memory.rss - memory.shared) / 2**20)
                except psutil.Error:
                    continue
            try:
                store = self._object_store_mib()
            except Exception:  # noqa: BLE001 - the cluster may be starting or stopping
                store = None
            self.trace.append({"t": time.monotonic(), "object_store_mib": store, "driver_rss_mib": rss.get(me.pid, 0.0),
                               "max_process_rss_mib": max(rss.values(), default=0.0), "sum_rss_mib": sum(rss.values()),
                               "role_rss_mib": roles, "role_private_mib": private})

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        keys = ("object_store_mib", "driver_rss_mib", "max_process_rss_mib", "sum_rss_mib")
        return {key: max((row[key] or 0.0) for row in self.trace) for key in keys}


def _role(cmdline: str, driver: bool) -> str:
    """``driver``, an actor class (``ray::Evaluator.score`` -> Evaluator), or the Ray daemon's name."""
    if driver:
        return "driver"
    if "ray::" in cmdline:
        return cmdline.split("ray::", 1)[1].split()[0].split(".")[0] or "ray worker"
    return "raylet" if "raylet" in cmdline else "gcs_server"


def role_quarters(trace: list[dict], key: str) -> dict[str, list[float]]:
    """Peak memory (MiB, ``key`` of the trace) of each process role in each quarter of the run: growth
    shows as a rising row."""
    quarters = [trace[i * len(trace) // 4:(i + 1) * len(trace) // 4] for i in range(4)]
    roles = sorted({role for row in trace for role in row[key]})
    return {role: [round(max((row[key].get(role, 0.0) for row in part), default=0.0), 1) for part in quarters]
            for role in roles}


def make_config(root: Path, n_categories: int, output_dir: Path) -> dict:
    datasets = []
    for start in range(0, n_categories, len(TEXTURES)):
        names = list(TEXTURES[: min(len(TEXTURES), n_categories - start)])
        datasets.append({"name": f"load{start // len(TEXTURES):02d}", "format": "synthetic", "root": str(root),
                         "categories": names})
    return {
        "name": "load", "output_dir": str(output_dir), "datasets": datasets,
        "backbone": {"name": "tf_efficientnet_lite0", "layers": ["blocks.2", "blocks.4"], "weights": "package"},
        "preprocess": {"resize": 128, "crop": 128},
        "coreset": {"method": "approximate", "ratio": 0.1},
        "cluster": {"cpus_per_actor": 2, "prefetch_categories": 2},
        "wandb": {"mode": "off"},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--categories", type=int, default=20)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "anomaly-bench-load")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    n_train = int(0.8 * args.images)
    n_defect = (args.images - n_train) * 2 // 3
    root = generate_synthetic(args.work / "data", categories=TEXTURES, n_train=n_train,
                              n_test_good=args.images - n_train - (n_defect // 4) * 4, n_test_defect_per_type=n_defect // 4,
                              size=args.size)
    config = parse_config(make_config(root, args.categories, args.work / "outputs"), "load_test")
    sampler = MemorySampler()
    started = time.perf_counter()
    run_dir = benchmark.run(config, run_name=f"load-{time.strftime('%Y%m%d-%H%M%S')}")
    seconds = time.perf_counter() - started
    peaks = sampler.stop()
    summary = json.loads((run_dir / "summary.json").read_text())
    images = sum(entry["images"] for entry in summary["categories"])
    result = {"categories": len(summary["categories"]), "images": images, "seconds": round(seconds, 1),
              "peaks_mib": {key: round(value, 1) for key, value in peaks.items()},
              "per_category_s": [round(sum(entry["timings"].get(k, 0.0) for k in ("extract_train_s", "coreset_s",
                                                                                 "evaluate_s")), 1)
                                 for entry in summary["categories"]],
              "trace": sampler.trace}
    print(f"{result['categories']} categories, {images} images in {seconds:.0f} s; peaks (MiB): {result['peaks_mib']}")
    for key, what in (("role_rss_mib", "RSS"), ("role_private_mib", "private (RSS - shared)")):
        result[f"quarters_{key}"] = role_quarters(sampler.trace, key)
        for role, peaks in result[f"quarters_{key}"].items():
            print(f"  {role:<20} peak {what} per quarter of the run (MiB): {peaks}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
