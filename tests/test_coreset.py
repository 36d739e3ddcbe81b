"""Greedy k-center coreset: same picks as plain greedy, for any sharding, and sane radii."""

from __future__ import annotations

import numpy as np
import pytest

import anomaly_core.coreset as coreset
from anomaly_core.coreset import (
    GreedyShard,
    coverage_radius,
    greedy_coreset,
    greedy_select,
    start_index_for,
    two_round_coreset,
)
from anomaly_core.distances import MatrixDevice, sq_distances, sq_dists
from anomaly_core.features import PatchFeatures, coreset_points


def clustered(n: int, dim: int, seed: int, k: int = 12, intrinsic: int = 6) -> np.ndarray:
    """Gaussian mixture with low-dimensional components plus a little isotropic noise."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(k, dim)) * 4
    bases = rng.normal(size=(k, intrinsic, dim)) / np.sqrt(intrinsic)
    labels = rng.integers(k, size=n)
    latent = rng.normal(size=(n, intrinsic)) * rng.uniform(0.5, 2.0, size=(k, 1))[labels]
    x = means[labels] + np.einsum("ni,nid->nd", latent, bases[labels]) + 0.1 * rng.normal(size=(n, dim))
    return x.astype(np.float32)


def naive_greedy_f64(x: np.ndarray, n_select: int, start: int) -> tuple[list[int], list[np.ndarray]]:
    """Textbook greedy: full float64 min-distance update per step. Returns picks and, per
    step after the first, the min-distance vector the pick was chosen from."""
    x64 = x.astype(np.float64)
    d = np.full(len(x), np.inf)
    picks, vectors = [start], []
    for _ in range(n_select - 1):
        d = np.minimum(d, ((x64 - x64[picks[-1]]) ** 2).sum(axis=1))
        masked = d.copy()
        masked[picks] = -np.inf
        vectors.append(masked)
        picks.append(int(np.argmax(masked)))
    return picks, vectors


def naive_greedy_f32(x: np.ndarray, n_select: int, start: int) -> list[int]:
    """Same loop with the engine's float32 formula: must agree bit for bit, ties included."""
    d = np.full(len(x), np.inf, np.float32)
    picked = np.zeros(len(x), dtype=bool)
    picks = [start]
    for _ in range(n_select - 1):
        picked[picks[-1]] = True
        d = np.minimum(d, sq_dists(x, x[picks[-1]]))
        picks.append(int(np.argmax(np.where(picked, -np.inf, d))))  # argmax: first = smallest index
    return picks


