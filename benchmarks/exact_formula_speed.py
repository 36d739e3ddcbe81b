"""CPU seconds of the exact distance formula, old vs new, and of the whole kNN search and coreset that use it.

Not a test: a script that prints one table (and optionally writes JSON). Run it alone on the machine.

* ``formula``  the same pairs through the formulas this project used before (float32 difference, square and
  numpy's float32 row sum for coreset values; float64 ``einsum`` for patch scores) and through the fixed-tree
  formula of ``anomaly_core.distances.sq_distances`` (float64 squares, a pairwise tree of elementwise
  additions, the same bits in numpy and torch), on three shapes: every point against one centre (the
  coreset's first centre), gathered (query, candidate) pairs (the kNN's confirmation), and the driver's
  replay (a few hundred candidates against one pick, repeated).
* ``knn``      ``ExactKnn`` built on a tire-sized bank and ``search`` of a tire-sized test set (numpy path).
* ``coreset``  ``greedy_coreset`` of tire-sized training patches at 10 % (approximate: 128-d projection, as
  the demo runs it; ``--exact`` for the 1024-d patches themselves).

Tire-sized (``--scale 1``): 240 training images and 112 test images of 784 patches, 1024-d, a 10 % bank.
The features are synthetic but shaped like real patch features (non-negative, correlated: a ReLU of a
rank-64 map plus noise), generated from a fixed seed.

    python benchmarks/exact_formula_speed.py --threads 16 --json new.json
    python benchmarks/exact_formula_speed.py --threads 16 --repo /path/to/older/checkout --json old.json

``--repo`` times the ``knn`` and ``coreset`` rows with another checkout's engine (its ``anomaly_core``
first on the path), so the whole search and coreset can be compared before and after a change on one
machine; the ``formula`` rows always run both formulas. ``--scale 0.02`` is a smoke run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def features(n: int, dim: int, seed: int) -> np.ndarray:
    """Patch-like float32 features: ReLU of a rank-64 map, plus a little noise."""
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(64, dim)).astype(np.float32) / 8
    out = np.empty((n, dim), np.float32)
    for lo in range(0, n, 8192):
        latent = rng.normal(size=(min(8192, n - lo), 64)).astype(np.float32)
        out[lo : lo + len(latent)] = np.maximum(latent @ mixing, 0) + 0.05 * rng.random((len(latent), dim))
    return out


def old_coreset_values(rows: np.ndarray, center: np.ndarray) -> np.ndarray:
    """The coreset's former formula: float32 difference, square, numpy's float32 row sum."""
    diff = rows - center
    np.multiply(diff, diff, out=diff)
    return diff.sum(axis=1)


def old_pair_values(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The kNN's former formula: float32 difference, float64 einsum."""
    diff = a - b
    return np.einsum("ij,ij->i", diff, diff, dtype=np.float64)


def best_of(repeats: int, work) -> float:
    """The fastest of ``repeats`` runs, in seconds."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return min(times)


def formula_rows(train: np.ndarray, queries: np.ndarray, bank: np.ndarray, repeats: int) -> list[dict]:
    from anomaly_core.distances import sq_distances

    rng = np.random.default_rng(1)
    center = train[len(train) // 2]
    pairs = rng.integers(0, len(bank), size=(len(queries), 3))  # k + 2 candidates per query
    query_rows = np.repeat(np.arange(len(queries)), 3)
    candidates = train[rng.integers(0, len(train), size=256), :128]  # the replay: 128-d points, 2 shards

    def old_pairs() -> None:
        for lo in range(0, len(query_rows), 4096):
            old_pair_values(queries[query_rows[lo : lo + 4096]], bank[pairs.reshape(-1)[lo : lo + 4096]])

    def replay(formula) -> None:
        for pick in range(200):
            formula(candidates, candidates[pick % len(candidates)])

    rows = []
    for name, old, new, count in [
        ("one centre, all points", lambda: old_coreset_values(train, center), lambda: sq_distances(train, center),
         len(train)),
        ("kNN candidate pairs", old_pairs, lambda: sq_distances(queries, bank, query_rows, pairs.reshape(-1)),
         len(query_rows)),
        ("replay 256x128, 200 picks", lambda: replay(old_coreset_values), lambda: replay(sq_distances), 200 * 256),
    ]:
        old_s, new_s = best_of(repeats, old), best_of(repeats, new)
        rows.append({"stage": f"formula: {name}", "pairs": count, "old_s": old_s, "new_s": new_s})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the tire-sized inputs")
    parser.add_argument("--exact", action="store_true", help="coreset on the 1024-d patches, not a projection")
    parser.add_argument("--repeats", type=int, default=3, help="formula timings: best of this many")
    parser.add_argument("--repo", type=Path, default=REPO, help="checkout whose engine runs the knn/coreset rows")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(args.repo.resolve()))
    from anomaly_core.coreset import greedy_coreset
    from anomaly_core.knn import ExactKnn
    from anomaly_core.threads import limit_threads

    limit_threads(args.threads)
    n_train, n_test = max(2, int(240 * args.scale)) * 784, max(1, int(112 * args.scale)) * 784
    train = features(n_train, 1024, seed=0)
    queries = features(n_test, 1024, seed=1)
    bank = train[np.random.default_rng(2).choice(n_train, n_train // 10, replace=False)]
    rows = []
    if args.repo.resolve() == REPO:  # the new formula exists only here
        rows += formula_rows(train, queries, bank, args.repeats)

    started = time.perf_counter()
    knn = ExactKnn(bank, threads=args.threads)
    built = time.perf_counter() - started
    started = time.perf_counter()
    knn.search(queries, 1, args.threads)
    searched = time.perf_counter() - started
    rows.append({"stage": f"knn build ({knn.screen})", "seconds": built})
    rows.append({"stage": "knn search", "seconds": searched, "images_per_s": n_test / 784 / searched,
                 "unproven_queries": knn.unproven_queries, "survivors": knn.survivors})
    started = time.perf_counter()
    result = greedy_coreset(train, ratio=0.1, method="exact" if args.exact else "approximate", seed=0,
                            threads=args.threads)
    rows.append({"stage": f"coreset ({'exact' if args.exact else 'approximate-128'})",
                 "seconds": time.perf_counter() - started, "picks": len(result.indices), "rounds": result.n_rounds})

    print(f"engine {args.repo.resolve()}, {args.threads} threads, {n_train} train / {n_test} test patches, "
          f"bank {len(bank)} x 1024")
    for row in rows:
        if "old_s" in row:
            print(f"{row['stage']:<42} old {row['old_s']:8.4f} s   new {row['new_s']:8.4f} s   "
                  f"new/old {row['new_s'] / row['old_s']:5.2f}")
        else:
            extra = ", ".join(f"{key}={value:.1f}" if isinstance(value, float) else f"{key}={value}"
                              for key, value in row.items() if key not in ("stage", "seconds"))
            print(f"{row['stage']:<42} {row['seconds']:8.3f} s   {extra}")
    if args.json:
        args.json.write_text(json.dumps({"repo": str(args.repo.resolve()), "threads": args.threads,
                                         "scale": args.scale, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
