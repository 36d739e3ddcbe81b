"""End to end on real data: MVTec 3D-AD tire (RGB) with real ImageNet EfficientNet-Lite0 weights, 256 -> 224.

Floors sit a little under what this machine measured (image AUROC 0.875, pixel AUROC 0.985, AUPRO 0.94;
see README) and far above chance (0.5), so a broken stage — wrong weights, misaligned maps, a coreset
that drops the wrong patches — fails here.
"""

import numpy as np
import pytest

from anomaly_core.data import load_split
from anomaly_core.extraction import ExtractionSettings, PatchFeatureExtractor
from anomaly_core.patchcore import build_bank, evaluate
from anomaly_core.scoring import NearestNeighbourScorer, ScoringParams, predict


@pytest.fixture(scope="module")
def tire_run(tire_root):
    split = load_split("mvtec", tire_root, "tire")
    extractor = PatchFeatureExtractor(ExtractionSettings("tf_efficientnet_lite0", ("blocks.2", "blocks.4"), "package"))
    train = extractor.extract(split.train, range(len(split.train)))
    bank = build_bank(train, "approximate", 0.1, 128, seed=0, metadata=extractor.describe())
    test = extractor.extract(split.test, range(len(split.test)))
    predictions = predict(NearestNeighbourScorer(bank.features, ScoringParams()), test, 224)
    return split, bank, predictions, evaluate(split.test, predictions, extractor.transform, 0.3)


def test_tire_metrics_above_measured_floors(tire_run):
    _, _, _, report = tire_run
    values = report.values
    assert values["image_auroc"] >= 0.80
    assert values["pixel_auroc"] >= 0.975
    assert values["aupro"] >= 0.90
    assert values["image_ap"] >= 0.85  # 20 of 28 test images are anomalous: chance AP is 0.71


def test_tire_bank_and_maps_are_shaped_as_patchcore(tire_run):
    split, bank, predictions, _ = tire_run
    assert bank.metadata["n_patches"] == 34 * 28 * 28
    assert bank.features.shape == (int(0.1 * 34 * 28 * 28), 1024)
    assert predictions.maps.shape == (28, 224, 224)
    labels = np.array([s.label for s in split.test])
    # anomalous images score higher on average than good ones
    assert predictions.scores[labels == 1].mean() > predictions.scores[labels == 0].mean()


def test_fp16_option_halves_the_transfer_and_stays_close(tire_root):
    """cluster.fp16: features travel as float16 (half the object-store traffic), within fp16 rounding."""
    split = load_split("mvtec", tire_root, "tire")
    settings = dict(backbone="tf_efficientnet_lite0", layers=("blocks.2", "blocks.4"), weights="package",
                    resize=128, crop=112, batch_size=2)
    full = PatchFeatureExtractor(ExtractionSettings(**settings)).extract(split.train[:2], [0, 1])
    half = PatchFeatureExtractor(ExtractionSettings(**settings, fp16=True)).extract(split.train[:2], [0, 1])
    assert full.embeddings.dtype == np.float32 and half.embeddings.dtype == np.float16
    assert half.embeddings.nbytes * 2 == full.embeddings.nbytes
    np.testing.assert_allclose(half.embeddings.astype(np.float32), full.embeddings, rtol=2e-3, atol=2e-3)
