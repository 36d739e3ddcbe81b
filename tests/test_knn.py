"""Exact kNN: the screened search returns the row-wise formula's top-k, ties by index, on any path."""

from __future__ import annotations

import math

import numpy as np
import pytest

from anomaly_core.distances import MatrixDevice, check_float32_range, expansion_margin, sq_distances
from anomaly_core.knn import ExactKnn

# Every code path a screen can take on the CPU: numpy, torch (the GPU's code), and torch with bfloat16
# operands (the GPU's default tensor-core model, exactly).
DEVICES = {"numpy": lambda: MatrixDevice(), "torch": lambda: MatrixDevice("cpu", use_torch=True),
           "torch-bf16": lambda: MatrixDevice("cpu", use_torch=True, precision="bf16")}


def brute_force(bank: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Every bank row through the exact formula, ordered by (squared distance, index)."""
    out_d, out_i = [], []
    for query in queries:
        squared = sq_distances(bank, query)
        order = np.lexsort((np.arange(len(bank)), squared))[:k]
        out_d.append(np.sqrt(squared[order]))
        out_i.append(order)
    return np.array(out_d), np.array(out_i)


def exact_matrix(queries: np.ndarray, bank: np.ndarray) -> np.ndarray:
    """Squared distances [n, M] by the exact formula."""
    return np.stack([sq_distances(bank, query) for query in queries])


def screened_error(knn: ExactKnn, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(screened - exact, bound) of every (query, bank row) pair: the screen's value restored to a squared
    distance (``+ ||q̃||² + κ||b̃||²``) and its bound ``κ(||q̃||² + ||b̃||²)``, both float64 [n, M]."""
    screen, device = knn._screen, knn.device
    products, sq_norms = knn._screened(device.put(queries), screen)
    q_norms, b_norms = device.to_numpy(sq_norms), device.to_numpy(screen.sq_norms)
    screened = device.to_numpy(products).astype(np.float64) + q_norms[:, None] + screen.margin * b_norms[None, :]
    return screened - exact_matrix(queries, device.to_numpy(knn.bank)), screen.margin * (q_norms[:, None] + b_norms)


def patchcore_like(n: int, dim: int, seed: int, offset: float = 0.0) -> np.ndarray:
    """Non-negative, correlated features (ReLU of a random map), plus a common offset."""
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(n, 12)) @ rng.normal(size=(12, dim))
    return (np.maximum(latent, 0) + offset).astype(np.float32)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("offset", [0.0, 300.0])
def test_matches_brute_force_on_every_query(k: int, offset: float):
    bank = patchcore_like(700, 64, seed=1, offset=offset)
    queries = patchcore_like(300, 64, seed=2, offset=offset)
    distances, indices = ExactKnn(bank, block_rows=128).search(queries, k)
    ref_d, ref_i = brute_force(bank, queries, k)
    assert np.array_equal(indices, ref_i)
    assert np.array_equal(distances, ref_d)


def test_ties_and_duplicates_go_to_the_lower_index():
    rng = np.random.default_rng(3)
    base = rng.integers(0, 3, size=(40, 8)).astype(np.float32)
    bank = np.concatenate([base, base[::-1], base])  # every row three times
    queries = np.concatenate([base[:20], (base[:20] + base[20:]) / 2])  # exact hits and midpoints
    for make in DEVICES.values():
        knn = ExactKnn(bank, make(), candidates=0)  # k candidates only: ties reach the survivor path
        distances, indices = knn.search(queries, 2)
        ref_d, ref_i = brute_force(bank, queries, 2)
        assert np.array_equal(indices, ref_i) and np.array_equal(distances, ref_d)
        assert knn.unproven_queries > 0  # ties cannot be proven by the screen alone: that path ran
    assert np.all(indices[:20, 0] < 40)  # exact duplicates: the first copy wins


def test_result_does_not_depend_on_query_batching():
    bank = patchcore_like(500, 48, seed=4)
    queries = patchcore_like(257, 48, seed=5)
    together = ExactKnn(bank).search(queries, 2)
    blocked = ExactKnn(bank, block_rows=7).search(queries, 2, threads=3)
    alone = [ExactKnn(bank).search(queries[i : i + 1], 2) for i in range(0, 257, 32)]
    assert np.array_equal(together[0], blocked[0]) and np.array_equal(together[1], blocked[1])
    for position, (d, i) in zip(range(0, 257, 32), alone):
        assert np.array_equal(d[0], together[0][position]) and np.array_equal(i[0], together[1][position])


