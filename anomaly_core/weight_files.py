"""Where an offline site keeps backbone weights: the usual file names, searched in one folder.

Sites without internet copy weights once into a ``backbones/`` folder under the names their sources
use (torchvision's hashed file names, the DINOv2/DINOv3 repositories' ``*_pretrain.pth``, timm's Hub
snapshot ``<name>/model.safetensors``), so a config says ``backbone.weights: search`` instead of a
path per machine. Exactly one file may match: two candidates (say, torchvision's V1 and V2 weights
of a ResNet) would make the choice silent, so they are an error that names both.
"""

from __future__ import annotations

from pathlib import Path

SEARCH = "search"

# Names beyond the generic ones (``<name>.safetensors``, ``<name>.pth``, ``<name>/model.safetensors``),
# as their original publishers ship them; glob patterns relative to the folder.
PUBLISHED_NAMES: dict[str, tuple[str, ...]] = {
    "wide_resnet50_2": ("wide_resnet50_2-95faca4d.pth", "wide_resnet50_2-9ba9bcbe.pth"),
    "resnet18": ("resnet18-f37072fd.pth", "resnet18-5c106cde.pth"),
    "vit_small_patch14_dinov2": ("dinov2_vits14_pretrain.pth",),
    "vit_base_patch14_dinov2": ("dinov2_vitb14_pretrain.pth",),
    "vit_large_patch14_dinov2": ("dinov2_vitl14_pretrain.pth",),
    "vit_small_patch14_reg4_dinov2": ("dinov2_vits14_reg4_pretrain.pth",),
    "vit_base_patch14_reg4_dinov2": ("dinov2_vitb14_reg4_pretrain.pth",),
    "vit_large_patch14_reg4_dinov2": ("dinov2_vitl14_reg4_pretrain.pth",),
    "vit_small_patch16_dinov3": ("dinov3_vits16_pretrain*.pth",),
    "vit_base_patch16_dinov3": ("dinov3_vitb16_pretrain*.pth",),
    "vit_small_patch16_dinov3_qkvb": ("dinov3_vits16_pretrain*.pth",),  # the same files, with their q/v biases
    "vit_base_patch16_dinov3_qkvb": ("dinov3_vitb16_pretrain*.pth",),
    # EfficientAD's teacher PDNs: anomalib's release (efficientad_pretrained_weights.zip), nelson1425's models/
    "pdn_small": ("pretrained_teacher_small.pth", "teacher_small.pth"),
    "pdn_medium": ("pretrained_teacher_medium.pth", "teacher_medium.pth"),
}


def candidate_names(backbone: str) -> tuple[str, ...]:
    """The file names (glob patterns) searched for ``backbone``, publisher's names first."""
    generic = (f"{backbone}.safetensors", f"{backbone}.pth", f"{backbone}/model.safetensors",
               f"timm/{backbone}/model.safetensors")
    return PUBLISHED_NAMES.get(backbone, ()) + generic


def find_weights(backbone: str, folder: str | Path) -> Path:
    """The one weights file for ``backbone`` in ``folder``; ValueError naming what was looked for otherwise."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ValueError(f"backbones folder not found: {folder}")
    patterns = candidate_names(backbone)
    found = sorted({path for pattern in patterns for path in folder.glob(pattern) if path.is_file()})
    if not found:
        raise ValueError(f"no weights for {backbone!r} in {folder} (looked for {', '.join(patterns)})")
    if len(found) > 1:
        raise ValueError(f"several weights files for {backbone!r} in {folder}: {', '.join(map(str, found))}; "
                         f"set backbone.weights to the one you want")
    return found[0]
