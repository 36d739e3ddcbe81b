"""AnomalyDINO's preprocessing (anomaly_core/data/anomalydino.py): the authors' per-category table, their PCA
background mask with its sign test and raster-order morphology, and their reference rotations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anomaly_core.backbones import FeatureBackbone
from anomaly_core.data import ImageTransform, load_image, load_split
from anomaly_core.data.anomalydino import (
    REFERENCE_ANGLES,
    AnomalyDinoPreprocess,
    background_mask,
    mask_patch_scores,
    preset,
    reference_copies,
)

MASK = AnomalyDinoPreprocess(masking=True)


def test_presets_follow_the_authors_table():
    assert preset("agnostic", "mvtec", "capsule") == AnomalyDinoPreprocess(masking=True, rotation=True)
    assert preset("agnostic", "mvtec", "bottle") == AnomalyDinoPreprocess(masking=False, rotation=True)
    masked = {c for c in ("bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill",
                          "screw", "tile", "toothbrush", "transistor", "wood", "zipper")
              if preset("informed", "mvtec", c).masking}
    assert masked == {"capsule", "hazelnut", "pill", "screw", "toothbrush"}
    assert preset("informed", "mvtec", "screw").rotation and not preset("informed", "mvtec", "pill").rotation
    assert preset("masking_only", "visa", "pcb1") == AnomalyDinoPreprocess(masking=True, rotation=False)
    assert preset("agnostic_no_mask", "visa", "pcb1") == AnomalyDinoPreprocess(masking=False, rotation=True)
    with pytest.raises(ValueError, match="anomalydino.preprocess"):
        preset("agnostik", "mvtec", "capsule")
    with pytest.raises(ValueError, match="'btad'"):
        preset("agnostic", "btad", "01")
    with pytest.raises(ValueError, match="'tire'"):
        preset("agnostic", "mvtec", "tire")
    with pytest.raises(ValueError, match="anomalydino.kernel_size"):
        AnomalyDinoPreprocess(kernel_size=4)


def _tokens(object_cells: np.ndarray, offset: float, seed: int = 0) -> np.ndarray:
    """[64, 16] tokens on an 8x8 grid: small noise, plus ``offset`` along one direction on ``object_cells``."""
    tokens = np.random.default_rng(seed).normal(0, 0.1, (64, 16))
    tokens[object_cells.reshape(-1), 0] += offset
    return tokens.astype(np.float32)


def test_mask_keeps_the_object_whichever_way_the_component_points():
    """Negated tokens flip the component's sign: one of the two runs through the central-crop test and its flip.
    The dilation and closing act along the raster order of the patches, as in the authors' code."""
    big = np.zeros((8, 8), bool)
    big[1:7, 1:7] = True
    middle = np.zeros((8, 8), bool)
    middle[2:6, 2:6] = True
    for cells, expected_run in ((big, (8, 55)), (middle, (17, 46))):
        expected = np.zeros(64, bool)
        expected[expected_run[0] : expected_run[1] + 1] = True
        for tokens in (_tokens(cells, 30.0), -_tokens(cells, 30.0)):
            np.testing.assert_array_equal(background_mask(tokens, (8, 8), MASK), expected)
    # each row's run grew by one cell at each end and the two-cell gaps between rows closed; the rows above and
    # below the object stay out (a 3x3 kernel on the grid, as anomalib applies it, would take them in)
    mask = background_mask(_tokens(middle, 30.0), (8, 8), MASK).reshape(8, 8)
    assert not mask[1].any() and not mask[6].any() and mask[2, 1:].all() and not mask[2, 0]


def test_a_weak_component_masks_everything_out_as_the_authors_do():
    """No token's first component passes the threshold on either side: the mask is empty, all patches score 0."""
    obj = np.zeros((8, 8), bool)
    obj[2:6, 2:6] = True
    assert not background_mask(_tokens(obj, 5.0), (8, 8), MASK).any()


def test_mask_on_vit_s_tokens_of_tire_images_is_bit_identical_and_zeroes_scores():
    """Random-init ViT-S/14 tokens of real images (112 px: an 8x8 grid); the mask does not depend on torch or
    BLAS thread counts (one-thread SVD), and masked patches score exactly 0."""
    split = load_split("mvtec", "data/tire_small", "tire")
    transform = ImageTransform(128, 112)
    images = torch.stack([load_image(sample, transform) for sample in split.test[:4]])
    tokens = [m.flatten(1).T.numpy() * 4 for m in FeatureBackbone("vit_small_patch14_dinov2", (), "random", 112)(images)[0]]
    masks = np.stack([background_mask(t, (8, 8), MASK) for t in tokens])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        again = np.stack([background_mask(t, (8, 8), MASK) for t in tokens])
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_array_equal(masks, again)
    assert masks.any() and not masks.all()
    scores = np.random.default_rng(0).random(masks.shape).astype(np.float32) + 1
    masked = mask_patch_scores(scores, masks)
    assert (masked[~masks] == 0).all() and (masked[masks] == scores[masks]).all()
    with pytest.raises(ValueError, match="bool mask"):
        mask_patch_scores(scores, masks.astype(np.uint8))
    with pytest.raises(ValueError, match="tokens for a 8x8 grid"):
        background_mask(tokens[0][:10], (8, 8), MASK)


def test_reference_copies_are_the_eight_rotations():
    rgb = (np.random.default_rng(1).random((24, 24, 3)) * 255).astype(np.uint8)
    copies = reference_copies(rgb)
    assert len(copies) == len(REFERENCE_ANGLES) == 8 and copies[0] is rgb
    # about OpenCV's centre (W/2, H/2) in index coordinates, a quarter turn moves pixels by whole steps
    np.testing.assert_array_equal(copies[4][1:, 1:], rgb[::-1, ::-1][:-1, :-1])
    assert all(copy.shape == rgb.shape and copy.dtype == np.uint8 for copy in copies)
    assert not np.array_equal(copies[1], rgb)
