"""AnomalyDINO's preprocessing (Damm et al., WACV 2025; github.com/dammsi/AnomalyDINO at b3435f0): the
zero-/few-shot background mask on DINOv2 patch tokens and the rotated copies of the reference images.

Background mask (their ``compute_background_mask``, src/backbones.py): the first principal component of one
image's own patch tokens, thresholded at 10; if that keeps at most 35 % of the central crop (the grid without
a 20 % border), the component's sign was the wrong way round and ``-pc > 10`` is taken instead; then a 3x3
dilation and a 3x3 closing (OpenCV's, whose border never adds to a dilation nor removes in an erosion) of the
scores' column, i.e. along the raster order of the patches (see ``background_mask``). Test
patches outside the mask score 0 (``output_distances`` in src/detection.py), so the image score (mean of the
top 1 %) and the map see only the object. Reference images are not masked by default (``mask_ref_images``
False in run_anomalydino.py).

Which categories are masked and which get rotated references is their per-category table
(``get_dataset_info`` in src/utils.py), chosen by their "masking test" (Fig. 2 of the paper): ``PRESETS``.
Their default preset is ``agnostic``: the table's masking and the eight rotations for every category.
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass

import numpy as np
from scipy.ndimage import binary_dilation, binary_erosion
from sklearn.decomposition import PCA
from PIL import Image
from threadpoolctl import threadpool_limits

# Reference rotations of their ``augment_image`` (src/utils.py), degrees counter-clockwise; 0 is the original.
REFERENCE_ANGLES = (0, 45, 90, 135, 180, 225, 270, 315)

_MVTEC = ("bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill", "screw", "tile",
          "toothbrush", "transistor", "wood", "zipper")
_VISA = ("candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2", "pcb1", "pcb2", "pcb3",
         "pcb4", "pipe_fryum")
CATEGORIES = {"mvtec": _MVTEC, "visa": _VISA}  # keyed by the project's dataset format
# Their masking_default: True = masked. MVTec AD: the five objects on plain backgrounds; VisA: all.
MASKED = {"mvtec": frozenset({"capsule", "hazelnut", "pill", "screw", "toothbrush"}), "visa": frozenset(_VISA)}
# Their rotation_default for "informed": MVTec AD's hazelnut and screw lie in any orientation; VisA: none.
INFORMED_ROTATION = {"mvtec": frozenset({"hazelnut", "screw"}), "visa": frozenset()}
# threadpool_limits changes the process's BLAS thread count: two scoring threads (a colocated extractor's)
# would otherwise restore each other's count mid-SVD.
_ONE_THREAD = threading.Lock()
PRESETS = ("agnostic", "informed", "masking_only", "agnostic_no_mask", "informed_no_mask")


@dataclass(frozen=True)
class AnomalyDinoPreprocess:
    """What AnomalyDINO's preprocessing does to one category; recorded with the bank (``to_dict``)."""

    masking: bool = False  # background mask on the test images' patches
    rotation: bool = False  # the reference images' REFERENCE_ANGLES copies in the bank
    threshold: float = 10.0  # on the first principal component
    kernel_size: int = 3  # dilation and closing
    border: float = 0.2  # the central crop that decides the component's sign leaves this fraction out each side
    min_center_fraction: float = 0.35  # at most this fraction of the crop kept: the sign is flipped

    def __post_init__(self) -> None:
        if not isinstance(self.masking, bool) or not isinstance(self.rotation, bool):
            raise ValueError(f"anomalydino.masking and .rotation must be true or false, got "
                             f"{self.masking!r}, {self.rotation!r}")
        if isinstance(self.kernel_size, bool) or not isinstance(self.kernel_size, int) or self.kernel_size < 1 \
                or self.kernel_size % 2 == 0:
            raise ValueError(f"anomalydino.kernel_size must be a positive odd integer, got {self.kernel_size!r}")
        if not 0 <= self.border < 0.5:
            raise ValueError(f"anomalydino.border must be in [0, 0.5) (a fraction cut from each side), got {self.border!r}")
        if not 0 <= self.min_center_fraction < 1:
            raise ValueError(f"anomalydino.min_center_fraction must be in [0, 1), got {self.min_center_fraction!r}")
        if not np.isfinite(self.threshold):
            raise ValueError(f"anomalydino.threshold must be a finite number, got {self.threshold!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def preset(preprocess: str, dataset_format: str, category: str) -> AnomalyDinoPreprocess:
    """The authors' setting for one category (``get_dataset_info``); their default ``preprocess`` is ``agnostic``."""
    if preprocess not in PRESETS:
        raise ValueError(f"anomalydino.preprocess must be one of {', '.join(PRESETS)}, got {preprocess!r}")
    if dataset_format not in CATEGORIES:
        raise ValueError(f"AnomalyDINO's preprocessing table covers the formats {', '.join(CATEGORIES)}, "
                         f"not {dataset_format!r}: set anomalydino.masking and .rotation explicitly")
    if category not in CATEGORIES[dataset_format]:
        raise ValueError(f"AnomalyDINO's {dataset_format} table has no category {category!r}: set "
                         f"anomalydino.masking and .rotation explicitly")
    masking = category in MASKED[dataset_format] and not preprocess.endswith("_no_mask")
    if preprocess.startswith("agnostic"):
        rotation = True
    elif preprocess.startswith("informed"):
        rotation = category in INFORMED_ROTATION[dataset_format]
    else:  # masking_only
        rotation = False
    return AnomalyDinoPreprocess(masking=masking, rotation=rotation)


def resolve(preprocess: str, masking: bool | str, rotation: bool | str, dataset_format: str, category: str,
            threshold: float = 10.0) -> AnomalyDinoPreprocess:
    """One category's settings: ``masking`` / ``rotation`` true or false as given, ``"auto"`` from the preset's
    table (``preset``), which is only consulted where one of them is auto; ``threshold`` on the component."""
    if masking == "auto" or rotation == "auto":
        table = preset(preprocess, dataset_format, category)
        masking = table.masking if masking == "auto" else masking
        rotation = table.rotation if rotation == "auto" else rotation
    return AnomalyDinoPreprocess(masking=masking, rotation=rotation, threshold=threshold)


@dataclass(frozen=True)
class ReferenceRotations:
    """The reference rotations as training copies: the pipeline's augmented-copy mechanism (``augment.Augmentation``
    has the same ``copies``/``enabled``/``to_dict``/``seed``/``apply``) extracts copy ``c`` of every training image
    rotated by ``REFERENCE_ANGLES[c]``, so the bank holds ``len(REFERENCE_ANGLES)`` times the training patches."""

    copies: int = len(REFERENCE_ANGLES) - 1  # beside the original (angle 0)

    @property
    def enabled(self) -> bool:
        return True

    def to_dict(self) -> dict:
        return {"reference_angles": list(REFERENCE_ANGLES)}

    def seed(self, base: int, index: int, copy: int) -> int:
        """A copy's parameter is its angle's position: nothing random, the same on every shard."""
        if not 1 <= copy <= self.copies:
            raise ValueError(f"reference rotations are copies 1..{self.copies}, got copy={copy}")
        return copy

    def apply(self, rgb: np.ndarray, seed: int) -> np.ndarray:
        return rotate_as_authors(rgb, REFERENCE_ANGLES[seed])


def background_mask(tokens: np.ndarray, grid: tuple[int, int], settings: AnomalyDinoPreprocess) -> np.ndarray:
    """``[h * w, D]`` patch tokens of one image -> ``bool [h * w]``, True on the object (their masking_type True).

    The component comes from an exact SVD (``svd_solver="full"``; theirs is sklearn's randomized solver, which
    approximates the same component) in one thread, so the mask does not depend on thread counts.
    """
    height, width = grid
    if tokens.ndim != 2 or tokens.shape[0] != height * width:
        raise ValueError(f"expected [{height * width}, D] tokens for a {height}x{width} grid, got {list(tokens.shape)}")
    with _ONE_THREAD, threadpool_limits(1):
        first = PCA(n_components=1, svd_solver="full").fit_transform(tokens.astype(np.float32))[:, 0]
    mask = (first > settings.threshold).reshape(grid)
    top, bottom = int(height * settings.border), int(height * (1 - settings.border))
    left, right = int(width * settings.border), int(width * (1 - settings.border))
    center = mask[top:bottom, left:right]
    if center.sum() <= center.size * settings.min_center_fraction:
        mask = (-first > settings.threshold).reshape(grid)
    # Their dilation and closing run on the [h * w, 1] column of PCA scores, not on the grid: a k x k kernel on a
    # one-pixel-wide image reaches the raster neighbours i - k//2 .. i + k//2 only (rows wrap into each other).
    # That is what their published numbers used; anomalib's AnomalyDINO reshapes to the grid first.
    kernel = np.ones(settings.kernel_size, dtype=bool)
    line = binary_dilation(mask.reshape(-1), kernel, border_value=0)
    # OpenCV's MORPH_CLOSE: dilate, then erode with the outside counted as foreground (nothing eroded at the ends)
    return binary_erosion(binary_dilation(line, kernel, border_value=0), kernel, border_value=1)


def mask_patch_scores(patch_scores: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """``[n, P]`` patch scores with the background patches (``masks`` False) set to 0, as the authors score them."""
    if patch_scores.shape != masks.shape or masks.dtype != bool:
        raise ValueError(f"need a bool mask of the scores' shape {list(patch_scores.shape)}, got "
                         f"{masks.dtype} {list(masks.shape)}")
    return np.where(masks, patch_scores, 0).astype(patch_scores.dtype)


def rotate_as_authors(rgb: np.ndarray, angle: float) -> np.ndarray:
    """``uint8 [H, W, 3]`` rotated counter-clockwise by ``angle`` degrees, same size, as their ``rotate_image``:
    about ``(W / 2, H / 2)`` in pixel-index coordinates (OpenCV's ``getRotationMatrix2D``), bilinear, borders
    reflected without repeating the edge (``BORDER_DEFAULT``). Pillow's bilinear on a reflect-padded copy; OpenCV
    rounds its bilinear weights to 1/32, so values can differ from theirs by a few levels."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected uint8 [H, W, 3], got {rgb.dtype} {list(rgb.shape)}")
    height, width = rgb.shape[:2]
    pad = int(np.ceil(np.hypot(height, width) / 2)) + 2  # any source point of the output lies within this
    padded = np.pad(rgb, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    # Pillow's pixel centres sit at i + 0.5: OpenCV's index point W / 2 is Pillow's W / 2 + 0.5 (plus the padding)
    center = (pad + width / 2 + 0.5, pad + height / 2 + 0.5)
    rotated = np.asarray(Image.fromarray(padded).rotate(angle, resample=Image.Resampling.BILINEAR, center=center))
    return np.ascontiguousarray(rotated[pad : pad + height, pad : pad + width])


def reference_copies(rgb: np.ndarray) -> list[np.ndarray]:
    """A reference image's rotated copies, ``REFERENCE_ANGLES`` in order (the first is the image itself)."""
    return [rgb if angle == 0 else rotate_as_authors(rgb, angle) for angle in REFERENCE_ANGLES]
