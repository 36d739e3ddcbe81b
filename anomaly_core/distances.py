"""Squared distances two ways: an exact row-wise formula that decides, and a GEMM screen that filters.

Every number that reaches a result (a coreset pick, a patch score) comes from a row-wise formula
that depends only on its two vectors, so results never depend on batching, sharding, thread counts
or the device. Finding *which* pairs to evaluate uses the expansion ``||x-y||² = ||x||² - 2x·y +
||y||²`` as one matrix product (BLAS on the CPU, torch on a GPU): 10-50× faster than row-wise work,
but rounded differently for every shape. Screens therefore widen their tests by a rigorous bound on
that rounding (:func:`expansion_margin`), so a screen can only let too many pairs through, never
too few, and the exact formula then sees every pair that can matter.
"""

from __future__ import annotations

from typing import Any

import numpy as np

_ROW_BLOCK = 4096  # rows per temporary: bounds memory, never changes a value
_UNIT_ROUNDOFF = 2.0**-24  # float32


def sq_dists(rows: np.ndarray, center: np.ndarray, index: np.ndarray | None = None) -> np.ndarray:
    """Squared Euclidean distances (float32) from ``rows`` (or ``rows[index]``) to ``center``.

    Elementwise difference and square, then numpy's sum over each contiguous row: unlike a GEMM
    expansion, a value depends only on its two vectors, so every shard and the driver agree to
    the last bit whatever they batch together.
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


def paired_sq_dists(rows: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """``sq_dists`` for pairs (``rows[i]``, ``centers[i]``): the same float32 formula, bit for bit."""
    diff = np.subtract(rows, centers, dtype=np.float32)
    np.multiply(diff, diff, out=diff)
    return diff.sum(axis=1)


def row_distances(queries: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Euclidean distances (float64) between queries [n, D] and rows [n, k, D] (or [n, D]).

    The float32 difference is squared and summed in float64: the formula behind every patch score.
    """
    diff = queries[:, None, :] - rows if rows.ndim == 3 else queries - rows
    return np.sqrt(np.einsum("...d,...d->...", diff, diff, dtype=np.float64))


def check_float32_range(features: np.ndarray, what: str, spread_matters: bool = True) -> None:
    """Refuse features whose squared norms or squared differences leave float32's range.

    Every screen bound is relative to squared norms held in float32: past ~3.4e38 they overflow to inf
    (the screen would pass or drop rows at random), and a bank whose rows differ by so little that their
    squared differences fall below float32's smallest normal number loses the relative precision the
    bound assumes (``spread_matters``: the bank; a batch of queries may well be identical). Bounds from
    the extreme values only: no temporary the size of the features on the scoring path.
    """
    info = np.finfo(np.float32)
    largest = max(float(features.max()), -float(features.min()))
    if (2 * largest) ** 2 * features.shape[1] > float(info.max) / 4:
        raise ValueError(f"{what}: values up to {largest:.3g} in {features.shape[1]} dimensions give squared norms "
                         "that overflow float32; rescale the features")
    spread = float((features.max(axis=0) - features.min(axis=0)).max()) if spread_matters else 0.0
    if 0 < spread ** 2 < float(info.tiny) / float(info.eps):
        raise ValueError(f"{what}: the features differ by at most {spread:.3g}, so their squared distances underflow "
                         "float32; rescale the features")


def expansion_margin(dim: int, input_roundoff: float = 0.0) -> float:
    """κ with ``|screened - exact| <= κ·(||x̃||² + ||ỹ||²)`` for a GEMM-expanded squared distance.

    ``x̃, ỹ`` are float32 vectors after subtracting a common centre, and the screen is one product
    of at most ``dim + 2`` terms (the dot product plus stored squared norms). The terms: that
    product's float32 rounding, <= (dim+2)·u·2(||x̃||² + ||ỹ||²) by Cauchy-Schwarz; rounding the
    centred vectors and the stored norms, <= 9u·(...); the exact formula's own float32 differences,
    <= 4u·(...); and, where the product rounds its inputs (TF32 tensor cores), 4 times that
    rounding. A factor 2 on top covers every second-order term.
    """
    return 4.0 * ((dim + 14) * _UNIT_ROUNDOFF + 4.0 * input_roundoff)