def random_shards(x: np.ndarray, n_shards: int, seed: int, **shard_args) -> list[GreedyShard]:
    """Uneven random partition, each shard's global indices in shuffled order."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    cuts = np.sort(rng.choice(np.arange(1, len(x)), size=n_shards - 1, replace=False))
    return [GreedyShard(x[part], part, **shard_args) for part in np.split(order, cuts)]


def test_picks_the_farthest_point_each_step_like_naive_float64_greedy():
    x = clustered(3000, 64, seed=1)
    start = start_index_for(len(x), seed=0)
    ref, vectors = naive_greedy_f64(x, 150, start)
    got = greedy_coreset(x, n_select=150, seed=0)
    for pick, vector in zip(got.indices[1:], vectors):
        assert vector[pick] == vector.max()
    assert got.indices.tolist() == ref


def test_matches_float32_greedy_bit_for_bit_with_duplicates_and_ties():
    # Small integer grid: many exact ties and duplicates, so picks end at distance 0.
    x = np.random.default_rng(3).integers(0, 3, size=(600, 4)).astype(np.float32)  # 81 distinct rows
    start = start_index_for(len(x), seed=5)
    got = greedy_coreset(x, n_select=500, seed=5)
    assert got.indices.tolist() == naive_greedy_f32(x, 500, start)
    assert len(set(got.indices.tolist())) == 500
    assert got.coverage_radius_sq == 0.0


@pytest.mark.parametrize("n_shards", [2, 3, 5])
@pytest.mark.parametrize("batch", [1, 7, 64])
def test_sharded_selection_is_bit_identical_to_single_shard(n_shards: int, batch: int):
    x = clustered(2000, 48, seed=2)
    start = start_index_for(len(x), seed=4)
    single = greedy_select([GreedyShard(x, np.arange(len(x)))], 200, start)
    sharded = greedy_select(random_shards(x, n_shards, seed=n_shards + batch), 200, start, batch=batch)
    assert sharded.indices.tolist() == single.indices.tolist()
    assert sharded.coverage_radius_sq == single.coverage_radius_sq


@pytest.mark.parametrize("device", [MatrixDevice(), MatrixDevice("cpu", use_torch=True, precision="bf16")])
@pytest.mark.parametrize("points", ["ties", "offset"])
def test_pairwise_replay_picks_exactly_what_the_incremental_replay_picks(device: MatrixDevice, points: str):
    """A lone shard on a GPU hands the driver its candidates' distances to each other, computed in one go on the
    device: the same formula, so the same picks and radius, on duplicates and ties and on points far from the
    origin; a second shard is refused (its candidates are not on the device)."""
    rng = np.random.default_rng(9)
    x = (rng.integers(0, 3, size=(700, 5)).astype(np.float32) if points == "ties"
         else (clustered(900, 40, seed=9) + 5e3).astype(np.float32))
    start = start_index_for(len(x), seed=1)
    for batch in (1, 16, 128):
        incremental = greedy_select([GreedyShard(x, np.arange(len(x)), device)], 300, start, batch=batch)
        together = greedy_select([GreedyShard(x, np.arange(len(x)), device)], 300, start, batch=batch, pairwise=True)
        assert together.indices.tolist() == incremental.indices.tolist()
        assert together.coverage_radius_sq == incremental.coverage_radius_sq and together.n_rounds == incremental.n_rounds
    candidates = GreedyShard(x, np.arange(len(x)), device)
    greedy_select([candidates], 200, start)  # mid-greedy: values well below the candidates' spacing
    top = candidates.top_candidates(40, pairwise=True)
    exact = np.stack([sq_dists(top.rows, row) for row in top.rows])  # [pick, candidate]
    computed = np.isfinite(top.pairwise)
    assert np.array_equal(top.pairwise[computed], exact[computed])  # the formula itself wherever computed
    assert (exact[~computed] >= top.values[None, :].repeat(len(exact), 0)[~computed]).all()  # +inf: cannot lower
    if points == "offset":  # clustered: most candidates are farther from each other than from their centres
        assert computed.sum() < computed.size / 2
    with pytest.raises(ValueError, match="exactly one shard"):
        greedy_select(random_shards(x, 2, seed=0), 10, start, pairwise=True)


def near_tie_candidates(kind: str) -> np.ndarray:
    """Candidate rows where a screen's rounding matters most: two tight groups far apart (norms about their
    mean dwarf the distances within a group), with exact duplicates and neighbours one float32 step away in
    every coordinate; or a small integer grid."""
    rng = np.random.default_rng(21)
    if kind == "grid":
        return rng.integers(0, 3, size=(150, 6)).astype(np.float32)
    x = (clustered(150, 64, seed=21) * np.float32(1e-2) + np.float32(3e3)).astype(np.float32)
    x[::2] -= np.float32(6e3)
    x[100:120] = x[:20]
    x[120:140] = np.nextafter(x[20:40], np.float32(np.inf))
    return x


@pytest.mark.parametrize("kind", ["grid", "offset"])
def test_replay_screen_passes_every_pair_that_lowers_a_value_by_one_step(kind: str):
    """The driver's screen against the exact formula where it is tightest: for each pick, every candidate's
    value set one float32 step above its exact distance to the pick (so the pick lowers it) must pass."""
    rows = near_tie_candidates(kind)
    screen = coreset._replay_screen(rows)
    products = screen.device.product(screen.centres(rows), screen.columns)
    for pick in range(len(rows)):
        exact = sq_dists(rows, rows[pick])
        assert np.all(products[pick] < screen.limits(np.nextafter(exact, np.float32(np.inf))))
    assert coreset._replay_screen(np.eye(4, 8, dtype=np.float32) * np.float32(1e-17)) is None  # squares underflow


@pytest.mark.parametrize("kind", ["grid", "offset"])
def test_screened_replay_confirms_what_computing_every_pair_confirms(kind: str, monkeypatch):
    """Values that a pick lowers by one step, leaves equal, or does not reach: the same picks in the same order
    and the same values as the replay that computes every live candidate's distance to every pick."""
    rows = near_tie_candidates(kind)
    rng = np.random.default_rng(22)
    indices = np.arange(len(rows)) * 3
    start = sq_dists(rows, rows[7])
    start[::3] = np.nextafter(start[::3], np.float32(np.inf))  # lowered by that pick, by one step
    start[1::3] = np.maximum(start[1::3], sq_dists(rows[1::3], rows[40]))  # left equal by pick 40, or above it
    start += rng.integers(0, 2, size=len(rows)).astype(np.float32) * start.max()  # half of them far ahead
    rounds = ((-np.inf, len(rows) // 2), (float(np.quantile(start, 0.1)), len(rows)))  # (fence, most)
    runs = {}
    for screened in (True, False):
        if not screened:
            monkeypatch.setattr(coreset, "_replay_screen", lambda rows: None)
        for fence, most in rounds:
            values = start.copy()
            runs[screened, fence] = coreset._replay(values, indices, rows, None, fence, 3 * 75, most), values
    for fence, most in rounds:
        (confirmed, values), (every_pair, every_value) = runs[True, fence], runs[False, fence]
        assert confirmed == every_pair and len(confirmed) >= min(most, 10)
        assert np.array_equal(values, every_value) and np.isfinite(values).sum() >= len(rows) - most


def test_batched_rounds_confirm_many_picks():
    x = clustered(3000, 64, seed=6)
    result = greedy_coreset(x, n_select=300)
    assert result.n_rounds <= 300 // 5


def test_sq_dists_value_does_not_depend_on_the_batch():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(9000, 203)).astype(np.float32)
    c = rng.normal(size=203).astype(np.float32)
    all_rows = sq_dists(x, c)
    index = rng.permutation(len(x))[:5000]
    assert np.array_equal(sq_dists(x[index], c), all_rows[index])
    assert all(sq_dists(x[i : i + 1], c)[0] == all_rows[i] for i in range(0, len(x), 997))


def test_coverage_radius_agrees_with_brute_force_and_with_the_greedy():
    x = clustered(1500, 32, seed=7)
    result = greedy_coreset(x, n_select=60)
    x64 = x.astype(np.float64)
    brute = np.sqrt(((x64[:, None, :] - x64[None, result.indices, :]) ** 2).sum(-1).min(1).max())
    assert coverage_radius(x, result.indices, block=100) == pytest.approx(brute, rel=1e-6)
    assert result.coverage_radius == pytest.approx(brute, rel=1e-5)


def test_greedy_radius_has_the_two_approximation_certificate():
    # The n picks plus the farthest remaining point are pairwise >= the radius apart, so any
    # n centres leave a radius >= half of it: greedy is within 2x of optimal.
    x = clustered(2000, 32, seed=8)
    result = greedy_coreset(x, n_select=101)
    picks, last = result.indices[:100], result.indices[100]
    radius = coverage_radius(x, picks)
    pts = x[np.append(picks, last)].astype(np.float64)
    pairwise = np.sqrt(((pts[:, None] - pts[None]) ** 2).sum(-1))
    np.fill_diagonal(pairwise, np.inf)
    assert pairwise.min() >= radius * (1 - 1e-6)
    random_radius = coverage_radius(x, np.random.default_rng(0).choice(len(x), 100, replace=False))
    assert radius < random_radius


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_approximate_and_two_round_radii_stay_close_to_exact(seed: int):
    # Measured on this data (seeds 0-5, N=4000, D=256 -> 128, n=200): approximate/exact
    # 1.03-1.19, two-round (4 shards)/exact 1.06-1.17, random subset/exact 1.44-1.76.
    x = clustered(4000, 256, seed=seed)
    exact = coverage_radius(x, greedy_coreset(x, n_select=200, seed=seed).indices)
    approx = greedy_coreset(x, n_select=200, method="approximate", projection_dim=128, seed=seed)
    assert coverage_radius(x, approx.indices) <= 1.35 * exact
    two_round = two_round_coreset(x, 200, n_shards=4, seed=seed)
    assert len(np.unique(two_round)) == 200
    assert coverage_radius(x, two_round) <= 1.35 * exact


def test_deterministic_for_a_seed():
    x = clustered(1000, 16, seed=9)
    a = greedy_coreset(x, ratio=0.05, seed=11)
    b = greedy_coreset(x, ratio=0.05, seed=11)
    assert np.array_equal(a.indices, b.indices)
    assert a.indices[0] == start_index_for(1000, 11)
    assert greedy_coreset(x, ratio=0.05, seed=12).indices[0] != a.indices[0]
    approx = greedy_coreset(x, ratio=0.05, method="approximate", projection_dim=8, seed=11)
    assert np.array_equal(approx.indices, greedy_coreset(x, ratio=0.05, method="approximate", projection_dim=8, seed=11).indices)


def test_ratio_sets_the_size_like_the_reference():
    x = clustered(1001, 8, seed=10)
    assert len(greedy_coreset(x, ratio=0.1).indices) == 100
    assert len(greedy_coreset(x, ratio=1e-6).indices) == 1
    assert len(greedy_coreset(x, ratio=1.0).indices) == 1001


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"ratio": 0.0}, "ratio"),
        ({"ratio": 1.5}, "ratio"),
        ({"ratio": -0.1}, "ratio"),
        ({"n_select": 0}, "n_select"),
        ({"n_select": 101}, "n_select"),
        ({"n_select": 5, "ratio": 0.1}, "n_select"),
        ({}, "n_select"),
        ({"n_select": 5, "method": "fast"}, "method"),
        ({"n_select": 5, "n_shards": 0}, "n_shards"),
        ({"n_select": 5, "method": "approximate", "projection_dim": 0}, "projection_dim"),
    ],
)
def test_invalid_arguments_raise_naming_the_argument(kwargs: dict, name: str):
    x = clustered(100, 8, seed=0)
    with pytest.raises(ValueError, match=name):
        greedy_coreset(x, **kwargs)


