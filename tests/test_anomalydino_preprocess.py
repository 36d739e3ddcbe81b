"""AnomalyDINO's preprocessing (anomaly_core/data/anomalydino.py): the authors' per-category table, their PCA
background mask with its sign test and raster-order morphology, and their reference rotations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anomaly_core.backbones import FeatureBackbone
from anomaly_core.augment import Augmentation
from anomaly_core.bank import BankError, check_compatible
from anomaly_core.config import ConfigError, parse_config
from anomaly_core.data import ImageTransform, load_image, load_split
from anomaly_core.data.anomalydino import (
    REFERENCE_ANGLES,
    AnomalyDinoPreprocess,
    ReferenceRotations,
    background_mask,
    mask_patch_scores,
    preset,
    reference_copies,
)
from anomaly_core.distances import MatrixDevice
from anomaly_core.extraction import ExtractionSettings, PatchFeatureExtractor
from anomaly_core.features import PatchFeatures
from anomaly_core.patchcore import anomalydino_preprocess, bank_scoring_params, category_record, scoring_params, train_copies
from anomaly_core.scoring import NearestNeighbourScorer, anomaly_map, predict
from cluster.pipeline import CategoryJob
from jobs.preflight import check_jobs

from .conftest import TIRE_ROOT

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


def _config(anomalydino: dict | None, fmt: str = "mvtec", categories: list | None = None, **extra):
    raw = {"datasets": [{"name": "d", "format": fmt, "root": "x", "categories": categories}],
           "scoring": {"distance": "cosine", "image_score": "mean_top_percent"}, **extra}
    if anomalydino is not None:
        raw["anomalydino"] = anomalydino
    return parse_config(raw, "run.yaml")


def test_config_resolves_the_table_per_category_and_names_the_key_on_bad_values():
    config = _config({})
    assert anomalydino_preprocess(config, "mvtec", "capsule") == AnomalyDinoPreprocess(masking=True, rotation=True)
    assert anomalydino_preprocess(config, "mvtec", "bottle") == AnomalyDinoPreprocess(masking=False, rotation=True)
    informed = _config({"preset": "informed", "rotation": False, "threshold": 2.5})
    assert anomalydino_preprocess(informed, "visa", "pcb1") == AnomalyDinoPreprocess(True, False, threshold=2.5)
    assert anomalydino_preprocess(_config(None), "mvtec", "capsule") is None
    assert category_record(_config(None), "mvtec", "capsule") == {"anomalydino": None}
    # explicit values need no table: any format, any category
    explicit = _config({"masking": True, "rotation": False}, fmt="btad")
    assert anomalydino_preprocess(explicit, "btad", "01") == AnomalyDinoPreprocess(masking=True)
    for raw, extra, key in (({"preset": "agnostik"}, {}, "anomalydino.preset"),
                            ({"masking": "sometimes"}, {}, "anomalydino.masking"),
                            ({"threshold": float("nan")}, {}, "anomalydino.threshold"),
                            ({"rotatoin": True}, {}, "anomalydino.rotatoin"),
                            ({"masking": True}, {"augment": {"copies": 1, "hflip": True}}, "augment.copies"),
                            ({"masking": False}, {"preprocess": {"gpu_jpeg_decode": True},
                                                  "cluster": {"gpus_per_extractor": 1}}, "gpu_jpeg_decode")):
        with pytest.raises(ConfigError, match=key):
            _config(raw, **extra)
    with pytest.raises(ConfigError, match="lacks dataset d's format 'btad'.*anomalydino.masking"):
        _config({"masking": True}, fmt="btad")
    with pytest.raises(ConfigError, match=r"categories \['tire'\]"):
        _config({}, categories=["capsule", "tire"])
    # categories found under the root: the pre-work check names the category
    job = CategoryJob("tire_small", str(TIRE_ROOT), load_split("mvtec", TIRE_ROOT, "tire"))
    with pytest.raises(ConfigError, match="^tire_small/tire: AnomalyDINO's mvtec table has no category 'tire'"):
        check_jobs(config, [job], need_test=True)
    check_jobs(_config({"masking": True, "rotation": True}), [job], need_test=True)


def test_rotations_are_the_training_copies_of_rotated_categories_only():
    augment = Augmentation()
    assert isinstance(train_copies(_config({"preset": "informed"}), augment, "mvtec", "screw"), ReferenceRotations)
    plain = train_copies(_config({"preset": "informed"}), augment, "mvtec", "pill")
    assert plain is augment and not plain.enabled
    rotations = ReferenceRotations()
    assert rotations.copies + 1 == len(REFERENCE_ANGLES) == 8
    rgb = (np.random.default_rng(2).random((20, 20, 3)) * 255).astype(np.uint8)
    copies = reference_copies(rgb)
    assert all(np.array_equal(rotations.apply(rgb, rotations.seed(123, index=5, copy=c)), copies[c]) for c in range(1, 8))
    with pytest.raises(ValueError, match="copies 1..7"):
        rotations.seed(0, 0, 8)


@pytest.fixture(scope="module")
def vit_tokens():
    """AnomalyDINO's features (raw ViT-S/14 tokens, random weights) of 2 train and 4 test tire images at 112 px."""
    extractor = PatchFeatureExtractor(ExtractionSettings("vit_small_patch14_dinov2", (), "random", 112, 112, 1, 1,
                                                         384, 384, 4))
    split = load_split("mvtec", "data/tire_small", "tire")
    train = extractor.extract(split.train[:2], range(2))
    test = extractor.extract(split.test[::5][:4], range(4))
    # x4: random tokens have a small first component; cosine scores do not change with the scale, the mask does
    test.embeddings = test.embeddings * 4
    return extractor, train, test


