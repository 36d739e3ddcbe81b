"""The coreset and the kNN scoring quiet and beside a busy process: how much slower when cores are shared.

Not a test: a script that prints one table (and optionally writes JSON). Run it alone on the machine.

For each thread setting — 1, 2 and ``default`` (no ``threads`` argument and no thread limits: whatever
the libraries choose) — it times, each in a fresh interpreter:

* ``coreset``   ``greedy_coreset`` (exact greedy, or ``--method approximate``) of real tire patches;
* ``knn build`` ``ExactKnn`` on the resulting bank (the projected screen for D >= 512);
* ``knn search`` the nearest bank row of every patch of real tire test images;

(a) quiet and (b) beside a busy process: a separate interpreter multiplying float32 matrices in a loop
on ``--busy-threads`` BLAS threads, started before and stopped after each measurement by this script.
A setting's numbers are the median over ``--repeats``. The slow-down column is busy / quiet.

``--before REV`` also measures the engine at git revision REV (exported to a temporary folder), e.g.
the commit before blocks ran on one-thread workers, so old and new are timed in the same run. A
numbered setting runs inside ``threadpool_limits(n)`` with ``threads=n``, as the actors set it.

Every setting must give the same picks and neighbours: the table says whether they did.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/shared_cores.py --before cb431ba --json out.json
    python benchmarks/shared_cores.py --n 3136 --test-images 2 --repeats 1       # a smoke run

Features: EfficientNet-Lite0 blocks.2 + blocks.4 at 224 px (the demo's), ``--dim``-d, from the bundled
tire subset grown to full size (``benchmarks/shaped_category.py``), via ``coreset_speed.real_tire_patches``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SETTINGS = ("1", "2", "default")
STAGES = ("coreset", "knn build", "knn search")

_BUSY = """
import sys
import numpy as np
from threadpoolctl import threadpool_limits
threadpool_limits(int(sys.argv[1]), "blas")
a = np.random.default_rng(0).standard_normal((512, 512)).astype(np.float32)
a @ a
print("ready", flush=True)
while True:
    a @ a
"""


def digest(*arrays: np.ndarray) -> str:
    found = hashlib.sha256()
    for array in arrays:
        found.update(np.ascontiguousarray(array).tobytes())
    return found.hexdigest()[:16]


def child(args: argparse.Namespace) -> None:
    """One setting in this interpreter, with the engine from ``--code``; prints its JSON line."""
    sys.path.insert(0, str(args.code))
    import inspect

    from threadpoolctl import threadpool_limits

    from anomaly_core.coreset import greedy_coreset
    from anomaly_core.knn import ExactKnn

    data = np.load(args.features)
    train, test = data["train"], data["test"]
    threads = None if args.setting == "default" else int(args.setting)
    given = {} if threads is None else {"threads": threads}
    build = given if "threads" in inspect.signature(ExactKnn).parameters else {}  # older engines: no argument
    seconds: dict[str, list[float]] = {stage: [] for stage in STAGES}
    with nullcontext() if threads is None else threadpool_limits(threads, "blas"):
        for _ in range(args.repeats):
            started = time.perf_counter()
            picks = greedy_coreset(train, ratio=args.ratio, method=args.method, seed=0, **given).indices
            seconds["coreset"].append(time.perf_counter() - started)
            started = time.perf_counter()
            knn = ExactKnn(train[picks], **build)
            seconds["knn build"].append(time.perf_counter() - started)
            started = time.perf_counter()
            distances, nearest = knn.search(test, 1, **given)
            seconds["knn search"].append(time.perf_counter() - started)
    print(json.dumps({"seconds": seconds, "picks": digest(picks), "neighbours": digest(distances, nearest),
                      "screen": knn.screen}))


def start_busy(threads: int) -> subprocess.Popen:
    busy = subprocess.Popen([sys.executable, "-c", _BUSY, str(threads)], stdout=subprocess.PIPE, text=True)
    if busy.stdout.readline().strip() != "ready":
        busy.kill()
        raise RuntimeError("the busy process did not start")
    return busy


def stop(busy: subprocess.Popen | None) -> None:
    if busy is not None:
        busy.terminate()
        busy.wait(timeout=30)


def measure(args: argparse.Namespace, code: Path, features: Path, setting: str, busy_threads: int) -> dict:
    """One setting in a fresh interpreter, beside a busy process when ``busy_threads`` > 0."""
    command = [sys.executable, __file__, "--child", "--code", str(code), "--features", str(features),
               "--setting", setting, "--repeats", str(args.repeats), "--ratio", str(args.ratio),
               "--method", args.method]
    busy = start_busy(busy_threads) if busy_threads else None
    try:
        load = os.getloadavg()[0]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
    finally:
        stop(busy)
    if done.returncode != 0:
        raise RuntimeError(f"setting {setting} failed:\n{done.stderr[-3000:]}")
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "load_before": round(load, 2)}


def export(revision: str, folder: Path) -> Path:
    """The repository at ``revision`` in ``folder`` (its engine is what the child imports)."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", revision], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


