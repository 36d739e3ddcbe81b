"""PaDiM (Defard et al. 2020, "PaDiM: a Patch Distribution Modeling Framework for Anomaly Detection and
Localization") as plain stages: embeddings -> per-position Gaussian statistics -> Mahalanobis maps.

The authors published no code; we follow the widely used reimplementation
xiahaifeng1995/PaDiM-Anomaly-Detection-Localization-master (``main.py``), and name where anomalib 2.7
(``models/image/padim``, ``models/components/stats/multi_variate_gaussian.py``) differs:

* embedding: layer1-3 maps, the deeper ones brought to layer1's grid and concatenated, then a random
  subset of the channels (``patch_features.ConcatEmbedder``); the subset is ``random.sample(range(total),
  channels)`` after ``random.seed(1024)``, as the authors' code (100 of 448 for ResNet18, 550 of 1792 for
  WRN50); anomalib draws ``torch.randperm`` unseeded;
* statistics: per grid position the mean and the unbiased covariance (``np.cov``) of the training
  embeddings plus ``epsilon`` x I (0.01); anomalib adds another 1e-5 x I before inverting;
* scoring: the Mahalanobis distance of each position's embedding, bilinearly upsampled to the crop and
  blurred with a Gaussian of sigma 4 (``scipy.ndimage.gaussian_filter``, reflect mode, as the authors';
  anomalib's kornia blur pads by torch's ``reflect``, which differs at the border); the image score is the
  map's maximum (both).

Why sufficient statistics: the Gaussians need only the count, the sum and the sum of outer products of
each position's embeddings, so training features never have to be gathered in one place. They are
accumulated image by image in sample-index order in float64 (each outer product of float32 values is exact
there, every addition is elementwise): shards depend on the number of actors, images do not, so the
statistics are bit-identical for any number of extractors.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from anomaly_core.bank import BankError, MemoryBank, atomic_write, read_saved, write_json
from anomaly_core.features import PatchFeatures
from anomaly_core.threads import limit_threads

PADIM_FORMAT = "anomaly-bench-padim/1"
TENSORS_FILE, METADATA_FILE = "padim.safetensors", "padim.json"
MEAN_KEY, INVERSE_KEY = "mean", "inverse_covariance"


class PadimError(ValueError):
    """A PaDiM setting that does not fit the backbone (e.g. more channels than its layers have)."""


def channel_subset(total: int, channels: int, seed: int) -> tuple[int, ...]:
    """The embedding channels kept, in the authors' order: ``random.seed(seed); random.sample(range(total),
    channels)`` (xiahaifeng1995 main.py, seed 1024). Its own generator: no global random state is touched."""
    if not 0 < channels <= total:
        raise PadimError(f"padim.channels={channels} must be between 1 and {total}, the channels of the chosen "
                         f"layers together")
    return tuple(random.Random(seed).sample(range(total), channels))


class GaussianMoments:
    """Count, sum and sum of outer products of the embeddings at every grid position (float64).

    ``add`` takes shards in any grouping but in sample-index order (a shard out of order is refused: its
    sums would differ in the last bits), and adds each image on its own, so the totals do not depend on
    how images were grouped into shards.
    """

    def __init__(self) -> None:
        self.count = 0
        self.last_index = -1
        self.grid: tuple[int, int] | None = None
        self.total: torch.Tensor | None = None  # [P, d]
        self.outer: torch.Tensor | None = None  # [P, d, d]

    def add(self, features: PatchFeatures) -> None:
        if self.grid is None:
            positions, dim = features.embeddings.shape[1:]
            self.grid = tuple(features.grid)
            self.total = torch.zeros((positions, dim), dtype=torch.float64)
            self.outer = torch.zeros((positions, dim, dim), dtype=torch.float64)
        elif tuple(features.grid) != self.grid:
            raise ValueError(f"feature shards disagree on the patch grid: {self.grid} and {tuple(features.grid)}")
        order = np.argsort(features.sample_indices, kind="stable")
        if int(features.sample_indices[order[0]]) <= self.last_index:
            raise ValueError(f"feature shards must come in sample-index order: image "
                             f"{int(features.sample_indices[order[0]])} after image {self.last_index}")
        self.last_index = int(features.sample_indices[order[-1]])
        for position in order:
            image = features.embeddings[position]  # a read-only host array from the object store, or a tensor
            x = image.cpu().double() if isinstance(image, torch.Tensor) else torch.from_numpy(image.astype(np.float64))
            self.total += x
            self.outer.addcmul_(x[:, :, None], x[:, None, :])  # exact products, elementwise sums
            self.count += 1


@dataclass
class PadimStatistics(MemoryBank):
    """A category's Gaussians: ``features`` holds the per-position means [P, d] (the rows of this memory),
    ``inverse_covariance`` [P, d, d] (float32, as anomalib keeps them). Saved as ``padim.safetensors`` +
    ``padim.json`` where a PatchCore category has its bank."""

    inverse_covariance: np.ndarray | None = None

    @property
    def sha256(self) -> str:
        return statistics_sha256(self.features, self.inverse_covariance)

    @property
    def nbytes(self) -> int:
        """Host memory of the statistics: d²·H·W·4 for the inverse covariances, plus the means."""
        return int(self.features.nbytes + self.inverse_covariance.nbytes)

    def save(self, directory: Path) -> tuple[Path, Path]:
        return save_statistics(self, directory)

    def scoring_payload(self) -> tuple[np.ndarray, np.ndarray]:
        return self.features, self.inverse_covariance


def statistics_sha256(mean: np.ndarray, inverse_covariance: np.ndarray) -> str:
    """Digest of both tensors' shapes and values: equal digests mean bit-identical statistics."""
    digest = hashlib.sha256()
    for array in (mean, inverse_covariance):
        array = np.ascontiguousarray(array, dtype=np.float32)
        digest.update(repr(array.shape).encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def fit_statistics(shards: Sequence[PatchFeatures], epsilon: float, metadata: dict[str, Any]) -> PadimStatistics:
    """Gaussians from feature shards (any grouping; they are ordered by sample index here).

    Covariance as the authors' ``np.cov(..., rowvar=False) + 0.01 * I``, from the moments:
    (Σxxᵀ − n·μμᵀ) / (n − 1) + εI in float64, inverted in float64 (LAPACK on one thread, one matrix at a
    time), stored in float32.
    """
    moments = GaussianMoments()
    for shard in sorted(shards, key=lambda part: int(np.min(part.sample_indices))):
        moments.add(shard)
    return statistics_from_moments(moments, epsilon, metadata)


def statistics_from_moments(moments: GaussianMoments, epsilon: float, metadata: dict[str, Any]) -> PadimStatistics:
    if moments.count < 2:
        raise PadimError(f"PaDiM needs at least 2 training images for a covariance, got {moments.count}")
    n = moments.count
    mean = moments.total / n
    covariance = (moments.outer - n * mean[:, :, None] * mean[:, None, :]) / (n - 1)
    covariance += epsilon * torch.eye(mean.shape[1], dtype=torch.float64)
    restore = limit_threads(1)  # LAPACK's blocking may follow its thread count: one thread, the same bits anywhere
    try:
        inverse = np.stack([np.linalg.inv(matrix) for matrix in covariance.numpy()])
    finally:
        restore()
    mean32, inverse32 = mean.numpy().astype(np.float32), inverse.astype(np.float32)
    record = {**metadata, "n_patches": n * mean.shape[0], "grid": list(moments.grid), "n_fit_images": n,
              "statistics_bytes": int(mean32.nbytes + inverse32.nbytes)}
    return PadimStatistics(features=mean32, metadata=record, inverse_covariance=inverse32)


@dataclass(frozen=True)
class PadimScoring:
    """How PaDiM scores: the blur of its maps; the image score is the blurred map's maximum (both references)."""

    blur_sigma: float = 4.0
    image_score: str = "map_max"

    def __post_init__(self) -> None:
        if self.blur_sigma < 0:
            raise ValueError(f"padim.blur_sigma must be >= 0, got {self.blur_sigma}")

    def scorer(self, payload: tuple[np.ndarray, np.ndarray], device: Any, threads: int = 1) -> "MahalanobisScorer":
        return MahalanobisScorer(*payload, params=self, device=getattr(device, "device", device))


class MahalanobisScorer:
    """Holds one category's means and inverse covariances on its device (a GPU where the actor has one)."""

    def __init__(self, mean: np.ndarray, inverse_covariance: np.ndarray, params: PadimScoring,
                 device: str = "cpu") -> None:
        if mean.ndim != 2 or inverse_covariance.shape != (*mean.shape, mean.shape[1]):
            raise ValueError(f"PaDiM statistics must be a [P, d] mean and [P, d, d] inverse covariances, got "
                             f"{list(mean.shape)} and {list(inverse_covariance.shape)}")
        self.device = torch.device(device)
        self.mean = torch.as_tensor(mean, dtype=torch.float32).to(self.device)
        self.inverse = torch.as_tensor(inverse_covariance, dtype=torch.float32).to(self.device)
        self.params = params

    @torch.inference_mode()
    def distances(self, embeddings: Any) -> np.ndarray:
        """[n, P] Mahalanobis distances sqrt(δᵀ Σ⁻¹ δ), δ = x − μ, of images' embeddings [n, P, d].

        One image at a time, so an image's distances never depend on the others in its shard. float32 products
        as anomalib's: a GPU's differ from the CPU's in the last bits (unlike PatchCore's exact distances)."""
        embeddings = torch.as_tensor(embeddings)
        if tuple(embeddings.shape[1:]) != tuple(self.mean.shape):
            raise ValueError(f"embeddings of shape {list(embeddings.shape[1:])} per image do not fit PaDiM statistics "
                             f"of shape {list(self.mean.shape)}")
        rows = []
        for image in embeddings:
            delta = image.to(self.device, torch.float32) - self.mean  # [P, d]
            squared = (torch.bmm(delta[:, None, :], self.inverse)[:, 0, :] * delta).sum(dim=1)
            rows.append(squared.clamp(min=0).sqrt().cpu().numpy())
        return np.stack(rows)

    def score_images(self, embeddings: Any, threads: int = 1, grid: tuple[int, int] | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
        """(max patch distance [n], patch distances [n, P]); ``predict`` replaces the first by the map's max."""
        scores = self.distances(embeddings)
        return scores.max(axis=1), scores


def save_statistics(statistics: PadimStatistics, directory: Path) -> tuple[Path, Path]:
    """``padim.safetensors`` (means, inverse covariances) and ``padim.json`` (provenance) into ``directory``."""
    from safetensors.numpy import save_file

    directory = Path(directory)
    mean = np.ascontiguousarray(statistics.features, dtype=np.float32)
    inverse = np.ascontiguousarray(statistics.inverse_covariance, dtype=np.float32)
    metadata = {**statistics.metadata, "format": PADIM_FORMAT, "memory_size": int(mean.shape[0]),
                "feature_dim": int(mean.shape[1]), "bank_sha256": statistics_sha256(mean, inverse),
                "statistics_bytes": int(mean.nbytes + inverse.nbytes)}
    tensors_path, json_path = directory / TENSORS_FILE, directory / METADATA_FILE
    atomic_write(tensors_path, lambda tmp: save_file({MEAN_KEY: mean, INVERSE_KEY: inverse}, tmp,
                                                     metadata={"format": PADIM_FORMAT}))
    write_json(json_path, metadata)
    statistics.metadata = metadata
    return tensors_path, json_path


def recorded_scoring(metadata: dict[str, Any]) -> PadimScoring:
    """The scoring saved statistics record (``scoring``: what their thresholds were found with)."""
    return PadimScoring(**metadata.get("scoring", {}))


def load_statistics(path: Path) -> PadimStatistics:
    """Statistics from their folder (or its ``padim.safetensors``); refused when missing, damaged, or not what
    ``padim.json`` records."""
    path = Path(path)
    folder = path if path.is_dir() or path.name != TENSORS_FILE else path.parent
    tensors_path, json_path = folder / TENSORS_FILE, folder / METADATA_FILE
    metadata, tensors = read_saved(tensors_path, json_path, "PaDiM statistics", PADIM_FORMAT)
    mean, inverse = tensors.get(MEAN_KEY), tensors.get(INVERSE_KEY)
    if mean is None or inverse is None or mean.ndim != 2 or inverse.shape != (*mean.shape, mean.shape[1]):
        raise BankError(f"{tensors_path} must hold {MEAN_KEY!r} [P, d] and {INVERSE_KEY!r} [P, d, d]")
    if statistics_sha256(mean, inverse) != metadata.get("bank_sha256"):
        raise BankError(f"{tensors_path} does not match the bank_sha256 recorded in {json_path} "
                        f"(the file is damaged, or not the statistics this padim.json describes)")
    grid, indices = metadata.get("grid") or [0, 0], (metadata.get("padim") or {}).get("channel_indices") or []
    if mean.shape != (grid[0] * grid[1], len(indices)):
        raise BankError(f"{json_path}: grid {grid} and {len(indices)} channel indices do not describe the "
                        f"{list(mean.shape)} means of {tensors_path}")
    if not (np.isfinite(mean).all() and np.isfinite(inverse).all()):
        raise BankError(f"{tensors_path}: the statistics hold NaN or infinite values")
    return PadimStatistics(features=mean, metadata=metadata, inverse_covariance=inverse)
