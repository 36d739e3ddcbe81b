"""Squared distances two ways: one exact formula that decides, and a matrix-product screen that filters.

Every number that reaches a result (a coreset pick, a patch score) comes from :func:`sq_distances`: the
float32 difference of two vectors, squared in float64 (exact: a float32 squared fits a float64), summed over
the dimensions by a fixed pairwise tree of float64 additions. Each step is one elementwise IEEE operation,
correctly rounded, in an order fixed by the dimension alone, so a value depends only on its two vectors and
is the same bit for bit in numpy and in torch, on the CPU or on a GPU, whatever the batching, sharding or
thread count. (numpy's, BLAS's and a GPU's own sums reassociate by shape, SIMD width and kernel: hence the
tree. An exact square added by a fused multiply-add rounds as the plain addition does.) Where a distance is
wanted, its square root is taken on the host by numpy, correctly rounded: torch's vectorised CPU square
root is not (it differs from numpy's in the last bit of ~1 % of values), so only [n, k] results cross.

Finding *which* pairs to evaluate uses the expansion ``||x-y||² = ||x||² - 2x·y + ||y||²`` as one matrix
product (BLAS on the CPU; torch on a GPU, in bfloat16 on tensor cores by default there): far faster than
the exact formula pair by pair, but rounded differently for every shape and precision. Screens therefore widen
their tests by a rigorous bound on that rounding (:func:`expansion_margin`), so a screen can only let too
many pairs through, never too few, and the exact formula then sees every pair that can matter.

Arrays are numpy arrays or torch tensors (on any device); :func:`array_ops` spells the few operations whose
names differ, so each formula is written once.
"""

from __future__ import annotations

import sys
from typing import Any, NamedTuple

import numpy as np

_TREE_BLOCK = 2**15  # float64 values per temporary of the exact formula on a CPU (256 KiB: stays in L2)
_DEVICE_TREE_BLOCK = 2**26  # on a GPU (512 MiB): few, large kernels
_UNIT_ROUNDOFF = 2.0**-24  # float32, round to nearest
BF16_ROUNDOFF = 2.0**-8  # an operand rounded to bfloat16 (8 significant bits) to nearest
TF32_ROUNDOFF = 2.0**-10  # an operand cut to TF32 (11 significant bits) by truncation, as tensor cores may
TENSOR_CORE_ACCUMULATION = 2.0**-23  # one float32 addition rounded to nearest or truncated
PRECISIONS = ("fp32", "bf16")


class _NumpyOps:
    """The operations :func:`sq_distances` and the screens need, on numpy arrays."""

    float32, float64, int64, bool = np.float32, np.float64, np.int64, np.bool_
    torch = False
    tree_block = _TREE_BLOCK

    def cast(self, x: Any, dtype: Any) -> Any:
        return x.astype(dtype, copy=False)

    def squares_transposed(self, x: Any) -> Any:
        """A new C-contiguous float64 [D, r] array of the exact squares of float32 ``x`` [r, D], in one pass."""
        out = np.empty(x.shape[::-1], np.float64)
        return np.square(x.T, out=out, dtype=np.float64)  # dtype: square in float64, not float32 then cast

    def transposed(self, x: Any) -> Any:
        return np.ascontiguousarray(x.T)

    def empty(self, n: int, dtype: Any) -> Any:
        return np.empty(n, dtype)

    def full(self, shape: Any, value: float, dtype: Any) -> Any:
        return np.full(shape, value, dtype)

    def arange(self, n: int) -> Any:
        return np.arange(n)

    def asarray(self, x: Any, dtype: Any) -> Any:
        return np.asarray(x, dtype)

    def round_up32(self, x: Any) -> Any:
        """float32 values no smaller than ``x``."""
        return np.nextafter(x.astype(np.float32), np.float32(np.inf))

    def concat(self, parts: list, axis: int = 0) -> Any:
        return np.concatenate(parts, axis)

    def repeat(self, x: Any, count: int) -> Any:
        return np.repeat(x, count)

    def lexsort(self, keys: tuple) -> Any:
        """The order of the last axis by ``keys``, the last key first (numpy's convention); stable."""
        return np.lexsort(keys, axis=-1)

    def take_along(self, x: Any, index: Any) -> Any:
        return np.take_along_axis(x, index, axis=-1)

    def searchsorted(self, sorted_values: Any, values: Any) -> Any:
        return np.searchsorted(sorted_values, values)

    def unique(self, x: Any) -> Any:
        return np.unique(x)

    def kth_largest(self, x: Any, k: int) -> Any:
        return np.partition(x, len(x) - k)[len(x) - k]

    def nonzero(self, mask: Any) -> tuple:
        return np.nonzero(mask)

    def minimum_at(self, target: Any, index: Any, values: Any) -> None:
        np.minimum.at(target, index, values)

    def column_extremes(self, x: Any) -> tuple[Any, Any]:
        return x.max(axis=0), x.min(axis=0)

    def mean64(self, x: Any) -> Any:
        """Column means in float64 (a screen's centre: any rounding of it is fine)."""
        return x.mean(axis=0, dtype=np.float64)

    def all_finite(self, x: Any) -> bool:
        return bool(np.isfinite(x).all())

    def to_numpy(self, x: Any) -> np.ndarray:
        return x


