"""Time greedy k-center coreset selection: ours vs anomalib's KCenterGreedy vs plain numpy.

Not a test: a script that prints one table (and optionally writes JSON).

* ``ours``      ``anomaly_core.coreset.greedy_coreset(method="exact")`` on the full features, and
  (``approximate``) on their seeded 128-d random projection, as the demo and the reference configs run it.
* ``anomalib``  the real ``anomalib.models.components.sampling.KCenterGreedy`` (SparseRandomProjection
  with eps=0.9, then a full torch min-distance update per step), run in a separate interpreter
  that has anomalib installed (``--anomalib-python``; anomalib is not a project dependency), e.g.
  ``python3 -m venv /tmp/anomalib-venv && /tmp/anomalib-venv/bin/pip install 'anomalib==2.*'``.
* ``numpy``     textbook exact greedy, a full O(N·D) float32 update per step; it uses the same
  distance formula as ours, so its picks must be identical (checked and printed).

Every time is measured in this run on the same features; the speedup column divides the
baseline's seconds by each row's. Coverage radii are computed in the original feature space.

    python benchmarks/coreset_speed.py --n 50000 --dim 1024 --ratio 0.1
    python benchmarks/coreset_speed.py --real --n 31360             # real tire patches, demo settings
    python benchmarks/coreset_speed.py --features feats.npy --ratio 0.1   # real features [N, D]

``--real`` embeds real tire photographs (the bundled subset grown to full size by
``benchmarks/shaped_category.py``) with the demo's settings: EfficientNet-Lite0 ImageNet weights,
blocks.2 + blocks.4, 256 -> 224, 1024-d patches, 784 per image.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anomaly_core.coreset import coverage_radius, greedy_coreset, start_index_for  # noqa: E402
from anomaly_core.distances import sq_dists  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shaped_category import make_shaped_category  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

DEFAULT_ANOMALIB_PYTHON = "/tmp/anomalib-venv/bin/python"

_ANOMALIB_CHILD = """
import json, sys, time
import numpy as np, torch
from anomalib.models.components.sampling import KCenterGreedy
features_path, ratio, seed, out_path = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
embedding = torch.from_numpy(np.load(features_path))
torch.manual_seed(seed)
sampler = KCenterGreedy(embedding=embedding, sampling_ratio=ratio)
start = time.perf_counter()
indices = sampler.select_coreset_idxs()
seconds = time.perf_counter() - start
np.save(out_path, np.asarray(indices, dtype=np.int64))
print(json.dumps({"seconds": seconds, "projected_dim": int(sampler.features.shape[1]),
                  "torch": torch.__version__, "threads": torch.get_num_threads()}))