@pytest.mark.parametrize("path", ["torch", "torch-bf16"])
def test_torch_path_gives_the_numpy_path_bit_for_bit(path: str):
    """The path a GPU takes (torch products, top-k, exact values, proof and ordering on the device), run on
    the CPU here; queries given as numpy or as a tensor, at any block size and thread count."""
    import torch

    bank = patchcore_like(600, 96, seed=6, offset=50.0)
    queries = patchcore_like(200, 96, seed=7, offset=50.0)
    on_numpy = ExactKnn(bank).search(queries, 3)
    on_torch = ExactKnn(torch.from_numpy(bank), DEVICES[path](), block_rows=64).search(queries, 3)
    assert np.array_equal(on_numpy[0], on_torch[0]) and np.array_equal(on_numpy[1], on_torch[1])
    knn = ExactKnn(bank, DEVICES[path](), block_rows=64, candidates=0)  # fewest candidates: the survivor path
    on_workers = knn.search(torch.from_numpy(queries), 3, threads=3)
    assert np.array_equal(on_numpy[0], on_workers[0]) and np.array_equal(on_numpy[1], on_workers[1])
    assert knn.unproven_queries > 0 or path == "torch"  # bfloat16's wider bound leaves some to the survivors


def test_k_equal_to_the_bank_size_and_single_row_banks():
    bank = patchcore_like(5, 16, seed=8)
    queries = patchcore_like(9, 16, seed=9)
    distances, indices = ExactKnn(bank).search(queries, 5)
    assert np.array_equal(indices, brute_force(bank, queries, 5)[1])
    assert np.all(np.diff(distances, axis=1) >= 0)
    one = ExactKnn(bank[:1]).search(queries, 1)
    assert np.array_equal(one[1], np.zeros((9, 1), np.int64))


@pytest.mark.parametrize("projection_dim", [0, 256])
def test_the_screens_bound_the_exact_distances(projection_dim: int):
    """Full screen: within the bound on both sides. Projected: never above the distance + bound."""
    bank = patchcore_like(400, 1024, seed=10, offset=20.0)
    queries = patchcore_like(100, 1024, seed=11, offset=20.0)
    knn = ExactKnn(bank, projection_dim=projection_dim)
    assert knn.screen == ("full" if projection_dim == 0 else "projected-256")
    error, bound = screened_error(knn, queries)
    exact = exact_matrix(queries, bank)
    assert np.all(error <= bound)
    if projection_dim == 0:
        assert np.all(-error <= bound)
        assert bound.max() / exact.min() < 1e-2  # tight enough to prove most queries at once
    else:
        assert np.median((error + exact) / exact) > 0.5  # a useful lower bound on this low-rank data
    assert expansion_margin(1024) < 3e-4


def test_projected_screen_is_exact_and_prunes_on_low_rank_data():
    bank = patchcore_like(3000, 768, seed=12)
    queries = np.concatenate([patchcore_like(300, 768, seed=13), bank[:20]])  # and exact hits
    knn = ExactKnn(bank, block_rows=100)
    assert knn.screen == "projected-192"
    distances, indices = knn.search(queries, 2, threads=2)
    ref_d, ref_i = brute_force(bank, queries, 2)
    assert np.array_equal(indices, ref_i) and np.array_equal(distances, ref_d)
    assert knn.survivors < len(queries) * len(bank) / 10  # most bank rows never get the exact formula
    on_torch = ExactKnn(bank, MatrixDevice("cpu", use_torch=True), projection_dim=192).search(queries, 2)
    assert np.array_equal(on_torch[1], indices) and np.array_equal(on_torch[0], distances)
    # The screen is built in fixed blocks: the same columns, survivors and results for any thread count.
    built = ExactKnn(bank, block_rows=100, threads=3)
    assert np.array_equal(built._screen.columns.core, knn._screen.columns.core)
    assert np.array_equal(built.search(queries, 2, threads=2)[1], indices) and built.survivors == knn.survivors


