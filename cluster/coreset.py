"""Sharded greedy coreset: the training patches stay spread over holder actors during the greedy loop.

Each holder pulls its extractor outputs straight from the object store (the driver never gathers the
features), keeps a ``GreedyShard`` and answers the driver's ``greedy_select`` rounds, so the picks are
those of single-process exact greedy. The proxy overlaps holders: each round's centres go into the object
store once, and every holder gets one call that applies them and returns its next candidates, so all
holders work at once and every update is acknowledged. A holder whose update raises (a CUDA
out-of-memory on a shared GPU) drops its shard rather than keep a half-updated one; a holder that raises
or dies is reloaded from the same feature objects and replayed with every centre sent so far — the
min-distance state is a pure function of (points, centres), so it is indistinguishable from the lost one.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np
import ray
from ray.exceptions import RayActorError, RayTaskError

from anomaly_core.coreset import Candidates, GreedyShard, coreset_size, greedy_coreset, greedy_select, start_index_for
from anomaly_core.distances import array_ops
from anomaly_core.features import PatchFeatures, coreset_points
from anomaly_core.threads import limit_threads
from cluster.devices import ReportsThreads, math_device, pinned
from cluster.resources import Placement


def global_patch_indices(part: PatchFeatures) -> np.ndarray:
    """Patch ``p`` of sample ``s`` is global row ``s * patches_per_image + p`` (the engine's flat order)."""
    per_image = part.embeddings.shape[1]
    return (part.sample_indices[:, None] * per_image + np.arange(per_image)[None, :]).reshape(-1)


class CoresetHolder(ReportsThreads):
    """One shard of a category's training patches (original rows + the space greedy runs in).

    Long-lived: one actor serves category after category (``load`` replaces its shard), so the
    process start-up is paid once per run, while the extractors are still busy. Its screening
    products run on its GPU share if it has one, else on the CPU with the planned thread count.
    """

    def __init__(self) -> None:
        self.device = math_device()

    def load(self, parts: list[ray.ObjectRef], method: str, projection_dim: int, seed: int, threads: int
             ) -> tuple[int, list[int]]:
        """Hold a category's shard; from here on the planned ``threads`` for all of this process's
        libraries (Ray's default is the reservation rounded down) and as many one-thread workers.
        Returns ``shard_info()``, so a caller that waits for it knows the shard is in place."""
        self._use_threads(threads)
        self.threads = threads
        features = self._features(parts)
        self.grid = features[0].grid
        rows = [part.flat() for part in features]  # host arrays, or tensors on this process's GPU (colocated)
        self.original = array_ops(rows[0]).concat(rows)
        self.indices = np.concatenate([global_patch_indices(part) for part in features])
        # Exact greedy runs on the rows themselves: share them instead of holding a second copy.
        self.points = self.original if method != "approximate" else np.concatenate(
            [coreset_points(part, method, projection_dim, seed, threads) for part in features]
        )
        self.shard = GreedyShard(self.points, self.indices, self.device, threads=threads)
        return self.shard_info()

    def _use_threads(self, threads: int) -> None:
        limit_threads(threads)

    def _features(self, parts: list[ray.ObjectRef]) -> list[PatchFeatures]:
        """The shard's feature parts (here: from the object store)."""
        return ray.get(parts)

    def unload(self) -> None:
        """Free the finished category's shard."""
        for name in ("original", "indices", "points", "shard", "grid"):
            self.__dict__.pop(name, None)

    def shard_info(self) -> tuple[int, list[int]]:
        """Points held, and the patch grid of the images they came from."""
        return len(self.indices), list(self.grid)

    def fetch_rows(self, global_indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.shard.fetch_rows(global_indices)

    def add_centers(self, rows: np.ndarray, global_indices: np.ndarray) -> None:
        """Apply centres; if that fails part-way the shard is dropped (a later call fails, the proxy reloads)."""
        try:
            self.shard.add_centers(rows, global_indices)
        except BaseException:
            self.unload()
            raise

    def advance(self, centres: tuple[np.ndarray, np.ndarray], b: int) -> Candidates:
        """One round: apply ``centres`` (rows, global indices), then the ``b`` best candidates."""
        self.add_centers(*centres)
        return self.shard.top_candidates(b)

    def top_candidates(self, b: int) -> Candidates:
        return self.shard.top_candidates(b)

    def original_rows(self, global_indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Bank rows (un-projected, on the host) for the requested indices this holder owns."""
        local = np.flatnonzero(np.isin(self.indices, global_indices))
        ops = array_ops(self.original)
        return self.indices[local], ops.to_numpy(self.original[ops.asarray(local, ops.int64)])

    def select(self, n_select: int, start_index: int, batch: int) -> tuple[np.ndarray, float, int]:
        """The whole greedy where this holder holds every point: picks, squared radius and rounds, with no
        round trip to the driver (the same ``greedy_select``, so the same picks)."""
        result = greedy_select([self.shard], n_select, start_index, batch=batch, pairwise=not self.shard.device.on_cpu)
        return result.indices, result.coverage_radius_sq, result.n_rounds

    def local_greedy(self, n_select: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """First round of the two-round mode: exact greedy inside this shard only."""
        points = array_ops(self.points).to_numpy(self.points)
        local = greedy_coreset(points, n_select=min(n_select, len(points)), seed=seed, threads=self.threads).indices
        return self.indices[local], points[local]


class HolderPool:
    """The run's coreset holder actors, started with the pipeline so their start-up overlaps extraction.

    Each sits where the resource plan put it (``None``: anywhere, with no reservation).
    """

    def __init__(self, placements: Sequence[Placement | None], actors: Sequence[Any] = ()) -> None:
        """``actors``: holders that exist already (colocated extractors, which Ray restarts itself): none are
        started or replaced."""
        self.placements = list(placements)
        self.remote_class = ray.remote(max_restarts=0)(CoresetHolder)
        self.owned = not actors
        self.actors = list(actors) or [self._start(slot) for slot in range(len(self.placements))]
        self._centres: tuple[Any, Any, ray.ObjectRef] | None = None

    def centres_ref(self, rows: np.ndarray, global_indices: np.ndarray) -> ray.ObjectRef:
        """A round's centres in the object store, put once for all holders (greedy hands every shard the
        same arrays)."""
        if self._centres is None or self._centres[0] is not rows or self._centres[1] is not global_indices:
            self._centres = (rows, global_indices, ray.put((rows, global_indices)))
        return self._centres[2]

    def _start(self, slot: int) -> Any:
        return self.remote_class.options(**pinned(self.placements[slot])).remote()

    def replace(self, slot: int) -> Any:
        """A fresh actor in place of a dead one (later categories use it too); a colocated extractor is
        restarted by Ray, so its handle stays."""
        if self.owned:
            self.actors[slot] = self._start(slot)
        return self.actors[slot]


REBUILDS = 3  # replacements of a dead holder per call before the run gives up


class HolderProxy:
    """``ShardLike`` view of a holder actor: pipelined calls, rebuilt and replayed if the actor dies."""

    def __init__(self, pool: HolderPool, slot: int, load_args: tuple, batch: int) -> None:
        self.pool, self.slot, self.load_args = pool, slot, load_args
        self.actor = pool.actors[slot]
        self.loading: ray.ObjectRef | None = self.actor.load.remote(*load_args)
        self.batch = batch
        self.sent: list[tuple[np.ndarray, np.ndarray]] = []
        self.prefetched: ray.ObjectRef | None = None
        self.restarts = 0

    def _call(self, method: str, *args: Any, rebuild_first: bool = False) -> Any:
        """The call on the holder, rebuilt up to ``REBUILDS`` times: a holder restarted right after its node
        crashed may be placed on that node again before Ray has declared it dead, and die with it; a holder
        whose call raised has dropped its shard and is reloaded (the error is raised if it keeps failing)."""
        for attempt in range(REBUILDS + 1):
            try:
                if rebuild_first or attempt:
                    self._rebuild()
                return ray.get(getattr(self.actor, method).remote(*args))
            except (RayActorError, RayTaskError):
                if attempt == REBUILDS:
                    raise

    def _rebuild(self) -> None:
        """Reload the shard and replay every centre, acknowledged: on a fresh actor if this one died, else
        on the same one."""
        self.restarts += 1
        self.prefetched = None
        try:
            ray.get(self.actor.__ray_ready__.remote())
        except RayActorError:
            self.actor = self.pool.replace(self.slot)
        # One call after the other, each acknowledged: a colocated holder runs its calls on a thread pool, in
        # no guaranteed order.
        ray.get(self.actor.load.remote(*self.load_args))
        if self.sent:
            rows = np.concatenate([rows for rows, _ in self.sent])
            indices = np.concatenate([indices for _, indices in self.sent])
            ray.get(self.actor.add_centers.remote(rows, indices))

    def shard_info(self) -> tuple[int, list[int]]:
        """Points held and their grid, once the shard is loaded (every later call is made after this)."""
        if self.loading is not None:
            ref, self.loading = self.loading, None
            try:
                return ray.get(ref)
            except (RayActorError, RayTaskError):
                return self._call("shard_info", rebuild_first=True)
        return self._call("shard_info")

    def fetch_rows(self, global_indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self._call("fetch_rows", global_indices)

    def add_centers(self, rows: np.ndarray, global_indices: np.ndarray) -> None:
        """Queue the round on the holder (returns at once, so all holders work side by side); its result,
        and any error of the update, comes with the next ``top_candidates``."""
        self.sent.append((rows, global_indices))
        self.prefetched = self.actor.advance.remote(self.pool.centres_ref(rows, global_indices), self.batch)

    def top_candidates(self, b: int) -> Candidates:
        if self.prefetched is not None:  # always awaited: an update that failed must not go unnoticed
            ref, self.prefetched = self.prefetched, None
            try:
                candidates = ray.get(ref)
            except (RayActorError, RayTaskError):
                return self._call("top_candidates", b, rebuild_first=True)
            if b == self.batch:
                return candidates
        return self._call("top_candidates", b)


def _assign_parts(refs: list[ray.ObjectRef], n_holders: int, owners: Sequence[int | None] = ()
                  ) -> dict[int, list[ray.ObjectRef]]:
    """Feature parts per holder slot: each to its ``owners`` entry (the colocated extractor that holds it),
    the rest round robin; holders with no part are left out."""
    owners = list(owners) or [None] * len(refs)
    groups: dict[int, list[ray.ObjectRef]] = {}
    unowned = [ref for ref, owner in zip(refs, owners) if owner is None]
    for ref, owner in zip(refs, owners):
        if owner is not None:
            groups.setdefault(owner, []).append(ref)
    spread = max(1, min(n_holders, len(unowned)))
    for holder in range(spread):
        if unowned[holder::spread]:
            groups.setdefault(holder, []).extend(unowned[holder::spread])
    return dict(sorted(groups.items()))


def distributed_coreset(
    refs: list[ray.ObjectRef],
    pool: HolderPool,
    method: str,
    ratio: float,
    projection_dim: int,
    seed: int,
    mode: str = "sharded",
    batch: int = 64,
    threads: Sequence[int] | None = None,
    after: Sequence[ray.ObjectRef] = (),
    owners: Sequence[int | None] = (),
) -> tuple[np.ndarray, dict[str, Any]]:
    """Select a category's bank from extractor outputs ``refs``; returns (bank rows, info).

    ``threads[slot]`` is the thread count holder ``slot`` uses for this category (default 1). The
    greedy waits for the objects ``after`` (holders load their shards meanwhile); ``seconds`` counts
    from then. ``owners``: per ref, the holder slot that already holds its features (colocated), or None.
    Where one holder holds every point, it runs the whole greedy itself (``CoresetHolder.select``): the
    same picks without a driver round trip per batch of picks.
    """
    threads = list(threads) if threads is not None else [1] * len(pool.actors)
    proxies = [
        HolderProxy(pool, slot, (group, method, projection_dim, seed, threads[slot]), batch)
        for slot, group in _assign_parts(refs, len(pool.actors), owners).items()
    ]
    if after:
        ray.wait(list(after), num_returns=len(after), fetch_local=False)
    started = time.perf_counter()
    described = [proxy.shard_info() for proxy in proxies]
    n_points, grid = int(sum(size for size, _ in described)), described[0][1]
    if method == "none":
        chosen = np.arange(n_points, dtype=np.int64)
        info = {"coverage_radius": 0.0, "rounds": 0}
    else:
        n_select = coreset_size(n_points, None, ratio)
        start = start_index_for(n_points, seed)
        if mode == "two_round":
            chosen, info = _two_round(proxies, n_select, seed)
        elif len(proxies) == 1:
            chosen, radius_sq, rounds = proxies[0]._call("select", n_select, start, batch)
            info = {"coverage_radius": float(np.sqrt(radius_sq)), "rounds": rounds, "driver_round_trips": 1}
        else:
            result = greedy_select(proxies, n_select, start, batch=batch)
            chosen = result.indices
            info = {"coverage_radius": result.coverage_radius, "rounds": result.n_rounds,
                    "driver_round_trips": result.n_rounds}
    rows = _gather_rows(proxies, chosen)
    for proxy in proxies:
        proxy.actor.unload.remote()
    info["holder_restarts"] = sum(proxy.restarts for proxy in proxies)
    info["holders"] = len(proxies)
    return rows, {"coreset": info, "n_patches": n_points, "grid": grid, "seconds": time.perf_counter() - started}


def _two_round(proxies: list[HolderProxy], n_select: int, seed: int) -> tuple[np.ndarray, dict[str, Any]]:
    """Greedy per holder, then exact greedy over the union; radius measured on all points after."""
    local = ray.get([proxy.actor.local_greedy.remote(n_select, seed) for proxy in proxies])
    union_indices = np.concatenate([indices for indices, _ in local])
    union_points = np.concatenate([points for _, points in local])
    order = np.argsort(union_indices, kind="stable")
    union_indices, union_points = union_indices[order], union_points[order]
    picks = greedy_coreset(union_points, n_select=min(n_select, len(union_points)), seed=seed).indices
    chosen = union_indices[picks]
    for proxy in proxies:
        proxy.add_centers(union_points[picks], chosen)
    radius_sq = max(proxy.top_candidates(0).bound for proxy in proxies)
    return chosen, {"coverage_radius": float(np.sqrt(max(radius_sq, 0.0))), "rounds": 2}


def _gather_rows(proxies: list[HolderProxy], chosen: np.ndarray) -> np.ndarray:
    """The bank in pick order, fetched from whichever holder owns each row."""
    found = ray.get([proxy.actor.original_rows.remote(chosen) for proxy in proxies])
    indices = np.concatenate([indices for indices, _ in found])
    rows = np.concatenate([rows for _, rows in found])
    position = {int(index): row for row, index in enumerate(indices)}
    return np.ascontiguousarray(rows[[position[int(index)] for index in chosen]])
