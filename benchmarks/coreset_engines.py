"""Greedy coreset CPU seconds of this engine and other checkouts' engines, side by side in one run, as ratios.

Not a test: a script that prints one table. Run it alone on the machine. Each engine runs in its own child
process (its checkout first on the path, one library thread), in turn, ``--repeats`` times each, on the same
clustered points (Gaussian clusters, seeded); each line gives every engine's CPU seconds, its ratio to this
checkout's and a digest of its picks (equal digests: the same picks in the same order), then the median
ratios. Another engine may use another distance formula, and then other picks.

    python benchmarks/coreset_engines.py --other /tmp/base-checkout        # 120k x 128, 12k picks, 2 shards
    python benchmarks/coreset_engines.py --other /tmp/base --n 20000 --select 2000 --repeats 1   # a smoke run

``--profile CHECKOUT`` prints cProfile's top functions of that checkout's run instead.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_CHILD = """
import cProfile, hashlib, json, pstats, sys, time
import numpy as np
repo, n, dim, select, shards, batch, profile = sys.argv[1], *map(int, sys.argv[2:8])
sys.path.insert(0, repo)
from anomaly_core.coreset import greedy_coreset
from anomaly_core.threads import limit_threads
limit_threads(1)
rng = np.random.default_rng(0)
centres = rng.normal(size=(200, dim)).astype(np.float32) * 4
x = (centres[rng.integers(0, 200, n)] + rng.normal(size=(n, dim)).astype(np.float32)).astype(np.float32)
work = lambda: greedy_coreset(x, n_select=select, n_shards=shards, batch=batch)
if profile:
    cProfile.run("work()", "/tmp/coreset_engines.prof")
    pstats.Stats("/tmp/coreset_engines.prof").sort_stats("cumulative").print_stats(25)
    sys.exit()
started = time.process_time()
result = work()
seconds = time.process_time() - started
digest = hashlib.sha256(result.indices.tobytes() + np.float64(result.coverage_radius_sq).tobytes())
print(json.dumps({"seconds": seconds, "picks": digest.hexdigest()[:12]}))
"""


def run(repo: Path, args: argparse.Namespace, profile: bool = False) -> dict | None:
    command = [sys.executable, "-c", _CHILD, str(repo), *map(str, (args.n, args.dim, args.select, args.shards,
                                                                    args.batch, int(profile)))]
    out = subprocess.run(command, capture_output=not profile, text=True, check=True)
    return None if profile else json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--other", type=Path, action="append", default=[], help="a checkout to compare (repeatable)")
    parser.add_argument("--n", type=int, default=120_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--select", type=int, default=12_000)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", type=Path, help="print cProfile's top functions for this checkout instead")
    args = parser.parse_args(argv)
    if args.profile:
        run(args.profile, args, profile=True)
        return
    engines = [REPO, *args.other]
    ratios: dict[Path, list[float]] = {engine: [] for engine in args.other}
    for repeat in range(args.repeats):
        runs = {engine: run(engine, args) for engine in engines}
        mine = runs[REPO]["seconds"]
        cells = [f"this {mine:7.3f} s picks {runs[REPO]['picks']}"]
        for engine in args.other:
            ratios[engine].append(mine / runs[engine]["seconds"])
            cells.append(f"{engine} {runs[engine]['seconds']:7.3f} s picks {runs[engine]['picks']} "
                         f"this/that {ratios[engine][-1]:.3f}")
        print(f"run {repeat}: " + "   ".join(cells), flush=True)
    print(f"{args.n} x {args.dim}, {args.select} picks, {args.shards} shards, batch {args.batch}, CPU seconds:")
    for engine, values in ratios.items():
        print(f"  median this/{engine} {statistics.median(values):.3f} over {len(values)} runs")

if __name__ == "__main__":
    main()