def test_a_bank_that_does_not_compress_falls_back_to_the_full_screen():
    rng = np.random.default_rng(14)
    bank = rng.normal(size=(1500, 512)).astype(np.float32)  # isotropic: no principal subspace helps
    queries = rng.normal(size=(64, 512)).astype(np.float32)
    knn = ExactKnn(bank, block_rows=16)
    assert knn.screen == "projected-128"
    distances, indices = knn.search(queries, 1, threads=2)  # blocks switch screens concurrently
    assert knn.screen == "full"
    ref_d, ref_i = brute_force(bank, queries, 1)
    assert np.array_equal(indices, ref_i) and np.array_equal(distances, ref_d)


def test_invalid_input_is_refused():
    bank = patchcore_like(10, 4, seed=0)
    with pytest.raises(ValueError, match="non-empty"):
        ExactKnn(bank[:0])
    bad = bank.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        ExactKnn(bad)
    with pytest.raises(ValueError, match="NaN"):
        ExactKnn(bank).search(bad, 1)
    with pytest.raises(ValueError, match=r"queries must be \[n, 4\]"):
        ExactKnn(bank).search(bank[:, :3], 1)
    with pytest.raises(ValueError, match="k must be"):
        ExactKnn(bank).search(bank, 11)
    with pytest.raises(ValueError, match="projection_dim"):
        ExactKnn(bank, projection_dim=4)
    with pytest.raises(ValueError, match="CPU only"):
        MatrixDevice("cuda", use_torch=False)



