"""Ensembles without Ray: the per-member normalisation, the combination, and the config that declares them.
(The cluster run of a Lite0 + Lite1 ensemble on tire: tests/test_cluster.py.)"""

from __future__ import annotations

import numpy as np
import pytest

from anomaly_core.config import ConfigError, parse_config
from anomaly_core.ensemble import Normalisation, combine, member_labels
from anomaly_core.scoring import Predictions
from jobs.cli import single_backbone
from jobs.site_paths import SitePaths


def predictions(scores, maps) -> Predictions:
    scores = np.asarray(scores, dtype=np.float64)
    return Predictions(scores, np.asarray(maps, dtype=np.float32), np.arange(len(scores), dtype=np.int64))


def test_normalisation_is_the_held_out_mean_and_std():
    held = predictions([1.0, 3.0], [np.full((2, 2), 0.0), np.full((2, 2), 2.0)])
    norm = Normalisation.fit(held, "a")
    assert norm == Normalisation(image_mean=2.0, image_std=1.0, pixel_mean=1.0, pixel_std=1.0)
    scores, maps = norm.apply(predictions([4.0], [np.full((2, 2), 5.0)]))
    assert scores.tolist() == [2.0] and maps.tolist() == [[[4.0, 4.0], [4.0, 4.0]]]


def test_members_on_different_scales_count_alike():
    """A member whose distances are 100x larger does not drown the other: each is a z-score first."""
    rng = np.random.default_rng(0)
    held_a = predictions(rng.normal(10, 1, 5), rng.normal(5, 1, (5, 4, 4)))
    held_b = predictions(rng.normal(1000, 100, 5), rng.normal(500, 100, (5, 4, 4)))
    norms = [Normalisation.fit(held_a, "a"), Normalisation.fit(held_b, "b")]
    # Image 0 is anomalous to member a only (+3 std), image 1 to member b only (+3 std): they tie.
    test_a = predictions([norms[0].image_mean + 3 * norms[0].image_std, norms[0].image_mean], np.zeros((2, 4, 4)))
    test_b = predictions([norms[1].image_mean, norms[1].image_mean + 3 * norms[1].image_std], np.zeros((2, 4, 4)))
    ensemble = combine([test_a, test_b], norms)
    assert ensemble.scores == pytest.approx([1.5, 1.5])
    assert ensemble.maps.dtype == np.float32 and ensemble.maps.shape == (2, 4, 4)
    expected_map = ((0 - norms[0].pixel_mean) / norms[0].pixel_std + (0 - norms[1].pixel_mean) / norms[1].pixel_std) / 2
    assert float(ensemble.maps[0, 0, 0]) == pytest.approx(expected_map, rel=1e-6)


def test_normalisation_refuses_what_it_cannot_scale():
    with pytest.raises(ValueError, match="member a: 1 held-out image.*at least 2.*validation_split"):
        Normalisation.fit(predictions([1.0], np.zeros((1, 2, 2))), "a")
    with pytest.raises(ValueError, match="member b: its held-out images all score alike"):
        Normalisation.fit(predictions([1.0, 1.0], np.zeros((2, 2, 2))), "b")


def test_combine_refuses_members_of_other_images():
    norm = Normalisation(0.0, 1.0, 0.0, 1.0)
    a = predictions([1.0, 2.0], np.zeros((2, 2, 2)))
    b = Predictions(a.scores, a.maps, np.array([0, 2]))
    with pytest.raises(ValueError, match="different images"):
        combine([a, b], [norm, norm])
    with pytest.raises(ValueError, match="one normalisation per member"):
        combine([a, a], [norm])


def test_member_labels_are_unique():
    assert member_labels(["lite0", "lite1"]) == ["lite0", "lite1"]
    assert member_labels(["wrn", "lite0", "wrn"]) == ["wrn-1", "lite0", "wrn-2"]


RAW = {"datasets": [{"name": "d", "format": "synthetic", "root": "/tmp/x"}]}
MEMBERS = [{"name": "tf_efficientnet_lite0", "weights": "package"}, {"name": "tf_efficientnet_lite1", "weights": "search"}]


def test_ensemble_config_replaces_the_backbone():
    config = parse_config({**RAW, "ensemble": MEMBERS}, "c.yaml")
    members = config.members()
    assert [m.backbone.name for m in members] == ["tf_efficientnet_lite0", "tf_efficientnet_lite1"]
    assert all(m.ensemble == [] and m.scoring == config.scoring for m in members)
    # The recorded run_config.yaml holds the default backbone beside the ensemble: it must load again.
    assert parse_config(config.model_dump(mode="json"), "run_config.yaml") == config
    assert parse_config(RAW, "c.yaml").members() == [parse_config(RAW, "c.yaml")]


def test_ensemble_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="ensemble: needs at least two backbones"):
        parse_config({**RAW, "ensemble": MEMBERS[:1]}, "c.yaml")
    with pytest.raises(ConfigError, match="set either backbone or ensemble"):
        parse_config({**RAW, "ensemble": MEMBERS, "backbone": {"name": "wide_resnet50_2", "weights": "x.pth"}}, "c.yaml")
    with pytest.raises(ConfigError, match="jobs.build_bank works with one backbone"):
        single_backbone(parse_config({**RAW, "ensemble": MEMBERS}, "c.yaml"), "jobs.build_bank")


def test_weight_search_resolves_each_member(tmp_path):
    (tmp_path / "tf_efficientnet_lite1").mkdir()
    (tmp_path / "tf_efficientnet_lite1" / "model.safetensors").write_bytes(b"x")
    config = SitePaths(backbones=str(tmp_path), source="paths.yaml").resolve_weights(
        parse_config({**RAW, "ensemble": MEMBERS}, "c.yaml"))
    assert [m.weights for m in config.ensemble] == ["package", str(tmp_path / "tf_efficientnet_lite1" / "model.safetensors")]
    with pytest.raises(ConfigError, match="ensemble.1.weights=search needs a backbones folder"):
        SitePaths(source="paths.yaml").resolve_weights(parse_config({**RAW, "ensemble": MEMBERS}, "c.yaml"))
