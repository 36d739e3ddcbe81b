"""Images -> patch features: a frozen backbone, its patch embedder and the image transform that belong to it.

Batches are always formed from the category's sorted sample list in fixed chunks of ``batch_size``;
the cluster's shard planner hands out whole chunks, so an image is always processed with the same
neighbours in its batch, whatever the number of actors.
"""

from __future__ import annotations

import time
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from anomaly_core.augment import Augmentation, augment_image
from anomaly_core.backbones import FeatureBackbone
from anomaly_core.data import ImageTransform, Sample, read_rgb
from anomaly_core.features import PatchFeatures
from anomaly_core.patch_features import PatchEmbedder


def exact_fp32() -> None:
    """cuDNN runs fp32 convolutions in TF32 by default (10-bit mantissa): features, banks, trained weights
    and metrics would silently differ from the fp32 they record. fp32 means fp32."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


@dataclass(frozen=True)
class ExtractionSettings:
    """Everything that determines a patch embedding; recorded in every bank."""

    backbone: str
    layers: tuple[str, ...]
    weights: str
    resize: int = 256
    crop: int = 224
    patch_size: int = 3
    patch_stride: int = 1
    pretrain_dim: int = 1024
    target_dim: int = 1024
    batch_size: int = 8
    fp16: bool = False  # half-precision backbone on GPU and half-precision feature transfer

    def declared(self) -> dict[str, Any]:
        """The compatibility fields known without building the model, for failing fast on a bank.

        ``batch_size`` is recorded, not compared: batch composition can change the last bits of a
        feature, so a bank's record says which it was built with (``jobs.predict`` reuses it).
        """
        return {
            "backbone": self.backbone,
            "weights": self.weights,
            "resize": self.resize,
            "crop": self.crop,
            "patch_size": self.patch_size,
            "patch_stride": self.patch_stride,
            "pretrain_dim": self.pretrain_dim,
            "feature_dim": self.target_dim,
            "fp16": self.fp16,
            "batch_size": self.batch_size,
        }

    @classmethod
    def from_config(cls, config: Any) -> "ExtractionSettings":
        return cls(
            backbone=config.backbone.name,
            layers=tuple(config.backbone.layers),
            weights=config.backbone.weights,
            resize=config.preprocess.resize,
            crop=config.preprocess.crop,
            patch_size=config.embedding.patch_size,
            patch_stride=config.embedding.patch_stride,
            pretrain_dim=config.embedding.pretrain_dim,
            target_dim=config.embedding.target_dim,
            batch_size=config.cluster.batch_size,
            fp16=config.cluster.fp16,
        )


class PatchFeatureExtractor:
    """A frozen backbone plus the patch embedder and the image transform that belong to it."""

    def __init__(self, settings: ExtractionSettings, device: str = "cpu") -> None:
        self.settings = settings
        self.device = torch.device(device)
        self.backbone = FeatureBackbone(
            settings.backbone, settings.layers, settings.weights, settings.crop
        ).to(self.device)
        self.half = settings.fp16 and self.device.type == "cuda"
        if self.half:
            self.backbone.half()
        elif self.device.type == "cuda":
            exact_fp32()
        self.embedder = PatchEmbedder(settings.patch_size, settings.pretrain_dim, settings.target_dim,
                                      settings.patch_stride)
        self.transform = ImageTransform(
            resize=settings.resize, crop=settings.crop, mean=self.backbone.mean, std=self.backbone.std
        )

    def describe(self) -> dict[str, Any]:
        """The bank-compatibility fields (see ``bank.COMPATIBILITY_KEYS``)."""
        return {
            **self.settings.declared(),
            "layers": list(self.backbone.layers),
            "weights_sha256": self.backbone.weights_sha256,
            "mean": list(self.backbone.mean),
            "std": list(self.backbone.std),
        }

    def load_batch(
        self, samples: Sequence[Sample], augmentation: Augmentation | None = None, seeds: Sequence[int] = ()
    ) -> torch.Tensor:
        """Decode, augment (when given: sample i with ``seeds[i]``) and transform images.

        CPU work the cluster layer can overlap with the device. Augmentation runs on the decoded
        original-resolution image, before the resize/crop.
        """
        images = [read_rgb(sample.image_path) for sample in samples]
        if augmentation is not None:
            images = [augment_image(rgb, augmentation, seed) for rgb, seed in zip(images, seeds, strict=True)]
        return torch.stack([self.transform.image(rgb) for rgb in images])

    def embed_batch(self, images: torch.Tensor) -> tuple[np.ndarray, tuple[int, int]]:
        images = images.to(self.device, dtype=torch.float16 if self.half else torch.float32)
        embeddings, grid = self.embedder(self.backbone(images))
        dtype = torch.float16 if self.settings.fp16 else torch.float32
        per_image = embeddings.to(dtype).reshape(len(images), grid[0] * grid[1], -1)
        return per_image.cpu().numpy(), grid

    def extract(
        self,
        samples: Sequence[Sample],
        indices: Sequence[int],
        decoder: Executor | None = None,
        augmentation: Augmentation | None = None,
        seeds: Sequence[int] | None = None,
    ) -> PatchFeatures:
        """Patch features for ``samples``, keyed by ``indices`` (their category-list positions).

        With a ``decoder`` pool, batch i+1 is decoded while batch i runs on the device (PIL and the
        resize release the GIL), so decoding does not starve the accelerator.

        With ``augmentation``, sample i is first augmented with ``seeds[i]``: the caller passes
        ``augment.augment_seed(base, train_index, copy)`` per sample (so a copy does not depend on the
        shard it is in) and offsets ``indices`` so copies do not collide with the originals, e.g.
        ``copy * n_train + train_index``. Without it, extraction is exactly the un-augmented one.
        """
        if len(samples) != len(indices) or not samples:
            raise ValueError(f"need equally many samples and indices (> 0), got {len(samples)} and {len(indices)}")
        if (augmentation is None) != (seeds is None) or (seeds is not None and len(seeds) != len(samples)):
            raise ValueError("augmentation needs one seed per sample, and seeds need an augmentation")
        started = time.perf_counter()
        size = self.settings.batch_size
        batches = [
            (samples[start : start + size], augmentation, seeds[start : start + size] if seeds is not None else ())
            for start in range(0, len(samples), size)
        ]
        decode = decoder.submit if decoder is not None else _run_now
        pending = decode(self.load_batch, *batches[0])
        chunks, grid = [], None
        for position in range(len(batches)):
            images = pending.result()
            if position + 1 < len(batches):
                pending = decode(self.load_batch, *batches[position + 1])
            embeddings, grid = self.embed_batch(images)
            chunks.append(embeddings)
        seconds = time.perf_counter() - started
        return PatchFeatures(np.concatenate(chunks), grid, np.asarray(indices, dtype=np.int64), seconds)


def _run_now(function: Callable[..., Any], *args: Any) -> Future:
    """``Executor.submit`` without an executor: run in the caller's thread."""
    future: Future = Future()
    future.set_result(function(*args))
    return future
