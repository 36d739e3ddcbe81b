"""Thread counts of the numerical libraries, always the caller's, and blocks of work on one-thread workers.

A process holds several thread pools: numpy's OpenBLAS, scipy's OpenBLAS, torch's intra-op pool (OpenMP,
and MKL inside torch) and scikit-learn's OpenMP. Left alone, each sizes itself from ``OMP_NUM_THREADS``
(Ray sets it for an actor to its ``num_cpus`` rounded down, at least 1) or from the core count, not from
the resource plan. :func:`limit_threads` sets them all to one count. (torch's inter-op pool runs only
``torch.jit.fork`` work, which the project never starts.)

Why many blocks on one-thread workers rather than products split over several BLAS threads: a split
product ends when its slowest thread does, and an OpenBLAS thread that has finished its part spins on
its core (``sched_yield``) until the others are done. Where another process shares the cores, some
thread of many a product waits for the scheduler, so a small product that takes a fraction of a
millisecond can take a scheduler slice, and the coreset runs thousands of them. Independent blocks
taken from a queue by one-thread workers fail softly: a descheduled worker holds up its own block
while the others go on with the rest.
"""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

from threadpoolctl import ThreadpoolController, threadpool_info

T = TypeVar("T")
R = TypeVar("R")


def _loaded_torch() -> Any:
    """torch if this process has imported it (never imported here: a CPU coreset holder starts without it)."""
    return sys.modules.get("torch")


def thread_counts() -> dict[str, Any]:
    """The thread counts this thread's libraries use now: the distinct counts of each kind of pool
    (``blas``, ``openmp``) and torch's intra-op count (None where torch is not loaded)."""
    counts: dict[str, set[int]] = {}
    for pool in threadpool_info():
        counts.setdefault(pool["user_api"], set()).add(pool["num_threads"])
    torch = _loaded_torch()
    return {**{api: sorted(found) for api, found in sorted(counts.items())},
            "torch": torch.get_num_threads() if torch is not None else None}


def limit_threads(count: int, libraries: ThreadpoolController | None = None) -> Callable[[], None]:
    """Every BLAS and OpenMP pool of the process, and torch's intra-op pool, at ``count`` threads from now
    on; returns the function that restores the previous counts.

    ``libraries``: a controller made earlier (making one scans the loaded libraries, ~0.6 ms).
    OpenBLAS's count holds for every thread; torch's for the calling thread and every thread that has
    not run torch code yet; other OpenMP pools' for the calling thread.
    """
    if count < 1:
        raise ValueError(f"thread count must be >= 1, got {count}")
    torch = _loaded_torch()
    # torch's count is read first: its OpenMP pool is among those the controller limits.
    before = torch.get_num_threads() if torch is not None else None
    limiter = (libraries or ThreadpoolController()).limit(limits=count)
    if torch is not None:
        torch.set_num_threads(count)

    def restore() -> None:
        limiter.restore_original_limits()
        if torch is not None:
            torch.set_num_threads(before)

    return restore


@contextmanager
def thread_limit(count: int, libraries: ThreadpoolController | None = None) -> Iterator[None]:
    """:func:`limit_threads` for the duration of a ``with`` block."""
    restore = limit_threads(count, libraries)
    try:
        yield
    finally:
        restore()


class BlockWorkers:
    """``threads`` workers that run blocks of numerical work, each block on one library thread.

    Blocks are taken from a queue, so a worker that another process keeps off its core delays only
    the block it holds. With one thread the blocks run in the calling thread. Keep one object for
    repeated calls: its threads and its view of the loaded libraries are made once.
    """

    def __init__(self, threads: int) -> None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.threads = threads
        self._libraries = ThreadpoolController()
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="block") if threads > 1 else None

    def map(self, work: Callable[[T], R], blocks: Iterable[T]) -> list[R]:
        """``work`` of every block, in block order."""
        blocks = list(blocks)
        torch = _loaded_torch()

        def one_thread(block: T) -> R:  # OpenMP's and torch's counts are per thread: set where the block runs
            self._libraries.limit(limits=1, user_api="openmp")
            if torch is not None:
                torch.set_num_threads(1)
            return work(block)

        with thread_limit(1, self._libraries):
            if self._pool is None or len(blocks) == 1:
                return [work(block) for block in blocks]
            return list(self._pool.map(one_thread, blocks))

    def single(self, work: Callable[[], R]) -> R:
        """One call that cannot be split (an eigendecomposition), on one library thread: a multi-threaded
        LAPACK call is a long chain of small parallel steps, the worst case beside another process."""
        with thread_limit(1, self._libraries):
            return work()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()


def block_starts(n: int, preferred: int, threads: int, smallest: int = 256) -> range:
    """Starts of blocks over ``n`` items: ``preferred`` items each, smaller (down to ``smallest``) where
    that gives each of ``threads`` workers at least four blocks, so no worker holds a large share alone."""
    size = max(1, min(preferred, max(smallest, -(-n // (4 * threads)))))
    return range(0, n, size)


def run_blocks(threads: int, work: Callable[[T], R], blocks: Sequence[T]) -> list[R]:
    """:meth:`BlockWorkers.map` on workers made for this one call."""
    workers = BlockWorkers(threads)
    try:
        return workers.map(work, blocks)
    finally:
        workers.close()