"""


def patchcore_like(n: int, dim: int, seed: int, components: int = 32, latent: int = 16) -> np.ndarray:
    """Clustered features with low intrinsic dimension, shaped like CNN patch features.

    A Gaussian mixture in a ``latent``-dimensional space (anisotropic components of varied
    size) pushed through a fixed random two-layer ReLU map to ``dim`` dims: non-negative,
    correlated channels, a decaying spectrum, plus a little noise.
    """
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(components, latent)) * 2.5
    scales = rng.uniform(0.2, 1.0, size=(components, latent))
    hidden_w = (rng.normal(size=(latent, 256)) / np.sqrt(latent)).astype(np.float32)
    out_w = (rng.normal(size=(256, dim)) / np.sqrt(256)).astype(np.float32)
    out = np.empty((n, dim), np.float32)
    for lo in range(0, n, 16384):
        m = min(16384, n - lo)
        labels = rng.integers(components, size=m)
        u = (means[labels] + rng.normal(size=(m, latent)) * scales[labels]).astype(np.float32)
        hidden = np.maximum(u @ hidden_w, 0.0)
        out[lo : lo + m] = np.maximum(hidden @ out_w, 0.0) + 0.01 * rng.random((m, dim), dtype=np.float32)
    return out


def real_tire_patches(n: int, work: Path, part: str = "train", dim: int = 1024) -> np.ndarray:
    """The first ``n`` demo-setting patch embeddings of real tire ``part`` (train or test) images
    (float32 [n, dim]; the demo's ``dim`` is 1024)."""
    import torch

    from anomaly_core.data import load_split
    from anomaly_core.extraction import ExtractionSettings, PatchFeatureExtractor

    root = make_shaped_category(REPO / "data" / "tire_small", work, "tire")
    split = load_split("mvtec", root, "tire")
    samples = split.train if part == "train" else split.test
    torch.set_num_threads(os.cpu_count() or 1)
    extractor = PatchFeatureExtractor(ExtractionSettings("tf_efficientnet_lite0", ("blocks.2", "blocks.4"), "package",
                                                         target_dim=dim))
    images = -(-n // 784)
    if images > len(samples):
        raise SystemExit(f"{n} {part} patches need {images} images; the category has {len(samples)}")
    return extractor.extract(samples[:images], range(images)).flat()[:n]


def naive_greedy(features: np.ndarray, n_select: int, start: int) -> np.ndarray:
    """Plain exact greedy: every step updates all N min-distances (the O(N·D) reference)."""
    d = np.full(len(features), np.inf, np.float32)
    picked = np.zeros(len(features), dtype=bool)
    picks = [start]
    for _ in range(n_select - 1):
        picked[picks[-1]] = True
        np.minimum(d, sq_dists(features, features[picks[-1]]), out=d)
        picks.append(int(np.argmax(np.where(picked, -np.inf, d))))
    return np.array(picks, np.int64)


def run_anomalib(python: str, features: np.ndarray, ratio: float, seed: int) -> tuple[float, np.ndarray, dict]:
    with tempfile.TemporaryDirectory() as tmp:
        feats, out = Path(tmp, "features.npy"), Path(tmp, "indices.npy")
        np.save(feats, features)
        command = [python, "-c", _ANOMALIB_CHILD, str(feats), str(ratio), str(seed), str(out)]
        env = dict(os.environ, TQDM_DISABLE="1")
        proc = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
        note = ""
        if proc.returncode == -9:
            # Killed for memory: when each step's temporary (N x ~255 floats) is just under glibc's
            # 32 MB dynamic mmap limit, its heap can grow ~18 MB a step (seen at N = 31,360). A fixed
            # mmap threshold returns every temporary at once, at the cost of page faults per step.
            env["MALLOC_MMAP_THRESHOLD_"] = "131072"
            proc = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
            note = ", rerun with MALLOC_MMAP_THRESHOLD_=131072 after running out of memory"
        if proc.returncode != 0:
            raise RuntimeError(f"anomalib baseline failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        info = json.loads(proc.stdout.strip().splitlines()[-1])
        return info["seconds"], np.load(out), {**info, "note": note}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, help="points (synthetic, default 50000), or first N rows of --features")
    parser.add_argument("--dim", type=int, default=1024, help="feature dimension (synthetic)")
    parser.add_argument("--ratio", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--features", type=Path, help="real features, .npy [N, D] float32, instead of synthetic")
    parser.add_argument("--real", action="store_true", help="real tire patch embeddings (demo settings)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "anomaly-bench-coreset")
    parser.add_argument("--anomalib-python", default=DEFAULT_ANOMALIB_PYTHON, help="interpreter with anomalib 2.x")
    parser.add_argument("--skip-anomalib", action="store_true")
    parser.add_argument("--skip-numpy", action="store_true", help="skip the plain O(N·D)-per-step greedy")
    parser.add_argument(
        "--blas-threads", type=int, default=os.cpu_count(),
        help="threads for our runs (anomalib's torch uses every core)",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.real:
        features = real_tire_patches(args.n or 31_360, args.work)
        source = "real tire patches, EfficientNet-Lite0 blocks.2+4 at 224 px, 1024-d"
    elif args.features is not None:
        features = np.ascontiguousarray(np.load(args.features)[: args.n], dtype=np.float32)
        source = f"{args.features} (first {len(features)} rows)"
    else:
        features = patchcore_like(args.n or 50_000, args.dim, args.seed)
        source = "synthetic patchcore_like"
    n, dim = features.shape
    n_select = max(1, int(args.ratio * n))
    print(f"features: {source}, N={n}, D={dim}, n_select={n_select}, cpus={os.cpu_count()}, "
          f"our blas threads={args.blas_threads}", flush=True)

    rows: list[dict] = []
    with threadpool_limits(limits=args.blas_threads, user_api="blas"):
        start = time.perf_counter()
        ours = greedy_coreset(features, ratio=args.ratio, method="exact", seed=args.seed, threads=args.blas_threads)
        seconds = time.perf_counter() - start
    rows.append({"method": "ours exact", "seconds": seconds, "indices": ours.indices,
                 "note": f"{ours.n_rounds} rounds"})
    print(f"ours: {rows[-1]['seconds']:.1f}s", flush=True)
    if dim > 128:
        with threadpool_limits(limits=args.blas_threads, user_api="blas"):
            start = time.perf_counter()
            approx = greedy_coreset(features, ratio=args.ratio, method="approximate", projection_dim=128, seed=args.seed,
                                    threads=args.blas_threads)
            seconds = time.perf_counter() - start
        rows.append({"method": "ours approximate (128-d)", "seconds": seconds, "indices": approx.indices,
                     "note": f"{approx.n_rounds} rounds, projection included"})
        print(f"ours approximate: {seconds:.1f}s", flush=True)

    if not args.skip_anomalib and Path(args.anomalib_python).exists():
        seconds, indices, info = run_anomalib(args.anomalib_python, features, args.ratio, args.seed)
        rows.append(
            {"method": "anomalib KCenterGreedy", "seconds": seconds, "indices": indices,
             "note": f"SRP to {info['projected_dim']} dims, torch {info['torch']}, {info['threads']} threads{info['note']}"}
        )
        print(f"anomalib: {seconds:.1f}s", flush=True)
    elif not args.skip_anomalib:
        print(f"anomalib baseline skipped: {args.anomalib_python} not found", flush=True)

    if not args.skip_numpy:
        start = time.perf_counter()
        indices = naive_greedy(features, n_select, start_index_for(n, args.seed))
        same = bool(np.array_equal(indices, ours.indices))
        rows.append({"method": "numpy exact O(N·D)/step", "seconds": time.perf_counter() - start,
                     "indices": indices, "note": f"picks identical to ours: {same}"})
        print(f"numpy: {rows[-1]['seconds']:.1f}s", flush=True)

    baseline = next((r["seconds"] for r in rows if r["method"].startswith("anomalib")), None)
    print(f"\n{'method':<26}{'N':>8}{'D':>6}{'n_sel':>7}{'seconds':>10}{'speedup':>9}{'radius':>10}  note")
    for row in rows:
        row["radius"] = coverage_radius(features, row["indices"])
        speedup = f"{baseline / row['seconds']:.1f}x" if baseline else "-"
        print(f"{row['method']:<26}{n:>8}{dim:>6}{n_select:>7}{row['seconds']:>10.2f}{speedup:>9}"
              f"{row['radius']:>10.4f}  {row['note']}")
    if args.json is not None:
        summary = {"n": n, "dim": dim, "n_select": n_select, "source": source,
                   "rows": [{k: v for k, v in r.items() if k != "indices"} for r in rows]}
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
