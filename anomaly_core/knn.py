"""Exact k-nearest-neighbour search over a memory bank: a GEMM screen, then the exact formula.

Brute-force kNN is a matrix product, and on every device a matrix product is the fastest way to
look at all pairs. But a product's rounding depends on its shapes and precision, so its values are
used only to *screen*: per query, the smallest screened values name candidates, their squared
distances are computed by :func:`sq_distances` (which depends only on the two vectors), and a rigorous
rounding bound (:func:`expansion_margin`) decides which other bank rows could still be as close; those
are computed too. So the result is the exact top-k under that formula, ordered by (squared distance,
bank index), for any query batching, sharding, thread count, device or screen precision. On the CPU
every product runs in blocks on one-thread workers (``anomaly_core.threads``: why not multi-threaded
BLAS). On the torch path everything — bank, screen, candidates, exact values, proof and ordering —
stays on the device; only the [n, k] results come back.

The bound is per bank row: the screen's columns carry ``(1-κ)·||b̃||²``, so a row is kept only where its
own norm leaves room. Two screens, both lower bounds of the squared distance up to that bound:

* **full**: ``||b̃||² - 2q̃·b̃`` over all D dimensions (two-sided, so it proves almost every query at
  once). Used on GPUs (in bfloat16 on tensor cores by default, with more candidates per query since
  that bound is ~65× wider than float32's) and for small D.
* **projected** (CPU, D >= 512): the bank's top ``D/4`` principal directions plus the norm of what
  they miss, ``||z_q - z_b||² + (r_q - r_b)² <= ||q - b||²``: a product 4x smaller. Real patch
  features keep ~93 % of their variance there, so only ~10 rows per query survive the bound and
  get the exact formula. Should a bank not compress (more than :data:`SURVIVOR_BUDGET` survivors
  per query), the search switches to the full screen for good.
"""

from __future__ import annotations

import threading
from typing import Any, NamedTuple

import numpy as np

from anomaly_core.distances import MatrixDevice, Operand, check_float32_range, sq_distances
from anomaly_core.threads import BlockWorkers, block_starts, run_blocks

SURVIVOR_BUDGET = 256  # rows per query the projected screen may leave before it is abandoned
_PROJECT_FROM_DIM = 512  # below this the full product is already cheap
_BANK_BLOCK = 4096  # bank rows per product while building the projected screen (fixed: the basis never
# depends on the thread count)
# Screen candidates per query beyond k. On tire's Lite0 features (data/tire_small: a 2,665-row bank, 5,488
# queries, k = 1) float32 products leave 0.13 % of the queries unproven with no extra candidate and none
# with 2; bfloat16 products (a ~65× wider bound at D = 1024) 14 % with none, 0.11 % with 2, none with 6.
EXTRA_CANDIDATES = {"exact": 2, "rounded": 6}


class _Screen(NamedTuple):
    """Bank columns on the device, and how queries become the rows they are multiplied with."""

    name: str
    columns: Operand  # [d', M] and the per-row norm terms (1-κ)·||b̃||²
    basis: Any  # float64 [D, p] orthonormal on the device (projected screen), else None
    mean: Any  # the common centre on the device: float32 (full) or float64 (projected)
    margin: float  # κ of expansion_margin for this product
    sq_norms: Any  # float64 [M] ||b̃||² of the bank rows as this screen centres them