def tf32_matmul(torch: Any) -> bool:
    """Whether fp32 products may run in TF32, read through whichever of torch's two APIs it has (in a
    process that set the newer ``fp32_precision``, reading the legacy ``allow_tf32`` raises)."""
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        return bool(matmul.allow_tf32)
    precision = matmul.fp32_precision
    return (torch.backends.fp32_precision if precision == "none" else precision) == "tf32"


class MatrixDevice:
    """Where screening products run: numpy/BLAS on the CPU, or torch on a torch device.

    On the CPU numpy's OpenBLAS is used rather than torch (MKL's sgemm runs at half speed on AMD
    CPUs); ``use_torch=True`` runs the torch code path on the CPU too, which is how the tests cover
    the path a GPU takes. Thread counts are the caller's (``anomaly_core.threads``). torch is
    imported only for the torch path: a CPU coreset holder starts ~5 s sooner without it.
    """

    def __init__(self, device: str = "cpu", use_torch: bool | None = None) -> None:
        self.device = device
        self.use_torch = device != "cpu" if use_torch is None else use_torch
        if not self.use_torch and device != "cpu":
            raise ValueError(f"numpy runs on the CPU only, not on {device!r}")
        self.input_roundoff = 0.0
        self.on_cpu = not self.use_torch
        if self.use_torch:
            import torch

            self._torch, self._device = torch, torch.device(device)
            self.on_cpu = self._device.type == "cpu"
            # TF32 products (if a process enabled them) round their inputs to 10 mantissa bits.
            if self._device.type == "cuda" and tf32_matmul(torch):
                self.input_roundoff = 2.0**-11

    def margin(self, dim: int) -> float:
        """:func:`expansion_margin` for products made on this device."""
        return expansion_margin(dim, self.input_roundoff)

    def put(self, array: np.ndarray) -> Any:
        """A float32 copy of ``array`` on the device."""
        array = np.ascontiguousarray(array, dtype=np.float32)
        return self._torch.from_numpy(array).to(self._device) if self.use_torch else array

    def assign(self, target: Any, index: np.ndarray, values: np.ndarray) -> None:
        """``target[index] = values`` on the device."""
        if self.use_torch:
            target[self._torch.from_numpy(index).to(self._device)] = self._torch.from_numpy(values).to(self._device)
        else:
            target[index] = values

    def to_numpy(self, array: Any) -> np.ndarray:
        return array.cpu().numpy() if self.use_torch else array

    def matmul(self, a: Any, b: Any) -> Any:
        return self._torch.matmul(a, b) if self.use_torch else np.matmul(a, b)

    def smallest(self, products: Any, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Per row, the ``count`` smallest values (float64, ascending) and their columns.

        Their entries in ``products`` are then set to +inf, so later scans skip them.
        """
        if self.use_torch:
            values, columns = self._torch.topk(products, count, dim=1, largest=False, sorted=True)
            products.scatter_(1, columns, float("inf"))
            return values.double().cpu().numpy(), columns.cpu().numpy()
        rows = np.arange(len(products))
        values = np.empty((len(products), count), np.float64)
        columns = np.empty((len(products), count), np.int64)
        for position in range(count):  # a few argmin passes beat a partition for small counts
            columns[:, position] = products.argmin(axis=1)
            values[:, position] = products[rows, columns[:, position]]
            products[rows, columns[:, position]] = np.inf
        return values, columns

    def at_most(self, products: Any, limits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row, column) of every entry with ``products[r, c] <= limits[r]``."""
        if self.use_torch:
            bound = self._torch.from_numpy(limits).to(self._device)
            rows, columns = self._torch.nonzero(products <= bound[:, None], as_tuple=True)
            return rows.cpu().numpy(), columns.cpu().numpy()
        flat = np.flatnonzero(products <= limits[:, None])  # one pass, not nonzero's two index arrays
        return np.divmod(flat, products.shape[1])

    def below(self, products: Any, thresholds: Any) -> tuple[np.ndarray, np.ndarray]:
        """(row, column) of every entry with ``products[r, c] < thresholds[c]``."""
        if self.use_torch:
            hit = self._torch.nonzero(products.amin(dim=0) < thresholds).flatten()
            rows, columns = self._torch.nonzero(products[:, hit] < thresholds[hit], as_tuple=True)
            return rows.cpu().numpy(), hit[columns].cpu().numpy()
        hit = np.flatnonzero(products.min(axis=0) < thresholds)
        rows, columns = np.nonzero(products[:, hit] < thresholds[hit])
        return rows, hit[columns]