class _TorchOps(_NumpyOps):
    """The same operations on torch tensors of one device."""

    def __init__(self, torch: Any, device: Any) -> None:
        self.torch, self.device = torch, device
        self.float32, self.float64, self.int64, self.bool = torch.float32, torch.float64, torch.int64, torch.bool
        self.tree_block = _TREE_BLOCK if device.type == "cpu" else _DEVICE_TREE_BLOCK

    def cast(self, x: Any, dtype: Any) -> Any:
        return x.to(dtype)

    def squares_transposed(self, x: Any) -> Any:
        squares = self.torch.empty(tuple(x.shape[::-1]), dtype=self.float64, device=self.device)
        squares.copy_(x.T)
        return squares.mul_(squares)

    def transposed(self, x: Any) -> Any:
        return x.T.contiguous()

    def empty(self, n: int, dtype: Any) -> Any:
        return self.torch.empty(n, dtype=dtype, device=self.device)

    def full(self, shape: Any, value: float, dtype: Any) -> Any:
        return self.torch.full(shape if isinstance(shape, tuple) else (shape,), value, dtype=dtype,
                               device=self.device)

    def arange(self, n: int) -> Any:
        return self.torch.arange(n, device=self.device)

    def asarray(self, x: Any, dtype: Any) -> Any:
        return self.torch.as_tensor(x, dtype=dtype, device=self.device)

    def round_up32(self, x: Any) -> Any:
        x = x.to(self.float32)
        return self.torch.nextafter(x, self.torch.full_like(x, float("inf")))

    def concat(self, parts: list, axis: int = 0) -> Any:
        return self.torch.cat(parts, dim=axis)

    def repeat(self, x: Any, count: int) -> Any:
        return self.torch.repeat_interleave(x, count)

    def lexsort(self, keys: tuple) -> Any:
        order = self.torch.argsort(keys[0], dim=-1, stable=True)
        for key in keys[1:]:
            order = self.torch.gather(order, -1, self.torch.argsort(self.torch.gather(key, -1, order), dim=-1,
                                                                    stable=True))
        return order

    def take_along(self, x: Any, index: Any) -> Any:
        return self.torch.gather(x, -1, index)

    def searchsorted(self, sorted_values: Any, values: Any) -> Any:
        return self.torch.searchsorted(sorted_values, values)

    def unique(self, x: Any) -> Any:
        return self.torch.unique(x, sorted=True)

    def kth_largest(self, x: Any, k: int) -> Any:
        return x.kthvalue(len(x) - k + 1).values

    def nonzero(self, mask: Any) -> tuple:
        return self.torch.nonzero(mask, as_tuple=True)

    def minimum_at(self, target: Any, index: Any, values: Any) -> None:
        target.scatter_reduce_(0, index, values, reduce="amin")

    def column_extremes(self, x: Any) -> tuple[Any, Any]:
        return x.amax(dim=0), x.amin(dim=0)

    def mean64(self, x: Any) -> Any:
        return x.mean(dim=0, dtype=self.float64)

    def all_finite(self, x: Any) -> bool:
        return bool(self.torch.isfinite(x).all())

    def to_numpy(self, x: Any) -> np.ndarray:
        return x.cpu().numpy()


