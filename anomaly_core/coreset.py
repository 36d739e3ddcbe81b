"""Greedy k-center (Gonzalez) coreset selection: exact picks, pruned work, shardable.

PatchCore subsamples its memory bank by greedy k-center: start from a seeded point, then
repeatedly add the point farthest from the centres chosen so far. Reference
implementations recompute every point's distance to each new centre (O(N·D) per step).
This module makes the *same picks* while touching only points that can get closer:

* every point remembers its nearest centre ("cluster"), every cluster its radius. By the
  triangle inequality a new centre c can lower a member x of cluster j only if
  ``||c - c_j|| < 2·||x - c_j||``, so most clusters and most members are skipped;
* distances are first bounded from below in a fixed orthonormal (PCA) subspace plus the
  norm of what it misses, which costs p << D per pair (one GEMM for centre pairs), and
  computed exactly only where no bound rules a pair out;
* every value that decides a pick comes from one row-wise float32 formula
  (:func:`sq_dists`, no BLAS), so a point's value never depends on which shard holds it or
  what it was batched with; every bound carries a safety margin far above float rounding,
  so pruning can never skip a point whose value would really change.

Points live in :class:`GreedyShard` objects. :func:`greedy_select` is the driver: it only
talks to shards through :class:`ShardLike` (local objects here, actor proxies in the cluster
layer) and returns bit-identical picks for any number of shards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Protocol, Sequence

import numpy as np
import scipy.linalg

_ROW_BLOCK = 4096  # rows per temporary: bounds memory, never changes a value
_BASIS_SAMPLE = 4096  # rows used to fit the bounding subspace
_GEMM_BLOCK = 256  # new centres applied together
_PROJ_ERR = 1e-10  # of ||x - mean||²: float64 error bound of ||x - mean||² - ||z||²


def sq_dists(rows: np.ndarray, center: np.ndarray, index: np.ndarray | None = None) -> np.ndarray:
    """Squared Euclidean distances (float32) from ``rows`` (or ``rows[index]``) to ``center``.

    The single formula behind every value the greedy compares: elementwise difference and
    square, then numpy's sum over each contiguous row. Unlike a GEMM expansion, a result
    depends only on its two vectors, so shards and the driver agree to the last bit
    whatever they batch together.
    """
    n = len(rows) if index is None else len(index)
    out = np.empty(n, np.float32)
    for lo in range(0, n, _ROW_BLOCK):
        hi = min(lo + _ROW_BLOCK, n)
        if index is None:
            diff = rows[lo:hi] - center
        else:
            diff = rows[index[lo:hi]]
            np.subtract(diff, center, out=diff)
        np.multiply(diff, diff, out=diff)
        diff.sum(axis=1, out=out[lo:hi])
    return out


class Candidates(NamedTuple):
    """A shard's best unpicked points, ordered by (distance desc, global index asc).

    Every unpicked point not returned orders at or after ``(bound, bound_index)``: its
    value is ``< bound``, or ``== bound`` with a global index ``>= bound_index``.
    ``bound`` is ``-inf`` (``bound_index`` -1) when the shard returned all its unpicked
    points.
    """

    values: np.ndarray  # float32 [b'] squared distance to the nearest centre
    indices: np.ndarray  # int64 [b'] global indices
    rows: np.ndarray  # float32 [b', D]
    bound: float
    bound_index: int


class ShardLike(Protocol):
    """What :func:`greedy_select` needs from a shard (a :class:`GreedyShard` or a proxy).

    Calls to one shard must take effect in the order they are made; ``add_centers`` may
    return before its work is done (e.g. a fire-and-forget actor call), which lets the
    cluster layer overlap the shards' updates.
    """

    def fetch_rows(self, global_indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...

    def add_centers(self, rows: np.ndarray, global_indices: np.ndarray) -> None: ...

    def top_candidates(self, b: int) -> Candidates: ...


def _fit_basis(points: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and top-``dim`` principal directions (float64, orthonormal rows) of a sample.

    Any orthonormal P gives ``||P(x - y)|| <= ||x - y||``; principal directions make that
    bound tight for the low intrinsic dimension of CNN patch features. They come from a
    few seeded subspace iterations on the sample's Gram matrix, which is cheap and robust
    for any D (LAPACK eigensolvers can crawl on the near-singular Gram of such data).
    """
    step = max(1, len(points) // _BASIS_SAMPLE)
    centred = points[::step][:_BASIS_SAMPLE].astype(np.float64)
    mean = centred.mean(axis=0)
    centred -= mean
    gram = centred.T @ centred
    width = min(gram.shape[0], dim + 16)
    q = np.random.default_rng(0).standard_normal((gram.shape[0], width))
    for _ in range(4):
        q, _ = np.linalg.qr(gram @ q)
    _, vectors = np.linalg.eigh(q.T @ gram @ q)
    basis = (q @ vectors[:, ::-1][:, :dim]).T
    return mean, np.linalg.qr(basis.T)[0].T  # re-orthonormalise to machine precision


class _Projected(NamedTuple):
    """Rows seen through the basis: ``||x - y||² >= ||z_x - z_y||² + (r_x - r_y)²``.

    ``z = P(x - mean)`` (stored float32); ``r`` is the norm of the part P misses,
    ``sqrt(||x - mean||² - ||z||²)``, known to within ``r_err`` because that subtraction
    cancels; ``sq_norm = ||x - mean||²`` scales the rounding margins.
    """

    z: np.ndarray  # float32 [n, p]
    z_sq: np.ndarray  # float64 [n] ||z||²
    r: np.ndarray  # float64 [n]
    r_err: np.ndarray  # float64 [n]
    sq_norm: np.ndarray  # float64 [n]


def _project(rows: np.ndarray, mean: np.ndarray, basis: np.ndarray) -> _Projected:
    z = np.empty((len(rows), len(basis)), np.float32)
    z_sq = np.empty(len(rows), np.float64)
    sq_norm = np.empty(len(rows), np.float64)
    for lo in range(0, len(rows), _ROW_BLOCK):
        centred = rows[lo : lo + _ROW_BLOCK].astype(np.float64) - mean
        exact = centred @ basis.T
        z[lo : lo + _ROW_BLOCK] = exact
        z_sq[lo : lo + _ROW_BLOCK] = np.einsum("ij,ij->i", exact, exact)
        sq_norm[lo : lo + _ROW_BLOCK] = np.einsum("ij,ij->i", centred, centred)
    # Both terms carry far less than _PROJ_ERR·sq_norm error, and |√a - √b| <= √|a - b|.
    r = np.sqrt(np.maximum(sq_norm - z_sq, 0.0))
    return _Projected(z, z_sq, r, np.sqrt(_PROJ_ERR * sq_norm), sq_norm)


def _grown(a: np.ndarray, rows: int) -> np.ndarray:
    out = np.empty((rows, *a.shape[1:]), a.dtype)
    out[: len(a)] = a
    return out


class GreedyShard:
    """One shard of the points and each point's squared distance to the nearest centre.

    Every shard receives every centre in pick order, so centre (= cluster) ids agree
    everywhere; members and radii are local. Before a pair (point, new centre) gets its
    exact distance it must survive three cheap tests: the projected, then exact, distance
    between the new centre and the point's own centre; the triangle inequality with the
    point's distance to its centre; the projected lower bound on the pair itself.
    """

    def __init__(self, points: np.ndarray, global_indices: np.ndarray, bound_dim: int = 64):
        points = np.ascontiguousarray(points, dtype=np.float32)
        global_indices = np.asarray(global_indices, dtype=np.int64)
        if points.ndim != 2 or len(points) == 0:
            raise ValueError(f"points must be a non-empty 2-D array, got shape {points.shape}")
        if global_indices.shape != (len(points),):
            raise ValueError("global_indices must hold one index per point")
        if not np.isfinite(points).all():
            raise ValueError("points contain NaN or infinite values")
        if bound_dim < 1:
            raise ValueError(f"bound_dim must be >= 1, got {bound_dim}")
        n, dim = points.shape
        self._x = points
        self._gidx = global_indices
        self._by_gidx = np.argsort(global_indices)
        self._d = np.full(n, np.inf, np.float32)
        self._assign = np.full(n, -1, np.int64)
        self._picked = np.zeros(n, dtype=bool)
        self._mean, self._basis = _fit_basis(points, min(bound_dim, dim))
        self._proj = _project(points, self._mean, self._basis)
        # A float32 squared distance is within (D + 2)·2^-24 (relative) of the real one; a
        # 1e-3 tolerance (more for huge D) covers that many times and costs no real pruning.
        self._tol = np.float32(1.0 + max(1e-3, 8.0 * (dim + 2) * 2.0**-24))
        # Float32 rounding in projected bounds, relative to ||x - mean||² + ||y - mean||².
        self._margin = 16.0 * (len(self._basis) + 8) * 2.0**-24
        self._n_centers = 0
        self._centers = np.empty((0, dim), np.float32)
        self._cproj = _Projected(*(np.empty((0, *f.shape[1:]), f.dtype) for f in self._proj))
        self._reach = np.empty(0, np.float32)  # 4·tol·radius²: cluster j is safe if ||c - c_j||² >= it
        self._members: list[np.ndarray] = []

    def __len__(self) -> int:
        return len(self._x)

    def fetch_rows(self, global_indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The requested global indices this shard holds, and their rows."""
        local = self._local(np.asarray(global_indices, dtype=np.int64))
        local = local[local >= 0]
        return self._gidx[local], self._x[local]

    def _local(self, global_indices: np.ndarray) -> np.ndarray:
        """Local positions of global indices, -1 where this shard does not hold them."""
        pos = np.searchsorted(self._gidx, global_indices, sorter=self._by_gidx)
        local = self._by_gidx[np.minimum(pos, len(self._gidx) - 1)]
        return np.where(self._gidx[local] == global_indices, local, -1)

    def add_centers(self, rows: np.ndarray, global_indices: np.ndarray) -> None:
        """Lower each point's distance to the nearest centre by the new centres, exactly.

        A value is a minimum over centres, so a batch is applied at once; only the cluster a
        point joins on an exact tie depends on the batching, and clusters only steer pruning.
        """
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        local = self._local(np.asarray(global_indices, dtype=np.int64))
        self._picked[local[local >= 0]] = True
        first, end = self._n_centers, self._n_centers + len(rows)
        if end > len(self._centers):
            cap = max(end, 2 * len(self._centers), 64)
            self._centers = _grown(self._centers, cap)
            self._cproj = _Projected(*(_grown(f, cap) for f in self._cproj))
            self._reach = _grown(self._reach, cap)
        self._centers[first:end] = rows
        for store, value in zip(self._cproj, _project(rows, self._mean, self._basis)):
            store[first:end] = value
        self._members.extend(np.empty(0, np.int64) for _ in range(len(rows)))
        self._reach[first:end] = 0.0
        self._n_centers = end
        if first == 0 and end > 0:  # the first centre reaches every point
            self._d[:] = sq_dists(self._x, rows[0])
            self._assign[:] = 0
            self._set_clusters(np.zeros(1, np.int64), np.arange(len(self._x)), np.array([len(self._x)]))
            first = 1
        for lo in range(first, end, _GEMM_BLOCK):
            self._add_batch(lo, min(lo + _GEMM_BLOCK, end))

    def _add_batch(self, lo: int, hi: int) -> None:
        """Apply the stored centres ``lo:hi`` to the members of clusters ``0:lo``."""
        cp = self._cproj
        # Pairs (new centre, old cluster) the projected centre distance cannot rule out.
        lower = cp.z_sq[lo:hi, None] + cp.z_sq[None, :lo] - 2.0 * (cp.z[lo:hi] @ cp.z[:lo].T)
        lower -= self._margin * (cp.sq_norm[lo:hi, None] + cp.sq_norm[None, :lo])
        ci, cj = np.nonzero(lower < self._reach[None, :lo])
        cc = np.empty(len(cj), np.float32)
        for i, part in self._by_center(ci, hi - lo):
            cc[part] = sq_dists(self._centers, self._centers[lo + i], cj[part])
        near = cc < self._reach[cj]
        ci, cj, cc = ci[near], cj[near], cc[near]
        groups = [self._members[j] for j in cj.tolist()]
        sizes = [len(g) for g in groups]
        point = np.concatenate(groups) if groups else np.empty(0, np.int64)
        center = np.repeat(ci, sizes)  # sorted, like ci
        # A member x of cluster j can get closer only if ||c - c_j||² < 4·||x - c_j||² ...
        keep = (4.0 * self._tol) * self._d[point] > np.repeat(cc, sizes)
        point, center = point[keep], center[keep]
        # ... and only if its projected lower bound to c is below its current distance.
        keep = self._lower_bound(point, lo + center) < self._tol * self._d[point]
        point, center = point[keep], center[keep]
        dist = np.empty(len(point), np.float32)
        for i, part in self._by_center(center, hi - lo):
            dist[part] = sq_dists(self._x, self._centers[lo + i], point[part])
        keep = dist < self._d[point]
        point, center, dist = point[keep], center[keep], dist[keep]
        # Each point joins its nearest new centre (ties: the earlier centre).
        order = np.lexsort((center, dist, point))
        point, center, dist = point[order], center[order], dist[order]
        nearest = np.ones(len(point), dtype=bool)
        nearest[1:] = point[1:] != point[:-1]
        point, center, dist = point[nearest], center[nearest], dist[nearest]
        losers = np.unique(self._assign[point])
        self._d[point] = dist
        self._assign[point] = lo + center
        order = np.argsort(center, kind="stable")
        self._set_clusters(np.arange(lo, hi), point[order], np.bincount(center, minlength=hi - lo))
        self._drop_departed(losers)

    def _drop_departed(self, clusters: np.ndarray) -> None:
        """Remove from ``clusters`` the members that now belong to another centre."""
        groups = [self._members[j] for j in clusters.tolist()]
        sizes = [len(g) for g in groups]
        members = np.concatenate(groups) if groups else np.empty(0, np.int64)
        stay = self._assign[members] == np.repeat(clusters, sizes)
        counts = np.bincount(np.repeat(np.arange(len(clusters)), sizes)[stay], minlength=len(clusters))
        self._set_clusters(clusters, members[stay], counts)

    @staticmethod
    def _by_center(center: np.ndarray, m: int) -> list[tuple[int, slice]]:
        """(i, slice) for each non-empty run of value i in the sorted array ``center``."""
        edges = np.searchsorted(center, np.arange(m + 1)).tolist()
        return [(i, slice(a, b)) for i, (a, b) in enumerate(zip(edges[:-1], edges[1:])) if b > a]

    def _lower_bound(self, point: np.ndarray, center: np.ndarray) -> np.ndarray:
        """Lower bounds on ||x - c||² for (point, centre) pairs, from the projection alone."""
        px, cp = self._proj, self._cproj
        out = np.empty(len(point), np.float64)
        for lo in range(0, len(point), _ROW_BLOCK):
            p, c = point[lo : lo + _ROW_BLOCK], center[lo : lo + _ROW_BLOCK]
            diff = px.z[p]
            np.subtract(diff, cp.z[c], out=diff)
            gap = np.abs(px.r[p] - cp.r[c]) - px.r_err[p] - cp.r_err[c]
            np.maximum(gap, 0.0, out=gap)
            margin = self._margin * (px.sq_norm[p] + cp.sq_norm[c])
            out[lo : lo + _ROW_BLOCK] = np.einsum("ij,ij->i", diff, diff) + gap * gap - margin
        return out

    def _set_clusters(self, ids: np.ndarray, points: np.ndarray, counts: np.ndarray) -> None:
        """Make ``points`` (grouped by cluster, ``counts`` each) the members of ``ids``."""
        starts = np.concatenate(([0], np.cumsum(counts)[:-1])).astype(np.int64)
        for j, a, c in zip(ids.tolist(), starts.tolist(), counts.tolist()):
            self._members[j] = points[a : a + c]
        radius = np.zeros(len(ids), np.float32)
        filled = counts > 0
        if filled.any():
            radius[filled] = np.maximum.reduceat(self._d[points], starts[filled])
        self._reach[ids] = (4.0 * self._tol) * radius

    def top_candidates(self, b: int) -> Candidates:
        """The ``b`` best unpicked points and the order bound for all others.

        Only clusters whose radius reaches the (b+1)-th largest radius can hold the b+1
        best points, so a round costs O(#centres + their members), not O(N).
        """
        if b < 0:
            raise ValueError(f"b must be >= 0, got {b}")
        q = b + 1
        t = self._n_centers
        reach = self._reach[:t]
        kth = np.partition(reach, t - q)[t - q] if t >= q else 0.0
        if kth > 0.0:  # then the top-q clusters' farthest members are unpicked (d > 0)
            pool = np.concatenate([self._members[j] for j in np.flatnonzero(reach >= kth).tolist()])
        else:
            pool = np.arange(len(self._x))
        pool = pool[~self._picked[pool]]
        values = self._d[pool]
        if len(pool) > q:
            cut = np.partition(values, len(pool) - q)[len(pool) - q]
            pool = pool[values >= cut]
            values = self._d[pool]
        order = np.lexsort((self._gidx[pool], -values))[:q]
        pool, values = pool[order], values[order]
        top = pool[:b]
        if len(pool) > b:
            bound, bound_index = float(values[b]), int(self._gidx[pool[b]])
        else:
            bound, bound_index = -np.inf, -1
        return Candidates(values[:b], self._gidx[top], self._x[top], bound, bound_index)


@dataclass(frozen=True)
class GreedyResult:
    """Picks in order, driver-shard round trips, and the final max squared distance."""

    indices: np.ndarray  # int64 [n_select] global indices in pick order
    n_rounds: int  # rounds of add_centers + top_candidates on every shard
    coverage_radius_sq: float  # max over points of the squared distance to the nearest pick

    @property
    def coverage_radius(self) -> float:
        return float(np.sqrt(self.coverage_radius_sq))


def start_index_for(n: int, seed: int) -> int:
    """The seeded random first centre among ``n`` points."""
    return int(np.random.default_rng(seed).integers(n))


def greedy_select(shards: Sequence[ShardLike], n_select: int, start_index: int, batch: int = 64) -> GreedyResult:
    """Exact greedy k-center over sharded points, independent of the sharding.

    Greedy picks the unpicked point farthest from the picks so far (ties: the smaller
    global index). Each round every shard sends its ``batch`` best candidates and an order
    bound; the driver replays greedy steps on the union of candidates, updating their
    distances with the shards' formula, for as long as the next pick provably beats every
    point it has not seen; then it sends the confirmed picks to all shards. A round
    confirms at least one pick, usually many.
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if n_select < 1:
        raise ValueError(f"n_select must be >= 1, got {n_select}")
    found = [s.fetch_rows(np.array([start_index], np.int64)) for s in shards]
    new_idx = np.concatenate([f[0] for f in found])
    if len(new_idx) != 1:
        raise ValueError(f"start_index {start_index} must be held by exactly one shard")
    new_rows = np.concatenate([f[1] for f in found])
    picks = [start_index]
    n_rounds = 0
    while True:
        for s in shards:
            s.add_centers(new_rows, new_idx)
        n_rounds += 1
        if len(picks) == n_select:
            bounds = [s.top_candidates(0).bound for s in shards]
            return GreedyResult(np.array(picks, np.int64), n_rounds, max(0.0, *bounds))
        tops = [s.top_candidates(batch) for s in shards]
        values = np.concatenate([c.values for c in tops])
        indices = np.concatenate([c.indices for c in tops])
        rows = np.concatenate([c.rows for c in tops])
        if len(values) == 0:
            raise ValueError(f"n_select={n_select} exceeds the number of points")
        fences = [(c.bound, c.bound_index) for c in tops]
        confirmed: list[int] = []
        open_ = np.ones(len(values), dtype=bool)
        while len(picks) < n_select and open_.any():
            live = np.flatnonzero(open_)
            best = values[live].max()
            tied = live[values[live] == best]
            i = int(tied[np.argmin(indices[tied])])
            v, g = float(best), int(indices[i])
            if not all(v > bound or (v == bound and g < bound_index) for bound, bound_index in fences):
                break
            picks.append(g)
            confirmed.append(i)
            open_[i] = False
            np.minimum(values, sq_dists(rows, rows[i]), out=values)
        new_idx, new_rows = indices[confirmed], rows[confirmed]


def _validated(features: np.ndarray) -> np.ndarray:
    features = np.ascontiguousarray(features, dtype=np.float32)
    if features.ndim != 2 or len(features) == 0:
        raise ValueError(f"features must be a non-empty 2-D array, got shape {features.shape}")
    if not np.isfinite(features).all():
        raise ValueError("features contain NaN or infinite values")
    return features


def coreset_size(n: int, n_select: int | None, ratio: float | None) -> int:
    """The number of picks among ``n`` points: ``n_select``, or ``max(1, int(ratio·n))``."""
    if (n_select is None) == (ratio is None):
        raise ValueError("give exactly one of n_select and ratio")
    if ratio is not None:
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"ratio must be in (0, 1], got {ratio}")
        return max(1, int(ratio * n))
    if not 1 <= n_select <= n:
        raise ValueError(f"n_select must be in [1, {n}], got {n_select}")
    return int(n_select)


def _contiguous_bounds(n: int, n_shards: int) -> list[tuple[int, int]]:
    if not 1 <= n_shards <= n:
        raise ValueError(f"n_shards must be in [1, {n}], got {n_shards}")
    edges = np.linspace(0, n, n_shards + 1).astype(np.int64)
    return [(int(lo), int(hi)) for lo, hi in zip(edges[:-1], edges[1:])]


def random_projection(features: np.ndarray, dim: int, seed: int) -> np.ndarray:
    """Seeded Gaussian random projection to ``dim`` dims (float32), as approximate PatchCore."""
    if dim < 1:
        raise ValueError(f"projection_dim must be >= 1, got {dim}")
    matrix = np.random.default_rng(seed).standard_normal((features.shape[1], dim)) / np.sqrt(dim)
    return np.ascontiguousarray(features @ matrix.astype(np.float32))


def greedy_coreset(
    features: np.ndarray,
    n_select: int | None = None,
    ratio: float | None = None,
    method: str = "exact",
    projection_dim: int = 128,
    seed: int = 0,
    n_shards: int = 1,
) -> GreedyResult:
    """Greedy k-center coreset of ``features`` [N, D] in one process.

    Give ``n_select`` or ``ratio`` (size ``max(1, int(ratio·N))``). ``exact`` runs greedy on
    the features themselves; ``approximate`` runs the same greedy on a seeded Gaussian
    random projection to ``projection_dim`` dims (indices still refer to rows of
    ``features``; ``coverage_radius_sq`` is then in the projected space). ``n_shards``
    splits the points into contiguous shards, which never changes the picks.
    """
    features = _validated(features)
    size = coreset_size(len(features), n_select, ratio)
    if method == "approximate":
        features = random_projection(features, projection_dim, seed)
    elif method != "exact":
        raise ValueError(f"method must be 'exact' or 'approximate', got {method!r}")
    shards = [
        GreedyShard(features[lo:hi], np.arange(lo, hi)) for lo, hi in _contiguous_bounds(len(features), n_shards)
    ]
    return greedy_select(shards, size, start_index_for(len(features), seed))


def two_round_coreset(features: np.ndarray, n_select: int, n_shards: int, seed: int = 0) -> np.ndarray:
    """Two-round (composable) greedy: shards work alone, then one merge.

    Each contiguous shard greedily picks ``n_select`` of its own points (or all of them);
    exact greedy over the union of those picks then keeps ``n_select``. It needs no
    round trips between shards, but its radius is only bounded (within a small factor of
    optimal), not equal to exact greedy's. Returns global indices in pick order.
    """
    features = _validated(features)
    size = coreset_size(len(features), n_select, None)
    picked = [
        lo + greedy_coreset(features[lo:hi], n_select=min(size, hi - lo), seed=seed).indices
        for lo, hi in _contiguous_bounds(len(features), n_shards)
    ]
    union = np.sort(np.concatenate(picked))
    return union[greedy_coreset(features[union], n_select=size, seed=seed).indices]


def coverage_radius(features: np.ndarray, center_indices: np.ndarray, block: int = 1024) -> float:
    """Max over points of the Euclidean distance to the nearest centre, in row blocks.

    The nearest centre comes from a mean-centred GEMM, then that distance is recomputed
    row-wise in float64, so the value is accurate without ever forming an N×N matrix.
    """
    features = _validated(features)
    centers = features[np.asarray(center_indices, dtype=np.int64)]
    mean = features.mean(axis=0, dtype=np.float64).astype(np.float32)
    shifted = centers - mean
    half_sq = 0.5 * np.einsum("ij,ij->i", shifted, shifted)
    worst = 0.0
    for lo in range(0, len(features), block):
        rows = features[lo : lo + block]
        nearest = np.argmin(half_sq[None, :] - (rows - mean) @ shifted.T, axis=1)
        diff = rows.astype(np.float64) - centers[nearest]
        worst = max(worst, float(np.einsum("ij,ij->i", diff, diff).max()))
    return float(np.sqrt(worst))
