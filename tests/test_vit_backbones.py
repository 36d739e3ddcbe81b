"""ViT backbones (DINOv2, DINOv3): patch tokens as maps, crop sizes, weights in timm's or the original layout.

Everything is random init or small files made here: no weights ship with the project or are downloaded.
ViT-S at 112 px (8 x 8 or 7 x 7 tokens) keeps every forward pass fast on a CPU.
"""

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from anomaly_core.backbones import (
    ARCHITECTURES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    FeatureBackbone,
    WeightsError,
    check_input_size,
    file_sha256,
)
from anomaly_core.bank import BankError, check_compatible
from anomaly_core.data import load_split
from anomaly_core.extraction import ExtractionSettings, PatchFeatureExtractor

VITS = "vit_small_patch14_dinov2"
CROP = 112
VIT_NAMES = sorted(name for name, arch in ARCHITECTURES.items() if arch.patch_size is not None)


def _timm_vit(name: str, img_size: int) -> torch.nn.Module:
    """A randomly initialised timm ViT, built the way FeatureBackbone builds it (no head)."""
    return timm.create_model(name, pretrained=False, num_classes=0, img_size=img_size, dynamic_img_size=False).eval()


def _normed_last_block_maps(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Reference without forward_intermediates: the model's output tokens minus CLS/registers, as [B, C, H, W]."""
    with torch.inference_mode():
        tokens = model.forward_features(images)[:, model.num_prefix_tokens :]
    side = int(tokens.shape[1] ** 0.5)
    return tokens.reshape(len(images), side, side, -1).permute(0, 3, 1, 2)


@pytest.fixture(scope="module")
def vits_file(tmp_path_factory):
    """Random ViT-S/14 weights in timm's layout, at the crop the tests use."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "vits14.safetensors"
    save_file({k: v.contiguous() for k, v in _timm_vit(VITS, CROP).state_dict().items()}, str(path))
    return path


@pytest.mark.parametrize("name", VIT_NAMES)
def test_registry_matches_timm(name):
    """Patch size, default layer (the last block) and mean/std agree with timm's own definition of each model."""
    arch = ARCHITECTURES[name]
    with torch.device("meta"):  # shapes only: even ViT-L costs no memory
        model = timm.create_model(arch.timm_name, pretrained=False, num_classes=0)
    assert model.patch_embed.patch_size == (arch.patch_size, arch.patch_size)
    assert arch.default_layers == (f"blocks.{len(model.blocks) - 1}",)
    config = timm.get_pretrained_cfg(arch.timm_name)
    assert (arch.mean, arch.std) == (tuple(config.mean), tuple(config.std)) == (IMAGENET_MEAN, IMAGENET_STD)


@pytest.mark.parametrize(
    "name,prefix_tokens",
    [(VITS, 1), ("vit_small_patch14_reg4_dinov2", 5), ("vit_small_patch16_dinov3", 5)],
)
def test_patch_tokens_as_maps_without_cls_and_registers(name, prefix_tokens):
    torch.manual_seed(0)
    backbone = FeatureBackbone(name, (), "random", crop=CROP)
    side = CROP // ARCHITECTURES[name].patch_size
    images = torch.randn(2, 3, CROP, CROP)
    (maps,) = backbone(images)
    assert maps.shape == (2, 384, side, side)  # registers or not, the same token grid
    assert backbone.model.num_prefix_tokens == prefix_tokens
    torch.testing.assert_close(maps, _normed_last_block_maps(backbone.model, images))
    assert backbone.layers == ("blocks.11",) and backbone.channels == (384,)
    assert backbone.weights_sha256 == "random" and not backbone.training
    assert not any(p.requires_grad for p in backbone.parameters())


def test_intermediate_blocks_share_the_grid_and_later_blocks_are_pruned():
    backbone = FeatureBackbone(VITS, ("blocks.3", "blocks.7"), "random", crop=CROP)
    maps = backbone(torch.randn(1, 3, CROP, CROP))
    assert [tuple(m.shape) for m in maps] == [(1, 384, 8, 8)] * 2
    assert len(backbone.model.blocks) == 8
    assert backbone.strides == (14, 14)
    unknown = r"has no layer\(s\) \['layer2'\]; choose from \['blocks.0', .*'blocks.11'\]"
    with pytest.raises(WeightsError, match=unknown):
        FeatureBackbone(VITS, ("layer2",), "random", crop=CROP)


def test_crop_must_be_a_multiple_of_the_patch_size():
    message = "preprocess.crop=225 is not a multiple of vit_small_patch14_dinov2's patch size 14 (use 224 or 238)"
    with pytest.raises(WeightsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        FeatureBackbone(VITS, (), "random", crop=225)
    with pytest.raises(WeightsError, match="vit_small_patch14_dinov2's patch size 14 \\(use 252 or 266\\)"):
        check_input_size(VITS, 256)
    with pytest.raises(WeightsError, match="patch size 16 \\(use 16\\)"):
        check_input_size("vit_base_patch16_dinov3", 10)
    check_input_size("vit_small_patch16_dinov3", 256)
    check_input_size("resnet18", 225)  # CNNs take any size
    backbone = FeatureBackbone(VITS, (), "random", crop=CROP)
    with pytest.raises(AssertionError, match="doesn't match model"):  # built for one crop, refuses others
        backbone(torch.zeros(1, 3, CROP + 14, CROP + 14))


def _original_dinov2_layout(timm_state: dict[str, torch.Tensor], registers: bool) -> dict[str, torch.Tensor]:
    """What facebookresearch/dinov2 saves (dinov2_vits14[_reg4]_pretrain.pth), from a timm state dict.

    Block names (norm1, attn.qkv, ls1.gamma, mlp.fc1, ...) are the same for ViT-S/B/L; the originals add the
    pretraining ``mask_token``, and the register variants keep the CLS position inside ``pos_embed``.
    """
    state = {**timm_state, "mask_token": torch.randn(1, timm_state["cls_token"].shape[-1])}
    if registers:
        cls_position = torch.randn_like(state["cls_token"])
        state["register_tokens"] = state.pop("reg_token")
        state["pos_embed"] = torch.cat([cls_position, state["pos_embed"]], dim=1)
        state["cls_token"] = state["cls_token"] - cls_position
    return state


@pytest.mark.parametrize("name,registers", [(VITS, False), ("vit_small_patch14_reg4_dinov2", True)])
def test_original_dinov2_layout_loads_like_timm_layout(tmp_path, name, registers):
    torch.manual_seed(2)
    source = _timm_vit(name, 518)  # the released checkpoints' size: 37 x 37 position embeddings
    timm_path, original_path = tmp_path / "timm.safetensors", tmp_path / "dinov2_vits14_pretrain.pth"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(timm_path))
    original = _original_dinov2_layout(source.state_dict(), registers)
    assert original["pos_embed"].shape == (1, 37 * 37 + 1, 384)
    torch.save(original, original_path)

    from_timm = FeatureBackbone(name, (), str(timm_path), crop=CROP)
    from_original = FeatureBackbone(name, (), str(original_path), crop=CROP)
    assert torch.equal(from_original.model.blocks[5].attn.qkv.weight, source.blocks[5].attn.qkv.weight)
    assert from_original.model.pos_embed.shape[1] == 8 * 8 + (0 if registers else 1)  # resampled to the crop
    images = torch.randn(2, 3, CROP, CROP)
    torch.testing.assert_close(from_original(images)[0], from_timm(images)[0])
    assert from_original.weights_sha256 == file_sha256(original_path) != from_timm.weights_sha256


def _original_dinov3_layout(timm_state: dict[str, torch.Tensor], blocks: int) -> dict[str, torch.Tensor]:
    """What facebookresearch/dinov3 saves (dinov3_vits16_pretrain_lvd1689m-*.pth), from a timm ``_qkvb`` state."""
    dim = timm_state["cls_token"].shape[-1]
    state = {"mask_token": torch.randn(1, dim), "rope_embed.periods": torch.rand(16)}
    for key, value in timm_state.items():
        key = key.replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma").replace("reg_token", "storage_tokens")
        if not key.endswith(("attn.q_bias", "attn.v_bias")):
            state[key] = value
    for block in range(blocks):
        prefix = f"blocks.{block}.attn."
        k_bias = torch.randn(dim)  # masked to zero when the original model runs, so never used
        state[prefix + "qkv.bias"] = torch.cat([timm_state[prefix + "q_bias"], k_bias, timm_state[prefix + "v_bias"]])
        state[prefix + "qkv.bias_mask"] = torch.cat([torch.ones(dim), torch.zeros(dim), torch.ones(dim)])
    return state


def test_original_dinov3_layout_loads_and_non_zero_biases_need_the_qkvb_variant(tmp_path):
    torch.manual_seed(3)
    source = _timm_vit("vit_small_patch16_dinov3_qkvb", CROP)
    for block in source.blocks:
        torch.nn.init.normal_(block.attn.q_bias)
        torch.nn.init.normal_(block.attn.v_bias)
    path = tmp_path / "dinov3_vits16_pretrain_lvd1689m.pth"
    torch.save(_original_dinov3_layout(source.state_dict(), len(source.blocks)), path)
    images = torch.randn(2, 3, CROP, CROP)

    loaded = FeatureBackbone("vit_small_patch16_dinov3_qkvb", (), str(path), crop=CROP)
    torch.testing.assert_close(loaded(images)[0], _normed_last_block_maps(source, images))
    with pytest.raises(WeightsError, match=f"{path}: blocks.0.attn.qkv.bias holds non-zero q/v biases"):
        FeatureBackbone("vit_small_patch16_dinov3", (), str(path), crop=CROP)
    timm_path = tmp_path / "vits16_qkvb.safetensors"
    save_file(source.state_dict(), str(timm_path))
    with pytest.raises(WeightsError, match="blocks.0.attn.q_bias holds non-zero q/v biases.*choose its _qkvb variant"):
        FeatureBackbone("vit_small_patch16_dinov3", (), str(timm_path), crop=CROP)

    for block in source.blocks:  # distilled models' files: q/v biases zero, the k part anything
        torch.nn.init.zeros_(block.attn.q_bias)
        torch.nn.init.zeros_(block.attn.v_bias)
    torch.save(_original_dinov3_layout(source.state_dict(), len(source.blocks)), path)
    plain = FeatureBackbone("vit_small_patch16_dinov3", (), str(path), crop=CROP)
    torch.testing.assert_close(plain(images)[0], _normed_last_block_maps(source, images))


def test_weights_of_another_vit_are_refused_naming_file_and_key(tmp_path):
    with torch.device("meta"):
        vitb = _timm_vit("vit_base_patch14_dinov2", 518)
    # Zeros with ViT-B/14's real names and shapes, stored as 0-stride views so the file stays tiny.
    state = {key: torch.zeros(()).expand(value.shape) for key, value in vitb.state_dict().items()}
    path = tmp_path / "dinov2_vitb14_pretrain.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError, match=f"weights file {path}: cls_token has shape \\(1, 1, 768\\), expected "
                                           f"\\(1, 1, 384\\)"):
        FeatureBackbone(VITS, (), str(path), crop=CROP)
    dinov3 = tmp_path / "dinov3.safetensors"  # same width, other family: keys it lacks
    save_file(_timm_vit("vit_small_patch16_dinov3", CROP).state_dict(), str(dinov3))
    with pytest.raises(WeightsError, match=f"weights file {dinov3} lacks parameters"):
        FeatureBackbone(VITS, (), str(dinov3), crop=CROP)


