"""Dinomaly (Guo et al., CVPR 2025; guojiajeremy/Dinomaly, anomalib ``Dinomaly``).

A frozen DINOv2 ViT encodes the image; the raw outputs of its middle blocks (all tokens: CLS, registers,
patches) are averaged into one token sequence, which a bottleneck MLP with heavy dropout (0.2, on its input
too) perturbs and a stack of linear-attention Transformer blocks decodes, one output per encoder block. The
encoder blocks and the decoder outputs (deepest decoder output against shallowest block) are averaged in
groups (first half, second half); per group, 1 - cos over channels per patch is the anomaly evidence. Linear
attention spreads over the whole image and the dropout forbids identity shortcuts, so the decoder rebuilds the
normal appearance rather than copying its input. Code followed: models/uad.py ``ViTill``, models/vision_transformer.py
``bMlp``, ``LinearAttention2``, ``Block``, the ``train`` of dinomaly_mvtec_sep.py (one model per category) and
utils.py ``global_cosine_hm_percent``, ``cal_anomaly_maps``, ``evaluation_batch``.

The loss (``global_cosine_hm_percent``): per group, the batch mean of 1 - cos between an image's flattened encoder
and decoder maps, averaged over groups; the gradient reaching the decoder's points whose own 1 - cos lies below
the batch's top (1 - p) fraction is multiplied by 0.1 (easy points matter less), p rising linearly from 0 to 0.9
over the first 1000 steps. The step count lives in a buffer, so checkpoints resume it. Under DDP each rank
ranks the points of its own share of the batch (the authors train on one GPU).

The image score (``evaluation_batch(max_ratio=0.01, resize_mask=256)``): the map, the groups' mean of 1 - cos each
upsampled bilinearly (``align_corners=True``) to the image, is resized to 256 x 256, blurred by a 5 x 5 Gaussian
of sigma 4, and the mean of its top 1 % is the score. Where the authors' model and anomalib's differ, a setting
the recipes choose (their training values differ too: anomaly_core.registry.MODELS):

- ``mlp_bias``: the authors' MLPs (bottleneck and decoder) have biases; anomalib's ``DinomalyMLP`` none.
- ``blur_padding``: the authors' blur is a Conv2d padded with zeros (utils.py ``get_gaussian_kernel``), anomalib's
  ``GaussianBlur2d`` reflects: scores differ near the border.
- ``blurred_map``: the authors measure pixels on the blurred 256 x 256 map; here it is upsampled bilinearly to the
  image. anomalib returns the unblurred map at the image size (``torch_model.py``: ``anomaly_map_resized``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.init import trunc_normal_
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from anomaly_core.backbones import FeatureBackbone, WeightsError, architecture
from anomaly_core.training.model import TrainableModel
from anomaly_core.training.schedules import WarmCosine
from anomaly_core.training.stable_adamw import StableAdamW

BLUR_PADDINGS = ("zeros", "reflect")


def default_layers(backbone: str) -> tuple[str, ...]:
    """The authors' target blocks (dinomaly_mvtec_sep.py): 2-9 of a 12-block ViT (small, base), every second of
    4-18 of a 24-block one (large)."""
    last = architecture(backbone).default_layers[-1]  # a ViT's default: its last block
    indices = range(2, 10) if last == "blocks.11" else range(4, 19, 2)
    return tuple(f"blocks.{index}" for index in indices)


@dataclass(frozen=True, kw_only=True)
class DinomalySettings:
    """Everything besides the encoder weights file that fixes a Dinomaly model and its training.

    The training values have no defaults: a recipe (anomaly_core.registry.MODELS) or the caller names each one.
    """

    backbone: str = "vit_base_patch14_reg4_dinov2"
    layers: tuple[str, ...] = ()  # encoder blocks, shallow to deep; () = default_layers; an even count
    crop: int = 392
    bottleneck_dropout: float = 0.2
    hard_mining_p: float = 0.9  # the share of easy points at the end of the ramp
    hard_mining_steps: int = 1000  # the ramp's steps
    hard_mining_factor: float = 0.1  # their gradient's factor
    score_size: int = 256  # the map's side for the score (evaluation_batch resize_mask)
    blur_sigma: float = 4.0
    blur_kernel: int = 5
    top_ratio: float = 0.01  # the score: mean of this top fraction of the blurred map
    # The file's position embeddings (DINOv2: 37 x 37) resampled to the crop's grid without antialiasing, as both
    # references do: the authors' DINOv2 interpolate_pos_encoding (interpolate_antialias=False, models/vit_encoder.py)
    # and anomalib's TimmFeatureExtractor (_disable_pos_embed_antialiasing). The authors' also scales by
    # (grid + 0.1) / 37 (interpolate_offset), timm and anomalib map grid to grid: other weights of the bicubic.
    pos_embed_antialias: bool = False
    lr: float  # StableAdamW, peak of the warm-up + cosine schedule
    final_lr: float
    warmup_steps: int
    max_steps: int  # the schedule's length (the Trainer stops there too)
    betas: tuple[float, float]
    eps: float
    weight_decay: float
    mlp_bias: bool
    blur_padding: str  # "zeros" (the authors') or "reflect" (anomalib)
    blurred_map: bool  # the map: blurred at score_size, upsampled (the authors'), or raw at the image size (anomalib)
    init_seed: int  # bottleneck/decoder initialisation (the run seed)

    def __post_init__(self) -> None:
        for name in ("layers", "betas"):  # JSON gives lists back
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.blur_padding not in BLUR_PADDINGS:
            raise ValueError(f"blur_padding must be one of {', '.join(BLUR_PADDINGS)}, got {self.blur_padding!r}")


class _Mlp(nn.Module):
    """Two linear layers with GELU; dropout after each, and on the input too for the bottleneck (``bMlp``)."""

    def __init__(self, dim: int, dropout: float, bias: bool, input_dropout: bool) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, 4 * dim, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(4 * dim, dim, bias=bias)
        self.drop = nn.Dropout(dropout)
        self.input_dropout = input_dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_dropout:
            x = self.drop(x)
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class _LinearAttention(nn.Module):
    """Softmax-free attention, ELU + 1 feature maps (``LinearAttention2``), in anomalib's matmul form."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        q, k = F.elu(q) + 1.0, F.elu(k) + 1.0
        kv = torch.matmul(k.transpose(-2, -1), v)
        normaliser = 1.0 / torch.sum(q * k.sum(dim=-2, keepdim=True), dim=-1, keepdim=True)
        x = (torch.matmul(q, kv) * normaliser).transpose(1, 2).reshape(batch, tokens, dim)
        return self.proj(x)


