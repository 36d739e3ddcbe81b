"""kNN scoring: brute-force distances, the paper's re-weighting, maps, and batch independence."""

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from anomaly_core.features import PatchFeatures
from anomaly_core.scoring import NearestNeighbourScorer, ScoringParams, anomaly_map, predict, unit_rows


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(200, 16)).astype(np.float32), rng.normal(size=(49, 16)).astype(np.float32)


def test_patch_scores_are_brute_force_nearest_distances(data):
    bank, queries = data
    brute = np.sqrt(((queries[:, None, :].astype(np.float64) - bank[None]) ** 2).sum(-1))
    scores, nearest = NearestNeighbourScorer(bank, ScoringParams(k=1)).patch_scores(queries)
    np.testing.assert_allclose(scores, brute.min(1), rtol=1e-6)
    np.testing.assert_array_equal(nearest, brute.argmin(1))
    scores3, _ = NearestNeighbourScorer(bank, ScoringParams(k=3)).patch_scores(queries)
    np.testing.assert_allclose(scores3, np.sort(brute, 1)[:, :3].mean(1), rtol=1e-6)


def test_scores_do_not_depend_on_batch_composition(data):
    bank, queries = data
    scorer = NearestNeighbourScorer(bank, ScoringParams())
    together, _ = scorer.patch_scores(queries)
    alone = np.concatenate([scorer.patch_scores(queries[i : i + 1])[0] for i in range(len(queries))])
    assert np.array_equal(together, alone)


def test_image_score_max_and_reweighting(data):
    bank, queries = data
    images = queries[:48].reshape(4, 12, 16)
    plain = NearestNeighbourScorer(bank, ScoringParams())
    image_scores, patch_scores = plain.score_images(images)
    for image, score, patches in zip(images, image_scores, patch_scores):
        alone, _ = plain.patch_scores(image)
        assert np.array_equal(patches, alone) and score == alone.max()
    b = 5
    weighted = NearestNeighbourScorer(bank, ScoringParams(reweight_neighbours=b))
    got, _ = weighted.score_images(images)
    for image, value in zip(images, got):
        scores, nearest = plain.patch_scores(image)
        top = int(np.argmax(scores))
        anchor = bank[nearest[top]]
        support = np.argsort(((bank - anchor) ** 2).sum(1), kind="stable")[:b]  # m* itself first
        distances = np.sqrt(((bank[support] - image[top]) ** 2).sum(1))
        expected = (1 - np.exp(distances[0]) / np.exp(distances).sum()) * scores.max()
        assert value == pytest.approx(expected, rel=1e-5)
        assert value < scores.max()


def test_anomaly_map_upsamples_and_blurs():
    grid = np.zeros((4, 4), np.float32)
    grid[1, 2] = 1.0
    result = anomaly_map(grid.reshape(-1), (4, 4), 32, sigma=4.0)
    assert result.shape == (32, 32) and result.dtype == np.float32
    peak = np.unravel_index(np.argmax(result), result.shape)
    assert 8 <= peak[0] < 16 and 16 <= peak[1] < 24  # the hot patch's cell
    unblurred = anomaly_map(grid.reshape(-1), (4, 4), 32, sigma=0)
    np.testing.assert_allclose(result, gaussian_filter(unblurred, 4.0), rtol=1e-6)


def test_invalid_parameters():
    with pytest.raises(ValueError, match="scoring.k=5 exceeds the memory bank size 3"):
        NearestNeighbourScorer(np.zeros((3, 2), np.float32), ScoringParams(k=5))
    with pytest.raises(ValueError, match="reweight_neighbours"):
        ScoringParams(reweight_neighbours=1)


def test_merges_are_independent_of_completion_order():
    """Shards may finish in any order; merged features and predictions sort by sample index."""
    from anomaly_core.features import PatchFeatures, merge_features
    from anomaly_core.scoring import Predictions, merge_predictions

    rng = np.random.default_rng(0)
    parts = [PatchFeatures(rng.normal(size=(n, 4, 3)).astype(np.float32), (2, 2), np.arange(lo, lo + n))
             for lo, n in ((0, 3), (3, 2), (5, 4))]
    reference = merge_features(parts)
    for order in ((2, 0, 1), (1, 2, 0)):
        shuffled = merge_features([parts[i] for i in order])
        assert np.array_equal(shuffled.embeddings, reference.embeddings)
        assert np.array_equal(shuffled.sample_indices, np.arange(9))
    predictions = [Predictions(rng.normal(size=n), rng.normal(size=(n, 2, 2)).astype(np.float32), np.arange(lo, lo + n))
                   for lo, n in ((0, 3), (3, 2))]
    a, b = merge_predictions(predictions), merge_predictions(predictions[::-1])
    assert np.array_equal(a.scores, b.scores) and np.array_equal(a.maps, b.maps)
    with pytest.raises(ValueError, match="overlap"):
        merge_features([parts[0], parts[0]])