def test_masked_patches_score_zero_before_the_image_score_and_the_maps(vit_tokens):
    extractor, train, test = vit_tokens
    settings = AnomalyDinoPreprocess(masking=True)
    masked_params = scoring_params(_config({"masking": True, "rotation": False}), settings)
    assert masked_params.background_mask == settings
    plain = NearestNeighbourScorer(train.flat(), scoring_params(_config(None)))
    masked = NearestNeighbourScorer(train.flat(), masked_params)
    masks = np.stack([background_mask(tokens, test.grid, settings) for tokens in test.embeddings])
    assert masks.any() and not masks.all()
    _, plain_patches = plain.score_images(test.embeddings)
    image_scores, patches = masked.score_images(test.embeddings, grid=test.grid)
    assert (patches[~masks] == 0).all() and np.array_equal(patches[masks], plain_patches[masks])
    assert (plain_patches[~masks] > 0).all()  # so the zeros are the mask's
    np.testing.assert_array_equal(image_scores, patches.max(axis=1))  # top 1 % of 64 patches: the largest
    predictions = predict(masked, test, 112)
    np.testing.assert_array_equal(predictions.scores, image_scores)
    np.testing.assert_array_equal(predictions.maps[0], anomaly_map(patches[0], test.grid, 112, 4.0))
    # the torch path a GPU scorer takes (tokens as a tensor on its device, the mask's patches brought down): same bits
    on_torch = NearestNeighbourScorer(train.flat(), masked_params, MatrixDevice("cpu", use_torch=True))
    tensor_scores = on_torch.score_images(torch.from_numpy(test.embeddings), grid=test.grid)
    assert all(np.array_equal(a, b) for a, b in zip(tensor_scores, (image_scores, patches)))
    with pytest.raises(ValueError, match="pass grid"):
        masked.score_images(test.embeddings)
    # jobs.predict's scoring from a bank's record: the same mask
    record = {"scoring": _config(None).scoring.model_dump(), "anomalydino": settings.to_dict()}
    assert bank_scoring_params(record) == masked_params
    assert bank_scoring_params({**record, "anomalydino": None}).background_mask is None


def test_a_bank_built_with_other_anomalydino_settings_is_refused_in_one_line(vit_tokens):
    extractor = vit_tokens[0]
    on = {**extractor.describe(), **category_record(_config({}), "mvtec", "capsule")}
    off = {**extractor.describe(), **category_record(_config(None), "mvtec", "capsule")}
    unrotated = {**extractor.describe(), **category_record(_config({"rotation": False}), "mvtec", "capsule")}
    legacy = {key: value for key, value in off.items() if key != "anomalydino"}  # a bank from before the key
    check_compatible(on, on, "bank")
    check_compatible(legacy, off, "bank")
    for bank, expected in ((on, off), (off, on), (legacy, on), (on, unrotated)):
        with pytest.raises(BankError) as refused:
            check_compatible(bank, expected, "banks/d/capsule")
        message = str(refused.value)
        assert "\n" not in message and message.startswith("memory bank banks/d/capsule does not match")
        assert "anomalydino: bank has" in message
