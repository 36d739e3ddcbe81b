"""Exact k-nearest-neighbour search over a memory bank: a GEMM screen, then row-wise distances.

Brute-force kNN is a matrix product, and on every device a matrix product is the fastest way to
look at all pairs. But a product's rounding depends on its shapes, so its values are used only to
*screen*: per query, the ``k + 2`` smallest screened values name candidates, their distances are
recomputed with :func:`row_distances` (which depends only on the two vectors), and a rigorous
rounding bound (:func:`expansion_margin`) decides which other bank rows could still be as close;
those are recomputed too. So the result is the exact top-k under the row-wise formula, ties broken
by the lower bank index, for any query batching, sharding, thread count or device. On the CPU every
product runs in blocks on one-thread workers (``anomaly_core.threads``: why not multi-threaded BLAS).

Two screens, both lower bounds of the squared distance up to that bound:

* **full**: ``||q̃||² - 2q̃·b̃ + ||b̃||²`` over all D dimensions (two-sided, so it proves almost every
  query at once). Used on GPUs, where the product is nearly free, and for small D.
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

from anomaly_core.distances import MatrixDevice, check_float32_range, row_distances
from anomaly_core.threads import BlockWorkers, block_starts, run_blocks

SURVIVOR_BUDGET = 256  # rows per query the projected screen may leave before it is abandoned
_PROJECT_FROM_DIM = 512  # below this the full product is already cheap
_BANK_BLOCK = 4096  # bank rows per product while building the projected screen (fixed: the basis never
# depends on the thread count)


class _Screen(NamedTuple):
    """Bank columns on the device, and how queries become the rows they are multiplied with."""

    name: str
    columns: Any  # [d', M] on the device
    basis: np.ndarray | None  # float64 [D, p] orthonormal (projected screen)
    margin: float  # κ of expansion_margin for this product
    max_sq_norm: float  # the largest ||b̃||² of the bank rows as this screen centres them


class ExactKnn:
    """A memory bank held on a device (as screen columns) for exact kNN queries."""

    def __init__(
        self,
        bank: np.ndarray,
        device: MatrixDevice | None = None,
        block_rows: int | None = None,
        projection_dim: int | None = None,
        threads: int = 1,
    ) -> None:
        """``projection_dim``: None picks the screen (D/4 on the CPU for D >= 512, else full); 0 forces full.
        ``threads``: one-thread workers that build the projected screen."""
        bank = np.ascontiguousarray(bank, dtype=np.float32)
        if bank.ndim != 2 or len(bank) == 0:
            raise ValueError(f"memory bank must be a non-empty [M, D] array, got shape {bank.shape}")
        if not np.isfinite(bank).all():
            raise ValueError("memory bank contains NaN or infinite values")
        self.bank = bank
        self.device = device or MatrixDevice()
        # Queries per product: a [block, M] float32 temporary (~150 MB for a 20k bank on the CPU).
        self.block_rows = block_rows or (2048 if not self.device.use_torch else 16384)
        check_float32_range(bank, "memory bank")
        self.mean = bank.mean(axis=0, dtype=np.float64)
        dim = bank.shape[1]
        if projection_dim is None:
            projection_dim = dim // 4 if not self.device.use_torch and dim >= _PROJECT_FROM_DIM else 0
        if not 0 <= projection_dim < dim:
            raise ValueError(f"projection_dim must be in [0, {dim}), got {projection_dim}")
        self._screen = self._projected(projection_dim, threads) if projection_dim else self._full()
        self._switch = threading.Lock()
        self.unproven_queries = 0  # queries the screen's best candidates alone could not settle
        self.survivors = 0  # further bank rows recomputed for them

    @property
    def screen(self) -> str:
        return self._screen.name

    def _full(self) -> _Screen:
        """Columns ``[-2b̃; ||b̃||²]``: a product with query rows ``[q̃, 1]`` is ``||b̃||² - 2q̃·b̃``.

        ``b̃`` and ``q̃`` are the float32 differences from the float32-rounded mean, and ``||b̃||²`` is taken
        of exactly those values: a norm centred on another mean (the float64 one) differs from the product's
        by ``2 b̃·δ``, which grows with the features' offset from the origin and broke the bound where that
        offset dwarfs their spread.
        """
        centred = self.bank - self.mean.astype(np.float32)
        sq_norms = np.einsum("ij,ij->i", centred, centred, dtype=np.float64)
        columns = np.empty((self.bank.shape[1] + 1, len(self.bank)), np.float32)
        columns[:-1] = -2.0 * centred.T
        columns[-1] = sq_norms
        return _Screen("full", self.device.put(columns), None, self.device.margin(self.bank.shape[1]),
                       float(sq_norms.max()))

    def _projected(self, dim: int, threads: int) -> _Screen:
        """Columns ``[-2z_b; -2r_b; ||b̃||²]`` over the bank's top principal directions (float64 basis)."""
        centred = self.bank.astype(np.float64) - self.mean  # float64: the basis and norms the queries match
        sq_norms = np.einsum("ij,ij->i", centred, centred)
        blocks = [centred[lo : lo + _BANK_BLOCK] for lo in range(0, len(centred), _BANK_BLOCK)]
        workers = BlockWorkers(threads)
        try:
            gram = sum(workers.map(lambda block: block.T @ block, blocks))  # summed in block order
            _, vectors = workers.single(lambda: np.linalg.eigh(gram))
            basis = np.ascontiguousarray(vectors[:, ::-1][:, :dim])
            parts = workers.map(lambda block: _project(block, basis), blocks)
        finally:
            workers.close()
        z, r = np.concatenate([z for z, _ in parts]), np.concatenate([r for _, r in parts])
        columns = np.empty((dim + 2, len(self.bank)), np.float32)
        columns[:dim] = -2.0 * z.T
        columns[dim] = -2.0 * r
        columns[dim + 1] = sq_norms
        return _Screen(f"projected-{dim}", self.device.put(columns), basis, self.device.margin(dim + 1),
                       float(sq_norms.max()))

    def __len__(self) -> int:
        return len(self.bank)

    def search(self, queries: np.ndarray, k: int, threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """(distances [n, k] float64 ascending, bank indices [n, k]) of each query's k nearest rows.

        ``threads`` (CPU): blocks of queries are searched by that many one-thread workers, so the
        row-wise work parallelises too (numpy releases the GIL); on a GPU the blocks go one by one.
        Results do not depend on it.
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.bank.shape[1]:
            raise ValueError(f"queries must be [n, {self.bank.shape[1]}], got shape {queries.shape}")
        if not np.isfinite(queries).all():
            raise ValueError("queries contain NaN or infinite values")
        check_float32_range(queries, "queries", spread_matters=False)
        if not 1 <= k <= len(self.bank):
            raise ValueError(f"k must be in [1, {len(self.bank)}], got {k}")
        distances = np.empty((len(queries), k), np.float64)
        indices = np.empty((len(queries), k), np.int64)

        def block(lo: int) -> tuple[int, int]:
            hi = min(lo + starts.step, len(queries))
            distances[lo:hi], indices[lo:hi], stats = self._search_block(queries[lo:hi], k)
            return stats

        if self.device.on_cpu:
            starts = block_starts(len(queries), self.block_rows, threads)
        else:
            starts, threads = range(0, len(queries), self.block_rows), 1
        stats = run_blocks(threads, block, starts)
        self.unproven_queries += sum(unproven for unproven, _ in stats)
        self.survivors += sum(survivors for _, survivors in stats)
        return distances, indices

    def _screened(self, queries: np.ndarray, screen: _Screen) -> tuple[Any, np.ndarray, np.ndarray]:
        """Screened values (``bound on ||q-b||² - ||q̃||²``) on the device, ``||q̃||²`` and the error bound."""
        if screen.basis is None:
            centred = queries - self.mean.astype(np.float32)
            sq_norms = np.einsum("ij,ij->i", centred, centred, dtype=np.float64)
            rows = np.empty((len(queries), queries.shape[1] + 1), np.float32)
            rows[:, :-1] = centred
        else:
            centred = queries.astype(np.float64) - self.mean
            sq_norms = np.einsum("ij,ij->i", centred, centred)
            z, r = _project(centred, screen.basis)
            rows = np.empty((len(queries), z.shape[1] + 2), np.float32)
            rows[:, :-2] = z
            rows[:, -2] = r
        rows[:, -1] = 1.0
        products = self.device.matmul(self.device.put(rows), screen.columns)
        return products, sq_norms, screen.margin * (sq_norms + screen.max_sq_norm)

    def _search_block(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
        """Distances and indices of one block of queries, and (unproven queries, survivors)."""
        screen = self._screen  # one screen for the whole block, even if another thread switches
        products, sq_norms, bound = self._screened(queries, screen)
        # k + 2 candidates prove all but ~0.1 % of real PatchCore queries under the full screen.
        count = min(k + 2, len(self.bank))
        screened, candidates = self.device.smallest(products, count)  # candidates' entries become +inf
        distances, best = _best(row_distances(queries, self.bank[candidates]), candidates, k)
        if count == len(self.bank):
            return distances, best, (0, 0)
        # A row whose screened value is above `limit` has a squared distance above the k-th found,
        # so it can neither beat nor tie it; every other row is recomputed. Rows outside the
        # candidates screen at >= the last candidate, which settles most queries at once (their
        # candidates' entries are +inf now, so the scan finds nothing for a settled query).
        limit = distances[:, -1] ** 2 + bound - sq_norms
        if np.all(screened[:, -1] > limit):
            return distances, best, (0, 0)
        rows, columns = self.device.at_most(products, limit)
        del products
        unproven = np.unique(rows)
        if screen.basis is not None and len(rows) > SURVIVOR_BUDGET * len(unproven):
            with self._switch:  # this bank does not compress: full products from now on
                if self._screen.basis is not None:
                    self._screen = self._full()
            return self._search_block(queries, k)
        found = row_distances(queries[rows], self.bank[columns])
        # Each unproven query's k best so far plus its survivors, ordered by (query, distance, index).
        owner = np.concatenate([np.repeat(unproven, k), rows])
        pool_d = np.concatenate([distances[unproven].ravel(), found])
        pool_i = np.concatenate([best[unproven].ravel(), columns])
        order = np.lexsort((pool_i, pool_d, owner))
        first = np.searchsorted(owner[order], unproven)[:, None] + np.arange(k)
        distances[unproven], best[unproven] = pool_d[order][first], pool_i[order][first]
        return distances, best, (len(unproven), len(rows))


def _project(centred: np.ndarray, basis: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates on an orthonormal basis and the norm of the remainder (float64)."""
    z = centred @ basis
    remainder = np.einsum("ij,ij->i", centred, centred) - np.einsum("ij,ij->i", z, z)
    return z, np.sqrt(np.maximum(remainder, 0.0))


def _best(distances: np.ndarray, candidates: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the k smallest distances, ties broken by the lower bank index."""
    order = np.lexsort((candidates, distances), axis=-1)[:, :k]
    return np.take_along_axis(distances, order, axis=1), np.take_along_axis(candidates, order, axis=1)