def test_non_finite_features_are_rejected():
    x = clustered(100, 8, seed=0)
    x[17, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        greedy_coreset(x, n_select=5)
    with pytest.raises(ValueError, match="NaN"):
        GreedyShard(x, np.arange(100))


def test_start_index_must_be_held_by_exactly_one_shard():
    x = clustered(50, 4, seed=0)
    with pytest.raises(ValueError, match="start_index"):
        greedy_select([GreedyShard(x, np.arange(50))], 5, start_index=50)


def test_tiny_shards_and_float64_input_give_the_same_picks():
    x = clustered(300, 12, seed=12)
    start = start_index_for(len(x), seed=1)
    single = greedy_select([GreedyShard(x, np.arange(300))], 40, start)
    parts = [np.array([7]), np.array([250, 3]), np.arange(8, 250), np.array([0, 1, 2, 4, 5, 6]), np.arange(251, 300)]
    tiny = greedy_select([GreedyShard(x[p].astype(np.float64), p) for p in parts], 40, start, batch=3)
    assert tiny.indices.tolist() == single.indices.tolist()


@pytest.mark.parametrize("offset", [0.0, 500.0])
@pytest.mark.parametrize(
    "shard_args",
    [{}, {"block": 37}, {"block": 100, "threads": 3}, {"threads": 2}, {"device": MatrixDevice("cpu", use_torch=True)},
     {"device": MatrixDevice("cpu", use_torch=True), "threads": 3},
     {"device": MatrixDevice("cpu", use_torch=True, precision="bf16"), "block": 300}],
    ids=["numpy", "small-blocks", "threads", "threads-own-blocks", "torch", "torch-threads", "torch-bf16"],
)
def test_every_screened_value_equals_the_brute_force_minimum(offset: float, shard_args: dict):
    # The screen must never skip a pair that would lower a value: after the run, each shard's
    # value for every unpicked point equals the brute-force minimum over all picks, bit for
    # bit. A large common offset stresses the rounding bound of the GEMM expansion; the torch
    # path is the one a GPU holder takes.
    x = clustered(2500, 96, seed=13) + np.float32(offset)
    shards = random_shards(x, 3, seed=13, **shard_args)
    result = greedy_select(shards, 250, start_index_for(len(x), seed=2), batch=16)
    brute = np.full(len(x), np.inf, np.float32)
    for pick in result.indices:
        np.minimum(brute, sq_dists(x, x[pick]), out=brute)
    seen = []
    for shard in shards:
        everything = shard.top_candidates(len(shard))
        assert np.array_equal(everything.values, brute[everything.indices])
        assert everything.bound == -np.inf
        seen.extend(everything.indices.tolist())
    assert sorted(seen + result.indices.tolist()) == list(range(len(x)))
    assert result.coverage_radius_sq == float(brute.max())
    single = greedy_select([GreedyShard(x, np.arange(len(x)))], 250, start_index_for(len(x), seed=2))
    assert single.indices.tolist() == result.indices.tolist()


def test_paired_distances_are_the_sq_dists_formula_bit_for_bit():
    """Pairs gathered by index (how a shard computes screened pairs) against one centre at a time."""
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(3000, 131)) * 10 + 3).astype(np.float32)
    centers = x[rng.integers(0, 3000, size=40)]
    pairs_point = rng.integers(0, 3000, size=5000)
    pairs_center = rng.integers(0, 40, size=5000)
    paired = sq_distances(x, centers, pairs_point, pairs_center).astype(np.float32)
    for c in range(40):
        mine = pairs_center == c
        assert np.array_equal(paired[mine], sq_dists(x[pairs_point[mine]], centers[c]))


