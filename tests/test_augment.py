"""Seeded training-image augmentation: each transform does what it says; draws reproduce and ignore sharding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anomaly_core.augment import (
    Augmentation,
    AugmentParams,
    apply_params,
    augment_image,
    augment_seed,
    draw_params,
)
from anomaly_core.data import load_split, read_rgb
from anomaly_core.extraction import ExtractionSettings, PatchFeatureExtractor
from anomaly_core.features import merge_features
from anomaly_core.seeding import derive_seed

ALL = Augmentation(copies=2, rotation_degrees=5, brightness=0.1, contrast=0.1, blur_sigma=1.5, hflip=True)
IDENTITY = AugmentParams(flip=False, angle=0.0, brightness=1.0, contrast=1.0, sigma=0.0)


def _image(height: int = 48, width: int = 40) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _params(**changes) -> AugmentParams:
    return AugmentParams(**{**IDENTITY.__dict__, **changes})


def test_same_seed_same_bytes_other_seed_other_image():
    rgb = _image()
    first = augment_image(rgb, ALL, 7)
    assert first.dtype == np.uint8 and first.shape == rgb.shape and first.flags.c_contiguous
    assert first.tobytes() == augment_image(rgb.copy(), ALL, 7).tobytes()
    assert not np.array_equal(first, augment_image(rgb, ALL, 8))
    assert not np.array_equal(first, rgb)


def test_no_transform_is_identity():
    rgb = _image()
    np.testing.assert_array_equal(augment_image(rgb, Augmentation(), 3), rgb)
    np.testing.assert_array_equal(apply_params(rgb, IDENTITY), rgb)


def test_hflip_flips_exactly_about_half_the_copies():
    rgb = _image()
    flip_only = Augmentation(copies=1, hflip=True)
    flips = [draw_params(flip_only, seed).flip for seed in range(200)]
    assert 70 < sum(flips) < 130
    for seed in (flips.index(True), flips.index(False)):
        expected = rgb[:, ::-1] if flips[seed] else rgb
        np.testing.assert_array_equal(augment_image(rgb, flip_only, seed), expected)


def test_brightness_scales_by_a_factor_in_range():
    rgb = _image()
    np.testing.assert_array_equal(apply_params(rgb, _params(brightness=1.2)), np.clip(np.rint(rgb * 1.2), 0, 255))
    factors = [draw_params(Augmentation(copies=1, brightness=0.1), seed).brightness for seed in range(100)]
    assert 0.9 <= min(factors) < 0.95 and 1.05 < max(factors) <= 1.1


def test_contrast_scales_around_the_mean():
    gray = np.tile(np.linspace(50, 200, 40).round().astype(np.uint8), (48, 1))
    rgb = np.repeat(gray[:, :, None], 3, axis=2)
    out = apply_params(rgb, _params(contrast=0.5)).astype(float)
    assert abs(out.mean() - rgb.mean()) < 0.5
    assert out.std() == pytest.approx(rgb.std() / 2, rel=0.02)


def test_rotation_is_about_the_centre_counter_clockwise_with_reflected_corners():
    square = _image(32, 32)
    np.testing.assert_array_equal(apply_params(square, _params(angle=90.0)), np.rot90(square))
    smooth = apply_params(_image(40, 60), _params(sigma=2.0)).astype(int)  # non-square, off Pillow's 180° shortcut
    assert np.abs(apply_params(smooth.astype(np.uint8), _params(angle=179.999)) - smooth[::-1, ::-1]).max() <= 1
    flat = np.full((48, 40, 3), 200, np.uint8)  # a black fill would show in the uncovered corners
    for angle in np.linspace(-180, 180, 73):
        np.testing.assert_array_equal(apply_params(flat, _params(angle=float(angle))), flat)
    angles = [draw_params(Augmentation(copies=1, rotation_degrees=5), seed).angle for seed in range(100)]
    assert -5 <= min(angles) < -4 and 4 < max(angles) <= 5
    assert apply_params(_image(), _params(angle=3.0)).shape == (48, 40, 3)


def test_blur_removes_high_frequencies_and_keeps_flat_regions():
    rgb = _image()
    blurred = apply_params(rgb, _params(sigma=1.5)).astype(float)

    def high_frequency_energy(image: np.ndarray) -> float:
        return float((np.diff(image, axis=0) ** 2).sum() + (np.diff(image, axis=1) ** 2).sum())

    assert high_frequency_energy(blurred) < 0.1 * high_frequency_energy(rgb.astype(float))
    assert abs(blurred.mean() - rgb.mean()) < 2
    flat = np.full((20, 20, 3), 77, np.uint8)
    np.testing.assert_array_equal(apply_params(flat, _params(sigma=3.0)), flat)
    sigmas = [draw_params(Augmentation(copies=1, blur_sigma=2.0), seed).sigma for seed in range(100)]
    assert 0.1 <= min(sigmas) and max(sigmas) <= 2.0


def test_draws_do_not_shift_when_another_transform_is_switched_on():
    rotate = Augmentation(copies=1, rotation_degrees=5)
    assert draw_params(rotate, 11).angle == draw_params(ALL, 11).angle


def test_seed_depends_on_base_index_and_copy_only():
    assert augment_seed(5, 3, 1) == derive_seed(5, "augment", "3", "1")
    assert len({augment_seed(5, 3, 1), augment_seed(5, 4, 1), augment_seed(5, 3, 2), augment_seed(6, 3, 1)}) == 4
    with pytest.raises(ValueError, match="copy 0 is the original"):
        augment_seed(5, 3, 0)


def test_enabled_and_recorded():
    assert ALL.enabled and not Augmentation().enabled
    assert not Augmentation(rotation_degrees=5).enabled  # transforms but no copies
    assert Augmentation(**ALL.to_dict()) == ALL
    assert ALL.to_dict() == {"copies": 2, "rotation_degrees": 5, "brightness": 0.1, "contrast": 0.1,
                             "blur_sigma": 1.5, "hflip": True}


@pytest.mark.parametrize("field, value", [
    ("copies", -1), ("copies", 1.5), ("copies", True), ("rotation_degrees", -1), ("rotation_degrees", 181),
    ("rotation_degrees", float("nan")), ("brightness", 1.0), ("brightness", "0.1"), ("contrast", -0.1),
    ("blur_sigma", 0.05), ("blur_sigma", float("inf")), ("hflip", 1),
])
def test_bad_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"augment.{field}"):
        Augmentation(**{"rotation_degrees": 1.0, field: value})


def test_copies_without_a_transform_are_refused():
    with pytest.raises(ValueError, match="augment.copies=2 but no transform"):
        Augmentation(copies=2)


def test_bad_image_is_refused():
    with pytest.raises(ValueError, match="uint8"):
        augment_image(np.zeros((8, 8), np.uint8), ALL, 0)


# Through the extractor: real EfficientNet-Lite0 weights on 4 tire images, batches of 2 (as the shard planner cuts).

BASE_SEED = 1234


@pytest.fixture(scope="module")
def tire(tire_root):
    settings = ExtractionSettings("tf_efficientnet_lite0", ("blocks.2", "blocks.4"), "package",
                                  resize=128, crop=112, batch_size=2)
    return PatchFeatureExtractor(settings), load_split("mvtec", tire_root, "tire").train[:4]


def _seeds(indices, copy: int = 1) -> list[int]:
    return [augment_seed(BASE_SEED, index, copy) for index in indices]


def test_originals_are_extracted_as_without_augmentation(tire):
    extractor, samples = tire
    features = extractor.extract(samples, range(4))
    reference = np.concatenate([
        extractor.embed_batch(torch.stack([extractor.transform.image(read_rgb(s.image_path)) for s in pair]))[0]
        for pair in (samples[:2], samples[2:])
    ])
    assert features.embeddings.tobytes() == reference.tobytes()


def test_augmented_copies_differ_reproduce_and_do_not_depend_on_sharding(tire):
    extractor, samples = tire
    originals = extractor.extract(samples, range(4))
    copy = extractor.extract(samples, [4 + i for i in range(4)], augmentation=ALL, seeds=_seeds(range(4)))
    assert copy.sample_indices.tolist() == [4, 5, 6, 7]
    for augmented, original in zip(copy.embeddings, originals.embeddings):
        assert np.abs(augmented - original).mean() > 0.01 * np.abs(original).mean()

    shards = [extractor.extract(samples[lo:lo + 2], [4 + i for i in range(lo, lo + 2)], augmentation=ALL,
                                seeds=_seeds(range(lo, lo + 2))) for lo in (2, 0)]
    assert merge_features(shards).embeddings.tobytes() == copy.embeddings.tobytes()

    second_copy = extractor.extract(samples, [8 + i for i in range(4)], augmentation=ALL, seeds=_seeds(range(4), 2))
    assert not np.array_equal(second_copy.embeddings, copy.embeddings)


def test_augmented_batch_does_not_depend_on_its_neighbours(tire):
    extractor, samples = tire
    whole = extractor.load_batch(samples, ALL, _seeds(range(4)))
    halves = torch.cat([extractor.load_batch(samples[:2], ALL, _seeds(range(2))),
                        extractor.load_batch(samples[2:], ALL, _seeds(range(2, 4)))])
    assert torch.equal(whole, halves)


def test_augmentation_and_seeds_come_together(tire):
    extractor, samples = tire
    with pytest.raises(ValueError, match="one seed per sample"):
        extractor.extract(samples, range(4), augmentation=ALL)
    with pytest.raises(ValueError, match="one seed per sample"):
        extractor.extract(samples, range(4), augmentation=ALL, seeds=_seeds(range(3)))
    with pytest.raises(ValueError, match="one seed per sample"):
        extractor.extract(samples, range(4), seeds=_seeds(range(4)))