def real_features(args: argparse.Namespace, path: Path) -> dict:
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "benchmarks"))
    from coreset_speed import real_tire_patches

    train = real_tire_patches(args.n, args.work, "train", args.dim)
    test = real_tire_patches(args.test_images * 784, args.work, "test", args.dim)
    np.savez(path, train=train, test=test)
    return {"train_patches": len(train), "test_patches": len(test), "dim": train.shape[1]}


def table(rows: list[dict]) -> str:
    lines = [f"{'code':<10}{'threads':>9}  {'stage':<11}{'quiet s':>9}{'busy s':>9}{'slow-down':>11}"]
    for row in rows:
        lines.append(f"{row['code']:<10}{row['threads']:>9}  {row['stage']:<11}{row['quiet_s']:>9.3f}"
                     f"{row['busy_s']:>9.3f}{row['slowdown']:>10.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=30_720, help="training patches for the coreset (784 per image)")
    parser.add_argument("--test-images", type=int, default=28, help="test images whose patches are scored")
    parser.add_argument("--dim", type=int, default=1024, help="patch embedding dimension (the demo's: 1024)")
    parser.add_argument("--method", choices=("exact", "approximate"), default="exact",
                        help="greedy on the patches, or on their 128-d random projection (the demo's)")
    parser.add_argument("--ratio", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--busy-threads", type=int, default=1, help="BLAS threads of the busy process")
    parser.add_argument("--before", metavar="REV", help="also measure the engine at this git revision")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "anomaly-bench-shared")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--code", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--features", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--setting", choices=SETTINGS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return
    if args.busy_threads < 1:
        parser.error("--busy-threads must be >= 1")
    args.work.mkdir(parents=True, exist_ok=True)
    features = args.work / f"features-{args.n}-{args.test_images}-{args.dim}.npz"
    described = real_features(args, features)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.machine()) if Path("/proc/cpuinfo").exists() else ""
    print(f"features: {described}, coreset {args.method} at ratio {args.ratio}; {os.cpu_count()} x {cpu}; "
          f"busy process: {args.busy_threads} BLAS thread(s)", flush=True)
    with tempfile.TemporaryDirectory() as old:
        codes = [("current", REPO)] + ([(args.before, export(args.before, Path(old)))] if args.before else [])
        results: dict[tuple[str, str, str], dict] = {}
        for label, code in codes:
            for setting in SETTINGS:
                for mode, busy_threads in (("quiet", 0), ("busy", args.busy_threads)):
                    found = measure(args, code, features, setting, busy_threads)
                    results[label, setting, mode] = found
                    times = ", ".join(f"{stage} {statistics.median(found['seconds'][stage]):.3f}s" for stage in STAGES)
                    print(f"{label} threads={setting} {mode}: {times} (load {found['load_before']})", flush=True)
    rows = []
    for label, _ in codes:
        for setting in SETTINGS:
            quiet, busy = results[label, setting, "quiet"], results[label, setting, "busy"]
            for stage in STAGES:
                quiet_s, busy_s = (statistics.median(found["seconds"][stage]) for found in (quiet, busy))
                rows.append({"code": label, "threads": setting, "stage": stage, "quiet_s": quiet_s, "busy_s": busy_s,
                             "slowdown": busy_s / quiet_s})
    identical = len({(found["picks"], found["neighbours"]) for found in results.values()}) == 1
    print()
    print(table(rows))
    print(f"\nsame picks and neighbours in every setting: {identical}; kNN screen: "
          f"{next(iter(results.values()))['screen']}")
    if args.json is not None:
        args.json.write_text(json.dumps({
            "machine": {"cpus": os.cpu_count(), "cpu": cpu}, "features": described, "method": args.method,
            "ratio": args.ratio, "repeats": args.repeats, "busy_threads": args.busy_threads, "identical": identical,
            "rows": rows, "runs": [{"code": label, "threads": setting, "mode": mode, **found}
                                   for (label, setting, mode), found in results.items()],
        }, indent=2))


if __name__ == "__main__":
    main()