class ExactKnn:
    """A memory bank held on a device (as screen columns) for exact kNN queries."""

    def __init__(
        self,
        bank: Any,
        device: MatrixDevice | None = None,
        block_rows: int | None = None,
        projection_dim: int | None = None,
        threads: int = 1,
        candidates: int | None = None,
    ) -> None:
        """``bank``: numpy, or a tensor (kept where it is if that is the device's). ``projection_dim``: None
        picks the screen (D/4 on the CPU's numpy path for D >= 512, else full); 0 forces full. ``threads``:
        one-thread workers that build the projected screen. ``candidates``: screen candidates per query
        beyond k (default :data:`EXTRA_CANDIDATES` for the device's precision); never changes a result."""
        self.device = device or MatrixDevice()
        ops = self.device.ops
        bank = self.device.put(bank)
        if bank.ndim != 2 or len(bank) == 0:
            raise ValueError(f"memory bank must be a non-empty [M, D] array, got shape {tuple(bank.shape)}")
        if not ops.all_finite(bank):
            raise ValueError("memory bank contains NaN or infinite values")
        check_float32_range(bank, "memory bank")
        self.bank = bank
        # Queries per product: a [block, M] float32 temporary (~150 MB for a 20k bank on the CPU).
        self.block_rows = block_rows or (2048 if not self.device.use_torch else 16384)
        rounded = self.device.input_roundoff > 0
        self.extra = EXTRA_CANDIDATES["rounded" if rounded else "exact"] if candidates is None else candidates
        if self.extra < 0:
            raise ValueError(f"candidates must be >= 0, got {self.extra}")
        self._mean = ops.mean64(bank)
        dim = bank.shape[1]
        if projection_dim is None:
            projection_dim = dim // 4 if not self.device.use_torch and dim >= _PROJECT_FROM_DIM else 0
        if not 0 <= projection_dim < dim:
            raise ValueError(f"projection_dim must be in [0, {dim}), got {projection_dim}")
        self._screen = self._projected(projection_dim, threads) if projection_dim else self._full()
        self._switch = threading.Lock()
        self.unproven_queries = 0  # queries the screen's best candidates alone could not settle
        self.survivors = 0  # further bank rows computed exactly for them

    @property
    def screen(self) -> str:
        return self._screen.name

    def _full(self) -> _Screen:
        """Columns ``-2b̃`` with norm terms ``(1-κ)||b̃||²``: a product with query rows ``q̃`` is
        ``||b̃||²(1-κ) - 2q̃·b̃``.

        ``b̃`` and ``q̃`` are the float32 differences from the float32-rounded mean, and ``||b̃||²`` is taken
        of exactly those values: a norm centred on another mean differs from the product's by ``2 b̃·δ``,
        which grows with the features' offset from the origin and broke the bound where that offset dwarfs
        their spread.
        """
        ops = self.device.ops
        mean = ops.cast(self._mean, ops.float32)
        centred = self.bank - mean
        sq_norms = sq_distances(centred)
        margin = self.device.margin(self.bank.shape[1])
        core = ops.transposed(centred)
        core *= -2.0
        columns = self.device.columns(core, ops.cast(sq_norms * (1.0 - margin), ops.float32))
        return _Screen("full", columns, None, mean, margin, sq_norms)

    def _projected(self, dim: int, threads: int) -> _Screen:
        """Columns ``[-2z_b; -2r_b]`` over the bank's top principal directions (a float64 basis built on
        the host in fixed blocks) with norm terms ``(1-κ)||b̃||²``."""
        mean = self.device.to_numpy(self._mean)
        centred = self.device.to_numpy(self.bank).astype(np.float64) - mean  # the basis and norms queries match
        blocks = [centred[lo : lo + _BANK_BLOCK] for lo in range(0, len(centred), _BANK_BLOCK)]
        workers = BlockWorkers(threads)
        try:
            gram = sum(workers.map(lambda block: block.T @ block, blocks))  # summed in block order
            _, vectors = workers.single(lambda: np.linalg.eigh(gram))
            basis = np.ascontiguousarray(vectors[:, ::-1][:, :dim])
            parts = workers.map(lambda block: _project(block, basis), blocks)
        finally:
            workers.close()
        core = np.empty((dim + 1, len(centred)), np.float32)
        core[:dim] = -2.0 * np.concatenate([z for z, _ in parts]).T
        core[dim] = -2.0 * np.concatenate([r for _, r in parts])
        sq_norms = np.einsum("ij,ij->i", centred, centred)
        margin = self.device.margin(dim + 1)
        ops = self.device.ops
        columns = self.device.columns(self.device.put(core), self.device.put(sq_norms * (1.0 - margin)))
        return _Screen(f"projected-{dim}", columns, ops.asarray(basis, ops.float64), ops.asarray(mean, ops.float64),
                       margin, ops.asarray(sq_norms, ops.float64))

    def __len__(self) -> int:
        return len(self.bank)

    def search(self, queries: Any, k: int, threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """(distances [n, k] float64 ascending, bank indices [n, k] int64) of each query's k nearest rows.

        ``queries``: numpy, or a tensor (on the torch path it never leaves its device if that is ours).
        ``threads`` (CPU): blocks of queries are searched by that many one-thread workers, so the
        row-wise work parallelises too (numpy releases the GIL); on a GPU the blocks go one by one.
        Results do not depend on it.
        """
        queries = self.device.put(queries)
        dim = self.bank.shape[1]
        if queries.ndim != 2 or queries.shape[1] != dim:
            raise ValueError(f"queries must be [n, {dim}], got shape {tuple(queries.shape)}")
        if not self.device.ops.all_finite(queries):
            raise ValueError("queries contain NaN or infinite values")
        if len(queries):
            check_float32_range(queries, "queries", spread_matters=False)
        if not 1 <= k <= len(self.bank):
            raise ValueError(f"k must be in [1, {len(self.bank)}], got {k}")
        distances = np.empty((len(queries), k), np.float64)
        indices = np.empty((len(queries), k), np.int64)

        def block(lo: int) -> tuple[int, int]:
            hi = min(lo + starts.step, len(queries))
            squared, best, stats = self._search_block(queries[lo:hi], k)
            # The square root on the host: numpy's is correctly rounded, torch's vectorised CPU one is not.
            distances[lo:hi], indices[lo:hi] = np.sqrt(self.device.to_numpy(squared)), self.device.to_numpy(best)
            return stats

        if self.device.on_cpu:
            starts = block_starts(len(queries), self.block_rows, threads)
        else:
            starts, threads = range(0, len(queries), self.block_rows), 1
        stats = run_blocks(threads, block, starts)
        self.unproven_queries += sum(unproven for unproven, _ in stats)
        self.survivors += sum(survivors for _, survivors in stats)
        return distances, indices

    def _screened(self, queries: Any, screen: _Screen) -> tuple[Any, Any]:
        """Screened values on the device, within ``κ(||q̃||² + ||b̃||²)`` of ``||q - b||² - ||q̃||² - κ||b̃||²``
        (the projected screen: at most that much above), and ``||q̃||²`` (float64)."""
        ops = self.device.ops
        if screen.basis is None:
            centred = queries - screen.mean
            sq_norms = sq_distances(centred)
            rows = self.device.rows(centred)
        else:
            centred = ops.cast(queries, ops.float64) - screen.mean
            z, r = _project(centred, screen.basis)
            sq_norms = (centred * centred).sum(1)
            rows = self.device.rows(ops.cast(ops.concat([z, r[:, None]], axis=1), ops.float32))
        return self.device.product(rows, screen.columns), sq_norms

    def _search_block(self, queries: Any, k: int) -> tuple[Any, Any, tuple[int, int]]:
        """Squared distances and indices of one block of queries (on the device), and (unproven queries,
        survivors)."""
        ops = self.device.ops
        screen = self._screen  # one screen for the whole block, even if another thread switches
        products, sq_norms = self._screened(queries, screen)
        count = min(k + self.extra, len(self.bank))
        screened, candidates = self.device.smallest(products, count)  # candidates' entries become +inf
        n = len(queries)
        exact = sq_distances(queries, self.bank, ops.repeat(ops.arange(n), count), candidates.reshape(-1))
        squared, best = _best(ops, exact.reshape(n, count), candidates, k)
        if count == len(self.bank):
            return squared, best, (0, 0)
        # A row whose screened value is above `limit` has a squared distance above the k-th found, so it
        # can neither beat nor tie it (its own norm term took κ||b̃||² off; see _screened); every other
        # row is computed exactly. Rows outside the candidates screen at >= the last candidate, which
        # settles most queries at once (their candidates' entries are +inf now, so the scan finds nothing
        # for a settled query).
        limit = ops.round_up32(squared[:, -1] - (1.0 - screen.margin) * sq_norms)
        if not bool((screened[:, -1] <= limit).any()):
            return squared, best, (0, 0)
        rows, columns = self.device.at_most(products, limit)
        del products
        unproven = ops.unique(rows)
        if screen.basis is not None and len(rows) > SURVIVOR_BUDGET * len(unproven):
            with self._switch:  # this bank does not compress: full products from now on
                if self._screen.basis is not None:
                    self._screen = self._full()
            return self._search_block(queries, k)
        found = sq_distances(queries, self.bank, rows, columns)
        # Each unproven query's k best so far plus its survivors, ordered by (query, distance, index).
        owner = ops.concat([ops.repeat(unproven, k), rows])
        pool_d = ops.concat([squared[unproven].reshape(-1), found])
        pool_i = ops.concat([best[unproven].reshape(-1), columns])
        order = ops.lexsort((pool_i, pool_d, owner))
        first = ops.searchsorted(owner[order], unproven)[:, None] + ops.arange(k)
        squared[unproven], best[unproven] = pool_d[order][first], pool_i[order][first]
        return squared, best, (len(unproven), len(rows))


def _project(centred: Any, basis: Any) -> tuple[Any, Any]:
    """Coordinates on an orthonormal basis and the norm of the remainder (float64, numpy or torch)."""
    z = centred @ basis
    remainder = (centred * centred).sum(1) - (z * z).sum(1)
    return z, remainder.clip(0) ** 0.5


def _best(ops: Any, squared: Any, candidates: Any, k: int) -> tuple[Any, Any]:
    """Per row, the k smallest squared distances, ties broken by the lower bank index."""
    order = ops.lexsort((candidates, squared))[:, :k]
    return ops.take_along(squared, order), ops.take_along(candidates, order)
