"""Greedy k-center (Gonzalez) coreset selection: exact picks, GEMM-screened work, shardable.

PatchCore subsamples its memory bank by greedy k-center: start from a seeded point, then
repeatedly add the point farthest from the centres chosen so far. Reference implementations
recompute every point's distance to each new centre (O(N·D) per step, memory-bound). This module
makes the *same picks* with the work shaped as matrix products:

* the driver confirms many picks per round (:func:`greedy_select`), so each shard applies a batch
  of new centres at once; one GEMM per block of points screens every (point, new centre) pair
  through the expansion ``||x||² - 2x·c + ||c||²`` (BLAS on the CPU; torch on a GPU, bf16 tensor cores
  by default); on the CPU the blocks go to one-thread workers (``anomaly_core.threads``: why not
  multi-threaded BLAS), on a GPU the shard's points, values, screens and exact values stay there;
* the screen is widened by a rigorous bound on its rounding (:func:`expansion_margin`), so it
  only lets through pairs that *might* lower a point's distance — about 7 per point over a whole
  run on real PatchCore features — and only those get their exact distance;
* every value that decides a pick comes from one exact formula (:func:`sq_dists`: the fixed-tree
  float64 sum of :func:`sq_distances`, rounded once to float32 — half the memory of float64 and the
  candidates' wire format, and still the same bits everywhere), so a point's value never depends on
  which shard holds it, what it was batched with, the thread count, the device or the screen's
  precision; the driver's replay uses the same formula, behind the same screen over its candidates' pairs.

Why not triangle-inequality pruning (an earlier version): real patch features have a high
intrinsic dimension — at a 10 % coreset the coverage radius is ~80 % of the points' RMS distance to
their mean, and 16 principal components hold ~55 % of the variance — so a new centre lies within
reach of nearly every cluster, nothing is pruned, and the bookkeeping costs more than a dense scan.

Points live in :class:`GreedyShard` objects. :func:`greedy_select` is the driver: it only talks to
shards through :class:`ShardLike` (local objects here, actor proxies in the cluster layer) and
returns bit-identical picks for any number of shards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, Sequence

import numpy as np

from anomaly_core.distances import MatrixDevice, Operand, check_float32_range, sq_distances, sq_dists
from anomaly_core.threads import BlockWorkers, block_starts, run_blocks


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
    # float32 [b', b'] or None: entry [i, j] is ``sq_dists(rows[j:j+1], rows[i])``, or +inf where that provably
    # does not lower candidate j's value (asked for by a lone shard on a GPU: GreedyShard._between)
    pairwise: np.ndarray | None = None


class ShardLike(Protocol):
    """What :func:`greedy_select` needs from a shard (a :class:`GreedyShard` or a proxy).

    Calls to one shard must take effect in the order they are made; ``add_centers`` may
    return before its work is done (e.g. a fire-and-forget actor call), which lets the
    cluster layer overlap the shards' updates.
    """

    def fetch_rows(self, global_indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...

    def add_centers(self, rows: np.ndarray, global_indices: np.ndarray) -> None: ...

    def top_candidates(self, b: int) -> Candidates: ...


class CentreScreen:
    """Points kept for screening products against centres: the centred transpose ``x̃`` with norm terms
    ``||x̃||²``, so that one product with centres ``-2c̃`` (norm terms ``||c̃||²(1-κ)``) gives every screened
    squared distance already lowered by the centre's share of the rounding bound (:func:`expansion_margin`
    through the device's margin). A (point, centre) pair whose product is not below the point's
    :meth:`limits` cannot lower that point's value: its exact squared distance is at least the value.
    """

    def __init__(self, points: Any, device: MatrixDevice) -> None:
        """``points``: float32 on ``device``, already checked by :func:`check_float32_range`."""
        ops = device.ops
        self.device = device
        self._mean = ops.cast(ops.mean64(points), ops.float32)
        centred = points - self._mean
        self.sq_norms = sq_distances(centred)  # float64 [n], exact
        self.kappa = device.margin(points.shape[1])
        self.columns = device.columns(ops.transposed(centred), ops.cast(self.sq_norms, ops.float32))

    def centres(self, rows: Any) -> Operand:
        """The left operand of products against :attr:`columns` for centres ``rows`` (float32 on the device)."""
        ops = self.device.ops
        centred = rows - self._mean
        norms = ops.cast(sq_distances(centred) * (1.0 - self.kappa), ops.float32)
        return self.device.rows(centred * -2.0, norms)

    def limits(self, values: Any, points: Any = None) -> Any:
        """Screened values below which a pair might lower ``values`` (the points' float32 values, or those of
        ``points`` only): ``value + κ·||x̃||²``, float32 rounded up."""
        ops = self.device.ops
        norms = self.sq_norms if points is None else self.sq_norms[points]
        return ops.round_up32(ops.cast(values, ops.float64) + self.kappa * norms)


class GreedyShard:
    """One shard of the points and each point's squared distance to the nearest centre, on a device.

    The points are also kept on ``device`` as a :class:`CentreScreen`, so that one product per block of
    points screens every (point, new centre) pair. On the torch path the points,
    values, thresholds, screens and exact values all stay on the device; only the few candidate rows
    and values the driver asks for come back.
    """

    def __init__(
        self,
        points: Any,
        global_indices: np.ndarray,
        device: MatrixDevice | None = None,
        block: int | None = None,
        threads: int = 1,
    ) -> None:
        """``points``: numpy, or a tensor (kept where it is if that is the device's). ``threads`` (CPU):
        blocks of points are screened by that many workers, each on one library thread; on a GPU the
        whole shard is one product."""
        self.device = device or MatrixDevice()
        ops = self.device.ops
        points = self.device.put(points)
        global_indices = np.asarray(global_indices, dtype=np.int64)
        if points.ndim != 2 or len(points) == 0:
            raise ValueError(f"points must be a non-empty 2-D array, got shape {tuple(points.shape)}")
        if global_indices.shape != (len(points),):
            raise ValueError("global_indices must hold one index per point")
        if not ops.all_finite(points):
            raise ValueError("points contain NaN or infinite values")
        check_float32_range(points, "coreset points")
        n = len(points)
        # Points per product on the CPU: a [centres, block] temporary of ~1 MB that stays in cache
        # (fewer centres, longer blocks); on a GPU the whole shard at once.
        self._block = block
        self._workers = BlockWorkers(threads if self.device.on_cpu else 1)  # reused every round
        self._x = points
        self._gidx = global_indices  # on the host for look-ups, on the device for ordering
        self._gidx_on_device = ops.asarray(global_indices, ops.int64)
        self._by_gidx = np.argsort(global_indices)
        self._d = ops.full(n, np.inf, ops.float32)
        self._picked = ops.full(n, False, ops.bool)
        self._screen = CentreScreen(points, self.device)
        self._thresholds = None  # per point, on the device: the screen's limits of d (set by the first centre)

    def __len__(self) -> int:
        return len(self._x)

    def fetch_rows(self, global_indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The requested global indices this shard holds, and their rows (numpy)."""
        local = self._local(np.asarray(global_indices, dtype=np.int64))
        local = local[local >= 0]
        return self._gidx[local], self.device.to_numpy(self._x[self.device.ops.asarray(local, self.device.ops.int64)])

    def _local(self, global_indices: np.ndarray) -> np.ndarray:
        """Local positions of global indices, -1 where this shard does not hold them."""
        pos = np.searchsorted(self._gidx, global_indices, sorter=self._by_gidx)
        local = self._by_gidx[np.minimum(pos, len(self._gidx) - 1)]
        return np.where(self._gidx[local] == global_indices, local, -1)

    def add_centers(self, rows: Any, global_indices: np.ndarray) -> None:
        """Lower each point's distance to the nearest centre by the new centres, exactly.

        A value is a minimum over centres, so a batch is applied at once and the result does
        not depend on how the centres were batched.
        """
        ops = self.device.ops
        rows = self.device.put(rows)
        local = self._local(np.asarray(global_indices, dtype=np.int64))
        self._picked[ops.asarray(local[local >= 0], ops.int64)] = True
        if self._thresholds is None and len(rows):  # the first centre reaches every point
            self._d[:] = sq_dists(self._x, rows[0])
            self._thresholds = self._screen.limits(self._d)
            rows = rows[1:]
        if len(rows) == 0:
            return
        operand = self._screen.centres(rows)
        n = len(self._x)
        if self._block:
            starts = range(0, n, self._block)
        elif self.device.on_cpu:
            starts = block_starts(n, max(1024, 2**18 // len(rows)), self._workers.threads, smallest=1024)
        else:
            starts = range(0, n, n)

        def screen(lo: int) -> None:  # blocks touch disjoint points, so workers never share a value
            hi = lo + starts.step
            products = self.device.product(operand, self._screen.columns, lo, hi)
            center, point = self.device.below(products, self._thresholds[lo:hi])
            if len(point):
                self._lower(lo + point, rows, center)

        self._workers.map(screen, starts)

    def _lower(self, points: Any, rows: Any, centers: Any) -> None:
        """Exact values for screened pairs (``points[i]``, ``rows[centers[i]]``); keep each point's minimum."""
        ops = self.device.ops
        values = ops.cast(sq_distances(self._x, rows, points, centers), ops.float32)
        before = self._d[points]
        ops.minimum_at(self._d, points, values)
        changed = points[self._d[points] < before]  # a point may repeat: each copy is given the same limit
        if len(changed):
            self._thresholds[changed] = self._screen.limits(self._d[changed], changed)

    def top_candidates(self, b: int, pairwise: bool = False) -> Candidates:
        """The ``b`` best unpicked points and the order bound for all others (numpy); ``pairwise``: with the
        candidates' distances to each other, computed where the points are (:meth:`_between`)."""
        if b < 0:
            raise ValueError(f"b must be >= 0, got {b}")
        ops = self.device.ops
        q = b + 1
        pool = ops.nonzero(~self._picked)[0]
        values = self._d[pool]
        if len(pool) > q:
            keep = values >= ops.kth_largest(values, q)
            pool, values = pool[keep], values[keep]
        order = ops.lexsort((self._gidx_on_device[pool], -values))[:q]
        pool, on_device = pool[order], values[order]
        values, top = self.device.to_numpy(on_device), self.device.to_numpy(pool)
        if len(top) > b:
            bound, bound_index = float(values[b]), int(self._gidx[top[b]])
        else:
            bound, bound_index = -np.inf, -1
        rows = self._x[pool[:b]]
        between = self._between(rows, on_device[:b]) if pairwise and len(rows) else None
        return Candidates(values[:b], self._gidx[top[:b]], self.device.to_numpy(rows), bound, bound_index, between)


    def _between(self, rows: Any, values: Any) -> np.ndarray:
        """``[b, b]`` float32, row ``i`` for pick ``i``: ``sq_dists(rows[j:j+1], rows[i])`` wherever one product of
        the candidates against each other (:class:`CentreScreen`, on the device) leaves open that pick ``i`` lowers
        candidate ``j``'s value (``values``, which only fall during the replay, so their limits stay valid); +inf
        where it proves it cannot, which the replay's minimum ignores. The exact formula thus runs for a few pairs
        rather than b² (at 1024-d, b² pairs cost more than the rest of a round on a GPU). Where the candidates are
        too close together for the screen's bound (:func:`check_float32_range`), every pair is computed."""
        ops = self.device.ops
        count = len(rows)
        try:
            check_float32_range(rows, "candidates")
            screen = CentreScreen(rows, self.device)
        except ValueError:
            screen = None
        if screen is None:
            every = ops.arange(count * count)
            pick, point = every // count, every % count
        else:
            products = self.device.product(screen.centres(rows), screen.columns)  # [pick, candidate]
            pick, point = ops.nonzero(products < screen.limits(values)[None, :])
        between = ops.full((count, count), np.inf, ops.float32)
        between[pick, point] = ops.cast(sq_distances(rows, rows, pick, point), ops.float32)
        return self.device.to_numpy(between)


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


def greedy_select(shards: Sequence[ShardLike], n_select: int, start_index: int, batch: int = 128,
                  pairwise: bool = False) -> GreedyResult:
    """Exact greedy k-center over sharded points, independent of the sharding.

    Greedy picks the unpicked point farthest from the picks so far (ties: the smaller
    global index). Each round every shard sends its ``batch`` best candidates and an order
    bound; the driver replays greedy steps on the union of candidates, updating their
    distances with the shards' formula, for as long as the next pick provably beats every
    point it has not seen; then it sends the confirmed picks to all shards. A round
    confirms at least one pick, usually many.

    ``pairwise`` (one shard only, a :class:`GreedyShard`): the shard also returns its candidates' distances to
    each other, computed on its device in one go, and the replay reads them instead of computing each pick's
    on the host (the same formula, so the same values and picks). On a GPU the per-pick host work was what
    bounded the greedy; on the CPU the incremental form does less arithmetic.
    """
    if pairwise and len(shards) != 1:
        raise ValueError("pairwise replay needs exactly one shard (the candidates of others are not on its device)")
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
        tops = [s.top_candidates(batch, pairwise=True) for s in shards] if pairwise else [
            s.top_candidates(batch) for s in shards]
        indices = np.concatenate([c.indices for c in tops])
        if len(indices) == 0:
            raise ValueError(f"n_select={n_select} exceeds the number of points")
        # In global-index order, argmax's first maximum is the tie-break greedy wants.
        order = np.argsort(indices)
        indices = indices[order]
        values = np.concatenate([c.values for c in tops])[order]
        rows = np.concatenate([c.rows for c in tops])[order]
        between = tops[0].pairwise[np.ix_(order, order)] if pairwise else None
        # Only the strongest fence binds: the largest bound, then the smallest index at that bound.
        fence, fence_index = max(((c.bound, c.bound_index) for c in tops), key=lambda f: (f[0], -f[1]))
        confirmed = _replay(values, indices, rows, between, fence, fence_index, n_select - len(picks))
        picks.extend(int(index) for index in indices[confirmed])
        new_idx, new_rows = indices[confirmed], rows[confirmed]


def _replay(values: np.ndarray, indices: np.ndarray, rows: np.ndarray, between: np.ndarray | None, fence: float,
            fence_index: int, most: int) -> list[int]:
    """Greedy steps over the candidates (sorted by global index) while the next pick provably beats the fence
    (``(fence, fence_index)`` orders after it), at most ``most``; returns their positions in pick order.

    With ``between`` (the candidates' distances to each other) a step is a few whole-array operations over
    the candidates: ~3 µs, where the per-pick bookkeeping was the greedy's cost on a GPU. Without it, only the
    candidates that can still beat the fence get each pick's distance, computed here, and only where one
    product per round over every pair of candidates (:class:`CentreScreen`) leaves open that the pick lowers
    their value: usually for none of them, so most picks cost no exact distance at all.
    """
    confirmed: list[int] = []
    if between is not None:
        while len(confirmed) < most:
            i = int(values.argmax())  # in global-index order, the first maximum is greedy's tie-break
            v = values[i]
            if v == -np.inf or not (v > fence or (v == fence and indices[i] < fence_index)):
                break
            confirmed.append(i)
            np.minimum(values, between[i], out=values)  # row i: pick i's distances (+inf: cannot lower)
            values[i] = -np.inf  # distances are >= 0, so -inf marks the picked
        return confirmed
    # Only candidates that could still be picked this round (beating the fence) need new values.
    live = np.flatnonzero((values > fence) | ((values == fence) & (indices < fence_index)))
    screen = _replay_screen(rows) if len(live) > 1 else None
    products = screen.device.product(screen.centres(rows), screen.columns) if screen else None  # [pick, candidate]
    limits = screen.limits(values) if screen else None  # float32: screens with stale (larger) limits still hold
    while len(confirmed) < most and len(live):
        i = int(live[np.argmax(values[live])])  # every candidate that can be the pick is live
        confirmed.append(i)
        values[i] = -np.inf  # distances are >= 0, so -inf marks the picked
        if screen is None:
            near = live
        else:
            limits[i] = -np.inf
            near = live[products[i, live] < limits[live]]
        if len(near):
            values[near] = np.minimum(values[near], sq_dists(rows[near], rows[i]))
            if screen is not None:
                limits[near] = screen.limits(values[near], near)
        live = live[(values[live] > fence) | ((values[live] == fence) & (indices[live] < fence_index))]
    return confirmed


def _replay_screen(rows: np.ndarray) -> CentreScreen | None:
    """A numpy screen of the candidates against each other, or None where their values are too close together
    for its bound (the same refusal as a shard's: :func:`check_float32_range`), so every pair is computed."""
    try:
        check_float32_range(rows, "candidates")
    except ValueError:
        return None
    return CentreScreen(rows, MatrixDevice())


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


def random_projection(features: np.ndarray, dim: int, seed: int, threads: int = 1, rows: int = 4096) -> np.ndarray:
    """Seeded Gaussian random projection to ``dim`` dims (float32), as approximate PatchCore.

    One product per ``rows`` rows, on ``threads`` one-thread workers. A product's last bits may depend
    on its shape, so callers that must reproduce points elsewhere fix ``rows`` (``coreset_points``: one
    image's patches).
    """
    if dim < 1:
        raise ValueError(f"projection_dim must be >= 1, got {dim}")
    matrix = (np.random.default_rng(seed).standard_normal((features.shape[1], dim)) / np.sqrt(dim)).astype(np.float32)
    blocks = run_blocks(threads, lambda lo: features[lo : lo + rows] @ matrix, range(0, len(features), rows))
    return np.ascontiguousarray(np.concatenate(blocks))


def greedy_coreset(
    features: np.ndarray,
    n_select: int | None = None,
    ratio: float | None = None,
    method: str = "exact",
    projection_dim: int = 128,
    seed: int = 0,
    n_shards: int = 1,
    threads: int = 1,
    batch: int = 128,
) -> GreedyResult:
    """Greedy k-center coreset of ``features`` [N, D] in one process.

    Give ``n_select`` or ``ratio`` (size ``max(1, int(ratio·N))``). ``exact`` runs greedy on
    the features themselves; ``approximate`` runs the same greedy on a seeded Gaussian
    random projection to ``projection_dim`` dims (indices still refer to rows of
    ``features``; ``coverage_radius_sq`` is then in the projected space). ``n_shards``
    splits the points into contiguous shards, which never changes the picks; nor do ``threads``
    (see :class:`GreedyShard`) or ``batch`` (candidates per shard per round).
    """
    features = _validated(features)
    size = coreset_size(len(features), n_select, ratio)
    if method == "approximate":
        features = random_projection(features, projection_dim, seed, threads)
    elif method != "exact":
        raise ValueError(f"method must be 'exact' or 'approximate', got {method!r}")
    shards = [
        GreedyShard(features[lo:hi], np.arange(lo, hi), threads=threads)
        for lo, hi in _contiguous_bounds(len(features), n_shards)
    ]
    return greedy_select(shards, size, start_index_for(len(features), seed), batch)


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


def coverage_radius(features: np.ndarray, center_indices: np.ndarray, block: int = 1024, threads: int = 1) -> float:
    """Max over points of the Euclidean distance to the nearest centre, in row blocks (on ``threads``
    one-thread workers).

    The nearest centre comes from a mean-centred GEMM, then that distance is recomputed
    row-wise in float64, so the value is accurate without ever forming an N×N matrix.
    """
    features = _validated(features)
    centers = features[np.asarray(center_indices, dtype=np.int64)]
    mean = features.mean(axis=0, dtype=np.float64).astype(np.float32)
    shifted = centers - mean
    half_sq = 0.5 * np.einsum("ij,ij->i", shifted, shifted)

    def farthest(lo: int) -> float:
        rows = features[lo : lo + block]
        nearest = np.argmin(half_sq[None, :] - (rows - mean) @ shifted.T, axis=1)
        diff = rows.astype(np.float64) - centers[nearest]
        return float(np.einsum("ij,ij->i", diff, diff).max())

    return float(np.sqrt(max(run_blocks(threads, farthest, range(0, len(features), block)))))