def test_cosine_distance_is_one_minus_cosine_similarity(data):
    """AnomalyDINO's patch score: 1 - cos to the nearest bank row, whatever the rows' lengths."""
    bank, queries = data
    bank = bank * np.random.default_rng(1).uniform(0.1, 10, size=(len(bank), 1)).astype(np.float32)
    cosine = (queries.astype(np.float64) @ bank.T.astype(np.float64)) / np.outer(
        np.linalg.norm(queries.astype(np.float64), axis=1), np.linalg.norm(bank.astype(np.float64), axis=1))
    scorer = NearestNeighbourScorer(bank, ScoringParams(distance="cosine", k=2))
    scores, nearest = scorer.patch_scores(queries)
    np.testing.assert_allclose(scores, np.sort(1 - cosine, 1)[:, :2].mean(1), atol=1e-6)
    np.testing.assert_array_equal(nearest, (1 - cosine).argmin(1))
    scaled, _ = scorer.patch_scores(queries * 7.5)  # the length of a query does not matter
    np.testing.assert_allclose(scaled, scores, atol=1e-6)
    alone = np.concatenate([scorer.patch_scores(queries[i : i + 1])[0] for i in range(len(queries))])
    assert np.array_equal(scores, alone)  # still batch-independent


def test_image_score_mean_of_top_percent(data):
    bank, queries = data
    images = queries[:48].reshape(2, 24, 16)
    scorer = NearestNeighbourScorer(bank, ScoringParams(image_score="mean_top_percent", top_percent=10))
    image_scores, patch_scores = scorer.score_images(images)
    for score, patches in zip(image_scores, patch_scores):
        assert score == pytest.approx(np.sort(patches)[-2:].mean(), rel=1e-12)  # 10 % of 24 patches: 2
    one, _ = NearestNeighbourScorer(bank, ScoringParams(image_score="mean_top_percent", top_percent=1)).score_images(images)
    np.testing.assert_array_equal(one, patch_scores.max(axis=1))  # 1 % of 24 rounds down to the one top patch


def test_scoring_options_are_checked():
    with pytest.raises(ValueError, match="distance must be euclidean or cosine"):
        ScoringParams(distance="manhattan")
    with pytest.raises(ValueError, match="needs image_score=max"):
        ScoringParams(reweight_neighbours=3, image_score="mean_top_percent")
    with pytest.raises(ValueError, match="top_percent"):
        ScoringParams(image_score="mean_top_percent", top_percent=0)


def test_predictions_do_not_depend_on_the_thread_count(data):
    bank, queries = data
    features = PatchFeatures(queries[:48].reshape(3, 16, 16), (4, 4), np.arange(3))
    scorer = NearestNeighbourScorer(bank, ScoringParams(reweight_neighbours=3))
    alone = predict(scorer, features, 32)
    for threads in (2, 3):
        shared = predict(NearestNeighbourScorer(bank, ScoringParams(reweight_neighbours=3), threads=threads),
                         features, 32, threads)
        assert np.array_equal(shared.scores, alone.scores) and np.array_equal(shared.maps, alone.maps)


@pytest.mark.parametrize("params", [ScoringParams(reweight_neighbours=3), ScoringParams(distance="cosine", k=2),
                                    ScoringParams(distance="cosine", reweight_neighbours=4)],
                         ids=["euclidean-reweighted", "cosine", "cosine-reweighted"])
def test_tensor_embeddings_on_the_torch_path_score_like_numpy_bit_for_bit(data, params):
    """Features extracted on a device are scored there (bf16 screen model, exact values on the device):
    image and patch scores equal the numpy path's to the last bit, offsets and row lengths varied."""
    import torch

    from anomaly_core.distances import MatrixDevice

    bank, queries = data
    scale = np.random.default_rng(2).uniform(0.1, 10, size=(len(bank), 1)).astype(np.float32)
    bank = bank * scale + 40.0
    images = queries[:48].reshape(4, 12, 16) + 40.0
    on_numpy = NearestNeighbourScorer(bank, params).score_images(images)
    device = MatrixDevice("cpu", use_torch=True, precision="bf16")
    on_device = NearestNeighbourScorer(torch.from_numpy(bank), params, device).score_images(torch.from_numpy(images))
    assert np.array_equal(on_numpy[0], on_device[0]) and np.array_equal(on_numpy[1], on_device[1])
    assert np.array_equal(unit_rows(bank), unit_rows(torch.from_numpy(bank)).numpy())