_NUMPY = _NumpyOps()


def is_tensor(x: Any) -> bool:
    """Whether ``x`` is a torch tensor (torch is never imported here for a numpy array)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def array_ops(x: Any) -> _NumpyOps:
    """The operations for ``x``'s kind of array (and device)."""
    if is_tensor(x):
        return _TorchOps(sys.modules["torch"], x.device)
    return _NUMPY


def _tree_sums(squares: Any) -> Any:
    """Column sums of float64 ``squares`` [D, r] (one column per pair) by the fixed pairwise tree: pad to a
    power of two with zeros, then ``s = s[:h] + s[h:]`` until one row is left (the zeros are never added:
    ``x + 0 == x``). Every level is one elementwise addition of contiguous rows, which is why the squares
    are laid out transposed."""
    width = squares.shape[0]
    while width > 1:
        half = 1 << (width - 1).bit_length() >> 1
        low = squares[: width - half]
        low += squares[half:width]
        width = half
    return squares[0]


def sq_distances(a: Any, b: Any = None, a_rows: Any = None, b_rows: Any = None) -> Any:
    """Exact squared distances (float64 [n]) by the one formula, in blocks of bounded memory.

    ``a``: float32 [m, D] (numpy or torch); the pairs' first rows are ``a[a_rows]`` (default: all of ``a``).
    ``b``: None (the origin: squared norms), one float32 row [D], or float32 [m', D] whose row ``b_rows[i]``
    (default ``i``) pairs with the i-th first row. Rows are gathered block by block.
    """
    ops = array_ops(a)
    n = len(a) if a_rows is None else len(a_rows)
    dim = a.shape[1]
    out = ops.empty(n, ops.float64)
    step = max(1, ops.tree_block // max(dim, 1))
    for lo in range(0, n, step):
        hi = min(lo + step, n)
        rows = a[lo:hi] if a_rows is None else a[a_rows[lo:hi]]
        if b is None:
            diff = rows
        elif b.ndim == 1:
            diff = rows - b
        else:
            diff = rows - (b[lo:hi] if b_rows is None else b[b_rows[lo:hi]])
        out[lo:hi] = _tree_sums(ops.squares_transposed(ops.cast(diff, ops.float32)))
    return out


def distances(a: Any, b: Any = None, a_rows: Any = None, b_rows: Any = None) -> np.ndarray:
    """Exact Euclidean distances (float64, numpy): the square root of :func:`sq_distances`, taken on the host
    by numpy (correctly rounded; torch's vectorised CPU square root is not, so it never decides a value)."""
    return np.sqrt(array_ops(a).to_numpy(sq_distances(a, b, a_rows, b_rows)))


def sq_dists(rows: Any, center: Any) -> Any:
    """The coreset's value of each row against ``center``: :func:`sq_distances` rounded to float32 (one
    IEEE rounding, so still the same bits everywhere; half the memory, and the candidates' wire format)."""
    ops = array_ops(rows)
    return ops.cast(sq_distances(rows, center), ops.float32)


def check_float32_range(features: Any, what: str, spread_matters: bool = True) -> None:
    """Refuse features whose squared norms or squared differences leave float32's range.

    Every screen bound is relative to squared norms held in float32: past ~3.4e38 they overflow to inf
    (the screen would pass or drop rows at random), and a bank whose rows differ by so little that their
    squared differences fall below float32's smallest normal number loses the relative precision the
    bound assumes (``spread_matters``: the bank; a batch of queries may well be identical). Bounds from
    the extreme values only: no temporary the size of the features on the scoring path.
    """
    info = np.finfo(np.float32)
    largest = max(float(features.max()), -float(features.min()))  # numpy arrays or torch tensors alike
    if (2 * largest) ** 2 * features.shape[1] > float(info.max) / 4:
        raise ValueError(f"{what}: values up to {largest:.3g} in {features.shape[1]} dimensions give squared norms "
                         "that overflow float32; rescale the features")
    if spread_matters:
        top, bottom = array_ops(features).column_extremes(features)
        spread = float((top - bottom).max())
    else:
        spread = 0.0
    if 0 < spread ** 2 < float(info.tiny) / float(info.eps):
        raise ValueError(f"{what}: the features differ by at most {spread:.3g}, so their squared distances underflow "
                         "float32; rescale the features")


def expansion_margin(dim: int, input_roundoff: float = 0.0, accumulation_roundoff: float = _UNIT_ROUNDOFF) -> float:
    """κ with ``|screened - exact| <= κ·N``, N = ``||x̃||² + ||ỹ||²``, for a GEMM-expanded squared distance.

    ``x̃, ỹ`` are the two vectors after subtracting a common centre (float32 differences, or float64 ones
    rounded to float32 for the projected screen); the screen is the product ``x̃·(-2ỹ)`` over ``dim``
    coordinates plus the two squared norms, held in float32 and either summed inside the product (two more
    terms) or added to its float32 result afterwards; ``exact`` is :func:`sq_distances`. With v the input
    roundoff, w the accumulation roundoff, u = 2^-24, n = dim + 2 and γ = n·w/(1 - n·w), each term bounds
    one source of error as a multiple of N:

    * **input rounding, 2v + v²**: a product that rounds its operands — to bfloat16 (v = 2^-8: rounded to
      nearest by us, before the product, so this is proven, not assumed) or TF32 (v = 2^-10: tensor cores
      may truncate) — turns x̃_i·ỹ_i into x̃_i·ỹ_i·(1+δ)(1+ε) with |δ|, |ε| <= v; summed, <= (2v+v²)·2Σ|x̃_i ỹ_i|
      <= (2v+v²)·N (2|ab| <= a² + b²; scaling by -2 is exact). A product of two bfloat16 (or TF32) values is
      exact in float32 (16 or 22 significant bits). The norms are never rounded this way: a product with
      rounded inputs keeps them out and adds them in float32 after it.
    * **accumulation, γ·((1+v)² + 1)**: the terms summed in float32 in any order (blocking, split-K), each
      addition with a relative error <= w, err <= γ·Σ|terms| (Higham, *Accuracy and Stability of Numerical
      Algorithms*, 2002, §3.1), and Σ|terms| <= (1+v)²·N + N. w = 2^-24 where additions round to nearest
      (BLAS; CUDA cores). w = 2^-23 for tensor cores, which align a multi-term fused addition to its largest
      addend and truncate the bits shifted out and the normalised sum (Fasi, Higham, Mikaitis and Pranesh,
      "Numerical behavior of NVIDIA tensor cores", PeerJ Computer Science 7:e330, 2021 — V100, T4, A100):
      each addend then loses less than one unit in the last place of the largest, <= 2^-23 of the sum of
      magnitudes. **Assumption, not proof:** the tensor cores in use (Hopper: H100, H200) accumulate
      bfloat16 and TF32 products in float32 no worse than that, whether they round or truncate.
    * **24u**: the stored norms rounded to float32 (and scaled by 1 - κ), u each; the exact formula's float32
      difference against the centred vectors', |fl(x_i - y_i) - (x̃_i - ỹ_i)| <= 2u(1+u)(|x̃_i| + |ỹ_i|), so
      <= 8u·N on the square; the two float32 additions of norms after a product, <= 5u·N; the projected
      screen's float64 coordinates and remainder rounded to float32 and the remainder's cancellation,
      <= 5u·N; float64 roundings (the tree, centring, the screens' limits) stay below 2^-40·N.

    A factor 1 + 2^-8 covers every product of two of these terms. Features whose squares leave float32's
    normal range (subnormal products) are refused earlier (:func:`check_float32_range`).
    """
    n = dim + 2
    gamma = n * accumulation_roundoff / (1.0 - n * accumulation_roundoff)
    v = input_roundoff
    return (1.0 + 2.0**-8) * ((2.0 * v + v * v) + gamma * ((1.0 + v) ** 2 + 1.0) + 24.0 * _UNIT_ROUNDOFF)


def tf32_matmul(torch: Any) -> bool:
    """Whether fp32 products may run in TF32, read through whichever of torch's two APIs it has (in a
    process that set the newer ``fp32_precision``, reading the legacy ``allow_tf32`` raises)."""
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        return bool(matmul.allow_tf32)
    precision = matmul.fp32_precision
    return (torch.backends.fp32_precision if precision == "none" else precision) == "tf32"


class Operand(NamedTuple):
    """One side of a screening product as the device multiplies it: ``core`` ([n, d] rows or [d, M]
    columns), and float32 squared norms ``add`` summed in float32 after the product (None: inside ``core``)."""

    core: Any
    add: Any


class MatrixDevice:
    """Where screening products run, and in which precision: numpy/BLAS on the CPU, or torch on a device.

    On the CPU numpy's OpenBLAS is used rather than torch (MKL's sgemm runs at half speed on AMD CPUs);
    ``use_torch=True`` runs the torch code path on the CPU too, which is how the tests cover the path a GPU
    takes. ``precision``: ``fp32`` products, or ``bf16`` — operands rounded to bfloat16 by us, multiplied
    with float32 accumulation and output (tensor cores on CUDA, through ``torch.mm(..., out_dtype=float32)``;
    on the CPU the same model, exactly: bfloat16 values multiplied in float32, which is how the tests cover
    it). Default: bf16 on CUDA, fp32 elsewhere.
    The precision changes only how many pairs a screen lets through (:func:`expansion_margin` bounds it),
    never a result, so it is recorded nowhere. No global torch setting is read or changed by a product
    except the legacy TF32 switch, which is read to widen the bound (the backbone's process may set it).
    Thread counts are the caller's (``anomaly_core.threads``). torch is imported only for the torch path:
    a CPU coreset holder starts ~5 s sooner without it.
    """

    def __init__(self, device: str = "cpu", use_torch: bool | None = None, precision: str | None = None) -> None:
        self.device = device
        self.use_torch = device != "cpu" if use_torch is None else use_torch
        if not self.use_torch and device != "cpu":
            raise ValueError(f"numpy runs on the CPU only, not on {device!r}")
        self.on_cpu = not self.use_torch
        self.ops: _NumpyOps = _NUMPY
        on_cuda = False
        if self.use_torch:
            import torch

            self._torch, self._device = torch, torch.device(device)
            self.on_cpu = self._device.type == "cpu"
            on_cuda = self._device.type == "cuda"
            self.ops = _TorchOps(torch, self._device)
        self.precision = precision or ("bf16" if on_cuda else "fp32")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.precision == "bf16" and not self.use_torch:
            raise ValueError("precision bf16 runs on the torch path (use_torch=True); numpy has no bfloat16")
        self.input_roundoff, self.accumulation_roundoff = 0.0, _UNIT_ROUNDOFF
        self._bf16_out_fp32 = False
        if self.precision == "bf16":
            self.input_roundoff, self.accumulation_roundoff = BF16_ROUNDOFF, TENSOR_CORE_ACCUMULATION
            self._bf16_out_fp32 = on_cuda  # torch.mm(..., out_dtype=float32) exists on CUDA only
        elif on_cuda and tf32_matmul(self._torch):
            # Legacy TF32 (a process-wide switch we leave alone): inputs cut to 10 mantissa bits, tensor-core sums.
            self.input_roundoff, self.accumulation_roundoff = TF32_ROUNDOFF, TENSOR_CORE_ACCUMULATION
        self._norms_inside = self.input_roundoff == 0.0  # a product that rounds its inputs must not round norms

    def margin(self, dim: int) -> float:
        """:func:`expansion_margin` for products made on this device in this precision."""
        return expansion_margin(dim, self.input_roundoff, self.accumulation_roundoff)

    def put(self, array: Any) -> Any:
        """``array`` (numpy, or a tensor: it stays on its device if that is ours) as float32 on the device."""
        if self.use_torch:
            if is_tensor(array):
                return array.to(self._device, self._torch.float32).contiguous()
            return self._torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).to(self._device)
        if is_tensor(array):
            array = array.detach().cpu().numpy()
        return np.ascontiguousarray(array, dtype=np.float32)

    def to_numpy(self, array: Any) -> np.ndarray:
        return self.ops.to_numpy(array)

    def columns(self, core: Any, add: Any) -> Operand:
        """The right operand [d, M] of screening products, ``add`` [M] (float32) its squared-norm terms."""
        if self._norms_inside:
            augmented = self.ops.full((core.shape[0] + 2, core.shape[1]), 1.0, self.ops.float32)
            augmented[:-2] = core
            augmented[-2] = add
            return Operand(augmented, None)
        return Operand(self._rounded(core), self.ops.cast(add, self.ops.float32))

    def rows(self, core: Any, add: Any = None) -> Operand:
        """The left operand [n, d] of a product, ``add`` [n] (float32) its squared-norm terms if any."""
        if self._norms_inside:
            augmented = self.ops.full((core.shape[0], core.shape[1] + 2), 1.0, self.ops.float32)
            augmented[:, :-2] = core
            augmented[:, -1] = 0.0 if add is None else add
            return Operand(augmented, None)
        return Operand(self._rounded(core), None if add is None else self.ops.cast(add, self.ops.float32))

    def _rounded(self, x: Any) -> Any:
        """Operands as the product takes them: bfloat16 on CUDA, bfloat16 values held in float32 on the CPU
        (round to nearest even in both); fp32 unchanged (TF32 hardware rounds them itself)."""
        if self.precision != "bf16":
            return x
        low = x.to(self._torch.bfloat16)
        return low if self._bf16_out_fp32 else low.to(self._torch.float32)

    def matmul(self, a: Any, b: Any) -> Any:
        """float32 product of prepared operands."""
        if not self.use_torch:
            return np.matmul(a, b)
        if self._bf16_out_fp32:
            return self._torch.mm(a, b, out_dtype=self._torch.float32)
        return self._torch.matmul(a, b)

    def product(self, rows: Operand, columns: Operand, lo: int = 0, hi: int | None = None) -> Any:
        """float32 [n, hi - lo]: ``rows.core · columns.core[:, lo:hi]`` plus both sides' norm terms."""
        core = columns.core if lo == 0 and hi is None else columns.core[:, lo:hi]
        out = self.matmul(rows.core, core)
        if columns.add is not None:
            out += columns.add[lo:hi][None, :]
        if rows.add is not None:
            out += rows.add[:, None]
        return out

    def smallest(self, products: Any, count: int) -> tuple[Any, Any]:
        """Per row, the ``count`` smallest values (ascending) and their columns, on the device.

        Their entries in ``products`` are then set to +inf, so later scans skip them.
        """
        if self.use_torch:
            values, columns = self._torch.topk(products, count, dim=1, largest=False, sorted=True)
            products.scatter_(1, columns, float("inf"))
            return values, columns
        rows = np.arange(len(products))
        values = np.empty((len(products), count), np.float32)
        columns = np.empty((len(products), count), np.int64)
        for position in range(count):  # a few argmin passes beat a partition for small counts
            columns[:, position] = products.argmin(axis=1)
            values[:, position] = products[rows, columns[:, position]]
            products[rows, columns[:, position]] = np.inf
        return values, columns

    def at_most(self, products: Any, limits: Any) -> tuple[Any, Any]:
        """(row, column) of every entry with ``products[r, c] <= limits[r]``, on the device."""
        if self.use_torch:
            return self._torch.nonzero(products <= limits[:, None], as_tuple=True)
        flat = np.flatnonzero(products <= limits[:, None])  # one pass, not nonzero's two index arrays
        return np.divmod(flat, products.shape[1])

    def below(self, products: Any, thresholds: Any) -> tuple[Any, Any]:
        """(row, column) of every entry with ``products[r, c] < thresholds[c]``, on the device."""
        if self.use_torch:
            hit = self._torch.nonzero(products.amin(dim=0) < thresholds).flatten()
            rows, columns = self._torch.nonzero(products[:, hit] < thresholds[hit], as_tuple=True)
            return rows, hit[columns]
        hit = np.flatnonzero(products.min(axis=0) < thresholds)
        rows, columns = np.nonzero(products[:, hit] < thresholds[hit])
        return rows, hit[columns]