def near_ties_far_from_origin(n_bank: int, n_queries: int, dim: int, offset: float) -> tuple[np.ndarray, np.ndarray]:
    """A bank on a sphere of radius 2 around a point ``offset`` away from the origin (every dimension offset
    differently), and queries near its centre: every row is a near tie, so a screen whose error exceeds its
    bound by a little returns a wrong neighbour. Queries also repeat bank rows (exact duplicates)."""
    rng = np.random.default_rng(dim)
    centre = offset * (1 + rng.random(dim))
    directions = rng.normal(size=(n_bank, dim))
    bank = (centre + 2.0 * directions / np.linalg.norm(directions, axis=1, keepdims=True)).astype(np.float32)
    queries = (centre + 0.01 * rng.normal(size=(n_queries, dim))).astype(np.float32)
    return bank, np.concatenate([queries, bank[:: max(1, n_bank // 10)]])


SCREENS = [pytest.param(path, projection, id=f"{path}-{projection}") for path in DEVICES
           for projection in ("full", "projected")]


@pytest.mark.parametrize("dim,k,offset,n_bank", [(16, 1, 1e4, 400), (32, 3, 1e5, 300), (64, 5, 3e4, 300),
                                                  (384, 2, 1e4, 60), (1024, 4, 1e3, 200)])
@pytest.mark.parametrize("path,projection", SCREENS)
def test_offsets_far_beyond_the_spread_near_ties_and_tiny_banks_stay_exact(dim, k, offset, n_bank, path, projection):
    """Both screens on both code paths against brute force where the features' offset dwarfs their spread (the
    full screen once mixed norms centred on two different means there: 246 wrong neighbours in these cases),
    with near ties everywhere, duplicates, and banks smaller than D/4 (384 and 1024)."""
    bank, queries = near_ties_far_from_origin(n_bank, 60, dim, offset)
    knn = ExactKnn(bank, DEVICES[path](), block_rows=64, projection_dim=0 if projection == "full" else dim // 4)
    distances, indices = knn.search(queries, k)
    ref_d, ref_i = brute_force(bank, queries, k)
    assert np.array_equal(indices, ref_i)
    assert np.array_equal(distances, ref_d)


@pytest.mark.parametrize("path,projection", SCREENS)
@pytest.mark.parametrize("offset", [0.0, 1e3, 1e5])
def test_every_screened_value_is_within_its_bound(path, projection, offset):
    """The property exactness rests on, pair by pair: the full screen is within the bound of the squared
    distance on both sides, the projected one below it plus the bound."""
    bank, queries = near_ties_far_from_origin(300, 40, 32, offset)
    knn = ExactKnn(bank, DEVICES[path](), projection_dim=0 if projection == "full" else 8)
    error, bound = screened_error(knn, queries)
    assert np.all(error <= bound)
    if projection == "full":
        assert np.all(-error <= bound)

def test_features_outside_float32_range_are_refused():
    with pytest.raises(ValueError, match="memory bank: values up to .* give squared norms that overflow float32"):
        ExactKnn(np.full((4, 8), 1e19, np.float32))
    knn = ExactKnn(np.eye(4, dtype=np.float32))
    with pytest.raises(ValueError, match="queries: values up to .* give squared norms that overflow float32"):
        knn.search(np.full((1, 4), 1e19, np.float32), 1)
    with pytest.raises(ValueError, match="memory bank: the features differ by at most .* underflow float32"):
        ExactKnn(np.eye(4, dtype=np.float32) * 1e-20)


@pytest.mark.parametrize("setting", ["legacy_on", "legacy_off", "new_tf32", "new_ieee", "matmul_precision_high"])
def test_tf32_is_read_through_either_torch_api(setting):
    """A process that set torch's newer fp32_precision makes the legacy allow_tf32 flag raise when read;
    the screen's rounding bound must still learn whether products run in TF32, and exact_fp32 must still work."""
    import torch

    from anomaly_core.distances import tf32_matmul
    from anomaly_core.extraction import exact_fp32

    matmul, saved = torch.backends.cuda.matmul, (torch.backends.cuda.matmul.fp32_precision,
                                                 torch.backends.cudnn.fp32_precision, torch.get_float32_matmul_precision())
    try:
        {"legacy_on": lambda: setattr(matmul, "allow_tf32", True),
         "legacy_off": lambda: setattr(matmul, "allow_tf32", False),
         "new_tf32": lambda: setattr(matmul, "fp32_precision", "tf32"),
         "new_ieee": lambda: setattr(matmul, "fp32_precision", "ieee"),
         "matmul_precision_high": lambda: torch.set_float32_matmul_precision("high")}[setting]()
        assert tf32_matmul(torch) == (setting in ("legacy_on", "new_tf32", "matmul_precision_high"))
        # fp32 screens on CUDA widen their bound for TF32 inputs, cut (not rounded) to 10 mantissa bits;
        # bf16 screens round their own inputs whatever the switch says.
        tf32 = setting in ("legacy_on", "new_tf32", "matmul_precision_high")
        assert MatrixDevice("cuda", precision="fp32").input_roundoff == (2.0**-10 if tf32 else 0.0)
        assert MatrixDevice("cuda").precision == "bf16" and MatrixDevice("cuda").input_roundoff == 2.0**-8
        exact_fp32()
        assert tf32_matmul(torch) is False and torch.backends.cudnn.conv.fp32_precision == "ieee"
    finally:
        matmul.fp32_precision, torch.backends.cudnn.fp32_precision = saved[0], saved[1]
        torch.set_float32_matmul_precision(saved[2])


def padded_tree(squares: np.ndarray) -> np.ndarray:
    """The formula's sum as specified, written plainly: pad to a power of two with zeros, then halve."""
    width = 1 << (squares.shape[1] - 1).bit_length()
    s = np.zeros((len(squares), width))
    s[:, : squares.shape[1]] = squares
    while s.shape[1] > 1:
        s = s[:, : s.shape[1] // 2] + s[:, s.shape[1] // 2 :]
    return s[:, 0]


@pytest.mark.parametrize("dim", [1, 3, 16, 17, 100, 128, 255, 384, 1000, 1024])
def test_the_exact_formula_is_one_fixed_tree_with_the_same_bits_in_numpy_and_torch(dim: int):
    """Adversarial rows: offsets far beyond the spread, exact duplicates, neighbours one float32 step apart
    (near ties), tiny and huge values (inside check_float32_range), across blocks of the formula."""
    import torch

    rng = np.random.default_rng(dim)
    n = min(2 * (2**15 // dim) + 7, 6000)  # more than two blocks of the formula on a CPU where D >= 16
    scale = np.where(rng.random(n) < 0.5, 1e-15, 1e16)[:, None] if dim < 512 else 1e16
    a = (1e4 + rng.normal(size=(n, dim))).astype(np.float32)
    a[: n // 3] = (rng.normal(size=(n // 3, dim)) * scale[: n // 3] if dim < 512 else
                   rng.normal(size=(n // 3, dim)) * 1e-15).astype(np.float32)
    b = a[rng.permutation(n)]
    b[::5] = a[::5]  # duplicates: distance 0
    b[1::5] = np.nextafter(a[1::5], np.float32(np.inf))  # one step away in every coordinate
    check_float32_range(np.concatenate([a, b]), "test rows", spread_matters=False)
    difference = (a - b).astype(np.float64)
    expected = padded_tree(difference * difference)
    got = sq_distances(a, b)
    assert np.array_equal(got, expected)
    assert np.array_equal(sq_distances(torch.from_numpy(a), torch.from_numpy(b)).numpy(), expected)
    rows, others = rng.integers(0, n, size=n), rng.integers(0, n, size=n)  # gathered pairs, as screens use them
    gathered = sq_distances(torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(rows), torch.from_numpy(others))
    assert np.array_equal(gathered.numpy(), sq_distances(a[rows], b[others]))
    assert np.array_equal(sq_distances(a, None), padded_tree(a.astype(np.float64) ** 2))
    assert np.all(got[::5] == 0) and np.all(got[1::5] > 0)
    exact = np.array([math.fsum(row) for row in difference * difference])  # the tree is an accurate sum too
    assert np.all(np.abs(got - exact) <= 1e-14 * exact)


def coherent_rounding(dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The bfloat16 screen's worst case: every coordinate just below a bfloat16 midpoint (rounded down by
    almost half a step, so every rounding error has the same sign relative to its value), rows in ± pairs
    (the centre is exactly 0, so the product sees these values), and queries equal to rows or twice them
    (every term of q̃·b̃ positive: the errors add up instead of cancelling)."""
    rng = np.random.default_rng(seed)
    below_midpoint = np.float32(1 + 2**-8 - 2**-20)
    rows = below_midpoint * np.exp2(rng.integers(-2, 3, size=(150, dim))) * rng.choice([-1, 1], size=(150, dim))
    bank = np.empty((300, dim), np.float32)
    bank[0::2], bank[1::2] = rows, -rows
    return bank, np.concatenate([rows[:20], 2 * rows[20:40]]).astype(np.float32)


@pytest.mark.parametrize("case", ["coherent", "offset", "near-ties"])
def test_the_bf16_bound_holds_where_rounding_is_largest(case: str):
    """bfloat16 operands at D = 1024, pair by pair: |screened - exact| stays under the bound on inputs built
    to stress it — rounding errors that all add up (where they reach over 90 % of the bound: it is nearly
    tight, and a bound without the input-rounding term would fail everywhere), a large common offset, and
    near ties around a point far from the origin — and the search stays exact."""
    dim = 1024
    if case == "coherent":
        bank, queries = coherent_rounding(dim, seed=0)
    elif case == "offset":
        rng = np.random.default_rng(1)
        bank = (1e3 + rng.normal(size=(300, dim))).astype(np.float32)
        queries = (1e3 + rng.normal(size=(40, dim))).astype(np.float32)
    else:
        bank, queries = near_ties_far_from_origin(300, 40, dim, 1e3)
    knn = ExactKnn(bank, DEVICES["torch-bf16"](), projection_dim=0)
    error, bound = screened_error(knn, queries)
    ratio = np.abs(error) / bound
    assert ratio.max() < 1
    fp32_only = expansion_margin(dim, 0.0, 2.0**-23) / knn._screen.margin
    assert ratio.max() > (0.9 if case == "coherent" else fp32_only)
    distances, indices = knn.search(queries, 3)
    ref_d, ref_i = brute_force(bank, queries, 3)
    assert np.array_equal(indices, ref_i) and np.array_equal(distances, ref_d)


def test_screen_precision_is_checked():
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16"):
        MatrixDevice("cpu", use_torch=True, precision="fp16")
    with pytest.raises(ValueError, match="precision bf16 runs on the torch path"):
        MatrixDevice("cpu", precision="bf16")
    with pytest.raises(ValueError, match="candidates must be >= 0"):
        ExactKnn(patchcore_like(10, 4, seed=0), candidates=-1)