def test_matches_float32_greedy_in_high_dimension():
    x = clustered(2000, 512, seed=14)
    start = start_index_for(len(x), seed=3)
    assert greedy_coreset(x, n_select=200, seed=3).indices.tolist() == naive_greedy_f32(x, 200, start)


def test_projected_points_depend_only_on_their_image():
    """Approximate greedy's points are deciding values: a holder with a few images, any thread count,
    and each image projected alone give them bit for bit."""
    rng = np.random.default_rng(15)
    embeddings = np.maximum(rng.normal(size=(6, 49, 12)) @ rng.normal(size=(12, 300)), 0).astype(np.float32)
    features = PatchFeatures(embeddings, (7, 7), np.arange(6))
    alone = np.concatenate([coreset_points(PatchFeatures(image[None], (7, 7), np.array([i])), "approximate", 64, 5)
                            for i, image in enumerate(embeddings)])
    for threads in (1, 3):
        assert np.array_equal(coreset_points(features, "approximate", 64, 5, threads), alone)
    held = coreset_points(PatchFeatures(embeddings[2:5], (7, 7), np.arange(2, 5)), "approximate", 64, 5, 2)
    assert np.array_equal(held, alone[2 * 49 : 5 * 49])


def test_points_outside_float32_range_are_refused_with_one_error():
    with pytest.raises(ValueError, match="coreset points: values up to .* give squared norms that overflow float32"):
        greedy_coreset(np.full((6, 4), 2e19, np.float32), 3)
    with pytest.raises(ValueError, match="coreset points: the features differ by at most .* underflow float32"):
        greedy_coreset(np.eye(6, 4, dtype=np.float32) * 1e-21, 3)