class _DecoderBlock(nn.Module):
    """Pre-norm Transformer block (LayerNorm eps 1e-8) with linear attention and a 4x MLP, no dropout."""

    def __init__(self, dim: int, heads: int, mlp_bias: bool) -> None:
        super().__init__()
        norm = partial(nn.LayerNorm, eps=1e-8)
        self.norm1, self.attn = norm(dim), _LinearAttention(dim, heads)
        self.norm2, self.mlp = norm(dim), _Mlp(dim, 0.0, mlp_bias, input_dropout=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def gaussian_kernel(size: int, sigma: float) -> torch.Tensor:
    """The normalised size x size Gaussian of utils.py ``get_gaussian_kernel`` (and anomalib's), [1, 1, size, size]."""
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    one_d = torch.exp(-offsets**2 / (2 * sigma**2))
    kernel = torch.outer(one_d, one_d)
    return (kernel / kernel.sum()).float()[None, None]


class Dinomaly(TrainableModel):
    settings_type: ClassVar[type] = DinomalySettings
    kind: ClassVar[str] = "dinomaly"
    frozen: ClassVar[tuple[str, ...]] = ("encoder",)

    def __init__(self, settings: DinomalySettings, weights: str) -> None:
        super().__init__()
        if architecture(settings.backbone).patch_size is None:
            raise WeightsError(f"backbone {settings.backbone!r} is a CNN; Dinomaly needs a ViT encoder (DINOv2)")
        layers = settings.layers or default_layers(settings.backbone)
        if len(layers) < 2 or len(layers) % 2:
            raise WeightsError(f"Dinomaly needs an even number (>= 2) of encoder blocks, fused in two halves; "
                               f"got {list(layers)}")
        self.settings = replace(settings, layers=layers)
        self.encoder = FeatureBackbone(settings.backbone, layers, weights, settings.crop, settings.pos_embed_antialias)
        indices = [int(layer.removeprefix("blocks.")) for layer in layers]
        if indices != sorted(set(indices)):
            raise WeightsError(f"encoder blocks {list(layers)} must be distinct and ordered shallow to deep")
        half = len(layers) // 2
        self.groups = (tuple(range(half)), tuple(range(half, len(layers))))  # fuse_layer_encoder/_decoder
        dim = self.encoder.channels[0]
        heads = dim // 64  # DINOv2: small 6, base 12, large 16 heads of 64 channels
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(settings.init_seed)
            self.bottleneck = nn.ModuleList([_Mlp(dim, settings.bottleneck_dropout, settings.mlp_bias, True)])
            self.decoder = nn.ModuleList(_DecoderBlock(dim, heads, settings.mlp_bias) for _ in layers)
            for module in [*self.bottleneck.modules(), *self.decoder.modules()]:
                if isinstance(module, nn.Linear):
                    trunc_normal_(module.weight, std=0.01, a=-0.03, b=0.03)
                    if module.bias is not None:
                        nn.init.zeros_(module.bias)
                elif isinstance(module, nn.LayerNorm):
                    nn.init.zeros_(module.bias)
                    nn.init.ones_(module.weight)
        self.register_buffer("hard_mining_step", torch.zeros((), dtype=torch.int64))  # steps taken: p's ramp
        self.register_buffer("blur", gaussian_kernel(settings.blur_kernel, settings.blur_sigma), persistent=False)

    def encoder_and_decoder(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per group, the fused encoder and decoder maps [B, C, h, w] (``ViTill.forward``)."""
        tokens = self.encoder.block_tokens(images)
        x = torch.stack(tokens, dim=1).mean(dim=1)
        for block in self.bottleneck:
            x = block(x)
        decoded = []
        for block in self.decoder:
            x = block(x)
            decoded.append(x)
        decoded = decoded[::-1]
        side = images.shape[-2] // self.encoder.strides[0], images.shape[-1] // self.encoder.strides[0]

        def fused(sequences: list[torch.Tensor], group: tuple[int, ...]) -> torch.Tensor:
            mean = torch.stack([sequences[index] for index in group], dim=1).mean(dim=1)
            patches = mean[:, self.encoder.prefix_tokens:]
            return patches.permute(0, 2, 1).reshape(len(images), -1, *side).contiguous()

        return [fused(tokens, group) for group in self.groups], [fused(decoded, group) for group in self.groups]

    def hard_mining_share(self) -> float:
        """p at the current step: 0.9 x step / 1000, at most 0.9 (dinomaly_mvtec_sep.py ``train``)."""
        settings = self.settings
        return min(settings.hard_mining_p * int(self.hard_mining_step) / settings.hard_mining_steps,
                   settings.hard_mining_p)

    def training_step(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``global_cosine_hm_percent``: see the module docstring. A step with gradients advances p's ramp."""
        encoded, decoded = self.encoder_and_decoder(images)
        p, factor = self.hard_mining_share(), self.settings.hard_mining_factor
        terms = {}
        for index, (e, d) in enumerate(zip(encoded, decoded)):
            with torch.no_grad():
                distance = 1 - F.cosine_similarity(e, d).unsqueeze(1)
                k = max(1, int(distance.numel() * (1 - p)))
                easy = distance < torch.topk(distance.reshape(-1), k=k)[0][-1]
            if d.requires_grad:
                d.register_hook(lambda grad, easy=easy: torch.where(easy, grad * factor, grad))
            terms[f"loss/group{index}"] = (1 - F.cosine_similarity(e.flatten(1), d.flatten(1))).mean()
        if torch.is_grad_enabled() and self.training:
            self.hard_mining_step += 1
        return {"loss": torch.stack(list(terms.values())).mean(), **terms}

    def anomaly_maps(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 1, H, W]: the groups' mean of 1 - cos, each upsampled (align_corners=True) to the image."""
        encoded, decoded = self.encoder_and_decoder(images)
        maps = [F.interpolate((1 - F.cosine_similarity(e, d)).unsqueeze(1), size=images.shape[-2:],
                              mode="bilinear", align_corners=True) for e, d in zip(encoded, decoded)]
        return torch.cat(maps, dim=1).mean(dim=1, keepdim=True)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Score: mean of the top 1 % of the blurred 256 x 256 map; map: see the module docstring."""
        settings = self.settings
        maps = self.anomaly_maps(images)
        small = F.interpolate(maps, size=settings.score_size, mode="bilinear", align_corners=False)
        pad = settings.blur_kernel // 2
        padded = F.pad(small, (pad,) * 4, mode="constant" if settings.blur_padding == "zeros" else "reflect")
        blurred = F.conv2d(padded, self.blur)
        flat = blurred.flatten(1)
        top = torch.sort(flat, dim=1, descending=True)[0][:, : max(1, int(flat.shape[1] * settings.top_ratio))]
        if settings.blurred_map:
            maps = F.interpolate(blurred, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return {"pred_score": top.mean(dim=1), "anomaly_map": maps[:, 0]}

    def configure_optimizers(self, epochs: int, steps_per_epoch: int) -> tuple[Optimizer, LambdaLR]:
        """StableAdamW (AMSGrad) on bottleneck + decoder; warm-up + cosine over min(max_steps, the run's steps),
        as anomalib's ``configure_optimizers`` (the authors' loop runs exactly max_steps)."""
        settings = self.settings
        optimizer = StableAdamW([*self.bottleneck.parameters(), *self.decoder.parameters()], lr=settings.lr,
                                betas=settings.betas, eps=settings.eps, weight_decay=settings.weight_decay,
                                amsgrad=True)
        total = min(settings.max_steps, epochs * steps_per_epoch)
        schedule = WarmCosine(settings.lr, settings.final_lr, total, settings.warmup_steps)
        return optimizer, LambdaLR(optimizer, schedule)

    def provenance(self) -> dict[str, Any]:
        """The encoder facts model files and checkpoints are checked against (``bank.json``'s names)."""
        return {"backbone": self.encoder.name, "layers": list(self.encoder.layers),
                "weights_sha256": self.encoder.weights_sha256, "crop": self.settings.crop,
                "mean": list(self.encoder.mean), "std": list(self.encoder.std)}

