"""jobs.train's configuration: refused before any work, each error naming its key."""

from __future__ import annotations

import pytest

from anomaly_core.config import ConfigError, parse_config
from jobs.train import check_training, preflight

RAW = {"datasets": [{"name": "d", "format": "mvtec", "root": "/tmp/x"}],
       "backbone": {"name": "tf_efficientnet_lite0", "layers": [], "weights": "package"},
       "training": {"model": "reverse_distillation"}}


def test_training_section_and_its_values_are_checked():
    with pytest.raises(ConfigError, match="training: missing"):
        check_training(parse_config({**RAW, "training": None}, "c.yaml"))
    with pytest.raises(ConfigError, match=r"training.monitor: Value error, must be loss or one of image_auroc"):
        parse_config({**RAW, "training": {"model": "stfpm", "monitor": "auroc"}}, "c.yaml")
    with pytest.raises(ConfigError, match="training: .*monitor image_auroc is only judged with mode max, got mode min"):
        parse_config({**RAW, "training": {"model": "stfpm", "monitor": "image_auroc"}}, "c.yaml")
    with pytest.raises(ConfigError, match=r"training.model: Input should be 'reverse_distillation' or 'stfpm'"):
        parse_config({**RAW, "training": {"model": "padim"}}, "c.yaml")
    with pytest.raises(ConfigError, match="thresholds.source=validation: jobs.train keeps every good training image"):
        check_training(parse_config({**RAW, "thresholds": {"source": "validation"}}, "c.yaml"))
    ensemble = {**RAW, "ensemble": [RAW["backbone"], {**RAW["backbone"], "name": "tf_efficientnet_lite1"}]}
    del ensemble["backbone"]
    with pytest.raises(ConfigError, match="jobs.train works with one backbone"):
        check_training(parse_config(ensemble, "c.yaml"))
    assert check_training(parse_config(RAW, "c.yaml")).training.epochs == 200


def test_a_teacher_that_cannot_be_distilled_is_refused_before_ray(tire_root):
    vit = {**RAW, "datasets": [{"name": "t", "format": "mvtec", "root": str(tire_root)}],
           "backbone": {"name": "vit_small_patch14_dinov2", "layers": [], "weights": "random"},
           "preprocess": {"resize": 224, "crop": 224}}
    with pytest.raises(ConfigError, match=r"training \(reverse_distillation, teacher vit_small_patch14_dinov2.*ViT"):
        preflight(parse_config(vit, "c.yaml"), [])