def test_extractor_on_tire_images_records_the_weights(tire_root, vits_file):
    split = load_split("mvtec", tire_root, "tire")
    settings = ExtractionSettings(VITS, (), str(vits_file), resize=128, crop=CROP, batch_size=2, target_dim=384)
    extractor = PatchFeatureExtractor(settings)
    described = extractor.describe()
    assert described["weights_sha256"] == file_sha256(vits_file)
    assert described["layers"] == ["blocks.11"] and described["crop"] == CROP
    assert described["mean"] == list(IMAGENET_MEAN) and described["std"] == list(IMAGENET_STD)
    features = extractor.extract(split.train[:3], [0, 1, 2])
    assert features.grid == (8, 8)
    assert features.embeddings.shape == (3, 64, 384) and features.embeddings.dtype == np.float32
    assert np.isfinite(features.embeddings).all() and features.embeddings.std() > 0


def test_bank_built_at_224_refuses_inference_at_256():
    """DINOv3's RoPE takes any multiple of 16; the bank's recorded crop still pins the one it was built at."""
    built, inference = (
        PatchFeatureExtractor(ExtractionSettings("vit_small_patch16_dinov3", (), "random", resize=256, crop=crop))
        for crop in (224, 256)
    )
    check_compatible(built.describe(), built.describe(), "bank.json")
    with pytest.raises(BankError, match="crop: bank has 224, inference uses 256"):
        check_compatible(built.describe(), inference.describe(), "bank.json")
