"""Thread counts are the caller's: limits reach every library and are undone, blocks run on one library
thread each, the coreset's and the kNN's products never run at a library default, and the driver runs
at DRIVER_THREADS."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from anomaly_core.coreset import GreedyShard, greedy_select, start_index_for
from anomaly_core.distances import MatrixDevice
from anomaly_core.knn import ExactKnn
from anomaly_core.threads import BlockWorkers, block_starts, thread_counts, thread_limit

from .conftest import REPO

OUTSIDE = 3  # a count no library has by default on the 2-core test machine, nor inside a block


def one_thread() -> dict:
    return {"blas": [1], "openmp": [1], "torch": 1}


def test_limit_reaches_every_pool_and_torch_and_is_undone():
    before = thread_counts()
    assert set(before) >= {"blas", "openmp", "torch"}  # numpy's OpenBLAS, torch's OpenMP (and torch)
    with thread_limit(OUTSIDE):
        assert thread_counts() == {**before, "blas": [OUTSIDE], "openmp": [OUTSIDE], "torch": OUTSIDE}
    assert thread_counts() == before
    with pytest.raises(ValueError, match="thread count"):
        with thread_limit(0):
            pass


@pytest.mark.parametrize("threads", [1, 3])
def test_blocks_run_on_one_library_thread_and_on_as_many_workers(threads: int):
    seen: dict[int, dict] = {}
    arrived = threading.Barrier(threads)

    def probe(block: int) -> int:
        if block < threads:
            arrived.wait(timeout=20)  # the first `threads` blocks run at once, or this times out
        seen[block] = {"thread": threading.get_ident(), **thread_counts()}
        return block * block

    workers = BlockWorkers(threads)
    try:
        with thread_limit(OUTSIDE):
            assert workers.map(probe, range(7)) == [block * block for block in range(7)]
            assert thread_counts()["torch"] == OUTSIDE  # the caller's counts are back after the blocks
    finally:
        workers.close()
    assert all({key: value for key, value in found.items() if key != "thread"} == one_thread()
               for found in seen.values())
    names = {found["thread"] for found in seen.values()}
    assert len(names) == threads and (threads > 1 or names == {threading.get_ident()})


def test_blocks_are_smaller_where_few_items_would_leave_a_worker_a_large_share():
    assert block_starts(10_000, 2048, 1) == range(0, 10_000, 2048)
    assert block_starts(10_000, 2048, 2) == range(0, 10_000, 1250)  # four blocks per worker
    assert block_starts(1000, 2048, 4, smallest=256) == range(0, 1000, 256)
    assert len(block_starts(0, 2048, 2)) == 0


def recording(device: MatrixDevice, seen: list) -> MatrixDevice:
    """``device`` whose products record the thread counts they ran with."""
    product = device.matmul

    def matmul(a, b):
        seen.append(thread_counts())
        return product(a, b)

    device.matmul = matmul
    return device


@pytest.mark.parametrize("precision", [None, "fp32", "bf16"], ids=["numpy", "torch-cpu", "torch-bf16"])
@pytest.mark.parametrize("threads", [1, 2])
def test_coreset_and_knn_products_run_on_one_thread_at_any_count(precision: str | None, threads: int, monkeypatch):
    """And give the numpy path's picks and neighbours bit for bit, in either screen precision."""

    def device() -> MatrixDevice:
        return recording(MatrixDevice("cpu", use_torch=precision is not None, precision=precision), seen)

    rng = np.random.default_rng(0)
    x = (np.maximum(rng.normal(size=(3000, 12)) @ rng.normal(size=(12, 520)), 0)).astype(np.float32)
    seen: list[dict] = []
    eigh = np.linalg.eigh
    monkeypatch.setattr(np.linalg, "eigh", lambda a: (seen.append(thread_counts()), eigh(a))[1])
    with thread_limit(OUTSIDE):  # the process's count: no product may run at it
        shard = GreedyShard(x, np.arange(len(x)), device(), threads=threads)
        picks = greedy_select([shard], 200, start_index_for(len(x), 0), batch=32).indices
        knn = ExactKnn(x[picks], device(), projection_dim=128, threads=threads)
        found = knn.search(x[::3], 1, threads)
        assert thread_counts()["blas"] == [OUTSIDE]
    assert len(seen) > 10 and all(counts == one_thread() for counts in seen)
    reference = greedy_select([GreedyShard(x, np.arange(len(x)))], 200, start_index_for(len(x), 0), batch=32)
    assert np.array_equal(picks, reference.indices)
    expected = ExactKnn(x[picks], projection_dim=128).search(x[::3], 1)
    assert np.array_equal(found[0], expected[0]) and np.array_equal(found[1], expected[1])


def test_driver_runs_at_driver_threads():
    """In a child process, so this session's counts stay as they are; Ray itself is not started."""
    child = ("import json, ray, numpy, torch\n"
             "ray.init = lambda *args, **kwargs: None\n"
             "from jobs.ray_runtime import DRIVER_THREADS, start_ray\n"
             "from anomaly_core.threads import thread_counts\n"
             "start_ray()\n"
             "print(json.dumps({'driver': DRIVER_THREADS, **thread_counts()}))\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("OMP_NUM_THREADS", None)
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=120, check=True)
    counts = json.loads(done.stdout.strip().splitlines()[-1])
    driver = counts.pop("driver")
    assert driver == 1 and counts == {"blas": [driver], "openmp": [driver], "torch": driver}
